"""quant/mixes.py: the types outside the experts. The stock table is checked against llama.cpp itself
(`llama-quantize --dry-run` on an 8-expert F16 file); the byte accounting against written files."""
from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest

from helpers import calibrated_checkpoint
from mcmoe_gguf.model.checkpoint import Checkpoint
from mcmoe_gguf.quant import mixes, pmq


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, small_tokenizer_dir):
    return calibrated_checkpoint(tmp_path_factory.mktemp("mix"), small_tokenizer_dir, seed=5)


@pytest.fixture(scope="module")
def f16(ckpt, tmp_path_factory):
    from mcmoe_gguf.gguf.export import convert
    return convert(ckpt, tmp_path_factory.mktemp("mixf16") / "m-f16.gguf", "f16", progress=False)


def _dry_run(f16, ftype: str) -> dict[str, str]:
    from mcmoe_gguf.engine.runtime import run_tool
    r = run_tool("llama-quantize", "--dry-run", f16, ftype, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    types = {}
    for line in (r.stdout + r.stderr).splitlines():
        m = re.search(r"\]\s+(\S+)\s+-.*type =\s+(\w+),.*?(?:\((\w+)\))?\s*$", line)
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).lower()
    return types


@pytest.mark.parametrize("ftype", sorted(mixes.STOCK))
def test_stock_mixes_are_llama_cpps(f16, ftype):
    got = _dry_run(f16, ftype)
    expert, bpw, mix = mixes.STOCK[ftype]
    assert got["token_embd.weight"] == mix.embed and got["output.weight"] == mix.output
    for i in range(2):
        assert [got[f"blk.{i}.{n}.weight"] for n in ("attn_q", "attn_k", "attn_v", "attn_output")] == \
            [mix.attn_q, mix.attn_k, mix.attn_v, mix.attn_o]
        assert got[f"blk.{i}.ffn_gate_exps.weight"] == expert == got[f"blk.{i}.ffn_up_exps.weight"]
        assert got[f"blk.{i}.ffn_gate_inp.weight"] == "f32"      # the router is never quantized
        down = got[f"blk.{i}.ffn_down_exps.weight"]
        sizes = [gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.upper()]] for t in (expert, expert, down)]
        if ftype not in ("Q4_K_M", "IQ3_XXS"):    # their ffn_down is wider in some layers, layer-dependent
            # (Q4_K_M: Q6_K in half of Mixtral's; IQ3_XXS: Q3_K in this 2-layer model's, IQ3_XXS in the bench model's)
            assert np.mean([8 * s / b for b, s in sizes]) == pytest.approx(bpw, abs=1e-3)


def test_auto_picks_the_widest_stock_mix_not_above_the_budget():
    assert mixes.auto_ftype(1.0) == "IQ1_S" and mixes.auto_ftype(1.5625) == "IQ1_S"
    assert mixes.auto_ftype(2.0) == "IQ1_M" and mixes.auto_ftype(2.25) == "IQ2_XXS"
    # IQ2_XS and IQ2_S have one expert width: the later (IQ3_S embeddings) wins
    assert mixes.auto_ftype(2.3125) == "IQ2_S" and mixes.auto_ftype(2.5) == "IQ2_S" and mixes.auto_ftype(3.0) == "Q2_K"
    assert mixes.auto_ftype(3.1875) == "IQ3_XXS" and mixes.auto_ftype(3.5) == "Q3_K_S"
    assert mixes.auto_ftype(9.0) == "Q4_K_M"
    with pytest.raises(ValueError, match="unknown mix 'q9'"):
        mixes.resolve("q9", 2.0)


@pytest.mark.parametrize("mix", ["stock:q2_k", "stock:iq1_s", "q8"])
def test_written_file_has_the_mix_and_the_accounted_bytes(ckpt, tmp_path, mix):
    """The file's tensors outside the experts are in the mix's types, and all tensor bytes equal the
    size report (nonexpert_bytes + expert bytes); the engine loads it and scores finite perplexity."""
    from mcmoe_gguf.apps.evaluate import ppl_llama
    from mcmoe_gguf.gguf.export import export_pmq
    from mcmoe_gguf.gguf.types import register
    r = pmq.quantize(ckpt, tmp_path / "q", pmq.PMQConfig(budget="2.0", n_seq=8, seq_len=64, mix=mix), progress=False)
    path = export_pmq(tmp_path / "q", tmp_path / "m.gguf", progress=False)
    register()
    rd = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name.lower() for t in rd.tensors}
    m = mixes.MIXES[mix]
    assert types["token_embd.weight"] == m.embed and types["output.weight"] == m.output
    assert types["blk.1.attn_q.weight"] == m.attn_q and types["blk.0.attn_output.weight"] == m.attn_o
    assert r["mix"] == m.to_dict()
    hp = Checkpoint(ckpt).hp
    assert sum(int(t.n_bytes) for t in rd.tensors) == r["total_bytes"] == r["expert_bytes"] + mixes.nonexpert_bytes(hp, m)
    got = ppl_llama(path, (ckpt / "calib.txt").read_text()[:4000], ctx=64, max_chunks=4, n_threads=2,
                    progress=False, odp=False)
    assert np.isfinite(got["ppl"])


def test_size_budget_holds_the_whole_file(ckpt, tmp_path):
    """--size is file bytes: the mix comes off first, the experts get the rest, and the written file
    (header included) is no larger."""
    from mcmoe_gguf.apps.cli import main
    size = 1_100_000
    out = tmp_path / "m.gguf"
    assert main(["convert", str(ckpt), "-o", str(out), "--size", f"{size}B", "--n-seq", "8", "--seq-len", "64"]) == 0
    assert out.stat().st_size <= size
    alloc = json.loads((tmp_path / "m.gguf.pmq" / "allocation.json").read_text())
    # and not far below: the experts took what the mix left (within one quarter bit per expert weight)
    assert size - out.stat().st_size < 2 * 8 * 3 * 256 * 256 / 32 + 40_000, alloc


def test_size_too_small_is_refused_with_what_would_fit(ckpt, tmp_path):
    with pytest.raises(ValueError, match="does not even hold the tensors outside the experts"):
        pmq.quantize(ckpt, tmp_path / "q", pmq.PMQConfig(size="100000B", n_seq=8, seq_len=64), progress=False)
    with pytest.raises(ValueError, match=r"leaves 1\.\d+ real bpw for the experts .* PMQ needs at least 1\.625") as e:
        pmq.quantize(ckpt, tmp_path / "q2", pmq.PMQConfig(size="800000B", n_seq=8, seq_len=64), progress=False)
    need = int(re.search(r"at least ([\d,]+) bytes of tensors", str(e.value)).group(1).replace(",", ""))
    budget, _ = pmq.plan_budget(pmq.PMQConfig(size=f"{need}B"), Checkpoint(ckpt).hp)
    assert budget.value >= 1.625


def test_manifest_from_before_mixes_means_the_q8_mix(ckpt, tmp_path):
    """A work directory written before mixes existed (no "mix" key, attn_bits=4) is the q8 mix: a resume
    with mix="q8" continues it, the new default refuses it."""
    cfg = pmq.PMQConfig(budget="2.0", n_seq=8, seq_len=64, mix="q8")
    pmq.quantize(ckpt, tmp_path / "q", cfg, progress=False)
    man = json.loads((tmp_path / "q" / "manifest.json").read_text())
    del man["config"]["mix"], man["config"]["size"]
    man["config"].update(attn_bits=4, embed_type="q8_0", output_type="q8_0")     # the defaults then
    (tmp_path / "q" / "manifest.json").write_text(json.dumps(man))
    pmq.quantize(ckpt, tmp_path / "q", cfg, progress=False)
    with pytest.raises(pmq.WorkdirMismatch):
        pmq.quantize(ckpt, tmp_path / "q", pmq.PMQConfig(budget="2.0", n_seq=8, seq_len=64), progress=False)
