"""scripts/mixtral_shaped.mirror: another file's tensor types at new model sizes (the speed benchmark of the
Pareto files, scripts/bench_speed.py --model pareto). Bytes are checked against formats.py / ggml's own row
sizes, the data against the types' own dequantizers, and the result must load and run in our runtime."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import small_config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import mixtral_shaped as ms  # noqa: E402

from mcmoe_gguf.model.arch import mixtral as mx  # noqa: E402


def target(n_layers=2, hidden=512, ff=768, vocab=512) -> mx.MixtralHParams:
    return mx.MixtralHParams.from_config(small_config(n_layers=n_layers, hidden=hidden, ff=ff, vocab=vocab,
                                                      heads=8, kv_heads=4))


def tensors(path: Path) -> dict:
    import gguf
    from mcmoe_gguf.gguf.types import register
    register()
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def merged_q4k(tmp_path_factory, small_tokenizer_dir):
    """A stock llama-quantize Q4_K_S file (merged 3-D expert tensors) of a small random Mixtral."""
    from micro_model import stock_files
    return stock_files(tmp_path_factory.mktemp("mirror-src"), small_tokenizer_dir, ("Q4_K_S",), seed=5)["Q4_K_S"]


RUN = """
import sys, numpy as np, mcmoe_gguf
llm = mcmoe_gguf.load(sys.argv[1], n_ctx=64, logits_all=True, verbose=False, seed=0, odp=False)
llm.eval([5, 6, 7, 8, 9, 10, 11, 12])
s = np.array(llm.scores[:llm.n_tokens], dtype=np.float32)
print("FINITE", bool(np.isfinite(s).all()), "SPREAD", float(s.std()))
"""


def runs(path: Path) -> str:
    r = subprocess.run([sys.executable, "-c", RUN, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    return r.stdout


def check_mirror(src: Path, out: Path, hp) -> dict:
    """Same names in the same order, same types, the new shapes, row bytes as the types define them."""
    from mcmoe_gguf.base.ggml import ggml
    from mcmoe_gguf.gguf.types import type_name
    from mcmoe_gguf.quant import formats
    a, b = tensors(src), tensors(out)
    assert list(a) == list(b)
    for name, t in b.items():
        assert int(t.tensor_type) == int(a[name].tensor_type), name
        shape = ms._role_shape(name, hp, hp.vocab_size)
        assert tuple(int(x) for x in reversed(t.shape)) == shape, name      # reader: ggml order
        n, rows = shape[-1], int(np.prod(shape[:-1]))
        tid = int(t.tensor_type)
        if tid in formats.TYPES_BY_ID:
            row = formats.block_bytes(formats.TYPES_BY_ID[tid].bits) * n // formats.GROUP_SIZE
        else:
            row = ggml().row_bytes(type_name(tid).lower(), n)
        assert int(t.n_bytes) == rows * row, name
    return b


def test_mirror_of_a_pmq_file_keeps_every_type_and_runs(pmq_file, tmp_path):
    from mcmoe_gguf.quant import formats
    hp = target()
    out = ms.mirror(pmq_file, tmp_path / "m.gguf", hp, rows_per_type=64)
    b = check_mirror(pmq_file, out, hp)
    # per-expert mcq tensors of several widths, as in the source
    widths = {int(t.tensor_type) for n, t in b.items() if ".ffn_" in n and n.count(".") == 4}
    assert len(widths & set(formats.TYPES_BY_ID)) >= 2
    # the data are real blocks of the type: they dequantize to the synthetic N(0, 0.02) weights, and rows
    # repeat with the period asked for
    t = b["blk.0.ffn_down.0.weight"]
    spec = formats.TYPES_BY_ID[int(t.tensor_type)]
    w = formats.dequantize(np.asarray(t.data).reshape(hp.hidden_size, -1), spec.bits, hp.intermediate_size)
    w = np.asarray(w)
    assert np.isfinite(w).all() and 0.01 < w.std() < 0.04
    np.testing.assert_array_equal(w[:64], w[64:128])
    assert not np.array_equal(w[0], w[1])
    norm = b["blk.1.ffn_norm.weight"]
    np.testing.assert_array_equal(np.asarray(norm.data), np.ones(hp.hidden_size, np.float32))
    out_txt = runs(out)
    assert "FINITE True" in out_txt and float(out_txt.split("SPREAD")[1]) > 0


def test_mirror_of_merged_expert_tensors(merged_q4k, tmp_path):
    from mcmoe_gguf.base.ggml import ggml
    hp = target()
    out = ms.mirror(merged_q4k, tmp_path / "m.gguf", hp, rows_per_type=32)
    b = check_mirror(merged_q4k, out, hp)
    t = b["blk.1.ffn_gate_exps.weight"]
    assert tuple(int(x) for x in reversed(t.shape)) == (8, hp.intermediate_size, hp.hidden_size)
    name = {int(x.tensor_type) for x in [t]}.pop()
    from mcmoe_gguf.gguf.types import type_name
    w = ggml().dequantize(np.asarray(t.data).reshape(-1), type_name(name).lower(), hp.hidden_size)
    assert np.isfinite(w).all() and 0.01 < w.std() < 0.04
    np.testing.assert_array_equal(w[:32], w[hp.intermediate_size:hp.intermediate_size + 32])   # next expert
    assert "FINITE True" in runs(out)


def test_mirror_refuses_what_it_cannot_map(pmq_file, tmp_path):
    with pytest.raises(ValueError, match="layers"):
        ms.mirror(pmq_file, tmp_path / "a.gguf", target(n_layers=3))
    # mcq blocks are 128 weights: rows of 320 cannot hold them
    with pytest.raises(ValueError, match=r"ffn_.*blocks of 128 do not divide rows of 320"):
        ms.mirror(pmq_file, tmp_path / "b.gguf", target(hidden=512, ff=320))
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()
    assert not list(tmp_path.glob("*.partial"))
