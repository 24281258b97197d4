"""A Mixtral-shaped model for speed benchmarks: real layer sizes (4096/14336, 8 experts top-2, GQA 32/8),
2 layers, random weights, the tiny model's tokenizer (vocab 4096), and every file scripts/bench_speed.py
times on it, built once and cached under ~/.cache/mcmoe-gguf/bench/mixtral-shaped/<recipe hash>/.

    hf/                 random HF checkpoint (bf16, one shard per layer, generated layer by layer)
    f16.gguf            mcmoe_gguf.gguf.export.convert
    imatrix.gguf        llama-imatrix on a few chunks of the tiny model's calibration text
    q2_k.gguf ...       llama-quantize (Q3_K_S, Q2_K, Q2_0, IQ2_XXS; imatrix for all), MCQ2 (no imatrix)
    pmq-2.5.gguf ...    mcmoe_gguf.quant.pmq.quantize (method rtn, a few calibration sequences) + export_pmq

Every step writes atomically (temporary name, rename at the end), so a crash leaves no half artifact and a
rerun continues with the first missing one. Weights are random (quality is meaningless); the files exist
so the kernels run at Mixtral's real matrix sizes, where the expert weights no longer fit in the L3 cache.

mirror(src, out, hp): any other file's type choices (every tensor's type, per-expert or merged layout) at these
sizes, with synthetic data, in ~20 s instead of hours of quantization (scripts/bench_speed.py --model pareto).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcmoe_gguf.model.arch import mixtral as mx  # noqa: E402
from mcmoe_gguf.apps.baselines import imatrix, stock_quantize  # noqa: E402
from mcmoe_gguf.base.cache import cache_dir, locked  # noqa: E402
from mcmoe_gguf.model.tiny import tiny_model  # noqa: E402

RECIPE_VERSION = 1          # bump when the generator below changes the weights


@dataclass(frozen=True)
class Recipe:
    n_layers: int = 2
    hidden: int = 4096
    ff: int = 14336
    heads: int = 32
    kv_heads: int = 8
    experts: int = 8
    top_k: int = 2
    std: float = 0.02
    seed: int = 0
    # files derived from it
    stock_types: tuple[str, ...] = ("Q3_K_S", "Q2_K", "Q2_0", "IQ2_XXS")
    imatrix_chunks: int = 8       # x 256 tokens of the tiny model's calib.txt
    pmq_budgets: tuple[str, ...] = ("2.5", "2.0")
    pmq_n_seq: int = 8            # x 256 tokens
    pmq_fit: str = "minmax"       # grid fit of experts AND of the eps statistics (see build_pmq)


def config(r: Recipe, tok_cfg: dict) -> dict:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": tok_cfg["vocab_size"],
            "hidden_size": r.hidden, "intermediate_size": r.ff, "num_hidden_layers": r.n_layers,
            "num_attention_heads": r.heads, "num_key_value_heads": r.kv_heads, "head_dim": r.hidden // r.heads,
            "num_local_experts": r.experts, "num_experts_per_tok": r.top_k, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False, "hidden_act": "silu",
            "bos_token_id": tok_cfg.get("bos_token_id", 1), "eos_token_id": tok_cfg.get("eos_token_id", 2),
            "torch_dtype": "bfloat16", "initializer_range": r.std, "sliding_window": None,
            "router_aux_loss_coef": 0.02, "output_router_logits": False, "attention_dropout": 0.0}


def model_dir(r: Recipe = Recipe()) -> Path:
    tiny = tiny_model()
    key = json.dumps({"recipe": asdict(r), "v": RECIPE_VERSION, "tokenizer": tiny.name}, sort_keys=True)
    return cache_dir("bench", "mixtral-shaped", hashlib.sha256(key.encode()).hexdigest()[:16])


def build_checkpoint(r: Recipe, d: Path) -> Path:
    """Random bf16 checkpoint, one safetensors shard per layer (peak RAM ~ one layer: 2.8 GB bf16)."""
    out = d / "hf"
    if (out / "model.safetensors.index.json").exists():
        return out
    tiny = tiny_model()
    tmp = d / "hf.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    cfg = config(r, json.loads((tiny / "config.json").read_text()))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny / f, tmp / f)
    hp = mx.MixtralHParams.from_config(cfg)
    g = torch.Generator().manual_seed(r.seed)

    def rnd(*shape, std=r.std):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def norm(n):
        return (1 + rnd(n, std=0.1).float()).to(torch.bfloat16)

    d_, ff, dh = hp.hidden_size, hp.intermediate_size, hp.d_head
    n_shards = r.n_layers + 1
    weight_map = {}

    def save(sd: dict, s: int):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(sd, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sd})

    # the embedding rows feed an RMSNorm, so their scale does not matter; std 1 like the tests
    save({mx.GLOBAL_KEYS["embed"]: rnd(hp.vocab_size, d_, std=1.0), mx.GLOBAL_KEYS["norm"]: norm(d_),
          mx.GLOBAL_KEYS["lm_head"]: rnd(hp.vocab_size, d_)}, 0)
    for i in range(hp.num_hidden_layers):
        k = mx.attn_keys(i)
        sd = {k["q"]: rnd(hp.num_attention_heads * dh, d_), k["k"]: rnd(hp.num_key_value_heads * dh, d_),
              k["v"]: rnd(hp.num_key_value_heads * dh, d_), k["o"]: rnd(d_, hp.num_attention_heads * dh),
              k["attn_norm"]: norm(d_), k["ffn_norm"]: norm(d_), mx.legacy_router_key(i): rnd(hp.num_local_experts, d_)}
        for e in range(hp.num_local_experts):
            sd[mx.legacy_expert_key(i, e, "w1")] = rnd(ff, d_)
            sd[mx.legacy_expert_key(i, e, "w3")] = rnd(ff, d_)
            sd[mx.legacy_expert_key(i, e, "w2")] = rnd(d_, ff)
        save(sd, i + 1)
        del sd
        print(f"  checkpoint: layer {i} written", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    os.replace(tmp, out)
    return out


def build_pmq(r: Recipe, d: Path, hf: Path, budget: str) -> Path:
    """PMQ file at `budget` real expert bpw through our pipeline (quantize + export_pmq).

    Shortcut for speed only: the random weights make quality meaningless, and the "mse" grid fit costs
    ~8-12 s per 14336 x 4096 matrix on one core (formats.fit_params), ~100 fits per layer (72 of them for
    the eps statistics at 1/2/3 bits) = ~15 min per layer and budget. With pmq_fit="minmax" (~2 s per fit)
    both the expert grids (PMQConfig.param_method) and the eps statistics use min/max round-to-nearest;
    the latter needs pmq.moe_stats wrapped here, since PMQConfig has no knob for it. The widths PMQ
    allocates, hence the bytes and the kernels that run, are what the benchmark measures.
    """
    out = d / f"pmq-{budget}.gguf"
    with locked(f"mixtral-shaped-{d.name}-pmq-{budget}"):     # one writer per work directory
        if not out.exists():
            _build_pmq(r, d, hf, budget, out)
    return out


def _build_pmq(r: Recipe, d: Path, hf: Path, budget: str, out: Path) -> None:
    from mcmoe_gguf.quant import pmq
    from mcmoe_gguf.quant.calibration import moe_stats, rtn_dequant
    from mcmoe_gguf.gguf.export import export_pmq
    work = d / f"pmq-{budget}.work"
    cfg = pmq.PMQConfig(budget=budget, method="rtn", param_method=r.pmq_fit, n_seq=r.pmq_n_seq, seq_len=256,
                        calib_text=str(tiny_model() / "calib.txt"), mix="q8")
    saved = pmq.moe_stats
    if r.pmq_fit != "mse":
        pmq.moe_stats = partial(moe_stats, quantize=partial(rtn_dequant, method=r.pmq_fit))
    try:
        pmq.quantize(hf, work, cfg, progress=True)
    finally:
        pmq.moe_stats = saved
    export_pmq(work, out, progress=False)
    shutil.rmtree(work)       # ~ the size of the file again; the GGUF is what is kept


def build_all(r: Recipe = Recipe(), threads: int = 2) -> dict[str, Path]:
    """name -> GGUF of every file the Mixtral-shaped speed benchmark times (built if missing)."""
    from mcmoe_gguf.gguf.export import convert
    d = model_dir(r)
    names = [t.lower() for t in r.stock_types] + ["mcq2"] + [f"pmq-{b}" for b in r.pmq_budgets]
    files = {n: d / f"{n}.gguf" for n in names}
    if all(p.exists() for p in files.values()):
        return files
    with locked("mixtral-shaped-" + d.name):
        hf = build_checkpoint(r, d)
        f16 = d / "f16.gguf"
        if not all(files[t.lower()].exists() for t in r.stock_types) or not files["mcq2"].exists():
            if not f16.exists():
                print("  converting to F16", flush=True)
                convert(hf, f16, "f16", progress=False)
            im = imatrix(f16, tiny_model() / "calib.txt", d / "imatrix.gguf", ctx=256, chunks=r.imatrix_chunks,
                         threads=threads)
            for t in r.stock_types:
                print(f"  llama-quantize {t}", flush=True)
                stock_quantize(f16, t, files[t.lower()], im, threads)
            print("  llama-quantize MCQ2", flush=True)
            stock_quantize(f16, "MCQ2", files["mcq2"], None, threads)
        for b in r.pmq_budgets:
            print(f"  PMQ {b}", flush=True)
            build_pmq(r, d, hf, b)
    return files


# ------------------------------------------------------------------------ mirrors of other files' types
def _role_shape(name: str, hp, n_vocab: int) -> tuple[int, ...]:
    """numpy-order shape of tensor `name` in a model of hyper-parameters hp (unknown names raise)."""
    import re
    from mcmoe_gguf.quant.budget import projection_shapes
    d, dh, e, ps = hp.hidden_size, hp.d_head, hp.num_local_experts, projection_shapes(hp)
    fixed = {"token_embd.weight": (n_vocab, d), "output.weight": (n_vocab, d), "output_norm.weight": (d,)}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"blk\.\d+\.(\w+?)(?:\.(\d+))?\.weight", name)
    role = m and m.group(1)
    per_role = {"attn_norm": (d,), "ffn_norm": (d,), "attn_q": (hp.num_attention_heads * dh, d),
                "attn_k": (hp.num_key_value_heads * dh, d), "attn_v": (hp.num_key_value_heads * dh, d),
                "attn_output": (d, hp.num_attention_heads * dh), "ffn_gate_inp": (e, d),
                "ffn_gate": ps["w1"], "ffn_up": ps["w3"], "ffn_down": ps["w2"],
                "ffn_gate_exps": (e, *ps["w1"]), "ffn_up_exps": (e, *ps["w3"]), "ffn_down_exps": (e, *ps["w2"])}
    if role not in per_role:
        raise ValueError(f"{name}: not a tensor of a Mixtral model; cannot mirror it")
    return per_role[role]


def _synthetic_rows(qtype: int, n: int, rows: int, rng) -> np.ndarray:
    """`rows` random Gaussian rows of n weights quantized to qtype by its own quantizer (ggml's, or
    formats.py for our mcq types; importance 1 where ggml asks for one): uint8 [rows, row bytes]."""
    from mcmoe_gguf.base.ggml import ggml
    from mcmoe_gguf.gguf.types import type_name
    from mcmoe_gguf.quant import formats
    w = rng.standard_normal((rows, n), dtype=np.float32) * 0.02
    if qtype in formats.TYPES_BY_ID:
        return np.asarray(formats.quantize(torch.from_numpy(w), formats.TYPES_BY_ID[qtype].bits, method="minmax"),
                          np.uint8).reshape(rows, -1)
    g, name = ggml(), type_name(qtype).lower()
    return g.quantize(w, name, imatrix=np.ones(n, np.float32) if g.requires_imatrix(name) else None)


def mirror(src: Path, out: Path, hp, rows_per_type: int = 256, seed: int = 0, retype=None) -> Path:
    """A model of hyper-parameters hp (e.g. Mixtral's sizes) whose every tensor has the type it has in
    `src`, same names and layout (per-expert tensors stay per-expert, merged ones merged), metadata and
    tokenizer copied from src: what a file's type choices cost in pp/tg at another model size.

    The data is synthetic: per (type, row length), `rows_per_type` random rows quantized by the type's own
    quantizer, repeated down every tensor of that type (norms are 1, the router and other float tensors
    random). The mat-vec and mat-mul kernels of these types take the same time whatever the values, so the
    file times like a real one of its types; its outputs mean nothing. Written atomically.

    retype(name, type id) -> type id: other types for some tensors (tests: chosen layouts of groups); then
    the per-expert mcq widths of src's metadata (mcmoe.expert_bits) no longer hold and are left out."""
    import gguf
    from mcmoe_gguf.gguf.export import Planned, write_gguf
    from mcmoe_gguf.gguf.types import register, type_name
    register()
    rd = gguf.GGUFReader(src)
    arch = rd.fields["general.architecture"].contents()
    n_layers = int(rd.fields[f"{arch}.block_count"].contents())
    if n_layers != hp.num_hidden_layers or int(rd.fields[f"{arch}.expert_count"].contents()) != hp.num_local_experts:
        raise ValueError(f"{src}: {n_layers} layers x {rd.fields[f'{arch}.expert_count'].contents()} experts; "
                         f"the mirror needs {hp.num_hidden_layers} x {hp.num_local_experts}")
    emb = next(t for t in rd.tensors if t.name == "token_embd.weight")
    n_vocab = int(emb.shape[-1])            # ggml order: [n_embd, n_vocab]
    types = {t.name: int(t.tensor_type) for t in rd.tensors}
    if retype is not None:
        types = {n: int(retype(n, q)) for n, q in types.items()}
    changed = any(types[t.name] != int(t.tensor_type) for t in rd.tensors)
    w = gguf.GGUFWriter(path=None, arch=arch)
    for f in rd.fields.values():            # tokenizer, general.*, mcmoe.*: as in src
        if f.name.startswith(("GGUF.", f"{arch}.")) or f.name == "general.architecture" or \
                (changed and f.name == "mcmoe.expert_bits"):
            continue
        vt = gguf.GGUFValueType(f.types[0])
        sub = gguf.GGUFValueType(f.types[-1]) if vt == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vt, sub)
    mx.gguf_metadata(w, hp)
    rng = np.random.default_rng(seed)
    blocks: dict[tuple[int, int], np.ndarray] = {}
    planned = []
    for t in rd.tensors:
        shape, qt = _role_shape(t.name, hp, n_vocab), types[t.name]
        p = Planned(t.name, shape, qt, None)
        if p.is_float:
            p.load = (lambda s=shape: torch.ones(s)) if t.name.endswith("norm.weight") else \
                (lambda s=shape: torch.from_numpy(rng.standard_normal(s, dtype=np.float32) * 0.02))
        else:
            n, rows = shape[-1], int(np.prod(shape[:-1]))
            if n % p.block[0]:
                raise ValueError(f"{t.name}: {type_name(qt)} blocks of {p.block[0]} do not divide rows of {n}")
            key = (qt, n)
            if key not in blocks:
                blocks[key] = _synthetic_rows(qt, n, min(rows_per_type, rows), rng)
            p.load = lambda b=blocks[key], rows=rows, shape=shape: \
                np.resize(b, (rows, b.shape[1])).reshape(*shape[:-1], b.shape[1])
        planned.append(p)
    return write_gguf(w, planned, Path(out), progress=False)


if __name__ == "__main__":
    print(build_all())
