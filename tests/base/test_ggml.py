"""base/ggml.py: llama.cpp's quantizers through ctypes, checked against gguf-py (an independent Python
implementation of the same formats) and against the properties the quantizers must have."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from mcmoe_gguf.base.ggml import Ggml, GgmlUnavailable, ggml

TYPES = ("q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_xs", "iq3_s", "iq3_xxs", "iq2_s", "iq2_xs",
         "iq2_xxs", "iq1_m", "iq1_s")


def _w(rows=32, n=512, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


@pytest.mark.parametrize("name", TYPES)
def test_round_trip_matches_gguf_py(name):
    """ggml's bytes, read back by gguf-py's own dequantizer, give exactly ggml's dequantized values; the
    row size is gguf-py's block table's."""
    w, imp = _w(), np.random.default_rng(1).uniform(0.1, 2.0, 512).astype(np.float32)
    qt = gguf.GGMLQuantizationType[name.upper()]
    blob = ggml().quantize(w, name, imp)
    block, size = gguf.GGML_QUANT_SIZES[qt]
    assert blob.shape == (32, 512 // block * size)
    ours = ggml().dequantize(blob, name, 512)
    ref = gguf.quants.dequantize(blob, qt).reshape(ours.shape)
    np.testing.assert_array_equal(ours, ref)
    rel = ((ours - w) ** 2).mean() / (w ** 2).mean()
    assert rel < 0.5, f"{name}: relative error {rel}"


def test_q8_0_bytes_equal_gguf_py_quantizer():
    w = _w(8, 256, seed=3)
    np.testing.assert_array_equal(ggml().quantize(w, "q8_0"), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0))


def test_error_falls_with_bits():
    w, imp = _w(seed=4), np.ones(512, np.float32)
    err = {t: float(((ggml().dequantize(ggml().quantize(w, t, imp), t, 512) - w) ** 2).mean())
           for t in ("iq1_s", "iq2_xxs", "q2_k", "q3_k", "q4_k", "q6_k", "q8_0")}
    vals = list(err.values())
    assert all(a > b for a, b in zip(vals, vals[1:])), err


def test_importance_steers_the_error():
    """Columns weighted 100x come out more exactly than with uniform importance (every other column:
    the types choose scales per group of 16-32, so only weights that differ inside a group can steer)."""
    w = _w(64, 256, seed=5)
    imp = np.ones(256, np.float32)
    imp[::2] = 100.0
    for t in ("q2_k", "iq2_xs", "q4_k"):
        plain = ggml().dequantize(ggml().quantize(w, t, np.ones(256, np.float32)), t, 256)
        steered = ggml().dequantize(ggml().quantize(w, t, imp), t, 256)
        e_plain = ((plain - w)[:, ::2] ** 2).mean()
        e_steer = ((steered - w)[:, ::2] ** 2).mean()
        assert e_steer < e_plain, t


def test_threads_do_not_change_bytes():
    w, imp = _w(37, 256, seed=6), np.ones(256, np.float32)
    for t in ("q4_k", "iq2_xxs"):
        np.testing.assert_array_equal(ggml().quantize(w, t, imp, threads=1), ggml().quantize(w, t, imp, threads=2))


def test_degenerate_rows():
    w = np.zeros((4, 256), np.float32)
    w[1] = 3.0
    w[2, 7] = 1e4
    for t in ("q4_k", "q2_k", "iq2_xxs"):
        d = ggml().dequantize(ggml().quantize(w, t, np.ones(256, np.float32)), t, 256)
        assert np.isfinite(d).all()
        assert (d[0] == 0).all(), t


def test_bad_input_is_refused_by_name():
    g = ggml()
    with pytest.raises(ValueError, match="unknown ggml type 'q9_k'"):
        g.quantize(_w(), "q9_k")
    with pytest.raises(ValueError, match="needs an importance matrix"):
        g.quantize(_w(), "iq2_xxs")
    with pytest.raises(ValueError, match="multiples of 256"):
        g.quantize(_w(4, 300), "q4_k")
    w = _w(4, 256)
    w[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        g.quantize(w, "q4_k")
    with pytest.raises(ValueError, match="importance has shape"):
        g.quantize(_w(4, 256), "q4_k", np.ones(128, np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        g.quantize(_w(4, 256), "q4_k", -np.ones(256, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        g.quantize(np.ones(256, np.float32), "q4_k")


def test_missing_library_is_named(tmp_path):
    with pytest.raises(GgmlUnavailable, match="no libggml-base in"):
        Ggml(tmp_path)


def test_bf16_weights_quantize_like_their_float32():
    """Mixtral's release weights are bf16 (numpy has none): PMQ widens before handing them to ggml."""
    from mcmoe_gguf.quant.pmq import ggml_packed
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a, da = ggml_packed(w, "q4_k", None)
    b, db = ggml_packed(w.float(), "q4_k", None)
    assert torch.equal(a["data"], b["data"]) and da.dtype == torch.bfloat16
    assert torch.equal(da.float(), db.to(torch.bfloat16).float())
