"""Mixed bit widths inside one MoE layer in the patched llama.cpp (mcmoe/runtime/mcmoe-moe.h).

- ggml: mul_mat_id SKIPS ids that are negative or >= n_as (no compute, output row = exact zeros, even
  over a NaN-filled destination) and leaves every other row bit-identical;
- a PMQ file whose layers mix mcq1/mcq2/mcq3 experts (and one layer without any 2-bit expert) gives the
  logits of the torch fake-quant model of the same work directory, for a prefill batch and for
  token-by-token decode (tolerance from the Q8_K activations, checked against a torch model that
  emulates the kernels' roundings too);
- the grouping itself is exact: the mixed file equals its experts re-encoded as mcq3 (same values) in
  stock merged ffn_*_exps tensors; a uniform PMQ file (one group of 8 per projection) equals the same
  bytes in merged tensors; a mixed file whose experts are not contiguous by type (more, smaller groups)
  equals the contiguous one, with mmap and without;
- bad files (missing expert, types that disagree with mcmoe.expert_bits, a wrong expert shape, truncated
  data) are refused with ValueError and a clear message, no crash;
- stock merged-tensor files still load and match a float64 torch forward.
"""
from __future__ import annotations

import ctypes
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mcmoe_gguf.model.arch import mixtral as mx
from mcmoe_gguf.model.checkpoint import Checkpoint
from ggml_harness import GGML_TYPE_F32, GGML_TYPE_I32, TYPE_ID, Ggml, Graph, weights
from micro_model import E, FF, HIDDEN, MIXED_BITS, UNIFORM3, VOCAB, workdir_as_mcq3, workdir_with_bits

GGML_TYPE_Q8_0 = 8


@pytest.fixture(scope="module", autouse=True)
def runtime_has_the_features():
    """A stale or stock build would run the skip tests into undefined behaviour (a crash, not a failure)."""
    from mcmoe_gguf.engine.runtime import REBUILD_HINT, runtime_info
    features = runtime_info().get("features", "").split(",")
    missing = {"mmid-skip", "split-experts"} - set(features)
    if missing:
        pytest.fail(f"the libllama in use lacks {sorted(missing)}; {REBUILD_HINT}")


# ---------------------------------------------------------------- ggml: the skip semantic of mul_mat_id

@pytest.fixture(scope="module")
def ggml():
    return Ggml()


def _weights_blob(ggml, wtype, rows, n, seed):
    w = weights("gaussian", rows, n, seed)
    if wtype == "f32":
        return GGML_TYPE_F32, w
    if wtype == "q8_0":
        t = GGML_TYPE_Q8_0
        out = np.zeros(rows * ggml.base.ggml_row_size(t, n), np.uint8)
        ggml.base.ggml_quantize_chunk(t, w.ctypes.data, out.ctypes.data, 0, rows, n, None)
        return t, out.reshape(rows, -1)
    if not wtype.startswith("mcq"):         # any other ggml type a ladder may choose (i-quants need an imatrix)
        from mcmoe_gguf.base.ggml import ggml as base_ggml
        return base_ggml().type_id(wtype), base_ggml().quantize(w, wtype, np.ones(n, np.float32))
    bits = int(wtype[-1])
    return TYPE_ID[bits], ggml.quantize_chunk(bits, w)


def _mul_mat_id(ggml, wtype, blobs, y, ids, n_threads):
    n_as = len(blobs)
    T, n_used, n = y.shape
    rows = blobs[0].shape[0]
    with Graph(ggml) as g:
        a = g.tensor(wtype, n, rows, n_as, data=np.stack(blobs))
        b = g.tensor(GGML_TYPE_F32, n, n_used, T, data=y)
        i = g.tensor(GGML_TYPE_I32, n_used, T, data=ids)
        out = ggml.base.ggml_mul_mat_id(g.ctx, a, b, i)
        nan = np.full(rows * n_used * T, np.nan, np.float32)           # garbage in dst: skipped rows must not keep it
        ctypes.memmove(ggml.base.ggml_get_data(out), nan.ctypes.data, nan.nbytes)
        return g.compute(out, (T, n_used, rows), n_threads=n_threads)


@pytest.mark.parametrize("wtype", ["f32", "q8_0", "mcq1", "mcq3", "iq1_s", "iq2_xxs", "iq3_xxs", "q2_k", "q4_k"])
@pytest.mark.parametrize("T,n_threads", [(5, 1), (40, 2)])
def test_mul_mat_id_skips_out_of_range_ids(ggml, wtype, T, n_threads):
    n, rows, n_as, n_used = 256, 48, 3, 2
    rng = np.random.default_rng(T)
    blobs = []
    for e in range(n_as):
        t, blob = _weights_blob(ggml, wtype, rows, n, seed=10 * e + 1)
        blobs.append(blob)
    ids = rng.integers(0, n_as, (T, n_used)).astype(np.int32)
    skip = rng.random((T, n_used)) < 0.4
    skip[0] = True                                                     # a token with every slot skipped
    skip[1] = False
    markers = np.array([-1, n_as, 1000, -7, np.iinfo(np.int32).min, np.iinfo(np.int32).max], np.int32)
    ids_skip = np.where(skip, markers[rng.integers(0, len(markers), (T, n_used))], ids).astype(np.int32)
    y = rng.standard_normal((T, n_used, n)).astype(np.float32)

    full = _mul_mat_id(ggml, t, blobs, y, ids, n_threads)
    got = _mul_mat_id(ggml, t, blobs, y, ids_skip, n_threads)
    assert np.isfinite(full).all()
    assert np.array_equal(got[skip].view(np.uint32), np.zeros_like(got[skip]).view(np.uint32)), "skipped rows not +0.0"
    assert np.array_equal(got[~skip], full[~skip]), "rows of kept ids changed"
    # every id skipped: all zeros, and still no NaN from the destination's previous content
    none = _mul_mat_id(ggml, t, blobs, y, np.full((T, n_used), -1, np.int32), n_threads)
    assert np.array_equal(none.view(np.uint32), np.zeros_like(none).view(np.uint32))


def test_mul_mat_id_skip_is_a_real_skip(ggml):
    """A group of experts of which only some are used computes only those: the kept rows are the
    products with the right expert (each expert's weights differ), i.e. ids index the group's slots."""
    n, rows, n_as = 256, 16, 4
    blobs = [ggml.quantize_chunk(2, weights("gaussian", rows, n, seed=40 + e)) for e in range(n_as)]
    y = np.random.default_rng(0).standard_normal((3, 1, n)).astype(np.float32)
    ids = np.array([[2], [-1], [0]], np.int32)
    got = _mul_mat_id(ggml, TYPE_ID[2], blobs, y, ids, 2)
    for t, e in ((0, 2), (2, 0)):
        want = _mul_mat_id(ggml, TYPE_ID[2], [blobs[e]], y[t:t + 1], np.zeros((1, 1), np.int32), 1)
        assert np.array_equal(got[t], want[0])
    assert not got[1].any()


# ---------------------------------------------------------------- the model files

@pytest.fixture(scope="module")
def files(micro):
    return make_files(micro["root"], micro["u2"])


def make_files(root: Path, wd_u2: Path) -> dict:
    """GGUF files: mixed (contiguous by width, as export_pmq writes), mixed in expert-id order (non-contiguous),
    uniform 2 bits per expert, the same bytes in merged ffn_*_exps tensors, uniform 3 bits, and the mixed
    file's experts re-encoded as mcq3 (same values) in merged tensors."""
    from mcmoe_gguf.gguf.export import export_pmq
    wd_mixed = workdir_with_bits(wd_u2, root / "wd-mixed", MIXED_BITS)
    wd_u3 = workdir_with_bits(wd_u2, root / "wd-u3", UNIFORM3)
    wd_as3 = workdir_as_mcq3(wd_mixed, root / "wd-mixed-as3")
    out = {"wd_mixed": wd_mixed, "wd_u3": wd_u3, "wd_u2": wd_u2, "wd_mixed_as3": wd_as3}
    for name, make in (("mixed", lambda f: export_pmq(wd_mixed, f, progress=False)),
                       ("u2", lambda f: export_pmq(wd_u2, f, progress=False)),
                       ("u3", lambda f: export_pmq(wd_u3, f, progress=False)),
                       ("mixed_id_order", lambda f: write_variant(wd_mixed, f, "id_order")),
                       ("u2_merged", lambda f: write_variant(wd_u2, f, "merged")),
                       ("mixed_as3_merged", lambda f: write_variant(wd_as3, f, "merged"))):
        f = root / f"{name}.gguf"
        out[name] = f if f.exists() else make(f)
    return out


def write_variant(workdir: Path, out: Path, kind: str) -> Path:
    """The tensors of export_pmq(workdir), laid out differently: "id_order" writes each projection's experts
    by expert id (widths interleave, so same-type experts are not contiguous); "merged" writes them as one
    3-D ffn_*_exps tensor per projection (all experts must share a type)."""
    import gguf

    from mcmoe_gguf.gguf.export import Planned, add_metadata, add_pmq_metadata, plan_pmq, write_gguf
    from mcmoe_gguf.gguf.types import register
    from mcmoe_gguf.gguf.vocab import add_tokenizer
    register()
    ck = Checkpoint(json.loads((workdir / "manifest.json").read_text())["model_dir"])
    tensors, bits = plan_pmq(ck, workdir)
    experts = {}
    rest = []
    for t in tensors:
        parts = t.name.split(".")
        if len(parts) == 5 and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
            experts.setdefault((int(parts[1]), parts[2]), {})[int(parts[3])] = t
        else:
            rest.append(t)
    new = []
    for t in rest:
        new.append(t)
        if t.name.endswith("ffn_gate_inp.weight"):
            i = int(t.name.split(".")[1])
            for proj in ("ffn_gate", "ffn_up", "ffn_down"):
                by_e = experts[(i, proj)]
                if kind == "id_order":
                    new += [by_e[e] for e in sorted(by_e)]
                else:
                    ts = [by_e[e] for e in sorted(by_e)]
                    assert len({x.qtype for x in ts}) == 1
                    new.append(Planned(f"blk.{i}.{proj}_exps.weight", (len(ts), *ts[0].shape), ts[0].qtype,
                                       lambda ts=ts: np.stack([np.ascontiguousarray(x.load(), np.uint8) for x in ts])))
    w = gguf.GGUFWriter(path=None, arch="llama")
    add_metadata(w, ck, "variant", "f16")
    add_pmq_metadata(w, workdir, bits)
    add_tokenizer(w, ck.dir, ck.hp.vocab_size)
    return write_gguf(w, new, out, progress=False)


# ---------------------------------------------------------------- logits

TOKENS = [int(t) for t in np.random.default_rng(5).integers(3, VOCAB, 40)]


def llama_logits(path: Path, tokens=TOKENS, decode: bool = False, **kw) -> np.ndarray:
    """All positions' logits; prefill = one batch, decode = one token per llama_decode (KV cache)."""
    from mcmoe_gguf.engine.runtime import load
    kw.setdefault("odp", False)     # the quantized model itself (ODP: tests/engine/test_odp.py)
    llm = load(path, n_ctx=128, n_batch=64, n_ubatch=64, logits_all=True, n_threads=2, seed=0, **kw)
    if decode:
        for t in tokens:
            llm.eval([t])
    else:
        llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    del llm
    return out


def q8_K(x: torch.Tensor) -> torch.Tensor:
    """The CPU's Q8_K of x (blocks of 256 along the last axis, ggml's quantize_row_q8_K_ref, float32):
    max = the value of largest magnitude, iscale = -127 / max, q = min(127, round(iscale * x)) (to nearest
    even), d = 1 / iscale. Returns x as q * d; the min term of the mcq vec_dot uses the exact integer sums
    of q (bsums), so nothing else to emulate."""
    b = x.float().reshape(-1, 256)
    idx = b.abs().argmax(-1, keepdim=True)           # first index of the largest |x|, as the C loop's strict >
    mx = torch.gather(b, 1, idx)
    safe = torch.where(mx != 0, mx, torch.ones_like(mx))
    iscale = torch.tensor(-127.0, dtype=torch.float32) / safe
    q = torch.clamp(torch.round(iscale * b), max=127)
    d = torch.where(mx != 0, torch.tensor(1.0, dtype=torch.float32) / iscale, torch.zeros_like(mx))
    return (q * d).reshape(x.shape).to(x.dtype)


def attention_as_llama_cpu(self, x, cos, sin):
    """mx.Attention.forward with llama.cpp's roundings (CPU, no flash attention, F16 KV cache): roped K and
    V are stored as fp16, the KQ matmul reads Q as fp16 (K's vec_dot type), softmax in float, and the KQV
    matmul reads the probabilities as fp16 (V's vec_dot type)."""
    b, t, _ = x.shape
    hp = self.hp
    q = self.q_proj(x).view(b, t, hp.num_attention_heads, hp.d_head).transpose(1, 2)
    k = self.k_proj(x).view(b, t, hp.num_key_value_heads, hp.d_head).transpose(1, 2)
    v = self.v_proj(x).view(b, t, hp.num_key_value_heads, hp.d_head).transpose(1, 2)
    q, k = mx.apply_rope(q, cos, sin), mx.apply_rope(k, cos, sin)
    q, k, v = (z.half().double() for z in (q, k, v))
    rep = hp.num_attention_heads // hp.num_key_value_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hp.d_head)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(scores, -1).half().double() @ v
    return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


def torch_logits(workdir: Path, tokens=TOKENS, emulate: bool = False) -> np.ndarray:
    """Logits of the fake-quant model of the work directory (evaluate.fake_quant_model), in float64.
    emulate=True also applies what the CPU kernels do to activations: every mcq matmul reads its input as
    Q8_K (one fp32 scale per 256, exact integer block sums for the min term), the F16 output
    matmul reads fp16, and attention runs as llama.cpp's CPU graph does it (attention_as_llama_cpu)."""
    from mcmoe_gguf.apps.evaluate import fake_quant_model
    model, _ = fake_quant_model(workdir)
    model = model.double()
    if emulate:
        def mcq_linear(lin, entry):
            lin.register_forward_pre_hook(lambda mod, args: (q8_K(args[0]),))

        for i, layer in enumerate(model.model.layers):
            f = torch.load(Path(workdir) / "layers" / f"layer_{i:02d}.pt")["tensors"]
            att = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                mcq_linear(getattr(att, name), f[f"self_attn.{name}"])
            att.forward = types.MethodType(attention_as_llama_cpu, att)
            for e, ex in enumerate(layer.block_sparse_moe.experts):
                for name in ("w1", "w2", "w3"):
                    mcq_linear(getattr(ex, name), f[f"block_sparse_moe.experts.{e}.{name}"])
        model.lm_head.register_forward_pre_hook(lambda m, args: (args[0].half().double(),))
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0].numpy()


@pytest.fixture(scope="module")
def ref(files):
    out = {k: torch_logits(files[f"wd_{k}"]) for k in ("mixed", "u3", "u2")}
    out["mixed_emulated"] = torch_logits(files["wd_mixed"], emulate=True)
    return out


def per_position(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """per position: max |a - b| relative to the largest |logit| of b there"""
    return np.abs(a - b).max(-1) / np.abs(b).max(-1)


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_mixed_layer_matches_torch_fake_quant(files, ref, decode):
    """Layer 0 mixes mcq1/mcq2/mcq3 experts, layer 1 has no mcq2 group; llama.cpp vs the per-expert torch
    model of the same stored bytes (evaluate.fake_quant_model), 40 tokens as one prefill batch or one
    token per llama_decode.

    Tolerance. llama.cpp is not bit-exact with a float reference: every mcq matmul reads its input as Q8_K
    (8 bits per value, one fp32 scale per 256: ~0.5% relative per matmul), and attention goes through the
    F16 KV cache. Measured here: 0.75% of the largest logit at worst
    (median 0.44%). With those roundings emulated in torch (torch_logits(emulate=True)) the first positions
    agree to ~1e-7; the rest differ by ~0.1-0.3% because 8-bit rounding is discontinuous: a float-level
    difference that moves one activation across a rounding boundary changes it by a whole step, and
    attention spreads that to later positions. Bounds: 2% (plain) and 1% (emulated) of the largest logit,
    the emulated reference closer in median, and both far below what the widths change (the 3-bit model
    differs from this one by ~35% of the largest logit): a wrong expert, group or slot shows at that scale."""
    got = llama_logits(files["mixed"], decode=decode)
    want = ref["mixed"]
    err, err_emul = per_position(got, want), per_position(got, ref["mixed_emulated"])
    width_gap = per_position(ref["u3"], want).max()
    assert err.max() <= 2e-2, f"llama.cpp vs torch fake-quant: {err.max():.2e} of the largest logit"
    assert err_emul.max() <= 1e-2, f"llama.cpp vs torch with the kernels' roundings: {err_emul.max():.2e}"
    assert np.median(err_emul) < np.median(err), (np.median(err_emul), np.median(err))
    assert err.max() <= 0.1 * width_gap, (err.max(), width_gap)
    # the same predictions: top-1 wherever the reference's top-2 margin exceeds the error, top-5 sets overlap
    top_w = np.argsort(-want, -1)
    margin = (np.take_along_axis(want, top_w[:, :2], -1) @ [1, -1]) / np.abs(want).max(-1)
    clear = margin > 2 * err.max()
    assert clear.sum() >= len(TOKENS) // 2
    assert (got.argmax(-1) == want.argmax(-1))[clear].all()
    top5 = [len(set(a[:5]) & set(b[:5])) for a, b in zip(np.argsort(-got, -1), top_w)]
    assert np.mean(top5) >= 4.5, top5


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_mixed_layer_equals_merged_tensor_of_the_same_values(files, decode):
    """The exact check of the grouping: the mixed file's 1- and 2-bit experts re-encoded as mcq3 blocks
    (same d, m and codes: the same dequantized values and the same integer sums in vec_dot), stored as
    stock merged ffn_*_exps tensors, run through the stock MoE path. Per-group mul_mat_id with remapped
    ids, skipped rows as zeros and the sum over groups must give the same logits. (Bit-identical on AVX2;
    the bound allows float reassociation by another vec_dot kernel and is ~1000x below what a swapped
    expert or slot produces.)"""
    a = llama_logits(files["mixed"], decode=decode)
    b = llama_logits(files["mixed_as3_merged"], decode=decode)
    assert per_position(a, b).max() <= 1e-5, per_position(a, b).max()


def test_uniform_file_equals_merged_file_bit_for_bit(files):
    """One group of all 8 experts per projection, zero-copy from the per-expert tensors, computes exactly
    what the stock merged-tensor path computes with the same bytes."""
    a = llama_logits(files["u2"])
    b = llama_logits(files["u2_merged"])
    assert np.array_equal(a, b), f"max diff {np.abs(a - b).max()}"
    assert per_position(a, torch_logits(files["wd_u2"])).max() <= 2e-2


def test_non_contiguous_layout_gives_identical_logits(files):
    """Expert-id order interleaves widths: more, smaller groups (a run per contiguous same-type stretch).
    Each (token, slot) row still comes from one expert plus exact zeros: bit-identical logits. Without
    mmap the groups are read into buffers instead of mapped: identical again."""
    a = llama_logits(files["mixed"])
    b = llama_logits(files["mixed_id_order"])
    assert np.array_equal(a, b), f"max diff {np.abs(a - b).max()}"
    c = llama_logits(files["mixed"], use_mmap=False)
    assert np.array_equal(a, c)
    d = llama_logits(files["mixed"], decode=True)
    e = llama_logits(files["mixed_id_order"], decode=True, use_mmap=False)
    assert np.array_equal(d, e)


# a type ladder's layer: several ggml types (k-quants that the CPU may repack, i-quants) and mcq side by
# side in each projection, groups of 1 to 3 experts; layer 1 one type per projection but expert 0's
LADDER_TYPES = [
    [["q4_k", "q4_k", "q2_k"]] * 3 + [["iq2_xxs", "iq1_s", "iq3_xxs"]] * 2 + [["mcq2", "iq2_xxs", "q4_k"]]
    + [["q2_k", "mcq1", "iq2_xs"]] * 2,
    [["mcq3", "mcq3", "mcq3"]] + [["iq1_m", "iq2_s", "q3_k"]] * 7,
]


@pytest.fixture(scope="module")
def ladder_files(micro):
    from mcmoe_gguf.gguf.export import export_pmq
    from micro_model import workdir_with_types
    wd = workdir_with_types(micro["u2"], micro["root"] / "wd-ladder", LADDER_TYPES)
    return {"wd": wd, "file": export_pmq(wd, micro["root"] / "ladder.gguf", force=True, progress=False),
            "id_order": write_variant(wd, micro["root"] / "ladder-id-order.gguf", "id_order")}


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_ladder_layer_of_any_ggml_types_matches_torch_fake_quant(ladder_files, decode):
    """Groups of llama.cpp's own types (and ours) in one projection: the engine's grouped mul_mat_id
    computes what the stored bytes mean (tolerance as for the mcq layer above: 8-bit activations)."""
    got = llama_logits(ladder_files["file"], decode=decode)
    want = torch_logits(ladder_files["wd"])
    err = per_position(got, want)
    assert err.max() <= 2e-2, f"llama.cpp vs torch fake-quant: {err.max():.2e} of the largest logit"
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_ladder_layer_grouping_is_exact(ladder_files):
    """Expert-id order splits every type into more, smaller groups: each row is still one expert's product
    plus exact zeros, so the logits are bit-identical to the writer's contiguous layout."""
    a = llama_logits(ladder_files["file"])
    b = llama_logits(ladder_files["id_order"])
    assert np.array_equal(a, b), f"max diff {np.abs(a - b).max()}"


def test_layout_of_the_pmq_file(files):
    """The writer puts each width's experts back to back (one group per width present, the loader's
    zero-copy case); layer 1 of the mixed file has no 2-bit expert."""
    import gguf

    from mcmoe_gguf.gguf.types import register
    register()
    rd = gguf.GGUFReader(files["mixed"])
    t = {x.name: x for x in rd.tensors}
    for i, row in enumerate(MIXED_BITS):
        for proj in ("ffn_gate", "ffn_up", "ffn_down"):
            ts = sorted((t[f"blk.{i}.{proj}.{e}.weight"] for e in range(E)), key=lambda x: x.data_offset)
            kinds = [int(x.tensor_type) for x in ts]
            assert kinds == sorted(kinds, reverse=True) and len(set(kinds)) == len(set(row))
            assert all(a.data_offset + a.n_bytes == b.data_offset for a, b in zip(ts, ts[1:]))
    assert 2 not in MIXED_BITS[1] and set(MIXED_BITS[0]) == {1, 2, 3}


# ---------------------------------------------------------------- bad files

LOAD = """
import sys
import mcmoe_gguf
try:
    llm = mcmoe_gguf.load(sys.argv[1], n_ctx=64, verbose=True)
except ValueError as e:
    print("REFUSED:", e)
    sys.exit(0)
llm.eval([5, 6, 7])
print("LOADED")
sys.exit(3)
"""


def run_load(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=300)


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _edit_gguf(path: Path, fn) -> None:
    import gguf

    from mcmoe_gguf.gguf.types import register
    register()
    rd = gguf.GGUFReader(path, "r+")
    fn(rd)
    rd.data.flush()
    del rd


def bad_missing_expert(src, dst):
    data = bytearray(src.read_bytes())
    name = b"blk.1.ffn_up.5.weight"
    at = data.find(name)
    assert at > 0 and data.find(name, at + 1) < 0
    data[at:at + len(name)] = b"blk.1.ffn_up.5.weighx"      # same length: the file stays valid, expert 5 is gone
    dst.write_bytes(bytes(data))
    return dst


def bad_bits_metadata(src, dst):
    def fn(rd):
        f = rd.fields["mcmoe.expert_bits"]
        i = E + 2                                            # layer 1, expert 2: stored as mcq1
        assert f.parts[f.data[i]][0] == MIXED_BITS[1][2] == 1
        f.parts[f.data[i]][0] = 2
    _edit_gguf(_copy(src, dst), fn)
    return dst


def _reshape_down3(src, dst, ne0, ne1):
    def fn(rd):
        t = next(x for x in rd.tensors if x.name == "blk.0.ffn_down.3.weight")
        dims = t.field.parts[3]
        assert list(dims) == [FF, HIDDEN] and ne0 * ne1 == FF * HIDDEN   # same bytes: GGUF offsets stay valid
        dims[0], dims[1] = ne0, ne1
    _edit_gguf(_copy(src, dst), fn)
    return dst


def bad_shape(src, dst):
    return _reshape_down3(src, dst, FF * 2, HIDDEN // 2)


def bad_rows_not_256(src, dst):
    """rows of 128 weights: valid mcq blocks, but the CPU kernels read activations per 256 (Q8_K)"""
    return _reshape_down3(src, dst, FF // 2, HIDDEN * 2)


def bad_truncated(src, dst):
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) - 3000])               # the last tensor (output.weight) loses its end
    return dst


def bad_truncated_in_experts(src, dst):
    import gguf

    from mcmoe_gguf.gguf.types import register
    register()
    rd = gguf.GGUFReader(src)
    t = next(x for x in rd.tensors if x.name == "blk.1.ffn_down.4.weight")
    cut = int(t.data_offset) + int(t.n_bytes) // 2
    del rd
    dst.write_bytes(src.read_bytes()[:cut])
    return dst


BAD = {
    "missing_expert": (bad_missing_expert, "expert tensor 'blk.1.ffn_up.5.weight' is missing"),
    "bits_disagree": (bad_bits_metadata, "disagree with the metadata"),
    "wrong_shape": (bad_shape, "'blk.0.ffn_down.3.weight' has wrong shape"),
    "rows_not_256": (bad_rows_not_256, "has rows of 128 weights; the mcq types need a multiple of 256"),
    "truncated": (bad_truncated, "not within the file bounds"),
    "truncated_in_experts": (bad_truncated_in_experts, "not within the file bounds"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_file_is_refused(files, tmp_path, kind):
    make, message = BAD[kind]
    f = make(files["mixed"], tmp_path / f"{kind}.gguf")
    r = run_load(f)
    assert r.returncode == 0 and "REFUSED" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    assert message in r.stderr, r.stderr[-3000:]


def test_good_file_control(files):
    """The loader script loads and runs the unmodified file (the refusals above are the edits' doing)."""
    r = run_load(files["mixed"])
    assert r.returncode == 3 and "LOADED" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------- stock files

def float64_reference(ck_dir: Path, tokens=TOKENS) -> np.ndarray:
    """The checkpoint's logits in float64 with the project's torch Mixtral (mx.CompactMixtral; transformers'
    grouped expert matmul has no float64 kernel)."""
    ck = Checkpoint(ck_dir)
    model = mx.CompactMixtral(ck.hp)
    model.model.embed_tokens.weight.data.copy_(ck.get(mx.GLOBAL_KEYS["embed"]).float())
    model.model.norm.weight.data.copy_(ck.get(mx.GLOBAL_KEYS["norm"]).float())
    model.lm_head.weight.data.copy_(ck.get(mx.GLOBAL_KEYS["lm_head"]).float())
    for i in range(ck.hp.num_hidden_layers):
        model.model.layers[i] = mx.decoder_layer_from(ck, i)
    with torch.no_grad():
        return model.double().eval()(torch.tensor([tokens]))[0][0].numpy()


@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_stock_merged_f32_file_matches_float64(micro, tmp_path, decode):
    """A stock file (merged ffn_*_exps, F32, `convert --outtype f32`) still loads and runs through the stock
    path: float32 weights, so the only roundings are float32 arithmetic and the F16 KV cache (measured
    ~4e-4 of the largest logit)."""
    from mcmoe_gguf.gguf.export import convert
    f = convert(micro["ck"], tmp_path / "stock-f32.gguf", outtype="f32", progress=False)
    got = llama_logits(f, decode=decode)
    want = float64_reference(micro["ck"])
    assert per_position(got, want).max() <= 2e-3, per_position(got, want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
