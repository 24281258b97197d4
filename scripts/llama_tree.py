#!/usr/bin/env python3
"""The pinned llama.cpp source tree with this checkout's cpp/ and patches/ applied.

One owner for what build_runtime.py (the wheel, the .dev tree), check_cuda.py (nvcc compile checks) and
device_check.py (the GPU machine's bundle) all start from: the llama.cpp vendored in the PyPI sdist
llama-cpp-python==0.3.36 (commit 0c1e570, sha256-pinned download), our cpp/ copied in as mcmoe/, the
source-hash header, then patches/*.patch.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mcmoe_gguf.base.cache import fetch  # noqa: E402
from mcmoe_gguf.base.sources import source_hash  # noqa: E402

SDIST_VERSION = "0.3.36"
SDIST_URL = ("https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca"
             "773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz")
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_DIR = f"llama_cpp_python-{SDIST_VERSION}"
VENDOR = "vendor/llama.cpp"
CPP_DEST = "mcmoe"            # cpp/ lands at vendor/llama.cpp/mcmoe
HASH_HEADER = "mcmoe-gen/mcmoe-source-hash.h"


def run(cmd: list, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, **kw)


def unpack_sdist(dest_parent: Path) -> Path:
    """The pristine sdist under dest_parent; returns its root (SDIST_DIR)."""
    sdist = fetch(SDIST_URL, SDIST_SHA256)
    with tarfile.open(sdist) as t:
        t.extractall(dest_parent, filter="tar")
    tree = dest_parent / SDIST_DIR
    # The tarball carries the vendored .git; file timestamps changed on extraction, so refresh the index
    # or `git apply`/`git diff` would see every file as modified.
    run(["git", "-C", str(tree / VENDOR), "update-index", "-q", "--refresh"])
    return tree


def patch_files() -> list[Path]:
    return sorted((REPO / "patches").glob("*.patch"))


def apply_patches(vendor: Path, check_only: bool = False) -> None:
    for p in patch_files():
        run(["git", "-C", str(vendor), "apply", "--whitespace=nowarn"] + (["--check"] if check_only else []) + [str(p)])


def write_hash_header(vendor: Path) -> None:
    h = vendor / HASH_HEADER
    text = f'#pragma once\n#define MCMOE_SOURCE_HASH "{source_hash(REPO)}"\n'
    h.parent.mkdir(exist_ok=True)
    if not h.exists() or h.read_text() != text:   # untouched header = no needless recompile
        h.write_text(text)


def patched_tree(dest_parent: Path) -> Path:
    """unpack_sdist + cpp/ copied in + the hash header + patches/; returns the sdist root (SDIST_DIR)."""
    tree = unpack_sdist(dest_parent)
    vendor = tree / VENDOR
    shutil.copytree(REPO / "cpp", vendor / CPP_DEST)
    write_hash_header(vendor)
    apply_patches(vendor)
    return tree
