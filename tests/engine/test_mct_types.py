"""The mct1 / mct2 / mct3 ggml types (issue 14: tail-biting trellis per 64 weights, 4-bit scales per 32, fp16 per
256) against trellis.py (their bit-exact Python twin) and against each other.

- C quantize (ggml_quantize_chunk with and without an imatrix, from_float_ref) == trellis.mct_quantize byte for
  byte, on Gaussian, heavy-tailed and degenerate rows (all zero, constant, one huge outlier, tiny values);
- the C Viterbi GPTQ calls (mct_tail_biting) == trellis.tail_biting in float64, ties included;
- C dequantize (to_float, CPU get_rows) == trellis.mct_dequantize bit for bit;
- CPU vec_dot: the SIMD kernel in use equals the scalar reference bit for bit, and both equal the float64 value of
  the same integer sums; mul_mat / mul_mat_id graphs (skipped ids give zeros); test-backend-ops (SIMD vs reference
  mode) passes for MUL_MAT, MUL_MAT_ID, GET_ROWS.
"""
from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest
import torch

from mcmoe_gguf.base import ggml as base_ggml
from mcmoe_gguf.quant import formats as F
from mcmoe_gguf.quant import trellis as TR
from ggml_harness import FROM_FLOAT, GGML_TYPE_F32, GGML_TYPE_I32, QK_K, TO_FLOAT, Ggml, Graph, cpu_variants
from test_ggml_types import parse_q8_K
from test_mcn_types import rows_of

NAMES = ("mct1", "mct2", "mct3")
TID = {n: F.MCT_TYPES[n].type_id for n in NAMES}
BITS = {n: F.MCT_TYPES[n].bits for n in NAMES}


def _setup(g: Ggml) -> Ggml:
    for lib, fn in ((g.base, "mct_info"), (g.cpu, "mct_vec_dot")):
        if not hasattr(lib, fn):
            pytest.fail(f"{lib._name} has no {fn}(): a ggml without the mct types; rebuild the runtime (make runtime)")
    g.base.mct_info.restype = ctypes.c_char_p
    g.base.mct_tail_biting.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_void_p]
    g.base.mct_tail_biting.restype = ctypes.c_bool
    for fn in (g.cpu.mct_vec_dot, g.cpu.mct_vec_dot_ref):
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_float
    g.cpu.mct_cpu_simd.restype = ctypes.c_char_p
    return g


@pytest.fixture(scope="module")
def ggml():
    return _setup(Ggml())


@pytest.fixture(scope="module", params=cpu_variants())
def ggml_variant(request):
    return _setup(Ggml(request.param))


def c_quantize(g: Ggml, name: str, w: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    w = np.ascontiguousarray(w, np.float32)
    rows, n = w.shape
    out = np.zeros(rows * g.base.ggml_row_size(TID[name], n), np.uint8)
    imp = None if imp is None else np.ascontiguousarray(imp, np.float32)
    size = g.base.ggml_quantize_chunk(TID[name], w.ctypes.data, out.ctypes.data, 0, rows, n,
                                      None if imp is None else imp.ctypes.data)
    assert size == out.size
    return out.reshape(rows, -1)


def c_dequantize(g: Ggml, name: str, blob: np.ndarray, n: int) -> np.ndarray:
    blob = np.ascontiguousarray(blob, np.uint8)
    out = np.empty(blob.size // F.MCT_TYPES[name].block_bytes * QK_K, np.float32)
    TO_FLOAT(g.traits(TID[name]).to_float)(blob.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(-1, n)


def random_blob(name: str, rows: int, n: int, seed: int) -> np.ndarray:
    """Arbitrary codes and scales (every state and scale value occurs), finite fp16 d."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** BITS[name], (rows, n))
    s = rng.integers(0, 16, (rows, n // 32))
    d = (rng.standard_normal((rows, n // 256)) * 0.01).astype(np.float16).astype(np.float32)
    return TR.mct_pack(q, d, s, BITS[name])


def test_type_table(ggml):
    info = ggml.base.mct_info().decode()
    for name in NAMES:
        assert f"{name}:{TID[name]}" in info, info
        t = ggml.traits(TID[name])
        assert ggml.base.ggml_type_name(TID[name]).decode() == name
        assert t.blck_size == QK_K and t.type_size == F.MCT_TYPES[name].block_bytes
        assert base_ggml.Ggml().type_id(name) == TID[name]   # base/ggml.py learns the ids from mct_info
    assert [F.MCT_TYPES[n].bpw for n in NAMES] == [1.1875, 2.1875, 3.1875]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["gaussian", "heavy", "edge"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_c_quantize_equals_trellis(ggml, name, kind, with_imatrix):
    n = 512
    w = rows_of(kind, 6, n, seed=len(kind) + BITS[name])
    imp = None
    if with_imatrix:
        imp = (np.random.default_rng(3).gamma(0.5, 1.0, n)).astype(np.float32)
        imp[:40] = 0.0                                  # dead inputs: a slice whose importance sums to 0
    got = c_quantize(ggml, name, w, imp)
    want = TR.mct_quantize(w, BITS[name], imp)
    if not np.array_equal(got, want):
        bb = F.MCT_TYPES[name].block_bytes
        i = int(np.flatnonzero(got.reshape(-1) != want.reshape(-1))[0])
        pytest.fail(f"{int((got != want).sum())} bytes differ, first in block {i // bb} byte {i % bb}")
    if not with_imatrix:   # the type's from_float_ref is the same quantizer without importance
        ref = np.zeros_like(got)
        FROM_FLOAT(ggml.traits(TID[name]).from_float_ref)(np.ascontiguousarray(w).ctypes.data, ref.ctypes.data, w.size)
        assert np.array_equal(ref, got)
    deq = c_dequantize(ggml, name, got, n)
    assert np.array_equal(deq.view(np.uint32), TR.mct_dequantize(got, BITS[name], n).view(np.uint32))
    if kind == "edge":
        assert not deq[1, :256].any()                   # an all-zero block: d = 0
        assert deq[0, 300] == deq[0].max()              # the outlier stays its row's largest value
        if imp is None:                                 # a constant block keeps its sign on average
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


@pytest.mark.parametrize("name", NAMES)
def test_validate_rejects_inf_and_nan_scale(ggml, name):
    blob = c_quantize(ggml, name, rows_of("gaussian", 2, 512, seed=1), None)
    t = TID[name]
    assert ggml.base.ggml_validate_row_data(t, blob.ctypes.data, blob.size)
    bb = F.MCT_TYPES[name].block_bytes
    for bad in (0x7C00, 0xFE00):
        b = blob.copy()
        b[1, bb:bb + 2] = np.frombuffer(struct.pack("<H", bad), np.uint8)
        assert not ggml.base.ggml_validate_row_data(t, b.ctypes.data, b.size)


def kernel_sum(blob, name, n, qy):
    """float64 value of sum_blocks d d_y sum_j s_j sum V[state] q_y, and the sum of the absolute values of its
    slice terms."""
    q, d, s = TR.mct_unpack(blob, BITS[name], n)
    dy, qv, _ = parse_q8_K(qy)
    R, T, J = q.shape[0], qy.shape[0], n // 32
    iv = TR._integer_values(q, s, BITS[name]).reshape(R, J, 32)
    isum = np.einsum("rji,tji->rtj", iv, qv.reshape(T, J, 32).astype(np.int64))
    terms = np.repeat(d.astype(np.float64), 8, 1)[:, None, :] * np.repeat(dy, 8, 1)[None, :, :] * isum
    return terms.sum(-1), np.abs(terms).sum(-1)


def test_simd_kernel_is_in_use(ggml_variant):
    """Each CPU variant runs the mct kernel its instruction set allows (AVX-512 BW, AVX2, else the scalar twin)."""
    from mcmoe_gguf.engine.cpu_variant import FEATURES, VARIANTS, cpu_flags
    simd = ggml_variant.cpu.mct_cpu_simd().decode()
    if ggml_variant.variant is None:
        flags = cpu_flags()
        features = {f for f, (need, _) in FEATURES.items() if set(need) <= flags}
    else:
        features = set(VARIANTS[ggml_variant.variant])
    want = "avx512" if "AVX512" in features else "avx2" if "AVX2" in features else "scalar"
    assert simd == want, (ggml_variant.variant, simd)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [256, 768, 4096])
def test_vec_dot_simd_equals_scalar_and_float64(ggml_variant, name, n):
    g = ggml_variant
    rng = np.random.default_rng(n + BITS[name])
    x = np.concatenate([c_quantize(g, name, rows_of("edge", 6, n, seed=n), None), random_blob(name, 3, n, seed=n)])
    y = (rng.standard_normal((3, n)) * np.exp(rng.standard_normal((3, 1)))).astype(np.float32)
    y[0, :64] *= 30                                     # activation codes at the int8 limits
    qy = g.q8_K(y)
    want, abs_sum = kernel_sum(x, name, n, qy)
    for r in range(x.shape[0]):
        for t in range(qy.shape[0]):
            simd = g.cpu.mct_vec_dot(TID[name], n, x[r].ctypes.data, qy[t].ctypes.data)
            ref = g.cpu.mct_vec_dot_ref(TID[name], n, x[r].ctypes.data, qy[t].ctypes.data)
            assert struct.pack("<f", simd) == struct.pack("<f", ref), (r, t, simd, ref)
            assert abs(ref - want[r, t]) <= 1e-5 * abs_sum[r, t] + 1e-30, (r, t, ref, want[r, t])


@pytest.mark.parametrize("name", NAMES)
def test_get_rows_is_bit_exact(ggml, name):
    n, rows = 512, 6
    blob = random_blob(name, rows, n, seed=20)
    ids = np.array([5, 0, 3, 3, 1], np.int32)
    with Graph(ggml) as g:
        a = g.tensor(TID[name], n, rows, data=blob)
        out = g.compute(ggml.base.ggml_get_rows(g.ctx, a, g.tensor(GGML_TYPE_I32, len(ids), 1, data=ids)), (len(ids), n))
    want = TR.mct_dequantize(blob, BITS[name], n)[ids]
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 7])
def test_mul_mat(ggml, name, T):
    n, rows = 768, 24
    blob = random_blob(name, rows, n, seed=30 + T)
    y = np.random.default_rng(T).standard_normal((T, n)).astype(np.float32)
    with Graph(ggml) as g:
        a = g.tensor(TID[name], n, rows, data=blob)
        b = g.tensor(GGML_TYPE_F32, n, T, data=y)
        out = g.compute(ggml.base.ggml_mul_mat(g.ctx, a, b), (T, rows))
    want, abs_sum = kernel_sum(blob, name, n, ggml.q8_K(y))
    np.testing.assert_array_less(np.abs(out - want.T), 1e-5 * abs_sum.T + 1e-30)


@pytest.mark.parametrize("name", NAMES)
def test_mul_mat_id_with_skipped_ids(ggml, name):
    n, rows, n_exp, n_used, T = 256, 24, 4, 2, 5
    blobs = [random_blob(name, rows, n, seed=7 * e) for e in range(n_exp)]
    ids = np.array([[0, 3], [3, -1], [2, 0], [1, 1], [-1, 2]], np.int32)       # -1: a skipped slot (zeros)
    y = np.random.default_rng(5).standard_normal((T, n_used, n)).astype(np.float32)
    with Graph(ggml) as g:
        a = g.tensor(TID[name], n, rows, n_exp, data=np.stack(blobs))
        b = g.tensor(GGML_TYPE_F32, n, n_used, T, data=y)
        i = g.tensor(GGML_TYPE_I32, n_used, T, data=ids)
        out = g.compute(ggml.base.ggml_mul_mat_id(g.ctx, a, b, i), (T, n_used, rows))
    for t in range(T):
        for s in range(n_used):
            if ids[t, s] < 0:
                assert not out[t, s].any()
                continue
            want, abs_sum = kernel_sum(blobs[ids[t, s]], name, n, ggml.q8_K(y[t, s][None]))
            assert np.all(np.abs(out[t, s] - want[:, 0]) <= 1e-5 * abs_sum[:, 0] + 1e-30), (t, s)


def test_backend_ops_cpu_simd_vs_reference():
    """test-backend-ops on the CPU backend against its reference mode (the scalar mct vec_dot)."""
    from mcmoe_gguf.engine.runtime import run_tool
    for op in ("MUL_MAT", "MUL_MAT_ID", "GET_ROWS"):
        r = run_tool("test-backend-ops", "test", "-b", "CPU", "-o", op, "-p", "mct", capture_output=True, text=True,
                     timeout=900)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "FAIL" not in out, out[-3000:]
        passed = [ln for ln in out.splitlines() if "OK" in ln and "mct" in ln]
        for name in NAMES:
            assert any(name in ln for ln in passed), f"{op}: no passing {name} case\n{out[-3000:]}"
