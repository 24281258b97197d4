"""ODP inside the engine (cpp/ggml/mcmoe-odp.h, cpp/runtime/mcmoe-moe.h) against the torch reference of the
rule (tests/support/odp_reference.py) on the tiny model, plus the op itself against a Python twin.

- the op: random ids / weights / importances (ties included) through a ggml graph == the rule in numpy;
- mu = 0 gives exactly the logits of ODP off (prefill and decode);
- mu huge, no protection == top-1 routing with the kept weight renormalised, and every second slot counted
  as pruned;
- with protection (our attention-received importance, the reference code's row sums, the norm only),
  the engine protects exactly the reference's tokens, prunes the same slots, and the logits match;
- single-token decode applies the weight rule only;
- counters equal the reference's skip counts; bad parameters give clear errors.
"""
from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

from mcmoe_gguf.engine import odp
from odp_reference import forward, load_model, routing_case, rule_numpy

N_TOKENS = 160


@pytest.fixture(scope="module")
def tiny(tiny_dir, tiny_gguf):
    from tokenizers import Tokenizer
    text = (tiny_dir / "eval.txt").read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(tiny_dir / "tokenizer.json")).encode(text[:20000]).ids[:N_TOKENS]
    assert len(ids) == N_TOKENS
    return {"model": load_model(tiny_dir), "gguf": tiny_gguf["f32"], "tokens": ids}


def engine(path, tokens, decode=False, **odp_kw):
    """(logits [T, V], per-layer counters, per-layer flags of the last micro-batch)"""
    from mcmoe_gguf.engine.runtime import load
    llm = load(path, n_ctx=256, n_batch=256, n_ubatch=256, logits_all=True, n_threads=2, seed=0, **odp_kw)
    odp.odp_reset()
    if decode:
        for t in tokens:
            llm.eval([t])
    else:
        llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    stats = odp.odp_stats()
    flags = [odp.last_flags(s.layer) for s in stats]
    del llm
    return logits, stats, flags


def rel_err(a, b):
    return float((np.abs(a - b).max(-1) / np.abs(b).max(-1)).max())


# ---------------------------------------------------------------- the op alone, through a ggml graph

class OdpParams(ctypes.Structure):
    _fields_ = [("mu", ctypes.c_float), ("n_protect", ctypes.c_int32), ("marker", ctypes.c_int32),
                ("layer", ctypes.c_int32), ("what", ctypes.c_int32)]


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _libs():
    from mcmoe_gguf.engine.runtime import check_runtime
    check_runtime()
    # ggml-base functions through libllama's handle: the instance the engine uses, whose counters odp.*
    # reads (see odp.engine_lib); the CPU backend module ggml loaded for this CPU (opening its path again
    # returns the same instance)
    import llama_cpp

    from mcmoe_gguf.engine.cpu_variant import loaded_module
    base = odp.engine_lib()
    llama_cpp.llama_backend_init()
    module = loaded_module()
    cpu = ctypes.CDLL(str(module)) if module else base      # a non-DL build links ggml-cpu into libllama
    vp = ctypes.c_void_p
    base.ggml_init.restype = vp
    base.ggml_init.argtypes = [InitParams]
    for f, args in (("ggml_new_tensor_1d", [vp, ctypes.c_int, ctypes.c_int64]),
                    ("ggml_new_tensor_2d", [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
                    ("ggml_new_tensor_3d", [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]),
                    ("ggml_mcmoe_odp", [vp, vp, vp, vp, OdpParams]), ("ggml_new_graph", [vp]),
                    ("ggml_get_data", [vp])):
        getattr(base, f).restype = vp
        getattr(base, f).argtypes = args
    base.ggml_build_forward_expand.argtypes = [vp, vp]
    base.ggml_free.argtypes = [vp]
    cpu.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
    return base, cpu


def op_outputs(ids, w, imp, mu, n_protect, marker, layer=200):
    base, cpu = _libs()
    T, k = ids.shape
    ctx = base.ggml_init(InitParams(16 << 20, None, False))
    try:
        def tensor(arr, type_id, *ne):
            fn = {1: base.ggml_new_tensor_1d, 2: base.ggml_new_tensor_2d, 3: base.ggml_new_tensor_3d}[len(ne)]
            t = fn(ctx, type_id, *ne)
            ctypes.memmove(base.ggml_get_data(t), np.ascontiguousarray(arr).ctypes.data, arr.nbytes)
            return t
        ti = tensor(ids.astype(np.int32), 26, k, T)
        tw = tensor(w.astype(np.float32), 0, 1, k, T)
        tp = tensor(imp.astype(np.float32), 0, T) if imp is not None else None
        outs = []
        for what in (0, 1):
            o = base.ggml_mcmoe_odp(ctx, ti, tw, tp, OdpParams(mu, n_protect, marker, layer, what))
            g = base.ggml_new_graph(ctx)
            base.ggml_build_forward_expand(g, o)
            assert cpu.ggml_graph_compute_with_ctx(ctx, g, 2) == 0
            dt = np.float32 if what == 0 else np.int32
            outs.append(np.ctypeslib.as_array((ctypes.c_char * (T * k * 4)).from_address(base.ggml_get_data(o)))
                        .view(dt).reshape(T, k).copy())
        return outs
    finally:
        base.ggml_free(ctx)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("case", ["random", "ties", "mu0", "protect_all"])
def test_op_equals_the_rule(k, case):
    n_expert = 8
    ids, w, imp, mu, n_protect = routing_case(k, case, T=50, n_expert=n_expert, seed=k * 10 + len(case))
    w_got, ids_got = op_outputs(ids, w, imp, mu, n_protect, n_expert)
    ids_want, w_want, prot, _ = rule_numpy(ids, w, imp, mu, n_protect, n_expert)
    assert np.array_equal(ids_got, ids_want)
    np.testing.assert_allclose(w_got, w_want, rtol=1e-6, atol=0)
    if case == "mu0":
        assert np.array_equal(w_got.view(np.uint32), w.view(np.uint32)) and np.array_equal(ids_got, ids)
    if case == "protect_all":
        assert np.array_equal(ids_got, ids)
    flags = odp.last_flags(200)
    assert [bool(f & odp.FLAG_PROTECTED) for f in flags] == prot.tolist()
    assert [bool(f & odp.FLAG_PRUNED) for f in flags] == (ids_got == n_expert).any(1).tolist()


@pytest.mark.parametrize("ratio,n,want", [(0.02, 1, 0), (0.02, 2, 1), (0.02, 50, 1), (0.02, 100, 2),
                                          (0.02, 101, 3), (0.05, 160, 8), (0.0, 100, 0), (1.0, 7, 7)])
def test_protected_count(ratio, n, want):
    assert odp.n_protect(ratio, n) == want


# ---------------------------------------------------------------- the engine on the tiny model

def test_mu_zero_equals_odp_off(tiny):
    for decode in (False, True):
        off, _, _ = engine(tiny["gguf"], tiny["tokens"], decode=decode, odp=False)
        on, stats, _ = engine(tiny["gguf"], tiny["tokens"], decode=decode, odp=True, mu=0.0, protect=0.02)
        assert np.array_equal(on, off), decode
        assert stats and all(s.pruned == 0 and s.slots == 2 * N_TOKENS for s in stats)


def test_huge_mu_without_protection_is_top1(tiny):
    ref, rec = forward(tiny["model"], tiny["tokens"], mu=[1e9] * 4, protect=0.0)
    full, _ = forward(tiny["model"], tiny["tokens"], mu=None)
    got, stats, flags = engine(tiny["gguf"], tiny["tokens"], odp=True, mu=1e9, protect=0.0)
    assert [s.pruned for s in stats] == [r["pruned"] for r in rec] == [N_TOKENS] * 4
    assert all(all(f & odp.FLAG_PRUNED for f in fl) for fl in flags)
    err = rel_err(got, ref)
    assert err <= 2e-3, err                                   # F32 GGUF vs float64 torch
    assert rel_err(full, ref) > 50 * err                      # and top-1 is far from top-2


def _matching_decisions(got_flags, rec, what):
    bit = {"protected": odp.FLAG_PROTECTED, "pruned": odp.FLAG_PRUNED}[what]
    return [[bool(f & bit) for f in fl] == [bool(f & bit) for f in r["flags"]] for fl, r in zip(got_flags, rec)]


@pytest.mark.parametrize("mode", ["attn", "rowsum", "norm"])
def test_protection_matches_reference(tiny, mode):
    mu, protect = 0.5, 0.05
    ref, rec = forward(tiny["model"], tiny["tokens"], mu=[mu] * 4, protect=protect, mode=mode)
    got, stats, flags = engine(tiny["gguf"], tiny["tokens"], odp=True, mu=mu, protect=protect, importance=mode)
    k = odp.n_protect(protect, N_TOKENS)
    assert all(sum(bool(f & odp.FLAG_PROTECTED) for f in fl) == k for fl in flags)
    assert all(_matching_decisions(flags, rec, "protected")), mode
    assert all(_matching_decisions(flags, rec, "pruned")), mode
    assert [s.pruned for s in stats] == [r["pruned"] for r in rec]
    assert [s.protected for s in stats] == [k] * 4
    frac = sum(s.pruned for s in stats) / sum(s.slots for s in stats)
    assert 0.05 < frac < 0.45, frac                            # the test exercises both outcomes
    # protection made a difference: some protected token met the rule
    assert any(f & odp.FLAG_RULE and f & odp.FLAG_PROTECTED for fl in flags for f in fl)
    assert rel_err(got, ref) <= 2e-3


def test_importance_modes_protect_different_tokens(tiny):
    _, rec_a = forward(tiny["model"], tiny["tokens"], mu=[0.5] * 4, protect=0.05, mode="attn")
    _, rec_r = forward(tiny["model"], tiny["tokens"], mu=[0.5] * 4, protect=0.05, mode="rowsum")
    prot = lambda rec: [[i for i, f in enumerate(r["flags"]) if f & odp.FLAG_PROTECTED] for r in rec]
    assert prot(rec_a) != prot(rec_r)
    # the reference code's importance is ||x|| * H / (L - j): it favours the last positions
    last = [np.mean(p) for p in prot(rec_r)]
    assert min(last) > 0.6 * N_TOKENS, last


def test_decode_uses_the_weight_rule_only(tiny):
    mu = 0.5
    ref, rec = forward(tiny["model"], tiny["tokens"][:48], mu=[mu] * 4, protect=0.0)
    got, stats, _ = engine(tiny["gguf"], tiny["tokens"][:48], decode=True, odp=True, mu=mu, protect=0.5)
    assert [s.protected for s in stats] == [0] * 4
    assert [s.pruned for s in stats] == [r["pruned"] for r in rec]
    assert rel_err(got, ref) <= 2e-3


def test_flash_attention_falls_back_to_the_norm(tiny):
    """With flash attention the probabilities do not exist: protection uses ||x_j||_1 (mode "norm")."""
    _, rec = forward(tiny["model"], tiny["tokens"], mu=[0.5] * 4, protect=0.05, mode="norm")
    _, stats, flags = engine(tiny["gguf"], tiny["tokens"], odp=True, mu=0.5, protect=0.05, importance="attn",
                             flash_attn=True)
    assert all(_matching_decisions(flags, rec, "protected"))
    assert [s.pruned for s in stats] == [r["pruned"] for r in rec]


def test_bad_parameters_are_clear_errors(tiny, tiny_dir):
    with pytest.raises(ValueError, match="importance must be one of"):
        odp.overrides(importance="bogus")
    with pytest.raises(ValueError, match="protect must be"):
        odp.overrides(protect=2.0)
    # the engine's own checks (kv-overrides straight to llama.cpp), in a child process: llama.cpp logs
    import subprocess
    import sys
    code = ("import sys, mcmoe_gguf\n"
            "try:\n    mcmoe_gguf.load(sys.argv[1], odp=False, verbose=True, kv_overrides=eval(sys.argv[2]))\n"
            "except ValueError as e:\n    print('REFUSED', e)\n")
    for kv, msg in (({"mcmoe.odp.enabled": True}, "has no mcmoe.odp.mu"),
                    ({"mcmoe.odp.enabled": True, "mcmoe.odp.mu_override": float("inf")}, "mu_override must be finite"),
                    ({"mcmoe.odp.enabled": True, "mcmoe.odp.mu_override": 0.5, "mcmoe.odp.mu_scale": -1.0},
                     "mu_scale (kv-override) must be a finite number >= 0")):
        r = subprocess.run([sys.executable, "-c", code, str(tiny["gguf"]), repr(kv).replace("inf", "float('inf')")],
                           capture_output=True, text=True, timeout=120)
        assert "REFUSED" in r.stdout and msg in r.stdout + r.stderr, r.stdout + r.stderr[-2000:]
    # an F16/F32 conversion has no calibrated thresholds: odp=True without mu runs unpruned, not an error
    _, stats, _ = engine(tiny["gguf"], tiny["tokens"][:16], odp=True)
    assert stats == []
    with pytest.raises(ValueError, match="finite"):
        odp.overrides(mu=float("nan"))
    assert math.isclose(odp.overrides(mu=0.3)["mcmoe.odp.mu_override"], 0.3)
