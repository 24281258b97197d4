// mcmoe-gguf: reference quantize / dequantize of the mcn types (see mcn.h, mcn-common.h, docs/FORMAT.md).
//
// Bit-exactness with mcmoe_gguf/quant/formats.py (numpy float64): every step below is one IEEE double
// operation in the order formats.mcn_quantize performs it (its sums run over the 32 weights of a slice
// one by one, vectorised across slices), with no FMA contraction (pragmas below) and no reassociation
// (no -ffast-math). The fp16 super-block scale is rounded to nearest even (mcq_fp32_to_fp16, numpy's
// astype(float16)); ties of nearest rounding go to the lower level (a strict ">" against the midpoints).
#include "mcn.h"
#include "mcq.h" // mcq_fp32_to_fp16 / mcq_fp16_to_fp32

#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(__FAST_MATH__)
#error "mcn.c must not be compiled with -ffast-math: its quantizer must match formats.py bit for bit"
#endif

#define MCN_NCAND 16 // starting scales amax / T_max * (0.50, 0.55, ..., 1.25)

struct mcn_table {
    int    n;        // levels
    int    t[8];     // levels, ascending
    double mid[7];   // midpoints between neighbours
    double tmax;     // largest level
};

static void mcn_table_init(int bits, struct mcn_table * tb) {
    tb->n = 1 << bits;
    for (int q = 0; q < tb->n; ++q) {
        tb->t[q] = mcn_hd_level(bits, q);
    }
    for (int q = 0; q + 1 < tb->n; ++q) {
        tb->mid[q] = ((double) tb->t[q] + (double) tb->t[q + 1]) / 2.0;
    }
    tb->tmax = (double) tb->t[tb->n - 1];
}

// index of the nearest level of v (ties to the lower one)
static inline int mcn_nearest(const struct mcn_table * tb, double v) {
    int q = 0;
    for (int m = 0; m + 1 < tb->n; ++m) {
        q += v > tb->mid[m];
    }
    return q;
}

// weighted least-squares scale of one 32-slice (formats._mcn_slice_scales)
static double mcn_slice_scale(const struct mcn_table * tb, const float * x, const float * w) {
    double amax = 0.0;
    for (int i = 0; i < MCN_HD_SUB; ++i) {
        const double a = fabs((double) x[i]);
        amax = a > amax ? a : amax;
    }
    if (amax == 0.0) {
        return 0.0;
    }
    double best = 0.0, best_err = INFINITY;
    for (int k = 0; k < MCN_NCAND; ++k) {
        const double s0 = (amax*(0.5 + 0.05*(double) k)) / tb->tmax;
        int q[MCN_HD_SUB];
        double num = 0.0, den = 0.0;
        for (int i = 0; i < MCN_HD_SUB; ++i) {
            const double wi = w ? (double) w[i] : 1.0;
            const double xi = (double) x[i];
            q[i] = mcn_nearest(tb, xi / s0);
            const double t = (double) tb->t[q[i]];
            num = num + (wi*xi)*t;
            den = den + wi*(t*t);
        }
        const double s1 = (den > 0.0 && num > 0.0) ? num / den : s0;
        double err = 0.0;
        for (int i = 0; i < MCN_HD_SUB; ++i) {
            const double wi = w ? (double) w[i] : 1.0;
            const double r  = (double) x[i] - s1*(double) tb->t[q[i]];
            err = err + wi*(r*r);
        }
        if (err < best_err) {
            best_err = err;
            best     = s1;
        }
    }
    return best;
}

uint16_t mcn_super_scales(const double sigma[MCN_HD_NSUB], uint8_t * blk, int s[MCN_HD_NSUB], double * dd) {
    double smax = 0.0;
    for (int j = 0; j < MCN_HD_NSUB; ++j) {
        smax = sigma[j] > smax ? sigma[j] : smax;
    }
    float df = (float) (smax / (double) MCN_HD_SMAX);
    df = df > 65504.0f ? 65504.0f : df;
    const uint16_t d16 = mcq_fp32_to_fp16(df);
    *dd = (double) mcq_fp16_to_fp32(d16);
    for (int j = 0; j < MCN_HD_NSUB; ++j) {
        s[j] = 0;
        if (*dd > 0.0) {
            const double r = nearbyint(sigma[j] / *dd);
            s[j] = r < 0.0 ? 0 : (r > (double) MCN_HD_SMAX ? MCN_HD_SMAX : (int) r);
        }
        blk[MCN_HD_OFF_SC + (j & 3)] |= (uint8_t) (s[j] << (4*(j >> 2)));
    }
    return d16;
}

// Unshrink: nearest rounding to a coarse table (or a trellis path) returns (weighted) cell means, a shrunk copy of
// the weights (sum w x q < sum w x^2, ~10% at 2 bits). Scaling d so the block's error is uncorrelated with its
// weights, codes unchanged, removes that coherent shrink, which costs far more downstream than its share of the
// squared error (docs/FORMAT.md).
void mcn_unshrink_d(uint16_t d16, double dd, int bits, mcn_level_fn level, const float * x, const float * w,
                    uint8_t * blk) {
    uint16_t d16u = d16;
    if (dd > 0.0) {
        double num = 0.0, den = 0.0;
        for (int n = 0; n < MCN_HD_QK; ++n) {
            const double wi = w ? (double) w[n] : 1.0;
            const double xi = (double) x[n];
            const double qv = dd*(double) (mcn_hd_scale(blk, n >> 5)*level(bits, blk, n));
            num = num + (wi*xi)*xi;
            den = den + (wi*xi)*qv;
        }
        if (num > 0.0 && den > 0.0) {
            float du = (float) (dd*(num / den));
            du = du > 65504.0f ? 65504.0f : du;
            d16u = mcq_fp32_to_fp16(du);
        }
    }
    blk[0] = (uint8_t) (d16u & 0xFF);
    blk[1] = (uint8_t) (d16u >> 8);
}

static int mcn_level_of(int bits, const uint8_t * blk, int n) {
    return mcn_hd_level(bits, mcn_hd_code(bits, blk, n));
}

static void mcn_quantize_block(const struct mcn_table * tb, int bits, const float * x, const float * w, uint8_t * out) {
    double sigma[MCN_HD_NSUB];
    for (int j = 0; j < MCN_HD_NSUB; ++j) {
        sigma[j] = mcn_slice_scale(tb, x + MCN_HD_SUB*j, w ? w + MCN_HD_SUB*j : NULL);
    }
    memset(out, 0, (size_t) MCN_HD_BLOCK_BYTES(bits));
    int    sc[MCN_HD_NSUB];
    double dd;
    const uint16_t d16 = mcn_super_scales(sigma, out, sc, &dd);
    for (int n = 0; n < MCN_HD_QK; ++n) {
        const int s = sc[n / MCN_HD_SUB];
        const int q = s ? mcn_nearest(tb, (double) x[n] / (dd*(double) s)) : 0;
        out[MCN_HD_OFF_QS + 32*(n >> 7) + (n & 31)] |= (uint8_t) ((q & 3) << (2*((n >> 5) & 3)));
        if (bits == 3) {
            out[MCN_HD_OFF_QH + (n & 31)] |= (uint8_t) (((q >> 2) & 1) << (n >> 5));
        }
    }
    mcn_unshrink_d(d16, dd, bits, mcn_level_of, x, w, out);
}

void mcn_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k, const float * w) {
    const int bits = mcn_type_bits(type);
    GGML_ASSERT(bits != 0);
    GGML_ASSERT(k % QK_MCN == 0);
    struct mcn_table tb;
    mcn_table_init(bits, &tb);
    const int bb = MCN_HD_BLOCK_BYTES(bits);
    for (int64_t ib = 0; ib < k / QK_MCN; ++ib) {
        mcn_quantize_block(&tb, bits, x + ib*QK_MCN, w ? w + ib*QK_MCN : NULL, (uint8_t *) y + ib*bb);
    }
}

void quantize_row_mcn2_ref(const float * x, void * y, int64_t k) { mcn_quantize_row(GGML_TYPE_MCN2, x, y, k, NULL); }
void quantize_row_mcn3_ref(const float * x, void * y, int64_t k) { mcn_quantize_row(GGML_TYPE_MCN3, x, y, k, NULL); }

size_t mcn_quantize_rows(mcn_row_quantizer row, enum ggml_type type, const float * src, void * dst, int64_t nrows,
                         int64_t n_per_row, const float * imatrix) {
    const size_t row_size = ggml_row_size(type, n_per_row);
    for (int64_t r = 0; r < nrows; ++r) {
        row(type, src + r*n_per_row, (char *) dst + r*row_size, n_per_row, imatrix);
    }
    return (size_t) nrows * row_size;
}

size_t mcn_quantize(enum ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                    const float * imatrix) {
    return mcn_quantize_rows(mcn_quantize_row, type, src, dst, nrows, n_per_row, imatrix);
}

static void mcn_dequantize_row(int bits, const void * vx, float * y, int64_t k) {
    assert(k % QK_MCN == 0);
    const int bb = MCN_HD_BLOCK_BYTES(bits);
    for (int64_t ib = 0; ib < k / QK_MCN; ++ib) {
        mcn_hd_dequant_block(bits, (const uint8_t *) vx + ib*bb, y + ib*QK_MCN);
    }
}

void dequantize_row_mcn2(const void * vx, float * y, int64_t k) { mcn_dequantize_row(2, vx, y, k); }
void dequantize_row_mcn3(const void * vx, float * y, int64_t k) { mcn_dequantize_row(3, vx, y, k); }

bool mcn_validate_d16(enum ggml_type type, const void * data, size_t nbytes, size_t block_bytes) {
    const uint8_t * p = (const uint8_t *) data;
    for (size_t ib = 0; ib < nbytes / block_bytes; ++ib) {
        const uint16_t h = mcq_hd_le16(p + ib*block_bytes);
        if ((h & 0x7C00) == 0x7C00) {
            fprintf(stderr, "ggml_validate_row_data: found %s scale d in block %zu of %s data\n",
                    (h & 0x03FF) ? "nan" : "inf", ib, ggml_type_name(type));
            return false;
        }
    }
    return true;
}

bool mcn_validate_row_data(enum ggml_type type, const void * data, size_t nbytes) {
    const int bits = mcn_type_bits(type);
    return bits != 0 && mcn_validate_d16(type, data, nbytes, (size_t) MCN_HD_BLOCK_BYTES(bits));
}

const char * mcn_info(void) {
    return "mcmoe-mcn abi=1 types=mcn2:104,mcn3:105 block=256 sub=32 table=lloyd-int";
}
