"""One matrix into one type: our mcq widths and mcn tables by GPTQ (or RTN), llama.cpp's types by ggml's own
quantizer.

A type is "mcqN" (our affine group-128 grid, quant/formats.py) or a ggml type name ("iq2_xxs", "q2_k",
"q4_k", ...; base/ggml.py). Both take the calibration inputs of the matrix: GPTQ builds its Hessian from
them, ggml's quantizers take their importance vector (mean x^2 per input column, llama-imatrix's
statistic, which is also what llama.cpp feeds them). A stored entry is {bits, shape, data} (mcq) or
{type, shape, data} (ggml), data the bytes as written to the GGUF file (quant/workdir.py).
"""
from __future__ import annotations

import torch

from mcmoe_gguf.base.ggml import ggml
from mcmoe_gguf.quant import formats
from mcmoe_gguf.quant.gptq import GPTQ, rtn
from mcmoe_gguf.quant.mixes import is_mcn, is_mcq, is_mct, mcq_bits


def importance(x: torch.Tensor) -> torch.Tensor:
    """llama-imatrix's statistic: mean of x^2 per input column over the calibration tokens."""
    x = x.reshape(-1, x.shape[-1]).double()
    return (x * x).mean(0).float()


def routed_importance(x_routed: torch.Tensor, fallback: torch.Tensor | None) -> torch.Tensor | None:
    """Importance of one expert's matrix from the tokens routed to it. An expert that received no token
    has no statistic of its own: it gets the layer's (all tokens), as the i-quants need one (llama.cpp
    would refuse to quantize it at all: its imatrix has no entry for that expert)."""
    if x_routed.shape[0] == 0:
        return fallback
    return importance(x_routed)


def mcq_packed(res, bits: int) -> dict:
    return {"bits": bits, "shape": list(res.codes.shape),
            "data": torch.from_numpy(formats.pack(res.codes, res.scale, res.mn, bits))}


def ggml_packed(W: torch.Tensor, type_name: str, imp: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """A matrix in a ggml type by ggml's own quantizer: (stored entry, dequantized weights)."""
    w = W.detach().float().cpu().numpy()
    imp = None if imp is None else imp.detach().float().cpu().numpy()
    blob = ggml().quantize(w, type_name, imp)
    deq = torch.from_numpy(ggml().dequantize(blob, type_name, w.shape[1])).to(W.device, W.dtype)
    return {"type": type_name, "shape": list(w.shape), "data": torch.from_numpy(blob)}, deq


def _mcn_reference(W: torch.Tensor, type_name: str, imp: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """mcn by its Python twin (formats.mcn_quantize writes the C reference quantizer's bytes, without libggml)."""
    bits = formats.mcn_spec(type_name).bits
    blob = formats.mcn_quantize(W, bits, None if imp is None else imp.cpu())
    deq = torch.from_numpy(formats.mcn_dequantize(blob, bits, W.shape[1])).to(W.device, W.dtype)
    return {"type": type_name, "shape": list(W.shape), "data": torch.from_numpy(blob)}, deq


def _superblock_ops(type_name: str):
    """(spec, GPTQ rounding, pack, reference quantizer -> (entry, dequantized)) of an mcn table or mct trellis type.
    mct's reference is ggml's own (ggml_packed: its C Viterbi is byte-equal to trellis.mct_quantize, whose float64
    Viterbi in torch is ~100x slower)."""
    if is_mct(type_name):
        from mcmoe_gguf.quant import trellis
        return (trellis.mct_spec(type_name),
                lambda H, W, bits, cfg: H.quantize_mct(W, bits, percdamp=cfg.percdamp),
                trellis.mct_pack, ggml_packed)
    # act-order costs mcn nothing: its scales are static
    return (formats.mcn_spec(type_name),
            lambda H, W, bits, cfg: H.quantize_mcn(W, bits, percdamp=cfg.percdamp, act_order=True),
            formats.mcn_pack, _mcn_reference)


def superblock_packed(W: torch.Tensor, type_name: str, x: torch.Tensor, cfg, H: GPTQ | None,
                      fallback_importance: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """W in one of our super-block types (an mcn table, an mct trellis): GPTQ / BlockLDLQ into its codes with the
    inputs' Hessian, or the reference quantizer (nearest level / a Viterbi path per sequence) under the inputs'
    importance (cfg.method "rtn", or an expert no calibration token reached: the layer's importance)."""
    spec, round_gptq, pack, reference = _superblock_ops(type_name)
    if cfg.method != "gptq" or (H is None and x.shape[0] == 0):
        return reference(W, type_name, routed_importance(x, fallback_importance))
    if H is None:
        H = GPTQ(W.shape[1], device=W.device)
        H.add_batch(x)
    res = round_gptq(H, W, spec.bits, cfg)
    blob = pack(res.codes, res.d, res.s, spec.bits)
    return ({"type": type_name, "shape": list(W.shape), "data": torch.from_numpy(blob)},
            res.dequantized.to(W.device, W.dtype))


def mcq_result(H: GPTQ | None, W: torch.Tensor, bits: int, cfg, unshrink: bool = True):
    """GPTQ on H (cfg: PMQConfig's method, percdamp, act_order, param_method), or RTN without one. GPTQ's rows
    are unshrunk (GPTQ.quantize): on the bench model's layer 0 that took mcq1 experts from x2.28 PPL to x1.28,
    mcq2 from x1.077 to x1.030, mcq3 from x1.013 to x1.005 (docs/RESULTS.md, "unshrink for mcq")."""
    if cfg.method == "rtn" or H is None:
        return rtn(W, bits, cfg.param_method)
    return H.quantize(W, bits, percdamp=cfg.percdamp, act_order=cfg.act_order, param_method=cfg.param_method,
                      unshrink=unshrink)


def quantize_matrix(W: torch.Tensor, type_name: str, x: torch.Tensor, cfg, H: GPTQ | None = None,
                    fallback_importance: torch.Tensor | None = None, mcq_unshrink: bool = True
                    ) -> tuple[dict, torch.Tensor]:
    """W [out, in] in `type_name` given its calibration inputs x [tokens, in]: (stored entry, dequantized).
    H: a GPTQ Hessian of x already built (shared by gate and up); built here if needed and not given.
    mcq_unshrink=False: mcq's GPTQ without the unshrink (what the ladder's eps measures, ladder.measure_eps)."""
    if is_mcq(type_name):
        if H is None and cfg.method == "gptq":
            H = GPTQ(W.shape[1], device=W.device)
            H.add_batch(x)
        res = mcq_result(H, W, mcq_bits(type_name), cfg, mcq_unshrink)
        return mcq_packed(res, mcq_bits(type_name)), res.dequantized
    if is_mcn(type_name) or is_mct(type_name):
        return superblock_packed(W, type_name, x, cfg, H, fallback_importance)
    return ggml_packed(W, type_name, routed_importance(x, fallback_importance))
