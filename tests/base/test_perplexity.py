"""The one perplexity protocol (base/perplexity.py) against a direct float64 computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mcmoe_gguf.base.perplexity import chunked, nll_numpy, nll_torch, perplexity


def test_chunks_are_whole_and_non_overlapping():
    ids = list(range(1000))
    c = chunked(ids, 64)
    assert len(c) == 1000 // 64 and all(len(x) == 64 for x in c)
    assert sum(c, []) == ids[:len(c) * 64]
    assert len(chunked(ids, 64, max_chunks=3)) == 3
    with pytest.raises(ValueError, match="fewer than one chunk of --ctx 64"):
        chunked(ids[:63], 64)


def test_nll_numpy_equals_log_softmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 300)).astype(np.float32) * 8
    targets = rng.integers(0, 300, 50)
    ref = -torch.log_softmax(torch.from_numpy(logits).double(), -1)[torch.arange(50), torch.from_numpy(targets)].sum()
    assert nll_numpy(logits, targets) == pytest.approx(ref.item(), rel=1e-12)


def test_nll_torch_scores_every_token_but_the_first():
    rng = np.random.default_rng(1)
    tokens = torch.from_numpy(rng.integers(0, 40, (3, 9)))
    logits = torch.from_numpy(rng.standard_normal((3, 9, 40)).astype(np.float32))
    ref = sum(-torch.log_softmax(logits[b, t].double(), -1)[tokens[b, t + 1]].item()
              for b in range(3) for t in range(8))
    assert nll_torch(logits, tokens) == pytest.approx(ref, rel=1e-5)


def test_perplexity_of_a_known_model():
    """A scorer that gives every next token probability 1/4 has perplexity 4 on any text, whatever the
    batching; the count is ctx - 1 tokens per chunk."""
    ids = list(np.random.default_rng(2).integers(0, 100, 10 * 32 + 7))
    chunks = chunked(ids, 32)

    def nll_of(part):
        return sum(len(c) - 1 for c in part) * math.log(4)
    for batch in (1, 3, 8):
        r = perplexity(chunks, nll_of, batch=batch)
        assert r["ppl"] == pytest.approx(4.0, rel=1e-12)
        assert r["tokens"] == 10 * 31 and r["ctx"] == 32
