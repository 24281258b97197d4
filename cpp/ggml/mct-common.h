// mcmoe-gguf: the per-block decode arithmetic of the mct trellis types (mct1, mct2, mct3), for every backend.
//
// mct = "trellis": a row is cut into tail-biting sequences of 64 weights; weight t of a sequence stores k bits
// and its value is V[state_t] with state_t the 12-bit window of the sequence's bitstream ending with its own k
// bits (docs/FORMAT.md, "mct1 / mct2 / mct3"; mcmoe_gguf/quant/trellis.py is the Python twin and, until the
// ggml type exists, the definition). Every weight decodes from its own window, with no running state: SIMD
// lanes and GPU threads decode independently. V is a hash of the state (one multiply-add, a mask, a byte sum),
// so no table is needed; its values are near-Gaussian integers in [-126, 126].
//
// Block of 256 weights (bytes, little-endian), k = 1, 2, 3:
//   [0, 2)        fp16 d
//   [2, 6)        eight 4-bit slice scales s_j, as mcn (byte 2 + (j & 3), bits 4 (j >> 2))
//   [6, 6 + 32k)  four sequences of 64 weights, sequence r in bytes 6 + 8k r .. 6 + 8k (r + 1) - 1
// Stream bit p of a sequence = bit (p & 7) of its byte p >> 3; state_t = stream bits k t - (12 - k) .. k t + k - 1
// modulo 64 k, little-endian; value = fp32(d) * (float) (s_j * V[state]) (one fp32 rounding: s_j * V is exact).
// Plain C99 / C++ / CUDA; depends on mcn-common.h (fp16 d, scale nibbles: the same bytes 0-5 as mcn).
#pragma once

#include "mcn-common.h"

#include <stdint.h>

#define MCT_HD_QK         256
#define MCT_HD_SEQ        64      // weights per tail-biting sequence
#define MCT_HD_SUB        32
#define MCT_HD_STATE_BITS 12
#define MCT_HD_OFF_QS     6
#define MCT_HD_HASH_MUL   0x2C1B3C6Du
#define MCT_HD_HASH_ADD   0x3039u

// bytes of a block of k bits per weight (1, 2, 3)
#define MCT_HD_BLOCK_BYTES(k) (6 + 32*(k))

// V[state]: the byte sum of ((state * MUL + ADD) mod 2^32) & 0x3F3F3F3F, minus 126 (a sum of four 6-bit fields)
MCQ_HD_INLINE int mct_hd_value_of_state(uint32_t state) {
    const uint32_t x = (state*MCT_HD_HASH_MUL + MCT_HD_HASH_ADD) & 0x3F3F3F3Fu;
    return (int) ((x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)) - 126;
}

// state of weight t (0..63) of the sequence whose 8k stream bytes start at seq: 12 bits read circularly
MCQ_HD_INLINE uint32_t mct_hd_state(int k, const uint8_t * seq, int t) {
    const int nbytes = 8*k;
    int p = k*t - (MCT_HD_STATE_BITS - k);
    if (p < 0) {
        p += 8*nbytes;
    }
    const int b0 = p >> 3;
    const int b1 = b0 + 1 < nbytes ? b0 + 1 : b0 + 1 - nbytes;
    const int b2 = b1 + 1 < nbytes ? b1 + 1 : b1 + 1 - nbytes;
    const uint32_t w = (uint32_t) seq[b0] | ((uint32_t) seq[b1] << 8) | ((uint32_t) seq[b2] << 16);
    return (w >> (p & 7)) & ((1u << MCT_HD_STATE_BITS) - 1);
}

// V of weight n (0..255) of a block
MCQ_HD_INLINE int mct_hd_level(int k, const uint8_t * blk, int n) {
    const uint8_t * seq = blk + MCT_HD_OFF_QS + 8*k*(n >> 6);
    return mct_hd_value_of_state(mct_hd_state(k, seq, n & (MCT_HD_SEQ - 1)));
}

// dequantize one block of k bits per weight into y[0..255]
MCQ_HD_INLINE void mct_hd_dequant_block(int k, const uint8_t * blk, float * y) {
    const float d = mcn_hd_block_d(blk);
    for (int n = 0; n < MCT_HD_QK; ++n) {
        y[n] = mcn_hd_value(d, mcn_hd_scale(blk, n >> 5), mct_hd_level(k, blk, n));
    }
}

// sum over slice j (weights 32j .. 32j+31) of V[state_n] * qy[n - 32j], qy 32 int8 activation codes
MCQ_HD_INLINE int mct_hd_dot32(int k, const uint8_t * blk, int j, const int8_t * qy) {
    int sumi = 0;
    for (int i = 0; i < MCT_HD_SUB; ++i) {
        sumi += mct_hd_level(k, blk, MCT_HD_SUB*j + i) * (int) qy[i];
    }
    return sumi;
}

// sum over the block of s_j * V[state_n] * qy[n], qy the block's 256 int8 activation codes (the integer part of a
// dot product with a Q8_K block; |sum| <= 256 * 15 * 126 * 128 < 2^31)
MCQ_HD_INLINE int mct_hd_block_isum(int k, const uint8_t * blk, const int8_t * qy) {
    int sumi = 0;
    for (int j = 0; j < MCT_HD_QK / MCT_HD_SUB; ++j) {
        sumi += mcn_hd_scale(blk, j)*mct_hd_dot32(k, blk, j, qy + MCT_HD_SUB*j);
    }
    return sumi;
}

// ---------------------------------------------------------------- four weights at a time (CUDA dp4a)
// The CUDA kernels (cpp/ggml-cuda/mcn.cu, shared with mcn) take the levels of weights n0 .. n0+3 (n0 % 4 == 0) of a
// block as the four int8 bytes of a word (a dp4a operand; |V| <= 126), level n0 in the lowest byte.
MCQ_HD_INLINE uint32_t mct_hd_levels4(int k, const uint8_t * blk, int n0) {
    uint32_t lv = 0;
    for (int i = 0; i < 4; ++i) {
        lv |= (uint32_t) (uint8_t) (int8_t) mct_hd_level(k, blk, n0 + i) << 8*i;
    }
    return lv;
}
