"""Calibration: token batches from a text corpus, and per-MoE-layer statistics on the layer's real inputs.

For MoE layer l and expert i (paper section 3.2):
  phi_i   access frequency: share of the layer's routed (token, slot) pairs that go to expert i;
  w_i     mean routing weight of expert i over the tokens routed to it (top-k weights after the router's
          renormalisation, as the model uses them);
  eps_ij  ||MoE(x) - MoE_i->j(x)||_F over the calibration tokens when only expert i is quantized to j bits
          (round-to-nearest on our stored grid by default; only tokens routed to i change, each by its
          routing weight times the expert's output change);
  mu_l    ODP threshold: median over tokens of w_second / w_first (the paper's);
  odp     the layer's pruning curve: per threshold on odp_fit.MU_GRID, the share of routed slots ODP
          skips and the squared error that adds to the layer's output, relative to its energy (odp_fit.py
          fits thresholds to a target from it).
An expert that receives no token has phi = w = eps = 0: the allocation sees zero importance and gives it
the cheapest width (nothing measured says more bits would help it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from mcmoe_gguf.quant.gptq import rtn

BITS = (1, 2, 3)


def calibration_tokens(tokenizer_json: str, text: str, n_seq: int, seq_len: int) -> torch.Tensor:
    """[n, seq_len] token windows, non-overlapping and spread evenly over the text (deterministic)."""
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids
    n_avail = len(ids) // seq_len
    if n_avail == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    n = min(n_seq, n_avail)
    starts = np.linspace(0, (n_avail - 1) * seq_len, n).astype(int) // seq_len * seq_len
    return torch.tensor([ids[s:s + seq_len] for s in starts], dtype=torch.long)


def rtn_dequant(W: torch.Tensor, bits: int, method: str = "mse") -> torch.Tensor:
    """W rounded to nearest on the stored grid, dequantized (the eps statistic's quantizer)."""
    return rtn(W, bits, method).dequantized


@dataclass
class LayerStats:
    layer: int
    counts: list[int]          # routed (token, slot) pairs per expert
    phi: list[float]
    w: list[float]
    eps: list[list[float]]     # [expert][bits-1]
    mu: float
    n_tokens: int
    ladder: list[str] | None = None             # a ladder's types (quant/ladder.py), if the run has one
    ladder_eps: list | None = None              # [expert][projection][type]: eps of each choice
    odp: dict | None = None                     # pruning curve {mu, skip, err} (odp_curve)

    def to_dict(self) -> dict:
        return asdict(self)


def expert_inner(w1, w3, x):
    """The input of an expert's down projection: silu(x w1^T) * (x w3^T) (also GPTQ's Hessian of w2)."""
    return torch.nn.functional.silu(x @ w1.t()) * (x @ w3.t())


def expert_forward(w1, w2, w3, x):
    """An expert's output with the given (e.g. quantized) weights."""
    return torch.nn.functional.linear(expert_inner(w1, w3, x), w2)


@torch.no_grad()
def moe_stats(layer_idx: int, moe: torch.nn.Module, x: torch.Tensor,
              quantize: Callable[[torch.Tensor, int], torch.Tensor] = rtn_dequant) -> LayerStats:
    """Statistics of one MoE block (an adapter's `layer.moe`: hp, route(x), experts[e].w1/w2/w3) on its real
    inputs x [tokens, d]."""
    hp = moe.hp
    _, wts, ids = moe.route(x)
    counts = torch.bincount(ids.reshape(-1), minlength=hp.num_local_experts)
    total = ids.numel()
    phi, w_mean, eps = [], [], []
    for e in range(hp.num_local_experts):
        tok, slot = torch.where(ids == e)
        phi.append(counts[e].item() / total)
        if len(tok) == 0:
            w_mean.append(0.0)
            eps.append([0.0] * len(BITS))
            continue
        g = wts[tok, slot].to(x.dtype)[:, None]
        w_mean.append(g.mean().item())
        ex = moe.experts[e]
        xe = x[tok]
        ref = expert_forward(ex.w1.weight, ex.w2.weight, ex.w3.weight, xe)
        row = []
        for b in BITS:
            q = expert_forward(quantize(ex.w1.weight, b), quantize(ex.w2.weight, b), quantize(ex.w3.weight, b), xe)
            row.append(torch.linalg.norm(g * (ref - q)).item())
        eps.append(row)
    return LayerStats(layer_idx, counts.tolist(), phi, w_mean, eps, odp_mu(wts), x.shape[0])


def odp_mu(wts: torch.Tensor) -> float:
    """ODP threshold of a layer from its routing weights [tokens, k] (sorted, renormalised): median w1/w0."""
    ratio = (wts[:, 1] / wts[:, 0]) if wts.shape[1] >= 2 else torch.zeros(1)
    return float(ratio.median().item())


@torch.no_grad()
def odp_curve(moe: torch.nn.Module, x: torch.Tensor, resid: torch.Tensor, max_tokens: int = 16384) -> dict:
    """The layer's ODP pruning curve on calibration tokens (at most max_tokens of them, evenly spaced):
    for each mu on odp_fit.MU_GRID, `skip` = share of the routed (token, slot) pairs the engine's rule
    prunes (a slot s != top with w_s < mu * w_top, the kept weights rescaled to the same sum:
    cpp/ggml/mcmoe-odp.h) and `err` = sum over tokens of ||y - y_pruned||^2 / sum ||resid + y||^2, the
    squared change of the layer's output (residual stream after the MoE block) relative to its energy.
    Protection is ignored (it only removes pruning). Exact for any top-k: a token's slots are pruned in
    order of increasing ratio, so its error changes only at its k-1 ratios."""
    from mcmoe_gguf.quant.odp_fit import MU_GRID
    resid = resid.reshape(-1, x.shape[-1])
    if x.shape[0] > max_tokens:
        sel = torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).long()
        x, resid = x[sel], resid[sel]
    _, wts, ids = moe.route(x)
    T, k = wts.shape
    outs = torch.zeros(T, k, x.shape[1], dtype=x.dtype, device=x.device)
    for e in range(moe.hp.num_local_experts):
        tok, slot = torch.where(ids == e)
        if len(tok):
            ex = moe.experts[e]
            outs[tok, slot] = expert_forward(ex.w1.weight, ex.w2.weight, ex.w3.weight, x[tok])
    w = wts.to(x.dtype)
    y = (w[..., None] * outs).sum(1)
    energy = float(((resid + y) ** 2).sum())
    rows = torch.arange(T, device=x.device)
    top = w.argmax(1)
    ratio = (w / w[rows, top][:, None]).double()
    ratio[rows, top] = float("inf")                 # the top slot is never pruned
    order = ratio.argsort(1)
    keep = torch.ones(T, k, dtype=torch.bool, device=x.device)
    n = len(MU_GRID)
    skip_at, err_at = np.zeros(n + 1), np.zeros(n + 1)
    prev = torch.zeros(T, dtype=torch.float64, device=x.device)
    for j in range(k - 1):
        s = order[:, j]
        keep[rows, s] = False
        wk = w * keep
        yk = (w.sum(1) / wk.sum(1))[:, None] * (wk[..., None] * outs).sum(1)
        e_j = ((y - yk).double() ** 2).sum(1)
        # the slot is pruned from the first grid point above its ratio on (strict <, as the engine)
        b = np.searchsorted(MU_GRID, ratio[rows, s].cpu().numpy(), side="right")
        np.add.at(skip_at, b, 1.0)
        np.add.at(err_at, b, (e_j - prev).cpu().numpy())
        prev = e_j
    return {"mu": MU_GRID.tolist(), "skip": (np.cumsum(skip_at)[:n] / (T * k)).tolist(),
            "err": (np.cumsum(err_at)[:n] / max(energy, 1e-30)).tolist()}
