"""The perplexity protocol, one for every scorer (llama.cpp through the runtime, transformers, the compact
torch model of the trainer and of the fake-quant evaluation).

The text's tokens (no BOS) are cut into non-overlapping chunks of ``ctx`` tokens; every token of a chunk
except its first is scored given the tokens before it in the chunk; PPL = exp(sum of NLL / tokens scored).
Scorers differ only in how they produce the NLL of a batch of chunks, so their numbers compare like with
like. It sits in the lowest layer because the trainer (model/tiny.py) scores with it too.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np


def chunked(ids: Sequence[int], ctx: int, max_chunks: int | None = None) -> list[list[int]]:
    n = len(ids) // ctx
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
    if max_chunks:
        n = min(n, max_chunks)
    return [list(ids[i * ctx:(i + 1) * ctx]) for i in range(n)]


def nll_numpy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log softmax(logits)[target] in float64; logits [n, vocab] for the n targets."""
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
    return float((lse - logits[np.arange(len(targets)), targets]).sum())


def nll_torch(logits, tokens) -> float:
    """Sum over a batch of chunks (tokens [b, ctx], logits [b, ctx, vocab] in any float type) of the NLL of
    tokens 1.. given the logits before them, as torch's float32 cross-entropy computes it."""
    import torch
    logits = logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                             reduction="sum").item()


def perplexity(chunks: list[list[int]], nll_of: Callable[[list[list[int]]], float], batch: int = 1,
               progress: bool = False, desc: str = "ppl") -> dict:
    """{"ppl", "tokens" (scored), "ctx"} of the chunks; nll_of(batch of chunks) -> their summed NLL."""
    from tqdm import tqdm
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(chunks), batch), desc=desc, unit="chunk" if batch == 1 else "batch",
                  disable=not progress):
        part = chunks[i:i + batch]
        nll += nll_of(part)
        count += sum(len(c) - 1 for c in part)
    return {"ppl": math.exp(nll / count), "tokens": count, "ctx": len(chunks[0])}
