"""The program chooses the tensors outside the experts too (mix "program"): embeddings, output, attention.

A fixed mix (quant/mixes.py) puts the bytes outside the experts where llama.cpp's hand-made rule puts them.
On the tiny models those tensors are ~18% of the weights and their types move quality more than the experts
do: IQ3_S instead of Q2_K token embeddings alone took the default model's IQ2_XS file from KLD 0.0135 to
0.0085 (docs/RESULTS.md, "model_scope"). So with mix="program" they join the model's one integer program:

    group g in embed, output, attn_q, attn_k, attn_v, attn_o (one type for the group in every layer, as
    llama.cpp's mixes have it), candidate type t of CANDIDATES
    KL[g, t] = mean KL(float model || float model with only group g in type t), per token, on the probe
               sequences (the layer sensitivity's, quant/sensitivity.py), measured during the statistics pass
    bytes[g, t] = the group's bytes in type t

The experts' costs are in the same unit once each layer's eps is weighed by its KL per unit of eps
(sensitivity="kl"), so one program minimises the summed KL, experts and groups together, under one byte cap:
that of the file the reference mix (what "auto" picks at the budget) would give. Summing KLs of separate
perturbations assumes they add, as second-order effects of independent errors do.

Each group and type is quantized as the file will write it: ggml's quantizer with the importance of the
tensor's inputs on all calibration tokens (attention: per layer; output: the final norm's output of the
probes; embeddings: none, as llama.cpp). The probes of the attention groups carry their perturbation
through every layer, so the cost is one extra layer forward per (group, type) and layer on the probe
sequences: 4 x |attention candidates| + |embedding candidates| copies, each sens_seqs x seq_len x d floats
of state (on Mixtral at --sens-seqs 2: ~55 copies x 64 MB).
"""
from __future__ import annotations

import numpy as np
import torch

from mcmoe_gguf.quant import mixes
from mcmoe_gguf.quant.quantizers import ggml_packed, importance

PROGRAM = mixes.PROGRAM
GROUPS = ("embed", "output", "attn_q", "attn_k", "attn_v", "attn_o")
_PROJ = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_o": "o_proj"}
# llama.cpp's own choices for these tensors across its mixes, and their neighbours
CANDIDATES = {
    "embed": ("q2_k", "iq3_s", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"),
    "output": ("q3_k", "q4_k", "q5_k", "q6_k", "q8_0"),
    "attn": ("iq1_m", "iq2_xxs", "iq2_s", "iq3_xxs", "iq3_s", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"),
}
KEY = "mix:"                     # the probes' keys: "mix:<group>:<type>"


def candidates(hp, reference: mixes.Mix, fixed: dict | None = None) -> dict[str, tuple[str, ...]]:
    """{group: types the program may choose}, each type one whose blocks fit the group's rows, the reference
    mix's own type among them (so the reference's file is always a feasible choice); fixed (e.g. {"embed":
    "q8_0"} from --embed-type) pins a group to one type. A tied output has no group."""
    shapes = mixes.nonexpert_shapes(hp)
    out = {}
    for g in GROUPS:
        if not shapes[g]:
            continue
        ref = getattr(reference, g)
        if mixes.is_ours(ref):
            raise ValueError(f"mix 'program' chooses among llama.cpp's types; the reference mix has {ref} for {g}")
        pool = (fixed[g],) if fixed and g in fixed else CANDIDATES["attn" if g.startswith("attn") else g]
        if mixes.is_ours(pool[0]) or pool[0] in ("f16", "f32"):
            raise ValueError(f"mix 'program' chooses among llama.cpp's quantized types; {pool[0]} for {g} is not one")
        if ref not in pool and not (fixed and g in fixed):
            pool = pool + (ref,)
        ok = {}
        for t in pool:
            try:
                ok[t] = group_bytes(hp, g, t)
            except ValueError:          # its blocks do not divide the rows (e.g. a 256-block k-quant, d=2880)
                continue
        if not ok:
            raise ValueError(f"no candidate type fits the rows of {g} ({shapes[g][0]}); candidates: {', '.join(pool)}")
        out[g] = tuple(sorted(ok, key=ok.get))          # narrowest first: the tables read so
    return out


def group_bytes(hp, group: str, t: str) -> int:
    return sum(mixes.tensor_bytes(t, r, n) for r, n in mixes.nonexpert_shapes(hp)[group])


def probe_key(group: str, t: str) -> str:
    return f"{KEY}{group}:{t}"


def parse_key(key: str) -> tuple[str, str]:
    group, _, t = key[len(KEY):].partition(":")
    return group, t


@torch.no_grad()
def start_probes(embed_weight: torch.Tensor, tokens: torch.Tensor, h_fp: torch.Tensor, cands: dict) -> dict:
    """{key: hidden states entering layer 0} of every probe that carries a perturbation through the layers:
    the embedding candidates (tokens looked up in the quantized table) and the attention ones (float so far)."""
    out = {}
    for t in cands.get("embed", ()):
        _, deq = ggml_packed(embed_weight, t, None)
        out[probe_key("embed", t)] = torch.nn.functional.embedding(tokens, deq.float()).to(h_fp.dtype).cpu()
    for g in cands:
        if g.startswith("attn"):
            for t in cands[g]:
                out[probe_key(g, t)] = h_fp.cpu()
    return out


@torch.no_grad()
def layer_step(layer: torch.nn.Module, probes: dict, imp_a: torch.Tensor, imp_o: torch.Tensor, forward,
               device) -> dict:
    """The probes after this (float) layer: an attention probe passes it with only its group's projection in
    its type (quantized with the importance of that projection's inputs on the calibration tokens: imp_a for
    q/k/v, imp_o for o; quantizers.importance), every other probe as it is. forward(layer, h) -> h."""
    out = {}
    for key, h in probes.items():
        group, t = parse_key(key)
        if not group.startswith("attn"):
            out[key] = forward(layer, h.to(device)).cpu()
            continue
        lin = getattr(layer.self_attn, _PROJ[group])
        keep = lin.weight.detach().clone()
        _, deq = ggml_packed(keep, t, imp_o if group == "attn_o" else imp_a)
        lin.weight.copy_(deq)
        try:
            out[key] = forward(layer, h.to(device)).cpu()
        finally:
            lin.weight.copy_(keep)
    return out


@torch.no_grad()
def measure(mean_kl, h_fp: torch.Tensor, probes: dict, cands: dict, head: torch.Tensor | None,
            head_input: torch.Tensor | None) -> dict:
    """{group: {type: KL}}. mean_kl(h_ref, h, head=None) is the layer sensitivity's; the output candidates
    need no probe: the float model's last hidden states through the quantized output matrix `head`
    (importance from head_input, the final norm's output)."""
    kl: dict[str, dict[str, float]] = {}
    for key, h in probes.items():
        g, t = parse_key(key)
        kl.setdefault(g, {})[t] = float(mean_kl(h_fp, h.to(h_fp.device)))
    for t in cands.get("output", ()):
        _, deq = ggml_packed(head, t, importance(head_input))
        kl.setdefault("output", {})[t] = float(mean_kl(h_fp, h_fp, head=deq.float()))
    return kl


def items(hp, kl: dict, cands: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(groups, cost [G, U], bytes [G, U]) for allocate_ladder's extra items: row g's columns are cands[g]
    (narrower rows repeat their last choice, which adds nothing new). A measured KL below 0 (float noise) is 0."""
    groups = [g for g in GROUPS if g in cands]
    U = max(len(cands[g]) for g in groups)
    cost, size = np.zeros((len(groups), U)), np.zeros((len(groups), U), dtype=np.int64)
    for i, g in enumerate(groups):
        ts = list(cands[g]) + [cands[g][-1]] * (U - len(cands[g]))
        cost[i] = [max(float(kl[g][t]), 0.0) for t in ts]
        size[i] = [group_bytes(hp, g, t) for t in ts]
    return groups, cost, size


def matrix_bytes(hp, mix: mixes.Mix) -> int:
    """Bytes of the mix's matrices (no F32 router or norms): the reference's share of the program's cap."""
    return mixes.nonexpert_bytes(hp, mix) - 4 * mixes.f32_params(hp)


def chosen_mix(groups: list[str], cands: dict, choice, reference: mixes.Mix) -> mixes.Mix:
    """The Mix of the program's choice (a tied output keeps the reference's field, which nothing writes)."""
    fields = reference.to_dict()
    for g, c in zip(groups, np.asarray(choice).tolist()):
        fields[g] = cands[g][min(int(c), len(cands[g]) - 1)]
    return mixes.Mix(**fields)
