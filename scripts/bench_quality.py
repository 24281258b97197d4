#!/usr/bin/env python3
"""Our PMQ files against llama.cpp's own low-bit types on the tiny model: bytes vs held-out perplexity.

    .venv/bin/python scripts/bench_quality.py [--budgets 2.0,2.5,3.0] [--max-chunks 200] [--write-results]

All files come from the same F16 GGUF (stock types via llama-quantize with an importance matrix computed
by llama-imatrix on the calibration split; ours via PMQ on the same split) and are scored through the
patched llama.cpp on the same held-out chunks. Prints one table (real bytes, file and expert bpw, PPL,
ratio to F16), writes a Pareto plot docs/quality_pareto.png and, with --write-results, the table into
docs/RESULTS.md. Files are cached under ~/.cache/mcmoe-gguf/bench.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcmoe_gguf.apps.baselines import STOCK_TYPES, imatrix, stock_quantize  # noqa: E402
from mcmoe_gguf.base.cache import cache_dir  # noqa: E402
from results_md import machine, replace_section  # noqa: E402
from mcmoe_gguf.apps.evaluate import ppl_llama  # noqa: E402
from mcmoe_gguf.gguf.export import convert, export_pmq  # noqa: E402
from mcmoe_gguf.quant.pmq import PMQConfig, quantize  # noqa: E402
from mcmoe_gguf.apps.inspect import gguf_sizes  # noqa: E402
from mcmoe_gguf.model.tiny import tiny_model  # noqa: E402

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="1.625,2.0,2.5,3.0", help="PMQ real expert bpw budgets")
    ap.add_argument("--max-chunks", type=int, default=200, help="held-out chunks of 256 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args()
    model = tiny_model()
    d = cache_dir("bench", model.name, "quality")
    f16 = d / "tiny-f16.gguf"
    if not f16.exists():
        convert(model, f16, "f16", progress=False)
    im = imatrix(f16, model / "calib.txt", d / "imatrix.gguf", chunks=128, threads=a.threads)
    files = [("F16", f16)]
    files += [(f"llama.cpp {t} + imatrix", stock_quantize(f16, t, d / f"tiny-{t.lower()}.gguf", im, a.threads))
              for t in STOCK_TYPES]
    for b in a.budgets.split(","):
        work = d / f"pmq-{b}"
        quantize(model, work, PMQConfig(budget=b, n_seq=64, seq_len=256), progress=False)
        files.append((f"mcmoe PMQ {b}", export_pmq(work, d / f"tiny-pmq-{b}.gguf", force=True, progress=False)))
    text = (model / "eval.txt").read_text(encoding="utf-8")
    rows = []
    for name, path in files:
        r = ppl_llama(path, text, ctx=256, max_chunks=a.max_chunks, n_threads=a.threads, progress=False, odp=False)
        rows.append({"name": name, **gguf_sizes(path), "ppl": r["ppl"]})
        print(rows[-1], flush=True)
    base = rows[0]["ppl"]
    lines = ["| file | bytes | file bpw | expert bpw | held-out PPL | x F16 |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["bytes"]):
        lines.append(f"| {r['name']} | {r['bytes']:,} | {r['bpw']:.3f} | {r['expert_bpw']:.3f} | {r['ppl']:.3f} | "
                     f"{r['ppl'] / base:.3f} |")
    table = "\n".join(lines)
    print(table)
    plot(rows, REPO / "docs" / "quality_pareto.png")
    if a.write_results:
        write_results(table, a)
    return 0


def plot(rows, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ours = sorted((r for r in rows if r["name"].startswith("mcmoe")), key=lambda r: r["bytes"])
    stock = [r for r in rows if r["name"].startswith("llama.cpp")]
    ax.plot([r["bytes"] / 2**20 for r in ours], [r["ppl"] for r in ours], "o-", lw=2, label="mcmoe PMQ")
    for r in stock:
        ax.plot(r["bytes"] / 2**20, r["ppl"], "s", color="gray")
        ax.annotate(r["name"].split()[1], (r["bytes"] / 2**20, r["ppl"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(rows[0]["ppl"], color="gray", ls="--", label="F16")
    ax.set_xlabel("file size (MiB, real bytes)")
    ax.set_ylabel("held-out perplexity (llama.cpp)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("tiny Mixtral: PMQ vs llama.cpp low-bit types (same F16, same imatrix text)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_results(table: str, a) -> None:
    block = (f"## Quality: PMQ files vs llama.cpp's low-bit types (tiny model, llama.cpp PPL)\n\n"
             f"`.venv/bin/python scripts/bench_quality.py --budgets {a.budgets} --max-chunks {a.max_chunks} "
             f"--write-results` on {machine()}.\n\n{table}\n\n![Pareto](quality_pareto.png)")
    replace_section("bench_quality", block)


if __name__ == "__main__":
    sys.exit(main())
