"""The mcq1..mcq4 ggml types of the patched runtime, against formats.py and against each other.

- C quantize (ggml_quantize_chunk / from_float_ref, and mcq_quantize_row with either fit) == formats.quantize
  byte for byte; C dequantize (type traits to_float, CPU get_rows) == formats.dequantize bit for bit;
- CPU vec_dot: the SIMD kernel (AVX2 here) and the scalar reference agree within float rounding, and both
  equal a float64 evaluation of the same sum; mul_mat / mul_mat_id / get_rows graphs on the CPU backend;
- the type table has no hole (ids 43..99 are named placeholders) and GGUF files with unknown or
  placeholder type ids are refused with an error (ValueError from llama-cpp-python), not a crash;
- llama-quantize F16 -> MCQ1..MCQ4 on a tiny random Mixtral, and the result runs in llama-cpp-python.

The libraries are those llama-cpp-python loads ($LLAMA_CPP_LIB_PATH or the installed wheel's lib/), opened
with ctypes. A library without the types (stock or stale build) fails these tests with the command to fix it.
"""
from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import random_state, save_checkpoint, small_config
from mcmoe_gguf.quant import formats as F
from ggml_harness import (BITS, GGML_TYPE_F32, GGML_TYPE_I32, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K,  # noqa: F401
                          GGML_TYPE_Q8_K, KINDS, Q8_K_BYTES, QK_K, TYPE_ID, Ggml, Graph, cpu_variants,
                          weights)

@pytest.fixture(scope="module")
def ggml():
    return Ggml()


@pytest.fixture(scope="module", params=cpu_variants())
def ggml_variant(request):
    """Ggml on each CPU backend variant this machine can run."""
    return Ggml(request.param)


def _needs_avx2_torch() -> bool:
    # formats._fit_mse sums with torch; its order for 128 floats is that of 8-lane vectors (DEFAULT / AVX2
    # capability, which mcq.c reproduces). torch's AVX-512 kernels use 16 lanes: run formats.py under AVX2 there.
    return "AVX512" in torch.backends.cpu.get_cpu_capability().upper()


def formats_quantize(w: np.ndarray, bits: int, method: str, tmp_path: Path) -> np.ndarray:
    if method == "minmax" or not _needs_avx2_torch():
        return F.quantize(torch.from_numpy(w), bits, method)
    np.save(tmp_path / "w.npy", w)
    code = ("import sys, numpy as np, torch; from mcmoe_gguf.quant import formats as F\n"
            "w = np.load(sys.argv[1]); np.save(sys.argv[2], F.quantize(torch.from_numpy(w), int(sys.argv[3]), sys.argv[4]))")
    subprocess.run([sys.executable, "-c", code, tmp_path / "w.npy", tmp_path / "q.npy", str(bits), method], check=True,
                   env=dict(os.environ, ATEN_CPU_CAPABILITY="avx2"))
    return np.load(tmp_path / "q.npy")


def _first_difference(a: np.ndarray, b: np.ndarray, bits: int) -> str:
    bb = F.block_bytes(bits)
    i = int(np.flatnonzero(a.reshape(-1) != b.reshape(-1))[0])
    blk = i // bb
    return (f"{int((a.reshape(-1) != b.reshape(-1)).sum())} bytes differ; first at byte {i % bb} of block {blk}: "
            f"C {a.reshape(-1)[blk * bb:(blk + 1) * bb].tobytes().hex()} vs Python "
            f"{b.reshape(-1)[blk * bb:(blk + 1) * bb].tobytes().hex()}")


# ---------------------------------------------------------------- the type table

def test_type_table(ggml):
    info = ggml.base.mcq_info().decode()
    assert "mcq1:100" in info and "mcq4:103" in info, info
    for t in range(104):   # GGML_TYPE_COUNT: no NULL name anywhere (loops over all types print them)
        assert ggml.base.ggml_type_name(t), f"type {t} has no name"
    for t in range(43, 100):
        tr = ggml.traits(t)
        assert tr.blck_size == 0 and tr.type_size == 0 and not tr.is_quantized, t
        assert b"UNUSED" in tr.type_name
    for bits in BITS:
        t = TYPE_ID[bits]
        tr = ggml.traits(t)
        assert tr.type_name.decode() == F.TYPES[bits].name
        assert (tr.blck_size, tr.type_size, tr.is_quantized) == (128, F.block_bytes(bits), True)
        assert tr.to_float and tr.from_float_ref
        assert ggml.base.ggml_row_size(t, 14336) == 14336 // 128 * F.block_bytes(bits)
        assert not ggml.base.ggml_quantize_requires_imatrix(t)
        ct = ggml.cpu.ggml_get_type_traits_cpu(t).contents
        assert ct.vec_dot and ct.from_float and ct.vec_dot_type == GGML_TYPE_Q8_K and ct.nrows == 1


# ---------------------------------------------------------------- quantize / dequantize == formats.py

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_mse_matches_formats(ggml, bits, kind, tmp_path):
    """ggml_quantize_chunk (what llama-quantize calls) and from_float_ref == formats.quantize(w, bits) ("mse")."""
    w = weights(kind, 64, 2048, seed=bits)
    want = formats_quantize(w, bits, "mse", tmp_path)
    got = ggml.quantize_chunk(bits, w)
    assert np.array_equal(got, want), _first_difference(got, want, bits)
    assert np.array_equal(ggml.from_float_ref(bits, w), want)
    assert np.array_equal(ggml.quantize_row(bits, w, "mse"), want)
    assert ggml.base.ggml_validate_row_data(TYPE_ID[bits], got.ctypes.data, got.size)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_minmax_matches_formats(ggml, bits, kind, tmp_path):
    w = weights(kind, 64, 2048, seed=10 + bits)
    want = formats_quantize(w, bits, "minmax", tmp_path)
    got = ggml.quantize_row(bits, w, "minmax")
    assert np.array_equal(got, want), _first_difference(got, want, bits)


def test_mse_differs_from_minmax(ggml):
    """The two fits are really two code paths (a test of the test: mse is not minmax under another name)."""
    w = weights("heavy", 8, 1024, seed=3)
    assert not np.array_equal(ggml.quantize_row(2, w, "mse"), ggml.quantize_row(2, w, "minmax"))


def random_blocks(bits: int, rows: int, n: int, seed: int) -> np.ndarray:
    """Random codes with random finite fp16 d and m (subnormals, negative d and zeros included)."""
    rng = np.random.default_rng(seed)
    blob = rng.integers(0, 256, (rows, n // 128, F.block_bytes(bits)), dtype=np.uint8)
    h = rng.integers(0, 1 << 16, (rows, n // 128, 2), dtype=np.uint16)
    h[(h & 0x7C00) == 0x7C00] &= 0xBFFF            # no inf / nan: clear the top exponent bit there
    flat = h.reshape(-1, 2)
    flat[0] = (0x0000, 0x8000)                     # d = 0, m = -0
    flat[1 % len(flat)] = (0x0001, 0x8001)         # smallest subnormals
    flat[-1] = (0x7BFF, 0xFBFF)                    # +-65504
    blob[..., :4] = h.astype("<u2").view(np.uint8).reshape(rows, n // 128, 4)
    return blob.reshape(rows, -1)


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_bit_exact(ggml, bits):
    n = 1024
    blob = random_blocks(bits, 32, n, seed=bits)
    got = ggml.to_float(bits, blob, n)
    want = F.dequantize(blob, bits, n)
    assert got.dtype == want.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # and both are m + d*q rounded once from the exact value (float64 holds it exactly)
    q, d, m = F.unpack(blob, bits, n)
    exact = (np.repeat(m, 128, 1).astype(np.float64) + np.repeat(d, 128, 1).astype(np.float64) * q).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), exact.view(np.uint32))


@pytest.mark.parametrize("bits", BITS)
def test_validate_rejects_inf_and_nan_params(ggml, bits):
    blob = random_blocks(bits, 2, 256, seed=7)
    t = TYPE_ID[bits]
    assert ggml.base.ggml_validate_row_data(t, blob.ctypes.data, blob.size)
    for bad in (0x7C00, 0xFE00):              # inf, nan
        for field in (0, 2):                  # d, m
            b = blob.copy()
            b[1, F.block_bytes(bits) + field:F.block_bytes(bits) + field + 2] = np.frombuffer(struct.pack("<H", bad), np.uint8)
            assert not ggml.base.ggml_validate_row_data(t, b.ctypes.data, b.size)
    assert not ggml.base.ggml_validate_row_data(t, blob.ctypes.data, blob.size - 1)   # not whole blocks


# ---------------------------------------------------------------- vec_dot, mul_mat, mul_mat_id, get_rows

def parse_q8_K(qy: np.ndarray):
    """Q8_K bytes [T, nb*292] -> (d [T, nb], q int8 [T, nb*256], bsums int16 [T, nb, 16])."""
    T = qy.shape[0]
    b = np.ascontiguousarray(qy).reshape(T, -1, Q8_K_BYTES)
    d = np.ascontiguousarray(b[..., 0:4]).view("<f4")[..., 0].astype(np.float64)
    q = np.ascontiguousarray(b[..., 4:4 + QK_K]).view(np.int8).reshape(T, -1).astype(np.int64)
    bsums = np.ascontiguousarray(b[..., 4 + QK_K:]).view("<i2").astype(np.int64)
    assert np.array_equal(bsums.reshape(T, -1), q.reshape(T, -1, 16).sum(-1)), "Q8_K bsums != sums of 16 codes"
    return d, q, bsums


def kernel_sum(blob: np.ndarray, bits: int, n: int, qy: np.ndarray):
    """float64 value of what the kernels compute, out[r, t] = sum over blocks b of 128 of
    d_b d_y * sum(q q_y) + m_b d_y * sum(q_y) (d_y: the Q8_K scale of the 256 holding b), and the sum of the
    absolute values of those terms."""
    q, d, m = F.unpack(blob, bits, n)
    dy, qv, _ = parse_q8_K(qy)
    R, T, J = q.shape[0], qy.shape[0], n // 128
    S = np.einsum("rji,tji->rtj", q.astype(np.int64).reshape(R, J, 128), qv.reshape(T, J, 128))
    dyj = np.repeat(dy, 2, 1)                                    # [T, J]: one Q8_K scale per two mcq blocks
    sy = qv.reshape(T, J, 128).sum(-1) * dyj                     # [T, J]
    t1 = d.astype(np.float64)[:, None, :] * dyj[None, :, :] * S  # [R, T, J]
    t2 = m.astype(np.float64)[:, None, :] * sy[None, :, :]
    return (t1 + t2).sum(-1), (np.abs(t1) + np.abs(t2)).sum(-1)


def dequant_dot(blob, bits, n, qy):
    """float64 dot of formats.dequantize(x) with the dequantized Q8_K activations."""
    dy, qv, _ = parse_q8_K(qy)
    y = np.repeat(dy, QK_K, 1) * qv
    return F.dequantize(blob, bits, n).astype(np.float64) @ y.T


def expected_simd(features: set[str]) -> str:
    """The mcq kernel a CPU backend compiled with these ggml features runs (mcq-cpu.c's selection)."""
    if not {"AVX2", "F16C"} <= features:
        return "scalar"
    if {"AVX512", "AVX512_VNNI"} <= features:
        return "avx512-vnni"
    return "avx2-vnni" if "AVX_VNNI" in features else "avx2"


def test_simd_kernel_is_in_use(ggml_variant):
    """Each variant runs the mcq kernel its instruction set allows: AVX-512 VNNI, AVX2 with or without
    AVX-VNNI, the scalar twin elsewhere."""
    from mcmoe_gguf.engine.cpu_variant import FEATURES, VARIANTS, cpu_flags
    simd = ggml_variant.cpu.mcq_cpu_simd().decode()
    if ggml_variant.variant is None:    # a native (non-DL) build: follows this machine's flags
        flags = cpu_flags()
        features = {f for f, (need, _) in FEATURES.items() if set(need) <= flags}
    else:
        features = set(VARIANTS[ggml_variant.variant])
    assert simd == expected_simd(features), (ggml_variant.variant, simd)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [256, 768, 4096, 14336])
def test_vec_dot_simd_vs_scalar_vs_float64(ggml_variant, bits, n):
    ggml = ggml_variant
    rng = np.random.default_rng(n + bits)
    x = ggml.quantize_row(bits, weights("heavy", 4, n, seed=n), "minmax")
    x = np.concatenate([x, random_blocks(bits, 2, n, seed=n)])      # arbitrary d, m and codes too
    y = (rng.standard_normal((3, n)) * np.exp(rng.standard_normal((3, 1)))).astype(np.float32)
    y[0, :64] *= 30                                                  # an activation outlier
    qy = ggml.q8_K(y)
    want, abs_sum = kernel_sum(x, bits, n, qy)
    plain = dequant_dot(x, bits, n, qy)
    for r in range(x.shape[0]):
        for t in range(qy.shape[0]):
            simd = ggml.cpu.mcq_vec_dot(TYPE_ID[bits], n, x[r].ctypes.data, qy[t].ctypes.data)
            ref = ggml.cpu.mcq_vec_dot_ref(TYPE_ID[bits], n, x[r].ctypes.data, qy[t].ctypes.data)
            tol = 1e-5 * abs_sum[r, t] + 1e-30
            assert abs(simd - ref) <= tol, (r, t, simd, ref, tol)
            assert abs(simd - want[r, t]) <= tol, (r, t, simd, want[r, t])
            assert abs(ref - want[r, t]) <= tol, (r, t, ref, want[r, t])
            # Q8_K's bsums are exact integer sums, so the m term is exact too: the kernels compute the plain
            # dot product of the dequantized weights and activations up to float rounding
            assert abs(simd - plain[r, t]) <= tol, (r, t, simd, plain[r, t])


def gemm_tile(c, fn, bits: int, n: int, x: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """out[c, r] = dot(row r of the mcq rows x, Q8_K column c of qy) by mcq_gemm_tile or its twin."""
    nr, nc = x.shape[0], qy.shape[0]
    out = np.full((nc, nr), np.nan, np.float32)
    ys = (ctypes.c_void_p * nc)(*[qy[i].ctypes.data for i in range(nc)])
    dsts = (ctypes.c_void_p * nc)(*[out[i].ctypes.data for i in range(nc)])
    ok = fn(TYPE_ID[bits], n, x.ctypes.data, x.shape[1], nr, ys, nc, dsts)
    assert ok is None or ok
    return out


@pytest.mark.parametrize("bits", BITS)
def test_tile_kernel_equals_its_scalar_twin(ggml_variant, bits):
    """Prompt batches go through tiles of up to 16 rows x 16 columns (mcq_gemm_tile: one SIMD lane per weight
    row, each block decoded and transposed once for all columns). Its plain C twin follows the same order of
    operations, so for every row and column count the two agree bit for bit; both equal the float64 value of
    the kernel arithmetic within float rounding. Rows include the degenerate blocks of `edge` (all zero,
    constant, saturated scale, one huge outlier); a single column takes the mat-vec kernel instead."""
    ggml = ggml_variant
    c = ggml.cpu
    n = 768
    rng = np.random.default_rng(40 + bits)
    rows = np.concatenate([ggml.quantize_row(bits, weights("edge", 4, n, seed=bits), "minmax"),
                           ggml.quantize_row(bits, weights("heavy", 12, n, seed=bits), "minmax")])
    qy_all = ggml.q8_K((rng.standard_normal((16, n)) * 2).astype(np.float32))
    have_tile = c.mcq_cpu_has_tile(TYPE_ID[bits])
    assert have_tile == (ggml.cpu.mcq_cpu_simd().decode() != "scalar")
    for nr, nc in [(16, 16), (16, 13), (9, 8), (8, 5), (5, 3), (1, 2), (16, 1), (3, 1)]:
        x = np.ascontiguousarray(rows[:nr])
        qy = np.ascontiguousarray(qy_all[:nc])
        twin = gemm_tile(c, c.mcq_gemm_tile_ref, bits, n, x, qy)
        want, abs_sum = kernel_sum(x, bits, n, qy)
        assert np.all(np.abs(twin - want.T) <= 1e-5 * abs_sum.T + 1e-30), (nr, nc)
        if not have_tile:
            out = np.zeros((nc, nr), np.float32)
            ys = (ctypes.c_void_p * nc)(*[qy[i].ctypes.data for i in range(nc)])
            dsts = (ctypes.c_void_p * nc)(*[out[i].ctypes.data for i in range(nc)])
            assert not c.mcq_gemm_tile(TYPE_ID[bits], n, x.ctypes.data, x.shape[1], nr, ys, nc, dsts)
            continue
        got = gemm_tile(c, c.mcq_gemm_tile, bits, n, x, qy)
        if nc == 1:   # the mat-vec kernel: other order of float additions
            assert np.all(np.abs(got - want.T) <= 1e-5 * abs_sum.T + 1e-30), (nr, nc)
        else:
            assert np.array_equal(got.view(np.uint32), twin.view(np.uint32)), (nr, nc, np.abs(got - twin).max())


@pytest.mark.parametrize("bits", BITS)
def test_get_rows_is_bit_exact(ggml, bits):
    n, rows = 512, 6
    blob = random_blocks(bits, rows, n, seed=20 + bits)
    ids = np.array([5, 0, 3, 3, 1], np.int32)
    with Graph(ggml) as g:
        a = g.tensor(TYPE_ID[bits], n, rows, data=blob)
        out = g.compute(ggml.base.ggml_get_rows(g.ctx, a, g.tensor(GGML_TYPE_I32, len(ids), 1, data=ids)), (len(ids), n))
    want = F.dequantize(blob, bits, n)[ids]
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("T", [1, 7])
def test_mul_mat(ggml, bits, T):
    n, rows = 768, 40
    w = weights("heavy", rows, n, seed=30 + bits)
    blob = ggml.quantize_chunk(bits, w)
    y = np.random.default_rng(T).standard_normal((T, n)).astype(np.float32)
    with Graph(ggml) as g:
        a = g.tensor(TYPE_ID[bits], n, rows, data=blob)
        b = g.tensor(GGML_TYPE_F32, n, T, data=y)
        out = g.compute(ggml.base.ggml_mul_mat(g.ctx, a, b), (T, rows))
    want, abs_sum = kernel_sum(blob, bits, n, ggml.q8_K(y))         # the CPU quantizes y to Q8_K the same way
    np.testing.assert_array_less(np.abs(out - want.T), 1e-5 * abs_sum.T + 1e-30)
    # and close to the float product with the dequantized weights (activation rounding only)
    full = y.astype(np.float64) @ F.dequantize(blob, bits, n).astype(np.float64).T
    assert np.abs(out - full).max() <= 0.02 * np.abs(full).max()


@pytest.mark.parametrize("bits", BITS)
def test_mul_mat_id(ggml, bits):
    n, rows, n_exp, n_used, T = 256, 24, 4, 2, 5
    blobs = [ggml.quantize_chunk(bits, weights("gaussian", rows, n, seed=100 * bits + e)) for e in range(n_exp)]
    ids = np.array([[0, 3], [3, 1], [2, 0], [1, 1], [3, 2]], np.int32)        # [T, n_used]; expert 1 twice
    y = np.random.default_rng(bits).standard_normal((T, n_used, n)).astype(np.float32)
    with Graph(ggml) as g:
        a = g.tensor(TYPE_ID[bits], n, rows, n_exp, data=np.stack(blobs))
        b = g.tensor(GGML_TYPE_F32, n, n_used, T, data=y)
        i = g.tensor(GGML_TYPE_I32, n_used, T, data=ids)
        out = g.compute(ggml.base.ggml_mul_mat_id(g.ctx, a, b, i), (T, n_used, rows))
    for t in range(T):
        for s in range(n_used):
            want, abs_sum = kernel_sum(blobs[ids[t, s]], bits, n, ggml.q8_K(y[t, s][None]))
            assert np.all(np.abs(out[t, s] - want[:, 0]) <= 1e-5 * abs_sum[:, 0] + 1e-30), (t, s)


def test_backend_ops_cpu_simd_vs_reference():
    """llama.cpp's test-backend-ops on the CPU backend: it compares the CPU backend with the CPU backend in
    reference mode, where the patch makes mul_mat / mul_mat_id use the scalar mcq vec_dot (stock ggml's
    reference mode changes nothing for quantized mul_mat, so on a CPU-only machine it would compare a kernel
    with itself). GET_ROWS and the copies go through to_float / from_float on both sides."""
    from mcmoe_gguf.engine.runtime import run_tool
    for op in ("MUL_MAT", "MUL_MAT_ID", "GET_ROWS", "CPY"):
        r = run_tool("test-backend-ops", "test", "-b", "CPU", "-o", op, "-p", "mcq", capture_output=True, text=True,
                     timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "FAIL" not in out, out[-3000:]
        passed = [ln for ln in out.splitlines() if "OK" in ln and "mcq" in ln]
        for bits in BITS:
            assert any(f"mcq{bits}" in ln for ln in passed), f"{op}: no passing mcq{bits} case\n{out[-3000:]}"


# ---------------------------------------------------------------- GGUF files with unknown type ids

def _gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def write_gguf_with_type(path: Path, type_id: int, ne0: int = 256, ne1: int = 2) -> Path:
    """A minimal GGUF v3: general.architecture plus one tensor of the given ggml type id."""
    kv = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
    info = _gguf_string("token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", ne0, ne1) + \
        struct.pack("<I", type_id) + struct.pack("<Q", 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv + info
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + b"\0" * 4096)
    return path


LOAD = """
import sys
import mcmoe_gguf
try:
    mcmoe_gguf.load(sys.argv[1], verbose=True)
except ValueError as e:
    print("REFUSED:", e)
    sys.exit(0)
print("LOADED")
sys.exit(3)
"""


@pytest.mark.parametrize("type_id", [43, 50, 99, 200, 4])
def test_gguf_with_unknown_type_is_refused(tmp_path, type_id):
    f = write_gguf_with_type(tmp_path / f"t{type_id}.gguf", type_id)
    r = subprocess.run([sys.executable, "-c", LOAD, str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "REFUSED" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-2000:]}"
    # gguf.cpp's own message: out of range, or a placeholder / removed id with block size 0
    assert ("invalid ggml type" in r.stderr) or ("block size (0)" in r.stderr), r.stderr[-2000:]


def test_gguf_with_mcq_type_header_is_read(tmp_path):
    """Control for the test above: the same file with a real mcq type gets past the tensor table (it then
    fails for lack of a model, not for its type)."""
    f = write_gguf_with_type(tmp_path / "ok.gguf", TYPE_ID[2])
    r = subprocess.run([sys.executable, "-c", LOAD, str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "REFUSED" in r.stdout
    assert "invalid ggml type" not in r.stderr and "block size" not in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------- llama-quantize F16 -> MCQn

def gguf_tensor_types(path: Path) -> dict[str, int]:
    """{tensor name: ggml type id} from a GGUF header (the gguf package refuses unknown type ids)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return data[pos - n:pos].decode()

    sizes = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(vt):
        if vt == 8:
            string()
        elif vt == 9:
            et, cnt = take("I"), take("Q")
            for _ in range(cnt):
                value(et)
        else:
            take(sizes[vt])

    assert data[:4] == b"GGUF"
    pos = 4
    _, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    for _ in range(n_kv):
        string()
        value(take("I"))
    out = {}
    for _ in range(n_tensors):
        name = string()
        nd = take("I")
        pos += 8 * nd
        out[name] = take("I")
        take("Q")
    return out


@pytest.fixture(scope="module")
def tiny_f16(small_tokenizer_dir, tmp_path_factory):
    from mcmoe_gguf.gguf.export import convert
    d = tmp_path_factory.mktemp("quantize")
    cfg = small_config(n_layers=2, hidden=256, ff=512, vocab=512)
    ck = save_checkpoint(d / "ckpt", cfg, random_state(cfg, seed=4), small_tokenizer_dir)
    return convert(ck, d / "tiny-f16.gguf", outtype="f16", progress=False)


RUN = """
import sys, numpy as np, mcmoe_gguf
llm = mcmoe_gguf.load(sys.argv[1], n_ctx=128, logits_all=True, verbose=False, seed=0)
toks = llm.tokenize(b"KING HENRY. Once more unto the breach, dear friends", add_bos=False)
llm.eval(toks)
np.save(sys.argv[2], np.array(llm.scores[:llm.n_tokens], dtype=np.float32))
text = llm("ROMEO.", max_tokens=8, temperature=0.0)["choices"][0]["text"]
print("GENERATED", len(text))
"""


def run_model(path: Path, tmp_path: Path) -> np.ndarray:
    out = tmp_path / (path.stem + ".npy")
    r = subprocess.run([sys.executable, "-c", RUN, str(path), str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "GENERATED" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    return np.load(out)


@pytest.mark.parametrize("bits", BITS)
def test_llama_quantize_f16_to_mcq_runs(tiny_f16, tmp_path, bits):
    from mcmoe_gguf.engine.runtime import run_tool
    out = tmp_path / f"tiny-mcq{bits}.gguf"
    r = run_tool("llama-quantize", tiny_f16, out, f"MCQ{bits}", "2", capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    types = gguf_tensor_types(out)
    t = TYPE_ID[bits]
    experts = [k for k in types if "_exps." in k]
    assert experts and all(types[k] == t for k in experts), {k: types[k] for k in experts}
    assert all(types[k] == t for k in types if k.endswith(("attn_q.weight", "attn_output.weight")))
    assert types["output.weight"] == GGML_TYPE_Q6_K
    assert types["token_embd.weight"] == (t if bits == 4 else GGML_TYPE_Q4_K)
    logits = run_model(out, tmp_path)
    assert logits.ndim == 2 and logits.shape[1] == 512 and np.isfinite(logits).all()
    ref = run_model(tiny_f16, tmp_path)
    corr = np.corrcoef(logits.reshape(-1), ref.reshape(-1))[0, 1]
    # round-to-nearest of random weights: the more bits, the closer to F16 (a broken kernel gives ~0)
    assert corr > {1: 0.6, 2: 0.8, 3: 0.9, 4: 0.95}[bits], corr   # measured: 0.88 / 0.94 / 0.976 / 0.985
