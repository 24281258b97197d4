"""ODP thresholds fitted to a target: which mu_l each layer gets (the paper's rule, w_2nd < mu_l * w_1st).

The paper sets mu_l to the median of w_2nd / w_1st over calibration tokens: about half the tokens of every
layer lose their second expert, whatever that costs. On a model that cares (the bench model: +2.25% PPL at
the median, issue 13) that is too much, and layers differ in how much the second expert matters. Here each
layer has a *pruning curve* measured on calibration tokens (calibration.odp_curve): for every mu on a
fixed grid, the fraction of tokens the rule fires for (`skip`) and the squared error it adds to the
layer's output (the residual stream after the MoE block), relative to that output's energy (`err`).
Targets:
  median       the paper's rule (mu_l = median ratio; no curve needed)
  skip:S       mean skipped fraction S over layers at the least summed error: one Lagrange multiplier
               lambda, each layer takes the grid point minimising err - lambda * skip, lambda bisected
               until the mean skip reaches S (layers with cheap second experts give up more)
  error:B      per layer the largest mu whose relative error stays at or below B
Pure numpy; the curves come from quant/calibration.py.
"""
from __future__ import annotations

import numpy as np

MU_GRID = np.round(np.linspace(0.0, 1.0, 101), 4)     # the rule's ratio w_2nd / w_1st lies in [0, 1]
DEFAULT_TARGET = "skip:0.225"     # bench model: 24.6% of expert evaluations skipped for +0.27% PPL (F16), +0.40% (PMQ 2.0)


def parse_target(target: str) -> tuple[str, float]:
    """'median' | 'skip:S' (0 <= S < 1) | 'error:B' (B >= 0) -> (kind, value); a clear error otherwise."""
    t = str(target).strip().lower()
    if t == "median":
        return "median", 0.0
    kind, _, v = t.partition(":")
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if kind == "skip" and 0.0 <= x < 1.0:
        return kind, x
    if kind == "error" and x >= 0.0 and np.isfinite(x):
        return kind, x
    raise ValueError(f"ODP target must be 'median', 'skip:S' with 0 <= S < 1 or 'error:B' with B >= 0 "
                     f"(got {target!r})")


def fit(curves: list[dict | None], medians: list[float], target: str = DEFAULT_TARGET) -> list[float]:
    """Per-layer thresholds for `target`. A layer without a curve (a work directory from before curves
    were measured) keeps its median, and then every layer does: one target, one rule for the file."""
    kind, v = parse_target(target)
    if kind == "median" or any(c is None for c in curves):
        return [float(m) for m in medians]
    mu = np.array([c["mu"] for c in curves], dtype=float)
    skip = np.array([c["skip"] for c in curves], dtype=float)
    err = np.array([c["err"] for c in curves], dtype=float)
    if kind == "error":
        # the first grid point over the budget ends the layer's range (err[0] = 0: mu = 0 prunes nothing)
        over = err > v
        idx = np.where(over.any(1), over.argmax(1) - 1, err.shape[1] - 1)
    else:
        idx = _lagrange(skip, err, v)
    return [float(mu[l, i]) for l, i in enumerate(idx)]


def _lagrange(skip: np.ndarray, err: np.ndarray, target: float) -> np.ndarray:
    """Grid index per layer with mean skip >= target at (near) the least summed error."""
    def pick(lam: float) -> np.ndarray:
        # ties broken towards less skipping (argmin takes the first index, the smallest mu)
        return np.argmin(err - lam * skip, axis=1)

    def mean_skip(idx: np.ndarray) -> float:
        return float(skip[np.arange(len(idx)), idx].mean())

    most = float(skip[:, -1].mean())
    if most < target:
        raise ValueError(f"ODP target skip:{target:g} is out of reach: at most {most:.3f} of the expert "
                         "evaluations can be skipped here (the rule never prunes a token's top expert)")
    lo, hi = 0.0, 1.0
    while mean_skip(pick(hi)) < target:
        hi *= 4.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if mean_skip(pick(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return pick(hi)


def predicted(curves: list[dict], mu: list[float]) -> dict:
    """Mean skipped fraction and summed relative error the curves predict for thresholds mu."""
    sk, er = [], []
    for c, m in zip(curves, mu):
        i = int(np.searchsorted(np.asarray(c["mu"]), m - 1e-9))
        i = min(i, len(c["mu"]) - 1)
        sk.append(c["skip"][i])
        er.append(c["err"][i])
    return {"skip": float(np.mean(sk)), "err": float(np.sum(er))}
