#!/usr/bin/env python3
"""Our PMQ files against llama.cpp's own low-bit types on a tiny model: bytes vs held-out perplexity.

    .venv/bin/python scripts/bench_quality.py [--preset bench] [--budgets 2.0,2.5] [--mixes auto,q8]
                                              [--ladders mcq,full] [--max-chunks 200] [--write-results]

--preset: "default" (the demo's weakly trained model) or "bench" (trained ~10x longer: low-bit types
visibly hurt it, model/tiny.py). --mixes: the types outside the experts (quant/mixes.py), one PMQ file
per budget and mix ("auto" = llama.cpp's own choice at the nearest width; "q8" = Q8_0 ends and mcq4
attention, the files before issue 13). --ladders: the expert types (quant/ladder.py): "mcq" the paper's
1/2/3 bits per expert, "full" our mcq widths and llama.cpp's types per projection, "stock" the latter only;
one PMQ file per budget, mix and ladder. "compat" = `--compat stock` (llama.cpp's types only, one per layer
and projection, merged tensors), scored by llama.cpp built WITHOUT our patches (scripts/build_stock.py).

All files come from the same F16 GGUF (stock types via llama-quantize with an importance matrix computed
by llama-imatrix on the calibration split; ours via PMQ on the same split) and are scored by the patched
llama-perplexity against the F16 file's logits on the same held-out chunks (--kl-divergence, ODP off):
one table of real bytes, file and expert bpw, PPL, PPL ratio, mean KL divergence and top-1 agreement with
F16, each ± one standard error (apps/quality.py). Writes a Pareto plot (PPL ratio and KLD against file
bytes) into the cache folder, and with --write-results docs/quality_pareto*.png and the table into
docs/RESULTS.md. Files are cached
under ~/.cache/mcmoe-gguf/bench.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcmoe_gguf.apps.baselines import imatrix, stock_quantize  # noqa: E402
from mcmoe_gguf.base.cache import cache_dir  # noqa: E402
from results_md import machine, replace_section  # noqa: E402
from mcmoe_gguf.apps.quality import kld_base, markdown, score  # noqa: E402
from mcmoe_gguf.gguf.export import convert, export_pmq  # noqa: E402
from mcmoe_gguf.quant.allocate import InfeasibleBudget  # noqa: E402
from mcmoe_gguf.quant.pmq import PMQConfig, quantize  # noqa: E402
from mcmoe_gguf.apps.inspect import gguf_sizes  # noqa: E402
from mcmoe_gguf.model.tiny import tiny_model  # noqa: E402
from build_stock import stock_tools  # noqa: E402

# the comparison points (llama.cpp's default mixes), and the two 1-2 bit scalar types
STOCK = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "Q3_K_S", "Q4_K_M", "Q2_0", "Q1_0")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=["default", "bench"], help="which tiny model")
    ap.add_argument("--budgets", default="1.625,2.0,2.5,3.0", help="PMQ real expert bpw budgets")
    ap.add_argument("--mixes", default="auto", help="comma-separated mixes outside the experts (auto, q8, stock:<ftype>)")
    ap.add_argument("--ladders", default="mcq", help="comma-separated expert type ladders (mcq, full, stock, compat)")
    ap.add_argument("--granularity", default="projection", choices=["projection", "expert"],
                    help="a ladder's choice: per projection or per expert")
    ap.add_argument("--rerun", default="", metavar="NAME",
                    help="suffix of the PMQ work directories and series names, for new runs after a quantizer change "
                         "(the cached ones are kept under their old names)")
    ap.add_argument("--eps-holdout", type=float, default=PMQConfig.eps_holdout,
                    help="a ladder's eps measured on this share of the calibration tokens, held out from its "
                         "quantizers (0: on all of them: the cached runs from before it existed)")
    ap.add_argument("--scope", choices=["layer", "model"], default="layer",
                    help="a ladder's program: one per layer (default) or one for the whole model")
    ap.add_argument("--sensitivity", choices=["none", "kl"], default="none",
                    help="with --scope model: weigh each layer's eps by its measured output KL (quant/sensitivity.py)")
    ap.add_argument("--eps-rows", type=int, default=0, help="a ladder's eps estimated from this many sampled rows "
                    "per projection (0: measured on all rows)")
    ap.add_argument("--stock", default=",".join(STOCK), help="llama.cpp types to compare with")
    ap.add_argument("--max-chunks", type=int, default=200, help="held-out chunks of 256 tokens (llama-perplexity "
                    "scores the second half of each)")
    ap.add_argument("--kd-steps", type=int, default=0, metavar="N",
                    help="KD tuning of each PMQ file (quant/kd_tune.py), N steps; the untuned run's work directory "
                    "is reused where it exists (the tuning runs after its layers), the file named -kdN")
    ap.add_argument("--kd-lr", type=float, default=PMQConfig.kd_lr, metavar="LR",
                    help=f"with --kd-steps: the tuning's peak learning rate (default {PMQConfig.kd_lr:g}; another one "
                         "is named -lrLR in the file)")
    ap.add_argument("--kd-codes", type=float, default=0.0, metavar="T",
                    help="with --kd-steps: the codes of our types (and iq1_s) re-chosen too (kd_tune.py, travel T; 0: not; the "
                         "file named -kdN-cT)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args()
    model = tiny_model(a.preset)
    d = cache_dir("bench", model.name, "quality")
    f16 = d / "tiny-f16.gguf"
    if not f16.exists():
        convert(model, f16, "f16", progress=False)
    im = imatrix(f16, model / "calib.txt", d / "imatrix.gguf", chunks=128, threads=a.threads)
    files = [("F16", f16)]
    unpatched = {}          # file name -> the unpatched llama-perplexity that scores it
    files += [(f"llama.cpp {t} + imatrix", stock_quantize(f16, t, d / f"tiny-{t.lower()}.gguf", im, a.threads))
              for t in a.stock.split(",")]
    for mix in a.mixes.split(","):
        for ladder in a.ladders.split(","):
            for b in a.budgets.split(","):
                tag = b if mix == "q8" else f"{b}-{mix.replace(':', '_')}"     # q8: the cached runs of before
                series = mix
                compat = ladder == "compat"
                if ladder != "mcq":
                    tag += f"-{ladder}" + ("" if a.granularity == "projection" else f"-{a.granularity}")
                    series += f"+{ladder}" + ("" if a.granularity == "projection" else f"/{a.granularity}")
                    if a.eps_rows:
                        tag += f"-r{a.eps_rows}"
                        series += f"/eps {a.eps_rows} rows"
                    if a.eps_holdout:                   # no suffix: the runs from before held-out eps
                        tag += f"-h{round(100 * a.eps_holdout)}"
                        series += "/held-out eps"
                    if a.scope == "model":
                        tag += "-model" + ("-kl" if a.sensitivity == "kl" else "")
                        series += "/model" + ("+kl" if a.sensitivity == "kl" else "")
                if a.rerun:
                    tag += f"-{a.rerun}"
                    series += f" ({a.rerun})"
                work = d / f"pmq-{tag}"
                if a.kd_steps:
                    tag += f"-kd{a.kd_steps}" + (f"-c{a.kd_codes:g}" if a.kd_codes else "")
                    series += f"+kd {a.kd_steps}" + (f"/codes {a.kd_codes:g}" if a.kd_codes else "")
                    if a.kd_lr != PMQConfig.kd_lr:
                        tag += f"-lr{a.kd_lr:g}"
                        series += f"/lr {a.kd_lr:g}"
                    work = reuse_layers(work, d / f"pmq-{tag}")
                try:
                    quantize(model, work, PMQConfig(budget=b, n_seq=64, seq_len=256, mix=mix,
                                                    ladder="mcq" if compat else ladder, granularity=a.granularity,
                                                    compat="stock" if compat else "none", eps_rows=a.eps_rows,
                                                    eps_holdout=a.eps_holdout if ladder != "mcq" else PMQConfig.eps_holdout,
                                                    scope=a.scope if ladder != "mcq" else "layer",
                                                    sensitivity=a.sensitivity if ladder != "mcq" else "none",
                                                    kd_steps=a.kd_steps, kd_lr=a.kd_lr, kd_codes=a.kd_codes),
                             progress=False)
                except InfeasibleBudget as e:       # e.g. 1.5 bpw for the paper's program: not a point
                    print(f"skipped PMQ {b} {series}: {e}", flush=True)
                    continue
                files.append((f"mcmoe PMQ {b} {series}", export_pmq(work, d / f"tiny-pmq-{tag}.gguf", force=True,
                                                                    progress=False)))
                if compat:
                    unpatched[files[-1][0]] = stock_tools() / "llama-perplexity"
    text = model / "eval.txt"
    base = kld_base(f16, text, d / f"f16-{a.max_chunks}.kld", ctx=256, chunks=a.max_chunks, threads=a.threads)
    rows, sizes = [], {}
    for name, path in files:
        rows.append(score(path, base, text, name, ctx=256, chunks=a.max_chunks, threads=a.threads,
                          binary=unpatched.get(name)))
        sizes[name] = gguf_sizes(path)
        print(rows[-1], flush=True)
    rows.sort(key=lambda r: sizes[r.name]["bytes"])
    table = markdown(rows, sizes)
    print(table)
    png = "quality_pareto.png" if a.preset == "default" else f"quality_pareto_{a.preset}.png"
    # the committed plot only with --write-results (a partial run, e.g. an ablation, must not replace it)
    plot(rows, sizes, (REPO / "docs" if a.write_results else d) / png, a.preset)
    print(f"plot: {(REPO / 'docs' if a.write_results else d) / png}")
    if a.write_results:
        write_results(table, a, png)
    return 0


def reuse_layers(untuned: Path, tuned: Path) -> Path:
    """The KD-tuned run's work directory, started as a copy of the untuned run's where that has finished:
    KD tuning changes no layer's work (pmq.FINISH_ONLY), so only the tuning is left to do."""
    import shutil
    if not tuned.exists() and (untuned / "allocation.json").exists():
        shutil.copytree(untuned, tuned,
                        ignore=shutil.ignore_patterns("tune.pt", "*.tmp"))
    return tuned


def plot(rows, sizes, png: Path, preset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    mib = {r.name: sizes[r.name]["bytes"] / 2**20 for r in rows}
    for ax, key, label in ((axes[0], "ratio", "PPL / PPL(F16)"), (axes[1], "kld", "mean KLD vs F16 (nats/token)")):
        for mix in sorted({r.name.split()[-1] for r in rows if r.name.startswith("mcmoe")}):
            ours = [r for r in rows if r.name.startswith("mcmoe") and r.name.endswith(" " + mix)]
            ax.errorbar([mib[r.name] for r in ours], [getattr(r, key) for r in ours],
                        yerr=[getattr(r, key + "_se") for r in ours], fmt="o-", lw=2, label=f"mcmoe PMQ, {mix}")
        for r in rows:
            if r.name.startswith("llama.cpp"):
                ax.errorbar(mib[r.name], getattr(r, key), yerr=getattr(r, key + "_se"), fmt="s", color="gray")
                ax.annotate(r.name.split()[1], (mib[r.name], getattr(r, key)), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel("file size (MiB, real bytes)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"tiny Mixtral ({preset}): PMQ vs llama.cpp low-bit types (same F16, same imatrix text, "
                 "same held-out tokens)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_results(table: str, a, png: str) -> None:
    block = (f"## Quality: PMQ files vs llama.cpp's low-bit types ({a.preset} tiny model, llama.cpp PPL, KLD, "
             f"top-1 vs F16)\n\n"
             f"`.venv/bin/python scripts/bench_quality.py --preset {a.preset} --budgets {a.budgets} --mixes {a.mixes} "
             f"--ladders {a.ladders} --granularity {a.granularity}{f' --eps-rows {a.eps_rows}' if a.eps_rows else ''}{f' --eps-holdout {a.eps_holdout}' if a.eps_holdout != PMQConfig.eps_holdout else ''}{f' --scope {a.scope}' if a.scope != 'layer' else ''}{f' --sensitivity {a.sensitivity}' if a.sensitivity != 'none' else ''} --stock {a.stock} --max-chunks {a.max_chunks} --write-results` on {machine()}.\n\n{table}\n\n"
             f"![Pareto]({png})")
    replace_section("bench_quality" if a.preset == "default" else f"bench_quality_{a.preset}", block)


if __name__ == "__main__":
    sys.exit(main())
