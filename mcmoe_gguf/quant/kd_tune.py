"""KD tuning: after PMQ, tune what the file keeps free against the float model's output distribution.

GPTQ rounds each expert for its own output error on its own routed tokens; nothing in PMQ looks at what
the errors of all layers together do to the model's next-token distribution. This stage does, with the
codes fixed: knowledge distillation (KL(float || quantized) over the calibration text's tokens, Adam, a
cosine schedule) of the parameters a GGUF file stores in float and that cost no byte to change:

- one factor per (row, 256 columns) of every quantized tensor (experts, attention, output): written back
  by multiplying the block's fp16 super-scale(s) (rescale.py), so the file keeps its size and types;
- the RMSNorm weights and the routers (F32 in the file).

Embeddings are not tuned (a lookup: a factor there only duplicates the norm's). The codes and sub-block
scales stay as GPTQ chose them, so this is the continuous half of PV-tuning / QuIP#'s fine-tuning, not a
retraining. It needs the float teacher and the dequantized student in memory: for models that fit in RAM
(the tiny and benchmark models; a Mixtral-size run refuses with the memory it would need).

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

from mcmoe_gguf.quant import rescale
from mcmoe_gguf.quant.calibration import calibration_tokens
from mcmoe_gguf.quant.workdir import WorkDir

DEFAULT_LR = 1e-3
PARTS = ("scales", "norms", "routers")


@dataclass(frozen=True)
class TuneConfig:
    steps: int = 0              # optimizer steps (0: no tuning)
    lr: float = DEFAULT_LR      # Adam's peak learning rate (cosine decay to 0)
    batch: int = 8              # sequences per step
    seqs: int = 1024            # calibration windows drawn from (all of a smaller text)
    seed: int = 0
    save_every: int = 25        # steps between checkpoints of the tuning state
    parts: tuple[str, ...] = PARTS      # what is tuned (a subset of PARTS; the study of each one's share)


def check(cfg: TuneConfig) -> None:
    if cfg.steps < 0 or cfg.batch < 1 or cfg.seqs < 1 or cfg.save_every < 1:
        raise ValueError(f"KD tuning needs steps >= 0, batch, seqs and save_every >= 1; got {cfg}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"KD tuning's learning rate must be a positive number, got {cfg.lr}")
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


def _memory_check(ck) -> None:
    """Teacher + student in float32, the student's activations and gradients: refuse a model that cannot fit."""
    import numpy as np
    n = sum(int(np.prod(r.shape)) for r in ck.tensors.values())
    need = 3 * 4 * n
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > avail:
        raise MemoryError(f"KD tuning holds the float model and its quantized copy in float32: ~{need / 2**30:.1f} GiB "
                          f"for {n:,} parameters, {avail / 2**30:.1f} GiB free; run without --kd-steps")


def _student(wd: WorkDir, start: dict | None, parts=PARTS):
    """The quantized model with ScaledLinear in place of every quantized linear it can rescale, and the
    parameters to tune by key (factors under the tensor's key, floats under theirs)."""
    from mcmoe_gguf.model.checkpoint import Checkpoint
    from mcmoe_gguf.quant.fake_quant import quantized_model, stored_entries
    entries = stored_entries(wd, Checkpoint(wd.model_dir()))
    model, ck = quantized_model(wd, tuned=False, entries=entries)
    for p in model.parameters():
        p.requires_grad_(False)
    start_f = start["factors"] if start else {}
    factors, floats = {}, {}
    for key, entry in entries.items():
        if key == "model.embed_tokens.weight" or "scales" not in parts:
            continue
        gs = rescale.group_size(rescale.entry_type(entry), entry["shape"][1])
        if gs is None:
            continue
        path = key[: -len(".weight")].split(".")
        parent = model.get_submodule(".".join(path[:-1])) if len(path) > 1 else model
        lin = getattr(parent, path[-1])
        sl = ScaledLinear(lin.weight, gs, start_f.get(key))
        setattr(parent, path[-1], sl)
        factors[key] = sl.g
    for name, p in model.named_parameters():
        if (("norms" in parts and name.endswith("norm.weight"))
                or ("routers" in parts and name.endswith("block_sparse_moe.gate.weight"))):
            if start and name in start["floats"]:
                p.data.copy_(start["floats"][name])
            p.requires_grad_(True)
            floats[name] = p
    return model, ck, factors, floats


def _batch(tokens: torch.Tensor, cfg: TuneConfig, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return tokens[torch.randint(0, tokens.shape[0], (cfg.batch,), generator=g)]


def kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), the quantity llama-perplexity's --kl-divergence reports."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def _lr(cfg: TuneConfig, step: int) -> float:
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


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
    if state is not None and state["step"] == cfg.steps:
        return summary(state)
    from mcmoe_gguf.model.checkpoint import Checkpoint
    _memory_check(Checkpoint(wd.model_dir()))
    model, ck, factors, floats = _student(wd, state, cfg.parts)
    run = wd.config()
    if text is None:
        from pathlib import Path
        path = Path(run["calib_text"]) if run.get("calib_text") else wd.model_dir() / "calib.txt"
        text = path.read_text(encoding="utf-8")
    tokens = calibration_tokens(ck.dir / "tokenizer.json", text, cfg.seqs,
                                min(run["seq_len"], ck.hp.max_position_embeddings))
    teacher = float_model(ck)
    params = list(factors.values()) + list(floats.values())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    step, losses = 0, []
    if state is not None:
        opt.load_state_dict(state["opt"])
        step, losses = state["step"], list(state["loss"])

    def save(done_step: int) -> None:
        wd.save({"config": asdict(cfg), "step": done_step, "loss": losses,
                 "factors": {k: g.detach().clone() for k, g in factors.items()},
                 "floats": {k: p.detach().clone() for k, p in floats.items()},
                 "opt": opt.state_dict()}, wd.tune_path)

    bar = tqdm(range(step, cfg.steps), desc="KD tuning", unit="step", initial=step, total=cfg.steps,
               disable=not progress)
    for s in bar:
        for grp in opt.param_groups:
            grp["lr"] = _lr(cfg, s)
        b = _batch(tokens, cfg, s)
        with torch.no_grad():
            t_logits = teacher(b)[0]
        loss = kl(t_logits, model(b)[0])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"KD tuning: the loss is {loss.item()} at step {s} (lower --kd-lr)")
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():           # factors stay positive: they multiply fp16 scales
            for g in factors.values():
                g.clamp_(min=1e-3)
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        if (s + 1) % cfg.save_every == 0 or s + 1 == cfg.steps:
            save(s + 1)
    return summary(torch.load(wd.tune_path))


def summary(state: dict) -> dict:
    loss = state["loss"]
    k = max(1, min(10, len(loss)))
    return {"steps": state["step"], "kl_first": sum(loss[:k]) / k, "kl_last": sum(loss[-k:]) / k,
            "tuned_tensors": len(state["factors"]), "tuned_floats": len(state["floats"])}
