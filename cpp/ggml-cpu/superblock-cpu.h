// mcmoe-gguf: what the CPU modules of our super-block families (mcn-cpu.c, mct-cpu.c) define alike: ggml's vec_dot
// entry points around a family's implementation, and the entry points the tests call through ctypes.
// Included after ggml-common.h / ggml-cpu-impl.h (QK_K, GGML_RESTRICT, GGML_ASSERT, ggml_vec_dot_t).
#pragma once

#include <assert.h>
#include <stddef.h>

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
