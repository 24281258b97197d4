"""The patched runtime: identity check, refusal of stock/stale builds, tools, patches/."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO, cli


def test_runtime_reports_this_checkouts_source_hash():
    from mcmoe_gguf.engine.runtime import check_runtime
    from mcmoe_gguf.base.sources import source_hash
    info = check_runtime()
    assert info["abi"] == "1" and info["source_hash"] == source_hash()


def test_stale_runtime_is_refused(monkeypatch):
    from mcmoe_gguf.engine import libllama
    from mcmoe_gguf.engine import runtime
    monkeypatch.setattr(libllama, "source_hash", lambda: "0" * 64)
    monkeypatch.delenv("MCMOE_ALLOW_STALE", raising=False)
    with pytest.raises(runtime.RuntimeMismatch, match="stale.*make runtime"):
        runtime.check_runtime()


@pytest.fixture(scope="module")
def stock_lib_dir(tmp_path_factory):
    """A libllama.so exporting llama.cpp-like symbols but not ours: what a stock build looks like to us."""
    d = tmp_path_factory.mktemp("stock")
    (d / "stock.c").write_text("int llama_backend_init(void) { return 0; }\nint llama_max_devices(void) { return 1; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", d / "libllama.so", d / "stock.c"], check=True)
    return d


def test_stock_runtime_is_refused_by_cli(stock_lib_dir, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    r = cli("generate", f, "-p", "hi", env=dict(os.environ, LLAMA_CPP_LIB_PATH=str(stock_lib_dir)))
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "stock llama.cpp" in last and "make runtime" in last, r.stderr


def test_stock_runtime_is_refused_by_load(stock_lib_dir, tmp_path):
    code = ("import mcmoe_gguf\n"
            "try:\n    mcmoe_gguf.load('x.gguf')\n"
            "except mcmoe_gguf.RuntimeMismatch as e:\n    print('REFUSED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, LLAMA_CPP_LIB_PATH=str(stock_lib_dir)))
    assert r.stdout.startswith("REFUSED") and "make runtime" in r.stdout, r.stdout + r.stderr


def test_llama_cpp_tools_are_built():
    from mcmoe_gguf.engine.runtime import run_tool
    for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity"):
        r = run_tool(tool, "--help", capture_output=True, text=True, timeout=60)
        assert "usage" in (r.stdout + r.stderr).lower(), tool


def test_patches_apply_to_pristine_sources():
    r = subprocess.run([sys.executable, "scripts/build_runtime.py", "--check-patches"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "apply cleanly" in r.stdout


def test_cpu_variant_rule_on_known_cpus():
    """The mirror of ggml's variant score (mcmoe_gguf.engine.cpu_variant) on the flag sets of known CPUs."""
    from mcmoe_gguf.engine.cpu_variant import expected_variant
    haswell = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
    avx512 = haswell | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
    zen4 = avx512 | {"avx512vbmi", "avx512_vnni", "avx512_bf16"}
    assert expected_variant(set()) == "x64"
    assert expected_variant({"sse4_2"}) == "sse42"
    assert expected_variant(haswell) == "haswell"                        # e.g. an AVX2-only EPYC (Zen 2/3)
    assert expected_variant(haswell | {"avx_vnni"}) == "alderlake"
    assert expected_variant(avx512) == "skylakex"
    assert expected_variant(zen4) == "zen4"                              # AMD Zen 4
    assert expected_variant(zen4 | {"amx_tile", "amx_int8"}) == "sapphirerapids"


def test_loaded_cpu_variant_matches_this_cpu():
    """A fresh process loads the variant ggml's rule picks for this CPU's flags, and it runs our kernels."""
    code = ("import llama_cpp\nfrom mcmoe_gguf import check_runtime\nfrom mcmoe_gguf.engine import cpu_variant\ncheck_runtime()\n"
            "llama_cpp.llama_backend_init()\nprint(cpu_variant.loaded_variant())\n"
            "print(llama_cpp.llama_print_system_info().decode())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    from mcmoe_gguf.engine.cpu_variant import cpu_model, expected_variant
    loaded, system_info = r.stdout.splitlines()[0], r.stdout
    print(f"\n{cpu_model()}: loaded libggml-cpu-{loaded}.so")
    assert loaded == expected_variant(), (loaded, system_info)
    # what the loaded module says it was compiled for agrees with the CPU
    from mcmoe_gguf.engine.cpu_variant import cpu_flags
    flags = cpu_flags()
    for feat, flag in (("AVX2", "avx2"), ("AVX512", "avx512f"), ("AMX_INT8", "amx_int8"), ("AVX_VNNI", "avx_vnni")):
        assert (f"{feat} = 1" in system_info) == (flag in flags and feat in _variant_features(loaded)), feat


def _variant_features(v: str) -> tuple[str, ...]:
    from mcmoe_gguf.engine.cpu_variant import VARIANTS
    return VARIANTS[v]


def test_runtime_command_names_the_cpu_variant():
    from mcmoe_gguf.engine.cpu_variant import expected_variant
    r = cli("runtime", timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"CPU backend loaded: {expected_variant()}" in r.stdout, r.stdout
