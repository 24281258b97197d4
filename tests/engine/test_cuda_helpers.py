"""The __host__ __device__ decode helpers of cpp/ggml/mcq-common.h, run on the host.

The CUDA kernels (cpp/ggml-cuda/mcq.cu) and the CPU reference dequantization (cpp/ggml/mcq.c) do their
per-block arithmetic with these helpers only, so testing them here tests the math the GPU runs (no GPU
needed). A small C shim is compiled with gcc (and the header is also checked as C++), loaded with ctypes
and compared with mcmoe_gguf/quant/formats.py (dequantization: bit for bit) and numpy (integer dots exactly,
float dots against float64 within rounding). Every helper, every type (mcq1..mcq4), every code path.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mcmoe_gguf.quant import formats as F

REPO = Path(__file__).resolve().parents[2]
HEADER_DIR = REPO / "cpp" / "ggml"
BITS = (1, 2, 3, 4)

SHIM = r"""
#include "mcq-common.h"
#include "mcmoe-ids.h"

float h_fp16_to_fp32(uint16_t h) { return mcq_hd_fp16_to_fp32(h); }
int   h_block_bytes(int bits) { return mcq_hd_block_bytes(bits); }
float h_block_d(const uint8_t * blk) { return mcq_hd_block_d(blk); }
float h_block_m(const uint8_t * blk) { return mcq_hd_block_m(blk); }
float h_value(float d, float m, int q) { return mcq_hd_value(d, m, q); }
int   h_dp4a(uint32_t a, uint32_t b, int c) { return mcq_hd_dp4a(a, b, c); }
int   h_id_skipped(int32_t id, int64_t n_as) { return mcmoe_id_skipped(id, n_as); }

// codes of nblocks blocks, element by element (mcq_hd_code) and four at a time (mcq_hd_codes4)
void h_codes(int bits, const uint8_t * x, int nblocks, uint8_t * q, uint8_t * q4) {
    const int bb = mcq_hd_block_bytes(bits);
    for (int ib = 0; ib < nblocks; ++ib) {
        for (int n = 0; n < MCQ_HD_QK; ++n) {
            q[ib*MCQ_HD_QK + n] = (uint8_t) mcq_hd_code(bits, x + ib*bb + 4, n);
        }
        for (int n0 = 0; n0 < MCQ_HD_QK; n0 += 4) {
            const uint32_t v = mcq_hd_codes4(bits, x + ib*bb + 4, n0);
            for (int k = 0; k < 4; ++k) {
                q4[ib*MCQ_HD_QK + n0 + k] = (uint8_t) (v >> 8*k);
            }
        }
    }
}

void h_dequant(int bits, const uint8_t * x, int nblocks, float * y) {
    const int bb = mcq_hd_block_bytes(bits);
    for (int ib = 0; ib < nblocks; ++ib) {
        mcq_hd_dequant_block(bits, x + ib*bb, y + ib*MCQ_HD_QK);
    }
}

// per block: 4 integer 32-dots, 4 float 32-dots against Q8_1 (dy, sy), and the whole-block dot
void h_dots(int bits, const uint8_t * x, int nblocks, const int8_t * qy, const float * dy, const float * sy,
            int * isum, float * fsub, float * fblk) {
    const int bb = mcq_hd_block_bytes(bits);
    for (int ib = 0; ib < nblocks; ++ib) {
        const uint8_t * blk = x + ib*bb;
        for (int j = 0; j < 4; ++j) {
            const int8_t * y = qy + ib*MCQ_HD_QK + j*MCQ_HD_QK_Y;
            isum[ib*4 + j] = mcq_hd_dot32(bits, blk + 4, j, y);
            fsub[ib*4 + j] = mcq_hd_dot32_q8_1(bits, blk, j, y, dy[ib*4 + j], sy[ib*4 + j]);
        }
        fblk[ib] = mcq_hd_block_dot_q8_1(bits, blk, qy + ib*MCQ_HD_QK, dy + ib*4, sy + ib*4);
    }
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    d = tmp_path_factory.mktemp("hd")
    src = d / "shim.c"
    src.write_text(SHIM)
    so = d / "libshim.so"
    flags = ["-O2", "-Wall", "-Wextra", "-Werror", "-I", str(HEADER_DIR)]
    subprocess.run(["gcc", "-std=c11", "-shared", "-fPIC", *flags, str(src), "-o", str(so)], check=True)
    if shutil.which("g++"):   # the header must also be valid C++ (nvcc's host pass)
        subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-x", "c++", *flags, str(src)], check=True)
    L = ctypes.CDLL(str(so))
    P = ctypes.c_void_p
    L.h_fp16_to_fp32.restype = ctypes.c_float
    L.h_fp16_to_fp32.argtypes = [ctypes.c_uint16]
    L.h_block_d.restype = L.h_block_m.restype = ctypes.c_float
    L.h_block_d.argtypes = L.h_block_m.argtypes = [P]
    L.h_value.restype = ctypes.c_float
    L.h_value.argtypes = [ctypes.c_float, ctypes.c_float, ctypes.c_int]
    L.h_dp4a.argtypes = [ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int]
    L.h_id_skipped.argtypes = [ctypes.c_int32, ctypes.c_int64]
    L.h_codes.argtypes = [ctypes.c_int, P, ctypes.c_int, P, P]
    L.h_dequant.argtypes = [ctypes.c_int, P, ctypes.c_int, P]
    L.h_dots.argtypes = [ctypes.c_int, P, ctypes.c_int, P, P, P, P, P, P]
    return L


def ptr(a: np.ndarray):
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


def random_blocks(bits: int, nblocks: int, seed: int, special: bool = True):
    """Packed blocks with random codes and fp16 (d, m): normal, subnormal and zero d, negative m, extremes."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** bits, size=(1, nblocks * 128))
    d = np.abs(rng.standard_normal((1, nblocks)) * 0.05).astype(np.float16).astype(np.float32)
    m = (rng.standard_normal((1, nblocks)) * 0.1).astype(np.float16).astype(np.float32)
    if special and nblocks >= 6:
        d[0, 0], m[0, 0] = 0.0, -0.0625                       # d = 0: constant block, codes 0
        q[0, :128] = 0
        d[0, 1], m[0, 1] = 2.0 ** -24, 2.0 ** -20             # fp16 subnormals
        d[0, 2], m[0, 2] = 65504.0, -65504.0                  # fp16 extremes
        q[0, 256:384] = np.arange(128) % 2 ** bits            # every code, every position pattern
        q[0, 384:512] = 2 ** bits - 1                         # all codes at the maximum
        d[0, 5], m[0, 5] = 2.0 ** -6, -0.0625                 # FORMAT.md's worked example grid
    return F.pack(q.astype(np.uint8), d, m, bits).reshape(-1), q.reshape(-1).astype(np.uint8), d.reshape(-1), m.reshape(-1)


def test_fp16_to_fp32_every_value(lib):
    h = np.arange(65536, dtype=np.uint32)
    got = np.array([lib.h_fp16_to_fp32(int(v)) for v in h], dtype=np.float32)
    want = h.astype(np.uint16).view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # -0.0 and subnormals too


@pytest.mark.parametrize("bits", BITS)
def test_codes_and_params(lib, bits):
    nb = 16
    x, q, d, m = random_blocks(bits, nb, seed=bits)
    assert lib.h_block_bytes(bits) == F.block_bytes(bits) == len(x) // nb
    q1 = np.zeros(nb * 128, np.uint8)
    q4 = np.zeros(nb * 128, np.uint8)
    lib.h_codes(bits, ptr(x), nb, ptr(q1), ptr(q4))
    assert np.array_equal(q1, q), "mcq_hd_code"
    assert np.array_equal(q4, q), "mcq_hd_codes4"
    bb = F.block_bytes(bits)
    for ib in range(nb):
        blk = np.ascontiguousarray(x[ib * bb:(ib + 1) * bb])
        assert lib.h_block_d(ptr(blk)) == d[ib] and lib.h_block_m(ptr(blk)) == m[ib]


@pytest.mark.parametrize("bits", BITS)
def test_dequant_bit_exact(lib, bits):
    nb = 64
    x, q, d, m = random_blocks(bits, nb, seed=10 + bits)
    y = np.zeros(nb * 128, np.float32)
    lib.h_dequant(bits, ptr(x), nb, ptr(y))
    want = F.dequantize(x, bits, nb * 128).reshape(-1).astype(np.float32)
    assert np.array_equal(y.view(np.uint32), want.view(np.uint32))
    # and the once-rounded exact value (float64 of m + d*q, rounded to float32)
    exact = (m.astype(np.float64).repeat(128) + d.astype(np.float64).repeat(128) * q).astype(np.float32)
    assert np.array_equal(y.view(np.uint32), exact.view(np.uint32))


def test_value_and_dp4a(lib):
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = np.float32(np.float16(abs(rng.standard_normal())))
        m = np.float32(np.float16(rng.standard_normal()))
        qv = int(rng.integers(0, 16))
        assert lib.h_value(float(d), float(m), qv) == np.float32(np.float64(m) + np.float64(d) * qv)
        a = rng.integers(0, 16, 4).astype(np.uint8)
        b = rng.integers(-128, 128, 4).astype(np.int8)
        c = int(rng.integers(-1000, 1000))
        want = c + int(np.dot(a.astype(np.int64), b.astype(np.int64)))
        assert lib.h_dp4a(int(a.view(np.uint32)[0]), int(b.view(np.uint32)[0]), c) == want


@pytest.mark.parametrize("bits", BITS)
def test_dots_q8_1(lib, bits):
    nb = 32
    x, q, d, m = random_blocks(bits, nb, seed=20 + bits)
    rng = np.random.default_rng(bits)
    qy = rng.integers(-127, 128, size=nb * 128).astype(np.int8)
    qy[:32] = 127                                              # saturated activations
    qy[32:64] = -127
    dy = (np.abs(rng.standard_normal(nb * 4)) * 0.01 + 1e-4).astype(np.float16).astype(np.float32)
    sy = (dy.astype(np.float64) * qy.reshape(-1, 32).sum(1)).astype(np.float16).astype(np.float32)  # Q8_1: fp16 s
    isum = np.zeros(nb * 4, np.int32)
    fsub = np.zeros(nb * 4, np.float32)
    fblk = np.zeros(nb, np.float32)
    lib.h_dots(bits, ptr(x), nb, ptr(qy), ptr(dy), ptr(sy), ptr(isum), ptr(fsub), ptr(fblk))

    want_i = (q.astype(np.int64) * qy.astype(np.int64)).reshape(-1, 32).sum(1)
    assert np.array_equal(isum, want_i), "mcq_hd_dot32 (integer, exact)"
    d4, m4 = d.astype(np.float64).repeat(4), m.astype(np.float64).repeat(4)
    want_sub = d4 * dy * want_i + m4 * sy
    scale_sub = np.abs(d4 * dy) * np.abs(want_i) + np.abs(m4 * sy) + 1e-30
    assert np.all(np.abs(fsub - want_sub) <= 4e-7 * scale_sub * 4), "mcq_hd_dot32_q8_1"
    want_blk = want_sub.reshape(nb, 4).sum(1)
    scale_blk = scale_sub.reshape(nb, 4).sum(1)
    assert np.all(np.abs(fblk - want_blk) <= 1e-6 * scale_blk * 4), "mcq_hd_block_dot_q8_1"
    # and the dot the activations stand for: sum_n w_n * dy*qy_n (sy = dy*sum(qy) up to fp16 rounding)
    w = F.dequantize(x, bits, nb * 128).reshape(-1).astype(np.float64)
    direct = (w * np.repeat(dy, 32) * qy).reshape(nb, 128).sum(1)
    err_s = np.abs(m.astype(np.float64)) * np.abs(sy - dy.astype(np.float64) * qy.reshape(-1, 32).sum(1)).reshape(nb, 4).sum(1)
    assert np.all(np.abs(fblk - direct) <= err_s + 1e-6 * (scale_blk + np.abs(direct)) * 4)


def test_skip_rule(lib):
    for n_as in (1, 3, 8):
        for i in range(-3, 12):
            assert lib.h_id_skipped(i, n_as) == (i < 0 or i >= n_as)


def test_comparison_detects_a_wrong_layout(lib):
    """The checks above can fail: a plane read with the wrong layout is caught (mcq2 bytes read as mcq3
    with a corrupted qh plane, mcq4 nibbles swapped)."""
    x, q, d, m = random_blocks(4, 4, seed=99, special=False)
    x = x.reshape(4, -1).copy()
    x[:, 4:] = (x[:, 4:] >> 4) | ((x[:, 4:] & 15) << 4)            # swap the two halves of every block
    y = np.zeros(4 * 128, np.float32)
    lib.h_dequant(4, ptr(np.ascontiguousarray(x.reshape(-1))), 4, ptr(y))
    want = F.dequantize(random_blocks(4, 4, seed=99, special=False)[0], 4, 512).reshape(-1)
    assert not np.array_equal(y, want)
