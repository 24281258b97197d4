#!/usr/bin/env python3
"""The ladder's eps statistic: estimated from sampled rows (and tokens) vs measured on everything, and its
cost per layer, on the bench model and on one Mixtral-shaped layer.

    .venv/bin/python scripts/bench_eps.py [--rows 32,64,128] [--mixtral-shaped] [--write-results]

Bench model: every layer's MoE inputs (64 x 256 calibration tokens through the float model), the full
ladder's eps [E, P, T] measured exactly (quant/ladder.measure_eps, eps_rows=0) and estimated with
eps_rows = N; per N: the median and 90th percentile of |estimate / measured - 1| over all (layer, expert,
projection, type), the share of (layer, expert, projection) whose ranking of the types by eps per byte
... is the same, and seconds per layer. The allocation that matters is checked end to end by
scripts/bench_quality.py --eps-rows N (files scored against F16).
--mixtral-shaped: one layer of scripts/mixtral_shaped.py's random model (4096 / 14336, 8 experts) with
the full ladder, eps from N sampled rows and at most --tokens routed tokens per expert: seconds for the
layer, and the projection to Mixtral's 32 layers on this machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mcmoe_gguf.model.checkpoint import Checkpoint  # noqa: E402
from mcmoe_gguf.model.tiny import tiny_model  # noqa: E402
from mcmoe_gguf.quant import ladder, pmq  # noqa: E402
from mcmoe_gguf.quant.calibration import calibration_tokens  # noqa: E402
from results_md import machine, replace_section  # noqa: E402


def layer_inputs(model: Path, n_seq: int, seq_len: int, layers=None, text: Path | None = None):
    """(layer index, MoE block, its inputs x) of the float model, layer by layer."""
    ck = Checkpoint(model)
    text = text or model / "calib.txt"
    tokens = calibration_tokens(model / "tokenizer.json", text.read_text(encoding="utf-8"), n_seq, seq_len)
    cos, sin = ck.arch.rope_tables(ck.hp, tokens.shape[1])
    chunk = max(1, 16384 // tokens.shape[1])
    h = pmq._embed(ck, tokens, "cpu")
    for l in range(ck.hp.num_hidden_layers if layers is None else layers):
        layer = ck.arch.decoder_layer_from(ck, l)
        _, x = pmq.moe_input(layer, h, cos, sin, chunk)
        yield l, layer.moe, x
        if layers is None or l + 1 < layers:
            h = pmq.layer_forward(layer, h, cos, sin, chunk)


def compare(a) -> str:
    model = tiny_model("bench")
    types = ladder.resolve("full")
    rows = [int(r) for r in a.rows.split(",")]
    exact, est, secs = [], {r: [] for r in rows}, {0: 0.0, **{r: 0.0 for r in rows}}
    for l, moe, x in layer_inputs(model, 64, 256):
        for r in [0] + rows:
            t0 = time.perf_counter()
            e = ladder.measure_eps(moe, x, types, pmq.PMQConfig(eps_rows=r), f"layer {l} rows {r or 'all'}")
            secs[r] += time.perf_counter() - t0
            (exact.append(e) if r == 0 else est[r].append(e))
    ex = np.stack(exact)
    nb = ladder.choice_bytes(Checkpoint(model).hp, types)
    lines = [f"bench model ({ex.shape[0]} layers x {ex.shape[1]} experts x 3 projections x {len(types)} types), "
             f"eps on 64 x 256 calibration tokens:", "",
             "| eps from | median \\|est/measured - 1\\| | 90th pct | same cheapest-error type per (layer, expert, "
             "projection) at 2 bpw bytes | s per layer |", "|---|---:|---:|---:|---:|",
             f"| all rows (measured) | 0 | 0 | 100% | {secs[0] / ex.shape[0]:.1f} |"]
    # the type each (l, e, p) would get with ~2 bpw of bytes: least eps among types no wider than iq2_xs
    limit = nb[:, types.index("iq2_xs")][None, None, :, None]
    for r in rows:
        es = np.stack(est[r])
        ok = ex > 0
        rel = np.abs(es[ok] / ex[ok] - 1)
        masked_ex = np.where(nb[None, None] <= limit, ex, np.inf)
        masked_es = np.where(nb[None, None] <= limit, es, np.inf)
        same = (masked_ex.argmin(-1) == masked_es.argmin(-1)).mean()
        lines.append(f"| {r} sampled rows | {np.median(rel):.3f} | {np.quantile(rel, 0.9):.3f} | {100 * same:.0f}% | "
                     f"{secs[r] / ex.shape[0]:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def mixtral_layer(a) -> str:
    """Seconds for one Mixtral-shaped layer's ladder statistics (split into ggml's quantizers, on the CPU
    whatever --device is, and the torch work), and for writing one full expert projection per type."""
    sys.path.insert(0, str(REPO / "scripts"))
    import mixtral_shaped as ms
    from mcmoe_gguf.quant import quantizers
    r = ms.Recipe()
    hf = ms.build_checkpoint(r, ms.model_dir(r))
    types = ladder.resolve("full")
    torch.set_num_threads(a.threads)
    (l, moe, x), = layer_inputs(hf, a.n_seq, 256, layers=1, text=tiny_model() / "calib.txt")
    moe = moe.float()
    if a.experts < moe.hp.num_local_experts:     # time the first N experts only (the others get no token)
        route = moe.route

        def first_experts(x):
            logits, wts, ids = route(x)
            return logits, wts, torch.where(ids < a.experts, ids, torch.full_like(ids, -1))
        moe.route = first_experts
    per = moe.hp.num_local_experts / a.experts       # extrapolation to the whole layer
    rows = int(a.rows.split(",")[-1])
    cfg = pmq.PMQConfig(eps_rows=rows, eps_tokens=a.tokens, method="gptq")
    spent = {"ggml": 0.0}
    real = quantizers.ggml_packed

    def timed(*args, **kw):
        t0 = time.perf_counter()
        try:
            return real(*args, **kw)
        finally:
            spent["ggml"] += time.perf_counter() - t0
    quantizers.ggml_packed = timed          # quantize_matrix looks it up at each call
    try:
        t0 = time.perf_counter()
        ladder.measure_eps(moe, x, types, cfg, "Mixtral-shaped layer eps")
        t = (time.perf_counter() - t0) * per
    finally:
        quantizers.ggml_packed = real
    spent["ggml"] *= per
    # writing: one whole 14336 x 4096 gate projection per llama.cpp type (a layer writes 24 projections)
    W = moe.experts[0].w1.weight
    write = {}
    for ty in ladder.STOCK_TYPES:
        t0 = time.perf_counter()
        real(W, ty, quantizers.importance(x[:2048]))
        write[ty] = time.perf_counter() - t0
    lines = [f"One Mixtral-shaped layer (4096 / 14336, 8 experts, top-2; random weights), {x.shape[0]} calibration "
             f"tokens, {a.threads} threads, the full ladder ({len(types)} types x 3 projections x 8 experts):", "",
             f"(timed on {a.experts} of the 8 experts, scaled to 8)", "",
             "| step | s per layer | x 32 layers |", "|---|---:|---:|",
             f"| eps statistics, {rows} sampled rows, <= {a.tokens} tokens per expert | {t:.0f} | {32 * t / 3600:.2f} h |",
             f"| of which ggml's quantizers (CPU) | {spent['ggml']:.0f} | {32 * spent['ggml'] / 3600:.2f} h |",
             f"| of which torch (forwards, GPTQ Hessians and rounding of mcq rows) | {t - spent['ggml']:.0f} | "
             f"{32 * (t - spent['ggml']) / 3600:.2f} h |", "",
             "Writing a chosen type (ggml's quantizer, one 14336 x 4096 projection; a layer writes 24): " +
             ", ".join(f"{ty} {v:.1f} s" for ty, v in write.items())]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="32,64,128", help="sampled rows per projection to compare")
    ap.add_argument("--mixtral-shaped", action="store_true", help="time one Mixtral-shaped layer instead")
    ap.add_argument("--tokens", type=int, default=2048, help="--mixtral-shaped: routed tokens per expert at most")
    ap.add_argument("--experts", type=int, default=8, help="--mixtral-shaped: time only the first N experts")
    ap.add_argument("--n-seq", type=int, default=16, help="--mixtral-shaped: calibration sequences of 256")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args()
    text = mixtral_layer(a) if a.mixtral_shaped else compare(a)
    print(text)
    if a.write_results:
        name = "bench_eps_mixtral" if a.mixtral_shaped else "bench_eps"
        replace_section(name, f"## Ladder eps: {'cost at Mixtral size' if a.mixtral_shaped else 'estimate vs measured'}"
                        f"\n\n`.venv/bin/python scripts/bench_eps.py"
                        f"{f' --mixtral-shaped --experts {a.experts} --tokens {a.tokens}' if a.mixtral_shaped else ''} "
                        f"--rows {a.rows} --write-results` on {machine()}.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
