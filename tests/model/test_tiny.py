"""The embedded tiny model: corpus splits, the compact trainer's math, resumable training."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mcmoe_gguf.model import tiny


def test_splits_are_deterministic_and_disjoint():
    r = tiny.PRESETS["default"]
    a, b = tiny.corpus_splits(r), tiny.corpus_splits(r)
    assert a == b
    lines = {k: {ln.strip() for ln in v.splitlines() if len(ln.strip()) > 40} for k, v in a.items()}
    # long lines are nearly unique to their work (a few stock phrases recur across plays): whole works
    # per split leave almost no long line shared
    assert len(lines["eval"]) > 1000 and len(lines["calib"]) > 1000
    shared = (lines["eval"] & lines["train"]) | (lines["calib"] & lines["train"]) | (lines["eval"] & lines["calib"])
    assert len(shared) < 0.01 * len(lines["eval"]), sorted(shared)[:5]


def test_compact_forward_equals_transformers(tiny_dir):
    from safetensors.torch import load_file
    from transformers import MixtralForCausalLM

    from mcmoe_gguf.model.arch.mixtral import CompactMixtral, MixtralHParams
    import json
    hp = MixtralHParams.from_config(json.loads((tiny_dir / "config.json").read_text()))
    ours = CompactMixtral(hp)
    ours.load_state_dict(load_file(str(tiny_dir / "model.safetensors")))
    ref = MixtralForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    x = torch.randint(0, hp.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(x).logits, ours.eval()(x)[0]
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_tiny_model_is_trained_and_uses_every_expert(tiny_dir):
    import json
    rep = json.loads((tiny_dir / "report.json").read_text())
    load = torch.tensor(rep["expert_load"])
    assert load.shape == (4, 8) and (load > 0).all(), load
    # far below the 4096-token uniform guess: the model learned the language
    assert rep["eval_ppl"] < 200, rep["eval_ppl"]


MICRO = replace(tiny.PRESETS["smoke"], vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, seq_len=32, batch_size=4, steps=6,
                checkpoint_every=3, warmup=2, max_train_chars=40_000)


def test_training_resumes_after_a_crash_with_identical_weights(tmp_path, monkeypatch):
    tiny.train(MICRO, tmp_path / "straight", log=lambda *a: None)

    real_batch = tiny.batch_at

    def crash_at_step_4(recipe, stream, step):
        if step == 4:
            raise KeyboardInterrupt("simulated crash")
        return real_batch(recipe, stream, step)

    monkeypatch.setattr(tiny, "batch_at", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        tiny.train(MICRO, tmp_path / "crashed", log=lambda *a: None)
    assert (tmp_path / "crashed.work" / "train_state.pt").exists()
    monkeypatch.setattr(tiny, "batch_at", real_batch)
    logs = []
    tiny.train(MICRO, tmp_path / "crashed", log=logs.append)
    assert any("resuming" in m and "step 3" in m for m in logs), logs
    assert (tmp_path / "straight" / "model.safetensors").read_bytes() == \
        (tmp_path / "crashed" / "model.safetensors").read_bytes()
