"""quant/kd_tune.py: KD tuning of a finished PMQ run lowers the KL to the float model on the calibration text,
the exported file carries exactly what the torch model was tuned to, and a killed tuning resumes to the same
numbers."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from helpers import calibrated_checkpoint, crash_on_call
from mcmoe_gguf.gguf.export import export_pmq
from mcmoe_gguf.model.checkpoint import Checkpoint
from mcmoe_gguf.quant import formats, kd_tune, pmq, recode
from mcmoe_gguf.quant.calibration import calibration_tokens
from mcmoe_gguf.quant.fake_quant import float_model, quantized_model
from mcmoe_gguf.quant.workdir import WorkDir

CFG = dict(budget="2.25", n_seq=8, seq_len=64)       # mcq experts, attention in llama.cpp's types (auto mix)
TUNE = dict(batch=4, seqs=32, save_every=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_tokenizer_dir):
    """A finished PMQ run of the micro model (our mcq experts, llama.cpp's types in attention), untuned."""
    root = tmp_path_factory.mktemp("kd")
    ck = calibrated_checkpoint(root, small_tokenizer_dir, seed=5)
    wd = root / "wd"
    pmq.quantize(ck, wd, pmq.PMQConfig(**CFG), progress=False)
    return {"ck": ck, "wd": wd, "root": root}


def _copy(run, name):
    import shutil
    dst = run["root"] / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(run["wd"], dst)
    return dst


def _expert_tensor(key: str) -> str:
    """The GGUF name of an expert's checkpoint key (model.layers.L.block_sparse_moe.experts.E.wN.weight)."""
    parts = key.split(".")
    proj = {"w1": "gate", "w2": "down", "w3": "up"}[parts[6]]
    return f"blk.{parts[2]}.ffn_{proj}.{parts[5]}.weight"


def _kl_on_calibration(wd, tuned: bool) -> float:
    model, ck = quantized_model(wd, tuned=tuned)
    teacher = float_model(ck)
    toks = calibration_tokens(ck.dir / "tokenizer.json", (ck.dir / "calib.txt").read_text(), 32, 64)
    with torch.no_grad():
        return float(kd_tune.kl(teacher(toks)[0], model(toks)[0]))


def test_tuning_lowers_the_kl_and_the_file_carries_it(run):
    wd = _copy(run, "tuned")
    r = pmq.quantize(run["ck"], wd, pmq.PMQConfig(**CFG, kd_steps=12, kd_lr=3e-3), progress=False)
    assert r["kd"]["steps"] == 12 and r["kd"]["kl_last"] < r["kd"]["kl_first"]
    # the tuned bytes (rescaled scales, not the float factors) are closer to the float model
    before, after = _kl_on_calibration(wd, tuned=False), _kl_on_calibration(wd, tuned=True)
    assert after < 0.95 * before, (before, after)

    state = WorkDir(wd).tuned()
    assert len(state["floats"]) == 2 * 2 + 2 + 1        # two norms and a router per layer, the final norm
    out = export_pmq(wd, run["root"] / "tuned.gguf")
    rd = gguf.GGUFReader(out)
    t = {x.name: x for x in rd.tensors}
    assert int(rd.fields["mcmoe.pmq.kd_steps"].parts[-1][0]) == 12
    model, ck = quantized_model(wd)
    sd = model.state_dict()
    # norms and routers: the tuned values, not the checkpoint's
    for name, key in (("blk.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
                      ("blk.0.ffn_gate_inp.weight", "model.layers.0.block_sparse_moe.gate.weight"),
                      ("output_norm.weight", "model.norm.weight")):
        got = np.asarray(t[name].data, np.float32).reshape(sd[key].shape)
        np.testing.assert_array_equal(got, state["floats"][key].numpy())
        assert not np.array_equal(got, float_model(ck).state_dict()[key].numpy()), f"{key} was not tuned"
    # quantized tensors: the file's bytes dequantize to the torch model's weights (q rows in llama.cpp's order)
    for name, key, perm in (("blk.0.ffn_down.3.weight", "model.layers.0.block_sparse_moe.experts.3.w2.weight", None),
                            ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", ck.hp.num_attention_heads)):
        want = sd[key] if perm is None else ck.arch.permute_qk(sd[key], perm)
        qt = int(t[name].tensor_type)
        raw = np.asarray(t[name].data).reshape(want.shape[0], -1)
        if qt in formats.TYPES_BY_ID:
            got = formats.dequantize(raw, formats.TYPES_BY_ID[qt].bits, want.shape[1])
        else:
            got = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qt))
        np.testing.assert_array_equal(np.asarray(got).reshape(want.shape), want.numpy())


def test_tuned_codes_lower_the_kl_and_the_file_carries_them(run):
    """Part "codes": the mcq experts' codes re-chosen on their stored scales (recode.py); the file stores those
    codes with the stored scales times the tuned factors, and its bytes are the torch model's weights."""
    wd = _copy(run, "codes")
    s = kd_tune.tune(wd, kd_tune.TuneConfig(steps=12, lr=3e-3, code_travel=0.6, parts=kd_tune.PARTS, **TUNE),
                     progress=False)
    state = WorkDir(wd).tuned()
    entries = WorkDir(wd).layer_entries()
    assert s["recoded_tensors"] == len(state["codes"]) == sum(1 for e in entries.values() if "bits" in e) > 0
    assert 0 < s["changed_codes"] == sum(int((state["codes"][k] != recode.grid(entries[k]).codes).sum())
                                         for k in state["codes"])
    assert _kl_on_calibration(wd, tuned=True) < _kl_on_calibration(wd, tuned=False)
    out = export_pmq(wd, run["root"] / "codes.gguf")
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    model, _ = quantized_model(wd)
    sd = model.state_dict()
    key = max(state["codes"], key=lambda k: int((state["codes"][k] != recode.grid(entries[k]).codes).sum()))
    raw = np.asarray(t[_expert_tensor(key)].data)
    bits = entries[key]["bits"]
    codes, _, _ = formats.unpack(raw, bits, sd[key].shape[1])
    np.testing.assert_array_equal(codes, state["codes"][key].numpy())
    np.testing.assert_array_equal(formats.dequantize(raw, bits, sd[key].shape[1]).reshape(sd[key].shape),
                                  sd[key].numpy())


def test_a_killed_tuning_resumes_to_the_same_numbers(run, monkeypatch):
    cfg = kd_tune.TuneConfig(steps=10, lr=3e-3, code_travel=0.6, parts=kd_tune.PARTS, **TUNE)
    straight, crashed = _copy(run, "straight"), _copy(run, "crashed")
    kd_tune.tune(straight, cfg, progress=False)
    monkeypatch.setattr(kd_tune, "kl", crash_on_call(kd_tune.kl, 7))      # dies in step 7, after the step-4 save
    with pytest.raises(KeyboardInterrupt):
        kd_tune.tune(crashed, cfg, progress=False)
    assert torch.load(WorkDir(crashed).tune_path)["step"] == 4 and WorkDir(crashed).tuned() is None
    monkeypatch.undo()
    kd_tune.tune(crashed, cfg, progress=False)
    a, b = WorkDir(straight).tuned(), WorkDir(crashed).tuned()
    assert a["loss"] == b["loss"]
    assert a["codes"] and a["changed_codes"] == b["changed_codes"]
    for part in ("factors", "floats", "latents", "codes"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0)


def test_other_settings_redo_and_zero_steps_remove_the_tuning(run):
    wd = _copy(run, "settings")
    kd_tune.tune(wd, kd_tune.TuneConfig(steps=4, **TUNE), progress=False)
    first = WorkDir(wd).tuned()
    kd_tune.tune(wd, kd_tune.TuneConfig(steps=4, lr=1e-2, **TUNE), progress=False)
    second = WorkDir(wd).tuned()
    assert second["config"]["lr"] == 1e-2 and second["loss"][0] == first["loss"][0] and second["loss"] != first["loss"]
    # a part left out keeps the stored values: only norms tuned here, no factor at all
    kd_tune.tune(wd, kd_tune.TuneConfig(steps=2, parts=("norms",), **TUNE), progress=False)
    only = WorkDir(wd).tuned()
    assert not only["factors"] and only["floats"] and all(k.endswith("norm.weight") for k in only["floats"])
    # through PMQ: codes re-chosen by default, kept with kd_codes=0 (only the layers' finish is rerun)
    pmq.quantize(run["ck"], wd, pmq.PMQConfig(**CFG, kd_steps=2), progress=False)
    assert WorkDir(wd).tuned()["codes"]
    pmq.quantize(run["ck"], wd, pmq.PMQConfig(**CFG, kd_steps=2, kd_codes=0), progress=False)
    assert not WorkDir(wd).tuned()["codes"] and WorkDir(wd).tuned()["factors"]
    assert kd_tune.tune(wd, kd_tune.TuneConfig(steps=0), progress=False) == {"steps": 0}
    assert WorkDir(wd).tuned() is None and not WorkDir(wd).tune_path.exists()


def test_bad_settings_and_unfinished_runs_are_refused(run, tmp_path, monkeypatch):
    for bad in (dict(steps=-1), dict(steps=3, lr=0.0), dict(steps=3, lr=float("nan")), dict(steps=3, batch=0),
                dict(steps=3, parts=()), dict(steps=3, parts=("scales", "embeddings")), dict(steps=3, code_travel=-1.0)):
        with pytest.raises(ValueError, match="KD tuning"):
            kd_tune.tune(run["wd"], kd_tune.TuneConfig(**bad), progress=False)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(ValueError, match="finished PMQ run"):
        kd_tune.tune(tmp_path / "unfinished", kd_tune.TuneConfig(steps=2), progress=False)
    wd = _copy(run, "nomem")
    monkeypatch.setattr(kd_tune.os, "sysconf", lambda name: 1024 if name == "SC_AVPHYS_PAGES" else 4096)
    with pytest.raises(MemoryError, match="GiB free; run without --kd-steps"):
        kd_tune.tune(wd, kd_tune.TuneConfig(steps=2, **TUNE), progress=False)
    assert not WorkDir(wd).tune_path.exists()
    with pytest.raises(ValueError, match="KD tuning"):      # checked before any layer is quantized
        pmq.quantize(Checkpoint(WorkDir(run["wd"]).model_dir()).dir, tmp_path / "q",
                     pmq.PMQConfig(**CFG, kd_steps=-2), progress=False)
    assert not (tmp_path / "q").exists()


def test_iq1s_codes_are_tuned_and_the_file_carries_them(run):
    """Part "codes" on llama.cpp's iq1_s experts (recode.CodebookGrid): each 8-weight group's codeword is
    re-chosen on the stored scales and delta signs; the exported file's iq1_s bytes hold those codes and
    dequantize (gguf-py) to the torch model's weights."""
    from micro_model import workdir_with_types
    e = Checkpoint(WorkDir(run["wd"]).model_dir()).hp.num_local_experts
    types = [[["iq1_s", "iq1_s", "mcq2"]] * e, [["mcq2", "iq1_s", "iq1_s"]] * e]
    wd = workdir_with_types(run["wd"], run["root"] / "iq1s", types)
    kl_before = _kl_on_calibration(wd, tuned=False)
    kd_tune.tune(wd, kd_tune.TuneConfig(steps=12, lr=3e-3, code_travel=0.3, parts=kd_tune.PARTS, **TUNE),
                 progress=False)
    state = WorkDir(wd).tuned()
    entries = WorkDir(wd).layer_entries()
    iq = [k for k in state["codes"] if entries[k].get("type") == "iq1_s"]
    assert len(iq) == 4 * e
    changed = {k: int((state["codes"][k] != recode.grid(entries[k]).codes).sum()) for k in iq}
    assert sum(changed.values()) > 0
    assert _kl_on_calibration(wd, tuned=True) < kl_before
    out = export_pmq(wd, run["root"] / "iq1s.gguf")
    t = {x.name: x for x in gguf.GGUFReader(out).tensors}
    sd = quantized_model(wd)[0].state_dict()
    key = max(changed, key=changed.get)
    raw = np.asarray(t[_expert_tensor(key)].data)
    rows, n = sd[key].shape
    np.testing.assert_array_equal(recode.iq1s_fields(raw, rows, n)[2], state["codes"][key].numpy())
    got = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType.IQ1_S)
    np.testing.assert_array_equal(np.asarray(got).reshape(rows, n), sd[key].numpy())
