"""The package and scripts/ import without cycles (scripts/imports.py reads every import, function-level
ones too, from the source): a cycle is how layers start running up."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import imports  # noqa: E402


def test_no_import_cycles():
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "imports.py"), "--cycles"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert imports.cycles(g) == [["a", "b", "c"]]
    assert imports.cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_and_relative_imports():
    g = imports.graph()
    # odp's only import of the engine is inside a function (engine_lib), relative
    assert "mcmoe_gguf.engine.libllama" in g["mcmoe_gguf.engine.odp"]
    assert "mcmoe_gguf.engine.runtime" not in g["mcmoe_gguf.engine.odp"]
    assert "scripts.llama_tree" in g["scripts.check_cuda"]


def test_no_import_runs_up_the_layers():
    """docs/ARCHITECTURE.md's layers (scripts/imports.py LAYERS): every package module is in one, and imports
    only its own layer and those below."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "imports.py"), "--layers"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_layer_check_flags_an_upward_import():
    g = {"mcmoe_gguf.quant.formats": {"mcmoe_gguf.engine.runtime"},      # quant -> engine: up
         "mcmoe_gguf.engine.runtime": {"mcmoe_gguf.engine.odp", "mcmoe_gguf.base.sources"},   # same layer, and down
         "scripts.x": {"mcmoe_gguf.apps.cli"}}                    # scripts are above the package
    assert imports.upward(g) == [("mcmoe_gguf.quant.formats", "mcmoe_gguf.engine.runtime")]
