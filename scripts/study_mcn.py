#!/usr/bin/env python3
"""Issue 14: the mcn types layer by layer on the bench model, judged end to end (not only per matrix).

    .venv/bin/python scripts/study_mcn.py [--layers 0,1,2,3] [--formats ...] [--chunks 30] [--write-results]

For each layer and format: every expert projection of that layer quantized (float model elsewhere; gate/up
GPTQ'd or importance-weighted with the tokens the float model routes to the expert on 64 x 256 calibration
tokens, down with the inner activations of the quantized gate/up), then
  - per-matrix error on held-out tokens: tr(dW H dW^T) / tr(W H W^T) with H of the expert's routed eval
    inputs (geometric mean over the gate/up matrices), the statistic of the issue-14 study;
  - the MoE block's output error on held-out tokens, ||y_q - y||^2 / ||y||^2 (all experts, gates applied);
  - held-out perplexity of the whole model (ratio to the float model's on the same chunks).
Formats: mcn2 / mcn3 (GPTQ into the table, and nearest rounding with importance), mcq1-3 (GPTQ; "gptq-unshrink":
with the unshrink step), and
llama.cpp's iq2_xxs, q2_k, iq3_xxs through ggml's quantizer with the routed tokens' importance.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_eps import layer_inputs  # noqa: E402
from mcmoe_gguf.base.ggml import ggml  # noqa: E402
from mcmoe_gguf.base.perplexity import chunked, perplexity  # noqa: E402
from mcmoe_gguf.model.checkpoint import Checkpoint  # noqa: E402
from mcmoe_gguf.model.tiny import compact_nll, tiny_model  # noqa: E402
from mcmoe_gguf.quant import formats as F  # noqa: E402
from mcmoe_gguf.quant.gptq import GPTQ  # noqa: E402

FORMATS = ("mcn2 gptq", "mcn2 rtn", "mcq2 gptq", "iq2_xxs", "q2_k", "mcn3 gptq", "iq3_xxs")
BPW = {"mcn2": 2.1875, "mcq1": 1.25, "mcq2": 2.25, "mcq3": 3.25, "iq2_xxs": 2.0625, "q2_k": 2.625, "mcn3": 3.1875, "iq3_xxs": 3.0625}


def quantize(W: torch.Tensor, X: torch.Tensor, fmt: str) -> torch.Tensor:
    name, _, how = fmt.partition(" ")
    imp = (X.double() ** 2).mean(0).float().numpy()
    if name.startswith("mcn"):
        bits = F.mcn_spec(name).bits
        if how == "gptq":
            g = GPTQ(W.shape[1])
            g.add_batch(X)
            return g.quantize_mcn(W, bits).dequantized
        return torch.from_numpy(F.mcn_dequantize(F.mcn_quantize(W, bits, imp), bits, W.shape[1]))
    if name.startswith("mcq"):
        g = GPTQ(W.shape[1])
        g.add_batch(X)
        return g.quantize(W, int(name[3:]), unshrink=how == "gptq-unshrink").dequantized
    return torch.from_numpy(ggml().dequantize(ggml().quantize(W.numpy(), name, imp), name, W.shape[1]))


def rel(W, Q, X) -> float:
    d = (W - Q).double()
    return float(((X.double() @ d.t()) ** 2).sum() / ((X.double() @ W.double().t()) ** 2).sum())


@torch.no_grad()
def study(a, quantize=quantize, bpw=BPW) -> str:
    """The table for a.layers x a.formats; quantize(W, X, fmt) -> dequantized W, bpw: bits per weight of each
    format's first word (scripts/study_vq.py brings its own)."""
    torch.set_num_threads(a.threads)
    model_dir = tiny_model("bench")
    ck = Checkpoint(model_dir)
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(
        (model_dir / "eval.txt").read_text(encoding="utf-8"), add_special_tokens=False).ids

    def base():
        m = ck.arch.CompactModel(ck.hp)
        sd = {k: ck.get(v).float() for k, v in ck.arch.GLOBAL_KEYS.items() if ck.has(v)}
        m.model.embed_tokens.weight.data.copy_(sd["embed"])
        m.model.norm.weight.data.copy_(sd["norm"])
        m.lm_head.weight.data.copy_(sd.get("lm_head", sd["embed"]))
        for i in range(ck.hp.num_hidden_layers):
            m.model.layers[i] = ck.arch.decoder_layer_from(ck, i)
        return m.eval()

    def ppl(m) -> float:
        return perplexity(chunked(ids, 256, a.chunks), compact_nll(m), batch=8, progress=False)["ppl"]

    p0 = ppl(base())
    layers = [int(x) for x in a.layers.split(",")]
    cal = {l: (moe, x) for l, moe, x in layer_inputs(model_dir, 64, 256, layers=max(layers) + 1) if l in layers}
    ev = {l: x for l, _, x in layer_inputs(model_dir, a.chunks, 256, layers=max(layers) + 1,
                                             text=model_dir / "eval.txt") if l in layers}
    rows = []
    for l in layers:
        moe, xc = cal[l]
        xv = ev[l]
        _, _, ic = moe.route(xc)
        _, _, iv = moe.route(xv)
        ref = moe(xv)
        ref = ref[0] if isinstance(ref, tuple) else ref
        for fmt in a.formats.split(","):
            mq = copy.deepcopy(moe)
            errs = []
            for e in range(moe.hp.num_local_experts):
                ex = mq.experts[e]
                xe = xc[torch.where((ic == e).any(-1))[0]]
                ve = xv[torch.where((iv == e).any(-1))[0]]
                for p in ("w1", "w3"):
                    W = getattr(ex, p).weight.detach().float().clone()
                    Q = quantize(W, xe, fmt)
                    if len(ve):
                        errs.append(rel(W, Q, ve))
                    getattr(ex, p).weight.copy_(Q)
                inner = torch.nn.functional.silu(xe @ ex.w1.weight.t()) * (xe @ ex.w3.weight.t())
                ex.w2.weight.copy_(quantize(ex.w2.weight.detach().float().clone(), inner, fmt))
            out = mq(xv)
            out = out[0] if isinstance(out, tuple) else out
            moe_err = float(((out - ref) ** 2).sum() / (ref ** 2).sum())
            m = base()
            m.model.layers[l].block_sparse_moe.load_state_dict(mq.state_dict())
            r = ppl(m) / p0
            rows.append((l, fmt, math.exp(np.mean(np.log(errs))), moe_err, r))
            print(f"layer {l} {fmt}: matrix {rows[-1][2]:.4f} moe {moe_err:.4f} ppl x{r:.4f}", flush=True)
    lines = [f"bench model, float PPL {p0:.3f} on {a.chunks} held-out chunks of 256; one layer's experts quantized "
             "at a time (float elsewhere):", "",
             "| layer | format | bpw | gate/up rel. error, held-out (geo. mean) | MoE output rel. error | PPL / float |",
             "|---:|---|---:|---:|---:|---:|"]
    for l, fmt, me, oe, r in rows:
        lines.append(f"| {l} | {fmt} | {bpw[fmt.split()[0]]:.4g} | {me:.4f} | {oe:.4f} | {r:.4f} |")
    return "\n".join(lines)


def run(doc: str, section: str, title: str, layers: str, formats, quantize=quantize, bpw=BPW,
        prepare=lambda formats: None, post=lambda text: text) -> int:
    """The command line of a layer-by-layer study (this one, study_vq.py, study_ablation.py): parse,
    prepare(formats), print the table (post(table): with what a study adds to it) and with --write-results put
    it into docs/RESULTS.md as `section`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default=layers)
    ap.add_argument("--formats", default=",".join(formats))
    ap.add_argument("--chunks", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args()
    prepare(a.formats.split(","))
    text = post(study(a, quantize, bpw))
    print(text)
    if a.write_results:
        from results_md import machine, replace_section
        replace_section(section, f"## {title}\n\n`.venv/bin/python scripts/{section}.py --layers {a.layers} "
                        f"--chunks {a.chunks} --formats \"{a.formats}\" --write-results` on {machine()}.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run(__doc__, "study_mcn", "Issue 14: the mcn types judged end to end, layer by layer (bench model)",
                 "0,1,2,3", FORMATS))
