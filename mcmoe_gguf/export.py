"""GGUF writing: a llama-architecture MoE file from a Checkpoint, streamed one tensor at a time.

The whole plan (names, shapes, types, byte sizes) is built from the safetensors headers first, so a
missing tensor fails before anything is written; then header, metadata and tensor infos go out, and
tensors follow one by one (at most one stacked expert projection in memory). The file is written
under a temporary name in the destination directory and renamed at the end: a crash never leaves a
half-written OUT.gguf, and an existing file is only replaced with force=True.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import Checkpoint
from .arch import mixtral as mx
from .vocab import add_tokenizer

OUTTYPES = {  # name (as in convert_hf_to_gguf --outtype) -> (ggml type, general.file_type)
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


class ExportError(ValueError):
    pass


@dataclass
class Planned:
    name: str
    shape: tuple[int, ...]                   # numpy order (ggml's ne reversed)
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * {gguf.GGMLQuantizationType.F32: 4}.get(self.qtype, 2)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores q/k rows for NEOX-style (half-split) RoPE; llama.cpp's llama arch rotates adjacent
    pairs, so rows are interleaved back as convert_hf_to_gguf.py does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plan(ck: Checkpoint, outtype: str) -> list[Planned]:
    hp = ck.hp
    wtype = OUTTYPES[outtype][0]
    f32 = gguf.GGMLQuantizationType.F32
    out: list[Planned] = []

    def add(name, key=None, qtype=wtype, load=None, shape=None):
        if key is not None:
            shape = ck.shape(key)          # raises for a missing tensor, before any byte is written
            load = load or (lambda k=key: ck.get(k))
        # 1D tensors (norms) and the router stay F32, as in llama.cpp's converter: tiny and precision-critical
        if len(shape) == 1:
            qtype = f32
        out.append(Planned(name, tuple(shape), qtype, load))

    add("token_embd.weight", mx.GLOBAL_KEYS["embed"])
    for i in range(hp.num_hidden_layers):
        k = mx.attn_keys(i)
        add(f"blk.{i}.attn_norm.weight", k["attn_norm"])
        add(f"blk.{i}.attn_q.weight", k["q"], load=lambda k=k["q"]: permute_qk(ck.get(k), hp.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", k["k"], load=lambda k=k["k"]: permute_qk(ck.get(k), hp.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", k["v"])
        add(f"blk.{i}.attn_output.weight", k["o"])
        add(f"blk.{i}.ffn_norm.weight", k["ffn_norm"])
        router_key = mx.legacy_router_key(i) if ck.layout == "legacy" else mx.fused_router_key(i)
        add(f"blk.{i}.ffn_gate_inp.weight", router_key, qtype=f32)
        for proj, gname in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
            _check_expert_keys(ck, i, proj)
            add(f"blk.{i}.{gname}.weight", shape=ck.expert_shape(proj), load=lambda i=i, p=proj: ck.experts(i, p))
    add("output_norm.weight", mx.GLOBAL_KEYS["norm"])
    if not hp.tie_word_embeddings:
        add("output.weight", mx.GLOBAL_KEYS["lm_head"])
    return out


def _check_expert_keys(ck: Checkpoint, layer: int, proj: str) -> None:
    E = ck.hp.num_local_experts
    if ck.layout == "legacy":
        want = ck.expert_shape(proj)[1:]
        for e in range(E):
            got = ck.shape(mx.legacy_expert_key(layer, e, proj))
            if tuple(got) != want:
                raise ExportError(f"{mx.legacy_expert_key(layer, e, proj)} has shape {got}, config implies {want}")
    else:
        key = mx.fused_down_key(layer) if proj == "w2" else mx.fused_gate_up_key(layer)
        ck.shape(key)


def to_numpy(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    t = t.detach()
    if not torch.isfinite(t).all():
        raise ExportError("tensor holds NaN or Inf values")
    if qtype == gguf.GGMLQuantizationType.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float32).to(torch.float16).contiguous().numpy()
    # BF16 travels as raw uint16 (numpy has no bfloat16)
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def add_metadata(w: gguf.GGUFWriter, ck: Checkpoint, name: str, outtype: str) -> None:
    hp = ck.hp
    w.add_name(name)
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
    w.add_file_type(OUTTYPES[outtype][1])


def convert(model_dir: str | Path, out: str | Path, outtype: str = "f16", force: bool = False,
            name: str | None = None, progress: bool = True) -> Path:
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ck = Checkpoint(model_dir)
    out = Path(out)
    _check_destination(ck, out, force)
    tensors = plan(ck, outtype)
    w = gguf.GGUFWriter(path=None, arch="llama")
    add_metadata(w, ck, name or ck.dir.resolve().name, outtype)
    add_tokenizer(w, ck.dir, ck.hp.vocab_size)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16,
                          t.nbytes, raw_dtype=t.qtype)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    try:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tqdm(tensors, desc=f"convert -> {out.name}", unit="tensor", disable=not progress):
            try:
                arr = to_numpy(t.load(), t.qtype)
            except ExportError as e:
                raise ExportError(f"{t.name}: {e}") from None
            if arr.shape != t.shape:
                raise ExportError(f"{t.name}: got shape {arr.shape}, planned {t.shape}")
            w.write_tensor_data(arr)
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _check_destination(ck: Checkpoint, out: Path, force: bool) -> None:
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: output directory does not exist")
    inputs = {r.path.resolve() for r in ck.tensors.values()} | {(ck.dir / "config.json").resolve()}
    if out.resolve() in inputs or (out.exists() and out.resolve().parent == ck.dir.resolve() and out.suffix != ".gguf"):
        raise ExportError(f"{out}: refusing to overwrite an input file of the checkpoint")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to overwrite it")
