"""Teach the `gguf` package our tensor types (mcq1-4, ids 100-103; mcn2/mcn3, 104-105; mct1-3, 106-108), so it can write and read our files.

The stock package only knows upstream ids: its writer looks block sizes up in GGML_QUANT_SIZES, and its
reader turns every type id into a GGMLQuantizationType member (an unknown id raises). We add the sizes
and give the reader an enum that also has our members; upstream members keep their values, so every
comparison elsewhere in the package still holds.
"""
from __future__ import annotations

from enum import IntEnum

import gguf
import gguf.constants
import gguf.gguf_reader

from mcmoe_gguf.quant import formats

# Upstream types of the pinned llama.cpp that the installed gguf package may predate (gguf 0.19 stops at
# Q1_0 = 41): name -> (id, block size, bytes per block), from the vendored ggml.h / ggml-common.h.
_UPSTREAM_EXTRA = {"Q2_0": (42, 64, 2 + 64 // 4)}

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    members = {m.name: m.value for m in gguf.GGMLQuantizationType}
    members.update({s.name.upper(): s.type_id for s in formats.TYPES.values()})
    members.update({s.name.upper(): s.type_id for s in formats.MCN_TYPES.values()})
    members.update({s.name.upper(): s.type_id for s in formats.MCT_TYPES.values()})
    extra = {n: v for n, v in _UPSTREAM_EXTRA.items() if n not in members}
    members.update({n: v[0] for n, v in extra.items()})
    extended = IntEnum("GGMLQuantizationType", members)
    for s in formats.TYPES.values():
        gguf.constants.GGML_QUANT_SIZES[extended(s.type_id)] = (formats.GROUP_SIZE, s.block_bytes)
    for s in (*formats.MCN_TYPES.values(), *formats.MCT_TYPES.values()):
        gguf.constants.GGML_QUANT_SIZES[extended(s.type_id)] = (formats.MCN_BLOCK, s.block_bytes)
    for n, (tid, block, size) in extra.items():
        gguf.constants.GGML_QUANT_SIZES[extended(tid)] = (block, size)
    gguf.gguf_reader.GGMLQuantizationType = extended
    _registered = True


def type_name(type_id: int) -> str:
    register()
    return gguf.gguf_reader.GGMLQuantizationType(type_id).name
