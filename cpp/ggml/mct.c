// mcmoe-gguf: reference quantize / dequantize of the mct trellis types (see mct.h, mct-common.h, docs/FORMAT.md).
//
// Bit-exactness with mcmoe_gguf/quant/trellis.py (numpy / torch float64): every step is one IEEE double operation
// in the order the Python twin performs it, with no FMA contraction (pragmas below) and no reassociation (no
// -ffast-math); sums run over a slice's or block's weights one by one. Ties of the Viterbi minima go to the lowest
// predecessor / state (strict '<'), as torch's min / argmin return the first minimum.
#include "mct.h"
#include "mcn.h" // the super-block steps shared with mcn: super scales, unshrink, validation

#include <assert.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#if defined(__FAST_MATH__)
#error "mct.c must not be compiled with -ffast-math: its quantizer must match trellis.py bit for bit"
#endif

#define MCT_STATES (1 << MCT_HD_STATE_BITS)
#define MCT_SIGMA  36.94 // trellis.MCT_SIGMA: the table's standard deviation in its integer units

// V[state] as doubles, computed once (the decode formula of mct-common.h)
static const double * mct_table_f64(void) {
    static double v[MCT_STATES];
    static volatile int ready = 0;
    if (!ready) { // idempotent: concurrent first calls write the same values
        for (uint32_t s = 0; s < MCT_STATES; ++s) {
            v[s] = (double) mct_hd_value_of_state(s);
        }
        ready = 1;
    }
    return v;
}

// Scratch of one Viterbi: two cost rows, the predecessor minima, and the back pointers of up to 2 * 64 steps.
struct mct_work {
    double  cost[MCT_STATES];
    double  next[MCT_STATES];
    double  m[MCT_STATES / 2];
    uint8_t back[2*MCT_HD_SEQ][MCT_STATES / 2];
};

// trellis.viterbi for one sequence of T steps (x, step, w: T values each). overlap < 0: free; else the first
// state's low 12 - k bits and the last state's high 12 - k bits must both equal it. Writes T codes.
static void mct_viterbi(struct mct_work * wk, int k, const double * x, const double * step, const double * w, int T,
                        int overlap, uint8_t * codes) {
    const double * V  = mct_table_f64();
    const int      lo = MCT_STATES >> k; // states sharing the same carried 12 - k bits
    const int      P  = 1 << k;
    for (int s = 0; s < MCT_STATES; ++s) {
        const double r = x[0] - step[0]*V[s];
        wk->cost[s] = w[0]*(r*r);
        if (overlap >= 0 && (s & (lo - 1)) != overlap) {
            wk->cost[s] = INFINITY;
        }
    }
    for (int t = 1; t < T; ++t) {
        // state s at t carries j = s & (lo - 1) = (its predecessor) >> k; the predecessor is (j << k) | p
        for (int j = 0; j < lo; ++j) {
            const double * c = wk->cost + j*P;
            double best = c[0];
            int    bp   = 0;
            for (int p = 1; p < P; ++p) {
                if (c[p] < best) {
                    best = c[p];
                    bp   = p;
                }
            }
            wk->m[j]       = best;
            wk->back[t][j] = (uint8_t) bp;
        }
        const double xt = x[t], st = step[t], wt = w[t];
        for (int q = 0; q < P; ++q) {
            double       * nc = wk->next + q*lo;
            const double * vq = V + q*lo;
            for (int j = 0; j < lo; ++j) {
                const double r = xt - st*vq[j];
                nc[j] = wk->m[j] + wt*(r*r);
            }
        }
        memcpy(wk->cost, wk->next, sizeof(wk->cost));
    }
    int s = -1;
    double best = INFINITY;
    for (int i = 0; i < MCT_STATES; ++i) {
        if (overlap >= 0 && (i >> k) != overlap) {
            continue;
        }
        if (s < 0 || wk->cost[i] < best) {
            best = wk->cost[i];
            s    = i;
        }
    }
    for (int t = T - 1; t >= 0; --t) {
        codes[t] = (uint8_t) (s >> (MCT_HD_STATE_BITS - k));
        if (t) {
            const int j = s & (lo - 1);
            s = (j << k) | wk->back[t][j];
        }
    }
}

// trellis.tail_biting for one 64-sequence: a free pass over it doubled picks the overlap (the carried bits into
// the second copy), then a pass forced to that overlap
static void mct_tail_biting_seq(struct mct_work * wk, int k, const double * x, const double * step, const double * w,
                                uint8_t * codes) {
    double  x2[2*MCT_HD_SEQ], s2[2*MCT_HD_SEQ], w2[2*MCT_HD_SEQ];
    uint8_t c2[2*MCT_HD_SEQ];
    memcpy(x2, x, MCT_HD_SEQ*sizeof(double));    memcpy(x2 + MCT_HD_SEQ, x, MCT_HD_SEQ*sizeof(double));
    memcpy(s2, step, MCT_HD_SEQ*sizeof(double)); memcpy(s2 + MCT_HD_SEQ, step, MCT_HD_SEQ*sizeof(double));
    memcpy(w2, w, MCT_HD_SEQ*sizeof(double));    memcpy(w2 + MCT_HD_SEQ, w, MCT_HD_SEQ*sizeof(double));
    mct_viterbi(wk, k, x2, s2, w2, 2*MCT_HD_SEQ, -1, c2);
    int overlap = 0;
    for (int j = 0; j < MCT_HD_STATE_BITS/k - 1; ++j) {
        overlap |= (int) c2[MCT_HD_SEQ - 1 - j] << (MCT_HD_STATE_BITS - 2*k - j*k);
    }
    mct_viterbi(wk, k, x, step, w, MCT_HD_SEQ, overlap, codes);
}

bool mct_tail_biting(int bits, const double * x, const double * step, const double * w, int64_t nseq, uint8_t * codes) {
    if (bits < 1 || bits > 3 || nseq < 0 || (nseq > 0 && (!x || !step || !w || !codes))) {
        return false;
    }
    struct mct_work * wk = (struct mct_work *) malloc(sizeof(struct mct_work));
    if (!wk) {
        return false;
    }
    for (int64_t i = 0; i < nseq; ++i) {
        const int64_t o = i*MCT_HD_SEQ;
        mct_tail_biting_seq(wk, bits, x + o, step + o, w + o, codes + o);
    }
    free(wk);
    return true;
}

// one block of 256 weights (trellis.mct_fit, mct_codes, mct_unshrink, mct_pack)
static void mct_quantize_block(struct mct_work * wk, int k, const float * x, const float * imp, uint8_t * out) {
    // steps: each slice's weighted RMS / MCT_SIGMA (the unweighted one where its importance sums to 0)
    double sigma[MCN_HD_NSUB];
    for (int j = 0; j < MCN_HD_NSUB; ++j) {
        double num = 0.0, den = 0.0, sq = 0.0;
        for (int i = 0; i < MCT_HD_SUB; ++i) {
            const double xi = (double) x[MCT_HD_SUB*j + i];
            const double wi = imp ? (double) imp[MCT_HD_SUB*j + i] : 1.0;
            num = num + wi*(xi*xi);
            den = den + wi;
            sq  = sq + xi*xi;
        }
        const double ms = den > 0.0 ? num / den : sq / (double) MCT_HD_SUB;
        sigma[j] = sqrt(ms) / MCT_SIGMA;
    }
    memset(out, 0, (size_t) MCT_HD_BLOCK_BYTES(k));
    int    sc[MCN_HD_NSUB];
    double dd;
    const uint16_t d16 = mcn_super_scales(sigma, out, sc, &dd);
    // codes: a tail-biting path per 64-sequence, on the steps d * s_j, costs weighted by the importance
    double xd[MCT_HD_QK], st[MCT_HD_QK], wd[MCT_HD_QK];
    for (int n = 0; n < MCT_HD_QK; ++n) {
        xd[n] = (double) x[n];
        st[n] = dd*(double) sc[n / MCT_HD_SUB];
        wd[n] = imp ? (double) imp[n] : 1.0;
    }
    uint8_t q[MCT_HD_QK];
    for (int r = 0; r < MCT_HD_QK / MCT_HD_SEQ; ++r) {
        mct_tail_biting_seq(wk, k, xd + r*MCT_HD_SEQ, st + r*MCT_HD_SEQ, wd + r*MCT_HD_SEQ, q + r*MCT_HD_SEQ);
    }
    // stream bit p of sequence r = bit (p mod k) of code p div k
    for (int n = 0; n < MCT_HD_QK; ++n) {
        uint8_t * seq = out + MCT_HD_OFF_QS + 8*k*(n / MCT_HD_SEQ);
        for (int b = 0; b < k; ++b) {
            const int p = k*(n % MCT_HD_SEQ) + b;
            seq[p >> 3] |= (uint8_t) (((q[n] >> b) & 1) << (p & 7));
        }
    }
    mcn_unshrink_d(d16, dd, k, mct_hd_level, x, imp, out);   // formats.unshrink_d, codes unchanged
}

void mct_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k, const float * w) {
    const int bits = mct_type_bits(type);
    GGML_ASSERT(bits != 0);
    GGML_ASSERT(k % QK_MCT == 0);
    struct mct_work * wk = (struct mct_work *) malloc(sizeof(struct mct_work));
    GGML_ASSERT(wk != NULL);
    const int bb = MCT_HD_BLOCK_BYTES(bits);
    for (int64_t ib = 0; ib < k / QK_MCT; ++ib) {
        mct_quantize_block(wk, bits, x + ib*QK_MCT, w ? w + ib*QK_MCT : NULL, (uint8_t *) y + ib*bb);
    }
    free(wk);
}

void quantize_row_mct1_ref(const float * x, void * y, int64_t k) { mct_quantize_row(GGML_TYPE_MCT1, x, y, k, NULL); }
void quantize_row_mct2_ref(const float * x, void * y, int64_t k) { mct_quantize_row(GGML_TYPE_MCT2, x, y, k, NULL); }
void quantize_row_mct3_ref(const float * x, void * y, int64_t k) { mct_quantize_row(GGML_TYPE_MCT3, x, y, k, NULL); }

size_t mct_quantize(enum ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                    const float * imatrix) {
    return mcn_quantize_rows(mct_quantize_row, type, src, dst, nrows, n_per_row, imatrix);
}

static void mct_dequantize_row(int k, const void * vx, float * y, int64_t n) {
    assert(n % QK_MCT == 0);
    const int bb = MCT_HD_BLOCK_BYTES(k);
    for (int64_t ib = 0; ib < n / QK_MCT; ++ib) {
        mct_hd_dequant_block(k, (const uint8_t *) vx + ib*bb, y + ib*QK_MCT);
    }
}

void dequantize_row_mct1(const void * vx, float * y, int64_t k) { mct_dequantize_row(1, vx, y, k); }
void dequantize_row_mct2(const void * vx, float * y, int64_t k) { mct_dequantize_row(2, vx, y, k); }
void dequantize_row_mct3(const void * vx, float * y, int64_t k) { mct_dequantize_row(3, vx, y, k); }

bool mct_validate_row_data(enum ggml_type type, const void * data, size_t nbytes) {
    const int k = mct_type_bits(type);
    return k != 0 && mcn_validate_d16(type, data, nbytes, (size_t) MCT_HD_BLOCK_BYTES(k));
}

const char * mct_info(void) {
    return "mcmoe-mct abi=1 types=mct1:106,mct2:107,mct3:108 block=256 seq=64 state=12 hash=0x2C1B3C6D,0x3039";
}
