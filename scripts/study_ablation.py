#!/usr/bin/env python3
"""Issue 14's ablation table: which design choices of our low-bit types pay, judged end to end, layer by layer,
on the bench model (the protocol of scripts/study_mcn.py: one layer's experts quantized, float elsewhere; the
gate/up error on held-out routed tokens, the MoE block's output error, the whole model's held-out PPL).

    .venv/bin/python scripts/study_ablation.py [--layers 0,2] [--formats "..."] [--chunks 30] [--write-results]

Axes (each row changes one thing against its neighbour):
  codebook vs scalar grid   vq12s32 (8-weight Lloyd codebook, 1.69 bpw) vs tern (3-level table, 1.79 bpw);
                            vq13s32 (1.81 bpw) vs tern (1.79); mcn2 (4-level table, 2.19) vs
                            iq2_xxs (ggml's E8-lattice codebook, 2.06) vs mcq2 (affine grid per 128, 2.25)
  GPTQ vs nearest rounding  "<type> gptq" (BlockLDLQ / GPTQ with the expert's routed-token Hessian, then the
                            unshrink) vs "<type> rtn" (nearest under the importance diag(H), then the unshrink)
  rotation                  "+rot": a randomized Hadamard transform R of the input dimension (Sylvester
                            Hadamard times random signs, seeded by the dimension: gate/up of every expert of a
                            layer share it, as a runtime would apply it once to the layer's input). W R is
                            quantized with calibration inputs X R and the model runs Q R^T: exactly what a runtime
                            that rotates the activations computes. Also for ggml's own types (imatrix rounding).
  block-scale sizes         "mcn2/b16", "mcn2/b64": mcn2 with its 4-bit scale per 16 / 64 weights instead of 32
                            (2.3125 / 2.125 bpw), the same quantizer otherwise
Formats: "<type>[/b<S>] [gptq|rtn|gptq-unshrink][+rot]"; types: vqKsS (scripts/study_vq.py), mcn2, mcn3, mct1-3
(the trellis types, scripts/study_trellis.py: "rtn" is the reference quantizer's Viterbi under the importance), tern
(mcn's machinery with the table (-1, 0, 1): 5 trits a byte would make 1.6 + 4/S + 1/16 bpw), mcq1-3
(scripts/study_mcn.py), llama.cpp's iq1_s, iq1_m, iq2_xxs, iq2_xs, q2_k, iq3_xxs (ggml's quantizer, importance
from the routed tokens). The block-size and tern variants exist only here, in torch (no kernels, no file format):
they are built by swapping formats.MCN_SUB / MCN_LEVELS for one call, so they run the shipped quantizer and
differ from mcn2 in that one respect.
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import study_mcn  # noqa: E402
import study_trellis  # noqa: E402
import study_vq  # noqa: E402
from mcmoe_gguf.quant import formats as F  # noqa: E402
from mcmoe_gguf.quant.gptq import GPTQ  # noqa: E402

FORMATS = ("vq12s32 gptq", "vq12s32 rtn", "vq12s32 gptq+rot", "tern gptq", "tern rtn",
           "vq13s32 gptq", "mcn2 gptq", "mcn2 rtn", "mcn2 gptq+rot", "mcn2 rtn+rot", "mcn2/b16 gptq", "mcn2/b64 gptq",
           "mcq2 gptq-unshrink", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xxs+rot", "q2_k")
TERN_LEVELS = (-1, 0, 1)


def parse(name: str) -> tuple[str, int]:
    """'mcn2/b16' -> ('mcn2', 16); 'tern' -> ('tern', 32)."""
    m = re.fullmatch(r"(mcn[23]|tern)(?:/b(\d+))?", name)
    if not m:
        return name, 0
    sub = int(m.group(2) or F.MCN_SUB)
    if sub <= 0 or F.MCN_BLOCK % sub:
        raise ValueError(f"{name}: the block size must divide {F.MCN_BLOCK}")
    return m.group(1), sub


def bpw(name: str) -> float:
    kind, sub = parse(name.removesuffix("+rot"))
    if kind == "tern":
        return 1.6 + 4 / sub + 16 / F.MCN_BLOCK
    if kind.startswith("mcn"):
        return F.mcn_spec(kind).bits + 4 / sub + 16 / F.MCN_BLOCK
    if kind.startswith("mct"):
        return study_trellis.bpw(kind)
    return study_vq.bpw(kind)          # vqKsS, mcq, and llama.cpp's types (study_vq / study_mcn tables)


@contextlib.contextmanager
def table_variant(sub: int, levels=None):
    """The mcn quantizer with another sub-block size or 2-bit table, for one call (restored on exit)."""
    old_sub, old_levels = F.MCN_SUB, F.MCN_LEVELS[2]
    F.MCN_SUB = sub
    if levels is not None:
        F.MCN_LEVELS[2] = tuple(levels)
    try:
        yield
    finally:
        F.MCN_SUB, F.MCN_LEVELS[2] = old_sub, old_levels


def quantize_table(W: torch.Tensor, X: torch.Tensor, kind: str, sub: int, how: str) -> torch.Tensor:
    bits = 2 if kind == "tern" else F.mcn_spec(kind).bits
    with table_variant(sub, TERN_LEVELS if kind == "tern" else None):
        if how == "gptq":
            g = GPTQ(W.shape[1])
            g.add_batch(X)
            return g.quantize_mcn(W, bits).dequantized
        if how != "rtn":
            raise ValueError(f"{kind}: rounding {how!r} is not gptq or rtn")
        # the reference quantizer's steps (fit, nearest, unshrink) without the byte packing, which knows only 32
        imp = (X.double() ** 2).mean(0).float().numpy()
        d, s = F.mcn_fit(W, bits, imp)
        codes = F.mcn_codes(W, d, s, bits)
        return torch.from_numpy(F.mcn_values(codes, F.mcn_unshrink(W, imp, codes, d, s, bits), s, bits))


def hadamard(n: int) -> torch.Tensor:
    """Orthogonal n x n randomized Hadamard matrix (n a power of 2), seeded by n."""
    if n & (n - 1):
        raise ValueError(f"rotation needs a power-of-2 input dimension, got {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.float64) * 2 - 1
    return (signs[:, None] * H / n ** 0.5).float()


def quantize(W: torch.Tensor, X: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt.endswith("+rot"):
        R = hadamard(W.shape[1])
        return quantize(W @ R, X @ R, fmt[:-4]) @ R.t()
    name, _, how = fmt.partition(" ")
    kind, sub = parse(name)
    if sub:
        return quantize_table(W, X, kind, sub, how or "gptq")
    if study_vq.parse(name):
        return study_vq.quantize(W, X, fmt)
    if name.startswith("mct"):
        return study_trellis.quantize(W, X, fmt)
    return study_mcn.quantize(W, X, fmt)


def summary(table: str) -> str:
    """The per-layer table plus one row per format over all its layers: geometric means of the two errors and
    the product of the layers' PPL ratios (each layer measured alone; their costs roughly multiply)."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit():
            rows.setdefault(cells[1], []).append((float(cells[3]), float(cells[4]), float(cells[5])))
    if not rows:
        return table
    geo = lambda v: math.exp(sum(math.log(max(x, 1e-12)) for x in v) / len(v))    # noqa: E731
    out = [table, "", "Over the layers (geometric means of the errors; product of the layers' PPL ratios):", "",
           "| format | bpw | gate/up rel. error | MoE output rel. error | PPL / float, layers multiplied | layers |",
           "|---|---:|---:|---:|---:|---:|"]
    for fmt, v in rows.items():
        out.append(f"| {fmt} | {bpw(fmt.split()[0]):.4g} | {geo([r[0] for r in v]):.4f} | {geo([r[1] for r in v]):.4f} "
                   f"| {math.prod(r[2] for r in v):.4f} | {len(v)} |")
    return "\n".join(out)


class Bpw(dict):
    def __missing__(self, k):
        return bpw(k)


if __name__ == "__main__":
    sys.exit(study_mcn.run(__doc__, "study_ablation", "Issue 14: ablation of the types' design, judged end to end "
                           "(bench model)", "0,2", FORMATS, quantize, Bpw(), study_vq.prepare, summary))
