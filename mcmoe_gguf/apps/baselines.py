"""llama.cpp's own low-bit types, built from the same F16 GGUF with an importance matrix from the
calibration text: the baselines our files are judged against (same bytes, same held-out text)."""
from __future__ import annotations

from pathlib import Path

from mcmoe_gguf.engine.runtime import run_tool

STOCK_TYPES = ("Q3_K_S", "Q2_K", "IQ2_XS", "IQ2_XXS", "Q2_0", "IQ1_M", "IQ1_S", "Q1_0")


def _run(tool: str, *args) -> None:
    r = run_tool(tool, *args, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"{tool} failed ({r.returncode}):\n{tail}")


def imatrix(f16_gguf: Path, calib_text: Path, out: Path, ctx: int = 256, chunks: int = 64,
            threads: int = 2) -> Path:
    if not out.exists():
        tmp = out.with_name(out.name + ".partial.gguf")
        _run("llama-imatrix", "-m", f16_gguf, "-f", calib_text, "-o", tmp, "-c", ctx, "--chunks", chunks,
             "-t", threads, "--no-ppl")
        tmp.rename(out)
    return out


def stock_quantize(f16_gguf: Path, qtype: str, out: Path, imatrix_file: Path | None, threads: int = 2) -> Path:
    """F16 GGUF -> llama.cpp type `qtype` (cached by path: the caller keys the directory)."""
    if not out.exists():
        tmp = out.with_name(out.name + ".partial.gguf")
        args = (["--imatrix", imatrix_file] if imatrix_file else []) + [f16_gguf, tmp, qtype, threads]
        _run("llama-quantize", *args)
        tmp.rename(out)
    return out


__all__ = ["STOCK_TYPES", "imatrix", "stock_quantize"]
