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

- iq1_s (llama.cpp's 1.5625 bpw codebook type): weight = d_j * (G[i] + delta_j) for each 8 weights, G the
  type's 2048 codewords of {-1, 0, 1}^8, i an 11-bit index, d_j and the sign of delta_j per 32 weights. Its
  latents are level units too (G's values); a group's code is the codeword nearest its 8 latents (CodebookGrid),
  so a code flips when the group's latent vector crosses into another codeword's cell. At 1.5-1.7 expert bpw
  the program gives iq1_s to ~40% of the bench model's expert projections, whose codes were frozen before.

llama.cpp's other types are not recoded: their codes come with sub-block scales chosen jointly with them
(k-quants) or index codebooks with per-group signs (iq2/iq3), which this module does not model.
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

    def span(self) -> tuple[float, float]:
        """The lowest and highest level a code can take."""
        return float(self.levels.min()), float(self.levels.max())

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """The level each latent of x rounds to (the level of nearest(x))."""
        return self.levels[self.nearest(x).long()]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Codes uint8 of latents x [rows, n]: the nearest level (ties as the type's quantizer breaks them).
        Elements with a zero step keep code 0, as the quantizers store them."""
        mids = (self.levels[:-1] + self.levels[1:]) / 2
        if self.type_name.startswith("mcq"):       # rint: ties to even, then clamp (formats._codes)
            q = torch.round(x).clamp_(0, len(self.levels) - 1)
        else:                                      # strict '>' against the midpoints (formats.mcn_nearest)
            q = (x.unsqueeze(-1) > mids).sum(-1).float()
        return torch.where(self.step > 0, q, torch.zeros_like(q)).to(torch.uint8)


IQ1S_BLOCK, IQ1S_BYTES, IQ1S_GROUP, IQ1S_SUB = 256, 50, 8, 32   # weights, bytes; weights per code, per scale
IQ1S_DELTA = 0.125


def iq1s_codebook() -> torch.Tensor:
    """llama.cpp's iq1s_grid as float32 [2048, 8] of -1 / 0 / 1 (gguf-py's copy of the table)."""
    from gguf.quants import IQ1_S
    IQ1_S.init_grid()
    return torch.from_numpy(np.ascontiguousarray(IQ1_S.grid.reshape(2048, IQ1S_GROUP), dtype=np.float32))


def iq1s_fields(data: np.ndarray, rows: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d float32 [rows, n/256], qh uint16 [rows, n/256, 8], codes uint16 [rows, n/8]) of iq1_s bytes: per block
    of 256 an fp16 d, qs[32] (each 8-weight code's low 8 bits) and qh[8] (per 32 weights: the 4 codes' high 3
    bits at bits 0-11, the scale s at 12-14 (d_j = d (2 s + 1)), the sign of delta at 15)."""
    nb = n // IQ1S_BLOCK
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, nb, IQ1S_BYTES)
    d = b[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    qh = b[..., 34:].copy().view(np.uint16)
    high = (qh[..., None] >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 7
    codes = b[..., 2:34].astype(np.uint16) | (high.reshape(rows, nb, 32) << 8)
    return d, qh, codes.reshape(rows, n // IQ1S_GROUP)


class CodebookGrid(Grid):
    """An iq1_s tensor: codes are 11-bit indices [rows, n/8] into the codebook `levels` [2048, 8]; a group's
    weights are offset + step * codeword, with step = d_j and offset = d_j * delta_j per 32 weights."""

    def latent(self) -> torch.Tensor:
        return self.levels[self.codes.long()].reshape(self.step.shape)

    def values(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        q = self.codes if codes is None else codes
        return self.weights(self.levels[q.long()].reshape(self.step.shape))

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        return self.levels[self.nearest(x).long()].reshape(self.step.shape)

    def nearest(self, x: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
        """The nearest codeword (least squares over the group's 8 latents; ties to the lower index) of each
        group; groups with a zero step keep their stored code.

        A search over 2048 codewords for every group at every KD step would cost more than the step itself,
        and latents move little per step, so each group remembers where it was last searched (x_c), its
        codeword and half the gap between its nearest and second-nearest distance: while |x - x_c| stays
        below that, no other codeword can have come nearer (triangle inequality), and only the other groups
        are searched again."""
        xg = x.reshape(-1, IQ1S_GROUP)
        cache = getattr(self, "_search", None)
        if cache is None or cache[0].shape != xg.shape:
            xc, code, gap = xg.clone(), torch.zeros(xg.shape[0], dtype=torch.int16), torch.zeros(xg.shape[0])
            todo = torch.arange(xg.shape[0])
        else:
            xc, code, gap = cache
            todo = ((xg - xc).norm(dim=1) >= gap).nonzero().squeeze(1)
        half_norm = 0.5 * (self.levels ** 2).sum(1)
        for i in range(0, len(todo), chunk):        # [chunk, 2048] scores at a time, not [groups, 2048]
            idx = todo[i:i + chunk]
            xs = xg[idx]
            score = xs @ self.levels.T - half_norm      # x.c - |c|^2 / 2: the larger, the nearer
            top2 = score.topk(2, dim=1).values
            dist = ((xs * xs).sum(1, keepdim=True) - 2 * top2).clamp_min(0).sqrt()
            code[idx] = score.argmax(1).to(torch.int16)
            xc[idx] = xs
            gap[idx] = (dist[:, 1] - dist[:, 0]) / 2 - 1e-4     # a margin for float32's rounding
        self._search = (xc, code, gap)
        live = self.step[:, ::IQ1S_GROUP] > 0
        return torch.where(live, code.reshape(self.codes.shape), self.codes)


def _family(entry: dict) -> str | None:
    """"mcn", "mcq" or "iq1_s" for an entry of a type this module recodes, None for any other."""
    t = entry_type(entry)
    if t in formats.MCN_TYPES:
        return "mcn"
    if t == "iq1_s":
        return "iq1_s"
    return "mcq" if t.startswith("mcq") and "bits" in entry else None


def recodable(entry: dict) -> bool:
    return _family(entry) is not None


def _family_or_raise(entry: dict) -> str:
    fam = _family(entry)
    if fam is None:
        raise ValueError(f"{entry_type(entry)}: only our mcq and mcn types and iq1_s can be recoded")
    return fam


def grid(entry: dict) -> Grid:
    """The Grid of a stored mcq / mcn entry (workdir layer files)."""
    fam, t = _family_or_raise(entry), entry_type(entry)
    rows, n = (int(v) for v in entry["shape"])
    if fam == "iq1_s":
        d, qh, codes = iq1s_fields(entry["data"].numpy(), rows, n)
        dj = d[..., None] * (2 * ((qh >> 12) & 7).astype(np.float32) + 1)            # [rows, nb, 8]
        sign = np.where(qh & 0x8000, -IQ1S_DELTA, IQ1S_DELTA).astype(np.float32)
        step = np.repeat(dj.reshape(rows, -1), IQ1S_SUB, axis=1)
        offset = np.repeat((dj * sign).reshape(rows, -1), IQ1S_SUB, axis=1)
        return CodebookGrid(t, torch.from_numpy(codes.astype(np.int16)), torch.from_numpy(step),
                            torch.from_numpy(offset), iq1s_codebook(), 1.0)
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
    if fam == "iq1_s":
        return {**entry, "data": torch.from_numpy(_iq1s_recoded(entry["data"].numpy(), rows, n, codes))}
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


def _iq1s_recoded(data: np.ndarray, rows: int, n: int, codes) -> np.ndarray:
    """iq1_s bytes with new 11-bit codes [rows, n/8]: d, the scales and the delta signs as stored."""
    q = torch.as_tensor(codes).numpy().astype(np.int64)
    if q.shape != (rows, n // IQ1S_GROUP):
        raise ValueError(f"iq1_s: codes of shape {q.shape}, the tensor's are {(rows, n // IQ1S_GROUP)}")
    if q.min(initial=0) < 0 or q.max(initial=0) >= 2048:
        raise ValueError("iq1_s: codes must lie in [0, 2047]")
    nb = n // IQ1S_BLOCK
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, nb, IQ1S_BYTES).copy()
    q = q.reshape(rows, nb, 8, 4)
    b[..., 2:34] = (q & 0xFF).astype(np.uint8).reshape(rows, nb, 32)
    qh = b[..., 34:].copy().view(np.uint16)
    high = ((q >> 8) << np.array([0, 3, 6, 9])).sum(-1).astype(np.uint16)     # 4 x 3 bits per 32 weights
    qh = (qh & np.uint16(0xF000)) | high
    b[..., 34:] = qh.view(np.uint8).reshape(rows, nb, 16)
    return b.reshape(data.shape)
