"""A bounded structural check of a GGUF file, run before the `gguf` package's reader touches it.

gguf-py's GGUFReader trusts every length in the file: an array that claims 2^40 elements makes it build
a 2^40-entry list (minutes of CPU and unbounded memory) before anything else is looked at. This walks the
same header in O(header bytes) and checks every count and length against the bytes that are actually
there, every type id against the known ones, every tensor's shape, alignment and data range against the
data section, so a damaged or hostile file ends in one ValueError that names the key or tensor and what
was expected. It reads the header only (at most the first _MAX_HEADER bytes), never the tensor data.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

# GGUF value types (gguf.h enum gguf_type) -> struct format of one element; STRING = 8 and ARRAY = 9
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4                    # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32          # GGUF_DEFAULT_ALIGNMENT
_MAX_HEADER = 1 << 30            # a header (metadata + tensor infos) above 1 GiB is not a model file


def _type_sizes() -> dict[int, tuple[int, int]]:
    """ggml type id -> (block size, bytes per block) for every type this project's runtime knows."""
    import gguf.constants

    from mcmoe_gguf.gguf.types import register
    register()
    return {int(t): v for t, v in gguf.constants.GGML_QUANT_SIZES.items()}


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid GGUF file: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} needs {n:,} bytes at offset {self.pos:,}, the header has "
                            f"{max(len(self.buf) - self.pos, 0):,} left (truncated or a corrupt length)")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", f"length of {what}")
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def _value(c: _Cursor, vtype: int, key: str, keep: bool):
    if vtype in _SCALAR:
        return c.unpack(_SCALAR[vtype], f"value of {key}")
    if vtype == _STRING:
        return c.string(f"string value of {key}")
    if vtype != _ARRAY:
        raise c.fail(f"{key} has value type id {vtype} (known: 0-12)")
    etype = c.unpack("I", f"element type of {key}")
    n = c.unpack("Q", f"length of array {key}")
    if etype in _SCALAR:
        size = struct.calcsize(_SCALAR[etype])
        raw = c.take(n * size, f"array {key} of {n:,} elements")   # bounded by the bytes present
        return list(struct.unpack(f"<{n}{_SCALAR[etype]}", raw)) if keep else n
    if etype == _STRING:
        # each string needs >= 8 bytes of length: a count above that bound cannot be real
        if n * 8 > len(c.buf) - c.pos:
            raise c.fail(f"array {key} claims {n:,} strings, more than its {len(c.buf) - c.pos:,} remaining bytes can hold")
        out = [c.string(f"element {i} of {key}") for i in range(n)]
        return out if keep else n
    raise c.fail(f"array {key} has element type id {etype} (nested arrays and unknown types are not GGUF)")


def check_gguf(path: str | os.PathLike, keep: tuple[str, ...] = ("general.", "mcmoe.")) -> dict:
    """Validate the structure of the GGUF at `path`; return {key: value} for keys starting with `keep`
    (arrays of other keys are skipped, not materialised). Raises ValueError naming the first defect."""
    path = str(path)
    sizes = _type_sizes()
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        buf = memoryview(f.read(min(file_size, _MAX_HEADER)))
    c = _Cursor(buf, path)
    if c.take(4, "magic") != b"GGUF":
        raise c.fail(f"magic is {bytes(buf[:4])!r}, expected b'GGUF'")
    version = c.unpack("I", "version")
    if version not in (2, 3):
        raise c.fail(f"version {version} (this reader knows 2 and 3)")
    n_tensors = c.unpack("Q", "tensor count")
    n_kv = c.unpack("Q", "metadata count")
    # a key-value pair takes >= 12 bytes, a tensor info >= 24: larger counts are corrupt, not big models
    if n_kv * 12 > len(buf) or n_tensors * 24 > len(buf):
        raise c.fail(f"header claims {n_kv:,} metadata entries and {n_tensors:,} tensors, more than "
                     f"{len(buf):,} header bytes can hold")
    kv: dict = {}
    alignment = _DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = c.string("metadata key")
        if key in kv:
            raise c.fail(f"metadata key {key} appears twice")
        vtype = c.unpack("I", f"value type of {key}")
        val = _value(c, vtype, key, keep=key.startswith(keep))
        kv[key] = val
        if key == "general.alignment":
            if vtype != 4 or val == 0 or val & (val - 1):
                raise c.fail(f"general.alignment must be a uint32 power of two (got {val!r})")
            alignment = val
    tensors = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}")
        n_dims = c.unpack("I", f"dimension count of tensor {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dimensions (expected 1..{_MAX_DIMS})")
        shape = [c.unpack("Q", f"shape of tensor {name}") for _ in range(n_dims)]
        ttype = c.unpack("I", f"type of tensor {name}")
        offset = c.unpack("Q", f"data offset of tensor {name}")
        if ttype not in sizes:
            raise c.fail(f"tensor {name} has type id {ttype}, which no ggml type of this runtime has")
        block, block_bytes = sizes[ttype]
        if any(d <= 0 or d >= 1 << 62 for d in shape):
            raise c.fail(f"tensor {name} has shape {shape} (each dimension must be in 1..2^62)")
        if shape[0] % block:
            raise c.fail(f"tensor {name}: rows of {shape[0]} elements are not a multiple of its type's block of {block}")
        n_el = 1
        for d in shape:
            n_el *= d
        if offset % alignment:
            raise c.fail(f"tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}")
        tensors.append((name, offset, n_el // block * block_bytes))
    data_start = -(-c.pos // alignment) * alignment
    data_size = file_size - data_start
    for name, offset, nbytes in tensors:
        if offset + nbytes > data_size:
            raise ValueError(f"{path}: tensor {name} needs bytes {offset:,}..{offset + nbytes:,} of the data section, "
                             f"which has {max(data_size, 0):,} (file truncated or offset corrupt)")
    return {k: v for k, v in kv.items() if k.startswith(keep)}


def checked_reader(path: Path):
    """gguf.GGUFReader(path) after check_gguf: the reader only ever sees a structurally sound file."""
    import gguf

    check_gguf(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
