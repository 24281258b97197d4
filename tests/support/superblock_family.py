"""The two families of our super-block types, as the kernel tests see them: mcn (a 4-level / 8-level table per
weight) and mct (a trellis state per weight). Both store fp16 d and eight 4-bit slice scales per 256 weights, and
every backend computes d * d_y * sum_j s_j * sum_{n in slice j} L_n * q_n with L_n the weight's integer level; only
how L_n comes out of the bytes differs. A Family bundles what a test needs to check a type of either: its Python
twin (pack, unpack, dequantize, the integer levels), its ctypes entry points, and its test-data generators."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from mcmoe_gguf.quant import formats as F
from mcmoe_gguf.quant import trellis as TR
from ggml_harness import FROM_FLOAT, QK_K, TO_FLOAT, Ggml
from test_ggml_types import parse_q8_K


def rows_of(kind: str, rows: int, n: int, seed: int) -> np.ndarray:
    """Test rows: "gaussian", "heavy" (Student t, 2 dof) or "edge" (degenerate blocks: all zero, constant, one
    huge outlier, fp16-subnormal super-scale, exact midpoints, d near the fp16 range)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    if kind == "heavy":
        w = (rng.standard_t(2, (rows, n)) * 0.01).astype(np.float32)
    elif kind == "edge":
        b = w.reshape(rows, -1, 32)
        b[0, 0] = 0.0                                   # an all-zero slice in a live block
        w[1, :256] = 0.0                                # an all-zero block: d = 0
        w[2, :256] = -0.75                              # constant block
        w[3, :256] = rng.standard_normal(256) * 1e-7    # fp16-subnormal super-scale
        w[0, min(300, n - 5)] = 40.0                     # one huge outlier: its slice's scale dominates d
        b[4 % rows, 1] = np.linspace(-1, 1, 32)         # exact midpoints
        w[5 % rows, n - 256:] = rng.uniform(-60000, 60000, 256)  # d near the fp16 range
    return w


def _mcn_levels(q: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    return (np.array(F.MCN_LEVELS[bits], np.int64)[q] * np.repeat(s.astype(np.int64), 32, 1))


@dataclass(frozen=True)
class Family:
    prefix: str                                     # "mcn" / "mct": the C entry points' prefix
    specs: dict                                     # name -> formats.BlockSpec
    pack: Callable                                  # (codes, d, s, bits) -> blob
    unpack: Callable                                # (blob, bits, n) -> (codes, d, s)
    dequantize: Callable                            # (blob, bits, n) -> float32, bit-exact
    quantize: Callable                              # (w, bits, importance) -> blob: the C reference's bytes
    levels: Callable                                # (codes, s, bits) -> int64 s_j * L_n per weight
    simd: Callable                                  # CPU features -> the name <prefix>_cpu_simd() must report
    simd_bit_exact: bool                            # the SIMD kernel adds the blocks in the reference's order

    def names(self) -> tuple[str, ...]:
        return tuple(self.specs)

    def setup(self, g: Ggml) -> Ggml:
        """Declare the family's ctypes signatures on g (fails with a rebuild hint on a runtime without them)."""
        p = self.prefix
        for lib, fn in ((g.base, f"{p}_info"), (g.cpu, f"{p}_vec_dot"), (g.cpu, f"{p}_vec_dot_ref")):
            if not hasattr(lib, fn):
                pytest.fail(f"{lib._name} has no {fn}(): a ggml without the {p} types; rebuild the runtime (make runtime)")
        getattr(g.base, f"{p}_info").restype = ctypes.c_char_p
        for fn in (getattr(g.cpu, f"{p}_vec_dot"), getattr(g.cpu, f"{p}_vec_dot_ref")):
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = ctypes.c_float
        getattr(g.cpu, f"{p}_cpu_simd").restype = ctypes.c_char_p
        return g

    def info(self, g: Ggml) -> str:
        return getattr(g.base, f"{self.prefix}_info")().decode()

    def cpu_simd(self, g: Ggml) -> str:
        return getattr(g.cpu, f"{self.prefix}_cpu_simd")().decode()

    def vec_dot(self, g: Ggml, name: str, n: int, x: np.ndarray, qy: np.ndarray, ref: bool = False) -> float:
        fn = getattr(g.cpu, f"{self.prefix}_vec_dot_ref" if ref else f"{self.prefix}_vec_dot")
        return fn(self.specs[name].type_id, n, x.ctypes.data, qy.ctypes.data)

    def c_quantize(self, g: Ggml, name: str, w: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
        """ggml_quantize_chunk (the C reference quantizer), imp as the imatrix."""
        tid = self.specs[name].type_id
        w = np.ascontiguousarray(w, np.float32)
        rows, n = w.shape
        out = np.zeros(rows * g.base.ggml_row_size(tid, n), np.uint8)
        imp = None if imp is None else np.ascontiguousarray(imp, np.float32)
        size = g.base.ggml_quantize_chunk(tid, w.ctypes.data, out.ctypes.data, 0, rows, n,
                                          None if imp is None else imp.ctypes.data)
        assert size == out.size
        return out.reshape(rows, -1)

    def c_dequantize(self, g: Ggml, name: str, blob: np.ndarray, n: int) -> np.ndarray:
        """The type's to_float."""
        blob = np.ascontiguousarray(blob, np.uint8)
        out = np.empty(blob.size // self.specs[name].block_bytes * QK_K, np.float32)
        TO_FLOAT(g.traits(self.specs[name].type_id).to_float)(blob.ctypes.data, out.ctypes.data, out.size)
        return out.reshape(-1, n)

    def quantize_checked(self, g: Ggml, name: str, w: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
        """The C reference quantizer's bytes for w, asserted equal to the Python twin's (and, without importance, to
        the type's from_float_ref), and their C dequantization, asserted bit-equal to the twin's: returns that."""
        spec = self.specs[name]
        got = self.c_quantize(g, name, w, imp)
        want = self.quantize(w, spec.bits, imp)
        if not np.array_equal(got, want):
            i = int(np.flatnonzero(got.reshape(-1) != want.reshape(-1))[0])
            pytest.fail(f"{int((got != want).sum())} bytes differ, first in block {i // spec.block_bytes} "
                        f"byte {i % spec.block_bytes}")
        if imp is None:   # the type's from_float_ref is the same quantizer without importance
            ref = np.zeros_like(got)
            FROM_FLOAT(g.traits(spec.type_id).from_float_ref)(np.ascontiguousarray(w).ctypes.data, ref.ctypes.data,
                                                              w.size)
            assert np.array_equal(ref, got)
        deq = self.c_dequantize(g, name, got, w.shape[1])
        assert np.array_equal(deq.view(np.uint32), self.dequantize(got, spec.bits, w.shape[1]).view(np.uint32))
        return deq

    def random_blob(self, name: str, rows: int, n: int, seed: int) -> np.ndarray:
        """Arbitrary codes and scales (every code and scale value occurs), finite fp16 d."""
        rng = np.random.default_rng(seed)
        bits = self.specs[name].bits
        q = rng.integers(0, 2 ** bits, (rows, n))
        s = rng.integers(0, 16, (rows, n // 32))
        d = (rng.standard_normal((rows, n // 256)) * 0.01).astype(np.float16).astype(np.float32)
        return self.pack(q, d, s, bits)

    def kernel_sum(self, blob: np.ndarray, name: str, n: int, qy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float64 value of sum_blocks d d_y sum_j s_j sum L q_y for every (row, Q8_K column), and the sum of the
        absolute values of its slice terms (kernels may add those in another order)."""
        bits = self.specs[name].bits
        q, d, s = self.unpack(blob, bits, n)
        dy, qv, _ = parse_q8_K(qy)
        R, T, J = q.shape[0], qy.shape[0], n // 32
        iv = self.levels(q, s, bits).reshape(R, J, 32)
        isum = np.einsum("rji,tji->rtj", iv, qv.reshape(T, J, 32).astype(np.int64))
        terms = np.repeat(d.astype(np.float64), 8, 1)[:, None, :] * np.repeat(dy, 8, 1)[None, :, :] * isum
        return terms.sum(-1), np.abs(terms).sum(-1)


MCN = Family("mcn", F.MCN_TYPES, F.mcn_pack, F.mcn_unpack, F.mcn_dequantize, F.mcn_quantize, _mcn_levels,
             lambda f: "avx512-vnni" if {"AVX512", "AVX512_VNNI"} <= f else "avx2" if "AVX2" in f else "scalar",
             simd_bit_exact=False)
MCT = Family("mct", F.MCT_TYPES, TR.mct_pack, TR.mct_unpack, TR.mct_dequantize, TR.mct_quantize, TR._integer_values,
             lambda f: "avx512" if "AVX512" in f else "avx2" if "AVX2" in f else "scalar",
             simd_bit_exact=True)
FAMILIES = {"mcn": MCN, "mct": MCT}


def family_of(name: str) -> Family:
    return next(f for f in FAMILIES.values() if name in f.specs)


ALL_NAMES = tuple(n for f in FAMILIES.values() for n in f.names())
