#!/usr/bin/env python3
"""The GPU check: our CUDA kernels against the CPU, in one short lease of a bare GPU machine.

    scripts/device_check.sh --prepare           here: build the bundle to carry (.device-bundle/, ~45 MiB)
    scripts/device_check.sh                     there: build, check, summary in $OUT/device_check.md
    scripts/device_check.sh --dry-run           here: --prepare, then the whole check on the CPU backend with
                                                this checkout's runtime tools (no build), summary in --out
    scripts/device_check.sh --dry-run --build   the same, but first build the bundled sources (CPU only,
                                                as the GPU machine builds them minus CUDA: slow on 2 cores)

The GPU machines we borrow are bare (CUDA's compiler, CMake, ninja, a Python 3.12 without our packages,
no network, at most 64 MiB carried, 15 minutes in all), so everything travels in the bundle:
    llama.cpp.tar.gz   the pinned llama.cpp with cpp/ and patches/ applied, pruned to what the build needs
    tiny-f16.gguf      the tiny Mixtral-architecture model, F16
    tiny-pmq.gguf      its mixed PMQ file (2.5 expert bpw, ODP thresholds calibrated)
    imatrix.gguf       llama-imatrix of the F16 file on the calibration text (stock IQ2_XXS needs one)
    eval.txt           held-out text
    manifest.json      sha256 of each, the source hash of the checkout it was made from
There, the script (stdlib only) builds test-backend-ops, llama-perplexity, llama-bench and llama-quantize
with GGML_CUDA for the GPU's own architecture, flash-attention kernels off, all cores; quantizes uniform
MCQ1/2/3 and stock Q2_K / IQ2_XXS files from the F16 one; then:
  1. test-backend-ops test -b CUDA0 for the mcq, mcn and mct types in MUL_MAT, MUL_MAT_ID and GET_ROWS, MUL_MAT_ID with
     skipped ids and the ODP op (cpp/tests/mcmoe-test-cases.h), each against the CPU backend;
  2. perplexity of every file on the CPU (-dev none) and on the GPU over the same chunks, the GPU run
     scored against the CPU run's logits (llama-perplexity --kl-divergence): PPL ratio, mean KL divergence,
     top-1 agreement; the PMQ file with ODP off and on, with the pruning counters of both runs
     (MCMOE_ODP_REPORT=1, printed by cpp/ggml/mcmoe-odp.c at exit) compared;
  3. llama-bench pp/tg of our files beside Q2_K / IQ2_XXS, and test-backend-ops perf of a Mixtral expert
     matmul (4096 x 14336, n = 1 and 256) per type.
Every step appends to $OUT/device_check.md as it finishes (a run cut off by its time limit still leaves
what it did), the full output goes to $OUT/device_check.log, and the exit status is 1 on any mismatch.
Steps past --deadline seconds are skipped, and said so. The dry run does the same with the CPU backend on
both sides: it checks the script, the bundle and the parsing end to end before a GPU is ever lent.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# mcmoe_gguf.base.cache (and the package's __init__) import only the standard library, so this works on the GPU
# machine's bare Python too
from mcmoe_gguf.base.cache import sha256_file as _sha256  # noqa: E402

BUNDLE = REPO / ".device-bundle"
TOOLS = ["test-backend-ops", "llama-perplexity", "llama-bench", "llama-quantize"]
BUNDLE_VERSION = 1
MAX_BUNDLE_MIB = 56          # the lease carries 64 MiB with the working tree (~1 MiB)

# what of the llama.cpp tree the build needs (CMake configures every listed subdirectory; the rest:
# other backends, models' vocab files, docs, examples, the web UI, Python packages)
KEEP_TOP = {"CMakeLists.txt", "CMakePresets.json", "LICENSE", "cmake", "common", "ggml", "include", "licenses",
            "mcmoe", "mcmoe-gen", "scripts", "src", "tests", "tools", "vendor", "build-xcframework.sh"}
DROP_GGML_SRC = {"ggml-cann", "ggml-et", "ggml-hexagon", "ggml-metal", "ggml-musa", "ggml-opencl", "ggml-openvino",
                 "ggml-sycl", "ggml-virtgpu", "ggml-vulkan", "ggml-webgpu", "ggml-zdnn", "ggml-zendnn", "ggml-hip",
                 "ggml-kompute", "ggml-blas", "ggml-rpc"}

# tolerances, CPU vs GPU on the same tokens: the GPU quantizes activations per 32 (q8_1) where the CPU does
# per 256 (Q8_K) and sums in another order, which moves logits by rounding; a wrong kernel moves them by
# the model's whole scale (PPL ratio far from 1, top-1 agreement near chance).
MAX_ABS_LN_PPL_RATIO = 0.02
MAX_MEAN_KLD = 0.02
MIN_SAME_TOP = 90.0          # percent
ODP_MAX_PRUNED_DIFF = 0.01   # |pruned_gpu - pruned_cpu| / slots: near-threshold routing weights may round apart


# ---------------------------------------------------------------- here: the bundle

def _source_tree(dest: Path) -> Path:
    """The pinned llama.cpp with cpp/ and patches/ applied (scripts/llama_tree.py)."""
    sys.path.insert(0, str(REPO / "scripts"))
    import llama_tree
    return llama_tree.patched_tree(dest) / llama_tree.VENDOR


def _keep(rel: Path) -> bool:
    parts = rel.parts
    if not parts or parts[0] not in KEEP_TOP:
        return False
    if len(parts) >= 3 and parts[0] == "ggml" and parts[1] == "src" and parts[2] in DROP_GGML_SRC:
        return False
    if parts[0] == "tools" and len(parts) >= 2 and parts[1] in ("server", "ui") and len(parts) > 2 \
            and parts[2] not in ("CMakeLists.txt",):
        return False
    return ".git" not in parts


def _model_files(work: Path) -> dict[str, Path]:
    """tiny F16, PMQ 2.5 (the demo's, mcmoe_gguf.apps.selfcheck.demo_files) and imatrix files, and held-out text."""
    from mcmoe_gguf.apps.baselines import imatrix
    from mcmoe_gguf.apps.selfcheck import demo_files
    model, f16, pmq = demo_files()
    im = f16.parent / "imatrix.gguf"
    if not im.exists():
        imatrix(f16, model / "calib.txt", im, chunks=64)
    eval_txt = work / "eval.txt"
    # 16 KiB of held-out text: ~5k tokens of the byte-level BPE, more than the 8 chunks of 128 scored
    eval_txt.write_text((model / "eval.txt").read_text(encoding="utf-8")[:16384], encoding="utf-8")
    return {"tiny-f16.gguf": f16, "tiny-pmq.gguf": pmq, "imatrix.gguf": im, "eval.txt": eval_txt}


def prepare(bundle: Path = BUNDLE) -> Path:
    sys.path.insert(0, str(REPO))
    from mcmoe_gguf.base.sources import source_hash
    src_hash = source_hash(REPO)
    manifest_path = bundle / "manifest.json"
    with tempfile.TemporaryDirectory() as tmp:
        files = _model_files(Path(tmp))
        want = {name: _sha256(p) for name, p in files.items()}
        if manifest_path.exists():
            m = json.loads(manifest_path.read_text())
            have = m.get("files", {})
            if (m.get("version") == BUNDLE_VERSION and m.get("source_hash") == src_hash
                    and all(have.get(n, {}).get("sha256") == h for n, h in want.items())
                    and all((bundle / n).exists() and _sha256(bundle / n) == have[n]["sha256"] for n in have)):
                print(f"bundle up to date: {bundle} ({_bundle_mib(bundle):.1f} MiB)")
                return bundle
        tmp_bundle = Path(tmp) / "bundle"
        tmp_bundle.mkdir()
        print("bundle: pinned llama.cpp + cpp/ + patches/ ...", flush=True)
        vendor = _source_tree(Path(tmp) / "src")
        with tarfile.open(tmp_bundle / "llama.cpp.tar.gz", "w:gz", compresslevel=9) as tar:
            for p in sorted(vendor.rglob("*")):
                rel = p.relative_to(vendor)
                if p.is_file() and not p.is_symlink() and _keep(rel):
                    tar.add(p, arcname=f"llama.cpp/{rel}", recursive=False)
        for name, p in files.items():
            shutil.copyfile(p, tmp_bundle / name)
        names = ["llama.cpp.tar.gz"] + list(files)
        manifest = {"version": BUNDLE_VERSION, "source_hash": src_hash,
                    "files": {n: {"sha256": _sha256(tmp_bundle / n), "bytes": (tmp_bundle / n).stat().st_size}
                              for n in names}}
        (tmp_bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
        mib = _bundle_mib(tmp_bundle)
        if mib > MAX_BUNDLE_MIB:
            raise SystemExit(f"bundle is {mib:.1f} MiB, over the {MAX_BUNDLE_MIB} MiB that fit a lease with the tree")
        if bundle.exists():
            shutil.rmtree(bundle)
        shutil.move(str(tmp_bundle), bundle)   # whole or not at all
    print(f"bundle ready: {bundle} ({_bundle_mib(bundle):.1f} MiB)")
    return bundle


def _bundle_mib(b: Path) -> float:
    return sum(p.stat().st_size for p in b.iterdir() if p.is_file()) / 2**20


# ---------------------------------------------------------------- there: build, check, report

class Report:
    """device_check.md, rewritten after every step; device_check.log gets every command's output."""

    def __init__(self, out: Path, title: str):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.md = out / "device_check.md"
        self.log = open(out / "device_check.log", "a", encoding="utf-8")
        self.sections: list[str] = [f"# {title}\n"]
        self.failures: list[str] = []
        self.t0 = time.time()

    def add(self, text: str) -> None:
        self.sections.append(text)
        self.md.write_text("\n".join(self.sections) + "\n" + self._verdict())
        print(text, flush=True)

    def fail(self, what: str) -> None:
        self.failures.append(what)
        print(f"MISMATCH: {what}", flush=True)

    def _verdict(self) -> str:
        if self.failures:
            return "\n**FAILED**: " + "; ".join(self.failures) + "\n"
        return f"\n**so far no mismatch** ({time.time() - self.t0:.0f} s)\n"

    def run(self, args: list[str], env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> str:
        self.log.write(f"\n$ {' '.join(map(str, args))}\n")
        self.log.flush()
        try:
            r = subprocess.run([str(a) for a in args], capture_output=True, text=True, errors="replace",
                               env=dict(os.environ, **(env or {})), timeout=timeout, cwd=cwd)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or "") if isinstance(e.stdout, str) else ""
            self.log.write(out + f"\n[timed out after {timeout:.0f} s]\n")
            raise RuntimeError(f"{Path(str(args[0])).name} timed out after {timeout:.0f} s") from None
        self.log.write(r.stdout + r.stderr + f"\n[exit {r.returncode}]\n")
        self.log.flush()
        if r.returncode != 0:
            raise RuntimeError(f"{Path(str(args[0])).name} exited with {r.returncode}: {(r.stdout + r.stderr)[-1500:]}")
        return r.stdout + r.stderr

    def finish(self) -> int:
        self.add(f"\nTotal: {time.time() - self.t0:.0f} s.")
        return 1 if self.failures else 0


def _cuda_arch() -> str:
    r = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap,name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, check=True)
    cap = r.stdout.splitlines()[0].split(",")[0].strip()
    return cap.replace(".", "")


def build(rep: Report, bundle: Path, work: Path, cuda: bool, jobs: int) -> Path:
    """Configure and build the bundled sources in work/ (inside the checkout, ignored: the device tool keeps
    ignored outputs between calls on a warm machine, so a rerun continues the same ninja build)."""
    src = work / "src"
    stamp = work / "src.sha256"
    tar_sha = json.loads((bundle / "manifest.json").read_text())["files"]["llama.cpp.tar.gz"]["sha256"]
    if not (stamp.exists() and stamp.read_text() == tar_sha and (src / "llama.cpp").exists()):
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(work / ("build-cuda" if cuda else "build-cpu"), ignore_errors=True)
        src.mkdir(parents=True)
        with tarfile.open(bundle / "llama.cpp.tar.gz") as tar:
            tar.extractall(src, filter="data")
        stamp.write_text(tar_sha)
    tree = src / "llama.cpp"
    bdir = work / ("build-cuda" if cuda else "build-cpu")
    args = ["cmake", "-S", tree, "-B", bdir, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_BUILD_TESTS=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAVA_BUILD=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DGGML_NATIVE=ON", "-DGGML_BACKEND_DL=OFF"]
    arch = ""
    if cuda:
        arch = _cuda_arch()
        # flash attention off: its kernels are most of ggml-cuda's compile time, and nothing of ours uses it
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DGGML_CUDA_FA=OFF"]
    t0 = time.time()
    rep.run(args, timeout=300)
    t1 = time.time()
    rep.run(["cmake", "--build", bdir, "-j", str(jobs), "--target"] + TOOLS, timeout=900)
    t2 = time.time()
    rep.add(f"## Build\n\nfrom the bundle, {'CUDA sm_' + arch if cuda else 'CPU only'}, {jobs} jobs: configure "
            f"{t1 - t0:.0f} s, build {t2 - t1:.0f} s ({', '.join(TOOLS)}).\n")
    return bdir / "bin"


def quantize_files(rep: Report, tools: Path, bundle: Path, work: Path) -> dict[str, Path]:
    """Uniform MCQ1/2/3 (llama-quantize's RTN of our types) and stock Q2_K / IQ2_XXS from the F16 file."""
    f16 = bundle / "tiny-f16.gguf"
    files = {"F16": f16, "PMQ 2.5 (mixed)": bundle / "tiny-pmq.gguf"}
    for t in ("MCQ1", "MCQ2", "MCQ3", "Q2_K", "IQ2_XXS"):
        out = work / f"tiny-{t.lower()}.gguf"
        extra = ["--imatrix", bundle / "imatrix.gguf"] if t in ("Q2_K", "IQ2_XXS") else []
        rep.run([tools / "llama-quantize"] + extra + [f16, out, t, "4"], timeout=300)
        files[t] = out
    rep.add("## Files\n\n| file | MiB |\n|---|---:|\n" +
            "\n".join(f"| {n} | {p.stat().st_size / 2**20:.2f} |" for n, p in files.items()) + "\n")
    return files


# our three families by the type-name substring of test-backend-ops -p: mcq, mcn (table), mct (trellis)
BACKEND_OPS = [("MUL_MAT", "mcq"), ("MUL_MAT_ID", "mcq"), ("MUL_MAT_ID", "skip=1"), ("GET_ROWS", "mcq"),
               ("MUL_MAT", "mcn"), ("MUL_MAT_ID", "mcn"), ("GET_ROWS", "mcn"),
               ("MUL_MAT", "mct"), ("MUL_MAT_ID", "mct"), ("GET_ROWS", "mct"),
               ("MCMOE_ODP", None)]


def backend_ops(rep: Report, tools: Path, backend: str) -> None:
    rows = []
    for op, pat in BACKEND_OPS:
        args = [tools / "test-backend-ops", "test", "-b", backend, "-o", op] + (["-p", pat] if pat else [])
        try:
            out = rep.run(args, timeout=900)
            ok_exit = True
        except RuntimeError as e:
            out, ok_exit = str(e), False
        lines = [ln for ln in out.splitlines() if re.search(r"^\s+" + re.escape(op) + r"\(", ln)]
        n_ok = sum("OK" in ln for ln in lines)
        fails = [ln.strip() for ln in lines if "FAIL" in ln]
        n_unsup = sum("not supported" in ln for ln in lines)
        rows.append(f"| {op} | {pat or ''} | {n_ok} | {len(fails)} | {n_unsup} |")
        if fails or not ok_exit or n_ok == 0:
            rep.fail(f"test-backend-ops {op} {pat or ''}: {len(fails)} failed, {n_ok} passed"
                     + (f" (first: {fails[0][:200]})" if fails else "") + ("" if ok_exit else " (tool failed)"))
    rep.add(f"## test-backend-ops -b {backend} vs CPU\n\n| op | filter | OK | FAIL | not supported |\n"
            "|---|---|---:|---:|---:|\n" + "\n".join(rows) + "\n")


# one flag, comma-separated: llama.cpp keeps only the last of repeated --override-kv flags
ODP_ON = ["--override-kv", "mcmoe.odp.enabled=bool:true,mcmoe.odp.if_calibrated=bool:true"]
ODP_OFF = ["--override-kv", "mcmoe.odp.enabled=bool:false"]


# Numbers are read from the per-chunk lines (the last chunk's are the running totals over all chunks). The
# tools' log thread can lose the last lines of a run: llama.cpp leaks its logger on purpose and does not
# flush it at exit (common/log.cpp, upstream #22142); seen here in about 1 run of 8 on a loaded machine.
# A run whose lines are cut short is rerun (_until_parsed).
_F = r"(-?(?:[\d.]+|nan|inf))"


def _chunk_ppl(text: str, chunks: int) -> float:
    """PPL over all chunks from the plain run's "[i]ppl," sequence."""
    vals = [v for i, v in re.findall(r"\[(\d+)\]" + _F, text) if int(i) == chunks]
    if not vals:
        raise RuntimeError(f"no perplexity of chunk {chunks} in llama-perplexity output")
    return float(vals[-1])


def _chunk_kld(text: str, chunks: int) -> tuple[float, float, float, float]:
    """(PPL(Q), ln(PPL(Q)/PPL(base)), mean KLD, same top-1 %) over all chunks, from the --kl-divergence table."""
    pm = r"\s*±\s*-?(?:[\d.]+|nan|inf)"   # an uncertainty (-nan where all chunks agree exactly)
    row = re.compile(rf"^\s*{chunks}\s+{_F}{pm}\s+{_F}{pm}\s+{_F}{pm}\s+{_F}{pm}\s*%\s+{_F}{pm}\s*%", re.M)
    m = row.findall(text)
    if not m:
        raise RuntimeError(f"no --kl-divergence line for chunk {chunks} in llama-perplexity output")
    ppl, ln_ratio, kld, _dp, same = (float(x) for x in m[-1])
    return ppl, ln_ratio, kld, same


def _odp_total(text: str) -> tuple[int, int] | None:
    m = re.search(r"mcmoe-odp: total: (\d+) of (\d+) slots pruned", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def judge_ppl(name: str, cpu: str, other: str, odp_on: bool, chunks: int) -> tuple[str, list[str]]:
    """One file's CPU run and its other-side run (scored against the CPU's logits) -> a table row and the
    problems found (empty when within the limits)."""
    ppl_cpu = _chunk_ppl(cpu, chunks)
    ppl_q, ln_ratio, kld, same = _chunk_kld(other, chunks)
    o_cpu, o_gpu = _odp_total(cpu), _odp_total(other)
    problems = []
    odp_cell = "-"
    if odp_on:
        if o_cpu is None or o_gpu is None:
            problems.append("no ODP counters reported (MCMOE_ODP_REPORT)")
        else:
            odp_cell = f"{o_cpu[0]}/{o_cpu[1]} vs {o_gpu[0]}/{o_gpu[1]}"
            if o_cpu[0] == 0:
                problems.append("ODP on but nothing pruned on the CPU")
            if o_cpu[1] != o_gpu[1] or abs(o_cpu[0] - o_gpu[0]) > ODP_MAX_PRUNED_DIFF * o_cpu[1]:
                problems.append(f"ODP pruned {o_cpu[0]} of {o_cpu[1]} slots on the CPU, {o_gpu[0]} of {o_gpu[1]}")
    elif (o_cpu and o_cpu[0]) or (o_gpu and o_gpu[0]):
        problems.append("slots pruned with ODP off")
    if not (math.isfinite(ppl_q) and abs(ln_ratio) <= MAX_ABS_LN_PPL_RATIO):
        problems.append(f"ln PPL ratio {ln_ratio:+.4f}")
    if not kld <= MAX_MEAN_KLD:
        problems.append(f"mean KLD {kld:.4f}")
    if not same >= MIN_SAME_TOP:
        problems.append(f"top-1 agreement {same:.1f}%")
    row = f"| {name} | {ppl_cpu:.4f} | {ppl_q:.4f} | {ln_ratio:+.5f} | {kld:.6f} | {same:.2f} | {odp_cell} |"
    return row, problems


def _until_parsed(rep: Report, args: list, env: dict, parse, tries: int = 8) -> str:
    """rep.run(args) again while parse(output) finds its line missing (see _chunk_ppl's note)."""
    for i in range(tries):
        out = rep.run(args, env=env)
        try:
            parse(out)
            return out
        except RuntimeError:
            rep.log.write(f"[output cut short at exit, try {i + 1} of {tries}]\n")
    return out


def perplexity(rep: Report, tools: Path, files: dict[str, Path], bundle: Path, work: Path, gpu: list[str],
               threads: int, chunks: int) -> None:
    """Each file on the CPU, then on the `gpu` side scored against the CPU's logits."""
    rows = []
    common = ["-f", bundle / "eval.txt", "-c", "128", "-b", "128", "--chunks", str(chunks), "-t", str(threads)]
    runs = [(n, p, []) for n, p in files.items() if n != "PMQ 2.5 (mixed)"]
    pmq = files["PMQ 2.5 (mixed)"]
    runs += [("PMQ 2.5, ODP off", pmq, ODP_OFF), ("PMQ 2.5, ODP on", pmq, ODP_ON)]
    env = {"MCMOE_ODP_REPORT": "1"}
    for name, path, odp in runs:
        base = work / (re.sub(r"[^a-z0-9]+", "-", name.lower()) + ".kld")
        cpu = _until_parsed(rep, [tools / "llama-perplexity", "-m", path, "-dev", "none", "-ngl", "0",
                                  "--kl-divergence-base", base] + common + odp, env, lambda o: _chunk_ppl(o, chunks))
        other = _until_parsed(rep, [tools / "llama-perplexity", "-m", path, "--kl-divergence-base", base,
                                    "--kl-divergence"] + gpu + common + odp, env, lambda o: _chunk_kld(o, chunks))
        row, problems = judge_ppl(name, cpu, other, odp is ODP_ON, chunks)
        rows.append(row)
        if problems:
            rep.fail(f"perplexity {name}: " + ", ".join(problems))
    rep.add(f"## Perplexity, CPU vs {' '.join(gpu) or 'CPU'} ({chunks} chunks of 128 tokens, eval.txt)\n\n"
            "| file | PPL CPU | PPL other | ln ratio | mean KLD | same top-1 % | ODP pruned (CPU vs other) |\n"
            "|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows) +
            f"\n\nLimits: |ln ratio| <= {MAX_ABS_LN_PPL_RATIO}, mean KLD <= {MAX_MEAN_KLD}, top-1 >= {MIN_SAME_TOP}%,"
            f" ODP slots equal and pruned within {ODP_MAX_PRUNED_DIFF:.0%} of slots.\n")


def bench(rep: Report, tools: Path, files: dict[str, Path], ngl: str, quick: bool) -> None:
    names = [n for n in files if n != "F16"] + ["F16"]
    args = [tools / "llama-bench", "-ngl", ngl, "-o", "md"] + (["-p", "64", "-n", "16", "-r", "1"] if quick else
                                                                ["-p", "512", "-n", "128", "-r", "3"])
    for n in names:
        args += ["-m", files[n]]
    out = rep.run(args, timeout=600)
    table = "\n".join(ln for ln in out.splitlines() if ln.startswith("|"))
    rep.add(f"## llama-bench (-ngl {ngl})\n\nmodels in order: {', '.join(names)}\n\n{table}\n")


def kernel_perf(rep: Report, tools: Path, backend: str, types: list[str], ns: list[int]) -> None:
    rows = []
    for t in types:
        cells = []
        for n in ns:
            out = rep.run([tools / "test-backend-ops", "perf", "-b", backend, "-o", "MUL_MAT", "-p",
                           f"type_a={t},type_b=f32,m=4096,n={n},k=14336,"], timeout=300)
            m = re.search(r"([\d.]+) us/run", out)
            cells.append(f"{float(m.group(1)):.1f}" if m else "n/a")
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    rep.add(f"## test-backend-ops perf -b {backend}: MUL_MAT 4096 x 14336 (us per call)\n\n| type | " +
            " | ".join(f"n={n}" for n in ns) + " |\n|---|" + "---:|" * len(ns) + "\n" + "\n".join(rows) + "\n")


def check(bundle: Path, out: Path, dry_run: bool, do_build: bool, tools_dir: Path | None, jobs: int,
          deadline: float) -> int:
    rep = Report(out, "mcmoe-gguf device check" + (" (dry run, CPU backend)" if dry_run else ""))
    m = json.loads((bundle / "manifest.json").read_text())
    for name, info in m["files"].items():
        if not (bundle / name).exists() or _sha256(bundle / name) != info["sha256"]:
            rep.fail(f"bundle file {name} missing or changed since --prepare")
            return rep.finish()
    host = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    gpu_line = "none (dry run)"
    if not dry_run:
        gpu_line = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                                   "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    rep.add(f"bundle source hash {m['source_hash'][:12]}; host {host}; CPU {cpu}, {os.cpu_count()} cores; "
            f"GPU {gpu_line}\n")
    work = REPO / "build" / "device-work"
    work.mkdir(parents=True, exist_ok=True)
    backend, gpu_args, ngl = ("CPU", [], "0") if dry_run else ("CUDA0", ["-ngl", "99"], "99")

    def late(step: str) -> bool:
        if time.time() - rep.t0 > deadline:
            rep.add(f"(skipped {step}: past the {deadline:.0f} s deadline)")
            return True
        return False

    steps = []
    try:
        tools = build(rep, bundle, work, cuda=not dry_run, jobs=jobs) if do_build else tools_dir
        # the runtime cache's tools find their shared libraries beside them (no RPATH to a build tree)
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(tools), os.environ.get("LD_LIBRARY_PATH")]))
        files = quantize_files(rep, tools, bundle, work)
        steps = [("test-backend-ops", lambda: backend_ops(rep, tools, backend)),
                 ("perplexity", lambda: perplexity(rep, tools, files, bundle, work, gpu_args,
                                                   threads=min(os.cpu_count() or 2, 16), chunks=8)),
                 ("llama-bench", lambda: bench(rep, tools, files, ngl, quick=dry_run)),
                 ("kernel perf", lambda: kernel_perf(rep, tools, backend,
                                                     ["mcq2"] if dry_run else ["mcq1", "mcq2", "mcq3", "mcq4", "mcn2", "mct1",
                                                                                "mct2", "mct3", "q2_K", "iq2_xxs", "q4_0"],
                                                     [1] if dry_run else [1, 256]))]
    except RuntimeError as e:
        rep.fail(f"setup: {e}")
    for step, fn in steps:
        if late(step):
            continue
        try:
            fn()
        except RuntimeError as e:
            rep.fail(f"{step}: {e}")
    return rep.finish()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare", action="store_true", help="only build the bundle (here)")
    ap.add_argument("--dry-run", action="store_true", help="prepare, then check on the CPU backend (here)")
    ap.add_argument("--build", action="store_true", help="with --dry-run: build the bundled sources first")
    ap.add_argument("--bundle", type=Path, default=BUNDLE, help=f"bundle folder (default {BUNDLE.name})")
    ap.add_argument("--out", type=Path, default=None, help="summary folder (default $OUT, or build/device-check)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build jobs (default: all cores)")
    ap.add_argument("--deadline", type=float, default=500, help="skip steps starting later than this (s)")
    a = ap.parse_args()
    if a.prepare or a.dry_run:
        prepare(a.bundle)
        if a.prepare:
            return 0
    elif not (a.bundle / "manifest.json").exists():
        print(f"error: no bundle at {a.bundle}: run `scripts/device_check.sh --prepare` here and carry "
              f"{a.bundle.name}", file=sys.stderr)
        return 2
    out = a.out or Path(os.environ.get("OUT") or REPO / "build" / "device-check")
    tools_dir = None
    if a.dry_run and not a.build:
        sys.path.insert(0, str(REPO))
        from mcmoe_gguf.engine.runtime import tools_dir as runtime_tools
        tools_dir = runtime_tools()
        missing = [t for t in TOOLS if not (tools_dir / t).exists()]
        if missing:
            print(f"error: {tools_dir} lacks {', '.join(missing)}: run `make runtime` (or pass --build)",
                  file=sys.stderr)
            return 2
    return check(a.bundle, out, a.dry_run, do_build=(not a.dry_run) or a.build, tools_dir=tools_dir, jobs=a.jobs,
                 deadline=a.deadline)


if __name__ == "__main__":
    sys.exit(main())
