"""Rescaling a stored tensor's super-block scales in place of its bytes: the knob KD tuning turns (kd_tune.py).

Every low-bit type we write keeps one or two IEEE fp16 numbers per block that multiply the whole block's
dequantized values (mcq: d and m per 128; mcn and mct: d per 256; llama.cpp's k- and i-quants: d, and dmin where
there is one). Multiplying them by g multiplies that block's weights by g and touches nothing else, so a
tuned factor per (row, group of columns) costs no byte. The codes and the 4-6-bit sub-block scales stay
as the quantizer chose them.

Factors are given per (row, group of GROUP columns), GROUP = 256 where the row length allows it (one
factor covers two mcq blocks or eight Q8_0 blocks, one block of the k-/i-quants and mcn), else the type's
block. A rescaled fp16 is rounded to nearest; the result is what the bytes say, so callers dequantize the
new bytes rather than trusting W * g.
"""
from __future__ import annotations

import numpy as np

from mcmoe_gguf.quant import formats

GROUP = 256

# type name -> (weights per block, bytes per block, byte offsets of the fp16 fields that scale the block).
# Offsets from ggml-common.h's block structs (and formats.py for ours).
SCALE_FIELDS: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "q4_0": (32, 18, (0,)), "q4_1": (32, 20, (0, 2)), "q5_0": (32, 22, (0,)), "q5_1": (32, 24, (0, 2)),
    "q8_0": (32, 34, (0,)), "iq4_nl": (32, 18, (0,)),
    "q2_k": (256, 84, (80, 82)), "q3_k": (256, 110, (108,)), "q4_k": (256, 144, (0, 2)),
    "q5_k": (256, 176, (0, 2)), "q6_k": (256, 210, (208,)),
    "iq2_xxs": (256, 66, (0,)), "iq2_xs": (256, 74, (0,)), "iq2_s": (256, 82, (0,)),
    "iq3_xxs": (256, 98, (0,)), "iq3_s": (256, 110, (0,)), "iq1_s": (256, 50, (0,)), "iq4_xs": (256, 136, (0,)),
    **{s.name: (formats.GROUP_SIZE, s.block_bytes, (0, 2)) for s in formats.TYPES.values()},
    **{s.name: (formats.MCN_BLOCK, s.block_bytes, (0,)) for s in (*formats.MCN_TYPES.values(), *formats.MCT_TYPES.values())},
}
# IQ1_M has no fp16 field: its scale's 16 bits are the top nibbles of the four uint16 words at byte 48
IQ1_M = (256, 56, 48)
FLOAT_TYPES = {"f32": np.float32, "f16": np.float16}


def entry_type(entry: dict) -> str:
    """Type name of a stored entry ({bits, ...} for mcq, {type, ...} otherwise)."""
    return entry["type"].lower() if "type" in entry else formats.TYPES[entry["bits"]].name


def block_size(type_name: str) -> int | None:
    """Weights per block whose scale rescale() can multiply; None for a type it cannot rescale."""
    t = type_name.lower()
    if t in SCALE_FIELDS:
        return SCALE_FIELDS[t][0]
    if t == "iq1_m":
        return IQ1_M[0]
    return 1 if t in FLOAT_TYPES else None


def group_size(type_name: str, n: int) -> int | None:
    """Columns per tuned factor for rows of n weights: GROUP where it is whole blocks, else one block."""
    b = block_size(type_name)
    if b is None:
        return None
    if n % GROUP == 0 and GROUP % b == 0:
        return GROUP
    return n if b == 1 else b           # a float row of odd length: one factor per row


def _check(data: np.ndarray, rows: int, n: int, g: np.ndarray, blk: int, blk_bytes: int, t: str) -> np.ndarray:
    if n % blk:
        raise ValueError(f"{t}: row length {n} is not whole blocks of {blk}")
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if raw.size != rows * (n // blk) * blk_bytes:
        raise ValueError(f"{t}: {raw.size} bytes are not {rows} rows of {n} weights ({blk_bytes} bytes per {blk})")
    gs = group_size(t, n)
    if g.shape != (rows, n // gs):
        raise ValueError(f"{t}: factors of shape {g.shape}, expected {(rows, n // gs)} (one per {gs} columns)")
    if not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise ValueError(f"{t}: factors must be finite and positive")
    return raw


def _scaled_fp16(h: np.ndarray, g: np.ndarray) -> np.ndarray:
    """fp16 values h times g, rounded to fp16, kept finite (a value beyond fp16's range stays as it was)."""
    x = h.astype(np.float32) * g
    with np.errstate(over="ignore"):
        out = x.astype(np.float16)
    bad = ~np.isfinite(out)
    out[bad] = h[bad]
    return out


def rescale(data, type_name: str, shape, g) -> np.ndarray:
    """The stored bytes of a [rows, n] tensor with each (row, column group) block's scale times g
    [rows, n / group_size(type, n)]: uint8 of the input's size (a copy; the input is not changed)."""
    t = type_name.lower()
    rows, n = (int(v) for v in shape)
    g = np.asarray(g, dtype=np.float32)
    if t in FLOAT_TYPES:
        dt = FLOAT_TYPES[t]
        raw = _check(np.ascontiguousarray(data).view(np.uint8), rows, n, g, 1, np.dtype(dt).itemsize, t)
        w = raw.view(dt).reshape(rows, n).astype(np.float32)
        return (w * np.repeat(g, group_size(t, n), axis=1)).astype(dt).view(np.uint8).reshape(-1)
    if t == "iq1_m":
        blk, blk_bytes, off = IQ1_M
        raw = _check(data, rows, n, g, blk, blk_bytes, t).copy()
        b = raw.reshape(rows, n // blk, blk_bytes)
        sc = np.ascontiguousarray(b[..., off:off + 8]).view("<u2").copy()      # [rows, nb, 4]
        bits16 = ((sc[..., 0] >> 12) | ((sc[..., 1] >> 8) & 0x00F0) | ((sc[..., 2] >> 4) & 0x0F00)
                  | (sc[..., 3] & 0xF000)).astype("<u2")
        per_block = np.repeat(g, group_size(t, n) // blk, axis=1)
        new = _scaled_fp16(bits16.view(np.float16), per_block).view("<u2")
        for k in range(4):
            nib = ((new >> (4 * k)) & 0xF).astype("<u2")
            sc[..., k] = (sc[..., k] & 0x0FFF) | (nib << 12)
        b[..., off:off + 8] = sc.view(np.uint8).reshape(rows, n // blk, 8)
        return raw
    if t not in SCALE_FIELDS:
        raise ValueError(f"{type_name}: no super-block scale known for this type (types: "
                         f"{', '.join(sorted([*SCALE_FIELDS, 'iq1_m', *FLOAT_TYPES]))})")
    blk, blk_bytes, offs = SCALE_FIELDS[t]
    raw = _check(data, rows, n, g, blk, blk_bytes, t).copy()
    b = raw.reshape(rows, n // blk, blk_bytes)
    per_block = np.repeat(g, group_size(t, n) // blk, axis=1)
    for o in offs:
        h = np.ascontiguousarray(b[..., o:o + 2]).view(np.float16).reshape(rows, n // blk)
        b[..., o:o + 2] = _scaled_fp16(h, per_block).view(np.uint8).reshape(rows, n // blk, 2)
    return raw


def rescaled_entry(entry: dict, g) -> dict:
    """A stored entry (workdir layer files) with its blocks rescaled by g; the same keys, new data."""
    import torch
    t = entry_type(entry)
    data = rescale(entry["data"].numpy(), t, entry["shape"], np.asarray(g, dtype=np.float32))
    return {**entry, "data": torch.from_numpy(data.reshape(entry["data"].shape))}
