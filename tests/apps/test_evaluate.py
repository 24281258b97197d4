"""apps/evaluate.kld_torch: held-out KL, top-1 agreement and PPL ratio of a torch model against its teacher,
checked against a direct float64 computation of the same quantities."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from helpers import small_config
from mcmoe_gguf.apps.evaluate import kld_torch
from mcmoe_gguf.model.arch import mixtral as mx


def _model(seed: int):
    torch.manual_seed(seed)
    hp = mx.MixtralHParams.from_config(small_config(n_layers=1, hidden=64, ff=64, vocab=97, heads=4, kv_heads=2))
    m = mx.CompactMixtral(hp).eval()
    m.reset_parameters(std=0.2)
    return m


def test_a_model_against_itself():
    m = _model(0)
    ids = list(np.random.default_rng(0).integers(0, 97, 3 * 32))
    r = kld_torch(m, m, ids, ctx=32)
    assert r["chunks"] == 3 and abs(r["kld"]) < 1e-12 and r["top1"] == 100.0 and abs(r["ppl_ratio"] - 1) < 1e-12


def test_against_a_direct_computation():
    teacher, student = _model(0), _model(1)
    ids = list(np.random.default_rng(1).integers(0, 97, 10 * 16 + 5))      # 10 whole chunks, a partial one dropped
    r = kld_torch(student, teacher, ids, ctx=16)
    x = torch.tensor(ids[:160]).reshape(10, 16)
    with torch.no_grad():
        lt = F.log_softmax(teacher(x)[0][:, :-1].double(), -1)
        ls = F.log_softmax(student(x)[0][:, :-1].double(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean(-1)                # per chunk
    tgt = x[:, 1:, None]
    dnll = (lt.gather(-1, tgt) - ls.gather(-1, tgt)).squeeze(-1).mean(-1)
    assert r["chunks"] == 10        # (kld_torch runs 8 chunks a batch: float32 sums differ by ~1e-9 from one batch of 10)
    assert math.isclose(r["kld"], kl.mean().item(), rel_tol=1e-6)
    assert math.isclose(r["kld_se"], kl.std().item() / math.sqrt(10), rel_tol=1e-6)
    assert math.isclose(r["ppl_ratio"], math.exp(dnll.mean().item()), rel_tol=1e-6)
    assert math.isclose(r["top1"], 100 * (lt.argmax(-1) == ls.argmax(-1)).double().mean().item(), rel_tol=1e-6)
    assert r["kld"] > 0.01          # two different random models: the test can tell them apart
