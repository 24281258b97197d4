"""The mct1 / mct2 / mct3 ggml types (issue 14: tail-biting trellis per 64 weights, 4-bit scales per 32, fp16 per
256) against trellis.py, their bit-exact Python twin (what they share with the mcn types: test_superblock_types.py):

- C quantize == trellis.mct_quantize byte for byte (test_superblock_types.py), and a constant block keeps its sign;
- the C Viterbi GPTQ calls (mct_tail_biting) == trellis.tail_biting in float64, ties included; bad arguments are
  refused.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from mcmoe_gguf.quant import formats as F
from mcmoe_gguf.quant import trellis as TR
from ggml_harness import Ggml
from superblock_family import MCT, rows_of

NAMES = MCT.names()
TID = {n: F.MCT_TYPES[n].type_id for n in NAMES}
BITS = {n: F.MCT_TYPES[n].bits for n in NAMES}


@pytest.fixture(scope="module")
def ggml():
    g = MCT.setup(Ggml())
    g.base.mct_tail_biting.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_void_p]
    g.base.mct_tail_biting.restype = ctypes.c_bool
    return g


@pytest.mark.parametrize("name", NAMES)
def test_constant_block_keeps_its_sign(ggml, name):
    """A constant block (rows_of("edge") row 2) comes back negative on average: the trellis has no constant path,
    so this is what the Viterbi can do."""
    deq = MCT.quantize_checked(ggml, name, rows_of("edge", 6, 512, seed=4 + BITS[name]), None)
    assert deq[2, :256].mean() < -0.5


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_c_viterbi_equals_torch(ggml, bits):
    """mct_tail_biting (what GPTQ calls) == trellis.tail_biting in float64, on random sequences, on sequences whose
    step is 0 (every path ties: the lowest state wins) and whose importance is 0 in places, and on a sequence that
    the table itself produced (the exact path must come back)."""
    rng = np.random.default_rng(bits)
    B = 24
    x = rng.standard_normal((B, 64))
    step = np.abs(rng.standard_normal((B, 1))) / TR.MCT_SIGMA * np.ones((1, 64))
    w = rng.gamma(0.5, 1.0, (B, 64))
    step[0] = 0.0
    w[1, :20] = 0.0
    x[2] = 0.0
    codes0 = rng.integers(0, 2 ** bits, (1, 256))
    st0 = TR.mct_table()[TR.mct_states(codes0.astype(np.uint8), bits)]
    x[3], step[3], w[3] = st0[0, :64] * 0.01, 0.01, 1.0
    out = np.zeros((B, 64), np.uint8)
    arrs = [np.ascontiguousarray(a) for a in (x, step, w)]
    assert ggml.base.mct_tail_biting(bits, *(a.ctypes.data for a in arrs), B, out.ctypes.data)
    table = torch.from_numpy(TR.mct_table().astype(np.float64))
    want = TR.tail_biting(*(torch.from_numpy(a) for a in arrs), table, bits).numpy()
    assert np.array_equal(out, want), np.argwhere(out != want)[:5]
    assert np.array_equal(out[3], codes0[0, :64]) and not out[0].any()
    # the Python entry point takes the C path and agrees; bad arguments are refused, not crashed on
    got = TR.tail_biting_codes(*(torch.from_numpy(a) for a in arrs), bits)
    assert np.array_equal(got.numpy(), want)
    assert not ggml.base.mct_tail_biting(4, *(a.ctypes.data for a in arrs), B, out.ctypes.data)
    assert not ggml.base.mct_tail_biting(bits, None, None, None, 3, None)
    assert ggml.base.mct_tail_biting(bits, None, None, None, 0, None)
