"""The mct trellis types' Python twin (quant/trellis.py): table, bit layout, exact Viterbi, reference quantizer, GPTQ."""
import itertools

import numpy as np
import pytest
import torch

from mcmoe_gguf.quant import trellis as T
from mcmoe_gguf.quant.gptq import GPTQ

BITS = (1, 2, 3)


def test_table_is_the_documented_hash():
    """V[s] = byte sum of ((s * 0x2C1B3C6D + 0x3039) mod 2^32 & 0x3F3F3F3F) - 126, computed here with Python ints."""
    v = T.mct_table()
    for s in (0, 1, 2, 777, 2048, 4095):
        x = (s * 0x2C1B3C6D + 0x3039) % 2 ** 32 & 0x3F3F3F3F
        assert v[s] == sum((x >> (8 * i)) & 0xFF for i in range(4)) - 126
    assert v.shape == (4096,) and v.min() >= -126 and v.max() <= 126
    assert abs(v.mean()) < 1 and abs(v.std() / T.MCT_SIGMA - 1) < 0.02


def _window(stream: np.ndarray, k: int, t: int) -> int:
    """The 12 bits at positions k t - (12 - k) .. k t + k - 1 of a sequence's stream, little-endian, circular."""
    nbits = 8 * len(stream)
    out = 0
    for j in range(12):
        p = (k * t - (12 - k) + j) % nbits
        out |= ((int(stream[p >> 3]) >> (p & 7)) & 1) << j
    return out


@pytest.mark.parametrize("k", BITS)
def test_bytes_and_states_follow_the_documented_layout(k):
    rng = np.random.default_rng(k)
    rows, n = 3, 512
    codes = rng.integers(0, 1 << k, (rows, n)).astype(np.uint8)
    d = rng.uniform(1e-4, 1e-2, (rows, n // 256)).astype(np.float16).astype(np.float32)
    s = rng.integers(0, 16, (rows, n // 32)).astype(np.uint8)
    blob = T.mct_pack(codes, d, s, k)
    spec = T.mct_spec(k)
    assert blob.shape == (rows, 2 * spec.block_bytes) and spec.block_bytes == 6 + 32 * k
    states = T.mct_states(codes, k)
    for r, b in ((0, 0), (2, 1)):
        blk = blob[r, b * spec.block_bytes:(b + 1) * spec.block_bytes]
        assert np.frombuffer(blk[:2].tobytes(), "<f2")[0] == d[r, b]
        assert [blk[2 + (j & 3)] >> (4 * (j >> 2)) & 15 for j in range(8)] == list(s[r, 8 * b:8 * b + 8])
        for seq in range(4):
            stream = blk[6 + 8 * k * seq:6 + 8 * k * (seq + 1)]
            for t in (0, 1, 5, 31, 63):
                i = 256 * b + 64 * seq + t
                assert _window(stream, k, t) == states[r, i]
                assert states[r, i] >> (12 - k) == codes[r, i]
    q, d2, s2 = T.mct_unpack(blob, k, n)
    assert np.array_equal(q, codes) and np.array_equal(d2, d) and np.array_equal(s2, s)
    v = T.mct_dequantize(blob, k, n)
    expect = (np.repeat(d, 256, 1).astype(np.float64) * np.repeat(s, 32, 1) * T.mct_table()[states]).astype(np.float32)
    assert np.array_equal(v, expect)


def test_bad_input_is_refused():
    codes = np.zeros((2, 256), np.uint8)
    d, s = np.zeros((2, 1), np.float32), np.zeros((2, 8), np.uint8)
    with pytest.raises(ValueError, match="codes must lie"):
        T.mct_pack(codes + 4, d, s, 2)
    with pytest.raises(ValueError, match="exact fp16"):
        T.mct_pack(codes, d + 1e-9, s, 2)
    with pytest.raises(ValueError, match="slice scales"):
        T.mct_pack(codes, d, s + 16, 2)
    with pytest.raises(ValueError, match="multiple of 256"):
        T.mct_pack(np.zeros((2, 100), np.uint8), d, s, 2)
    with pytest.raises(ValueError, match="not an mct type"):
        T.mct_spec(4)
    with pytest.raises(ValueError, match="whole rows"):
        T.mct_unpack(np.zeros(69, np.uint8), 2, 256)
    with pytest.raises(ValueError, match="NaN or Inf"):
        T.mct_quantize(np.full((1, 256), np.nan, np.float32), 2)
    with pytest.raises(ValueError, match="multiple of 256"):
        T.mct_quantize(np.zeros((1, 100), np.float32), 2)


def _path_costs(codes: np.ndarray, x, step, w, k) -> np.ndarray:
    """Costs of many circular code sequences [N, T] at once, states built from the codes as the layout defines."""
    t_n = codes.shape[1]
    st = np.zeros_like(codes, dtype=np.int64)
    for j in range(12 // k):
        st |= np.roll(codes, j, axis=1).astype(np.int64) << (12 - k - j * k)
    v = T.mct_table()[st].astype(np.float64)
    return (w.numpy() * (x.numpy() - step.numpy() * v) ** 2).sum(1)


@pytest.mark.parametrize("k,t_n", [(1, 18), (2, 12), (3, 8)])
def test_viterbi_with_a_fixed_overlap_is_the_exact_minimum(k, t_n):
    """Against enumerating every code sequence whose carried bits equal the overlap (the free codes: 2^(k (T - 12/k + 1)))."""
    torch.manual_seed(k)
    tab = torch.from_numpy(T.mct_table()).double()
    x = torch.randn(2, t_n).double() * 40
    step = torch.rand(2, t_n).double() + 0.5
    w = torch.rand(2, t_n).double()
    n_carry = 12 // k - 1
    overlap = torch.tensor([5, (1 << (12 - k)) - 3])
    got = T.viterbi(x, step, w, tab, k, overlap)
    free = np.array(list(itertools.product(range(1 << k), repeat=t_n - n_carry)), dtype=np.int64)
    for b in range(2):
        fixed = [(int(overlap[b]) >> (12 - 2 * k - j * k)) & ((1 << k) - 1) for j in range(n_carry)]
        codes = np.concatenate([free, np.broadcast_to(np.array(fixed[::-1]), (len(free), n_carry))], axis=1)
        costs = _path_costs(codes, x[b], step[b], w[b], k)
        assert got[b].tolist() == codes[costs.argmin()].tolist()
        assert np.isclose(_path_costs(got[b].numpy()[None], x[b], step[b], w[b], k)[0], costs.min(), rtol=1e-12)


@pytest.mark.parametrize("k,bound", [(1, 0.33), (2, 0.085), (3, 0.024)])
def test_trellis_beats_the_best_scalar_table_on_gaussian_weights(k, bound):
    """MSE per weight of tail-biting paths on unit-Gaussian data: below the Lloyd-Max scalar quantizer of the same
    bits (0.3634, 0.1175, 0.03454), found here by Lloyd's algorithm, not quoted."""
    torch.manual_seed(0)
    x = torch.randn(64, 64).double()
    step = torch.full_like(x, 1 / T.MCT_SIGMA)
    codes = T.tail_biting(x, step, torch.ones_like(x), torch.from_numpy(T.mct_table()).double(), k)
    st = T.mct_states(codes.numpy().astype(np.uint8), k)
    mse = float(((x - step * torch.from_numpy(T.mct_table()[st]).double()) ** 2).mean())
    g = np.random.default_rng(0).standard_normal(200000)
    lv = np.quantile(g, (np.arange(1 << k) + 0.5) / (1 << k))
    for _ in range(50):
        idx = np.abs(g[:, None] - lv).argmin(1)
        lv = np.array([g[idx == i].mean() for i in range(1 << k)])
    scalar = float(((g - lv[np.abs(g[:, None] - lv).argmin(1)]) ** 2).mean())
    assert mse < bound < scalar, (mse, scalar)


@pytest.mark.parametrize("k", BITS)
def test_reference_quantizer_reads_back_and_unshrinks(k):
    rng = np.random.default_rng(3)
    W = (rng.standard_normal((16, 256)) * 0.02).astype(np.float32)
    imp = rng.uniform(0.1, 2, 256).astype(np.float32)
    blob = T.mct_quantize(W, k, imp)
    q, d, s = T.mct_unpack(blob, k, 256)
    Q = T.mct_dequantize(blob, k, 256).astype(np.float64)
    assert np.array_equal(T.mct_pack(q, d, s, k), blob)
    rel = float((imp * (W - Q) ** 2).sum() / (imp * W.astype(np.float64) ** 2).sum())
    assert rel < {1: 0.33, 2: 0.085, 3: 0.024}[k], rel
    # unshrink: per block the weighted error is uncorrelated with the weights (to fp16 rounding of d)
    corr = (imp * W * (W - Q)).sum(1) / (imp * W.astype(np.float64) ** 2).sum(1)
    assert np.abs(corr).max() < 2e-3, corr


@pytest.mark.parametrize("k", BITS)
def test_degenerate_rows(k):
    W = np.zeros((4, 256), np.float32)
    W[1] = 0.5                                      # constant
    W[2, 7] = 1e4                                   # one huge outlier
    W[3] = np.linspace(-1, 1, 256)
    Q = T.mct_dequantize(T.mct_quantize(W, k), k, 256)
    assert np.isfinite(Q).all() and not Q[0].any()
    assert abs(Q[2, 7] / 1e4 - 1) < 0.5 and np.abs(Q[1]).mean() > 0.1


def _tokens(n, count, seed=1):
    torch.manual_seed(seed)
    return (torch.randn(count, n) * torch.linspace(0.2, 3, n)) @ (torch.randn(n, n) / n ** 0.5 + torch.eye(n))


@pytest.mark.parametrize("k", BITS)
def test_gptq_mct_beats_the_reference_and_reads_back_exactly(k):
    n, out = 256, 16
    g = GPTQ(n)
    g.add_batch(_tokens(n, 4096))
    W = torch.randn(out, n) * 0.02
    res = g.quantize_mct(W, k)
    ref = torch.from_numpy(T.mct_dequantize(T.mct_quantize(W, k, torch.diag(g.H).float().numpy()), k, n))

    def err(Q):
        dW = (W - Q).double()
        return float(torch.einsum("ij,jk,ik->", dW, g.H, dW))
    assert err(res.dequantized) < 0.85 * err(ref), (err(res.dequantized), err(ref))
    blob = T.mct_pack(res.codes, res.d, res.s, k)
    assert torch.equal(torch.from_numpy(T.mct_dequantize(blob, k, n)), res.dequantized)
    Wd, Qd = W.double(), res.dequantized.double()
    beta = ((Qd @ g.H) * Wd).sum(1) / ((Wd @ g.H) * Wd).sum(1)
    assert torch.allclose(beta, torch.ones_like(beta), atol=3e-3), beta


def test_gptq_mct_without_tokens_is_the_reference():
    W = torch.randn(4, 256) * 0.02
    res = GPTQ(256).quantize_mct(W, 2)
    assert res.stats["method"] == "rtn"
    assert np.array_equal(T.mct_pack(res.codes, res.d, res.s, 2), T.mct_quantize(W, 2))
