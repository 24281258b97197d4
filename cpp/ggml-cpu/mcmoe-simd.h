// mcmoe-gguf: SIMD helpers shared by the tile kernels of our types (mcq-cpu.c, mcn-cpu.c).
#pragma once

#if defined(__AVX512F__)
#    include <immintrin.h>
#    if defined(_MSC_VER)
#        define MCMOE_SIMD_INLINE static __forceinline
#    else
#        define MCMOE_SIMD_INLINE static inline __attribute__((always_inline))
#    endif

// 16 x 16 dwords transposed in place: r[i] lane j <-> r[j] lane i
MCMOE_SIMD_INLINE void mcmoe_tr16x16_epi32(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) {            // rows 2i, 2i+1 interleaved by dwords (within 128-bit lanes)
        t[2*i]     = _mm512_unpacklo_epi32(r[2*i], r[2*i + 1]);
        t[2*i + 1] = _mm512_unpackhi_epi32(r[2*i], r[2*i + 1]);
    }
    for (int i = 0; i < 4; ++i) {            // u[4i+k], 128-bit lane L: column 4L+k of rows 4i..4i+3
        u[4*i + 0] = _mm512_unpacklo_epi64(t[4*i],     t[4*i + 2]);
        u[4*i + 1] = _mm512_unpackhi_epi64(t[4*i],     t[4*i + 2]);
        u[4*i + 2] = _mm512_unpacklo_epi64(t[4*i + 1], t[4*i + 3]);
        u[4*i + 3] = _mm512_unpackhi_epi64(t[4*i + 1], t[4*i + 3]);
    }
    for (int k = 0; k < 4; ++k) {            // gather lane L of u[k], u[4+k], u[8+k], u[12+k] into r[4L+k]
        const __m512i v1 = _mm512_shuffle_i32x4(u[k],     u[4 + k],  0x44);
        const __m512i v2 = _mm512_shuffle_i32x4(u[k],     u[4 + k],  0xEE);
        const __m512i w1 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
        const __m512i w2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
        r[k]      = _mm512_shuffle_i32x4(v1, w1, 0x88);
        r[4 + k]  = _mm512_shuffle_i32x4(v1, w1, 0xDD);
        r[8 + k]  = _mm512_shuffle_i32x4(v2, w2, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(v2, w2, 0xDD);
    }
}

#endif
