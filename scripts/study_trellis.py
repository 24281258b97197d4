#!/usr/bin/env python3
"""Issue 14, before building a codebook type of our own: a bitshift trellis (QTIP's idea) against an 8-weight
computed codebook (ik's KT idea) and our scalar mcn2, judged end to end, layer by layer, on the bench model
(scripts/study_mcn.py's protocol and table).

    .venv/bin/python scripts/study_trellis.py [--layers 0,2] [--formats "tr2s32 gptq,cb16s32 gptq30,..."] [--chunks 30]

Why: the ladder of llama.cpp's types plus mcn2/mcn3 is level with the ladder without them (0.05 bpw apart); a type
that moves it 0.2 bpw must round much better per bit than a 4-level table. On unit-Gaussian data (--gauss):
a 4-level Lloyd table has MSE 0.1175 per weight at 2 bits, a random 8-D codebook of 2^16 words 0.094, a bitshift
trellis of 2^12 states 0.071 (the bound is 0.0625).

Formats ("<name> <how>"):
  tr<k>s<S>   every row is cut into sequences of T = 64 weights (--seq); weight t of a sequence is v[s_t], v a
              table of 2^12 values (a fixed integer hash of the state: data-free, computable or a 4 KB table),
              s_t = the 12-bit window of the sequence's bitstream ending at weight t's k new bits; tail-biting
              (the stream is read circularly), so a sequence costs exactly k*T bits. Times a 4-bit scale per S
              weights and an fp16 scale per 256: k + 4/S + 1/16 bpw. Rounding = Viterbi over the 4096 states
              (the sequence's best path under a per-weight metric), tail-biting by a doubled pass then one
              constrained pass.
  cb<K>s<S>   every 8 weights one K-bit index into a computed codebook of 2^K 8-vectors (the same hash, 8
              lanes): K/8 + 4/S + 1/16 bpw.
  <how>: rtn = each sequence / 8-vector rounded under the importance (diag H); gptq = BlockLDLQ over blocks of T
  (trellis) or 8 (codebook) columns: the block rounded under the diagonal of its own error metric, its error
  fed to later columns through GPTQ's Cholesky factor, then mcn's unshrink; gptqL on (1 - L/100) H + L/100 diag(H).
Other names as in study_vq.py / study_mcn.py (mcn2 gptq30, iq2_xxs, iq2_xs, iq1_m, ...).
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
import study_vq  # noqa: E402
from mcmoe_gguf.quant.gptq import GPTQ  # noqa: E402

L_BITS = 12
SEQ = 64
FORMATS = ("tr2s32 rtn", "tr2s32 gptq30", "cb16s32 gptq30", "mcn2 gptq30", "iq2_xxs", "iq2_xs",
           "tr1s32 gptq30", "iq1_s")


def _bsum(x: torch.Tensor) -> torch.Tensor:
    return (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF)


def hash_values(n: int, lanes: int = 1) -> torch.Tensor:
    """[n, lanes] near-Gaussian values, unit variance: per lane an odd 32-bit multiplier, an xorshift-multiply
    mix, then the sum of four 6-bit fields (an Irwin-Hall sum of 4, close to Gaussian) as an integer in
    [-126, 126]: what a kernel computes with a multiply, two shifts, a mask and a byte sum."""
    i = torch.arange(n, dtype=torch.int64)[:, None] + 1
    mul = torch.tensor([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xD3A2646C | 1,
                        0xFD7046C5, 0xB55A4F09][:lanes], dtype=torch.int64)[None, :]
    x = (i * mul) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x = x ^ (x >> 12)
    v = (_bsum(x & 0x3F3F3F3F) - 126).float()
    return v / 36.94                                              # the Irwin-Hall sum's standard deviation


def parse(name: str):
    m = re.fullmatch(r"(tr|cb)(\d+)s(\d+)", name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def bpw(name: str) -> float:
    p = parse(name)
    if p:
        kind, k, s = p
        return (k if kind == "tr" else k / 8) + 4 / s + 1 / 16
    return {**study_mcn.BPW, "iq1_s": 1.5625, "iq1_m": 1.75, "iq2_xs": 2.3125, "iq2_s": 2.5}[name]


def _viterbi(X, w, v, k, start=None):
    """Min over state paths of sum_t w[:, t] (X[:, t] - v[s_t])^2, rows batched. s_t's low k bits are new;
    its high L - k bits are s_{t-1}'s low ones. start: [B] forced overlap (s_0 >> k), also forced as the last
    state's low L - k bits (tail-biting). Returns the states [B, T]."""
    B, T = X.shape
    S, P = 1 << L_BITS, 1 << k
    lo = S >> k
    cost = w[:, :1] * (X[:, :1] - v[None, :]) ** 2
    if start is not None:
        ok = (torch.arange(S)[None, :] >> k) == start[:, None]
        cost = torch.where(ok, cost, torch.full_like(cost, float("inf")))
    back = torch.empty(T, B, lo, dtype=torch.uint8)
    for t in range(1, T):
        m, p = cost.view(B, P, lo).min(1)
        back[t] = p.to(torch.uint8)
        cost = m.repeat_interleave(P, 1) + w[:, t:t + 1] * (X[:, t:t + 1] - v[None, :]) ** 2
    if start is not None:
        ok = (torch.arange(S)[None, :] & (lo - 1)) == start[:, None]
        cost = torch.where(ok, cost, torch.full_like(cost, float("inf")))
    s = cost.argmin(1)
    states = torch.empty(B, T, dtype=torch.int64)
    rows = torch.arange(B)
    for t in range(T - 1, -1, -1):
        states[:, t] = s
        if t:
            s = back[t][rows, s >> k].long() * lo + (s >> k)
    return states


def trellis_round(X, w, v, k):
    """Tail-biting: a free pass over the sequence twice picks the overlap where the second copy starts, then a
    pass forced to start and end on it (exact for that overlap)."""
    T = X.shape[1]
    s2 = _viterbi(torch.cat([X, X], 1), torch.cat([w, w], 1), v, k)
    start = s2[:, T] >> k
    return _viterbi(X, w, v, k, start)


def _steps(W, imp, S, gain):
    """4-bit multiples (of an fp16 d per 256) of each S-slice's importance-weighted RMS times gain: [out, n/S]."""
    out, n = W.shape
    wi = imp.reshape(1, n // S, S)
    rms = ((W.reshape(out, n // S, S) ** 2 * wi).sum(-1) / wi.sum(-1)).sqrt().clamp_min(1e-12) * gain
    blk = rms.reshape(out, n // 256, 256 // S)
    d = (blk.amax(-1) / 15).half().float().clamp_min(1e-30)
    s = torch.clamp(torch.round(blk / d[..., None]), 1, 15)
    return (s * d[..., None]).reshape(out, n // S)


def quantize_trellis(W, X, k, S, how, seq=SEQ):
    v = hash_values(1 << L_BITS)[:, 0]
    out, n = W.shape
    g = GPTQ(n)
    g.add_batch(X)
    diag = torch.diag(g.H).float().clamp_min(0)
    imp = diag + 1e-8 * diag.mean()
    col_step = _steps(W, imp, S, 1.0).repeat_interleave(S, 1)
    if how == "rtn":
        Q = torch.empty_like(W)
        for i1 in range(0, n, seq):
            st = col_step[:, i1:i1 + seq]
            s = trellis_round(W[:, i1:i1 + seq] / st, imp[i1:i1 + seq].expand(out, -1) * st ** 2, v, k)
            Q[:, i1:i1 + seq] = v[s] * st
        return Q
    lam = int(how[4:]) / 100 if how[4:].isdigit() else 0.0
    U, _ = g._hinv(torch.diag(g.H) == 0, None, 0.01, False, lam)
    Wc, Q = W.clone(), torch.empty_like(W)
    for i1 in range(0, n, seq):
        i2 = i1 + seq
        Ubi = torch.linalg.inv(U[i1:i2, i1:i2])
        m = (Ubi * Ubi).sum(1)                                    # diag(Ubi Ubi^T): the block metric's diagonal
        st = col_step[:, i1:i2]
        s = trellis_round(Wc[:, i1:i2] / st, m[None, :] * st ** 2, v, k)
        q = v[s] * st
        Q[:, i1:i2] = q
        Wc[:, i2:] -= ((Wc[:, i1:i2] - q) @ Ubi) @ U[i1:i2, i2:]
    return Q * torch.from_numpy(g._row_gain(W, Q))[:, None]


def quantize(W, X, fmt):
    name, _, how = fmt.partition(" ")
    p = parse(name)
    if p and p[0] == "tr":
        return quantize_trellis(W, X, p[1], p[2], how or "gptq")
    if p:
        return study_vq.quantize_vq(W, X, p[1], p[2], how or "gptq", C=hash_values(1 << p[1], 8))
    return study_vq.quantize(W, X, fmt)


def gauss_table(n: int = 4096) -> str:
    """MSE per weight on unit-Gaussian data: scalar 4-level Lloyd table, the 2^16 codebook, the trellis."""
    torch.manual_seed(0)
    X = torch.randn(n, SEQ)
    ones = torch.ones_like(X)
    rows = ["| quantizer of unit-Gaussian weights | bits per weight | MSE per weight | bound 2^-2R |", "|---|---:|---:|---:|"]
    lloyd = torch.tensor([-1.510, -0.4528, 0.4528, 1.510])
    q = lloyd[(X[..., None] - lloyd).abs().argmin(-1)]
    rows.append(f"| 4-level Lloyd-Max table | 2 | {((X - q) ** 2).mean():.4f} | 0.0625 |")
    C = hash_values(1 << 16, 8)
    x8 = X.reshape(-1, 8)
    q8 = C[study_vq._nearest(x8, C)]
    rows.append(f"| 8-D codebook, 2^16 words (hash) | 2 | {((x8 - q8) ** 2).mean():.4f} | 0.0625 |")
    v = hash_values(1 << L_BITS)[:, 0]
    for k in (1, 2, 3):
        s = trellis_round(X, ones, v, k)
        rows.append(f"| trellis, 2^{L_BITS} states, tail-biting T={SEQ} | {k} | {((X - v[s]) ** 2).mean():.4f} | "
                    f"{2 ** (-2 * k):.4f} |")
    return "\n".join(rows)


class Bpw(dict):
    def __missing__(self, k):
        return bpw(k)


if __name__ == "__main__":
    if "--gauss" in sys.argv:
        print(gauss_table())
        sys.exit(0)
    sys.exit(study_mcn.run(__doc__, "study_trellis", "Issue 14: a bitshift trellis vs an 8-D computed codebook vs "
                           "mcn2, judged end to end (bench model)", "0,2", FORMATS, quantize, Bpw()))
