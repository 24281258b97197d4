#!/usr/bin/env python3
"""The ladder with a decode-speed floor (--min-speed q2_k) on the bench model, beside the free ladder.

    .venv/bin/python scripts/bench_min_speed.py 2.0,2.5

Cost model: the sapphirerapids medians of `scripts/bench_kernels.py --variants sapphirerapids,haswell --n 1
--repeat 1` (docs/RESULTS.md, "The ladder's types: mat-vec cost") passed as kernel_costs, so the run is
reproducible on any machine; scored like scripts/bench_quality.py (100 x 256 held-out tokens vs F16;
needs its cached F16 logits: run bench_quality.py --preset bench first).
"""
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
from mcmoe_gguf.model.tiny import tiny_model  # noqa: E402
from mcmoe_gguf.base.cache import cache_dir  # noqa: E402
from mcmoe_gguf.quant.pmq import PMQConfig, quantize  # noqa: E402
from mcmoe_gguf.gguf.export import export_pmq  # noqa: E402
from mcmoe_gguf.apps.quality import score  # noqa: E402
# sapphirerapids medians of `scripts/bench_kernels.py --variants sapphirerapids,haswell --n 1 --repeat 1` (us)
COSTS = {"mcq1": 1771, "mcq2": 2160, "mcq3": 3352, "iq1_s": 10354, "iq1_m": 10809, "iq2_xxs": 12145, "iq2_xs": 12535,
         "iq2_s": 11613, "iq3_xxs": 17846, "q2_k": 5753, "q3_k": 7483, "q4_k": 7287}


def main(budgets: str) -> int:
    """Per budget: the floor's file, scored; prints quality and the types it chose."""
    torch.set_num_threads(1)
    model = tiny_model("bench")
    d = cache_dir("bench", model.name, "quality")
    base = d / "f16-100.kld"
    for b in budgets.split(","):
        wd = d / f"pmq-{b}-auto-full-minspeed-q2_k"
        r = quantize(model, wd, PMQConfig(budget=b, n_seq=64, seq_len=256, mix="auto", ladder="full", min_speed="q2_k"),
                     progress=False, kernel_costs=COSTS)
        f = export_pmq(wd, d / f"tiny-pmq-{b}-auto-full-minspeed.gguf", force=True, progress=False)
        types = [t for layer in r["types"] for e in layer for t in e]
        q = score(f, base, model / "eval.txt", f.name, ctx=256, chunks=100, threads=1)
        print(b, f.stat().st_size, q, Counter(types).most_common(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "2.0,2.5"))
