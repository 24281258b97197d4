"""Hugging Face checkpoint reader that streams one tensor (and so one decoder layer) at a time.

It reads safetensors itself (8-byte header length, JSON header, raw little-endian data) with plain
seek/read instead of mmap: mapped pages of a 90 GB Mixtral would count as resident memory, and the
converter promises memory that does not grow with depth. Every shard is validated up front (present,
header readable, data not truncated), so a bad checkpoint fails before any output is written.

Both Mixtral expert layouts are served as the same per-layer view (w1 = gate, w3 = up, w2 = down):
  - the original release: ``block_sparse_moe.experts.E.w1/w2/w3.weight`` + ``block_sparse_moe.gate``
  - transformers >= 5 fused 3D: ``mlp.experts.gate_up_proj`` [E, 2*ff, d], ``mlp.experts.down_proj``
    [E, d, ff], ``mlp.gate.weight``.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mcmoe_gguf.model.arch import adapter_for


class CheckpointError(ValueError):
    pass


_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
           "BF16": (np.uint16, torch.bfloat16), "F64": (np.float64, torch.float64)}


@dataclass(frozen=True)
class TensorRef:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int          # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size})")
        try:
            meta = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    refs, end = {}, 8 + n
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        refs[name] = TensorRef(path, info["dtype"], tuple(info["shape"]), end + a, b - a)
        if end + b > size:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {end + b} but the file has {size} "
                                  "(incomplete download?)")
    return refs


class Checkpoint:
    """A HF MoE checkpoint directory: config, hyper-parameters, and lazily read tensors."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: no such model directory")
        cfg_path = self.dir / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{self.dir}: config.json not found (is this a Hugging Face model directory?)")
        try:
            self.config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        self.arch = adapter_for(self.config)
        self.hp = self.arch.HParams.from_config(self.config)
        self.tensors = self._index()
        self.layout = self._detect_layout()

    # ------------------------------------------------------------------ shards
    def _index(self) -> dict[str, TensorRef]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.dir / s).exists()]
            if missing:
                raise CheckpointError(f"{self.dir}: missing shard(s) listed in {index.name}: {', '.join(missing)}")
        elif (self.dir / "model.safetensors").exists():
            shards, weight_map = ["model.safetensors"], None
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not found:
                raise CheckpointError(f"{self.dir}: no safetensors weights (model.safetensors or an index)")
            shards, weight_map = found, None
        refs: dict[str, TensorRef] = {}
        for s in shards:
            refs.update(read_safetensors_header(self.dir / s))
        if weight_map is not None:
            absent = [k for k in weight_map if k not in refs]
            if absent:
                raise CheckpointError(f"{self.dir}: {len(absent)} tensor(s) of the index are in no shard, e.g. {absent[0]}")
        return refs

    def _detect_layout(self) -> str:
        if self.arch.legacy_router_key(0) in self.tensors:
            return "legacy"
        if self.arch.fused_router_key(0) in self.tensors and self.arch.fused_gate_up_key(0) in self.tensors:
            return "fused"
        raise CheckpointError(f"{self.dir}: no Mixtral expert tensors found for layer 0 (looked for "
                              f"{self.arch.legacy_router_key(0)} and {self.arch.fused_gate_up_key(0)})")

    # ------------------------------------------------------------------ tensors
    def ref(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name} is missing from the checkpoint") from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        r = self.ref(name)
        np_dtype, t_dtype = _DTYPES[r.dtype]
        with open(r.path, "rb") as f:
            f.seek(r.offset)
            buf = f.read(r.nbytes)
        if len(buf) != r.nbytes:
            raise CheckpointError(f"{r.path}: truncated while reading {name}")
        arr = np.frombuffer(buf, dtype=np_dtype).reshape(r.shape)
        t = torch.from_numpy(arr.copy())
        return t.view(t_dtype) if r.dtype == "BF16" else t

    def shape(self, name: str) -> tuple[int, ...]:
        return self.ref(name).shape

    # ------------------------------------------------------------------ experts, layout-independent
    def router(self, layer: int) -> torch.Tensor:
        key = self.arch.legacy_router_key(layer) if self.layout == "legacy" else self.arch.fused_router_key(layer)
        return self.get(key)

    def experts(self, layer: int, proj: str) -> torch.Tensor:
        """Stacked [E, out, in] weights of one projection: 'w1' (gate), 'w3' (up) or 'w2' (down)."""
        E, ff = self.hp.num_local_experts, self.hp.intermediate_size
        if self.layout == "legacy":
            return torch.stack([self.get(self.arch.legacy_expert_key(layer, e, proj)) for e in range(E)])
        if proj == "w2":
            return self.get(self.arch.fused_down_key(layer))
        gate_up = self.get(self.arch.fused_gate_up_key(layer))
        if gate_up.shape[1] != 2 * ff:
            raise CheckpointError(f"{self.arch.fused_gate_up_key(layer)} has shape {tuple(gate_up.shape)}, expected [{E}, {2 * ff}, d]")
        return (gate_up[:, :ff] if proj == "w1" else gate_up[:, ff:]).contiguous()

    def expert_shape(self, proj: str) -> tuple[int, int, int]:
        hp = self.hp
        if proj == "w2":
            return (hp.num_local_experts, hp.hidden_size, hp.intermediate_size)
        return (hp.num_local_experts, hp.intermediate_size, hp.hidden_size)
