"""Tokenizer -> GGUF: byte-level BPE as llama.cpp's "gpt2" model, SentencePiece-style BPE as "llama".

Special token ids, add_bos/add_eos, merges and the chat template go through gguf's SpecialVocab, as in
llama.cpp's own convert_hf_to_gguf.py, so llama.cpp tokenizes exactly as transformers does
(tests/gguf/test_convert.py compares the two token for token on the held-out text).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf


class TokenizerError(ValueError):
    pass


def _is_gpt2_regex_bytelevel(pre: dict | None) -> bool:
    if not pre:
        return False
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex", True)
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        return len(parts) == 1 and _is_gpt2_regex_bytelevel(parts[0])
    return False


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int) -> str:
    """Write the tokenizer of ``model_dir`` into ``writer``; returns the llama.cpp tokenizer model name."""
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.exists():
        raise TokenizerError(f"{model_dir}: tokenizer.json not found (a fast tokenizer is required)")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        kind = _add_llama(writer, tj, n_vocab)
    elif model.get("type") == "BPE" and (tj.get("decoder") or {}).get("type") == "ByteLevel":
        if not _is_gpt2_regex_bytelevel(tj.get("pre_tokenizer")):
            raise TokenizerError(f"{tj_path}: byte-level BPE with a pre-tokenizer other than GPT-2's "
                                 f"({(tj.get('pre_tokenizer') or {}).get('type')}) is not supported yet")
        kind = _add_gpt2(writer, tj, n_vocab)
    else:
        raise TokenizerError(f"{tj_path}: unsupported tokenizer model {model.get('type')!r}; "
                             "supported: byte-level BPE (gpt2) and byte-fallback BPE (llama)")
    gguf.SpecialVocab(model_dir, load_merges=(kind == "gpt2"), n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    return kind


def _add_gpt2(writer: gguf.GGUFWriter, tj: dict, n_vocab: int) -> str:
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    if max(vocab.values()) >= n_vocab:
        raise TokenizerError(f"tokenizer has id {max(vocab.values())} but config.json vocab_size is {n_vocab}")
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:     # embedding rows beyond the tokenizer (padding) stay addressable but unused
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")   # llama.cpp's name for the GPT-2 regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return "gpt2"


def _merge_ranks(model: dict) -> dict[str, int]:
    """token -> rank of the merge that creates it (merges are "a b" strings or [a, b] pairs)."""
    ranks: dict[str, int] = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        ranks.setdefault(a + b, r)
    return ranks


def _add_llama(writer: gguf.GGUFWriter, tj: dict, n_vocab: int) -> str:
    """SentencePiece-style BPE (Llama, Mistral, Mixtral): llama.cpp's "llama" model merges the adjacent
    pair whose result has the highest score, so a token's score is minus the rank of the merge that
    creates it (earlier merge = higher score). gguf's LlamaHfVocab writes -1000 for every token, which
    makes llama.cpp merge in the wrong order (tests/gguf/test_vocab.py shows the difference)."""
    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    if max(vocab.values()) >= n_vocab:
        raise TokenizerError(f"tokenizer has id {max(vocab.values())} but config.json vocab_size is {n_vocab}")
    ranks = _merge_ranks(model)
    by_id = {i: t for t, i in vocab.items()}
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(t)
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):     # byte fallback, even if "added"
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        elif i in added:
            scores.append(0.0)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            # single symbols are never a merge result; other tokens without a merge come last
            scores.append(-float(ranks[t]) if t in ranks else (0.0 if len(t) == 1 else -1e6))
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    return "llama"
