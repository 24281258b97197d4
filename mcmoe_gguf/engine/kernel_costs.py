"""Mat-vec cost of each expert type on this machine, measured by llama.cpp's test-backend-ops (perf mode).

The allocator's decode-speed floor (`--min-speed q2_K`, allocate.allocate_ladder(speed=...)) needs, per
type, what one expert projection costs a decoded token. test-backend-ops times MUL_MAT only at the shapes
its perf table has; the expert one is Mixtral's down projection, 4096 x 14336 (m=4096, k=14336), with n=1
activation column (a mat-vec). A mat-vec streams every weight once, so its time scales with the weights:
the cost model is (us at 4096 x 14336) * weights / (4096 * 14336) for any projection. Measured on the CPU
backend ggml loads here (the same variant the runtime runs), median of `rounds` interleaved rounds, and
cached per (tool binary, CPU backend, CPU model, type) under the cache directory, so a second run is free.
"""
from __future__ import annotations

import hashlib
import json
import re
import statistics
from pathlib import Path

from mcmoe_gguf.base.cache import cache_dir

PERF_M, PERF_K = 4096, 14336        # test-backend-ops' expert-sized MUL_MAT perf case
PERF_WEIGHTS = PERF_M * PERF_K


class KernelCostError(RuntimeError):
    """test-backend-ops could not time a type (unknown to this build, or the tool failed)."""


def ggml_name(t: str) -> str:
    """test-backend-ops' spelling of a type (ggml's: q2_K, iq2_xxs, mcq1) from ours (q2_k, any case)."""
    t = t.lower()
    return t[:-1] + "K" if t.endswith("_k") else t


def time_type(tools: Path, t: str, n: int = 1, env: dict | None = None) -> float:
    """us per MUL_MAT call of type t at 4096 x 14336 with n columns (test-backend-ops perf, CPU backend),
    with the tools in `tools` (a directory holding test-backend-ops and its libraries)."""
    import os
    import subprocess
    exe = Path(tools) / "test-backend-ops"
    if not exe.exists():
        raise KernelCostError(f"{exe} not found (build it with the runtime: make dev-runtime or make runtime)")
    base = env or os.environ
    g = ggml_name(t)
    # the trellis types: our perf cases filled with random codes (cpp/tests/mcmoe-test-cases.h), since the stock
    # ones would quantize their weight with the reference Viterbi first (minutes)
    pre = "init=codes," if g.startswith("mct") else ""
    r = subprocess.run([str(exe), "perf", "-o", "MUL_MAT", "-b", "CPU", "-p",
                        f"{pre}type_a={g},type_b=f32,m={PERF_M},n={n},k={PERF_K}"], capture_output=True, text=True,
                       env=dict(base, LD_LIBRARY_PATH=str(tools)), timeout=900)
    m = re.search(r"MUL_MAT\(" + re.escape(pre) + r"type_a=" + re.escape(g) + r",.*?\s([\d.]+) us/run", r.stdout)
    if r.returncode != 0 or not m:
        raise KernelCostError(f"test-backend-ops has no timing for type {t!r} at {PERF_M} x {PERF_K}, n={n} "
                              f"(not a type of this build, or the tool failed):\n{(r.stdout + r.stderr)[-1500:]}")
    return float(m.group(1))


def _key(tools: Path) -> str:
    """The tool binary, the CPU backend it loads here and the CPU model: a change in any re-measures."""
    from mcmoe_gguf.engine.cpu_variant import cpu_model, expected_variant
    h = hashlib.sha256()
    variant = expected_variant()
    for f in (Path(tools) / "test-backend-ops", Path(tools) / f"libggml-cpu-{variant}.so"):
        if f.exists():
            h.update(f.read_bytes())
    h.update(cpu_model().encode())
    return f"{variant}-{h.hexdigest()[:16]}"


def matvec_us(types, rounds: int = 3, tools: Path | None = None, progress: bool = True) -> dict[str, float]:
    """{type: us per 4096 x 14336 mat-vec} on this machine (cached; the median of `rounds` rounds); types
    in our spelling (q2_k) or ggml's (q2_K), keys as given."""
    from tqdm import tqdm
    from mcmoe_gguf.engine.runtime import tools_dir
    tools = Path(tools or tools_dir())
    path = cache_dir("kernel-costs") / f"{_key(tools)}.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    types = list(types)
    todo = [t for t in dict.fromkeys(map(ggml_name, types)) if t not in known]
    if todo:
        runs = {t: [] for t in todo}
        with tqdm(total=rounds * len(todo), desc="mat-vec costs (test-backend-ops)", unit="run",
                  disable=not progress) as bar:
            for _ in range(rounds):             # interleaved: a slow stretch of a shared machine hits every type
                for t in todo:
                    runs[t].append(time_type(tools, t))
                    bar.update()
        known.update({t: statistics.median(v) for t, v in runs.items()})
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    return {t: known[ggml_name(t)] for t in types}


def projection_us(us_per_perf_case: float, weights: int) -> float:
    """The cost model: a mat-vec of `weights` weights in a type whose 4096 x 14336 mat-vec takes us."""
    return us_per_perf_case * weights / PERF_WEIGHTS
