#!/usr/bin/env python3
"""PMQ against the alternatives on the embedded tiny model, at equal real bytes (torch fake-quant PPL).

    .venv/bin/python scripts/bench_pmq.py [--budgets 2.5,2.0,1.625] [--max-chunks 200] [--write-results]

For every budget (real expert bpw, scales counted): PMQ per-layer and whole-model, random allocation (the
widths PMQ picks for that layer, shuffled among its experts: same budget), frequency-only, weight-only, eps-only, and PMQ with RTN instead
of GPTQ; plus uniform GPTQ at 1, 2 and 3 bits and the unquantized model. Work directories are cached
under ~/.cache/mcmoe-gguf/bench (keyed by the tiny model and the settings), so a rerun only evaluates.
Prints one table, writes docs/pmq_bench.png and, with --write-results, the table into docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcmoe_gguf.base.cache import cache_dir  # noqa: E402
from results_md import machine, replace_section  # noqa: E402
from mcmoe_gguf.apps.evaluate import ppl_fake_quant  # noqa: E402
from mcmoe_gguf.quant.pmq import PMQConfig, WorkdirMismatch, quantize  # noqa: E402
from mcmoe_gguf.model.tiny import eval_ppl, tiny_model  # noqa: E402

def variants(budget: str):
    yield "PMQ per-layer", dict(budget=budget)
    yield "PMQ whole-model", dict(budget=budget, scope="model")
    yield "random (PMQ widths shuffled)", dict(budget=budget, strategy="random:0")
    yield "frequency-only", dict(budget=budget, strategy="frequency")
    yield "weight-only", dict(budget=budget, strategy="weight")
    yield "eps-only (F-norm)", dict(budget=budget, strategy="eps")
    yield "PMQ per-layer, RTN", dict(budget=budget, method="rtn")


def run(model: Path, name: str, kw: dict, calib: dict, max_chunks: int) -> dict:
    cfg = PMQConfig(**calib, **kw)
    key = "-".join(f"{k}={v}" for k, v in sorted(kw.items())).replace(":", "_").replace("/", "_") or "default"
    out = cache_dir("bench", model.name, f"pmq-n{calib['n_seq']}x{calib['seq_len']}", key)
    t0 = time.time()
    try:
        r = quantize(model, out, cfg, progress=False)
    except WorkdirMismatch:        # the bench owns its cache: settings changed since, start over
        shutil.rmtree(out)
        r = quantize(model, out, cfg, progress=False)
    t1 = time.time()
    p = ppl_fake_quant(out, ctx=256, max_chunks=max_chunks)
    return {"name": name, "expert_bpw": r["expert_bpw"], "total_bpw": r["total_bpw"], "bytes": r["total_bytes"],
            "ppl": p["ppl"], "quant_s": t1 - t0, "outdir": str(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2.5,2.0,1.625", help="real expert bpw budgets (1.625 is the minimum "
                    "with >=1 expert at 3 and >=1 at 2 bits per layer of 8)")
    ap.add_argument("--n-seq", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-chunks", type=int, default=200, help="held-out chunks of 256 tokens (default 200)")
    ap.add_argument("--write-results", action="store_true", help="replace the PMQ table in docs/RESULTS.md")
    a = ap.parse_args()
    import torch
    from tokenizers import Tokenizer

    model = tiny_model()
    calib = {"n_seq": a.n_seq, "seq_len": a.seq_len}
    rows = []
    # the unquantized reference, same protocol
    from transformers import MixtralForCausalLM
    ref = MixtralForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids = Tokenizer.from_file(str(model / "tokenizer.json")).encode((model / "eval.txt").read_text()).ids
    n = min(len(ids) // 256, a.max_chunks) * 256
    f32 = eval_ppl(lambda x: (ref(x).logits,), torch.tensor(ids[:n]), 256)
    rows.append({"name": "unquantized (fp32)", "expert_bpw": 32.0, "total_bpw": 32.0, "bytes": None, "ppl": f32,
                 "quant_s": 0.0})
    print(f"unquantized PPL {f32:.3f}", flush=True)
    for bits in (3, 2, 1):
        rows.append(run(model, f"uniform GPTQ {bits}-bit", {"strategy": f"uniform:{bits}"}, calib, a.max_chunks))
        print(rows[-1], flush=True)
    for budget in a.budgets.split(","):
        for name, kw in variants(budget):
            rows.append(run(model, name, kw, calib, a.max_chunks))
            rows[-1]["budget"] = budget
            print(rows[-1], flush=True)

    lines = ["| allocation | budget | expert bpw (real) | file bpw (real) | held-out PPL | x unquantized |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r.get('budget', '')} | {r['expert_bpw']:.3f} | {r['total_bpw']:.3f} | "
                     f"{r['ppl']:.3f} | {r['ppl'] / f32:.3f} |")
    table = "\n".join(lines)
    print(table)
    plot(rows, REPO / "docs" / "pmq_bench.png")
    if a.write_results:
        write_results(table, a)
    (cache_dir("bench") / "pmq_rows.json").write_text(json.dumps(rows, indent=1))
    return 0


def plot(rows, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for r in rows:
        if r["expert_bpw"] < 30:
            groups.setdefault(r["name"], []).append((r["expert_bpw"], r["ppl"]))
    for name, pts in groups.items():
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=name, lw=2.5 if name == "PMQ per-layer" else 1)
    ax.axhline(rows[0]["ppl"], color="gray", ls="--", label="unquantized")
    ax.set_xlabel("real expert bits per weight (scales counted)")
    ax.set_ylabel("held-out perplexity (torch fake-quant)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("tiny Mixtral: bit allocation strategies at equal bytes")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_results(table: str, a) -> None:
    block = (f"## PMQ allocation vs alternatives (tiny model, torch fake-quant)\n\n"
             f"`.venv/bin/python scripts/bench_pmq.py --budgets {a.budgets} --n-seq {a.n_seq} --seq-len {a.seq_len} "
             f"--max-chunks {a.max_chunks} --write-results` on {machine()}; calibration: {a.n_seq} x {a.seq_len} tokens of the "
             f"calibration split; PPL: {a.max_chunks} chunks of 256 tokens of the held-out split.\n\n"
             f"{table}\n\n![PMQ bench](pmq_bench.png)")
    replace_section("bench_pmq", block)


if __name__ == "__main__":
    sys.exit(main())
