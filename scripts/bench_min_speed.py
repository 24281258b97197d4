#!/usr/bin/env python3
"""The ladder with a decode-speed floor (--min-speed q2_k) on the bench model, beside the free ladder.

    .venv/bin/python scripts/bench_min_speed.py 2.0,2.5
    .venv/bin/python scripts/bench_min_speed.py 2.0 --ladder mcn --scope model --sensitivity kl --costs measure

Cost model (--costs): "fixed" (default) the sapphirerapids medians of `scripts/bench_kernels.py --variants
sapphirerapids,haswell --n 1 --repeat 1` (docs/RESULTS.md, "The ladder's types: mat-vec cost") for the full
ladder, so that run is reproducible on any machine; "measure" this machine's test-backend-ops mat-vec times
(engine/kernel_costs.matvec_us, cached per runtime and CPU; printed), needed for a ladder with types that
table lacks (mcn). Scored like scripts/bench_quality.py (100 x 256 held-out tokens vs F16; needs its cached F16
logits: run bench_quality.py --preset bench first). The file is left in bench_quality's cache as
tiny-pmq-<budget>-auto-<ladder>[-<scope>][-kl]-minspeed.gguf, so `bench_speed.py --model pareto --sources` can
time it at Mixtral's sizes.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
from mcmoe_gguf.model.tiny import tiny_model  # noqa: E402
from mcmoe_gguf.base.cache import cache_dir  # noqa: E402
from mcmoe_gguf.quant import ladder as ladders  # noqa: E402
from mcmoe_gguf.quant.pmq import PMQConfig, quantize  # noqa: E402
from mcmoe_gguf.gguf.export import export_pmq  # noqa: E402
from mcmoe_gguf.apps.quality import score  # noqa: E402
# sapphirerapids medians of `scripts/bench_kernels.py --variants sapphirerapids,haswell --n 1 --repeat 1` (us)
COSTS = {"mcq1": 1771, "mcq2": 2160, "mcq3": 3352, "iq1_s": 10354, "iq1_m": 10809, "iq2_xxs": 12145, "iq2_xs": 12535,
         "iq2_s": 11613, "iq3_xxs": 17846, "q2_k": 5753, "q3_k": 7483, "q4_k": 7287}


def costs_for(how: str, types, floor: str) -> dict:
    if how == "fixed":
        missing = [t for t in (*types, floor) if t not in COSTS]
        if missing:
            raise SystemExit(f"--costs fixed has no mat-vec time for {', '.join(missing)}: use --costs measure")
        return COSTS
    from mcmoe_gguf.engine.kernel_costs import matvec_us
    c = matvec_us(list(types) + [floor])
    print("mat-vec us (4096 x 14336, this machine):", {t: round(v) for t, v in c.items()}, flush=True)
    return c


def main() -> int:
    """Per budget: the floor's file, scored; prints quality and the types it chose."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("budgets", nargs="?", default="2.0,2.5", help="expert bpw budgets, comma-separated")
    ap.add_argument("--ladder", default="full", help="the expert types (quant/ladder.py)")
    ap.add_argument("--floor", default="q2_k", help="--min-speed's type")
    ap.add_argument("--scope", choices=["layer", "model"], default="layer")
    ap.add_argument("--sensitivity", choices=["none", "kl"], default="none")
    ap.add_argument("--costs", choices=["fixed", "measure"], default="fixed")
    a = ap.parse_args()
    costs = costs_for(a.costs, ladders.resolve(a.ladder), a.floor)
    torch.set_num_threads(1)
    model = tiny_model("bench")
    d = cache_dir("bench", model.name, "quality")
    base = d / "f16-100.kld"
    # the names of the runs before the options existed (full ladder, layer scope) are kept
    tag = a.ladder + ("-model" if a.scope == "model" else "") + ("-kl" if a.sensitivity == "kl" else "")
    floor = "" if a.floor == "q2_k" else f"-{a.floor}"
    for b in a.budgets.split(","):
        wd = d / f"pmq-{b}-auto-{tag}-minspeed-{a.floor}"
        r = quantize(model, wd, PMQConfig(budget=b, n_seq=64, seq_len=256, mix="auto", ladder=a.ladder,
                                          min_speed=a.floor, scope=a.scope, sensitivity=a.sensitivity),
                     progress=False, kernel_costs=costs)
        f = export_pmq(wd, d / f"tiny-pmq-{b}-auto-{tag}-minspeed{floor}.gguf", force=True, progress=False)
        types = [t for layer in r["types"] for e in layer for t in e]
        q = score(f, base, model / "eval.txt", f.name, ctx=256, chunks=100, threads=1)
        print(b, f.stat().st_size, q, Counter(types).most_common(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
