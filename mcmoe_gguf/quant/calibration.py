"""Calibration: token batches from a text corpus, and per-MoE-layer statistics on the layer's real inputs.

For MoE layer l and expert i (paper section 3.2):
  phi_i   access frequency: share of the layer's routed (token, slot) pairs that go to expert i;
  w_i     mean routing weight of expert i over the tokens routed to it (top-k weights after the router's
          renormalisation, as the model uses them);
  eps_ij  ||MoE(x) - MoE_i->j(x)||_F over the calibration tokens when only expert i is quantized to j bits
          (round-to-nearest on our stored grid by default; only tokens routed to i change, each by its
          routing weight times the expert's output change);
  mu_l    ODP threshold: median over tokens of w_second / w_first.
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
