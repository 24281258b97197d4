#!/usr/bin/env python3
"""Study for issue 14 (before any kernel): which 2-bit-class weight format wins per byte on real expert
matrices when rounded with the expert's own Hessian (GPTQ error feedback) vs nearest with importance.

    .venv/bin/python scripts/study_codebooks.py [--layers 0,2] [--experts 4] [--write-results]

Matrices: the bench model's expert projections (gate, up, down) of the given layers, with the tokens the
float model routes to each expert (64 x 256 calibration tokens). Error of a quantized W: the relative
output error tr(dW H dW^T) / tr(W H W^T) with H = X^T X of the expert's routed inputs (the down
projection's inputs are the expert's inner activations). Formats (bits per weight with every scale):
  mcq2        our affine grid: 2-bit codes, fp16 scale and min per 128 (2.25 bpw)
  nu2-b32     non-uniform 4-level table (Lloyd-Max for a Gaussian: +-0.4528, +-1.5104) times a 4-bit block
              scale per 32 weights times an fp16 row scale (2.125 bpw + 16/row); the IQ2_KS family
  nu2-b16     the same with 16-weight blocks (2.25 bpw)
  tern-b32    ternary {-1, 0, 1} (1.6 bpw packed 5 per byte) with the same scales (1.725 bpw)
  iq2_xxs / iq1_s / q2_k   llama.cpp's, by ggml's own quantizer with the routed inputs' mean x^2
Each of ours rounded two ways: nearest (rtn), and GPTQ (columns left to right, each rounding error pushed
onto the columns not yet rounded through H^-1's Cholesky factor; block scales fixed first from W).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from mcmoe_gguf.base.ggml import ggml  # noqa: E402
from mcmoe_gguf.model.tiny import tiny_model  # noqa: E402
from mcmoe_gguf.quant import formats  # noqa: E402
from mcmoe_gguf.quant.gptq import GPTQ  # noqa: E402
from bench_eps import layer_inputs  # noqa: E402

LLOYD2 = torch.tensor([-1.5104, -0.4528, 0.4528, 1.5104])
TERN = torch.tensor([-1.0, 0.0, 1.0])


def block_scales(W: torch.Tensor, levels: torch.Tensor, block: int) -> torch.Tensor:
    """Per-(row, block) scale: the least-squares scale for nearest rounding, searched over 16 candidates
    of the block's RMS, then stored as 4 bits relative to the row's largest (a fp16 row scale)."""
    out, n = W.shape
    Wb = W.reshape(out, n // block, block)
    rms = Wb.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    best, best_err = None, None
    for f in torch.linspace(0.5, 1.6, 16):
        s = rms * f
        q = levels[(Wb / s).unsqueeze(-1).sub(levels).abs().argmin(-1)] * s
        e = (Wb - q).pow(2).sum(-1, keepdim=True)
        best = s if best is None else torch.where(e < best_err, s, best)
        best_err = e if best_err is None else torch.minimum(e, best_err)
    s = best.squeeze(-1)                                   # [out, n_blocks]
    smax = s.max(1, keepdim=True).values
    code = torch.clamp(torch.round(s / smax * 15), 1, 15)  # 4 bits per block, relative to the row
    return (code / 15 * smax).repeat_interleave(block, 1)  # [out, n] per-weight scale


def nearest(w: torch.Tensor, s: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return levels[(w / s).unsqueeze(-1).sub(levels).abs().argmin(-1)] * s


def gptq_round(W: torch.Tensor, H: torch.Tensor, S: torch.Tensor, levels: torch.Tensor, damp=0.01) -> torch.Tensor:
    """GPTQ with a fixed per-weight scale S: column by column, error fed forward through chol(H^-1)."""
    W = W.clone().double()
    H = H.clone().double()
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        q = nearest(W[:, i], S[:, i].double(), levels.double())
        Q[:, i] = q
        err = (W[:, i] - q) / U[i, i]
        W[:, i + 1:] -= err[:, None] * U[i, i + 1:][None]
    return Q.float()


def rel_err(W, Q, H) -> float:
    d = (W - Q).double()
    return float(torch.einsum("ij,jk,ik->", d, H, d) / torch.einsum("ij,jk,ik->", W.double(), H, W.double()))


@torch.no_grad()
def study(a) -> str:
    torch.set_num_threads(a.threads)
    model = tiny_model("bench")
    layers = [int(x) for x in a.layers.split(",")]
    res = {}
    for l, moe, x in layer_inputs(model, 64, 256, layers=max(layers) + 1):
        if l not in layers:
            continue
        _, _, ids = moe.route(x)
        for e in range(a.experts):
            tok = torch.where((ids == e).any(-1))[0]
            xe = x[tok]
            ex = moe.experts[e]
            inner = torch.nn.functional.silu(xe @ ex.w1.weight.t()) * (xe @ ex.w3.weight.t())
            for name, W, X in (("gate", ex.w1.weight, xe), ("up", ex.w3.weight, xe), ("down", ex.w2.weight, inner)):
                W = W.detach().float()
                H = (X.double().t() @ X.double()) / len(X)
                imp = (X.double() ** 2).mean(0).float().numpy()
                r = {}
                g = GPTQ(W.shape[1])
                g.add_batch(X)
                r["mcq2 gptq"] = rel_err(W, g.quantize(W, 2).dequantized, H)
                r["mcq2 rtn"] = rel_err(W, torch.from_numpy(formats.dequantize(formats.quantize(W, 2, "mse"), 2,
                                                                               W.shape[1])).reshape(W.shape), H)
                for fmt, lv, blk in (("nu2-b32", LLOYD2, 32), ("nu2-b16", LLOYD2, 16), ("tern-b32", TERN, 32)):
                    S = block_scales(W, lv, blk)
                    r[f"{fmt} rtn"] = rel_err(W, nearest(W, S, lv), H)
                    r[f"{fmt} gptq"] = rel_err(W, gptq_round(W, H, S, lv), H)
                for t in ("iq2_xxs", "iq1_s", "q2_k"):
                    q = ggml().dequantize(ggml().quantize(W.numpy(), t, imp), t, W.shape[1])
                    r[f"{t} (ggml, imatrix)"] = rel_err(W, torch.from_numpy(q).reshape(W.shape), H)
                for k, v in r.items():
                    res.setdefault(k, []).append(v)
            print(f"layer {l} expert {e} done", flush=True)
    bpw = {"mcq2": 2.25, "nu2-b32": 2.125, "nu2-b16": 2.25, "tern-b32": 1.725, "iq2_xxs": 2.0625, "iq1_s": 1.5625,
           "q2_k": 2.625}
    rows = sorted(res, key=lambda k: (bpw[k.split()[0]], k))
    lines = [f"bench model, layers {a.layers}, experts 0-{a.experts - 1}, gate/up/down ({len(res[rows[0]])} matrices); "
             "relative output error tr(dW H dW^T) / tr(W H W^T) on each expert's routed tokens (geometric mean "
             "over matrices, and the share of matrices where the format beats iq2_xxs):", "",
             "| format, rounding | bpw | rel. output error (geo. mean) | beats iq2_xxs on |", "|---|---:|---:|---:|"]
    ref = np.array(res["iq2_xxs (ggml, imatrix)"])
    for k in rows:
        v = np.array(res[k])
        lines.append(f"| {k} | {bpw[k.split()[0]]:.4g} | {math.exp(np.log(v).mean()):.4f} | "
                     f"{100 * (v < ref).mean():.0f}% |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="0,2")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args()
    text = study(a)
    print(text)
    if a.write_results:
        from results_md import machine, replace_section
        replace_section("study_codebooks", "## Issue 14 study: formats per byte on real expert matrices, GPTQ vs "
                        f"nearest\n\n`.venv/bin/python scripts/study_codebooks.py --layers {a.layers} --experts "
                        f"{a.experts} --write-results` on {machine()}.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
