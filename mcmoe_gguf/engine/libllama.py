"""Which libllama the engine loads, and whether it is this checkout's patched build.

Before ``llama_cpp`` is imported, the libllama it would load (``$LLAMA_CPP_LIB_PATH`` or the installed
package's ``lib/``) is opened with ctypes and asked for ``mcmoe_runtime_info()``. A stock build lacks
the function; a stale build reports the hash of other sources than this checkout's cpp/ + patches/.
Both are refused with the command that fixes them, instead of failing later on a file the stock
runtime cannot read. (The bottom of the engine layer: runtime and odp build on it.)
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from mcmoe_gguf.base.ggml import GgmlUnavailable, library_dir
from mcmoe_gguf.base.sources import source_hash

REBUILD_HINT = ("build it with `make runtime` (or `python scripts/build_runtime.py`); for a development "
                "build, `make dev-runtime` and LLAMA_CPP_LIB_PATH=.dev/build/bin")


class RuntimeMismatch(RuntimeError):
    pass


def lib_path() -> Path:
    """The libllama that ``import llama_cpp`` will load (same rule as llama_cpp/llama_cpp.py)."""
    try:
        base = library_dir()
    except GgmlUnavailable as e:
        raise RuntimeMismatch(str(e)) from None
    lib = base / ("llama.dll" if sys.platform == "win32" else "libllama.so")
    if not lib.exists():
        raise RuntimeMismatch(f"no libllama at {lib}; {REBUILD_HINT}")
    return lib


def runtime_info(lib: Path | None = None) -> dict[str, str]:
    lib = lib or lib_path()
    try:
        handle = ctypes.CDLL(str(lib))
    except OSError as e:
        raise RuntimeMismatch(f"cannot load {lib} ({e}); {REBUILD_HINT}") from None
    try:
        fn = handle.mcmoe_runtime_info
    except AttributeError:
        raise RuntimeMismatch(f"{lib} is a stock llama.cpp without the mcmoe-gguf patches "
                              f"(no mcmoe_runtime_info); {REBUILD_HINT}") from None
    fn.restype = ctypes.c_char_p
    fields = fn().decode().split()
    info = dict(f.split("=", 1) for f in fields[1:])
    info["lib"] = str(lib)
    return info


_checked = False


def check_runtime() -> dict[str, str]:
    """Raise RuntimeMismatch unless the libllama to be loaded was built from this checkout's sources."""
    global _checked
    info = runtime_info()
    want = source_hash()
    if want is not None and info.get("source_hash") != want and os.environ.get("MCMOE_ALLOW_STALE") != "1":
        raise RuntimeMismatch(
            f"{info['lib']} is stale: built from sources {info.get('source_hash', '?')[:12]}, this checkout's "
            f"cpp/ + patches/ hash to {want[:12]}; {REBUILD_HINT} (MCMOE_ALLOW_STALE=1 skips this check)")
    _checked = True
    return info


def ensure_checked() -> None:
    """check_runtime() once per process: load() calls this before every model."""
    if not _checked:
        check_runtime()
