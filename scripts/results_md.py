"""Replace one benchmark's section of docs/RESULTS.md (between its markers), keeping everything else."""
from __future__ import annotations

import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "RESULTS.md"


def replace_section(name: str, body: str, path: Path = RESULTS) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def machine() -> str:
    """The machine a benchmark ran on, for its RESULTS.md section: CPU model, cores and the SIMD flags that
    choose our kernels (not a fixed string: the machines differ between sessions)."""
    sys.path.insert(0, str(RESULTS.parent.parent))
    from mcmoe_gguf.engine.cpu_variant import cpu_flags, cpu_model
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "f16c", "fma")))
    return f"{cpu_model()}, {os.cpu_count()} cores, flags {' '.join(flags) or 'none of AVX/AMX'}"
