"""Intel AMX: stock Q8_0 and Q4_K matmuls through ggml's AMX buffer type equal the plain CPU path.

On a CPU with AMX-INT8 (Sapphire Rapids and later), llama.cpp puts Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K/IQ4_XS
weights of plain matmuls into the "AMX" extra buffer type and multiplies a prompt batch with tile
instructions. The pinned tree crashed there (llama.cpp #20824; our fix: cpp/ggml-cpu/mcmoe-amx.h). Here a
micro model's prompt batch runs through llama.cpp twice, with use_extra_bufts off (plain CPU kernels) and
on (AMX, checked from the loader's log), and the logits are compared. On a CPU without AMX the tests say
so and skip.
"""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from mcmoe_gguf.engine.cpu_variant import cpu_flags


pytestmark = pytest.mark.skipif("amx_int8" not in cpu_flags(),
                                reason="this CPU has no AMX-INT8: ggml's AMX path cannot run here")


@pytest.fixture(scope="module")
def micro_files(tmp_path_factory, small_tokenizer_dir):
    from micro_model import stock_files
    return stock_files(tmp_path_factory.mktemp("amx"), small_tokenizer_dir, ("Q8_0", "Q4_K_S"), seed=3)


def logits(path, extra_bufts: bool, tokens) -> tuple[np.ndarray, str]:
    """(logits of every prompt position, the loader's log) from one llama_decode of the whole prompt."""
    import llama_cpp
    from llama_cpp import _logger

    from mcmoe_gguf.engine.runtime import check_runtime
    check_runtime()
    log = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        log.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_backend_init()
    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        assert model, "".join(log)[-3000:]
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = 128
        cp.n_threads = cp.n_threads_batch = 2
        ctx = llama_cpp.llama_init_from_model(model, cp)
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
            batch.seq_id[i][0] = 0
        assert llama_cpp.llama_decode(ctx, batch) == 0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(tokens), n_vocab)).copy()
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    return out, "".join(log)


def amx_mib(log: str) -> float:
    m = re.search(r"AMX model buffer size =\s*([\d.]+) MiB", log)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_S"])
def test_amx_matmul_equals_the_plain_cpu_path(micro_files, qtype):
    tokens = [int(t) for t in np.random.default_rng(1).integers(3, 512, 96)]   # a prompt batch: AMX tiles
    plain, log_plain = logits(micro_files[qtype], False, tokens)
    amx, log_amx = logits(micro_files[qtype], True, tokens)
    assert amx_mib(log_plain) == 0.0, "use_extra_bufts=False still used the AMX buffer type"
    assert amx_mib(log_amx) > 0.1, "the AMX buffer type was not used: " + log_amx[-3000:]
    assert np.isfinite(amx).all()
    f16, _ = logits(micro_files["F16"], False, tokens)
    scale = np.abs(f16).max()
    d_amx, d_quant = np.abs(amx - plain).max() / scale, np.abs(plain - f16).max() / scale
    # The AMX kernels quantize activations and sum in their own order, so they agree with the plain
    # kernels to well below the type's own error (measured: 13x below for Q8_0, 21x for Q4_K on this
    # model); a broken tile setup gives garbage or a crash, not a small difference.
    assert d_amx < 0.2 * d_quant, (d_amx, d_quant)
    assert (amx.argmax(-1) == plain.argmax(-1)).mean() > 0.95
