// mcmoe-gguf: the CPU mul_mat_id's two additions (ggml-cpu.c, repack.cpp), see ../ggml/mcmoe-ids.h.
//
// 1. Skipped ids. Called where the CPU groups the rows of `ids` by expert (thread 0, before the barrier
//    that precedes the products): a skipped id gets its dst row zeroed and is left out of the grouping,
//    so no thread computes it. Rows of kept ids are disjoint from it, so no other thread writes there.
// 2. mcq and mcn weights in prompt batches: one chunk of an expert's product computed in tiles of 16 weight
//    rows x up to 16 routed tokens with mcq_gemm_tile / mcn_gemm_tile, each weight block decoded once per tile
//    instead of once per token (mcq-cpu.h, mcn-cpu.h).
#pragma once

#include "ggml.h"
#include "mcmoe-ids.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// true if ids[slot, token] = `id` is skipped (and dst[:, slot, token] now holds zeros)
bool mcmoe_mmid_skip(int32_t id, int64_t n_as, struct ggml_tensor * dst, int64_t slot, int64_t token);

// One chunk of ggml_compute_forward_mul_mat_id_one_chunk for expert `w` (src0's slice of that expert):
// rows [ir0_start, ir0_end) of the expert times its routed columns [ir1_start, ir1_end), where routed
// column k is rows[2k] = slot, rows[2k + 1] = token (ggml-cpu.c's mmid_row_mapping {i1, i2}, the layout
// its tiled path also reads as int32 pairs). Activations are in `wdata`: at (slot % ne11 + token*ne11) *
// row_size when `packed` (converted to Q8_K or contiguous), else at src1's own strides. Blocks of 16
// columns x 16 rows, as the vec_dot loop it replaces, so results do not depend on the chunking. False
// (nothing written) when there is no tile kernel for the type in this build or `use_ref` is set (the
// caller's vec_dot loop then runs).
bool mcmoe_mmid_tile_chunk(const struct ggml_tensor * src0, const struct ggml_tensor * src1, struct ggml_tensor * dst,
                           const char * w, const int32_t * rows, int64_t ir0_start, int64_t ir0_end,
                           int64_t ir1_start, int64_t ir1_end, const void * wdata, size_t row_size, bool packed,
                           bool use_ref);

#ifdef __cplusplus
}
#endif
