"""scripts/device_check.py, the GPU check, before any GPU is lent: its dry run builds the bundle and runs
every step on the CPU backend with this checkout's runtime tools (both sides CPU, so every comparison must
come out exact), and its judgement flags what a broken GPU kernel would produce."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import device_check as dc  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device-check")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "device_check.py"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=1800)
    return r, out


def test_dry_run_passes_end_to_end(dry_run):
    r, out = dry_run
    md = (out / "device_check.md").read_text()
    assert r.returncode == 0, md + r.stderr[-3000:]
    for section in ("## Files", "## test-backend-ops -b CPU", "## Perplexity", "## llama-bench",
                    "## test-backend-ops perf"):
        assert section in md, section
    rows = re.findall(r"^\| (MUL_MAT|MUL_MAT_ID|GET_ROWS|MCMOE_ODP) \| ([^|]*) \| (\d+) \| (\d+) \|", md, re.M)
    assert len(rows) == len(dc.BACKEND_OPS), rows
    assert all(int(ok) > 0 and int(fail) == 0 for _, _, ok, fail in rows), rows
    # the same tool on the same CPU: identical perplexity and no divergence, for every file
    ppl = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d.]+) \| [-+\d.]+ \| (-?[\d.]+) \| ([\d.]+) \|", md, re.M)
    assert len(ppl) == 8, ppl           # F16, MCQ1-3, Q2_K, IQ2_XXS, PMQ with ODP off and on
    for name, a, b, kld, same in ppl:
        assert a == b and abs(float(kld)) < 1e-4 and float(same) == 100.0, name
    # ODP on: counters reported by both runs (MCMOE_ODP_REPORT), equal, and something was pruned
    m = re.search(r"\| PMQ 2.5, ODP on \|.*\| (\d+)/(\d+) vs (\d+)/(\d+) \|", md)
    assert m and m[1] == m[3] and m[2] == m[4] and int(m[1]) > 0, md
    manifest = json.loads((REPO / ".device-bundle" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"llama.cpp.tar.gz", "tiny-f16.gguf", "tiny-pmq.gguf", "imatrix.gguf", "eval.txt"}
    assert sum(f["bytes"] for f in manifest["files"].values()) < dc.MAX_BUNDLE_MIB * 2**20


def _ppl_out(ppl: float, odp: tuple[int, int] | None = None) -> str:
    """What the judge reads of a plain llama-perplexity run (format strings of tools/perplexity/perplexity.cpp):
    the running PPL per chunk, and our MCMOE_ODP_REPORT line."""
    s = f"[1]{ppl * 0.5:.4f},[2]{ppl:.4f},\n"
    if odp:
        s += f"mcmoe-odp: total: {odp[0]} of {odp[1]} slots pruned (1.00%), 500 tokens, 10 protected\n"
    return s


def _kld_out(ppl_q: float, ln_ratio: float, kld: float, same: float, odp: tuple[int, int] | None = None) -> str:
    """... of a --kl-divergence run: the per-chunk table (the last row holds the totals)."""
    s = "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p\n"
    for i, f in ((1, 2.0), (2, 1.0)):
        s += (f"{i:4d}    {ppl_q * f:9.4f} ± {1.5:9.4f}    {ln_ratio * f:10.5f} ± {0.0001:10.5f}"
              f"    {kld * f:10.5f} ± {0.00001:10.5f}    {0.5:6.3f} ± {0.01:6.3f} %    {min(100.0, same * f):6.3f} ± {0.1:6.3f} %\n")
    if odp:
        s += f"mcmoe-odp: total: {odp[0]} of {odp[1]} slots pruned (1.00%), 500 tokens, 10 protected\n"
    return s


def test_judge_accepts_rounding_and_flags_a_broken_kernel():
    cpu = _ppl_out(70.0, (250, 1000))
    row, problems = dc.judge_ppl("PMQ", cpu, _kld_out(70.05, 0.0007, 0.0004, 99.1, (252, 1000)), True, 2)
    assert problems == [] and "250/1000 vs 252/1000" in row
    # what a wrong kernel gives: logits off by the model's scale
    _, problems = dc.judge_ppl("PMQ", cpu, _kld_out(400.0, 1.74, 2.5, 31.0, (250, 1000)), True, 2)
    assert any("ln PPL ratio" in p for p in problems) and any("KLD" in p for p in problems)
    assert any("top-1" in p for p in problems)
    # pruning that differs beyond rounding of near-threshold weights, or a different number of slots
    _, problems = dc.judge_ppl("PMQ", cpu, _kld_out(70.0, 0.0, 0.0, 100.0, (400, 1000)), True, 2)
    assert any("ODP pruned" in p for p in problems)
    _, problems = dc.judge_ppl("PMQ", cpu, _kld_out(70.0, 0.0, 0.0, 100.0, (250, 998)), True, 2)
    assert any("ODP pruned" in p for p in problems)
    # ODP on but no counters; ODP off but something pruned
    _, problems = dc.judge_ppl("PMQ", _ppl_out(70.0), _kld_out(70.0, 0.0, 0.0, 100.0), True, 2)
    assert any("no ODP counters" in p for p in problems)
    _, problems = dc.judge_ppl("PMQ", _ppl_out(70.0, (0, 1000)), _kld_out(70.0, 0.0, 0.0, 100.0, (3, 1000)), False, 2)
    assert problems == ["slots pruned with ODP off"]
    # NaN logits on the other side are a failure, not a parse error; missing lines are a parse error
    _, problems = dc.judge_ppl("PMQ", cpu, _kld_out(70.0, 0.0, 0.0, 100.0).replace("70.0000", "nan"), False, 2)
    assert any("ln PPL ratio" in p for p in problems)
    with pytest.raises(RuntimeError, match="no perplexity of chunk 2"):
        dc.judge_ppl("PMQ", "garbage", _kld_out(70.0, 0.0, 0.0, 100.0), False, 2)
    with pytest.raises(RuntimeError, match="no --kl-divergence line for chunk 3"):
        dc.judge_ppl("PMQ", _ppl_out(70.0).replace("[2]", "[3]"), _kld_out(70.0, 0.0, 0.0, 100.0), False, 3)


def test_changed_bundle_is_refused_before_any_build(dry_run, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / ".device-bundle", bundle)
    with open(bundle / "tiny-pmq.gguf", "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0x40]))
    out = tmp_path / "out"
    # -S: no site-packages, the standard library alone, as on the GPU machine's bare Python
    r = subprocess.run([sys.executable, "-S", str(REPO / "scripts" / "device_check.py"), "--bundle", str(bundle),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "bundle file tiny-pmq.gguf missing or changed" in (out / "device_check.md").read_text()


def test_missing_bundle_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-S", str(REPO / "scripts" / "device_check.py"),
                        "--bundle", str(tmp_path / "none"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no bundle at" in r.stderr and "--prepare" in r.stderr
