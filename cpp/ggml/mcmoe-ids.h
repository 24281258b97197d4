// mcmoe-gguf: the "skipped expert id" rule of GGML_OP_MUL_MAT_ID, shared by every backend.
//
// An id of mul_mat_id(as, b, ids) that is negative or >= n_as (= as->ne[2], the experts in `as`) is
// SKIPPED: no expert runs for it and its output row (dst[:, slot, token]) is written as zeros. Stock
// ggml leaves such ids undefined (a compiled-out assert on the CPU). Two users:
//   - mixed bit widths in one MoE layer (mcmoe/runtime/mcmoe-moe.cpp): one mul_mat_id per group of
//     experts of equal type, ids remapped to slots of the group, -1 for experts of other groups;
//   - expert pruning (ODP, next issue): a pruned slot of `selected_experts` holds a skip marker.
// Zeros (not "untouched") because the caller multiplies by routing weights and sums: 0 * garbage can
// be NaN. The helper is __host__ __device__ so a CUDA kernel applies literally the same rule.
#pragma once

#include <stdbool.h>
#include <stdint.h>

#if defined(__CUDACC__)
#    define MCMOE_HOST_DEVICE __host__ __device__
#else
#    define MCMOE_HOST_DEVICE
#endif

static inline MCMOE_HOST_DEVICE bool mcmoe_id_skipped(int32_t id, int64_t n_as) {
    return id < 0 || (int64_t) id >= n_as;
}
