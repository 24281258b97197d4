"""Torch reference of ODP (the paper's section 3.3 as docs/FORMAT.md specifies it), written from the rule,
not from the engine's code: one sequence, one micro-batch, explicit attention probabilities.

For each MoE layer and token j (top-2 weights w0 >= w1 after Mixtral's renormalisation):
  prune the second expert iff w1 < mu_l * w0 and j is not protected; then w0 -> w0 + w1.
Protection (micro-batch of L > 1 tokens): the ceil(protect * L) tokens of largest importance, ties to the
lower index, where importance is
  attn:   ||x_j||_1 * sum_{h, i >= j} A_h[i, j] / (L - j)     (x: the MoE input, A: this layer's softmax)
  rowsum: ||x_j||_1 * sum_{h, k} A_h[j, k] / (L - j)         (the reference code's: = ||x_j||_1 * H / (L - j))
  norm:   ||x_j||_1
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mcmoe_gguf.model.arch import mixtral as mx
from mcmoe_gguf.engine.odp import FLAG_PROTECTED, FLAG_PRUNED, FLAG_RULE, n_protect


def _attention(att: mx.Attention, x, cos, sin):
    """(output, probabilities [H, T, T]) of mx.Attention for one sequence, float64 math."""
    hp = att.hp
    b, t, _ = x.shape
    q = att.q_proj(x).view(b, t, hp.num_attention_heads, hp.d_head).transpose(1, 2)
    k = att.k_proj(x).view(b, t, hp.num_key_value_heads, hp.d_head).transpose(1, 2)
    v = att.v_proj(x).view(b, t, hp.num_key_value_heads, hp.d_head).transpose(1, 2)
    q, k = mx.apply_rope(q, cos, sin), mx.apply_rope(k, cos, sin)
    rep = hp.num_attention_heads // hp.num_key_value_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hp.d_head)
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    a = torch.softmax(s, -1)
    o = a @ v
    return att.o_proj(o.transpose(1, 2).reshape(b, t, -1)), a[0]


def importance(x: torch.Tensor, a: torch.Tensor, mode: str) -> torch.Tensor:
    """x: MoE input [T, d]; a: attention probabilities [H, T, T] (query, key)."""
    L = x.shape[0]
    l1 = x.abs().sum(-1)
    later = torch.arange(L, 0, -1, dtype=x.dtype)              # L - j
    if mode == "attn":
        return l1 * a.sum((0, 1)) / later                       # column sums: queries i >= j (mask), heads
    if mode == "rowsum":
        return l1 * a.sum((0, 2)) / later
    if mode == "norm":
        return l1
    raise ValueError(mode)


def moe_odp(moe: mx.SparseMoeBlock, x: torch.Tensor, mu: float, protected: torch.Tensor):
    """The MoE block with the rule. x [T, d]; returns (out [T, d], flags [T] ints, pruned count)."""
    probs, w, ids = mx.route(moe.gate(x), moe.hp.num_experts_per_tok)   # w sorted descending, sums to 1
    assert w.shape[1] == 2, "the rule is defined for top-2"
    rule = w[:, 1] < mu * w[:, 0]
    prune = rule & ~protected
    w = w.clone()
    w[prune, 0] = w[prune, 0] + w[prune, 1]
    w[prune, 1] = 0
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(2):
            if s == 1 and prune[t]:
                continue
            out[t] += w[t, s].to(x.dtype) * moe.experts[int(ids[t, s])](x[t])
    flags = rule.long() * FLAG_RULE + protected.long() * FLAG_PROTECTED + prune.long() * FLAG_PRUNED
    return out, flags, int(prune.sum())


@torch.no_grad()
def forward(model: mx.CompactMixtral, tokens: list[int], mu: list[float] | None, protect: float = 0.0,
            mode: str = "attn"):
    """Logits [T, V] (float64 model recommended) with ODP over one micro-batch of all tokens, plus per layer
    {"flags": [T], "pruned": n}. mu=None: ODP off (plain Mixtral)."""
    hp = model.hp
    T = len(tokens)
    cos, sin = mx.rope_tables(hp, T)
    cos, sin = cos.to(torch.float64), sin.to(torch.float64)
    h = model.model.embed_tokens(torch.tensor([tokens]))
    records = []
    for l, layer in enumerate(model.model.layers):
        att_out, a = _attention(layer.self_attn, layer.input_layernorm(h), cos, sin)
        h = h + att_out
        x = layer.post_attention_layernorm(h)[0]
        if mu is None:
            m, _, _ = layer.block_sparse_moe(x)
            h = h + m[None]
            continue
        k = n_protect(protect, T)
        prot = torch.zeros(T, dtype=torch.bool)
        if k:
            order = torch.argsort(-importance(x, a, mode), stable=True)
            prot[order[:k]] = True
        m, flags, pruned = moe_odp(layer.block_sparse_moe, x, mu[l], prot)
        h = h + m[None]
        records.append({"flags": flags.tolist(), "pruned": pruned})
    return model.lm_head(model.model.norm(h))[0].numpy(), records


def load_model(model_dir) -> mx.CompactMixtral:
    """A legacy-layout checkpoint (the tiny model) as a float64 CompactMixtral."""
    from mcmoe_gguf.model.checkpoint import Checkpoint
    ck = Checkpoint(model_dir)
    model = mx.CompactMixtral(ck.hp)
    model.load_state_dict({k: ck.get(k) for k in model.state_dict()})
    return model.double().eval()


# ---------------------------------------------------------------- the rule alone, for the op and kernel tests

def rule_numpy(ids, w, imp, mu, n_protect, marker):
    """The rule on one micro-batch, float32 like the engine: (ids, weights, protected, rule fired)."""
    T, k = ids.shape
    ids_o, w_o = ids.copy(), w.astype(np.float32).copy()
    prot = np.zeros(T, bool)
    if imp is not None and n_protect:
        prot[np.argsort(-imp, kind="stable")[:n_protect]] = True
    rule = np.zeros(T, bool)
    mu = np.float32(mu)
    for t in range(T):
        top = int(np.argmax(w[t]))           # first maximum
        fire = np.array([s != top and w[t, s] < mu * w[t, top] for s in range(k)])
        rule[t] = fire.any()
        if fire.any() and not prot[t]:
            total = np.float32(w[t].sum(dtype=np.float32))
            kept = ~fire
            ids_o[t, fire] = marker
            w_o[t, fire] = 0
            w_o[t, kept] = total if kept.sum() == 1 else \
                w[t, kept] * (total / np.float32(w[t, kept].sum(dtype=np.float32)))
    return ids_o, w_o, prot, rule


def routing_case(k: int, case: str, T: int, n_expert: int = 8, seed: int = 0):
    """(ids, weights, importance, mu, n_protect) of a random micro-batch for the named case:
    random | ties (equal importances and equal weights) | mu0 | protect_all | no_importance."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(n_expert)[:k] for _ in range(T)]).astype(np.int32)
    w = rng.dirichlet(np.ones(k), T).astype(np.float32)
    imp = rng.standard_normal(T).astype(np.float32)
    mu, n_protect = 0.6, max(1, T // 16)
    if case == "ties":
        imp = np.round(imp)                  # many equal importances: the lower index wins
        w[::5] = 1.0 / k                     # equal weights: the first slot is the top one
    if case == "mu0":
        mu = 0.0
    if case == "protect_all":
        n_protect = T
    if case == "no_importance":
        imp = None
    return ids, w, imp, mu, n_protect
