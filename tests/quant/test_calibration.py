"""calibration.py's statistics (paper eq. 4-6 and ODP's mu) against a direct per-token computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mcmoe_gguf.model.arch import mixtral as mx
from mcmoe_gguf.quant.calibration import BITS, calibration_tokens, moe_stats, odp_curve, odp_mu, rtn_dequant


@pytest.fixture(scope="module")
def block():
    hp = mx.MixtralHParams(vocab_size=32, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)
    torch.manual_seed(0)
    moe = mx.SparseMoeBlock(hp)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1)
    x = torch.randn(200, 128)
    return moe, x


@torch.no_grad()
def test_moe_stats_equal_a_per_token_loop(block):
    moe, x = block
    s = moe_stats(7, moe, x)
    E, k = moe.hp.num_local_experts, moe.hp.num_experts_per_tok
    # routing by hand: softmax, top-k, renormalised
    probs = torch.softmax(x @ moe.gate.weight.t(), -1)
    counts = np.zeros(E)
    wsum = np.zeros(E)
    members = [[] for _ in range(E)]
    for t in range(len(x)):
        top = torch.topk(probs[t], k)
        w = top.values / top.values.sum()
        for j in range(k):
            e = int(top.indices[j])
            counts[e] += 1
            wsum[e] += float(w[j])
            members[e].append((t, float(w[j])))
    assert s.layer == 7 and s.n_tokens == 200
    assert s.counts == counts.astype(int).tolist()
    assert np.allclose(s.phi, counts / counts.sum())
    assert np.allclose(s.w, np.where(counts > 0, wsum / np.maximum(counts, 1), 0), atol=1e-6)
    for e in range(E):
        ex = moe.experts[e]
        for bi, b in enumerate(BITS):
            w1, w2, w3 = (rtn_dequant(getattr(ex, n).weight, b) for n in ("w1", "w2", "w3"))
            err = 0.0
            for t, w in members[e]:
                xt = x[t:t + 1]
                ref = ex(xt)
                q = torch.nn.functional.linear(torch.nn.functional.silu(xt @ w1.t()) * (xt @ w3.t()), w2)
                err += float(((w * (ref - q)) ** 2).sum())
            assert s.eps[e][bi] == pytest.approx(err ** 0.5, rel=1e-4)
        assert s.eps[e][0] > s.eps[e][1] > s.eps[e][2]            # more bits, less error
    assert s.mu == pytest.approx(odp_mu(torch.topk(probs, k).values / torch.topk(probs, k).values.sum(-1, keepdim=True)))


def test_odp_mu_is_the_median_ratio_of_the_two_weights():
    w = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.8, 0.2], [0.7, 0.3]])
    assert odp_mu(w) == pytest.approx(float(np.median([1 / 9, 4 / 6, 1.0, 0.25, 3 / 7])))


def engine_rule(w: list[float], mu: float) -> list[float]:
    """cpp/ggml/mcmoe-odp.h's rule for one token, written out: slots below mu * w_top are dropped and the
    kept weights rescaled to the same sum."""
    top = max(range(len(w)), key=lambda s: (w[s], -s))
    cut = [s != top and w[s] < mu * w[top] for s in range(len(w))]
    kept = sum(x for x, c in zip(w, cut) if not c)
    return [0.0 if c else x * sum(w) / kept for x, c in zip(w, cut)]


@pytest.mark.parametrize("k", [2, 3])
@torch.no_grad()
def test_odp_curve_equals_the_engines_rule_applied_token_by_token(block, k):
    moe0, x = block
    hp = mx.MixtralHParams(**{**moe0.hp.__dict__, "num_experts_per_tok": k})
    moe = mx.SparseMoeBlock(hp)
    moe.load_state_dict(moe0.state_dict())
    resid = torch.randn(len(x), x.shape[1]) * 0.5
    c = odp_curve(moe, x, resid)
    probs = torch.softmax(x @ moe.gate.weight.t(), -1)
    top = torch.topk(probs, k)
    W = top.values / top.values.sum(-1, keepdim=True)
    outs = [[moe.experts[int(e)](x[t:t + 1])[0] for e in top.indices[t]] for t in range(len(x))]
    y = [sum(float(W[t, j]) * outs[t][j] for j in range(k)) for t in range(len(x))]
    energy = sum(float(((resid[t] + y[t]) ** 2).sum()) for t in range(len(x)))
    for i in (0, 10, 35, 50, 70, 90, 100):
        mu = c["mu"][i]
        pruned, err = 0, 0.0
        for t in range(len(x)):
            w = engine_rule(W[t].tolist(), mu)
            pruned += sum(v == 0.0 for v in w)
            yp = sum(w[j] * outs[t][j] for j in range(k))
            err += float(((y[t] - yp) ** 2).sum())
        assert c["skip"][i] == pytest.approx(pruned / (len(x) * k), abs=1e-12), mu
        assert c["err"][i] == pytest.approx(err / energy, rel=1e-4, abs=1e-12), mu
    assert c["skip"][0] == 0 and c["err"][0] == 0
    assert c["skip"][-1] > 0.3 * (k - 1) / k          # most second experts are below the top one's weight
    assert np.all(np.diff(c["skip"]) >= 0)


def test_calibration_tokens_are_evenly_spread_windows(small_tokenizer_dir):
    from mcmoe_gguf.model.tiny import PRESETS, corpus_splits
    from tokenizers import Tokenizer
    text = corpus_splits(PRESETS["default"])["calib"][:60_000]
    tok = small_tokenizer_dir / "tokenizer.json"
    ids = Tokenizer.from_file(str(tok)).encode(text, add_special_tokens=False).ids
    t = calibration_tokens(tok, text, n_seq=5, seq_len=128)
    assert t.shape == (5, 128)
    starts = [next(i for i in range(0, len(ids), 128) if ids[i:i + 128] == row.tolist()) for row in t]
    assert starts[0] == 0 and starts == sorted(set(starts))          # distinct windows, in order
    assert starts[-1] == (len(ids) // 128 - 1) * 128                 # the last whole window
    assert torch.equal(t, calibration_tokens(tok, text, n_seq=5, seq_len=128))   # deterministic
    with pytest.raises(ValueError, match="fewer than one sequence"):
        calibration_tokens(tok, text[:100], n_seq=5, seq_len=4096)
