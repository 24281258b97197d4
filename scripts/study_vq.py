#!/usr/bin/env python3
"""Issue 14, before building a vector-codebook type: does GPTQ into an 8-weight codebook reach IQ2_XXS's
quality at <= 1.5 bpw? Judged end to end, layer by layer, on the bench model (scripts/study_mcn.py's table).

    .venv/bin/python scripts/study_vq.py [--layers 0,2] [--formats "vq11s64 gptq,iq1_s,..."] [--chunks 30]

A format "vq<K>s<S> <how>": every 8 consecutive weights of a row are one K-bit index into a codebook of 2^K
8-dimensional vectors (Lloyd's k-means on unit Gaussian samples, fixed seed: a data-free design), times a
4-bit scale per S weights, times an fp16 scale per 256: K/8 + 4/S + 1/16 bpw (vq11s64: 1.5, vq11s32: 1.5625,
vq10s32: 1.4375, vq12s32: 1.6875). Scales: per S-slice the best of 9 multiples of the slice's RMS under the
importance (diag H), then d = max / 15 per 256 and 4-bit multiples of d (as mcn). <how>:
  rtn   each 8-vector rounded to the codeword nearest under the importance
  gptq  BlockLDLQ: 8 columns at a time in stored order, the codeword nearest under the block's own error metric
        (U_BB^-1 U_BB^-T, U the upper Cholesky factor of H^-1), the block's error pushed onto later columns
        through U (the exact block form of GPTQ's update); then each row's scales unshrunk under H as mcn's
  gptq0 the same without the unshrink (it raises the matrix error on purpose: see study_mcn.py)
  gptqL GPTQ on a regularised Hessian, (1 - L/100) H + L/100 diag(H) (e.g. gptq30): the routed tokens'
        Hessian of a down projection (input 512 here, 14336 in Mixtral) is estimated from too few tokens, and
        GPTQ hides error in directions those tokens happen to miss
Other formats as in study_mcn.py (iq1_s, iq1_m, iq2_xxs, mcn2 gptq, ...).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import study_mcn  # noqa: E402
from mcmoe_gguf.base.cache import cache_dir  # noqa: E402
from mcmoe_gguf.quant.gptq import GPTQ  # noqa: E402

FORMATS = ("vq11s64 gptq", "vq11s64 gptq0", "vq11s64 rtn", "vq10s32 gptq", "vq11s32 gptq", "vq12s32 gptq", "iq1_s", "iq1_m",
           "iq2_xxs", "mcn2 gptq")
DIM = 8
SCALE_GRID = torch.linspace(0.6, 1.4, 9)


def parse(name: str):
    m = re.fullmatch(r"vq(\d+)s(\d+)", name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def bpw(name: str) -> float:
    if parse(name):
        k, s = parse(name)
        return k / DIM + 4 / s + 16 / 256
    return {**study_mcn.BPW, "iq1_s": 1.5625, "iq1_m": 1.75, "iq2_xs": 2.3125}[name]


def _nearest(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    half = (C * C).sum(1) / 2
    chunk = max(1, (1 << 26) // len(C))                          # a [chunk, 2^K] score matrix of <= 256 MB
    return torch.cat([(X[i:i + chunk] @ C.t() - half).argmax(1) for i in range(0, len(X), chunk)])


def codebook(k: int, n: int | None = None, iters: int = 25) -> torch.Tensor:
    """2^k x 8 Lloyd codebook of the unit Gaussian (seeded; cached); at least 64 samples per codeword."""
    n = n or max(1 << 18, 64 << k)
    path = cache_dir("study") / f"vq{k}-{n}-{iters}.pt"
    if path.exists():
        return torch.load(path)
    g = torch.Generator().manual_seed(k)
    X = torch.randn(n, DIM, generator=g)
    C = X[torch.randperm(n, generator=g)[:1 << k]].clone()
    for _ in range(iters):
        idx = _nearest(X, C)
        cnt = torch.bincount(idx, minlength=len(C)).float()
        S = torch.zeros_like(C).index_add_(0, idx, X)
        C = torch.where(cnt[:, None] > 0, S / cnt.clamp_min(1)[:, None], C)
    torch.save(C, path)
    return C


def _weighted_nearest(T: torch.Tensor, w: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """argmin_c sum_i w_i (t_i - c_i)^2 for rows T [..., 8] with weights w [8] (shared)."""
    cw = C * w
    return (T @ cw.t() - (cw * C).sum(1) / 2).argmax(-1)


def fit_steps(W: torch.Tensor, imp: torch.Tensor, C: torch.Tensor, S: int) -> torch.Tensor:
    """[out, n/S] scales (4-bit multiples of an fp16 d per 256) of each S-slice."""
    out, n = W.shape
    Ws = W.reshape(out, n // S, S // DIM, DIM)
    ws = imp.reshape(n // S, S // DIM, DIM)
    rms = (W.reshape(out, n // S, S) ** 2).mean(-1).sqrt().clamp_min(1e-12)
    best, best_err = rms.clone(), torch.full_like(rms, float("inf"))
    for f in SCALE_GRID:
        sc = rms * f
        T = Ws / sc[..., None, None]
        err = torch.zeros_like(rms)
        for j in range(n // S):
            idx = _weighted_nearest(T[:, j], ws[j].mean(0), C)      # one metric per slice: cheap, close
            q = C[idx] * sc[:, j, None, None]
            err[:, j] = ((Ws[:, j] - q) ** 2 * ws[j]).sum((-1, -2))
        better = err < best_err
        best = torch.where(better, sc, best)
        best_err = torch.where(better, err, best_err)
    per = 256 // S
    blk = best.reshape(out, n // 256, per)
    d = (blk.amax(-1) / 15).half().float().clamp_min(1e-30)
    s = torch.clamp(torch.round(blk / d[..., None]), 1, 15)
    return (s * d[..., None]).reshape(out, n // S)


def quantize_vq(W: torch.Tensor, X: torch.Tensor, k: int, S: int, how: str, C: torch.Tensor | None = None) -> torch.Tensor:
    """C: the codebook (default: the Lloyd codebook of 2^k words)."""
    C = codebook(k) if C is None else C
    out, n = W.shape
    g = GPTQ(n)
    g.add_batch(X)
    diag = torch.diag(g.H).float().clamp_min(0)
    imp = diag + 1e-8 * diag.mean()
    step = fit_steps(W, imp, C, S)                               # [out, n/S]
    col_step = step.repeat_interleave(S, 1)                      # [out, n]
    if how == "rtn":
        T = (W / col_step).reshape(out, n // DIM, DIM)
        Q = torch.empty_like(W)
        for b in range(n // DIM):
            idx = _weighted_nearest(T[:, b], imp[b * DIM:(b + 1) * DIM], C)
            Q[:, b * DIM:(b + 1) * DIM] = C[idx] * col_step[:, b * DIM:(b + 1) * DIM]
        return Q
    lam = int(how[4:]) / 100 if how[4:].isdigit() and how != "gptq0" else 0.0
    U, _ = g._hinv(torch.diag(g.H) == 0, None, 0.01, False, lam)     # GPTQ's factor, natural column order
    Wc = W.clone()
    Q = torch.empty_like(W)
    for b in range(n // DIM):
        i1, i2 = b * DIM, (b + 1) * DIM
        Ub = U[i1:i2, i1:i2]
        Ubi = torch.linalg.inv(Ub)
        M = Ubi @ Ubi.t()                                        # the block's error metric
        st = col_step[:, i1:i2]
        T = Wc[:, i1:i2] / st
        CM = C @ M
        idx = (T @ CM.t() - (CM * C).sum(1) / 2).argmax(-1)
        q = C[idx] * st
        Q[:, i1:i2] = q
        E = (Wc[:, i1:i2] - q) @ Ubi
        Wc[:, i2:] -= E @ U[i1:i2, i2:]
    if how == "gptq0":
        return Q
    # unshrink: each row's output error uncorrelated with its output under H (gptq.GPTQ._unshrink)
    return Q * torch.from_numpy(g._row_gain(W, Q))[:, None]


def quantize(W: torch.Tensor, X: torch.Tensor, fmt: str) -> torch.Tensor:
    name, _, how = fmt.partition(" ")
    if parse(name):
        return quantize_vq(W, X, *parse(name), how or "gptq")
    if name.startswith("mcn") and how[4:].isdigit():            # mcn's GPTQ on the regularised Hessian
        g = GPTQ(W.shape[1])
        g.add_batch(X)
        lam = int(how[4:]) / 100
        g.H = (1 - lam) * g.H + lam * torch.diag(torch.diag(g.H))
        return g.quantize_mcn(W, int(name[3:])).dequantized
    return study_mcn.quantize(W, X, fmt)


class Bpw(dict):
    def __missing__(self, k):
        return bpw(k)


def prepare(formats) -> None:
    """Train (or load) the codebooks first: their k-means runs once per K and is cached."""
    for f in formats:
        if parse(f.split()[0]):
            codebook(parse(f.split()[0])[0])


if __name__ == "__main__":
    sys.exit(study_mcn.run(__doc__, "study_vq", "Issue 14: GPTQ into an 8-weight vector codebook, judged end to end "
                           "(bench model)", "0,2", FORMATS, quantize, Bpw(), prepare))
