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
    assert ladder.resolve("mcn") == ladder.resolve("full")[:3] + ("mcn2", "mcn3") + ladder.STOCK_TYPES
    assert ladder.resolve("mcn2,iq1_s") == ("mcn2", "iq1_s")
    # a name inside a list expands in place, each type once
    assert ladder.resolve("full,q5_k,q6_k") == ladder.resolve("full") + ("q5_k", "q6_k")
    assert ladder.resolve("q6_k,stock,iq1_s") == ("q6_k",) + ladder.STOCK_TYPES
    assert ladder.resolve("full+q5_k+q6_k") == ladder.resolve("full,q5_k,q6_k")
    with pytest.raises(ValueError, match="paper's per-expert program"):
        ladder.resolve("mcq,q6_k")
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


@pytest.mark.parametrize("granularity", ["projection", "expert", "layer"])
@pytest.mark.parametrize("seed", range(3))
def test_speed_floor_is_optimal_against_brute_force(granularity, seed):
    """With a decode-speed floor the program is the best choice whose phi-weighted mat-vec time is at most
    the reference type's, by brute force; without the floor the same case chooses a slower file."""
    rng = np.random.default_rng(100 + seed)
    E, P, T = 3, 2, 3
    phi, w = rng.dirichlet(np.ones(E))[None], rng.random((1, E)) + 0.2
    eps = np.sort(rng.random((1, E, P, T)), axis=-1)[..., ::-1] * rng.random((1, E, P, 1))
    nbytes = np.array([[1, 2, 3], [1, 2, 4]]) * 64
    us = np.array([[6.0, 4.0, 3.0], [7.0, 4.5, 3.5]])        # the cheapest type decodes slowest (an i-quant)
    floor = us[:, 1]                                          # as fast as all in the middle type
    n = 2 * 1024
    bpw = 1.2 + 0.3 * seed
    a = allocate.allocate_ladder(phi, w, eps, nbytes, n, bpw, granularity=granularity, speed=(us, floor))
    cost = phi[0, :, None, None] * w[0, :, None, None] * eps[0] ** 2
    size = np.broadcast_to(nbytes, (E, P, T)).astype(float)
    tm = phi[0, :, None, None] * np.broadcast_to(us, (E, P, T))
    if granularity == "expert":
        cost, size, tm = cost.sum(1), size.sum(1), tm.sum(1)
    elif granularity == "layer":
        cost, size, tm = cost.sum(0), size.sum(0), tm.sum(0)
    cost, size, tm = (x.reshape(-1, T) for x in (cost, size, tm))
    cap = int(bpw * E * n / 8)
    limit = phi.sum() * floor.sum()
    best = None
    for c in itertools.product(range(T), repeat=len(cost)):
        sz = sum(size[i, j] for i, j in enumerate(c))
        if sz <= cap and sum(tm[i, j] for i, j in enumerate(c)) <= limit + 1e-9:
            key = (round(sum(cost[i, j] for i, j in enumerate(c)), 12), sz)
            best = key if best is None or key < best else best
    if best is None:
        with pytest.raises(allocate.SlowerThanFloor, match="speed floor unreachable"):
            allocate.allocate_ladder(phi, w, eps, nbytes, n, bpw, granularity=granularity, speed=(us, floor))
        return
    assert a.objective == pytest.approx(best[0], rel=1e-9, abs=1e-12) and a.expert_bytes == best[1]
    chosen = np.take_along_axis(np.broadcast_to(us, (1, E, P, T)), a.choice[..., None], 3)[..., 0]
    assert (phi[0, :, None] * chosen[0]).sum() <= limit + 1e-9
    free = allocate.allocate_ladder(phi, w, eps, nbytes, n, bpw, granularity=granularity)
    chosen = np.take_along_axis(np.broadcast_to(us, (1, E, P, T)), free.choice[..., None], 3)[..., 0]
    if (phi[0, :, None] * chosen[0]).sum() > limit + 1e-9:      # the floor bound: it cost some quality
        assert free.objective < a.objective


def test_speed_floor_binds():
    """The case above with granularity expert, seed 0: unconstrained, the program picks the slow cheap type
    for an expert; the floor moves it to faster types at some cost."""
    rng = np.random.default_rng(100)
    phi, w = rng.dirichlet(np.ones(3))[None], rng.random((1, 3)) + 0.2
    eps = np.sort(rng.random((1, 3, 2, 3)), axis=-1)[..., ::-1] * rng.random((1, 3, 2, 1))
    nbytes, us = np.array([[1, 2, 3], [1, 2, 4]]) * 64, np.array([[6.0, 4.0, 3.0], [7.0, 4.5, 3.5]])
    free = allocate.allocate_ladder(phi, w, eps, nbytes, 2048, 1.2, granularity="expert")
    held = allocate.allocate_ladder(phi, w, eps, nbytes, 2048, 1.2, granularity="expert", speed=(us, us[:, 1]))
    assert (free.choice == 0).any() and not (held.choice == 0).any()
    assert free.objective < held.objective


def test_speed_floor_refuses_what_no_type_reaches():
    phi, w = np.full((1, 2), 0.5), np.ones((1, 2))
    eps = np.ones((1, 2, 1, 2))
    with pytest.raises(allocate.SlowerThanFloor, match=r"fastest types decode at 2.000x"):
        allocate.allocate_ladder(phi, w, eps, np.array([[64, 128]]), 1024, 1.0,
                                 speed=(np.array([[8.0, 6.0]]), np.array([3.0])))
    with pytest.raises(allocate.SlowerThanFloor, match="within the byte budget"):   # fast type does not fit
        allocate.allocate_ladder(phi, w, eps, np.array([[64, 128]]), 1024, 0.5,
                                 speed=(np.array([[8.0, 2.0]]), np.array([3.0])))


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
    eps = ladder.measure_eps(moe, x, types, pmq.PMQConfig(method="rtn", eps_holdout=0), progress=False)
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


def test_holdout_mask_holds_out_evenly_spaced_contiguous_runs():
    m = ladder.holdout_mask(160, 0.25)
    runs = [int(i) for i in torch.where(m)[0]]
    assert runs == [i for r in (3, 7, 11, 15) for i in range(10 * r, 10 * r + 10)]
    assert not ladder.holdout_mask(160, 0.0).any()
    assert int(ladder.holdout_mask(1000, 0.5).sum()) == 496    # the 8 odd runs: 62 tokens each (even: 63)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="eps_holdout must be in"):
            ladder.holdout_mask(10, bad)


@torch.no_grad()
def test_held_out_eps_equals_a_hand_computation(layer0):
    """eps_holdout: the quantizer sees only the tokens outside the held-out runs (GPTQ's Hessian, the
    importance of ggml's quantizers), the error is measured on the held-out routed tokens and scaled by
    routed / held-out."""
    from mcmoe_gguf.quant.calibration import expert_inner
    from mcmoe_gguf.quant.gptq import GPTQ
    moe, x = layer0
    types = ("iq2_xxs", "mcn2")
    eps = ladder.measure_eps(moe, x, types, pmq.PMQConfig(method="gptq", eps_holdout=0.25), progress=False)
    _, wts, ids = moe.route(x)
    held = ladder.holdout_mask(x.shape[0], 0.25)
    checked = 0
    for e in range(8):
        tok, slot = torch.where(ids == e)
        h = held[tok]
        if not h.any() or h.all():
            continue
        xe, g, xf = x[tok[h]], wts[tok[h], slot[h]][:, None], x[tok[~h]]
        scale = len(tok) / int(h.sum())
        W = {p: getattr(moe.experts[e], p).weight.detach() for p in ("w1", "w2", "w3")}
        ref = expert_forward(W["w1"], W["w2"], W["w3"], xe)
        imp = (xf.double() ** 2).mean(0).float().numpy()          # fit tokens only
        q1 = torch.from_numpy(ggml().dequantize(ggml().quantize(W["w1"].numpy(), "iq2_xxs", imp), "iq2_xxs",
                                                W["w1"].shape[1]))
        want = (scale * float((g * (ref - expert_forward(q1, W["w2"], W["w3"], xe))).pow(2).sum())) ** 0.5
        assert eps[e, 0, 0] == pytest.approx(want, rel=1e-5)
        Hd = GPTQ(W["w2"].shape[1])
        Hd.add_batch(expert_inner(W["w1"], W["w3"], xf))
        q2 = Hd.quantize_mcn(W["w2"].float(), 2).dequantized
        want = (scale * float((g * (ref - expert_forward(W["w1"], q2, W["w3"], xe))).pow(2).sum())) ** 0.5
        assert eps[e, 2, 1] == pytest.approx(want, rel=1e-4)
        checked += 1
    assert checked >= 4


def test_held_out_eps_shows_what_gptq_fits(layer0):
    """Why eps is held out: on its own calibration tokens a GPTQ'd type looks better than on tokens it did
    not see, much more than a type rounded with the importance alone does."""
    moe, x = layer0
    types = ("iq2_xxs", "mcn2")
    cfg = pmq.PMQConfig(method="gptq", eps_holdout=0.25)
    held_out = ladder.measure_eps(moe, x, types, cfg, progress=False)
    # the same fit, measured on the tokens it was fitted on: the held-out runs dropped from x
    keep = ~ladder.holdout_mask(x.shape[0], 0.25)
    in_sample = ladder.measure_eps(moe, x[keep], types, pmq.PMQConfig(method="gptq", eps_holdout=0), progress=False)
    ok = (held_out > 0) & (in_sample > 0)
    ratio = np.where(ok, held_out / np.where(ok, in_sample, 1), np.nan)
    # down projection (the largest input dimension: the most room to fit); normalised per token count
    n_all = np.array([int((moe.route(x)[2] == e).any(-1).sum()) for e in range(8)], dtype=float)
    n_fit = np.array([int((moe.route(x[keep])[2] == e).any(-1).sum()) for e in range(8)], dtype=float)
    norm = (n_fit / n_all) ** 0.5       # held-out eps is scaled to all routed tokens, in-sample to the fit ones
    gptq = np.nanmedian(ratio[:, 2, 1] * norm)
    imp = np.nanmedian(ratio[:, 2, 0] * norm)
    assert gptq > 1.1 * imp, (gptq, imp)


@pytest.mark.parametrize("t, method", [("iq2_xxs", "rtn"), ("q2_k", "rtn"), ("mcq2", "gptq"), ("mcn2", "gptq"),
                                      ("mcn3", "rtn")])
def test_rows_quantize_independently(layer0, t, method):
    """What eps_rows relies on: the sampled rows quantized alone are exactly those rows of the whole
    matrix quantized (ggml's blocks and GPTQ's updates run along rows)."""
    from mcmoe_gguf.quant.quantizers import quantize_matrix
    moe, x = layer0
    W = moe.experts[3].w1.weight.detach()
    R = ladder._sample(W.shape[0], 37, 5, W.device)
    cfg = pmq.PMQConfig(method=method)
    _, full = quantize_matrix(W, t, x, cfg)
    _, part = quantize_matrix(W[R], t, x, cfg)
    assert len(R) == 37 and torch.equal(full[R], part)


def test_sampled_rows_estimate_the_measured_eps(layer0):
    """eps_rows = every row is the exact statistic; fewer rows estimate it (unbiased for the down
    projection's rows, up to cross terms for gate/up) and keep the types' order."""
    moe, x = layer0
    types = ("iq1_s", "iq2_xxs", "q4_k")
    exact = ladder.measure_eps(moe, x, types, pmq.PMQConfig(method="rtn", eps_holdout=0), progress=False)
    assert np.allclose(ladder.measure_eps(moe, x, types, pmq.PMQConfig(method="rtn", eps_rows=10**6, eps_holdout=0),
                                          progress=False), exact, rtol=1e-6)
    est = ladder.measure_eps(moe, x, types, pmq.PMQConfig(method="rtn", eps_rows=64, eps_holdout=0), progress=False)
    ok = exact > 0
    rel = np.abs(est[ok] / exact[ok] - 1)
    assert np.median(rel) < 0.2 and rel.max() < 1.0, (np.median(rel), rel.max())
    assert (np.argsort(est, -1)[ok[..., 0]] == np.argsort(exact, -1)[ok[..., 0]]).mean() > 0.9
    # token subsampling: at most 8 tokens per expert, scaled to the expert's count
    few = ladder.measure_eps(moe, x, types, pmq.PMQConfig(method="rtn", eps_tokens=8, eps_holdout=0), progress=False)
    assert 0.3 < np.median(few[ok] / exact[ok]) < 3.0


def test_projection_errors_add_up_to_the_whole_experts(layer0):
    """With gamma = 2 the program sums squared errors over projections: check that this is close to the
    squared error of quantizing all three at once (it is exact when the errors are uncorrelated)."""
    moe, x = layer0
    eps = ladder.measure_eps(moe, x, ("iq2_xxs",), pmq.PMQConfig(method="rtn", eps_holdout=0), progress=False)[..., 0]
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


def test_mcn_entries_hold_their_bytes_and_the_no_token_fallback(layer0):
    """An mcn choice is stored as {type, shape, data} with the bytes the runtime reads (formats' twin), GPTQ'd
    with the routed tokens; without tokens it is the reference quantizer with the layer's importance."""
    from mcmoe_gguf.quant import formats
    from mcmoe_gguf.quant.mixes import tensor_bytes
    from mcmoe_gguf.quant.quantizers import importance, quantize_matrix
    moe, x = layer0
    W = moe.experts[1].w3.weight.detach()
    for t in ("mcn2", "mcn3"):
        entry, deq = quantize_matrix(W, t, x[:300], pmq.PMQConfig())
        assert entry["type"] == t and entry["shape"] == list(W.shape)
        assert entry["data"].numel() == tensor_bytes(t, *W.shape)
        assert torch.equal(torch.from_numpy(formats.mcn_dequantize(entry["data"].numpy(), formats.mcn_spec(t).bits,
                                                                   W.shape[1])), deq)
        imp = importance(x)
        entry, deq = quantize_matrix(W, t, x[:0], pmq.PMQConfig(), fallback_importance=imp)
        assert np.array_equal(entry["data"].numpy(), formats.mcn_quantize(W, formats.mcn_spec(t).bits, imp))
    with pytest.raises(ValueError, match="multiples of 256"):
        tensor_bytes("mcn2", 4, 128)


def test_mct_entries_hold_their_bytes_and_the_no_token_fallback(layer0):
    """An mct choice is stored as {type, shape, data} with the bytes the runtime reads (trellis.py's twin), by
    BlockLDLQ with the routed tokens; without tokens it is the C reference quantizer (= trellis.mct_quantize)
    with the layer's importance."""
    from mcmoe_gguf.quant import trellis
    from mcmoe_gguf.quant.mixes import tensor_bytes
    from mcmoe_gguf.quant.quantizers import importance, quantize_matrix
    moe, x = layer0
    W = moe.experts[1].w3.weight.detach()
    for t in ("mct1", "mct2", "mct3"):
        k = trellis.mct_spec(t).bits
        entry, deq = quantize_matrix(W, t, x[:300], pmq.PMQConfig())
        assert entry["type"] == t and entry["shape"] == list(W.shape)
        assert entry["data"].numel() == tensor_bytes(t, *W.shape)
        assert torch.equal(torch.from_numpy(trellis.mct_dequantize(entry["data"].numpy(), k, W.shape[1])), deq)
        imp = importance(x)
        entry, deq = quantize_matrix(W, t, x[:0], pmq.PMQConfig(), fallback_importance=imp)
        assert np.array_equal(entry["data"].numpy(), trellis.mct_quantize(W, k, imp))


@pytest.mark.parametrize("ladder, ours", [("mcn2,mcn3,iq2_xxs", {"mcn2", "mcn3"}),
                                          ("mct1,mct2,mct3,iq2_xxs", {"mct1", "mct2", "mct3"})])
def test_a_ladder_file_of_our_types_runs_in_llama_cpp_as_its_fake_quant(ckpt, tmp_path, ladder, ours):
    """mcn or mct experts beside i-quants in one layer: the file holds the chosen types and the engine computes
    what the stored state means."""
    from mcmoe_gguf.apps.evaluate import ppl_fake_quant, ppl_llama
    from mcmoe_gguf.gguf.export import export_pmq
    r = pmq.quantize(ckpt, tmp_path / "q", pmq.PMQConfig(budget="2.5", n_seq=8, seq_len=64, ladder=ladder),
                     progress=False)
    kinds = set(np.array(r["types"], dtype=object).ravel())
    assert kinds & ours and r["expert_bpw"] <= 2.5
    path = export_pmq(tmp_path / "q", tmp_path / "m.gguf", progress=False)
    text = (ckpt / "calib.txt").read_text()
    ref = ppl_fake_quant(tmp_path / "q", text, ctx=64, max_chunks=16)
    got = ppl_llama(path, text, ctx=64, max_chunks=16, n_threads=2, progress=False, odp=False)
    assert abs(got["ppl"] / ref["ppl"] - 1) < 0.005, (got, ref)


@pytest.mark.parametrize("cfg, match", [
    (dict(ladder="full", strategy="uniform:2"), "only 'pmq'"),
    (dict(ladder="mcq1,iq7_q"), "unknown type 'iq7_q'"),
    (dict(ladder="full", granularity="row"), "granularity must be"),
    (dict(min_speed="q2_k"), "--min-speed needs a ladder"),
    (dict(ladder="full", min_speed="q2_k,q3_k"), "one type"),
    (dict(ladder="full", min_speed="q2_k"), "needs each type's mat-vec cost"),
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


def test_a_speed_floor_run_keeps_the_routed_experts_expected_time(ckpt, tmp_path):
    """--min-speed q2_k with a made-up cost table where the cheap i-quant is slow: every layer's
    phi-weighted mat-vec time stays at or below all-q2_k's, the free run breaks it, and a resumed run
    keeps the cost table it started with."""
    cfg = dict(budget="2.25", n_seq=8, seq_len=64, ladder="iq1_s,iq2_xxs,q2_k,q4_k")
    costs = {"iq1_s": 5.0, "iq2_xxs": 5.0, "q2_k": 4.0, "q4_k": 0.5}
    free = pmq.quantize(ckpt, tmp_path / "free", pmq.PMQConfig(**cfg), progress=False)
    held = pmq.quantize(ckpt, tmp_path / "held", pmq.PMQConfig(min_speed="q2_k", **cfg), progress=False,
                        kernel_costs=costs)
    assert json.loads((tmp_path / "held" / "kernel_costs.json").read_text()) == costs

    def over(r, d):
        out = []
        for l, layer in enumerate(r["types"]):
            phi = json.loads((d / "stats" / f"layer_{l:02d}.json").read_text())["phi"]
            t = sum(p * sum(costs[x] for x in proj) for p, proj in zip(phi, layer))
            out.append(t - 3 * costs["q2_k"])
        return np.array(out)
    assert (over(held, tmp_path / "held") <= 1e-9).all()
    assert (over(free, tmp_path / "free") > 0).any()
    assert held["expert_bpw"] <= 2.25
    # resume after losing the last layer: the stored table rules, not the one passed now
    (tmp_path / "held" / "layers" / "layer_01.pt").unlink()
    (tmp_path / "held" / "allocation.json").unlink()
    again = pmq.quantize(ckpt, tmp_path / "held", pmq.PMQConfig(min_speed="q2_k", **cfg), progress=False,
                         kernel_costs={k: 1.0 for k in costs})
    assert again["types"] == held["types"]
    # a table lacking a type is refused and not stored (a rerun with a good one then works)
    with pytest.raises(ValueError, match="kernel costs lack iq1_s"):
        pmq.quantize(ckpt, tmp_path / "new", pmq.PMQConfig(min_speed="q2_k", **cfg), progress=False,
                     kernel_costs={k: v for k, v in costs.items() if k != "iq1_s"})
    assert not (tmp_path / "new" / "kernel_costs.json").exists()
