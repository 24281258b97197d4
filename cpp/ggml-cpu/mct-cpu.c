// mcmoe-gguf: CPU vec_dot of the mct trellis types against Q8_K activations (see mct-cpu.h).
//
// ggml_vec_dot_mctK_q8_K_generic is the scalar reference (any CPU, the tests, the CPU backend in reference mode);
// ggml_vec_dot_mctK_q8_K is the kernel of type_traits_cpu, the best this file is compiled for (each CPU variant
// of the portable runtime compiles it with its own flags):
//   AVX-512 BW: 16 weights per 512-bit register;
//   AVX2: 8 weights per 256-bit register;
//   otherwise the generic one under that name (the scheme of ggml-cpu/arch-fallback.h).
// A weight's window sits at a fixed place in its sequence (bit k t - (12 - k), mct-common.h), so one constant
// shuffle per group of weights gathers every lane's three window bytes from the sequence's 8k bytes (one 16-byte
// source, two for k = 3), a per-lane shift and a 12-bit mask give the state, one multiply-add and a mask the four
// 6-bit fields whose byte sum is V + 126. maddubs multiplies those bytes by the lane's activation repeated four
// times (u8 x s8, pairs summed: |.| <= 2 * 63 * 128 < 2^15, no saturation), two groups of a slice are added in int16
// (<= 32256) and madd by the slice scale (<= 15) sums into int32 lanes (each < 8 * 2 * 32256 * 15 < 2^31). The +126
// offset leaves as 126 * sum_j s_j * (bsums of slice j), one madd per block against the Q8_K bsums, subtracted in
// the lanes. The block's integer sum is exact, and it is scaled and added exactly as the reference does, so every
// path returns the reference's float bit for bit.
#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include "mct-cpu.h"

#include "ggml-cpu-impl.h"
#include "simd-mappings.h"
#include "superblock-cpu.h"

#include <assert.h>

#if defined(__AVX2__) && !defined(GGML_CPU_GENERIC)
#    define MCT_CPU_AVX2 1
#    if defined(__AVX512F__) && defined(__AVX512BW__)
#        define MCT_CPU_AVX512 1
#    endif
#    include <immintrin.h>
#    if defined(_MSC_VER)
#        define MCT_FORCE_INLINE __forceinline
#    else
#        define MCT_FORCE_INLINE inline __attribute__((always_inline))
#    endif
#else
// arch fallback: no SIMD kernel for this target, the generic one is the kernel
#    define ggml_vec_dot_mct1_q8_K_generic ggml_vec_dot_mct1_q8_K
#    define ggml_vec_dot_mct2_q8_K_generic ggml_vec_dot_mct2_q8_K
#    define ggml_vec_dot_mct3_q8_K_generic ggml_vec_dot_mct3_q8_K
#endif

void ggml_vec_dot_mct1_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mct2_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_mct3_q8_K_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// ---------------------------------------------------------------- scalar reference

static inline void mct_vec_dot_generic_impl(int k, int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                            const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const uint8_t    * x  = (const uint8_t *) vx;
    const block_q8_K * y  = (const block_q8_K *) vy;
    const int          bb = MCT_HD_BLOCK_BYTES(k);
    float sumf = 0.0f;
    for (int ib = 0; ib < n / QK_K; ++ib) {
        const uint8_t * blk = x + ib*bb;
        sumf += (mcn_hd_block_d(blk) * y[ib].d) * (float) mct_hd_block_isum(k, blk, y[ib].qs);
    }
    *s = sumf;
}

SB_CPU_VEC_DOT(mct, 1, _generic, mct_vec_dot_generic_impl)
SB_CPU_VEC_DOT(mct, 2, _generic, mct_vec_dot_generic_impl)
SB_CPU_VEC_DOT(mct, 3, _generic, mct_vec_dot_generic_impl)

// ---------------------------------------------------------------- AVX2 and AVX-512

#if defined(MCT_CPU_AVX2)

// Where weight t (0..63) of a sequence finds its window: 4 shuffle indices into the sequence's bytes 0..15 (lo) and
// 16..31 (hi, k = 3), 0x80 (a zero byte) where the other source or no byte is meant, and the shift of its 12 bits.
// Computed from the same window rule as mct_hd_state (and tested through the kernels against it).
struct mct_cpu_tab {
    uint8_t  lo[64*4];
    uint8_t  hi[64*4];
    uint32_t shift[64];
};

static void mct_cpu_tab_init(int k, struct mct_cpu_tab * tb) {
    const int nbytes = 8*k;
    for (int t = 0; t < 64; ++t) {
        int p = k*t - (MCT_HD_STATE_BITS - k);
        p += p < 0 ? 8*nbytes : 0;
        for (int b = 0; b < 4; ++b) {
            const int byte = ((p >> 3) + b) % nbytes;
            tb->lo[4*t + b] = b < 3 && byte < 16 ? (uint8_t) byte : 0x80;
            tb->hi[4*t + b] = b < 3 && byte >= 16 ? (uint8_t) (byte - 16) : 0x80;
        }
        tb->shift[t] = (uint32_t) (p & 7);
    }
}

static const struct mct_cpu_tab * mct_cpu_tab(int k) {
    static struct mct_cpu_tab tabs[3];
    static int ready[3];
#if defined(__GNUC__)
    if (!__atomic_load_n(&ready[k - 1], __ATOMIC_ACQUIRE)) {
        mct_cpu_tab_init(k, &tabs[k - 1]);   // concurrent first calls write the same bytes
        __atomic_store_n(&ready[k - 1], 1, __ATOMIC_RELEASE);
    }
#else
    if (!((volatile int *) ready)[k - 1]) {
        mct_cpu_tab_init(k, &tabs[k - 1]);
        ((volatile int *) ready)[k - 1] = 1;
    }
#endif
    return &tabs[k - 1];
}

// The block's eight slice scales, each twice, as 16 int16 times 126: [126 s0, 126 s0, 126 s1, ..., 126 s7] (Q8_K
// keeps one bsum per 16 activations, two per slice), so one madd with the bsums gives the +126 offset that the
// kernels' V + 126 adds to the block's sum, per slice (|.| <= 2 * 2048 * 1890 < 2^31).
static inline __m256i mct_offset_weights(uint32_t sc) {
    const uint64_t lo = sc & 0x0F0F0F0Fu;                  // s0..s3 (low nibbles of bytes 2-5)
    const uint64_t hi = (sc >> 4) & 0x0F0F0F0Fu;           // s4..s7
    const __m128i  s8 = _mm_cvtsi64_si128((long long) (lo | (hi << 32)));
    return _mm256_mullo_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(s8, s8)), _mm256_set1_epi16(126));
}

// 126 * s_j * (bsums[2j] + bsums[2j+1]) for j = 0..7, as 8 int32
static inline __m256i mct_offset8(uint32_t sc, const block_q8_K * yb) {
    return _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *) yb->bsums), mct_offset_weights(sc));
}

// Per slice the level bytes of its weights are multiplied by their activations (maddubs: u8 x s8, byte pairs summed
// into int16, |.| <= 2 * 63 * 128 = 16128) and two such products added in int16 (|.| <= 32256, no overflow), then
// multiplied by the slice scale into int32 (madd): one madd per two groups of weights.

#if defined(MCT_CPU_AVX512)
// 16 weights per register: groups g = 0..3 of a 64-sequence, g = 0, 1 in slice 2r and g = 2, 3 in slice 2r + 1
static MCT_FORCE_INLINE int mct_block_isum_simd(const int k, const uint8_t * blk, const block_q8_K * yb,
                                                 const struct mct_cpu_tab * tb) {
    const __m512i mask12 = _mm512_set1_epi32(0xFFF);
    const __m512i mul    = _mm512_set1_epi32((int) MCT_HD_HASH_MUL);
    const __m512i add    = _mm512_set1_epi32((int) MCT_HD_HASH_ADD);
    const __m512i m6     = _mm512_set1_epi32(0x3F3F3F3F);
    const __m512i rep    = _mm512_set_epi32(0x0F0F0F0F, 0x0E0E0E0E, 0x0D0D0D0D, 0x0C0C0C0C, 0x0B0B0B0B, 0x0A0A0A0A,
                                            0x09090909, 0x08080808, 0x07070707, 0x06060606, 0x05050505, 0x04040404,
                                            0x03030303, 0x02020202, 0x01010101, 0x00000000);
    const uint32_t sc = sb_ld32(blk + MCN_HD_OFF_SC);
    // the offset enters the lanes first, so the block needs one reduction
    __m512i acc = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_zextsi256_si512(mct_offset8(sc, yb)));
    for (int r = 0; r < 4; ++r) {
        const uint8_t * seq = blk + MCT_HD_OFF_QS + 8*k*r;
        const __m512i src_lo = _mm512_broadcast_i32x4(k == 1 ? _mm_loadl_epi64((const __m128i *) seq)
                                                             : _mm_loadu_si128((const __m128i *) seq));
        const __m512i src_hi = k == 3 ? _mm512_broadcast_i32x4(_mm_loadl_epi64((const __m128i *) (seq + 16))) : src_lo;
        for (int half = 0; half < 2; ++half) {
            const int j = 2*r + half;
            __m512i p = _mm512_setzero_si512();
            for (int g = 2*half; g < 2*half + 2; ++g) {
                const int n0 = 64*r + 16*g;
                __m512i w = _mm512_shuffle_epi8(src_lo, _mm512_loadu_si512((const void *) (tb->lo + 64*g)));
                if (k == 3) {
                    w = _mm512_or_si512(w, _mm512_shuffle_epi8(src_hi, _mm512_loadu_si512((const void *) (tb->hi + 64*g))));
                }
                const __m512i st = _mm512_and_si512(_mm512_srlv_epi32(w, _mm512_loadu_si512((const void *) (tb->shift + 16*g))), mask12);
                const __m512i h  = _mm512_and_si512(_mm512_add_epi32(_mm512_mullo_epi32(st, mul), add), m6);
                const __m512i q  = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *) (yb->qs + n0))), rep);
                p = _mm512_add_epi16(p, _mm512_maddubs_epi16(h, q));
            }
            const __m512i sj = _mm512_set1_epi16((short) ((sc >> (8*(j & 3) + 4*(j >> 2))) & 15));
            acc = _mm512_add_epi32(acc, _mm512_madd_epi16(p, sj));
        }
    }
    return _mm512_reduce_add_epi32(acc);
}
#    define MCT_SIMD_NAME "avx512"
#else
// 8 weights per register: groups g = 0..7 of a 64-sequence (4 per slice), added in int16 two at a time
static MCT_FORCE_INLINE int mct_block_isum_simd(const int k, const uint8_t * blk, const block_q8_K * yb,
                                                 const struct mct_cpu_tab * tb) {
    const __m256i mask12 = _mm256_set1_epi32(0xFFF);
    const __m256i mul    = _mm256_set1_epi32((int) MCT_HD_HASH_MUL);
    const __m256i add    = _mm256_set1_epi32((int) MCT_HD_HASH_ADD);
    const __m256i m6     = _mm256_set1_epi32(0x3F3F3F3F);
    const __m256i rep    = _mm256_set_epi32(0x07070707, 0x06060606, 0x05050505, 0x04040404,
                                            0x03030303, 0x02020202, 0x01010101, 0x00000000);
    const uint32_t sc = sb_ld32(blk + MCN_HD_OFF_SC);
    __m256i acc = _mm256_sub_epi32(_mm256_setzero_si256(), mct_offset8(sc, yb));
    for (int r = 0; r < 4; ++r) {
        const uint8_t * seq = blk + MCT_HD_OFF_QS + 8*k*r;
        const __m256i src_lo = _mm256_broadcastsi128_si256(k == 1 ? _mm_loadl_epi64((const __m128i *) seq)
                                                                  : _mm_loadu_si128((const __m128i *) seq));
        const __m256i src_hi = k == 3 ? _mm256_broadcastsi128_si256(_mm_loadl_epi64((const __m128i *) (seq + 16))) : src_lo;
        for (int pair = 0; pair < 4; ++pair) {
            const int j = 2*r + (pair >> 1);
            __m256i p = _mm256_setzero_si256();
            for (int g = 2*pair; g < 2*pair + 2; ++g) {
                const int n0 = 64*r + 8*g;
                __m256i w = _mm256_shuffle_epi8(src_lo, _mm256_loadu_si256((const __m256i *) (tb->lo + 32*g)));
                if (k == 3) {
                    w = _mm256_or_si256(w, _mm256_shuffle_epi8(src_hi, _mm256_loadu_si256((const __m256i *) (tb->hi + 32*g))));
                }
                const __m256i st = _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_loadu_si256((const __m256i *) (tb->shift + 8*g))), mask12);
                const __m256i h  = _mm256_and_si256(_mm256_add_epi32(_mm256_mullo_epi32(st, mul), add), m6);
                const __m256i q  = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadl_epi64((const __m128i *) (yb->qs + n0))), rep);
                p = _mm256_add_epi16(p, _mm256_maddubs_epi16(h, q));
            }
            const __m256i sj = _mm256_set1_epi16((short) ((sc >> (8*(j & 3) + 4*(j >> 2))) & 15));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, sj));
        }
    }
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 1));
    return _mm_cvtsi128_si32(t);
}
#    define MCT_SIMD_NAME "avx2"
#endif

// software prefetch distance in bytes of weights ahead of the block being decoded (as mcn-cpu.c's MCN_PREFETCH)
#define MCT_PREFETCH 2048

// the reference's float steps, in its order, on the SIMD integer sums
static MCT_FORCE_INLINE void mct_vec_dot_simd(const int k, int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx,
                                              const void * GGML_RESTRICT vy) {
    assert(n % QK_K == 0);
    const struct mct_cpu_tab * tb = mct_cpu_tab(k);
    const uint8_t    * x  = (const uint8_t *) vx;
    const block_q8_K * y  = (const block_q8_K *) vy;
    const int          bb = MCT_HD_BLOCK_BYTES(k);
    float sumf = 0.0f;
    for (int ib = 0; ib < n / QK_K; ++ib) {
        const uint8_t * blk = x + ib*bb;
        // a mat-vec streams its matrix once: the hardware prefetcher alone left the loop waiting on the weight
        // loads (a quarter of the samples, perf annotate), so the lines MCT_PREFETCH bytes ahead are requested here
        _mm_prefetch((const char *) blk + MCT_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *) blk + MCT_PREFETCH + 64, _MM_HINT_T0);
        sumf += (sb_block_d(blk) * y[ib].d) * (float) mct_block_isum_simd(k, blk, y + ib, tb);
    }
    *s = sumf;
}

SB_CPU_VEC_DOT(mct, 1, , mct_vec_dot_simd)
SB_CPU_VEC_DOT(mct, 2, , mct_vec_dot_simd)
SB_CPU_VEC_DOT(mct, 3, , mct_vec_dot_simd)

#else
#    define MCT_SIMD_NAME "scalar"
#endif // MCT_CPU_AVX2

// ---------------------------------------------------------------- selection, test entry points

ggml_vec_dot_t mct_cpu_generic_of(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCT1: return ggml_vec_dot_mct1_q8_K_generic;
        case GGML_TYPE_MCT2: return ggml_vec_dot_mct2_q8_K_generic;
        case GGML_TYPE_MCT3: return ggml_vec_dot_mct3_q8_K_generic;
        default:             return NULL;
    }
}

static ggml_vec_dot_t mct_kernel_of(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCT1: return ggml_vec_dot_mct1_q8_K;
        case GGML_TYPE_MCT2: return ggml_vec_dot_mct2_q8_K;
        case GGML_TYPE_MCT3: return ggml_vec_dot_mct3_q8_K;
        default:             return NULL;
    }
}

SB_CPU_TEST_ENTRY_POINTS(mct, MCT_SIMD_NAME)
