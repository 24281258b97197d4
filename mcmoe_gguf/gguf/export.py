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

from mcmoe_gguf.quant import formats
from mcmoe_gguf.quant.budget import PROJECTIONS, bits_of_types, projection_shapes, recorded_types
from mcmoe_gguf.quant.mixes import tensor_bytes
from mcmoe_gguf.quant import fake_quant
from mcmoe_gguf.gguf import keys as K
from mcmoe_gguf.model.checkpoint import Checkpoint
from mcmoe_gguf.gguf.vocab import add_tokenizer
from mcmoe_gguf.quant.workdir import WorkDir

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
    shape: tuple[int, ...]                   # elements, numpy order (ggml's ne reversed)
    qtype: int                               # ggml type id (upstream or ours, see gguf_types)
    load: Callable[[], torch.Tensor | np.ndarray]   # float tensor, or uint8 [rows, row_bytes] of blocks

    @property
    def block(self) -> tuple[int, int]:
        return gguf.GGML_QUANT_SIZES[self.qtype]

    @property
    def nbytes(self) -> int:
        block, size = self.block
        return int(np.prod(self.shape)) // block * size

    @property
    def is_float(self) -> bool:
        return self.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                              gguf.GGMLQuantizationType.BF16)


def plan(ck: Checkpoint, outtype: str) -> list[Planned]:
    hp, arch = ck.hp, ck.arch
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

    add("token_embd.weight", arch.GLOBAL_KEYS["embed"])
    for i in range(hp.num_hidden_layers):
        k = arch.attn_keys(i)
        add(f"blk.{i}.attn_norm.weight", k["attn_norm"])
        add(f"blk.{i}.attn_q.weight", k["q"], load=lambda k=k["q"]: arch.permute_qk(ck.get(k), hp.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", k["k"], load=lambda k=k["k"]: arch.permute_qk(ck.get(k), hp.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", k["v"])
        add(f"blk.{i}.attn_output.weight", k["o"])
        add(f"blk.{i}.ffn_norm.weight", k["ffn_norm"])
        router_key = arch.legacy_router_key(i) if ck.layout == "legacy" else arch.fused_router_key(i)
        add(f"blk.{i}.ffn_gate_inp.weight", router_key, qtype=f32)
        for proj, gname in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
            _check_expert_keys(ck, i, proj)
            add(f"blk.{i}.{gname}.weight", shape=ck.expert_shape(proj), load=lambda i=i, p=proj: ck.experts(i, p))
    add("output_norm.weight", arch.GLOBAL_KEYS["norm"])
    if not hp.tie_word_embeddings:
        add("output.weight", arch.GLOBAL_KEYS["lm_head"])
    return out


def _check_expert_keys(ck: Checkpoint, layer: int, proj: str) -> None:
    E, arch = ck.hp.num_local_experts, ck.arch
    if ck.layout == "legacy":
        want = ck.expert_shape(proj)[1:]
        for e in range(E):
            got = ck.shape(arch.legacy_expert_key(layer, e, proj))
            if tuple(got) != want:
                raise ExportError(f"{arch.legacy_expert_key(layer, e, proj)} has shape {got}, config implies {want}")
    else:
        key = arch.fused_down_key(layer) if proj == "w2" else arch.fused_gate_up_key(layer)
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
    w.add_name(name)
    ck.arch.gguf_metadata(w, ck.hp)
    w.add_file_type(OUTTYPES[outtype][1])


def release_large_buffers() -> None:
    """Make glibc return every freed buffer of >= 1 MiB to the OS. By default its mmap threshold adapts
    upwards after a large free, so later tensor-sized buffers come from the heap and fragmentation can
    keep a growing peak (seen as up to +100 MiB between a 2- and a 6-layer conversion). Streaming a 90 GB
    checkpoint needs the peak to stay at one tensor. No-op off glibc."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)          # M_MMAP_THRESHOLD = 1 MiB (fixed: disables the adaptive rule)
    except (OSError, AttributeError):
        pass


def convert(model_dir: str | Path, out: str | Path, outtype: str = "f16", force: bool = False,
            name: str | None = None, progress: bool = True, odp_mu: list[float] | None = None) -> Path:
    """HF checkpoint -> GGUF of float weights (`outtype`), written atomically. odp_mu: per-layer ODP
    thresholds to store (pmq.odp_thresholds), so the engine can prune this file too."""
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown --outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ck = Checkpoint(model_dir)
    out = Path(out)
    _check_destination(ck, out, force)
    release_large_buffers()
    tensors = plan(ck, outtype)
    w = gguf.GGUFWriter(path=None, arch=ck.arch.GGUF_ARCH)
    add_metadata(w, ck, name or ck.dir.resolve().name, outtype)
    if odp_mu is not None:
        if len(odp_mu) != ck.hp.num_hidden_layers:
            raise ExportError(f"odp_mu has {len(odp_mu)} values for {ck.hp.num_hidden_layers} layers")
        add_odp_metadata(w, odp_mu)
    add_tokenizer(w, ck.dir, ck.hp.vocab_size)
    return write_gguf(w, tensors, out, progress)


def write_gguf(w: gguf.GGUFWriter, tensors: list[Planned], out: Path, progress: bool) -> Path:
    """Tensor infos, then the tensors one at a time, into a temporary file renamed to `out` at the end."""
    for t in tensors:
        if t.is_float:
            w.add_tensor_info(t.name, t.shape, np.float32 if t.qtype == gguf.GGMLQuantizationType.F32
                              else np.float16, t.nbytes, raw_dtype=t.qtype)
        else:
            block, size = t.block
            byte_shape = (*t.shape[:-1], t.shape[-1] // block * size)
            w.add_tensor_info(t.name, byte_shape, np.uint8, t.nbytes, raw_dtype=t.qtype)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    try:
        w.write_header_to_file(Path(tmp))
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tqdm(tensors, desc=f"convert -> {out.name}", unit="tensor", disable=not progress):
            try:
                arr = to_numpy(t.load(), t.qtype) if t.is_float else np.ascontiguousarray(t.load(), np.uint8)
            except ExportError as e:
                raise ExportError(f"{t.name}: {e}") from None
            if arr.nbytes != t.nbytes or (t.is_float and arr.shape != t.shape):
                raise ExportError(f"{t.name}: got {arr.shape} ({arr.nbytes} bytes), planned {t.shape}")
            w.write_tensor_data(arr)
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def header_bytes(model_dir: str | Path) -> int:
    """Bytes a PMQ file of this checkpoint spends before its tensor data (metadata with the vocabulary,
    tensor index, alignment), measured by writing the metadata part: what --size leaves out of the
    tensors' budget. An upper bound by a few hundred bytes (the PMQ keys are estimated)."""
    ck = Checkpoint(model_dir)
    w = gguf.GGUFWriter(path=None, arch=ck.arch.GGUF_ARCH)
    add_metadata(w, ck, ck.dir.resolve().name, "f16")
    add_tokenizer(w, ck.dir, ck.hp.vocab_size)
    with tempfile.TemporaryDirectory() as d:
        w.write_header_to_file(Path(d) / "h.gguf")
        w.write_kv_data_to_file()
        w.close()
        kv = (Path(d) / "h.gguf").stat().st_size
    hp = ck.hp
    n_tensors = 3 + hp.num_hidden_layers * (7 + 3 * hp.num_local_experts)
    pmq_keys = 512 + 8 * hp.num_hidden_layers * (hp.num_local_experts + 1)
    # per tensor: name (~32), n_dims, dims, type, offset; then up to 31 bytes of alignment padding each
    return kv + pmq_keys + n_tensors * (40 + 4 + 4 * 8 + 4 + 8 + 31)


def _check_destination(ck: Checkpoint, out: Path, force: bool) -> None:
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: output directory does not exist")
    # every file of the model directory (weights, config, tokenizer, texts) is input; shards may live elsewhere
    inputs = {r.path.resolve() for r in ck.tensors.values()}
    inputs |= {p.resolve() for p in ck.dir.iterdir() if p.is_file() and p.suffix != ".gguf"}
    if out.resolve() in inputs:
        raise ExportError(f"{out}: refusing to overwrite an input file of the checkpoint")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to overwrite it")


# ------------------------------------------------------------------------------- PMQ files
EXPERT_TENSORS = (("w1", "ffn_gate"), ("w3", "ffn_up"), ("w2", "ffn_down"))


def plan_pmq(ck: Checkpoint, wd: WorkDir | Path) -> tuple[list[Planned], np.ndarray]:
    """Tensors of a PMQ file: one tensor per expert in its own width (blk.N.ffn_{gate,up,down}.E.weight),
    experts of one width written next to each other (widest first, then by expert id) so the loader can
    group them into one 3-D tensor without copying; attention, embeddings and output in the run's mix
    (quant/mixes.py) as stored by PMQ; router, norms F32. A finished KD tuning (quant/kd_tune.py) is applied:
    its factors multiply the stored blocks' scales, its norms and routers replace the checkpoint's."""
    hp, wd = ck.hp, WorkDir.of(wd)
    f16 = plan(ck, "f16")
    by_name = {t.name: t for t in f16}
    tuned = wd.tuned() or {"factors": {}, "floats": {}}

    def tuned_entry(entry: dict, key: str) -> dict:
        return fake_quant.tuned_entry(entry, key, tuned)

    def tuned_float(t: Planned, key: str) -> Planned:
        v = tuned["floats"].get(key)
        return t if v is None else Planned(t.name, t.shape, t.qtype, lambda v=v: v.float())
    layer_cache: dict[int, dict] = {}

    def layer(i: int) -> dict:
        if i not in layer_cache:
            layer_cache.clear()         # one layer file in memory at a time
            if not wd.has_layer(i):
                raise ExportError(f"{wd.path}: layer {i} is not quantized yet (resume `mcmoe-gguf quantize`)")
            layer_cache[i] = wd.load_layer(i)
        return layer_cache[i]

    def packed(i: int, key: str, n_head: int | None = None) -> Planned:
        entry = layer(i)["tensors"][key]
        out_rows, n_in = entry["shape"]

        def load(i=i, key=key, n_head=n_head):
            e = tuned_entry(layer(i)["tensors"][key], f"model.layers.{i}.{key}.weight")
            data = e["data"].numpy().reshape(out_rows, -1)
            # q/k rows are interleaved for llama.cpp's RoPE; rows are quantized independently, so
            # permuting the packed rows equals quantizing the permuted matrix
            return ck.arch.permute_qk(torch.from_numpy(data), n_head).numpy() if n_head else data
        return Planned("", (out_rows, n_in), _entry_type(entry), load)

    from mcmoe_gguf.quant.pmq import stored_globals
    glob = stored_globals(wd, ck)

    def global_tensor(t: Planned, key: str) -> Planned:
        if key not in glob:        # kept in float
            return t
        entry = tuned_entry(glob[key], ck.arch.GLOBAL_KEYS[key])
        return Planned(t.name, tuple(entry["shape"]), _entry_type(entry),
                       lambda e=entry: e["data"].numpy().reshape(e["shape"][0], -1))

    # the types are in allocation.json: no extra pass over the (large) layer files just to read them
    types = recorded_types(wd.allocation())
    shapes = projection_shapes(hp)
    merged = wd.config().get("compat") == "stock"
    out = [global_tensor(by_name["token_embd.weight"], "embed")]
    for i in range(hp.num_hidden_layers):
        pre = f"model.layers.{i}."
        out.append(tuned_float(by_name[f"blk.{i}.attn_norm.weight"], pre + "input_layernorm.weight"))
        for gname, key, nh in (("attn_q", "q_proj", hp.num_attention_heads), ("attn_k", "k_proj", hp.num_key_value_heads),
                               ("attn_v", "v_proj", None), ("attn_output", "o_proj", None)):
            t = packed(i, f"self_attn.{key}", nh)
            t.name = f"blk.{i}.{gname}.weight"
            out.append(t)
        out.append(tuned_float(by_name[f"blk.{i}.ffn_norm.weight"], pre + "post_attention_layernorm.weight"))
        out.append(tuned_float(by_name[f"blk.{i}.ffn_gate_inp.weight"], pre + "block_sparse_moe.gate.weight"))
        for proj, gname in EXPERT_TENSORS:
            p = PROJECTIONS.index(proj)
            if merged:      # --compat stock: one 3-D tensor per projection, as llama.cpp's own files
                ts = [packed(i, f"block_sparse_moe.experts.{e}.{proj}") for e in range(hp.num_local_experts)]
                if len({t.qtype for t in ts}) != 1:
                    raise ExportError(f"layer {i} {proj}: experts of several types cannot be one merged tensor")
                out.append(Planned(f"blk.{i}.{gname}_exps.weight", (len(ts), *ts[0].shape), ts[0].qtype,
                                   lambda ts=ts: np.stack([np.ascontiguousarray(t.load(), np.uint8) for t in ts])))
                continue
            # experts of one type next to each other, widest first (for mcq widths: by bits, then id)
            order = sorted(range(hp.num_local_experts),
                           key=lambda e: (-tensor_bytes(types[i][e][p], *shapes[proj]), types[i][e][p], e))
            for e in order:
                t = packed(i, f"block_sparse_moe.experts.{e}.{proj}")
                t.name = f"blk.{i}.{gname}.{e}.weight"
                out.append(t)
    out.append(tuned_float(by_name["output_norm.weight"], ck.arch.GLOBAL_KEYS["norm"]))
    if "output.weight" in by_name:
        out.append(global_tensor(by_name["output.weight"], "lm_head"))
    return out, types


def _entry_type(entry: dict) -> int:
    """ggml type id of a stored tensor: an mcq width or a ggml type name."""
    if "type" in entry:
        ours = formats.MCN_TYPES.get(entry["type"]) or formats.MCT_TYPES.get(entry["type"])
        if ours is not None:                        # not in the gguf package's enum
            return ours.type_id
        return int(gguf.GGMLQuantizationType[entry["type"].upper()])
    return formats.TYPES[entry["bits"]].type_id


def add_odp_metadata(w: gguf.GGUFWriter, mu) -> None:
    """ODP parameters (docs/FORMAT.md): on by default with the calibrated per-layer mu; every scalar can be
    overridden at load (llama.cpp kv-overrides, mcmoe_gguf.load(odp=..., protect=..., ...))."""
    w.add_bool(K.ODP_ENABLED, True)
    w.add_array(K.ODP_MU, [float(m) for m in mu])
    w.add_float32(K.ODP_MU_SCALE, K.ODP_DEFAULT_MU_SCALE)
    w.add_float32(K.ODP_PROTECT, K.ODP_DEFAULT_PROTECT)
    w.add_string(K.ODP_IMPORTANCE, K.ODP_DEFAULT_IMPORTANCE)


def add_pmq_metadata(w: gguf.GGUFWriter, wd: WorkDir | Path, types: np.ndarray, odp_mu=None) -> None:
    wd = WorkDir.of(wd)
    alloc = wd.allocation()
    if odp_mu is not None and len(odp_mu) != len(alloc["mu"]):
        raise ExportError(f"odp_mu has {len(odp_mu)} values for {len(alloc['mu'])} layers")
    cfg = wd.config()
    w.add_uint32(K.VERSION, 1)
    bits = bits_of_types(types)
    if bits is not None:        # one mcq width per expert: the loader checks every expert's type against it
        w.add_array(K.EXPERT_BITS, [int(b) for b in bits.ravel()])       # layer-major, E per layer
    w.add_string(K.PMQ_PREFIX + "ladder", str(cfg.get("ladder", "mcq")))
    add_odp_metadata(w, alloc["mu"] if odp_mu is None else odp_mu)
    w.add_string(K.PMQ_PREFIX + "budget", str(cfg["budget"]))
    w.add_string(K.PMQ_PREFIX + "scope", cfg["scope"])
    w.add_string(K.PMQ_PREFIX + "strategy", cfg["strategy"])
    w.add_string(K.PMQ_PREFIX + "method", cfg["method"])
    for k in ("alpha", "beta", "gamma"):
        w.add_float32(K.PMQ_PREFIX + k, float(cfg[k]))
    w.add_string(K.CALIBRATION, f"{cfg['n_seq']} x {cfg['seq_len']} tokens of "
                 f"{Path(cfg['calib_text']).name if cfg['calib_text'] else 'calib.txt'}")
    tuned = wd.tuned()
    w.add_uint32(K.PMQ_PREFIX + "kd_steps", int(tuned["step"]) if tuned else 0)
    w.add_float32(K.EXPERT_BPW, float(alloc["expert_bpw"]))
    w.add_float32(K.FILE_BPW, float(alloc["total_bpw"]))


def export_pmq(workdir: str | Path, out: str | Path, force: bool = False, name: str | None = None,
               progress: bool = True, odp_mu: list[float] | None = None) -> Path:
    """GGUF of a finished PMQ work directory (see pmq.py), written atomically. odp_mu: per-layer ODP
    thresholds instead of the run's (allocation.json), e.g. for a study of targets (odp_fit.py)."""
    from mcmoe_gguf.gguf.types import register
    register()
    wd = WorkDir(workdir)
    if not wd.is_finished():
        raise ExportError(f"{workdir}: not a finished PMQ work directory (no allocation.json)")
    ck = Checkpoint(wd.model_dir())
    out = Path(out)
    _check_destination(ck, out, force)
    tensors, types = plan_pmq(ck, wd)
    w = gguf.GGUFWriter(path=None, arch=ck.arch.GGUF_ARCH)
    add_metadata(w, ck, name or ck.dir.resolve().name, "f16")
    add_pmq_metadata(w, wd, types, odp_mu)
    add_tokenizer(w, ck.dir, ck.hp.vocab_size)
    return write_gguf(w, tensors, out, progress)
