#!/usr/bin/env python3
"""Prompt (pp) and decode (tg) tokens/s of our files vs llama.cpp's types, in one process, same machine.

    .venv/bin/python scripts/bench_speed.py [--model tiny|mixtral-shaped|both] [--threads 1,2] [--pp 256]
        [--tg 64] [--repeat 3] [--write-results]

--model tiny (section "bench_speed" of docs/RESULTS.md). Files: the tiny model's F16 and stock files built by scripts/bench_quality.py (run it first; this script
reuses its cache), and our PMQ files from the same run. Every file is timed through llama-cpp-python on the
patched runtime: pp = one batch of --pp tokens, tg = --tg single-token evaluations after it; best of
--repeat. Also prints effective weight bandwidth during decode (file bytes x tg tokens/s: every weight is
read once per token on this tiny model, where all experts of a layer are hit by a 64-token decode only
partly, so it is an upper bound).

--model mixtral-shaped (section "bench_speed_mixtral"). A 2-layer model at Mixtral's real sizes (4096/14336,
8 experts top-2, GQA 32/8), random weights, built and cached by scripts/mixtral_shaped.py (first run: ~1 h
on 2 cores, ~17 GB of disk; then reused): stock Q3_K_S, Q2_K, Q2_0, IQ2_XXS, a uniform MCQ2 from
llama-quantize, and PMQ files at 2.5 and 2.0 expert bpw from our pipeline. Same timing method. The table
header carries this machine's memory read bandwidth (a C loop summing 1 GiB, 1 and 2 threads, compiled
here), and "decode GB/s" is the weight bytes one decoded token actually reads times tg tok/s: every
non-expert tensor (attention, router, norms, output) once, the embedding one row, and top_k / n_expert of
the expert bytes (2 of 8 experts per layer; with mixed widths the average over experts, i.e. uniform
routing, which the random router roughly gives).

--model pareto (--write-results: section "bench_speed_pareto_latest", beside the hand-written
"bench_speed_pareto" whose readings it would otherwise lose). pp/tg of every file of the bench model's quality curves
(stock types and PMQ files that scripts/bench_quality.py --preset bench left in its cache; --sources picks
some by name) at Mixtral's sizes: each file is mirrored onto a 4-layer Mixtral-shaped model with every
tensor in the type the bench file gives it (mixtral_shaped.mirror: synthetic data, real types and layout,
~20 s a file), timed, and deleted. Same timing method and bandwidth columns as mixtral-shaped.

--model both (default) runs tiny, then mixtral-shaped.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcmoe_gguf.base.cache import cache_dir  # noqa: E402
from mcmoe_gguf.engine.cpu_variant import cpu_model  # noqa: E402
from mcmoe_gguf.apps.inspect import _EXPERT, gguf_sizes, read_gguf  # noqa: E402
from mcmoe_gguf.model.tiny import tiny_model  # noqa: E402
from results_md import replace_section  # noqa: E402

FILES = ["tiny-f16", "tiny-q3_k_s", "tiny-q2_k", "tiny-iq2_xs", "tiny-iq2_xxs", "tiny-q2_0", "tiny-pmq-3.0",
         "tiny-pmq-2.5", "tiny-pmq-2.0"]


def time_file(path: Path, threads: int, n_pp: int, n_tg: int, repeat: int) -> tuple[float, float]:
    """mcmoe_gguf.engine.speed.time_file with ODP off: this benchmark compares the quantized files themselves
    (our files carry ODP thresholds and would prune by default; scripts/bench_odp.py measures that)."""
    from mcmoe_gguf.engine.speed import time_file as timed
    return timed(path, threads, n_pp, n_tg, repeat, odp=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "mixtral-shaped", "pareto", "both"), default="both")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--pp", type=int, default=256)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--no-build", action="store_true",
                    help="mixtral-shaped: time only the files already built (skip the missing ones)")
    ap.add_argument("--sources", default="",
                    help="pareto: comma-separated bench-model file names without tiny- and .gguf (e.g. "
                         "q2_k,pmq-2.25-program-full-model-kl); default every one in the cache but F16")
    ap.add_argument("--keep-mirrors", action="store_true", help="pareto: keep the mirrored files (GBs each)")
    ap.add_argument("--experts-as", default="",
                    help="pareto: also time each source with every expert tensor in these types instead (comma-"
                         "separated ggml or mcmoe type names, e.g. mcn2,q2_k): uniform expert files with the "
                         "source's other types")
    a = ap.parse_args()
    rc = 0
    if a.model in ("tiny", "both"):
        rc = bench_tiny(a)
    if a.model in ("mixtral-shaped", "both"):
        rc = bench_mixtral(a) or rc
    if a.model == "pareto":
        rc = bench_pareto(a)
    return rc


def bench_tiny(a) -> int:
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
                        f"--repeat {a.repeat} --write-results` on {platform.machine()}, {os.cpu_count()} cores ({cpu_model()}).\n\n{table}")
    return 0


# ------------------------------------------------------------------------------ Mixtral-shaped model
MEMBW_C = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef struct { const uint64_t *p; size_t n; uint64_t s; } job_t;
static void *sum(void *a) {              /* 4 independent accumulators: gcc -O3 vectorizes to 256-bit loads */
    job_t *j = a; uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= j->n; i += 4) { s0 += j->p[i]; s1 += j->p[i+1]; s2 += j->p[i+2]; s3 += j->p[i+3]; }
    j->s = s0 + s1 + s2 + s3; return NULL;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
int main(int argc, char **argv) {         /* membw MiB THREADS REPEAT -> best read GB/s */
    size_t n = (size_t)atol(argv[1]) * (1 << 20) / 8; int nt = atoi(argv[2]), rep = atoi(argv[3]);
    uint64_t *p = aligned_alloc(64, n * 8), chk = 0; pthread_t th[64]; job_t jb[64]; double best = 1e30;
    for (size_t i = 0; i < n; i++) p[i] = i;
    for (int r = 0; r < rep; r++) {
        double t0 = now();
        for (int k = 0; k < nt; k++) { jb[k].p = p + n / nt * k; jb[k].n = n / nt; pthread_create(&th[k], NULL, sum, &jb[k]); }
        for (int k = 0; k < nt; k++) { pthread_join(th[k], NULL); chk += jb[k].s; }
        double t = now() - t0; if (t < best) best = t;
    }
    printf("%.3f %d\n", n * 8 / best / 1e9, (int)(chk & 1));
    return 0;
}
"""


def memory_bandwidth(threads: int, mib: int = 1024, repeat: int = 7) -> float:
    """Read bandwidth (GB/s, 1e9) of this machine: best of `repeat` sums over a 1 GiB array (>> L3)."""
    import hashlib
    import subprocess
    d = cache_dir("bench", "membw")
    exe = d / f"membw-{hashlib.sha256(MEMBW_C.encode()).hexdigest()[:12]}"
    if not exe.exists():
        src = d / (exe.name + ".c")
        src.write_text(MEMBW_C)
        subprocess.run(["cc", "-O3", "-march=native", "-pthread", str(src), "-o", str(exe) + ".tmp"], check=True)
        Path(str(exe) + ".tmp").rename(exe)
    out = subprocess.run([str(exe), str(mib), str(threads), str(repeat)], check=True, capture_output=True, text=True)
    return float(out.stdout.split()[0])


def decode_read_bytes(path: Path) -> dict:
    """Weight bytes one decoded token reads: non-expert tensors once (token_embd: one row), plus
    top_k / n_expert of the expert tensors (uniform routing)."""
    import re
    rd = read_gguf(path)
    kv = {f.name: f.contents() for f in rd.fields.values()}
    arch = kv["general.architecture"]
    n_exp, top_k = int(kv[f"{arch}.expert_count"]), int(kv[f"{arch}.expert_used_count"])
    exp = other = emb_row = 0
    for t in rd.tensors:
        if re.fullmatch(_EXPERT, t.name):
            exp += int(t.n_bytes)
        elif t.name == "token_embd.weight":
            emb_row = int(t.n_bytes) // int(t.shape[-1])        # GGUFReader shape is ggml order: [n_embd, n_vocab]
        else:
            other += int(t.n_bytes)
    return {"expert": exp, "other": other, "per_token": other + emb_row + exp * top_k / n_exp,
            "top_k": top_k, "n_expert": n_exp}


def speed_row(label: str, path: Path, threads: int, pp: float, tg: float, bandwidth: float) -> tuple:
    """One timed file's table row: (label, threads, bytes, expert bpw, pp, tg, bytes read per decoded token,
    decode GB/s, % of the machine's read bandwidth)."""
    z, rb = gguf_sizes(path), decode_read_bytes(path)
    gbs = rb["per_token"] * tg / 1e9
    return (label, threads, z["bytes"], z["expert_bpw"], pp, tg, rb["per_token"], gbs, 100 * gbs / bandwidth)


MIXTRAL_FILES = [("q3_k_s", "llama.cpp Q3_K_S"), ("q2_k", "llama.cpp Q2_K"), ("iq2_xxs", "llama.cpp IQ2_XXS"),
                 ("q2_0", "llama.cpp Q2_0"), ("mcq2", "llama-quantize MCQ2 (uniform)"),
                 ("pmq-2.5", "mcmoe PMQ 2.5"), ("pmq-2.0", "mcmoe PMQ 2.0")]
# Q2_0 has no SIMD kernel here (~1 tok/s at this size): timed on 1/8 of the tokens, once (marked in the table)
MIXTRAL_SLOW = {"q2_0": 8}


def bench_mixtral(a) -> int:
    import datetime
    from mixtral_shaped import Recipe, build_all, model_dir
    r = Recipe()
    if a.no_build:
        built = {key: model_dir(r) / f"{key}.gguf" for key, _ in MIXTRAL_FILES}
        built = {k: f for k, f in built.items() if f.exists()}
        print("not built (skipped):", [k for k, _ in MIXTRAL_FILES if k not in built], flush=True)
    else:
        built = build_all(r)
    files = [(label, built[key], MIXTRAL_SLOW.get(key, 1)) for key, label in MIXTRAL_FILES if key in built]
    threads = list(map(int, a.threads.split(",")))
    bw = {t: memory_bandwidth(t) for t in threads}
    print("memory read bandwidth GB/s:", bw, flush=True)
    rows = []
    for t in threads:
        for label, f, slow in files:
            pp, tg = time_file(f, t, a.pp // slow, a.tg // slow, a.repeat if slow == 1 else 1)
            label += f" (pp {a.pp // slow}, tg {a.tg // slow}, once)" if slow > 1 else ""
            rows.append(speed_row(label, f, t, pp, tg, bw[t]))
            print(rows[-1], flush=True)
    bw_after = {t: memory_bandwidth(t) for t in threads}
    print("memory read bandwidth GB/s after the timings:", bw_after, flush=True)
    q2k = {t: tg for (n, t, _, _, _, tg, *_) in rows if n == "llama.cpp Q2_K"}
    bw_txt = ", ".join(f"{t} thread{'s' if t > 1 else ''} {bw[t]:.1f} GB/s (after the run: {bw_after[t]:.1f})"
                       for t in threads)
    lines = [f"Measured memory read bandwidth (1 GiB sum, best of 7): {bw_txt}.", "",
             "| file | threads | bytes | expert bpw | pp tok/s | tg tok/s | tg / Q2_K | MB read / token | "
             "decode GB/s | % of bandwidth |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, t, b, ebpw, pp, tg, per_tok, gbs, pct in rows:
        ratio = f"{tg / q2k[t]:.2f}" if t in q2k else ""
        lines.append(f"| {n} | {t} | {b:,} | {ebpw:.3f} | {pp:.1f} | {tg:.1f} | {ratio} | {per_tok / 1e6:.1f} | "
                     f"{gbs:.2f} | {pct:.0f}% |")
    table = "\n".join(lines)
    print(table)
    if a.write_results:
        cpu = cpu_model()
        replace_section("bench_speed_mixtral", (
            f"## Speed: Mixtral-shaped model (2 layers at 4096/14336, 8 experts top-2, random weights)\n\n"
            f"`.venv/bin/python scripts/bench_speed.py --model mixtral-shaped --threads {a.threads} --pp {a.pp} "
            f"--tg {a.tg} --repeat {a.repeat} {'--no-build ' if a.no_build else ''}--write-results` on "
            f"{platform.machine()} ({cpu}), "
            f"{datetime.date.today().isoformat()}; all files in one process, side by side.\n\n{table}"))
    return 0


# ------------------------------------------------------------------------------ the Pareto files, Mixtral-sized
def pareto_sources(a) -> list[Path]:
    """The bench model's quality files to mirror: --sources, or every one but F16, by file bytes."""
    d = cache_dir("bench", tiny_model("bench").name, "quality")
    if a.sources:
        files = [d / f"tiny-{n}.gguf" for n in a.sources.split(",")]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise SystemExit(f"not in {d}: {', '.join(missing)} (run scripts/bench_quality.py --preset bench)")
    else:
        files = [f for f in d.glob("tiny-*.gguf") if f.name != "tiny-f16.gguf"]
        if not files:
            raise SystemExit(f"no files in {d}: run scripts/bench_quality.py --preset bench first")
    return sorted(files, key=lambda f: f.stat().st_size)


def expert_retype(name: str):
    """mirror's retype: every expert tensor (per-expert or merged) in type `name`, the rest as they are."""
    import re
    import gguf
    from mcmoe_gguf.gguf.types import register
    register()
    tid = int(gguf.gguf_reader.GGMLQuantizationType[name.upper()])
    return lambda n, t: tid if re.fullmatch(_EXPERT, n) else t


def bench_pareto(a) -> int:
    import datetime
    import json
    from mixtral_shaped import Recipe, config, mirror
    from mcmoe_gguf.model.arch.mixtral import MixtralHParams
    sources = pareto_sources(a)
    bench_dir = tiny_model("bench")
    hp = MixtralHParams.from_config(config(Recipe(n_layers=4), json.loads((bench_dir / "config.json").read_text())))
    out_dir = cache_dir("bench", "mixtral-shaped", "mirrors")
    threads = list(map(int, a.threads.split(",")))
    bw = {t: memory_bandwidth(t) for t in threads}
    print("memory read bandwidth GB/s:", bw, flush=True)
    rows = []
    variants = [("", None)] + [(f"+experts-{t.lower()}", expert_retype(t)) for t in a.experts_as.split(",") if t]
    for src, (suffix, retype) in [(s, v) for s in sources for v in variants]:
        name = src.stem.removeprefix("tiny-") + suffix
        m = out_dir / f"{name}.gguf"
        if not m.exists():
            print(f"mirroring {src.name} at Mixtral's sizes{' ' + suffix if suffix else ''}", flush=True)
            mirror(src, m, hp, retype=retype)
        try:
            for t in threads:
                pp, tg = time_file(m, t, a.pp, a.tg, a.repeat)
                rows.append(speed_row(name, m, t, pp, tg, bw[t]))
                print(rows[-1], flush=True)
        finally:
            if not a.keep_mirrors:
                m.unlink()
    ref = {t: (pp, tg) for (n, t, _, _, pp, tg, *_) in rows if n == "q2_k"}
    lines = ["Measured memory read bandwidth (1 GiB sum, best of 7): "
             + ", ".join(f"{t} thread{'s' if t > 1 else ''} {bw[t]:.1f} GB/s" for t in threads) + ".", "",
             "| bench-model file | threads | bytes (Mixtral-shaped) | expert bpw | pp tok/s | tg tok/s | pp / Q2_K | "
             "tg / Q2_K | MB read / token | % of bandwidth |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in threads:
        for n, tt, b, ebpw, pp, tg, per_tok, gbs, pct in rows:
            if tt != t:
                continue
            rp, rt = (f"{pp / ref[t][0]:.2f}", f"{tg / ref[t][1]:.2f}") if t in ref else ("", "")
            lines.append(f"| {n} | {t} | {b:,} | {ebpw:.3f} | {pp:.1f} | {tg:.1f} | {rp} | {rt} | "
                         f"{per_tok / 1e6:.1f} | {pct:.0f}% |")
    table = "\n".join(lines)
    print(table)
    if a.write_results:
        from results_md import machine
        src_arg = f"--sources {a.sources} " if a.sources else ""
        replace_section("bench_speed_pareto_latest", (
            "## Issue 13: pp/tg of the bench model's Pareto files at Mixtral's sizes\n\n"
            f"`.venv/bin/python scripts/bench_speed.py --model pareto {src_arg}--threads {a.threads} --pp {a.pp} "
            f"--tg {a.tg} --repeat {a.repeat} --write-results` on {machine()}, "
            f"{datetime.date.today().isoformat()}. Each file of the bench model's quality curves is mirrored onto "
            f"a 4-layer Mixtral-shaped model (4096/14336, 8 experts top-2, GQA 32/8, the bench model's vocabulary of "
            f"{hp.vocab_size}) with every tensor in the type the bench file gives it (synthetic data: the kernels' time "
            f"does not depend on the values), then timed through llama-cpp-python with ODP off, one file after "
            f"another in one process. \"MB read / token\": non-expert tensors once, the expert bytes x 2/8.\n\n"
            f"{table}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
