"""Which CPU backend of the portable runtime runs on this machine.

The runtime is built with GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS (scripts/build_runtime.py): one
libggml-cpu-<variant>.so per x86-64 instruction-set level, and at start ggml loads the variant with the
highest score among those the CPU can run (ggml-cpu/arch/x86/cpu-feats.cpp). This module mirrors that
rule from /proc/cpuinfo, independently of ggml, and reads which variant a process actually mapped, so a
test and `mcmoe-gguf runtime` can say both and check they agree.
"""
from __future__ import annotations

import re
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


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


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


def loaded_module() -> Path | None:
    """The CPU backend module (libggml-cpu-<variant>.so) this process has mapped, None if none."""
    found = set(re.findall(r"\s(/\S*libggml-cpu-[A-Za-z0-9_]+\.so)$", Path("/proc/self/maps").read_text(), re.M))
    if len(found) > 1:
        raise RuntimeError(f"several CPU backend modules are mapped: {sorted(found)}")
    return Path(found.pop()) if found else None


def loaded_variant() -> str | None:
    """The <variant> of the mapped libggml-cpu-<variant>.so (None: no CPU backend module loaded)."""
    m = loaded_module()
    return m.name[len("libggml-cpu-"):-len(".so")] if m else None
