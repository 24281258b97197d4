#!/usr/bin/env python3
"""Kernel table: one Mixtral-expert-sized matmul (m=4096, k=14336) per type, per CPU backend variant.

    .venv/bin/python scripts/bench_kernels.py [--variants sapphirerapids,haswell] [--n 1,256] [--repeat 5]

For each CPU backend variant of the portable runtime (default: the one ggml loads here, and `haswell`,
the AVX2-only level an AMD EPYC of the Zen 2/3 generation gets), llama.cpp's test-backend-ops times
MUL_MAT of every type with n activation columns (n=1: decode, a mat-vec; n=256: a prompt batch), run
side by side in one process per variant, on all cores (test-backend-ops' own choice). A variant is forced by running the tool from a directory that
holds only that CPU module. Prints microseconds per call and the ratio to q2_K of the same variant;
with --repeat N every case runs N times, the rounds interleaved over variants and types so that a slow
stretch of a shared machine hits all of them, and the table shows medians with the range of the ratio;
--write-results puts the table in docs/RESULTS.md with the CPU model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from mcmoe_gguf.engine.cpu_variant import expected_variant, runnable_variants  # noqa: E402
from mcmoe_gguf.engine.kernel_costs import time_type  # noqa: E402
from mcmoe_gguf.engine.runtime import tools_dir  # noqa: E402
from results_md import machine  # noqa: E402

TYPES = ["mcq1", "mcq2", "mcq3", "mcq4", "mcn2", "mcn3", "mct1", "mct2", "mct3", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "q2_K", "q3_K", "q4_K",
         "q4_0"]   # our types, the ladder's llama.cpp types (quant/ladder.py), q4_0 for reference


def variant_dir(tools: Path, variant: str, tmp: Path) -> Path:
    d = tmp / variant
    d.mkdir()
    for f in tools.iterdir():
        if f.name.startswith("libggml-cpu-") and f.name != f"libggml-cpu-{variant}.so":
            continue
        (d / f.name).symlink_to(f)
    return d


def time_types(d: Path, n: int, types=TYPES) -> dict[str, float]:
    """us per MUL_MAT call for each type (test-backend-ops perf, CPU backend)."""
    return {t: time_type(d, t, n) for t in types}


def table(results: dict, ns: list[int], types=TYPES) -> str:
    """results[variant][n] = list of {type: us} rounds -> markdown: median us, median ratio (min-max)."""
    import statistics
    lines = []
    for variant, by_n in results.items():
        head = "| type | " + " | ".join(f"n={n}: us (median) | vs q2_K" for n in ns) + " |"
        lines += [f"**{variant}**", "", head, "|---|" + "---:|---:|" * len(ns)]
        for t in types:
            cells = []
            for n in ns:
                rounds = by_n[n]
                ratios = [r[t] / r["q2_K"] for r in rounds]
                rng = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(rounds) > 1 else ""
                cells.append(f"{statistics.median(r[t] for r in rounds):.0f} | {statistics.median(ratios):.2f}{rng}")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=None,
                    help="comma-separated CPU variants (default: the loaded one and haswell, where runnable)")
    ap.add_argument("--n", default="1,256", help="activation columns to time: test-backend-ops has 1, 2, 3, 4, 5, 8, 512 "
                    "and (cpp/tests/mcmoe-test-cases.h) 256 (default 1,256)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per case, interleaved; medians reported (default 1)")
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated ggml type names (q2_K is always timed: "
                    "the ratios are to it); default: all of the ladder's")
    ap.add_argument("--write-results", action="store_true", help="replace the table in docs/RESULTS.md")
    a = ap.parse_args()
    types = list(dict.fromkeys(a.types.split(",") + ["q2_K"]))
    if a.write_results and types != TYPES:     # before the timing, not after it
        raise SystemExit("--write-results replaces the table of all types: leave --types out")
    tools = tools_dir()
    if not list(tools.glob("libggml-cpu-*.so")):
        raise SystemExit(f"{tools}: not a portable (GGML_BACKEND_DL) runtime; rebuild with `make runtime`")
    runnable = runnable_variants()
    variants = a.variants.split(",") if a.variants else [expected_variant()] + (
        ["haswell"] if "haswell" in runnable and expected_variant() != "haswell" else [])
    for v in variants:
        if v not in runnable:
            raise SystemExit(f"variant {v} cannot run on this CPU (runnable: {', '.join(runnable)})")
    ns = [int(x) for x in a.n.split(",")]
    results = {v: {n: [] for n in ns} for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {v: variant_dir(tools, v, Path(tmp)) for v in variants}
        for _ in range(a.repeat):
            for v in variants:
                for n in ns:
                    results[v][n].append(time_types(dirs[v], n, types))
    header = (f"CPU: {machine()}\n"
              f"command: `.venv/bin/python scripts/bench_kernels.py"
              f"{' --variants ' + a.variants if a.variants else ''}{' --types ' + a.types if a.types != ','.join(TYPES) else ''}"
              f" --n {a.n} --repeat {a.repeat}`\n")
    text = header + "\n" + table(results, ns, types)
    print(text)
    if a.write_results:
        from results_md import replace_section
        replace_section("bench_kernels", "## Kernels by CPU variant: 4096 x 14336 MUL_MAT (test-backend-ops)\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
