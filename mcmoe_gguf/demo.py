"""`make demo`: the embedded tiny model through the whole product, with the numbers that matter."""
from __future__ import annotations

import time
from pathlib import Path

from .cache import cache_dir

PROMPT = "KING HENRY.\nNow, lords,"


def run_demo(preset: str = "default", max_chunks: int = 64, threads: int | None = None) -> int:
    from .evaluate import ppl_llama, ppl_torch
    from .export import convert
    from .runtime import check_runtime, load
    from .tiny import describe, tiny_model

    info = check_runtime()
    print(f"[1/4] patched runtime: {info['lib']} (sources {info['source_hash'][:12]})")
    model = tiny_model(preset)
    print(f"[2/4] {describe(model)}")
    out_dir = cache_dir("demo", model.name)
    gguf_path = convert(model, out_dir / "tiny-f16.gguf", outtype="f16", force=True, progress=False)
    print(f"[3/4] converted -> {gguf_path} ({gguf_path.stat().st_size / 2**20:.2f} MiB)")
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
    print(f"[4/4] held-out perplexity ({ref['tokens']} tokens, ctx 256):")
    print(f"      {'engine':<28}{'PPL':>10}{'seconds':>10}")
    print(f"      {'transformers (fp32)':<28}{ref['ppl']:>10.4f}{t1 - t0:>10.1f}")
    print(f"      {'llama.cpp F16 GGUF':<28}{got['ppl']:>10.4f}{t2 - t1:>10.1f}")
    print(f"      relative difference: {100 * (got['ppl'] / ref['ppl'] - 1):+.3f}%")
    return 0
