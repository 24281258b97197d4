"""Perplexity of a GGUF through llama.cpp, of an HF checkpoint through transformers, and of a PMQ work
directory through the compact torch model with its dequantized bytes: all with the one protocol of
base/perplexity.py (same chunks, same scored tokens), so the numbers compare like with like.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mcmoe_gguf.base.perplexity import chunked, nll_numpy, nll_torch, perplexity


def ppl_llama(gguf_path: str | Path, text: str, ctx: int = 256, max_chunks: int | None = None,
              n_threads: int | None = None, progress: bool = True, **llama_kwargs) -> dict:
    from mcmoe_gguf.engine.runtime import load
    llm = load(gguf_path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=n_threads,
               **llama_kwargs)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def nll_of(part: list[list[int]]) -> float:
        (chunk,) = part
        llm.reset()
        llm.eval(chunk)
        return nll_numpy(np.asarray(llm.scores[: len(chunk) - 1]), np.asarray(chunk[1:]))
    return perplexity(chunked(ids, ctx, max_chunks), nll_of, progress=progress, desc=f"ppl {Path(gguf_path).name}")


def ppl_torch(model_dir: str | Path, text: str, ctx: int = 256, max_chunks: int | None = None,
              progress: bool = True) -> dict:
    import torch
    from tokenizers import Tokenizer
    from transformers import MixtralForCausalLM

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    model = MixtralForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def nll_of(part: list[list[int]]) -> float:
        x = torch.tensor(part)
        with torch.no_grad():
            return nll_torch(model(x).logits, x)
    return perplexity(chunked(ids, ctx, max_chunks), nll_of, batch=8, progress=progress, desc="ppl torch")


def fake_quant_model(outdir: str | Path):
    """The compact torch model of a PMQ work directory: original weights, quantized tensors replaced by
    their dequantized stored bytes (what llama.cpp will compute with, up to float rounding)."""

    from mcmoe_gguf.model.checkpoint import Checkpoint
    from mcmoe_gguf.quant.pmq import stored_globals
    from mcmoe_gguf.quant.workdir import WorkDir, dequantize_entry
    wd = WorkDir(outdir)
    ck = Checkpoint(wd.model_dir())
    glob = stored_globals(wd, ck)
    model = ck.arch.CompactModel(ck.hp)
    sd = {k: ck.get(v).float() for k, v in ck.arch.GLOBAL_KEYS.items() if ck.has(v)}
    emb = dequantize_entry(glob["embed"]) if "embed" in glob else sd["embed"].half().float()
    model.model.embed_tokens.weight.data.copy_(emb)
    model.model.norm.weight.data.copy_(sd["norm"])
    out = emb
    if "lm_head" in sd:
        out = dequantize_entry(glob["lm_head"]) if "lm_head" in glob else sd["lm_head"].half().float()
    model.lm_head.weight.data.copy_(out)
    quantized = wd.dequantized_state()
    for i in range(ck.hp.num_hidden_layers):
        layer = ck.arch.decoder_layer_from(ck, i)
        prefix = f"model.layers.{i}."
        own = layer.state_dict()
        for name in own:
            if prefix + name in quantized:
                own[name] = quantized[prefix + name]
        layer.load_state_dict(own)
        model.model.layers[i] = layer
    return model.eval(), ck


def ppl_fake_quant(outdir: str | Path, text: str | None = None, ctx: int = 256, max_chunks: int | None = None) -> dict:
    from tokenizers import Tokenizer

    from mcmoe_gguf.model.tiny import compact_nll
    model, ck = fake_quant_model(outdir)
    text = text if text is not None else (ck.dir / "eval.txt").read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(ck.dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    return perplexity(chunked(ids, ctx, max_chunks), compact_nll(model), batch=8)
