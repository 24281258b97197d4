"""The decode helpers of cpp/ggml/mct-common.h (the mct trellis types) on the host, against the Python twin.

A small C shim is compiled with gcc (and the header checked as C++), loaded with ctypes, and compared with
mcmoe_gguf/quant/trellis.py: the hash table V, every weight's state, and the dequantization bit for bit; the
integer slice and block dots with a float64 reference; the four-at-a-time int8 levels of the CUDA kernels.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mcmoe_gguf.quant import trellis as T

REPO = Path(__file__).resolve().parents[2]
HEADER_DIR = REPO / "cpp" / "ggml"

SHIM = r"""
#include "mct-common.h"

int  h_block_bytes(int k) { return MCT_HD_BLOCK_BYTES(k); }
int  h_value_of_state(uint32_t s) { return mct_hd_value_of_state(s); }
void h_states(int k, const uint8_t * x, int nblocks, uint16_t * st) {
    for (int ib = 0; ib < nblocks; ++ib) {
        const uint8_t * blk = x + ib*MCT_HD_BLOCK_BYTES(k);
        for (int n = 0; n < MCT_HD_QK; ++n) {
            st[ib*MCT_HD_QK + n] = (uint16_t) mct_hd_state(k, blk + MCT_HD_OFF_QS + 8*k*(n >> 6), n & 63);
        }
    }
}
void h_dequant(int k, const uint8_t * x, int nblocks, float * y) {
    for (int ib = 0; ib < nblocks; ++ib) {
        mct_hd_dequant_block(k, x + ib*MCT_HD_BLOCK_BYTES(k), y + ib*MCT_HD_QK);
    }
}
void h_dots(int k, const uint8_t * x, int nblocks, const int8_t * qy, int * out) {
    for (int ib = 0; ib < nblocks; ++ib) {
        for (int j = 0; j < 8; ++j) {
            out[ib*8 + j] = mct_hd_dot32(k, x + ib*MCT_HD_BLOCK_BYTES(k), j, qy + ib*MCT_HD_QK + 32*j);
        }
    }
}
void h_levels4(int k, const uint8_t * x, int nblocks, uint32_t * lv) {
    for (int ib = 0; ib < nblocks; ++ib) {
        for (int n0 = 0; n0 < MCT_HD_QK; n0 += 4) {
            lv[(ib*MCT_HD_QK + n0)/4] = mct_hd_levels4(k, x + ib*MCT_HD_BLOCK_BYTES(k), n0);
        }
    }
}
int  h_block_isum(int k, const uint8_t * blk, const int8_t * qy) { return mct_hd_block_isum(k, blk, qy); }
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler (gcc) on PATH: the host tests of mct-common.h need one")
    d = tmp_path_factory.mktemp("mct_common")
    src = d / "shim.c"
    src.write_text(SHIM)
    so = d / "shim.so"
    subprocess.run([cc, "-std=c99", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-I", str(HEADER_DIR),
                    str(src), "-o", str(so)], check=True)
    cxx = shutil.which("g++")
    if cxx:
        subprocess.run([cxx, "-x", "c++", "-fsyntax-only", "-Wall", "-Werror", "-I", str(HEADER_DIR), str(src)],
                       check=True)
    lib = ctypes.CDLL(str(so))
    lib.h_value_of_state.argtypes = [ctypes.c_uint32]
    return lib


def _ptr(a, ct):
    return a.ctypes.data_as(ctypes.POINTER(ct))


def _random_blocks(k: int, nb: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << k, (1, 256 * nb)).astype(np.uint8)
    d = rng.uniform(-1e-2, 1e-2, (1, nb)).astype(np.float16).astype(np.float32)
    s = rng.integers(0, 16, (1, 8 * nb)).astype(np.uint8)
    return T.mct_pack(codes, d, s, k)


def test_hash_equals_the_table(lib):
    v = np.array([lib.h_value_of_state(s) for s in range(4096)])
    assert np.array_equal(v, T.mct_table())


@pytest.mark.parametrize("k", (1, 2, 3))
def test_states_and_dequantization_equal_the_python_twin(lib, k):
    nb = 4
    blob = _random_blocks(k, nb, k)
    assert lib.h_block_bytes(k) == T.mct_spec(k).block_bytes
    st = np.zeros(256 * nb, np.uint16)
    lib.h_states(k, _ptr(blob, ctypes.c_uint8), nb, _ptr(st, ctypes.c_uint16))
    q, _, _ = T.mct_unpack(blob, k, 256 * nb)
    assert np.array_equal(st, T.mct_states(q, k)[0])
    y = np.zeros(256 * nb, np.float32)
    lib.h_dequant(k, _ptr(blob, ctypes.c_uint8), nb, _ptr(y, ctypes.c_float))
    assert np.array_equal(y.view(np.uint32), T.mct_dequantize(blob, k, 256 * nb)[0].view(np.uint32))


@pytest.mark.parametrize("k", (1, 2, 3))
def test_slice_dot(lib, k):
    nb = 2
    blob = _random_blocks(k, nb, 10 + k)
    qy = np.random.default_rng(k).integers(-127, 128, 256 * nb).astype(np.int8)
    out = np.zeros(8 * nb, np.int32)
    lib.h_dots(k, _ptr(blob, ctypes.c_uint8), nb, _ptr(qy, ctypes.c_int8), _ptr(out, ctypes.c_int))
    q, _, _ = T.mct_unpack(blob, k, 256 * nb)
    v = T.mct_table()[T.mct_states(q, k)[0]].astype(np.float64)
    assert np.array_equal(out, (v * qy).reshape(-1, 32).sum(1).astype(np.int64))


@pytest.mark.parametrize("k", (1, 2, 3))
def test_levels4_and_block_isum(lib, k):
    """mct_hd_levels4 (the CUDA kernels' dp4a operand) holds V of four weights as int8 bytes, lowest first;
    mct_hd_block_isum (the CPU vec_dot's integer part) = sum_j s_j sum V q_y."""
    nb = 2
    blob = _random_blocks(k, nb, 20 + k)
    lv = np.zeros(64 * nb, np.uint32)
    lib.h_levels4(k, _ptr(blob, ctypes.c_uint8), nb, _ptr(lv, ctypes.c_uint32))
    q, _, s = T.mct_unpack(blob, k, 256 * nb)
    v = T.mct_table()[T.mct_states(q, k)[0]]
    assert np.array_equal(lv.view(np.int8), v)
    qy = np.random.default_rng(k).integers(-128, 128, 256).astype(np.int8)
    bb = T.mct_spec(k).block_bytes
    for ib in range(nb):
        got = lib.h_block_isum(k, _ptr(blob[0, ib * bb:], ctypes.c_uint8), _ptr(qy, ctypes.c_int8))
        want = (np.repeat(s[0, 8 * ib:8 * ib + 8].astype(np.int64), 32) * v[256 * ib:256 * (ib + 1)] * qy).sum()
        assert got == want
