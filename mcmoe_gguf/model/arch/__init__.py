"""Per-architecture adapters. Only Mixtral-style MoE for now; everything else is refused clearly."""
from __future__ import annotations

from . import mixtral

SUPPORTED = {"mixtral": mixtral}


class UnsupportedModel(ValueError):
    pass


def adapter_for(cfg: dict):
    """The adapter module for a config.json, or UnsupportedModel naming what was found and what works."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type in SUPPORTED:
        mod = SUPPORTED[model_type]
    else:
        mod = next((m for m in SUPPORTED.values() if any(a in m.ARCHITECTURES for a in archs)), None)
    if mod is None:
        raise UnsupportedModel(
            f"unsupported architecture {archs or model_type!r} (model_type={model_type!r}); "
            f"supported: {', '.join(a for m in SUPPORTED.values() for a in m.ARCHITECTURES)}")
    n_exp = cfg.get("num_local_experts") or 0
    if n_exp < 2 or not cfg.get("num_experts_per_tok"):
        raise UnsupportedModel(
            f"config.json describes a dense model (num_local_experts={cfg.get('num_local_experts')!r}); "
            "mcmoe-gguf converts Mixture-of-Experts checkpoints only")
    return mod
