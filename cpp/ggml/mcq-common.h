// mcmoe-gguf: the per-block decode arithmetic of mcq1..mcq4, shared by every backend (docs/FORMAT.md).
//
// One definition of "code n of a block", "value = m + d*q" and "dot of a 32-slice of a block with 32
// int8 activations (Q8_1: d_y, s_y = d_y * sum)", compiled by
//   - the CPU reference dequantization (mcq.c, C),
//   - the CUDA kernels (cpp/ggml-cuda/mcq.cu, as __host__ __device__),
//   - the host tests (tests/engine/test_cuda_helpers.py builds them with gcc and compares with formats.py).
// Plain C99 / C++ / CUDA; depends on <stdint.h> (and <string.h> on the host) only.
//
// Blocks are addressed as bytes: blk[0..1] = fp16 d, blk[2..3] = fp16 m (little-endian), the code planes
// from blk + 4. Every block size (20/36/52/68 bytes) is a multiple of 4 and ggml tensor data is aligned,
// so blk + 4 and the qh plane of mcq3 (blk + 36) are 4-byte aligned: the device loads planes as uint32.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#    define MCQ_HD __host__ __device__
#    define MCQ_HD_INLINE static __forceinline__ __host__ __device__
#else
#    define MCQ_HD
#    include <string.h>
#    define MCQ_HD_INLINE static inline
#endif

#define MCQ_HD_QK   128 // weights per block (= QK_MCQ of mcq.h)
#define MCQ_HD_QK_Y 32  // activations per Q8_1 block: a block of 128 meets 4 of them

// bytes of a block of `bits` (1..4): fp16 d + fp16 m + 128*bits/8 code bytes (macro: a constant expression)
#define MCQ_HD_BLOCK_BYTES(bits) (4 + 16*(bits))
MCQ_HD_INLINE int mcq_hd_block_bytes(int bits) {
    return MCQ_HD_BLOCK_BYTES(bits);
}

MCQ_HD_INLINE float mcq_hd_f32_from_bits(uint32_t w) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(w);
#else
    float f; memcpy(&f, &w, sizeof(f)); return f;
#endif
}

MCQ_HD_INLINE uint32_t mcq_hd_f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t w; memcpy(&w, &f, sizeof(w)); return w;
#endif
}

// IEEE fp16 -> fp32, exact for every value (subnormals, inf, nan); the FP16 library's algorithm
// (Marat Dukhan), as ggml-impl.h's ggml_compute_fp16_to_fp32.
MCQ_HD_INLINE float mcq_hd_fp16_to_fp32(uint16_t h) {
    const uint32_t w     = (uint32_t) h << 16;
    const uint32_t sign  = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;

    const uint32_t exp_offset = UINT32_C(0xE0) << 23;
    const float    exp_scale  = mcq_hd_f32_from_bits(UINT32_C(0x7800000)); // 2^-112
    const float    normalized = mcq_hd_f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;

    const uint32_t magic_mask   = UINT32_C(126) << 23;
    const float    magic_bias   = 0.5f;
    const float    denormalized = mcq_hd_f32_from_bits((two_w >> 17) | magic_mask) - magic_bias;

    const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
    const uint32_t result = sign |
        (two_w < denormalized_cutoff ? mcq_hd_f32_to_bits(denormalized) : mcq_hd_f32_to_bits(normalized));
    return mcq_hd_f32_from_bits(result);
}

// little-endian 16 / 32-bit loads; the device requires p 2- / 4-byte aligned (see above)
MCQ_HD_INLINE uint16_t mcq_hd_le16(const uint8_t * p) {
#if defined(__CUDA_ARCH__)
    return *(const uint16_t *) p;
#else
    return (uint16_t) (p[0] | (p[1] << 8));
#endif
}

MCQ_HD_INLINE uint32_t mcq_hd_le32(const uint8_t * p) {
#if defined(__CUDA_ARCH__)
    return *(const uint32_t *) p;
#else
    return (uint32_t) p[0] | ((uint32_t) p[1] << 8) | ((uint32_t) p[2] << 16) | ((uint32_t) p[3] << 24);
#endif
}

// scale d and min m of a block, in fp32
MCQ_HD_INLINE float mcq_hd_block_d(const uint8_t * blk) { return mcq_hd_fp16_to_fp32(mcq_hd_le16(blk)); }
MCQ_HD_INLINE float mcq_hd_block_m(const uint8_t * blk) { return mcq_hd_fp16_to_fp32(mcq_hd_le16(blk + 2)); }

// code n (0..127) of a block whose planes start at c = blk + 4
MCQ_HD_INLINE int mcq_hd_code(int bits, const uint8_t * c, int n) {
    switch (bits) {
        case 1:  return (c[n >> 3] >> (n & 7)) & 1;                                   // bit plane
        case 2:  return (c[n & 31] >> (2*(n >> 5))) & 3;                              // 2-bit plane
        case 3:  return ((c[n & 31] >> (2*(n >> 5))) & 3) | (((c[32 + (n >> 3)] >> (n & 7)) & 1) << 2);
        default: return (c[n & 63] >> (4*(n >> 6))) & 15;                             // nibble plane
    }
}

// value of code q: fp32(m) + fp32(d)*q. d*q is exact in fp32 (11 x 4 significant bits), so the result is
// the once-rounded sum whether or not the compiler fuses it into an FMA (bit-exact with formats.py).
MCQ_HD_INLINE float mcq_hd_value(float d, float m, int q) {
    return m + d*(float) q;
}

// dequantize one block of `bits` into y[0..127]
MCQ_HD_INLINE void mcq_hd_dequant_block(int bits, const uint8_t * blk, float * y) {
    const float d = mcq_hd_block_d(blk);
    const float m = mcq_hd_block_m(blk);
    for (int n = 0; n < MCQ_HD_QK; ++n) {
        y[n] = mcq_hd_value(d, m, mcq_hd_code(bits, blk + 4, n));
    }
}

// codes n0..n0+3 (n0 % 4 == 0) as four bytes of a uint32, element n0 in the lowest byte (dp4a operand)
MCQ_HD_INLINE uint32_t mcq_hd_codes4(int bits, const uint8_t * c, int n0) {
    switch (bits) {
        case 1: {
            // nibble of 4 bits -> bytes: b*0x00204081 puts bit k of b at bit 8k (the shifted copies of
            // the 4-bit nibble occupy bits 0-3, 7-10, 14-17, 21-24 and never overlap, so no carries)
            const uint32_t b = (c[n0 >> 3] >> (n0 & 7)) & 0xF;
            return (b * UINT32_C(0x00204081)) & UINT32_C(0x01010101);
        }
        case 2:
            return (mcq_hd_le32(c + (n0 & 31)) >> (2*(n0 >> 5))) & UINT32_C(0x03030303);
        case 3: {
            const uint32_t lo = (mcq_hd_le32(c + (n0 & 31)) >> (2*(n0 >> 5))) & UINT32_C(0x03030303);
            const uint32_t b  = (c[32 + (n0 >> 3)] >> (n0 & 7)) & 0xF;
            return lo | (((b * UINT32_C(0x00204081)) & UINT32_C(0x01010101)) << 2);
        }
        default:
            return (mcq_hd_le32(c + (n0 & 63)) >> (4*(n0 >> 6))) & UINT32_C(0x0F0F0F0F);
    }
}

// c + sum_k byte_k(a) * byte_k(b), bytes as signed int8 (codes are <= 15, so signedness of a is moot)
MCQ_HD_INLINE int mcq_hd_dp4a(uint32_t a, uint32_t b, int c) {
#if defined(__CUDA_ARCH__)
    return __dp4a((int) a, (int) b, c);
#else
    for (int k = 0; k < 4; ++k) {
        c += (int) (int8_t) (uint8_t) (a >> 8*k) * (int) (int8_t) (uint8_t) (b >> 8*k);
    }
    return c;
#endif
}

// integer dot of codes 32*sub .. 32*sub+31 (sub = 0..3) with 32 int8 activation codes qy (4-byte aligned)
MCQ_HD_INLINE int mcq_hd_dot32(int bits, const uint8_t * c, int sub, const int8_t * qy) {
    int sumi = 0;
    for (int k = 0; k < MCQ_HD_QK_Y/4; ++k) {
        sumi = mcq_hd_dp4a(mcq_hd_codes4(bits, c, MCQ_HD_QK_Y*sub + 4*k), mcq_hd_le32((const uint8_t *) qy + 4*k), sumi);
    }
    return sumi;
}

// dot of a block's 32-slice `sub` with one Q8_1 block (codes qy, scale dy, sy = dy * sum(qy)):
//   sum_n (m + d q_n) dy qy_n = d*dy*sum(q qy) + m*sy
MCQ_HD_INLINE float mcq_hd_combine_q8_1(float d, float m, int sumi, float dy, float sy) {
    return d*dy*(float) sumi + m*sy;
}

MCQ_HD_INLINE float mcq_hd_dot32_q8_1(int bits, const uint8_t * blk, int sub, const int8_t * qy, float dy, float sy) {
    return mcq_hd_combine_q8_1(mcq_hd_block_d(blk), mcq_hd_block_m(blk), mcq_hd_dot32(bits, blk + 4, sub, qy), dy, sy);
}

// dot of a whole block with four Q8_1 blocks (qy[0..127], dy[0..3], sy[0..3]):
//   d * sum_j dy_j*sum(q qy)_j + m * sum_j sy_j, the CPU kernel's formula
MCQ_HD_INLINE float mcq_hd_block_dot_q8_1(int bits, const uint8_t * blk, const int8_t * qy, const float * dy, const float * sy) {
    float sumd = 0.0f;
    float sums = 0.0f;
    for (int j = 0; j < MCQ_HD_QK/MCQ_HD_QK_Y; ++j) {
        sumd += dy[j]*(float) mcq_hd_dot32(bits, blk + 4, j, qy + MCQ_HD_QK_Y*j);
        sums += sy[j];
    }
    return mcq_hd_block_d(blk)*sumd + mcq_hd_block_m(blk)*sums;
}
