"""The MCMOE_HOST_DEVICE helpers of the ODP op (cpp/ggml/mcmoe-odp.h), run on the host.

The CPU op (cpp/ggml-cpu/mcmoe-odp-cpu.c) and the CUDA kernel (cpp/ggml-cuda/mcmoe-odp.cu) both do the
per-token work with mcmoe_odp_rank + mcmoe_odp_token only. Here:
- a C shim doing exactly the kernel's per-token loop (rank, rule, flags, pruned / protected counts) is
  compiled with gcc against the header alone (a stub ggml.h: the helpers need nothing of ggml) and compared
  with the rule written independently in numpy (docs/FORMAT.md), ties and mu = 0 included;
- the header is also valid C++ with the CUDA macro path on (g++, __host__ / __device__ defined away), and,
  when nvcc exists, a __global__ kernel calling the helpers compiles with nvcc -Werror (nvcc -c, no GPU);
- the CUDA kernel source really calls these helpers (no private copy of the rule).
The op itself through a ggml graph (CPU) and the engine are tested in tests/engine/test_odp.py.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from odp_reference import routing_case, rule_numpy

REPO = Path(__file__).resolve().parents[2]
HEADER_DIR = REPO / "cpp" / "ggml"

STUB_GGML = """
#pragma once
/* test stub: mcmoe-odp.h needs ggml.h only for the graph constructor's declaration */
#define GGML_API
struct ggml_context;
struct ggml_tensor;
"""

SHIM = r"""
#include "mcmoe-odp.h"

#include <stddef.h>

int h_rank(const float * imp, int n, int j) { return mcmoe_odp_rank(imp, n, j); }
int h_n_protect(double ratio, int n) { return mcmoe_odp_n_protect(ratio, n); }

// the CUDA kernel's work, token by token (k_mcmoe_odp in cpp/ggml-cuda/mcmoe-odp.cu)
void h_batch(const int32_t * ids, const float * w, const float * imp, int k, int n, float mu, int n_protect,
             int32_t marker, int32_t * ids_out, float * w_out, uint8_t * flags, int * counts) {
    counts[0] = counts[1] = 0;
    for (int t = 0; t < n; ++t) {
        const bool prot = imp != NULL && n_protect > 0 && mcmoe_odp_rank(imp, n, t) < n_protect;
        int n_pruned = 0;
        flags[t] = (uint8_t) mcmoe_odp_token(ids + t*k, w + t*k, k, mu, prot, marker,
                                             ids_out + t*k, w_out + t*k, &n_pruned);
        counts[0] += n_pruned;
        counts[1] += prot;
    }
}
"""

KERNEL_CU = r"""
#include "mcmoe-odp.h"

__global__ void k_probe(const int32_t * ids, const float * w, const float * imp, int k, int n,
                        mcmoe_odp_params p, int32_t * ids_out, float * w_out, int * flags) {
    const int t = blockIdx.x*blockDim.x + threadIdx.x;
    if (t < n && k <= 16) {
        const bool prot = mcmoe_odp_rank(imp, n, t) < p.n_protect;
        int n_pruned = 0;
        int32_t it[16];
        float   wt[16];
        flags[t] = mcmoe_odp_token(ids + t*k, w + t*k, k, p.mu, prot, p.marker, it, wt, &n_pruned);
        for (int s = 0; s < k; ++s) {
            ids_out[t*k + s] = it[s];
            w_out[t*k + s]   = wt[s];
        }
    }
}
"""

FLAG_RULE, FLAG_PROTECTED, FLAG_PRUNED = 1, 2, 4
WARN = ["-Wall", "-Wextra", "-Werror"]


@pytest.fixture(scope="module")
def stub_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("odp-stub")
    (d / "ggml.h").write_text(STUB_GGML)
    return d


@pytest.fixture(scope="module")
def lib(stub_dir, tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    d = tmp_path_factory.mktemp("odp-hd")
    src = d / "shim.c"
    src.write_text(SHIM)
    so = d / "libshim.so"
    inc = ["-I", str(HEADER_DIR), "-I", str(stub_dir)]
    subprocess.run(["gcc", "-std=c11", "-O2", "-shared", "-fPIC", *WARN, *inc, str(src), "-o", str(so)], check=True)
    L = ctypes.CDLL(str(so))
    P = ctypes.c_void_p
    L.h_rank.argtypes = [P, ctypes.c_int, ctypes.c_int]
    L.h_n_protect.argtypes = [ctypes.c_double, ctypes.c_int]
    L.h_batch.argtypes = [P, P, P, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_int32,
                          P, P, P, P]
    return L


def ptr(a):
    if a is None:
        return None
    assert a.flags.c_contiguous
    return a.ctypes.data_as(ctypes.c_void_p)


def run_batch(lib, ids, w, imp, mu, n_protect, marker):
    T, k = ids.shape
    ids_o = np.zeros_like(ids)
    w_o = np.zeros_like(w)
    flags = np.zeros(T, np.uint8)
    counts = np.zeros(2, np.int32)
    lib.h_batch(ptr(ids), ptr(w), ptr(imp), k, T, mu, n_protect, marker, ptr(ids_o), ptr(w_o), ptr(flags), ptr(counts))
    return ids_o, w_o, flags, counts


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("case", ["random", "ties", "mu0", "protect_all", "no_importance"])
def test_kernel_loop_equals_the_rule(lib, k, case):
    n_expert = 8
    ids, w, imp, mu, n_protect = routing_case(k, case, T=300, n_expert=n_expert, seed=100 * k + len(case))
    ids_o, w_o, flags, counts = run_batch(lib, ids, w, imp, mu, n_protect, n_expert)
    ids_w, w_w, prot, rule = rule_numpy(ids, w, imp, mu, n_protect, n_expert)
    assert np.array_equal(ids_o, ids_w)
    np.testing.assert_allclose(w_o, w_w, rtol=1e-6, atol=0)
    pruned = ids_o == n_expert
    assert np.array_equal(flags & FLAG_PROTECTED != 0, prot)
    assert np.array_equal(flags & FLAG_RULE != 0, rule)
    assert np.array_equal(flags & FLAG_PRUNED != 0, pruned.any(1))
    assert counts.tolist() == [int(pruned.sum()), int(prot.sum())]
    # a token with nothing pruned keeps its ids and weights bit for bit (mu = 0 is ODP off)
    keep = ~pruned.any(1)
    assert np.array_equal(w_o[keep].view(np.uint32), w[keep].view(np.uint32))
    if case in ("mu0", "protect_all") or k == 1:
        assert not pruned.any()
    if k == 2 and case == "random":
        assert pruned.any() and np.all(w_o[pruned.any(1)].sum(1) == w[pruned.any(1)].sum(1))  # w0 -> w0 + w1


def test_rank_ties_to_the_lower_index(lib):
    imp = np.array([1.0, 3.0, 3.0, -2.0, 1.0, 3.0], np.float32)
    got = [lib.h_rank(ptr(imp), len(imp), j) for j in range(len(imp))]
    assert got == [3, 0, 1, 5, 4, 2]
    assert lib.h_n_protect(0.02, 100) == 2 and lib.h_n_protect(0.02, 1) == 0


def test_header_is_cplusplus_with_the_cuda_macro(stub_dir, tmp_path):
    """nvcc's host pass sees the header as C++ with __CUDACC__ defined (MCMOE_HOST_DEVICE = __host__
    __device__): with g++, defining the two qualifiers away."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    src = tmp_path / "shim.cpp"
    src.write_text(SHIM)
    inc = ["-I", str(HEADER_DIR), "-I", str(stub_dir)]
    for cuda in ([], ["-D__CUDACC__", "-D__host__=", "-D__device__="]):
        subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-x", "c++", *WARN, *cuda, *inc, str(src)], check=True)


def test_helpers_compile_in_a_cuda_kernel(stub_dir, tmp_path):
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = tmp_path / "probe.cu"
    src.write_text(KERNEL_CU)
    cmd = ["nice", "-n", "10", nvcc, "-c", "-std=c++17", "--generate-code=arch=compute_86,code=sm_86",
           "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra", "-I", str(HEADER_DIR), "-I", str(stub_dir),
           str(src), "-o", str(tmp_path / "probe.o")]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
