// mcmoe-gguf: what the CPU modules of our super-block families (mcn-cpu.c, mct-cpu.c) define alike: ggml's vec_dot
// entry points around a family's implementation, and the entry points the tests call through ctypes.
// Included after ggml-common.h / ggml-cpu-impl.h (QK_K, GGML_RESTRICT, GGML_ASSERT, ggml_vec_dot_t).
#pragma once

#include <assert.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline uint16_t sb_ld16(const uint8_t * p) {
    uint16_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline uint32_t sb_ld32(const uint8_t * p) {
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

// fp32(d) of a block (its first two bytes): one instruction with F16C (GGML_CPU_FP16_TO_FP32 is a table lookup on
// x86), else the shared software conversion of mcn-common.h (both exact)
static inline float sb_block_d(const uint8_t * blk) {
#if defined(__F16C__)
    return GGML_CPU_COMPUTE_FP16_TO_FP32(sb_ld16(blk));
#else
    return mcn_hd_block_d(blk);
#endif
}

// void ggml_vec_dot_<fam><k>_q8_K<suffix>(ggml's vec_dot signature): one row (nrc = 1) by impl(k, n, s, vx, vy).
// suffix: _generic for the scalar reference, empty for the kernel of type_traits_cpu.
#define SB_CPU_VEC_DOT(fam, k, suffix, impl)                                                                       \
void ggml_vec_dot_##fam##k##_q8_K##suffix(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, \
                                          size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {          \
    assert(nrc == 1);                                                                                              \
    (void) nrc; (void) bx; (void) by; (void) bs;                                                                   \
    impl(k, n, s, vx, vy);                                                                                         \
}

static inline float sb_cpu_vec_dot_once(ggml_vec_dot_t f, int n, const void * x, const void * y) {
    GGML_ASSERT(f != NULL && n % QK_K == 0);
    float s = 0.0f;
    f(n, &s, 0, x, 0, y, 0, 1);
    return s;
}

// <fam>_vec_dot_ref, <fam>_vec_dot (one dot product of n weights with n Q8_K activations by the scalar reference /
// by the kernel the CPU backend uses) and <fam>_cpu_simd (which kernel that is), from the family's
// <fam>_cpu_generic_of and static <fam>_kernel_of
#define SB_CPU_TEST_ENTRY_POINTS(fam, simd_name)                                                \
float fam##_vec_dot_ref(enum ggml_type type, int n, const void * x, const void * y) {           \
    return sb_cpu_vec_dot_once(fam##_cpu_generic_of(type), n, x, y);                            \
}                                                                                               \
float fam##_vec_dot(enum ggml_type type, int n, const void * x, const void * y) {               \
    return sb_cpu_vec_dot_once(fam##_kernel_of(type), n, x, y);                                 \
}                                                                                               \
const char * fam##_cpu_simd(void) {                                                             \
    return simd_name;                                                                           \
}
