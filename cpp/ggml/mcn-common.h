// mcmoe-gguf: the per-block decode arithmetic of the mcn types (mcn2, mcn3), shared by every backend.
//
// mcn = "non-uniform": a fixed Lloyd-Max table of 2^bits int8 levels per weight, a 4-bit scale per 32
// weights and an fp16 scale per 256 (docs/FORMAT.md, "mcn2 / mcn3"). Chosen in the issue-14 study
// (docs/RESULTS.md): rounded with the expert's Hessian (GPTQ) this layout has a third less output error
// than IQ2_XXS at about its size, and it decodes with one table lookup per weight (no 8-weight grid
// gathers), so its kernels run at Q2_K's speed or better.
//
// One definition of "code n", "sub-block scale j", "value = d * (s_j * T[q])" and "integer dot of a
// 32-slice with 32 int8 activations", compiled by the CPU reference (mcn.c), the scalar CPU kernels
// (mcn-cpu.c), the CUDA kernels (cpp/ggml-cuda/mcn.cu, as __host__ __device__) and the host tests.
// Plain C99 / C++ / CUDA; depends on <stdint.h> only (and mcq-common.h for fp16 and little-endian loads).
//
// Block of 256 weights (bytes, little-endian):
//   [0, 2)            fp16 d, the super-block scale
//   [2, 6)            eight 4-bit sub-block scales: sub-block j (weights 32j .. 32j+31) in byte 2 + (j & 3),
//                     bits 4*(j >> 2) .. +3 (low nibbles: sub-blocks 0-3, high nibbles: 4-7)
//   [6, 70)           2-bit plane: weight n in byte 6 + 32*(n >> 7) + (n & 31), bits 2*((n >> 5) & 3) .. +1
//   [70, 102) (mcn3)  high-bit plane: weight n in byte 70 + (n & 31), bit n >> 5 (= its sub-block)
// code q = low 2 bits | (high bit << 2); value = fp32(d) * (float) (s_j * T[q]), one fp32 rounding (s_j * T[q]
// is a small exact integer), so every backend and formats.py agree bit for bit.
// A 32-byte load of a plane half yields the codes of four whole sub-blocks (shift 0/2/4/6), one load of
// the high plane the high bits of all eight (bit j): the SIMD kernels need no shuffles to gather codes.
// Blocks are 70 / 102 bytes (2 mod 4): device code loads 16-bit halves, never uint32, from a block.
#pragma once

#include "mcq-common.h"

#include <stdint.h>

#define MCN_HD_QK       256 // weights per block (= QK_K: one Q8_K block of activations per block)
#define MCN_HD_SUB      32  // weights per sub-block (one 4-bit scale; = QK8_1 on CUDA)
#define MCN_HD_NSUB     8
#define MCN_HD_SMAX     15  // largest sub-block scale code
#define MCN_HD_OFF_SC   2
#define MCN_HD_OFF_QS   6
#define MCN_HD_OFF_QH   70

// bytes of a block of `bits` (2 or 3)
#define MCN_HD_BLOCK_BYTES(bits) ((bits) == 2 ? 70 : 102)

// Lloyd-Max levels of a unit Gaussian (2 bits: +-0.4528, +-1.5104; 3 bits: +-0.2451, +-0.7560, +-1.3439,
// +-2.1520) scaled to small integers with the same ratios to within 1% (3.33 vs 3.336; 3, 5.5, 8.75 vs
// 3.084, 5.483, 8.780): integers keep s_j * T[q] exact and let the CPU kernels use int8 products.
#define MCN_HD_T2 { -10, -3, 3, 10 }
#define MCN_HD_T3 { -35, -22, -12, -4, 4, 12, 22, 35 }

MCQ_HD_INLINE int mcn_hd_level(int bits, int q) {
#if defined(__CUDA_ARCH__)
    // constant tables in registers: a switch compiles to selects, no local-memory array
    if (bits == 2) {
        return q == 0 ? -10 : q == 1 ? -3 : q == 2 ? 3 : 10;
    }
    const int lv[8] = MCN_HD_T3;
    return lv[q & 7];
#else
    static const int8_t t2[4] = MCN_HD_T2;
    static const int8_t t3[8] = MCN_HD_T3;
    return bits == 2 ? t2[q & 3] : t3[q & 7];
#endif
}

MCQ_HD_INLINE float mcn_hd_block_d(const uint8_t * blk) {
    return mcq_hd_fp16_to_fp32(mcq_hd_le16(blk));
}

// 4-bit scale code of sub-block j (0..7)
MCQ_HD_INLINE int mcn_hd_scale(const uint8_t * blk, int j) {
    return (blk[MCN_HD_OFF_SC + (j & 3)] >> (4*(j >> 2))) & 15;
}

// code n (0..255) of a block
MCQ_HD_INLINE int mcn_hd_code(int bits, const uint8_t * blk, int n) {
    const int lo = (blk[MCN_HD_OFF_QS + 32*(n >> 7) + (n & 31)] >> (2*((n >> 5) & 3))) & 3;
    if (bits == 2) {
        return lo;
    }
    return lo | (((blk[MCN_HD_OFF_QH + (n & 31)] >> (n >> 5)) & 1) << 2);
}

// value of weight n: fp32(d) * (s_j * T[q]), the integer exact, one rounding
MCQ_HD_INLINE float mcn_hd_value(float d, int s, int level) {
    return d*(float) (s*level);
}

// dequantize one block of `bits` into y[0..255]
MCQ_HD_INLINE void mcn_hd_dequant_block(int bits, const uint8_t * blk, float * y) {
    const float d = mcn_hd_block_d(blk);
    for (int n = 0; n < MCN_HD_QK; ++n) {
        y[n] = mcn_hd_value(d, mcn_hd_scale(blk, n >> 5), mcn_hd_level(bits, mcn_hd_code(bits, blk, n)));
    }
}

// sum over sub-block j (weights 32j .. 32j+31) of T[q_n] * qy[n - 32j], qy 32 int8 activation codes
MCQ_HD_INLINE int mcn_hd_dot32(int bits, const uint8_t * blk, int j, const int8_t * qy) {
    int sumi = 0;
    for (int k = 0; k < MCN_HD_SUB; ++k) {
        sumi += mcn_hd_level(bits, mcn_hd_code(bits, blk, MCN_HD_SUB*j + k)) * (int) qy[k];
    }
    return sumi;
}

// integer dot of a whole block with 256 int8 activation codes: sum_j s_j * dot32_j (|.| < 2^31: at most
// 256 * 15 * 35 * 128 = 1.7e7)
MCQ_HD_INLINE int mcn_hd_block_isum(int bits, const uint8_t * blk, const int8_t * qy) {
    int sumi = 0;
    for (int j = 0; j < MCN_HD_NSUB; ++j) {
        sumi += mcn_hd_scale(blk, j)*mcn_hd_dot32(bits, blk, j, qy + MCN_HD_SUB*j);
    }
    return sumi;
}

// ---------------------------------------------------------------- four weights at a time (CUDA dp4a)
// Used by the CUDA kernels (cpp/ggml-cuda/mcn.cu); the host versions are tested against formats.py
// (tests/engine/test_mcn_cuda_helpers.py). Nothing above depends on them.

// the levels as int8 bytes, level q in byte q: T2 in one word, T3 in two (q 0..3 in PACKED0, 4..7 in PACKED1)
#define MCN_HD_T2_PACKED  UINT32_C(0x0A03FDF6) // 10, 3, -3, -10 (bytes 3..0)
#define MCN_HD_T3_PACKED0 UINT32_C(0xFCF4EADD) // -4, -12, -22, -35
#define MCN_HD_T3_PACKED1 UINT32_C(0x23160C04) // 35, 22, 12, 4

// little-endian 32-bit load from a 2-byte aligned address (a plane row of a 70 / 102-byte block starts
// 2 mod 4): two 16-bit halves on the device
MCQ_HD_INLINE uint32_t mcn_hd_le32_a2(const uint8_t * p) {
    return (uint32_t) mcq_hd_le16(p) | ((uint32_t) mcq_hd_le16(p + 2) << 16);
}

// codes n0 .. n0+3 (n0 % 4 == 0) of a block as the four bytes of a uint32, code n0 in the lowest byte
MCQ_HD_INLINE uint32_t mcn_hd_codes4(int bits, const uint8_t * blk, int n0) {
    const uint32_t lo = (mcn_hd_le32_a2(blk + MCN_HD_OFF_QS + 32*(n0 >> 7) + (n0 & 31)) >> (2*((n0 >> 5) & 3)))
                      & UINT32_C(0x03030303);
    if (bits == 2) {
        return lo;
    }
    return lo | (((mcn_hd_le32_a2(blk + MCN_HD_OFF_QH + (n0 & 31)) >> (n0 >> 5)) & UINT32_C(0x01010101)) << 2);
}

// byte k of the result = byte (nibble k of s) of the 8 bytes y:x, for nibbles 0..7 (__byte_perm on the device)
MCQ_HD_INLINE uint32_t mcn_hd_byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(x, y, s);
#else
    const uint64_t xy = (uint64_t) x | ((uint64_t) y << 32);
    uint32_t r = 0;
    for (int k = 0; k < 4; ++k) {
        r |= (uint32_t) ((xy >> (8*((s >> 4*k) & 7))) & 0xFF) << 8*k;
    }
    return r;
#endif
}

// four codes (bytes of q4, each < 2^bits) -> their levels T[q] as four int8 bytes (a dp4a operand)
MCQ_HD_INLINE uint32_t mcn_hd_levels4(int bits, uint32_t q4) {
    const uint32_t t   = q4 | (q4 >> 4);                       // byte 0: q0 | q1 << 4, byte 2: q2 | q3 << 4
    const uint32_t sel = (t & 0xFF) | ((t >> 8) & 0xFF00);     // nibble k = q_k
    return bits == 2 ? mcn_hd_byte_perm(MCN_HD_T2_PACKED, 0, sel)
                     : mcn_hd_byte_perm(MCN_HD_T3_PACKED0, MCN_HD_T3_PACKED1, sel);
}

// level k (0..3) of a levels4 word, sign-extended
MCQ_HD_INLINE int mcn_hd_level_byte(uint32_t lv4, int k) {
    return (int) (int8_t) (uint8_t) (lv4 >> 8*k);
}

// levels of sub-block j (weights 32j .. 32j+31) as eight levels4 words
MCQ_HD_INLINE void mcn_hd_levels32(int bits, const uint8_t * blk, int j, uint32_t * lv) {
    for (int k = 0; k < MCN_HD_SUB/4; ++k) {
        lv[k] = mcn_hd_levels4(bits, mcn_hd_codes4(bits, blk, MCN_HD_SUB*j + 4*k));
    }
}

// sum_k T[q_k] * qy[k] over 32 weights from their levels32 words (qy 4-byte aligned), with dp4a
MCQ_HD_INLINE int mcn_hd_dot32_lv(const uint32_t * lv, const int8_t * qy) {
    int sumi = 0;
    for (int k = 0; k < MCN_HD_SUB/4; ++k) {
        sumi = mcq_hd_dp4a(lv[k], mcq_hd_le32((const uint8_t *) qy + 4*k), sumi);
    }
    return sumi;
}

// = mcn_hd_dot32, four weights at a time
MCQ_HD_INLINE int mcn_hd_dot32_dp4a(int bits, const uint8_t * blk, int j, const int8_t * qy) {
    uint32_t lv[MCN_HD_SUB/4];
    mcn_hd_levels32(bits, blk, j, lv);
    return mcn_hd_dot32_lv(lv, qy);
}

// sub-block j against one Q8_1 block (codes qy, scale dy; the sum of Q8_1 is not needed, the table is
// symmetric): d * dy * (s_j * sumi), the integer exact
MCQ_HD_INLINE float mcn_hd_combine_q8_1(float d, int s, int sumi, float dy) {
    return d*dy*(float) (s*sumi);
}

MCQ_HD_INLINE float mcn_hd_dot32_q8_1(int bits, const uint8_t * blk, int j, const int8_t * qy, float dy) {
    return mcn_hd_combine_q8_1(mcn_hd_block_d(blk), mcn_hd_scale(blk, j), mcn_hd_dot32_dp4a(bits, blk, j, qy), dy);
}
