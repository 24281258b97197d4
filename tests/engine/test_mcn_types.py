"""The mcn2 / mcn3 ggml types (issue 14: Lloyd-Max table, 4-bit scales per 32, fp16 per 256) against
formats.py (their bit-exact Python twin) and against each other.

- C quantize (ggml_quantize_chunk with and without an imatrix, from_float_ref) == formats.mcn_quantize byte for
  byte, on Gaussian, heavy-tailed and degenerate rows (all zero, constant, one huge outlier, tiny values);
- C dequantize (to_float, CPU get_rows) == formats.mcn_dequantize bit for bit;
- CPU vec_dot: the kernel in use and the scalar reference equal the float64 value of the same integer sums;
  the prompt tile (mcn_gemm_tile, AVX-512 builds) equals its C twin bit for bit;
  mul_mat / mul_mat_id graphs; test-backend-ops (SIMD vs reference mode) passes for MUL_MAT, MUL_MAT_ID, GET_ROWS;
- formats: pack/unpack round trips, bad input refused;
- GPTQ into the table: bytes the runtime reads back exactly, and less output error than nearest rounding.
"""
from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest
import torch

from mcmoe_gguf.quant import formats as F
from ggml_harness import FROM_FLOAT, GGML_TYPE_F32, GGML_TYPE_I32, QK_K, TO_FLOAT, Ggml, Graph, cpu_variants
from test_ggml_types import parse_q8_K

NAMES = ("mcn2", "mcn3")
TID = {n: F.MCN_TYPES[n].type_id for n in NAMES}
BITS = {n: F.MCN_TYPES[n].bits for n in NAMES}


def _setup(g: Ggml) -> Ggml:
    for lib, fn in ((g.base, "mcn_info"), (g.cpu, "mcn_vec_dot")):
        if not hasattr(lib, fn):
            pytest.fail(f"{lib._name} has no {fn}(): a ggml without the mcn types; rebuild the runtime (make runtime)")
    g.base.mcn_info.restype = ctypes.c_char_p
    for fn in (g.cpu.mcn_vec_dot, g.cpu.mcn_vec_dot_ref):
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_float
    g.cpu.mcn_cpu_simd.restype = ctypes.c_char_p
    g.cpu.mcn_cpu_has_tile.restype = ctypes.c_bool
    g.cpu.mcn_gemm_tile.restype = ctypes.c_bool
    tile_args = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p,
                 ctypes.c_int, ctypes.c_void_p]
    g.cpu.mcn_gemm_tile.argtypes = g.cpu.mcn_gemm_tile_ref.argtypes = tile_args
    g.cpu.mcn_gemm_tile_ref.restype = None
    return g


@pytest.fixture(scope="module")
def ggml():
    return _setup(Ggml())


@pytest.fixture(scope="module", params=cpu_variants())
def ggml_variant(request):
    return _setup(Ggml(request.param))


def rows_of(kind: str, rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    if kind == "heavy":
        w = (rng.standard_t(2, (rows, n)) * 0.01).astype(np.float32)
    elif kind == "edge":
        b = w.reshape(rows, -1, 32)
        b[0, 0] = 0.0                                   # an all-zero slice in a live block
        w[1, :256] = 0.0                                # an all-zero block: d = 0
        w[2, :256] = -0.75                              # constant block
        w[3, :256] = rng.standard_normal(256) * 1e-7    # fp16-subnormal super-scale
        w[0, min(300, n - 5)] = 40.0                     # one huge outlier: its slice's scale dominates d
        b[4 % rows, 1] = np.linspace(-1, 1, 32)         # exact midpoints
        w[5 % rows, n - 256:] = rng.uniform(-60000, 60000, 256)  # d near the fp16 range
    return w


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
    out = np.empty(blob.size // F.MCN_TYPES[name].block_bytes * QK_K, np.float32)
    TO_FLOAT(g.traits(TID[name]).to_float)(blob.ctypes.data, out.ctypes.data, out.size)
    return out.reshape(-1, n)


def test_type_table(ggml):
    info = ggml.base.mcn_info().decode()
    for name in NAMES:
        assert f"{name}:{TID[name]}" in info, info
        t = ggml.traits(TID[name])
        assert ggml.base.ggml_type_name(TID[name]).decode() == name
        assert t.blck_size == QK_K and t.type_size == F.MCN_TYPES[name].block_bytes
    assert F.MCN_TYPES["mcn2"].bpw == 2.1875 and F.MCN_TYPES["mcn3"].bpw == 3.1875


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["gaussian", "heavy", "edge"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_c_quantize_equals_formats(ggml, name, kind, with_imatrix):
    n = 768
    w = rows_of(kind, 6, n, seed=len(kind) + BITS[name])
    imp = None
    if with_imatrix:
        imp = (np.random.default_rng(3).gamma(0.5, 1.0, n)).astype(np.float32)
        imp[:40] = 0.0                                  # dead inputs: a slice with zero weights
    got = c_quantize(ggml, name, w, imp)
    want = F.mcn_quantize(w, BITS[name], imp)
    if not np.array_equal(got, want):
        bb = F.MCN_TYPES[name].block_bytes
        i = int(np.flatnonzero(got.reshape(-1) != want.reshape(-1))[0])
        pytest.fail(f"{int((got != want).sum())} bytes differ, first in block {i // bb} byte {i % bb}")
    if not with_imatrix:   # the type's from_float_ref is the same quantizer without importance
        ref = np.zeros_like(got)
        FROM_FLOAT(ggml.traits(TID[name]).from_float_ref)(np.ascontiguousarray(w).ctypes.data, ref.ctypes.data, w.size)
        assert np.array_equal(ref, got)
    deq = c_dequantize(ggml, name, got, n)
    assert np.array_equal(deq.view(np.uint32), F.mcn_dequantize(got, BITS[name], n).view(np.uint32))
    # degenerate blocks come back as they should: zeros stay zeros, a constant block keeps its sign, the
    # outlier stays its row's largest value (clipped: the table has no zero level, so the slice's least-squares
    # scale trades the outlier's error against its 31 small neighbours')
    if kind == "edge":
        assert not deq[1, :256].any()
        live = slice(0, 256) if imp is None else slice(64, 256)      # imp[:40] = 0: those weights do not count
        assert np.all(deq[2, :256] < 0) and np.abs(deq[2, live] + 0.75).max() < 0.01 * 0.75
        assert deq[0, 300] == deq[0].max() and deq[0, 300] > 5.0


@pytest.mark.parametrize("name", NAMES)
def test_quantization_error_is_sane(ggml, name):
    """Gaussian rows: the quantizer is unbiased in the regression sense (sum x q = sum x^2 per block, to fp16
    rounding: no shrinking) and its relative MSE is below that of one global Lloyd-Max scale rescaled the same
    way (e / (1 - e) with e = 0.1175 / 0.0345): the per-32 scales adapt to each slice."""
    w = rows_of("gaussian", 64, 1024, seed=9)
    deq = F.mcn_dequantize(c_quantize(ggml, name, w, None), BITS[name], 1024)
    rel = float(((deq - w) ** 2).sum() / (w ** 2).sum())
    e = {"mcn2": 0.1175, "mcn3": 0.0345}[name]
    assert rel < e / (1 - e), rel
    beta = (deq.astype(np.float64) * w).reshape(-1, 256).sum(1) / (w.astype(np.float64) ** 2).reshape(-1, 256).sum(1)
    assert np.abs(beta - 1).max() < 2e-3, beta


@pytest.mark.parametrize("name", NAMES)
def test_validate_rejects_inf_and_nan_scale(ggml, name):
    blob = c_quantize(ggml, name, rows_of("gaussian", 2, 512, seed=1), None)
    t = TID[name]
    assert ggml.base.ggml_validate_row_data(t, blob.ctypes.data, blob.size)
    bb = F.MCN_TYPES[name].block_bytes
    for bad in (0x7C00, 0xFE00):
        b = blob.copy()
        b[1, bb:bb + 2] = np.frombuffer(struct.pack("<H", bad), np.uint8)
        assert not ggml.base.ggml_validate_row_data(t, b.ctypes.data, b.size)


def random_blob(name: str, rows: int, n: int, seed: int) -> np.ndarray:
    """Arbitrary codes and scales (every code and scale value occurs), finite fp16 d."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2 ** BITS[name], (rows, n))
    s = rng.integers(0, 16, (rows, n // 32))
    d = (rng.standard_normal((rows, n // 256)) * 0.01).astype(np.float16).astype(np.float32)
    return F.mcn_pack(q, d, s, BITS[name])


def kernel_sum(blob, name, n, qy):
    """float64 value of sum_blocks d d_y sum_j s_j sum T[q] q_y, and the sum of the absolute values of its
    sub-block terms d d_y s_j sum T[q] q_y (the kernels may add those in any order)."""
    q, d, s = F.mcn_unpack(blob, BITS[name], n)
    dy, qv, _ = parse_q8_K(qy)
    R, T, J = q.shape[0], qy.shape[0], n // 32
    tq = (np.array(F.MCN_LEVELS[BITS[name]], np.int64)[q] * np.repeat(s.astype(np.int64), 32, 1)).reshape(R, J, 32)
    isum = np.einsum("rji,tji->rtj", tq, qv.reshape(T, J, 32))                     # [R, T, sub-blocks]
    terms = np.repeat(d.astype(np.float64), 8, 1)[:, None, :] * np.repeat(dy, 8, 1)[None, :, :] * isum
    return terms.sum(-1), np.abs(terms).sum(-1)


def test_simd_kernel_is_in_use(ggml_variant):
    """Each CPU variant runs the mcn kernel its instruction set allows (AVX-512 BW + VNNI, AVX2, else the
    scalar twin)."""
    from mcmoe_gguf.engine.cpu_variant import FEATURES, VARIANTS, cpu_flags
    simd = ggml_variant.cpu.mcn_cpu_simd().decode()
    if ggml_variant.variant is None:
        flags = cpu_flags()
        features = {f for f, (need, _) in FEATURES.items() if set(need) <= flags}
    else:
        features = set(VARIANTS[ggml_variant.variant])
    want = "avx512-vnni" if {"AVX512", "AVX512_VNNI"} <= features else "avx2" if "AVX2" in features else "scalar"
    assert simd == want, (ggml_variant.variant, simd)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [256, 768, 4096, 14336])
def test_vec_dot_simd_vs_scalar_vs_float64(ggml_variant, name, n):
    g = ggml_variant
    rng = np.random.default_rng(n + BITS[name])
    x = np.concatenate([c_quantize(g, name, rows_of("edge", 6, n, seed=n), None), random_blob(name, 3, n, seed=n)])
    y = (rng.standard_normal((3, n)) * np.exp(rng.standard_normal((3, 1)))).astype(np.float32)
    y[0, :64] *= 30
    qy = g.q8_K(y)
    want, abs_sum = kernel_sum(x, name, n, qy)
    dyy, qv, _ = parse_q8_K(qy)
    plain = F.mcn_dequantize(x, BITS[name], n).astype(np.float64) @ (np.repeat(dyy, QK_K, 1) * qv).T
    for r in range(x.shape[0]):
        for t in range(qy.shape[0]):
            simd = g.cpu.mcn_vec_dot(TID[name], n, x[r].ctypes.data, qy[t].ctypes.data)
            ref = g.cpu.mcn_vec_dot_ref(TID[name], n, x[r].ctypes.data, qy[t].ctypes.data)
            tol = 1e-5 * abs_sum[r, t] + 1e-30
            assert abs(ref - want[r, t]) <= tol, (r, t, ref, want[r, t])
            assert abs(simd - want[r, t]) <= tol, (r, t, simd, want[r, t])
            assert abs(simd - plain[r, t]) <= tol, (r, t, simd, plain[r, t])


def gemm_tile(fn, name: str, n: int, x: np.ndarray, qy: np.ndarray) -> tuple[np.ndarray, bool]:
    """out[c, r] = dot(row r of the mcn rows x, Q8_K column c of qy) by mcn_gemm_tile or its twin (and its answer)."""
    nr, nc = x.shape[0], qy.shape[0]
    out = np.full((nc, nr), np.nan, np.float32)
    ys = (ctypes.c_void_p * nc)(*[qy[i].ctypes.data for i in range(nc)])
    dsts = (ctypes.c_void_p * nc)(*[out[i].ctypes.data for i in range(nc)])
    ok = fn(TID[name], n, x.ctypes.data, x.shape[1], nr, ys, nc, dsts)
    return out, ok is None or bool(ok)


@pytest.mark.parametrize("name", NAMES)
def test_tile_kernel_equals_its_scalar_twin(ggml_variant, name):
    """Prompt batches through an expert go through tiles of up to 16 rows x 16 tokens (mcn_gemm_tile: one SIMD
    lane per weight row, each block decoded and transposed once for all columns; AVX-512 VNNI builds). Its plain
    C twin follows the same order of operations, so for every row and column count the two agree bit for bit;
    both equal the float64 value of the kernel's integer sums within float rounding. Rows include the
    degenerate blocks of rows_of("edge") (all zero, constant, one huge outlier, subnormal scale); a single
    column takes the mat-vec kernel instead; builds without the tile decline and write nothing."""
    g = ggml_variant
    n = 768
    rng = np.random.default_rng(50 + BITS[name])
    rows = np.concatenate([c_quantize(g, name, rows_of("edge", 6, n, seed=7), None), random_blob(name, 10, n, seed=8)])
    y = (rng.standard_normal((16, n)) * np.exp(rng.standard_normal((16, 1)))).astype(np.float32)
    y[0, :64] *= 30                                    # codes at the int8 limits
    qy_all = g.q8_K(y)
    have = g.cpu.mcn_cpu_has_tile(TID[name])
    assert have == (g.cpu.mcn_cpu_simd().decode() == "avx512-vnni")
    for nr, nc in [(16, 16), (16, 13), (9, 8), (8, 5), (5, 3), (1, 2), (16, 1), (3, 1)]:
        x = np.ascontiguousarray(rows[:nr])
        qy = np.ascontiguousarray(qy_all[:nc])
        twin, _ = gemm_tile(g.cpu.mcn_gemm_tile_ref, name, n, x, qy)
        want, abs_sum = kernel_sum(x, name, n, qy)
        assert np.all(np.abs(twin - want.T) <= 1e-5 * abs_sum.T + 1e-30), (nr, nc)
        got, ok = gemm_tile(g.cpu.mcn_gemm_tile, name, n, x, qy)
        if not have:
            assert not ok and np.isnan(got).all()
            continue
        assert ok
        if nc == 1:   # the mat-vec kernel: another order of float additions
            assert np.all(np.abs(got - want.T) <= 1e-5 * abs_sum.T + 1e-30), (nr, nc)
        else:
            assert np.array_equal(got.view(np.uint32), twin.view(np.uint32)), (nr, nc, np.abs(got - twin).max())


@pytest.mark.parametrize("name", NAMES)
def test_get_rows_is_bit_exact(ggml, name):
    n, rows = 512, 6
    blob = random_blob(name, rows, n, seed=20)
    ids = np.array([5, 0, 3, 3, 1], np.int32)
    with Graph(ggml) as g:
        a = g.tensor(TID[name], n, rows, data=blob)
        out = g.compute(ggml.base.ggml_get_rows(g.ctx, a, g.tensor(GGML_TYPE_I32, len(ids), 1, data=ids)), (len(ids), n))
    want = F.mcn_dequantize(blob, BITS[name], n)[ids]
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 7])
def test_mul_mat(ggml, name, T):
    n, rows = 768, 40
    blob = c_quantize(ggml, name, rows_of("heavy", rows, n, seed=30), None)
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
    blobs = [c_quantize(ggml, name, rows_of("gaussian", rows, n, seed=7 * e), None) for e in range(n_exp)]
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
    """test-backend-ops on the CPU backend against its reference mode (the scalar mcn vec_dot)."""
    from mcmoe_gguf.engine.runtime import run_tool
    for op in ("MUL_MAT", "MUL_MAT_ID", "GET_ROWS"):
        r = run_tool("test-backend-ops", "test", "-b", "CPU", "-o", op, "-p", "mcn", capture_output=True, text=True,
                     timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "FAIL" not in out, out[-3000:]
        passed = [ln for ln in out.splitlines() if "OK" in ln and "mcn" in ln]
        for name in NAMES:
            assert any(name in ln for ln in passed), f"{op}: no passing {name} case\n{out[-3000:]}"


# ---------------------------------------------------------------- formats alone

@pytest.mark.parametrize("name", NAMES)
def test_pack_unpack_round_trip(name):
    rng = np.random.default_rng(1)
    q = rng.integers(0, 2 ** BITS[name], (3, 512))
    s = rng.integers(0, 16, (3, 16))
    d = rng.standard_normal((3, 2)).astype(np.float16).astype(np.float32)
    blob = F.mcn_pack(q, d, s, BITS[name])
    assert blob.shape == (3, 2 * F.MCN_TYPES[name].block_bytes)
    q2, d2, s2 = F.mcn_unpack(blob, BITS[name], 512)
    assert np.array_equal(q2, q) and np.array_equal(d2, d) and np.array_equal(s2, s)
    # the documented positions: weight 37 (sub-block 1, half 0) and, for mcn3, its high bit
    b = blob[0, :F.MCN_TYPES[name].block_bytes]
    assert (b[6 + 37 % 32] >> 2) & 3 == q[0, 37] & 3
    assert (b[2 + 1] & 15) == s[0, 1] and (b[2 + 1] >> 4) == s[0, 5]
    if BITS[name] == 3:
        assert (b[70 + 37 % 32] >> 1) & 1 == q[0, 37] >> 2


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        F.mcn_quantize(np.zeros((2, 128), np.float32), 2)
    with pytest.raises(ValueError, match="NaN"):
        F.mcn_quantize(np.full((1, 256), np.nan, np.float32), 2)
    with pytest.raises(ValueError, match="not an mcn type"):
        F.mcn_quantize(np.zeros((1, 256), np.float32), 4)
    with pytest.raises(ValueError, match="codes"):
        F.mcn_pack(np.full((1, 256), 4), np.zeros((1, 1), np.float32), np.zeros((1, 8)), 2)
    with pytest.raises(ValueError, match="fp16"):
        F.mcn_pack(np.zeros((1, 256)), np.full((1, 1), 0.1, np.float32), np.zeros((1, 8)), 2)
    with pytest.raises(ValueError, match="whole rows"):
        F.mcn_unpack(np.zeros(71, np.uint8), 2, 256)


# ---------------------------------------------------------------- GPTQ into the table

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("act_order, shrink", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_gptq_mcn_beats_nearest_and_reads_back_exactly(name, act_order, shrink):
    from mcmoe_gguf.quant.gptq import GPTQ
    torch.manual_seed(0)
    n, out = 512, 48
    mix = torch.randn(n, n) / n ** 0.5 + torch.eye(n)                  # correlated inputs, uneven scales
    x = (torch.randn(4096, n) * torch.linspace(0.2, 3, n)) @ mix
    W = torch.randn(out, n) * 0.02
    g = GPTQ(n)
    g.add_batch(x)
    res = g.quantize_mcn(W, BITS[name], act_order=act_order, unshrink=False, shrink=shrink)
    blob = F.mcn_pack(res.codes, res.d, res.s, BITS[name])
    assert torch.equal(torch.from_numpy(F.mcn_dequantize(blob, BITS[name], n)), res.dequantized)
    H = g.H.float()

    def err(Q):
        dW = W - Q
        return float(torch.einsum("ij,jk,ik->", dW, H, dW))
    imp = torch.diag(g.H).float().numpy()
    nearest = torch.from_numpy(F.mcn_dequantize(F.mcn_quantize(W, BITS[name], imp), BITS[name], n))
    assert err(res.dequantized) < 0.85 * err(nearest), (err(res.dequantized), err(nearest))
    # GPTQ's own loss is half the output error under the (shrunk) damped Hessian it factorized
    Hs = (1 - shrink) * g.H + shrink * torch.diag(torch.diag(g.H))
    Hd = Hs + res.stats["percdamp"] * torch.diag(g.H).mean() * torch.eye(n, dtype=g.H.dtype)
    dW = (W - res.dequantized).double()
    assert res.stats["loss"] == pytest.approx(float(torch.einsum("ij,jk,ik->", dW, Hd, dW)) / 2, rel=1e-3)


def test_gptq_mcn_shrink_one_feeds_no_error_forward():
    """shrink = 1: GPTQ on diag(H) alone, whose inverse Cholesky factor is diagonal: no column's error reaches
    another, so every code is the nearest level on the scales it fitted (formats.mcn_codes; float32 division
    in GPTQ against float64 there may differ on an exact midpoint)."""
    from mcmoe_gguf.quant.gptq import GPTQ
    torch.manual_seed(2)
    n = 256
    g = GPTQ(n)
    g.add_batch((torch.randn(2048, n) * torch.linspace(0.2, 3, n)) @ (torch.randn(n, n) / n ** 0.5 + torch.eye(n)))
    W = torch.randn(40, n) * 0.02
    res = g.quantize_mcn(W, 2, unshrink=False, shrink=1.0)
    near = F.mcn_codes(W.numpy(), res.d, res.s, 2)
    assert (res.codes.numpy() == near).mean() > 0.999
    assert not torch.equal(g.quantize_mcn(W, 2, unshrink=False, shrink=0.0).codes, res.codes)


def test_gptq_mcn_shrink_generalises_from_few_tokens():
    """Why quantize_mcn shrinks H toward its diagonal by default: from a few tokens per input dimension of a
    down projection's kind of input (SiLU(a) * b of a low-rank latent, token norms spread) GPTQ on the raw H
    fits those tokens and errs more on new ones from the same distribution. (On Gaussian inputs it does not
    overfit and shrinking neither helps nor hurts much; the inputs' structure is the point.)"""
    from mcmoe_gguf.quant.gptq import GPTQ, MCN_SHRINK
    torch.manual_seed(3)
    n, latent = 256, 64
    A, B = torch.randn(latent, n) / latent ** 0.5, torch.randn(latent, n) / latent ** 0.5

    def tokens(k):
        z = torch.randn(k, latent) * torch.exp(0.5 * torch.randn(k, 1))
        return torch.nn.functional.silu(2 * z @ A) * (z @ B)
    g = GPTQ(n)
    g.add_batch(tokens(3 * n))
    W = torch.randn(64, n) * 0.02
    new = GPTQ(n)
    new.add_batch(tokens(50000))

    def held_out(Q):
        dW = (W - Q).double()
        return float(torch.einsum("ij,jk,ik->", dW, new.H, dW))
    raw = held_out(g.quantize_mcn(W, 2, shrink=0.0).dequantized)
    shrunk = held_out(g.quantize_mcn(W, 2).dequantized)    # the default for 2 bits
    assert MCN_SHRINK[2] > 0 and shrunk < 0.9 * raw, (shrunk, raw)
    with pytest.raises(ValueError, match="shrink must be in"):
        g.quantize_mcn(W, 2, shrink=1.5)


def test_gptq_mcn_without_tokens_is_nearest():
    from mcmoe_gguf.quant.gptq import GPTQ
    W = torch.randn(8, 256) * 0.02
    res = GPTQ(256).quantize_mcn(W, 2)
    assert res.stats["method"] == "rtn"
    assert np.array_equal(F.mcn_pack(res.codes, res.d, res.s, 2), F.mcn_quantize(W, 2))


@pytest.mark.parametrize("name", NAMES)
def test_gptq_mcn_unshrink_makes_the_output_error_uncorrelated_with_the_output(name):
    """Rounding to a coarse table shrinks: <Q H W> < <W H W> row by row (~5-10% at 2 bits). unshrink rescales each
    row's fp16 super-scales so that the row's output error is orthogonal to its output under H (to fp16
    rounding), with the codes unchanged; the bytes still read back exactly."""
    from mcmoe_gguf.quant.gptq import GPTQ
    torch.manual_seed(1)
    n, out = 512, 32
    x = (torch.randn(4096, n) * torch.linspace(0.2, 3, n)) @ (torch.randn(n, n) / n ** 0.5 + torch.eye(n))
    W = torch.randn(out, n) * 0.02
    g = GPTQ(n)
    g.add_batch(x)
    H = g.H
    plain = g.quantize_mcn(W, BITS[name], unshrink=False)
    fixed = g.quantize_mcn(W, BITS[name])
    assert torch.equal(plain.codes, fixed.codes) and np.array_equal(plain.s, fixed.s)

    def beta(Q):
        Wd, Qd = W.double(), Q.double()
        return ((Qd @ H) * Wd).sum(1) / ((Wd @ H) * Wd).sum(1)
    b0, b1 = beta(plain.dequantized), beta(fixed.dequantized)
    assert (b0 < 1).all() and float(b0.mean()) < {"mcn2": 0.97, "mcn3": 0.995}[name], b0
    assert torch.allclose(b1, torch.ones_like(b1), atol=2e-3), b1
    blob = F.mcn_pack(fixed.codes, fixed.d, fixed.s, BITS[name])
    assert torch.equal(torch.from_numpy(F.mcn_dequantize(blob, BITS[name], n)), fixed.dequantized)
