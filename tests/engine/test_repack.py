"""Per-expert groups in ggml's CPU_REPACK buffers (cpp/runtime/mcmoe-moe.cpp, mcmoe_buft_probe).

ggml-cpu rewrites Q4_K (AVX2) and Q2_K (AVX-512) mul_mat_id weights into row-interleaved blocks at load,
which decodes ~1.3-1.6x faster on a Mixtral-sized model; it takes only 3-D weights, so our groups, 2-D
tensors in the file, are offered to it as the 3-D groups they become. The reference is the same file
loaded with the extra buffer types off (ggml's plain vec_dot path, itself checked against the scalar
twins elsewhere): logits must agree, with ODP pruning (skipped ids) in the repacked layer too, and a
group of a single expert (2-D at run time, which CPU_REPACK cannot run) must stay out of it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import small_config
from mcmoe_gguf.engine.cpu_variant import cpu_flags

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import mixtral_shaped as ms  # noqa: E402

from mcmoe_gguf.model.arch import mixtral as mx  # noqa: E402

RUN = """
import json, sys, numpy as np
import llama_cpp.llama_cpp as L
_default = L.llama_model_default_params
def params():
    p = _default()
    p.use_extra_bufts = bool(int(sys.argv[2]))
    return p
L.llama_model_default_params = params          # llama_cpp.Llama has no argument for it
import mcmoe_gguf
odp = bool(int(sys.argv[3]))
kw = dict(odp=True, mu=0.9, protect=0.0) if odp else dict(odp=False)
llm = mcmoe_gguf.load(sys.argv[1], n_ctx=64, n_batch=32, n_ubatch=32, logits_all=True, verbose=True, seed=0,
                      n_threads=2, **kw)
mcmoe_gguf.odp_reset()
llm.eval(list(range(5, 21)))                    # a 16-token batch (ggml's GEMM path) ...
for t in (30, 31, 32):                           # ... and single tokens (its GEMV path)
    llm.eval([t])
np.save(sys.argv[4], np.array(llm.scores[:llm.n_tokens], dtype=np.float32))
print("ODP", json.dumps([[s.layer, s.pruned, s.slots] for s in mcmoe_gguf.odp_stats(llm)]))
"""


def run(path: Path, extra: bool, odp: bool, tmp_path: Path) -> tuple[np.ndarray, str, list]:
    out = tmp_path / f"{path.stem}-{int(extra)}{int(odp)}.npy"
    r = subprocess.run([sys.executable, "-c", RUN, str(path), str(int(extra)), str(int(odp)), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"
    stats = json.loads(r.stdout.split("ODP", 1)[1])
    return np.load(out), r.stderr, stats


@pytest.fixture(scope="module")
def grouped(pmq_file, tmp_path_factory):
    """The micro PMQ file with layer 1's experts retyped (file order kept): gate all Q4_K (one group of 8),
    up's first three Q4_K (a group of 3 beside the mcq groups), down's first Q4_K alone (a group of one)
    and its next two Q2_K (a group of 2)."""
    import gguf
    names = [t.name for t in gguf.GGUFReader(pmq_file).tensors]
    order = {p: [n for n in names if n.startswith(f"blk.1.ffn_{p}.")] for p in ("gate", "up", "down")}
    q4k, q2k = int(gguf.GGMLQuantizationType.Q4_K), int(gguf.GGMLQuantizationType.Q2_K)
    new = {**{n: q4k for n in order["gate"]}, **{n: q4k for n in order["up"][:3]}, order["down"][0]: q4k,
           **{n: q2k for n in order["down"][1:3]}}
    hp = mx.MixtralHParams.from_config(small_config(n_layers=2, hidden=256, ff=256, vocab=512))
    out = tmp_path_factory.mktemp("repack") / "grouped.gguf"
    return ms.mirror(pmq_file, out, hp, rows_per_type=64, retype=lambda n, t: new.get(n, t))


def groups_of(log: str, layer: int) -> str:
    return " ".join(line.rsplit("groups:", 1)[1].strip() for line in log.splitlines()
                    if f"layer {layer} " in line and "groups:" in line)


@pytest.mark.parametrize("odp", [False, True], ids=["all-experts", "odp-skips"])
def test_repacked_groups_give_the_plain_path_s_logits(grouped, tmp_path, odp):
    plain, log_plain, stats_plain = run(grouped, extra=False, odp=odp, tmp_path=tmp_path)
    packed, log, stats = run(grouped, extra=True, odp=odp, tmp_path=tmp_path)
    assert "q4_K x8" in groups_of(log, 1) and "q4_K x3" in groups_of(log, 1) and "q2_K x2" in groups_of(log, 1)
    assert "q4_K x1" in groups_of(log, 1)
    assert "CPU_REPACK" not in log_plain
    if "avx2" in cpu_flags():
        # the groups of >= 2 Q4_K experts are repacked (8 + 3 experts of 256 rows), with AVX-512 the Q2_K pair too
        from mcmoe_gguf.base.ggml import ggml
        line = next(ln for ln in log.splitlines() if "CPU_REPACK model buffer size" in ln)
        mib = float(line.split("=")[1].split()[0])
        want = ((8 + 3) * 256 * ggml().row_bytes("q4_k", 256)
                + (2 * 256 * ggml().row_bytes("q2_k", 256) if "avx512f" in cpu_flags() else 0)) / 2**20
        assert mib >= want - 0.01, line
    assert np.isfinite(packed).all()
    scale = float(np.abs(plain).max())
    np.testing.assert_allclose(packed, plain, rtol=0, atol=1e-3 * scale)
    if odp:
        assert stats == stats_plain
        pruned_l1 = [p for layer, p, _ in stats if layer == 1]
        assert pruned_l1 and pruned_l1[0] > 0, stats       # skipped ids did reach the repacked layer
