#!/usr/bin/env python3
"""Build the patched llama.cpp runtime (llama-cpp-python wheel + llama.cpp tools), cached by content.

    build_runtime.py                 wheel + tools for this checkout; installs the wheel into the venv
    build_runtime.py --cuda          the same with GGML_CUDA (architectures from --cuda-arch, default 86)
    build_runtime.py --dev           incremental development tree in .dev/ (cpp/ symlinked in);
                                     run Python against it with LLAMA_CPP_LIB_PATH=.dev/build/bin
    build_runtime.py --check-patches patches/ apply to pristine sources, and .dev holds no unsaved edit
    build_runtime.py --save-patches  regenerate patches/ from the .dev tree (git diff)

Pinned source: the llama.cpp vendored in the PyPI sdist llama-cpp-python==0.3.36 (commit 0c1e570).
The cache key hashes (sdist, cpp/ + patches/, cmake arguments, build targets, machine architecture): a
second run with the same inputs only (re)installs the cached wheel. The build is portable, as llama.cpp's
release binaries are: GGML_BACKEND_DL with GGML_CPU_ALL_VARIANTS compiles one CPU backend per
instruction-set level (libggml-cpu-x64 ... -sapphirerapids) and ggml loads the best one the CPU can run,
so a wheel built on one x86-64 machine is correct on any other and the key does not depend on the CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mcmoe_gguf.base.cache import cache_dir, locked  # noqa: E402
from mcmoe_gguf.base.sources import source_hash  # noqa: E402
sys.path.insert(0, str(REPO / "scripts"))
from llama_tree import (CPP_DEST, SDIST_DIR, SDIST_SHA256, SDIST_VERSION, VENDOR, apply_patches, patch_files,  # noqa: E402
                        patched_tree, run, unpack_sdist, write_hash_header)

DEV = REPO / ".dev"
TOOLS = ["llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "test-backend-ops", "ggml-rpc-server"]
# Only what the wheel installs plus the tools: the full tool set would double the build time.
# (mtmd only because LLAMA_BUILD_TOOLS adds its install rule)
# ("ggml" depends on every CPU variant module, so they are built with it)
TARGETS = ["llama", "llama-common", "ggml", "ggml-base", "mtmd"] + TOOLS
BUILD_SCRIPT_VERSION = 2      # bump when this file changes what it builds


def cmake_args(cuda: bool, cuda_arch: str) -> list[str]:
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=ON",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_TOOLS_INSTALL=OFF", "-DLLAMA_TESTS_INSTALL=OFF", "-DLLAMA_OPENSSL=OFF",
        # one CPU backend per ISA level, chosen at load time (no -march=native); the modules are
        # installed beside libggml in the wheel's llama_cpp/lib, where our patch makes ggml look
        "-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
        "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib",
        # llama.cpp's RPC backend (libggml-rpc module + ggml-rpc-server): one model across machines
        "-DGGML_RPC=ON",
    ]
    if cuda:
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"] + cuda_toolkit_args()
    return args


def cuda_toolkit_args() -> list[str]:
    """What ggml-cuda's CMake needs beyond the toolkit's nvcc: cuBLAS and the driver library.

    A full CUDA toolkit (the GPU machines) has both and gets no extra argument. A toolkit without cuBLAS
    (this project's CI image: nvcc only) gets it from the PyPI wheel nvidia-cublas (pinned in
    check_cuda.py, unpacked in the cache); then libcublas.so.13 must also be on the loader path at run
    time. Without libcuda (no driver, no stubs) the build uses GGML_CUDA_NO_VMM (the only user of the
    driver API in ggml-cuda is its virtual-memory pool).
    """
    import check_cuda   # scripts/ is sys.path[0] when this file runs as a script
    nvcc = check_cuda.nvcc_path()
    if nvcc is None:
        raise SystemExit("--cuda: nvcc not found (install the CUDA toolkit or set NVCC)")
    args = []
    inc = check_cuda.toolkit_includes(nvcc)
    if not check_cuda.toolkit_has_cublas(nvcc):
        cub = check_cuda.cublas_dir(with_libs=True)
        args += [f"-DCUDA_cublas_LIBRARY={cub / 'lib' / 'libcublas.so'}",
                 f"-DCUDA_cublasLt_LIBRARY={cub / 'lib' / 'libcublasLt.so'}",
                 f"-DCMAKE_CUDA_FLAGS=-isystem={cub / 'include'}"]
        print(f"cuBLAS: {cub} (PyPI nvidia-cublas; put {cub / 'lib'} on LD_LIBRARY_PATH to run)")
    roots = {Path(d).parent for d in inc}
    libcuda = [p for r in roots for p in (r / "lib" / "stubs" / "libcuda.so", r / "lib64" / "stubs" / "libcuda.so")
               if p.exists()]
    if not libcuda and "libcuda.so" not in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout:
        args += ["-DGGML_CUDA_NO_VMM=ON"]
        print("libcuda.so not found (no driver, no toolkit stubs): building with GGML_CUDA_NO_VMM=ON")
    return args


def runtime_key(args: list[str]) -> str:
    ident = {"sdist": SDIST_SHA256, "sources": source_hash(REPO), "cmake": args, "targets": TARGETS,
             "machine": platform.machine(), "script": BUILD_SCRIPT_VERSION, "python": sys.version_info[:2]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def build_cached(cuda: bool, cuda_arch: str, venv_python: str) -> Path:
    args = cmake_args(cuda, cuda_arch)
    key = runtime_key(args)
    out = cache_dir("runtime") / key
    with locked("runtime-" + key):
        if not (out / "ok").exists():
            build(args, key, out)
        else:
            print(f"runtime {key}: cached in {out}")
    install(out, key, venv_python)
    return out


def build(args: list[str], key: str, out: Path) -> None:
    # Fixed paths per key: after a failed or killed build, the rerun reuses the CMake tree and only
    # recompiles what is missing (extraction keeps the archive's mtimes).
    work = cache_dir("work") / f"src-{key}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    tree = patched_tree(work)
    build_dir = cache_dir("work") / f"build-{key}"
    env = dict(os.environ, CMAKE_ARGS=" ".join(args),
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    wheel_dir = work / "wheel"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
         "-C", f"build-dir={build_dir}", "-C", "build.verbose=false", "-C", "logging.level=WARNING",
         "-C", "build.targets=" + ";".join(TARGETS), str(tree)], env=env)
    stage = Path(str(out) + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "bin").mkdir(parents=True)
    for whl in wheel_dir.glob("*.whl"):
        shutil.copy2(whl, stage)
    # Tools run straight from the cache: copy them with the shared libraries they link against.
    for f in (build_dir / "bin").iterdir():
        if f.name in TOOLS or ".so" in f.name:
            shutil.copy2(f, stage / "bin" / f.name, follow_symlinks=False)
    (stage / "ok").write_text(json.dumps({"key": key, "cmake": args, "source_hash": source_hash(REPO)}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(stage, out)
    shutil.rmtree(build_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


def install(out: Path, key: str, venv_python: str) -> None:
    marker = Path(subprocess.check_output([venv_python, "-c", "import sys; print(sys.prefix)"], text=True).strip())
    marker = marker / "mcmoe-runtime.json"
    info = {"key": key, "tools": str(out / "bin")}
    if marker.exists() and json.loads(marker.read_text()) == info:
        print(f"runtime {key}: already installed")
        return
    wheel = next(out.glob("*.whl"))
    run([venv_python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)])
    marker.write_text(json.dumps(info))


# ---------------------------------------------------------------- development tree

def dev_tree() -> Path:
    tree = DEV / SDIST_DIR
    if not tree.exists():
        DEV.mkdir(exist_ok=True)
        unpack_sdist(DEV)
        vendor = tree / VENDOR
        (vendor / CPP_DEST).symlink_to(REPO / "cpp")   # edits in cpp/ are live in the dev build
        apply_patches(vendor)
    return tree


def dev_build(cuda: bool, cuda_arch: str) -> None:
    tree = dev_tree()
    write_hash_header(tree / VENDOR)
    build_dir = DEV / "build"
    # configure every time (seconds): a changed argument (CUDA=1, new build options) reaches the cache
    run(["cmake", "-S", str(tree), "-B", str(build_dir), "-G", "Ninja"] + cmake_args(cuda, cuda_arch))
    run(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2), "--target"] + TARGETS)
    print(f"\nexport LLAMA_CPP_LIB_PATH={build_dir / 'bin'} MCMOE_TOOLS_DIR={build_dir / 'bin'}")


def dev_diff() -> str:
    vendor = DEV / SDIST_DIR / VENDOR
    run(["git", "-C", str(vendor), "update-index", "-q", "--refresh"])
    return subprocess.check_output(["git", "-C", str(vendor), "diff", "--no-color", "--no-ext-diff"], text=True)


def save_patches() -> None:
    diff = dev_diff()
    for p in patch_files():
        p.unlink()
    if diff:
        (REPO / "patches" / "0001-mcmoe-hooks.patch").write_text(diff)
    print(f"patches/ regenerated from {DEV / SDIST_DIR / VENDOR} ({len(diff.splitlines())} lines)")


def check_patches() -> int:
    with tempfile.TemporaryDirectory(dir=cache_dir("work")) as tmp:
        vendor = unpack_sdist(Path(tmp)) / VENDOR
        apply_patches(vendor, check_only=True)
    print(f"ok: {len(patch_files())} patch file(s) apply cleanly to pristine llama.cpp of the {SDIST_VERSION} sdist")
    if (DEV / SDIST_DIR).exists():
        saved = "".join(p.read_text() for p in patch_files())
        if dev_diff() != saved:
            print(f"error: {DEV / SDIST_DIR / VENDOR} holds edits that patches/ lacks (or the reverse); "
                  "run `make save-patches` and commit", file=sys.stderr)
            return 1
        print("ok: the .dev tree has no edit missing from patches/")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", action="store_true", help="build with GGML_CUDA=ON")
    ap.add_argument("--cuda-arch", default="86", help="CMAKE_CUDA_ARCHITECTURES (default 86 = RTX 3090)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the venv to install into")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dev", action="store_true", help="incremental build of the .dev tree")
    mode.add_argument("--check-patches", action="store_true", help="verify patches/ against pristine sources")
    mode.add_argument("--save-patches", action="store_true", help="regenerate patches/ from the .dev tree")
    a = ap.parse_args()
    if a.check_patches:
        return check_patches()
    if a.save_patches:
        save_patches()
    elif a.dev:
        dev_build(a.cuda, a.cuda_arch)
    else:
        build_cached(a.cuda, a.cuda_arch, a.python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
