"""PMQ bit allocation: optimality against brute force, constraints, real-bit budgets, edge cases.

Sizes and bytes are recomputed here from the storage layout (20 / 36 / 52 bytes per 128 weights at
1 / 2 / 3 bits), never through allocate.py's helpers, so a wrong table or budget unit there fails here.
"""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from mcmoe_gguf.quant import allocate as A

BLOCK_BYTES = {1: 20, 2: 36, 3: 52}  # per 128 weights: 128 * b / 8 + fp16 scale + fp16 min
ALL8 = np.array(list(itertools.product((1, 2, 3), repeat=8)))  # 6561 x 8


def nbytes(bits, n):
    bits = np.asarray(bits)
    n = np.broadcast_to(np.asarray(n), bits.shape)
    return sum(int(nn) // 128 * BLOCK_BYTES[int(b)] for b, nn in zip(bits.ravel(), n.ravel()))


def cost_of(phi, w, eps, alpha, beta, gamma):
    return (phi ** alpha * w ** beta)[..., None] * eps ** gamma


def instance(seed, L=3, E=8, equal=True, monotone=True):
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.full(E, 0.7), size=L) * 2  # top-2: slot fractions sum to 2
    w = rng.uniform(0.05, 0.6, (L, E))
    if monotone:  # the usual case: more bits, less error
        eps = rng.uniform(0.5, 2.0, (L, E, 1)) * np.sort(rng.uniform(0.05, 1.0, (L, E, 3)), axis=2)[..., ::-1]
    else:
        eps = rng.uniform(0.05, 1.0, (L, E, 3))
    n = np.full((L, E), 128 * 96) if equal else 128 * rng.integers(1, 60, (L, E))
    return phi, w, eps, n


def brute_force(cost, n, layers, cap_bytes):
    """Best feasible rows of ALL8 for experts laid out as `layers` groups of 8 // layers (ties: min bytes)."""
    E = 8 // layers
    flat_cost = cost.reshape(8, 3)
    obj = flat_cost[np.arange(8), ALL8 - 1].sum(1)
    per_block = np.array([BLOCK_BYTES[b] for b in (1, 2, 3)])
    size = (n.reshape(8) // 128 * per_block[ALL8 - 1]).sum(1)
    ok = size <= cap_bytes
    for l in range(layers):
        part = ALL8[:, l * E:(l + 1) * E]
        ok &= ((part == 3).sum(1) >= 1) & ((part == 2).sum(1) >= 1)
    if not ok.any():
        return None
    order = np.lexsort((size[ok], obj[ok]))
    objs = obj[ok][order]
    gap = objs[1] - objs[0] if len(objs) > 1 else np.inf
    return ALL8[ok][order[0]], objs[0], gap


def check_constraints(bits):
    assert bits.dtype.kind == "i" and set(np.unique(bits)) <= {1, 2, 3}
    assert ((bits == 3).sum(1) >= 1).all() and ((bits == 2).sum(1) >= 1).all()


# ------------------------------------------------------------------------------------------------

def test_real_bpw_table_matches_the_layout():
    for b, blk in BLOCK_BYTES.items():
        assert A.REAL_BPW[b] * 128 / 8 == blk


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", ["1.625", "1.9", "2.1", "2.5", "3.0", "3.25"])
def test_layer_scope_equals_brute_force(seed, target):
    phi, w, eps, n = instance(seed, L=2, equal=seed % 2 == 0, monotone=seed < 3)
    t = Fraction(target)
    try:
        alloc = A.allocate(phi, w, eps, n, target, scope="layer")
    except A.InfeasibleBudget:  # only legitimate if brute force finds nothing either
        alloc = None
    cost = cost_of(phi, w, eps, A.DEFAULT_ALPHA, A.DEFAULT_BETA, A.DEFAULT_GAMMA)
    total = 0.0
    for l in range(2):
        cap = t * int(n[l].sum()) / 8  # each layer's real bpw <= target
        bf = brute_force(cost[l], n[l], 1, cap)
        if bf is None:
            assert alloc is None
            return
        assert alloc is not None
        bits, obj, gap = bf
        assert nbytes(alloc.bits[l], n[l]) <= cap
        assert alloc.layer_objective[l] == pytest.approx(obj, rel=1e-6, abs=1e-12)
        if gap > 1e-6 * cost.max():
            np.testing.assert_array_equal(alloc.bits[l], bits)
        total += obj
    check_constraints(alloc.bits)
    assert alloc.objective == pytest.approx(total, rel=1e-6)
    assert alloc.expert_bytes == nbytes(alloc.bits, n)
    assert alloc.bpw == pytest.approx(8 * nbytes(alloc.bits, n) / n.sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", ["1.625", "1.8", "2.0", "2.3", "2.7", "3.25"])
def test_model_scope_equals_brute_force(seed, target):
    # 2 layers x 4 experts: 3^8 joint allocations, one budget shared by both layers
    phi, w, eps, n = instance(100 + seed, L=2, E=4, equal=seed % 2 == 0, monotone=seed < 3)
    cap = Fraction(target) * int(n.sum()) / 8
    bf = brute_force(cost_of(phi, w, eps, 1.5, 0.5, 1.0), n, 2, cap)
    if bf is None:  # 4 equal experts need >= 2.0 real bpw: the minimum must agree with brute force
        with pytest.raises(A.InfeasibleBudget):
            A.allocate(phi, w, eps, n, target, scope="model")
        return
    alloc = A.allocate(phi, w, eps, n, target, scope="model", alpha=1.5, beta=0.5, gamma=1.0)
    bits, obj, gap = bf
    check_constraints(alloc.bits)
    assert nbytes(alloc.bits, n) <= cap
    assert alloc.objective == pytest.approx(obj, rel=1e-6, abs=1e-12)
    if gap > 1e-6 * obj:
        np.testing.assert_array_equal(alloc.bits.reshape(8), bits)
    assert (alloc.alpha, alloc.beta, alloc.gamma, alloc.scope) == (1.5, 0.5, 1.0, "model")


def test_mixtral_sized_byte_budget_counts_scales():
    L, E = 32, 8
    n = 3 * 4096 * 14336  # w1, w2, w3 of one Mixtral-8x7b expert
    phi, w, eps, _ = instance(7, L=L, E=E)
    budget = "13GB"
    for scope in ("layer", "model"):
        alloc = A.allocate(phi, w, eps, n, budget, scope=scope)
        assert alloc.bits.shape == (L, E)
        check_constraints(alloc.bits)
        b = nbytes(alloc.bits, n)
        assert b == alloc.expert_bytes <= 13 * 10**9
        # errors fall with bits, so each program leaves less than one 1->2 upgrade (n / 8 bytes) unused
        assert 13 * 10**9 - b < (L if scope == "layer" else 1) * n // 8
        assert alloc.bits.mean() + 0.25 == pytest.approx(alloc.bpw)  # real = nominal + 0.25 for equal experts
    # scope="layer": every layer within its share
    per_layer = Fraction(13 * 10**9, L)
    alloc = A.allocate(phi, w, eps, n, budget, scope="layer")
    assert all(nbytes(alloc.bits[l], n) <= per_layer for l in range(L))


def test_model_scope_is_a_relaxation_of_the_per_layer_split():
    phi, w, eps, n = instance(11, L=6, E=8)
    strictly = 0
    for target in ("1.7", "2.0", "2.5", "3.0"):
        per_layer = A.allocate(phi, w, eps, n, target, scope="layer")
        joint = A.allocate(phi, w, eps, n, target, scope="model")
        assert joint.objective <= per_layer.objective * (1 + 1e-9)
        assert nbytes(joint.bits, n) <= Fraction(target) * int(n.sum()) / 8
        strictly += joint.objective < per_layer.objective * (1 - 1e-6)
    assert strictly  # layers differ in how much their bits buy, so sharing helps somewhere


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_infeasible_budgets_name_the_range(scope):
    phi, w, eps, n = instance(3, L=2)
    with pytest.raises(A.InfeasibleBudget) as e:
        A.allocate(phi, w, eps, n, "1.6bpw", scope=scope)
    # the top of the range is 3.125, not 3.25: ">= 1 expert at 2 bits" keeps one expert per layer at 2
    assert "1.625" in str(e.value) and "3.125" in str(e.value) and "bpw" in str(e.value)
    assert isinstance(e.value, ValueError) and (e.value.minimum, e.value.maximum) == (1.625, 3.125)
    A.allocate(phi, w, eps, n, "1.625", scope=scope)  # the boundary itself is feasible

    lo = 2 * int(n[0].sum()) * 13 // 64  # 1.625 real bpw in bytes
    hi = 2 * (7 * 52 + 36) * 96  # 3.125 real bpw: 7 experts at 3 bits, 1 at 2, per layer
    assert lo == 2 * (52 + 36 + 6 * 20) * 96  # 8 experts of 96 groups, 2 layers
    with pytest.raises(A.InfeasibleBudget) as e:
        A.allocate(phi, w, eps, n, f"{lo - 1}B", scope=scope)
    assert str(lo) in str(e.value) and str(hi) in str(e.value) and "bytes" in str(e.value)
    assert e.value.unit == "bytes"
    assert nbytes(A.allocate(phi, w, eps, n, f"{lo}B", scope=scope).bits, n) == lo

    # budgets above the top are feasible, not errors: the surplus stays unused
    for big in ("3.125", "3.25", "4", "8bpw", f"{hi}B", f"{10 * hi}B", "1TB"):
        alloc = A.allocate(phi, w, eps, n, big, scope=scope)
        assert ((alloc.bits == 3).sum(1) == 7).all() and ((alloc.bits == 2).sum(1) == 1).all()
        assert alloc.expert_bytes == nbytes(alloc.bits, n) == hi


def test_unequal_layers_minimum_is_the_worst_layer():
    phi, w, eps, _ = instance(4, L=2)
    n = np.array([[128] * 8, [128 * 4] * 7 + [128]])  # layer 1 can go below 1.625 (small 3-bit expert)
    min1 = Fraction(13 * 1 + 9 * 4 + 5 * 4 * 6, 4 * 4 * 7 + 4)  # smallest at 3, next at 2
    assert min1 < Fraction(13, 8)
    A.allocate(phi, w, eps, n, "1.625", scope="layer")
    with pytest.raises(A.InfeasibleBudget, match="1.625"):
        A.allocate(phi, w, eps, n, "1.62", scope="layer")
    # jointly, layer 1's cheap minimum lowers the total minimum
    total_min = Fraction(int(n[0].sum()) * 13 // 8 + (13 * 1 + 9 * 4 + 5 * 4 * 6) * 128 // 4, int(n.sum()))
    alloc = A.allocate(phi, w, eps, n, A.Budget("bpw", total_min), scope="model")
    assert nbytes(alloc.bits, n) * 8 == total_min * int(n.sum())
    with pytest.raises(A.InfeasibleBudget):
        A.allocate(phi, w, eps, n, A.Budget("bpw", total_min - Fraction(1, 10**6)), scope="model")


def test_never_routed_experts_get_one_bit_and_no_nan():
    phi, w, eps, n = instance(5, L=3)
    phi[0, :3] = 0.0           # never routed
    w[1, 5] = 0.0              # routed with zero weight
    phi[2, :] = 0.0            # a whole dead layer
    w[2, :] = 0.0
    for alpha, beta, gamma in ((1, 1, 2), (0, 0, 0), (0, 1, 1), (2, 0, 0.5)):
        for scope in ("layer", "model"):
            alloc = A.allocate(phi, w, eps, n, "4bpw", scope=scope, alpha=alpha, beta=beta, gamma=gamma)
            assert np.isfinite(alloc.objective) and np.isfinite(alloc.layer_objective).all()
            check_constraints(alloc.bits)
            if alpha > 0 and gamma > 0:
                # ample budget, yet zero-importance experts stay low: one takes the forced 2-bit
                # slot (it costs nothing there), the others stay at 1 bit; the live ones get 3
                assert sorted(alloc.bits[0, :3]) == [1, 1, 2] and (alloc.bits[0, 3:] == 3).all()
            if beta > 0 and gamma > 0:
                assert alloc.bits[1, 5] == 2 and (np.delete(alloc.bits[1], 5) == 3).all()
            if alpha > 0 or beta > 0:  # dead layer: cost 0 everywhere -> the cheapest legal layout
                assert sorted(alloc.bits[2]) == [1] * 6 + [2, 3]
    # 0 ** 0 = 1: alpha = 0 ignores phi, so a never-routed expert still counts through w and eps
    alloc = A.allocate(phi, w, eps, n, "4", alpha=0.0, beta=1.0, gamma=2.0)
    assert sorted(alloc.bits[0]) == [2] + [3] * 7  # not [1, 1, 2, ...] as with alpha > 0


def test_surplus_budget_is_not_spent_without_gain():
    phi, w, eps, n = instance(6, L=2)
    eps[0] = 1.0                    # layer 0: width does not matter
    eps[1, :, 1] = eps[1, :, 2]     # layer 1: 3 bits no better than 2
    alloc = A.allocate(phi, w, eps, n, "3.25")
    assert sorted(alloc.bits[0]) == [1] * 6 + [2, 3]
    assert sorted(alloc.bits[1]) == [2] * 7 + [3]  # one 3 is forced by the constraint


def test_bad_inputs():
    phi, w, eps, n = instance(8, L=1)
    with pytest.raises(ValueError, match="multiples of 128"):
        A.allocate(phi, w, eps, 100, "2.5")
    with pytest.raises(ValueError, match="phi"):
        A.allocate(np.where(phi > 0.1, phi, np.nan), w, eps, n, "2.5")
    with pytest.raises(ValueError, match="eps"):
        A.allocate(phi, w, -eps, n, "2.5")
    with pytest.raises(ValueError, match="scope"):
        A.allocate(phi, w, eps, n, "2.5", scope="block")
    with pytest.raises(ValueError, match="alpha"):
        A.allocate(phi, w, eps, n, "2.5", alpha=-1)


@pytest.mark.parametrize("text, unit, value", [
    ("2.5", "bpw", Fraction(5, 2)), ("2.5bpw", "bpw", Fraction(5, 2)), (" 1.625 BPW ", "bpw", Fraction(13, 8)),
    (2.1, "bpw", Fraction(21, 10)), ("22GB", "bytes", 22 * 10**9), ("22GiB", "bytes", 22 * 2**30),
    ("900MB", "bytes", 900 * 10**6), ("123456B", "bytes", 123456), ("1.5gib", "bytes", 3 * 2**29),
    ("2e9B", "bytes", 2 * 10**9), ("0.5KiB", "bytes", 512), (".5TB", "bytes", 5 * 10**11),
])
def test_parse_budget(text, unit, value):
    b = A.parse_budget(text)
    assert (b.unit, b.value) == (unit, value)


@pytest.mark.parametrize("text", ["", "abc", "GB", "2.5 bits", "-2.5", "0", "0GB", "nan", "inf", "2.5.1",
                                  "22Gb/s", "1e", "2.5B", "22000000000", "12 34"])
def test_parse_budget_rejects_garbage(text):
    with pytest.raises(ValueError):
        A.parse_budget(text)
