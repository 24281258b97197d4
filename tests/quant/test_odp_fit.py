"""odp_fit: thresholds fitted to a skip or error target, against brute force over every combination."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from mcmoe_gguf.quant import odp_fit


def random_curves(rng, n_layers=3, n_grid=6) -> list[dict]:
    """Monotone curves as calibration.odp_curve makes them: skip and err start at 0 and never decrease."""
    out = []
    for _ in range(n_layers):
        skip = np.concatenate([[0.0], np.cumsum(rng.uniform(0, 0.08, n_grid - 1))])
        err = np.concatenate([[0.0], np.cumsum(rng.exponential(1e-3, n_grid - 1) * rng.uniform(0.2, 5))])
        out.append({"mu": np.linspace(0, 1, n_grid).tolist(), "skip": skip.tolist(), "err": err.tolist()})
    return out


@pytest.mark.parametrize("seed", range(6))
def test_skip_target_is_reached_at_the_least_error_for_its_skip(seed):
    rng = np.random.default_rng(seed)
    curves = random_curves(rng)
    target = float(rng.uniform(0.02, 0.2))
    mu = odp_fit.fit(curves, [0.5] * 3, f"skip:{target}")
    idx = [c["mu"].index(m) for c, m in zip(curves, mu)]
    skip = np.mean([c["skip"][i] for c, i in zip(curves, idx)])
    err = sum(c["err"][i] for c, i in zip(curves, idx))
    assert skip >= target - 1e-12
    # a Lagrange solution: no combination skips at least as much with less summed error
    for combo in itertools.product(range(6), repeat=3):
        s = np.mean([c["skip"][i] for c, i in zip(curves, combo)])
        e = sum(c["err"][i] for c, i in zip(curves, combo))
        if s >= skip - 1e-12:
            assert e >= err - 1e-12, (combo, s, e, skip, err)
    assert odp_fit.predicted(curves, mu) == pytest.approx({"skip": skip, "err": err})


def test_error_target_takes_each_layers_largest_threshold_within_budget():
    rng = np.random.default_rng(7)
    curves = random_curves(rng, n_layers=4, n_grid=11)
    budget = float(np.median([c["err"][5] for c in curves]))
    mu = odp_fit.fit(curves, [0.5] * 4, f"error:{budget}")
    for c, m in zip(curves, mu):
        i = c["mu"].index(m)
        assert c["err"][i] <= budget
        assert i == len(c["mu"]) - 1 or c["err"][i + 1] > budget
    assert odp_fit.fit(curves, [0.5] * 4, "error:0") == [0.0] * 4     # nothing pruned for no error


def test_median_and_curveless_layers_keep_the_papers_thresholds():
    curves = random_curves(np.random.default_rng(1))
    assert odp_fit.fit(curves, [0.3, 0.4, 0.5], "median") == [0.3, 0.4, 0.5]
    assert odp_fit.fit(curves[:2] + [None], [0.3, 0.4, 0.5], "skip:0.05") == [0.3, 0.4, 0.5]


@pytest.mark.parametrize("bad", ["skip:1.2", "skip:-0.1", "error:-1", "error:nan", "median:3", "fast", "skip:"])
def test_bad_targets_are_refused_with_the_forms_named(bad):
    with pytest.raises(ValueError, match="'median', 'skip:S'"):
        odp_fit.parse_target(bad)


def test_unreachable_skip_is_refused_with_the_most_that_can_be_skipped():
    curves = random_curves(np.random.default_rng(2))
    most = np.mean([c["skip"][-1] for c in curves])
    with pytest.raises(ValueError, match=f"at most {most:.3f}"):
        odp_fit.fit(curves, [0.5] * 3, f"skip:{min(0.99, most + 0.05)}")
