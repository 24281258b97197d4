"""`mcmoe-gguf`: command-line entry point. Each subcommand is a thin shell over one module."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mcmoe_gguf.gguf.keys import IMPORTANCE_MODES, ODP_DEFAULT_PROTECT
from mcmoe_gguf.model.tiny import PRESETS
from mcmoe_gguf.quant.mixes import names as mix_names
from mcmoe_gguf.quant.kd_tune import DEFAULT_CODE_TRAVEL, DEFAULT_LR as DEFAULT_KD_LR
from mcmoe_gguf.quant.odp_fit import DEFAULT_TARGET as DEFAULT_ODP_TARGET, parse_target

MIX_HELP = ("types of the tensors outside the experts: auto (llama.cpp's own choice for the stock "
            "type of the nearest expert width, e.g. Q2_K embeddings, Q5_K output, Q4_K/Q5_K attention at ~2 "
            "bits; the default for the paper's mcq program, --compat stock and --min-speed), program (the default "
            "with a ladder: the model's one integer program chooses embeddings, output and each attention "
            "projection's type beside the experts, by measured KL per byte, in the file size auto would give; "
            "bench model: 8-29%% lower KLD than auto at equal bytes; needs --scope model --sensitivity kl and a "
            "ladder), stock:<ftype> (that stock type's choice), q8 "
            "(Q8_0 embeddings and output, mcq4 attention: files before issue 13)")

LADDER_HELP = ("expert types: mcq (default: the paper's program, 1/2/3 bits of our grid per expert), full (per "
               "projection, our mcq widths and llama.cpp's IQ1_S..IQ3_XXS, Q2_K..Q4_K, chosen by measured error "
               "per byte; budgets down to ~1.3 bpw), mcn (full plus our non-uniform table types mcn2 / mcn3, "
               "2.19 / 3.19 bpw, GPTQ-rounded: the best quality per byte; needs the patched runtime), stock "
               "(llama.cpp's types only), or a comma-separated list of types (e.g. mcq1,mcn2,iq2_xxs,q2_k)")
SCOPE_HELP = ("one integer program per layer (the paper's) or one for the whole model; auto (default): the whole "
              "model with a ladder or --compat stock (measured better: bench model at 1.5625 expert bpw mean KLD "
              "0.181 against 0.227 with per-layer programs, docs/RESULTS.md), per layer for the paper's mcq program")
GRANULARITY_HELP = "a ladder's choice: one type per projection (default) or one per expert"
COMPAT_HELP = ("stock: a file any llama.cpp runs (ollama, LM Studio, stock llama-cpp-python): llama.cpp's own types "
               "only (the stock ladder unless --ladder names others), one type per layer and projection, merged "
               "expert tensors; PMQ's calibrated choice instead of a hand-made mix")
EPS_ROWS_HELP = ("with a ladder: estimate each choice's error from N sampled rows per projection instead of "
                 "quantizing every row in every type (0: all rows, exact; 64 matches the exact allocation's quality "
                 "on the bench model and is what makes Mixtral-size ladders tractable: docs/RESULTS.md)")
EPS_HOLDOUT_HELP = ("with a ladder: measure each choice's error on this share of the calibration text (contiguous "
                    "stretches) that its quantizer did not see (default %(default)s: on the same tokens, which flatters "
                    "GPTQ'd types; 0.25 changed the bench model's allocations but not their quality beyond noise: "
                    "docs/RESULTS.md, \"held-out eps\")")
SENSITIVITY_HELP = ("with a ladder and --scope model: 'kl' measures, per layer, the output KL its experts cost "
                    "at the layer-scope choice and weighs that layer's errors by it, so the one program moves bytes to "
                    "the layers where they matter (one extra quantization of every layer); default: kl with --mix program "
                    "(which needs it), else 'none': errors as measured")
MIN_SPEED_HELP = ("with a ladder: decode no slower than a file with every expert in TYPE (e.g. q2_k), per "
                  "each type's mat-vec time measured here with llama.cpp's test-backend-ops (cached), weighted by "
                  "how often the calibration tokens route to each expert")
KD_STEPS_HELP = ("after PMQ, N steps of knowledge distillation against the float model on the calibration text, "
                 "tuning what costs no byte: one factor per 256 weights of every quantized row (folded into the "
                 "blocks' fp16 scales), the norms and the routers, and (--kd-codes) the codes of our mcq/mcn "
                 "tensors and of llama.cpp's iq1_s on their stored scales; types and file size unchanged, resumable "
                 "(tune.pt in the work directory). Needs the float model in RAM (tiny / benchmark models); "
                 "bench model: 600 steps (~7 min on 2 cores) took KLD from 0.137 to 0.103 at IQ1_S's bytes, 24-36%% "
                 "less at every size (docs/RESULTS.md, \"KD tuning\"). "
                 "Default 0: off")
KD_CODES_HELP = ("with --kd-steps: also re-choose the codes of our mcq/mcn tensors and of iq1_s (each 8 weights' "
                 "codeword) on their stored scales under the same loss (straight-through latents; llama.cpp's other "
                 "types keep theirs). T: how far, in grid "
                 "steps, a latent with its tensor's typical gradient moves over the run (a code flips at 0.5), so "
                 "only codes pushed the same way for most of the run change. "
                 f"0 keeps GPTQ's codes. Default {DEFAULT_CODE_TRAVEL}")
ODP_TARGET_HELP = ("how the per-layer ODP thresholds are set from calibration tokens: skip:S (default "
                   f"{DEFAULT_ODP_TARGET}: skip a share S of the expert evaluations, spread over the layers at the "
                   "least measured output error), error:B (per layer the largest threshold whose pruning changes "
                   "the layer's output by at most B of its energy) or median (the paper: half the tokens of every "
                   "layer lose their second expert)")


def odp_target(v: str) -> str:
    """argparse type of --odp-target: checked before any work"""
    try:
        parse_target(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


def add_ladder_options(s: argparse.ArgumentParser) -> None:
    """PMQ's type-ladder, speed-floor and ODP-threshold options (convert --bits and quantize)."""
    from mcmoe_gguf.quant.ladder import DEFAULT_EPS_HOLDOUT
    from mcmoe_gguf.quant.sensitivity import DEFAULT_SENS_SEQS
    s.add_argument("--ladder", default="mcq", help=LADDER_HELP)
    s.add_argument("--granularity", choices=["projection", "expert"], default="projection", help=GRANULARITY_HELP)
    s.add_argument("--scope", choices=["auto", "layer", "model"], default="auto", help=SCOPE_HELP)
    s.add_argument("--compat", choices=["none", "stock"], default="none", help=COMPAT_HELP)
    s.add_argument("--odp-target", default=DEFAULT_ODP_TARGET, type=odp_target, help=ODP_TARGET_HELP)
    s.add_argument("--min-speed", metavar="TYPE", help=MIN_SPEED_HELP)
    s.add_argument("--eps-rows", type=int, default=0, metavar="N", help=EPS_ROWS_HELP)
    s.add_argument("--eps-tokens", type=int, default=0, metavar="N",
                   help="with a ladder: measure each choice's error on at most N routed tokens per expert (0: all)")
    s.add_argument("--eps-holdout", type=float, default=DEFAULT_EPS_HOLDOUT, metavar="F", help=EPS_HOLDOUT_HELP)
    s.add_argument("--sensitivity", choices=["none", "kl"], default=None, help=SENSITIVITY_HELP)
    s.add_argument("--sens-seqs", type=int, default=DEFAULT_SENS_SEQS, metavar="N",
                   help=f"with --sensitivity kl: calibration sequences the layers' KL is measured on (default {DEFAULT_SENS_SEQS})")
    s.add_argument("--kd-steps", type=int, default=0, metavar="N", help=KD_STEPS_HELP)
    s.add_argument("--kd-lr", type=float, default=DEFAULT_KD_LR, metavar="LR",
                   help=f"with --kd-steps: Adam's peak learning rate, cosine decay (default {DEFAULT_KD_LR})")
    s.add_argument("--kd-codes", type=float, default=DEFAULT_CODE_TRAVEL, metavar="T", help=KD_CODES_HELP)


def program_of(a) -> dict:
    """PMQConfig's scope, mix and sensitivity from the options, defaults filled where each was measured to win
    (docs/RESULTS.md, bench model): with a type ladder or --compat stock one program for the model (--scope auto);
    with a ladder it also chooses the types outside the experts (--mix program, which weighs them in KL:
    --sensitivity kl); llama.cpp's mix for --compat stock (the mix program untried there) and --min-speed (not
    supported with it); the paper's per-layer programs and llama.cpp's mix for its mcq program. An option given
    explicitly is kept as given."""
    scope = a.scope
    if scope == "auto":
        scope = "model" if a.ladder != "mcq" or a.compat != "none" else "layer"
    mix = a.mix
    if mix is None:
        chosen = (scope == "model" and a.ladder != "mcq" and a.compat == "none" and not a.min_speed
                  and getattr(a, "strategy", "pmq") == "pmq")
        mix = "program" if chosen and a.sensitivity in (None, "kl") else "auto"
    sensitivity = a.sensitivity or ("kl" if mix == "program" else "none")
    return {"scope": scope, "mix": mix, "sensitivity": sensitivity}


EPILOG = """examples:
  mcmoe-gguf tiny                                  train (or reuse) the embedded tiny Mixtral, print its path
  mcmoe-gguf convert MODEL_DIR --outtype f16 -o model-f16.gguf
  mcmoe-gguf generate model-f16.gguf -p "To be, or not"
  mcmoe-gguf ppl model-f16.gguf --text MODEL_DIR/eval.txt --ctx 256
  mcmoe-gguf demo                                  the whole flow on the tiny model
"""


def cmd_tiny(a) -> int:
    from mcmoe_gguf.model.tiny import describe, tiny_model
    path = tiny_model(a.preset)
    if a.print_path:
        print(path)
    else:
        print(describe(path))
    return 0


def cmd_convert(a) -> int:
    from mcmoe_gguf.gguf.export import convert, export_pmq
    if a.from_workdir:
        out = export_pmq(a.model_dir, a.output, force=a.force, name=a.name)
    elif a.bits or a.size:
        from mcmoe_gguf.quant.pmq import PMQConfig, quantize
        workdir = Path(a.workdir or f"{a.output}.pmq")
        cfg = PMQConfig(budget=a.bits or "2.5", size=_tensor_size(a), **program_of(a), n_seq=a.n_seq,
                        seq_len=a.seq_len, calib_text=a.calib_text, device=a.device, eps_method=a.eps_method,
                        ladder=a.ladder, granularity=a.granularity, compat=a.compat, min_speed=a.min_speed,
                        eps_rows=a.eps_rows, eps_tokens=a.eps_tokens, eps_holdout=a.eps_holdout,
                        sens_seqs=a.sens_seqs, odp=a.odp_target, kd_steps=a.kd_steps,
                        kd_lr=a.kd_lr, kd_codes=a.kd_codes)
        r = quantize(a.model_dir, workdir, cfg, kernel_costs=kernel_costs(cfg))
        if "kd" in r:
            print(kd_line(r["kd"]))
        out = export_pmq(workdir, a.output, force=a.force, name=a.name)
    else:
        mu = None
        if a.odp_calibrate:
            from mcmoe_gguf.quant.pmq import odp_thresholds
            text = Path(a.calib_text or Path(a.model_dir) / "calib.txt")
            if not text.exists():
                raise FileNotFoundError(f"{text}: calibration text not found (pass --calib-text)")
            mu = odp_thresholds(a.model_dir, text.read_text(encoding="utf-8"), n_seq=min(a.n_seq, 32),
                                seq_len=min(a.seq_len, 256), target=a.odp_target)
        out = convert(a.model_dir, a.output, outtype=a.outtype, force=a.force, name=a.name, odp_mu=mu)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_rpc_server(a) -> int:
    """llama.cpp's rpc-server of this runtime (same types and ops as the client), in the foreground."""
    from mcmoe_gguf.engine.runtime import run_tool
    args = ["-H", a.host, "-p", str(a.port)] + (["-t", str(a.threads)] if a.threads else [])
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: rpc-server on {a.host} accepts anyone who can reach the port: it has no authentication; "
              "use it on a trusted network only", file=sys.stderr)
    return run_tool("ggml-rpc-server", *args).returncode


def odp_kwargs(a) -> dict:
    """load() arguments of the --odp/--no-odp, --mu, --mu-scale, --protect, --importance options"""
    kw = {"odp": a.odp, "mu": a.mu, "mu_scale": a.mu_scale, "protect": a.protect, "importance": a.importance}
    if getattr(a, "rpc", None):
        kw["rpc_servers"] = a.rpc
        if a.n_gpu_layers is not None:
            kw["n_gpu_layers"] = a.n_gpu_layers
    return kw


def print_odp_stats() -> None:
    from mcmoe_gguf.engine.odp import odp_stats, summary
    stats = odp_stats()
    if not stats:
        print("ODP: off (or no MoE layer ran)")
        return
    total = summary(stats)
    per_layer = " ".join(f"{100 * s.skipped_fraction:.0f}" for s in stats)
    print(f"ODP: {100 * total['skipped_fraction']:.1f}% of expert evaluations skipped "
          f"({total['pruned']} of {total['slots']}); per layer %: {per_layer}")


def cmd_generate(a) -> int:
    from mcmoe_gguf.engine.odp import odp_reset
    from mcmoe_gguf.engine.runtime import load
    llm = load(a.file, n_ctx=a.ctx, seed=a.seed, n_threads=a.threads, **odp_kwargs(a))
    odp_reset()
    out = llm(a.prompt, max_tokens=a.n, temperature=a.temp, echo=True)
    print(out["choices"][0]["text"])
    if a.stats:
        print_odp_stats()
    return 0


def cmd_ppl(a) -> int:
    from mcmoe_gguf.apps.evaluate import ppl_llama
    from mcmoe_gguf.engine.odp import odp_reset
    odp_reset()
    r = ppl_llama(a.file, Path(a.text).read_text(encoding="utf-8"), ctx=a.ctx, max_chunks=a.max_chunks,
                  n_threads=a.threads, **odp_kwargs(a))
    print(f"perplexity {r['ppl']:.4f} over {r['tokens']} tokens (ctx {r['ctx']}) of {a.text}")
    print_odp_stats()
    return 0


def cmd_bench(a) -> int:
    from mcmoe_gguf.engine.odp import odp_reset
    from mcmoe_gguf.engine.speed import time_file
    odp_reset()
    pp, tg = time_file(a.file, a.threads, a.pp, a.tg, a.repeat, **odp_kwargs(a))
    print(f"{Path(a.file).name}: pp {pp:.1f} tok/s ({a.pp}-token prompt), tg {tg:.1f} tok/s ({a.tg} tokens), "
          f"{a.threads} threads, best of {a.repeat}")
    print_odp_stats()
    return 0


def _tensor_size(a) -> str | None:
    """--size is the file's bytes: the header (metadata, vocabulary, tensor index) comes off first."""
    if not a.size:
        return None
    if a.bits:
        raise ValueError("give --bits or --size, not both")
    from mcmoe_gguf.gguf.export import header_bytes
    from mcmoe_gguf.quant.allocate import parse_budget
    b = parse_budget(a.size)
    if b.unit != "bytes":
        raise ValueError(f"--size {a.size!r} is file bytes and needs a unit (e.g. 5MB, 13GB); for bits per "
                         "weight use --bits")
    return f"{int(b.value) - header_bytes(a.model_dir)}B"


def kernel_costs(cfg) -> dict | None:
    """The ladder's mat-vec costs on this machine when --min-speed asks for a floor (measured once, cached)."""
    if not cfg.min_speed:
        return None
    from mcmoe_gguf.engine.kernel_costs import matvec_us
    from mcmoe_gguf.quant.pmq import check_ladder, check_min_speed
    types = check_ladder(cfg)
    return matvec_us(list(types) + [check_min_speed(cfg, types)])


def cmd_quantize(a) -> int:
    from mcmoe_gguf.quant.pmq import PMQConfig, quantize
    cfg = PMQConfig(budget=a.bits or "2.5", size=_tensor_size(a), **program_of(a), strategy=a.strategy, method=a.method, alpha=a.alpha,
                    beta=a.beta, gamma=a.gamma, n_seq=a.n_seq, seq_len=a.seq_len, calib_text=a.calib_text,
                    act_order=a.act_order, device=a.device, embed_type=a.embed_type, output_type=a.output_type,
                    eps_method=a.eps_method, ladder=a.ladder, granularity=a.granularity, compat=a.compat,
                    min_speed=a.min_speed, eps_rows=a.eps_rows, eps_tokens=a.eps_tokens, eps_holdout=a.eps_holdout,
                    sens_seqs=a.sens_seqs, odp=a.odp_target, kd_steps=a.kd_steps, kd_lr=a.kd_lr,
                    kd_codes=a.kd_codes)
    r = quantize(a.model_dir, a.output, cfg, kernel_costs=kernel_costs(cfg))
    print(f"quantized state in {a.output}: experts {r['expert_bpw']:.4f} real bpw "
          f"({r['expert_bytes']:,} bytes), whole model {r['total_bpw']:.4f} real bpw ({r['total_bytes']:,} bytes)")
    if "kd" in r:
        print(kd_line(r["kd"]))
    return 0


def kd_line(kd: dict) -> str:
    return (f"KD tuning: {kd['steps']} steps, KL to the float model on calibration batches {kd['kl_first']:.4f} -> "
            f"{kd['kl_last']:.4f} (first / last 10 steps); {kd['tuned_tensors']} tensors' scales, "
            f"{kd['tuned_floats']} norms and routers"
            + (f", {kd['changed_codes']:,} codes changed in {kd['recoded_tensors']} tensors" if kd.get("recoded_tensors")
               else ""))


def cmd_ppl_torch(a) -> int:
    from mcmoe_gguf.apps.evaluate import ppl_fake_quant
    text = Path(a.text).read_text(encoding="utf-8") if a.text else None
    r = ppl_fake_quant(a.outdir, text, ctx=a.ctx, max_chunks=a.max_chunks)
    print(f"perplexity {r['ppl']:.4f} over {r['tokens']} tokens (ctx {r['ctx']}, torch fake-quant of {a.outdir})")
    return 0


def cmd_inspect(a) -> int:
    from mcmoe_gguf.apps.inspect import describe, describe_gguf, heatmap
    if Path(a.outdir).is_file():
        print(describe_gguf(Path(a.outdir)))
        return 0
    print(describe(a.outdir))
    png = heatmap(a.outdir, Path(a.png) if a.png else Path(a.outdir) / "bits_heatmap.png")
    print(f"heatmap: {png}")
    return 0


def cmd_runtime(a) -> int:
    from mcmoe_gguf.engine.runtime import check_runtime, tools_dir
    info = check_runtime()
    print(f"patched runtime ok: {info['lib']} (sources {info['source_hash'][:12]}, abi {info['abi']})")
    from mcmoe_gguf.engine import cpu_variant
    import llama_cpp
    llama_cpp.llama_backend_init()
    loaded, want = cpu_variant.loaded_variant(), cpu_variant.expected_variant()
    print(f"CPU: {cpu_variant.cpu_model()}; CPU backend loaded: {loaded or 'none (a non-DL build)'}"
          f" (best for this CPU's flags: {want}; runnable: {', '.join(cpu_variant.runnable_variants())})")
    print(f"llama.cpp system info: {llama_cpp.llama_print_system_info().decode().strip()}")
    try:
        print(f"llama.cpp tools: {tools_dir()}")
    except RuntimeError as e:
        print(f"llama.cpp tools: {e}")
    return 0


def cmd_demo(a) -> int:
    from mcmoe_gguf.apps.demo import run_demo
    return run_demo(preset=a.preset, max_chunks=a.max_chunks, threads=a.threads)


def add_rpc_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("across machines (llama.cpp RPC)")
    g.add_argument("--rpc", metavar="HOST:PORT[,...]",
                   help="run layers on these `mcmoe-gguf rpc-server` processes (one per machine)")
    g.add_argument("--n-gpu-layers", type=int, default=None,
                   help="with --rpc: how many layers (the last ones) go to the servers (default: all)")


def add_odp_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("online dynamic pruning (ODP: skip the second expert of unimportant tokens)")
    g.add_argument("--odp", dest="odp", action="store_true", default=True,
                   help="prune where the file has calibrated thresholds or --mu is given (default)")
    g.add_argument("--no-odp", dest="odp", action="store_false", help="run every routed expert")
    g.add_argument("--mu", type=float, default=None,
                   help="threshold for every layer instead of the file's calibrated per-layer mu")
    g.add_argument("--mu-scale", type=float, default=None,
                   help="multiply the thresholds (default: the file's mcmoe.odp.mu_scale, else 1)")
    g.add_argument("--protect", type=float, default=None,
                   help="fraction of a prompt's tokens that keep both experts (default: the file's "
                   f"mcmoe.odp.protect, else {ODP_DEFAULT_PROTECT})")
    g.add_argument("--importance", choices=list(IMPORTANCE_MODES), default=None,
                   help="how protected tokens are chosen: attention received x norm (the default unless the "
                   "file says otherwise), the reference code's row sums, the norm only, or no protection")


def cmd_selfcheck(a) -> int:
    from mcmoe_gguf.apps.selfcheck import run_selfcheck
    return run_selfcheck(gpu=a.gpu, threads=a.threads)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mcmoe-gguf", description="Mixture-of-Experts checkpoints -> mixed-bit GGUF "
                                "for a patched llama.cpp (MC: PMQ + ODP).", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("tiny", help="train or reuse the embedded tiny Mixtral (cached)")
    s.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="'default': the demo's and CI's model; 'smoke' trains briefly, for tests where quality "
                        "does not matter; 'bench': the benchmarks' model, trained ~1 h on speeches")
    s.add_argument("--print-path", action="store_true", help="print only the model directory")
    s.set_defaults(fn=cmd_tiny)

    s = sub.add_parser("convert", help="HF MoE checkpoint -> GGUF")
    s.add_argument("model_dir", help="directory with config.json, *.safetensors and tokenizer.json")
    s.add_argument("-o", "--output", required=True, help="output .gguf (written atomically)")
    s.add_argument("--outtype", default="f16", help="f32, f16 or bf16 (as llama.cpp's convert_hf_to_gguf)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output file")
    s.add_argument("--name", help="general.name in the file (default: the model directory's name)")
    s.add_argument("--bits", help="run PMQ at this budget (real expert bpw like 2.5, or bytes like 13GB) and write "
                   "per-expert 1/2/3-bit tensors (mcq types; needs the patched runtime to run)")
    s.add_argument("--size", help="run PMQ so that the whole file has at most this many bytes (e.g. 13GB = 13e9, "
                   "12GiB): the mix outside the experts first, the rest to the experts")
    s.add_argument("--mix", default=None, choices=mix_names(), help=MIX_HELP)
    add_ladder_options(s)
    s.add_argument("--workdir", help="PMQ work directory (default OUT.gguf.pmq; resumable)")
    s.add_argument("--n-seq", type=int, default=128, help="PMQ calibration sequences (default 128)")
    s.add_argument("--seq-len", type=int, default=2048, help="PMQ calibration sequence length (default 2048)")
    s.add_argument("--calib-text", help="PMQ calibration text (default MODEL_DIR/calib.txt)")
    s.add_argument("--device", default="cpu", help="torch device for PMQ")
    s.add_argument("--eps-method", choices=["mse", "minmax"], default="mse", help="grid fit of the RTN used for the eps statistics: mse (default, as the stored weights) or minmax (about 5x faster on Mixtral-size experts)")
    s.add_argument("--odp-calibrate", action="store_true",
                   help="without --bits: measure the per-layer ODP thresholds on calibration text and store them, "
                   "so the engine can prune this float file too (PMQ files always carry them)")
    s.add_argument("--from-workdir", action="store_true",
                   help="MODEL_DIR is a finished `mcmoe-gguf quantize` work directory: only write the GGUF")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("generate", help="generate text with the patched llama.cpp")
    s.add_argument("file", help="GGUF file")
    s.add_argument("-p", "--prompt", required=True)
    s.add_argument("-n", type=int, default=48, help="tokens to generate (default 48)")
    s.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ctx", type=int, default=512)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--stats", action="store_true", help="print ODP counters after generating")
    add_odp_options(s)
    add_rpc_options(s)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("ppl", help="perplexity of a text through the patched llama.cpp")
    s.add_argument("file", help="GGUF file")
    s.add_argument("--text", required=True, help="UTF-8 text file to score")
    s.add_argument("--ctx", type=int, default=256, help="chunk length in tokens (default 256)")
    s.add_argument("--max-chunks", type=int, default=None, help="score only the first N chunks")
    s.add_argument("--threads", type=int, default=None)
    add_odp_options(s)
    add_rpc_options(s)
    s.set_defaults(fn=cmd_ppl)

    s = sub.add_parser("bench", help="prompt and decode tokens/s of a GGUF file (and ODP's skipped fraction)")
    s.add_argument("file", help="GGUF file")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--pp", type=int, default=256, help="prompt tokens, evaluated as one batch (default 256)")
    s.add_argument("--tg", type=int, default=64, help="tokens decoded one at a time after it (default 64)")
    s.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    add_odp_options(s)
    add_rpc_options(s)
    s.set_defaults(fn=cmd_bench)

    from mcmoe_gguf.quant.allocate import DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_GAMMA
    s = sub.add_parser("quantize", help="PMQ: calibrate, allocate 1/2/3 bits per expert, GPTQ (resumable)",
                       description="Writes a resumable work directory: a killed run continues after its last "
                       "finished layer with identical results.")
    s.add_argument("model_dir")
    s.add_argument("-o", "--output", required=True, help="work directory for the quantized state")
    s.add_argument("--bits", help="budget: real expert bpw (scales counted, e.g. 2.5) or expert "
                   "bytes (e.g. 13GB = 13e9, 12GiB); default 2.5")
    s.add_argument("--size", help="budget as whole-file bytes instead (e.g. 13GB): the mix outside the experts "
                   "first, the rest to the experts")
    s.add_argument("--mix", default=None, choices=mix_names(), help=MIX_HELP)
    add_ladder_options(s)
    s.add_argument("--strategy", default="pmq", help="pmq | uniform:B | random:SEED | frequency | weight | eps")
    s.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    s.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"exponent of phi (default {DEFAULT_ALPHA})")
    s.add_argument("--beta", type=float, default=DEFAULT_BETA, help=f"exponent of w (default {DEFAULT_BETA})")
    s.add_argument("--gamma", type=float, default=DEFAULT_GAMMA, help=f"exponent of eps (default {DEFAULT_GAMMA})")
    s.add_argument("--n-seq", type=int, default=128, help="calibration sequences (default 128)")
    s.add_argument("--seq-len", type=int, default=2048, help="calibration sequence length (default 2048)")
    s.add_argument("--calib-text", help="calibration text (default MODEL_DIR/calib.txt)")
    s.add_argument("--act-order", action="store_true", help="GPTQ act-order (static groups)")
    s.add_argument("--eps-method", choices=["mse", "minmax"], default="mse", help="grid fit of the RTN used for the eps statistics: mse (default, as the stored weights) or minmax (about 5x faster on Mixtral-size experts)")
    s.add_argument("--device", default="cpu", help="torch device for calibration and GPTQ (cpu, cuda, cuda:1)")
    s.add_argument("--embed-type", help="token embeddings in this ggml type (f16, q8_0, q4_k, ...) instead of the mix's")
    s.add_argument("--output-type", help="output projection in this ggml type instead of the mix's")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("ppl-torch", help="held-out perplexity of a quantized work directory (torch fake-quant)")
    s.add_argument("outdir")
    s.add_argument("--text", help="text to score (default MODEL_DIR/eval.txt)")
    s.add_argument("--ctx", type=int, default=256)
    s.add_argument("--max-chunks", type=int, default=None)
    s.set_defaults(fn=cmd_ppl_torch)

    s = sub.add_parser("inspect", help="allocation table and heatmap of a quantized work directory, or the "
                       "tensor types of a GGUF file")
    s.add_argument("outdir", help="PMQ work directory or .gguf file")
    s.add_argument("--png", help="heatmap path (default OUTDIR/bits_heatmap.png)")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("selfcheck", help="the same GGUF files on CPU and CUDA: logits, pp/tg tok/s, VRAM")
    s.add_argument("--gpu", action="store_true",
                   help="also run on CUDA and compare (CPU part only when no GPU is found)")
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(fn=cmd_selfcheck)

    rpc_help = ("serve this machine's CPU to `--rpc` clients (llama.cpp's rpc-server of this runtime; "
                "no authentication: trusted networks only)")
    s = sub.add_parser("rpc-server", help=rpc_help, description=rpc_help)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for other machines)")
    s.add_argument("--port", type=int, default=50052, help="port (default 50052)")
    s.add_argument("--threads", type=int, default=None, help="CPU threads (default: rpc-server's)")
    s.set_defaults(fn=cmd_rpc_server)

    s = sub.add_parser("runtime", help="check that the patched runtime is installed and current")
    s.set_defaults(fn=cmd_runtime)

    s = sub.add_parser("demo", help="tiny model -> GGUF -> generate -> torch vs llama.cpp perplexity")
    s.add_argument("--preset", default="default", choices=sorted(PRESETS))
    s.add_argument("--max-chunks", type=int, default=64, help="perplexity chunks of 256 tokens (default 64)")
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from mcmoe_gguf.engine.runtime import RuntimeMismatch

    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    # Our input errors derive from ValueError (CheckpointError, ExportError, UnsupportedModel,
    # TokenizerError), as does llama-cpp-python's "failed to load model".
    except (ValueError, RuntimeMismatch, OSError) as e:
        print(f"mcmoe-gguf: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mcmoe-gguf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
