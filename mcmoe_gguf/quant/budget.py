"""What a quantized model costs: real bytes of its file (block scales counted), per expert and in total.

PMQ's budgets ("2.5" real expert bpw, "13GB") and allocation.json's accounting both come from here, with
the block sizes of formats.py, so the numbers match the bytes the writer produces (tests/quant/test_pmq.py).
"""
from __future__ import annotations

import numpy as np

from mcmoe_gguf.quant import formats
from mcmoe_gguf.quant.mixes import f32_params, nonexpert_bytes, nonexpert_shapes, tensor_bytes


PROJECTIONS = ("w1", "w3", "w2")            # an expert's gate, up, down (Mixtral's names); inputs x, x, inner


def projection_shapes(hp) -> dict[str, tuple[int, int]]:
    """[rows, n] of each expert projection (numpy order: out, in)."""
    d, ff = hp.hidden_size, hp.intermediate_size
    return {"w1": (ff, d), "w3": (ff, d), "w2": (d, ff)}


def types_of_bits(bits) -> np.ndarray:
    """[..., P] type names of per-expert mcq widths [...] (the paper's: one width for all three)."""
    bits = np.asarray(bits)
    out = np.empty(bits.shape + (len(PROJECTIONS),), dtype=object)
    for i in np.ndindex(*bits.shape):
        out[i] = f"mcq{int(bits[i])}"
    return out


def recorded_types(record: dict) -> np.ndarray:
    """The type names of a layer file ([E, P]) or allocation.json ([L, E, P]); those written before the
    ladder existed have only the widths ("bits")."""
    return np.array(record["types"], dtype=object) if "types" in record else types_of_bits(record["bits"])


def expert_bytes_by_type(hp, types) -> np.ndarray:
    """int64 [L, E]: bytes of each expert, its projections in types [L, E, P] (whole blocks, as written)."""
    shapes = projection_shapes(hp)
    return np.array([[sum(tensor_bytes(t, *shapes[p]) for t, p in zip(te, PROJECTIONS)) for te in row]
                     for row in types], dtype=np.int64)


def bits_of_types(types) -> np.ndarray | None:
    """[L, E] widths if every expert is one mcq width in all its projections, else None."""
    types = np.asarray(types, dtype=object)
    first = types[..., 0]
    if not all(isinstance(t, str) and t.startswith("mcq") for t in first.ravel()) or (types != first[..., None]).any():
        return None
    return np.vectorize(lambda t: int(t[3:]), otypes=[np.int64])(first)


def expert_params(hp) -> np.ndarray:
    return np.full((hp.num_hidden_layers, hp.num_local_experts), 3 * hp.hidden_size * hp.intermediate_size)


def check_row_lengths(hp) -> None:
    """The engine's CPU kernels read activations per 256 (Q8_K, docs/FORMAT.md), so every row of an mcq
    matrix (the input dimension of each projection) must be a multiple of 256: refuse before hours of work."""
    dims = {"hidden_size": hp.hidden_size, "intermediate_size": hp.intermediate_size,
            "num_attention_heads * head_dim": hp.num_attention_heads * hp.d_head}
    bad = {k: v for k, v in dims.items() if v % formats.ROW_MULTIPLE}
    if bad:
        raise ValueError(f"the mcq types need input dimensions that are multiples of {formats.ROW_MULTIPLE}; this model has "
                         + ", ".join(f"{k}={v}" for k, v in bad.items()))


def size_report(ck, types, mix) -> dict:
    """Real bytes of the file this quantized state becomes (scales counted), experts and whole model;
    types: [L, E, P] type names of the expert projections (or [L, E] mcq widths); mix: the types outside
    the experts (quant/mixes.py)."""
    hp = ck.hp
    types = np.asarray(types, dtype=object)
    if types.ndim == 2:
        types = types_of_bits(types)
    n_exp = expert_params(hp)
    exp_bytes = int(expert_bytes_by_type(hp, types).sum())
    total_bytes = exp_bytes + nonexpert_bytes(hp, mix)
    other = sum(r * n for shapes_ in nonexpert_shapes(hp).values() for r, n in shapes_)
    total_params = int(n_exp.sum()) + other + f32_params(hp)
    return {"expert_bytes": exp_bytes, "expert_bpw": 8 * exp_bytes / int(n_exp.sum()),
            "total_bytes": total_bytes, "total_bpw": 8 * total_bytes / total_params}
