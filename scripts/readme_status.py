#!/usr/bin/env python3
"""README's status numbers, checked against docs/RESULTS.md (where each was measured, with its command).

    scripts/readme_status.py           list the numbers of README's "## Status" section that RESULTS.md
                                       does not contain; exit status 1 if there is one

A number is a decimal with a unit (%, x, s, MiB, GB, bpw ...) or a range of them ("1.10-1.19x" checks 1.10
and 1.19). Each must occur in RESULTS.md as the same decimal string, so a status that drifted from the
measurement (0.80x in README, 0.82x in RESULTS) fails `make test` (tests/tools/test_readme_status.py).
Bare integers (layer counts, dimensions) are not checked: they are names, not measurements.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_UNIT = r"(?:%|x\b|\s?(?:s|ms|MiB|GiB|GB|MB|bpw|bits?|tok/s|tokens/s)\b)"
_NUM = r"\d+(?:\.\d+)?"
MEASURE = re.compile(rf"(?<![\w.])[+-]?({_NUM})(?:\s?(?:-|\.\.|to)\s?[+-]?({_NUM}))?({_UNIT})")


def status_section(readme: str) -> str:
    m = re.search(r"^## Status.*?$(.*?)(?=^## )", readme, re.M | re.S)
    if not m:
        raise ValueError("README.md has no '## Status' section")
    return m.group(1)


def numbers(text: str) -> list[str]:
    """The decimal strings of every measurement in text (both ends of a range); integers without a
    fractional part only when they carry % or x (shares and ratios)."""
    out = []
    for m in MEASURE.finditer(text):
        unit = m.group(3).strip()
        for n in (m.group(1), m.group(2)):
            if n and ("." in n or unit in ("%", "x")):
                out.append(n)
    return out


def missing(readme: str, results: str) -> list[str]:
    have = set(re.findall(rf"(?<![\w.]){_NUM}", results))
    return [n for n in numbers(status_section(readme)) if n not in have]


def main() -> int:
    bad = missing((REPO / "README.md").read_text(encoding="utf-8"),
                  (REPO / "docs" / "RESULTS.md").read_text(encoding="utf-8"))
    for n in bad:
        print(f"README status: {n} does not occur in docs/RESULTS.md (measure it there, or fix the README)")
    if not bad:
        print("every README status number occurs in docs/RESULTS.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
