// mcmoe-gguf: CPU vec_dot of the mcq types against Q8_K activations (see mcq-cpu.h).
//
// ggml_vec_dot_mcqN_q8_K_generic is the scalar reference (any CPU, the tests, and the CPU backend in
// reference mode); ggml_vec_dot_mcqN_q8_K is the kernel of type_traits_cpu, the best this file is
// compiled for (each CPU backend variant of the portable runtime compiles it with its own flags):
//   AVX-512 BW + VNNI (Ice Lake, Sapphire Rapids, Zen 4, ...): a block of 128 codes in two 512-bit
//     registers, 1-bit planes turned into bytes by mask moves, products summed by vpdpbusd;
//   AVX2 (+ AVX-VNNI on Alder Lake-class CPUs: vpdpbusd on 256 bits instead of maddubs + madd);
//   otherwise the generic one under that name, following the scheme of ggml-cpu/arch-fallback.h (kept
//   here because only this file defines and uses these names).
// Every path computes the same integer sums per block (no int16 saturation can occur, see below), so
// they differ from the scalar reference only in the order of the float additions.
#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include "mcq-cpu.h"

#include "ggml-cpu-impl.h"
#include "simd-mappings.h"

#include <assert.h>
#include <string.h>

#if defined(__AVX2__) && defined(__F16C__) && !defined(GGML_CPU_GENERIC)
#    define MCQ_CPU_AVX2 1
#    if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#        define MCQ_CPU_AVX512 1       // 512-bit kernels (decode with mask registers, vpdpbusd)
#        define MCQ_CPU_VNNI256 1      // and vpdpbusd on 256 bits in the AVX2 helpers
#    elif defined(__AVXVNNI__)
#        define MCQ_CPU_VNNI256 1
#    endif
#    include <immintrin.h>
#    if defined(_MSC_VER)
#        define MCQ_FORCE_INLINE __forceinline
#    else
#        define MCQ_FORCE_INLINE inline __attribute__((always_inline))
#    endif
#else
// arch fallback: no SIMD kernel for this target, the generic one is the kernel
#    define ggml_vec_dot_mcq1_q8_K_generic ggml_vec_dot_mcq1_q8_K
#    define ggml_vec_dot_mcq2_q8_K_generic ggml_vec_dot_mcq2_q8_K
#    define ggml_vec_dot_mcq3_q8_K_generic ggml_vec_dot_mcq3_q8_K
#    define ggml_vec_dot_mcq4_q8_K_generic ggml_vec_dot_mcq4_q8_K
#endif

void ggml_vec_dot_mcq1_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcq2_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcq3_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcq4_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// ---------------------------------------------------------------- scalar reference

// code n (0..127) of a block whose planes start at c (right after d and m)
static inline int mcq_code_at(int bits, const uint8_t * c, int n) {
    switch (bits) {
        case 1:  return (c[n >> 3] >> (n & 7)) & 1;
        case 2:  return (c[n & 31] >> (2*(n >> 5))) & 3;
        case 3:  return ((c[n & 31] >> (2*(n >> 5))) & 3) | (((c[QK_MCQ/4 + (n >> 3)] >> (n & 7)) & 1) << 2);
        default: return (c[n & 63] >> (4*(n >> 6))) & 15;
    }
}

static inline void mcq_vec_dot_generic_impl(int bits, int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                            const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const size_t       bb = 4 + (size_t) bits*QK_MCQ/8;
    const uint8_t    * x  = (const uint8_t *) vx;
    const block_q8_K * y  = (const block_q8_K *) vy;

    float sumf = 0.0f;
    for (int ib = 0; ib < n / QK_MCQ; ++ib) {
        const uint8_t    * blk  = x + ib*bb;
        const block_q8_K * yb   = y + ib/2;
        const int          half = ib % 2;         // which 128 of the Q8_K block of 256
        uint16_t d16, m16;
        memcpy(&d16, blk, 2);
        memcpy(&m16, blk + 2, 2);
        const float d = GGML_CPU_FP16_TO_FP32(d16);
        const float m = GGML_CPU_FP16_TO_FP32(m16);
        int sumi = 0;
        for (int i = 0; i < QK_MCQ; ++i) {
            sumi += mcq_code_at(bits, blk + 4, i) * yb->qs[half*QK_MCQ + i];
        }
        int sumy = 0;                             // sum of the 128 activation codes, from the 8 bsums of 16
        for (int j = 0; j < QK_MCQ/16; ++j) {
            sumy += yb->bsums[half*(QK_MCQ/16) + j];
        }
        sumf += (d*yb->d)*(float) sumi + (m*yb->d)*(float) sumy;
    }
    *s = sumf;
}

#define MCQ_GENERIC(bits)                                                                                   \
void ggml_vec_dot_mcq##bits##_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, \
                                           size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {   \
    assert(nrc == 1);                                                                                       \
    (void) bs; (void) bx; (void) by; (void) nrc;                                                            \
    mcq_vec_dot_generic_impl(bits, n, s, vx, vy);                                                           \
}
MCQ_GENERIC(1)
MCQ_GENERIC(2)
MCQ_GENERIC(3)
MCQ_GENERIC(4)

// ---------------------------------------------------------------- AVX2

#if defined(MCQ_CPU_AVX2)

// Elements 32j..32j+31 of a bit plane (bit i of byte i >> 3 is element i), one byte each: bit (i & 7) of the
// byte (0 or a power of two). `plane` holds the 16-byte plane in both 128-bit lanes.
static inline __m256i mcq_plane_bits(const __m256i plane, const int j) {
    const __m256i shuf  = _mm256_add_epi8(
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000),
        _mm256_set1_epi8((char) (4*j)));
    const __m256i bmask = _mm256_set1_epi64x((long long) 0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_shuffle_epi8(plane, shuf), bmask);
}

// ... as 0 / 1 bytes
static inline __m256i mcq_bits_to_bytes(const __m256i plane, const int j) {
    return _mm256_min_epu8(mcq_plane_bits(plane, j), _mm256_set1_epi8(1));
}

// ... as 0 / `val` bytes
static inline __m256i mcq_bits_to_val(const __m256i plane, const int j, const __m256i val) {
    const __m256i bmask = _mm256_set1_epi64x((long long) 0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(mcq_plane_bits(plane, j), bmask), val);
}

static inline __m256 mcq_madd(__m256 a, __m256 b, __m256 c) {
#if defined(__FMA__)
    return _mm256_fmadd_ps(a, b, c);
#else
    return _mm256_add_ps(_mm256_mul_ps(a, b), c);
#endif
}

// Software prefetch distance of the mat-vec kernels, in bytes of weights ahead of the block being decoded.
// Decode streams a weight matrix once; measured on a Xeon (Sapphire Rapids, 1 thread, 4096 x 14336):
// 2-4 KiB ahead cut the time of mcq2-4 by 15-30% (the hardware prefetcher alone leaves the loop waiting).
#define MCQ_PREFETCH 2048

static inline uint32_t mcq_ld32(const void * p) {
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

// The 128 codes of a block whose planes start at c, as 4 vectors of 32 consecutive codes (elements 0-31,
// 32-63, 64-95, 96-127), one byte each. bits is a literal at every call site.
static MCQ_FORCE_INLINE void mcq_decode_block_avx2(const int bits, const uint8_t * c, __m256i q[4]) {
    const __m256i mask2 = _mm256_set1_epi8(3);
    const __m256i mask4 = _mm256_set1_epi8(15);
    if (bits == 1) {
        const __m256i plane = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) c));
        for (int j = 0; j < 4; ++j) {
            q[j] = mcq_bits_to_bytes(plane, j);
        }
    } else if (bits == 2 || bits == 3) {
        const __m256i v = _mm256_loadu_si256((const __m256i *) c);
        q[0] = _mm256_and_si256(v, mask2);
        q[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), mask2);
        q[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask2);
        q[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), mask2);
        if (bits == 3) {
            const __m256i plane = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) (c + QK_MCQ/4)));
            for (int j = 0; j < 4; ++j) {
                q[j] = _mm256_or_si256(q[j], mcq_bits_to_val(plane, j, _mm256_set1_epi8(4)));
            }
        }
    } else {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *) c);
        const __m256i v1 = _mm256_loadu_si256((const __m256i *) (c + 32));
        q[0] = _mm256_and_si256(v0, mask4);
        q[1] = _mm256_and_si256(v1, mask4);
        q[2] = _mm256_and_si256(_mm256_srli_epi16(v0, 4), mask4);
        q[3] = _mm256_and_si256(_mm256_srli_epi16(v1, 4), mask4);
    }
}

// The integer dot product of a decoded block (4 x 32 codes, u8 <= 15) with its 128 int8 activations, as 8
// int32 partial sums. With VNNI one vpdpbusd per 32 codes. Without, u8 x s8 pairs are summed in int16 by
// maddubs: |pair| <= 2*15*128 = 3840, and the sum of the four products stays <= 15360 < 32767, so the whole
// block is summed in int16 before widening once; no saturation, hence the same sums as vpdpbusd.
static MCQ_FORCE_INLINE __m256i mcq_dot_block_avx2(const __m256i q[4], const int8_t * qy) {
#if defined(MCQ_CPU_VNNI256)
    // two independent chains: vpdpbusd has a latency of several cycles
    __m256i p[2] = { _mm256_setzero_si256(), _mm256_setzero_si256() };
    for (int j = 0; j < 4; ++j) {
#    if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        p[j & 1] = _mm256_dpbusd_epi32(p[j & 1], q[j], _mm256_loadu_si256((const __m256i *) (qy + 32*j)));
#    else
        p[j & 1] = _mm256_dpbusd_avx_epi32(p[j & 1], q[j], _mm256_loadu_si256((const __m256i *) (qy + 32*j)));
#    endif
    }
    return _mm256_add_epi32(p[0], p[1]);
#else
    __m256i p16 = _mm256_maddubs_epi16(q[0], _mm256_loadu_si256((const __m256i *) (qy +  0)));
    p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(q[1], _mm256_loadu_si256((const __m256i *) (qy + 32))));
    p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(q[2], _mm256_loadu_si256((const __m256i *) (qy + 64))));
    p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(q[3], _mm256_loadu_si256((const __m256i *) (qy + 96))));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
#endif
}

// bits is a literal at every call site: the compiler specializes this per type
static MCQ_FORCE_INLINE void mcq_vec_dot_avx2_impl(
        const int bits, const int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const int          nb = n / QK_MCQ;
    const size_t       bb = 4 + (size_t) bits*QK_MCQ/8;
    const uint8_t    * x  = (const uint8_t *) vx;
    const block_q8_K * y  = (const block_q8_K *) vy;

    const __m128i ones16x = _mm_set1_epi16(1);

    // two accumulators (even / odd blocks) so consecutive blocks do not wait on one FMA chain;
    // accm collects m * d_y * (partial sums of the 128 activation codes)
    __m256 acc[2] = { _mm256_setzero_ps(), _mm256_setzero_ps() };
    __m128 accm = _mm_setzero_ps();

    for (int ib = 0; ib < nb; ++ib) {
        const uint8_t    * blk  = x + ib*bb;
        const uint8_t    * c    = blk + 4;
        const block_q8_K * yb   = y + ib/2;
        const int          half = ib & 1;
        const int8_t     * qy   = yb->qs + half*QK_MCQ;
        _mm_prefetch((const char *) blk + MCQ_PREFETCH, _MM_HINT_T0);

        const __m128 dm  = _mm_cvtph_ps(_mm_cvtsi32_si128((int) mcq_ld32(blk)));             // d, m
        const __m128 dmy = _mm_mul_ps(dm, _mm_set1_ps(yb->d));                                // d d_y, m d_y

        __m256i q[4];
        mcq_decode_block_avx2(bits, c, q);

        const __m256 pf = _mm256_cvtepi32_ps(mcq_dot_block_avx2(q, qy));
        acc[half] = mcq_madd(_mm256_broadcastss_ps(dmy), pf, acc[half]);

        // the 8 bsums of this half (|sum of 16| <= 2048: int16 pairs summed in int32): 4 partial sums
        const __m128i bs = _mm_madd_epi16(_mm_loadu_si128((const __m128i *) (yb->bsums + half*(QK_MCQ/16))), ones16x);
        accm = _mm_add_ps(accm, _mm_mul_ps(_mm_shuffle_ps(dmy, dmy, 0x55), _mm_cvtepi32_ps(bs)));
    }

    const __m256 total = _mm256_add_ps(acc[0], acc[1]);
    __m128 r = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1)), accm);
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    *s = _mm_cvtss_f32(r);
}

#if defined(MCQ_CPU_AVX512)
static inline uint64_t mcq_ld64(const void * p) {
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

// The 128 codes of a block whose planes start at c as 2 vectors of 64 consecutive codes (elements 0-63,
// 64-127), one byte each. Bit planes (mcq1, the high bit of mcq3) are read as 64-bit masks: element i is
// bit i, so a masked byte move turns them into bytes directly. bits is a literal at every call site.
static MCQ_FORCE_INLINE void mcq_decode_block_avx512(const int bits, const uint8_t * c, __m512i q[2]) {
    if (bits == 1) {
        const __m512i one = _mm512_set1_epi8(1);
        q[0] = _mm512_maskz_mov_epi8(_cvtu64_mask64(mcq_ld64(c)), one);
        q[1] = _mm512_maskz_mov_epi8(_cvtu64_mask64(mcq_ld64(c + 8)), one);
    } else if (bits == 2 || bits == 3) {
        // plane byte i holds elements i, 32+i, 64+i, 96+i in bits 0-1, 2-3, 4-5, 6-7: the plane in both
        // 256-bit halves, each half shifted by its own count (64-bit lanes; the mask drops what crossed
        // a byte boundary)
        const __m512i v  = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) c));
        const __m512i m2 = _mm512_set1_epi8(3);
        q[0] = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0)), m2);
        q[1] = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_set_epi64(6, 6, 6, 6, 4, 4, 4, 4)), m2);
        if (bits == 3) {
            const __m512i four = _mm512_set1_epi8(4);
            q[0] = _mm512_mask_add_epi8(q[0], _cvtu64_mask64(mcq_ld64(c + QK_MCQ/4)), q[0], four);
            q[1] = _mm512_mask_add_epi8(q[1], _cvtu64_mask64(mcq_ld64(c + QK_MCQ/4 + 8)), q[1], four);
        }
    } else {
        // nibble plane: element n is byte n & 63, nibble n >> 6
        const __m512i v  = _mm512_loadu_si512((const void *) c);
        const __m512i m4 = _mm512_set1_epi8(15);
        q[0] = _mm512_and_si512(v, m4);
        q[1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
    }
}

// integer dot of a decoded block with its 128 activations: 16 int32 partial sums, two vpdpbusd
static MCQ_FORCE_INLINE __m512i mcq_dot_block_avx512(const __m512i q[2], const int8_t * qy) {
    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], _mm512_loadu_si512((const void *) qy));
    return _mm512_dpbusd_epi32(p, q[1], _mm512_loadu_si512((const void *) (qy + 64)));
}

// the m term of a block: m d_y * (sum of its 128 activation codes) from the 8 bsums of its half
static MCQ_FORCE_INLINE __m128 mcq_mterm(const block_q8_K * yb, const int half, const __m128 dmy, const __m128 accm) {
    const __m128i bs = _mm_madd_epi16(_mm_loadu_si128((const __m128i *) (yb->bsums + half*(QK_MCQ/16))),
                                      _mm_set1_epi16(1));
    return _mm_add_ps(accm, _mm_mul_ps(_mm_shuffle_ps(dmy, dmy, 0x55), _mm_cvtepi32_ps(bs)));
}

static MCQ_FORCE_INLINE void mcq_vec_dot_avx512_impl(
        const int bits, const int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const int          nb = n / QK_MCQ;
    const size_t       bb = 4 + (size_t) bits*QK_MCQ/8;
    const uint8_t    * x  = (const uint8_t *) vx;
    const block_q8_K * y  = (const block_q8_K *) vy;

    // one accumulator per block parity, so consecutive blocks do not wait on one FMA chain
    __m512 acc[2] = { _mm512_setzero_ps(), _mm512_setzero_ps() };
    __m128 accm = _mm_setzero_ps();
    for (int ib = 0; ib < nb; ++ib) {
        const uint8_t    * blk  = x + ib*bb;
        const block_q8_K * yb   = y + ib/2;
        const int          half = ib & 1;
        _mm_prefetch((const char *) blk + MCQ_PREFETCH, _MM_HINT_T0);
        const __m128 dmy = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int) mcq_ld32(blk))), _mm_set1_ps(yb->d));
        __m512i q[2];
        mcq_decode_block_avx512(bits, blk + 4, q);
        const __m512 pf = _mm512_cvtepi32_ps(mcq_dot_block_avx512(q, yb->qs + half*QK_MCQ));
        acc[half] = _mm512_fmadd_ps(_mm512_broadcastss_ps(dmy), pf, acc[half]);
        accm = mcq_mterm(yb, half, dmy, accm);
    }
    __m128 r = accm;
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    *s = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + _mm_cvtss_f32(r);
}
#    define MCQ_KERNEL_IMPL mcq_vec_dot_avx512_impl
#else
#    define MCQ_KERNEL_IMPL mcq_vec_dot_avx2_impl
#endif

#define MCQ_AVX2(bits)                                                                                      \
void ggml_vec_dot_mcq##bits##_q8_K(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, \
                                   size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {           \
    assert(nrc == 1);                                                                                       \
    (void) bs; (void) bx; (void) by; (void) nrc;                                                            \
    MCQ_KERNEL_IMPL(bits, n, s, vx, vy);                                                                    \
}
MCQ_AVX2(1)
MCQ_AVX2(2)
MCQ_AVX2(3)
MCQ_AVX2(4)


// Several activation columns against one weight row (prefill through mul_mat_id): each block is decoded
// once and dotted with up to MCQ_MULTI columns, which is where the batched path spends its time otherwise.
// Same per-column arithmetic as mcq_vec_dot_avx2_impl (two block-parity accumulators, then the m term).
#define MCQ_MULTI 4
static MCQ_FORCE_INLINE void mcq_vec_dot_multi_avx2_impl(const int bits, const int n, const void * GGML_RESTRICT vx,
                                                         const void * const * vys, const int nc, float * out) {
    const int          nb = n / QK_MCQ;
    const size_t       bb = 4 + (size_t) bits*QK_MCQ/8;
    const uint8_t    * x  = (const uint8_t *) vx;

    const __m128i ones16x = _mm_set1_epi16(1);

    __m256 acc[MCQ_MULTI][2];
    __m128 accm[MCQ_MULTI];
    for (int c = 0; c < MCQ_MULTI; ++c) {
        acc[c][0] = acc[c][1] = _mm256_setzero_ps();
        accm[c] = _mm_setzero_ps();
    }

    for (int ib = 0; ib < nb; ++ib) {
        const uint8_t * blk  = x + ib*bb;
        const uint8_t * cq   = blk + 4;
        const int       half = ib & 1;
        const __m128    dm   = _mm_cvtph_ps(_mm_cvtsi32_si128((int) mcq_ld32(blk)));

        __m256i q[4];
        mcq_decode_block_avx2(bits, cq, q);

        for (int c = 0; c < nc; ++c) {
            const block_q8_K * yb  = (const block_q8_K *) vys[c] + ib/2;
            const int8_t     * qy  = yb->qs + half*QK_MCQ;
            const __m128       dmy = _mm_mul_ps(dm, _mm_set1_ps(yb->d));
            const __m256 pf = _mm256_cvtepi32_ps(mcq_dot_block_avx2(q, qy));
            acc[c][half] = mcq_madd(_mm256_broadcastss_ps(dmy), pf, acc[c][half]);
            const __m128i bs = _mm_madd_epi16(_mm_loadu_si128((const __m128i *) (yb->bsums + half*(QK_MCQ/16))), ones16x);
            accm[c] = _mm_add_ps(accm[c], _mm_mul_ps(_mm_shuffle_ps(dmy, dmy, 0x55), _mm_cvtepi32_ps(bs)));
        }
    }

    for (int c = 0; c < nc; ++c) {
        const __m256 total = _mm256_add_ps(acc[c][0], acc[c][1]);
        __m128 r = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1)), accm[c]);
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        out[c] = _mm_cvtss_f32(r);
    }
}

#if defined(MCQ_CPU_AVX512)
// The multi-column kernel on 512 bits: each block decoded once, then one vpdpbusd pair per column, for up
// to MCQ_MULTI_512 columns.
#define MCQ_MULTI_512 MCQ_MULTI
static MCQ_FORCE_INLINE void mcq_vec_dot_multi_avx512_impl(const int bits, const int n, const void * GGML_RESTRICT vx,
                                                           const void * const * vys, const int nc, float * out) {
    const int       nb = n / QK_MCQ;
    const size_t    bb = 4 + (size_t) bits*QK_MCQ/8;
    const uint8_t * x  = (const uint8_t *) vx;

    __m512 acc[MCQ_MULTI_512][2];
    __m128 accm[MCQ_MULTI_512];
    for (int c = 0; c < MCQ_MULTI_512; ++c) {
        acc[c][0] = acc[c][1] = _mm512_setzero_ps();
        accm[c] = _mm_setzero_ps();
    }
    for (int ib = 0; ib < nb; ++ib) {
        const uint8_t * blk  = x + ib*bb;
        const int       half = ib & 1;
        const __m128    dm   = _mm_cvtph_ps(_mm_cvtsi32_si128((int) mcq_ld32(blk)));
        __m512i q[2];
        mcq_decode_block_avx512(bits, blk + 4, q);
        for (int c = 0; c < nc; ++c) {
            const block_q8_K * yb  = (const block_q8_K *) vys[c] + ib/2;
            const __m128       dmy = _mm_mul_ps(dm, _mm_set1_ps(yb->d));
            const __m512 pf = _mm512_cvtepi32_ps(mcq_dot_block_avx512(q, yb->qs + half*QK_MCQ));
            acc[c][half] = _mm512_fmadd_ps(_mm512_broadcastss_ps(dmy), pf, acc[c][half]);
            accm[c] = mcq_mterm(yb, half, dmy, accm[c]);
        }
    }
    for (int c = 0; c < nc; ++c) {
        __m128 r = accm[c];
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        out[c] = _mm512_reduce_add_ps(_mm512_add_ps(acc[c][0], acc[c][1])) + _mm_cvtss_f32(r);
    }
}
#    define MCQ_MULTI_IMPL mcq_vec_dot_multi_avx512_impl
#    define MCQ_MULTI_COLS MCQ_MULTI_512
#else
#    define MCQ_MULTI_IMPL mcq_vec_dot_multi_avx2_impl
#    define MCQ_MULTI_COLS MCQ_MULTI
#endif

#endif // MCQ_CPU_AVX2

// ---------------------------------------------------------------- selection, test entry points

static ggml_vec_dot_t mcq_generic_of(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCQ1: return ggml_vec_dot_mcq1_q8_K_generic;
        case GGML_TYPE_MCQ2: return ggml_vec_dot_mcq2_q8_K_generic;
        case GGML_TYPE_MCQ3: return ggml_vec_dot_mcq3_q8_K_generic;
        case GGML_TYPE_MCQ4: return ggml_vec_dot_mcq4_q8_K_generic;
        default:             return NULL;
    }
}

static ggml_vec_dot_t mcq_kernel_of(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCQ1: return ggml_vec_dot_mcq1_q8_K;
        case GGML_TYPE_MCQ2: return ggml_vec_dot_mcq2_q8_K;
        case GGML_TYPE_MCQ3: return ggml_vec_dot_mcq3_q8_K;
        case GGML_TYPE_MCQ4: return ggml_vec_dot_mcq4_q8_K;
        default:             return NULL;
    }
}

ggml_vec_dot_t mcq_cpu_select_vec_dot(enum ggml_type type, bool use_ref, ggml_vec_dot_t dflt) {
    ggml_vec_dot_t ref = use_ref ? mcq_generic_of(type) : NULL;
    return ref ? ref : dflt;
}

float mcq_vec_dot_ref(enum ggml_type type, int n, const void * x, const void * y) {
    ggml_vec_dot_t f = mcq_generic_of(type);
    GGML_ASSERT(f != NULL && n % QK_K == 0);
    float s = 0.0f;
    f(n, &s, 0, x, 0, y, 0, 1);
    return s;
}

float mcq_vec_dot(enum ggml_type type, int n, const void * x, const void * y) {
    ggml_vec_dot_t f = mcq_kernel_of(type);
    GGML_ASSERT(f != NULL && n % QK_K == 0);
    float s = 0.0f;
    f(n, &s, 0, x, 0, y, 0, 1);
    return s;
}

bool mcq_cpu_has_multi(enum ggml_type type) {
#if defined(MCQ_CPU_AVX2)
    return mcq_type_bits(type) != 0;
#else
    (void) type;
    return false;
#endif
}

bool mcq_vec_dot_multi(enum ggml_type type, int n, const void * x, const void * const * ys, int nc, float * out) {
#if defined(MCQ_CPU_AVX2)
    const int bits = mcq_type_bits(type);
    if (bits == 0 || n % QK_K != 0) {
        return false;
    }
    for (int c0 = 0; c0 < nc; c0 += MCQ_MULTI_COLS) {
        const int m = nc - c0 < MCQ_MULTI_COLS ? nc - c0 : MCQ_MULTI_COLS;
        switch (bits) {   // literal widths: one specialised copy per type
            case 1:  MCQ_MULTI_IMPL(1, n, x, ys + c0, m, out + c0); break;
            case 2:  MCQ_MULTI_IMPL(2, n, x, ys + c0, m, out + c0); break;
            case 3:  MCQ_MULTI_IMPL(3, n, x, ys + c0, m, out + c0); break;
            default: MCQ_MULTI_IMPL(4, n, x, ys + c0, m, out + c0); break;
        }
    }
    return true;
#else
    (void) type; (void) n; (void) x; (void) ys; (void) nc; (void) out;
    return false;   // no multi-column kernel: the caller uses vec_dot per column
#endif
}

bool mcq_mul_mat_chunk(enum ggml_type type, int64_t n, const char * w, size_t w_row, const char * y, size_t y_col,
                       char * dst, size_t dst_col, int64_t ir0_start, int64_t ir0_end, int64_t ir1_start, int64_t ir1_end) {
    if (!mcq_cpu_has_multi(type) || n % QK_K != 0) {
        return false;
    }
    // tiles of 16 columns: their Q8_K activations (16 x ~1.1 bytes per weight) stay in L2 while every
    // weight row of the chunk is decoded once for all of them
    for (int64_t iir1 = ir1_start; iir1 < ir1_end; iir1 += 16) {
        const int nc = (int) (ir1_end - iir1 < 16 ? ir1_end - iir1 : 16);
        const void * cols[16];
        for (int c = 0; c < nc; ++c) {
            cols[c] = y + (iir1 + c)*y_col;
        }
        for (int64_t ir0 = ir0_start; ir0 < ir0_end; ++ir0) {
            float o[16];
            if (nc == 1) {           // a mat-vec: the single-column kernel (with its prefetch) is faster
                o[0] = mcq_vec_dot(type, (int) n, w + ir0*w_row, cols[0]);
            } else {
                mcq_vec_dot_multi(type, (int) n, w + ir0*w_row, cols, nc, o);
            }
            for (int c = 0; c < nc; ++c) {
                ((float *) (dst + (iir1 + c)*dst_col))[ir0] = o[c];
            }
        }
    }
    return true;
}

const char * mcq_cpu_simd(void) {
#if defined(MCQ_CPU_AVX512)
    return "avx512-vnni";
#elif defined(MCQ_CPU_VNNI256)
    return "avx2-vnni";
#elif defined(MCQ_CPU_AVX2)
    return "avx2";
#else
    return "scalar";
#endif
}
