"""The PMQ work directory: the one module that knows its files (pmq writes them; export, inspect and the
fake-quant evaluation read them through here).

    manifest.json          settings + source; a resumed run must use the same ones
    stats/layer_XX.json    calibration statistics of layer XX (phi, w, eps, mu)
    stats/fp_layer_XX.json the same on the unquantized model (scope="model" only)
    layers/layer_XX.pt     quantized tensors of layer XX (packed bytes as stored in GGUF, + bits)
    state/h_XX.pt          hidden states entering layer XX (outputs of the quantized layer XX-1)
    state/fp_h_XX.pt       the same on the unquantized model (scope="model" only)
    state/sens_h_XX.pt     sensitivity="kl": the probe sequences entering layer XX, float and with each earlier
                           layer's experts quantized (quant/sensitivity.py)
    state/sens_h_XX.pt     ... and with mix="program" the probes of every candidate type of the tensors outside
                           the experts (quant/mix_choice.py)
    sensitivity.json       sensitivity="kl": per layer the probe's choice cost, its KL and the scale (mix="program":
                           also each outside group's KL per candidate type)
    mix.json               mix="program": the types the program chose outside the experts
    output_importance.pt   mean x^2 of the output projection's input (written with the last layer)
    layers/globals.pt      embeddings and output in the mix's ggml types (written at the end)
    allocation.json        bits [layer][expert], the mix and the real-byte accounting (written at the end)
    tune.pt                KD tuning (kd_tune.py), after allocation.json: per-block scale factors of the stored
                           tensors, tuned norms and routers, the optimizer's state; applied at export

A stored tensor is {bits, shape, data} for our mcq types or {type, shape, data} for a ggml type (data:
the bytes as they go into the GGUF file, one row of blocks per output row).

Every file is written atomically (temporary name, then rename), so a killed run leaves whole files only
and resumes after the last one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mcmoe_gguf.quant import formats


class WorkdirMismatch(ValueError):
    pass


class WorkDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, x: "WorkDir | str | Path") -> "WorkDir":
        return x if isinstance(x, WorkDir) else cls(x)

    def __repr__(self) -> str:
        return f"WorkDir({str(self.path)!r})"

    # ---------------------------------------------------------------- paths
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def allocation_path(self) -> Path:
        return self.path / "allocation.json"

    @property
    def kernel_costs_path(self) -> Path:
        return self.path / "kernel_costs.json"

    @property
    def sensitivity_path(self) -> Path:
        return self.path / "sensitivity.json"

    def sens_state_path(self, l: int) -> Path:
        """sensitivity probes entering layer l (l = n_layers: after the last one, until sensitivity.json)"""
        return self.path / "state" / f"sens_h_{l:02d}.pt"

    @property
    def mix_path(self) -> Path:
        return self.path / "mix.json"

    @property
    def tune_path(self) -> Path:
        return self.path / "tune.pt"

    def tuned(self) -> dict | None:
        """The finished KD tuning (kd_tune.py): {"factors": {key: [rows, groups]}, "floats": {key: tensor}},
        keys of the compact model; None where there is none or it has not finished."""
        if not self.tune_path.exists():
            return None
        import torch
        state = torch.load(self.tune_path)
        return state if state["step"] == state["config"]["steps"] else None

    @property
    def output_importance_path(self) -> Path:
        return self.path / "output_importance.pt"

    @property
    def globals_path(self) -> Path:
        return self.path / "layers" / "globals.pt"

    def load_globals(self) -> dict:
        """{"embed"?: entry, "lm_head"?: entry}; a tensor kept in float has no entry."""
        import torch
        return torch.load(self.globals_path)["tensors"]

    def layer_path(self, l: int) -> Path:
        return self.path / "layers" / f"layer_{l:02d}.pt"

    def stats_path(self, l: int, fp: bool = False) -> Path:
        return self.path / "stats" / f"{'fp_' if fp else ''}layer_{l:02d}.json"

    def state_path(self, l: int, fp: bool = False) -> Path:
        """hidden states entering layer l"""
        return self.path / "state" / f"{'fp_' if fp else ''}h_{l:02d}.pt"

    # ---------------------------------------------------------------- writing
    @staticmethod
    def save(obj, path: Path, as_json: bool = False) -> None:
        tmp = path.with_name(path.name + ".tmp")
        if as_json:
            tmp.write_text(json.dumps(obj, indent=1))
        else:
            import torch
            torch.save(obj, tmp)
        os.replace(tmp, path)

    def open(self, manifest: dict, same=lambda old, new: old == new) -> None:
        """Create the directory for a run with `manifest`, or check that it holds the same run
        (same(old, new), e.g. with defaults filled in for fields added since)."""
        for sub in ("stats", "layers", "state"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        if self.manifest_path.exists():
            if not same(json.loads(self.manifest_path.read_text()), manifest):
                raise WorkdirMismatch(f"{self.path} holds a run with other settings or another model; "
                                      "use a new output directory (or delete this one)")
        else:
            self.save(manifest, self.manifest_path, as_json=True)

    def drop_state(self, l: int, fp: bool = False) -> None:
        self.state_path(l, fp).unlink(missing_ok=True)

    def drop_sens_state(self, l: int) -> None:
        self.sens_state_path(l).unlink(missing_ok=True)

    # ---------------------------------------------------------------- reading
    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            raise FileNotFoundError(f"{self.path}: not a PMQ work directory (no manifest.json)")
        return json.loads(self.manifest_path.read_text())

    def config(self) -> dict:
        return self.manifest()["config"]

    def model_dir(self) -> Path:
        return Path(self.manifest()["model_dir"])

    def is_finished(self) -> bool:
        return self.allocation_path.exists()

    def allocation(self) -> dict:
        if not self.allocation_path.exists():
            raise FileNotFoundError(f"{self.path}: no allocation.json, not a finished PMQ work directory "
                                    "(run `mcmoe-gguf quantize` to completion first)")
        return json.loads(self.allocation_path.read_text())

    def has_layer(self, l: int) -> bool:
        return self.layer_path(l).exists()

    def load_layer(self, l: int) -> dict:
        import torch
        return torch.load(self.layer_path(l))

    def layer_files(self) -> list[Path]:
        return sorted((self.path / "layers").glob("layer_*.pt"))

    def load_stats(self, l: int, fp: bool = False) -> dict:
        return json.loads(self.stats_path(l, fp).read_text())

    def all_stats(self) -> list[dict]:
        """The quantized run's per-layer statistics, in layer order."""
        return [json.loads(p.read_text()) for p in sorted((self.path / "stats").glob("layer_*.json"))]

    # ---------------------------------------------------------------- the quantized state
    def layer_entries(self) -> dict:
        """Every stored tensor of the layers (attention, experts) as stored, by its HF key
        (model.layers.N.<name>.weight); dequantize_entry() gives its weights."""
        import torch
        out = {}
        for f in self.layer_files():
            d = torch.load(f)
            for name, entry in d["tensors"].items():
                out[f"model.layers.{d['layer']}.{name}.weight"] = entry
        return out


def dequantize_entry(entry: dict):
    """One stored tensor ({bits, shape, data} or {type, shape, data}) as float32 [out, in]."""
    import torch
    out, n = entry["shape"]
    if "type" in entry:
        from mcmoe_gguf.base.ggml import ggml
        return torch.from_numpy(ggml().dequantize(entry["data"].numpy(), entry["type"], n)).reshape(out, n)
    return torch.from_numpy(formats.dequantize(entry["data"].numpy(), entry["bits"], n)).reshape(out, n)
