"""PMQ (paper section 3.2): calibrate, allocate 1/2/3 bits per expert, GPTQ every expert at its width.

With a type ladder (cfg.ladder != "mcq", quant/ladder.py) the allocation is one type per expert projection
out of our mcq widths and llama.cpp's types, from each choice's measured error; --compat stock restricts it
to llama.cpp's types, one per (layer, projection), so the file runs in an unpatched llama.cpp.

`quantize(model_dir, outdir, cfg)` streams the checkpoint one decoder layer at a time and writes a
resumable work directory (its files: quant/workdir.py).

Sequential, as GPTQ is: layer l is calibrated and quantized on the outputs of the already quantized
layers before it, so each layer compensates the error upstream. With scope="model" the integer program
needs every layer's statistics before the first layer is quantized, so a first streamed pass computes
them on the unquantized model (documented deviation; scope="layer" is the paper's sequential setting).
Each file is written atomically; a killed run resumes after the last finished layer and, computation
being deterministic, produces identical files.

Types outside the experts come from a mix (quant/mixes.py): by default ("auto") llama.cpp's own mix of
the nearest expert width, so files compare with llama.cpp's at equal bytes on the experts alone.
Attention projections in an mcqN type are GPTQ'd like the experts; in a ggml type they are quantized by
ggml's own quantizer with the calibration tokens' importance (mean x^2 per input column, what
llama-imatrix measures), layer by layer, so later layers calibrate on the quantized attention. The
output projection gets the importance of the final norm's output, collected after the last layer;
embeddings have no input to weigh (llama.cpp gives them none either). Router and norms stay F32.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mcmoe_gguf.quant import allocate, kd_tune, odp_fit
from mcmoe_gguf.quant import sensitivity as layer_sensitivity
from mcmoe_gguf.quant import formats
from mcmoe_gguf.quant import ladder as ladders
from mcmoe_gguf.quant import mix_choice, mixes
from mcmoe_gguf.quant.calibration import (LayerStats, calibration_tokens, expert_inner, moe_stats, odp_curve, odp_mu,
                                          rtn_dequant)
from mcmoe_gguf.model.checkpoint import Checkpoint
from mcmoe_gguf.quant.gptq import GPTQ
from mcmoe_gguf.quant.quantizers import ggml_packed, importance, mcq_packed, mcq_result, quantize_matrix
from mcmoe_gguf.quant.budget import (bits_of_types, check_row_lengths, expert_params, projection_shapes,
                                     recorded_types, size_report, types_of_bits)
from mcmoe_gguf.quant.workdir import WorkDir, WorkdirMismatch  # noqa: F401  (WorkdirMismatch: part of this API)


@dataclass
class PMQConfig:
    budget: str = "2.5"                 # real expert bpw ("2.5") or expert bytes ("13GB")
    scope: str = "layer"                # "layer" (paper) or "model" (one program for all layers)
    strategy: str = "pmq"               # pmq | uniform:<bits> | random:<seed> | frequency | weight | eps
    alpha: float = allocate.DEFAULT_ALPHA
    beta: float = allocate.DEFAULT_BETA
    gamma: float = allocate.DEFAULT_GAMMA
    method: str = "gptq"                # gptq | rtn
    mix: str = "auto"                   # types outside the experts (quant/mixes.py): auto | q8 | stock:<ftype>
    size: str | None = None             # instead of budget: bytes of all tensors ("5MB", "13GB"), mix included
    n_seq: int = 128
    seq_len: int = 2048
    calib_text: str | None = None       # default: MODEL_DIR/calib.txt
    act_order: bool = False
    percdamp: float = 0.01
    param_method: str = "mse"
    eps_method: str = "mse"             # grid fit of the eps statistics' RTN (minmax: ~5x faster at Mixtral size)
    device: str = "cpu"                 # torch device for calibration and GPTQ ("cuda" on a GPU machine)
    embed_type: str | None = None       # token embeddings: a ggml type (f16, q8_0, q4_k, ...); None: the mix's
    output_type: str | None = None      # output projection: likewise
    ladder: str = "mcq"                 # expert types (quant/ladder.py): mcq (the paper's 1/2/3 bits per expert),
                                        # stock | full | a comma-separated list of types
    granularity: str = "projection"     # a ladder's choice: per projection or per expert (mcq: per expert)
    compat: str = "none"                # "stock": llama.cpp's types only, one per (layer, projection), written as
                                        # merged expert tensors: the file runs in an unpatched llama.cpp
    eps_rows: int = 0                   # a ladder's eps from this many sampled rows per projection (0: all, exact)
    eps_tokens: int = 0                 # ... and at most this many routed tokens per expert (0: all)
    eps_holdout: float = ladders.DEFAULT_EPS_HOLDOUT    # a ladder's eps measured on this share of the
                                        # calibration tokens, held out from the quantizers' statistics
                                        # (ladder.measure_eps; 0: on all of them, as before it existed)
    min_speed: str | None = None        # a ladder's decode-speed floor: a type (e.g. "q2_k"); the expected mat-vec
                                        # time of a token's routed experts is at most that of all in this type,
                                        # per mat-vec costs measured on the machine (engine/kernel_costs.py)
    sensitivity: str = "none"           # "kl": scope="model" weighs each layer's eps by its measured output KL
                                        # per unit of eps (quant/sensitivity.py); "none": eps as measured
    sens_seqs: int = layer_sensitivity.DEFAULT_SENS_SEQS     # calibration sequences that KL is measured on
    odp: str = odp_fit.DEFAULT_TARGET   # ODP thresholds' target (odp_fit.py): median | skip:S | error:B. Applied
                                        # when the run finishes, not part of the run's identity: a rerun with
                                        # another target only refits the thresholds
    kd_steps: int = 0                   # KD tuning after the layers (kd_tune.py): optimizer steps (0: none)
    kd_lr: float = kd_tune.DEFAULT_LR   # ... and its peak learning rate
    kd_codes: float = kd_tune.DEFAULT_CODE_TRAVEL   # ... and the codes of our types re-chosen (0: GPTQ's kept)


FINISH_ONLY = ("odp", "kd_steps", "kd_lr", "kd_codes")      # PMQConfig fields that do not change the layers' work


def _as_config(cfg: PMQConfig | dict) -> PMQConfig:
    if isinstance(cfg, dict):
        return PMQConfig(**{k: v for k, v in cfg.items() if k in PMQConfig.__dataclass_fields__})
    return cfg


def plan_budget(cfg: PMQConfig | dict, hp) -> tuple[allocate.Budget, mixes.Mix]:
    """The expert budget and the concrete mix (embed/output overrides applied) of a run. With `size`,
    the mix's bytes come off the total first ("auto": the widest stock mix whose experts still fit)."""
    cfg = _as_config(cfg)
    n_exp = int(expert_params(hp).sum())
    if cfg.size is not None:
        total = allocate.parse_budget(cfg.size)
        if total.unit != "bytes":
            raise ValueError(f"size {cfg.size!r} must be bytes (e.g. 5MB, 13GB); for bits per weight use budget")
        left, mix = mixes.expert_budget_for_size(hp, int(total.value), cfg.mix, n_exp, _overrides(cfg))
        budget = allocate.Budget("bytes", left)
        lo = allocate.min_bpw(expert_params(hp))
        if not is_ladder(cfg) and Fraction(8) * left / n_exp < lo:     # a ladder's program names its own range
            need = mixes.nonexpert_bytes(hp, mix) + int(lo * n_exp / 8) + 1
            raise ValueError(f"size {cfg.size!r} leaves {float(8 * left / n_exp):.4g} real bpw for the experts after "
                             f"the {mixes.nonexpert_bytes(hp, mix):,} bytes outside them; PMQ needs at least "
                             f"{float(lo):.4g} (one expert per layer at 3 bits, one at 2, the rest at 1): "
                             f"at least {need:,} bytes of tensors")
    else:
        budget = allocate.parse_budget(cfg.budget)
    # one width over all experts: the layer-scope programs see one layer's parameters at a time, so a
    # byte budget must not reach them as bytes (it would be read as that layer's bytes)
    if budget.unit == "bytes":
        budget = allocate.Budget("bpw", Fraction(8) * budget.value / n_exp)
    if cfg.size is None:
        kind, _, arg = cfg.strategy.partition(":")
        mix = mixes.resolve(cfg.mix, formats.bpw(int(arg)) if kind == "uniform" else float(budget.value))
    return budget, mixes.Mix(**{**mix.to_dict(), **_overrides(cfg)})


def _overrides(cfg: PMQConfig) -> dict:
    return {**({"embed": cfg.embed_type} if cfg.embed_type else {}),
            **({"output": cfg.output_type} if cfg.output_type else {})}


def resolved_mix(cfg: PMQConfig | dict, hp) -> mixes.Mix:
    return plan_budget(cfg, hp)[1]


# ------------------------------------------------------------------------------------- allocation
def _synthetic_eps(stats: list[LayerStats]) -> np.ndarray:
    # frequency-/weight-only baselines: every expert's error falls the same way with bits (RTN error ~ 2^-b)
    return np.broadcast_to(np.array([2.0 ** -b for b in (1, 2, 3)]), (len(stats), len(stats[0].phi), 3)).copy()


def choose_bits(stats: list[LayerStats], n_params: np.ndarray, cfg: PMQConfig,
                budget: allocate.Budget) -> allocate.Allocation | np.ndarray:
    """budget: plan_budget's (cfg.budget or cfg.size resolved against the whole model)"""
    phi = np.array([s.phi for s in stats])
    w = np.array([s.w for s in stats])
    eps = np.array([s.eps for s in stats])
    kind, _, arg = cfg.strategy.partition(":")
    if kind == "uniform":
        return np.full(phi.shape, int(arg), dtype=int)
    if kind == "pmq":
        return allocate.allocate(phi, w, eps, n_params, budget, scope=cfg.scope,
                                 alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma)
    if kind == "frequency":
        return allocate.allocate(phi, w, _synthetic_eps(stats), n_params, budget, cfg.scope, 1.0, 0.0, 1.0)
    if kind == "weight":
        return allocate.allocate(phi, w, _synthetic_eps(stats), n_params, budget, cfg.scope, 0.0, 1.0, 1.0)
    if kind == "eps":
        return allocate.allocate(phi, w, eps, n_params, budget, cfg.scope, 0.0, 0.0, cfg.gamma)
    if kind == "random":
        # the same widths PMQ would use (so exactly the same bytes), shuffled among each layer's experts
        base = allocate.allocate(phi, w, eps, n_params, budget, scope=cfg.scope).bits.copy()
        rng = random.Random(int(arg or 0))
        for row in base:
            vals = row.tolist()
            rng.shuffle(vals)
            row[:] = vals
        return base
    raise ValueError(f"unknown allocation strategy {cfg.strategy!r}")


def _bits_of(choice) -> np.ndarray:
    return choice.bits if isinstance(choice, allocate.Allocation) else choice


COMPAT = ("none", "stock")


def is_ladder(cfg: PMQConfig) -> bool:
    return cfg.ladder != ladders.PAPER or cfg.compat == "stock"


def granularity(cfg: PMQConfig) -> str:
    """--compat stock: one type per (layer, projection), whatever --granularity says"""
    return "layer" if cfg.compat == "stock" else cfg.granularity


def check_ladder(cfg: PMQConfig) -> tuple[str, ...]:
    """The ladder's types (empty for the paper's program); bad settings fail before any work."""
    if cfg.granularity not in ladders.GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(ladders.GRANULARITIES)}, not {cfg.granularity!r}")
    if cfg.compat not in COMPAT:
        raise ValueError(f"compat must be one of {', '.join(COMPAT)}, not {cfg.compat!r}")
    if not is_ladder(cfg):
        return ()
    if cfg.strategy != "pmq":
        raise ValueError(f"strategy {cfg.strategy!r} allocates the paper's 1/2/3 bits; with a ladder "
                         f"({cfg.ladder!r}) only 'pmq' is defined")
    if cfg.compat == "stock":
        types = ladders.resolve("stock" if cfg.ladder == ladders.PAPER else cfg.ladder)
        ours = [t for t in types if mixes.is_ours(t)]
        if ours:
            raise ValueError(f"--compat stock writes llama.cpp's own types only; the ladder has {', '.join(ours)}")
        if cfg.mix == "q8":
            raise ValueError("--compat stock: the q8 mix puts attention in mcq4, which stock llama.cpp cannot read; "
                             "use --mix auto or stock:<ftype>")
        return types
    return ladders.resolve(cfg.ladder)


def speed_floor(cfg: PMQConfig, hp, types, costs: dict | None):
    """allocate_ladder's speed=(us [P, T], floor [P]) for cfg.min_speed, or None without one. costs: {type:
    us of one 4096 x 14336 mat-vec} (engine/kernel_costs.matvec_us); a mat-vec's time scales with its
    weights, so projection p in type t costs costs[t] * weights_p (any unit: only ratios matter)."""
    ref = check_min_speed(cfg, types)
    if ref is None:
        return None
    if costs is None:
        raise ValueError("--min-speed needs each type's mat-vec cost: pass kernel_costs "
                         "(mcmoe_gguf.engine.kernel_costs.matvec_us; the command line measures them)")
    missing = [t for t in tuple(types) + (ref,) if t not in costs]
    if missing:
        raise ValueError(f"kernel costs lack {', '.join(missing)}")
    w = np.array([r * c for r, c in projection_shapes(hp).values()], dtype=np.float64) / 1e6
    us = np.array([[costs[t] * wp for t in types] for wp in w])
    return us, np.array([costs[ref] * wp for wp in w])


def check_min_speed(cfg: PMQConfig, types) -> str | None:
    """cfg.min_speed's type (None without a floor); a floor without a ladder or not one type is refused."""
    if not cfg.min_speed:
        return None
    if not types:
        raise ValueError("--min-speed needs a ladder (--ladder full|stock|<types>): the paper's program "
                         "allocates widths of one grid only")
    ref = ladders.resolve(cfg.min_speed)
    if len(ref) != 1:
        raise ValueError(f"--min-speed takes one type (got {cfg.min_speed!r})")
    return ref[0]


def layer_statistics(l: int, moe: torch.nn.Module, x: torch.Tensor, h_mid: torch.Tensor, cfg: PMQConfig,
                     progress: bool, ladder_eps: bool = True) -> LayerStats:
    """phi, w, mu, the ODP pruning curve and the paper's eps of one MoE layer; with a ladder also every
    choice's eps (ladder_eps=False: not; the model program of scope="model" chose from the float model's, and
    measuring them again on the quantized one, the most expensive statistic, would change nothing).
    h_mid: the residual stream the MoE block's output is added to."""
    s = moe_stats(l, moe, x, _eps_quantizer(cfg))
    s.odp = odp_curve(moe, x, h_mid)
    types = check_ladder(cfg)
    if types and ladder_eps:
        s.ladder = list(types)
        s.ladder_eps = ladders.measure_eps(moe, x, types, cfg, f"layer {l} ladder eps", progress).tolist()
    return s


def choose_types(stats: list[LayerStats], n_params: np.ndarray, cfg: PMQConfig, budget: allocate.Budget,
                 hp, speed=None, layer_scale=None) -> np.ndarray:
    """[L', E, P] type names of these layers' expert projections (layer_scale: allocate_ladder's)."""
    types = check_ladder(cfg)
    if not types:
        return types_of_bits(_bits_of(choose_bits(stats, n_params, cfg, budget)))
    a = _ladder_allocation(stats, n_params, cfg, budget, hp, types, speed, layer_scale)
    return np.array(types, dtype=object)[a.choice]


def _ladder_allocation(stats, n_params, cfg, budget, hp, types, speed=None, layer_scale=None, extra=None):
    phi = np.array([s.phi for s in stats])
    w = np.array([s.w for s in stats])
    eps = np.array([s.ladder_eps for s in stats])
    return allocate.allocate_ladder(phi, w, eps, ladders.choice_bytes(hp, types), n_params, budget, cfg.scope,
                                    granularity(cfg), cfg.alpha, cfg.beta, cfg.gamma, speed, layer_scale, extra)


def choose_with_mix(stats: list[LayerStats], n_params: np.ndarray, cfg: PMQConfig, budget: allocate.Budget, hp,
                    layer_scale, mix_kl: dict, reference: mixes.Mix) -> tuple[np.ndarray, mixes.Mix]:
    """mix="program": the experts' types and the mix from one program (quant/mix_choice.py), whose byte cap
    is the experts' budget plus the reference mix's matrices: the file `reference` would give."""
    types = check_ladder(cfg)
    cands = mix_choice.candidates(hp, reference, _overrides(cfg))
    groups, cost, size = mix_choice.items(hp, mix_kl, cands)
    a = _ladder_allocation(stats, n_params, cfg, budget, hp, types, None, layer_scale,
                           (cost, size, mix_choice.matrix_bytes(hp, reference)))
    return np.array(types, dtype=object)[a.choice], mix_choice.chosen_mix(groups, cands, a.extra, reference)


def check_mix_program(cfg: PMQConfig, ladder_types) -> bool:
    """Whether the program chooses the mix; its needs fail before any work."""
    if cfg.mix != mixes.PROGRAM:
        return False
    if not ladder_types or cfg.scope != "model" or cfg.sensitivity != "kl":
        raise ValueError("--mix program weighs the tensors outside the experts against the experts in KL: it needs "
                         "a ladder (--ladder full|stock|<types>), --scope model and --sensitivity kl")
    if cfg.min_speed:
        raise ValueError("--mix program with --min-speed is not supported (the floor counts expert mat-vecs only)")
    return True


# ------------------------------------------------------------------------------------- the layers
@torch.no_grad()
def _attention_inputs(layer: torch.nn.Module, h: torch.Tensor, cos, sin, chunk: int):
    """Inputs of q/k/v (normed h) and of o_proj (attention output), over the calibration batch."""
    captured = []
    hook = layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: captured.append(i[0].detach()))
    try:
        xa = []
        for s in range(0, h.shape[0], chunk):
            x = layer.input_layernorm(h[s:s + chunk])
            xa.append(x)
            layer.self_attn(x, cos, sin)
    finally:
        hook.remove()
    return torch.cat(xa), torch.cat(captured)


@torch.no_grad()
def quantize_attention(layer: torch.nn.Module, h, cos, sin, cfg: PMQConfig, chunk: int, mix: mixes.Mix) -> dict:
    att = layer.self_attn
    xa, _ = _attention_inputs(layer, h, cos, sin, chunk)
    H = GPTQ(xa.shape[-1], device=xa.device) if any(mixes.is_mcq(mix.attn(n)) for n in ("q_proj", "k_proj", "v_proj")) else None
    if H is not None:
        H.add_batch(xa)
    out = {}

    def one(name: str, x, Hx) -> None:
        lin, t = getattr(att, name), mix.attn(name)
        if mixes.is_mcq(t):
            res = mcq_result(Hx, lin.weight, mixes.mcq_bits(t), cfg)
            lin.weight.copy_(res.dequantized)
            out[name] = mcq_packed(res, mixes.mcq_bits(t))
        elif t not in ("f16", "f32"):
            out[name], deq = ggml_packed(lin.weight, t, importance(x))
            lin.weight.copy_(deq)
    for name in ("q_proj", "k_proj", "v_proj"):
        one(name, xa, H)
    _, xo = _attention_inputs(layer, h, cos, sin, chunk)    # o_proj sees the quantized q/k/v's output
    Ho = None
    if mixes.is_mcq(mix.attn("o_proj")):
        Ho = GPTQ(xo.shape[-1], device=xo.device)
        Ho.add_batch(xo)
    one("o_proj", xo, Ho)
    return out


@torch.no_grad()
def moe_input(layer: torch.nn.Module, h, cos, sin, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    mids = [h[s:s + chunk] + layer.self_attn(layer.input_layernorm(h[s:s + chunk]), cos, sin)
            for s in range(0, h.shape[0], chunk)]
    h_mid = torch.cat(mids)
    return h_mid, layer.post_attention_layernorm(h_mid).reshape(-1, h.shape[-1])


@torch.no_grad()
def quantize_experts(moe: torch.nn.Module, x: torch.Tensor, types, cfg: PMQConfig, desc: str,
                     progress: bool = True) -> dict:
    """Every expert projection in its type (types[e][p], p in gate, up, down) on the tokens routed to the
    expert: mcq by GPTQ, ggml types with the tokens' importance. The down projection's inputs come from the
    already quantized gate/up, so it compensates their error (sequential, as GPTQ across layers)."""
    _, _, ids = moe.route(x)
    out = {}
    layer_imp = None
    for e in tqdm(range(moe.hp.num_local_experts), desc=desc, unit="expert", leave=False, disable=not progress):
        ex, te = moe.experts[e], dict(zip(ladders.PROJECTIONS, types[e]))
        tok = torch.where((ids == e).any(-1))[0]
        xe = x[tok]
        if len(tok) == 0 and layer_imp is None:
            layer_imp = importance(x)       # no token of its own: the layer's importance (the i-quants need one)
        # RTN needs no Hessian (H2 alone is ff^2 float64: 1.6 GB for Mixtral): built only for GPTQ'd mcq
        H = None
        if cfg.method == "gptq" and (mixes.is_ours(te["w1"]) or mixes.is_ours(te["w3"])):
            H = GPTQ(x.shape[-1], device=x.device)
            H.add_batch(xe)
        for name in ("w1", "w3"):
            entry, deq = quantize_matrix(getattr(ex, name).weight, te[name], xe, cfg, H, layer_imp)
            getattr(ex, name).weight.copy_(deq)
            out[name + f".{e}"] = entry
        inner = expert_inner(ex.w1.weight, ex.w3.weight, xe)      # from the quantized gate/up
        fallback = None if len(tok) else importance(expert_inner(ex.w1.weight, ex.w3.weight, x))
        entry, deq = quantize_matrix(ex.w2.weight, te["w2"], inner, cfg, None, fallback)
        ex.w2.weight.copy_(deq)
        out[f"w2.{e}"] = entry
    return out


@torch.no_grad()
def layer_forward(layer: torch.nn.Module, h, cos, sin, chunk: int) -> torch.Tensor:
    return torch.cat([layer(h[s:s + chunk], cos, sin)[0] for s in range(0, h.shape[0], chunk)])


# ------------------------------------------------------------------------------------- the driver
def _run_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in FINISH_ONLY}


def _manifest(model_dir: Path, cfg: PMQConfig) -> dict:
    return {"model_dir": str(Path(model_dir).resolve()), "config": _run_config(asdict(cfg)), "format": 1}


def _eps_quantizer(cfg: PMQConfig):
    if cfg.eps_method not in ("mse", "minmax"):
        raise ValueError(f"eps_method must be mse or minmax (got {cfg.eps_method!r})")
    return lambda W, bits: rtn_dequant(W, bits, cfg.eps_method)


def _with_defaults(manifest: dict) -> dict:
    """A manifest written before a PMQConfig field existed ran with that field's default, except for
    the mix: runs from before mixes existed wrote the q8 mix (attention mcq at attn_bits, Q8_0 ends)."""
    old = dict(manifest.get("config", {}))
    if "mix" not in old:
        old.pop("attn_bits", None)      # always 4 in practice (it was never a command-line option)
        old["mix"] = "q8"
        for k in ("embed_type", "output_type"):     # "q8_0" was the default; now it is the q8 mix's own
            if old.get(k) == "q8_0":
                old[k] = None
    if "eps_holdout" not in old:        # ladders measured eps on all calibration tokens before it existed
        filled = _as_config({**asdict(PMQConfig()), **old})
        old["eps_holdout"] = 0.0 if is_ladder(filled) else PMQConfig.eps_holdout
    return {**manifest, "config": _run_config({**asdict(PMQConfig()), **old})}


def _stats_pass(ck: Checkpoint, tokens, cfg, wd: WorkDir, cos, sin, chunk, budget, speed
                ) -> tuple[list[LayerStats], np.ndarray | None]:
    """scope='model': statistics of every layer on the unquantized model, and with sensitivity="kl" each
    layer's scale (quant/sensitivity.py): the first sens_seqs sequences ("probes") run float, plus one copy per
    layer with that layer's experts quantized to its layer-scope choice; after the last layer each copy's KL
    from the float probe. Resumes after the last layer whose statistics, state and probes are stored."""
    hp = ck.hp
    L = hp.num_hidden_layers
    probe = layer_sensitivity.check(cfg)
    cands = mix_choice.candidates(hp, plan_budget(cfg, hp)[1], _overrides(cfg)) if cfg.mix == mixes.PROGRAM else {}

    measured = probe and wd.sensitivity_path.exists()      # written after the last layer: nothing left to probe

    def stored(k: int) -> bool:     # layers < k done, and what enters layer k stored (0: the embeddings)
        return k == 0 or (all(wd.stats_path(l, fp=True).exists() for l in range(k))
                and (k == L or wd.state_path(k, fp=True).exists())
                and (not probe or wd.sens_state_path(k).exists() or (k == L and measured)))
    start = next(k for k in range(L, -1, -1) if stored(k))
    stats = [LayerStats(**wd.load_stats(l, fp=True)) for l in range(start)]
    sens = torch.load(wd.sens_state_path(start)) if probe and start > 0 and not measured else None
    if start < L:
        h = _embed(ck, tokens, cfg.device) if start == 0 else _load_state(wd.state_path(start, fp=True), cfg)
        if probe and sens is None:
            sens = {"h": {"fp": h[:cfg.sens_seqs].cpu()}, "pred": {}}
            if cands:
                sens["h"].update(mix_choice.start_probes(ck.get(ck.arch.GLOBAL_KEYS["embed"]).float(),
                                                         tokens[:cfg.sens_seqs], h[:cfg.sens_seqs], cands))
    n_params = expert_params(hp)
    fwd = lambda lay, hh: layer_forward(lay, hh, cos, sin, chunk)    # noqa: E731
    for l in tqdm(range(start, L), desc="calibrate (fp)", unit="layer", initial=start, total=L):
        layer = ck.arch.decoder_layer_from(ck, l).to(cfg.device)
        if cands:       # what the attention candidates are quantized with: their inputs' importance
            xa, xo = _attention_inputs(layer, h, cos, sin, chunk)
            imp_a, imp_o = importance(xa), importance(xo)
            del xa, xo
        h_mid, x = moe_input(layer, h, cos, sin, chunk)
        s = layer_statistics(l, layer.moe, x, h_mid, cfg, progress=False)
        del h_mid
        wd.save(s.to_dict(), wd.stats_path(l, fp=True), as_json=True)
        stats.append(s)
        h = layer_forward(layer, h, cos, sin, chunk) if l < L - 1 else None
        if probe:
            entering = sens["h"]["fp"].to(cfg.device)
            mixed = {k: v for k, v in sens["h"].items() if k.startswith(mix_choice.KEY)}
            sens["h"] = {k: fwd(layer, v.to(cfg.device)).cpu() for k, v in sens["h"].items() if k not in mixed}
            if mixed:       # before the probe below quantizes this layer's experts in place
                sens["h"].update(mix_choice.layer_step(layer, mixed, imp_a, imp_o, fwd, cfg.device))
            # the probe of this layer: its experts as the layer-scope program would give them at this budget
            choice = choose_types([s], n_params[l:l + 1], cfg, budget, hp, speed)[0]
            quantize_experts(layer.moe, x, choice, cfg, f"layer {l} probe", progress=False)
            sens["h"][str(l)] = layer_forward(layer, entering, cos, sin, chunk).cpu()
            idx = np.vectorize(s.ladder.index)(choice)
            sens["pred"][str(l)] = layer_sensitivity.predicted(s.phi, s.w, s.ladder_eps, idx, cfg.alpha, cfg.beta, cfg.gamma)
            wd.save(sens, wd.sens_state_path(l + 1))
            wd.drop_sens_state(l)
        if h is not None:
            wd.save(h.cpu(), wd.state_path(l + 1, fp=True))
            wd.drop_state(l, fp=True)
        del layer, x
    if not probe:
        return stats, None, None
    if measured:
        rep = json.loads(wd.sensitivity_path.read_text())
    else:
        fp = sens["h"]["fp"].to(cfg.device)
        kl = [layer_sensitivity.mean_kl(ck, fp, sens["h"][str(l)].to(cfg.device)) for l in range(L)]
        pred = [sens["pred"][str(l)] for l in range(L)]
        rep = {"kl": kl, "predicted": pred, "scale": layer_sensitivity.layer_scales(kl, pred).tolist(),
               "sens_seqs": int(fp.shape[0])}
        if cands:
            head = None if hp.tie_word_embeddings else ck.get(ck.arch.GLOBAL_KEYS["lm_head"]).float()
            rep["mix_kl"] = mix_choice.measure(
                lambda a, b, head=None: layer_sensitivity.mean_kl(ck, a, b, head=head), fp,
                {k: v for k, v in sens["h"].items() if k.startswith(mix_choice.KEY)}, cands, head,
                layer_sensitivity.final_norm(ck, fp))
        wd.save(rep, wd.sensitivity_path, as_json=True)
        wd.drop_sens_state(L)           # the probes' last copies (~9 GB at Mixtral size): the report replaces them
    return stats, np.array(rep["scale"]), rep.get("mix_kl")


def odp_curves(model_dir: str | Path, text: str, n_seq: int = 32, seq_len: int = 256,
               progress: bool = True) -> tuple[list[float], list[dict]]:
    """Per-layer median ratio (the paper's mu_l) and ODP pruning curve (calibration.odp_curve) of the
    unquantized model, for files without a PMQ run (an F16 conversion with `convert --odp-calibrate`)."""
    ck = Checkpoint(model_dir)
    hp = ck.hp
    tokens = calibration_tokens(Path(model_dir) / "tokenizer.json", text, n_seq, min(seq_len, hp.max_position_embeddings))
    cos, sin = ck.arch.rope_tables(hp, tokens.shape[1])
    chunk = max(1, 16384 // tokens.shape[1])
    h = _embed(ck, tokens, "cpu")
    medians, curves = [], []
    with torch.no_grad():
        for l in tqdm(range(hp.num_hidden_layers), desc="ODP thresholds", unit="layer", disable=not progress):
            layer = ck.arch.decoder_layer_from(ck, l)
            h_mid, x = moe_input(layer, h, cos, sin, chunk)
            medians.append(odp_mu(layer.moe.route(x)[1]))   # routing and the top-k experts only, no eps
            curves.append(odp_curve(layer.moe, x, h_mid))
            h = layer_forward(layer, h, cos, sin, chunk)
    return medians, curves


def odp_thresholds(model_dir: str | Path, text: str, n_seq: int = 32, seq_len: int = 256,
                   progress: bool = True, target: str = odp_fit.DEFAULT_TARGET) -> list[float]:
    """Per-layer ODP thresholds of the unquantized model fitted to `target` (odp_fit.py)."""
    odp_fit.parse_target(target)
    medians, curves = odp_curves(model_dir, text, n_seq, seq_len, progress)
    return odp_fit.fit(curves, medians, target)


def _embed(ck: Checkpoint, tokens: torch.Tensor, device: str) -> torch.Tensor:
    return torch.nn.functional.embedding(tokens, ck.get(ck.arch.GLOBAL_KEYS["embed"]).float()).to(device)


def _load_state(path: Path, cfg: PMQConfig) -> torch.Tensor:
    return torch.load(path).to(cfg.device)


def quantize(model_dir: str | Path, outdir: str | Path, cfg: PMQConfig, progress: bool = True,
             kernel_costs: dict | None = None) -> dict:
    """Run PMQ into the work directory `outdir` (resumes a crashed run of the same settings). kernel_costs:
    mat-vec costs per type for cfg.min_speed (engine/kernel_costs.matvec_us); the first run stores them in
    the work directory and a resumed run uses those, so every layer sees the same cost model."""
    ck = Checkpoint(model_dir)
    hp = ck.hp
    check_row_lengths(hp)
    _eps_quantizer(cfg)                 # a bad eps_method, ODP target, ladder or budget fails before any work
    odp_fit.parse_target(cfg.odp)
    kd_tune.check(_tune_config(cfg))
    if cfg.eps_rows < 0 or cfg.eps_tokens < 0:
        raise ValueError(f"eps_rows and eps_tokens must be >= 0 (0: all); got {cfg.eps_rows}, {cfg.eps_tokens}")
    if not 0 <= cfg.eps_holdout < 1:
        raise ValueError(f"eps_holdout must be in [0, 1) (a share of the calibration tokens); got {cfg.eps_holdout}")
    budget, mix = plan_budget(cfg, hp)
    ladder_types = check_ladder(cfg)
    if ladder_types:
        allocate.check_ladder_budget(ladders.choice_bytes(hp, ladder_types), expert_params(hp), budget, cfg.scope,
                                     granularity(cfg))
    check_min_speed(cfg, ladder_types)
    if layer_sensitivity.check(cfg) and not ladder_types:
        raise ValueError("--sensitivity kl weighs a ladder's eps (--ladder full|stock|<types>); the paper's "
                         "program (--ladder mcq) has no use for it")
    mix_program = check_mix_program(cfg, ladder_types)
    if mix_program:
        mix_choice.candidates(hp, mix, _overrides(cfg))     # a reference or override it cannot use fails here
    wd = WorkDir(outdir)
    wd.open(_manifest(model_dir, cfg), same=lambda old, new: _with_defaults(old) == new)
    stored = cfg.min_speed and wd.kernel_costs_path.exists()
    if stored:
        kernel_costs = json.loads(wd.kernel_costs_path.read_text())
    speed = speed_floor(cfg, hp, ladder_types, kernel_costs)     # checked before it is stored
    if cfg.min_speed and not stored:
        wd.save(dict(kernel_costs), wd.kernel_costs_path, as_json=True)
    if all(wd.has_layer(l) for l in range(hp.num_hidden_layers)):
        # a finished run (e.g. rerun after a failed export, or with other KD settings): no layer to redo
        return _tuned(finish(wd, ck, cfg.odp), wd, cfg, progress)
    text_path = Path(cfg.calib_text) if cfg.calib_text else Path(model_dir) / "calib.txt"
    if not text_path.exists():
        raise FileNotFoundError(f"{text_path}: calibration text not found (pass --calib-text)")
    # sequences never longer than the model's context (the tiny model's is 1024, Mixtral's 32k)
    tokens = calibration_tokens(Path(model_dir) / "tokenizer.json", text_path.read_text(encoding="utf-8"),
                                cfg.n_seq, min(cfg.seq_len, hp.max_position_embeddings))
    cos, sin = ck.arch.rope_tables(hp, tokens.shape[1], cfg.device)
    chunk = max(1, 16384 // tokens.shape[1])
    n_params = expert_params(hp)
    L = hp.num_hidden_layers

    global_types = None
    if cfg.scope == "model" and not cfg.strategy.startswith("uniform"):
        fp_stats, scale, mix_kl = _stats_pass(ck, tokens, cfg, wd, cos, sin, chunk, budget, speed)
        if mix_program:
            global_types, mix = choose_with_mix(fp_stats, n_params, cfg, budget, hp, scale, mix_kl, mix)
            wd.save(mix.to_dict(), wd.mix_path, as_json=True)
        else:
            global_types = choose_types(fp_stats, n_params, cfg, budget, hp, speed, scale)

    start = 0
    while start < L and wd.has_layer(start) and (start == L - 1 or wd.state_path(start + 1).exists()):
        start += 1
    h = _embed(ck, tokens, cfg.device) if start == 0 else \
        (_load_state(wd.state_path(start), cfg) if start < L else None)
    for l in tqdm(range(start, L), desc="PMQ", unit="layer", initial=start, total=L, disable=not progress):
        layer = ck.arch.decoder_layer_from(ck, l).to(cfg.device)
        tensors = {f"self_attn.{k}": v for k, v in quantize_attention(layer, h, cos, sin, cfg, chunk, mix).items()}
        h_mid, x = moe_input(layer, h, cos, sin, chunk)
        s = layer_statistics(l, layer.moe, x, h_mid, cfg, progress, ladder_eps=global_types is None)
        del h_mid
        wd.save(s.to_dict(), wd.stats_path(l), as_json=True)
        types = global_types[l] if global_types is not None else \
            choose_types([s], n_params[l:l + 1], cfg, budget, hp, speed)[0]
        for k, v in quantize_experts(layer.moe, x, types, cfg, f"layer {l} experts", progress).items():
            proj, e = k.split(".")
            tensors[f"block_sparse_moe.experts.{e}.{proj}"] = v
        if l < L - 1:
            h = layer_forward(layer, h, cos, sin, chunk)
            wd.save(h.cpu(), wd.state_path(l + 1))
        else:   # before the last layer file, which marks the run as complete
            wd.save(importance(layer_sensitivity.final_norm(ck, layer_forward(layer, h, cos, sin, chunk))), wd.output_importance_path)
        bits = bits_of_types(types[None])
        wd.save({"layer": l, "types": types.tolist(), **({"bits": bits[0].tolist()} if bits is not None else {}),
                 "tensors": tensors}, wd.layer_path(l))
        wd.drop_state(l)
        del layer, x        # before the next layer is built: peak memory of one layer, not two
    return _tuned(finish(wd, ck, cfg.odp), wd, cfg, progress)


def _tune_config(cfg: PMQConfig) -> kd_tune.TuneConfig:
    if cfg.kd_codes == 0:
        return kd_tune.TuneConfig(steps=cfg.kd_steps, lr=cfg.kd_lr, parts=kd_tune.CONTINUOUS)
    return kd_tune.TuneConfig(steps=cfg.kd_steps, lr=cfg.kd_lr, code_travel=cfg.kd_codes)


def _tuned(report: dict, wd: WorkDir, cfg: PMQConfig, progress: bool) -> dict:
    """The finished run's report, after KD tuning of its free parameters where cfg asks for it (an earlier
    tuning with other settings is redone; kd_steps = 0 removes one)."""
    kd = kd_tune.tune(wd, _tune_config(cfg), progress=progress)
    return {**report, "kd": kd} if kd["steps"] else report


def quantize_globals(wd: WorkDir, ck: Checkpoint, mix: mixes.Mix) -> None:
    """Embeddings and output in the mix's ggml types (layers/globals.pt), once, after the last layer."""
    keys = {"embed": (ck.arch.GLOBAL_KEYS["embed"], mix.embed, None)}
    if not ck.hp.tie_word_embeddings:
        imp = torch.load(wd.output_importance_path) if wd.output_importance_path.exists() else None
        keys["lm_head"] = (ck.arch.GLOBAL_KEYS["lm_head"], mix.output, imp)
    out = {}
    for name, (key, t, imp) in keys.items():
        if t not in ("f16", "f32"):
            out[name], _ = ggml_packed(ck.get(key), t, imp)
    wd.save({"tensors": out}, wd.globals_path)


def stored_globals(wd: WorkDir, ck: Checkpoint) -> dict:
    """The run's embeddings/output as stored (workdir.load_globals), finishing a run from before PMQ
    stored them."""
    if not wd.globals_path.exists():
        finish(wd, ck)
    return wd.load_globals()


def finish(wd: WorkDir | Path, ck: Checkpoint, odp: str | None = None) -> dict:
    """globals.pt and allocation.json of a run whose layers are all quantized (the latter returned).
    odp: the ODP thresholds' target (odp_fit.py); None keeps the one allocation.json has, else the default."""
    wd = WorkDir.of(wd)
    hp = ck.hp
    types = np.array([recorded_types(wd.load_layer(l)) for l in range(hp.num_hidden_layers)], dtype=object)
    bits = bits_of_types(types)
    stats = [wd.load_stats(l) for l in range(hp.num_hidden_layers)]
    cfg = _with_defaults(wd.manifest())["config"]
    mix = mixes.Mix(**json.loads(wd.mix_path.read_text())) if cfg["mix"] == mixes.PROGRAM else resolved_mix(cfg, hp)
    if not wd.globals_path.exists():
        quantize_globals(wd, ck, mix)
    if odp is None:
        odp = wd.allocation().get("odp_target", odp_fit.DEFAULT_TARGET) if wd.is_finished() else odp_fit.DEFAULT_TARGET
    curves = [s.get("odp") for s in stats]
    mu = odp_fit.fit(curves, [s["mu"] for s in stats], odp)
    if any(c is None for c in curves):
        odp = "median"                  # statistics from before the curves: the paper's rule (odp_fit.fit)
    report = {"types": types.tolist(), "bits": None if bits is None else bits.tolist(),
              "mu": mu, "odp_target": odp, "mix": mix.to_dict(), **size_report(ck, types, mix)}
    wd.save(report, wd.allocation_path, as_json=True)
    return report
