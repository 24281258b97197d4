"""Tokenizer export: llama.cpp must tokenize exactly as transformers does, for both tokenizer kinds."""
from __future__ import annotations

import json

import pytest

from helpers import random_state, save_checkpoint, small_config

SAMPLE = "Hello world, ÆØ 日本 café.\n  two  spaces\tand a tab; numbers 1234567 and 3.14159!\n\n"


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A Llama/Mixtral-style tokenizer (SentencePiece BPE with byte fallback, "▁" for spaces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    from mcmoe_gguf.model.tiny import PRESETS, corpus_splits
    text = corpus_splits(PRESETS["default"])["calib"][:60_000]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(text.split("\n"), trainer=trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                                          show_progress=False))
    d = tmp_path_factory.mktemp("spm")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))
    cfg = small_config(n_layers=1, vocab=512)
    src = save_checkpoint(d / "model", cfg, random_state(cfg), d)
    from mcmoe_gguf.gguf.export import convert
    return src, convert(src, d / "spm.gguf", progress=False), text


def test_llama_tokenizer_matches_transformers(spm_model):
    import gguf
    from tokenizers import Tokenizer

    from mcmoe_gguf.engine.runtime import load
    src, path, text = spm_model
    kv = {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values()}
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.add_bos_token"] is True
    llm = load(path, vocab_only=True)
    ref = Tokenizer.from_file(str(src / "tokenizer.json"))
    for s in (SAMPLE, text[:20_000]):
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == ref.encode(s).ids
    ids = llm.tokenize(SAMPLE.encode(), add_bos=True)
    assert ids[0] == 1 and llm.detokenize(ids[1:]).decode() == " " + SAMPLE   # SentencePiece's leading space


def test_gpt2_tokenizer_round_trips_bytes(tiny_gguf):
    from mcmoe_gguf.engine.runtime import load
    llm = load(tiny_gguf["f16"], vocab_only=True)
    ids = llm.tokenize(SAMPLE.encode(), add_bos=False, special=False)
    assert llm.detokenize(ids).decode() == SAMPLE


def test_unsupported_tokenizer_is_refused(tmp_path, small_tokenizer_dir):
    from helpers import cli
    cfg = small_config(n_layers=1)
    src = save_checkpoint(tmp_path / "m", cfg, random_state(cfg), small_tokenizer_dir)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["model"]["type"] = "Unigram"
    (src / "tokenizer.json").write_text(json.dumps(tj))
    r = cli("convert", src, "-o", tmp_path / "x.gguf")
    assert r.returncode == 1 and "unsupported tokenizer model 'Unigram'" in r.stderr
    assert not (tmp_path / "x.gguf").exists()
