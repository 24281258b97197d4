// mcmoe-gguf: the mcq1 / mcq2 / mcq3 / mcq4 tensor types of ggml (docs/FORMAT.md is authoritative).
//
// Block of QK_MCQ = 128 consecutive weights of a row: fp16 scale d, fp16 min m, then the code planes;
// value = fp32(m) + fp32(d) * q, q in [0, 2^bits - 1]. mcmoe_gguf/quant/formats.py is the Python twin:
// the reference quantizer here produces the same bytes as formats.quantize(w, bits, "minmax" | "mse")
// and the dequantization equals formats.dequantize bit for bit (tests/engine/test_ggml_types.py).
//
// This header is compiled into ggml-base (mcq.c) and included by ggml.c (type traits, quantize_chunk),
// ggml-quants.c (row validation) and the CPU backend (mcmoe/ggml-cpu). It depends on ggml.h only.
#pragma once

#include "ggml.h"
#include "mcq-common.h" // the per-block decode arithmetic, shared with the CUDA kernels
#include "mcn.h"        // mcn2 / mcn3: their hooks are these (MCQ_CASES, traits, quantize, validate)
#include "mct.h"        // mct1 / mct2 / mct3: likewise

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

// exported like the rest of ggml's API (the tests reach these functions with ctypes)
#define MCQ_API GGML_API

#define QK_MCQ 128

// 2-byte aligned, no padding (like block_q4_1: d, m, then the codes)
typedef struct { uint16_t d; uint16_t m; uint8_t qs[QK_MCQ/8];                       } block_mcq1; // 20 bytes
typedef struct { uint16_t d; uint16_t m; uint8_t qs[QK_MCQ/4];                       } block_mcq2; // 36 bytes
typedef struct { uint16_t d; uint16_t m; uint8_t qs[QK_MCQ/4]; uint8_t qh[QK_MCQ/8]; } block_mcq3; // 52 bytes
typedef struct { uint16_t d; uint16_t m; uint8_t qs[QK_MCQ/2];                       } block_mcq4; // 68 bytes

#ifdef __cplusplus
static_assert(sizeof(block_mcq1) == 20 && sizeof(block_mcq2) == 36 && sizeof(block_mcq3) == 52 && sizeof(block_mcq4) == 68,
              "wrong mcq block size/padding");
#else
_Static_assert(sizeof(block_mcq1) == 20 && sizeof(block_mcq2) == 36 && sizeof(block_mcq3) == 52 && sizeof(block_mcq4) == 68,
               "wrong mcq block size/padding");
#endif

// Methods of fitting (d, m) per block: the two of formats.fit_params.
enum mcq_fit {
    MCQ_FIT_MINMAX = 0, // d = (max - min) / (2^bits - 1), m = min
    MCQ_FIT_MSE    = 1, // formats._fit_mse: shrink candidates + least-squares refinement (the default)
};

// bits of an mcq type (1..4), 0 for any other type
static inline int mcq_type_bits(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCQ1: return 1;
        case GGML_TYPE_MCQ2: return 2;
        case GGML_TYPE_MCQ3: return 3;
        case GGML_TYPE_MCQ4: return 4;
        default:             return 0;
    }
}

// An mcq tensor's rows must be whole Q8_K blocks: the CPU kernels quantize the activations per 256
// (QK_K). The loader (mcmoe_check_tensor), llama-quantize's fallback and supports_op use this.
#define MCQ_ROW_MULTIPLE 256

// ---- fp16 <-> fp32, IEEE, round to nearest even; plain C so that every backend and the tests agree.
// (The algorithm of the FP16 library by Marat Dukhan, as in ggml-impl.h's ggml_compute_fp*_to_fp*.)

static inline float mcq_fp32_from_bits(uint32_t w) { float f; memcpy(&f, &w, sizeof(f)); return f; }
static inline uint32_t mcq_fp32_to_bits(float f) { uint32_t w; memcpy(&w, &f, sizeof(w)); return w; }

static inline float mcq_fp16_to_fp32(uint16_t h) {
    return mcq_hd_fp16_to_fp32(h); // mcq-common.h
}

static inline uint16_t mcq_fp32_to_fp16(float f) {
    const float scale_to_inf  = mcq_fp32_from_bits(UINT32_C(0x77800000)); // 2^112
    const float scale_to_zero = mcq_fp32_from_bits(UINT32_C(0x08800000)); // 2^-110
    float base = (f < 0 ? -f : f) * scale_to_inf * scale_to_zero;

    const uint32_t w      = mcq_fp32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign   = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    if (bias < UINT32_C(0x71000000)) {
        bias = UINT32_C(0x71000000);
    }

    base = mcq_fp32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits          = mcq_fp32_to_bits(base);
    const uint32_t exp_bits      = (bits >> 13) & UINT32_C(0x00007C00);
    const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
    const uint32_t nonsign       = exp_bits + mantissa_bits;
    return (uint16_t) ((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT16_C(0x7E00) : nonsign));
}

// ---- reference code (ggml-base)

// Quantize k floats (k % 128 == 0) of one row with the given enum mcq_fit; bytes equal formats.quantize.
MCQ_API void mcq_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k, int method);

// from_float_ref of the type traits: MCQ_FIT_MSE (formats.quantize's default)
MCQ_API void quantize_row_mcq1_ref(const float * x, void * y, int64_t k);
MCQ_API void quantize_row_mcq2_ref(const float * x, void * y, int64_t k);
MCQ_API void quantize_row_mcq3_ref(const float * x, void * y, int64_t k);
MCQ_API void quantize_row_mcq4_ref(const float * x, void * y, int64_t k);

// to_float of the type traits: m + d * q in fp32, bit-exact with formats.dequantize
MCQ_API void dequantize_row_mcq1(const void * x, float * y, int64_t k);
MCQ_API void dequantize_row_mcq2(const void * x, float * y, int64_t k);
MCQ_API void dequantize_row_mcq3(const void * x, float * y, int64_t k);
MCQ_API void dequantize_row_mcq4(const void * x, float * y, int64_t k);

// ggml_quantize_chunk for the mcq types (and mcn / mct, passed on to mcn_quantize / mct_quantize with the imatrix): RTN on the MCQ_FIT_MSE grid per row; the importance matrix is
// not used (the types need none), so llama-quantize produces them from F16 without calibration.
MCQ_API size_t mcq_quantize(enum ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                            const float * imatrix);

// ggml_validate_row_data for the mcq types (mcn / mct: mcn_ / mct_validate_row_data): d and m finite fp16 (nbytes already checked to be whole blocks)
MCQ_API bool mcq_validate_row_data(enum ggml_type type, const void * data, size_t nbytes);

// "mcmoe-mcq abi=1 ..." so Python can check that the library it loaded has these types
MCQ_API const char * mcq_info(void);

// ---- ggml.c: entries of type_traits[GGML_TYPE_COUNT]: the four types and the unused ids 43..99,
// which get a name and blck_size 0 like the removed ids 4, 5, 31..33 (gguf.cpp rejects such types).

#define MCQ_TRAITS_ENTRY(TYPE, name, block, bits)                                  \
    [TYPE] = {                                                                     \
        .type_name      = name,                                                    \
        .blck_size      = QK_MCQ,                                                  \
        .type_size      = sizeof(block),                                           \
        .is_quantized   = true,                                                    \
        .to_float       = (ggml_to_float_t) dequantize_row_mcq##bits,              \
        .from_float_ref = (ggml_from_float_t) quantize_row_mcq##bits##_ref,        \
    },

#define MCQ_UNUSED_ENTRY(id)                                                       \
    [id] = {                                                                       \
        .type_name    = "TYPE_" #id " UNUSED (reserved, no such type)",            \
        .blck_size    = 0,                                                         \
        .type_size    = 0,                                                         \
        .is_quantized = false,                                                     \
    },

#define MCQ_UNUSED_ENTRIES_10(d)                                                   \
    MCQ_UNUSED_ENTRY(d##0) MCQ_UNUSED_ENTRY(d##1) MCQ_UNUSED_ENTRY(d##2)           \
    MCQ_UNUSED_ENTRY(d##3) MCQ_UNUSED_ENTRY(d##4) MCQ_UNUSED_ENTRY(d##5)           \
    MCQ_UNUSED_ENTRY(d##6) MCQ_UNUSED_ENTRY(d##7) MCQ_UNUSED_ENTRY(d##8)           \
    MCQ_UNUSED_ENTRY(d##9)

#define MCQ_GGML_TYPE_TRAITS                                                       \
    MCQ_UNUSED_ENTRY(43) MCQ_UNUSED_ENTRY(44) MCQ_UNUSED_ENTRY(45)                 \
    MCQ_UNUSED_ENTRY(46) MCQ_UNUSED_ENTRY(47) MCQ_UNUSED_ENTRY(48)                 \
    MCQ_UNUSED_ENTRY(49)                                                           \
    MCQ_UNUSED_ENTRIES_10(5) MCQ_UNUSED_ENTRIES_10(6) MCQ_UNUSED_ENTRIES_10(7)     \
    MCQ_UNUSED_ENTRIES_10(8) MCQ_UNUSED_ENTRIES_10(9)                              \
    MCQ_TRAITS_ENTRY(GGML_TYPE_MCQ1, "mcq1", block_mcq1, 1)                        \
    MCQ_TRAITS_ENTRY(GGML_TYPE_MCQ2, "mcq2", block_mcq2, 2)                        \
    MCQ_TRAITS_ENTRY(GGML_TYPE_MCQ3, "mcq3", block_mcq3, 3)                        \
    MCQ_TRAITS_ENTRY(GGML_TYPE_MCQ4, "mcq4", block_mcq4, 4)                        \
    MCN_GGML_TYPE_TRAITS                                                           \
    MCT_GGML_TYPE_TRAITS

// the case labels of all our types (mcq1..4, mcn2/3, mct1..3), for switch statements of ggml
#define MCQ_CASES case GGML_TYPE_MCQ1: case GGML_TYPE_MCQ2: case GGML_TYPE_MCQ3: case GGML_TYPE_MCQ4: MCN_CASES: MCT_CASES

#ifdef __cplusplus
}
#endif
