#!/usr/bin/env python3
"""Build llama.cpp's llama-perplexity from the pinned sources WITHOUT our patches, cached by content.

    build_stock.py            build (or reuse) and print the folder holding llama-perplexity

What `--compat stock` promises is that an unpatched llama.cpp (and so ollama, LM Studio, a stock
llama-cpp-python) runs the file; this is the llama.cpp that checks it (tests/engine/test_compat.py,
scripts/bench_quality.py --compat). Same sdist as the runtime (llama-cpp-python 0.3.36, llama.cpp
0c1e570), no cpp/, no patches/. One CPU backend at the AVX2/FMA/F16C level, every x86-64 machine we
run on has it; no AVX-512 or AMX (the pinned tree's AMX path crashes, DESIGN.md), so the numbers do
not depend on the machine. Cached under ~/.cache/mcmoe-gguf/stock-llama/<key>; ~10 min on 2 cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from mcmoe_gguf.base.cache import cache_dir, locked  # noqa: E402
from llama_tree import SDIST_DIR, SDIST_SHA256, VENDOR, run, unpack_sdist  # noqa: E402

TARGETS = ["llama-perplexity"]
CMAKE = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_OPENSSL=OFF",
         "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
         "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_OPENMP=ON"]
VERSION = 1       # bump when this file changes what it builds


def key() -> str:
    ident = {"sdist": SDIST_SHA256, "cmake": CMAKE, "targets": TARGETS, "machine": platform.machine(), "v": VERSION}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def stock_tools() -> Path:
    """Folder with the unpatched llama-perplexity (built on first use)."""
    k = key()
    out = cache_dir("stock-llama") / k
    with locked("stock-llama-" + k):
        if (out / "ok").exists():
            return out / "bin"
        work = cache_dir("work") / f"stock-{k}"
        if not (work / SDIST_DIR).exists():
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            unpack_sdist(work)
        src, build = work / SDIST_DIR / VENDOR, work / "build"
        run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja"] + CMAKE)
        run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target"] + TARGETS)
        stage = Path(str(out) + ".tmp")
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "bin").mkdir(parents=True)
        for t in TARGETS:
            shutil.copy2(build / "bin" / t, stage / "bin" / t)
        (stage / "ok").write_text(json.dumps({"key": k, "cmake": CMAKE}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(stage, out)
        shutil.rmtree(work, ignore_errors=True)
    return out / "bin"


if __name__ == "__main__":
    print(stock_tools())
