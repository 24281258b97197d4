// mcmoe-gguf: CPU kernels of the mct trellis types (ggml-cpu backend), see ../ggml/mct.h and docs/FORMAT.md.
//
// vec_dot against GGML_TYPE_Q8_K activations (256 int8 codes qy with one fp32 scale d_y): one mct block is one
// Q8_K block, and
//     sum_n x_n y_n = d * d_y * sum_j s_j * sum_{n in j} V[state_n] qy_n,
// all integer but the last two products (mct_hd_block_isum, mct-common.h). The SIMD kernels compute every weight's
// V from its own 12-bit window (shuffle, shift, multiply-add, mask) and the same integer sum per block, then the
// same float steps in the same order as the scalar reference: their results equal it bit for bit.
#pragma once

#include "mct.h"
#include "ggml-cpu.h"

#ifdef __cplusplus
extern "C" {
#endif

void ggml_vec_dot_mct1_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mct2_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mct3_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// the scalar reference of `type` (NULL for other types): the CPU backend in reference mode uses it
ggml_vec_dot_t mct_cpu_generic_of(enum ggml_type type);

// For the tests (ctypes): one dot product of n weights (n % 256 == 0) of an mct row with n Q8_K activations, with
// the scalar reference or with the kernel the CPU backend uses.
MCT_API float mct_vec_dot_ref(enum ggml_type type, int n, const void * x, const void * y);
MCT_API float mct_vec_dot(enum ggml_type type, int n, const void * x, const void * y);
// "avx512" (AVX-512 BW), "avx2" or "scalar": what mct_vec_dot runs
MCT_API const char * mct_cpu_simd(void);

#define MCT_CPU_TRAITS_ENTRY(TYPE, k)                                    \
    [TYPE] = {                                                           \
        .from_float   = (ggml_from_float_t) quantize_row_mct##k##_ref,   \
        .vec_dot      = ggml_vec_dot_mct##k##_q8_K,                      \
        .vec_dot_type = GGML_TYPE_Q8_K,                                  \
        .nrows        = 1,                                               \
    },

#define MCT_CPU_TYPE_TRAITS                          \
    MCT_CPU_TRAITS_ENTRY(GGML_TYPE_MCT1, 1)          \
    MCT_CPU_TRAITS_ENTRY(GGML_TYPE_MCT2, 2)          \
    MCT_CPU_TRAITS_ENTRY(GGML_TYPE_MCT3, 3)

#ifdef __cplusplus
}
#endif
