#!/usr/bin/env python3
"""What KD tuning (quant/kd_tune.py) buys, part by part and by steps, on one finished PMQ run of the bench model.

    .venv/bin/python scripts/study_kd.py [--workdir pmq-1.5625-program-mcn-model-kl] [--steps 150]
        [--parts "norms;routers;scales;norms,scales;scales,norms,routers"] [--chunks 100]
    .venv/bin/python scripts/study_kd.py --workdir W --tuned W-kd600 --steps "" --text OTHER.txt

Each row tunes a copy of the work directory (under the study cache; the original is not touched) with the
given parts for the given steps, then scores its torch fake-quant model against the float model on held-out
chunks of 256 (eval.txt, or --text; every token of a chunk but the first): mean KL, top-1 agreement, PPL
ratio, each with one standard error over chunks. The first row is the untuned run; --tuned adds rows for
work directories already tuned (e.g. bench_quality.py --kd-steps), scored as they are: with --text on
another domain's text, whether tuning on the calibration text's domain generalises. A run's work directory is found under
bench_quality.py's cache (it makes them: e.g. `--budgets 1.5625 --mixes program --ladders mcn --scope model
--sensitivity kl`).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcmoe_gguf.apps.evaluate import kld_torch  # noqa: E402
from mcmoe_gguf.base.cache import cache_dir  # noqa: E402
from mcmoe_gguf.model.tiny import tiny_model  # noqa: E402
from mcmoe_gguf.quant import kd_tune  # noqa: E402
from mcmoe_gguf.quant.fake_quant import float_model, quantized_model  # noqa: E402


def row(name: str, r: dict, secs: float) -> str:
    return (f"| {name} | {r['kld']:.4f} ± {r['kld_se']:.4f} | {r['top1']:.2f} ± {r['top1_se']:.2f} | "
            f"{r['ppl_ratio']:.4f} ± {r['ppl_ratio_se']:.4f} | {secs:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="pmq-1.5625-program-mcn-model-kl",
                    help="a finished run in bench_quality.py's cache (name), or a path")
    ap.add_argument("--steps", default="150", help="comma-separated step counts")
    ap.add_argument("--parts", default="norms;routers;scales;norms,scales;scales,norms,routers",
                    help="semicolon-separated sets of parts to tune (of scales, norms, routers, codes)")
    ap.add_argument("--lr", type=float, default=kd_tune.DEFAULT_LR)
    ap.add_argument("--code-travel", default=str(kd_tune.DEFAULT_CODE_TRAVEL),
                    help="comma-separated moves of a typical code latent over the run (part codes), level units")
    ap.add_argument("--chunks", type=int, default=100, help="held-out chunks of 256 tokens")
    ap.add_argument("--tuned", default="", help="comma-separated tuned work directories to score as they are")
    ap.add_argument("--text", help="held-out text to score on (default: the bench model's eval.txt)")
    a = ap.parse_args()
    model_dir = tiny_model("bench")

    def finished(name: str) -> Path:
        p = Path(name)
        if not p.exists():
            p = cache_dir("bench", model_dir.name, "quality") / name
        if not (p / "allocation.json").exists():
            raise SystemExit(f"{p}: not a finished PMQ work directory (make it with scripts/bench_quality.py)")
        return p
    src = finished(a.workdir)
    from tokenizers import Tokenizer
    text = Path(a.text) if a.text else model_dir / "eval.txt"
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(
        text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    untuned, ck = quantized_model(src, tuned=False)
    teacher = float_model(ck)
    print("| tuned | mean KLD | same top-1 % | PPL / float | seconds |\n|---|---:|---:|---:|---:|", flush=True)
    print(row("nothing (the PMQ file)", kld_torch(untuned, teacher, ids, 256, a.chunks), 0), flush=True)
    for name in filter(None, a.tuned.split(",")):
        model, _ = quantized_model(finished(name))
        print(row(f"{name} (as tuned)", kld_torch(model, teacher, ids, 256, a.chunks), 0), flush=True)
    work = cache_dir("study", "kd") / src.name
    for steps in (int(s) for s in a.steps.split(",") if s):
        for parts in a.parts.split(";"):
            travels = ([float(r) for r in a.code_travel.split(",")] if "codes" in parts
                       else [kd_tune.DEFAULT_CODE_TRAVEL])
            for travel in travels:
                shutil.rmtree(work, ignore_errors=True)
                shutil.copytree(src, work, ignore=shutil.ignore_patterns("tune.pt", "*.tmp", "state"))
                cfg = kd_tune.TuneConfig(steps=steps, lr=a.lr, parts=tuple(parts.split(",")), code_travel=travel)
                t0 = time.time()
                s = kd_tune.tune(work, cfg, progress=False)
                secs = time.time() - t0
                model, _ = quantized_model(work)
                name = f"{parts.replace(',', ' + ')}, {steps} steps"
                if "codes" in parts:
                    name += f" (code travel {travel:g}: {s['changed_codes']:,} codes changed)"
                print(row(name, kld_torch(model, teacher, ids, 256, a.chunks), secs), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
