"""Prompt (pp) and decode (tg) throughput of a GGUF file through llama-cpp-python on the patched runtime."""
from __future__ import annotations

import time
from pathlib import Path


def time_file(path: str | Path, threads: int, n_pp: int, n_tg: int, repeat: int, **load_kw) -> tuple[float, float]:
    """(pp tok/s, tg tok/s): pp = one batch of n_pp tokens, tg = n_tg single-token evaluations after it;
    best of `repeat` runs. load_kw go to runtime.load (ODP options, ...)."""
    from mcmoe_gguf.engine.runtime import load
    llm = load(path, n_ctx=n_pp + n_tg + 8, n_batch=n_pp, n_ubatch=n_pp, n_threads=threads,
               n_threads_batch=threads, **load_kw)
    prompt = list(range(10, 10 + n_pp))
    best_pp = best_tg = float("inf")
    for _ in range(repeat):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for i in range(n_tg):
            llm.eval([20 + i])
        t2 = time.perf_counter()
        best_pp, best_tg = min(best_pp, t1 - t0), min(best_tg, t2 - t1)
    del llm
    return n_pp / best_pp, n_tg / best_tg
