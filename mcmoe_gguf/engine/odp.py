"""Online dynamic pruning (ODP) as the patched engine runs it: load-time parameters and counters.

The engine applies the rule inside llama.cpp's graph (cpp/ggml/mcmoe-odp.h, cpp/runtime/mcmoe-moe.h);
this module turns Python arguments into llama.cpp kv-overrides of the ``mcmoe.odp.*`` metadata and reads
the engine's per-layer counters (top-k slots seen, slots pruned, tokens, protected tokens) with ctypes.
The counters are process-wide: one model evaluating at a time (``odp_reset()`` between measurements).
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

from mcmoe_gguf.gguf import keys as K
from mcmoe_gguf.gguf.keys import IMPORTANCE_MODES  # noqa: F401  (re-exported: the CLI's choices)

MAX_LAYERS = 256      # MCMOE_ODP_MAX_LAYERS
FLAG_RULE, FLAG_PROTECTED, FLAG_PRUNED = 1, 2, 4


def n_protect(ratio: float, n_tokens: int) -> int:
    """Protected tokens of a micro-batch (mcmoe_odp_n_protect): ceil(ratio * n), none for one token."""
    if n_tokens <= 1 or ratio <= 0:
        return 0
    return min(n_tokens, math.ceil(ratio * n_tokens - 1e-6))


def overrides(odp: bool = True, protect: float | None = None, mu_scale: float | None = None,
              mu: float | None = None, importance: str | None = None) -> dict:
    """kv_overrides for llama_cpp.Llama. odp=True turns pruning on where there are thresholds: the file's
    calibrated mcmoe.odp.mu, or `mu` (one value for every layer). A file with neither (a stock or F16
    conversion without calibration) runs unpruned: the engine decides that from the file's metadata
    (mcmoe.odp.if_calibrated), so nothing here reads the file. odp=False turns it off. protect, mu_scale
    and importance override the file's values only when given (the engine checks the file's)."""
    if importance is not None and importance not in IMPORTANCE_MODES:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCE_MODES)} (got {importance!r})")
    if protect is not None and not 0 <= protect <= 1:
        raise ValueError(f"protect must be a fraction in [0, 1] (got {protect})")
    for name, v in (("mu", mu), ("mu_scale", mu_scale)):
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be finite and >= 0 (got {v})")
    kv = {K.ODP_ENABLED: bool(odp)}
    if odp:
        given = {K.ODP_PROTECT: protect, K.ODP_MU_SCALE: mu_scale, K.ODP_IMPORTANCE: importance}
        kv.update({k: (v if isinstance(v, str) else float(v)) for k, v in given.items() if v is not None})
        if mu is not None:
            kv[K.ODP_MU_OVERRIDE] = float(mu)
        else:
            kv[K.ODP_IF_CALIBRATED] = True
    return kv


def engine_lib() -> ctypes.CDLL:
    """The libllama llama-cpp-python loads (same path, so the same instance), as a handle whose dlsym
    also searches its dependencies: mcmoe_odp_* then resolve to the libggml-base instance the engine
    itself uses. Opening a libggml-base file by path would not do: the wheel ships libggml-base.so, .so.0
    and .so.0.25.3 as separate copies, and whichever copy a process maps first (by any name) is the one
    libllama binds to through its soname, so a second path can be a second instance with zero counters."""
    from mcmoe_gguf.engine.libllama import lib_path
    return ctypes.CDLL(str(lib_path()))


def _lib() -> ctypes.CDLL:
    lib = engine_lib()
    i64p = ctypes.POINTER(ctypes.c_int64)
    lib.mcmoe_odp_counters.argtypes = [ctypes.c_int, i64p, i64p, i64p, i64p]
    lib.mcmoe_odp_counters.restype = ctypes.c_int
    lib.mcmoe_odp_last_flags.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint8), ctypes.c_int]
    lib.mcmoe_odp_last_flags.restype = ctypes.c_int
    lib.mcmoe_odp_reset.argtypes = []
    return lib


@dataclass
class LayerStats:
    layer: int
    slots: int          # top-k slots routed (tokens x k)
    pruned: int         # slots whose expert did not run
    tokens: int
    protected: int      # tokens kept whole by protection

    @property
    def skipped_fraction(self) -> float:
        return self.pruned / self.slots if self.slots else 0.0


def odp_reset() -> None:
    _lib().mcmoe_odp_reset()


def odp_stats(llm=None) -> list[LayerStats]:
    """Per-layer counters since the last odp_reset() (layers that saw no ODP op are left out). The
    counters are process-wide; `llm`, if given, is synchronized first: on CUDA the counters are updated by
    host callbacks queued on the GPU stream (cpp/ggml-cuda/mcmoe-odp.cu), complete once the stream is.
    (llama-cpp-python's eval() reads the logits, which synchronizes too.)"""
    if llm is not None and getattr(llm, "ctx", None) is not None:
        import llama_cpp
        llama_cpp.llama_synchronize(llm.ctx)
    lib = _lib()
    out = []
    for layer in range(MAX_LAYERS):
        v = [ctypes.c_int64() for _ in range(4)]
        lib.mcmoe_odp_counters(layer, *[ctypes.byref(x) for x in v])
        if v[0].value:
            out.append(LayerStats(layer, *(x.value for x in v)))
    return out


def last_flags(layer: int, max_tokens: int = 8192) -> list[int]:
    """Flags (FLAG_RULE | FLAG_PROTECTED | FLAG_PRUNED) of each token of the last micro-batch of `layer`."""
    buf = (ctypes.c_uint8 * max_tokens)()
    n = _lib().mcmoe_odp_last_flags(layer, buf, max_tokens)
    return list(buf[:max(n, 0)])


def summary(stats: list[LayerStats]) -> dict:
    slots = sum(s.slots for s in stats)
    pruned = sum(s.pruned for s in stats)
    return {"slots": slots, "pruned": pruned, "skipped_fraction": pruned / slots if slots else 0.0,
            "expert_evals_run": slots - pruned}
