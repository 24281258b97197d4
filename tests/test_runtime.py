"""The patched runtime: identity check, refusal of stock/stale builds, tools, patches/."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO, cli


def test_runtime_reports_this_checkouts_source_hash():
    from mcmoe_gguf.runtime import check_runtime
    from mcmoe_gguf.sources import source_hash
    info = check_runtime()
    assert info["abi"] == "1" and info["source_hash"] == source_hash()


def test_stale_runtime_is_refused(monkeypatch):
    from mcmoe_gguf import runtime
    monkeypatch.setattr(runtime, "source_hash", lambda: "0" * 64)
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
    from mcmoe_gguf.runtime import run_tool
    for tool in ("llama-quantize", "llama-imatrix", "llama-perplexity"):
        r = run_tool(tool, "--help", capture_output=True, text=True, timeout=60)
        assert "usage" in (r.stdout + r.stderr).lower(), tool


def test_patches_apply_to_pristine_sources():
    r = subprocess.run([sys.executable, "scripts/build_runtime.py", "--check-patches"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "apply cleanly" in r.stdout
