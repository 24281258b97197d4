"""ctypes access to the runtime's libggml (base + the CPU backend, any CPU variant): the mcq types'
traits and kernels, and small CPU graphs. Shared by the tests of the types, mixed MoE layers and ODP."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from mcmoe_gguf.quant import formats as F
from mcmoe_gguf.engine.runtime import REBUILD_HINT, lib_path

BITS = (1, 2, 3, 4)
TYPE_ID = {b: F.TYPES[b].type_id for b in BITS}
GGML_TYPE_F32, GGML_TYPE_I32, GGML_TYPE_Q8_K = 0, 26, 15
GGML_TYPE_Q4_K, GGML_TYPE_Q6_K = 12, 14
QK_K = 256
Q8_K_BYTES = 4 + QK_K + QK_K // 16 * 2       # fp32 d, 256 int8, 16 int16 sums


# ---------------------------------------------------------------- the libraries, through ctypes

class TypeTraits(ctypes.Structure):     # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


class CpuTraits(ctypes.Structure):      # struct ggml_type_traits_cpu (ggml-cpu.h)
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


class InitParams(ctypes.Structure):     # struct ggml_init_params
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def _open(d: Path, stem: str, mode: int = ctypes.RTLD_GLOBAL) -> ctypes.CDLL:
    cands = sorted(d.glob(f"{stem}.so*")) or sorted(d.glob(f"{stem}*.dll"))
    if not cands:
        pytest.fail(f"no {stem} next to {d / 'libllama.so'}; {REBUILD_HINT}")
    return ctypes.CDLL(str(cands[0]), mode=mode)


def cpu_variants() -> list[str]:
    """The CPU backend modules of the runtime that this CPU can run (the portable build has one per ISA
    level); tests of the kernels run on each, so the AVX2 and scalar paths are both checked on any x86."""
    from mcmoe_gguf.engine.cpu_variant import runnable_variants
    return runnable_variants() if list(lib_path().parent.glob("libggml-cpu-*.so")) else [None]


class Ggml:
    def __init__(self, variant: str | None = None):
        """ggml-base and one CPU backend: `variant` (libggml-cpu-<variant>.so, opened privately so several
        can live in one process), by default the one ggml itself picks for this CPU."""
        from mcmoe_gguf.engine.cpu_variant import expected_variant
        d = lib_path().parent
        self.dir = d
        self.base = _open(d, "libggml-base")
        if list(d.glob("libggml-cpu-*.so")):
            self.variant = variant or expected_variant()
            self.cpu = _open(d, f"libggml-cpu-{self.variant}", mode=ctypes.RTLD_LOCAL)
        else:
            self.variant = None
            self.cpu = _open(d, "libggml-cpu")
        for lib, fn in ((self.base, "mcq_info"), (self.base, "mcq_quantize_row"), (self.cpu, "mcq_vec_dot"),
                        (self.cpu, "mcq_vec_dot_ref")):
            if not hasattr(lib, fn):
                pytest.fail(f"{lib._name} has no {fn}(): a stock or stale ggml without the mcq types; {REBUILD_HINT}")
        b, c = self.base, self.cpu
        b.mcq_info.restype = ctypes.c_char_p
        b.ggml_get_type_traits.argtypes = [ctypes.c_int]
        b.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
        b.ggml_type_name.argtypes = [ctypes.c_int]
        b.ggml_type_name.restype = ctypes.c_char_p
        b.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        b.ggml_row_size.restype = ctypes.c_size_t
        b.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        b.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        b.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                          ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        b.ggml_quantize_chunk.restype = ctypes.c_size_t
        b.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        b.ggml_validate_row_data.restype = ctypes.c_bool
        b.mcq_quantize_row.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        b.mcq_quantize_row.restype = None
        c.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        c.ggml_get_type_traits_cpu.restype = ctypes.POINTER(CpuTraits)
        for fn in (c.mcq_vec_dot, c.mcq_vec_dot_ref):
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = ctypes.c_float
        c.mcq_cpu_simd.restype = ctypes.c_char_p
        for fn in (c.mcq_gemm_tile, c.mcq_gemm_tile_ref):
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p,
                           ctypes.c_int, ctypes.c_void_p]
        c.mcq_gemm_tile.restype = ctypes.c_bool
        c.mcq_gemm_tile_ref.restype = None
        c.mcq_cpu_has_tile.argtypes = [ctypes.c_int]
        c.mcq_cpu_has_tile.restype = ctypes.c_bool
        c.ggml_cpu_init.restype = None
        c.ggml_cpu_init()
        # graph API
        vp, i64 = ctypes.c_void_p, ctypes.c_int64
        b.ggml_init.argtypes = [InitParams]
        b.ggml_init.restype = vp
        b.ggml_free.argtypes = [vp]
        b.ggml_new_tensor_2d.argtypes = [vp, ctypes.c_int, i64, i64]
        b.ggml_new_tensor_3d.argtypes = [vp, ctypes.c_int, i64, i64, i64]
        b.ggml_new_tensor_2d.restype = b.ggml_new_tensor_3d.restype = vp
        b.ggml_get_data.argtypes = [vp]
        b.ggml_get_data.restype = vp
        b.ggml_nbytes.argtypes = [vp]
        b.ggml_nbytes.restype = ctypes.c_size_t
        for fn in ("ggml_mul_mat", "ggml_get_rows"):
            getattr(b, fn).argtypes = [vp, vp, vp]
            getattr(b, fn).restype = vp
        b.ggml_mul_mat_id.argtypes = [vp, vp, vp, vp]
        b.ggml_mul_mat_id.restype = vp
        b.ggml_new_graph.argtypes = [vp]
        b.ggml_new_graph.restype = vp
        b.ggml_build_forward_expand.argtypes = [vp, vp]
        c.ggml_graph_compute_with_ctx.argtypes = [vp, vp, ctypes.c_int]
        c.ggml_graph_compute_with_ctx.restype = ctypes.c_int

    # -- helpers on numpy arrays
    def traits(self, t: int) -> TypeTraits:
        return self.base.ggml_get_type_traits(t).contents

    def quantize_chunk(self, bits: int, w: np.ndarray) -> np.ndarray:
        w = np.ascontiguousarray(w, np.float32)
        rows, n = w.shape
        out = np.zeros(rows * self.base.ggml_row_size(TYPE_ID[bits], n), np.uint8)
        size = self.base.ggml_quantize_chunk(TYPE_ID[bits], w.ctypes.data, out.ctypes.data, 0, rows, n, None)
        assert size == out.size
        return out.reshape(rows, -1)

    def quantize_row(self, bits: int, w: np.ndarray, method: str) -> np.ndarray:
        w = np.ascontiguousarray(w, np.float32)
        out = np.zeros(w.shape[0] * self.base.ggml_row_size(TYPE_ID[bits], w.shape[1]), np.uint8).reshape(w.shape[0], -1)
        for r in range(w.shape[0]):
            self.base.mcq_quantize_row(TYPE_ID[bits], w[r].ctypes.data, out[r].ctypes.data, w.shape[1],
                                       {"minmax": 0, "mse": 1}[method])
        return out

    def from_float_ref(self, bits: int, w: np.ndarray) -> np.ndarray:
        w = np.ascontiguousarray(w, np.float32)
        out = np.zeros(w.size // 128 * F.block_bytes(bits), np.uint8)
        FROM_FLOAT(self.traits(TYPE_ID[bits]).from_float_ref)(w.ctypes.data, out.ctypes.data, w.size)
        return out.reshape(w.shape[0], -1)

    def to_float(self, bits: int, blob: np.ndarray, n: int) -> np.ndarray:
        blob = np.ascontiguousarray(blob, np.uint8)
        out = np.empty(blob.size // F.block_bytes(bits) * 128, np.float32)
        TO_FLOAT(self.traits(TYPE_ID[bits]).to_float)(blob.ctypes.data, out.ctypes.data, out.size)
        return out.reshape(-1, n)

    def q8_K(self, y: np.ndarray) -> np.ndarray:
        """Activations [T, n] -> Q8_K bytes [T, n/256*292], with the CPU backend's own quantizer."""
        y = np.ascontiguousarray(y, np.float32)
        out = np.zeros(y.size // QK_K * Q8_K_BYTES, np.uint8)
        FROM_FLOAT(self.cpu.ggml_get_type_traits_cpu(GGML_TYPE_Q8_K).contents.from_float)(
            y.ctypes.data, out.ctypes.data, y.size)
        return out.reshape(y.shape[0], -1)


# ---------------------------------------------------------------- data

def weights(kind: str, rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
    if kind == "heavy":        # Student-t with 2 degrees of freedom: outliers set the range of many blocks
        return (rng.standard_t(2, (rows, n)) * 0.01).astype(np.float32)
    if kind == "edge":         # blocks that hit the corner cases of the grid
        w = (rng.standard_normal((rows, n)) * 0.02).astype(np.float32)
        b = w.reshape(rows, -1, 128)
        b[0, 0] = 0.0                                    # all zero: d = 0, m = 0
        b[0, 1] = -0.75                                  # constant: d = 0, m = value
        b[1, 0] = rng.standard_normal(128) * 1e-6       # fp16 subnormal d and m
        b[1, 1] = rng.uniform(-65504, 65504, 128)       # 1 bit: d = max - min saturates at 65504
        b[1, 1, :2] = (-65504, 65504)
        b[2, 0] = np.where(rng.random(128) < 0.5, 0.25, -0.25)     # two values: ties on the grid
        b[2, 1] = np.linspace(-1, 1, 128)                # exact midpoints for rint's ties-to-even
        b[3, 0] = np.abs(b[3, 0]) + 3.0                  # positive only
        b[3, 1, 5] = 40.0                                # one huge outlier
        return w
    raise ValueError(kind)


KINDS = ("gaussian", "heavy", "edge")


class Graph:
    def __init__(self, ggml: Ggml, mem: int = 64 << 20):
        self.g = ggml
        self.ctx = ggml.base.ggml_init(InitParams(mem, None, False))
        assert self.ctx

    def tensor(self, type_: int, *ne, data: np.ndarray | None = None):
        b = self.g.base
        t = (b.ggml_new_tensor_2d if len(ne) == 2 else b.ggml_new_tensor_3d)(self.ctx, type_, *ne)
        if data is not None:
            data = np.ascontiguousarray(data)
            assert data.nbytes == b.ggml_nbytes(t)
            ctypes.memmove(b.ggml_get_data(t), data.ctypes.data, data.nbytes)
        return t

    def compute(self, out, shape, n_threads: int = 2) -> np.ndarray:
        b = self.g.base
        gf = b.ggml_new_graph(self.ctx)
        b.ggml_build_forward_expand(gf, out)
        assert self.g.cpu.ggml_graph_compute_with_ctx(self.ctx, gf, n_threads) == 0
        res = np.empty(shape, np.float32)
        assert res.nbytes == b.ggml_nbytes(out)
        ctypes.memmove(res.ctypes.data, b.ggml_get_data(out), res.nbytes)
        return res

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.g.base.ggml_free(self.ctx)
