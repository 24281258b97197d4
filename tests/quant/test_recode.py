"""quant/recode.py: the grid of a stored mcq / mcn / iq1_s tensor reproduces its weights, nearest() rounds as
the reference quantizers do (for iq1_s: to the least-squares codeword, checked by brute force), and new
codes on the stored scales give a valid block of the same type."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mcmoe_gguf.quant import formats, recode
from mcmoe_gguf.quant.workdir import dequantize_entry

TYPES = ["mcq1", "mcq2", "mcq3", "mcn2", "mcn3"]
ALL = [*TYPES, "iq1_s"]         # iq1_s: llama.cpp's codebook type (recode.CodebookGrid)


def _entry(t: str, rows: int = 6, n: int = 512, seed: int = 0) -> tuple[dict, np.ndarray]:
    w = np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)
    w[1] = 0.0                                  # a zero row: zero scales, code 0 everywhere
    w[2, 7] = 40.0                              # one huge outlier
    if t == "iq1_s":            # ggml's own quantizer, with importance weights (which iq1_s requires)
        from mcmoe_gguf.quant.quantizers import ggml_packed
        imp = np.random.default_rng(seed + 100).uniform(0.5, 2.0, n).astype(np.float32)
        return ggml_packed(torch.from_numpy(w), "iq1_s", torch.from_numpy(imp))[0], w
    if t.startswith("mcq"):
        bits = int(t[-1])
        return {"bits": bits, "shape": [rows, n], "data": torch.from_numpy(formats.quantize(w, bits))}, w
    blob = formats.mcn_quantize(w, formats.mcn_spec(t).bits)
    return {"type": t, "shape": [rows, n], "data": torch.from_numpy(blob)}, w


@pytest.mark.parametrize("t", ALL)
def test_grid_values_are_the_stored_weights_and_latents_round_back(t):
    entry, _ = _entry(t)
    g = recode.grid(entry)
    # dequantize_entry: formats.py for mcq, the patched ggml's C dequantizer for mcn and iq1_s
    np.testing.assert_allclose(g.values().numpy(), dequantize_entry(entry).numpy(), rtol=1e-6, atol=0)
    assert torch.equal(g.nearest(g.latent()), g.codes)
    assert torch.equal(g.snap(g.latent()), g.latent())
    assert torch.equal(recode.recoded_entry(entry, g.codes)["data"], entry["data"])


@pytest.mark.parametrize("t", TYPES)
def test_nearest_rounds_like_the_reference_quantizer(t):
    """Codes of arbitrary weights on the stored scales: recode.nearest on (w - offset) / step against
    formats.quantize_codes (mcq) and formats.mcn_codes (mcn), including exact midpoints."""
    entry, _ = _entry(t, seed=1)
    g = recode.grid(entry)
    w = torch.from_numpy(np.random.default_rng(2).standard_normal(g.codes.shape).astype(np.float32))
    mids = (g.levels[:-1] + g.levels[1:]) / 2
    w[0, :len(mids)] = g.offset[0, :len(mids)] + g.step[0, :len(mids)] * mids      # ties
    n = g.codes.shape[1]
    if t.startswith("mcq"):
        _, d, m = formats.unpack(entry["data"].numpy(), int(t[-1]), n)
        want = formats.quantize_codes(w, torch.from_numpy(d), torch.from_numpy(m), int(t[-1])).numpy()
        x = (w - g.offset) / torch.where(g.step > 0, g.step, torch.ones_like(g.step))
    else:
        bits = formats.mcn_spec(t).bits
        _, d, s = formats.mcn_unpack(entry["data"].numpy(), bits, n)
        want = formats.mcn_codes(w.numpy(), d, s, bits)
        step64 = np.repeat(formats.mcn_step(d, s), formats.MCN_SUB, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            x = torch.from_numpy(np.where(step64 > 0, w.numpy() / step64, 0.0))
    np.testing.assert_array_equal(g.nearest(x).numpy(), want)


@pytest.mark.parametrize("t", ALL)
def test_new_codes_keep_the_scales_and_the_size(t):
    """Random codes (iq1_s: codeword indices) on the stored scales (iq1_s: d, 3-bit scales, delta signs)."""
    entry, _ = _entry(t, seed=3)
    g = recode.grid(entry)
    rng = np.random.default_rng(4)
    new = torch.from_numpy(rng.integers(0, len(g.levels), g.codes.shape).astype(g.codes.numpy().dtype))
    out = recode.recoded_entry(entry, new)
    assert out["data"].shape == entry["data"].shape and out["data"].dtype == entry["data"].dtype
    back = recode.grid(out)
    assert torch.equal(back.codes, new)
    torch.testing.assert_close(back.step, g.step, rtol=0, atol=0)
    torch.testing.assert_close(back.offset, g.offset, rtol=0, atol=0)
    np.testing.assert_allclose(dequantize_entry(out).numpy(), g.values(new).numpy(), rtol=1e-6, atol=0)


def test_bad_codes_and_other_types_are_refused():
    entry, _ = _entry("mcq2")
    with pytest.raises(ValueError, match="codes of shape"):
        recode.recoded_entry(entry, torch.zeros(3, 512, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\]"):
        recode.recoded_entry(entry, torch.full((6, 512), 4, dtype=torch.uint8))
    mcn, _ = _entry("mcn2")
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\]"):
        recode.recoded_entry(mcn, torch.full((6, 512), 7, dtype=torch.uint8))
    q4k = {"type": "q4_k", "shape": [2, 256], "data": torch.zeros(2 * 144, dtype=torch.uint8)}
    assert not recode.recodable(q4k) and recode.recodable(entry) and recode.recodable(mcn)
    for f in (recode.grid, lambda e: recode.recoded_entry(e, torch.zeros(2, 256, dtype=torch.uint8))):
        with pytest.raises(ValueError, match="q4_k: only our mcq and mcn types and iq1_s can be recoded"):
            f(q4k)


def test_iq1s_nearest_is_the_least_squares_codeword():
    """Brute force in float64 over all 2048 codewords, ties to the lower index (groups of zero step keep
    their code: the zero row's)."""
    entry, _ = _entry("iq1_s", seed=5)
    g = recode.grid(entry)
    assert g.codes.shape == (6, 512 // 8) and g.levels.shape == (2048, 8)
    x = torch.from_numpy(np.random.default_rng(6).uniform(-1.6, 1.6, g.step.shape).astype(np.float32))
    x[3, :8] = (g.levels[17] + g.levels[1030]) / 2      # equidistant from two codewords (and maybe others)
    got = g.nearest(x, chunk=100).numpy()               # a chunk that does not divide the groups
    cb = g.levels.double().numpy()
    d2 = ((x.double().numpy().reshape(-1, 1, 8) - cb[None]) ** 2).sum(-1)
    want = d2.argmin(1).reshape(g.codes.shape)
    live = g.step[:, ::8].numpy() > 0
    np.testing.assert_array_equal(got[live], want[live])
    np.testing.assert_array_equal(got[~live], g.codes.numpy()[~live])
    assert (~live).any() and live.any()
    # searched again after small moves (most groups keep their remembered codeword) and after large ones:
    # the answer is always the brute force's
    rng = np.random.default_rng(9)
    for scale in (1e-3, 0.05, 0.3, 1.0):
        x = x + torch.from_numpy(rng.normal(0, scale, x.shape).astype(np.float32))
        got = g.nearest(x, chunk=100).numpy()
        d2 = ((x.double().numpy().reshape(-1, 1, 8) - cb[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(got[live], d2.argmin(1).reshape(g.codes.shape)[live])


def test_bad_iq1s_codes_are_refused():
    entry, _ = _entry("iq1_s", seed=7)
    shape = recode.grid(entry).codes.shape
    with pytest.raises(ValueError, match=r"iq1_s: codes must lie in \[0, 2047\]"):
        recode.recoded_entry(entry, torch.full(shape, 2048, dtype=torch.int16))
    with pytest.raises(ValueError, match="iq1_s: codes of shape"):
        recode.recoded_entry(entry, torch.zeros(2, 64, dtype=torch.int16))
