"""Perplexity, through llama.cpp and through transformers, with one protocol for both.

Protocol: the text is tokenized without BOS, cut into non-overlapping chunks of ``ctx`` tokens, and
every token of a chunk except its first is scored given the tokens before it in the chunk. The same
chunks go through transformers (the reference) and through the patched llama.cpp (the product), so
the two numbers compare like with like.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm


def chunked(ids: list[int], ctx: int, max_chunks: int | None = None) -> list[list[int]]:
    n = len(ids) // ctx
    if n == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
    if max_chunks:
        n = min(n, max_chunks)
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n)]


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
    return float((lse - logits[np.arange(len(targets)), targets]).sum())


def ppl_llama(gguf_path: str | Path, text: str, ctx: int = 256, max_chunks: int | None = None,
              n_threads: int | None = None, progress: bool = True, **llama_kwargs) -> dict:
    from .runtime import load
    llm = load(gguf_path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=n_threads,
               **llama_kwargs)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    nll, count = 0.0, 0
    for chunk in tqdm(chunked(ids, ctx, max_chunks), desc=f"ppl {Path(gguf_path).name}", unit="chunk",
                      disable=not progress):
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk) - 1])
        nll += _nll(logits, np.asarray(chunk[1:]))
        count += len(chunk) - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "ctx": ctx}


def ppl_torch(model_dir: str | Path, text: str, ctx: int = 256, max_chunks: int | None = None,
              progress: bool = True) -> dict:
    import torch
    from tokenizers import Tokenizer
    from transformers import MixtralForCausalLM

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    model = MixtralForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    chunks = chunked(ids, ctx, max_chunks)
    with torch.no_grad():
        for i in tqdm(range(0, len(chunks), 8), desc="ppl torch", unit="batch", disable=not progress):
            x = torch.tensor(chunks[i:i + 8])
            logits = model(x).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                     reduction="sum").item()
            count += x[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "tokens": count, "ctx": ctx}


def fake_quant_model(outdir: str | Path):
    """The compact torch model of a PMQ work directory: original weights, quantized tensors replaced by
    their dequantized stored bytes (what llama.cpp will compute with, up to float rounding)."""
    import json

    import torch

    from .arch import mixtral as mx
    from .checkpoint import Checkpoint
    from .formats import stock_quantize
    from .pmq import dequantized_state
    manifest = json.loads((Path(outdir) / "manifest.json").read_text())
    cfg = manifest["config"]
    ck = Checkpoint(manifest["model_dir"])
    model = mx.CompactMixtral(ck.hp)
    sd = {k: ck.get(v).float() for k, v in mx.GLOBAL_KEYS.items() if ck.has(v)}
    emb = torch.from_numpy(stock_quantize(sd["embed"], cfg["embed_type"])[1])
    model.model.embed_tokens.weight.data.copy_(emb)
    model.model.norm.weight.data.copy_(sd["norm"])
    out = torch.from_numpy(stock_quantize(sd["lm_head"], cfg["output_type"])[1]) if "lm_head" in sd else emb
    model.lm_head.weight.data.copy_(out)
    quantized = dequantized_state(outdir)
    for i in range(ck.hp.num_hidden_layers):
        layer = mx.decoder_layer_from(ck, i)
        prefix = f"model.layers.{i}."
        own = layer.state_dict()
        for name in own:
            if prefix + name in quantized:
                own[name] = quantized[prefix + name]
        layer.load_state_dict(own)
        model.model.layers[i] = layer
    return model.eval(), ck


def ppl_fake_quant(outdir: str | Path, text: str | None = None, ctx: int = 256, max_chunks: int | None = None) -> dict:
    import torch
    from tokenizers import Tokenizer

    from .tiny import eval_ppl
    model, ck = fake_quant_model(outdir)
    text = text if text is not None else (ck.dir / "eval.txt").read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(ck.dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    n = len(chunked(ids, ctx, max_chunks)) * ctx
    return {"ppl": eval_ppl(model, torch.tensor(ids[:n]), ctx), "tokens": n // ctx * (ctx - 1), "ctx": ctx}
