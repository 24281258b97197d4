"""Architecture adapters: everything specific to one model family sits behind one of these.

An adapter is a module (or any object) with the members of `Adapter` below. The rest of the package
reaches a model only through `Checkpoint.arch` (the adapter `adapter_for` picked for its config.json):
checkpoint key names, hyper-parameters, one decoder layer's torch forward (calibration, GPTQ and the
fake-quant evaluation run it), and the GGUF architecture and its keys (the writer). Adding an
architecture = one module here + `register` (docs/ARCHITECTURE.md); tests/model/test_arch_seam.py adds a
toy one through this interface alone. Only Mixtral-style MoE is registered; anything else is refused.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from . import mixtral


class Adapter(Protocol):
    NAME: str                      # config.json model_type
    ARCHITECTURES: tuple[str, ...] # config.json architectures it accepts
    GGUF_ARCH: str                 # general.architecture of the files we write (what llama.cpp builds)
    GLOBAL_KEYS: dict[str, str]    # checkpoint keys of "embed", "norm", "lm_head"
    # HParams.from_config(cfg) -> hyper-parameters with (at least) vocab_size, hidden_size,
    # intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, d_head,
    # num_local_experts, num_experts_per_tok, max_position_embeddings, tie_word_embeddings
    HParams: Any

    # checkpoint key names: per-expert ("legacy") and fused 3-D ("fused") layouts of the experts
    def legacy_expert_key(self, layer: int, expert: int, w: str) -> str: ...   # w: w1 (gate), w3 (up), w2 (down)
    def legacy_router_key(self, layer: int) -> str: ...
    def fused_gate_up_key(self, layer: int) -> str: ...
    def fused_down_key(self, layer: int) -> str: ...
    def fused_router_key(self, layer: int) -> str: ...
    def attn_keys(self, layer: int) -> dict[str, str]: ...   # q, k, v, o, attn_norm, ffn_norm

    # torch: decoder layer i of a Checkpoint as a module with input_layernorm, self_attn (q_proj, k_proj,
    # v_proj, o_proj; called as self_attn(x, cos, sin)), post_attention_layernorm, moe (gate, route(x),
    # experts[e].w1/w2/w3; its parameters named block_sparse_moe.*), called as layer(x, cos, sin) ->
    # (out, aux, counts); the rotary tables; the whole model for fake-quant evaluation: CompactModel(hp)
    # with model.embed_tokens, model.layers (decoder layers as above), model.norm and lm_head, called
    # as model(tokens) -> (logits, ...)
    decoder_layer_from: Callable
    rope_tables: Callable
    CompactModel: Any

    # GGUF: q/k row order for GGUF_ARCH's RoPE, and its hyper-parameter keys
    def permute_qk(self, w, n_head: int): ...
    def gguf_metadata(self, w, hp) -> None: ...


SUPPORTED: dict[str, Any] = {mixtral.NAME: mixtral}


class UnsupportedModel(ValueError):
    pass


def register(adapter) -> None:
    """Make an adapter (see `Adapter`) available to adapter_for, under adapter.NAME."""
    missing = [m for m in Adapter.__annotations__ if not hasattr(adapter, m)]
    missing += [m for m in ("legacy_expert_key", "legacy_router_key", "fused_gate_up_key", "fused_down_key",
                            "fused_router_key", "attn_keys", "permute_qk", "gguf_metadata") if not hasattr(adapter, m)]
    if missing:
        raise TypeError(f"adapter {getattr(adapter, 'NAME', adapter)!r} lacks {', '.join(missing)}")
    SUPPORTED[adapter.NAME] = adapter


def adapter_for(cfg: dict):
    """The adapter for a config.json, or UnsupportedModel naming what was found and what works."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type in SUPPORTED:
        mod = SUPPORTED[model_type]
    else:
        mod = next((m for m in SUPPORTED.values() if any(a in m.ARCHITECTURES for a in archs)), None)
    if mod is None:
        raise UnsupportedModel(
            f"unsupported architecture {archs or model_type!r} (model_type={model_type!r}); "
            f"supported: {', '.join(a for m in SUPPORTED.values() for a in m.ARCHITECTURES)}")
    try:
        hp = mod.HParams.from_config(cfg)
    except (ValueError, KeyError, TypeError):
        hp = None            # a dense config is reported here; anything else missing by the Checkpoint
    n_exp = hp.num_local_experts if hp else cfg.get("num_local_experts") or 0
    if n_exp < 2 or not (hp.num_experts_per_tok if hp else cfg.get("num_experts_per_tok")):
        raise UnsupportedModel(
            f"config.json describes a dense model (num_local_experts={cfg.get('num_local_experts')!r}); "
            "mcmoe-gguf converts Mixture-of-Experts checkpoints only")
    return mod
