"""The artifact cache outside the repository: pinned downloads, built runtimes, trained tiny models.

Everything in it is keyed by content (sha256 of inputs), so a stale entry is never reused and a
machine that already has an entry skips the work. Location: $MCMOE_CACHE or ~/.cache/mcmoe-gguf.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("MCMOE_CACHE", Path.home() / ".cache" / "mcmoe-gguf"))
    d = root.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def locked(name: str):
    """Serialise work on one cache entry across processes (two `make` runs, pytest-xdist, ...)."""
    with open(cache_dir("locks") / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, sha256: str) -> Path:
    """Download a pinned file once; the sha256 is checked on every use, not only after download."""
    dest = cache_dir("downloads") / url.rsplit("/", 1)[-1]
    with locked("download-" + sha256[:16]):
        if dest.exists() and sha256_file(dest) == sha256:
            return dest
        print(f"downloading {url}", file=sys.stderr)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=120) as r:
                shutil.copyfileobj(r, out)
            got = sha256_file(Path(tmp))
            if got != sha256:
                raise RuntimeError(f"{url}: sha256 {got} does not match the pinned {sha256}")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest
