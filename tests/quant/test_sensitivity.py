"""Layer sensitivity (quant/sensitivity.py): its parts against hand computations, the streamed probes against a
whole-model torch forward, the model program's use of the scales, resume and bad settings."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from helpers import calibrated_checkpoint, crash_on_call
from mcmoe_gguf.model.checkpoint import Checkpoint
from mcmoe_gguf.quant import allocate, pmq, sensitivity
from mcmoe_gguf.quant.calibration import calibration_tokens

CFG = dict(budget="2.25", n_seq=8, seq_len=64, scope="model", sensitivity="kl", sens_seqs=3)


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory, small_tokenizer_dir):
    return calibrated_checkpoint(tmp_path_factory.mktemp("sens"), small_tokenizer_dir, seed=5)


def test_predicted_is_the_programs_cost_of_the_choice():
    rng = np.random.default_rng(0)
    phi, w, eps = rng.random(4), rng.random(4), rng.random((4, 3, 5))
    choice = rng.integers(0, 5, (4, 3))
    want = sum(phi[e] * w[e] ** 0.5 * eps[e, p, choice[e, p]] ** 2 for e in range(4) for p in range(3))
    assert sensitivity.predicted(phi, w, eps, choice, 1.0, 0.5, 2.0) == pytest.approx(want, rel=1e-12)


def test_layer_scales_divide_and_keep_noise_layers_comparable():
    s = sensitivity.layer_scales([2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 1.5, 0.0])
    # 2/1, a KL of 0 lifted to 1% of the median (2), 3/1.5, and a choice that costs nothing: the median
    assert s.tolist() == pytest.approx([2.0, 0.02, 2.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        sensitivity.layer_scales([1.0, np.nan], [1.0, 1.0])


def test_layer_scale_moves_bytes_to_the_sensitive_layer():
    # two identical layers, one type cheap and bad, one dear and good; the budget buys the good type for half
    L, E, P = 2, 4, 3
    eps = np.zeros((L, E, P, 2))
    eps[..., 0], eps[..., 1] = 1.0, 0.1
    nbytes = np.array([[64 * 256 // 8 * 2, 64 * 256 // 8 * 4]] * P)    # 2 and 4 bpw of 64 x 256 weights
    n = np.full((L, E), P * 64 * 256)
    phi = w = np.ones((L, E))
    a = allocate.allocate_ladder(phi, w, eps, nbytes, n, "3", scope="model", layer_scale=[1.0, 10.0])
    assert (a.choice[1] == 1).all() and (a.choice[0] == 0).all()
    b = allocate.allocate_ladder(phi, w, eps, nbytes, n, "3", scope="model", layer_scale=[10.0, 1.0])
    assert (b.choice[0] == 1).all() and (b.choice[1] == 0).all()
    with pytest.raises(ValueError, match="one per layer"):
        allocate.allocate_ladder(phi, w, eps, nbytes, n, "3", scope="model", layer_scale=[1.0])


def test_bad_settings_fail_before_work(micro_checkpoint, tmp_path):
    for bad, msg in ((dict(scope="layer"), "needs --scope model"), (dict(sensitivity="fisher"), "must be one of"),
                     (dict(sens_seqs=0), "sens_seqs"), (dict(ladder="mcq"), "weighs a ladder")):
        cfg = pmq.PMQConfig(**{**CFG, "ladder": "q2_k,iq2_xxs", **bad})
        with pytest.raises(ValueError, match=msg):
            pmq.quantize(micro_checkpoint, tmp_path / "q", cfg, progress=False)
        assert not (tmp_path / "q" / "stats").exists() or not any((tmp_path / "q" / "stats").iterdir())


def _whole_model(ck: Checkpoint):
    model = ck.arch.CompactModel(ck.hp)
    model.model.embed_tokens.weight.data.copy_(ck.get(ck.arch.GLOBAL_KEYS["embed"]).float())
    model.model.norm.weight.data.copy_(ck.get(ck.arch.GLOBAL_KEYS["norm"]).float())
    model.lm_head.weight.data.copy_(ck.get(ck.arch.GLOBAL_KEYS["lm_head"]).float())
    for i in range(ck.hp.num_hidden_layers):
        model.model.layers[i] = ck.arch.decoder_layer_from(ck, i)
    return model.eval()


def test_measured_kl_equals_a_whole_model_forward(micro_checkpoint, tmp_path, monkeypatch):
    probes = {}
    real = pmq.quantize_experts

    def record(moe, x, types, cfg, desc, progress=True):
        out = real(moe, x, types, cfg, desc, progress)
        if desc.endswith("probe"):
            probes[int(desc.split()[1])] = copy.deepcopy(moe.state_dict())
        return out

    monkeypatch.setattr(pmq, "quantize_experts", record)
    cfg = pmq.PMQConfig(**{**CFG, "ladder": "iq1_s,q2_k,q4_k"})
    pmq.quantize(micro_checkpoint, tmp_path / "q", cfg, progress=False)
    rep = json.loads((tmp_path / "q" / "sensitivity.json").read_text())
    ck = Checkpoint(micro_checkpoint)
    tokens = calibration_tokens(micro_checkpoint / "tokenizer.json", (micro_checkpoint / "calib.txt").read_text(),
                                CFG["n_seq"], CFG["seq_len"])[:CFG["sens_seqs"]]
    model = _whole_model(ck)
    with torch.no_grad():
        ref = torch.log_softmax(model(tokens)[0], -1)
        assert sorted(probes) == [0, 1]
        for l, sd in probes.items():
            m = _whole_model(ck)
            m.model.layers[l].block_sparse_moe.load_state_dict(sd)
            lq = torch.log_softmax(m(tokens)[0], -1)
            kl = float(torch.nn.functional.kl_div(lq, ref, log_target=True, reduction="sum")) / ref[..., 0].numel()
            assert kl > 0 and rep["kl"][l] == pytest.approx(kl, rel=1e-3)
    # the scale is KL per unit of the program's cost of the probe's choice
    assert rep["scale"] == pytest.approx([k / p for k, p in zip(rep["kl"], rep["predicted"])])
    assert rep["sens_seqs"] == CFG["sens_seqs"]


# quantize_experts runs for layer 0's probe, layer 1's probe, then the two layers' experts: crash in either pass
@pytest.mark.parametrize("crash_at", [2, 4])
def test_resume_gives_identical_state(micro_checkpoint, tmp_path, monkeypatch, crash_at):
    cfg = pmq.PMQConfig(**{**CFG, "ladder": "iq1_s,q2_k,q4_k"})
    pmq.quantize(micro_checkpoint, tmp_path / "straight", cfg, progress=False)
    real = pmq.quantize_experts
    monkeypatch.setattr(pmq, "quantize_experts", crash_on_call(real, crash_at))
    with pytest.raises(KeyboardInterrupt):
        pmq.quantize(micro_checkpoint, tmp_path / "crashed", cfg, progress=False)
    state = tmp_path / "crashed" / "state"
    if crash_at == 2:       # inside the probe pass: layer 0's probes stored, no report yet
        assert (state / "sens_h_01.pt").exists()
        assert not (tmp_path / "crashed" / "sensitivity.json").exists()
    else:                   # the report replaced the probes' last copies
        assert (tmp_path / "crashed" / "sensitivity.json").exists() and not list(state.glob("sens_h_*.pt"))
    monkeypatch.setattr(pmq, "quantize_experts", real)
    pmq.quantize(micro_checkpoint, tmp_path / "crashed", cfg, progress=False)
    for name in ("sensitivity.json", "allocation.json"):
        assert json.loads((tmp_path / "crashed" / name).read_text()) == \
            json.loads((tmp_path / "straight" / name).read_text())
    for l in range(2):
        a, b = (torch.load(d / "layers" / f"layer_{l:02d}.pt") for d in (tmp_path / "straight", tmp_path / "crashed"))
        assert all(torch.equal(a["tensors"][k]["data"], b["tensors"][k]["data"]) for k in a["tensors"])
