"""mcq1/mcq2/mcq3: byte layout, quantizer grid, fp16 params, error paths.

`reference_pack` / `reference_dequantize` below build and read the bytes one element at a time with
plain Python and `struct` (IEEE half via the 'e' format), independently of the numpy code in
formats.py: they are the element-by-element statement of docs/FORMAT.md that the C kernels will be
compared with as well.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from mcmoe_gguf.quant import formats as F

BITS = (1, 2, 3, 4)


def reference_pack(codes, scale, mn, bits) -> bytes:
    """Per-element byte builder: codes [rows][n] ints, scale/mn [rows][n/128] fp16-exact floats."""
    out = bytearray()
    for r, row in enumerate(codes):
        for blk in range(len(row) // 128):
            q = [int(c) for c in row[blk * 128:(blk + 1) * 128]]
            out += struct.pack("<e", float(scale[r][blk])) + struct.pack("<e", float(mn[r][blk]))
            if bits == 1:
                plane = bytearray(16)
                for n in range(128):
                    plane[n >> 3] |= q[n] << (n & 7)
                out += plane
            elif bits == 4:
                nib = bytearray(64)
                for n in range(128):
                    nib[n & 63] |= q[n] << (4 * (n >> 6))
                out += nib
            else:
                low = bytearray(32)
                for n in range(128):
                    low[n & 31] |= (q[n] & 3) << (2 * (n >> 5))
                out += low
                if bits == 3:
                    high = bytearray(16)
                    for n in range(128):
                        high[n >> 3] |= (q[n] >> 2) << (n & 7)
                    out += high
    return bytes(out)


def reference_dequantize(blob: bytes, bits, rows, n):
    """Per-element reader: value = fp32(m) + fp32(d) * q, in float32."""
    bb = {1: 20, 2: 36, 3: 52, 4: 68}[bits]
    out = np.zeros((rows, n), np.float32)
    for r in range(rows):
        for blk in range(n // 128):
            b = blob[(r * (n // 128) + blk) * bb:][:bb]
            d, m = np.float32(struct.unpack("<e", b[0:2])[0]), np.float32(struct.unpack("<e", b[2:4])[0])
            for i in range(128):
                if bits == 1:
                    q = (b[4 + (i >> 3)] >> (i & 7)) & 1
                elif bits == 4:
                    q = (b[4 + (i & 63)] >> (4 * (i >> 6))) & 15
                else:
                    q = (b[4 + (i & 31)] >> (2 * (i >> 5))) & 3
                    if bits == 3:
                        q |= ((b[36 + (i >> 3)] >> (i & 7)) & 1) << 2
                out[r, blk * 128 + i] = m + d * np.float32(q)
    return out


def random_params(rng, rows, nb):
    """fp16-exact params covering signs, zero, fp16 subnormals and large magnitudes."""
    d = np.abs(rng.standard_normal((rows, nb))) * 10.0 ** rng.integers(-7, 3, (rows, nb))
    m = rng.standard_normal((rows, nb)) * 10.0 ** rng.integers(-6, 4, (rows, nb))
    d.flat[0], m.flat[1] = 0.0, 0.0
    return d.astype(np.float16).astype(np.float32), m.astype(np.float16).astype(np.float32)


def weights(kind, rows=64, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(rows, n, generator=g) * 0.02
    # Student-t with 3 degrees of freedom: heavy tails, like real expert weights' outliers
    z = torch.randn(rows, n, generator=g)
    chi2 = torch.randn(3, rows, n, generator=g).square().sum(0)
    return z / (chi2 / 3).sqrt() * 0.02


def rel_rmse(w, bits, method):
    d, m = F.fit_params(w, bits, method)
    deq = F.dequantize_codes(F.quantize_codes(w, d, m, bits), d, m)
    return ((deq - w).square().mean() / w.square().mean()).sqrt().item()


def test_type_constants():
    assert [F.block_bytes(b) for b in BITS] == [20, 36, 52, 68]
    assert [F.bpw(b) for b in BITS] == [1.25, 2.25, 3.25, 4.25]
    assert [(F.TYPES[b].type_id, F.TYPES[b].name) for b in BITS] == \
        [(100, "mcq1"), (101, "mcq2"), (102, "mcq3"), (103, "mcq4")]
    assert {i: s.bits for i, s in F.TYPES_BY_ID.items()} == {100: 1, 101: 2, 102: 3, 103: 4}


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    rows, n = 5, 512
    codes = rng.integers(0, 2 ** bits, (rows, n)).astype(np.uint8)
    d, m = random_params(rng, rows, n // 128)
    blob = F.pack(codes, d, m, bits)
    assert blob.dtype == np.uint8 and blob.shape == (rows, n // 128 * F.block_bytes(bits))
    q2, d2, m2 = F.unpack(blob, bits, n)
    np.testing.assert_array_equal(q2, codes)
    np.testing.assert_array_equal(d2, d)
    np.testing.assert_array_equal(m2, m)
    # flat bytes of whole rows, as read from a file, unpack the same
    np.testing.assert_array_equal(F.unpack(blob.ravel(), bits, n)[0], codes)


@pytest.mark.parametrize("bits", BITS)
def test_bytes_match_per_element_reference(bits):
    w = weights("student_t", rows=2, n=256, seed=bits)
    d, m = F.fit_params(w, bits, "mse")
    codes = F.quantize_codes(w, d, m, bits)
    blob = F.pack(codes, d, m, bits)
    assert blob.tobytes() == reference_pack(codes.tolist(), d.tolist(), m.tolist(), bits)
    # random codes reach every bit position, including the top bits quantized weights rarely use
    rng = np.random.default_rng(10 + bits)
    codes = rng.integers(0, 2 ** bits, (2, 256)).astype(np.uint8)
    d, m = random_params(rng, 2, 2)
    assert F.pack(codes, d, m, bits).tobytes() == reference_pack(codes.tolist(), d.tolist(), m.tolist(), bits)


def test_bytes_of_a_known_block():
    """Absolute anchors, not derived from any packer: fp16 1.0 = 00 3c, -0.5 = 00 b8."""
    q = np.zeros((1, 128), np.uint8)
    q[0, [0, 32, 64, 96]] = [1, 2, 3, 1]   # 2-bit byte 0 = 1 | 2<<2 | 3<<4 | 1<<6 = 0x79
    q[0, 9] = 1                            # 1-bit byte 1, bit 1
    ones = np.ones((1, 1), np.float32)
    b2 = F.pack(q, ones, -0.5 * ones, 2)[0]
    assert b2[:5].tobytes() == bytes([0x00, 0x3C, 0x00, 0xB8, 0x79]) and b2[4 + 9] == 0x01 and b2[5:].sum() == 1
    b1 = F.pack((q == 1).astype(np.uint8), ones, ones, 1)[0]   # elements 0, 9, 96 set
    assert b1[4:].tolist() == [0x01, 0x02] + [0] * 10 + [0x01, 0, 0, 0]
    q3 = np.zeros((1, 128), np.uint8)
    q3[0, 33] = 6                          # low bits 2 -> byte 1 bits 2-3; high bit -> plane byte 4, bit 1
    b3 = F.pack(q3, ones, ones, 3)[0]
    assert b3[4 + 1] == 0x08 and b3[36 + 4] == 0x02 and int(b3[4:].sum()) == 0x0A


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_equals_formula_and_reference(bits):
    rng = np.random.default_rng(20 + bits)
    codes = rng.integers(0, 2 ** bits, (3, 256)).astype(np.uint8)
    d, m = random_params(rng, 3, 2)
    blob = F.pack(codes, d, m, bits)
    deq = F.dequantize(blob, bits, 256)
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, reference_dequantize(blob.tobytes(), bits, 3, 256))
    dr, mr = np.repeat(d, 128, axis=1), np.repeat(m, 128, axis=1)
    np.testing.assert_array_equal(deq, mr + dr * codes.astype(np.float32))
    # fused multiply-add gives the same float32: d*q is exact, so float64 m + d*q is the exact sum
    # and rounding it once to float32 is what an FMA does
    fused = (mr.astype(np.float64) + dr.astype(np.float64) * codes).astype(np.float32)
    np.testing.assert_array_equal(deq, fused)
    # torch in -> torch out, same values
    t = F.dequantize_codes(torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m))
    assert isinstance(t, torch.Tensor) and torch.equal(t, torch.from_numpy(deq))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_codes_in_range_and_params_are_fp16(bits, method):
    w = weights("student_t", seed=bits) * 50      # outliers the "mse" grid clips
    d, m = F.fit_params(w, bits, method)
    assert d.dtype == torch.float32 and d.shape == (64, 8) and (d >= 0).all()
    assert torch.equal(d.half().float(), d) and torch.equal(m.half().float(), m)
    codes = F.quantize_codes(w, d, m, bits)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert int(codes.max()) == 2 ** bits - 1 and int(codes.min()) == 0


@pytest.mark.parametrize("bits", BITS)
def test_stored_params_reproduce_codes(bits):
    """Codes re-derived from the unpacked (stored) params equal the packed codes; so does GPTQ's column path."""
    w = weights("gauss", rows=16, n=256, seed=30 + bits)
    d, m = F.fit_params(w, bits, "mse")
    codes = F.quantize_codes(w, d, m, bits)
    q2, d2, m2 = F.unpack(F.quantize(w, bits, "mse"), bits, 256)
    np.testing.assert_array_equal(q2, codes.numpy())
    assert torch.equal(F.quantize_codes(w, torch.from_numpy(d2), torch.from_numpy(m2), bits), codes)
    deq = F.dequantize_codes(codes, d, m)
    for col in (0, 127, 128, 255):
        qc, dc = F.quantize_column(w[:, col], d[:, col // 128], m[:, col // 128], bits)
        assert torch.equal(qc, codes[:, col]) and torch.equal(dc, deq[:, col])


def test_codes_round_half_to_even_and_clamp():
    d, m = torch.tensor([[0.5]]), torch.tensor([[-1.0]])
    # (w - m) / d = -2, 0.2, 0.5, 1.5, 2.5, 2.6, 40
    w = torch.tensor([-2.0, -0.9, -0.75, -0.25, 0.25, 0.3, 19.0]).repeat(19)[:128].reshape(1, 128)
    expect = {1: [0, 0, 0, 1, 1, 1, 1], 2: [0, 0, 0, 2, 2, 3, 3], 3: [0, 0, 0, 2, 2, 3, 7], 4: [0, 0, 0, 2, 2, 3, 15]}
    for bits in BITS:
        assert F.quantize_codes(w, d, m, bits)[0, :7].tolist() == expect[bits]


@pytest.mark.parametrize("bits", BITS)
def test_codes_equal_direct_formula_and_minmax_error_is_half_a_step(bits):
    w = weights("student_t", seed=50 + bits)
    d, m = F.fit_params(w, bits, "minmax")
    codes = F.quantize_codes(w, d, m, bits).numpy()
    wn, dr, mr = w.numpy(), np.repeat(d.numpy(), 128, 1), np.repeat(m.numpy(), 128, 1)
    direct = np.clip(np.rint((wn - mr) / dr), 0, 2 ** bits - 1)   # d > 0 for random weights
    np.testing.assert_array_equal(codes, direct)
    # min/max does not clip, so every weight lies within half a step of its level
    err = np.abs(F.dequantize_codes(codes, d.numpy(), m.numpy()) - wn)
    assert (err <= dr * (0.5 + 1e-2)).all()


def test_mse_matches_the_optimal_uniform_grid_for_gaussians():
    """Per block, "mse" fits at least as well as the best uniform grid designed for a known N(0, 1).

    Relative RMSE of the optimal 2/4/8-level uniform quantizer of a unit gaussian (Max 1960):
    sqrt(1 - 2/pi) = 0.603, sqrt(0.1188) = 0.345, sqrt(0.03744) = 0.193.
    """
    w = weights("gauss", rows=128, seed=60)
    for bits, bound in zip(BITS, (0.603, 0.345, 0.193)):
        assert rel_rmse(w, bits, "mse") < bound


@pytest.mark.parametrize("kind", ["gauss", "student_t"])
@pytest.mark.parametrize("bits", BITS)
def test_mse_beats_minmax(kind, bits):
    w = weights(kind, seed=40 + bits)
    e_minmax, e_mse = rel_rmse(w, bits, "minmax"), rel_rmse(w, bits, "mse")
    assert e_mse < 0.97 * e_minmax, (e_mse, e_minmax)
    # and block by block never worse, since min/max is one of the candidates
    wb = w.reshape(64, -1, 128)
    per_block = {}
    for method in ("minmax", "mse"):
        d, m = F.fit_params(w, bits, method)
        deq = F.dequantize_codes(F.quantize_codes(w, d, m, bits), d, m).reshape(wb.shape)
        per_block[method] = (deq - wb).square().sum(-1)
    assert (per_block["mse"] <= per_block["minmax"] * (1 + 1e-5)).all()


@pytest.mark.parametrize("method", ["minmax", "mse"])
@pytest.mark.parametrize("bits", BITS)
def test_constant_block_is_exact(bits, method):
    w = weights("gauss", rows=2, n=256)
    w[0, :128] = 0.125
    w[1, 128:] = -3.0
    d, m = F.fit_params(w, bits, method)
    assert d[0, 0] == 0 and d[1, 1] == 0 and m[0, 0] == 0.125 and m[1, 1] == -3.0
    deq = F.dequantize(F.quantize(w, bits, method), bits, 256)
    assert np.isfinite(deq).all()
    assert (deq[0, :128] == 0.125).all() and (deq[1, 128:] == -3.0).all()
    assert F.quantize_codes(w, d, m, bits)[0, :128].eq(0).all()
    # d == 0 means code 0 even where w != m (a range too small for fp16 rounds d to 0)
    assert F.quantize_codes(w, torch.zeros(2, 2), torch.full((2, 2), -1.0), bits).eq(0).all()
    q, deq = F.quantize_column(w[:, 5], torch.zeros(2), torch.ones(2), bits)
    assert q.eq(0).all() and deq.eq(1.0).all()


def test_error_paths():
    w = weights("gauss", rows=2, n=256)
    with pytest.raises(ValueError, match="multiple of the group size"):
        F.fit_params(w[:, :200], 2)
    with pytest.raises(ValueError, match="multiple of the group size"):
        F.quantize(w[:, :100], 3)
    for bad in (float("nan"), float("inf")):
        w2 = w.clone()
        w2[1, 7] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            F.quantize(w2, 2)
        with pytest.raises(ValueError, match="NaN or Inf"):
            F.quantize_column(w2[:, 7], torch.ones(2), torch.zeros(2), 2)
    with pytest.raises(ValueError, match="fp16 range"):
        F.fit_params(w * 1e7, 1)
    for bits in (0, 5, "2"):
        with pytest.raises(ValueError, match="bits must be one of"):
            F.fit_params(w, bits)
        with pytest.raises(ValueError, match="bits must be one of"):
            F.block_bytes(bits)
    with pytest.raises(ValueError, match="method"):
        F.fit_params(w, 2, "gptq")
    ones, zeros = np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\]"):
        F.pack(np.full((2, 256), 4, np.uint8), ones, zeros, 2)
    with pytest.raises(ValueError, match="not exact fp16"):
        F.pack(np.zeros((2, 256), np.uint8), ones * 0.1, zeros, 2)
    with pytest.raises(ValueError, match="whole rows"):
        F.unpack(np.zeros((2, 71), np.uint8), 2, 256)
