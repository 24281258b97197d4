"""The architecture seam is real: a toy second architecture, added through the adapter interface alone
(mcmoe_gguf.model.arch.register), converts and quantizes with no other change to the package.

The toy ("toymoe") stores the same kind of model as Mixtral under different config.json names and different
checkpoint key names. Given the same weights, its F16 GGUF and its PMQ GGUF must equal the Mixtral
checkpoint's tensor for tensor and key for key (the file name aside): every stage reached the weights,
the hyper-parameters and the GGUF keys through the adapter, never through Mixtral's names.
"""
from __future__ import annotations

import json
import types
from dataclasses import fields

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import random_state, save_checkpoint, small_config
from mcmoe_gguf.model import arch
from mcmoe_gguf.model.arch import mixtral as mx

NAMES = {"w1": "gate", "w3": "up", "w2": "down"}
CONFIG_NAMES = {"vocab_size": "n_vocab", "hidden_size": "d_model", "intermediate_size": "d_ff",
                "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
                "num_local_experts": "n_experts", "num_experts_per_tok": "top_k", "max_position_embeddings": "ctx_len",
                "rms_norm_eps": "norm_eps", "rope_theta": "rope_base", "head_dim": "d_head"}


class ToyHParams(mx.MixtralHParams):
    @classmethod
    def from_config(cls, cfg: dict) -> "ToyHParams":
        kw = {f.name: cfg[CONFIG_NAMES[f.name]] for f in fields(mx.MixtralHParams)
              if f.name in CONFIG_NAMES and CONFIG_NAMES[f.name] in cfg}
        missing = [k for k in ("n_vocab", "d_model", "d_ff", "n_layers", "n_experts", "top_k") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        return cls(**kw)


def toy_attn_keys(i: int) -> dict[str, str]:
    p = f"blocks.{i}."
    return {"q": p + "attn.wq", "k": p + "attn.wk", "v": p + "attn.wv", "o": p + "attn.wo",
            "attn_norm": p + "norm1", "ffn_norm": p + "norm2"}


TOY = types.SimpleNamespace(
    NAME="toymoe", ARCHITECTURES=("ToyMoeForCausalLM",), GGUF_ARCH="llama", HParams=ToyHParams,
    GLOBAL_KEYS={"embed": "tok", "norm": "final_norm", "lm_head": "head"},
    legacy_expert_key=lambda l, e, w: f"blocks.{l}.ffn.{e}.{NAMES[w]}",
    legacy_router_key=lambda l: f"blocks.{l}.router",
    fused_gate_up_key=lambda l: f"blocks.{l}.ffn.fused_gate_up",
    fused_down_key=lambda l: f"blocks.{l}.ffn.fused_down",
    fused_router_key=lambda l: f"blocks.{l}.fused_router",
    attn_keys=toy_attn_keys, rope_tables=mx.rope_tables,
    decoder_layer_from=mx.decoder_layer_from,       # the same math, read through the toy's keys (ck.arch)
    CompactModel=mx.CompactMixtral, permute_qk=mx.permute_qk, gguf_metadata=mx.gguf_metadata)


def toy_name(key: str, hp) -> str:
    """The toy's key for a Mixtral release key."""
    for g, name in mx.GLOBAL_KEYS.items():
        if key == name:
            return TOY.GLOBAL_KEYS[g]
    for i in range(hp.num_hidden_layers):
        for a, name in mx.attn_keys(i).items():
            if key == name:
                return toy_attn_keys(i)[a]
        if key == mx.legacy_router_key(i):
            return TOY.legacy_router_key(i)
        for e in range(hp.num_local_experts):
            for w in NAMES:
                if key == mx.legacy_expert_key(i, e, w):
                    return TOY.legacy_expert_key(i, e, w)
    raise KeyError(key)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, small_tokenizer_dir):
    """(Mixtral checkpoint, toy checkpoint) holding the same weights."""
    from mcmoe_gguf.model.tiny import PRESETS, corpus_splits
    root = tmp_path_factory.mktemp("seam")
    cfg = small_config(n_layers=2, hidden=256, ff=256, vocab=512, experts=4)
    sd = random_state(cfg, seed=3, dtype=torch.float32)
    mix = save_checkpoint(root / "mixtral", cfg, sd, small_tokenizer_dir)
    hp = mx.MixtralHParams.from_config(cfg)
    toy = root / "toy"
    toy.mkdir()
    toy_cfg = {"model_type": "toymoe", "architectures": ["ToyMoeForCausalLM"],
               **{CONFIG_NAMES[k]: cfg[k] for k in CONFIG_NAMES if cfg.get(k) is not None}}
    (toy / "config.json").write_text(json.dumps(toy_cfg))
    save_file({toy_name(k, hp): v.contiguous() for k, v in sd.items()}, str(toy / "model.safetensors"))
    calib = corpus_splits(PRESETS["default"])["calib"][:20_000]
    for d in (mix, toy):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).write_bytes((small_tokenizer_dir / f).read_bytes())
        (d / "calib.txt").write_text(calib)
    return mix, toy


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(arch.SUPPORTED, TOY.NAME, TOY)
    arch.register(TOY)


def read(path):
    r = gguf.GGUFReader(path)
    kv = {k: (f.types, [bytes(f.parts[i]) for i in f.data]) for k, f in r.fields.items() if k != "general.name"}
    return kv, {t.name: (t.tensor_type, bytes(np.asarray(t.data).tobytes())) for t in r.tensors}


def test_toy_is_refused_until_registered(pair):
    from mcmoe_gguf.model.checkpoint import Checkpoint
    with pytest.raises(arch.UnsupportedModel, match="ToyMoeForCausalLM"):
        Checkpoint(pair[1])


def test_register_refuses_an_incomplete_adapter():
    half = types.SimpleNamespace(**{k: v for k, v in vars(TOY).items() if k not in ("permute_qk", "HParams")})
    with pytest.raises(TypeError, match="HParams.*permute_qk|permute_qk.*HParams"):
        arch.register(half)


def test_toy_converts_to_the_same_f16_file(pair, registered, tmp_path):
    from mcmoe_gguf.gguf.export import convert
    from mcmoe_gguf.model.checkpoint import Checkpoint
    assert Checkpoint(pair[1]).arch is TOY
    a = convert(pair[0], tmp_path / "mixtral.gguf", outtype="f16", progress=False)
    b = convert(pair[1], tmp_path / "toy.gguf", outtype="f16", progress=False)
    kv_a, t_a = read(a)
    kv_b, t_b = read(b)
    assert kv_a == kv_b
    assert t_a.keys() == t_b.keys() and len(t_a) == 2 * 10 + 3     # per layer: 2 norms, q k v o, router, 3 merged experts
    for name in t_a:
        assert t_a[name] == t_b[name], name


def test_toy_quantizes_to_the_same_pmq_file(pair, registered, tmp_path):
    from mcmoe_gguf.gguf.export import export_pmq
    from mcmoe_gguf.quant.pmq import PMQConfig, quantize
    cfg = PMQConfig(budget="2.0", n_seq=4, seq_len=64)
    files = []
    for name, ck in zip(("mixtral", "toy"), pair):
        rep = quantize(ck, tmp_path / f"wd-{name}", cfg, progress=False)
        files.append((rep, export_pmq(tmp_path / f"wd-{name}", tmp_path / f"{name}-pmq.gguf", progress=False)))
    (rep_a, a), (rep_b, b) = files
    assert rep_a["bits"] == rep_b["bits"] and len({b for row in rep_a["bits"] for b in row}) > 1   # mixed widths
    kv_a, t_a = read(a)
    kv_b, t_b = read(b)
    assert kv_a == kv_b
    assert t_a == t_b
