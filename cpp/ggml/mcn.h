// mcmoe-gguf: the mcn2 / mcn3 tensor types of ggml (non-uniform table, 4-bit scales per 32, fp16 per 256;
// layout in mcn-common.h, docs/FORMAT.md is authoritative).
//
// mcmoe_gguf/quant/formats.py (mcn_*) is the Python twin: the reference quantizer here writes the same bytes
// as formats.mcn_quantize(w, bits, importance) and the dequantization equals formats.mcn_dequantize bit for
// bit (tests/engine/test_mcn_types.py). The hooks of mcq.h (MCQ_CASES, the type traits, quantize_chunk,
// validation) cover these types too, so ggml's sources gain no mcn-specific line.
#pragma once

#include "ggml.h"
#include "mcn-common.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MCN_API GGML_API
#define QK_MCN  256

// bits of an mcn type (2, 3), 0 for any other type
static inline int mcn_type_bits(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCN2: return 2;
        case GGML_TYPE_MCN3: return 3;
        default:             return 0;
    }
}

// Quantize k floats (k % 256 == 0) of one row, importance weights w (k values, NULL = uniform): per 32-slice
// the weighted least-squares scale over 16 starting points, then the fp16 super-block scale and 4-bit codes.
MCN_API void mcn_quantize_row(enum ggml_type type, const float * x, void * y, int64_t k, const float * w);
MCN_API void quantize_row_mcn2_ref(const float * x, void * y, int64_t k);
MCN_API void quantize_row_mcn3_ref(const float * x, void * y, int64_t k);
MCN_API void dequantize_row_mcn2(const void * x, float * y, int64_t k);
MCN_API void dequantize_row_mcn3(const void * x, float * y, int64_t k);

// ggml_quantize_chunk: the imatrix (n_per_row values) as importance, the same for every row
MCN_API size_t mcn_quantize(enum ggml_type type, const float * src, void * dst, int64_t nrows, int64_t n_per_row,
                            const float * imatrix);

// ggml_validate_row_data: d a finite fp16
MCN_API bool mcn_validate_row_data(enum ggml_type type, const void * data, size_t nbytes);

// ---- shared by the super-block types (mcn here, mct in mct.c): bytes 0-5 of a block and the last quantizer step

// formats.super_scales: d = fp16(min(max_j sigma_j / 15, 65504)), s_j = clamp(rint(sigma_j / d), 0, 15) (0 where
// d = 0). Writes the scale nibbles into blk (bytes 2-5, which must be zero), the s_j into s; returns d's fp16 bits
// and its value in *dd.
uint16_t mcn_super_scales(const double sigma[MCN_HD_NSUB], uint8_t * blk, int s[MCN_HD_NSUB], double * dd);

// formats.unshrink_d: writes into the block's bytes 0-1 d16 (value dd) times sum w x^2 / sum w x (dd s_j L_n) over the
// block, as fp16 (d16 itself where either sum is not positive or dd = 0); L_n = level(bits, blk, n), the weight's
// integer level from the block's codes, s_j its slice scale; w NULL: uniform.
typedef int (*mcn_level_fn)(int bits, const uint8_t * blk, int n);
void mcn_unshrink_d(uint16_t d16, double dd, int bits, mcn_level_fn level, const float * x, const float * w,
                    uint8_t * blk);

// ggml_quantize_chunk of a type by its row quantizer: nrows rows of n_per_row floats, the imatrix for each
typedef void (*mcn_row_quantizer)(enum ggml_type type, const float * x, void * y, int64_t k, const float * w);
size_t mcn_quantize_rows(mcn_row_quantizer row, enum ggml_type type, const float * src, void * dst, int64_t nrows,
                         int64_t n_per_row, const float * imatrix);

// ggml_validate_row_data for a type whose blocks (block_bytes each) start with an fp16 d that must be finite
bool mcn_validate_d16(enum ggml_type type, const void * data, size_t nbytes, size_t block_bytes);

// "mcmoe-mcn abi=1 ..." so Python can check that the library it loaded has these types
MCN_API const char * mcn_info(void);

#define MCN_TRAITS_ENTRY(TYPE, name, bits)                                         \
    [TYPE] = {                                                                     \
        .type_name      = name,                                                    \
        .blck_size      = QK_MCN,                                                  \
        .type_size      = MCN_HD_BLOCK_BYTES(bits),                                \
        .is_quantized   = true,                                                    \
        .to_float       = (ggml_to_float_t) dequantize_row_mcn##bits,              \
        .from_float_ref = (ggml_from_float_t) quantize_row_mcn##bits##_ref,        \
    },

#define MCN_GGML_TYPE_TRAITS                                                       \
    MCN_TRAITS_ENTRY(GGML_TYPE_MCN2, "mcn2", 2)                                    \
    MCN_TRAITS_ENTRY(GGML_TYPE_MCN3, "mcn3", 3)

#define MCN_CASES case GGML_TYPE_MCN2: case GGML_TYPE_MCN3

#ifdef __cplusplus
}
#endif
