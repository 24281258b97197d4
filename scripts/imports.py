#!/usr/bin/env python3
"""The import graph of the mcmoe_gguf package (and of scripts/), read from the source with ast.

    scripts/imports.py            one line per module: the package modules it imports (top-level and
                                  function-level imports alike), then the import cycles
    scripts/imports.py --cycles   only the cycles; exit status 1 if there is one
    scripts/imports.py --layers   only the imports that run up the layers of docs/ARCHITECTURE.md (LAYERS
                                  below); exit status 1 if there is one

Imports inside functions count: they are how a cycle usually hides. Only imports of our own modules are
listed (mcmoe_gguf.*, and for scripts/ each other).
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = "mcmoe_gguf"


# docs/ARCHITECTURE.md's layers, top to bottom, one sub-package each: a module may import its own layer
# and the ones below
LAYERS = ("apps", "engine", "gguf", "quant", "model", "base")


def layer_of(module: str) -> int | None:
    """Index of the layer of a package module (0 = top), None for the package itself, scripts and modules
    outside every layer folder."""
    parts = module.split(".")
    if parts[0] != PKG or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a package module imports from a layer above its own."""
    out = []
    for m, deps in sorted(g.items()):
        lm = layer_of(m)
        for d in sorted(deps):
            ld = layer_of(d)
            if lm is not None and ld is not None and ld < lm:
                out.append((m, d))
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if parts[0] == "scripts":
        return "scripts." + ".".join(parts[1:])
    return ".".join(parts)


def modules() -> dict[str, Path]:
    out = {module_name(p): p for p in sorted((REPO / PKG).rglob("*.py"))}
    out.update({module_name(p): p for p in sorted((REPO / "scripts").glob("*.py"))})
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        resolved = set()
        for t in targets:
            if name.startswith("scripts.") and f"scripts.{t}" in known:
                t = f"scripts.{t}"
            # the longest known module that t names (a from-import of a function names its module)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not (t == PKG and not is_pkg):
                resolved.add(t)
        # `from pkg.sub import mod` names mod; the sub-package it passes through is not a dependency of its own
        found |= {t for t in resolved if not any(u.startswith(t + ".") for u in resolved)}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", action="store_true", help="only the cycles; exit 1 if any")
    ap.add_argument("--layers", action="store_true", help="only the imports that run up; exit 1 if any")
    a = ap.parse_args()
    g = graph()
    if a.layers:
        unplaced = [m for m in g if m.startswith(PKG + ".") and layer_of(m) is None]
        for m in unplaced:
            print(f"not in any layer: {m} (move it into one of the folders {', '.join(LAYERS)})")
        up = upward(g)
        for m, d in up:
            print(f"runs up: {m} -> {d}")
        if not up and not unplaced:
            print("no import runs up the layers")
        return 1 if (up or unplaced) else 0
    if not a.cycles:
        for m in sorted(g):
            short = sorted(d.removeprefix(PKG + ".") for d in g[m])
            print(f"{m.removeprefix(PKG + '.')}: {', '.join(short) or '-'}")
        print()
    cyc = cycles(g)
    for c in cyc:
        print("cycle: " + " <-> ".join(x.removeprefix(PKG + ".") for x in c))
    if not cyc:
        print("no import cycles")
    return 1 if (a.cycles and cyc) else 0


if __name__ == "__main__":
    sys.exit(main())
