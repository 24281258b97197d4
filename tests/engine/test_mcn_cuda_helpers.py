"""The four-at-a-time __host__ __device__ helpers of cpp/ggml/mcn-common.h (the CUDA path of mcn2 / mcn3), on the host.

The CUDA kernels (cpp/ggml-cuda/mcn.cu) decode with mcn_hd_codes4 / mcn_hd_levels4 (codes and int8 table
values four at a time, the levels gathered with __byte_perm, emulated here byte for byte) and dot them
with dp4a (mcn_hd_dot32_lv); the dequantization is mcn_hd_value of those levels. A small C shim is compiled
with gcc (the header is also checked as C++), loaded with ctypes and compared with
mcmoe_gguf/quant/formats.py (mcn_pack / mcn_unpack / mcn_values / MCN_LEVELS: dequantization bit for bit)
and with the one-weight-at-a-time helpers of the same header (integer dots exactly). Device-only branches
(__byte_perm, 16-bit loads, __dp4a) are compile-checked by scripts/check_cuda.py.
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
BITS = (2, 3)

SHIM = r"""
#include "mcn-common.h"

int      h_block_bytes(int bits) { return MCN_HD_BLOCK_BYTES(bits); }
uint32_t h_le32_a2(const uint8_t * p) { return mcn_hd_le32_a2(p); }
uint32_t h_byte_perm(uint32_t x, uint32_t y, uint32_t s) { return mcn_hd_byte_perm(x, y, s); }
uint32_t h_levels4(int bits, uint32_t q4) { return mcn_hd_levels4(bits, q4); }
int      h_level_byte(uint32_t lv4, int k) { return mcn_hd_level_byte(lv4, k); }
int      h_level(int bits, int q) { return mcn_hd_level(bits, q); }
float    h_combine(float d, int s, int sumi, float dy) { return mcn_hd_combine_q8_1(d, s, sumi, dy); }

// codes of nblocks blocks four at a time (mcn_hd_codes4) and one at a time (mcn_hd_code)
void h_codes(int bits, const uint8_t * x, int nblocks, uint8_t * q1, uint8_t * q4) {
    const int bb = MCN_HD_BLOCK_BYTES(bits);
    for (int ib = 0; ib < nblocks; ++ib) {
        for (int n = 0; n < MCN_HD_QK; ++n) {
            q1[ib*MCN_HD_QK + n] = (uint8_t) mcn_hd_code(bits, x + ib*bb, n);
        }
        for (int n0 = 0; n0 < MCN_HD_QK; n0 += 4) {
            const uint32_t v = mcn_hd_codes4(bits, x + ib*bb, n0);
            for (int k = 0; k < 4; ++k) {
                q4[ib*MCN_HD_QK + n0 + k] = (uint8_t) (v >> 8*k);
            }
        }
    }
}

// dequantization as mcn.cu's kernels do it (4 weights per step: codes4 -> levels4 -> value) and as the
// CPU reference does it (mcn_hd_dequant_block)
void h_dequant(int bits, const uint8_t * x, int nblocks, float * y4, float * y1) {
    const int bb = MCN_HD_BLOCK_BYTES(bits);
    for (int ib = 0; ib < nblocks; ++ib) {
        const uint8_t * blk = x + ib*bb;
        const float d = mcn_hd_block_d(blk);
        for (int n0 = 0; n0 < MCN_HD_QK; n0 += 4) {
            const int      s  = mcn_hd_scale(blk, n0 >> 5);
            const uint32_t lv = mcn_hd_levels4(bits, mcn_hd_codes4(bits, blk, n0));
            for (int k = 0; k < 4; ++k) {
                y4[ib*MCN_HD_QK + n0 + k] = mcn_hd_value(d, s, mcn_hd_level_byte(lv, k));
            }
        }
        mcn_hd_dequant_block(bits, blk, y1 + ib*MCN_HD_QK);
    }
}

// per sub-block: the dp4a integer dot, the scalar one (mcn_hd_dot32), the float dot against Q8_1; per
// block the scalar mcn_hd_block_isum
void h_dots(int bits, const uint8_t * x, int nblocks, const int8_t * qy, const float * dy,
            int * idp4a, int * iscalar, float * fsub, int * iblk) {
    const int bb = MCN_HD_BLOCK_BYTES(bits);
    for (int ib = 0; ib < nblocks; ++ib) {
        const uint8_t * blk = x + ib*bb;
        for (int j = 0; j < MCN_HD_NSUB; ++j) {
            const int8_t * y = qy + ib*MCN_HD_QK + j*MCN_HD_SUB;
            idp4a[ib*8 + j]   = mcn_hd_dot32_dp4a(bits, blk, j, y);
            iscalar[ib*8 + j] = mcn_hd_dot32(bits, blk, j, y);
            fsub[ib*8 + j]    = mcn_hd_dot32_q8_1(bits, blk, j, y, dy[ib*8 + j]);
        }
        iblk[ib] = mcn_hd_block_isum(bits, blk, qy + ib*MCN_HD_QK);
    }
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    d = tmp_path_factory.mktemp("mcn_hd")
    src = d / "shim.c"
    src.write_text(SHIM)
    so = d / "libshim.so"
    flags = ["-O2", "-Wall", "-Wextra", "-Werror", "-I", str(HEADER_DIR)]
    subprocess.run(["gcc", "-std=c11", "-shared", "-fPIC", *flags, str(src), "-o", str(so)], check=True)
    if shutil.which("g++"):   # the header must also be valid C++ (nvcc's host pass)
        subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-x", "c++", *flags, str(src)], check=True)
    L = ctypes.CDLL(str(so))
    P, U32 = ctypes.c_void_p, ctypes.c_uint32
    L.h_le32_a2.restype = L.h_byte_perm.restype = L.h_levels4.restype = U32
    L.h_le32_a2.argtypes = [P]
    L.h_byte_perm.argtypes = [U32, U32, U32]
    L.h_levels4.argtypes = [ctypes.c_int, U32]
    L.h_level_byte.argtypes = [U32, ctypes.c_int]
    L.h_level.argtypes = [ctypes.c_int, ctypes.c_int]
    L.h_combine.restype = ctypes.c_float
    L.h_combine.argtypes = [ctypes.c_float, ctypes.c_int, ctypes.c_int, ctypes.c_float]
    L.h_codes.argtypes = [ctypes.c_int, P, ctypes.c_int, P, P]
    L.h_dequant.argtypes = [ctypes.c_int, P, ctypes.c_int, P, P]
    L.h_dots.argtypes = [ctypes.c_int, P, ctypes.c_int, P, P, P, P, P, P]
    return L


def ptr(a: np.ndarray):
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


def random_blocks(bits: int, nblocks: int, seed: int, special: bool = True):
    """Packed blocks (one row) with random codes, scales and fp16 d: normal, subnormal, zero, extreme d,
    s = 0 and 15, every code at every position pattern."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** bits, size=(1, nblocks * 256))
    s = rng.integers(0, 16, size=(1, nblocks * 8))
    d = np.abs(rng.standard_normal((1, nblocks)) * 0.01).astype(np.float16).astype(np.float32)
    if special and nblocks >= 6:
        d[0, 0] = 0.0                                          # d = 0
        d[0, 1] = 2.0 ** -24                                   # fp16 subnormal
        d[0, 2] = 65504.0                                      # fp16 max: s*T*d overflows fp16, not fp32
        s[0, 16:24] = 15                                       # largest scales
        s[0, 24:32] = 0                                        # zero scales, live codes
        q[0, 768:1024] = np.arange(256) % 2 ** bits            # every code, every position pattern
        q[0, 1024:1280] = 2 ** bits - 1                        # all codes at the maximum (high bits all set)
    q, s = q.astype(np.uint8), s.astype(np.uint8)
    return F.mcn_pack(q, d, s, bits).reshape(-1), q.reshape(-1), d.reshape(-1), s.reshape(-1)


@pytest.mark.parametrize("bits", BITS)
def test_block_bytes_and_levels(lib, bits):
    assert lib.h_block_bytes(bits) == F.mcn_spec(bits).block_bytes
    levels = F.MCN_LEVELS[bits]
    assert [lib.h_level(bits, q) for q in range(2 ** bits)] == list(levels)
    # every 4-tuple of codes (2 bits: all 256; 3 bits: all 4096) -> the four int8 levels
    for codes in np.ndindex(*(2 ** bits,) * 4):
        q4 = sum(c << 8 * k for k, c in enumerate(codes))
        lv = lib.h_levels4(bits, q4)
        assert [lib.h_level_byte(lv, k) for k in range(4)] == [levels[c] for c in codes]
        assert lv.to_bytes(4, "little") == np.array([levels[c] for c in codes], np.int8).tobytes()


def test_byte_perm_emulation(lib):
    """__byte_perm(x, y, s) for nibbles 0..7: byte k <- byte s_k of the little-endian y:x."""
    rng = np.random.default_rng(1)
    for _ in range(500):
        x, y = (int(v) for v in rng.integers(0, 2 ** 32, 2, dtype=np.uint64))
        sel = rng.integers(0, 8, 4)
        s = int(sum(int(c) << 4 * k for k, c in enumerate(sel)))
        src = x.to_bytes(4, "little") + y.to_bytes(4, "little")
        assert lib.h_byte_perm(x, y, s).to_bytes(4, "little") == bytes(src[c] for c in sel)


def test_le32_a2(lib):
    buf = np.arange(64, dtype=np.uint8) * 7
    for off in range(0, 60, 2):
        assert lib.h_le32_a2(ptr(buf[off:off + 4].copy())) == int.from_bytes(bytes(buf[off:off + 4]), "little")


@pytest.mark.parametrize("bits", BITS)
def test_codes4(lib, bits):
    nb = 16
    x, q, d, s = random_blocks(bits, nb, seed=bits)
    q1 = np.zeros(nb * 256, np.uint8)
    q4 = np.zeros(nb * 256, np.uint8)
    lib.h_codes(bits, ptr(x), nb, ptr(q1), ptr(q4))
    qu, du, su = F.mcn_unpack(x, bits, nb * 256)
    assert np.array_equal(qu.reshape(-1), q)
    assert np.array_equal(q1, q), "mcn_hd_code"
    assert np.array_equal(q4, q), "mcn_hd_codes4"


@pytest.mark.parametrize("bits", BITS)
def test_dequant_bit_exact(lib, bits):
    nb = 64
    x, q, d, s = random_blocks(bits, nb, seed=10 + bits)
    y4 = np.zeros(nb * 256, np.float32)
    y1 = np.zeros(nb * 256, np.float32)
    lib.h_dequant(bits, ptr(x), nb, ptr(y4), ptr(y1))
    want = F.mcn_values(q.reshape(1, -1), d.reshape(1, -1), s.reshape(1, -1), bits).reshape(-1).astype(np.float32)
    assert np.array_equal(F.mcn_dequantize(x, bits, nb * 256).reshape(-1).view(np.uint32), want.view(np.uint32))
    assert np.array_equal(y4.view(np.uint32), want.view(np.uint32)), "codes4 -> levels4 -> mcn_hd_value"
    assert np.array_equal(y1.view(np.uint32), want.view(np.uint32)), "mcn_hd_dequant_block"
    # the once-rounded exact value (float64 of d * (s * T[q]), the integer first: s = 0 gives +0.0)
    t = np.array(F.MCN_LEVELS[bits], np.int64)
    exact = (d.astype(np.float64).repeat(256) * (s.astype(np.int64).repeat(32) * t[q])).astype(np.float32)
    assert np.array_equal(y4.view(np.uint32), exact.view(np.uint32))


@pytest.mark.parametrize("bits", BITS)
def test_dots_q8_1(lib, bits):
    nb = 32
    x, q, d, s = random_blocks(bits, nb, seed=20 + bits)
    rng = np.random.default_rng(bits)
    qy = rng.integers(-127, 128, size=nb * 256).astype(np.int8)
    qy[:32] = 127                                              # saturated activations
    qy[32:64] = -127
    qy[2048:2304] = -127                                       # block 8 ...
    dy = (np.abs(rng.standard_normal(nb * 8)) * 0.01 + 1e-4).astype(np.float16).astype(np.float32)
    idp4a = np.zeros(nb * 8, np.int32)
    iscalar = np.zeros(nb * 8, np.int32)
    fsub = np.zeros(nb * 8, np.float32)
    iblk = np.zeros(nb, np.int32)
    lib.h_dots(bits, ptr(x), nb, ptr(qy), ptr(dy), ptr(idp4a), ptr(iscalar), ptr(fsub), ptr(iblk))

    t = np.array(F.MCN_LEVELS[bits], np.int64)
    want_i = (t[q] * qy.astype(np.int64)).reshape(-1, 32).sum(1)
    assert np.array_equal(idp4a, want_i), "mcn_hd_dot32_dp4a (integer, exact)"
    assert np.array_equal(iscalar, want_i), "mcn_hd_dot32"
    assert np.array_equal(iblk, (s.astype(np.int64) * want_i).reshape(nb, 8).sum(1)), "mcn_hd_block_isum"
    d8 = d.astype(np.float64).repeat(8)
    want_sub = d8 * dy * (s.astype(np.int64) * want_i)
    assert np.all(np.abs(fsub - want_sub) <= 3 * 2.0 ** -24 * np.abs(want_sub)), "mcn_hd_dot32_q8_1"
    # and the dot the activations stand for: sum_n w_n * dy*qy_n, w the dequantized weights
    w = F.mcn_dequantize(x, bits, nb * 256).reshape(-1).astype(np.float64)
    direct = (w * np.repeat(dy, 32) * qy).reshape(-1, 32).sum(1)
    assert np.all(np.abs(fsub - direct) <= 1e-6 * np.abs(direct) + 1e-30)


def test_combine(lib):
    rng = np.random.default_rng(3)
    for _ in range(200):
        d = np.float32(np.float16(abs(rng.standard_normal()) * 0.01))
        dy = np.float32(np.float16(abs(rng.standard_normal()) * 0.01))
        sv = int(rng.integers(0, 16))
        sumi = int(rng.integers(-150000, 150000))
        want = np.float32(np.float32(d * dy) * np.float32(sv * sumi))
        assert lib.h_combine(float(d), sv, sumi, float(dy)) == want


def test_comparison_detects_a_wrong_layout(lib):
    """The checks above can fail: mcn3 blocks whose high plane is bit-reversed decode differently."""
    x, q, d, s = random_blocks(3, 4, seed=99, special=False)
    bad = x.reshape(4, -1).copy()
    hbits = np.unpackbits(bad[:, 70:102], axis=1, bitorder="little").reshape(4, 32, 8)
    bad[:, 70:102] = np.packbits(hbits[..., ::-1].reshape(4, -1), axis=1, bitorder="little")
    y4 = np.zeros(4 * 256, np.float32)
    y1 = np.zeros(4 * 256, np.float32)
    lib.h_dequant(3, ptr(np.ascontiguousarray(bad.reshape(-1))), 4, ptr(y4), ptr(y1))
    want = F.mcn_dequantize(x, 3, 4 * 256).reshape(-1)
    assert not np.array_equal(y4, want)
