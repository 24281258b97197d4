"""`mcmoe-gguf selfcheck --gpu`: the same GGUF files on the CPU and on CUDA, compared.

Files (made once, cached beside the demo's): the tiny model in F16, uniform MCQ1 / MCQ2 / MCQ3 (RTN via
llama-quantize; attention etc. as llama-quantize's mcq mix) and the demo's mixed PMQ file (1/2/3 bits per
expert, attention mcq4). For each file: logits of a fixed prompt with n_gpu_layers=0 (CPU) and -1 (all
layers on CUDA), prompt processing (pp) and generation (tg) speed, and the VRAM in use.
The mixed file runs twice, with online dynamic pruning on (`odp=True`, its calibrated thresholds) and off
(`odp=False`): besides the logits, the engine's ODP counters (mcmoe_gguf.odp_stats after odp_reset) of
the prompt are compared, CPU vs CUDA: the same slots, tokens and protected tokens per layer, skipped
fractions within ODP_SKIP_TOL, per-token decisions (flags of every layer) agreeing on >= ODP_FLAGS_MIN of
the tokens (routing weights near a threshold may fall either side: the two paths round differently), and
no slot pruned with ODP off. On CUDA the counters come from the ODP kernel's stream-ordered host callbacks.

Without a GPU (or with a runtime built without CUDA) it says so plainly, runs the CPU part alone and
returns 0: the CPU numbers are still a useful smoke test. With a GPU it returns 1 if a file's CUDA logits
disagree with the CPU's beyond the tolerance of the two paths (different activation quantization and
summation order: CPU q8_K/q8_1 dots, CUDA q8_1 MMVQ or f16 cuBLAS), or if the ODP counters disagree.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

PROMPT_TOKENS = 96        # prefill length for the logits and the pp speed
GEN_TOKENS = 32           # tg speed: greedy decode of this many tokens
REL_TOL = 0.05            # max |logit diff| / std(CPU logits), per position, worst position
TOP1_MIN = 0.9            # fraction of positions with the same argmax
ODP_SKIP_TOL = 0.02       # |skipped fraction CPU - CUDA| of the prompt, absolute, per layer
ODP_FLAGS_MIN = 0.95      # fraction of (layer, token) ODP decisions (flags) that agree


def gpu_status() -> tuple[bool, str]:
    """(usable, description): a CUDA device is visible and the loaded runtime can offload to it."""
    import llama_cpp
    offload = bool(llama_cpp.llama_supports_gpu_offload())
    smi = shutil.which("nvidia-smi")
    devices = ""
    if smi:
        r = subprocess.run([smi, "-L"], capture_output=True, text=True)
        devices = r.stdout.strip() if r.returncode == 0 else ""
    if not devices:
        return False, "no NVIDIA GPU found (nvidia-smi absent or lists no device)"
    if not offload:
        return False, f"GPU present ({devices.splitlines()[0]}) but the runtime was built without CUDA " \
                      "(rebuild: make runtime CUDA=1)"
    return True, devices.splitlines()[0]


def vram_used_mib() -> float | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    r = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True)
    try:
        return float(r.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def demo_files(log=print) -> tuple[Path, Path, Path]:
    """(tiny model dir, its F16 GGUF, its mixed PMQ 2.5 GGUF): `make demo`'s files in its cache folder, made
    here with the demo's configuration when missing. Shared by this check and scripts/device_check.py."""
    from mcmoe_gguf.base.cache import cache_dir
    from mcmoe_gguf.gguf.export import convert, export_pmq
    from mcmoe_gguf.apps.demo import DEMO_FILE, DEMO_WORK, demo_pmq_config
    from mcmoe_gguf.quant.pmq import quantize
    from mcmoe_gguf.model.tiny import tiny_model

    model = tiny_model("default", log=log)
    demo = cache_dir("demo", model.name)
    f16 = demo / "tiny-f16.gguf"
    if not f16.exists():
        convert(model, f16, outtype="f16", force=True, progress=False)
    mixed = demo / DEMO_FILE
    if not mixed.exists():
        work = demo / DEMO_WORK                    # the demo's configuration: resumes a finished run instantly
        quantize(model, work, demo_pmq_config(), progress=False)
        export_pmq(work, mixed, force=True, progress=False)
    return model, f16, mixed


def make_files(log=print) -> dict[str, Path]:
    from mcmoe_gguf.apps.baselines import stock_quantize
    from mcmoe_gguf.base.cache import cache_dir

    model, f16, mixed = demo_files(log)
    out = cache_dir("selfcheck", model.name)
    files = {"f16": f16}
    for bits in (1, 2, 3):
        files[f"mcq{bits}"] = stock_quantize(f16, f"MCQ{bits}", out / f"tiny-mcq{bits}.gguf", None)
    files["mixed"] = mixed
    return files


def prompt_tokens(llm) -> list[int]:
    from mcmoe_gguf.model.tiny import tiny_model
    text = (Path(tiny_model("default", log=lambda *_: None)) / "eval.txt").read_text(encoding="utf-8")
    return llm.tokenize(text[:4000].encode(), add_bos=False)[:PROMPT_TOKENS]


def run_one(path: Path, n_gpu_layers: int, threads: int | None, **load_kw) -> dict:
    """One file on one device. load_kw: mcmoe_gguf.load's ODP arguments (odp=...), default otherwise.
    Returns the prompt's logits, pp / tg speed, VRAM, and the ODP counters: per layer of the prompt
    (`odp_pp`: LayerStats, `flags_pp`: {layer: per-token flags}) and the summary of the decode (`odp_tg`)."""
    from mcmoe_gguf.engine.odp import last_flags, odp_reset, odp_stats, summary
    from mcmoe_gguf.engine.runtime import load
    before = vram_used_mib() if n_gpu_layers else None
    llm = load(path, n_ctx=256, n_batch=PROMPT_TOKENS, n_ubatch=PROMPT_TOKENS, logits_all=True, seed=0,
               n_gpu_layers=n_gpu_layers, n_threads=threads, **load_kw)
    toks = prompt_tokens(llm)
    llm.eval(toks[:8])                               # warm-up (CUDA: kernels loaded, graphs built)
    llm.reset()
    odp_reset()
    t0 = time.perf_counter()
    llm.eval(toks)                                   # one micro-batch (n_ubatch = the prompt)
    t_pp = time.perf_counter() - t0
    logits = np.array(llm.scores[: len(toks)], dtype=np.float64)
    odp_pp = odp_stats(llm)
    flags_pp = {s.layer: last_flags(s.layer) for s in odp_pp}
    odp_reset()
    t0 = time.perf_counter()
    for _ in range(GEN_TOKENS):                       # greedy decode, one token per llama_decode
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    t_tg = time.perf_counter() - t0
    odp_tg = summary(odp_stats(llm))
    vram = vram_used_mib() if n_gpu_layers else None
    del llm
    return {"logits": logits, "pp": len(toks) / t_pp, "tg": GEN_TOKENS / t_tg,
            "vram": None if vram is None or before is None else vram - before,
            "odp_pp": odp_pp, "flags_pp": flags_pp, "odp_tg": odp_tg}


def pp_skipped(run: dict) -> float:
    """Skipped fraction of the prompt's routed slots, all layers."""
    slots = sum(s.slots for s in run["odp_pp"])
    return sum(s.pruned for s in run["odp_pp"]) / slots if slots else 0.0


def check_odp_cpu(run: dict, odp_on: bool) -> list[str]:
    """Sanity of one run's counters alone: ODP on prunes something, ODP off nothing (problems, or [])."""
    pruned = sum(s.pruned for s in run["odp_pp"])
    if odp_on and pruned == 0:
        return ["ODP on but no slot of the prompt was pruned"]
    if not odp_on and (pruned or run["odp_tg"]["pruned"]):
        return [f"ODP off but {pruned + run['odp_tg']['pruned']} slot(s) pruned"]
    return []


def compare_odp(cpu: dict, gpu: dict) -> tuple[list[str], float]:
    """CUDA's ODP counters of the prompt vs the CPU's: (problems, fraction of agreeing decisions)."""
    problems = []
    c = {s.layer: s for s in cpu["odp_pp"]}
    g = {s.layer: s for s in gpu["odp_pp"]}
    if set(c) != set(g):
        problems.append(f"ODP layers differ: CPU {sorted(c)} vs CUDA {sorted(g)}")
    agree = total = 0
    for layer in sorted(set(c) & set(g)):
        a, b = c[layer], g[layer]
        if (a.slots, a.tokens, a.protected) != (b.slots, b.tokens, b.protected):
            problems.append(f"layer {layer}: slots/tokens/protected CPU {a.slots}/{a.tokens}/{a.protected} "
                            f"vs CUDA {b.slots}/{b.tokens}/{b.protected}")
        if abs(a.skipped_fraction - b.skipped_fraction) > ODP_SKIP_TOL:
            problems.append(f"layer {layer}: skipped CPU {a.skipped_fraction:.3f} vs CUDA {b.skipped_fraction:.3f}")
        fa, fb = cpu["flags_pp"][layer], gpu["flags_pp"][layer]
        if len(fa) != len(fb):
            problems.append(f"layer {layer}: {len(fa)} CPU flags vs {len(fb)} CUDA flags")
        agree += sum(x == y for x, y in zip(fa, fb))
        total += max(len(fa), len(fb))
    frac = agree / total if total else 1.0
    if frac < ODP_FLAGS_MIN:
        problems.append(f"ODP decisions agree on {frac:.3f} of (layer, token) < {ODP_FLAGS_MIN}")
    return problems, frac


def compare(cpu: np.ndarray, gpu: np.ndarray) -> tuple[float, float]:
    scale = cpu.std(axis=1, keepdims=True) + 1e-12
    rel = float((np.abs(gpu - cpu) / scale).max())
    top1 = float((cpu.argmax(1) == gpu.argmax(1)).mean())
    return rel, top1


def run_selfcheck(gpu: bool = True, threads: int | None = None, log=print) -> int:
    from mcmoe_gguf.engine.runtime import check_runtime
    info = check_runtime()
    log(f"runtime: {info['lib']}")
    usable, desc = gpu_status() if gpu else (False, "GPU part not requested")
    if gpu and not usable:
        log(f"selfcheck: {desc}. CPU-only mode: running the CPU part; nothing is compared.")
    elif usable:
        log(f"selfcheck: GPU {desc}")
    files = make_files(log=lambda *_: None)
    # (label, file, load kwargs, ODP expected on): the mixed PMQ file has calibrated thresholds
    runs = [(name, path, {}, None) for name, path in files.items() if name != "mixed"]
    runs += [("mixed+odp", files["mixed"], {"odp": True}, True), ("mixed-odp", files["mixed"], {"odp": False}, False)]
    failed, warnings = [], []
    log(f"{'file':<10}{'device':>7}{'pp tok/s':>10}{'tg tok/s':>10}{'VRAM MiB':>10}{'max rel diff':>14}"
        f"{'top-1 agree':>13}{'pp skip':>9}{'tg skip':>9}{'ODP agree':>11}")
    for name, path, kw, odp_on in runs:
        cpu = run_one(path, 0, threads, **kw)
        odp_cols = "" if odp_on is None else f"{pp_skipped(cpu):>9.3f}{cpu['odp_tg']['skipped_fraction']:>9.3f}"
        log(f"{name:<10}{'CPU':>7}{cpu['pp']:>10.1f}{cpu['tg']:>10.1f}{'':>10}{'':>14}{'':>13}" + odp_cols)
        if odp_on is not None:
            for p in check_odp_cpu(cpu, odp_on):
                warnings.append(f"{name} CPU: {p}")
        if not usable:
            continue
        cuda = run_one(path, -1, threads, **kw)
        rel, top1 = compare(cpu["logits"], cuda["logits"])
        ok = rel <= REL_TOL and top1 >= TOP1_MIN
        problems = []
        if odp_on is not None:
            problems, agree = compare_odp(cpu, cuda)
            problems += check_odp_cpu(cuda, odp_on)
            odp_cols = (f"{pp_skipped(cuda):>9.3f}{cuda['odp_tg']['skipped_fraction']:>9.3f}{agree:>11.3f}")
        vram = "n/a" if cuda["vram"] is None else f"{cuda['vram']:.0f}"
        log(f"{name:<10}{'CUDA':>7}{cuda['pp']:>10.1f}{cuda['tg']:>10.1f}{vram:>10}{rel:>14.4f}{top1:>13.3f}"
            + odp_cols + ("" if ok and not problems else "   MISMATCH"))
        for p in problems:
            log(f"    {name}: {p}")
        if not ok or problems:
            failed.append(name)
    for w in warnings:
        log(f"selfcheck: WARNING {w}")
    if not usable:
        log("selfcheck: CPU part done (no GPU comparison on this machine)")
        return 0
    if failed or warnings:
        log(f"selfcheck: CUDA and CPU disagree on {', '.join(failed) or '-'} (tolerance {REL_TOL} x logit std, "
            f"top-1 >= {TOP1_MIN}; ODP: skipped within {ODP_SKIP_TOL}, decisions >= {ODP_FLAGS_MIN})")
        return 1
    log("selfcheck: CUDA matches the CPU on every file, ODP on and off")
    return 0
