"""--compat stock: a PMQ file that an unpatched llama.cpp runs.

The check is the pinned llama.cpp built without our patches (scripts/build_stock.py, cached; ~10 min on
2 cores the first time): it loads the file and its perplexity equals our runtime's on the same tokens.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from helpers import calibrated_checkpoint
from mcmoe_gguf.quant import ladder, pmq

REPO = Path(__file__).resolve().parents[2]
CFG = dict(budget="2.25", n_seq=8, seq_len=64, compat="stock")


@pytest.fixture(scope="module")
def stock_perplexity() -> Path:
    spec = importlib.util.spec_from_file_location("build_stock", REPO / "scripts" / "build_stock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.stock_tools() / "llama-perplexity"


@pytest.fixture(scope="module")
def compat_run(tmp_path_factory, small_tokenizer_dir):
    from mcmoe_gguf.gguf.export import export_pmq
    d = tmp_path_factory.mktemp("compat")
    ck = calibrated_checkpoint(d, small_tokenizer_dir, seed=4)
    r = pmq.quantize(ck, d / "q", pmq.PMQConfig(**CFG), progress=False)
    return ck, r, export_pmq(d / "q", d / "m.gguf", progress=False)


def test_one_stock_type_per_layer_and_projection_in_merged_tensors(compat_run):
    _, r, path = compat_run
    types = np.array(r["types"], dtype=object)
    assert (types == types[:, :1, :]).all()                             # one type for all experts
    assert set(types.ravel()) <= set(ladder.STOCK_TYPES) and r["expert_bpw"] <= 2.25
    rd = gguf.GGUFReader(path)
    names = {t.name: t for t in rd.tensors}
    assert not any(re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight", n) for n in names)
    for l in range(2):
        for p, g in enumerate(("gate", "up", "down")):
            t = names[f"blk.{l}.ffn_{g}_exps.weight"]
            assert t.tensor_type.name.lower() == types[l, 0, p] and int(t.shape[-1]) == 8   # ne2 = experts
    assert "mcmoe.expert_bits" not in rd.fields
    assert sum(int(t.n_bytes) for t in rd.tensors) == r["total_bytes"]
    assert all(not t.tensor_type.name.startswith("MCQ") for t in rd.tensors)


def _final_ppl(out: str) -> float:
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    assert m, out[-3000:]
    return float(m.group(1))


def test_unpatched_llama_cpp_gives_our_runtimes_perplexity(compat_run, stock_perplexity, tmp_path):
    from mcmoe_gguf.apps.quality import _perplexity, odp_args
    ck, _, path = compat_run
    text = tmp_path / "t.txt"
    text.write_text((ck / "calib.txt").read_text()[:20_000])
    args = ["-m", str(path), "-f", str(text), "-c", "64", "-b", "64", "-t", "2", "--chunks", "12"]
    stock = _final_ppl(_perplexity(*args, binary=stock_perplexity))
    ours = _final_ppl(_perplexity(*args, *odp_args(False)))
    assert np.isfinite(stock) and abs(stock / ours - 1) < 2e-3, (stock, ours)


def test_unpatched_llama_cpp_refuses_a_full_ladder_file(compat_run, stock_perplexity, tmp_path):
    """The control: without --compat the file has per-expert tensors (and here mcq types), which stock
    llama.cpp cannot load; it must fail cleanly, not run on something else."""
    from mcmoe_gguf.gguf.export import export_pmq
    ck, _, _ = compat_run
    pmq.quantize(ck, tmp_path / "q", pmq.PMQConfig(budget="2.25", n_seq=8, seq_len=64, ladder="mcq1,mcq2,iq2_xxs"),
                 progress=False)
    path = export_pmq(tmp_path / "q", tmp_path / "m.gguf", progress=False)
    r = subprocess.run([str(stock_perplexity), "-m", str(path), "-f", str(ck / "calib.txt"), "-c", "64",
                        "--chunks", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Final estimate" not in r.stdout + r.stderr


@pytest.mark.parametrize("cfg, match", [
    (dict(ladder="mcq1,iq2_xxs"), "llama.cpp's own types only; the ladder has mcq1"),
    (dict(mix="q8"), "q8 mix puts attention in mcq4"),
])
def test_compat_refuses_what_stock_cannot_read(compat_run, tmp_path, cfg, match):
    ck, _, _ = compat_run
    with pytest.raises(ValueError, match=match):
        pmq.quantize(ck, tmp_path / "q", pmq.PMQConfig(**{**CFG, **cfg}), progress=False)
