"""The type ladder (quant/ladder.py, allocate.allocate_ladder, the ladder path of pmq.quantize).

- the program: optimal against brute force (per projection and per expert), within the budget, its
  range named when infeasible;
- eps: equal to a hand computation with ggml's quantizer called directly; per-projection squared errors
  add up to roughly the error of quantizing all three;
- a ladder run: stored bytes = size report = the file's tensor bytes, budget held, each expert tensor in
  its chosen type and grouped by type in the file, no mcmoe.expert_bits; llama.cpp's perplexity equals the
  torch fake-quant model's; budgets down to 1.5 bpw; bad ladders refused before any work.
"""
from __future__ import annotations

import itertools
import json

import gguf
import numpy as np
import pytest
import torch

from helpers import calibrated_checkpoint
from mcmoe_gguf.base.ggml import ggml
from mcmoe_gguf.model.checkpoint import Checkpoint
from mcmoe_gguf.quant import allocate, ladder, pmq
from mcmoe_gguf.quant.calibration import expert_forward


def test_resolve_names_lists_and_bad_types():
    assert ladder.resolve("stock") == ladder.STOCK_TYPES
    assert ladder.resolve("full")[:3] == ("mcq1", "mcq2", "mcq3")
    assert ladder.resolve(" mcq1, IQ2_XXS,q2_k,mcq1 ") == ("mcq1", "iq2_xxs", "q2_k")
    with pytest.raises(ValueError, match="unknown type 'iq9'"):
        ladder.resolve("mcq1,iq9")
    with pytest.raises(ValueError, match="not a quantized type"):
        ladder.resolve("f16,q2_k")
    with pytest.raises(ValueError, match="names no type"):
        ladder.resolve(",")


def _brute(cost, size, cap):
    """cost/size [N, T]: best total cost over all T^N choices with size <= cap (fewest bytes on ties)."""
    N, T = cost.shape
    best = None
    for c in itertools.product(range(T), repeat=N):
        s = sum(size[i, j] for i, j in enumerate(c))
        if s <= cap:
            key = (round(sum(cost[i, j] for i, j in enumerate(c)), 12), s)
            best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("granularity", ["projection", "expert"])
@pytest.mark.parametrize("seed", range(4))
def test_program_is_optimal_against_brute_force(granularity, seed):
    rng = np.random.default_rng(seed)
    E, P, T = 3, 3, 3
    phi, w = rng.random((1, E)), rng.random((1, E))
    eps = np.sort(rng.random((1, E, P, T)), axis=-1)[..., ::-1] * rng.random((1, E, P, 1))
    nbytes = np.array([[1, 2, 3], [1, 2, 3], [2, 3, 5]]) * 64      # down projection wider
    n = 3 * 1024
    bpw = 1.0 + 0.6 * seed                  # tight to loose
    a = allocate.allocate_ladder(phi, w, eps, nbytes, n, bpw, granularity=granularity)
    cost = phi[0, :, None, None] * w[0, :, None, None] * eps[0] ** 2
    size = np.broadcast_to(nbytes, (E, P, T))
    if granularity == "expert":
        cost, size = cost.sum(1), size.sum(1)
        assert (a.choice == a.choice[..., :1]).all()
    cap = int(bpw * E * n / 8)
    want = _brute(cost.reshape(-1, T), size.reshape(-1, T), cap)
    assert a.expert_bytes <= cap and 8 * a.expert_bytes / (E * n) == pytest.approx(a.bpw)
    assert a.objective == pytest.approx(want[0], rel=1e-9, abs=1e-12)
    assert a.expert_bytes == want[1]


def test_model_scope_shares_one_budget_and_infeasible_names_the_range():
    rng = np.random.default_rng(7)
    L, E, P = 2, 2, 3
    eps = np.stack([np.ones((L, E, P)), np.zeros((L, E, P))], -1)          # the wide type is error-free
    phi = np.array([[1.0, 1.0], [1e-3, 1e-3]])                              # layer 1 barely matters
    nbytes = np.array([[1, 2]] * P) * 128
    n = 3 * 1024
    a = allocate.allocate_ladder(phi, rng.random((L, E)) + 0.5, eps, nbytes, n, 1.5, scope="model")
    assert (a.choice[0] == 1).all() and (a.choice[1] == 0).all()           # the budget moved to layer 0
    with pytest.raises(allocate.InfeasibleBudget, match=r"useful range is 1 \(every projection in the ladder's "
                                                          r"cheapest type\) to 2 "):
        allocate.allocate_ladder(phi, phi, eps, nbytes, n, 0.9)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_tokenizer_dir):
    return calibrated_checkpoint(tmp_path_factory.mktemp("ladder"), small_tokenizer_dir, seed=9)


@pytest.fixture(scope="module")
def layer0(ckpt):
    """Layer 0's MoE block and its real inputs (as PMQ sees them: calibration tokens through attention)."""
    from mcmoe_gguf.quant.calibration import calibration_tokens
    ck = Checkpoint(ckpt)
    tokens = calibration_tokens(ckpt / "tokenizer.json", (ckpt / "calib.txt").read_text(), 8, 64)
    cos, sin = ck.arch.rope_tables(ck.hp, tokens.shape[1])
    layer = ck.arch.decoder_layer_from(ck, 0)
    _, x = pmq.moe_input(layer, pmq._embed(ck, tokens, "cpu"), cos, sin, 256)
    return layer.moe, x


def test_eps_equals_a_hand_computation(layer0):
    moe, x = layer0
    types = ("iq2_xxs", "mcq2", "q4_k")
    eps = ladder.measure_eps(moe, x, types, pmq.PMQConfig(method="rtn"), progress=False)
    _, wts, ids = moe.route(x)
    from mcmoe_gguf.quant import formats
    for e in (0, 5):
        tok, slot = torch.where(ids == e)
        xe, g = x[tok], wts[tok, slot][:, None]
        ex = moe.experts[e]
        W = {p: getattr(ex, p).weight.detach() for p in ("w1", "w2", "w3")}
        ref = expert_forward(W["w1"], W["w2"], W["w3"], xe)
        # gate in IQ2_XXS, by ggml directly, with the routed tokens' mean x^2 as importance
        imp = (xe.double() ** 2).mean(0).float().numpy()
        blob = ggml().quantize(W["w1"].numpy(), "iq2_xxs", imp)
        q1 = torch.from_numpy(ggml().dequantize(blob, "iq2_xxs", W["w1"].shape[1]))
        want = torch.linalg.norm(g * (ref - expert_forward(q1, W["w2"], W["w3"], xe))).item()
        assert eps[e, 0, 0] == pytest.approx(want, rel=1e-5)
        # down in mcq2 (RTN on our grid, formats.py)
        q2 = torch.from_numpy(formats.dequantize(formats.quantize(W["w2"], 2, "mse"), 2, W["w2"].shape[1]))
        want = torch.linalg.norm(g * (ref - expert_forward(W["w1"], q2.reshape(W["w2"].shape), W["w3"], xe))).item()
        assert eps[e, 2, 1] == pytest.approx(want, rel=1e-5)
    assert (eps[..., 2] < eps[..., 0]).all()            # 4.5 bpw beats 2.06 bpw everywhere


def test_projection_errors_add_up_to_the_whole_experts(layer0):
    """With gamma = 2 the program sums squared errors over projections: check that this is close to the
    squared error of quantizing all three at once (it is exact when the errors are uncorrelated)."""
    moe, x = layer0
    eps = ladder.measure_eps(moe, x, ("iq2_xxs",), pmq.PMQConfig(method="rtn"), progress=False)[..., 0]
    _, wts, ids = moe.route(x)
    ratios = []
    for e in range(8):
        tok, slot = torch.where(ids == e)
        if len(tok) == 0:
            continue
        xe, g = x[tok], wts[tok, slot][:, None]
        W = {p: getattr(moe.experts[e], p).weight.detach() for p in ("w1", "w2", "w3")}
        imp_x = (xe.double() ** 2).mean(0).float().numpy()
        from mcmoe_gguf.quant.calibration import expert_inner
        imp_in = (expert_inner(W["w1"], W["w3"], xe).double() ** 2).mean(0).float().numpy()
        Q = {p: torch.from_numpy(ggml().dequantize(ggml().quantize(W[p].numpy(), "iq2_xxs", imp), "iq2_xxs",
                                                   W[p].shape[1]))
             for p, imp in (("w1", imp_x), ("w3", imp_x), ("w2", imp_in))}
        ref = expert_forward(W["w1"], W["w2"], W["w3"], xe)
        whole = torch.linalg.norm(g * (ref - expert_forward(Q["w1"], Q["w2"], Q["w3"], xe))).item()
        ratios.append((eps[e] ** 2).sum() / whole ** 2)
    assert 0.7 < np.median(ratios) < 1.3, ratios


LADDER_CFG = dict(budget="1.75", n_seq=8, seq_len=64, ladder="mcq1,iq1_s,iq2_xxs,q2_k,q4_k")


@pytest.fixture(scope="module")
def ladder_run(ckpt, tmp_path_factory):
    from mcmoe_gguf.gguf.export import export_pmq
    d = tmp_path_factory.mktemp("ladder-run")
    r = pmq.quantize(ckpt, d / "q", pmq.PMQConfig(**LADDER_CFG), progress=False)
    return r, d / "q", export_pmq(d / "q", d / "m.gguf", progress=False)


def test_ladder_run_holds_its_budget_and_writes_its_choice(ladder_run):
    from mcmoe_gguf.gguf.types import register
    r, wd, path = ladder_run
    types = np.array(r["types"], dtype=object)
    assert types.shape == (2, 8, 3) and r["bits"] is None
    kinds = set(types.ravel())
    assert "mcq1" in kinds and len(kinds - {"mcq1"}) >= 2            # our type and ggml's side by side
    assert r["expert_bpw"] <= 1.75
    stored = 0
    for l in range(2):
        f = torch.load(wd / "layers" / f"layer_{l:02d}.pt")
        assert f["types"] == types[l].tolist() and "bits" not in f
        for e in range(8):
            for p, t in zip(("w1", "w3", "w2"), types[l, e]):
                entry = f["tensors"][f"block_sparse_moe.experts.{e}.{p}"]
                assert entry.get("type", f"mcq{entry.get('bits')}") == t
                stored += entry["data"].numel()
    assert stored == r["expert_bytes"]
    register()
    rd = gguf.GGUFReader(path)
    assert "mcmoe.expert_bits" not in rd.fields
    assert sum(int(t.n_bytes) for t in rd.tensors) == r["total_bytes"]
    from mcmoe_gguf.gguf.types import type_name
    tensors = {t.name: t for t in rd.tensors}
    for l in range(2):
        for p, gname in enumerate(("ffn_gate", "ffn_up", "ffn_down")):
            ts = [tensors[f"blk.{l}.{gname}.{e}.weight"] for e in range(8)]
            assert [type_name(int(t.tensor_type)).lower() for t in ts] == list(types[l, :, p])
            by_offset = sorted(ts, key=lambda t: t.data_offset)
            kinds = [int(t.tensor_type) for t in by_offset]
            assert all(k not in kinds[i + 1:] or kinds[i + 1] == k for i, k in enumerate(kinds))   # grouped
            assert all(a.data_offset + a.n_bytes == b.data_offset for a, b in zip(by_offset, by_offset[1:]))


def test_llama_cpp_perplexity_of_a_ladder_file_equals_fake_quant(ckpt, ladder_run):
    """i-quant, k-quant and mcq experts side by side in one layer: the engine computes what the stored
    state means (within the 0.5% of its 8-bit activation rounding)."""
    from mcmoe_gguf.apps.evaluate import ppl_fake_quant, ppl_llama
    _, wd, path = ladder_run
    text = (ckpt / "calib.txt").read_text()
    ref = ppl_fake_quant(wd, text, ctx=64, max_chunks=16)
    got = ppl_llama(path, text, ctx=64, max_chunks=16, n_threads=2, progress=False, odp=False)
    assert got["tokens"] == ref["tokens"]
    assert abs(got["ppl"] / ref["ppl"] - 1) < 0.005, (got, ref)


def test_a_ladder_accepts_one_and_a_half_bits(ckpt, tmp_path):
    """The paper's program stops at 1.625 (its per-layer guard); a ladder with mcq1 (1.25 real bpw) in it
    goes down to that."""
    cfg = dict(n_seq=8, seq_len=64, ladder="mcq1,iq1_s,iq2_xxs")
    r = pmq.quantize(ckpt, tmp_path / "q", pmq.PMQConfig(budget="1.5", **cfg), progress=False)
    assert 1.4 < r["expert_bpw"] <= 1.5
    with pytest.raises(allocate.InfeasibleBudget, match=r"useful range is 1.25 "):
        pmq.quantize(ckpt, tmp_path / "q2", pmq.PMQConfig(budget="1.2", **cfg), progress=False)
    assert not list((tmp_path / "q2" / "stats").glob("*"))          # refused before calibrating a layer
    with pytest.raises(allocate.InfeasibleBudget, match=r"useful range is 1.625 "):
        pmq.quantize(ckpt, tmp_path / "q3", pmq.PMQConfig(budget="1.5", n_seq=8, seq_len=64), progress=False)


@pytest.mark.parametrize("cfg, match", [
    (dict(ladder="full", strategy="uniform:2"), "only 'pmq'"),
    (dict(ladder="mcq1,iq7_q"), "unknown type 'iq7_q'"),
    (dict(ladder="full", granularity="row"), "granularity must be"),
])
def test_bad_ladder_settings_fail_before_any_work(ckpt, tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        pmq.quantize(ckpt, tmp_path / "q", pmq.PMQConfig(n_seq=8, seq_len=64, **cfg), progress=False)
    assert not (tmp_path / "q" / "layers").exists() or not any((tmp_path / "q" / "layers").iterdir())


def test_allocation_json_and_layer_files_agree(ladder_run):
    r, wd, _ = ladder_run
    alloc = json.loads((wd / "allocation.json").read_text())
    assert alloc["types"] == r["types"] and alloc["mix"] == r["mix"]


def test_inspect_shows_every_projections_type(ladder_run, tmp_path):
    from mcmoe_gguf.apps.inspect import describe, describe_gguf, heatmap
    r, wd, path = ladder_run
    types = np.array(r["types"], dtype=object)
    text = describe(wd)
    for l in range(2):
        for p, name in enumerate(("gate", "up", "down")):
            assert f"  {l:3d} {name:<4s} | " + " ".join(f"{t:<7s}" for t in types[l, :, p]) in text
    g = describe_gguf(path)
    assert "  layer   1 down: " + " ".join(f"{t.upper():<7s}" for t in types[1, :, 2]) in g
    assert heatmap(wd, tmp_path / "h.png").stat().st_size > 1000
