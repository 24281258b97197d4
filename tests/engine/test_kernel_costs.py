"""engine/kernel_costs.py: mat-vec costs from llama.cpp's test-backend-ops, and the speed floor they feed.

Timings are not asserted (machines differ); what is: the tool answers for our types and llama.cpp's, the
cache answers the second time without running the tool, an unknown type is a clear error, and a PMQ run
with --min-speed stores its cost table and keeps the floor on the routed experts' expected time.
"""
from __future__ import annotations


import pytest

from mcmoe_gguf.engine import kernel_costs as kc


def test_costs_are_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MCMOE_CACHE", str(tmp_path))
    got = kc.matvec_us(["q2_k", "mcq2"], rounds=1, progress=False)
    assert set(got) == {"q2_k", "mcq2"} and all(v > 0 for v in got.values())
    calls = []
    monkeypatch.setattr(kc, "time_type", lambda *a, **k: calls.append(a) or 1.0)
    assert kc.matvec_us(["mcq2", "q2_K"], rounds=1, progress=False) == {"mcq2": got["mcq2"], "q2_K": got["q2_k"]}
    assert calls == []


def test_an_unknown_type_is_named():
    from mcmoe_gguf.engine.runtime import tools_dir
    with pytest.raises(kc.KernelCostError, match="no timing for type 'q9_k'"):
        kc.time_type(tools_dir(), "q9_k")


def test_cost_model_scales_with_weights():
    assert kc.projection_us(100.0, kc.PERF_WEIGHTS // 4) == pytest.approx(25.0)
    assert kc.ggml_name("Q3_K") == "q3_K" and kc.ggml_name("iq2_xxs") == "iq2_xxs"
