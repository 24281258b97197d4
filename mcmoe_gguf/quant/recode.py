"""Re-choosing the codes of our own types on their stored scales: the discrete knob of KD tuning (kd_tune.py).

GPTQ picks every code of a matrix for that matrix's own output error; the codes a model-level loss wants
differ. For our types the grid a code indexes is fixed by the block's stored scales, so any other code on
the same scales is a valid block of the same size and type:

- mcq (affine): weight = m + d * q, q in 0..2^bits-1, (d, m) per 128 weights;
- mcn (table): weight = d * s_j * T[q], T the type's level table, d per 256 and s_j per 32 weights.

A Grid holds a tensor's scales and its current codes in "level units": x = (w - m) / d for mcq (the
integer q itself) and T[q] for mcn, with `unit` the mean spacing of the levels, so one unit of a latent
moves a weight by about one step of its grid whatever the type. nearest() maps latents back to codes the
way the reference quantizers round (ties to the lower level for mcn, to even for mcq), and recoded_entry()
writes new codes with the untouched scales in the type's bytes (formats.py).

llama.cpp's types are not recoded: their codes index lattice codebooks (i-quants) or come with sub-block
scales chosen jointly with them (k-quants), so a code flip is not a local move there.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mcmoe_gguf.quant import formats
from mcmoe_gguf.quant.rescale import entry_type


@dataclass
class Grid:
    """One recodable tensor: weight = offset + step * level(code), per element (float32 [rows, n])."""
    type_name: str
    codes: torch.Tensor       # uint8 [rows, n], the stored codes
    step: torch.Tensor        # float32 [rows, n]: d (mcq) or d * s_j (mcn)
    offset: torch.Tensor      # float32 [rows, n]: m (mcq) or 0 (mcn)
    levels: torch.Tensor      # float32 [2^bits]: 0..2^bits-1 (mcq) or the table T (mcn)
    unit: float               # mean spacing of the levels

    def weights(self, level: torch.Tensor) -> torch.Tensor:
        """The weights at level values [rows, n] (a code's level, or a latent for the straight-through pass)."""
        return self.offset + self.step * level

    def values(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        q = self.codes if codes is None else codes
        return self.weights(self.levels[q.long()])

    def latent(self) -> torch.Tensor:
        """The stored codes as level units (what nearest() maps back to them)."""
        return self.levels[self.codes.long()]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Codes uint8 of latents x [rows, n]: the nearest level (ties as the type's quantizer breaks them).
        Elements with a zero step keep code 0, as the quantizers store them."""
        mids = (self.levels[:-1] + self.levels[1:]) / 2
        if self.type_name.startswith("mcq"):       # rint: ties to even, then clamp (formats._codes)
            q = torch.round(x).clamp_(0, len(self.levels) - 1)
        else:                                      # strict '>' against the midpoints (formats.mcn_nearest)
            q = (x.unsqueeze(-1) > mids).sum(-1).float()
        return torch.where(self.step > 0, q, torch.zeros_like(q)).to(torch.uint8)


def _family(entry: dict) -> str | None:
    """"mcn" or "mcq" for an entry of our own types, None for any other."""
    t = entry_type(entry)
    if t in formats.MCN_TYPES:
        return "mcn"
    return "mcq" if t.startswith("mcq") and "bits" in entry else None


def recodable(entry: dict) -> bool:
    return _family(entry) is not None


def _family_or_raise(entry: dict) -> str:
    fam = _family(entry)
    if fam is None:
        raise ValueError(f"{entry_type(entry)}: only our mcq and mcn types can be recoded")
    return fam


def grid(entry: dict) -> Grid:
    """The Grid of a stored mcq / mcn entry (workdir layer files)."""
    fam, t = _family_or_raise(entry), entry_type(entry)
    rows, n = (int(v) for v in entry["shape"])
    if fam == "mcn":
        bits = formats.mcn_spec(t).bits
        q, d, s = formats.mcn_unpack(entry["data"].numpy(), bits, n)
        step = np.repeat(formats.mcn_step(d, s), formats.MCN_SUB, axis=1).astype(np.float32)
        levels = formats.mcn_levels(bits).astype(np.float32)
        return Grid(t, torch.from_numpy(q), torch.from_numpy(step), torch.zeros(rows, n), torch.from_numpy(levels),
                    float(np.diff(levels).mean()))
    bits = entry["bits"]
    q, d, m = formats.unpack(entry["data"].numpy(), bits, n)
    rep = formats.GROUP_SIZE
    return Grid(t, torch.from_numpy(q), torch.from_numpy(np.repeat(d, rep, axis=1)),
                torch.from_numpy(np.repeat(m, rep, axis=1)), torch.arange(2 ** bits, dtype=torch.float32), 1.0)


def recoded_entry(entry: dict, codes) -> dict:
    """A stored entry with new codes on its stored scales: the same keys, type and size, new data."""
    fam, t = _family_or_raise(entry), entry_type(entry)
    rows, n = (int(v) for v in entry["shape"])
    q = np.ascontiguousarray(torch.as_tensor(codes).numpy(), dtype=np.uint8)
    if q.shape != (rows, n):
        raise ValueError(f"{t}: codes of shape {q.shape}, the tensor is {(rows, n)}")
    if fam == "mcn":
        bits = formats.mcn_spec(t).bits
        _, d, s = formats.mcn_unpack(entry["data"].numpy(), bits, n)
        data = formats.mcn_pack(q, d, s, bits)
    else:
        bits = entry["bits"]
        if q.max(initial=0) >= 2 ** bits:
            raise ValueError(f"{t}: codes must lie in [0, {2 ** bits - 1}]")
        _, d, m = formats.unpack(entry["data"].numpy(), bits, n)
        data = formats.pack(q, d, m, bits)
    return {**entry, "data": torch.from_numpy(data.reshape(entry["data"].shape))}
