"""The type ladder: one type per (layer, expert, projection) out of our mcq widths and llama.cpp's own types.

The paper's program gives every expert 1, 2 or 3 bits of one grid. Below ~2 bits that grid is weak (mcq1:
one step size per 128 weights), while llama.cpp's i-quants (lattice codebooks with per-32 scales) are
strong. The ladder lets the program choose, for every expert's gate, up and down projection separately,
the type that buys the most error per byte, measured on the tokens routed to that expert:

    eps[e, p, t] = || g * (E_e(x) - E_e,p->t(x)) ||_F      over the tokens x routed to expert e

where E_e,p->t is expert e with only projection p quantized to type t by the quantizer that will write
it (GPTQ for mcq, ggml's quantizer with the routed tokens' importance for the others) and g the tokens'
routing weights: the paper's eps (Eq. 3), per projection and per type. The integer program
(allocate.allocate_ladder) then minimises sum phi^alpha w^beta eps^gamma under the byte budget. With
gamma = 2 the sum over projections is the sum of squared errors, which adds up when the projections'
errors are uncorrelated (tests/quant/test_ladder.py checks this against quantizing all three at once).

Named ladders: "mcq" is the paper's program (per expert, 1/2/3 bits, >= one expert at 3 and one at 2 per
layer; not a ladder of this module); "stock" llama.cpp's types only; "full" both. A comma-separated list
of types is a ladder too (e.g. "mcq1,mcq2,mcq3" = the paper's widths per projection, without its guard).
"""
from __future__ import annotations

import gguf
import numpy as np
import torch
from tqdm import tqdm

from mcmoe_gguf.quant.budget import PROJECTIONS, projection_shapes
from mcmoe_gguf.quant.gptq import GPTQ
from mcmoe_gguf.quant.mixes import is_ours, tensor_bytes
from mcmoe_gguf.quant.quantizers import importance, quantize_matrix

PAPER = "mcq"
STOCK_TYPES = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "q2_k", "q3_k", "q4_k")
MCN_TYPES = ("mcn2", "mcn3")     # our non-uniform table types (issue 14)
MCT_TYPES = ("mct1", "mct2", "mct3")   # our trellis types (issue 14)
# "full" is the ladder of issue 13 (kept as it was, so its tables and work directories stay reproducible);
# "mcn" adds the table types to it, "mct" the trellis types to that
LADDERS = {"stock": STOCK_TYPES, "full": ("mcq1", "mcq2", "mcq3") + STOCK_TYPES,
           "mcn": ("mcq1", "mcq2", "mcq3") + MCN_TYPES + STOCK_TYPES,
           "mct": ("mcq1", "mcq2", "mcq3") + MCN_TYPES + MCT_TYPES + STOCK_TYPES}
GRANULARITIES = ("projection", "expert", "layer")    # one type per projection, per expert (all three), or
                                                     # per (layer, projection) for all experts (--compat stock)
_MCQ = ("mcq1", "mcq2", "mcq3", "mcq4")


def names() -> list[str]:
    return [PAPER, *LADDERS]


def resolve(spec: str) -> tuple[str, ...]:
    """The types of a ladder: a name (stock, full), or a list of types and names, split by "," or "+" ("full+q5_k+q6_k":
    the full ladder with two wider types, which reach Q4_K_M's file size; "full" itself stays as it was measured)."""
    if spec == PAPER:
        raise ValueError("the 'mcq' ladder is the paper's per-expert program (allocate.allocate), not a type list")
    if spec in LADDERS:
        return LADDERS[spec]
    types = []
    for t in (s.strip().lower() for s in spec.replace("+", ",").split(",")):    # "+": for lists of ladders
        if not t:
            continue
        if t == PAPER:
            raise ValueError(f"ladder {spec!r}: 'mcq' is the paper's per-expert program and cannot join a type list")
        if t in LADDERS:
            types += [u for u in LADDERS[t] if u not in types]
            continue
        if t not in _MCQ and t not in MCN_TYPES and t not in MCT_TYPES:
            try:
                q = gguf.GGMLQuantizationType[t.upper()]
            except KeyError:
                raise ValueError(f"unknown type {t!r} in ladder {spec!r}; a ladder is one of {', '.join(names())} "
                                 f"or a comma-separated list of ladder names, mcq1..mcq4, mcn2, mcn3, mct1..mct3 and ggml types (iq2_xxs, q2_k, ...)") from None
            if q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise ValueError(f"{t} is not a quantized type; a ladder's types are low-bit types")
        if t not in types:
            types.append(t)
    if not types:
        raise ValueError(f"ladder {spec!r} names no type")
    return tuple(types)


def choice_bytes(hp, types) -> np.ndarray:
    """int64 [P, T]: bytes of one expert's projection p in type t (whole blocks, as written)."""
    shapes = projection_shapes(hp)
    return np.array([[tensor_bytes(t, *shapes[p]) for t in types] for p in PROJECTIONS], dtype=np.int64)


def _sample(n: int, k: int, seed: int, device) -> torch.Tensor:
    """k of range(n), sorted, the same for the same seed (all of them when k is 0 or >= n)."""
    if not k or k >= n:
        return torch.arange(n, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values.to(device)


DEFAULT_EPS_HOLDOUT = 0.0    # PMQConfig.eps_holdout (0.25 measured: no better end to end, docs/RESULTS.md)
HOLDOUT_RUNS = 16   # eps_holdout splits the calibration tokens into this many contiguous runs (see holdout_mask)


def holdout_mask(n_tokens: int, fraction: float, device=None) -> torch.Tensor:
    """bool [n_tokens]: the tokens held out for measuring eps. The tokens (sequence after sequence) are cut into
    HOLDOUT_RUNS contiguous runs and `fraction` of them, evenly spaced, are held out (0.25: runs 3, 7, 11,
    15): whole stretches of text, so a held-out token's neighbours did not shape the quantizer either."""
    if not 0 <= fraction < 1:
        raise ValueError(f"eps_holdout must be in [0, 1), got {fraction}")
    run = torch.arange(n_tokens, device=device) * HOLDOUT_RUNS // max(n_tokens, 1)
    return torch.floor((run + 1) * fraction) > torch.floor(run * fraction)


@torch.no_grad()
def measure_eps(moe: torch.nn.Module, x: torch.Tensor, types, cfg, desc: str = "ladder eps",
                progress: bool = True) -> np.ndarray:
    """float64 [E, P, T]: eps of every (expert, projection, type) on the layer's MoE inputs x [tokens, d]
    (module docstring). An expert no token reaches has eps 0 (nothing measured says bytes help it).

    cfg.eps_holdout > 0 measures eps on tokens the quantizer did not see: the routed tokens in the held-out
    runs (holdout_mask) only, scaled by routed / held-out, while GPTQ's Hessian and the importance of ggml's
    quantizers come from the others. Measured on its own calibration tokens GPTQ looks far better than it is
    (it fits them): on the bench model's first layer a GPTQ'd down projection in mcn2 had 0.022 of the MoE
    output's energy as error on its calibration tokens and 0.035 on held-out text, IQ2_XXS (importance only)
    0.038 and 0.039. Held out (0.25), the program's choices changed, but the files' quality did not beyond
    noise (docs/RESULTS.md, "held-out eps"), so it is an option, not the default. An expert with no routed
    token on one side of the split is measured on all its tokens.

    Only what a choice changes is computed: quantizing rows R of the down projection changes output
    dimensions R (inner @ dW_R^T); rows R of gate or up change inner neurons R, whose change reaches the
    output through the down projection's columns R. cfg.eps_rows > 0 quantizes only that many rows of each
    projection (a fixed random sample: every type sees the same rows) and scales the squared error by
    rows / sampled; cfg.eps_tokens > 0 uses at most that many of an expert's routed tokens (evenly spaced),
    scaled likewise. Rows quantize independently in every type (ggml's blocks and GPTQ's updates run along
    a row), so a sampled row is exactly the row the full quantization writes; the estimate is exact for
    the down projection's rows in expectation, and for gate/up up to the cross terms of different neurons'
    errors, which have no preferred sign. All 0 is the exact statistic on the calibration tokens."""
    _, wts, ids = moe.route(x)
    E = moe.hp.num_local_experts
    eps = np.zeros((E, len(PROJECTIONS), len(types)))
    n_rows, n_tok = int(getattr(cfg, "eps_rows", 0) or 0), int(getattr(cfg, "eps_tokens", 0) or 0)
    held = holdout_mask(x.shape[0], float(getattr(cfg, "eps_holdout", 0) or 0), x.device)
    layer_imp = importance(x[~held])     # never empty: run 0 is never held out
    for e in tqdm(range(E), desc=desc, unit="expert", leave=False, disable=not progress):
        tok, slot = torch.where(ids == e)
        if len(tok) == 0:
            continue
        tok_scale = 1.0
        if n_tok and len(tok) > n_tok:
            keep = torch.linspace(0, len(tok) - 1, n_tok, device=tok.device).long()
            tok_scale = len(tok) / n_tok
            tok, slot = tok[keep], slot[keep]
        h = held[tok]
        fit = ~h
        if h.any() and fit.any():
            tok_scale *= len(tok) / int(h.sum())
        else:
            h = fit = torch.ones_like(h)
        g = wts[tok[h], slot[h]].to(x.dtype)[:, None]
        ex = moe.experts[e]
        xe, xf = x[tok[h]], x[tok[fit]]      # measured on xe, quantizers fitted on xf
        W = {p: getattr(ex, p).weight for p in PROJECTIONS}
        a, b = xe @ W["w1"].t(), xe @ W["w3"].t()
        inner = torch.nn.functional.silu(a) * b
        inner_f = torch.nn.functional.silu(xf @ W["w1"].t()) * (xf @ W["w3"].t())
        H = {}
        if cfg.method == "gptq" and any(is_ours(t) for t in types):
            H["x"], H["inner"] = GPTQ(x.shape[-1], device=x.device), GPTQ(inner.shape[-1], device=x.device)
            H["x"].add_batch(xf)
            H["inner"].add_batch(inner_f)
        for pi, p in enumerate(PROJECTIONS):
            src = inner_f if p == "w2" else xf
            R = _sample(W[p].shape[0], n_rows, 1000 * e + pi, x.device)
            scale = tok_scale * W[p].shape[0] / len(R)
            WR = W[p][R]
            for ti, t in enumerate(types):
                # mcq without its unshrink: with it mcq1's measured error falls (layer 0 MoE output 0.42 -> 0.27)
                # and the program chose mcq1 for 37 of 96 projections instead of 13 (bench model, 1.75 bpw), yet
                # mcq1 costs the model far more than that says: KLD 0.150 -> 0.182. Measured as before, the
                # choices stay those of the measured ladder and the written mcq experts gain
                _, deq = quantize_matrix(WR, t, src, cfg, H.get("inner" if p == "w2" else "x"), layer_imp,
                                         mcq_unshrink=False)
                dW = WR - deq
                if p == "w2":
                    d_out = inner @ dW.t()
                else:
                    if p == "w1":
                        d_inner = torch.nn.functional.silu(a[:, R] - xe @ dW.t()) * b[:, R]
                    else:
                        d_inner = torch.nn.functional.silu(a[:, R]) * (b[:, R] - xe @ dW.t())
                    d_out = (d_inner - inner[:, R]) @ W["w2"][:, R].t()
                eps[e, pi, ti] = (scale * float(((g * d_out) ** 2).sum())) ** 0.5
    return eps
