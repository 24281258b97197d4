"""Layer sensitivity: what one unit of a layer's eps costs at the model's output.

eps (the paper's Eq. 3; ladder.measure_eps per projection and type) is an absolute error in one MoE layer's
output. The paper solves one program per layer, so how eps compares across layers never matters there. One
program for the whole model (scope="model") lets bytes move between layers, and there equal eps do not cost
the same: an error added to a residual stream that later layers normalise away, or that later layers
amplify, costs the output little or much. On the bench model one layer's experts in IQ1_S cost x1.057 PPL in
layer 0 and x1.015 in layer 2 (docs/RESULTS.md, study_vq) at similar output errors.

So we measure it once per layer (sensitivity="kl"), during the model-scope statistics pass on the float model:

    choice_l = the layer-scope program's choice for layer l at the run's budget (what layer l would get
               without moving bytes: a representative perturbation of the right size)
    KL_l     = mean KL(float model || float model with only layer l's experts quantized to choice_l), per
               token, on the first `sens_seqs` calibration sequences
    pred_l   = sum_{e,p} phi^alpha w^beta eps[l,e,p,choice_l]^gamma    (the program's own cost of choice_l)
    scale_l  = KL_l / pred_l

and the model program minimises sum_l scale_l * sum_{e,p} phi^alpha w^beta eps^gamma: the program's cost in
units of output KL, each layer's eps read at its own exchange rate. For small errors KL is quadratic in the
output perturbation, as eps^2 is (gamma = 2), so the rate holds around the choice it was measured at.

Cost: every layer is quantized once more (the probe) and the L + 1 probe copies pass through every later
layer: ~L/2 extra layer forwards on sens_seqs sequences each. The copies are stored with the statistics'
state (resume): (L + 1) * sens_seqs * seq_len * d * 4 bytes, ~9 GB for Mixtral at 8 x 2048 tokens, so there
`--sens-seqs 2` (2.2 GB) is the sensible setting.
"""
from __future__ import annotations

import numpy as np
import torch

from mcmoe_gguf.quant import allocate

SENSITIVITIES = ("none", "kl")
DEFAULT_SENS_SEQS = 8           # calibration sequences the KL is measured on (the quantizers see all of them)
# a layer whose measured KL is ~0 (noise) must not become free: its rate is at least this share of the median
MIN_SCALE_SHARE = 0.01


def check(cfg) -> bool:
    """Whether the run measures layer sensitivity; bad settings fail before any work."""
    if cfg.sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, not {cfg.sensitivity!r}")
    if cfg.sensitivity == "none":
        return False
    if cfg.scope != "model":
        raise ValueError("--sensitivity kl weighs layers against each other: it needs --scope model "
                         "(with one program per layer a layer's scale changes nothing)")
    if cfg.sens_seqs < 1:
        raise ValueError(f"sens_seqs must be >= 1 (calibration sequences the KL is measured on); got {cfg.sens_seqs}")
    return True


def final_norm(ck, h: torch.Tensor) -> torch.Tensor:
    """The model's last RMSNorm (what the output projection reads)."""
    w = ck.get(ck.arch.GLOBAL_KEYS["norm"]).float().to(h.device)
    hf = h.float()
    return hf * torch.rsqrt((hf * hf).mean(-1, keepdim=True) + ck.hp.rms_norm_eps) * w


def _lm_head(ck, device) -> torch.Tensor:
    key = ck.arch.GLOBAL_KEYS["embed" if ck.hp.tie_word_embeddings else "lm_head"]
    return ck.get(key).float().to(device)


@torch.no_grad()
def mean_kl(ck, h_ref: torch.Tensor, h: torch.Tensor, chunk: int = 2048, head: torch.Tensor | None = None) -> float:
    """Mean over tokens of KL(p_ref || p), p = softmax(lm_head(final_norm(h))), from the last hidden states
    h_ref, h [..., d] (chunked over tokens: Mixtral's vocabulary is 32k logits per token). head: another output
    matrix for p (a quantized one; quant/mix_choice.py), p_ref keeps the model's."""
    W = _lm_head(ck, h.device)
    Wq = W if head is None else head.float().to(h.device)
    a, b = h_ref.reshape(-1, h_ref.shape[-1]), h.reshape(-1, h.shape[-1])
    total = 0.0
    for s in range(0, a.shape[0], chunk):
        lp = torch.log_softmax(final_norm(ck, a[s:s + chunk]) @ W.t(), -1)
        lq = torch.log_softmax(final_norm(ck, b[s:s + chunk]) @ Wq.t(), -1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total / max(a.shape[0], 1)


def predicted(phi, w, eps, choice, alpha, beta, gamma) -> float:
    """The program's cost of one layer's choice: sum_{e,p} phi^alpha w^beta eps[e, p, choice[e, p]]^gamma.
    phi, w [E]; eps [E, P, T]; choice int [E, P]."""
    imp = allocate.importance(np.asarray(phi, float), np.asarray(w, float), alpha, beta)
    chosen = np.take_along_axis(np.asarray(eps, float), np.asarray(choice)[..., None], axis=2)[..., 0]
    return float((imp[:, None] * np.power(chosen, gamma)).sum())


def layer_scales(kl, pred) -> np.ndarray:
    """scale_l = KL_l / pred_l, each at least MIN_SCALE_SHARE of the median (a layer measured at ~0 KL, or
    whose choice costs ~0, stays comparable with the others instead of taking every byte or none)."""
    kl, pred = np.asarray(kl, float), np.asarray(pred, float)
    if kl.shape != pred.shape or not (np.isfinite(kl).all() and np.isfinite(pred).all()):
        raise ValueError(f"kl and pred must be finite and of one shape; got {kl.shape}, {pred.shape}")
    raw = np.where(pred > 0, np.maximum(kl, 0) / np.where(pred > 0, pred, 1), np.nan)
    med = np.nanmedian(raw) if np.isfinite(raw).any() else 1.0
    if not med > 0:
        med = 1.0
    return np.where(np.isfinite(raw), np.maximum(raw, MIN_SCALE_SHARE * med), med)
