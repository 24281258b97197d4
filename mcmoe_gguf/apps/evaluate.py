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
    their dequantized stored bytes (what llama.cpp will compute with, up to float rounding), its finished
    KD tuning applied (quant/fake_quant.py)."""
    from mcmoe_gguf.model.checkpoint import Checkpoint
    from mcmoe_gguf.quant.fake_quant import quantized_model
    from mcmoe_gguf.quant.pmq import stored_globals
    from mcmoe_gguf.quant.workdir import WorkDir
    wd = WorkDir(outdir)
    stored_globals(wd, Checkpoint(wd.model_dir()))      # a run from before globals.pt: finished here
    return quantized_model(wd)


def ppl_fake_quant(outdir: str | Path, text: str | None = None, ctx: int = 256, max_chunks: int | None = None) -> dict:
    from tokenizers import Tokenizer

    from mcmoe_gguf.model.tiny import compact_nll
    model, ck = fake_quant_model(outdir)
    text = text if text is not None else (ck.dir / "eval.txt").read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(ck.dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    return perplexity(chunked(ids, ctx, max_chunks), compact_nll(model), batch=8)


def kld_torch(model, teacher, ids: list[int], ctx: int = 256, max_chunks: int | None = None) -> dict:
    """Held-out agreement of a torch model with its float teacher on the chunks of base/perplexity.py: mean
    KL(teacher || model) per scored token, top-1 agreement, and the PPL ratio, each with one standard error
    over chunks (llama-perplexity --kl-divergence's quantities, in torch)."""
    import torch
    import torch.nn.functional as F
    chunks = chunked(ids, ctx, max_chunks)
    kl, same, dnll = [], [], []
    with torch.no_grad():
        for i in range(0, len(chunks), 8):
            x = torch.tensor(chunks[i:i + 8])
            lt = F.log_softmax(teacher(x)[0][:, :-1].double(), -1)
            ls = F.log_softmax(model(x)[0][:, :-1].double(), -1)
            tgt = x[:, 1:, None]
            kl += (lt.exp() * (lt - ls)).sum(-1).mean(-1).tolist()
            same += (lt.argmax(-1) == ls.argmax(-1)).double().mean(-1).tolist()
            dnll += (lt.gather(-1, tgt) - ls.gather(-1, tgt)).squeeze(-1).mean(-1).tolist()
    a = {k: np.asarray(v) for k, v in (("kld", kl), ("top1", same), ("dnll", dnll))}
    se = {k: v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan") for k, v in a.items()}
    ratio = float(np.exp(a["dnll"].mean()))
    return {"kld": float(a["kld"].mean()), "kld_se": float(se["kld"]), "top1": 100 * float(a["top1"].mean()),
            "top1_se": 100 * float(se["top1"]), "ppl_ratio": ratio, "ppl_ratio_se": ratio * float(se["dnll"]),
            "chunks": len(chunks)}
