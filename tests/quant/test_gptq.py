"""GPTQ onto the mcq1/2/3 grid: better than round-to-nearest, consistent with the stored layout, robust.

Small matrices (W [256, 512], 2048 tokens) so the whole file runs in seconds on a busy CPU.
"""
import pytest
import torch

from mcmoe_gguf.quant import formats
from mcmoe_gguf.quant.gptq import GPTQ, GPTQError, GPTQResult, rtn

OUT, N, TOKENS = 256, 512, 2048


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The column loop is many small ops; on a loaded 2-core machine intra-op threads spin against each other
    and make it ~20x slower. One thread keeps this file at a few seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def layer(seed=0, out=OUT, n=N, tokens=TOKENS):
    """Correlated inputs X = Z @ A (random A, so H = 2/N X^T X is far from diagonal) with a little independent
    noise and a few outlier channels, as in LLM activations; W random at a realistic scale."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(tokens, n, generator=g)
    A = torch.randn(n, n, generator=g) / n ** 0.5
    X = Z @ A + 0.1 * torch.randn(tokens, n, generator=g)
    X[:, :8] *= 8
    W = torch.randn(out, n, generator=g) * 0.05
    return X, W


def hessian(X, **kw):
    g = GPTQ(X.shape[1], **kw)
    g.add_batch(X)
    return g


def out_err(X, W, Wq):
    return (X @ (W - Wq).T).norm().item()


@pytest.fixture(scope="module")
def data():
    X, W = layer(0)
    return X, W, hessian(X)


def expand(p):
    return p.repeat_interleave(formats.GROUP_SIZE, dim=1)


# ------------------------------------------------------------------ quality

# GPTQ / RTN output error on this layer (measured): act_order off 0.79 / 0.64 / 0.58 at 1 / 2 / 3 bits,
# act_order on (static groups) 0.83 / 0.68 / 0.59. RTN here uses the same "mse" grid fit.
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits,max_ratio", [(1, 0.9), (2, 0.8), (3, 0.75)])
def test_gptq_beats_rtn_on_correlated_inputs(data, bits, max_ratio, act_order):
    X, W, g = data
    e_rtn = out_err(X, W, rtn(W, bits).dequantized)
    res = g.quantize(W, bits, act_order=act_order)
    ratio = out_err(X, W, res.dequantized) / e_rtn
    print(f"bits={bits} act_order={act_order}: GPTQ/RTN output error {ratio:.3f}")
    assert ratio < max_ratio


def test_inblock_error_feedback_matters():
    """The MC-MoE reference drops the in-block update at <= 3 bits; ours keeps it and must be no worse."""
    full, lazy_only = [], []
    for seed in range(3):
        X, W = layer(seed, out=128)
        g = hessian(X)
        full.append(out_err(X, W, g.quantize(W, 2).dequantized))
        lazy_only.append(out_err(X, W, g.quantize(W, 2, _inblock_feedback=False).dequantized))
    full, lazy_only = sum(full) / 3, sum(lazy_only) / 3
    print(f"2 bits, mean output error: full {full:.4f}, without in-block feedback {lazy_only:.4f}")
    assert full <= lazy_only
    assert full < 0.9 * lazy_only    # and by a clear margin on correlated inputs


@pytest.mark.parametrize("act_order", [False, True])
def test_loss_estimate_is_exact(data, act_order):
    """GPTQ's per-column losses (w - q)^2 / (2 U_ii^2) add up to 1/2 tr(dW H_damped dW^T): a check of the whole
    OBS update chain (Cholesky factor, in-block and lazy updates, permutation). Breaks if any is wrong."""
    X, W, g = data
    res = g.quantize(W, 2, act_order=act_order)
    H = g.H.clone()
    H.diagonal().add_(res.stats["percdamp"] * torch.diag(H).mean())
    dW = (W - res.dequantized).double()
    expected = 0.5 * torch.sum((dW @ H) * dW).item()
    assert res.stats["loss"] == pytest.approx(expected, rel=1e-3)
    # and without the in-block update the estimate no longer describes the result
    res = g.quantize(W, 2, act_order=act_order, _inblock_feedback=False)
    dW = (W - res.dequantized).double()
    assert res.stats["loss"] != pytest.approx(0.5 * torch.sum((dW @ H) * dW).item(), rel=1e-2)


def test_blocksize_does_not_change_the_algorithm(data):
    """Lazy batching is exact algebra: any blocksize that divides or is a multiple of 128 gives the same result
    up to float rounding (this also checks that dynamic groups are fitted on up-to-date weights)."""
    X, W, g = data
    ref = g.quantize(W, 2, blocksize=128)
    for bs in (32, 256, 512):
        res = g.quantize(W, 2, blocksize=bs)
        assert (res.codes == ref.codes).float().mean() > 0.99, bs
        assert out_err(X, W, res.dequantized) == pytest.approx(out_err(X, W, ref.dequantized), rel=1e-2)
    with pytest.raises(ValueError, match="blocksize"):
        g.quantize(W, 2, blocksize=96)


# ------------------------------------------------------------------ layout

@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_codes_match_stored_layout(data, bits, act_order):
    X, W, g = data
    res = g.quantize(W, bits, act_order=act_order)
    assert isinstance(res, GPTQResult)
    assert res.codes.dtype == torch.uint8 and res.codes.shape == W.shape
    assert res.scale.shape == res.mn.shape == (OUT, N // formats.GROUP_SIZE)
    assert res.dequantized.dtype == torch.float32 and res.dequantized.shape == W.shape
    assert int(res.codes.max()) <= 2 ** bits - 1
    assert len(torch.unique(res.codes)) == 2 ** bits                 # the whole grid is in use
    for p in (res.scale, res.mn):                                   # stored as fp16 without rounding
        assert torch.equal(p, p.half().float())
    # dequantized is exactly m + d * q of each row's group (contiguous 128 columns in original order)
    assert torch.equal(res.dequantized, expand(res.mn) + expand(res.scale) * res.codes.float())
    assert torch.equal(res.dequantized, formats.dequantize_codes(res.codes, res.scale, res.mn))
    # re-rounding the result on its own grid is a fixed point: GPTQ's codes are nearest-grid codes
    assert torch.equal(formats.quantize_codes(res.dequantized, res.scale, res.mn, bits), res.codes)
    # and through the bytes
    blob = formats.pack(res.codes, res.scale, res.mn, bits)
    assert torch.equal(torch.from_numpy(formats.dequantize(blob, bits, N)), res.dequantized)


def test_rtn_uses_the_same_grid():
    _, W = layer(1)
    for bits in (1, 2, 3):
        res = rtn(W, bits, "minmax")
        d, m = formats.fit_params(W, bits, "minmax")
        assert torch.equal(res.scale, d) and torch.equal(res.mn, m)
        assert torch.equal(res.codes, formats.quantize_codes(W, d, m, bits))
        assert torch.equal(res.dequantized, expand(m) + expand(d) * res.codes.float())
        assert res.stats["method"] == "rtn"


# ------------------------------------------------------------------ robustness

@pytest.mark.parametrize("act_order", [False, True])
def test_never_routed_expert_falls_back_to_rtn(act_order):
    _, W = layer(2)
    for g in (GPTQ(N), hessian(torch.randn(16, N), dtype=torch.float64)):
        if g.nsamples:                                          # tokens that all had routing weight 0
            g = GPTQ(N)
            g.add_batch(torch.randn(16, N), weight=torch.zeros(16))
            assert g.nsamples == 16 and not torch.any(g.H)
        res, ref = g.quantize(W, 2, act_order=act_order), rtn(W, 2)
        assert torch.isfinite(res.dequantized).all()
        for a, b in ((res.codes, ref.codes), (res.scale, ref.scale), (res.mn, ref.mn),
                     (res.dequantized, ref.dequantized)):
            assert torch.equal(a, b)
        assert "fallback" in res.stats


@pytest.mark.parametrize("act_order", [False, True])
def test_deterministic(act_order):
    X, W = layer(3, out=128)
    a = hessian(X).quantize(W, 2, act_order=act_order)
    b = hessian(X.clone()).quantize(W.clone(), 2, act_order=act_order)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.mn, b.mn)
    assert torch.equal(a.dequantized, b.dequantized)


def test_quantize_leaves_hessian_alone_and_reuses_it(data):
    X, W, g = data
    H0 = g.H.clone()
    g.quantize(W, 3, act_order=True)
    g.quantize(W[:64], 2)                  # a second weight on the same inputs (gate and up projections)
    assert torch.equal(g.H, H0)


def test_dead_inputs():
    X, W = layer(4, out=128)
    X[:, [5, 300]] = 0
    g = hessian(X)
    res = g.quantize(W, 2, percdamp=0)     # no damping: only H_ii = 1 on the dead inputs keeps H invertible
    assert res.stats["n_dead"] == 2
    assert res.stats["percdamp"] == 0       # (no retry was needed)
    assert torch.isfinite(res.dequantized).all()
    # dead columns are dropped to 0 before quantization (as in the reference): they round to the grid point
    # nearest 0 and push no error onto the live columns
    assert res.dequantized[:, 5].abs().max() <= res.scale[:, 0].max() / 2 + 1e-6


def test_cholesky_retry_then_error():
    _, W = layer(5, out=64, n=256)
    g = GPTQ(256)
    g.nsamples = 1
    g.H = torch.eye(256, dtype=torch.float64)
    g.H[0, 1] = g.H[1, 0] = 1.5            # eigenvalue -0.5: needs damping > 0.5 x mean diagonal
    res = g.quantize(W, 2, percdamp=0.01)
    assert res.stats["percdamp"] == pytest.approx(1.0)
    assert torch.isfinite(res.dequantized).all()
    g.H[0, 1] = g.H[1, 0] = 1e4            # beyond any sane damping
    with pytest.raises(GPTQError, match="positive definite"):
        g.quantize(W, 2)


def test_rank_deficient_hessian_is_fine():
    """An expert routed fewer tokens than it has inputs: H is singular, 1 % damping makes it usable."""
    X, W = layer(6, out=64, tokens=100)
    g = hessian(X)
    res = g.quantize(W, 2)
    assert res.stats["percdamp"] == 0.01
    assert out_err(X, W, res.dequantized) < out_err(X, W, rtn(W, 2).dequantized)


def test_add_batch_accumulation():
    X, _ = layer(7, tokens=300)
    one = hessian(X)
    parts = GPTQ(N)
    for chunk in (X[:100], X[100:101], X[101:]):
        parts.add_batch(chunk)
    assert parts.nsamples == one.nsamples == 300
    assert torch.allclose(parts.H, one.H, rtol=1e-10, atol=1e-12)
    assert torch.allclose(one.H, 2 / 300 * X.double().T @ X.double(), rtol=1e-6, atol=1e-8)
    w = GPTQ(N)
    w.add_batch(X, weight=torch.ones(300))
    assert torch.allclose(w.H, one.H, rtol=1e-12, atol=0)
    # integer weights act like repeated tokens (up to the token count, which only scales H)
    w = GPTQ(N)
    w.add_batch(X[:10], weight=torch.tensor([3.0] + [1.0] * 9))
    dup = hessian(torch.cat([X[:1], X[:1], X[:10]]))
    assert torch.allclose(w.H * 10, dup.H * 12, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError):
        w.add_batch(X[:2], weight=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        w.add_batch(torch.full((2, N), float("nan")))


def test_argument_checks(data):
    X, W, g = data
    with pytest.raises(ValueError):
        g.quantize(W, 5)
    with pytest.raises(ValueError):
        g.quantize(W[:, :256], 2)
    with pytest.raises(ValueError, match="static_groups"):
        g.quantize(W, 2, act_order=True, static_groups=False)
    with pytest.raises(ValueError):
        GPTQ(100).quantize(torch.zeros(4, 100), 2)


def test_the_cached_factor_gives_what_a_fresh_hessian_gives():
    """quantize reuses H's inverse Cholesky factor across widths; results must equal a fresh object's, and
    any change to H (more tokens, an in-place edit) must be seen."""
    torch.manual_seed(3)
    X, W = torch.randn(300, 256), torch.randn(64, 256)

    def fresh(x):
        g = GPTQ(256)
        g.add_batch(x)
        return g
    g = fresh(X)
    for bits in (1, 2, 3, 2):
        assert torch.equal(g.quantize(W, bits).dequantized, fresh(X).quantize(W, bits).dequantized)
    g.add_batch(X[:50] * 3)
    both = torch.cat([X, X[:50] * 3])
    assert torch.allclose(g.H, fresh(both).H, rtol=1e-12)
    assert torch.equal(g.quantize(W, 2).dequantized, GPTQ_with(g.H).quantize(W, 2).dequantized)
    g.H.mul_(4.0)                          # an in-place edit: GPTQ is scale invariant apart from the damping,
    g.H.diagonal().add_(1.0)               # this one is not
    assert torch.equal(g.quantize(W, 2).dequantized, GPTQ_with(g.H.clone()).quantize(W, 2).dequantized)


def GPTQ_with(H: torch.Tensor) -> GPTQ:
    g = GPTQ(H.shape[0])
    g.H = H.clone()
    g.nsamples = 1
    return g


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_unshrink_makes_the_output_error_uncorrelated_with_the_output(data, bits, act_order):
    """unshrink (as quantize_mcn's): GPTQ on the affine grid shrinks (<Q H W> < <W H W> row by row); afterwards
    each row's (scale, min) pairs are scaled so that its output error is orthogonal to its output under H, up to
    fp16 rounding, the codes unchanged and the bytes reading back exactly."""
    X, W, g = data
    plain = g.quantize(W, bits, act_order=act_order)
    fixed = g.quantize(W, bits, act_order=act_order, unshrink=True)
    assert torch.equal(plain.codes, fixed.codes)
    H = g.H

    def beta(Q):
        Wd, Qd = W.double(), Q.double()
        return ((Qd @ H) * Wd).sum(1) / ((Wd @ H) * Wd).sum(1)
    b0, b1 = beta(plain.dequantized), beta(fixed.dequantized)
    assert float(b0.mean()) < 0.995, b0
    assert torch.allclose(b1, torch.ones_like(b1), atol=3e-3), b1
    c = torch.tensor(fixed.stats["unshrink"])
    assert 1 <= float(c[1]) <= 2 and float(c[0]) >= 0.5
    for p in (fixed.scale, fixed.mn):
        assert torch.equal(p, p.half().float())
    blob = formats.pack(fixed.codes, fixed.scale, fixed.mn, bits)
    assert torch.equal(torch.from_numpy(formats.dequantize(blob, bits, N)), fixed.dequantized)
