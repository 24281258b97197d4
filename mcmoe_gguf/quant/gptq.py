"""GPTQ (Frantar et al., 2022) onto the 1/2/3-bit group-128 grid of `formats`.

One small class in the style of IST-DASLab's gptq.py: collect the layer Hessian H = 2/N sum_t x_t x_t^T from
calibration inputs (`add_batch`), then quantize W [out, in] column by column (`quantize`); the rounding error of
each column is pushed onto the columns not yet quantized through the upper Cholesky factor of H^-1 (optimal brain
surgeon, one column at a time, shared by every row).

The grid is the stored one: groups of 128 consecutive input columns, per (row, group) an fp16 scale d and min m,
value = m + d*q with q in [0, 2^bits - 1]. Parameters come from `formats.fit_params` and every column is rounded
by `formats.quantize_column`, so the codes GPTQ chooses are exactly the codes that get written to the file and
`dequantized` is exactly what the runtime will compute from them.

Deviations from the MC-MoE reference code (deliberate):
  * Its GPTQ skips the in-block error feedback (the `W1[:, i:] -= ...` update) for layers at <= 3 bits and only
    propagates errors lazily between blocks. That throws away most of GPTQ's compensation exactly where rounding
    errors are largest. Here the in-block update always runs; `_inblock_feedback=False` exists only so the tests
    can measure what it is worth.
  * An expert that received no calibration token (H == 0) falls back to round-to-nearest on the same grid instead
    of producing NaNs (H^-1 does not exist; any damping would make GPTQ degenerate to RTN anyway).
  * A Cholesky failure is retried with 10x more damping (up to 10x the mean diagonal) before giving up.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mcmoe_gguf.quant import formats, trellis

GROUP = formats.GROUP_SIZE  # 128 input columns per (scale, min) pair: the stored layout's group
MAX_PERCDAMP = 10.0         # Cholesky retries stop once the damping exceeds 10x the mean diagonal of H
MCN_SHRINK = {2: 0.3, 3: 0.0}   # quantize_mcn's Hessian per width: (1 - s) H + s diag(H) (see quantize_mcn)


class GPTQError(RuntimeError):
    """The damped Hessian could not be factorized (not positive definite even with heavy damping)."""


@dataclass
class GPTQResult:
    codes: torch.Tensor        # uint8 [out, in], q in [0, 2^bits - 1]
    scale: torch.Tensor        # float32 [out, in/128], values exactly representable in fp16
    mn: torch.Tensor           # float32 [out, in/128], likewise
    dequantized: torch.Tensor  # float32 [out, in] == mn + scale * codes, group by group
    stats: dict = field(default_factory=dict)


@dataclass
class McnResult:
    codes: torch.Tensor        # uint8 [out, in]: indices into mcn's level table, or mct's trellis bits
    d: object                  # float32 numpy [out, in/256], exact fp16 values
    s: object                  # uint8 numpy [out, in/32], 0..15
    dequantized: torch.Tensor  # float32 [out, in] == formats.mcn_values / trellis.mct_values(codes, d, s)
    stats: dict = field(default_factory=dict)


def _check(W: torch.Tensor, bits: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(W.shape)}")
    if W.shape[1] % GROUP:
        raise ValueError(f"input dimension {W.shape[1]} is not a multiple of the group size {GROUP}")
    if bits not in formats.TYPES:
        raise ValueError(f"bits must be one of {sorted(formats.TYPES)}, got {bits}")
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or Inf")


def rtn(W: torch.Tensor, bits: int, param_method: str = "mse") -> GPTQResult:
    """Round-to-nearest on the same grid (parameters from the original weights), as a baseline and fallback."""
    t0 = time.perf_counter()
    W = W.detach().to(torch.float32)
    _check(W, bits)
    scale, mn = formats.fit_params(W, bits, method=param_method)
    codes = formats.quantize_codes(W, scale, mn, bits)
    deq = formats.dequantize_codes(codes, scale, mn)
    return GPTQResult(codes, scale, mn, deq, {
        "method": "rtn", "bits": bits, "param_method": param_method,
        "seconds": time.perf_counter() - t0})


def _inverse_cholesky_upper(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Damp H in place (percdamp * mean diag on the diagonal) and return (upper Cholesky factor of H^-1, percdamp
    actually used). On failure the damping is raised 10x and retried, up to MAX_PERCDAMP."""
    mean_diag = torch.mean(torch.diag(H)).item()
    frac, applied = percdamp, 0.0
    while True:
        H.diagonal().add_((frac - applied) * mean_diag)   # incremental: H is our working copy
        applied = frac
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, frac
        nxt = frac * 10 if frac > 0 else 1e-4
        if nxt > MAX_PERCDAMP:
            raise GPTQError(
                f"Hessian not positive definite even with damping {frac:g} x mean diagonal ({mean_diag:g}); "
                "the calibration inputs are probably broken (check for huge or degenerate activations)")
        frac = nxt


class GPTQ:
    """Hessian of one linear layer's inputs and the GPTQ quantizer that uses it.

    H is accumulated in float64 (default `dtype`): it is a running mean over up to ~10^5 routed tokens, rescaled
    at every batch, and for a rarely routed expert with fewer tokens than inputs (down_proj has 14336) it is rank
    deficient, so after 1 % damping its small eigenvalues sit just above rounding noise; float64 keeps the
    Cholesky from failing or going inaccurate on such matrices. On CPU it costs ~2x the x^T x time of float32 and
    8*n_in^2 bytes (1.6 GB at n_in = 14336); pass dtype=torch.float32 if that matters more. The column loop of
    `quantize` runs in float32 like the reference (the grid and the stored weights are float32/fp16 anyway).

    One instance can quantize several weights that share its inputs (gate and up projections of an expert):
    `quantize` works on copies and never modifies H.
    """

    def __init__(self, n_in: int, device="cpu", dtype: torch.dtype = torch.float64):
        self.n_in = n_in
        self.device = torch.device(device)
        self.dtype = dtype
        self.H = torch.zeros(n_in, n_in, dtype=dtype, device=self.device)
        self.nsamples = 0   # tokens seen (a count, whatever their weights)
        self._factor = None  # (key, H^-1's upper Cholesky factor, damping used): see quantize

    def add_batch(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add tokens x [..., n_in]. H becomes 2/N sum_t w_t x_t x_t^T over all N tokens seen so far (w_t = 1 by
        default), the Hessian of mean_t w_t ||(W - Wq) x_t||^2. For the error of an expert's gated output
        g_t * W x_t, pass weight = g_t ** 2. Tokens with weight 0 still count in N (this only scales H, which
        GPTQ is invariant to apart from the relative damping)."""
        x = x.detach().reshape(-1, self.n_in).to(self.device, self.dtype)
        k = x.shape[0]
        if k == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError("calibration inputs contain NaN or Inf")
        if weight is not None:
            weight = weight.detach().reshape(-1).to(self.device, self.dtype)
            if weight.shape[0] != k:
                raise ValueError(f"{weight.shape[0]} weights for {k} tokens")
            if (weight < 0).any() or not torch.isfinite(weight).all():
                raise ValueError("token weights must be finite and >= 0")
            x = x * weight.sqrt().unsqueeze(1)
        self.H *= self.nsamples / (self.nsamples + k)
        self.nsamples += k
        x = math.sqrt(2 / self.nsamples) * x
        self.H.addmm_(x.t(), x)

    def _hinv(self, dead: torch.Tensor, perm: torch.Tensor | None, percdamp: float, act_order: bool,
              shrink: float = 0.0):
        """(upper Cholesky factor of the damped H^-1 in processing order, damping used), cached: see quantize.
        shrink: the factor of (1 - shrink) H + shrink diag(H) instead (quantize_mcn)."""
        key = (self.H, self.H._version, float(percdamp), bool(act_order), float(shrink))
        if self._factor is None or not (self._factor[0][0] is key[0] and self._factor[0][1:] == key[1:]):
            self._factor = None                        # free the old factor before building the new one
            H = self.H.clone()
            if shrink:
                H.mul_(1 - shrink).diagonal().add_(shrink * torch.diag(self.H))
            H[dead, dead] = 1              # keeps H invertible
            if act_order:
                H = H[perm][:, perm]
            U, damp = _inverse_cholesky_upper(H, percdamp)
            del H
            self._factor = (key, U.to(torch.float32), damp)
        return self._factor[1], self._factor[2]

    def quantize_mcn(self, W: torch.Tensor, bits: int, blocksize: int = 128, percdamp: float = 0.01,
                     act_order: bool = True, unshrink: bool = True, shrink: float | None = None) -> McnResult:
        """GPTQ-quantize W [out, n_in] into the mcn table type of `bits` (formats.mcn_*, issue 14).

        The scales are fixed first (formats.mcn_fit, the reference quantizer's weighted fit with diag(H) as the
        importance, from the original W), then GPTQ chooses every code: each column rounded to the nearest level
        of its slice's step d * s_j, the error pushed onto the columns not yet rounded. Static scales make
        act-order free (columns by decreasing H diagonal; the stored layout is untouched). Without calibration
        tokens (H == 0) it is the reference quantizer's nearest rounding. unshrink: rescale each row's scales
        afterwards so its output error is uncorrelated with its output (see _unshrink).

        shrink: the error feedback runs on (1 - shrink) H + shrink diag(H). H is estimated from the tokens routed
        to one expert, a few per input dimension (a down projection: ~7 per dimension on the bench model, ~5 in
        Mixtral at 128 x 2048 calibration tokens), and GPTQ hides error in the directions those tokens happen to
        miss, which held-out tokens do not (bench model, layer 0: down projection error 0.022 on calibration
        tokens, 0.035 held out). Pulling H toward its diagonal trusts its off-diagonal part less. Default
        (None): MCN_SHRINK of the width. 0.3 took mcn2's layer cost from x1.031 to x1.029 (layer 0) and x1.0036
        to x1.0017 (layer 2; IQ2_XXS: x1.026 and x1.0073); for mcn3 it cost in layer 0 (x1.0039 -> x1.0068),
        so mcn3 keeps H (docs/RESULTS.md, "GPTQ into an 8-weight vector codebook"). The unshrink uses H."""
        t0 = time.perf_counter()
        spec = formats.mcn_spec(bits)
        shrink = MCN_SHRINK[spec.bits] if shrink is None else float(shrink)
        if not 0 <= shrink <= 1:
            raise ValueError(f"shrink must be in [0, 1], got {shrink}")
        W = self._weight(W)
        out, n = W.shape
        if not torch.any(self.H):
            codes, d, s = formats.mcn_unpack(formats.mcn_quantize(W.cpu(), spec.bits), spec.bits, n)
            codes = torch.from_numpy(codes)
            deq = torch.from_numpy(formats.mcn_values(codes, d, s, spec.bits)).to(self.device)
            return McnResult(codes, d, s, deq, {"method": "rtn", "type": spec.name, "nsamples": self.nsamples,
                                                "fallback": "no calibration tokens (H == 0): round-to-nearest",
                                                "seconds": time.perf_counter() - t0})
        diag = torch.diag(self.H).clone()
        dead = diag == 0                   # inputs that were 0 on every token: their weights do not matter
        W[:, dead] = 0
        W0 = W.clone()
        d, s = formats.mcn_fit(W.cpu(), spec.bits, diag.clamp_min(0).float().cpu().numpy())
        step = torch.from_numpy(formats.mcn_step(d, s)).to(self.device, torch.float32)   # [out, n/32]
        levels = torch.tensor(formats.MCN_LEVELS[spec.bits], dtype=torch.float32, device=self.device)
        mids = (levels[:-1] + levels[1:]) / 2
        perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
        if perm is not None:
            W = W[:, perm]
            slice_of = perm // formats.MCN_SUB
        else:
            slice_of = torch.arange(n, device=self.device) // formats.MCN_SUB
        Hinv, damp_used = self._hinv(dead, perm, percdamp, act_order, shrink)
        codes = torch.zeros(out, n, dtype=torch.uint8, device=self.device)
        losses = torch.zeros(out, dtype=torch.float64, device=self.device)
        for i1 in range(0, n, blocksize):
            i2 = min(i1 + blocksize, n)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                w = W1[:, i]
                st = step[:, slice_of[i1 + i]]
                c = torch.bucketize(torch.where(st > 0, w / st, torch.zeros_like(w)), mids, right=False)
                c = torch.where(st > 0, c, torch.zeros_like(c))
                q = st * levels[c]
                codes[:, i1 + i] = c.to(torch.uint8)
                err = (w - q) / Hinv1[i, i]
                losses += (err.double() ** 2) / 2
                W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
        codes = codes.cpu()
        stats = {"method": "gptq", "type": spec.name, "act_order": act_order, "blocksize": blocksize, "shrink": shrink,
                 "percdamp": damp_used, "n_dead": int(dead.sum()), "nsamples": self.nsamples,
                 "loss": float(losses.sum())}
        if unshrink:
            d, c = self._unshrink(W0, formats.mcn_values(codes, d, s, spec.bits), d)
            stats["unshrink"] = [float(c.min()), float(c.mean()), float(c.max())]
        deq = torch.from_numpy(formats.mcn_values(codes, d, s, spec.bits)).to(self.device)
        stats["seconds"] = time.perf_counter() - t0
        return McnResult(codes, d, s, deq, stats)

    def quantize_mct(self, W: torch.Tensor, bits: int, percdamp: float = 0.01, unshrink: bool = True,
                     shrink: float = 0.3) -> McnResult:
        """BlockLDLQ of W [out, n_in] into the trellis type mct<bits> (trellis.py, issue 14).

        The scales are fixed first (trellis.mct_fit with diag(H) as the importance). Then, one block of 64 columns
        at a time (a trellis sequence: its codes are chosen together, so the block is the unit of GPTQ's
        feedback, as BlockLDLQ does for codebooks), every row's sequence is the Viterbi path that minimises the
        block's error under the diagonal of the block's own error metric (U_BB^-1 U_BB^-T, U the upper Cholesky
        factor of H^-1), and the block's error is fed to the columns not yet rounded through U. The stored column
        order is kept (no act-order: a sequence is 64 stored neighbours). shrink: H pulled toward its diagonal
        as for mcn2 (its study: 0.3 pays in layer 0 of the bench model). Without calibration tokens (H == 0) it is
        the reference quantizer. unshrink: each row's d rescaled as quantize_mcn does."""
        t0 = time.perf_counter()
        spec = trellis.mct_spec(bits)
        W = self._weight(W)
        out, n = W.shape
        if not torch.any(self.H):
            codes, d, s = trellis.mct_unpack(trellis.mct_quantize(W.cpu(), spec.bits), spec.bits, n)
            deq = torch.from_numpy(trellis.mct_values(codes, d, s, spec.bits)).to(self.device)
            return McnResult(torch.from_numpy(codes), d, s, deq,
                             {"method": "rtn", "type": spec.name, "nsamples": self.nsamples,
                              "fallback": "no calibration tokens (H == 0): the reference quantizer",
                              "seconds": time.perf_counter() - t0})
        diag = torch.diag(self.H).clone()
        dead = diag == 0
        W[:, dead] = 0
        W0 = W.clone()
        d, s = trellis.mct_fit(W.cpu(), spec.bits, diag.clamp_min(0).float().cpu().numpy())
        step = torch.from_numpy(trellis.mct_step(d, s)).to(self.device, torch.float32)
        table = torch.from_numpy(trellis.mct_table()).to(self.device, torch.float32)
        U, damp_used = self._hinv(dead, None, percdamp, False, shrink)
        codes = torch.zeros(out, n, dtype=torch.uint8)
        for i1 in range(0, n, trellis.MCT_SEQ):
            i2 = i1 + trellis.MCT_SEQ
            Ubi = torch.linalg.inv(U[i1:i2, i1:i2])
            metric = (Ubi * Ubi).sum(1)                              # diag(Ubi Ubi^T)
            st = step[:, i1:i2]
            c = trellis.tail_biting_codes(W[:, i1:i2], st, metric.expand(out, -1), spec.bits)
            codes[:, i1:i2] = c.to(torch.uint8)
            states = torch.from_numpy(trellis.mct_states(c.numpy().astype(np.uint8), spec.bits).astype(np.int64))
            q = st * table[states]
            W[:, i2:] -= ((W[:, i1:i2] - q) @ Ubi) @ U[i1:i2, i2:]
        stats = {"method": "gptq", "type": spec.name, "blocksize": trellis.MCT_SEQ, "shrink": shrink,
                 "percdamp": damp_used, "n_dead": int(dead.sum()), "nsamples": self.nsamples}
        if unshrink:
            d, c = self._unshrink(W0, trellis.mct_values(codes, d, s, spec.bits), d)
            stats["unshrink"] = [float(c.min()), float(c.mean()), float(c.max())]
        deq = torch.from_numpy(trellis.mct_values(codes, d, s, spec.bits)).to(self.device)
        stats["seconds"] = time.perf_counter() - t0
        return McnResult(codes, d, s, deq, stats)

    def _weight(self, W: torch.Tensor) -> torch.Tensor:
        """A float32 copy of W [out, n_in] on the device, checked (shape, finite): the quantizers change it."""
        W = W.detach().to(self.device, torch.float32).clone()
        if W.dim() != 2 or W.shape[1] != self.n_in:
            raise ValueError(f"expected a weight [out, {self.n_in}], got shape {tuple(W.shape)}")
        if not torch.isfinite(W).all():
            raise ValueError("weight contains NaN or Inf")
        return W

    def _unshrink(self, W, values, d):
        """Scale each row's super-block scales so that the row's output error is uncorrelated with its output
        on the calibration tokens: c_r = (W H W^T)_rr / (Q H W^T)_rr. Rounding to a coarse table is a shrinking
        estimate (an MSE-optimal quantizer returns cell means: <Q, W> = |Q|^2 < |W|^2), so every pre-activation
        comes out ~5-10% too small at 2 bits. That error is coherent across neurons and tokens, and through
        SiLU(gate) * up and the down projection it costs far more than its share of the MSE: on the bench
        model's first layer the whole MoE output error of GPTQ'd mcn2 drops from 0.069 to the i-quants' level
        and the layer's PPL cost by 2/3 (docs/RESULTS.md, "the mcn types judged end to end").
        values: the dequantized weights (float32 numpy [out, n]) on d, the fp16 d per 256 of an mcn / mct type."""
        c = self._row_gain(W, torch.from_numpy(values))
        return formats._to_fp16(torch.from_numpy(d * c[:, None])).numpy(), c

    def _row_gain(self, W, Q) -> np.ndarray:
        """float32 [out]: c_r = (W H W^T)_rr / (Q H W^T)_rr, clamped to [0.5, 2] (1 where undefined)."""
        Wd, Q = W.to(self.device, self.dtype), Q.to(self.device, self.dtype)
        HW = Wd @ self.H                                 # [out, n]
        num = (HW * Wd).sum(1)
        den = (HW * Q).sum(1)
        ok = (den > 0) & (num > 0)
        c = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num)).clamp(0.5, 2.0)
        return c.float().cpu().numpy()

    def quantize(self, W: torch.Tensor, bits: int, blocksize: int = 128, percdamp: float = 0.01,
                 act_order: bool = False, param_method: str = "mse", static_groups: bool | None = None,
                 unshrink: bool = False, *, _inblock_feedback: bool = True) -> GPTQResult:
        """GPTQ-quantize W [out, n_in] to `bits` on the group-128 grid.

        Group parameters: by default each group's (scale, min) is fitted, with `param_method`, to the current
        error-updated weights of its 128 columns when the algorithm reaches the group's first column (standard
        groupwise GPTQ), so the group absorbs the compensation pushed onto it.

        act_order=True processes columns by decreasing H diagonal (most active inputs first, while most freedom is
        left to compensate). Groups must still be the stored layout's contiguous 128 columns in original order,
        and in permuted order a group's columns are scattered over the whole run, so there is no "first column"
        at which to fit it from updated weights. We therefore use static groups (GPTQ's `static_groups`): all
        groups' parameters are fitted up front from the original W, then only the codes are chosen by GPTQ. (The
        alternative, act-order with dynamic groups, needs a g_idx permutation at inference; our format has none.)
        `static_groups=True` may also be used without act_order; act_order with static_groups=False is refused.

        unshrink: afterwards scale each row's (scale, min) pairs by c_r = (W H W^T)_rr / (Q H W^T)_rr, the codes
        unchanged, as quantize_mcn does (see _unshrink): the affine grid shrinks too (bench model layer 0: mcq2
        costs x1.077 against mcn2's x1.031 with it).
        """
        t0 = time.perf_counter()
        W = W.detach().to(self.device, torch.float32).clone()
        _check(W, bits)
        out, n = W.shape
        if n != self.n_in:
            raise ValueError(f"weight has {n} inputs, the Hessian {self.n_in}")
        if not (blocksize % GROUP == 0 or GROUP % blocksize == 0):
            # guarantees that when a group starts, its columns are all up to date (see below)
            raise ValueError(f"blocksize must divide or be a multiple of {GROUP}, got {blocksize}")
        if static_groups is None:
            static_groups = act_order
        if act_order and not static_groups:
            raise ValueError("act_order needs static_groups: the stored groups are contiguous in original order")

        if not torch.any(self.H):
            # No calibration token reached this layer (e.g. an expert never routed): there is no error to
            # weight, H^-1 does not exist, so round to nearest on the same grid.
            res = rtn(W, bits, param_method)
            res.stats.update(fallback="no calibration tokens (H == 0): round-to-nearest",
                             nsamples=self.nsamples)
            return res

        diag = torch.diag(self.H).clone()
        dead = diag == 0                   # inputs that were exactly 0 on every token
        diag[dead] = 1
        W[:, dead] = 0                     # these inputs contribute nothing to the error, so (as the reference
                                           # does) their weights are simply dropped to 0
        W_orig = W.clone() if unshrink else None

        n_groups = n // GROUP
        if static_groups:
            scale, mn = formats.fit_params(W, bits, method=param_method)
        else:
            scale = torch.zeros(out, n_groups, dtype=torch.float32, device=W.device)
            mn = torch.zeros_like(scale)

        if act_order:
            perm = torch.argsort(diag, descending=True, stable=True)
            W = W[:, perm]
            group_of = (perm // GROUP).tolist()       # stored group of the column at each processing position
        else:
            perm = None
            group_of = [j // GROUP for j in range(n)]

        # H's inverse Cholesky factor depends on H, the damping and the order only: computed once and reused
        # by every width quantized with the same Hessian (the ladder's three mcq widths; O(n^3) at n = 14336).
        # Keyed by H itself (the factor holds a reference, so `is` cannot be fooled by a reused address) and
        # torch's version counter, so any change to H (add_batch, an in-place edit, an assignment) computes
        # it anew.
        Hinv, damp_used = self._hinv(dead, perm, percdamp, act_order)

        Q = torch.zeros_like(W)
        codes = torch.zeros(out, n, dtype=torch.uint8, device=W.device)
        losses = torch.zeros(out, dtype=torch.float64, device=W.device)

        for i1 in range(0, n, blocksize):
            i2 = min(i1 + blocksize, n)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            C1 = torch.zeros(out, count, dtype=torch.uint8, device=W.device)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            for i in range(count):
                col = i1 + i
                if not static_groups and col % GROUP == 0:
                    # Fit this group to its current weights: columns inside the block live in W1 (in-block
                    # updates applied); if the block is shorter than a group, the group starts at the block's
                    # first column (i == 0), so the rest, in W[:, i2:], already has every earlier lazy update.
                    cur = W1[:, i:i + GROUP]
                    if cur.shape[1] < GROUP:
                        cur = torch.cat([cur, W[:, i2:i2 + GROUP - cur.shape[1]]], dim=1)
                    s, m = formats.fit_params(cur, bits, method=param_method)
                    scale[:, col // GROUP] = s[:, 0]
                    mn[:, col // GROUP] = m[:, 0]
                g = group_of[col]

                w = W1[:, i]
                d = Hinv1[i, i]
                c, q = formats.quantize_column(w, scale[:, g], mn[:, g], bits)
                Q1[:, i] = q
                C1[:, i] = c
                Losses1[:, i] = (w - q) ** 2 / d ** 2
                err = (w - q) / d
                if _inblock_feedback:
                    # OBS update of the block's remaining columns. The MC-MoE reference skips this at <= 3 bits.
                    W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err

            Q[:, i1:i2] = Q1
            codes[:, i1:i2] = C1
            losses += Losses1.sum(dim=1, dtype=torch.float64) / 2
            # lazy batch update: the whole block's errors onto every later column at once
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

        if perm is not None:
            invperm = torch.argsort(perm)
            Q = Q[:, invperm]
            codes = codes[:, invperm]
        gain = None
        if unshrink:
            c = torch.from_numpy(self._row_gain(W_orig, Q)).to(scale.device)   # W holds the updated weights
            scale, mn = formats._to_fp16(scale * c[:, None]), formats._to_fp16(mn * c[:, None])
            Q = formats.dequantize_codes(codes, scale, mn)
            gain = [float(c.min()), float(c.mean()), float(c.max())]

        return GPTQResult(codes, scale, mn, Q, {
            "method": "gptq", "bits": bits, "param_method": param_method,
            "act_order": act_order, "static_groups": static_groups, "blocksize": blocksize,
            "percdamp": damp_used,           # > the requested percdamp if the Cholesky had to be retried
            "n_dead": int(dead.sum()), "nsamples": self.nsamples,
            # GPTQ's own error estimate: sum over columns of (w - q)^2 / (2 [U]_ii^2) == 1/2 tr(dW H_damped dW^T)
            "loss": float(losses.sum()), **({"unshrink": gain} if gain else {}),
            "seconds": time.perf_counter() - t0})
