"""Mixtral: hyper-parameters, checkpoint key layouts, and a compact torch forward of the same math.

The compact model trains the embedded tiny MoE ~10x faster than transformers' per-expert loop on a CPU
(tokens are grouped per expert once per layer) and is what later stages run one decoder layer at a
time. Its state dict uses the original Mixtral release keys, so a saved checkpoint loads in
transformers' ``MixtralForCausalLM`` (tests/model/test_tiny.py checks the logits agree).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

NAME = "mixtral"                        # config.json model_type
ARCHITECTURES = ("MixtralForCausalLM",)
GGUF_ARCH = "llama"                     # llama.cpp runs Mixtral as its llama architecture with experts


@dataclass(frozen=True)
class MixtralHParams:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    router_aux_loss_coef: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, cfg: dict) -> "MixtralHParams":
        names = cls.__dataclass_fields__
        kw = {k: cfg[k] for k in names if k in cfg and cfg[k] is not None}
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if "rope_theta" not in kw and "rope_theta" in rope:   # transformers 5 moved it here
            kw["rope_theta"] = rope["rope_theta"]
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "num_local_experts",
                               "num_experts_per_tok") if k not in kw]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        return cls(**kw)

    def to_config(self) -> dict:
        """config.json as transformers writes it for Mixtral (what the converter also accepts)."""
        return {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.d_head, "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_word_embeddings,
            "router_aux_loss_coef": self.router_aux_loss_coef, "output_router_logits": False,
            "hidden_act": "silu", "attention_dropout": 0.0, "sliding_window": None,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32", "initializer_range": 0.02, "use_cache": True,
        }


HParams = MixtralHParams   # the adapter interface's name (arch/__init__.py)


# ------------------------------------------------------------------------------------------ keys
# Original Mixtral release (per-expert 2D tensors) ...
def legacy_expert_key(layer: int, expert: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def legacy_router_key(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


# ... and transformers >= 5 (fused 3D tensors: gate_up_proj = cat(w1, w3) along dim 1).
def fused_gate_up_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts.gate_up_proj"


def fused_down_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.experts.down_proj"


def fused_router_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.gate.weight"


def attn_keys(layer: int) -> dict[str, str]:
    p = f"model.layers.{layer}."
    return {"q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
            "attn_norm": p + "input_layernorm.weight", "ffn_norm": p + "post_attention_layernorm.weight"}


GLOBAL_KEYS = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}


# ------------------------------------------------------------------------------------------ GGUF
def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores q/k rows for NEOX-style (half-split) RoPE; llama.cpp's llama arch rotates adjacent
    pairs, so rows are interleaved back as convert_hf_to_gguf.py does. Rows move whole, so this applies
    to float rows and to rows of quantized blocks alike."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_metadata(w, hp: MixtralHParams) -> None:
    """The GGUF_ARCH hyper-parameter keys llama.cpp reads for this model (w: a gguf.GGUFWriter)."""
    w.add_context_length(hp.max_position_embeddings)
    w.add_embedding_length(hp.hidden_size)
    w.add_block_count(hp.num_hidden_layers)
    w.add_feed_forward_length(hp.intermediate_size)
    w.add_head_count(hp.num_attention_heads)
    w.add_head_count_kv(hp.num_key_value_heads)
    w.add_key_length(hp.d_head)
    w.add_value_length(hp.d_head)
    w.add_rope_dimension_count(hp.d_head)
    w.add_rope_freq_base(float(hp.rope_theta))
    w.add_layer_norm_rms_eps(float(hp.rms_norm_eps))
    w.add_expert_count(hp.num_local_experts)
    w.add_expert_used_count(hp.num_experts_per_tok)
    w.add_vocab_size(hp.vocab_size)


# ------------------------------------------------------------------------------------- torch math
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_tables(hp: MixtralHParams, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (hp.rope_theta ** (torch.arange(0, hp.d_head, 2, dtype=torch.float32, device=device) / hp.d_head))
    ang = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv)
    ang = torch.cat([ang, ang], dim=-1)       # HF "rotate_half" (NEOX) layout
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, hp: MixtralHParams):
        super().__init__()
        self.hp = hp
        d, dh = hp.hidden_size, hp.d_head
        self.q_proj = nn.Linear(d, hp.num_attention_heads * dh, bias=False)
        self.k_proj = nn.Linear(d, hp.num_key_value_heads * dh, bias=False)
        self.v_proj = nn.Linear(d, hp.num_key_value_heads * dh, bias=False)
        self.o_proj = nn.Linear(hp.num_attention_heads * dh, d, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        hp = self.hp
        q = self.q_proj(x).view(b, t, hp.num_attention_heads, hp.d_head).transpose(1, 2)
        k = self.k_proj(x).view(b, t, hp.num_key_value_heads, hp.d_head).transpose(1, 2)
        v = self.v_proj(x).view(b, t, hp.num_key_value_heads, hp.d_head).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = hp.num_attention_heads // hp.num_key_value_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class Expert(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.w1 = nn.Linear(d, ff, bias=False)   # gate
        self.w2 = nn.Linear(ff, d, bias=False)   # down
        self.w3 = nn.Linear(d, ff, bias=False)   # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over all experts, top-k, renormalise the kept weights to sum 1."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return probs, w / w.sum(-1, keepdim=True), ids


class SparseMoeBlock(nn.Module):
    def __init__(self, hp: MixtralHParams):
        super().__init__()
        self.hp = hp
        self.gate = nn.Linear(hp.hidden_size, hp.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hp.hidden_size, hp.intermediate_size)
                                     for _ in range(hp.num_local_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(probabilities over all experts, kept weights, kept ids) of tokens x [n, d]."""
        return route(self.gate(x), self.hp.num_experts_per_tok)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, w, ids = self.route(x)
        out = torch.zeros_like(x)
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)          # group (token, slot) pairs by expert
        counts = torch.bincount(flat_ids, minlength=self.hp.num_local_experts).tolist()
        tok = order // self.hp.num_experts_per_tok
        wts = w.reshape(-1)[order].to(x.dtype)
        start = 0
        for e, n in enumerate(counts):
            if n:
                t = tok[start:start + n]
                out.index_add_(0, t, self.experts[e](x[t]) * wts[start:start + n, None])
            start += n
        # Switch/Mixtral load-balancing loss: E * sum_e (fraction routed to e) * (mean prob of e)
        frac = torch.tensor(counts, dtype=probs.dtype, device=x.device) / flat_ids.numel()
        aux = self.hp.num_local_experts * (frac * probs.mean(0)).sum()
        return out.reshape(shape), aux, torch.tensor(counts)


class DecoderLayer(nn.Module):
    def __init__(self, hp: MixtralHParams):
        super().__init__()
        self.input_layernorm = RMSNorm(hp.hidden_size, hp.rms_norm_eps)
        self.self_attn = Attention(hp)
        self.post_attention_layernorm = RMSNorm(hp.hidden_size, hp.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(hp)   # the release's name (state-dict keys)

    @property
    def moe(self) -> SparseMoeBlock:
        return self.block_sparse_moe

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        m, aux, counts = self.block_sparse_moe(self.post_attention_layernorm(x))
        return x + m, aux, counts


class Backbone(nn.Module):
    def __init__(self, hp: MixtralHParams):
        super().__init__()
        self.embed_tokens = nn.Embedding(hp.vocab_size, hp.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(hp) for _ in range(hp.num_hidden_layers))
        self.norm = RMSNorm(hp.hidden_size, hp.rms_norm_eps)


class CompactMixtral(nn.Module):
    """Mixtral forward with the release key names (model.*, lm_head.*); returns logits, aux, counts."""

    def __init__(self, hp: MixtralHParams):
        super().__init__()
        self.hp = hp
        self.model = Backbone(hp)
        self.lm_head = nn.Linear(hp.hidden_size, hp.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                # residual-branch outputs scaled down with depth (GPT-2), so early training is stable
                s = std / math.sqrt(2 * self.hp.num_hidden_layers) if name.endswith(("o_proj.weight", "w2.weight")) else std
                nn.init.normal_(p, 0.0, s)

    def forward(self, tokens: torch.Tensor):
        t = tokens.shape[1]
        cos, sin = rope_tables(self.hp, t, tokens.device)
        x = self.model.embed_tokens(tokens)
        aux_total, counts = 0.0, []
        for layer in self.model.layers:
            x, aux, c = layer(x, cos, sin)
            aux_total = aux_total + aux
            counts.append(c)
        return self.lm_head(self.model.norm(x)), aux_total / len(self.model.layers), torch.stack(counts)


CompactModel = CompactMixtral   # the adapter interface's name (arch/__init__.py)


# --------------------------------------------------------------------- one layer from a checkpoint
def decoder_layer_from(ck, i: int, dtype=torch.float32) -> DecoderLayer:
    """Decoder layer i of a Checkpoint as a compact torch module (the only layer in memory). Key names come
    from the checkpoint's adapter, so another architecture with this layer's math can reuse it."""
    layer = DecoderLayer(ck.hp)
    k = ck.arch.attn_keys(i)
    sd = {"input_layernorm.weight": ck.get(k["attn_norm"]), "post_attention_layernorm.weight": ck.get(k["ffn_norm"]),
          "self_attn.q_proj.weight": ck.get(k["q"]), "self_attn.k_proj.weight": ck.get(k["k"]),
          "self_attn.v_proj.weight": ck.get(k["v"]), "self_attn.o_proj.weight": ck.get(k["o"]),
          "block_sparse_moe.gate.weight": ck.router(i)}
    for proj in ("w1", "w2", "w3"):
        stacked = ck.experts(i, proj)
        for e in range(ck.hp.num_local_experts):
            sd[f"block_sparse_moe.experts.{e}.{proj}.weight"] = stacked[e]
    layer.load_state_dict({n: t.to(dtype) for n, t in sd.items()})
    return layer.eval()
