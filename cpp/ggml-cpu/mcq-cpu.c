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
#include "mcmoe-simd.h"

#include "ggml-cpu-impl.h"
#include "simd-mappings.h"

#include <assert.h>
#include <math.h>
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

#define MCQ_TILE 16   // rows and columns of a prompt-batch tile (see the tiles section)

// sum of the 128 activation codes of half `half` of a Q8_K block, from its 8 bsums of 16
static inline int mcq_q8k_half_sum(const block_q8_K * yb, int half) {
    int s = 0;
    for (int j = 0; j < QK_MCQ/16; ++j) {
        s += yb->bsums[half*(QK_MCQ/16) + j];
    }
    return s;
}

// sum over the block of code * activation code (exact in int), codes read as the CUDA kernels read them
static inline int mcq_block_isum(int bits, const uint8_t * blk, const int8_t * qy) {
    int isum = 0;
    for (int i = 0; i < QK_MCQ; ++i) {
        isum += mcq_hd_code(bits, blk + 4, i) * qy[i];
    }
    return isum;
}

static inline void mcq_vec_dot_generic_impl(int bits, int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                            const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const size_t       bb = (size_t) MCQ_HD_BLOCK_BYTES(bits);
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
        const int sumi = mcq_block_isum(bits, blk, yb->qs + half*QK_MCQ);
        const int sumy = mcq_q8k_half_sum(yb, half);
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

// The m terms of the two blocks of a Q8_K block: m d_y * (sum of each half's 128 codes), from its 16 bsums
// (|sum of 16| <= 2048: int16 pairs summed in int32), lanes 0-3 for the first half, 4-7 for the second.
// dmy0 / dmy1 hold (d d_y, m d_y) of the two blocks.
static MCQ_FORCE_INLINE __m256 mcq_mterm2(const block_q8_K * yb, const __m128 dmy0, const __m128 dmy1, const __m256 accm) {
    const __m256i bs = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *) yb->bsums), _mm256_set1_epi16(1));
    const __m256  mm = _mm256_set_m128(_mm_shuffle_ps(dmy1, dmy1, 0x55), _mm_shuffle_ps(dmy0, dmy0, 0x55));
    return mcq_madd(mm, _mm256_cvtepi32_ps(bs), accm);
}

static inline float mcq_hsum256(const __m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

// bits is a literal at every call site: the compiler specializes this per type. One Q8_K block (two mcq
// blocks) per iteration with one named accumulator per half: an accumulator array indexed by the block's
// parity went to the stack, and its store-to-load round trip every block was the loop's critical path
// (perf annotate of the AVX-512 twin of this loop).
static MCQ_FORCE_INLINE void mcq_vec_dot_avx2_impl(
        const int bits, const int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const int          nb = n / QK_MCQ;
    const size_t       bb = (size_t) MCQ_HD_BLOCK_BYTES(bits);
    const uint8_t    * x  = (const uint8_t *) vx;
    const block_q8_K * y  = (const block_q8_K *) vy;

    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (int ib = 0; ib < nb; ib += 2) {
        const uint8_t    * blk0 = x + ib*bb;
        const uint8_t    * blk1 = blk0 + bb;
        const block_q8_K * yb   = y + ib/2;
        _mm_prefetch((const char *) blk0 + MCQ_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *) blk1 + MCQ_PREFETCH, _MM_HINT_T0);
        const __m128 dy   = _mm_set1_ps(yb->d);
        const __m128 dmy0 = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int) mcq_ld32(blk0))), dy);  // d d_y, m d_y
        const __m128 dmy1 = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int) mcq_ld32(blk1))), dy);

        __m256i q[4];
        mcq_decode_block_avx2(bits, blk0 + 4, q);
        acc0 = mcq_madd(_mm256_broadcastss_ps(dmy0), _mm256_cvtepi32_ps(mcq_dot_block_avx2(q, yb->qs)), acc0);
        mcq_decode_block_avx2(bits, blk1 + 4, q);
        acc1 = mcq_madd(_mm256_broadcastss_ps(dmy1), _mm256_cvtepi32_ps(mcq_dot_block_avx2(q, yb->qs + QK_MCQ)), acc1);
        accm = mcq_mterm2(yb, dmy0, dmy1, accm);
    }
    *s = mcq_hsum256(_mm256_add_ps(_mm256_add_ps(acc0, acc1), accm));
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

// as mcq_vec_dot_avx2_impl: one Q8_K block per iteration, named accumulators
static MCQ_FORCE_INLINE void mcq_vec_dot_avx512_impl(
        const int bits, const int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const int          nb = n / QK_MCQ;
    const size_t       bb = (size_t) MCQ_HD_BLOCK_BYTES(bits);
    const uint8_t    * x  = (const uint8_t *) vx;
    const block_q8_K * y  = (const block_q8_K *) vy;

    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m256 accm = _mm256_setzero_ps();
    for (int ib = 0; ib < nb; ib += 2) {
        const uint8_t    * blk0 = x + ib*bb;
        const uint8_t    * blk1 = blk0 + bb;
        const block_q8_K * yb   = y + ib/2;
        _mm_prefetch((const char *) blk0 + MCQ_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *) blk1 + MCQ_PREFETCH, _MM_HINT_T0);
        const __m128 dy   = _mm_set1_ps(yb->d);
        const __m128 dmy0 = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int) mcq_ld32(blk0))), dy);
        const __m128 dmy1 = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int) mcq_ld32(blk1))), dy);
        __m512i q[2];
        mcq_decode_block_avx512(bits, blk0 + 4, q);
        acc0 = _mm512_fmadd_ps(_mm512_broadcastss_ps(dmy0), _mm512_cvtepi32_ps(mcq_dot_block_avx512(q, yb->qs)), acc0);
        mcq_decode_block_avx512(bits, blk1 + 4, q);
        acc1 = _mm512_fmadd_ps(_mm512_broadcastss_ps(dmy1), _mm512_cvtepi32_ps(mcq_dot_block_avx512(q, yb->qs + QK_MCQ)), acc1);
        accm = mcq_mterm2(yb, dmy0, dmy1, accm);
    }
    *s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + mcq_hsum256(accm);
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


// ---------------------------------------------------------------- tiles: prompt batches
//
// A tile is up to MCQ_TILE weight rows times up to MCQ_TILE activation columns (mul_mat's and mul_mat_id's
// blocks of 16 x 16). The mat-vec kernels above reduce each block across SIMD lanes; with many columns that
// horizontal work, repeated per column, is what made prompt batches 1.2-2.5x slower than q2_K. Here one
// lane holds one weight row instead: each block of the tile's rows is decoded once and transposed into 32
// "W vectors" (W[g] lane r = the four codes 4g..4g+3 of row r), and each column multiplies every W[g] with
// its four activation bytes 4g..4g+3 broadcast to all lanes (vpdpbusd, or maddubs + madd). A column's dot
// products with all rows finish side by side in one register, and one W load serves several columns. Per
// block and column, in every lane r, with the column's Q8_K scale d_y and the sum s_y of its 128 codes:
//     acc[r] = fma((float) isum[r], d[r]*d_y, acc[r]);   acc[r] = fma(m[r], d_y*s_y, acc[r])
// mcq_gemm_tile_ref (below, every build) computes exactly this in plain C, so the SIMD paths equal it bit
// for bit; it differs from the mat-vec kernels only in the order of float additions.
#if defined(__FMA__)
#    define MCQ_CPU_TILE 1
#endif
// bytes ahead of each row's block: the tile's 16 rows are 16 streams the hardware prefetcher alone follows
// late (a block takes ~1000 cycles of arithmetic, so a few blocks ahead suffice)
#define MCQ_TILE_PREFETCH 256

#if defined(MCQ_CPU_TILE)
// the Q8_K side of block kb for each column: its 128 codes, d_y, and d_y * (sum of the codes)
static MCQ_FORCE_INLINE void mcq_tile_cols(const void * const * ys, const int nc, const int kb, const int8_t ** qy,
                                           float * dy, float * sy) {
    for (int c = 0; c < nc; ++c) {
        const block_q8_K * yb   = (const block_q8_K *) ys[c] + kb/2;
        const int          half = kb & 1;
        qy[c] = yb->qs + half*QK_MCQ;
        dy[c] = yb->d;
        sy[c] = yb->d * (float) mcq_q8k_half_sum(yb, half);
    }
}
#endif

#if defined(MCQ_CPU_TILE) && defined(MCQ_CPU_AVX512)
// integer sums of 8 (or 4) columns against the 32 W vectors of a block, 16 rows per register: 8 independent
// vpdpbusd chains hide its latency, and named accumulators keep GCC from shuffling registers between them
#if defined(__GNUC__)
// GCC 12 copies the accumulator of the vpdpbusd intrinsic around in loops (two register moves per
// instruction, measured with perf annotate); the instruction itself, with its accumulator tied, avoids that
static inline __m512i mcq_dpbusd512(__m512i acc, const __m512i a, const __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}
#else
#    define mcq_dpbusd512 _mm512_dpbusd_epi32
#endif
#define MCQ_DPB(s, j) s##j = mcq_dpbusd512(s##j, w, _mm512_set1_epi32((int) mcq_ld32(qy[j] + 4*g)))
static MCQ_FORCE_INLINE void mcq_tile_isum8_avx512(const __m512i * W, const int8_t * const * qy, __m512i * isum) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    for (int g = 0; g < QK_MCQ/4; ++g) {
        const __m512i w = _mm512_load_si512((const void *) (W + g));
        MCQ_DPB(s, 0); MCQ_DPB(s, 1); MCQ_DPB(s, 2); MCQ_DPB(s, 3);
        MCQ_DPB(s, 4); MCQ_DPB(s, 5); MCQ_DPB(s, 6); MCQ_DPB(s, 7);
    }
    isum[0] = s0; isum[1] = s1; isum[2] = s2; isum[3] = s3;
    isum[4] = s4; isum[5] = s5; isum[6] = s6; isum[7] = s7;
}
static MCQ_FORCE_INLINE void mcq_tile_isum4_avx512(const __m512i * W, const int8_t * const * qy, __m512i * isum) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (int g = 0; g < QK_MCQ/4; ++g) {
        const __m512i w = _mm512_load_si512((const void *) (W + g));
        MCQ_DPB(s, 0); MCQ_DPB(s, 1); MCQ_DPB(s, 2); MCQ_DPB(s, 3);
    }
    isum[0] = s0; isum[1] = s1; isum[2] = s2; isum[3] = s3;
}
#undef MCQ_DPB

static MCQ_FORCE_INLINE void mcq_gemm_tile_simd(const int bits, const int n, const uint8_t * w, const size_t w_row,
                                                const int nr, const void * const * ys, const int nc, float * const * dsts) {
    const int    nb = n / QK_MCQ;
    const size_t bb = (size_t) MCQ_HD_BLOCK_BYTES(bits);
    __m512  acc[MCQ_TILE];
    __m512i W[QK_MCQ/4];
    for (int c = 0; c < nc; ++c) {
        acc[c] = _mm512_setzero_ps();
    }
    for (int kb = 0; kb < nb; ++kb) {
        __m512i lo[MCQ_TILE], hi[MCQ_TILE];   // codes 0-63 and 64-127 of each row
        uint16_t d16[MCQ_TILE] = {0}, m16[MCQ_TILE] = {0};
        for (int r = 0; r < MCQ_TILE; ++r) {
            if (r < nr) {
                const uint8_t * blk = w + r*w_row + kb*bb;
                _mm_prefetch((const char *) blk + MCQ_TILE_PREFETCH, _MM_HINT_T0);
                memcpy(d16 + r, blk, 2);
                memcpy(m16 + r, blk + 2, 2);
                __m512i q[2];
                mcq_decode_block_avx512(bits, blk + 4, q);
                lo[r] = q[0];
                hi[r] = q[1];
            } else {
                lo[r] = hi[r] = _mm512_setzero_si512();
            }
        }
        mcmoe_tr16x16_epi32(lo);
        mcmoe_tr16x16_epi32(hi);
        for (int g = 0; g < MCQ_TILE; ++g) {
            W[g] = lo[g];
            W[MCQ_TILE + g] = hi[g];
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) d16));
        const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) m16));

        const int8_t * qy[MCQ_TILE];
        float dy[MCQ_TILE], sy[MCQ_TILE];
        mcq_tile_cols(ys, nc, kb, qy, dy, sy);
        for (int c0 = 0; c0 < nc; ) {
            // groups of 8 columns, then of 4; a last group of 1-3 repeats its first column (results dropped)
            __m512i isum[8];
            const int8_t * q4[4];
            const int left = nc - c0;
            int k;
            if (left >= 8) {
                mcq_tile_isum8_avx512(W, qy + c0, isum);
                k = 8;
            } else if (left >= 4) {
                mcq_tile_isum4_avx512(W, qy + c0, isum);
                k = 4;
            } else {
                for (int j = 0; j < 4; ++j) {
                    q4[j] = qy[c0 + (j < left ? j : 0)];
                }
                mcq_tile_isum4_avx512(W, q4, isum);
                k = left;
            }
            for (int j = 0; j < k; ++j) {
                const int c = c0 + j;
                acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[j]), _mm512_mul_ps(dv, _mm512_set1_ps(dy[c])), acc[c]);
                acc[c] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sy[c]), acc[c]);
            }
            c0 += k;
        }
    }
    const __mmask16 rows = (__mmask16) ((1u << nr) - 1);
    for (int c = 0; c < nc; ++c) {
        _mm512_mask_storeu_ps(dsts[c], rows, acc[c]);
    }
}
#elif defined(MCQ_CPU_TILE)
// 8 x 8 dwords transposed in place: r[i] lane j <-> r[j] lane i
static MCQ_FORCE_INLINE void mcq_tr8x8_epi32(__m256i r[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; ++i) {
        t[2*i]     = _mm256_unpacklo_epi32(r[2*i], r[2*i + 1]);
        t[2*i + 1] = _mm256_unpackhi_epi32(r[2*i], r[2*i + 1]);
    }
    for (int i = 0; i < 2; ++i) {            // u[4i+k], 128-bit lane L: column 4L+k of rows 4i..4i+3
        u[4*i + 0] = _mm256_unpacklo_epi64(t[4*i],     t[4*i + 2]);
        u[4*i + 1] = _mm256_unpackhi_epi64(t[4*i],     t[4*i + 2]);
        u[4*i + 2] = _mm256_unpacklo_epi64(t[4*i + 1], t[4*i + 3]);
        u[4*i + 3] = _mm256_unpackhi_epi64(t[4*i + 1], t[4*i + 3]);
    }
    for (int k = 0; k < 4; ++k) {
        r[k]     = _mm256_permute2x128_si256(u[k], u[4 + k], 0x20);
        r[4 + k] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x31);
    }
}

// Columns per pass over the W vectors: with vpdpbusd 4 (8 int32 accumulators); without, maddubs needs an
// int16 and an int32 accumulator per column and row half, so 2 (AVX2 has 16 registers).
#if defined(MCQ_CPU_VNNI256)
#    define MCQ_TILE_COLS 4
#else
#    define MCQ_TILE_COLS 2
#endif

// integer sums of MCQ_TILE_COLS columns against the W vectors of a block, rows 0-7 and 8-15 in isum[j][0..1];
// named accumulators keep GCC from shuffling registers between them.
#if defined(MCQ_CPU_VNNI256)
#    if defined(__GNUC__)
// the instruction with its accumulator tied, as for mcq_dpbusd512 (AVX-VNNI's VEX encoding)
static inline __m256i mcq_dpbusd256(__m256i acc, const __m256i a, const __m256i b) {
    __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
    return acc;
}
#        define MCQ_DPB256(acc, w, y) mcq_dpbusd256(acc, w, y)
#    elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#        define MCQ_DPB256(acc, w, y) _mm256_dpbusd_epi32(acc, w, y)
#    else
#        define MCQ_DPB256(acc, w, y) _mm256_dpbusd_avx_epi32(acc, w, y)
#    endif
#    define MCQ_COL(j)                                                              \
        {                                                                           \
            const __m256i y = _mm256_set1_epi32((int) mcq_ld32(qy[j] + 4*g));       \
            s##j##0 = MCQ_DPB256(s##j##0, w0, y);                                   \
            s##j##1 = MCQ_DPB256(s##j##1, w1, y);                                   \
        }
static MCQ_FORCE_INLINE void mcq_tile_isum_avx2(__m256i (*W)[2], const int8_t * const * qy, __m256i (*isum)[2]) {
    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00, s30 = s00, s31 = s00;
    for (int g = 0; g < QK_MCQ/4; ++g) {
        const __m256i w0 = _mm256_load_si256(&W[g][0]);
        const __m256i w1 = _mm256_load_si256(&W[g][1]);
        MCQ_COL(0) MCQ_COL(1) MCQ_COL(2) MCQ_COL(3)
    }
    isum[0][0] = s00; isum[0][1] = s01; isum[1][0] = s10; isum[1][1] = s11;
    isum[2][0] = s20; isum[2][1] = s21; isum[3][0] = s30; isum[3][1] = s31;
}
#else
// maddubs sums u8 x s8 pairs in int16: |pair| <= 2*15*128 = 3840, so 8 groups (30720 < 32767) are summed
// in int16 before widening: the same sums as vpdpbusd.
#    define MCQ_COL(j)                                                              \
        {                                                                           \
            const __m256i y = _mm256_set1_epi32((int) mcq_ld32(qy[j] + 4*g));       \
            p##j##0 = _mm256_add_epi16(p##j##0, _mm256_maddubs_epi16(w0, y));       \
            p##j##1 = _mm256_add_epi16(p##j##1, _mm256_maddubs_epi16(w1, y));       \
        }
static MCQ_FORCE_INLINE void mcq_tile_isum_avx2(__m256i (*W)[2], const int8_t * const * qy, __m256i (*isum)[2]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00;
    for (int g8 = 0; g8 < QK_MCQ/4; g8 += 8) {
        __m256i p00 = _mm256_setzero_si256(), p01 = p00, p10 = p00, p11 = p00;
        for (int g = g8; g < g8 + 8; ++g) {
            const __m256i w0 = _mm256_load_si256(&W[g][0]);
            const __m256i w1 = _mm256_load_si256(&W[g][1]);
            MCQ_COL(0) MCQ_COL(1)
        }
        s00 = _mm256_add_epi32(s00, _mm256_madd_epi16(p00, ones));
        s01 = _mm256_add_epi32(s01, _mm256_madd_epi16(p01, ones));
        s10 = _mm256_add_epi32(s10, _mm256_madd_epi16(p10, ones));
        s11 = _mm256_add_epi32(s11, _mm256_madd_epi16(p11, ones));
    }
    isum[0][0] = s00; isum[0][1] = s01; isum[1][0] = s10; isum[1][1] = s11;
}
#endif
#undef MCQ_COL

static MCQ_FORCE_INLINE void mcq_gemm_tile_simd(const int bits, const int n, const uint8_t * w, const size_t w_row,
                                                const int nr, const void * const * ys, const int nc, float * const * dsts) {
    const int    nb = n / QK_MCQ;
    const size_t bb = (size_t) MCQ_HD_BLOCK_BYTES(bits);
    __m256 acc[MCQ_TILE][2];
    __m256i W[QK_MCQ/4][2];                  // W[g][h]: rows 8h..8h+7
    for (int c = 0; c < nc; ++c) {
        acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    }
    for (int kb = 0; kb < nb; ++kb) {
        __m256i dec[MCQ_TILE][4];            // codes 32j..32j+31 of each row
        uint16_t d16[MCQ_TILE] = {0}, m16[MCQ_TILE] = {0};
        for (int r = 0; r < MCQ_TILE; ++r) {
            if (r < nr) {
                const uint8_t * blk = w + r*w_row + kb*bb;
                _mm_prefetch((const char *) blk + MCQ_TILE_PREFETCH, _MM_HINT_T0);
                memcpy(d16 + r, blk, 2);
                memcpy(m16 + r, blk + 2, 2);
                mcq_decode_block_avx2(bits, blk + 4, dec[r]);
            } else {
                dec[r][0] = dec[r][1] = dec[r][2] = dec[r][3] = _mm256_setzero_si256();
            }
        }
        for (int h = 0; h < 2; ++h) {
            for (int j = 0; j < 4; ++j) {    // dwords 8j..8j+7 of rows 8h..8h+7
                __m256i t[8];
                for (int i = 0; i < 8; ++i) {
                    t[i] = dec[8*h + i][j];
                }
                mcq_tr8x8_epi32(t);
                for (int i = 0; i < 8; ++i) {
                    W[8*j + i][h] = t[i];
                }
            }
        }
        __m256 dv[2], mv[2];
        for (int h = 0; h < 2; ++h) {
            dv[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (d16 + 8*h)));
            mv[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (m16 + 8*h)));
        }

        const int8_t * qy[MCQ_TILE];
        float dy[MCQ_TILE], sy[MCQ_TILE];
        mcq_tile_cols(ys, nc, kb, qy, dy, sy);
        for (int c0 = 0; c0 < nc; c0 += MCQ_TILE_COLS) {
            // groups of MCQ_TILE_COLS columns; a last short group repeats its first column (results dropped)
            __m256i isum[MCQ_TILE_COLS][2];
            const int8_t * qg[MCQ_TILE_COLS];
            const int k = nc - c0 < MCQ_TILE_COLS ? nc - c0 : MCQ_TILE_COLS;
            for (int j = 0; j < MCQ_TILE_COLS; ++j) {
                qg[j] = qy[c0 + (j < k ? j : 0)];
            }
            mcq_tile_isum_avx2(W, qg, isum);
            for (int j = 0; j < k; ++j) {
                const int c = c0 + j;
                for (int h = 0; h < 2; ++h) {
                    acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[j][h]), _mm256_mul_ps(dv[h], _mm256_set1_ps(dy[c])), acc[c][h]);
                    acc[c][h] = _mm256_fmadd_ps(mv[h], _mm256_set1_ps(sy[c]), acc[c][h]);
                }
            }
        }
    }
    for (int c = 0; c < nc; ++c) {
        float o[MCQ_TILE];
        _mm256_storeu_ps(o, acc[c][0]);
        _mm256_storeu_ps(o + 8, acc[c][1]);
        memcpy(dsts[c], o, (size_t) nr*sizeof(float));
    }
}
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
    ggml_vec_dot_t ref = use_ref ? (mcn_type_bits(type) ? mcn_cpu_generic_of(type) :
                                   mct_type_bits(type) ? mct_cpu_generic_of(type) : mcq_generic_of(type)) : NULL;
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

void mcq_gemm_tile_ref(enum ggml_type type, int n, const void * w, size_t w_row, int nr, const void * const * ys, int nc,
                       float * const * dsts) {
    const int bits = mcq_type_bits(type);
    GGML_ASSERT(bits != 0 && n % QK_K == 0 && nr >= 1 && nr <= MCQ_TILE && nc >= 1 && nc <= MCQ_TILE);
    const size_t bb = (size_t) MCQ_HD_BLOCK_BYTES(bits);
    for (int c = 0; c < nc; ++c) {
        for (int r = 0; r < nr; ++r) {
            float acc = 0.0f;
            for (int kb = 0; kb < n / QK_MCQ; ++kb) {
                const uint8_t    * blk  = (const uint8_t *) w + r*w_row + kb*bb;
                const block_q8_K * yb   = (const block_q8_K *) ys[c] + kb/2;
                const int          half = kb & 1;
                uint16_t d16, m16;
                memcpy(&d16, blk, 2);
                memcpy(&m16, blk + 2, 2);
                const int isum = mcq_block_isum(bits, blk, yb->qs + half*QK_MCQ);
                const int s    = mcq_q8k_half_sum(yb, half);
                // the tile kernels' order of operations (see the tiles section), fmaf for their fused steps
                acc = fmaf((float) isum, GGML_CPU_FP16_TO_FP32(d16) * yb->d, acc);
                acc = fmaf(GGML_CPU_FP16_TO_FP32(m16), yb->d * (float) s, acc);
            }
            dsts[c][r] = acc;
        }
    }
}

bool mcq_cpu_has_tile(enum ggml_type type) {
#if defined(MCQ_CPU_TILE)
    return mcq_type_bits(type) != 0;
#else
    (void) type;
    return false;
#endif
}

bool mcq_gemm_tile(enum ggml_type type, int n, const void * w, size_t w_row, int nr, const void * const * ys, int nc,
                   float * const * dsts) {
    if (!mcq_cpu_has_tile(type) || n % QK_K != 0 || nr < 1 || nr > MCQ_TILE || nc < 1 || nc > MCQ_TILE) {
        return false;
    }
#if defined(MCQ_CPU_TILE)
    if (nc == 1) {   // a mat-vec (one token routed to an expert): the single-column kernel, with its prefetch
        const ggml_vec_dot_t f = mcq_kernel_of(type);
        for (int r = 0; r < nr; ++r) {
            f(n, dsts[0] + r, 0, (const char *) w + r*w_row, 0, ys[0], 0, 1);
        }
        return true;
    }
    switch (mcq_type_bits(type)) {   // literal widths: one specialised copy per type
        case 1:  mcq_gemm_tile_simd(1, n, (const uint8_t *) w, w_row, nr, ys, nc, dsts); break;
        case 2:  mcq_gemm_tile_simd(2, n, (const uint8_t *) w, w_row, nr, ys, nc, dsts); break;
        case 3:  mcq_gemm_tile_simd(3, n, (const uint8_t *) w, w_row, nr, ys, nc, dsts); break;
        default: mcq_gemm_tile_simd(4, n, (const uint8_t *) w, w_row, nr, ys, nc, dsts); break;
    }
    return true;
#else
    (void) w; (void) w_row; (void) ys; (void) dsts;
    return false;
#endif
}

bool mcq_mul_mat_chunk(enum ggml_type type, int64_t n, const char * w, size_t w_row, const char * y, size_t y_col,
                       char * dst, size_t dst_col, int64_t ir0_start, int64_t ir0_end, int64_t ir1_start, int64_t ir1_end) {
    if (!mcq_cpu_has_tile(type) || n % QK_K != 0) {
        return false;
    }
    for (int64_t iir1 = ir1_start; iir1 < ir1_end; iir1 += MCQ_TILE) {
        const int nc = (int) (ir1_end - iir1 < MCQ_TILE ? ir1_end - iir1 : MCQ_TILE);
        const void * cols[MCQ_TILE];
        for (int c = 0; c < nc; ++c) {
            cols[c] = y + (iir1 + c)*y_col;
        }
        for (int64_t ir0 = ir0_start; ir0 < ir0_end; ir0 += MCQ_TILE) {
            const int nr = (int) (ir0_end - ir0 < MCQ_TILE ? ir0_end - ir0 : MCQ_TILE);
            float * dsts[MCQ_TILE];
            for (int c = 0; c < nc; ++c) {
                dsts[c] = (float *) (dst + (iir1 + c)*dst_col) + ir0;
            }
            GGML_ASSERT(mcq_gemm_tile(type, (int) n, w + ir0*w_row, w_row, nr, cols, nc, dsts));
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
