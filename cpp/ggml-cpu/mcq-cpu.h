// mcmoe-gguf: CPU kernels of the mcq types (ggml-cpu backend), see ../ggml/mcq.h and docs/FORMAT.md.
//
// vec_dot against GGML_TYPE_Q8_K activations (256 int8 with one fp32 scale d_y and 16 int16 sums of 16
// codes, what the k-quants use): one mcq block of 128 is half a Q8_K block, and with the x = m + d q grid
//     sum_n x_n y_n = d d_y * sum_n q_n q_y,n  +  m d_y * sum_n q_y,n,
// where the second sum is 8 of the precomputed bsums. One activation scale per 128 (Q8_1 has one per 32)
// lets the kernel add the four 32-wide integer products of a block in int16 and convert once, about
// twice as fast as against Q8_1 (docs/RESULTS.md); the price is that rows must be a multiple of 256
// (QK_K), which the loader checks (every Mixtral dimension is).
#pragma once

#include "mcq.h"
#include "mcn-cpu.h" // mcn2 / mcn3: their traits join MCQ_CPU_TYPE_TRAITS, their reference mcq_cpu_select_vec_dot
#include "mct-cpu.h" // mct1 / mct2 / mct3: likewise
#include "ggml-cpu.h"

#ifdef __cplusplus
extern "C" {
#endif

// dispatch (AVX2 where compiled for it, else the scalar reference: see mcq-cpu.c) ...
void ggml_vec_dot_mcq1_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcq2_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcq3_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcq4_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// The vec_dot to use for src0 of `type`: the scalar reference when the CPU backend runs in reference
// mode (ggml_backend_cpu_set_use_ref, which test-backend-ops sets on the CPU backend it compares
// against), so `test-backend-ops -b CPU` compares the SIMD kernels with the scalar ones; `dflt` otherwise
// and for every other type.
ggml_vec_dot_t mcq_cpu_select_vec_dot(enum ggml_type type, bool use_ref, ggml_vec_dot_t dflt);

// For the tests (ctypes): one dot product of n weights (n % 256 == 0) of an mcq row with n Q8_K
// activations, with the scalar reference or with the kernel the CPU backend uses.
MCQ_API float mcq_vec_dot_ref(enum ggml_type type, int n, const void * x, const void * y);
MCQ_API float mcq_vec_dot(enum ggml_type type, int n, const void * x, const void * y);
// A tile of a prompt batch: nr <= 16 weight rows of an mcq type (n weights each, n % 256 == 0, w_row bytes
// apart) times nc <= 16 Q8_K activation columns ys[c]: dsts[c][r] = the dot product of row r and column c.
// Each weight block is decoded once for all columns, one SIMD lane per row (mul_mat_id's batched path, and
// MUL_MAT through mcq_mul_mat_chunk). False (nothing written) where this build has no tile kernel (no
// AVX2 + FMA); mcq_gemm_tile_ref is its plain C twin in every build, equal to it bit for bit.
MCQ_API bool mcq_cpu_has_tile(enum ggml_type type); // mcq_gemm_tile exists for this type here
MCQ_API bool mcq_gemm_tile(enum ggml_type type, int n, const void * w, size_t w_row, int nr, const void * const * ys,
                           int nc, float * const * dsts);
MCQ_API void mcq_gemm_tile_ref(enum ggml_type type, int n, const void * w, size_t w_row, int nr,
                               const void * const * ys, int nc, float * const * dsts);
// "avx512-vnni", "avx2-vnni", "avx2" or "scalar": what mcq_vec_dot runs
MCQ_API const char * mcq_cpu_simd(void);

// A chunk of a 2-D MUL_MAT with mcq weights (prompt batches through attention, test-backend-ops): rows
// ir0 of w (w_row bytes apart) times Q8_K columns ir1 of y (y_col bytes apart) into dst columns (dst_col
// bytes apart), in tiles of 16 x 16 with mcq_gemm_tile. False (nothing written) where there is no tile
// kernel: the caller then runs its vec_dot loop.
bool mcq_mul_mat_chunk(enum ggml_type type, int64_t n, const char * w, size_t w_row, const char * y, size_t y_col,
                       char * dst, size_t dst_col, int64_t ir0_start, int64_t ir0_end, int64_t ir1_start, int64_t ir1_end);

// ggml-cpu.cpp's supports_op: a MUL_MAT / MUL_MAT_ID with an mcq src0 needs rows of whole Q8_K blocks
// (the activations are quantized per 256); anything else is not our concern here.
static inline bool mcq_cpu_supports_op(const struct ggml_tensor * op) {
    if ((op->op == GGML_OP_MUL_MAT || op->op == GGML_OP_MUL_MAT_ID) && op->src[0] && mcq_type_bits(op->src[0]->type)) {
        return op->src[0]->ne[0] % MCQ_ROW_MULTIPLE == 0;
    }
    return true;
}

// entries of ggml-cpu.c's type_traits_cpu[GGML_TYPE_COUNT]
#define MCQ_CPU_TRAITS_ENTRY(TYPE, bits)                                 \
    [TYPE] = {                                                           \
        .from_float   = (ggml_from_float_t) quantize_row_mcq##bits##_ref, \
        .vec_dot      = ggml_vec_dot_mcq##bits##_q8_K,                   \
        .vec_dot_type = GGML_TYPE_Q8_K,                                  \
        .nrows        = 1,                                               \
    },

#define MCQ_CPU_TYPE_TRAITS                          \
    MCQ_CPU_TRAITS_ENTRY(GGML_TYPE_MCQ1, 1)          \
    MCQ_CPU_TRAITS_ENTRY(GGML_TYPE_MCQ2, 2)          \
    MCQ_CPU_TRAITS_ENTRY(GGML_TYPE_MCQ3, 3)          \
    MCQ_CPU_TRAITS_ENTRY(GGML_TYPE_MCQ4, 4)          \
    MCN_CPU_TYPE_TRAITS                              \
    MCT_CPU_TYPE_TRAITS

#ifdef __cplusplus
}
#endif
