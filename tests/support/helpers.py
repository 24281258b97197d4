"""Builders for test checkpoints: random Mixtral weights in either key layout, sharded or not."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from mcmoe_gguf.model.arch import mixtral as mx

REPO = Path(__file__).resolve().parents[2]

# The config.json of the Mixtral-8x7B release (mistralai/Mixtral-8x7B-v0.1), dimensions shrunk by tests.
MIXTRAL_8X7B_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def small_config(n_layers=2, hidden=256, ff=512, vocab=512, heads=8, kv_heads=4, experts=8) -> dict:
    cfg = dict(MIXTRAL_8X7B_CONFIG)
    cfg.update(hidden_size=hidden, intermediate_size=ff, num_hidden_layers=n_layers, vocab_size=vocab,
               num_attention_heads=heads, num_key_value_heads=kv_heads, num_local_experts=experts)
    return cfg


def random_state(cfg: dict, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Legacy-layout (release) state dict with random weights of a realistic scale."""
    hp = mx.MixtralHParams.from_config(cfg)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.05):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    d, ff, dh = hp.hidden_size, hp.intermediate_size, hp.d_head
    sd = {mx.GLOBAL_KEYS["embed"]: rnd(hp.vocab_size, d, std=1.0),
          mx.GLOBAL_KEYS["norm"]: (1 + rnd(d, std=0.1).float()).to(dtype),
          mx.GLOBAL_KEYS["lm_head"]: rnd(hp.vocab_size, d)}
    for i in range(hp.num_hidden_layers):
        k = mx.attn_keys(i)
        sd[k["q"]] = rnd(hp.num_attention_heads * dh, d)
        sd[k["k"]] = rnd(hp.num_key_value_heads * dh, d)
        sd[k["v"]] = rnd(hp.num_key_value_heads * dh, d)
        sd[k["o"]] = rnd(d, hp.num_attention_heads * dh)
        sd[k["attn_norm"]] = (1 + rnd(d, std=0.1).float()).to(dtype)
        sd[k["ffn_norm"]] = (1 + rnd(d, std=0.1).float()).to(dtype)
        sd[mx.legacy_router_key(i)] = rnd(hp.num_local_experts, d, std=0.5)
        for e in range(hp.num_local_experts):
            sd[mx.legacy_expert_key(i, e, "w1")] = rnd(ff, d)
            sd[mx.legacy_expert_key(i, e, "w3")] = rnd(ff, d)
            sd[mx.legacy_expert_key(i, e, "w2")] = rnd(d, ff)
    return sd


def to_fused(sd: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """The same weights in transformers-5 fused keys (mlp.experts.gate_up_proj / down_proj, mlp.gate)."""
    hp = mx.MixtralHParams.from_config(cfg)
    out = {k: v for k, v in sd.items() if ".block_sparse_moe." not in k}
    for i in range(hp.num_hidden_layers):
        E = range(hp.num_local_experts)
        w1 = torch.stack([sd[mx.legacy_expert_key(i, e, "w1")] for e in E])
        w3 = torch.stack([sd[mx.legacy_expert_key(i, e, "w3")] for e in E])
        out[mx.fused_gate_up_key(i)] = torch.cat([w1, w3], dim=1).contiguous()
        out[mx.fused_down_key(i)] = torch.stack([sd[mx.legacy_expert_key(i, e, "w2")] for e in E]).contiguous()
        out[mx.fused_router_key(i)] = sd[mx.legacy_router_key(i)]
    return out


def save_checkpoint(path: Path, cfg: dict, sd: dict[str, torch.Tensor], tokenizer_dir: Path, shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (path / f).write_bytes((tokenizer_dir / f).read_bytes())
    keys = sorted(sd)
    if shards == 1:
        save_file({k: sd[k].contiguous() for k in keys}, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    per = -(-len(keys) // shards)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s * per:(s + 1) * per]
        save_file({k: sd[k].contiguous() for k in part}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return path


def calibrated_checkpoint(root: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A random 2-layer Mixtral (d=256, 8 experts of 256, vocab 512) with 30k characters of the default
    model's calibration text beside it: what the PMQ tests quantize in seconds."""
    from mcmoe_gguf.model.tiny import PRESETS, corpus_splits
    cfg = small_config(n_layers=2, hidden=256, ff=256, vocab=512)
    d = save_checkpoint(root / "m", cfg, random_state(cfg, seed=seed, dtype=torch.float32), tokenizer_dir)
    (d / "calib.txt").write_text(corpus_splits(PRESETS["default"])["calib"][:30_000])
    return d


def crash_on_call(real, n: int):
    """`real` wrapped so that its n-th call raises KeyboardInterrupt instead (a simulated crash mid-run)."""
    calls = []

    def wrapper(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)
    return wrapper


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mcmoe_gguf.apps.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=timeout)
