"""Which CPU backend of the portable runtime runs on this machine.

The runtime is built with GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS (scripts/build_runtime.py): one
libggml-cpu-<variant>.so per x86-64 instruction-set level, and at start ggml loads the variant with the
highest score among those the CPU can run (ggml-cpu/arch/x86/cpu-feats.cpp). This module mirrors that
rule from /proc/cpuinfo, independently of ggml, and asks ggml which module it registered, so a
test and `mcmoe-gguf runtime` can say both and check they agree.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

# ggml feature -> (/proc/cpuinfo flags it needs, score weight), as in cpu-feats.cpp
FEATURES = {
    "FMA": (("fma",), 1), "F16C": (("f16c",), 1 << 1), "SSE42": (("sse4_2",), 1 << 2),
    "BMI2": (("bmi2",), 1 << 3), "AVX": (("avx",), 1 << 4), "AVX2": (("avx2",), 1 << 5),
    "AVX_VNNI": (("avx_vnni",), 1 << 6),
    "AVX512": (("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"), 1 << 7),
    "AVX512_VBMI": (("avx512vbmi",), 1 << 8), "AVX512_BF16": (("avx512_bf16",), 1 << 9),
    "AVX512_VNNI": (("avx512_vnni",), 1 << 10), "AMX_INT8": (("amx_int8",), 1 << 11),
}

_HASWELL = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2")
# the x86 variants of ggml/src/CMakeLists.txt (GGML_CPU_ALL_VARIANTS, non-MSVC), with their features
VARIANTS = {
    "x64": (), "sse42": ("SSE42",), "sandybridge": ("SSE42", "AVX"), "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"), "haswell": _HASWELL,
    "skylakex": _HASWELL + ("AVX512",), "cannonlake": _HASWELL + ("AVX512", "AVX512_VBMI"),
    "cascadelake": _HASWELL + ("AVX512", "AVX512_VNNI"),
    "icelake": _HASWELL + ("AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": _HASWELL + ("AVX512", "AVX512_VNNI", "AVX512_BF16"),
    "zen4": _HASWELL + ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
    "alderlake": _HASWELL + ("AVX_VNNI",),
    "sapphirerapids": _HASWELL + ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8"),
}


def _cpuinfo(field: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with `field` (None off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or "unknown CPU"


def score(variant: str, flags: set[str]) -> int:
    """ggml's score of `variant` on a CPU with `flags`: 0 if it cannot run there."""
    s = 1
    for feat in VARIANTS[variant]:
        need, weight = FEATURES[feat]
        if not set(need) <= flags:
            return 0
        s += weight
    return s


def expected_variant(flags: set[str] | None = None) -> str:
    """The variant ggml should load on a CPU with these flags (default: this machine's)."""
    flags = cpu_flags() if flags is None else flags
    return max(VARIANTS, key=lambda v: score(v, flags))


def runnable_variants(flags: set[str] | None = None) -> list[str]:
    flags = cpu_flags() if flags is None else flags
    return [v for v in VARIANTS if score(v, flags) > 0]


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def loaded_module() -> Path | None:
    """The file of the CPU backend ggml registered in this process (after llama_backend_init), None if
    there is none. Asked of ggml itself, not read from the process's mappings: a process may have mapped
    other CPU modules on its own (the kernel tests open every variant)."""
    from mcmoe_gguf.engine.runtime import engine_ggml
    lib = engine_ggml()
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features") if reg else None
    if not fn:
        return None
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not libc.dladdr(fn, ctypes.byref(info)) or not info.dli_fname:
        return None
    return Path(info.dli_fname.decode())


def loaded_variant() -> str | None:
    """The <variant> of the registered libggml-cpu-<variant>.so (None: none, or a build with one CPU
    backend linked in rather than loaded as a module)."""
    m = loaded_module()
    if m is None or not (m.name.startswith("libggml-cpu-") and m.name.endswith(".so")):
        return None
    return m.name[len("libggml-cpu-"):-len(".so")]
