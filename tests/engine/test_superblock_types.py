"""What every super-block type of ours (mcn2 / mcn3, mct1 / mct2 / mct3) must do in ggml, one test per property,
parametrized over the types (tests/support/superblock_family.py says how each family's levels come out of its bytes):

- the type table: ids, names, block sizes as formats.py documents them, learnt by base/ggml.py;
- the C reference quantizer (ggml_quantize_chunk with and without an imatrix, from_float_ref) writes the Python
  twin's bytes on Gaussian, heavy-tailed and degenerate rows, and its dequantization is the twin's bit for bit;
- validation refuses an inf / NaN super-scale;
- CPU vec_dot: each CPU variant runs the SIMD kernel its instruction set allows; that kernel and the scalar
  reference equal the float64 value of the same integer sums (the kernel bit for bit where it adds in the
  reference's order) and the plain dequantized dot product;
- get_rows is bit-exact with the Python twin's dequantization; mul_mat and mul_mat_id graphs (skipped ids give
  zeros) equal the float64 sums;
- test-backend-ops on the CPU backend (SIMD vs its reference mode) passes MUL_MAT, MUL_MAT_ID and GET_ROWS.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest

from mcmoe_gguf.base import ggml as base_ggml
from ggml_harness import GGML_TYPE_F32, GGML_TYPE_I32, QK_K, Ggml, Graph, cpu_variants
from superblock_family import ALL_NAMES, FAMILIES, family_of, rows_of
from test_ggml_types import parse_q8_K


@pytest.fixture(scope="module")
def ggml():
    g = Ggml()
    for fam in FAMILIES.values():
        fam.setup(g)
    return g


@pytest.fixture(scope="module", params=cpu_variants())
def ggml_variant(request):
    g = Ggml(request.param)
    for fam in FAMILIES.values():
        fam.setup(g)
    return g


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_type_table(ggml, fam):
    family = FAMILIES[fam]
    info = family.info(ggml)
    for name, spec in family.specs.items():
        assert f"{name}:{spec.type_id}" in info, info
        t = ggml.traits(spec.type_id)
        assert ggml.base.ggml_type_name(spec.type_id).decode() == name
        assert t.blck_size == QK_K and t.type_size == spec.block_bytes
        assert spec.bpw == spec.block_bytes * 8 / QK_K
        assert base_ggml.Ggml().type_id(name) == spec.type_id     # base/ggml.py learns the ids from <prefix>_info


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("kind", ["gaussian", "heavy", "edge"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_c_quantize_equals_the_python_twin(ggml, name, kind, with_imatrix):
    family = family_of(name)
    n = 512
    w = rows_of(kind, 6, n, seed=len(kind) + family.specs[name].bits)
    imp = None
    if with_imatrix:
        imp = (np.random.default_rng(3).gamma(0.5, 1.0, n)).astype(np.float32)
        imp[:40] = 0.0                                  # dead inputs: a slice whose importance sums to 0
    deq = family.quantize_checked(ggml, name, w, imp)
    if kind == "edge":
        assert not deq[1, :256].any()                   # an all-zero block: d = 0
        assert deq[0, 300] == deq[0].max()              # the outlier stays its row's largest value


@pytest.mark.parametrize("name", ALL_NAMES)
def test_validate_rejects_inf_and_nan_scale(ggml, name):
    family = family_of(name)
    spec = family.specs[name]
    blob = family.c_quantize(ggml, name, rows_of("gaussian", 2, 512, seed=1), None)
    assert ggml.base.ggml_validate_row_data(spec.type_id, blob.ctypes.data, blob.size)
    for bad in (0x7C00, 0xFE00):
        b = blob.copy()
        b[1, spec.block_bytes:spec.block_bytes + 2] = np.frombuffer(struct.pack("<H", bad), np.uint8)
        assert not ggml.base.ggml_validate_row_data(spec.type_id, b.ctypes.data, b.size)


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_simd_kernel_is_in_use(ggml_variant, fam):
    """Each CPU variant runs the kernel its instruction set allows (the family's SIMD levels, else the scalar twin)."""
    from mcmoe_gguf.engine.cpu_variant import FEATURES, VARIANTS, cpu_flags
    family = FAMILIES[fam]
    if ggml_variant.variant is None:
        flags = cpu_flags()
        features = {f for f, (need, _) in FEATURES.items() if set(need) <= flags}
    else:
        features = set(VARIANTS[ggml_variant.variant])
    assert family.cpu_simd(ggml_variant) == family.simd(features), ggml_variant.variant


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("n", [256, 768, 4096, 14336])
def test_vec_dot_simd_vs_scalar_vs_float64(ggml_variant, name, n):
    g = ggml_variant
    family = family_of(name)
    bits = family.specs[name].bits
    rng = np.random.default_rng(n + bits)
    x = np.concatenate([family.c_quantize(g, name, rows_of("edge", 6, n, seed=n), None),
                        family.random_blob(name, 3, n, seed=n)])
    y = (rng.standard_normal((3, n)) * np.exp(rng.standard_normal((3, 1)))).astype(np.float32)
    y[0, :64] *= 30                                     # activation codes at the int8 limits
    qy = g.q8_K(y)
    want, abs_sum = family.kernel_sum(x, name, n, qy)
    dyy, qv, _ = parse_q8_K(qy)
    plain = family.dequantize(x, bits, n).astype(np.float64) @ (np.repeat(dyy, QK_K, 1) * qv).T
    for r in range(x.shape[0]):
        for t in range(qy.shape[0]):
            simd = family.vec_dot(g, name, n, x[r], qy[t])
            ref = family.vec_dot(g, name, n, x[r], qy[t], ref=True)
            tol = 1e-5 * abs_sum[r, t] + 1e-30
            assert abs(ref - want[r, t]) <= tol, (r, t, ref, want[r, t])
            assert abs(simd - want[r, t]) <= tol, (r, t, simd, want[r, t])
            assert abs(simd - plain[r, t]) <= tol, (r, t, simd, plain[r, t])
            if family.simd_bit_exact:
                assert struct.pack("<f", simd) == struct.pack("<f", ref), (r, t, simd, ref)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_get_rows_is_bit_exact(ggml, name):
    family = family_of(name)
    n, rows = 512, 6
    blob = family.random_blob(name, rows, n, seed=20)
    ids = np.array([5, 0, 3, 3, 1], np.int32)
    with Graph(ggml) as g:
        a = g.tensor(family.specs[name].type_id, n, rows, data=blob)
        out = g.compute(ggml.base.ggml_get_rows(g.ctx, a, g.tensor(GGML_TYPE_I32, len(ids), 1, data=ids)), (len(ids), n))
    want = family.dequantize(blob, family.specs[name].bits, n)[ids]
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("T", [1, 7])
def test_mul_mat(ggml, name, T):
    family = family_of(name)
    n = 768
    blob = np.concatenate([family.c_quantize(ggml, name, rows_of("heavy", 8, n, seed=30), None),
                           family.random_blob(name, 32, n, seed=30 + T)])
    y = np.random.default_rng(T).standard_normal((T, n)).astype(np.float32)
    with Graph(ggml) as g:
        a = g.tensor(family.specs[name].type_id, n, blob.shape[0], data=blob)
        b = g.tensor(GGML_TYPE_F32, n, T, data=y)
        out = g.compute(ggml.base.ggml_mul_mat(g.ctx, a, b), (T, blob.shape[0]))
    want, abs_sum = family.kernel_sum(blob, name, n, ggml.q8_K(y))
    np.testing.assert_array_less(np.abs(out - want.T), 1e-5 * abs_sum.T + 1e-30)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_mul_mat_id_with_skipped_ids(ggml, name):
    family = family_of(name)
    n, rows, n_exp, n_used, T = 256, 24, 4, 2, 5
    blobs = [family.random_blob(name, rows, n, seed=7 * e) for e in range(n_exp)]
    ids = np.array([[0, 3], [3, -1], [2, 0], [1, 1], [-1, 2]], np.int32)       # -1: a skipped slot (zeros)
    y = np.random.default_rng(5).standard_normal((T, n_used, n)).astype(np.float32)
    with Graph(ggml) as g:
        a = g.tensor(family.specs[name].type_id, n, rows, n_exp, data=np.stack(blobs))
        b = g.tensor(GGML_TYPE_F32, n, n_used, T, data=y)
        i = g.tensor(GGML_TYPE_I32, n_used, T, data=ids)
        out = g.compute(ggml.base.ggml_mul_mat_id(g.ctx, a, b, i), (T, n_used, rows))
    for t in range(T):
        for s in range(n_used):
            if ids[t, s] < 0:
                assert not out[t, s].any()
                continue
            want, abs_sum = family.kernel_sum(blobs[ids[t, s]], name, n, ggml.q8_K(y[t, s][None]))
            assert np.all(np.abs(out[t, s] - want[:, 0]) <= 1e-5 * abs_sum[:, 0] + 1e-30), (t, s)


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_backend_ops_cpu_simd_vs_reference(fam):
    """test-backend-ops on the CPU backend against its reference mode (the family's scalar vec_dot)."""
    from mcmoe_gguf.engine.runtime import run_tool
    for op in ("MUL_MAT", "MUL_MAT_ID", "GET_ROWS"):
        r = run_tool("test-backend-ops", "test", "-b", "CPU", "-o", op, "-p", fam, capture_output=True, text=True,
                     timeout=900)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "FAIL" not in out, out[-3000:]
        passed = [ln for ln in out.splitlines() if "OK" in ln and fam in ln]
        for name in FAMILIES[fam].names():
            assert any(name in ln for ln in passed), f"{op}: no passing {name} case\n{out[-3000:]}"
