"""The torch models of a PMQ run: the float model it started from and its quantized state (original weights,
quantized tensors replaced by their dequantized stored bytes: what llama.cpp computes with, up to float
rounding), with a finished KD tuning (kd_tune.py) applied where the work directory has one.

Whole models in memory: for the models whose float weights fit in RAM (the tiny ones, the benchmarks').
"""
from __future__ import annotations

from mcmoe_gguf.model.checkpoint import Checkpoint
from mcmoe_gguf.quant.recode import recoded_entry
from mcmoe_gguf.quant.rescale import rescaled_entry
from mcmoe_gguf.quant.workdir import WorkDir, dequantize_entry


def float_model(ck: Checkpoint):
    """The checkpoint as the compact torch model (float32, eval mode)."""
    model = ck.arch.CompactModel(ck.hp)
    sd = {k: ck.get(v).float() for k, v in ck.arch.GLOBAL_KEYS.items() if ck.has(v)}
    model.model.embed_tokens.weight.data.copy_(sd["embed"])
    model.model.norm.weight.data.copy_(sd["norm"])
    model.lm_head.weight.data.copy_(sd["lm_head"] if "lm_head" in sd else sd["embed"])
    for i in range(ck.hp.num_hidden_layers):
        model.model.layers[i] = ck.arch.decoder_layer_from(ck, i)
    return model.eval()


def stored_entries(wd: WorkDir, ck: Checkpoint) -> dict[str, dict]:
    """Every stored (quantized) tensor of the run by its compact-model key: layers' attention and experts,
    and the embeddings / output where the mix quantized them."""
    out = wd.layer_entries()
    if not wd.globals_path.exists():    # pmq.stored_globals() finishes a run from before they were stored
        raise FileNotFoundError(f"{wd.path}: no {wd.globals_path.name} (embeddings/output); finish the run "
                                "with `mcmoe-gguf quantize` first")
    glob = wd.load_globals()
    if "embed" in glob:
        out["model.embed_tokens.weight"] = glob["embed"]
    if "lm_head" in glob:
        out["lm_head.weight"] = glob["lm_head"]
    return out


def tuned_entry(entry: dict, key: str, overlay: dict | None) -> dict:
    """A stored entry as a finished KD tuning (WorkDir.tuned()) leaves it: its re-chosen codes, then its
    blocks' scales times the tuned factors; the entry itself where the tuning did not touch it."""
    if not overlay:
        return entry
    codes = overlay.get("codes", {}).get(key)
    if codes is not None:
        entry = recoded_entry(entry, codes)
    g = overlay["factors"].get(key)
    return entry if g is None else rescaled_entry(entry, g.numpy())


def quantized_model(wd: WorkDir | str, tuned: bool = True, entries: dict | None = None):
    """(compact model of the run's stored bytes, its Checkpoint); tuned: with the work directory's finished
    KD tuning applied (rescaled bytes dequantized, tuned norms and routers), as the exported file has it.
    entries: the run's stored_entries() where the caller has them already (they are read otherwise)."""
    wd = WorkDir.of(wd)
    ck = Checkpoint(wd.model_dir())
    model = float_model(ck)
    overlay = wd.tuned() if tuned else None
    entries = stored_entries(wd, ck) if entries is None else entries
    sd = model.state_dict()
    for key, entry in entries.items():
        sd[key] = dequantize_entry(tuned_entry(entry, key, overlay))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key not in entries:              # a float global is what the file stores: fp16
            sd[key] = sd[key].half().float()
    if "lm_head.weight" not in entries and ck.hp.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if overlay:
        sd.update({k: v.float() for k, v in overlay["floats"].items()})
    model.load_state_dict(sd)
    return model.eval(), ck
