// mcmoe-gguf: CPU vec_dot of the mcn types against Q8_K activations (see mcn-cpu.h).
//
// ggml_vec_dot_mcnN_q8_K_generic is the scalar reference (any CPU, the tests, and the CPU backend in
// reference mode); ggml_vec_dot_mcnN_q8_K is the kernel of type_traits_cpu, the best this file is compiled
// for (each CPU backend variant of the portable runtime compiles it with its own flags):
//   AVX-512 BW + VL + VNNI (Ice Lake, Sapphire Rapids, Zen 4, ...): a pair of sub-blocks per 512-bit register,
//     scales applied by vpdpwssd;
//   AVX2 (+ AVX-VNNI on Alder Lake-class CPUs: vpdpwssd instead of madd + add);
//   otherwise the generic one under that name (the scheme of ggml-cpu/arch-fallback.h).
// Every path computes the reference's integer sum of each block exactly (see the AVX2 section for the bounds),
// so they differ from the scalar reference only in the order of the float additions. Prompt batches through an
// expert use mcn_gemm_tile (the tiles section: 16 rows x 16 tokens per decode, AVX-512 VNNI builds), whose plain
// C twin mcn_gemm_tile_ref it equals bit for bit.
#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include "mcn-cpu.h"

#include "ggml-cpu-impl.h"
#include "simd-mappings.h"
#include "superblock-cpu.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#if defined(__AVX2__) && !defined(GGML_CPU_GENERIC)
#    define MCN_CPU_AVX2 1
#    if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#        define MCN_CPU_AVX512 1       // 512-bit kernel: a pair of sub-blocks per register, vpdpwssd
#    endif
#    include <immintrin.h>
#    if defined(_MSC_VER)
#        define MCN_FORCE_INLINE __forceinline
#        define MCN_ALIGN32      __declspec(align(32))
#    else
#        define MCN_FORCE_INLINE inline __attribute__((always_inline))
#        define MCN_ALIGN32      __attribute__((aligned(32)))
#    endif
#else
// arch fallback: no SIMD kernel for this target, the generic one is the kernel
#    define ggml_vec_dot_mcn2_q8_K_generic ggml_vec_dot_mcn2_q8_K
#    define ggml_vec_dot_mcn3_q8_K_generic ggml_vec_dot_mcn3_q8_K
#endif

void ggml_vec_dot_mcn2_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mcn3_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// ---------------------------------------------------------------- scalar reference

static inline void mcn_vec_dot_generic_impl(int bits, int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                            const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const uint8_t    * x  = (const uint8_t *) vx;
    const block_q8_K * y  = (const block_q8_K *) vy;
    const int          bb = MCN_HD_BLOCK_BYTES(bits);
    float sumf = 0.0f;
    for (int ib = 0; ib < n / QK_K; ++ib) {
        const uint8_t * blk = x + ib*bb;
        sumf += (mcn_hd_block_d(blk) * y[ib].d) * (float) mcn_hd_block_isum(bits, blk, y[ib].qs);
    }
    *s = sumf;
}

SB_CPU_VEC_DOT(mcn, 2, _generic, mcn_vec_dot_generic_impl)
SB_CPU_VEC_DOT(mcn, 3, _generic, mcn_vec_dot_generic_impl)

// ---------------------------------------------------------------- AVX2 and AVX-512
//
// Both paths compute the reference's integer isum of each block exactly, then sumf += (d d_y) * (float) isum:
//   - codes: a 32-byte load of a 2-bit plane half holds sub-blocks 4h..4h+3 (field k = bits 2k, 2k+1 of each
//     byte). pshufb reads bits 0-3 and 7 of an index byte, so: mcn2 looks a nibble (two fields) up in two
//     tables, one repeating every 4 entries (the low field), one constant over runs of 4 (the high field);
//     mcn3 takes v & 0x33 (fields 0, 2) and (v >> 2) & 0x33 (fields 1, 3), ors in the high bits at bits 2
//     and 6 (from a 16-entry pshufb table indexed by a nibble of the high plane: bit j of a high-plane byte
//     belongs to sub-block j, nibble h to sub-blocks 4h..4h+3), and a further >> 4 (16-bit) moves fields 2,
//     3 down; its table repeats every 8 entries, junk lands only in bits 4-6 and bit 7 stays clear;
//   - levels: pshufb of the offset table U = T - T[0] (T2 + 10: 0..20, T3 + 35: 0..70), unsigned so that
//     maddubs (u8 x s8, adjacent pairs summed in int16) applies: |U*qy + U*qy| <= 2*70*128 = 17920 < 32767,
//     no saturation even for a Q8_K code of -128 (vpdpbusd would not need this bound, maddubs does);
//   - scales: the int16 pairs times s_j (<= 15) summed into int32 by madd / vpdpwssd, exact;
//   - offset: the U sum exceeds the T sum by off * sum_j s_j * (bsums[2j] + bsums[2j+1]) (Q8_K bsums are exact
//     sums of 16 codes, |.| <= 2048): bsums times -off*s_j (>= -525, int16) by one more madd;
//   - reduction: the int32 lanes of four blocks are summed together (hadd; any partial sum is bounded by
//     256*15*70*128 + 16*2048*525 < 5.2e7 < 2^31), and each block's isum is converted once and multiplied by
//     its fp32(d) * d_y as in the reference: only the order of the float additions differs (four chains, by
//     block index mod 4, then a last pair and a last block).

#if defined(MCN_CPU_AVX2)

// A pshufb table (16 bytes) of the offset levels U = T - T[0], from the one definition of T in mcn-common.h,
// and the offset -T[0]. sel 0: U[i mod 2^bits]; sel 1 (mcn2): U[(i >> 2) & 3]. An index byte holding two
// 2-bit codes in bits 0-3 gives the level of the low one with table 0, of the high one with table 1.
static inline __m128i mcn_lut(const int bits, const int sel, int * off) {
    static const int8_t t2[4] = MCN_HD_T2;
    static const int8_t t3[8] = MCN_HD_T3;
    const int8_t * t = bits == 2 ? t2 : t3;
    uint8_t u[16];
    for (int i = 0; i < 16; ++i) {
        u[i] = (uint8_t) (t[(sel ? i >> 2 : i) & ((1 << bits) - 1)] - t[0]);
    }
    *off = -t[0];
    return _mm_loadu_si128((const __m128i *) u);
}

// Software prefetch distance in bytes of weights ahead of the blocks being decoded (as MCQ_PREFETCH: a
// mat-vec streams its matrix once and the hardware prefetcher alone leaves the loop waiting).
#define MCN_PREFETCH 2048

// every line of the k blocks at b0 (k*bb bytes), MCN_PREFETCH ahead (k and bb are literals)
static MCN_FORCE_INLINE void mcn_prefetch(const uint8_t * b0, const size_t k, const size_t bb) {
    for (size_t o = 0; o < k*bb; o += 64) {
        _mm_prefetch((const char *) b0 + MCN_PREFETCH + o, _MM_HINT_T0);
    }
}

// dword k (0..7) = s_k in both of its int16 halves. The 32-bit scale word holds s_k at bit 8k (k < 4) or
// 8(k-4) + 4: cnt = those offsets.
static MCN_FORCE_INLINE __m256i mcn_scales_dup(const uint8_t * blk, const __m256i cnt) {
    const __m256i w = _mm256_set1_epi32((int) sb_ld32(blk + MCN_HD_OFF_SC));
    const __m256i t = _mm256_and_si256(_mm256_srlv_epi32(w, cnt), _mm256_set1_epi32(15));
    return _mm256_or_si256(t, _mm256_slli_epi32(t, 16));
}

// The offset term of a block: bsums[i] (weights 16i..16i+15, sub-block i >> 1) times -off * s_{i >> 1},
// 8 int32. noff: -off in every int16.
static MCN_FORCE_INLINE __m256i mcn_offset_term(const block_q8_K * yb, const __m256i dup, const __m256i noff) {
    return _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *) yb->bsums), _mm256_mullo_epi16(dup, noff));
}

// [A, B, C, D]: the sums of the 8 int32 lanes of a, b, c, d
static MCN_FORCE_INLINE __m128i mcn_isum4(const __m256i a, const __m256i b, const __m256i c, const __m256i d) {
    // a01 a23 b01 b23 | a45 a67 b45 b67, then a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// [A, B, A, B]: the sums of the 8 int32 lanes of a and of b
static MCN_FORCE_INLINE __m128i mcn_isum2(const __m256i a, const __m256i b) {
    const __m256i h = _mm256_hadd_epi32(a, b);
    const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    return _mm_hadd_epi32(t, t);
}

// fp32(d) * d_y of 4 consecutive blocks, as the reference rounds it
static MCN_FORCE_INLINE __m128 mcn_dd4(const uint8_t * b0, const size_t bb, const block_q8_K * y) {
    const __m128 dy = _mm_setr_ps(y[0].d, y[1].d, y[2].d, y[3].d);
#if defined(__F16C__)
    const __m128i h = _mm_setr_epi16((short) sb_ld16(b0), (short) sb_ld16(b0 + bb), (short) sb_ld16(b0 + 2*bb),
                                     (short) sb_ld16(b0 + 3*bb), 0, 0, 0, 0);
    return _mm_mul_ps(_mm_cvtph_ps(h), dy);
#else
    return _mm_mul_ps(_mm_setr_ps(sb_block_d(b0), sb_block_d(b0 + bb), sb_block_d(b0 + 2*bb), sb_block_d(b0 + 3*bb)), dy);
#endif
}

// the sum of the 8 int32 lanes (an odd last block)
static MCN_FORCE_INLINE int mcn_isum1(const __m256i v) {
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 1));
    return _mm_cvtsi128_si32(t);
}

// An empty asm that "changes" v: GCC otherwise (a) rebalances a chain of vector adds into a tree whose leaves
// all stay live (spilled to the stack in the AVX2 kernel) and (b) expands a multiply by the constant -off into
// five shifts and adds.
#if defined(__GNUC__)
#    define MCN_OPAQUE(v) __asm__("" : "+v"(v))
#else
#    define MCN_OPAQUE(v) ((void) 0)
#endif

// sum + the int16 pair products of a and b: one vpdpwssd with AVX-VNNI (Alder Lake-class CPUs), else madd + add
static MCN_FORCE_INLINE __m256i mcn_dpwssd256(__m256i sum, const __m256i a, const __m256i b) {
#if defined(__AVXVNNI__) && defined(__GNUC__)
    // the instruction with its accumulator tied (the intrinsic made GCC 12 copy it around, see mcq-cpu.c)
    __asm__("%{vex%} vpdpwssd %2, %1, %0" : "+x"(sum) : "x"(a), "x"(b));
#elif defined(__AVXVNNI__)
    sum = _mm256_dpwssd_avx_epi32(sum, a, b);
#else
    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(a, b));
    MCN_OPAQUE(sum);   // keeps the chain of adds in order
#endif
    return sum;
}

static MCN_FORCE_INLINE __m128 mcn_madd128(const __m128 a, const __m128 b, const __m128 c) {
#if defined(__FMA__)
    return _mm_fmadd_ps(a, b, c);
#else
    return _mm_add_ps(_mm_mul_ps(a, b), c);
#endif
}

// vpermd's index j in every dword, loaded from memory (one load): GCC otherwise builds each constant from an
// immediate with three instructions (mov, vmovd, vpbroadcastd) in the loop
static MCN_FORCE_INLINE __m256i mcn_dword_index(const int j) {
    MCN_ALIGN32 static const int32_t idx[8][8] = {
        {0, 0, 0, 0, 0, 0, 0, 0}, {1, 1, 1, 1, 1, 1, 1, 1}, {2, 2, 2, 2, 2, 2, 2, 2}, {3, 3, 3, 3, 3, 3, 3, 3},
        {4, 4, 4, 4, 4, 4, 4, 4}, {5, 5, 5, 5, 5, 5, 5, 5}, {6, 6, 6, 6, 6, 6, 6, 6}, {7, 7, 7, 7, 7, 7, 7, 7},
    };
    __m256i v = _mm256_load_si256((const __m256i *) idx[j]);
    MCN_OPAQUE(v);
    return v;
}

// One block's isum as 8 int32 lanes. bits is a literal at every call site. Written in use order: GCC does not
// schedule before register allocation on x86, and AVX2 has 16 registers. lut0 / lut1: tables 0 / 1 of mcn_lut.
static MCN_FORCE_INLINE __m256i mcn_block_avx2(const int bits, const uint8_t * blk, const block_q8_K * yb, const __m256i lut0,
                                               const __m256i lut1, const __m256i cnt, const __m256i noff) {
    const int8_t * qy = yb->qs;

    // mcn3: the high bits of sub-blocks 4h..4h+3 are the nibble h of each high-plane byte; a 16-entry pshufb
    // table per field pair puts them where the fields are: bits 2 and 6 (a: fields 0, 2; b: fields 1, 3)
    __m256i nib0 = _mm256_setzero_si256(), nib1 = nib0, ta = nib0, tb = nib0;
    if (bits == 3) {
        const __m256i hv  = _mm256_loadu_si256((const __m256i *) (blk + MCN_HD_OFF_QH));
        const __m256i m0f = _mm256_set1_epi8(0x0f);
        nib0 = _mm256_and_si256(hv, m0f);
        nib1 = _mm256_and_si256(_mm256_srli_epi16(hv, 4), m0f);
        // [n] = (bit 0 of n) << 2 | (bit 2) << 6, and (bit 1) << 2 | (bit 3) << 6
        ta = _mm256_setr_epi8(0x00, 0x04, 0x00, 0x04, 0x40, 0x44, 0x40, 0x44, 0x00, 0x04, 0x00, 0x04, 0x40, 0x44, 0x40, 0x44,
                              0x00, 0x04, 0x00, 0x04, 0x40, 0x44, 0x40, 0x44, 0x00, 0x04, 0x00, 0x04, 0x40, 0x44, 0x40, 0x44);
        tb = _mm256_setr_epi8(0x00, 0x00, 0x04, 0x04, 0x00, 0x00, 0x04, 0x04, 0x40, 0x40, 0x44, 0x44, 0x40, 0x40, 0x44, 0x44,
                              0x00, 0x00, 0x04, 0x04, 0x00, 0x00, 0x04, 0x04, 0x40, 0x40, 0x44, 0x44, 0x40, 0x40, 0x44, 0x44);
    }
    // scales: dup holds s_k in dword k (both int16 halves); vpermd broadcasts one
    const __m256i dup = mcn_scales_dup(blk, cnt);
    // sub-block j from its 32 offset levels u
#define MCN_SUB(j, u)                                                                                                \
    {                                                                                                                \
        const __m256i sc = _mm256_permutevar8x32_epi32(dup, mcn_dword_index(j));                                     \
        const __m256i p  = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *) (qy + 32*(j))));            \
        sum = mcn_dpwssd256(sum, p, sc);                                                                             \
    }
    // mcn2: each nibble of a plane byte holds two codes, read by the two tables (no further masking)
#define MCN_HALF2(h)                                                                                                 \
    {                                                                                                                \
        const __m256i m0f = _mm256_set1_epi8(0x0f);                                                                  \
        const __m256i v   = _mm256_loadu_si256((const __m256i *) (blk + MCN_HD_OFF_QS + 32*(h)));                    \
        const __m256i lo  = _mm256_and_si256(v, m0f);                                                                \
        const __m256i hi  = _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f);                                         \
        MCN_SUB(4*(h) + 0, _mm256_shuffle_epi8(lut0, lo))                                                            \
        MCN_SUB(4*(h) + 1, _mm256_shuffle_epi8(lut1, lo))                                                            \
        MCN_SUB(4*(h) + 2, _mm256_shuffle_epi8(lut0, hi))                                                            \
        MCN_SUB(4*(h) + 3, _mm256_shuffle_epi8(lut1, hi))                                                            \
    }
    // mcn3: 3-bit indices (see the comment of this section)
#define MCN_HALF3(h, nib)                                                                                            \
    {                                                                                                                \
        const __m256i m33 = _mm256_set1_epi8(0x33);                                                                  \
        const __m256i v   = _mm256_loadu_si256((const __m256i *) (blk + MCN_HD_OFF_QS + 32*(h)));                    \
        const __m256i a   = _mm256_or_si256(_mm256_and_si256(v, m33), _mm256_shuffle_epi8(ta, nib));                 \
        const __m256i b   = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 2), m33), _mm256_shuffle_epi8(tb, nib)); \
        MCN_SUB(4*(h) + 0, _mm256_shuffle_epi8(lut0, a))                                                             \
        MCN_SUB(4*(h) + 1, _mm256_shuffle_epi8(lut0, b))                                                             \
        MCN_SUB(4*(h) + 2, _mm256_shuffle_epi8(lut0, _mm256_srli_epi16(a, 4)))                                       \
        MCN_SUB(4*(h) + 3, _mm256_shuffle_epi8(lut0, _mm256_srli_epi16(b, 4)))                                       \
    }
    __m256i sum = mcn_offset_term(yb, dup, noff);
    if (bits == 2) {
        MCN_HALF2(0)
        MCN_HALF2(1)
    } else {
        MCN_HALF3(0, nib0)
        MCN_HALF3(1, nib1)
    }
#undef MCN_HALF2
#undef MCN_HALF3
#undef MCN_SUB
    return sum;
}

#if defined(MCN_CPU_AVX512)
// 16 int32 lanes -> 8
static MCN_FORCE_INLINE __m256i mcn_fold512(const __m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

// The constants of the 512-bit block kernel
typedef struct {
    __m512i lut, sh, thi, p01, p23, p45, p67;
} mcn_avx512_consts;

// The offset levels U of a block's 256 weights in weight order: u[k] = weights 64k..64k+63 (sub-blocks 2k, 2k+1),
// the plane half broadcast to both 256-bit halves. mcn2: its low / high nibbles, read by tables 0 | 1 of mcn_lut
// (lut: table 0 in the low 256 bits, table 1 in the high ones). mcn3: (v >> (0 | 2)) & 0x33 holds fields 0, 2 |
// 1, 3 (a further >> 4 gives the latter ones), with the high bits placed by the nibble tables of the AVX2 kernel
// (thi: the a | b tables).
static MCN_FORCE_INLINE void mcn_decode_avx512(const int bits, const uint8_t * blk, const mcn_avx512_consts * c,
                                               __m512i u[4]) {
    const __m512i m0f = _mm512_set1_epi8(0x0f);
    const __m512i v0  = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (blk + MCN_HD_OFF_QS)));
    const __m512i v1  = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (blk + MCN_HD_OFF_QS + 32)));
    if (bits == 2) {
        u[0] = _mm512_shuffle_epi8(c->lut, _mm512_and_si512(v0, m0f));
        u[1] = _mm512_shuffle_epi8(c->lut, _mm512_and_si512(_mm512_srli_epi16(v0, 4), m0f));
        u[2] = _mm512_shuffle_epi8(c->lut, _mm512_and_si512(v1, m0f));
        u[3] = _mm512_shuffle_epi8(c->lut, _mm512_and_si512(_mm512_srli_epi16(v1, 4), m0f));
    } else {
        const __m512i m33 = _mm512_set1_epi8(0x33);
        const __m512i hv  = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (blk + MCN_HD_OFF_QH)));
        const __m512i h0  = _mm512_shuffle_epi8(c->thi, _mm512_and_si512(hv, m0f));
        const __m512i h1  = _mm512_shuffle_epi8(c->thi, _mm512_and_si512(_mm512_srli_epi16(hv, 4), m0f));
        const __m512i a0  = _mm512_ternarylogic_epi64(_mm512_srlv_epi64(v0, c->sh), m33, h0, 0xEA);   // (v & 0x33) | h
        const __m512i a1  = _mm512_ternarylogic_epi64(_mm512_srlv_epi64(v1, c->sh), m33, h1, 0xEA);
        u[0] = _mm512_shuffle_epi8(c->lut, a0);
        u[1] = _mm512_shuffle_epi8(c->lut, _mm512_srli_epi16(a0, 4));
        u[2] = _mm512_shuffle_epi8(c->lut, a1);
        u[3] = _mm512_shuffle_epi8(c->lut, _mm512_srli_epi16(a1, 4));
    }
}

// One block's isum as 16 int32 lanes: a register per pair of sub-blocks (0,1) (2,3) (4,5) (6,7) (mcn_decode_avx512).
// The scale pair by vpermd of the duplicated scales; U * qy pairs by maddubs, times the scales and accumulated by
// vpdpwssd.
static MCN_FORCE_INLINE __m512i mcn_block_avx512(const int bits, const uint8_t * blk, const block_q8_K * yb,
                                                 const mcn_avx512_consts * c, const __m256i cnt, const __m256i noff) {
    __m512i u[4];
    mcn_decode_avx512(bits, blk, c, u);
    const __m512i u01 = u[0], u23 = u[1], u45 = u[2], u67 = u[3];
    const __m256i dup  = mcn_scales_dup(blk, cnt);
    const __m512i dupz = _mm512_zextsi256_si512(dup);
    const __m512i bs   = _mm512_maskz_loadu_epi16((__mmask32) 0xffff, yb->bsums);   // zeros above bsums
    // three short chains (vpdpwssd has a latency of 5): the offset term, pairs 0 and 2, pairs 1 and 3
#define MCN_P(u, o) _mm512_maddubs_epi16(u, _mm512_loadu_si512((const void *) (yb->qs + (o))))
#define MCN_S(p)    _mm512_permutexvar_epi32(c->p, dupz)
    __m512i s0 = _mm512_madd_epi16(MCN_P(u01,   0), MCN_S(p01));
    __m512i s1 = _mm512_madd_epi16(MCN_P(u23,  64), MCN_S(p23));
    s0 = _mm512_dpwssd_epi32(s0, MCN_P(u45, 128), MCN_S(p45));
    s1 = _mm512_dpwssd_epi32(s1, MCN_P(u67, 192), MCN_S(p67));
#undef MCN_P
#undef MCN_S
    const __m512i s2 = _mm512_madd_epi16(bs, _mm512_zextsi256_si512(_mm256_mullo_epi16(dup, noff)));
    return _mm512_add_epi32(_mm512_add_epi32(s0, s1), s2);
}

// the constants of mcn_block_avx512 / mcn_decode_avx512 for a type (lut0 / lut1: tables 0 / 1 of mcn_lut)
static MCN_FORCE_INLINE void mcn_avx512_setup(const int bits, const __m128i lut0, const __m128i lut1, mcn_avx512_consts * c) {
    c->lut = bits == 2 ? _mm512_inserti64x4(_mm512_broadcast_i32x4(lut0), _mm256_broadcastsi128_si256(lut1), 1)
                      : _mm512_broadcast_i32x4(lut0);
    c->sh  = _mm512_set_epi64(2, 2, 2, 2, 0, 0, 0, 0);            // low | high 256 bits: fields 0, 2 | 1, 3
    // high-bit tables, low | high 256 bits: the a | b table of the AVX2 kernel
    c->thi = _mm512_inserti64x4(_mm512_broadcast_i32x4(_mm_setr_epi8(0x00, 0x04, 0x00, 0x04, 0x40, 0x44, 0x40, 0x44,
                                                                    0x00, 0x04, 0x00, 0x04, 0x40, 0x44, 0x40, 0x44)),
                               _mm256_broadcastsi128_si256(_mm_setr_epi8(0x00, 0x00, 0x04, 0x04, 0x00, 0x00, 0x04, 0x04,
                                                                         0x40, 0x40, 0x44, 0x44, 0x40, 0x40, 0x44, 0x44)), 1);
    c->p01 = _mm512_inserti64x4(_mm512_set1_epi32(0), _mm256_set1_epi32(1), 1);   // scale dword j | j + 1
    c->p23 = _mm512_inserti64x4(_mm512_set1_epi32(2), _mm256_set1_epi32(3), 1);
    c->p45 = _mm512_inserti64x4(_mm512_set1_epi32(4), _mm256_set1_epi32(5), 1);
    c->p67 = _mm512_inserti64x4(_mm512_set1_epi32(6), _mm256_set1_epi32(7), 1);
}
#endif

// bits is a literal at every call site: the compiler specializes this per type.
static MCN_FORCE_INLINE void mcn_vec_dot_simd_impl(const int bits, const int n, float * GGML_RESTRICT s,
                                                   const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const int          nb = n / QK_K;
    const size_t       bb = (size_t) MCN_HD_BLOCK_BYTES(bits);
    const uint8_t    * x  = (const uint8_t *) vx;
    const block_q8_K * y  = (const block_q8_K *) vy;

    int off;
    const __m128i lut0 = mcn_lut(bits, 0, &off);
    const __m128i lut1 = mcn_lut(bits, 1, &off);
    const __m256i cnt  = _mm256_setr_epi32(0, 8, 16, 24, 4, 12, 20, 28);
    __m256i       noff = _mm256_set1_epi16((short) -off);
    MCN_OPAQUE(noff);
#if defined(MCN_CPU_AVX512)
    mcn_avx512_consts c;
    mcn_avx512_setup(bits, lut0, lut1, &c);
#    define MCN_BLOCK(b, yb) mcn_fold512(mcn_block_avx512(bits, b, yb, &c, cnt, noff))
#else
    const __m256i l0 = _mm256_broadcastsi128_si256(lut0);
    const __m256i l1 = _mm256_broadcastsi128_si256(lut1);
#    define MCN_BLOCK(b, yb) mcn_block_avx2(bits, b, yb, l0, l1, cnt, noff)
#endif

    // four blocks per iteration: their isums are reduced together; then a pair, then a last block
    __m128 acc = _mm_setzero_ps();
    int ib = 0;
    for (; ib + 4 <= nb; ib += 4) {
        const uint8_t * b0 = x + ib*bb;
        mcn_prefetch(b0, 4, bb);
        const __m256i i0 = MCN_BLOCK(b0,        y + ib);
        const __m256i i1 = MCN_BLOCK(b0 +   bb, y + ib + 1);
        const __m256i i2 = MCN_BLOCK(b0 + 2*bb, y + ib + 2);
        const __m256i i3 = MCN_BLOCK(b0 + 3*bb, y + ib + 3);
        acc = mcn_madd128(mcn_dd4(b0, bb, y + ib), _mm_cvtepi32_ps(mcn_isum4(i0, i1, i2, i3)), acc);
    }
    if (ib + 2 <= nb) {
        const uint8_t * b0 = x + ib*bb;
        const __m256i i0 = MCN_BLOCK(b0,      y + ib);
        const __m256i i1 = MCN_BLOCK(b0 + bb, y + ib + 1);
        const __m128  dd = _mm_setr_ps(sb_block_d(b0) * y[ib].d, sb_block_d(b0 + bb) * y[ib + 1].d, 0.0f, 0.0f);
        acc = mcn_madd128(dd, _mm_cvtepi32_ps(mcn_isum2(i0, i1)), acc);
        ib += 2;
    }
    acc = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
    float sumf = _mm_cvtss_f32(acc) + _mm_cvtss_f32(_mm_shuffle_ps(acc, acc, 1));
    if (ib < nb) {
        const uint8_t * b0 = x + ib*bb;
        sumf += (sb_block_d(b0) * y[ib].d) * (float) mcn_isum1(MCN_BLOCK(b0, y + ib));
    }
#undef MCN_BLOCK
    *s = sumf;
}

// ---------------------------------------------------------------- tiles (prompt batches)
//
// Up to MCN_TILE rows x MCN_TILE columns (mul_mat_id's batched path: the tokens routed to one expert). Each row's
// block is decoded once for all columns (mcn_decode_avx512: the offset levels U = T[q] + off, weight order), the
// rows transposed so that one 512-bit lane holds one row (W[g], lane r: weights 4g..4g+3 of row r), and every
// column's codes broadcast a dword at a time into vpdpbusd (u8 U x s8 qy, exact int32, 8 independent chains: one
// per sub-block). Per sub-block j and lane r: t_j = sum U qy - off (bsums[2j] + bsums[2j+1]) = sum T qy, times s_j
// into the block's isum: the reference's integer, exactly (|isum| < 2^31 as in the mat-vec). Then, per block in
// order, acc = fma((float) isum, fp32(d) * d_y, acc). mcn_gemm_tile_ref does the same in plain C with fmaf, so the
// two agree bit for bit; they differ from the mat-vec kernels only in the float rounding of that last step.
// AVX-512 only: where the mat-vec is AVX2 the batched path keeps calling it per column (mcn_cpu_has_tile false).

#if defined(MCN_CPU_AVX512)
#    include "mcmoe-simd.h"
#    define MCN_CPU_TILE 1
// bytes ahead of each row's block (as MCQ_TILE_PREFETCH: 16 rows are 16 streams the prefetcher follows late)
#    define MCN_TILE_PREFETCH 512

static MCN_FORCE_INLINE void mcn_gemm_tile_avx512(const int bits, const int n, const uint8_t * w, const size_t w_row, const int nr,
                                 const void * const * ys, const int nc, float * const * dsts) {
    const int    nb = n / QK_K;
    const size_t bb = (size_t) MCN_HD_BLOCK_BYTES(bits);
    int off;
    const __m128i lut0 = mcn_lut(bits, 0, &off);
    const __m128i lut1 = mcn_lut(bits, 1, &off);
    mcn_avx512_consts c;
    mcn_avx512_setup(bits, lut0, lut1, &c);

    __m512  acc[MCN_TILE];
    for (int k = 0; k < nc; ++k) {
        acc[k] = _mm512_setzero_ps();
    }
    for (int kb = 0; kb < nb; ++kb) {
        int32_t sc[MCN_HD_NSUB][MCN_TILE] = {{0}};       // s_j of row r (0 for rows past nr)
        float   dv[MCN_TILE] = {0};
        __m512i U[4][MCN_TILE];                         // U[q][r]: weights 64q..64q+63 of row r; then transposed
        for (int r = 0; r < MCN_TILE; ++r) {
            if (r < nr) {
                const uint8_t * blk = w + r*w_row + kb*bb;
                _mm_prefetch((const char *) blk + MCN_TILE_PREFETCH, _MM_HINT_T0);
                __m512i u[4];
                mcn_decode_avx512(bits, blk, &c, u);
                for (int q = 0; q < 4; ++q) {
                    U[q][r] = u[q];
                }
                dv[r] = sb_block_d(blk);
                for (int j = 0; j < MCN_HD_NSUB; ++j) {
                    sc[j][r] = mcn_hd_scale(blk, j);
                }
            } else {
                for (int q = 0; q < 4; ++q) {
                    U[q][r] = _mm512_setzero_si512();
                }
            }
        }
        for (int q = 0; q < 4; ++q) {
            mcmoe_tr16x16_epi32(U[q]);                  // U[q][g], lane r: weights 64q + 4g..64q + 4g + 3 of row r
        }
        const __m512i * W = &U[0][0];                   // W[g]: dword g (0..63) of every row
        const __m512 d16 = _mm512_loadu_ps(dv);
        for (int k = 0; k < nc; ++k) {
            const block_q8_K * yb = (const block_q8_K *) ys[k] + kb;
            __m512i a[MCN_HD_NSUB];
            for (int j = 0; j < MCN_HD_NSUB; ++j) {
                a[j] = _mm512_setzero_si512();
            }
            for (int g = 0; g < 8; ++g) {               // dword g of every sub-block: 8 independent chains
                for (int j = 0; j < MCN_HD_NSUB; ++j) {
                    a[j] = _mm512_dpbusd_epi32(a[j], W[8*j + g], _mm512_set1_epi32((int) sb_ld32((const uint8_t *) yb->qs + 32*j + 4*g)));
                }
            }
            __m512i isum = _mm512_setzero_si512();
            for (int j = 0; j < MCN_HD_NSUB; ++j) {
                const __m512i t = _mm512_sub_epi32(a[j], _mm512_set1_epi32(off*(yb->bsums[2*j] + yb->bsums[2*j + 1])));
                isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(_mm512_loadu_si512((const void *) sc[j]), t));
            }
            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d16, _mm512_set1_ps(yb->d)), acc[k]);
        }
    }
    for (int k = 0; k < nc; ++k) {
        float out[MCN_TILE];
        _mm512_storeu_ps(out, acc[k]);
        memcpy(dsts[k], out, (size_t) nr*sizeof(float));
    }
}

// one specialization per type (bits a literal, as for the mat-vec kernels)
static void mcn_gemm_tile_mcn2(const int n, const uint8_t * w, const size_t w_row, const int nr, const void * const * ys,
                               const int nc, float * const * dsts) {
    mcn_gemm_tile_avx512(2, n, w, w_row, nr, ys, nc, dsts);
}

static void mcn_gemm_tile_mcn3(const int n, const uint8_t * w, const size_t w_row, const int nr, const void * const * ys,
                               const int nc, float * const * dsts) {
    mcn_gemm_tile_avx512(3, n, w, w_row, nr, ys, nc, dsts);
}
#endif

#if defined(MCN_CPU_AVX512)
#    define MCN_SIMD_NAME "avx512-vnni"
#else
#    define MCN_SIMD_NAME "avx2"
#endif

SB_CPU_VEC_DOT(mcn, 2, , mcn_vec_dot_simd_impl)
SB_CPU_VEC_DOT(mcn, 3, , mcn_vec_dot_simd_impl)

#else
#    define MCN_SIMD_NAME "scalar"
#endif // MCN_CPU_AVX2

// ---------------------------------------------------------------- selection, test entry points

ggml_vec_dot_t mcn_cpu_generic_of(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCN2: return ggml_vec_dot_mcn2_q8_K_generic;
        case GGML_TYPE_MCN3: return ggml_vec_dot_mcn3_q8_K_generic;
        default:             return NULL;
    }
}

static ggml_vec_dot_t mcn_kernel_of(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCN2: return ggml_vec_dot_mcn2_q8_K;
        case GGML_TYPE_MCN3: return ggml_vec_dot_mcn3_q8_K;
        default:             return NULL;
    }
}

SB_CPU_TEST_ENTRY_POINTS(mcn, MCN_SIMD_NAME)

void mcn_gemm_tile_ref(enum ggml_type type, int n, const void * w, size_t w_row, int nr, const void * const * ys, int nc,
                       float * const * dsts) {
    const int bits = mcn_type_bits(type);
    GGML_ASSERT(bits != 0 && n % QK_K == 0 && nr >= 1 && nr <= MCN_TILE && nc >= 1 && nc <= MCN_TILE);
    const size_t bb = (size_t) MCN_HD_BLOCK_BYTES(bits);
    for (int k = 0; k < nc; ++k) {
        for (int r = 0; r < nr; ++r) {
            float acc = 0.0f;
            for (int kb = 0; kb < n / QK_K; ++kb) {
                const uint8_t    * blk = (const uint8_t *) w + r*w_row + kb*bb;
                const block_q8_K * yb  = (const block_q8_K *) ys[k] + kb;
                // the tile kernel's order of operations, fmaf for its fused step
                acc = fmaf((float) mcn_hd_block_isum(bits, blk, yb->qs), mcn_hd_block_d(blk) * yb->d, acc);
            }
            dsts[k][r] = acc;
        }
    }
}

bool mcn_cpu_has_tile(enum ggml_type type) {
#if defined(MCN_CPU_TILE)
    return mcn_type_bits(type) != 0;
#else
    (void) type;
    return false;
#endif
}

bool mcn_gemm_tile(enum ggml_type type, int n, const void * w, size_t w_row, int nr, const void * const * ys, int nc,
                   float * const * dsts) {
    if (!mcn_cpu_has_tile(type) || n % QK_K != 0 || nr < 1 || nr > MCN_TILE || nc < 1 || nc > MCN_TILE) {
        return false;
    }
#if defined(MCN_CPU_TILE)
    if (nc == 1) {   // a mat-vec (one token routed to an expert): the single-column kernel, with its prefetch
        const ggml_vec_dot_t f = mcn_kernel_of(type);
        for (int r = 0; r < nr; ++r) {
            f(n, dsts[0] + r, 0, (const char *) w + r*w_row, 0, ys[0], 0, 1);
        }
        return true;
    }
    (mcn_type_bits(type) == 2 ? mcn_gemm_tile_mcn2 : mcn_gemm_tile_mcn3)(n, (const uint8_t *) w, w_row, nr, ys, nc, dsts);
    return true;
#else
    (void) w; (void) w_row; (void) ys; (void) dsts;
    return false;
#endif
}
