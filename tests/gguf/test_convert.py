"""HF -> GGUF conversion: equivalence with transformers, both key layouts, streaming, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, cli, random_state, save_checkpoint, small_config, to_fused


def llama_logits(gguf_path, tokens):
    from mcmoe_gguf.engine.runtime import load
    llm = load(gguf_path, n_ctx=max(64, len(tokens)), n_batch=len(tokens), logits_all=True, n_threads=2)
    llm.eval(tokens)
    return np.asarray(llm.scores[: len(tokens)], dtype=np.float64)


def hf_logits(model_dir, tokens):
    from transformers import MixtralForCausalLM
    m = MixtralForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([tokens])).logits[0].double().numpy()


def assert_top_logits_close(ref, got, rel=1e-3, k=10):
    """Per position, the reference's top-k logits are reproduced within rel x (largest |logit| there)."""
    top = np.argsort(-ref, axis=-1)[:, :k]
    r = np.take_along_axis(ref, top, -1)
    g = np.take_along_axis(got, top, -1)
    scale = np.abs(ref).max(-1, keepdims=True)
    err = (np.abs(r - g) / scale).max()
    assert err <= rel, f"top-{k} logits differ by {err:.2e} relative (limit {rel})"


# --------------------------------------------------------------------- the tiny model (trained)
def test_tiny_f32_logits_match_transformers(tiny_dir, tiny_gguf):
    from tokenizers import Tokenizer
    text = (tiny_dir / "eval.txt").read_text()[:2000]
    tokens = Tokenizer.from_file(str(tiny_dir / "tokenizer.json")).encode(text).ids[:128]
    assert_top_logits_close(hf_logits(tiny_dir, tokens), llama_logits(tiny_gguf["f32"], tokens), rel=1e-3)


def test_tiny_tokenization_matches_transformers(tiny_dir, tiny_gguf):
    from tokenizers import Tokenizer

    from mcmoe_gguf.engine.runtime import load
    text = (tiny_dir / "eval.txt").read_text()[:30000]
    ref = Tokenizer.from_file(str(tiny_dir / "tokenizer.json")).encode(text).ids
    llm = load(tiny_gguf["f16"], n_ctx=64, vocab_only=True)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ref


def test_tiny_f16_perplexity_within_1pct_of_torch(tiny_dir, tiny_gguf):
    from mcmoe_gguf.apps.evaluate import ppl_llama, ppl_torch
    text = (tiny_dir / "eval.txt").read_text()
    ref = ppl_torch(tiny_dir, text, ctx=256, max_chunks=24, progress=False)
    got = ppl_llama(tiny_gguf["f16"], text, ctx=256, max_chunks=24, n_threads=2, progress=False)
    assert got["tokens"] == ref["tokens"]
    assert abs(got["ppl"] / ref["ppl"] - 1) < 0.01, (got, ref)


# --------------------------------------------------------------------- Mixtral-8x7B key layout
@pytest.fixture(scope="module")
def release_layout(tmp_path_factory, small_tokenizer_dir):
    """Random weights in the exact Mixtral-8x7B release layout (bf16, 3 shards + index), and the same
    weights in transformers' fused layout, in directories of the same name."""
    cfg = small_config(n_layers=2)
    sd = random_state(cfg, seed=1)
    root = tmp_path_factory.mktemp("release")
    legacy = save_checkpoint(root / "legacy" / "mixtral-random", cfg, sd, small_tokenizer_dir, shards=3)
    fused = save_checkpoint(root / "fused" / "mixtral-random", cfg, to_fused(sd, cfg), small_tokenizer_dir, shards=2)
    return legacy, fused


def test_release_layout_converts_and_matches_transformers(release_layout, tmp_path):
    legacy, _ = release_layout
    assert len(list(legacy.glob("model-*.safetensors"))) == 3
    out = tmp_path / "r.gguf"
    r = cli("convert", legacy, "--outtype", "f32", "-o", out)
    assert r.returncode == 0, r.stderr
    tokens = list(range(3, 67))
    assert_top_logits_close(hf_logits(legacy, tokens), llama_logits(out, tokens), rel=1e-3)


def test_fused_layout_gives_byte_identical_gguf(release_layout, tmp_path):
    legacy, fused = release_layout
    for name, src in (("legacy", legacy), ("fused", fused)):
        r = cli("convert", src, "--outtype", "f16", "-o", tmp_path / f"{name}.gguf")
        assert r.returncode == 0, r.stderr
    a, b = (tmp_path / "legacy.gguf").read_bytes(), (tmp_path / "fused.gguf").read_bytes()
    assert len(a) > 1_000_000 and a == b


def test_gguf_metadata_and_types(release_layout, tmp_path):
    import gguf
    legacy, _ = release_layout
    out = tmp_path / "m.gguf"
    assert cli("convert", legacy, "--outtype", "bf16", "-o", out).returncode == 0
    rd = gguf.GGUFReader(out)
    kv = {f.name: f.contents() for f in rd.fields.values()}
    assert kv["general.architecture"] == "llama"
    assert kv["llama.expert_count"] == 8 and kv["llama.expert_used_count"] == 2
    assert kv["llama.block_count"] == 2 and kv["llama.rope.freq_base"] == 1e6
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    types = {t.name: t.tensor_type for t in rd.tensors}
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in rd.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == gguf.GGMLQuantizationType.BF16
    assert types["blk.0.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert shapes["blk.0.ffn_gate_exps.weight"] == (256, 512, 8)      # ggml order: d, ff, experts
    assert shapes["blk.0.ffn_down_exps.weight"] == (512, 256, 8)


# --------------------------------------------------------------------- memory does not grow with depth
# Linux carries ru_maxrss across execve, so a converter started straight from pytest would report
# pytest's own peak. A small launcher measures its child instead (RUSAGE_CHILDREN).
RSS_SNIPPET = """
import resource, subprocess, sys
code = "import sys; from mcmoe_gguf.gguf.export import convert; convert(sys.argv[1], sys.argv[2], progress=False)"
subprocess.run([sys.executable, "-c", code, sys.argv[1], sys.argv[2]], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_peak_rss_does_not_grow_with_depth(tmp_path, small_tokenizer_dir):
    rss = {}
    for n in (2, 6):
        cfg = small_config(n_layers=n, hidden=1024, ff=2048)
        src = save_checkpoint(tmp_path / f"d{n}", cfg, random_state(cfg, seed=n), small_tokenizer_dir, shards=2)
        r = subprocess.run([sys.executable, "-c", RSS_SNIPPET, src, tmp_path / f"d{n}.gguf"], capture_output=True,
                           text=True, cwd=REPO, timeout=600)
        assert r.returncode == 0, r.stderr
        rss[n] = int(r.stdout.split()[-1]) / 1024      # MiB
    layer_mib = 3 * 8 * 1024 * 2048 * 2 / 2**20        # one layer's experts in bf16: 96 MiB
    # six layers hold 4 x 96 MiB more weights than two; streaming keeps the peak within one projection
    assert rss[6] - rss[2] < 0.5 * layer_mib, rss


# --------------------------------------------------------------------- bad input
def _assert_clean_failure(r, out_dir, must_mention):
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("mcmoe-gguf: error:"), r.stderr
    assert must_mention in err[-1], err[-1]
    assert not list(out_dir.glob("*.partial")) and not list(out_dir.glob("*.gguf"))


@pytest.fixture
def good_checkpoint(tmp_path, small_tokenizer_dir):
    cfg = small_config(n_layers=1)
    return save_checkpoint(tmp_path / "src", cfg, random_state(cfg), small_tokenizer_dir, shards=2)


def test_dense_config_is_refused(good_checkpoint, tmp_path):
    cfg = json.loads((good_checkpoint / "config.json").read_text())
    cfg.pop("num_local_experts")
    (good_checkpoint / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    _assert_clean_failure(cli("convert", good_checkpoint, "-o", out / "x.gguf"), out, "dense")


def test_unknown_architecture_is_refused(good_checkpoint, tmp_path):
    cfg = json.loads((good_checkpoint / "config.json").read_text())
    cfg.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (good_checkpoint / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    out.mkdir()
    _assert_clean_failure(cli("convert", good_checkpoint, "-o", out / "x.gguf"), out, "unsupported architecture")


def test_missing_shard_is_refused(good_checkpoint, tmp_path):
    (good_checkpoint / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    out.mkdir()
    _assert_clean_failure(cli("convert", good_checkpoint, "-o", out / "x.gguf"), out, "model-00002-of-00002")


def test_truncated_safetensors_is_refused(good_checkpoint, tmp_path):
    shard = good_checkpoint / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    out.mkdir()
    _assert_clean_failure(cli("convert", good_checkpoint, "-o", out / "x.gguf"), out, "truncated")


def test_nan_weights_are_refused(tmp_path, small_tokenizer_dir):
    cfg = small_config(n_layers=1)
    sd = random_state(cfg)
    sd["model.layers.0.block_sparse_moe.experts.3.w2.weight"][0, 0] = float("nan")
    src = save_checkpoint(tmp_path / "src", cfg, sd, small_tokenizer_dir)
    out = tmp_path / "out"
    out.mkdir()
    _assert_clean_failure(cli("convert", src, "-o", out / "x.gguf"), out, "NaN")


def test_existing_output_needs_force(good_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "x.gguf"
    target.write_bytes(b"precious")
    r = cli("convert", good_checkpoint, "-o", target)
    assert r.returncode != 0 and "--force" in r.stderr.strip().splitlines()[-1]
    assert target.read_bytes() == b"precious"
    r = cli("convert", good_checkpoint, "-o", target, "--force")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes()[:4] == b"GGUF"


def test_input_file_is_never_overwritten(good_checkpoint):
    shard = good_checkpoint / "model-00001-of-00002.safetensors"
    before = shard.read_bytes()
    r = cli("convert", good_checkpoint, "-o", shard, "--force")
    assert r.returncode != 0 and "input" in r.stderr
    assert shard.read_bytes() == before
