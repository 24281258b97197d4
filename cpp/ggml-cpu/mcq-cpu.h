// mcmoe-gguf: CPU kernels of the mcq types (ggml-cpu backend), see ../ggml/mcq.h and docs/FORMAT.md.
//
// vec_dot against GGML_TYPE_Q8_1 activations (32 int8 with an fp16 scale d_y and s = d_y * sum(q_y)):
// one mcq block of 128 spans 4 Q8_1 blocks, and with the x = m + d q grid
//     sum_n x_n y_n = d * sum_j d_y,j * sum_{n in j} q_n q_y,n  +  m * sum_j s_j,
// so the min costs one multiply per block (as for Q4_1 / Q5_1, which use Q8_1 for the same reason).
#pragma once

#include "mcq.h"
#include "ggml-cpu.h"

#ifdef __cplusplus
extern "C" {
#endif

// dispatch (AVX2 where compiled for it, else the scalar reference: see mcq-cpu.c) ...
void ggml_vec_dot_mcq1_q8_1(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcq2_q8_1(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcq3_q8_1(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcq4_q8_1(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// The vec_dot to use for src0 of `type`: the scalar reference when the CPU backend runs in reference
// mode (ggml_backend_cpu_set_use_ref, which test-backend-ops sets on the CPU backend it compares
// against), so `test-backend-ops -b CPU` compares the SIMD kernels with the scalar ones; `dflt` otherwise
// and for every other type.
ggml_vec_dot_t mcq_cpu_select_vec_dot(enum ggml_type type, bool use_ref, ggml_vec_dot_t dflt);

// For the tests (ctypes): one dot product of n weights (n % 128 == 0) of an mcq row with n Q8_1
// activations, with the scalar reference or with the kernel the CPU backend uses.
MCQ_API float mcq_vec_dot_ref(enum ggml_type type, int n, const void * x, const void * y);
MCQ_API float mcq_vec_dot(enum ggml_type type, int n, const void * x, const void * y);
// "avx2" or "scalar": what mcq_vec_dot runs
MCQ_API const char * mcq_cpu_simd(void);

// entries of ggml-cpu.c's type_traits_cpu[GGML_TYPE_COUNT]
#define MCQ_CPU_TRAITS_ENTRY(TYPE, bits)                                 \
    [TYPE] = {                                                           \
        .from_float   = (ggml_from_float_t) quantize_row_mcq##bits##_ref, \
        .vec_dot      = ggml_vec_dot_mcq##bits##_q8_1,                   \
        .vec_dot_type = GGML_TYPE_Q8_1,                                  \
        .nrows        = 1,                                               \
    },

#define MCQ_CPU_TYPE_TRAITS                          \
    MCQ_CPU_TRAITS_ENTRY(GGML_TYPE_MCQ1, 1)          \
    MCQ_CPU_TRAITS_ENTRY(GGML_TYPE_MCQ2, 2)          \
    MCQ_CPU_TRAITS_ENTRY(GGML_TYPE_MCQ3, 3)          \
    MCQ_CPU_TRAITS_ENTRY(GGML_TYPE_MCQ4, 4)

#ifdef __cplusplus
}
#endif
