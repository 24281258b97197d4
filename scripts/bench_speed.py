#!/usr/bin/env python3
"""Prompt (pp) and decode (tg) tokens/s of our files vs llama.cpp's types, in one process, same machine.

    .venv/bin/python scripts/bench_speed.py [--threads 1,2] [--pp 256] [--tg 64] [--repeat 3] [--write-results]

Files: the tiny model's F16 and stock files built by scripts/bench_quality.py (run it first; this script
reuses its cache), and our PMQ files from the same run. Every file is timed through llama-cpp-python on the
patched runtime: pp = one batch of --pp tokens, tg = --tg single-token evaluations after it; best of
--repeat. Also prints effective weight bandwidth during decode (file bytes x tg tokens/s: every weight is
read once per token on this tiny model, where all experts of a layer are hit by a 64-token decode only
partly, so it is an upper bound).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcmoe_gguf.cache import cache_dir  # noqa: E402
from mcmoe_gguf.report import gguf_sizes  # noqa: E402
from mcmoe_gguf.runtime import load  # noqa: E402
from mcmoe_gguf.tiny import tiny_model  # noqa: E402
from results_md import replace_section  # noqa: E402

FILES = ["tiny-f16", "tiny-q3_k_s", "tiny-q2_k", "tiny-iq2_xs", "tiny-iq2_xxs", "tiny-q2_0", "tiny-pmq-3.0",
         "tiny-pmq-2.5", "tiny-pmq-2.0"]


def time_file(path: Path, threads: int, n_pp: int, n_tg: int, repeat: int) -> tuple[float, float]:
    llm = load(path, n_ctx=n_pp + n_tg + 8, n_batch=n_pp, n_ubatch=n_pp, n_threads=threads,
               n_threads_batch=threads)
    prompt = list(range(10, 10 + n_pp))
    best_pp = best_tg = float("inf")
    for _ in range(repeat):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for i in range(n_tg):
            llm.eval([20 + i])
        t2 = time.perf_counter()
        best_pp, best_tg = min(best_pp, t1 - t0), min(best_tg, t2 - t1)
    del llm
    return n_pp / best_pp, n_tg / best_tg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--pp", type=int, default=256)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args()
    d = cache_dir("bench", tiny_model().name, "quality")
    files = [d / f"{n}.gguf" for n in FILES if (d / f"{n}.gguf").exists()]
    if not files:
        print(f"no files in {d}: run scripts/bench_quality.py first", file=sys.stderr)
        return 1
    rows = []
    for t in map(int, a.threads.split(",")):
        for f in files:
            pp, tg = time_file(f, t, a.pp, a.tg, a.repeat)
            z = gguf_sizes(f)
            rows.append((f.stem, t, z["bytes"], z["expert_bpw"], pp, tg, z["bytes"] * tg / 1e9))
            print(rows[-1], flush=True)
    q2k = {t: tg for (n, t, _, _, _, tg, _) in rows if n == "tiny-q2_k"}
    lines = ["| file | threads | bytes | expert bpw | pp tok/s | tg tok/s | tg / Q2_K | decode GB/s (upper bound) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, t, b, ebpw, pp, tg, gbs in rows:
        ratio = f"{tg / q2k[t]:.2f}" if t in q2k else ""
        lines.append(f"| {n} | {t} | {b:,} | {ebpw:.3f} | {pp:.0f} | {tg:.0f} | {ratio} | {gbs:.2f} |")
    table = "\n".join(lines)
    print(table)
    if a.write_results:
        replace_section("bench_speed", f"## Speed: tiny model through llama-cpp-python\n\n"
                        f"`.venv/bin/python scripts/bench_speed.py --threads {a.threads} --pp {a.pp} --tg {a.tg} "
                        f"--repeat {a.repeat} --write-results` on {platform.machine()}, 2 cores (AVX2).\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
