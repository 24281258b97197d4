#!/usr/bin/env python3
"""GPU self-check: the tiny model's F16, MCQ1/2/3 and mixed PMQ files on the CPU and on CUDA, compared.

    gpu_selfcheck.py [--threads N] [--cpu-only]

Same as `mcmoe-gguf selfcheck --gpu` (mcmoe_gguf/apps/selfcheck.py): logits CPU vs CUDA per file, pp/tg tok/s
and VRAM. Without a GPU it says so, runs the CPU part and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mcmoe_gguf.apps.selfcheck import run_selfcheck  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's)")
    ap.add_argument("--cpu-only", action="store_true", help="skip the GPU part even if a GPU is present")
    a = ap.parse_args()
    return run_selfcheck(gpu=not a.cpu_only, threads=a.threads)


if __name__ == "__main__":
    sys.exit(main())
