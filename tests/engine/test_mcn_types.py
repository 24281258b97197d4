"""The mcn2 / mcn3 ggml types (issue 14: Lloyd-Max table, 4-bit scales per 32, fp16 per 256) against
formats.py, their bit-exact Python twin (what they share with the mct types: test_superblock_types.py):

- C quantize == formats.mcn_quantize byte for byte (test_superblock_types.py); degenerate blocks come back as
  they should and the quantizer's error is sane;
- the prompt tile (mcn_gemm_tile, AVX-512 builds) equals its C twin bit for bit;
- formats: pack/unpack round trips, bad input refused;
- GPTQ into the table: bytes the runtime reads back exactly, and less output error than nearest rounding.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from mcmoe_gguf.quant import formats as F
from ggml_harness import Ggml, cpu_variants
from superblock_family import MCN, rows_of

NAMES = MCN.names()
TID = {n: F.MCN_TYPES[n].type_id for n in NAMES}
BITS = {n: F.MCN_TYPES[n].bits for n in NAMES}


def _setup(g: Ggml) -> Ggml:
    MCN.setup(g)
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


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_degenerate_blocks(ggml, name, with_imatrix):
    """Degenerate blocks (rows_of("edge")) come back as they should: a constant block keeps its sign and value, the
    outlier stays large (clipped: the table has no zero level, so the slice's least-squares scale trades the
    outlier's error against its 31 small neighbours')."""
    n = 768
    imp = None
    if with_imatrix:
        imp = (np.random.default_rng(3).gamma(0.5, 1.0, n)).astype(np.float32)
        imp[:40] = 0.0                                  # dead inputs: a slice with zero weights
    deq = MCN.quantize_checked(ggml, name, rows_of("edge", 6, n, seed=4 + BITS[name]), imp)
    live = slice(0, 256) if imp is None else slice(64, 256)      # imp[:40] = 0: those weights do not count
    assert np.all(deq[2, :256] < 0) and np.abs(deq[2, live] + 0.75).max() < 0.01 * 0.75
    assert deq[0, 300] == deq[0].max() and deq[0, 300] > 5.0


@pytest.mark.parametrize("name", NAMES)
def test_quantization_error_is_sane(ggml, name):
    """Gaussian rows: the quantizer is unbiased in the regression sense (sum x q = sum x^2 per block, to fp16
    rounding: no shrinking) and its relative MSE is below that of one global Lloyd-Max scale rescaled the same
    way (e / (1 - e) with e = 0.1175 / 0.0345): the per-32 scales adapt to each slice."""
    w = rows_of("gaussian", 64, 1024, seed=9)
    deq = F.mcn_dequantize(MCN.c_quantize(ggml, name, w, None), BITS[name], 1024)
    rel = float(((deq - w) ** 2).sum() / (w ** 2).sum())
    e = {"mcn2": 0.1175, "mcn3": 0.0345}[name]
    assert rel < e / (1 - e), rel
    beta = (deq.astype(np.float64) * w).reshape(-1, 256).sum(1) / (w.astype(np.float64) ** 2).reshape(-1, 256).sum(1)
    assert np.abs(beta - 1).max() < 2e-3, beta


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
    rows = np.concatenate([MCN.c_quantize(g, name, rows_of("edge", 6, n, seed=7), None), MCN.random_blob(name, 10, n, seed=8)])
    y = (rng.standard_normal((16, n)) * np.exp(rng.standard_normal((16, 1)))).astype(np.float32)
    y[0, :64] *= 30                                    # codes at the int8 limits
    qy_all = g.q8_K(y)
    have = g.cpu.mcn_cpu_has_tile(TID[name])
    assert have == (g.cpu.mcn_cpu_simd().decode() == "avx512-vnni")
    for nr, nc in [(16, 16), (16, 13), (9, 8), (8, 5), (5, 3), (1, 2), (16, 1), (3, 1)]:
        x = np.ascontiguousarray(rows[:nr])
        qy = np.ascontiguousarray(qy_all[:nc])
        twin, _ = gemm_tile(g.cpu.mcn_gemm_tile_ref, name, n, x, qy)
        want, abs_sum = MCN.kernel_sum(x, name, n, qy)
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
