"""Identity of our native sources (cpp/ + patches/), shared by the runtime build and the runtime check.

The built libllama embeds this hash (``mcmoe_runtime_info()``); ``runtime.py`` recomputes it from the
checkout, so a library built from other sources is refused instead of silently misbehaving.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]   # mcmoe_gguf/base/sources.py
SOURCE_DIRS = ("cpp", "patches")


def source_files(root: Path = REPO_ROOT) -> list[Path]:
    files = []
    for d in SOURCE_DIRS:
        base = root / d
        if base.is_dir():
            files += [p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def source_hash(root: Path = REPO_ROOT) -> str | None:
    """sha256 over (relative path, content) of every file in cpp/ and patches/; None outside a checkout."""
    if not (root / "cpp").is_dir() or not (root / "patches").is_dir():
        return None
    h = hashlib.sha256()
    for p in source_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()
