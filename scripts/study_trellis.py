#!/usr/bin/env python3
"""Issue 14, before building a codebook type of our own: a bitshift trellis (QTIP's idea) against an 8-weight
computed codebook (ik's KT idea) and our scalar mcn2, judged end to end, layer by layer, on the bench model
(scripts/study_mcn.py's protocol and table).

    .venv/bin/python scripts/study_trellis.py [--layers 0,2] [--formats "mct2 gptq,cb16s32 gptq30,..."] [--gauss] [--chunks 30]
    .venv/bin/python scripts/study_trellis.py --swap pmq-2.0625-program-mcn-model-kl [CHUNKS]   (see swap())

Why: the ladder of llama.cpp's types plus mcn2/mcn3 is level with the ladder without them (0.05 bpw apart); a type
that moves it 0.2 bpw must round much better per bit than a 4-level table. On unit-Gaussian data (--gauss):
a 4-level Lloyd table has MSE 0.118 per weight at 2 bits, a computed 8-D codebook of 2^16 words 0.095,
the mct trellis (4096 states) 0.074 (the bound is 0.0625).

Formats ("<name> <how>"):
  mct<k> gptq   the mct types (quant/trellis.py: k bits per weight in tail-biting 64-weight sequences through 4096
                states, 4-bit scales per 32, fp16 per 256: k + 0.1875 bpw) by GPTQ.quantize_mct (BlockLDLQ over the
                64-column sequences, H shrunk 0.3 toward its diagonal, unshrink): what PMQ writes
  mct<k> rtn    the reference quantizer (Viterbi under the routed tokens' importance, unshrink per block)
  cb<K>s<S> <how>  every 8 weights one K-bit index into a computed codebook of 2^K 8-vectors (a hash, 8 lanes:
                ik_llama.cpp's KT idea), 4-bit scales per S, fp16 per 256 (K/8 + 4/S + 1/16 bpw); rounded by
                study_vq.py's BlockLDLQ (gptqL: H shrunk L/100)
Other names as in study_vq.py / study_mcn.py (mcn2 gptq30, iq2_xxs, iq2_xs, iq1_m, ...).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import study_mcn  # noqa: E402
import study_vq  # noqa: E402
from mcmoe_gguf.base.ggml import ggml  # noqa: E402
from mcmoe_gguf.quant import trellis as T  # noqa: E402
from mcmoe_gguf.quant.gptq import GPTQ  # noqa: E402

FORMATS = ("mct2 gptq", "mcn2 gptq30", "iq2_xxs", "iq2_xs", "mct1 gptq", "iq1_s", "iq1_m", "mct3 gptq", "mcn3 gptq",
           "iq3_xxs")


def _bsum(x: torch.Tensor) -> torch.Tensor:
    return (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + ((x >> 24) & 0xFF)


def hash_values(n: int, lanes: int) -> torch.Tensor:
    """[n, lanes] near-Gaussian values of unit variance for a computed 8-D codebook: mct's hash with one odd
    multiplier per lane (sums of four 6-bit fields)."""
    i = torch.arange(n, dtype=torch.int64)[:, None]
    mul = torch.tensor([0x2C1B3C6D, 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1, 0xFD7046C5,
                        0xB55A4F09][:lanes], dtype=torch.int64)[None, :]
    x = (i * mul + 0x3039) & 0x3F3F3F3F
    return (_bsum(x) - 126).float() / T.MCT_SIGMA


def parse(name: str):
    m = re.fullmatch(r"cb(\d+)s(\d+)", name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def bpw(name: str) -> float:
    if name.startswith("mct"):
        return T.mct_spec(name).bpw
    if parse(name):
        k, s = parse(name)
        return k / 8 + 4 / s + 1 / 16
    return {**study_mcn.BPW, "iq1_s": 1.5625, "iq1_m": 1.75, "iq2_xs": 2.3125, "iq2_s": 2.5}[name]


def quantize(W, X, fmt):
    name, _, how = fmt.partition(" ")
    if name.startswith("mct"):
        k = T.mct_spec(name).bits
        g = GPTQ(W.shape[1])
        g.add_batch(X)
        if how == "rtn":   # the C reference quantizer: byte-equal to T.mct_quantize, ~100x faster than its torch Viterbi
            imp = torch.diag(g.H).float().numpy()
            blob = ggml().quantize(W.float().numpy(), name, imp)
            return torch.from_numpy(T.mct_dequantize(blob, k, W.shape[1]))
        return g.quantize_mct(W, k).dequantized
    if parse(name):
        return study_vq.quantize_vq(W, X, *parse(name), how or "gptq", C=hash_values(1 << parse(name)[0], 8))
    return study_vq.quantize(W, X, fmt)


def gauss_table(n: int = 4096) -> str:
    """MSE per weight on unit-Gaussian data: scalar 4-level Lloyd table, a 2^16 computed codebook, the mct trellis."""
    torch.manual_seed(0)
    X = torch.randn(n, T.MCT_SEQ).double()
    rows = ["| quantizer of unit-Gaussian weights | bits per weight | MSE per weight | bound 2^-2R |", "|---|---:|---:|---:|"]
    lloyd = torch.tensor([-1.510, -0.4528, 0.4528, 1.510]).double()
    q = lloyd[(X[..., None] - lloyd).abs().argmin(-1)]
    rows.append(f"| 4-level Lloyd-Max table | 2 | {((X - q) ** 2).mean():.4f} | 0.0625 |")
    C = hash_values(1 << 16, 8)
    x8 = X.float().reshape(-1, 8)
    q8 = C[study_vq._nearest(x8, C)]
    rows.append(f"| 8-D codebook, 2^16 computed words | 2 | {((x8 - q8) ** 2).mean():.4f} | 0.0625 |")
    table = torch.from_numpy(T.mct_table()).double()
    step = torch.full_like(X, 1 / T.MCT_SIGMA)
    for k in (1, 2, 3):
        c = T.tail_biting(X, step, torch.ones_like(X), table, k)
        v = step * table[torch.from_numpy(T.mct_states(c.numpy().astype("uint8"), k).astype("int64"))]
        rows.append(f"| mct{k}: trellis of 4096 states, tail-biting sequences of {T.MCT_SEQ} | {k} | "
                    f"{((X - v) ** 2).mean():.4f} | {2 ** (-2 * k):.4f} |")
    return "\n".join(rows)


def swap(workdir: str, chunks: int) -> str:
    """The model-level test at equal bytes: in a finished PMQ run of the bench model (untuned), every mcn2 / mcn3
    expert projection requantized from the float model's calibration inputs (64 x 256 tokens, routed tokens per
    expert; down projections on the float gate/up's inner activations) by GPTQ into its mcn type (the control)
    or into the mct type of the same size (mct2 = mcn2's 2.1875 bpw, mct3 = mcn3's 3.1875); everything else as
    stored. Scored in torch against the float model on held-out chunks (apps.evaluate.kld_torch)."""
    from tokenizers import Tokenizer

    from bench_eps import layer_inputs
    from mcmoe_gguf.apps.evaluate import kld_torch
    from mcmoe_gguf.base.cache import cache_dir
    from mcmoe_gguf.model.checkpoint import Checkpoint
    from mcmoe_gguf.model.tiny import tiny_model
    from mcmoe_gguf.quant.fake_quant import float_model, quantized_model, stored_entries
    from mcmoe_gguf.quant.workdir import WorkDir
    model_dir = tiny_model("bench")
    path = Path(workdir)
    if not path.exists():
        path = cache_dir("bench", model_dir.name, "quality") / workdir
    wd = WorkDir.of(str(path))
    ck = Checkpoint(wd.model_dir())
    entries = stored_entries(wd, ck)
    targets = {k: v["type"] for k, v in entries.items() if v.get("type") in ("mcn2", "mcn3")}
    if not targets:
        raise SystemExit(f"{path.name}: no mcn2 / mcn3 expert projection to swap")
    layers = sorted({int(k.split(".")[2]) for k in targets})
    new = {"mcn": {}, "mct": {}}
    for l, moe, x in layer_inputs(model_dir, 64, 256, layers=layers[-1] + 1):
        if l not in layers:
            continue
        _, _, idx = moe.route(x)
        for e, ex in enumerate(moe.experts):
            xe = x[torch.where((idx == e).any(-1))[0]]
            inner = torch.nn.functional.silu(xe @ ex.w1.weight.t()) * (xe @ ex.w3.weight.t())
            for p, X in (("w1", xe), ("w3", xe), ("w2", inner)):
                key = f"model.layers.{l}.block_sparse_moe.experts.{e}.{p}.weight"
                if key not in targets:
                    continue
                W = getattr(ex, p).weight.detach().float()
                g = GPTQ(W.shape[1])
                g.add_batch(X.detach())
                bits = int(targets[key][-1])
                new["mcn"][key] = g.quantize_mcn(W, bits).dequantized
                new["mct"][key] = g.quantize_mct(W, bits).dequantized
                print(f"layer {l} expert {e} {p}: {targets[key]}", flush=True)
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(
        (model_dir / "eval.txt").read_text(encoding="utf-8"), add_special_tokens=False).ids
    model, _ = quantized_model(wd, tuned=False, entries=entries)
    teacher = float_model(ck)
    n2 = sum(t == "mcn2" for t in targets.values())
    lines = [f"{path.name}: {n2} mcn2 and {len(targets) - n2} mcn3 expert projections swapped; torch vs float, "
             f"{chunks} held-out chunks of 256", "",
             "| experts of the mcn types | mean KLD | same top-1 % | PPL / float |", "|---|---:|---:|---:|"]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for name, upd in (("as stored (PMQ's own calibration)", {}), ("mcn, GPTQ from float inputs (control)", new["mcn"]),
                      ("mct of the same size, GPTQ from float inputs", new["mct"])):
        model.load_state_dict({**base, **upd})
        r = kld_torch(model, teacher, ids, 256, chunks)
        lines.append(f"| {name} | {r['kld']:.4f} ± {r['kld_se']:.4f} | {r['top1']:.2f} ± {r['top1_se']:.2f} | "
                     f"{r['ppl_ratio']:.4f} ± {r['ppl_ratio_se']:.4f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


class Bpw(dict):
    def __missing__(self, k):
        return bpw(k)


if __name__ == "__main__":
    if "--gauss" in sys.argv:
        print(gauss_table())
        sys.exit(0)
    if "--swap" in sys.argv:
        i = sys.argv.index("--swap")
        print(swap(sys.argv[i + 1], int(sys.argv[i + 2]) if len(sys.argv) > i + 2 else 100))
        sys.exit(0)
    sys.exit(study_mcn.run(__doc__, "study_trellis", "Issue 14: a bitshift trellis vs an 8-D computed codebook vs "
                           "mcn2, judged end to end (bench model)", "0,2", FORMATS, quantize, Bpw()))
