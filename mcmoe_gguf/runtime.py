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
from contextlib import contextmanager
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


def load(path: str | os.PathLike, verbose: bool = False, odp: bool = True, protect: float | None = None,
         mu_scale: float | None = None, mu: float | None = None, importance: str | None = None, **llama_kwargs):
    """A ``llama_cpp.Llama`` for ``path`` on the checked, patched runtime.

    ODP (online dynamic pruning of the second expert, mcmoe_gguf.odp): odp=True prunes where the file has
    calibrated thresholds (our converter writes them) or `mu` gives one for every layer; `mu_scale`
    scales them, `protect` is the fraction of a prompt's tokens kept whole, `importance` how they are
    chosen (attn | rowsum | norm | none). None keeps the file's value (the engine's default, 1 / 0.02 /
    attn, where the file has none). Extra kv_overrides in llama_kwargs are merged (theirs win)."""
    if not _checked:
        check_runtime()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    from .odp import overrides
    kv = overrides(odp=odp, protect=protect, mu_scale=mu_scale, mu=mu, importance=importance)
    kv.update(llama_kwargs.pop("kv_overrides", None) or {})
    with engine_errors(path):
        import llama_cpp
        return llama_cpp.Llama(model_path=str(path), verbose=verbose, kv_overrides=kv, **llama_kwargs)


@contextmanager
def engine_errors(path):
    """Turn llama-cpp-python's generic "Failed to load model from file" into an error that carries
    llama.cpp's own reason: the ERROR-level lines it logs while the block runs (gguf.cpp, the model
    loader, our mcmoe loader) are collected and put in the raised ValueError. The usual log callback
    keeps printing meanwhile and is put back afterwards."""
    import llama_cpp
    from llama_cpp import _logger
    errors: list[str] = []
    last = [0]

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        # ggml.h of the pinned tree: ERROR = 4, CONT = 5 (llama-cpp-python's _logger.py comment is older)
        if level == 4 or (level == 5 and last[0] == 4):
            errors.append(text.decode("utf-8", "replace"))
        if level != 5:
            last[0] = level
        _logger.llama_log_callback(level, text, user_data)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    except ValueError as e:
        reason = " ".join("".join(errors).split())
        if not reason:
            raise
        raise ValueError(f"{path}: llama.cpp refused the file: {reason}") from e
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


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
