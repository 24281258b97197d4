"""The mct tensor types (issue 14): a tail-biting bitshift trellis per 64 weights, 4-bit scales per 32, fp16 per 256.

Why a trellis: on unit-Gaussian weights at 2 bits a 4-level table (mcn2) has MSE 0.118 per weight, an 8-weight
codebook of 2^16 computed words (ik_llama.cpp's KT types) 0.095, this trellis 0.074 (bound 0.0625); the gap to a
table is worth ~0.35 bit (scripts/study_trellis.py --gauss). The file stores k bits per weight; weight t of a
sequence decodes from the 12-bit window of the sequence's bitstream that ends with its own k bits (its "state"),
so every weight decodes on its own (no running state: SIMD and GPU friendly), through a fixed table of 4096
integers that a kernel can also compute (mct_table). Choosing the bits is a shortest path through the 4096
states (Viterbi); GPTQ feeds each block's error forward (gptq.GPTQ.quantize_mct).

Value of weight i of a row (k = 1, 2, 3 bits per weight):
    value = fp32(d) * float32(s_j * V[state_i]),  j = i / 32 (its 32-slice),  V = mct_table() in [-126, 126]
Byte layout of a 256-weight block (docs/FORMAT.md), k in {1, 2, 3}:
    [0, 2) d fp16 | [2, 6) scale nibbles, slice j in byte 2 + (j & 3), bits 4 (j >> 2) (as mcn)
    [6, 6 + 32k) four sequences of 64 weights, sequence r in bytes 6 + 8k r .. (8k bytes = 64k bits each)
Within a sequence, weight t's k code bits b_t sit at bits k t .. k t + k - 1 (bit p: byte p >> 3, bit p & 7), and
    state_t = the 12 bits at positions k t - (12 - k) .. k t + k - 1, read little-endian and circularly (mod 64k),
so b_t is state_t's top k bits and state_t's low 12 - k bits are state_{t-1}'s high ones (tail-biting: weight 0's
window wraps to the sequence's end, no start bits are stored).

The reference quantizer (mct_quantize) is the twin of the C reference: scales from each slice's weighted RMS, a
Viterbi pass over every sequence doubled (it picks where a tail-biting path starts), a pass forced to start and end
there, then mcn's unshrink of d per block. Costs are float64 in a fixed order, ties to the lowest index.
"""
from __future__ import annotations

import numpy as np
import torch

from mcmoe_gguf.quant import formats

MCT_BLOCK = 256
MCT_SEQ = 64
MCT_SUB = 32
MCT_STATE_BITS = 12
MCT_STATES = 1 << MCT_STATE_BITS
# The table's standard deviation in its integer units (a sum of four uniform 6-bit fields: sqrt(4 (64^2 - 1) / 12)):
# a slice whose weights have RMS r gets the step r / MCT_SIGMA, so the table's values land where the weights are.
MCT_SIGMA = 36.94
_HASH_MUL = 0x2C1B3C6D
_HASH_ADD = 0x3039


MctSpec = formats.SuperBlockSpec      # d and the 4-bit scales as mcn: the same header bytes
MCT_TYPES = formats.MCT_TYPES         # there, so that the gguf layer knows the sizes without torch


def mct_spec(name_or_bits) -> MctSpec:
    return formats.super_block_spec(MCT_TYPES, name_or_bits, "mct")


def mct_table() -> np.ndarray:
    """int32 [4096]: V[state] = (sum of the four bytes of ((state * 0x2C1B3C6D + 0x3039) mod 2^32 & 0x3F3F3F3F)) - 126.
    One multiply-add, a mask and a byte sum: what a kernel computes instead of a lookup. Among the one-multiply
    hashes tried this one gave the lower trellis MSE on Gaussian data (0.0737 against 0.0781 per weight at 2 bits,
    1024 sequences), level with a two-multiply xorshift mix (0.0746), so the cheaper hash is kept."""
    s = np.arange(MCT_STATES, dtype=np.uint64)
    x = (s * np.uint64(_HASH_MUL) + np.uint64(_HASH_ADD)) & np.uint64(0x3F3F3F3F)
    b = x.astype(np.uint32).view(np.uint8).reshape(-1, 4).astype(np.int32)
    return b.sum(axis=1) - 126


def mct_states(codes, bits: int) -> np.ndarray:
    """uint16 [rows, n]: every weight's state from the codes (uint8 [rows, n], values < 2^bits), per 64-sequence,
    circularly: state_t = sum_j b_{t-j} << (12 - k - j k), j = 0 .. 12/k - 1."""
    k = mct_spec(bits).bits
    q = formats._as_numpy(codes, np.uint8).astype(np.uint16)
    rows, n = q.shape
    seq = q.reshape(rows, n // MCT_SEQ, MCT_SEQ)
    st = np.zeros_like(seq)
    for j in range(MCT_STATE_BITS // k):
        st |= np.roll(seq, j, axis=2) << (MCT_STATE_BITS - k - j * k)
    return st.reshape(rows, n)


def mct_values(codes, d, s, bits: int) -> np.ndarray:
    """float32 [rows, n]: fp32(d) * float32(s_j * V[state]), the dequantization of every backend."""
    dd = np.repeat(formats._as_numpy(d, np.float32), MCT_BLOCK, axis=1)
    return dd * _integer_values(codes, s, bits).astype(np.float32)


def _integer_values(codes, s, bits: int) -> np.ndarray:
    """int64 [rows, n]: s_j * V[state] of every weight, exact (its value without d)."""
    s_j = np.repeat(formats._as_numpy(s, np.uint8).astype(np.int64), MCT_SUB, axis=1)
    return s_j * mct_table()[mct_states(codes, bits)]


def _check_codes(q: np.ndarray, k: int) -> None:
    if q.ndim != 2 or q.shape[1] % MCT_BLOCK or q.shape[1] == 0:
        raise ValueError(f"expected codes [rows, n] with n a multiple of {MCT_BLOCK}, got shape {q.shape}")
    if q.size and (q.min() < 0 or q.max() >= 1 << k):
        raise ValueError(f"codes must lie in [0, {(1 << k) - 1}] for mct{k}")


def mct_pack(codes, d, s, bits: int) -> np.ndarray:
    """codes [rows, n] (k bits each), d [rows, n/256] (fp16 values), s [rows, n/32] (0..15) -> uint8 blocks."""
    spec = mct_spec(bits)
    k = spec.bits
    q = formats._as_numpy(codes, np.int64)
    _check_codes(q, k)
    rows, nb = q.shape[0], q.shape[1] // MCT_BLOCK
    d16, sc = formats.pack_super_header(d, s, rows, nb, "slice")
    # bit p of a sequence's stream = bit (p mod k) of b_{p div k}
    bitv = ((q.reshape(rows, nb, 4, MCT_SEQ, 1) >> np.arange(k)) & 1).astype(np.uint8)   # [.., 4, 64, k]
    stream = np.packbits(bitv.reshape(rows, nb, 4, MCT_SEQ * k), axis=-1, bitorder="little")
    parts = [d16, sc, stream.reshape(rows, nb, 32 * k)]
    return np.concatenate(parts, axis=-1).reshape(rows, nb * spec.block_bytes)


def mct_unpack(blob, bits: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks -> (codes uint8 [rows, n], d float32 [rows, n/256], s uint8 [rows, n/32])."""
    spec = mct_spec(bits)
    k = spec.bits
    if n <= 0 or n % MCT_BLOCK:
        raise ValueError(f"row length {n} is not a positive multiple of {MCT_BLOCK}")
    nb = n // MCT_BLOCK
    raw = np.ascontiguousarray(formats._as_numpy(blob, np.uint8))
    row_bytes = nb * spec.block_bytes
    if raw.size % row_bytes or (raw.ndim == 2 and raw.shape[1] != row_bytes) or raw.ndim > 2:
        raise ValueError(f"blob of shape {raw.shape} is not whole rows of {row_bytes} bytes ({spec.name}, n={n})")
    b = raw.reshape(-1, nb, spec.block_bytes)
    rows = b.shape[0]
    d, s = formats.unpack_super_header(b)
    bitv = np.unpackbits(b[..., 6:].reshape(rows, nb, 4, 8 * k), axis=-1, bitorder="little")
    bitv = bitv.reshape(rows, nb, 4, MCT_SEQ, k).astype(np.uint8)
    q = (bitv << np.arange(k, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)
    return q.reshape(rows, n), d, s


def mct_dequantize(blob, bits: int, n: int) -> np.ndarray:
    q, d, s = mct_unpack(blob, bits, n)
    return mct_values(q, d, s, bits)


# ---- rounding: the shortest path through the trellis -------------------------------------------------------

def viterbi(x: torch.Tensor, step: torch.Tensor, w: torch.Tensor, table: torch.Tensor, bits: int,
            overlap: torch.Tensor | None = None) -> torch.Tensor:
    """The codes [B, T] (int64, k bits) of the path minimising sum_t w_t (x_t - step_t table[state_t])^2 for B
    sequences at once (x, step, w: [B, T], one float dtype; table: [4096] in it). overlap [B]: force a tail-biting
    path whose first state's low 12 - k bits and last state's high 12 - k bits both equal overlap; None: free.
    Ties go to the lowest predecessor / state (the C twin's strict '<')."""
    k = bits
    B, T = x.shape
    lo = MCT_STATES >> k                                           # states sharing the same 12 - k carried bits
    P = 1 << k

    def local(t):
        r = x[:, t:t + 1] - step[:, t:t + 1] * table[None, :]
        return w[:, t:t + 1] * (r * r)

    cost = local(0)
    big = torch.tensor(float("inf"), dtype=x.dtype)
    if overlap is not None:
        ok = (torch.arange(MCT_STATES)[None, :] & (lo - 1)) == overlap[:, None]
        cost = torch.where(ok, cost, big)
    back = torch.empty(T, B, lo, dtype=torch.uint8)
    for t in range(1, T):
        # state s at t: carried bits j = s & (lo - 1) = (previous state) >> k; the previous state is (j << k) | p
        m, p = cost.view(B, lo, P).min(2)                          # first minimum: the lowest p on ties
        back[t] = p.to(torch.uint8)
        cost = m.repeat(1, P) + local(t)
    if overlap is not None:
        ok = (torch.arange(MCT_STATES)[None, :] >> k) == overlap[:, None]
        cost = torch.where(ok, cost, big)
    s = cost.argmin(1)
    codes = torch.empty(B, T, dtype=torch.int64)
    rows = torch.arange(B)
    for t in range(T - 1, -1, -1):
        codes[:, t] = s >> (MCT_STATE_BITS - k)
        if t:
            j = s & (lo - 1)
            s = (j << k) | back[t][rows, j].long()
    return codes


def tail_biting(x: torch.Tensor, step: torch.Tensor, w: torch.Tensor, table: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [B, T] of a tail-biting path: a free pass over each sequence twice picks the overlap where the second
    copy starts (the carried bits of the doubled path there), then a pass forced to it (exact for that overlap)."""
    T = x.shape[1]
    k = bits
    c2 = viterbi(torch.cat([x, x], 1), torch.cat([step, step], 1), torch.cat([w, w], 1), table, k)
    # the carried bits into step T are the codes of steps T - 1, T - 2, ... of the doubled path, newest highest
    overlap = torch.zeros(x.shape[0], dtype=torch.int64)
    for j in range(MCT_STATE_BITS // k - 1):
        overlap |= c2[:, T - 1 - j] << (MCT_STATE_BITS - 2 * k - j * k)
    return viterbi(x, step, w, table, k, overlap)


def _c_tail_biting():
    """mct_tail_biting of the runtime's libggml-base (cpp/ggml/mct.c), or None where the library is missing or
    predates the mct types. Looked up once."""
    global _C_TAIL_BITING
    if _C_TAIL_BITING is None:
        import ctypes
        from mcmoe_gguf.base import ggml
        try:
            lib = ggml.Ggml().lib
            fn = lib.mct_tail_biting
        except (ggml.GgmlUnavailable, AttributeError, OSError):
            fn = False
        else:
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                           ctypes.c_void_p]
            fn.restype = ctypes.c_bool
        _C_TAIL_BITING = fn
    return _C_TAIL_BITING or None


_C_TAIL_BITING = None


def tail_biting_codes(x: torch.Tensor, step: torch.Tensor, w: torch.Tensor, bits: int,
                      threads: int | None = None) -> torch.Tensor:
    """tail_biting's codes [B, 64] (int64) for sequences of 64 with this module's table, in float64: by the C twin
    (mct_tail_biting, the same operations in the same order, tested equal) on `threads` threads when the runtime
    has it (~20x faster than torch's per-step tensor ops), else by tail_biting. GPTQ's rounding step."""
    import os
    from concurrent.futures import ThreadPoolExecutor
    k = mct_spec(bits).bits
    B, T = x.shape
    fn = _c_tail_biting() if T == MCT_SEQ else None
    if fn is None:
        table = torch.from_numpy(mct_table().astype(np.float64))
        return tail_biting(x.double().cpu(), step.double().cpu(), w.double().cpu(), table, k)
    arrs = [np.ascontiguousarray(a.detach().double().cpu().numpy()) for a in (x, step, w)]
    codes = np.zeros((B, T), np.uint8)
    nt = max(1, min(threads or os.cpu_count() or 1, B))
    cuts = np.linspace(0, B, nt + 1).astype(int)

    def part(i):
        a, b = cuts[i], cuts[i + 1]
        if b > a and not fn(k, *(v[a:b].ctypes.data for v in arrs), b - a, codes[a:b].ctypes.data):
            raise RuntimeError("mct_tail_biting refused its arguments")

    with ThreadPoolExecutor(nt) as ex:      # ctypes releases the GIL: the threads run in parallel
        list(ex.map(part, range(nt)))
    return torch.from_numpy(codes.astype(np.int64))


# ---- the reference quantizer ---------------------------------------------------------------------------------

def mct_fit(w, bits: int, importance=None) -> tuple[np.ndarray, np.ndarray]:
    """Scales of w [rows, n]: d float32 [rows, n/256] (fp16 values), s uint8 [rows, n/32]. A slice's step is its
    importance-weighted RMS / MCT_SIGMA (the unweighted RMS where its importance sums to 0): the table's spread
    matched to the weights', the Viterbi path then picks values from the whole table. d = max step / 15 per 256."""
    mct_spec(bits)
    x, imp = formats._mcn_weights(w, importance)
    rows, n = x.shape
    xs = x.astype(np.float64).reshape(rows, n // MCT_SUB, MCT_SUB)
    wt = (np.ones_like(xs) if imp is None else
          np.broadcast_to(imp.astype(np.float64), x.shape).reshape(xs.shape))
    num = np.zeros(xs.shape[:2])
    den = np.zeros(xs.shape[:2])
    sq = np.zeros(xs.shape[:2])
    for i in range(MCT_SUB):
        num = num + wt[..., i] * (xs[..., i] * xs[..., i])
        den = den + wt[..., i]
        sq = sq + xs[..., i] * xs[..., i]
    with np.errstate(divide="ignore", invalid="ignore"):
        ms = np.where(den > 0, num / den, sq / MCT_SUB)
    return formats.super_scales(np.sqrt(ms) / MCT_SIGMA)


def mct_step(d, s) -> np.ndarray:
    """float64 [rows, n]: every weight's step d * s_j (exact; mcn's per-slice steps, one per weight)."""
    return np.repeat(formats.mcn_step(d, s), MCT_SUB, axis=1)


def mct_codes(w, d, s, bits: int, importance=None) -> np.ndarray:
    """codes uint8 [rows, n]: every 64-sequence's tail-biting path minimising sum imp (w - step V[state])^2, on
    the scales (d, s); float64 costs, w and the steps in weight units (no division)."""
    k = mct_spec(bits).bits
    x, imp = formats._mcn_weights(w, importance)
    rows, n = x.shape
    step = mct_step(d, s)
    wt = np.ones((rows, n)) if imp is None else np.broadcast_to(imp.astype(np.float64), (rows, n))
    X = torch.from_numpy(x.astype(np.float64).reshape(-1, MCT_SEQ))
    st = torch.from_numpy(step.reshape(-1, MCT_SEQ))
    W = torch.from_numpy(np.ascontiguousarray(wt).reshape(-1, MCT_SEQ))
    codes = tail_biting(X, st, W, torch.from_numpy(mct_table().astype(np.float64)), k)
    return codes.numpy().astype(np.uint8).reshape(rows, n)


def mct_unshrink(w, importance, codes, d, s, bits: int) -> np.ndarray:
    """d rescaled per block so its weighted error is uncorrelated with its weights (formats.unshrink_d, as mcn)."""
    x, imp = formats._mcn_weights(w, importance)
    return formats.unshrink_d(x, imp, d, _integer_values(codes, s, bits))


def mct_quantize(w, bits: int, importance=None) -> np.ndarray:
    """Reference quantization of w [rows, n] to packed blocks (the bytes of the C reference quantizer)."""
    d, s = mct_fit(w, bits, importance)
    codes = mct_codes(w, d, s, bits, importance)
    return mct_pack(codes, mct_unshrink(w, importance, codes, d, s, bits), s, bits)
