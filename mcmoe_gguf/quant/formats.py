"""Byte layouts of the MC-MoE tensor types (mcq1/mcq2/mcq3) and their quantizer grid.

This module is the Python twin of the C kernels in cpp/: the bytes written by `pack` are exactly
what the patched ggml reads, and `dequantize_codes` is the reference the C dequantization must
equal bit for bit. docs/FORMAT.md describes the same layout in prose.

One grid for all three types, per block of GROUP_SIZE consecutive weights of a row (input dim):
    value = m + d * q,   q in [0, 2^bits - 1],   d and m stored as IEEE fp16.
Block bytes, little-endian: d (fp16) | m (fp16) | codes, where the codes are
    mcq1: 16-byte bit plane    element n -> byte n >> 3, bit n & 7
    mcq2: 32-byte 2-bit plane  element n -> byte n & 31, bits 2 * (n >> 5) .. +1
    mcq3: 2-bit plane of (q & 3), then bit plane of (q >> 2)
    mcq4: 64-byte nibble plane element n -> byte n & 63, bits 4 * (n >> 6) .. +3
Planes are laid out so one 32-byte AVX2 load plus shift/mask yields 32 consecutive codes.

Bytes are numpy (uint8 arrays, as the GGUF writer wants them); the quantizer math is torch so that
GPTQ can call it column by column on its own tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP_SIZE = 128
# rows of an mcq tensor are whole Q8_K blocks: the CPU kernels quantize activations per 256 (MCQ_ROW_MULTIPLE, cpp/ggml/mcq.h)
ROW_MULTIPLE = 256
FP16_MAX = 65504.0
_PARAM_BYTES = 4  # d and m, fp16 each


@dataclass(frozen=True)
class FormatSpec:
    bits: int
    type_id: int       # ggml_type value in the patched ggml (far above upstream's GGML_TYPE_COUNT=43)
    name: str
    block_bytes: int

    @property
    def bpw(self) -> float:
        return 8 * self.block_bytes / GROUP_SIZE


TYPES = {
    1: FormatSpec(bits=1, type_id=100, name="mcq1", block_bytes=_PARAM_BYTES + GROUP_SIZE // 8),
    2: FormatSpec(bits=2, type_id=101, name="mcq2", block_bytes=_PARAM_BYTES + GROUP_SIZE // 4),
    3: FormatSpec(bits=3, type_id=102, name="mcq3", block_bytes=_PARAM_BYTES + GROUP_SIZE // 4 + GROUP_SIZE // 8),
    # attention/shared tensors of PMQ files: the same grid and kernels at 4 bits (4.25 real bpw)
    4: FormatSpec(bits=4, type_id=103, name="mcq4", block_bytes=_PARAM_BYTES + GROUP_SIZE // 2),
}
TYPES_BY_ID = {s.type_id: s for s in TYPES.values()}


def _spec(bits) -> FormatSpec:
    if bits not in TYPES:
        raise ValueError(f"bits must be one of {sorted(TYPES)}, got {bits!r}")
    return TYPES[bits]


def block_bytes(bits: int) -> int:
    return _spec(bits).block_bytes


def bpw(bits: int) -> float:
    """Real bits per weight, scales and mins included."""
    return _spec(bits).bpw


def _n_blocks(n: int) -> int:
    if n <= 0 or n % GROUP_SIZE:
        raise ValueError(f"row length {n} is not a positive multiple of the group size {GROUP_SIZE}; "
                         f"these types quantize whole groups of {GROUP_SIZE} weights along the input dimension")
    return n // GROUP_SIZE


def _check_weights(w) -> torch.Tensor:
    w = torch.as_tensor(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [rows, n], got shape {tuple(w.shape)}")
    _n_blocks(w.shape[1])
    w = w.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")
    if w.numel() and w.abs().max() > FP16_MAX:
        # m is stored as fp16: a block whose minimum is not representable cannot be stored faithfully
        raise ValueError(f"|weight| = {w.abs().max().item():.6g} exceeds the fp16 range ({FP16_MAX})")
    return w


def _to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp16 value (ties to even), returned as float32.

    Saturates instead of overflowing: with |w| <= 65504 only d can exceed the range (1-bit,
    max - min up to 131008), and a saturated d is still a valid, finite grid.
    """
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)


# ---------------------------------------------------------------- quantizer grid (torch)

def _codes(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(rint((w - m) / d), 0, 2^bits - 1) in float32, ties to even; d == 0 -> q = 0.

    All arguments broadcast elementwise. A C reference quantizer reproduces these codes with
    float32 `(w - m) / d` (true division, not a multiply by 1/d) and nearbyintf.
    """
    return _float_codes(w, d, m, bits).to(torch.uint8)


def _float_codes(w, d, m, bits):
    # dividing by +inf where d == 0 gives +-0, which rounds and clamps to code 0 without a
    # full-size select; d is per block, so the select on it is cheap
    q = (w - m).div_(torch.where(d == 0, torch.full_like(d, torch.inf), d))
    return q.round_().clamp_(0, 2 ** bits - 1)


def _dequant(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    # d (fp16, 11 significant bits) * q (<= 3 bits) is exact in float32, so m + d*q has a single
    # rounding whether the C side fuses the multiply-add or not: bit-exact either way.
    return m + d * q.to(torch.float32)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, GROUP_SIZE)


def _sse(wb, d, m, bits):
    """Per-block squared error [rows, nb] of the grid (d, m) [rows, nb, 1] on blocks wb."""
    return _float_codes(wb, d, m, bits).mul_(d).add_(m).sub_(wb).square_().sum(-1)


def _fit_minmax(wb, bits):
    lo, hi = wb.amin(-1, keepdim=True), wb.amax(-1, keepdim=True)
    return _to_fp16((hi - lo) / (2 ** bits - 1)), _to_fp16(lo)


def _least_squares(wb, q, d, m):
    """The (d, m) minimising sum (w - m - d q)^2 for fixed codes q; keeps (d, m) where q is constant."""
    q = q.to(torch.float32)
    n = wb.shape[-1]
    sq, sw = q.sum(-1, keepdim=True), wb.sum(-1, keepdim=True)
    sqq, swq = (q * q).sum(-1, keepdim=True), (wb * q).sum(-1, keepdim=True)
    det = n * sqq - sq * sq
    ok = det > 0
    safe = torch.where(ok, det, torch.ones_like(det))
    # codes are monotone in w, so the slope is >= 0 up to float error
    d_ls = ((n * swq - sq * sw) / safe).clamp_min(0)
    m_ls = (sw - d_ls * sq) / n
    return torch.where(ok, d_ls, d), torch.where(ok, m_ls, m)


def _fit_mse(wb, bits, shrinks=(0.9, 0.8, 0.7, 0.6, 0.5, 0.4), refine_steps=4):
    """Per-block search for the grid with the least squared error, measured on the fp16 params.

    1. Candidates: min/max itself, the range shrunk toward the block mean (clips the outliers that
       set the step size of heavy-tailed blocks) and, at 1 bit, Lloyd's start: split at the mean.
    2. From the best candidate, alternating refinement (Lloyd's algorithm at 1 bit):
       codes -> least-squares (d, m) -> fp16 -> codes.
    Every grid is accepted per block only where it lowers the error, so "mse" is never worse than
    "minmax" on any block.
    """
    lo, hi = wb.amin(-1, keepdim=True), wb.amax(-1, keepdim=True)
    mu = wb.mean(-1, keepdim=True)
    best_d, best_m = _fit_minmax(wb, bits)
    best = _sse(wb, best_d, best_m, bits)

    def consider(d, m):
        nonlocal best_d, best_m, best
        d, m = _to_fp16(d), _to_fp16(m)
        err = _sse(wb, d, m, bits)
        better = (err < best).unsqueeze(-1)
        best_d, best_m, best = torch.where(better, d, best_d), torch.where(better, m, best_m), torch.minimum(err, best)

    for s in shrinks:
        a, b = mu + s * (lo - mu), mu + s * (hi - mu)
        consider((b - a) / (2 ** bits - 1), a)
    if bits == 1:
        consider(*_least_squares(wb, (wb > mu).to(torch.uint8), best_d, best_m))
    for _ in range(refine_steps):
        consider(*_least_squares(wb, _codes(wb, best_d, best_m, bits), best_d, best_m))
    return best_d, best_m


def fit_params(w, bits: int, method: str = "minmax"):
    """Per-block grid of w [rows, n] -> (scale, mn), float32 [rows, n/128], already fp16-rounded.

    "minmax": d = (max - min) / (2^bits - 1), m = min (round-to-nearest baseline).
    "mse":    search minimising the block's squared error (see _fit_mse).
    A constant block gets d = 0, m = its value: codes are 0 and it dequantizes exactly.
    """
    _spec(bits)
    wb = _blocks(_check_weights(w))
    if method == "minmax":
        d, m = _fit_minmax(wb, bits)
    elif method == "mse":
        d, m = _fit_mse(wb, bits)
    else:
        raise ValueError(f"method must be 'minmax' or 'mse', got {method!r}")
    return d.squeeze(-1), m.squeeze(-1)


def _check_params(w: torch.Tensor, scale, mn):
    scale, mn = torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(mn, dtype=torch.float32)
    shape = (w.shape[0], w.shape[1] // GROUP_SIZE)
    if tuple(scale.shape) != shape or tuple(mn.shape) != shape:
        raise ValueError(f"scale/mn must have shape {shape}, got {tuple(scale.shape)} and {tuple(mn.shape)}")
    return scale, mn


def quantize_codes(w, scale, mn, bits: int) -> torch.Tensor:
    """Codes uint8 [rows, n] of w on the per-block grids (scale, mn) [rows, n/128]."""
    _spec(bits)
    w = _check_weights(w)
    scale, mn = _check_params(w, scale, mn)
    q = _codes(_blocks(w), scale.unsqueeze(-1), mn.unsqueeze(-1), bits)
    return q.reshape(w.shape)


def quantize_column(w_col, scale_col, mn_col, bits: int):
    """One input column for GPTQ: (codes uint8 [rows], dequantized float32 [rows]).

    Same arithmetic as quantize_codes, so the codes GPTQ picks column by column are the codes
    stored; the dequantized values are what the runtime will multiply with.
    """
    _spec(bits)
    w = torch.as_tensor(w_col).detach().to(torch.float32)
    d, m = torch.as_tensor(scale_col, dtype=torch.float32), torch.as_tensor(mn_col, dtype=torch.float32)
    if w.ndim != 1 or d.shape != w.shape or m.shape != w.shape:
        raise ValueError(f"expected 1-D column and params of equal length, got {tuple(w.shape)}, "
                         f"{tuple(d.shape)}, {tuple(m.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")
    q = _codes(w, d, m, bits)
    return q, _dequant(q, d, m)


def dequantize_codes(codes, scale, mn):
    """m + d * q in float32, [rows, n]. Returns numpy for numpy codes, torch otherwise."""
    as_numpy = isinstance(codes, np.ndarray)
    q = torch.as_tensor(codes)
    if q.ndim != 2:
        raise ValueError(f"expected codes [rows, n], got shape {tuple(q.shape)}")
    _n_blocks(q.shape[1])
    d, m = _check_params(q, scale, mn)
    out = _dequant(_blocks(q), d.unsqueeze(-1), m.unsqueeze(-1)).reshape(q.shape)
    return out.numpy() if as_numpy else out


# ---------------------------------------------------------------- bytes (numpy)

def _bit_plane(bits01: np.ndarray) -> np.ndarray:
    """[..., 128] of 0/1 -> [..., 16]: element n at byte n >> 3, bit n & 7."""
    return np.packbits(bits01, axis=-1, bitorder="little")


def _unbit_plane(plane: np.ndarray) -> np.ndarray:
    return np.unpackbits(plane, axis=-1, bitorder="little")


def _two_bit_plane(q: np.ndarray) -> np.ndarray:
    """[..., 128] of 0..3 -> [..., 32]: byte j = q[j] | q[j+32] << 2 | q[j+64] << 4 | q[j+96] << 6."""
    s = q.reshape(*q.shape[:-1], 4, 32)
    return s[..., 0, :] | (s[..., 1, :] << 2) | (s[..., 2, :] << 4) | (s[..., 3, :] << 6)


def _untwo_bit_plane(plane: np.ndarray) -> np.ndarray:
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    q = (plane[..., None, :] >> shifts) & 3  # [..., 4, 32]
    return q.reshape(*plane.shape[:-1], GROUP_SIZE)


def _nibble_plane(q: np.ndarray) -> np.ndarray:
    """[..., 128] of 0..15 -> [..., 64]: byte j = q[j] | q[j+64] << 4."""
    s = q.reshape(*q.shape[:-1], 2, 64)
    return s[..., 0, :] | (s[..., 1, :] << 4)


def _unnibble_plane(plane: np.ndarray) -> np.ndarray:
    q = (plane[..., None, :] >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)) & 15  # [..., 2, 64]
    return q.reshape(*plane.shape[:-1], GROUP_SIZE)


def _as_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):   # numpy has no bfloat16 (Mixtral's release dtype)
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def pack(codes, scale, mn, bits: int) -> np.ndarray:
    """Codes [rows, n] + params [rows, n/128] -> blocks, uint8 [rows, (n/128) * block_bytes].

    Params must already be fp16 values (as fit_params returns them): rounding them here would
    silently change the grid the codes were chosen on.
    """
    spec = _spec(bits)
    q = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if q.ndim != 2 or q.dtype.kind not in "ui":
        raise ValueError(f"expected integer codes [rows, n], got {q.dtype} of shape {q.shape}")
    if q.size and (q.min() < 0 or q.max() > 2 ** bits - 1):
        raise ValueError(f"codes must lie in [0, {2 ** bits - 1}] for {bits} bits")
    q = q.astype(np.uint8)
    rows, nb = q.shape[0], _n_blocks(q.shape[1])
    d, m = _as_numpy(scale, np.float32), _as_numpy(mn, np.float32)
    if d.shape != (rows, nb) or m.shape != (rows, nb):
        raise ValueError(f"scale/mn must have shape {(rows, nb)}, got {d.shape} and {m.shape}")
    d16, m16 = d.astype("<f2"), m.astype("<f2")
    if not (np.array_equal(d16.astype(np.float32), d) and np.array_equal(m16.astype(np.float32), m)):
        raise ValueError("scale/mn are not exact fp16 values; fit them with fit_params (or round to fp16 "
                         "before choosing codes)")

    qb = q.reshape(rows, nb, GROUP_SIZE)
    if bits == 1:
        planes = [_bit_plane(qb)]
    elif bits == 2:
        planes = [_two_bit_plane(qb)]
    elif bits == 3:
        planes = [_two_bit_plane(qb & 3), _bit_plane(qb >> 2)]
    else:
        planes = [_nibble_plane(qb)]
    out = np.concatenate([d16.view(np.uint8).reshape(rows, nb, 2), m16.view(np.uint8).reshape(rows, nb, 2)]
                         + planes, axis=-1)
    return out.reshape(rows, nb * spec.block_bytes)


def unpack(blob, bits: int, n: int):
    """Blocks -> (codes uint8 [rows, n], scale float32 [rows, n/128], mn float32 [rows, n/128]).

    blob is [rows, row_bytes] or the flat bytes of whole rows.
    """
    spec = _spec(bits)
    nb = _n_blocks(n)
    raw = np.ascontiguousarray(_as_numpy(blob, np.uint8))
    row_bytes = nb * spec.block_bytes
    if raw.size % row_bytes or (raw.ndim == 2 and raw.shape[1] != row_bytes) or raw.ndim > 2:
        raise ValueError(f"blob of shape {raw.shape} is not whole rows of {row_bytes} bytes "
                         f"({spec.name}, n={n})")
    b = raw.reshape(-1, nb, spec.block_bytes)
    rows = b.shape[0]
    d = np.ascontiguousarray(b[..., 0:2]).view("<f2").reshape(rows, nb).astype(np.float32)
    m = np.ascontiguousarray(b[..., 2:4]).view("<f2").reshape(rows, nb).astype(np.float32)
    c = b[..., _PARAM_BYTES:]
    if bits == 1:
        q = _unbit_plane(c)
    elif bits == 2:
        q = _untwo_bit_plane(c)
    elif bits == 3:
        q = _untwo_bit_plane(c[..., :32]) | (_unbit_plane(c[..., 32:]) << 2)
    else:
        q = _unnibble_plane(c)
    return q.reshape(rows, n), d, m


def quantize(w, bits: int, method: str = "mse") -> np.ndarray:
    """Round-to-nearest quantization of w [rows, n] straight to packed blocks (no GPTQ)."""
    d, m = fit_params(w, bits, method)
    return pack(quantize_codes(w, d, m, bits), d, m, bits)


def dequantize(blob, bits: int, n: int) -> np.ndarray:
    return dequantize_codes(*unpack(blob, bits, n))



# ================================================================ mcn2 / mcn3 (issue 14)
# Non-uniform scalar types: a fixed integer Lloyd-Max table T of 2^bits levels, a 4-bit scale s_j per 32
# weights and an fp16 scale d per 256 (QK_K):  value = fp32(d) * float32(s_j * T[q]).
# Byte layout of a 256-weight block (cpp/ggml/mcn-common.h, docs/FORMAT.md):
#   [0, 2) d fp16 | [2, 6) scale nibbles, sub-block j in byte 2 + (j & 3), bits 4 (j >> 2)
#   [6, 70) 2-bit plane, weight n in byte 6 + 32 (n >> 7) + (n & 31), bits 2 ((n >> 5) & 3)
#   [70, 102) mcn3 only: high bits, weight n in byte 70 + (n & 31), bit n >> 5
# The reference quantizer (mcn_quantize) is cpp/ggml/mcn.c's twin: float64 steps in the same order, the
# 32-weight sums accumulated one weight at a time (vectorised across slices), so the bytes are identical.

MCN_BLOCK = 256
MCN_SUB = 32
MCN_SMAX = 15
MCN_LEVELS = {2: (-10, -3, 3, 10), 3: (-35, -22, -12, -4, 4, 12, 22, 35)}
_MCN_NCAND = 16


@dataclass(frozen=True)
class SuperBlockSpec:
    """A type of 256-weight blocks that start with an fp16 d and eight 4-bit scales per 32 (mcn here, mct in
    trellis.py)."""
    bits: int
    type_id: int
    name: str
    block_bytes: int

    @property
    def bpw(self) -> float:
        return 8 * self.block_bytes / MCN_BLOCK


def super_block_spec(types: dict, name_or_bits, family: str) -> SuperBlockSpec:
    """The spec of `types` (name -> spec) named name_or_bits, or of that many bits; ValueError otherwise."""
    found = (types.get(name_or_bits) if isinstance(name_or_bits, str) else
             next((t for t in types.values() if t.bits == name_or_bits), None))
    if found is None:
        raise ValueError(f"not an {family} type: {name_or_bits!r}; one of {', '.join(types)}")
    return found


def pack_super_header(d, s, rows: int, nb: int, scale_noun: str) -> tuple[np.ndarray, np.ndarray]:
    """Bytes 0-5 of every block, checked: (fp16 d [rows, nb, 2], scale nibbles [rows, nb, 4]); scale j of a block
    in byte 2 + (j & 3), bits 4 (j >> 2). d: [rows, nb] exact fp16 values; s: [rows, 8 nb] in 0..15."""
    d = _as_numpy(d, np.float32)
    s = _as_numpy(s, np.int64)
    if d.shape != (rows, nb) or s.shape != (rows, nb * 8):
        raise ValueError(f"d must be {(rows, nb)} and s {(rows, nb * 8)}, got {d.shape} and {s.shape}")
    d16 = d.astype("<f2")
    if not np.array_equal(d16.astype(np.float32), d):
        raise ValueError("d holds values that are not exact fp16 values")
    if s.size and (s.min() < 0 or s.max() > MCN_SMAX):
        raise ValueError(f"{scale_noun} scales must lie in [0, {MCN_SMAX}]")
    sb = s.reshape(rows, nb, 2, 4).astype(np.uint8)                  # [.., nibble plane, byte]
    return d16.view(np.uint8).reshape(rows, nb, 2), sb[:, :, 0] | (sb[:, :, 1] << 4)


def unpack_super_header(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks b [rows, nb, block bytes] -> (d float32 [rows, nb], s uint8 [rows, 8 nb])."""
    rows, nb = b.shape[:2]
    d = np.ascontiguousarray(b[..., 0:2]).view("<f2").reshape(rows, nb).astype(np.float32)
    sc = b[..., 2:6]
    return d, np.stack([sc & 15, sc >> 4], axis=2).reshape(rows, nb * 8)


McnSpec = SuperBlockSpec
MCN_TYPES = {
    "mcn2": McnSpec(bits=2, type_id=104, name="mcn2", block_bytes=2 + 4 + 64),
    "mcn3": McnSpec(bits=3, type_id=105, name="mcn3", block_bytes=2 + 4 + 64 + 32),
}


# the trellis types (quant/trellis.py): their header bytes are mcn's, then k bits per weight
MCT_TYPES = {
    "mct1": SuperBlockSpec(bits=1, type_id=106, name="mct1", block_bytes=2 + 4 + 32),
    "mct2": SuperBlockSpec(bits=2, type_id=107, name="mct2", block_bytes=2 + 4 + 64),
    "mct3": SuperBlockSpec(bits=3, type_id=108, name="mct3", block_bytes=2 + 4 + 96),
}


def mcn_spec(name_or_bits) -> McnSpec:
    return super_block_spec(MCN_TYPES, name_or_bits, "mcn")


def mcn_levels(bits: int) -> np.ndarray:
    return np.array(MCN_LEVELS[mcn_spec(bits).bits], dtype=np.float64)


def _mcn_mids(bits: int) -> np.ndarray:
    t = mcn_levels(bits)
    return (t[:-1] + t[1:]) / 2.0


def mcn_nearest(v: np.ndarray, bits: int) -> np.ndarray:
    """Index of the nearest level of v (float64; ties to the lower level, as mcn.c's strict '>')."""
    q = np.zeros(v.shape, dtype=np.uint8)
    for m in _mcn_mids(bits):
        q += v > m
    return q


def _mcn_weights(w: np.ndarray, importance) -> tuple[np.ndarray, np.ndarray | None]:
    w = _as_numpy(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [rows, n], got shape {w.shape}")
    if w.shape[1] <= 0 or w.shape[1] % MCN_BLOCK:
        raise ValueError(f"row length {w.shape[1]} is not a positive multiple of {MCN_BLOCK}; the mcn types "
                         f"quantize whole blocks of {MCN_BLOCK} weights along the input dimension")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or Inf")
    imp = None
    if importance is not None:
        imp = _as_numpy(importance, np.float32).reshape(-1)
        if imp.shape != (w.shape[1],):
            raise ValueError(f"importance has shape {imp.shape}, rows have {w.shape[1]} values")
        if not np.isfinite(imp).all() or (imp < 0).any():
            raise ValueError("importance must be finite and non-negative")
    return w, imp


def _mcn_slice_scales(x: np.ndarray, wt: np.ndarray, bits: int) -> np.ndarray:
    """Weighted least-squares scale of every 32-slice (x, wt: float64 [S, 32]) -> float64 [S]
    (mcn.c's mcn_slice_scale)."""
    t = mcn_levels(bits)
    amax = np.abs(x).max(axis=1)
    best = np.zeros(len(x))
    best_err = np.full(len(x), np.inf)
    live = amax > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(_MCN_NCAND):
            s0 = (amax * (0.5 + 0.05 * k)) / t[-1]
            q = mcn_nearest(x / s0[:, None], bits)
            tq = t[q]
            num = np.zeros(len(x))
            den = np.zeros(len(x))
            for i in range(MCN_SUB):
                num = num + (wt[:, i] * x[:, i]) * tq[:, i]
                den = den + wt[:, i] * (tq[:, i] * tq[:, i])
            s1 = np.where((den > 0) & (num > 0), num / den, s0)
            err = np.zeros(len(x))
            for i in range(MCN_SUB):
                r = x[:, i] - s1 * tq[:, i]
                err = err + wt[:, i] * (r * r)
            better = live & (err < best_err)
            best = np.where(better, s1, best)
            best_err = np.where(better, err, best_err)
    return best


def mcn_fit(w, bits: int, importance=None) -> tuple[np.ndarray, np.ndarray]:
    """Scales of w [rows, n]: d float32 [rows, n/256] (exact fp16 values) and s uint8 [rows, n/32] (0..15),
    as the reference quantizer chooses them (importance: [n] weights of the squared error, None = 1)."""
    w, imp = _mcn_weights(w, importance)
    rows, n = w.shape
    x = w.astype(np.float64).reshape(-1, MCN_SUB)
    wt = (np.ones_like(w, dtype=np.float64) if imp is None else
          np.broadcast_to(imp.astype(np.float64), w.shape)).reshape(-1, MCN_SUB)
    return super_scales(_mcn_slice_scales(x, wt, bits).reshape(rows, -1))


def super_scales(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each 32-slice's wanted step sigma (float64 [rows, n/32]) as the header stores it: d float32 [rows, n/256]
    = fp16(max of the block's sigma / 15) (clamped to 65504), s uint8 = rint(sigma / d) clamped to 0..15 (0 where
    d is 0). mcn_fit and trellis.mct_fit."""
    rows = sigma.shape[0]
    sigma = sigma.reshape(rows, -1, MCN_BLOCK // MCN_SUB)
    df = np.minimum((sigma.max(axis=2) / float(MCN_SMAX)).astype(np.float32), np.float32(FP16_MAX))
    d = df.astype("<f2").astype(np.float32)
    dd = d.astype(np.float64)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(dd > 0, np.clip(np.rint(sigma / dd), 0, MCN_SMAX), 0)
    return d, s.astype(np.uint8).reshape(rows, -1)


def mcn_step(d, s) -> np.ndarray:
    """float64 [rows, n/32]: each 32-slice's step d * s_j (exact), the divisor of nearest rounding."""
    d = _as_numpy(d, np.float32).astype(np.float64)
    s = _as_numpy(s, np.uint8).astype(np.float64)
    return np.repeat(d, MCN_BLOCK // MCN_SUB, axis=1) * s


def mcn_codes(w, d, s, bits: int) -> np.ndarray:
    """Nearest codes uint8 [rows, n] of w on the scales (d, s); slices with s_j = 0 get code 0."""
    w = _as_numpy(w, np.float32).astype(np.float64)
    step = np.repeat(mcn_step(d, s), MCN_SUB, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = mcn_nearest(w / step, bits)
    return np.where(step > 0, q, 0).astype(np.uint8)


def mcn_values(codes, d, s, bits: int) -> np.ndarray:
    """float32 [rows, n]: fp32(d) * float32(s_j * T[q]), the dequantization of every backend."""
    q = _as_numpy(codes, np.uint8)
    st = (np.repeat(_as_numpy(s, np.uint8).astype(np.int32), MCN_SUB, axis=1)
          * np.array(MCN_LEVELS[mcn_spec(bits).bits], dtype=np.int32)[q])
    dd = np.repeat(_as_numpy(d, np.float32), MCN_BLOCK, axis=1)
    return dd * st.astype(np.float32)


def mcn_pack(codes, d, s, bits: int) -> np.ndarray:
    """codes [rows, n], d [rows, n/256] (fp16 values), s [rows, n/32] (0..15) -> uint8 [rows, n/256 * block_bytes]."""
    spec = mcn_spec(bits)
    q = _as_numpy(codes, np.int64)
    if q.ndim != 2 or q.shape[1] % MCN_BLOCK or q.shape[1] == 0:
        raise ValueError(f"expected codes [rows, n] with n a multiple of {MCN_BLOCK}, got shape {q.shape}")
    if q.size and (q.min() < 0 or q.max() >= 2 ** spec.bits):
        raise ValueError(f"codes must lie in [0, {2 ** spec.bits - 1}] for {spec.name}")
    rows, nb = q.shape[0], q.shape[1] // MCN_BLOCK
    d16, sc = pack_super_header(d, s, rows, nb, "sub-block")
    qb = q.reshape(rows, nb, 2, 4, 32).astype(np.uint8)              # [.., half, sub-block in half, i]
    lo = ((qb & 3) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(axis=3, dtype=np.uint8)  # [.., 2, 32]
    parts = [d16, sc, lo.reshape(rows, nb, 64)]
    if spec.bits == 3:
        hb = (q.reshape(rows, nb, 8, 32) >> 2).astype(np.uint8)      # [.., sub-block, i]
        parts.append(((hb << np.arange(8, dtype=np.uint8)[:, None]).sum(axis=2, dtype=np.uint8)))
    return np.concatenate(parts, axis=-1).reshape(rows, nb * spec.block_bytes)


def mcn_unpack(blob, bits: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks -> (codes uint8 [rows, n], d float32 [rows, n/256], s uint8 [rows, n/32])."""
    spec = mcn_spec(bits)
    if n <= 0 or n % MCN_BLOCK:
        raise ValueError(f"row length {n} is not a positive multiple of {MCN_BLOCK}")
    nb = n // MCN_BLOCK
    raw = np.ascontiguousarray(_as_numpy(blob, np.uint8))
    row_bytes = nb * spec.block_bytes
    if raw.size % row_bytes or (raw.ndim == 2 and raw.shape[1] != row_bytes) or raw.ndim > 2:
        raise ValueError(f"blob of shape {raw.shape} is not whole rows of {row_bytes} bytes ({spec.name}, n={n})")
    b = raw.reshape(-1, nb, spec.block_bytes)
    rows = b.shape[0]
    d, s = unpack_super_header(b)
    lo = b[..., 6:70].reshape(rows, nb, 2, 1, 32)
    q = (lo >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3      # [.., half, 4, 32]
    q = q.reshape(rows, nb, 256)
    if spec.bits == 3:
        hb = b[..., 70:102].reshape(rows, nb, 1, 32)
        q = q | (((hb >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 2).reshape(rows, nb, 256)
    return q.reshape(rows, n).astype(np.uint8), d, s


def mcn_unshrink(w, importance, codes, d, s, bits: int) -> np.ndarray:
    """d rescaled per block so the block's (importance-weighted) error is uncorrelated with its weights:
    d * sum w x^2 / sum w x q, rounded to fp16 (mcn.c's last step; blocks where either sum is not positive
    keep d). Nearest rounding to a coarse table shrinks (cell means: sum w x q < sum w x^2)."""
    x, imp = _mcn_weights(w, importance)
    st = (np.repeat(_as_numpy(s, np.uint8).astype(np.int64), MCN_SUB, axis=1)
          * np.array(MCN_LEVELS[mcn_spec(bits).bits], dtype=np.int64)[_as_numpy(codes, np.uint8)])
    return unshrink_d(x, imp, d, st)


def unshrink_d(x: np.ndarray, imp, d, st: np.ndarray) -> np.ndarray:
    """The unshrink of a type whose value is d * st per 256-block (st: int64 [rows, n], the integer part of every
    weight's value; mcn and mct): d * sum w x^2 / sum w x (d st), rounded to fp16, summed one weight at a time."""
    rows, n = x.shape
    nb = n // MCN_BLOCK
    xb = x.astype(np.float64).reshape(rows, nb, MCN_BLOCK)
    wt = (np.ones_like(xb) if imp is None else np.broadcast_to(imp.astype(np.float64), x.shape).reshape(xb.shape))
    dd = _as_numpy(d, np.float32).astype(np.float64)
    qv = dd[..., None] * st.reshape(rows, nb, MCN_BLOCK).astype(np.float64)
    num = np.zeros((rows, nb))
    den = np.zeros((rows, nb))
    for i in range(MCN_BLOCK):
        wx = wt[..., i] * xb[..., i]
        num = num + wx * xb[..., i]
        den = den + wx * qv[..., i]
    ok = (dd > 0) & (num > 0) & (den > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        du = np.minimum((dd * (num / den)).astype(np.float32), np.float32(FP16_MAX))
    return np.where(ok, du.astype("<f2").astype(np.float32), _as_numpy(d, np.float32))


def mcn_quantize(w, bits: int, importance=None) -> np.ndarray:
    """Reference quantization of w [rows, n] (nearest rounding on the fitted scales, then mcn_unshrink) to
    packed blocks: the bytes of cpp/ggml/mcn.c (ggml_quantize_chunk with `importance` as the imatrix)."""
    d, s = mcn_fit(w, bits, importance)
    codes = mcn_codes(w, d, s, bits)
    return mcn_pack(codes, mcn_unshrink(w, importance, codes, d, s, bits), s, bits)


def mcn_dequantize(blob, bits: int, n: int) -> np.ndarray:
    q, d, s = mcn_unpack(blob, bits, n)
    return mcn_values(q, d, s, bits)
