"""The patched llama.cpp runtime, as llama-cpp-python loads it: `load` (with ODP knobs and RPC
servers), the engine's ggml registry, and llama.cpp's tools of the same build. Which libllama that is,
and the check that it is ours, live in libllama.py."""
from __future__ import annotations

import ctypes
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from mcmoe_gguf.engine.libllama import REBUILD_HINT, RuntimeMismatch, check_runtime, ensure_checked, lib_path, runtime_info  # noqa: F401


def load(path: str | os.PathLike, verbose: bool = False, odp: bool = True, protect: float | None = None,
         mu_scale: float | None = None, mu: float | None = None, importance: str | None = None,
         rpc_servers: str | None = None, **llama_kwargs):
    """A ``llama_cpp.Llama`` for ``path`` on the checked, patched runtime.

    ODP (online dynamic pruning of the second expert, mcmoe_gguf.engine.odp): odp=True prunes where the file has
    calibrated thresholds (our converter writes them) or `mu` gives one for every layer; `mu_scale`
    scales them, `protect` is the fraction of a prompt's tokens kept whole, `importance` how they are
    chosen (attn | rowsum | norm | none). None keeps the file's value (the engine's default, 1 / 0.02 /
    attn, where the file has none). Extra kv_overrides in llama_kwargs are merged (theirs win).

    rpc_servers="host:port,host:port": llama.cpp's RPC backend (one `rpc-server` per machine, built with
    this runtime: `mcmoe-gguf rpc-server`) holds the offloaded layers, split across the servers by their
    free memory; n_gpu_layers (default: all layers) says how many, the rest stays on the local CPU. The
    ODP op always runs on the local CPU (our RPC client declines it), so odp_stats() stays complete."""
    ensure_checked()
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    if rpc_servers:
        add_rpc_servers(rpc_servers)
        llama_kwargs.setdefault("n_gpu_layers", -1)
    from mcmoe_gguf.engine.odp import overrides
    kv = overrides(odp=odp, protect=protect, mu_scale=mu_scale, mu=mu, importance=importance)
    kv.update(llama_kwargs.pop("kv_overrides", None) or {})
    with engine_errors(path):
        import llama_cpp
        return llama_cpp.Llama(model_path=str(path), verbose=verbose, kv_overrides=kv, **llama_kwargs)


def engine_ggml() -> ctypes.CDLL:
    """libllama's handle, whose symbol lookup reaches the libggml instance the engine uses, with the
    backend-registry functions typed: its registry (which CPU module, which RPC servers) is the engine's."""
    lib = ctypes.CDLL(str(lib_path()))
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    return lib


_rpc_added: set[str] = set()
# ggml-rpc's protocol as our patch sets it (ggml/include/ggml-rpc.h): major 107 = upstream 7 + 100, so a
# stock rpc-server (which knows neither the mcq types nor the ODP op) and ours refuse each other
RPC_PROTO_MAJOR = 107
_RPC_CMD_HELLO, _RPC_CAPS = 14, 24


def rpc_probe(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """(major, minor, patch) of the rpc-server at host:port, by ggml-rpc's HELLO exchange. ggml itself
    aborts the process on an unreachable or mismatched server; asking first turns that into an error."""
    import socket
    import struct
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
            s.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _RPC_CAPS) + bytes(_RPC_CAPS))
            buf = b""
            while len(buf) < 8 + 4 + _RPC_CAPS:
                chunk = s.recv(64)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise ValueError(f"RPC server {endpoint}: cannot connect ({e})") from None
    if len(buf) < 12 or struct.unpack_from("<Q", buf)[0] != 4 + _RPC_CAPS:
        raise ValueError(f"RPC server {endpoint}: no ggml-rpc HELLO answer (not an rpc-server?)")
    return buf[8], buf[9], buf[10]


def add_rpc_servers(servers: str) -> None:
    """Register llama.cpp RPC servers ("host:port,...") as devices of this process (once each), as
    llama.cpp's own --rpc does: ggml_backend_rpc_add_server + ggml_backend_register."""
    import llama_cpp
    endpoints = [e.strip() for e in servers.split(",") if e.strip()]
    bad = [e for e in endpoints if e.rpartition(":")[0] == "" or not e.rpartition(":")[2].isdigit()]
    if not endpoints or bad:
        raise ValueError(f"rpc_servers must be host:port[,host:port...] (got {servers!r})")
    llama_cpp.llama_backend_init()
    lib = engine_ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RuntimeMismatch(f"this runtime has no RPC backend (libggml-rpc); {REBUILD_HINT}")
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
        lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server"))
    for e in endpoints:
        if e in _rpc_added:
            continue
        major, minor, patch = rpc_probe(e)
        if major != RPC_PROTO_MAJOR:
            raise ValueError(f"RPC server {e} speaks ggml-rpc {major}.{minor}.{patch}, this runtime {RPC_PROTO_MAJOR}.x: "
                             "run the rpc-server built with this runtime there (`mcmoe-gguf rpc-server`)")
        server_reg = add(e.encode())
        if not server_reg:
            raise ValueError(f"RPC server {e}: cannot connect or it speaks another protocol (start "
                             f"`mcmoe-gguf rpc-server` of this runtime there)")
        lib.ggml_backend_register(server_reg)
        _rpc_added.add(e)


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
    """Run a llama.cpp tool of the patched build (its shared libraries sit beside it); env, if given, is the
    tool's environment (our library directory is added to its LD_LIBRARY_PATH)."""
    import subprocess
    d = tools_dir()
    exe = d / name
    if not exe.exists():
        raise RuntimeMismatch(f"{exe} not found; {REBUILD_HINT}")
    base = kw.pop("env", None) or os.environ       # the caller's environment, if given, plus our libraries
    env = dict(base, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(d), base.get("LD_LIBRARY_PATH")])))
    return subprocess.run([str(exe), *map(str, args)], env=env, **kw)
