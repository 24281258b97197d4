// mcmoe-gguf: the mct1 / mct2 / mct3 tensor types of ggml (tail-biting bitshift trellis per 64 weights, 4-bit
// scales per 32, fp16 per 256; layout and decode in mct-common.h, docs/FORMAT.md is authoritative).
//
// mcmoe_gguf/quant/trellis.py is the Python twin: the reference quantizer here writes the same bytes as
// trellis.mct_quantize(w, bits, importance) and the dequantization equals trellis.mct_dequantize bit for bit
// (tests/engine/test_mct_types.py). mcq.h's hooks (MCQ_CASES, the type traits, quantize_chunk, validation)
// cover these types as they cover mcn, so ggml's sources gain no mct-specific line.
#pragma once

#include "ggml.h"
#include "mct-common.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MCT_API GGML_API
#define QK_MCT  256

// bits per weight of an mct type (1, 2, 3), 0 for any other type
static inline int mct_type_bits(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCT1: return 1;
        case GGML_TYPE_MCT2: return 2;
        case GGML_TYPE_MCT3: return 3;
        default:             return 0;
    }
}

// Quantize k floats (k % 256 == 0) of one row, importance w (k values, NULL = uniform): slice steps from the
// weighted RMS, a tail-biting Viterbi path per 64-sequence, d rescaled per block (trellis.mct_quantize).
MCT_API void mct_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k, const float * w);
MCT_API void quantize_row_mct1_ref(const float * x, void * y, int64_t k);
MCT_API void quantize_row_mct2_ref(const float * x, void * y, int64_t k);
MCT_API void quantize_row_mct3_ref(const float * x, void * y, int64_t k);
MCT_API void dequantize_row_mct1(const void * x, float * y, int64_t k);
MCT_API void dequantize_row_mct2(const void * x, float * y, int64_t k);
MCT_API void dequantize_row_mct3(const void * x, float * y, int64_t k);

// ggml_quantize_chunk: the imatrix (n_per_row values) as importance, the same for every row
MCT_API size_t mct_quantize(enum ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                            const float * imatrix);

// The rounding step alone, for GPTQ (gptq.GPTQ.quantize_mct through trellis.tail_biting_codes): the codes
// (k bits each, one byte per weight) of the tail-biting path of each of nseq sequences of 64 weights that
// minimises sum_t w_t (x_t - step_t V[state_t])^2 (x, step, w: nseq * 64 doubles). Equal to
// trellis.tail_biting in float64 (same operations, same order, ties to the lowest index). Returns false on bad
// arguments (bits not 1..3, nseq < 0, NULL pointers with nseq > 0) or when out of memory.
MCT_API bool mct_tail_biting(int bits, const double * x, const double * step, const double * w, int64_t nseq,
                             uint8_t * codes);

// ggml_validate_row_data: d a finite fp16
MCT_API bool mct_validate_row_data(enum ggml_type type, const void * data, size_t nbytes);

// "mcmoe-mct abi=1 ..." so Python can check that the library it loaded has these types
MCT_API const char * mct_info(void);

#define MCT_TRAITS_ENTRY(TYPE, name, k)                                            \
    [TYPE] = {                                                                     \
        .type_name      = name,                                                    \
        .blck_size      = QK_MCT,                                                  \
        .type_size      = MCT_HD_BLOCK_BYTES(k),                                   \
        .is_quantized   = true,                                                    \
        .to_float       = (ggml_to_float_t) dequantize_row_mct##k,                 \
        .from_float_ref = (ggml_from_float_t) quantize_row_mct##k##_ref,           \
    },

#define MCT_GGML_TYPE_TRAITS                                                       \
    MCT_TRAITS_ENTRY(GGML_TYPE_MCT1, "mct1", 1)                                    \
    MCT_TRAITS_ENTRY(GGML_TYPE_MCT2, "mct2", 2)                                    \
    MCT_TRAITS_ENTRY(GGML_TYPE_MCT3, "mct3", 3)

#define MCT_CASES case GGML_TYPE_MCT1: case GGML_TYPE_MCT2: case GGML_TYPE_MCT3

#ifdef __cplusplus
}
#endif
