"""llama.cpp's own quantizers and dequantizers, called through ctypes in the libggml we build.

Every stock type llama.cpp can write (k-quants, i-quants, Q8_0, ...) comes from `ggml_quantize_chunk`,
the function `llama-quantize` calls, with the same importance vector (imatrix) semantics: per input
column, the mean of x^2 over calibration tokens. Writing them ourselves would be a re-implementation of
thousands of lines (the i-quants' grid searches) that could only drift from upstream; gguf-py can read
these types back but can write few of them.

The library is the runtime's libggml-base: `$LLAMA_CPP_LIB_PATH` or the installed llama-cpp-python's
`lib/` (the rule llama_cpp itself follows). Quantization is split into row chunks run on threads
(ctypes releases the GIL), as llama-quantize does.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# numpy is imported inside the methods: library_dir() is also used by engine/libllama.py, which the
# device check runs under `python -S` (no site packages) before anything is installed

MISSING_HINT = ("build the runtime with `make runtime` (or `make dev-runtime` and "
                "LLAMA_CPP_LIB_PATH=.dev/build/bin)")


class GgmlUnavailable(RuntimeError):
    pass


def library_dir() -> Path:
    """Folder of the libllama/libggml that ``import llama_cpp`` would load."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GgmlUnavailable(f"llama-cpp-python is not installed in {sys.prefix}; {MISSING_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


class _Traits(ctypes.Structure):     # struct ggml_type_traits (ggml.h), the fields up to to_float
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class Ggml:
    """One opened libggml-base: type ids by name, row sizes, quantize and dequantize."""

    def __init__(self, folder: Path | None = None):
        folder = Path(folder) if folder else library_dir()
        cands = sorted(folder.glob("libggml-base.so*")) or sorted(folder.glob("ggml-base*.dll"))
        if not cands:
            raise GgmlUnavailable(f"no libggml-base in {folder}; {MISSING_HINT}")
        lib = ctypes.CDLL(str(cands[0]))
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        self.lib, self.path = lib, cands[0]
        # upstream ids as gguf-py knows them, each confirmed by this library's own name for it (ggml does
        # not bounds-check ggml_type_name, so ids are never probed blindly); our mcq types go through
        # quant/formats.py, not through here
        import gguf
        self._ids: dict[str, int] = {}
        for t in gguf.GGMLQuantizationType:
            name = lib.ggml_type_name(int(t))
            if name is not None and name.decode(errors="replace").lower() == t.name.lower():
                self._ids[t.name.lower()] = int(t)
        # our mcn (ids 104, 105) and mct types (106-108): only from a library that says it has them
        # (mcn_info, mct_info), so an older library's type table is never read past its end
        for info in ("mcn_info", "mct_info"):
            if hasattr(lib, info):
                getattr(lib, info).restype = ctypes.c_char_p
                for item in getattr(lib, info)().decode().split("types=")[1].split()[0].split(","):
                    name, tid = item.split(":")
                    if lib.ggml_type_name(int(tid)) == name.encode():
                        self._ids[name] = int(tid)

    # ------------------------------------------------------------------ types
    def type_id(self, name: str) -> int:
        try:
            return self._ids[name.lower()]
        except KeyError:
            raise ValueError(f"unknown ggml type {name!r}; {self.path.name} has: "
                             f"{', '.join(sorted(self._ids))}") from None

    def row_bytes(self, name: str, n: int) -> int:
        tid = self.type_id(name)
        blk = self.lib.ggml_blck_size(tid)
        if n % blk:
            raise ValueError(f"{name} needs rows that are multiples of {blk} values; got {n}")
        return int(self.lib.ggml_row_size(tid, n))

    def requires_imatrix(self, name: str) -> bool:
        return bool(self.lib.ggml_quantize_requires_imatrix(self.type_id(name)))

    # ------------------------------------------------------------------ data
    def quantize(self, w, name: str, imatrix=None, threads: int | None = None) -> np.ndarray:
        """float [rows, n] -> uint8 [rows, row_bytes] in ggml's block layout. imatrix: [n] importance
        (mean x^2 per input column) or None; types that need one (IQ1_S, IQ2_XXS, ...) refuse None."""
        import numpy as np
        w = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
        if w.ndim != 2:
            raise ValueError(f"quantize expects a 2-D matrix, got shape {w.shape}")
        if not np.isfinite(w).all():
            raise ValueError("matrix holds NaN or Inf values")
        rows, n = w.shape
        tid, rb = self.type_id(name), self.row_bytes(name, n)
        if imatrix is None and self.requires_imatrix(name):
            raise ValueError(f"{name} needs an importance matrix (calibration statistics) to quantize")
        imp = None
        if imatrix is not None:
            imp = np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32))
            if imp.shape != (n,):
                raise ValueError(f"importance has shape {imp.shape}, rows have {n} values")
            if not np.isfinite(imp).all() or (imp < 0).any():
                raise ValueError("importance must be finite and non-negative")
        out = np.empty((rows, rb), dtype=np.uint8)
        threads = max(1, min(threads or os.cpu_count() or 1, rows))
        step = -(-rows // threads)

        def run(r0: int) -> None:
            nr = min(step, rows - r0)
            done = self.lib.ggml_quantize_chunk(tid, w.ctypes.data, out.ctypes.data, r0 * n, nr, n,
                                                imp.ctypes.data if imp is not None else None)
            if done != nr * rb:
                raise RuntimeError(f"ggml_quantize_chunk({name}) wrote {done} bytes for {nr} rows of {rb}")
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(run, range(0, rows, step)))
        return out

    def dequantize(self, blob: np.ndarray, name: str, n: int) -> np.ndarray:
        """uint8 [rows, row_bytes] -> float32 [rows, n] through the type's own to_float."""
        import numpy as np
        tid, rb = self.type_id(name), self.row_bytes(name, n)
        blob = np.ascontiguousarray(blob, dtype=np.uint8).reshape(-1, rb)
        out = np.empty((blob.shape[0], n), dtype=np.float32)
        fn = self.lib.ggml_get_type_traits(tid).contents.to_float
        if not fn:
            raise ValueError(f"{name} has no dequantizer in {self.path.name}")
        _TO_FLOAT(fn)(blob.ctypes.data, out.ctypes.data, out.size)
        return out


_instance: Ggml | None = None


def ggml() -> Ggml:
    """The process's libggml-base (opened once)."""
    global _instance
    if _instance is None:
        _instance = Ggml()
    return _instance
