"""mix="program" (quant/mix_choice.py): the program's extra items against brute force, the streamed KL of each
outside group against a whole-model torch forward, the chosen mix in the work directory and the file, the
byte cap, resume and bad settings."""
from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import calibrated_checkpoint, crash_on_call
from mcmoe_gguf.model.checkpoint import Checkpoint
from mcmoe_gguf.quant import allocate, mix_choice, mixes, pmq, sensitivity
from mcmoe_gguf.quant.budget import expert_params
from mcmoe_gguf.quant.calibration import calibration_tokens
from mcmoe_gguf.quant.quantizers import ggml_packed, importance

CFG = dict(budget="2.25", n_seq=8, seq_len=64, scope="model", sensitivity="kl", sens_seqs=3, mix="program",
           ladder="iq1_s,q2_k,q4_k")


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory, small_tokenizer_dir):
    return calibrated_checkpoint(tmp_path_factory.mktemp("mixprog"), small_tokenizer_dir, seed=7)


@pytest.fixture(scope="module")
def program_run(micro_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("run") / "q"
    report = pmq.quantize(micro_checkpoint, d, pmq.PMQConfig(**CFG), progress=False)
    return d, report


def test_extra_items_share_the_cap_as_brute_force_says():
    rng = np.random.default_rng(3)
    L, E, P, T = 1, 2, 1, 2
    eps = rng.random((L, E, P, T)) + np.array([1.0, 0.0])      # the wider type is better
    nbytes = np.array([[64, 128]])                              # 2 and 4 bpw of 256 weights
    n = np.full((L, E), 256)
    phi = w = np.ones((L, E))
    xc = np.array([[3.0, 1.0, 0.2], [2.0, 0.5, 0.5]])           # second row: two real choices, the last repeated
    xs = np.array([[100, 200, 400], [150, 300, 300]])
    for budget, xcap in (("2", 250), ("3", 300), ("3", 600), ("4", 450)):
        a = allocate.allocate_ladder(phi, w, eps, nbytes, n, budget, scope="model", extra=(xc, xs, xcap))
        cap = int(budget) * 256 * E // 8 + xcap
        best = None
        for ce in itertools.product(range(T), repeat=E):
            for cx in itertools.product(range(3), range(2)):
                size = sum(nbytes[0, c] for c in ce) + xs[0, cx[0]] + xs[1, cx[1]]
                cost = sum(eps[0, e, 0, c] ** 2 for e, c in enumerate(ce)) + xc[0, cx[0]] + xc[1, cx[1]]
                if size <= cap and (best is None or cost < best[0] - 1e-12):
                    best = (cost, ce, cx)
        got = sum(eps[0, e, 0, c] ** 2 for e, c in enumerate(a.choice[0, :, 0])) + xc[0, a.extra[0]] + xc[1, a.extra[1]]
        assert got == pytest.approx(best[0]), (budget, xcap)
        assert a.choice.max() < T                   # the experts' rows were padded to the extra items' width
        assert a.expert_bytes + a.extra_bytes <= cap
    with pytest.raises(ValueError, match="scope='model'"):
        allocate.allocate_ladder(phi, w, eps, nbytes, n, "3", scope="layer", extra=(xc, xs, 300))
    with pytest.raises(ValueError, match="finite"):
        allocate.allocate_ladder(phi, w, eps, nbytes, n, "3", scope="model", extra=(-xc, xs, 300))


def test_candidates_hold_the_reference_and_pins(micro_checkpoint):
    hp = Checkpoint(micro_checkpoint).hp
    ref = mixes.STOCK["IQ1_S"][2]                   # attn_q iq1_s: not a candidate of its own
    c = mix_choice.candidates(hp, ref)
    assert "iq1_s" in c["attn_q"] and "iq1_s" not in c["attn_k"]
    for g, ts in c.items():
        sizes = [mix_choice.group_bytes(hp, g, t) for t in ts]
        assert sizes == sorted(sizes) and getattr(ref, g) in ts
    assert mix_choice.candidates(hp, ref, {"embed": "q8_0"})["embed"] == ("q8_0",)
    with pytest.raises(ValueError, match="llama.cpp's types"):
        mix_choice.candidates(hp, mixes.MIXES["q8"])
    # the program's costs: one row per group, the measured KL per candidate (noise below 0 counts 0)
    kl = {g: {t: (-1e-9 if i == 0 else 1.0 / (i + 1)) for i, t in enumerate(ts)} for g, ts in c.items()}
    groups, cost, size = mix_choice.items(hp, kl, c)
    assert groups == [g for g in mix_choice.GROUPS if g in c]
    i = groups.index("attn_o")
    assert cost[i, 0] == 0 and cost[i, 1] == 0.5 and size[i, 1] == mix_choice.group_bytes(hp, "attn_o", c["attn_o"][1])


def test_candidates_whose_blocks_do_not_fit_are_left_out():
    """Rows of 96 values: only the 32-value block types can hold them (q8_0 here); 256-block k-quants and
    i-quants are left out, not an error, and a pin that cannot fit is one."""
    hp = SimpleNamespace(hidden_size=96, d_head=24, num_hidden_layers=2, vocab_size=1000, tie_word_embeddings=False,
                         num_attention_heads=4, num_key_value_heads=2)
    ref = mixes.Mix(**{**mixes.STOCK["IQ2_XXS"][2].to_dict(), **{g: "q8_0" for g in mix_choice.GROUPS}})
    c = mix_choice.candidates(hp, ref)
    assert c == {g: ("q8_0",) for g in mix_choice.GROUPS}
    with pytest.raises(ValueError, match="no candidate type fits the rows of embed"):
        mix_choice.candidates(hp, ref, {"embed": "q4_k"})


def _whole_model(ck: Checkpoint, replace: dict):
    model = ck.arch.CompactModel(ck.hp)
    model.model.embed_tokens.weight.data.copy_(replace.get("embed", ck.get(ck.arch.GLOBAL_KEYS["embed"]).float()))
    model.model.norm.weight.data.copy_(ck.get(ck.arch.GLOBAL_KEYS["norm"]).float())
    model.lm_head.weight.data.copy_(replace.get("output", ck.get(ck.arch.GLOBAL_KEYS["lm_head"]).float()))
    for i in range(ck.hp.num_hidden_layers):
        model.model.layers[i] = ck.arch.decoder_layer_from(ck, i)
    return model.eval()


def test_measured_kl_equals_a_whole_model_forward(micro_checkpoint, program_run):
    """Each group's KL, streamed through the layers, against the whole model with that group quantized as the
    probe quantizes it (importance of the float model's inputs on all calibration tokens)."""
    d, _ = program_run
    rep = json.loads((d / "sensitivity.json").read_text())
    ck = Checkpoint(micro_checkpoint)
    text = (micro_checkpoint / "calib.txt").read_text()
    tokens = calibration_tokens(micro_checkpoint / "tokenizer.json", text, CFG["n_seq"], CFG["seq_len"])
    probe = tokens[:CFG["sens_seqs"]]
    float_model = _whole_model(ck, {})
    inputs: dict = {}                # the attention projections' inputs over all calibration tokens
    hooks = [getattr(lay.self_attn, p).register_forward_hook(
        lambda m, i, o, key=(l, p): inputs.setdefault(key, []).append(i[0].reshape(-1, i[0].shape[-1])))
        for l, lay in enumerate(float_model.model.layers) for p in ("q_proj", "o_proj")]
    with torch.no_grad():
        ref = torch.log_softmax(float_model(tokens)[0], -1)[:CFG["sens_seqs"]]
        for hk in hooks:
            hk.remove()
        last = {}
        h = float_model.model.norm.register_forward_hook(lambda m, i, o: last.setdefault("x", o))
        float_model(probe)
        h.remove()

    def kl_of(model):
        with torch.no_grad():
            lq = torch.log_softmax(model(probe)[0], -1)
        return float(torch.nn.functional.kl_div(lq, ref, log_target=True, reduction="sum")) / ref[..., 0].numel()

    checked = 0
    for g, t in (("embed", "q2_k"), ("output", "q3_k"), ("attn_v", "iq2_xxs"), ("attn_o", "q2_k")):
        if g == "embed":
            m = _whole_model(ck, {"embed": ggml_packed(ck.get(ck.arch.GLOBAL_KEYS["embed"]).float(), t, None)[1]})
        elif g == "output":
            W = ck.get(ck.arch.GLOBAL_KEYS["lm_head"]).float()
            m = _whole_model(ck, {"output": ggml_packed(W, t, importance(last["x"].reshape(-1, W.shape[1])))[1]})
        else:
            m = _whole_model(ck, {})
            p = {"attn_v": "v_proj", "attn_o": "o_proj"}[g]
            for l, lay in enumerate(m.model.layers):
                lin = getattr(lay.self_attn, p)
                x = torch.cat(inputs[(l, "o_proj" if g == "attn_o" else "q_proj")])
                lin.weight.data.copy_(ggml_packed(lin.weight.data, t, importance(x))[1])
        want = kl_of(m)
        assert want > 0 and rep["mix_kl"][g][t] == pytest.approx(want, rel=2e-3), (g, t)
        checked += 1
    assert checked == 4
    # a wider type costs less KL (q8_0 near nothing)
    for g in rep["mix_kl"]:
        assert rep["mix_kl"][g]["q8_0"] < 0.1 * max(rep["mix_kl"][g].values())


def test_the_file_holds_the_programs_mix_within_the_reference_bytes(micro_checkpoint, program_run, tmp_path):
    d, report = program_run
    ck = Checkpoint(micro_checkpoint)
    chosen = json.loads((d / "mix.json").read_text())
    assert report["mix"] == chosen
    # the layers hold attention in the chosen types, globals the chosen embeddings/output
    for l in range(ck.hp.num_hidden_layers):
        t = torch.load(d / "layers" / f"layer_{l:02d}.pt")["tensors"]
        for g, p in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_o", "o_proj")):
            assert t[f"self_attn.{p}"]["type"] == chosen[g]
    glob = torch.load(d / "layers" / "globals.pt")["tensors"]
    assert glob["embed"]["type"] == chosen["embed"] and glob["lm_head"]["type"] == chosen["output"]
    # the cap: the experts' budget plus the reference mix ("auto" at 2.25 bpw), as that file would have
    auto = pmq.quantize(micro_checkpoint, tmp_path / "auto", pmq.PMQConfig(**{**CFG, "mix": "auto"}), progress=False)
    ref = mixes.Mix(**auto["mix"])
    n_exp = int(expert_params(ck.hp).sum())
    assert auto["total_bytes"] <= report["total_bytes"] <= 2.25 * n_exp // 8 + mixes.nonexpert_bytes(ck.hp, ref)
    assert chosen != auto["mix"]        # on this model it moves bytes (otherwise the test shows nothing)
    # the reference file (auto's experts, auto's mix) fits the same cap, so the program's summed KL is at most its
    rep = json.loads((d / "sensitivity.json").read_text())

    def total_kl(types, mix):
        out = sum(rep["mix_kl"][g][mix[g]] for g in rep["mix_kl"])
        for l in range(ck.hp.num_hidden_layers):
            st = json.loads((d / "stats" / f"fp_layer_{l:02d}.json").read_text())
            idx = np.vectorize(st["ladder"].index)(np.array(types[l], dtype=object))
            out += rep["scale"][l] * sensitivity.predicted(st["phi"], st["w"], st["ladder_eps"], idx, allocate.DEFAULT_ALPHA, allocate.DEFAULT_BETA, allocate.DEFAULT_GAMMA)
        return out
    assert total_kl(report["types"], chosen) <= total_kl(auto["types"], auto["mix"]) * (1 + 1e-9)
    assert total_kl(report["types"], chosen) < 0.99 * total_kl(auto["types"], auto["mix"])


def test_bad_settings_fail_before_work(micro_checkpoint, tmp_path):
    for bad, msg in ((dict(sensitivity="none"), "--sensitivity kl"), (dict(scope="layer", sensitivity="none"), "--scope model"),
                     (dict(ladder="mcq", sensitivity="none"), "needs a ladder"),
                     (dict(embed_type="mcq2"), "unknown|llama.cpp")):
        with pytest.raises(ValueError, match=msg):
            pmq.quantize(micro_checkpoint, tmp_path / "q", pmq.PMQConfig(**{**CFG, **bad}), progress=False)
        assert not (tmp_path / "q" / "stats").exists() or not any((tmp_path / "q" / "stats").iterdir())


# quantize_experts: layer 0's probe, layer 1's probe, then the two layers: crash inside the probe pass
def test_resume_gives_the_same_mix(micro_checkpoint, program_run, tmp_path, monkeypatch):
    d, report = program_run
    monkeypatch.setattr(pmq, "quantize_experts", crash_on_call(pmq.quantize_experts, 2))
    with pytest.raises(KeyboardInterrupt):
        pmq.quantize(micro_checkpoint, tmp_path / "crashed", pmq.PMQConfig(**CFG), progress=False)
    assert any(k.startswith(mix_choice.KEY) for k in torch.load(tmp_path / "crashed" / "state" / "sens_h_01.pt")["h"])
    monkeypatch.undo()
    again = pmq.quantize(micro_checkpoint, tmp_path / "crashed", pmq.PMQConfig(**CFG), progress=False)
    assert again == report
    assert json.loads((tmp_path / "crashed" / "sensitivity.json").read_text()) == \
        json.loads((d / "sensitivity.json").read_text())
