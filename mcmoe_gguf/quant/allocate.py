"""PMQ bit allocation: the integer program of MC-MoE (ICLR 2025), Sec. 3.2.2, Eq. (4).

For MoE layer l, expert i and width j in {1, 2, 3} bits:

    minimise    sum_{l,i,j} phi[l,i]^alpha * w[l,i]^beta * eps[l,i,j]^gamma * x[l,i,j]
    subject to  sum_j x[l,i,j] = 1                      exactly one width per expert
                sum_i x[l,i,3] >= 1, sum_i x[l,i,2] >= 1  per layer (the paper's accuracy guard)
                sum n[l,i] * REAL_BPW[j] * x[l,i,j]  <=  target * sum n[l,i]     (the budget)
                x binary

phi = access frequency, w = mean routing weight (Sec. 3.2.1), eps[l,i,j] = Frobenius norm of the
layer-output change when only expert i is quantized to j bits (Eq. 3), n = weights per expert.

Where we differ from the paper, and why:
  * The budget counts REAL bits: every 128 weights carry an fp16 scale and an fp16 min, so a b-bit
    expert costs b + 0.25 bits per weight. The paper states the budget in nominal bits.
  * The budget is "<=" (the paper writes "= n*k"): an exact equality is often unreachable with
    unequal expert sizes, and "<=" lets the solver stop spending where spending does not help.
  * Among allocations with the optimal objective we take the one with the fewest bytes (a second
    program), so experts whose error does not depend on the width (e.g. never-routed ones) do not
    soak up the surplus budget.
  * Because of ">= 1 expert at 2 bits", "everything at 3 bits" is never an allocation. The most a
    layer can use is all experts at 3 bits except its smallest at 2 (3.125 real bpw for 8 equal
    experts). Larger budgets are still feasible; the surplus is just not used.
  * scope="model" solves one program over all layers sharing one budget (the paper: scope="layer",
    one program per layer, each layer's average <= target).
  * The paper writes (eps * x)^gamma; for binary x and gamma > 0 that is eps^gamma * x, the linear
    form used here (for gamma = 0 the paper's form would charge every unchosen width 0^0 = 1).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from mcmoe_gguf.quant import formats

WIDTHS = (1, 2, 3)
GROUP = formats.GROUP_SIZE  # weights per quantization group (one fp16 scale + one fp16 min)

# Real bits per weight of a b-bit expert, from the format itself: b + 2 * 16 / 128 (scale + min per group).
REAL_BPW = {b: formats.bpw(b) for b in WIDTHS}

# The paper gives no values in the main text. Its only stated setting is Appendix A.6 / Table 10
# (Mixtral 8x7b, 2 bit, WikiText2): gamma fixed at 2, alpha and beta swept over {1, 1.5, 2}; all
# nine PPLs lie in 5.91-5.96 and the authors note a slight decline once alpha + beta exceeds gamma.
# We take alpha = beta = 1 (PPL 5.92 there) with gamma = 2 (eps^2: squared Frobenius norm).
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 1.0
DEFAULT_GAMMA = 2.0

# Budget in integer "quarter bits" (4 * real bits): 5, 9, 13 per weight. Integers keep the budget
# test exact: n * 1.25 / 8 bytes is a whole number for n a multiple of 128.
_QBITS = np.array([round(4 * REAL_BPW[b]) for b in WIDTHS], dtype=np.int64)
assert all(4 * REAL_BPW[b] == q for b, q in zip(WIDTHS, _QBITS))


class InfeasibleBudget(ValueError):
    """The budget is below the cheapest allocation allowed by the per-layer constraints."""

    def __init__(self, message, minimum, maximum, unit):
        super().__init__(message)
        self.minimum, self.maximum, self.unit = minimum, maximum, unit


# ------------------------------------------------------------------------------------------------
# budgets

@dataclass(frozen=True)
class Budget:
    """A budget for the expert weights: unit "bpw" (real bits per weight, scales counted) or "bytes"."""
    unit: str
    value: Fraction

    def __str__(self):
        return f"{float(self.value):g} real bpw" if self.unit == "bpw" else f"{int(self.value)} bytes"


# Decimal (SI) and binary (IEC) byte multiples; "GB" = 1e9 bytes, "GiB" = 2^30 bytes. Units are
# case-insensitive and always mean bytes (there are no bit units besides "bpw").
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([A-Za-z]*)\s*$")
_MAX_BPW = 32  # a larger "bpw" is almost surely a byte count typed without its unit


def parse_budget(text) -> Budget:
    """"2.5" or "2.5bpw" -> real bpw; "22GB" (1e9), "22GiB" (2^30), "900MB", "123456B" -> bytes."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(text)
    if not isinstance(text, str):
        raise TypeError(f"budget must be a string, a number (bpw) or a Budget, not {type(text).__name__}")
    m = _BUDGET_RE.match(text)
    unit = m.group(3).lower() if m else None
    if m is None or (unit not in _BYTE_UNITS and unit not in ("", "bpw")):
        raise ValueError(f"cannot parse budget {text!r}: expected e.g. '2.5', '2.5bpw', '22GB', '20GiB', "
                         f"'900MB' or '123456B' (units: bpw, B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    # Fraction of the decimal text, not of a float: "1.625" stays exactly 13/8
    value = Fraction(m.group(1)) * Fraction(10) ** int(m.group(2) or 0)
    if value <= 0:
        raise ValueError(f"budget {text!r} must be positive")
    if unit in ("", "bpw"):
        if value > _MAX_BPW:
            raise ValueError(f"budget {text!r} as bits per weight is implausible (> {_MAX_BPW}); "
                             f"for bytes add a unit, e.g. '{m.group(1)}B' or 'GB'")
        return Budget("bpw", value)
    nbytes = value * _BYTE_UNITS[unit]
    if unit == "b" and nbytes.denominator != 1:
        raise ValueError(f"budget {text!r}: a byte count must be whole (did you mean '{m.group(1)}bpw'?)")
    return Budget("bytes", Fraction(math.floor(nbytes)))


def expert_bytes(bits, n_params) -> int:
    """Bytes of the expert weights at these widths (scales counted): sum n * REAL_BPW[b] / 8."""
    bits = np.asarray(bits)
    n = np.broadcast_to(np.asarray(n_params, dtype=np.int64), bits.shape)
    qbits = int((n * _QBITS[bits - 1]).sum())
    return int(Fraction(qbits, 32))  # quarter bits -> bytes; whole for n a multiple of 128


# ------------------------------------------------------------------------------------------------
# the program

@dataclass
class Allocation:
    bits: np.ndarray            # int [L, E], each in {1, 2, 3}
    objective: float            # sum phi^alpha * w^beta * eps^gamma at the chosen widths
    layer_objective: np.ndarray  # float [L], the same sum per layer
    bpw: float                  # real bits per expert weight achieved (scales counted)
    expert_bytes: int           # bytes of all expert weights achieved
    scope: str                  # "layer" (the paper) or "model"
    alpha: float
    beta: float
    gamma: float


def importance(phi, w, alpha=DEFAULT_ALPHA, beta=DEFAULT_BETA):
    """Expert significance phi^alpha * w^beta (Sec. 3.2.1).

    A never-routed expert (phi = 0 or w = 0) has importance 0: its cost is 0 at every width, so the
    program gives it 1 bit unless a per-layer constraint needs it. numpy's 0**0 = 1, so alpha = 0
    means "ignore phi" even for phi = 0 (no NaN: inputs are checked finite and >= 0)."""
    return np.power(phi, alpha) * np.power(w, beta)


def allocate(phi, w, eps, n_params, budget, scope="layer",
             alpha=DEFAULT_ALPHA, beta=DEFAULT_BETA, gamma=DEFAULT_GAMMA) -> Allocation:
    """Per-expert widths in {1, 2, 3} minimising the MC-MoE objective under a real-bit budget.

    phi, w: [L, E]; eps: [L, E, 3] (widths 1, 2, 3); n_params: [L, E] or a scalar, multiples of 128;
    budget: a Budget, a string for parse_budget, or a number (real bpw).
    scope="layer": every layer's real bpw <= target (a byte budget becomes target = 8 * bytes / N);
    scope="model": the total over all layers <= target. Raises InfeasibleBudget below the minimum.
    """
    phi, w, eps, n = _check_inputs(phi, w, eps, n_params, alpha, beta, gamma)
    if scope not in ("layer", "model"):
        raise ValueError(f"scope must be 'layer' or 'model', not {scope!r}")
    budget = parse_budget(budget)
    L, E = phi.shape

    imp = importance(phi, w, alpha, beta)
    # imp == 0 -> cost 0 whatever eps^gamma is (avoids 0 * inf)
    cost = np.where(imp[..., None] > 0, imp[..., None] * np.power(eps, gamma), 0.0)
    if not np.isfinite(cost).all():
        raise ValueError("phi^alpha * w^beta * eps^gamma overflows; rescale eps")

    # Everything as an exact target in real bpw over the expert weights.
    N = int(n.sum())
    target = budget.value if budget.unit == "bpw" else Fraction(8) * budget.value / N
    programs = [[l] for l in range(L)] if scope == "layer" else [list(range(L))]
    _check_feasible(n, programs, target, budget, scope)

    bits = np.zeros((L, E), dtype=np.int64)
    for layers in programs:
        cap = math.floor(4 * target * int(n[layers].sum()))  # quarter bits, floor keeps "<=" exact
        bits[layers] = _solve(cost[layers], n[layers], cap)

    layer_obj = np.take_along_axis(cost, bits[..., None] - 1, axis=2)[..., 0].sum(axis=1)
    nbytes = expert_bytes(bits, n)
    return Allocation(bits=bits, objective=float(layer_obj.sum()), layer_objective=layer_obj,
                      bpw=8 * nbytes / N, expert_bytes=nbytes, scope=scope,
                      alpha=float(alpha), beta=float(beta), gamma=float(gamma))


def _check_inputs(phi, w, eps, n_params, alpha, beta, gamma):
    phi, w, eps = (np.asarray(a, dtype=np.float64) for a in (phi, w, eps))
    if phi.ndim != 2 or w.shape != phi.shape or eps.shape != phi.shape + (3,):
        raise ValueError(f"expected phi, w of shape [L, E] and eps of [L, E, 3]; got {phi.shape}, {w.shape}, {eps.shape}")
    if phi.shape[1] < 2:
        raise ValueError("need >= 2 experts per layer (one at 3 bits and one at 2 bits)")
    for name, a in (("phi", phi), ("w", w), ("eps", eps)):
        if not (np.isfinite(a).all() and (a >= 0).all()):
            raise ValueError(f"{name} must be finite and >= 0")
    for name, p in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not (math.isfinite(p) and p >= 0):
            raise ValueError(f"{name} must be finite and >= 0 (a negative power of a 0 is inf), got {p}")
    n = np.asarray(n_params)
    if not np.issubdtype(n.dtype, np.integer):
        raise ValueError("n_params must be integers")
    n = np.broadcast_to(n.astype(np.int64), phi.shape).copy()
    if (n <= 0).any() or (n % GROUP).any():
        raise ValueError(f"n_params must be positive multiples of {GROUP} (the quantization group)")
    return phi, w, eps, n


def _min_qbits(n_layer):
    """Fewest quarter bits for one layer: its smallest expert at 3 bits, the next at 2, the rest at 1."""
    s = np.sort(n_layer)
    return int(_QBITS[0] * s.sum() + (_QBITS[2] - _QBITS[0]) * s[0] + (_QBITS[1] - _QBITS[0]) * s[1])


def _max_qbits(n_layer):
    """Most quarter bits one layer can use: all at 3 bits but its smallest expert at 2 (>= 1 at 2 bits)."""
    return int(_QBITS[2] * n_layer.sum() - (_QBITS[2] - _QBITS[1]) * n_layer.min())


def _bpw_over(n, layers, qbits_of) -> Fraction:
    """real bpw of one program (these layers) at its extreme"""
    return Fraction(sum(qbits_of(n[l]) for l in layers), 4 * int(n[layers].sum()))


def min_bpw(n_params) -> Fraction:
    """The smallest real expert bpw every layer's program can meet: one expert at 3 bits, one at 2, the
    rest at 1 in every layer, scales counted. n_params: [L, E]."""
    n = np.asarray(n_params, dtype=np.int64)
    return max(_bpw_over(n, [l], _min_qbits) for l in range(n.shape[0]))


def _check_feasible(n, programs, target, budget, scope):
    """Raise InfeasibleBudget, naming the useful range in the user's unit, if a program cannot be met."""
    N = int(n.sum())
    # the smallest target every program can meet, and the target above which none can spend more
    need = max(_bpw_over(n, layers, _min_qbits) for layers in programs)
    full = max(_bpw_over(n, layers, _max_qbits) for layers in programs)
    if target >= need:
        return
    why_lo = "one expert at 3 bits, one at 2, the rest at 1 in every layer, scales counted"
    why_hi = ("every expert at 3 bits except the smallest of each layer at 2, as the constraint requires; "
              "any larger budget is feasible, the surplus unused")
    if budget.unit == "bpw":
        # rounded outwards so that the printed numbers are themselves feasible / saturating
        lo, hi, unit = math.ceil(need * 10**6) / 10**6, math.ceil(full * 10**6) / 10**6, "real bpw"
        msg = (f"budget {float(budget.value):g} real bpw is infeasible (scope={scope}); the useful range is "
               f"{lo:.10g} to {hi:.10g} real bpw: {lo:.10g} = {why_lo}; {hi:.10g} = {why_hi}")
    else:
        lo, hi, unit = math.ceil(need * N / 8), math.ceil(full * N / 8), "bytes"
        msg = (f"budget {int(budget.value)} bytes is infeasible (scope={scope}); the useful range is "
               f"{lo} to {hi} bytes ({lo / 1e9:.4g} to {hi / 1e9:.4g} GB): {lo} = {why_lo}; {hi} = {why_hi}")
    raise InfeasibleBudget(msg, lo, hi, unit)


def _solve(cost, n, cap):
    """One program over layers cost[L', E, 3] with quarter-bit cap; returns bits [L', E]."""
    L, E, _ = cost.shape
    # variable x[l, i, j] at index (l * E + i) * 3 + (j - 1)
    one_hot = np.kron(np.eye(L * E), np.ones((1, 3)))
    at = lambda j: np.kron(np.eye(L), np.kron(np.ones((1, E)), np.eye(3)[j - 1][None]))  # noqa: E731
    qbits = (n[..., None] * _QBITS).reshape(-1)
    g = math.gcd(*qbits.tolist())
    size = (qbits // g).astype(np.float64)  # small integers when experts are equal: 5, 9, 13
    cap_g = cap // g                       # exact: every feasible total is a multiple of g
    # normalise the cost (max 1) so HiGHS's absolute tolerances mean the same at every scale
    scale = cost.max() if cost.max() > 0 else 1.0
    c = cost.reshape(-1) / scale
    rows = [LinearConstraint(one_hot, 1, 1), LinearConstraint(at(3), 1, np.inf),
            LinearConstraint(at(2), 1, np.inf), LinearConstraint(size[None], -np.inf, cap_g)]
    x = _best_then_fewest_bytes(c, size, rows)
    xs = x.reshape(L, E, 3)
    ok = ((xs.sum(2) == 1).all() and (xs[..., 2].sum(1) >= 1).all() and (xs[..., 1].sum(1) >= 1).all()
          and int((x * qbits).sum()) <= cap)
    if not ok:
        raise RuntimeError("HiGHS returned an allocation that violates the constraints")
    return xs.argmax(2) + 1


def _best_then_fewest_bytes(c: np.ndarray, size: np.ndarray, rows: list, infeasible=None) -> np.ndarray:
    """Binary x minimising c @ x under `rows`; among (numerically) optimal x, the one of fewest bytes
    (size @ x), by a second program with the objective bounded by the first's optimum. infeasible: the
    exception to raise when HiGHS proves the program infeasible (else the caller knows it is feasible)."""
    opts = {"disp": False, "mip_rel_gap": 0.0}

    def run(objective, constraints):
        r = milp(objective, constraints=constraints, integrality=np.ones(len(c)), bounds=Bounds(0, 1), options=opts)
        if r.status == 2 and infeasible is not None:
            raise infeasible()
        if r.status != 0:
            raise RuntimeError(f"HiGHS failed on a feasible program: {r.message}")
        return np.round(r.x).astype(np.int64)

    x = run(c, rows)
    best = float(c @ x)
    x2 = run(size.astype(np.float64), rows + [LinearConstraint(c[None], -np.inf, best + 1e-9)])
    return x2 if c @ x2 <= best + 1e-6 else x


# ------------------------------------------------------------------------------------------------
# the ladder: one type per (layer, expert, projection) out of any set of types (quant/ladder.py)

@dataclass
class LadderAllocation:
    choice: np.ndarray          # int [L, E, P]: index into the ladder's types
    objective: float            # sum phi^alpha * w^beta * eps^gamma at the chosen types
    bpw: float                  # real bits per expert weight achieved
    expert_bytes: int
    scope: str
    granularity: str
    extra: np.ndarray | None = None     # int [N]: the choice of each extra item (allocate_ladder's extra)
    extra_bytes: int = 0                # their bytes


class SlowerThanFloor(ValueError):
    """No choice within the byte budget decodes as fast as the speed floor asks."""


def allocate_ladder(phi, w, eps, nbytes, n_params, budget, scope="layer", granularity="projection",
                    alpha=DEFAULT_ALPHA, beta=DEFAULT_BETA, gamma=DEFAULT_GAMMA, speed=None,
                    layer_scale=None, extra=None) -> LadderAllocation:
    """Types minimising sum_{l,e,p} s[l] phi^alpha w^beta eps[l,e,p,t]^gamma under a real-byte budget.

    layer_scale: s [L] >= 0, each layer's exchange rate from eps^gamma to output damage (quant/sensitivity.py);
    None: 1 for every layer. Only a model-scope program compares layers, so only there does it matter.

    speed: optional (us [P, T], floor [P]): the decode cost of one mat-vec of projection p in type t
    (test-backend-ops, engine/kernel_costs.py) and that of the reference type (e.g. q2_K). A decoded
    token runs the experts it is routed to, expert e of layer l with probability ~ phi[l, e], so each
    program adds: sum_{l,e,p} phi[l,e] * us[p, t_lep] <= sum_{l,e} phi[l,e] * sum_p floor[p], i.e. the
    expected mat-vec time of the routed experts is no more than that of a file all in the reference type
    (SlowerThanFloor when no choice within the budget is that fast).

    phi, w: [L, E]; eps: [L, E, P, T]; nbytes: int [P, T] (bytes of one expert's projection p in type t;
    the same for every expert); n_params: [L, E] weights per expert (the bpw budget's denominator).
    granularity="expert": one type for all P projections of an expert (costs and bytes summed);
    "layer": one type per (layer, projection) for all its experts, as stock llama.cpp's merged expert
    tensors need (costs and bytes summed over the experts)
    No per-layer width guard: unlike the paper's three widths of one grid, a ladder's cheapest types are
    not all alike, and the measured eps already says where bytes pay. Among optimal choices the one with
    the fewest bytes (as `allocate`).

    extra: optional (cost [N, U], size int [N, U], cap_bytes): N more items that share the model program's
    byte cap, which grows by cap_bytes: the tensors outside the experts (quant/mix_choice.py), their costs in
    the experts' units (with layer_scale in KL, both are KL). scope="model" only; U may differ from T."""
    phi, w = (np.asarray(a, dtype=np.float64) for a in (phi, w))
    eps = np.asarray(eps, dtype=np.float64)
    nbytes = np.asarray(nbytes, dtype=np.int64)
    if scope not in ("layer", "model"):
        raise ValueError(f"scope must be 'layer' or 'model', not {scope!r}")
    if granularity not in ("projection", "expert", "layer"):
        raise ValueError(f"granularity must be 'projection', 'expert' or 'layer', not {granularity!r}")
    if eps.ndim != 4 or eps.shape[:2] != phi.shape or w.shape != phi.shape or nbytes.shape != eps.shape[2:]:
        raise ValueError(f"expected phi, w [L, E], eps [L, E, P, T], nbytes [P, T]; got {phi.shape}, {w.shape}, "
                         f"{eps.shape}, {nbytes.shape}")
    for name, a in (("phi", phi), ("w", w), ("eps", eps)):
        if not (np.isfinite(a).all() and (a >= 0).all()):
            raise ValueError(f"{name} must be finite and >= 0")
    if (nbytes <= 0).any():
        raise ValueError("every type must cost bytes")
    L, E, P, T = eps.shape
    n = np.broadcast_to(np.asarray(n_params, dtype=np.int64), (L, E))
    imp = importance(phi, w, alpha, beta)
    if layer_scale is not None:
        layer_scale = np.asarray(layer_scale, dtype=np.float64)
        if layer_scale.shape != (L,) or not (np.isfinite(layer_scale).all() and (layer_scale >= 0).all()):
            raise ValueError(f"layer_scale must be {L} finite values >= 0, one per layer; got shape {layer_scale.shape}")
        imp = imp * layer_scale[:, None]
    cost = np.where(imp[..., None, None] > 0, imp[..., None, None] * np.power(eps, gamma), 0.0)
    if not np.isfinite(cost).all():
        raise ValueError("phi^alpha * w^beta * eps^gamma overflows; rescale eps")
    full_cost = cost
    cost, size = _items(cost, np.broadcast_to(nbytes, (L, E, P, T)), granularity)
    target, programs = check_ladder_budget(nbytes, n, budget, scope, granularity)
    time = None
    if speed is not None:
        us, floor = (np.asarray(a, dtype=np.float64) for a in speed)
        if us.shape != (P, T) or floor.shape != (P,) or not (np.isfinite(us).all() and (us > 0).all()):
            raise ValueError(f"speed: expected positive us [P, T] = {(P, T)} and floor [P]; got {us.shape}, {floor.shape}")
        time, _ = _items(phi[..., None, None] * np.broadcast_to(us, (L, E, P, T)), np.zeros((L, E, P, T)), granularity)
    choice = np.zeros(cost.shape[:3], dtype=np.int64)
    ex = _check_extra(extra, scope, time)
    extra_choice = None
    for ls in programs:
        cap = math.floor(target * int(n[ls].sum()) / 8)         # bytes; floor keeps "<=" exact
        lim = None
        if time is not None:
            lim = (time[ls].reshape(-1, T), float(phi[ls].sum() * floor.sum()))
        c, sz = cost[ls].reshape(-1, T), size[ls].reshape(-1, T)
        if ex is None:
            choice[ls] = _solve_choices(c, sz, cap, lim).reshape(choice[ls].shape)
            continue
        (xc, xs, xcap), k = ex, c.shape[0]
        c, sz, xc_p, xs_p = _pad_columns(c, sz, xc, xs)
        pick = _solve_choices(np.concatenate([c, xc_p]), np.concatenate([sz, xs_p]), cap + xcap)
        choice[ls] = np.minimum(pick[:k], T - 1).reshape(choice[ls].shape)
        extra_choice = np.minimum(pick[k:], xc.shape[1] - 1)
    if granularity == "expert":
        choice = np.repeat(choice, P, axis=2)
    elif granularity == "layer":
        choice = np.repeat(choice, E, axis=1)
    obj = float(np.take_along_axis(full_cost, choice[..., None], axis=3).sum())
    nb = int(np.take_along_axis(np.broadcast_to(nbytes, (L, E, P, T)), choice[..., None], axis=3).sum())
    xb = 0 if extra_choice is None else int(np.take_along_axis(ex[1], extra_choice[:, None], 1).sum())
    return LadderAllocation(choice, obj, 8 * nb / int(n.sum()), nb, scope, granularity, extra_choice, xb)


def _check_extra(extra, scope, time):
    if extra is None:
        return None
    if scope != "model":
        raise ValueError("extra items join the model's one program: they need scope='model'")
    if time is not None:
        raise ValueError("a speed floor with extra items is not supported (the floor counts expert mat-vecs only)")
    xc, xs, xcap = extra
    xc, xs = np.asarray(xc, dtype=np.float64), np.asarray(xs, dtype=np.int64)
    if xc.ndim != 2 or xc.shape != xs.shape or xc.shape[1] < 1:
        raise ValueError(f"extra: expected cost and size [N, U]; got {xc.shape}, {xs.shape}")
    if not (np.isfinite(xc).all() and (xc >= 0).all()) or (xs <= 0).any() or int(xcap) < 0:
        raise ValueError("extra: costs must be finite and >= 0, sizes > 0 and the added cap >= 0")
    return xc, xs, int(xcap)


def _pad_columns(*mats):
    """Cost/size matrices of different widths as one width: each row repeats its last column (a copy of a
    choice changes no optimum; the caller maps an index past a row's width back to its last column)."""
    W = max(m.shape[1] for m in mats)
    return [np.concatenate([m, np.repeat(m[:, -1:], W - m.shape[1], 1)], 1) if m.shape[1] < W else m for m in mats]


def _items(cost: np.ndarray, size: np.ndarray, granularity: str) -> tuple[np.ndarray, np.ndarray]:
    """[L, E, P, T] costs and bytes as the program's items: summed over the projections of an expert
    ("expert") or over the experts of a (layer, projection) ("layer")."""
    if granularity == "expert":
        return cost.sum(2, keepdims=True), size.sum(2, keepdims=True)
    if granularity == "layer":
        return cost.sum(1, keepdims=True), size.sum(1, keepdims=True)
    return cost, size


def check_ladder_budget(nbytes, n_params, budget, scope="layer", granularity="projection"):
    """(target real bpw, programs) of a ladder's budget, or InfeasibleBudget naming the useful range; needs
    only the types' bytes (nbytes [P, T]) and n_params [L, E], so a run can refuse before any work."""
    n = np.asarray(n_params, dtype=np.int64)
    nbytes = np.asarray(nbytes, dtype=np.int64)
    L, E = n.shape
    size = _items(np.zeros((L, E) + nbytes.shape), np.broadcast_to(nbytes, (L, E) + nbytes.shape), granularity)[1]
    budget = parse_budget(budget)
    target = budget.value if budget.unit == "bpw" else Fraction(8) * budget.value / int(n.sum())
    programs = [[l] for l in range(L)] if scope == "layer" else [list(range(L))]
    lo = max(Fraction(8 * int(size[ls].min(-1).sum()), int(n[ls].sum())) for ls in programs)
    hi = max(Fraction(8 * int(size[ls].max(-1).sum()), int(n[ls].sum())) for ls in programs)
    if target < lo:
        lo_f, hi_f = math.ceil(lo * 10**6) / 10**6, math.ceil(hi * 10**6) / 10**6
        raise InfeasibleBudget(f"budget {float(target):.6g} real expert bpw is infeasible for this ladder "
                               f"(scope={scope}); the useful range is {lo_f:.10g} (every projection in the "
                               f"ladder's cheapest type) to {hi_f:.10g} (every one in its widest)",
                               lo_f, hi_f, "real bpw")
    return target, programs


def _solve_choices(cost: np.ndarray, size: np.ndarray, cap: int, time=None) -> np.ndarray:
    """Multiple-choice knapsack: one column per row of cost [N, T] (sizes int [N, T]), total size <= cap;
    time = (t [N, T], limit): also sum of the chosen t <= limit."""
    N, T = cost.shape
    g = math.gcd(*size.reshape(-1).tolist()) or 1      # every total is a multiple of g: cap // g is exact
    sz = (size // g).reshape(-1).astype(np.float64)
    cap_g = cap // g
    scale = cost.max() if cost.max() > 0 else 1.0
    c = cost.reshape(-1) / scale
    one_hot = sparse.kron(sparse.eye(N), np.ones((1, T)), format="csr")     # 9216 columns at Mixtral scope=model
    rows = [LinearConstraint(one_hot, 1, 1), LinearConstraint(sz[None], -np.inf, cap_g)]
    if time is not None:
        t, limit = time
        # the fastest choice alone, whatever its bytes, already says whether the floor can hold
        t_scale = limit if limit > 0 else 1.0
        rows.append(LinearConstraint(t.reshape(1, -1) / t_scale, -np.inf, 1.0 + 1e-9))
        fastest = t.min(1).sum()
        if fastest > limit * (1 + 1e-9):
            raise SlowerThanFloor(f"speed floor unreachable: even the fastest types decode at {fastest / limit:.3f}x "
                                  "the floor's time")
    x = _best_then_fewest_bytes(c, sz, rows, infeasible=lambda: SlowerThanFloor(
        "speed floor unreachable within the byte budget: the types fast enough do not fit; "
        "raise the budget or lower the floor"))
    xs = x.reshape(N, T)
    if not ((xs.sum(1) == 1).all() and int((xs * size).sum()) <= cap):
        raise RuntimeError("HiGHS returned a choice that violates the constraints")
    return xs.argmax(1)
