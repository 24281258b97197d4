"""`make demo`: the embedded tiny model through the whole product, with the numbers that matter."""
from __future__ import annotations

import time
from pathlib import Path

from mcmoe_gguf.base.cache import cache_dir

PROMPT = "KING HENRY.\nNow, lords,"


# The demo's PMQ run (selfcheck and the device check reuse its files). Named after the mix, so a cache
# from before mixes existed (Q8_0 ends, mcq4 attention) is not mistaken for this run.
DEMO_PMQ_ARGS = dict(budget="2.5", n_seq=64, seq_len=256, mix="auto")
DEMO_WORK, DEMO_FILE = "pmq-2.5-auto", "tiny-pmq2.5-auto.gguf"


def demo_pmq_config():
    from mcmoe_gguf.quant.pmq import PMQConfig
    return PMQConfig(**DEMO_PMQ_ARGS)


def run_demo(preset: str = "default", max_chunks: int = 64, threads: int | None = None) -> int:
    from mcmoe_gguf.apps.evaluate import ppl_llama, ppl_torch
    from mcmoe_gguf.gguf.export import convert
    from mcmoe_gguf.engine.runtime import check_runtime, load
    from mcmoe_gguf.model.tiny import describe, tiny_model

    info = check_runtime()
    print(f"[1/6] patched runtime: {info['lib']} (sources {info['source_hash'][:12]})")
    model = tiny_model(preset)
    print(f"[2/6] {describe(model)}")
    out_dir = cache_dir("demo", model.name)
    gguf_path = convert(model, out_dir / "tiny-f16.gguf", outtype="f16", force=True, progress=False)
    print(f"[3/6] converted -> {gguf_path} ({gguf_path.stat().st_size / 2**20:.2f} MiB)")
    llm = load(gguf_path, n_ctx=256, n_threads=threads)
    text = llm(PROMPT, max_tokens=40, temperature=0.0, echo=True)["choices"][0]["text"]
    print("      generated (greedy):\n        " + text.replace("\n", "\n        "))
    del llm
    eval_text = (Path(model) / "eval.txt").read_text(encoding="utf-8")
    t0 = time.time()
    ref = ppl_torch(model, eval_text, ctx=256, max_chunks=max_chunks, progress=False)
    t1 = time.time()
    got = ppl_llama(gguf_path, eval_text, ctx=256, max_chunks=max_chunks, n_threads=threads, progress=False)
    t2 = time.time()
    print(f"[4/6] held-out perplexity ({ref['tokens']} tokens, ctx 256):")
    print(f"      {'engine':<28}{'PPL':>10}{'seconds':>10}")
    print(f"      {'transformers (fp32)':<28}{ref['ppl']:>10.4f}{t1 - t0:>10.1f}")
    print(f"      {'llama.cpp F16 GGUF':<28}{got['ppl']:>10.4f}{t2 - t1:>10.1f}")
    print(f"      relative difference: {100 * (got['ppl'] / ref['ppl'] - 1):+.3f}%")
    ours = compare_low_bit(model, gguf_path, eval_text, max_chunks, threads)
    odp_on_off(ours, eval_text, max_chunks, threads)
    return 0


def odp_on_off(path: Path, eval_text: str, max_chunks: int, threads: int | None) -> None:
    """Our PMQ file with online dynamic pruning off and on (the file's calibrated thresholds, 2% protection):
    perplexity, the engine's count of skipped expert evaluations, prompt / decode speed."""
    from mcmoe_gguf.apps.evaluate import ppl_llama
    from mcmoe_gguf.engine.odp import odp_reset, odp_stats, summary
    from mcmoe_gguf.engine.speed import time_file
    n_threads = threads or 2
    print(f"[6/6] ODP (skip the second expert of unimportant tokens) on {path.name}, same held-out chunks:")
    print(f"      {'setting':<26}{'PPL':>10}{'skipped':>10}{'pp tok/s':>10}{'tg tok/s':>10}")
    for label, kw in (("ODP off", {"odp": False}), ("ODP on (mu, protect 2%)", {"odp": True})):
        odp_reset()
        r = ppl_llama(path, eval_text, ctx=256, max_chunks=max_chunks, n_threads=threads, progress=False, **kw)
        skipped = summary(odp_stats())["skipped_fraction"]
        pp, tg = time_file(path, n_threads, 256, 64, 2, **kw)
        print(f"      {label:<26}{r['ppl']:>10.4f}{100 * skipped:>9.1f}%{pp:>10.0f}{tg:>10.0f}")


def compare_low_bit(model: Path, f16: Path, eval_text: str, max_chunks: int, threads: int | None) -> Path:
    """Our PMQ file at ~2.5 real expert bpw beside F16 and llama.cpp's Q2_K (imatrix from the same
    calibration text), all through the patched llama.cpp on the same held-out chunks (ODP off: the
    quantization alone). Returns our file."""
    from mcmoe_gguf.apps.baselines import imatrix, stock_quantize
    from mcmoe_gguf.apps.evaluate import ppl_llama
    from mcmoe_gguf.gguf.export import export_pmq
    from mcmoe_gguf.quant.pmq import quantize

    out_dir = f16.parent
    work = out_dir / DEMO_WORK
    print("[5/6] PMQ at 2.5 real expert bpw vs llama.cpp Q2_K (imatrix), same held-out chunks:")
    quantize(model, work, demo_pmq_config(), progress=False)
    ours = export_pmq(work, out_dir / DEMO_FILE, force=True, progress=False)
    im = imatrix(f16, model / "calib.txt", out_dir / "imatrix.gguf", chunks=64)
    q2k = stock_quantize(f16, "Q2_K", out_dir / "tiny-q2_k.gguf", im)
    from mcmoe_gguf.apps.inspect import gguf_sizes
    print(f"      {'file':<26}{'MiB':>8}{'bpw':>8}{'expert bpw':>12}{'PPL':>10}{'x F16':>8}")
    base = None
    for name, path in (("F16", f16), ("mcmoe PMQ 2.5", ours), ("llama.cpp Q2_K + imatrix", q2k)):
        r = ppl_llama(path, eval_text, ctx=256, max_chunks=max_chunks, n_threads=threads, progress=False, odp=False)
        base = base or r["ppl"]
        z = gguf_sizes(path)
        print(f"      {name:<26}{path.stat().st_size / 2**20:>8.2f}{z['bpw']:>8.3f}{z['expert_bpw']:>12.3f}"
              f"{r['ppl']:>10.4f}{r['ppl'] / base:>8.3f}")
    return ours
