"""CI compile check of the CUDA sources (scripts/check_cuda.py): no GPU needed, nvcc is.

- every ggml-cuda .cu file our patches change, and cpp/ggml-cuda/*.cu (mcq.cu, mcmoe-odp.cu), compile for sm_80/86/89/90 with the
  flags of the real CMake build (results cached by content in ~/.cache/mcmoe-gguf/cuda-check);
- the check is real: a copy of our kernel file with a type error in a kernel fails, with nvcc's message,
  while the unbroken copy compiles.
Skipped only when nvcc is absent.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check_cuda.py"
KERNELS = REPO / "cpp" / "ggml-cuda" / "mcq.cu"

sys.path.insert(0, str(REPO / "scripts"))
import check_cuda  # noqa: E402

pytestmark = pytest.mark.skipif(check_cuda.nvcc_path() is None, reason="nvcc (CUDA toolkit) not found")


def run_check(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    print(p.stdout[-20000:], p.stderr[-5000:])
    return p


def test_touched_cuda_files_compile_for_all_archs():
    listed = run_check("--list")
    assert listed.returncode == 0
    files = [Path(l).name for l in listed.stdout.split()]
    assert "mcq.cu" in files                       # our kernels are always checked
    assert "mcmoe-odp.cu" in files                 # (every cpp/ggml-cuda/*.cu: the ODP op too)
    p = run_check()
    assert p.returncode == 0, p.stdout[-8000:]
    for arch in check_cuda.ARCHS:
        assert arch in p.stdout.splitlines()[0]


def test_a_broken_kernel_fails(tmp_path):
    good = tmp_path / "mcq.cu"
    shutil.copy(KERNELS, good)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = bad_dir / "mcq.cu"
    text = KERNELS.read_text()
    target = "acc[c] += mcq_hd_combine_q8_1("
    assert text.count(target) == 1
    bad.write_text(text.replace(target, "acc[c] += yc; (void) mcq_hd_combine_q8_1("))   # float += pointer

    p = run_check("--files", str(bad), "--arch", "86", "--no-cache", "--werror")
    assert p.returncode == 1
    assert "nvcc failed" in p.stdout and "error" in p.stdout
    assert "mcq.cu" in p.stdout

    p = run_check("--files", str(good), "--arch", "86", "--werror")   # the same file unbroken compiles
    assert p.returncode == 0, p.stdout[-8000:]
