#!/usr/bin/env python3
"""Compile-check the CUDA sources we add or change, for every target architecture (no GPU needed).

    check_cuda.py                    the tree of this checkout (pinned sdist + cpp/ + patches/, prepared
                                     once in the cache): every ggml-cuda .cu our patches change + cpp/ggml-cuda/*.cu
    check_cuda.py --dev              the same files of the .dev tree (unsaved edits included)
    check_cuda.py --files A.cu ...   these files only (e.g. a deliberately broken copy, tests/engine/test_cuda_compile.py)
    check_cuda.py --arch 86          one architecture (default: 80 86 89 90)

Each file is one `nvcc -c` for all architectures (one --generate-code each, as CMake does) with the defines, include paths and flags of ggml-cuda's CMake build
(Release, as configured by `cmake -DGGML_CUDA=ON` with the pinned llama.cpp; see CMAKE_FLAGS below),
output to a temporary directory. At most --jobs (default 2) run at once, under `nice`. A success is
cached in ~/.cache/mcmoe-gguf/cuda-check, keyed by sha256 of (nvcc version, flags, archs, the file and
every header it includes with "...", transitively), so a rerun with unchanged inputs takes a fraction of a second.
Our own files (cpp/ggml-cuda) compile with -Werror all-warnings; warnings of stock files are printed.
Exit status 1 with nvcc's message if anything fails to compile. cuBLAS headers: the toolkit's, or the
PyPI wheel nvidia-cublas (sha256-pinned, cached) when the toolkit has none.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mcmoe_gguf.base.cache import cache_dir, fetch, locked  # noqa: E402
from mcmoe_gguf.base.sources import source_hash  # noqa: E402

ARCHS = ("80", "86", "89", "90")
CHECK_VERSION = 1   # bump when the flags or the keying change

# cuBLAS for CUDA 13.0 (headers only are used here; build_runtime.py --cuda also uses the libraries)
CUBLAS_URL = ("https://files.pythonhosted.org/packages/28/d4/30e630055d8e0f7058cc0d39e562c965d692f4735537d3f02f45d579a280/"
              "nvidia_cublas-13.0.2.14-py3-none-manylinux_2_27_x86_64.whl")
CUBLAS_SHA256 = "0cf238ffdbe46c00cb9aa98e7bca745c223a5ca5a53e686ac8b3e5a08fe80d6c"

# Defines of ggml-cuda's targets (compile_commands.json of the pinned tree configured with -DGGML_CUDA=ON,
# default options): the flash-attention instance switches, graphs, shared library.
FA_ON = {"BF16_BF16", "F16_F16", "Q4_0_Q4_0", "Q8_0_Q8_0"}
FA_TYPES = ("BF16", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
DEFINES = (["-DGGML_BACKEND_BUILD", "-DGGML_BACKEND_SHARED"]
           + [f"-DGGML_CUDA_FA_{a}_{b}={int(f'{a}_{b}' in FA_ON)}" for a in FA_TYPES for b in FA_TYPES]
           + ['-DGGML_CUDA_FA_QUANTS="q4_0-q4_0,q8_0-q8_0,f16-f16,bf16-bf16"',
              "-DGGML_CUDA_USE_GRAPHS", "-DGGML_SCHED_MAX_COPIES=4", "-DGGML_SHARED", "-D_GNU_SOURCE",
              "-D_XOPEN_SOURCE=600", "-Dggml_cuda_EXPORTS"])
CMAKE_FLAGS = ["-O3", "-DNDEBUG", "-Xcompiler=-fPIC", "-use_fast_math", "-extended-lambda", "-compress-mode=size",
               "-Xcompiler", "-Wmissing-declarations -Wmissing-noreturn -Wall -Wextra -Wpedantic -Wcast-qual "
               "-Wno-unused-function -Wno-array-bounds -Wextra-semi -Wno-pedantic", "-std=c++17"]
OWN_FLAGS = ["-Werror", "all-warnings"]     # cpp/ggml-cuda only

CUDA_DIR = "ggml/src/ggml-cuda"
OWN_DIR = "mcmoe/ggml-cuda"


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- toolchain

def nvcc_path() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def toolkit_includes(nvcc: str) -> list[str]:
    """The toolkit's include directories (nvcc --dryrun): passed as -isystem, as CMake does, so that
    warnings inside CUDA's own headers are not reported."""
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", "/dev/null"], capture_output=True, text=True).stderr
    m = re.search(r'INCLUDES="([^"]*)"', out)
    dirs = re.findall(r'-I"?([^" ]+)', m.group(1)) if m else []
    return [str(Path(d).resolve()) for d in dirs if Path(d).is_dir()]


def toolkit_has_cublas(nvcc: str) -> bool:
    return any((Path(d) / "cublas_v2.h").exists() for d in toolkit_includes(nvcc))


def cublas_dir(with_libs: bool = False) -> Path:
    """The nvidia-cublas wheel unpacked in the cache: <dir>/include (and <dir>/lib with with_libs)."""
    out = cache_dir("cublas", CUBLAS_SHA256[:16])
    marker = out / ("ok-libs" if with_libs else "ok")
    with locked("cublas-" + CUBLAS_SHA256[:16]):
        if not marker.exists():
            whl = fetch(CUBLAS_URL, CUBLAS_SHA256)
            with zipfile.ZipFile(whl) as z:
                for name in z.namelist():
                    if name.startswith("nvidia/cu13/include/") or (with_libs and name.startswith("nvidia/cu13/lib/")):
                        target = out / Path(name).relative_to("nvidia/cu13")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with z.open(name) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
            if with_libs:   # the linker wants the unversioned names
                for so in ("libcublas.so", "libcublasLt.so"):
                    link = out / "lib" / so
                    if not link.exists():
                        link.symlink_to(so + ".13")
            marker.write_text(CUBLAS_URL + "\n")
    return out


# ---------------------------------------------------------------- source trees

def repo_tree() -> Path:
    """The pinned sdist's llama.cpp with cpp/ and patches/ of this checkout applied (cached by source hash)."""
    import llama_tree as lt  # noqa: E402   (scripts/ is sys.path[0] when this file runs as a script)
    key = source_hash(REPO)[:20]
    root = cache_dir("cuda-check", "src")
    tree = root / key / lt.SDIST_DIR / lt.VENDOR
    with locked("cuda-check-src-" + key):
        if not (root / key / "ok").exists():
            shutil.rmtree(root / key, ignore_errors=True)
            (root / key).mkdir(parents=True)
            import contextlib
            import io
            with contextlib.redirect_stdout(io.StringIO()):
                lt.patched_tree(root / key)
            (root / key / "ok").write_text("ok\n")
    for old in root.iterdir():   # keep the cache small: one tree per checkout state
        if old.name != key and not old.name.endswith(".lock"):
            shutil.rmtree(old, ignore_errors=True)
    return tree


def dev_tree() -> Path:
    import llama_tree as lt  # noqa: E402
    tree = REPO / ".dev" / lt.SDIST_DIR / lt.VENDOR
    if not tree.exists():
        raise SystemExit(f"no development tree at {tree} (make dev-runtime)")
    return tree


def touched_files(tree: Path) -> list[Path]:
    """ggml-cuda .cu files that differ from the pristine sources (or include a .cuh that does), + ours."""
    subprocess.run(["git", "-C", str(tree), "update-index", "-q", "--refresh"], capture_output=True)
    changed = subprocess.run(["git", "-C", str(tree), "diff", "--name-only", "HEAD", "--", CUDA_DIR],
                             capture_output=True, text=True, check=True).stdout.split()
    files = {tree / f for f in changed if f.endswith(".cu") and f.count("/") == CUDA_DIR.count("/") + 1}
    headers = [Path(f).name for f in changed if f.endswith(".cuh")]
    for cu in (tree / CUDA_DIR).glob("*.cu"):   # direct includers of a changed header (not template-instances)
        text = cu.read_text(errors="replace")
        if any(f'#include "{h}"' in text for h in headers):
            files.add(cu)
    files |= set((tree / OWN_DIR).glob("*.cu"))
    return sorted(files, key=lambda p: (-p.stat().st_size, p.name))   # biggest first: better packing of jobs


# ---------------------------------------------------------------- compiling

INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def include_dirs(tree: Path) -> list[Path]:
    return [tree / "ggml/src", tree / "ggml/include", tree / CUDA_DIR, tree / "mcmoe/ggml", tree / OWN_DIR]


def deps_hash(src: Path, tree: Path) -> str:
    """sha256 of the file and of every header it includes with "..." (transitively, resolved like the
    compiler: the including file's directory, then the -I directories). Conditional includes are followed
    too (a superset); <...> includes are the toolkit's and the compiler's, covered by the nvcc version."""
    h = hashlib.sha256()
    seen: set[Path] = set()
    todo = [src.resolve()]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        text = f.read_bytes()
        h.update(str(len(seen)).encode() + b"\0" + text + b"\0")
        for name in INCLUDE_RE.findall(text.decode(errors="replace")):
            for d in [f.parent] + include_dirs(tree):
                cand = d / name
                if cand.is_file():
                    todo.append(cand.resolve())
                    break
    return h.hexdigest()


def command(nvcc: str, tree: Path, src: Path, archs: list[str], out: Path, extra_inc: list[str], own: bool) -> list[str]:
    inc = [a for d in include_dirs(tree) for a in ("-I", str(d))]
    for d in extra_inc:
        inc += ["-isystem", d]
    # all architectures in one nvcc run, as CMake does with a list: the host pass is shared (~40% less time)
    gencode = [f"--generate-code=arch=compute_{a},code=[compute_{a},sm_{a}]" for a in archs]
    return ([nvcc, "-forward-unknown-to-host-compiler"] + DEFINES + inc + CMAKE_FLAGS[:2] + gencode + CMAKE_FLAGS[2:]
            + (OWN_FLAGS if own else []) + ["-x", "cu", "-c", str(src), "-o", str(out)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dev", action="store_true", help="check the .dev tree instead of cpp/ + patches/")
    ap.add_argument("--tree", type=Path, help="a prepared vendor/llama.cpp tree")
    ap.add_argument("--files", nargs="+", type=Path, help="compile these .cu files (with the tree's includes)")
    ap.add_argument("--arch", nargs="+", default=list(ARCHS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--werror", action="store_true", help="treat every file as ours (-Werror all-warnings)")
    ap.add_argument("--list", action="store_true", help="print the files that would be compiled and exit")
    args = ap.parse_args(argv)

    nvcc = nvcc_path()
    if nvcc is None:
        log("check_cuda: nvcc not found (set NVCC or put it on PATH)")
        return 2
    tree = args.tree or (dev_tree() if args.dev else repo_tree())
    files = [f.resolve() for f in args.files] if args.files else touched_files(tree)
    if args.list:
        for f in files:
            log(str(f))
        return 0
    extra_inc = toolkit_includes(nvcc) + ([] if toolkit_has_cublas(nvcc) else [str(cublas_dir() / "include")])

    ident = {"v": CHECK_VERSION, "nvcc": nvcc_version(nvcc), "defines": DEFINES, "flags": CMAKE_FLAGS,
             "own": OWN_FLAGS, "isystem": extra_inc}
    base_key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    ok_dir = cache_dir("cuda-check", "ok")

    def own(f: Path) -> bool:   # our kernels: cpp/ggml-cuda (mcmoe/ggml-cuda in a tree)
        return args.werror or f.resolve().parent == (REPO / "cpp" / "ggml-cuda").resolve() or f.parent == tree / OWN_DIR

    archs = sorted(set(args.arch))
    jobs = []
    for f in files:
        key = hashlib.sha256(f"{base_key}\0{','.join(archs)}\0{own(f)}\0{deps_hash(f, tree)}".encode()).hexdigest()[:32]
        jobs.append((f, archs, key))

    def rel(f: Path) -> str:
        try:
            return f.relative_to(tree).as_posix()
        except ValueError:
            return str(f)

    def run(job):
        f, archs, key = job
        marker = ok_dir / f"{key}.json"
        if not args.no_cache and marker.exists():
            return f, archs, True, 0.0, "", True
        with tempfile.TemporaryDirectory(prefix="check-cuda-") as tmp:
            cmd = ["nice", "-n", "10"] + command(nvcc, tree, f, archs, Path(tmp) / "out.o", extra_inc, own(f))
            t0 = time.monotonic()
            p = subprocess.run(cmd, capture_output=True, text=True)
            dt = time.monotonic() - t0
        msg = (p.stdout + p.stderr).strip()
        if p.returncode == 0:
            marker.write_text(json.dumps({"file": rel(f), "archs": archs, "seconds": round(dt, 1), "warnings": msg}))
        return f, archs, p.returncode == 0, dt, msg, False

    t_all = time.monotonic()
    failed = []
    arch_s = "sm_" + ",".join(archs)
    log(f"check_cuda: {len(files)} file(s) for {arch_s}, {args.jobs} job(s), tree {tree}")
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        for fut in cf.as_completed([ex.submit(run, j) for j in jobs]):
            f, _, ok, dt, msg, cached = fut.result()
            state = "cached" if cached else f"{dt:6.1f} s"
            log(f"  {'ok  ' if ok else 'FAIL'} {arch_s} {state:>8}  {rel(f)}")
            if msg and not ok:
                failed.append((f, msg))
            elif msg and not cached:
                log("    warnings:\n" + "\n".join("      " + l for l in msg.splitlines()[:40]))
    log(f"check_cuda: {time.monotonic() - t_all:.1f} s total")
    for f, msg in failed:
        shown = msg if len(msg) <= 8000 else msg[:6000] + "\n[...]\n" + msg[-2000:]
        log(f"\nnvcc failed on {rel(f)} ({arch_s}):\n{shown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
