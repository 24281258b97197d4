"""scripts/study_ablation.py: the variants its ablation table compares must be what they claim: the rotation
orthogonal and undone exactly, the block-size and ternary variants the shipped mcn quantizer with only that
one thing changed, and the quantizer's globals restored whatever happens."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import study_ablation as sa  # noqa: E402

from mcmoe_gguf.quant import formats as F  # noqa: E402
from mcmoe_gguf.quant.gptq import GPTQ  # noqa: E402


def data(out=16, n=256, tokens=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g) * 0.02
    X = torch.randn(tokens, n, generator=g) * (1 + torch.rand(n, generator=g) * 3)
    return W, X


@pytest.mark.parametrize("n", [8, 256, 512])
def test_hadamard_is_orthogonal_and_seeded(n):
    R = sa.hadamard(n).double()
    assert torch.allclose(R @ R.t(), torch.eye(n, dtype=torch.float64), atol=1e-6)
    assert torch.equal(sa.hadamard(n), sa.hadamard(n))
    # a randomized Hadamard spreads every coordinate over all: |R_ij| = 1/sqrt(n)
    assert torch.allclose(R.abs(), torch.full_like(R, n ** -0.5), atol=1e-6)


def test_hadamard_refuses_other_sizes():
    with pytest.raises(ValueError, match="power-of-2"):
        sa.hadamard(96)


def test_rotation_quantizes_in_the_rotated_basis():
    """W R is what gets quantized (its blocks, its importance from X R), and the model sees Q R^T."""
    W, X = data()
    R = sa.hadamard(W.shape[1])
    Q = sa.quantize(W, X, "mcn2 rtn+rot")
    imp = ((X @ R).double() ** 2).mean(0).float().numpy()
    Qr = torch.from_numpy(F.mcn_dequantize(F.mcn_quantize((W @ R).numpy(), 2, imp), 2, W.shape[1]))
    assert torch.allclose(Q @ R, Qr, atol=1e-6)
    assert not torch.allclose(Q, sa.quantize(W, X, "mcn2 rtn"), atol=1e-4)


def test_block_32_is_the_shipped_quantizer():
    W, X = data()
    g = GPTQ(W.shape[1])
    g.add_batch(X)
    assert torch.equal(sa.quantize(W, X, "mcn2/b32 gptq"), g.quantize_mcn(W, 2).dequantized)
    imp = (X.double() ** 2).mean(0).float().numpy()
    ref = F.mcn_dequantize(F.mcn_quantize(W.numpy(), 2, imp), 2, W.shape[1])
    assert np.array_equal(sa.quantize(W, X, "mcn2/b32 rtn").numpy(), ref)


@pytest.mark.parametrize("sub", [16, 64])
def test_block_size_variant_has_one_step_per_block(sub):
    """Every weight of a block of `sub` is a level of the 4-level table times that block's one step."""
    W, X = data()
    for how in ("gptq", "rtn"):
        Q = sa.quantize(W, X, f"mcn2/b{sub} {how}").double().reshape(W.shape[0], -1, sub)
        step = Q.abs().amax(-1, keepdim=True) / max(F.MCN_LEVELS[2])
        k = torch.where(step > 0, Q / step, torch.zeros_like(Q))        # in table units
        assert torch.allclose(k.abs(), k.abs().round(), atol=1e-3)
        assert set(k.abs().round().unique().tolist()) <= {0.0, 3.0, 10.0}
        # more than one step per 32 weights where the blocks are 16 (else the variant did nothing)
        if sub == 16:
            assert (step[:, 0::2] != step[:, 1::2]).any()
    assert F.MCN_SUB == 32


def test_tern_is_three_levels_and_restores_the_table():
    W, X = data()
    Q = sa.quantize(W, X, "tern gptq").reshape(W.shape[0], -1, 32)
    for blk in Q.reshape(-1, 32):
        assert len(blk.unique()) <= 3
        assert torch.allclose(blk.max(), -blk.min()) or blk.abs().max() == 0 or len(blk.unique()) < 3
    assert F.MCN_LEVELS[2] == (-10, -3, 3, 10)


def test_variant_restores_globals_after_an_error():
    W, X = data()
    with pytest.raises(ValueError):
        sa.quantize(W, X, "mcn2/b16 nearest")
    assert F.MCN_SUB == 32 and F.MCN_LEVELS[2] == (-10, -3, 3, 10)
    with pytest.raises(ValueError, match="divide"):
        sa.quantize(W, X, "mcn2/b48 gptq")


def test_bits_per_weight():
    assert sa.bpw("mcn2") == F.mcn_spec("mcn2").bpw
    assert sa.bpw("mcn2/b16") == 2.3125 and sa.bpw("mcn2/b64+rot") == 2.125
    assert sa.bpw("tern") == pytest.approx(1.7875)
    assert sa.bpw("iq2_xxs+rot") == 2.0625 and sa.bpw("vq12s32") == 1.6875


def test_mct_rows_are_the_shipped_trellis_quantizers():
    """"mct2 gptq" is PMQ's BlockLDLQ into the trellis, "mct2 rtn" the reference quantizer (through the C library
    here) under the importance diag(H): its bytes are trellis.mct_quantize's, the Python twin."""
    from mcmoe_gguf.quant import trellis as T
    W, X = data(out=4)
    g = GPTQ(W.shape[1])
    g.add_batch(X)
    assert sa.bpw("mct2") == 2.1875 and sa.bpw("mct1") == 1.1875
    assert torch.equal(sa.quantize(W, X, "mct2 gptq"), g.quantize_mct(W, 2).dequantized)
    imp = torch.diag(g.H).float().numpy()
    ref = T.mct_dequantize(T.mct_quantize(W.numpy(), 2, imp), 2, W.shape[1])
    assert np.array_equal(sa.quantize(W, X, "mct2 rtn").numpy(), ref)
