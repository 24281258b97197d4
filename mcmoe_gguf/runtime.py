"""The patched llama.cpp runtime, as llama-cpp-python loads it.

Before ``llama_cpp`` is imported, the libllama it would load (``$LLAMA_CPP_LIB_PATH`` or the installed
package's ``lib/``) is opened with ctypes and asked for ``mcmoe_runtime_info()``. A stock build lacks
the function; a stale build reports the hash of other sources than this checkout's cpp/ + patches/.
Both are refused with the command that fixes them, instead of failing later on a file the stock
runtime cannot read.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import sys
from pathlib import Path

from .sources import source_hash

REBUILD_HINT = ("build it with `make runtime` (or `python scripts/build_runtime.py`); for a development "
                "build, `make dev-runtime` and LLAMA_CPP_LIB_PATH=.dev/build/bin")


class RuntimeMismatch(RuntimeError):
    pass


def lib_path() -> Path:
    """The libllama that ``import llama_cpp`` will load (same rule as llama_cpp/llama_cpp.py)."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        base = Path(override)
    else:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeMismatch(f"llama-cpp-python is not installed in {sys.prefix}; {REBUILD_HINT}")
        base = Path(list(spec.submodule_search_locations)[0]) / "lib"
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


def load(path: str | os.PathLike, verbose: bool = False, odp: bool = True, protect: float = 0.02,
         mu_scale: float = 1.0, mu: float | None = None, importance: str = "attn", **llama_kwargs):
    """A ``llama_cpp.Llama`` for ``path`` on the checked, patched runtime.

    ODP (online dynamic pruning of the second expert, mcmoe_gguf.odp): odp=True prunes where the file has
    calibrated thresholds (our converter writes them) or `mu` gives one for every layer; `mu_scale`
    scales them, `protect` is the fraction of a prompt's tokens kept whole, `importance` how they are
    chosen (attn | rowsum | norm | none). Extra kv_overrides in llama_kwargs are merged (theirs win)."""
    if not _checked:
        check_runtime()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    from .odp import overrides
    kv = overrides(path, odp=odp, protect=protect, mu_scale=mu_scale, mu=mu, importance=importance)
    kv.update(llama_kwargs.pop("kv_overrides", None) or {})
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), verbose=verbose, kv_overrides=kv, **llama_kwargs)


def tools_dir() -> Path:
    """Directory with llama-quantize, llama-imatrix, llama-perplexity built from the same patched tree."""
    if os.environ.get("MCMOE_TOOLS_DIR"):
        return Path(os.environ["MCMOE_TOOLS_DIR"])
    marker = Path(sys.prefix) / "mcmoe-runtime.json"
    if not marker.exists():
        raise RuntimeMismatch(f"no patched runtime recorded in {sys.prefix}; {REBUILD_HINT}")
    return Path(json.loads(marker.read_text())["tools"])


def run_tool(name: str, *args: str, **kw):
    """Run a llama.cpp tool of the patched build (its shared libraries sit beside it)."""
    import subprocess
    d = tools_dir()
    exe = d / name
    if not exe.exists():
        raise RuntimeMismatch(f"{exe} not found; {REBUILD_HINT}")
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(d), os.environ.get("LD_LIBRARY_PATH")])))
    return subprocess.run([str(exe), *map(str, args)], env=env, **kw)
