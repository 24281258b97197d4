"""Quality of quantized files against their F16 file on the same held-out tokens, as llama.cpp measures it:
PPL ratio, mean KL divergence and top-1 agreement, each with its uncertainty (llama-perplexity
--kl-divergence; the ± it prints is one standard error over the scored tokens).

    base = kld_base(f16, text_file, work / "f16.kld")          # the F16 logits, once
    row  = score(path, base, text_file)                        # one file against them
    print(markdown([row, ...]))

Perplexity alone misleads at low bits: a file can keep the PPL of F16 while it changes many next-token
choices (KLD and top-1 show it), and on a weakly trained model PPL barely moves at all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_F = r"(-?(?:\d+(?:\.\d*)?|nan|inf))"
_PM = rf"\s*{_F}\s*±\s*{_F}"
# the summary lines of llama-perplexity --kl-divergence (tools/perplexity/perplexity.cpp)
_SUMMARY = {
    "ppl": rf"^Mean PPL\(Q\)\s*:{_PM}",
    "ppl_base": rf"^Mean PPL\(base\)\s*:{_PM}",
    "ln_ratio": rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:{_PM}",
    "ratio": rf"^Mean PPL\(Q\)/PPL\(base\)\s*:{_PM}",
    "kld": rf"^Mean\s+KLD:{_PM}",
    "top1": rf"^Same top p:{_PM}\s*%",
}


@dataclass
class Quality:
    name: str
    ppl: float
    ppl_base: float
    ratio: float             # PPL(Q) / PPL(F16), mean over tokens as llama.cpp computes it
    ratio_se: float
    kld: float               # mean KL(F16 || Q) per token, nats
    kld_se: float
    top1: float              # % of tokens whose most likely next token is the same as F16's
    top1_se: float
    chunks: int              # chunks scored
    skipped: float | None = None   # ODP: fraction of routed expert evaluations pruned (engine counters)


def parse_kld(output: str, name: str = "") -> Quality:
    """The summary of a llama-perplexity --kl-divergence run; ValueError naming the missing line if the
    output is cut short (llama.cpp tools can lose their last log lines at exit, upstream #22142)."""
    vals = {}
    for key, rx in _SUMMARY.items():
        m = re.findall(rx, output, re.M)
        if not m:
            raise ValueError(f"no '{key}' line in llama-perplexity --kl-divergence output (cut short?); "
                             f"it ends with: {output[-600:]!r}")
        vals[key] = tuple(float(x) for x in m[-1])
    n = re.findall(r"^\s*(\d+)\s+" + _F + r"\s*±", output, re.M)       # the per-chunk table: last chunk index
    return Quality(name, vals["ppl"][0], vals["ppl_base"][0], vals["ratio"][0], vals["ratio"][1], vals["kld"][0],
                   vals["kld"][1], vals["top1"][0], vals["top1"][1], int(n[-1][0]) if n else 0)


def _perplexity(*args, tries: int = 8, binary: Path | None = None) -> str:
    """llama-perplexity's output, rerun while its summary is missing (see parse_kld). MCMOE_ODP_REPORT=1: the
    engine prints its ODP counters at exit. binary: another llama-perplexity (e.g. an unpatched build,
    scripts/build_stock.py) instead of the runtime's."""
    import os
    import subprocess

    from mcmoe_gguf.engine.runtime import run_tool
    out = ""
    for _ in range(tries):
        env = dict(os.environ, MCMOE_ODP_REPORT="1")
        r = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env) if binary else \
            run_tool("llama-perplexity", *args, capture_output=True, text=True, env=env)
        out = r.stdout + r.stderr
        if r.returncode != 0:
            raise RuntimeError(f"llama-perplexity failed ({r.returncode}): {out[-2000:]}")
        # the summary lines themselves (the per-chunk table's header also says "Same top p": matching
        # that accepted cut outputs without a retry)
        if ("--kl-divergence" in args and all(re.search(rx, out, re.M) for rx in _SUMMARY.values())) or \
                ("--kl-divergence" not in args and "Final estimate" in out):
            return out
    return out


def _common(text_file: Path, ctx: int, chunks: int | None, threads: int) -> list[str]:
    return ["-f", str(text_file), "-c", str(ctx), "-b", str(ctx), "-t", str(threads)] + \
        (["--chunks", str(chunks)] if chunks else [])


def kld_base(f16: Path, text_file: Path, out: Path, ctx: int = 256, chunks: int | None = None,
             threads: int = 2) -> Path:
    """Save the F16 file's logits on the text (llama-perplexity --kl-divergence-base), once per settings."""
    out = Path(out)
    if not out.exists():
        tmp = out.with_name(out.name + ".partial")
        _perplexity("-m", str(f16), "--kl-divergence-base", str(tmp), *_common(text_file, ctx, chunks, threads),
                    *odp_args(False))
        tmp.replace(out)
    return out


def odp_args(odp: bool | dict) -> list[str]:
    """llama.cpp --override-kv flags for ODP: False (off), True (the file's settings) or a dict of
    engine.odp.overrides' knobs (protect, mu_scale, mu, importance) plus flash_attn."""
    from mcmoe_gguf.engine.odp import overrides
    kw = dict(odp) if isinstance(odp, dict) else {"odp": bool(odp)}
    fa = kw.pop("flash_attn", False)
    kv = []
    for k, v in overrides(**kw).items():
        typ = "bool" if isinstance(v, bool) else "str" if isinstance(v, str) else "float"
        kv.append(f"{k}={typ}:{str(v).lower() if typ == 'bool' else v}")
    # one flag, comma-separated: llama.cpp keeps only the last of repeated --override-kv flags
    return ["-fa", "on" if fa else "off", "--override-kv", ",".join(kv)]


def score(path: Path, base: Path, text_file: Path, name: str | None = None, ctx: int = 256,
          chunks: int | None = None, threads: int = 2, odp: bool | dict = False, binary: Path | None = None) -> Quality:
    """One file against the saved F16 logits (same text, ctx and chunks as kld_base); ODP as odp_args.
    binary: another llama-perplexity (an unpatched one knows no ODP: no ODP arguments are passed)."""
    out = _perplexity("-m", str(path), "--kl-divergence-base", str(base), "--kl-divergence",
                      *_common(text_file, ctx, chunks, threads), *([] if binary else odp_args(odp)), binary=binary)
    q = parse_kld(out, name or Path(path).name)
    m = re.findall(r"mcmoe-odp: total: (\d+) of (\d+) slots pruned", out)
    if m and int(m[-1][1]):
        q.skipped = int(m[-1][0]) / int(m[-1][1])
    return q


def markdown(rows: list[Quality], sizes: dict[str, dict] | None = None) -> str:
    """A quality table; sizes[name] (gguf_sizes) adds bytes and bpw columns."""
    head = "| file |" + (" bytes | file bpw | expert bpw |" if sizes else "") + \
        " PPL | PPL / F16 | mean KLD | same top-1 % |"
    lines = [head, "|---|" + ("---:|" * 3 if sizes else "") + "---:|---:|---:|---:|"]
    for r in rows:
        s = sizes.get(r.name) if sizes else None
        cells = f" {s['bytes']:,} | {s['bpw']:.3f} | {s['expert_bpw']:.3f} |" if s else (" | | |" if sizes else "")
        lines.append(f"| {r.name} |{cells} {r.ppl:.3f} | {r.ratio:.4f} ± {r.ratio_se:.4f} | "
                     f"{r.kld:.4f} ± {r.kld_se:.4f} | {r.top1:.2f} ± {r.top1_se:.2f} |")
    return "\n".join(lines)
