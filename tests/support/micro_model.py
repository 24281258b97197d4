"""The micro model: a 2-layer random Mixtral (d=256, 8 experts of 256) with a PMQ work directory of it,
and work directories re-quantized at chosen widths. Built once per session (fixtures in conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import random_state, save_checkpoint, small_config
from mcmoe_gguf.model.arch import mixtral as mx
from mcmoe_gguf.model.checkpoint import Checkpoint
from mcmoe_gguf.quant import formats
from mcmoe_gguf.quant import pmq
from mcmoe_gguf.quant.budget import types_of_bits

N_LAYERS, HIDDEN, FF, VOCAB, E = 2, 256, 256, 512, 8
MIXED_BITS = [[3, 1, 2, 3, 1, 2, 2, 1],      # layer 0: all three widths
              [1, 3, 1, 3, 3, 1, 1, 3]]      # layer 1: no 2-bit expert (an empty group)
UNIFORM3 = [[3] * E] * N_LAYERS

def make_micro(root: Path, small_tokenizer_dir: Path) -> dict:
    """A 2-layer random Mixtral (d=256, 8 experts of 256) and a PMQ work directory of it (uniform 2 bits, RTN)."""
    from mcmoe_gguf.model.tiny import PRESETS, corpus_splits
    cfg = small_config(n_layers=N_LAYERS, hidden=HIDDEN, ff=FF, vocab=VOCAB, experts=E)
    ck = save_checkpoint(root / "ckpt", cfg, random_state(cfg, seed=11, dtype=torch.float32), small_tokenizer_dir)
    (ck / "calib.txt").write_text(corpus_splits(PRESETS["default"])["calib"][:20_000])
    wd = root / "wd-u2"
    # RTN (seconds); embeddings and output in F16, so the only activation quantization
    # llama.cpp applies is the Q8_K of the mcq matmuls (a Q8_0 output would add its own, in the logits)
    cfg = pmq.PMQConfig(strategy="uniform:2", method="rtn", n_seq=4, seq_len=32, mix="q8",
                        embed_type="f16", output_type="f16")
    pmq.quantize(ck, wd, cfg, progress=False)
    return {"root": root, "ck": ck, "u2": wd}


def workdir_as_mcq3(src: Path, dst: Path) -> Path:
    """A copy of `src` whose 1- and 2-bit experts are re-encoded as mcq3 blocks with the same d, m and codes:
    every expert dequantizes to exactly the same values, now all in one type."""
    import shutil
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    for path in sorted((dst / "layers").glob("layer_*.pt")):
        f = torch.load(path)
        for name, e in f["tensors"].items():
            if "experts" in name and e["bits"] != 3:
                q, d, m = formats.unpack(e["data"].numpy(), e["bits"], e["shape"][1])
                e["data"], e["bits"] = torch.from_numpy(formats.pack(q, d, m, 3)), 3
        f["bits"] = [3] * len(f["bits"])
        f["types"] = types_of_bits(f["bits"]).tolist()
        torch.save(f, path)
    pmq.finish(dst, Checkpoint(json.loads((dst / "manifest.json").read_text())["model_dir"]))
    return dst


def workdir_with_bits(src: Path, dst: Path, bits: list[list[int]]) -> Path:
    """A copy of the work directory `src` whose experts are re-quantized from the checkpoint
    at the given widths (RTN, mse fit as pmq does); attention and everything else stay as in `src`."""
    import shutil
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    ck = Checkpoint(json.loads((dst / "manifest.json").read_text())["model_dir"])
    for i, row in enumerate(bits):
        path = dst / "layers" / f"layer_{i:02d}.pt"
        f = torch.load(path)
        for e, b in enumerate(row):
            for proj in ("w1", "w2", "w3"):
                w = ck.get(mx.legacy_expert_key(i, e, proj)).float()
                f["tensors"][f"block_sparse_moe.experts.{e}.{proj}"] = {
                    "bits": b, "shape": list(w.shape), "data": torch.from_numpy(formats.quantize(w, b, "mse"))}
        f["bits"] = list(row)
        f["types"] = types_of_bits(row).tolist()
        torch.save(f, path)
    pmq.finish(dst, ck)
    return dst


def workdir_with_types(src: Path, dst: Path, types: list[list[list[str]]]) -> Path:
    """A copy of the work directory `src` whose expert projections are re-quantized from the checkpoint in
    the given types [layer][expert][gate, up, down] (mcq: RTN; ggml types: ggml's quantizer with a flat
    importance, which the i-quants require)."""
    import shutil

    import numpy as np

    from mcmoe_gguf.quant.budget import PROJECTIONS
    from mcmoe_gguf.quant.quantizers import quantize_matrix
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    ck = Checkpoint(json.loads((dst / "manifest.json").read_text())["model_dir"])
    cfg = pmq.PMQConfig(method="rtn")
    for i, row in enumerate(types):
        path = dst / "layers" / f"layer_{i:02d}.pt"
        f = torch.load(path)
        for e, te in enumerate(row):
            for proj, t in zip(PROJECTIONS, te):
                w = ck.get(mx.legacy_expert_key(i, e, proj)).float()
                entry, _ = quantize_matrix(w, t, torch.ones(1, w.shape[1]), cfg)
                f["tensors"][f"block_sparse_moe.experts.{e}.{proj}"] = entry
        f.pop("bits", None)
        f["types"] = [list(te) for te in row]
        torch.save(f, path)
    pmq.finish(dst, ck)
    assert np.array(json.loads((dst / "allocation.json").read_text())["types"]).tolist() == types
    return dst


def make_pmq_file(micro: dict) -> Path:
    """A mixed PMQ file of the micro model (MIXED_BITS)."""
    from mcmoe_gguf.gguf.export import export_pmq
    wd = workdir_with_bits(micro["u2"], micro["root"] / "wd-mixed", MIXED_BITS)
    f = micro["root"] / "fuzz-src.gguf"
    return f if f.exists() else export_pmq(wd, f, progress=False)


def stock_files(root: Path, small_tokenizer_dir: Path, qtypes: tuple[str, ...], seed: int) -> dict[str, Path]:
    """A small random Mixtral (2 layers, d=256, 8 experts of 512, fp32 weights) as F16 and in llama.cpp's
    types through llama-quantize (no imatrix): {"F16": path, qtype: path, ...}."""
    from mcmoe_gguf.apps.baselines import stock_quantize
    from mcmoe_gguf.gguf.export import convert
    cfg = small_config(n_layers=2, hidden=256, ff=512, vocab=512)
    ck = save_checkpoint(root / "ckpt", cfg, random_state(cfg, seed=seed, dtype=torch.float32), small_tokenizer_dir)
    f16 = convert(ck, root / "f16.gguf", outtype="f16", progress=False)
    return {"F16": f16, **{q: stock_quantize(f16, q, root / f"{q}.gguf", None) for q in qtypes}}
