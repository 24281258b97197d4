// mcmoe-gguf: CPU kernels of the mcn types (ggml-cpu backend), see ../ggml/mcn.h and docs/FORMAT.md.
//
// vec_dot against GGML_TYPE_Q8_K activations (256 int8 codes qy with one fp32 scale d_y): one mcn block is
// one Q8_K block, and
//     sum_n x_n y_n = d * d_y * sum_j s_j * sum_{n in j} T[q_n] qy_n,
// all integer but the last two products. The SIMD kernels look T up with a byte shuffle and compute the
// same integer sum per block, so they differ from the scalar reference only in the float additions.
#pragma once

#include "mcn.h"
#include "ggml-cpu.h"

#ifdef __cplusplus
extern "C" {
#endif

void ggml_vec_dot_mcn2_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcn3_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// the scalar reference of `type` (NULL for other types): the CPU backend in reference mode uses it
ggml_vec_dot_t mcn_cpu_generic_of(enum ggml_type type);

// For the tests (ctypes): one dot product of n weights (n % 256 == 0) of an mcn row with n Q8_K
// activations, with the scalar reference or with the kernel the CPU backend uses.
MCN_API float mcn_vec_dot_ref(enum ggml_type type, int n, const void * x, const void * y);
MCN_API float mcn_vec_dot(enum ggml_type type, int n, const void * x, const void * y);
// A tile of a prompt batch: nr <= MCN_TILE weight rows of an mcn type (n weights each, n % 256 == 0, w_row
// bytes apart) times nc <= MCN_TILE Q8_K activation columns ys[c]: dsts[c][r] = the dot product of row r and
// column c, each weight block decoded once for all columns (mul_mat_id's batched path, mcmoe-mmid.c). False
// (nothing written) where this build has no tile kernel (AVX-512 VNNI only so far); mcn_gemm_tile_ref is its
// plain C twin in every build, equal to it bit for bit.
#define MCN_TILE 16
MCN_API bool mcn_cpu_has_tile(enum ggml_type type);
MCN_API bool mcn_gemm_tile(enum ggml_type type, int n, const void * w, size_t w_row, int nr, const void * const * ys,
                           int nc, float * const * dsts);
MCN_API void mcn_gemm_tile_ref(enum ggml_type type, int n, const void * w, size_t w_row, int nr,
                               const void * const * ys, int nc, float * const * dsts);
// "avx512-vnni", "avx2" or "scalar": what mcn_vec_dot runs
MCN_API const char * mcn_cpu_simd(void);

#define MCN_CPU_TRAITS_ENTRY(TYPE, bits)                                 \
    [TYPE] = {                                                           \
        .from_float   = (ggml_from_float_t) quantize_row_mcn##bits##_ref, \
        .vec_dot      = ggml_vec_dot_mcn##bits##_q8_K,                   \
        .vec_dot_type = GGML_TYPE_Q8_K,                                  \
        .nrows        = 1,                                               \
    },

#define MCN_CPU_TYPE_TRAITS                          \
    MCN_CPU_TRAITS_ENTRY(GGML_TYPE_MCN2, 2)          \
    MCN_CPU_TRAITS_ENTRY(GGML_TYPE_MCN3, 3)

#ifdef __cplusplus
}
#endif
