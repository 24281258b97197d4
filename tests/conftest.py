import json
import sys
from pathlib import Path

import pytest

# shared harnesses and builders (tests/support/) import by their module names
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

# a segfault or abort fails one test, not the run (under `make test`'s pytest-xdist; see crash_harness.py)
from crash_harness import (pytest_configure, pytest_handlecrashitem, pytest_runtest_logstart,  # noqa: E402,F401
                           pytest_sessionstart)


@pytest.fixture(scope="session")
def small_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE of 512 tokens trained on a slice of the calibration text (seconds)."""
    from mcmoe_gguf.model.tiny import PRESETS, corpus_splits, train_tokenizer
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus_splits(PRESETS["default"])["calib"][:100_000], 512).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": False}))
    return d


@pytest.fixture(scope="session")
def micro(tmp_path_factory, small_tokenizer_dir):
    """The micro model and its uniform 2-bit RTN work directory (support/micro_model.py)."""
    from micro_model import make_micro
    return make_micro(tmp_path_factory.mktemp("mixed"), small_tokenizer_dir)


@pytest.fixture(scope="session")
def pmq_file(micro):
    """A mixed PMQ GGUF of the micro model (all three widths in layer 0)."""
    from micro_model import make_pmq_file
    return make_pmq_file(micro)


@pytest.fixture(scope="session")
def tiny_dir():
    """The embedded default tiny model (trained once per machine, then cached)."""
    from mcmoe_gguf.model.tiny import tiny_model
    return tiny_model("default")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_dir, tmp_path_factory):
    """{outtype: path} of the tiny model converted to f32 and f16."""
    from mcmoe_gguf.gguf.export import convert
    d = tmp_path_factory.mktemp("tiny-gguf")
    return {t: convert(tiny_dir, d / f"tiny-{t}.gguf", outtype=t, progress=False) for t in ("f32", "f16")}
