// mcmoe-gguf: reference quantize / dequantize of the mcq types (see mcq.h, docs/FORMAT.md).
//
// Bit-exactness with mcmoe_gguf/quant/formats.py (torch float32 eager ops):
//  - every operation is one float32 IEEE operation in the order formats.py performs it; no FMA
//    contraction (this file is compiled with -ffp-contract=off, see the CMake hook, and the pragmas below);
//  - rounding to the grid is nearbyintf (ties to even) on a true float32 division, clamped;
//  - fp16 rounding of d and m is round-to-nearest-even after clamping to +-65504 (formats._to_fp16);
//  - the per-block sums of formats._fit_mse (torch `.sum(-1)` / `.mean(-1)` over 128 contiguous floats)
//    are reproduced in torch's order: ATen's vectorized inner sum with 8-lane vectors
//    (Vectorized<float> of the DEFAULT and AVX2 CPU capabilities, also NEON / SVE256) and 4-way ILP:
//    acc[k][l] = sum_i x[(4 i + k) * 8 + l] (i = 0..3), lanes[l] = ((acc0 + acc1) + acc2) + acc3,
//    total = (((0 + lanes[0]) + lanes[1]) + ...) + lanes[7].
//    torch on an AVX-512 capability uses 16-lane vectors, hence another order: on such a machine,
//    formats.quantize(..., "mse") can differ from this code in rare near-ties (the tests run the Python
//    side under ATEN_CPU_CAPABILITY=avx2 there). "minmax" has no sum and matches everywhere.
#include "mcq.h"

#include <assert.h>
#include <math.h>
#include <stdio.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(__FAST_MATH__)
#error "mcq.c must not be compiled with -ffast-math: its quantizer must match formats.py bit for bit"
#endif

#define MCQ_FP16_MAX 65504.0f

// formats._to_fp16: clamp to the fp16 range, round to nearest even, back to float32
static inline float mcq_round_fp16(float x) {
    x = x < -MCQ_FP16_MAX ? -MCQ_FP16_MAX : (x > MCQ_FP16_MAX ? MCQ_FP16_MAX : x);
    return mcq_fp16_to_fp32(mcq_fp32_to_fp16(x));
}

// torch's float32 sum of 128 contiguous values (see the top of this file)
static float mcq_torch_sum128(const float * x) {
    float acc[4][8];
    for (int k = 0; k < 4; ++k) {
        for (int l = 0; l < 8; ++l) {
            acc[k][l] = 0.0f;
        }
    }
    for (int i = 0; i < 4; ++i) {
        for (int k = 0; k < 4; ++k) {
            for (int l = 0; l < 8; ++l) {
                acc[k][l] = acc[k][l] + x[(4*i + k)*8 + l];
            }
        }
    }
    float total = 0.0f;
    for (int l = 0; l < 8; ++l) {
        // multi_row_sum folds its (empty) upper cascade levels into level 0 (+0.0f), then row_sum adds the 4 ILP rows
        float lane = acc[0][l] + 0.0f;
        lane = lane + (acc[1][l] + 0.0f);
        lane = lane + (acc[2][l] + 0.0f);
        lane = lane + (acc[3][l] + 0.0f);
        total = total + lane;
    }
    return total;
}

// formats._float_codes: clamp(rint((w - m) / d), 0, levels - 1), d == 0 -> 0
static inline float mcq_code(float w, float d, float m, float qmax) {
    const float q = nearbyintf((w - m) / (d == 0.0f ? INFINITY : d));
    return q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
}

// formats._sse: sum((q d + m - w)^2) in torch's order
static float mcq_sse(const float * w, float d, float m, float qmax) {
    float e[QK_MCQ];
    for (int i = 0; i < QK_MCQ; ++i) {
        const float q = mcq_code(w[i], d, m, qmax);
        const float r = (q*d + m) - w[i];
        e[i] = r*r;
    }
    return mcq_torch_sum128(e);
}

// formats._least_squares: the (d, m) minimising sum (w - m - d q)^2 for fixed codes; keeps (d, m) if q is constant
static void mcq_least_squares(const float * w, const float * q, float * d, float * m) {
    float qq[QK_MCQ], wq[QK_MCQ];
    for (int i = 0; i < QK_MCQ; ++i) {
        qq[i] = q[i]*q[i];
        wq[i] = w[i]*q[i];
    }
    const float n   = (float) QK_MCQ;
    const float sq  = mcq_torch_sum128(q);
    const float sw  = mcq_torch_sum128(w);
    const float sqq = mcq_torch_sum128(qq);
    const float swq = mcq_torch_sum128(wq);
    const float det = n*sqq - sq*sq;
    if (det > 0.0f) {
        float d_ls = (n*swq - sq*sw) / det;
        d_ls = d_ls < 0.0f ? 0.0f : d_ls;
        *d = d_ls;
        *m = (sw - d_ls*sq) / n;
    }
}

struct mcq_best {
    float d, m, err;
};

// formats._fit_mse's consider(): fp16-round the candidate, keep it where it lowers the error
static void mcq_consider(struct mcq_best * best, const float * w, float d, float m, float qmax) {
    d = mcq_round_fp16(d);
    m = mcq_round_fp16(m);
    const float err = mcq_sse(w, d, m, qmax);
    if (err < best->err) {
        best->d   = d;
        best->m   = m;
        best->err = err;
    }
}

// one block of 128: (d, m) as fp16 values (returned as float32) with formats.fit_params' method
static void mcq_fit_block(const float * w, int bits, int method, float * d_out, float * m_out) {
    const float qmax = (float) ((1 << bits) - 1);
    float lo = w[0], hi = w[0];
    for (int i = 1; i < QK_MCQ; ++i) {
        lo = w[i] < lo ? w[i] : lo;
        hi = w[i] > hi ? w[i] : hi;
    }
    // formats._fit_minmax
    struct mcq_best best;
    best.d = mcq_round_fp16((hi - lo) / qmax);
    best.m = mcq_round_fp16(lo);

    if (method == MCQ_FIT_MSE) {
        static const float shrinks[] = { 0.9f, 0.8f, 0.7f, 0.6f, 0.5f, 0.4f };
        const float mu = mcq_torch_sum128(w) / (float) QK_MCQ;
        best.err = mcq_sse(w, best.d, best.m, qmax);

        for (size_t s = 0; s < sizeof(shrinks)/sizeof(shrinks[0]); ++s) {
            const float a = mu + shrinks[s]*(lo - mu);
            const float b = mu + shrinks[s]*(hi - mu);
            mcq_consider(&best, w, (b - a) / qmax, a, qmax);
        }
        float q[QK_MCQ];
        if (bits == 1) {
            // Lloyd's start: split at the mean
            for (int i = 0; i < QK_MCQ; ++i) {
                q[i] = w[i] > mu ? 1.0f : 0.0f;
            }
            float d = best.d, m = best.m;
            mcq_least_squares(w, q, &d, &m);
            mcq_consider(&best, w, d, m, qmax);
        }
        for (int step = 0; step < 4; ++step) {
            for (int i = 0; i < QK_MCQ; ++i) {
                q[i] = mcq_code(w[i], best.d, best.m, qmax);
            }
            float d = best.d, m = best.m;
            mcq_least_squares(w, q, &d, &m);
            mcq_consider(&best, w, d, m, qmax);
        }
    }
    *d_out = best.d;
    *m_out = best.m;
}

// codes of one block on the grid (d, m), packed after the header (docs/FORMAT.md, "One block")
static void mcq_pack_block(const float * w, int bits, float d, float m, uint8_t * out) {
    const float qmax = (float) ((1 << bits) - 1);
    uint8_t q[QK_MCQ];
    for (int i = 0; i < QK_MCQ; ++i) {
        q[i] = (uint8_t) mcq_code(w[i], d, m, qmax);
    }
    const uint16_t d16 = mcq_fp32_to_fp16(d);
    const uint16_t m16 = mcq_fp32_to_fp16(m);
    out[0] = (uint8_t) (d16 & 0xFF); out[1] = (uint8_t) (d16 >> 8);   // little-endian on every host
    out[2] = (uint8_t) (m16 & 0xFF); out[3] = (uint8_t) (m16 >> 8);
    uint8_t * c = out + 4;
    switch (bits) {
        case 1:
            memset(c, 0, QK_MCQ/8);
            for (int n = 0; n < QK_MCQ; ++n) c[n >> 3] |= (uint8_t) (q[n] << (n & 7));
            break;
        case 2:
            memset(c, 0, QK_MCQ/4);
            for (int n = 0; n < QK_MCQ; ++n) c[n & 31] |= (uint8_t) (q[n] << (2*(n >> 5)));
            break;
        case 3:
            memset(c, 0, QK_MCQ/4 + QK_MCQ/8);
            for (int n = 0; n < QK_MCQ; ++n) {
                c[n & 31]                |= (uint8_t) ((q[n] & 3) << (2*(n >> 5)));
                c[QK_MCQ/4 + (n >> 3)]   |= (uint8_t) ((q[n] >> 2) << (n & 7));
            }
            break;
        case 4:
            memset(c, 0, QK_MCQ/2);
            for (int n = 0; n < QK_MCQ; ++n) c[n & 63] |= (uint8_t) (q[n] << (4*(n >> 6)));
            break;
        default:
            assert(false);
    }
}

static size_t mcq_block_bytes(int bits) {
    return (size_t) MCQ_HD_BLOCK_BYTES(bits);
}

void mcq_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k, int method) {
    const int bits = mcq_type_bits(type);
    GGML_ASSERT(bits > 0);
    GGML_ASSERT(k % QK_MCQ == 0);
    GGML_ASSERT(method == MCQ_FIT_MINMAX || method == MCQ_FIT_MSE);
    const size_t bb = mcq_block_bytes(bits);
    uint8_t * out = (uint8_t *) y;
    for (int64_t ib = 0; ib < k / QK_MCQ; ++ib) {
        const float * w = x + ib*QK_MCQ;
        float d, m;
        mcq_fit_block(w, bits, method, &d, &m);
        mcq_pack_block(w, bits, d, m, out + ib*bb);
    }
}

void quantize_row_mcq1_ref(const float * x, void * y, int64_t k) { mcq_quantize_row(GGML_TYPE_MCQ1, x, y, k, MCQ_FIT_MSE); }
void quantize_row_mcq2_ref(const float * x, void * y, int64_t k) { mcq_quantize_row(GGML_TYPE_MCQ2, x, y, k, MCQ_FIT_MSE); }
void quantize_row_mcq3_ref(const float * x, void * y, int64_t k) { mcq_quantize_row(GGML_TYPE_MCQ3, x, y, k, MCQ_FIT_MSE); }
void quantize_row_mcq4_ref(const float * x, void * y, int64_t k) { mcq_quantize_row(GGML_TYPE_MCQ4, x, y, k, MCQ_FIT_MSE); }

size_t mcq_quantize(enum ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                    const float * imatrix) {
    if (mcn_type_bits(type)) {
        return mcn_quantize(type, src, dst, nrows, n_per_row, imatrix);
    }
    if (mct_type_bits(type)) {
        return mct_quantize(type, src, dst, nrows, n_per_row, imatrix);
    }
    (void) imatrix;
    const size_t row_size = ggml_row_size(type, n_per_row);
    for (int64_t r = 0; r < nrows; ++r) {
        mcq_quantize_row(type, src + r*n_per_row, (char *) dst + r*row_size, n_per_row, MCQ_FIT_MSE);
    }
    return (size_t) nrows * row_size;
}

// ---- dequantization: m + d * q (d * q is exact in fp32, so fused or not gives the same bits); the per-block
// arithmetic is mcq-common.h's, the same helpers the CUDA kernels run

static inline uint16_t mcq_le16(const uint8_t * p) {
    return mcq_hd_le16(p);
}

static inline void mcq_dequantize_row(int bits, const void * vx, float * y, int64_t k) {
    assert(k % QK_MCQ == 0);
    const uint8_t * x  = (const uint8_t *) vx;
    const int       bb = mcq_hd_block_bytes(bits);
    for (int64_t ib = 0; ib < k / QK_MCQ; ++ib) {
        mcq_hd_dequant_block(bits, x + ib*bb, y + ib*QK_MCQ);
    }
}

void dequantize_row_mcq1(const void * vx, float * y, int64_t k) { mcq_dequantize_row(1, vx, y, k); }
void dequantize_row_mcq2(const void * vx, float * y, int64_t k) { mcq_dequantize_row(2, vx, y, k); }
void dequantize_row_mcq3(const void * vx, float * y, int64_t k) { mcq_dequantize_row(3, vx, y, k); }
void dequantize_row_mcq4(const void * vx, float * y, int64_t k) { mcq_dequantize_row(4, vx, y, k); }

// ---- validation

bool mcq_validate_row_data(enum ggml_type type, const void * data, size_t nbytes) {
    if (mcn_type_bits(type)) {
        return mcn_validate_row_data(type, data, nbytes);
    }
    if (mct_type_bits(type)) {
        return mct_validate_row_data(type, data, nbytes);
    }
    const int bits = mcq_type_bits(type);
    if (bits == 0) {
        return false;
    }
    const size_t bb = mcq_block_bytes(bits);
    const uint8_t * p = (const uint8_t *) data;
    for (size_t ib = 0; ib < nbytes / bb; ++ib) {
        for (int j = 0; j < 2; ++j) {
            const uint16_t h = mcq_le16(p + ib*bb + 2*j);
            if ((h & 0x7C00) == 0x7C00) {
                fprintf(stderr, "ggml_validate_row_data: found %s %s in block %zu of %s data\n",
                        (h & 0x03FF) ? "nan" : "inf", j == 0 ? "scale d" : "min m", ib, ggml_type_name(type));
                return false;
            }
        }
    }
    return true;
}

const char * mcq_info(void) {
    return "mcmoe-mcq abi=1 types=mcq1:100,mcq2:101,mcq3:102,mcq4:103 block=128 quantize=mse,minmax";
}
