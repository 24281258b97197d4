"""Types of the tensors outside the experts: embeddings, output and attention (a "mix").

On the tiny models these tensors are ~18% of the weights (vocabulary 4096 x 256 twice, attention), on
Mixtral ~3.5%: whatever PMQ saves in the experts, a file with Q8_0 embeddings loses per file byte
against llama.cpp's own mixes, which put 2.6-6.6 bpw there. So by default PMQ writes them exactly as
llama.cpp's own mix of the nearest expert width does (`auto`): the comparison at equal file bytes then
differs in the experts only, where PMQ's allocation is.

STOCK is llama.cpp's choice for an 8-expert model (llama_tensor_get_type in src/llama-quant.cpp: e.g.
for IQ2_XXS, output Q5_K, attn_k/attn_v Q4_K, attn_output Q5_K, token_embd Q2_K). It is checked against
the pinned `llama-quantize --dry-run` by tests/quant/test_mixes.py, so it cannot drift from upstream.
The router (ffn_gate_inp) and the norms stay F32 in every mix, as llama.cpp never quantizes them.

A type is a ggml type name (quantized by ggml's own quantizer, base/ggml.py, with importance from the
calibration tokens where the tensor has an input: attention, output) or "mcqN", our affine grid at N
bits (GPTQ'd like the experts). "f16"/"f32" keep a tensor as it is.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

import gguf

from mcmoe_gguf.quant import formats

ATTN = ("attn_q", "attn_k", "attn_v", "attn_o")


@dataclass(frozen=True)
class Mix:
    embed: str
    output: str
    attn_q: str
    attn_k: str
    attn_v: str
    attn_o: str

    def attn(self, proj: str) -> str:
        """type of q_proj / k_proj / v_proj / o_proj"""
        return getattr(self, {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_o"}[proj])

    def to_dict(self) -> dict:
        return asdict(self)


# llama.cpp's mixes for 8 experts: ftype -> (expert gate/up type, mean real expert bpw, Mix). Note
# IQ2_S's base type is IQ2_XS (IQ2_M's is IQ2_S), and Q2_K/Q3_K_S put ffn_down in Q3_K (Q2_K's experts:
# (2 x 2.625 + 3.4375) / 3 bpw; Q4_K_M's ffn_down is Q6_K in 16 of Mixtral's 32 layers; IQ3_XXS's is wider in
# some layers of some models, e.g. Q3_K in a 2-layer one).
STOCK: dict[str, tuple[str, float, Mix]] = {
    "IQ1_S": ("iq1_s", 1.5625, Mix("q2_k", "q5_k", "iq1_s", "q4_k", "q4_k", "q5_k")),
    "IQ1_M": ("iq1_m", 1.75, Mix("q2_k", "q5_k", "iq1_m", "q4_k", "q4_k", "q5_k")),
    "IQ2_XXS": ("iq2_xxs", 2.0625, Mix("q2_k", "q5_k", "iq2_xxs", "q4_k", "q4_k", "q5_k")),
    "IQ2_XS": ("iq2_xs", 2.3125, Mix("q2_k", "q5_k", "iq2_xs", "q4_k", "q4_k", "q5_k")),
    "IQ2_S": ("iq2_xs", 2.3125, Mix("iq3_s", "q5_k", "iq2_xs", "q4_k", "q4_k", "q5_k")),
    "Q2_K": ("q2_k", 2.8958, Mix("q2_k", "q6_k", "q2_k", "q8_0", "q8_0", "q5_k")),
    "IQ3_XXS": ("iq3_xxs", 3.0625, Mix("iq3_s", "q5_k", "iq2_s", "q8_0", "q8_0", "q5_k")),
    "Q3_K_S": ("q3_k", 3.4375, Mix("q3_k", "q6_k", "q3_k", "q8_0", "q8_0", "q5_k")),
    "Q4_K_M": ("q4_k", 4.84, Mix("q4_k", "q6_k", "q4_k", "q8_0", "q8_0", "q5_k")),
}

MIXES: dict[str, Mix] = {
    # what PMQ wrote before issue 13: embeddings and output Q8_0, attention GPTQ'd to mcq4
    "q8": Mix("q8_0", "q8_0", "mcq4", "mcq4", "mcq4", "mcq4"),
    **{f"stock:{k.lower()}": m for k, (_, _, m) in STOCK.items()},
}


# "program": the model's integer program chooses these tensors' types (quant/mix_choice.py); until it has,
# and for its byte cap, it stands for "auto"
PROGRAM = "program"


def names() -> list[str]:
    return ["auto", PROGRAM, *MIXES]


# "auto" chooses among these (IQ2_S is IQ2_XS's experts with wider embeddings)
# IQ3_XXS since issue 14: without it a 3.0-3.4 bpw file took Q2_K's mix (q2_k embeddings and attn_q), and a
# uniform mcn3 file lost to the IQ3_XXS file by more than its experts did (docs/RESULTS.md, "unshrink for mcq")
# IQ2_S after IQ2_XS (same expert width, so from 2.3125 bpw on IQ2_S's wins): its IQ3_S token embeddings instead
# of Q2_K took the default model's stock file from KLD 0.0135 to 0.0085, and a 2.5 bpw ladder file from 0.0101
# (IQ2_XS's mix) to 0.0051 (docs/RESULTS.md, "model_scope"); on Mixtral (32000 x 4096) they cost 13 MB
AUTO = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "Q3_K_S", "Q4_K_M")


def auto_ftype(expert_bpw: float) -> str:
    """The stock ftype whose expert width is the largest not above `expert_bpw` (IQ1_S below all)."""
    best = AUTO[0]
    for k in AUTO:
        if STOCK[k][1] <= expert_bpw + 1e-9:
            best = k
    return best


def resolve(name: str, expert_bpw: float) -> Mix:
    """A mix by name ("auto", "q8", "stock:iq2_xxs", ...) for a model whose experts get `expert_bpw`."""
    if name in ("auto", PROGRAM):
        return STOCK[auto_ftype(expert_bpw)][2]
    try:
        return MIXES[name]
    except KeyError:
        raise ValueError(f"unknown mix {name!r}; choose one of {', '.join(names())}") from None


def is_mcq(type_name: str) -> bool:
    return type_name.startswith("mcq")


def is_mcn(type_name: str) -> bool:
    """Our non-uniform table types (mcn2, mcn3; issue 14), GPTQ'd in Python like mcq."""
    return type_name in formats.MCN_TYPES


def is_mct(type_name: str) -> bool:
    """Our trellis types (mct1, mct2, mct3; issue 14), GPTQ'd in Python (BlockLDLQ over their 64-sequences)."""
    return type_name in formats.MCT_TYPES


def is_ours(type_name: str) -> bool:
    """A type of ours (mcq, mcn or mct): quantized by GPTQ here, unknown to an unpatched llama.cpp."""
    return is_mcq(type_name) or is_mcn(type_name) or is_mct(type_name)


def mcq_bits(type_name: str) -> int:
    return int(type_name[3:])


def tensor_bytes(type_name: str, rows: int, n: int) -> int:
    """Real bytes of a [rows, n] matrix in this type (the writer's layout: whole blocks per row)."""
    if type_name in ("f32", "f16", "bf16"):
        return rows * n * (4 if type_name == "f32" else 2)
    if is_mcq(type_name):
        return rows * n * formats.block_bytes(mcq_bits(type_name)) // formats.GROUP_SIZE
    if is_mcn(type_name) or is_mct(type_name):
        if n % formats.MCN_BLOCK:
            raise ValueError(f"{type_name} needs rows that are multiples of {formats.MCN_BLOCK} values; this tensor has {n}")
        spec = formats.MCN_TYPES.get(type_name) or formats.MCT_TYPES[type_name]
        return rows * (n // formats.MCN_BLOCK) * spec.block_bytes
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name.upper()]]
    if n % block:
        raise ValueError(f"{type_name} needs rows that are multiples of {block} values; this tensor has {n}")
    return rows * (n // block) * size


def nonexpert_shapes(hp) -> dict[str, list[tuple[int, int]]]:
    """[rows, n] of every matrix outside the experts, by mix field (numpy order: out, in)."""
    d, dh = hp.hidden_size, hp.d_head
    L = hp.num_hidden_layers
    out = {"embed": [(hp.vocab_size, d)], "output": [] if hp.tie_word_embeddings else [(hp.vocab_size, d)],
           "attn_q": [(hp.num_attention_heads * dh, d)] * L, "attn_k": [(hp.num_key_value_heads * dh, d)] * L,
           "attn_v": [(hp.num_key_value_heads * dh, d)] * L, "attn_o": [(d, hp.num_attention_heads * dh)] * L}
    return out


def f32_params(hp) -> int:
    """Values kept in F32 in every mix: the routers and the norms."""
    d = hp.hidden_size
    return hp.num_hidden_layers * (hp.num_local_experts * d + 2 * d) + d


def nonexpert_bytes(hp, mix: Mix) -> int:
    """Bytes of the mix's matrices plus the F32 router and norms."""
    total = sum(tensor_bytes(getattr(mix, k), r, n) for k, shapes in nonexpert_shapes(hp).items()
                for r, n in shapes)
    return total + 4 * f32_params(hp)


def expert_budget_for_size(hp, file_bytes: int, mix_name: str, n_expert_params: int,
                           overrides: dict | None = None) -> tuple[Fraction, Mix]:
    """--size: the expert bytes that leave room for the mix in `file_bytes` (the GGUF header and
    metadata, a few hundred KB, come on top), and the mix. For "auto" the mix depends on the expert
    width it leaves: iterate from the narrowest mix up and keep the last that still fits its own width.
    overrides: fields replaced in the mix (embed/output types given by the user)."""
    def over(m: Mix) -> Mix:
        return Mix(**{**m.to_dict(), **(overrides or {})})
    if mix_name not in ("auto", PROGRAM):
        mix = over(resolve(mix_name, 0.0))
        return Fraction(file_bytes - nonexpert_bytes(hp, mix)), mix
    chosen = None
    for k in AUTO:
        _, bpw, mix = STOCK[k]
        mix = over(mix)
        left = file_bytes - nonexpert_bytes(hp, mix)
        if left > 0 and 8 * left / n_expert_params >= bpw - 1e-9:
            chosen = (Fraction(left), mix)
    if chosen is None:
        mix = over(STOCK["IQ1_S"][2])
        chosen = (Fraction(file_bytes - nonexpert_bytes(hp, mix)), mix)
    if chosen[0] <= 0:
        raise ValueError(f"--size {file_bytes} bytes does not even hold the tensors outside the experts "
                         f"({nonexpert_bytes(hp, chosen[1])} bytes in the smallest mix)")
    return chosen
