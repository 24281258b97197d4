"""PMQ: calibration statistics against a hand computation, the resumable pipeline, the stored state."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import calibrated_checkpoint, crash_on_call, random_state, save_checkpoint, small_config
from mcmoe_gguf.quant import calibration
from mcmoe_gguf.quant import formats
from mcmoe_gguf.quant import pmq
from mcmoe_gguf.model.arch import mixtral as mx


def _toy_moe(seed=0):
    hp = mx.MixtralHParams(vocab_size=16, hidden_size=128, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(seed)
    moe = mx.SparseMoeBlock(hp)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    with torch.no_grad():
        moe.gate.weight[3] = -10.0 * moe.gate.weight[3].sign()   # expert 3: pushed away from most tokens
    return moe


def test_layer_stats_equal_a_hand_computation():
    moe = _toy_moe()
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(1))
    s = calibration.moe_stats(0, moe, x)
    E = 4
    counts = [0] * E
    wsum = [0.0] * E
    err = np.zeros((E, 3))
    ratios = []
    for t in range(x.shape[0]):                       # token by token, expert by expert
        p = torch.softmax(moe.gate.weight @ x[t], -1)
        top = torch.topk(p, 2)
        w = top.values / top.values.sum()
        ratios.append((w[1] / w[0]).item())
        for slot in range(2):
            e = top.indices[slot].item()
            counts[e] += 1
            wsum[e] += w[slot].item()
            ex = moe.experts[e]
            y = ex(x[t])
            for j, b in enumerate((1, 2, 3)):
                q = [calibration.rtn_dequant(getattr(ex, n).weight, b) for n in ("w1", "w2", "w3")]
                yq = q[1] @ (torch.nn.functional.silu(q[0] @ x[t]) * (q[2] @ x[t]))
                err[e, j] += (w[slot] * (y - yq)).pow(2).sum().item()
    assert s.counts == counts and sum(counts) == 80
    np.testing.assert_allclose(s.phi, np.array(counts) / 80)
    np.testing.assert_allclose(s.w, [wsum[e] / counts[e] if counts[e] else 0.0 for e in range(E)], rtol=1e-5)
    np.testing.assert_allclose(s.eps, np.sqrt(err), rtol=1e-4)
    assert s.mu == pytest.approx(float(torch.tensor(ratios).median()))
    assert all(e[0] >= e[1] >= e[2] for e in np.asarray(s.eps)[np.array(counts) > 0])


def test_never_routed_expert_gives_zero_stats_not_nan():
    moe = _toy_moe()
    x = torch.randn(30, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moe.gate.weight[3] = -1e3 * (x.mean(0) / x.mean(0).norm())   # far below every other logit
    s = calibration.moe_stats(0, moe, x)
    assert s.counts[3] == 0 and s.phi[3] == 0 and s.w[3] == 0 and s.eps[3] == [0.0, 0.0, 0.0]
    assert np.isfinite(np.asarray(s.eps)).all()


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory, small_tokenizer_dir):
    return calibrated_checkpoint(tmp_path_factory.mktemp("pmq"), small_tokenizer_dir, seed=3)


CFG = dict(budget="2.25", n_seq=8, seq_len=64)


def _layer_files(outdir):
    return {p.name: torch.load(p) for p in sorted((outdir / "layers").glob("layer_*.pt"))}


def _assert_same_state(a, b):
    fa, fb = _layer_files(a), _layer_files(b)
    assert fa.keys() == fb.keys() and len(fa) == 2
    for k in fa:
        assert fa[k].get("bits") == fb[k].get("bits") and fa[k]["types"] == fb[k]["types"]
        assert fa[k]["tensors"].keys() == fb[k]["tensors"].keys()
        for name, ea in fa[k]["tensors"].items():
            assert torch.equal(ea["data"], fb[k]["tensors"][name]["data"]), name
    assert json.loads((a / "allocation.json").read_text()) == json.loads((b / "allocation.json").read_text())
    ga, gb = (torch.load(d / "layers" / "globals.pt")["tensors"] for d in (a, b))     # embeddings, output
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k]["data"], gb[k]["data"]) for k in ga)


@pytest.mark.parametrize("scope, ladder", [("layer", "mcq"), ("model", "mcq"), ("model", "mcq2,iq2_xxs,q2_k")])
def test_resume_after_crash_gives_identical_state(micro_checkpoint, tmp_path, monkeypatch, scope, ladder):
    cfg = pmq.PMQConfig(scope=scope, ladder=ladder, **CFG)
    pmq.quantize(micro_checkpoint, tmp_path / "straight", cfg, progress=False)

    real = pmq.quantize_experts
    monkeypatch.setattr(pmq, "quantize_experts", crash_on_call(real, 2))     # the second layer's experts
    with pytest.raises(KeyboardInterrupt):
        pmq.quantize(micro_checkpoint, tmp_path / "crashed", cfg, progress=False)
    assert (tmp_path / "crashed" / "layers" / "layer_00.pt").exists()
    assert not (tmp_path / "crashed" / "layers" / "layer_01.pt").exists()
    monkeypatch.setattr(pmq, "quantize_experts", real)
    pmq.quantize(micro_checkpoint, tmp_path / "crashed", cfg, progress=False)
    _assert_same_state(tmp_path / "straight", tmp_path / "crashed")


def test_stored_state_meets_budget_and_constraints(micro_checkpoint, tmp_path):
    r = pmq.quantize(micro_checkpoint, tmp_path / "q", pmq.PMQConfig(**CFG), progress=False)
    bits = np.array(r["bits"])
    assert ((bits == 3).sum(1) >= 1).all() and ((bits == 2).sum(1) >= 1).all()
    # bytes recomputed from the stored blobs themselves
    stored = sum(e["data"].numel() for f in _layer_files(tmp_path / "q").values()
                 for n, e in f["tensors"].items() if "experts" in n)
    assert stored == r["expert_bytes"] and 8 * stored / (2 * 8 * 3 * 256 * 256) <= 2.25
    # every stored mcq tensor decodes to its declared width's grid; the rest are in the mix's ggml types
    mix = r["mix"]
    for f in _layer_files(tmp_path / "q").values():
        for name, e in f["tensors"].items():
            if "bits" in e:
                q, d, m = formats.unpack(e["data"].numpy(), e["bits"], e["shape"][1])
                assert q.max() <= 2 ** e["bits"] - 1 and q.shape == tuple(e["shape"])
            else:
                proj = name.split(".")[-1]
                assert e["type"] == mix[{"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                                         "o_proj": "attn_o"}[proj]]


def test_other_settings_in_same_workdir_are_refused(micro_checkpoint, tmp_path):
    pmq.quantize(micro_checkpoint, tmp_path / "q", pmq.PMQConfig(**CFG), progress=False)
    with pytest.raises(pmq.WorkdirMismatch, match="other settings"):
        pmq.quantize(micro_checkpoint, tmp_path / "q", pmq.PMQConfig(**{**CFG, "budget": "2.0"}), progress=False)


def test_fake_quant_model_uses_the_stored_bytes(micro_checkpoint, tmp_path):
    from mcmoe_gguf.apps.evaluate import fake_quant_model
    pmq.quantize(micro_checkpoint, tmp_path / "q", pmq.PMQConfig(**CFG), progress=False)
    model, _ = fake_quant_model(tmp_path / "q")
    f = torch.load(tmp_path / "q" / "layers" / "layer_01.pt")
    e = f["tensors"]["block_sparse_moe.experts.5.w2"]
    want = formats.dequantize(e["data"].numpy(), e["bits"], e["shape"][1])
    got = model.model.layers[1].block_sparse_moe.experts[5].w2.weight.detach().numpy()
    np.testing.assert_array_equal(got, want)


def test_pmq_gguf_holds_the_stored_bytes(micro_checkpoint, tmp_path):
    import gguf

    from mcmoe_gguf.gguf.export import export_pmq
    from mcmoe_gguf.model.arch.mixtral import permute_qk
    from mcmoe_gguf.gguf.types import register
    pmq.quantize(micro_checkpoint, tmp_path / "q", pmq.PMQConfig(**CFG), progress=False)
    path = export_pmq(tmp_path / "q", tmp_path / "m.gguf", progress=False)
    register()
    rd = gguf.GGUFReader(path)
    kv = {f.name: f.contents() for f in rd.fields.values()}
    tensors = {t.name: t for t in rd.tensors}
    layers = _layer_files(tmp_path / "q")
    bits = [layers[f"layer_{i:02d}.pt"]["bits"] for i in range(2)]
    assert kv["mcmoe.expert_bits"] == [b for row in bits for b in row]
    assert len(kv["mcmoe.odp.mu"]) == 2 and 0 < kv["mcmoe.odp.mu"][0] <= 1
    for i in range(2):
        f = layers[f"layer_{i:02d}.pt"]["tensors"]
        for e in range(8):
            for proj, gname in (("w1", "ffn_gate"), ("w3", "ffn_up"), ("w2", "ffn_down")):
                t = tensors[f"blk.{i}.{gname}.{e}.weight"]
                assert int(t.tensor_type) == formats.TYPES[bits[i][e]].type_id
                assert t.data.tobytes() == f[f"block_sparse_moe.experts.{e}.{proj}"]["data"].numpy().tobytes()
        # experts of one width are adjacent in the file, widest first: the loader groups them without copying
        gate = sorted((tensors[f"blk.{i}.ffn_gate.{e}.weight"] for e in range(8)), key=lambda t: t.data_offset)
        assert [formats.TYPES_BY_ID[int(t.tensor_type)].bits for t in gate] == sorted(bits[i], reverse=True)
        assert all(a.data_offset + a.n_bytes == b.data_offset for a, b in zip(gate, gate[1:]))
        q = f["self_attn.q_proj"]
        rows = q["data"].numpy().reshape(q["shape"][0], -1)
        assert tensors[f"blk.{i}.attn_q.weight"].data.tobytes() == permute_qk(torch.from_numpy(rows), 8).numpy().tobytes()


def test_file_bytes_equal_the_size_report_and_embeddings_match_fake_quant(micro_checkpoint, tmp_path):
    import gguf

    from mcmoe_gguf.apps.evaluate import fake_quant_model
    from mcmoe_gguf.gguf.export import export_pmq
    from mcmoe_gguf.gguf.types import register
    r = pmq.quantize(micro_checkpoint, tmp_path / "q", pmq.PMQConfig(**CFG), progress=False)
    register()
    rd = gguf.GGUFReader(export_pmq(tmp_path / "q", tmp_path / "m.gguf", progress=False))
    assert sum(int(t.n_bytes) for t in rd.tensors) == r["total_bytes"]
    model, _ = fake_quant_model(tmp_path / "q")
    for name, key, module in (("token_embd.weight", "embed", model.model.embed_tokens),
                              ("output.weight", "output", model.lm_head)):
        t = next(t for t in rd.tensors if t.name == name)
        qt = gguf.GGMLQuantizationType[r["mix"][key].upper()]
        assert t.tensor_type == qt
        # gguf-py's dequantizer (independent of the ggml path that wrote them) gives the torch weights
        want = gguf.quants.dequantize(t.data, qt).reshape(512, 256)
        np.testing.assert_array_equal(module.weight.detach().numpy(), want)


def test_llama_cpp_perplexity_of_pmq_file_equals_fake_quant(micro_checkpoint, tmp_path):
    """The engine computes what the quantized state means: llama.cpp PPL of the PMQ GGUF within 0.5% of
    the torch fake-quant model's (the gap is the engine's 8-bit activation rounding, Q8_0/Q8_1)."""
    from mcmoe_gguf.apps.evaluate import ppl_fake_quant, ppl_llama
    from mcmoe_gguf.gguf.export import export_pmq
    pmq.quantize(micro_checkpoint, tmp_path / "q", pmq.PMQConfig(**CFG), progress=False)
    path = export_pmq(tmp_path / "q", tmp_path / "m.gguf", progress=False)
    text = (micro_checkpoint / "calib.txt").read_text()
    ref = ppl_fake_quant(tmp_path / "q", text, ctx=64, max_chunks=16)
    got = ppl_llama(path, text, ctx=64, max_chunks=16, n_threads=2, progress=False, odp=False)
    assert got["tokens"] == ref["tokens"]
    assert abs(got["ppl"] / ref["ppl"] - 1) < 0.005, (got, ref)


def test_dimensions_not_multiple_of_256_are_refused_before_work(tmp_path, small_tokenizer_dir):
    """The engine reads activations per 256 (Q8_K): a model with ffn 384 cannot run as mcq, so quantize
    refuses at once, naming the dimension, and creates no work directory."""
    cfg = small_config(n_layers=1, hidden=256, ff=384, vocab=512)
    d = save_checkpoint(tmp_path / "m", cfg, random_state(cfg, seed=3, dtype=torch.float32), small_tokenizer_dir)
    (d / "calib.txt").write_text("some calibration text " * 200)
    with pytest.raises(ValueError, match=r"multiples of 256.*intermediate_size=384"):
        pmq.quantize(d, tmp_path / "wd", pmq.PMQConfig(budget="2.25", n_seq=2, seq_len=16), progress=False)
    assert not (tmp_path / "wd").exists()


def test_eps_method_and_manifests_from_before_it_existed(micro_checkpoint, tmp_path):
    """eps_method changes the statistics (minmax grids err more than mse ones), and a work directory whose
    manifest predates the field (it ran with the default) is still accepted and resumed, not refused."""
    cfg = dict(CFG, strategy="uniform:2", method="rtn")
    pmq.quantize(micro_checkpoint, tmp_path / "mse", pmq.PMQConfig(**cfg), progress=False)
    pmq.quantize(micro_checkpoint, tmp_path / "mm", pmq.PMQConfig(**cfg, eps_method="minmax"), progress=False)
    eps = {k: np.array(json.loads((tmp_path / k / "stats" / "layer_00.json").read_text())["eps"]) for k in ("mse", "mm")}
    used = eps["mse"].sum(1) > 0
    assert (eps["mm"][used] >= eps["mse"][used] * 0.999).all() and (eps["mm"][used] > eps["mse"][used]).any()
    man = json.loads((tmp_path / "mse" / "manifest.json").read_text())
    del man["config"]["eps_method"]
    (tmp_path / "mse" / "manifest.json").write_text(json.dumps(man))
    pmq.quantize(micro_checkpoint, tmp_path / "mse", pmq.PMQConfig(**cfg), progress=False)   # no WorkdirMismatch
    with pytest.raises(pmq.WorkdirMismatch):
        pmq.quantize(micro_checkpoint, tmp_path / "mse", pmq.PMQConfig(**cfg, eps_method="minmax"), progress=False)
    with pytest.raises(ValueError, match="eps_method"):
        pmq.quantize(micro_checkpoint, tmp_path / "bad", pmq.PMQConfig(**cfg, eps_method="l1"), progress=False)


def test_manifests_from_before_held_out_eps(micro_checkpoint, tmp_path):
    """A ladder run from before eps_holdout existed measured eps on all its tokens: its manifest means
    eps_holdout = 0 (a resume with 0 continues it, the new default is another run). The paper's program
    never used it: its old manifests mean the default. A share outside [0, 1) is refused before any work."""
    from dataclasses import asdict
    for ladder, want in (("full", 0.0), ("mcq", pmq.PMQConfig.eps_holdout)):
        old = {"config": {k: v for k, v in asdict(pmq.PMQConfig(ladder=ladder)).items() if k != "eps_holdout"}}
        assert pmq._with_defaults(old)["config"]["eps_holdout"] == want
    assert pmq._with_defaults({"config": asdict(pmq.PMQConfig(ladder="full", eps_holdout=0.5))})["config"][
        "eps_holdout"] == 0.5
    for bad in (1.0, -0.25):
        with pytest.raises(ValueError, match="eps_holdout must be in"):
            pmq.quantize(micro_checkpoint, tmp_path / "bad", pmq.PMQConfig(**CFG, eps_holdout=bad), progress=False)
        assert not (tmp_path / "bad").exists()
