"""quant/rescale.py: multiplying the stored super-block scales multiplies exactly those blocks' weights.

The reference dequantizers are independent of rescale.py: gguf-py's for llama.cpp's types, formats.py
(the bit-exact twin of our C code) for mcq and mcn."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from mcmoe_gguf.base.ggml import ggml
from mcmoe_gguf.quant import formats, rescale

STOCK = ("q8_0", "q4_0", "q5_k", "q4_k", "q3_k", "q2_k", "q6_k", "iq4_xs", "iq4_nl", "iq3_s", "iq3_xxs", "iq2_s",
         "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
OURS = ("mcq1", "mcq2", "mcq3", "mcq4", "mcn2", "mcn3")


def _w(rows=16, n=512, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


def _quantized(t: str, w: np.ndarray) -> np.ndarray:
    if t.startswith("mcq"):
        return formats.quantize(torch.from_numpy(w), int(t[3:]))
    if t.startswith("mcn"):
        return formats.mcn_quantize(w, int(t[3:]))
    return ggml().quantize(w, t, np.ones(w.shape[1], np.float32))


def _dequantized(t: str, blob: np.ndarray, n: int) -> np.ndarray:
    if t.startswith("mcq"):
        return formats.dequantize(blob, int(t[3:]), n).reshape(-1, n)
    if t.startswith("mcn"):
        return formats.mcn_dequantize(blob, int(t[3:]), n).reshape(-1, n)
    return gguf.quants.dequantize(blob, gguf.GGMLQuantizationType[t.upper()]).reshape(-1, n)


@pytest.mark.parametrize("t", STOCK + OURS)
def test_each_group_is_multiplied_by_its_factor(t):
    rows, n = 16, 512
    w = _w(rows, n, seed=len(t))
    blob = _quantized(t, w)
    gs = rescale.group_size(t, n)
    assert gs == 256
    g = np.random.default_rng(7).uniform(0.7, 1.4, (rows, n // gs)).astype(np.float32)
    new = rescale.rescale(blob, t, (rows, n), g)
    assert new.size == blob.size and not np.shares_memory(new, blob)
    old_w, new_w = _dequantized(t, blob, n), _dequantized(t, new.reshape(blob.shape), n)
    # every group's weights are its old ones times one number: that number is g up to fp16 rounding
    o, nw = old_w.reshape(rows, n // gs, gs), new_w.reshape(rows, n // gs, gs)
    ratio = (o * nw).sum(-1) / np.maximum((o * o).sum(-1), 1e-30)
    np.testing.assert_allclose(ratio, g, rtol=2e-3)
    np.testing.assert_allclose(nw, o * ratio[..., None], atol=2e-3 * np.abs(o).max())
    # factors of one leave the bytes as they were
    np.testing.assert_array_equal(rescale.rescale(blob, t, (rows, n), np.ones_like(g)), blob.reshape(-1))


def test_float_types_and_block_groups():
    w = _w(4, 64)
    g = np.array([[2.0], [0.5], [1.0], [3.0]], np.float32)
    for t, dt in (("f32", np.float32), ("f16", np.float16)):
        assert rescale.group_size(t, 64) == 64 and rescale.group_size(t, 512) == 256
        out = rescale.rescale(w.astype(dt), t, w.shape, g).view(dt).reshape(w.shape)
        np.testing.assert_allclose(out.astype(np.float32), w.astype(dt).astype(np.float32) * g, rtol=1e-3)
    # rows of 96 Q8_0 weights: not whole groups of 256, so one factor per block of 32
    assert rescale.group_size("q8_0", 96) == 32
    assert rescale.group_size("iq2_xs", 512) == 256
    assert rescale.group_size("bf16", 512) is None


def test_bad_input_is_refused_with_the_reason():
    w = _w(4, 256)
    blob = _quantized("q4_k", w)
    with pytest.raises(ValueError, match="factors of shape"):
        rescale.rescale(blob, "q4_k", (4, 256), np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="finite and positive"):
        rescale.rescale(blob, "q4_k", (4, 256), np.full((4, 1), np.nan, np.float32))
    with pytest.raises(ValueError, match="finite and positive"):
        rescale.rescale(blob, "q4_k", (4, 256), np.zeros((4, 1), np.float32))
    with pytest.raises(ValueError, match="bytes are not 4 rows"):
        rescale.rescale(blob.reshape(-1)[:-1], "q4_k", (4, 256), np.ones((4, 1), np.float32))
    with pytest.raises(ValueError, match="no super-block scale"):
        rescale.rescale(blob, "tq2_0", (4, 256), np.ones((4, 1), np.float32))


def test_a_scale_beyond_fp16_keeps_its_old_value():
    w = _w(2, 256) * 1e4            # q8_0 scales near 300: x 1e3 leaves fp16's range
    blob = _quantized("q8_0", w)
    out = rescale.rescale(blob, "q8_0", (2, 256), np.array([[1e3], [1.0]], np.float32))
    new = _dequantized("q8_0", out.reshape(blob.shape), 256)
    assert np.all(np.isfinite(new))
    np.testing.assert_array_equal(new, _dequantized("q8_0", blob, 256))
