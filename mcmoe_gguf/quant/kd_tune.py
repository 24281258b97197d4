"""KD tuning: after PMQ, tune what the file keeps free against the float model's output distribution.

GPTQ rounds each expert for its own output error on its own routed tokens; nothing in PMQ looks at what
the errors of all layers together do to the model's next-token distribution. This stage does: knowledge
distillation (KL(float || quantized) over the calibration text's tokens, a cosine schedule) of what a GGUF
file can change without a byte more:

- one factor per (row, 256 columns) of every quantized tensor (experts, attention, output): written back
  by multiplying the block's fp16 super-scale(s) (rescale.py), so the file keeps its size and types;
- the RMSNorm weights and the routers (F32 in the file);
- part "codes": the codes of our own mcq/mcn tensors and of llama.cpp's iq1_s (a codeword per 8 weights),
  re-chosen on their stored scales (recode.py) through straight-through latents (RecodedLinear, LatentSGD),
  the discrete half of PV-tuning; llama.cpp's other types keep ggml's codes.

The first two (Adam) are the continuous half of PV-tuning / QuIP#'s fine-tuning. Embeddings are not tuned
(a lookup: a factor there only duplicates the norm's); sub-block scales stay as the quantizer chose them.
It needs the float teacher and the dequantized student in memory: for models that fit in RAM (the tiny and
benchmark models; a Mixtral-size run refuses with the memory it would need).

State lives in the work directory (tune.pt, written atomically every `save_every` steps with the
optimizer's state), so a killed tuning resumes where it stopped and, batches being a function of the step,
ends with the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mcmoe_gguf.quant import recode, rescale
from mcmoe_gguf.quant.calibration import calibration_tokens
from mcmoe_gguf.quant.workdir import WorkDir

DEFAULT_LR = 1e-3
DEFAULT_CODE_TRAVEL = 0.375
CONTINUOUS = ("scales", "norms", "routers")
PARTS = (*CONTINUOUS, "codes")


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 0              # optimizer steps (0: no tuning)
    lr: float = DEFAULT_LR      # Adam's peak learning rate (cosine decay to 0)
    batch: int = 8              # sequences per step
    seqs: int = 1024            # calibration windows drawn from (all of a smaller text)
    seed: int = 0
    save_every: int = 25        # steps between checkpoints of the tuning state
    parts: tuple[str, ...] = PARTS      # what is tuned (a subset of PARTS; the study of each one's share)
    code_travel: float = DEFAULT_CODE_TRAVEL    # part "codes": level units a latent with its tensor's typical
    #                                             gradient moves over the run (0.5 flips its code)


def check(cfg: TuneConfig) -> None:
    if cfg.steps < 0 or cfg.batch < 1 or cfg.seqs < 1 or cfg.save_every < 1:
        raise ValueError(f"KD tuning needs steps >= 0, batch, seqs and save_every >= 1; got {cfg}")
    for name, v in (("learning rate", cfg.lr), ("code travel", cfg.code_travel)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"KD tuning's {name} must be a positive number, got {v}")
    unknown = [p for p in cfg.parts if p not in PARTS]
    if unknown or not cfg.parts:
        raise ValueError(f"KD tuning parts must be some of {', '.join(PARTS)}; got {', '.join(cfg.parts) or 'none'}")


class ScaledLinear(torch.nn.Module):
    """y = x (W * g)^T with one factor g per (row, `group` columns): what rescaling the stored blocks' scales
    computes (up to the fp16 rounding of the new scales)."""

    def __init__(self, weight: torch.Tensor, group: int, g: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.group = group
        rows, n = weight.shape
        self.g = torch.nn.Parameter(torch.ones(rows, n // group) if g is None else g.detach().clone().float())

    def forward(self, x):
        return F.linear(x, self.weight * self.g.repeat_interleave(self.group, dim=1))


class RecodedLinear(ScaledLinear):
    """A tensor of our own types whose codes are tuned too (recode.py): a latent per weight in level units,
    started at the stored code's level; the forward pass uses the nearest level (the code the file will
    store) and passes the gradient straight through to the latent (STE), so a code flips when its latent
    crosses a midpoint between levels. Scales stay as stored; g multiplies them as in ScaledLinear. (Freeing
    mcq's d and m per block of 128 as well, not just one factor per 256, measured level: KLD 0.1194 against
    0.1204 +- 0.0017, docs/RESULTS.md "KD tuning re-chooses our types' codes".)"""

    def __init__(self, grd, group: int, g: torch.Tensor | None = None, delta: torch.Tensor | None = None):
        # no dense weight: the grid (codes, steps, offsets) is the weight
        super().__init__(torch.zeros(0, 0), group, g if g is not None else torch.ones(
            grd.step.shape[0], grd.step.shape[1] // group))
        self.grid = grd
        self.register_buffer("x0", grd.latent())
        lo, hi = (v + sign * grd.unit / 2 for v, sign in zip(grd.span(), (-1, 1)))
        self.bounds = ((lo - self.x0) / grd.unit, (hi - self.x0) / grd.unit)
        self.delta = torch.nn.Parameter(torch.zeros_like(self.x0) if delta is None else delta.detach().clone())

    def codes(self) -> torch.Tensor:
        with torch.no_grad():
            return self.grid.nearest(self.x0 + self.delta * self.grid.unit)

    def clamp_(self) -> None:
        """Keep every latent within half a level of the grid's ends: beyond, it would drift unseen."""
        with torch.no_grad():
            self.delta.copy_(torch.maximum(torch.minimum(self.delta, self.bounds[1]), self.bounds[0]))

    def forward(self, x):
        grd = self.grid
        lat = self.x0 + self.delta * grd.unit
        with torch.no_grad():
            snapped = grd.snap(lat)
        w = grd.weights(lat + (snapped - lat).detach())
        return F.linear(x, w * self.g.repeat_interleave(self.group, dim=1))


class LatentSGD:
    """SGD with momentum for the codes' latents, each tensor's step normalised by its momentum's RMS: a
    latent moves `lr` level units per step where its gradient is the tensor's typical one and in
    proportion elsewhere (so TuneConfig.code_travel is the whole run's move of a typical latent). Adam
    would move every latent ~lr per step whatever its gradient (per-element normalisation), flipping weak
    codes as fast as strong ones: on the micro model a few Adam steps that flipped codes doubled the KL;
    here only consistently pushed latents reach a midpoint."""

    def __init__(self, params: list[torch.Tensor], beta: float = 0.9):
        self.params, self.beta = params, beta
        self.bufs = [torch.zeros_like(p) for p in params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for p, b in zip(self.params, self.bufs):
            if p.grad is None:
                continue
            b.mul_(self.beta).add_(p.grad, alpha=1 - self.beta)
            rms = b.pow(2).mean().sqrt()
            if rms > 0:
                p.sub_(b, alpha=lr / float(rms))

    def state_dict(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.bufs]

    def load_state_dict(self, bufs: list[torch.Tensor]) -> None:
        for b, v in zip(self.bufs, bufs):
            b.copy_(v)


def _memory_check(ck, parts) -> None:
    """Teacher + student in float32, the student's activations and gradients (with codes: each weight's
    step, offset, start, latent and momentum too): refuse a model that cannot fit."""
    import numpy as np
    n = sum(int(np.prod(r.shape)) for r in ck.tensors.values())
    need = (3 + (5 if "codes" in parts else 0)) * 4 * n
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > avail:
        raise MemoryError(f"KD tuning holds the float model and its quantized copy in float32: ~{need / 2**30:.1f} GiB "
                          f"for {n:,} parameters, {avail / 2**30:.1f} GiB free; run without --kd-steps")


def _tuned_here(key: str, entry: dict) -> bool:
    """Whether the tuning puts a factor (and for recodable types a latent) on this stored tensor."""
    return (key != "model.embed_tokens.weight"
            and rescale.group_size(rescale.entry_type(entry), entry["shape"][1]) is not None)


def _recoded_keys(entries: dict) -> set[str]:
    """The tensors part "codes" re-chooses (what _student makes RecodedLinear of)."""
    return {k for k, e in entries.items() if _tuned_here(k, e) and recode.recodable(e)}


def _student(wd: WorkDir, entries: dict, start: dict | None, parts=PARTS):
    """The quantized model with ScaledLinear (RecodedLinear for our types with part "codes") in place of
    every quantized linear it can rescale, and what is tuned by key: factors and recoded modules under the
    tensor's key, floats (norms, routers) under theirs. entries: the run's stored_entries()."""
    from mcmoe_gguf.quant.fake_quant import quantized_model
    model, ck = quantized_model(wd, tuned=False, entries=entries)
    for p in model.parameters():
        p.requires_grad_(False)
    start_f = start["factors"] if start else {}
    start_l = start.get("latents", {}) if start else {}
    factors, floats, recoded = {}, {}, {}
    for key, entry in entries.items():
        if not {"scales", "codes"} & set(parts) or not _tuned_here(key, entry):
            continue
        gs = rescale.group_size(rescale.entry_type(entry), entry["shape"][1])
        path = key[: -len(".weight")].split(".")
        parent = model.get_submodule(".".join(path[:-1])) if len(path) > 1 else model
        lin = getattr(parent, path[-1])
        if "codes" in parts and recode.recodable(entry):
            sl = RecodedLinear(recode.grid(entry), gs, start_f.get(key), start_l.get(key))
            recoded[key] = sl
        elif "scales" in parts:
            sl = ScaledLinear(lin.weight, gs, start_f.get(key))
        else:
            continue
        sl.g.requires_grad_("scales" in parts)
        setattr(parent, path[-1], sl)
        if "scales" in parts:
            factors[key] = sl.g
    for name, p in model.named_parameters():
        if (("norms" in parts and name.endswith("norm.weight"))
                or ("routers" in parts and name.endswith("block_sparse_moe.gate.weight"))):
            if start and name in start["floats"]:
                p.data.copy_(start["floats"][name])
            p.requires_grad_(True)
            floats[name] = p
    return model, ck, factors, floats, recoded


def _batch(tokens: torch.Tensor, cfg: TuneConfig, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return tokens[torch.randint(0, tokens.shape[0], (cfg.batch,), generator=g)]


def kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), the quantity llama-perplexity's --kl-divergence reports."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def _lr(peak: float, steps: int, step: int) -> float:
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))


def tune(wd: WorkDir | str, cfg: TuneConfig, text: str | None = None, progress: bool = True) -> dict:
    """KD-tune a finished work directory (resuming its tune.pt when that has the same settings); returns the
    finished state's summary. steps = 0 removes an earlier tuning (the file is then the untuned one)."""
    from mcmoe_gguf.quant.fake_quant import float_model
    check(cfg)
    wd = WorkDir.of(wd)
    if not wd.is_finished():
        raise ValueError(f"{wd.path}: KD tuning needs a finished PMQ run (no allocation.json)")
    if cfg.steps == 0:
        wd.tune_path.unlink(missing_ok=True)
        return {"steps": 0}
    state = torch.load(wd.tune_path) if wd.tune_path.exists() else None
    if state is not None and {**asdict(TuneConfig()), **state["config"]} != asdict(cfg):
        state = None                    # other settings: start over (the stored bytes are untouched)
    from mcmoe_gguf.model.checkpoint import Checkpoint
    from mcmoe_gguf.quant.fake_quant import stored_entries
    ck = Checkpoint(wd.model_dir())
    entries = stored_entries(wd, ck)
    if state is not None and "codes" in cfg.parts and set(state.get("codes", {})) != _recoded_keys(entries):
        state = None                    # tuned before more types became recodable (iq1_s): start over
    if state is not None and state["step"] == cfg.steps:
        return summary(state)
    _memory_check(ck, cfg.parts)
    model, ck, factors, floats, recoded = _student(wd, entries, state, cfg.parts)
    run = wd.config()
    if text is None:
        from pathlib import Path
        path = Path(run["calib_text"]) if run.get("calib_text") else wd.model_dir() / "calib.txt"
        text = path.read_text(encoding="utf-8")
    tokens = calibration_tokens(ck.dir / "tokenizer.json", text, cfg.seqs,
                                min(run["seq_len"], ck.hp.max_position_embeddings))
    teacher = float_model(ck)
    params = list(factors.values()) + list(floats.values())
    opt = torch.optim.Adam(params, lr=cfg.lr) if params else None
    code_opt = LatentSGD([m.delta for m in recoded.values()])
    step, losses = 0, []
    if state is not None:
        if opt is not None:
            opt.load_state_dict(state["opt"])
        code_opt.load_state_dict(state.get("code_opt", []))
        step, losses = state["step"], list(state["loss"])

    def save(done_step: int) -> None:
        codes = {k: m.codes() for k, m in recoded.items()}
        wd.save({"config": asdict(cfg), "step": done_step, "loss": losses,
                 "factors": {k: g.detach().clone() for k, g in factors.items()},
                 "floats": {k: p.detach().clone() for k, p in floats.items()},
                 "latents": {k: m.delta.detach().clone() for k, m in recoded.items()},
                 "codes": codes,
                 "changed_codes": sum(int((codes[k] != m.grid.codes).sum()) for k, m in recoded.items()),
                 "opt": opt.state_dict() if opt is not None else None,
                 "code_opt": code_opt.state_dict()}, wd.tune_path)

    bar = tqdm(range(step, cfg.steps), desc="KD tuning", unit="step", initial=step, total=cfg.steps,
               disable=not progress)
    for s in bar:
        if opt is not None:
            for grp in opt.param_groups:
                grp["lr"] = _lr(cfg.lr, cfg.steps, s)
        b = _batch(tokens, cfg, s)
        with torch.no_grad():
            t_logits = teacher(b)[0]
        loss = kl(t_logits, model(b)[0])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"KD tuning: the loss is {loss.item()} at step {s} (lower --kd-lr)")
        if opt is not None:
            opt.zero_grad()
        code_opt.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()
        code_opt.step(_lr(2 * cfg.code_travel / cfg.steps, cfg.steps, s))   # the cosine's mean is half its peak
        with torch.no_grad():           # factors stay positive: they multiply fp16 scales
            for g in factors.values():
                g.clamp_(min=1e-3)
            for m in recoded.values():
                m.clamp_()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        if (s + 1) % cfg.save_every == 0 or s + 1 == cfg.steps:
            save(s + 1)
    return summary(torch.load(wd.tune_path))


def summary(state: dict) -> dict:
    loss = state["loss"]
    k = max(1, min(10, len(loss)))
    return {"steps": state["step"], "kl_first": sum(loss[:k]) / k, "kl_last": sum(loss[-k:]) / k,
            "tuned_tensors": len(state["factors"]), "tuned_floats": len(state["floats"]),
            "recoded_tensors": len(state.get("codes", {})), "changed_codes": state.get("changed_codes", 0)}
