// mcmoe-gguf: skipped ids (../ggml/mcmoe-ids.h) in the CUDA mul_mat_id paths.
//
// llama.cpp's CUDA mul_mat_id has four ways to run; each needs the rule "a skipped id computes nothing
// and its dst row is zeros":
//   - MMVQ / MMVF (few tokens): each block computes one (slot, token) row -> mcmoe_mmv_zero_if_skipped;
//   - MMQ / MMF (prompt batches): mm_ids_helper sorts the rows by expert; a skipped id is in no expert's
//     range (mcmoe_mm_ids_key), the maps' unused entries are made valid (mcmoe_mm_ids_helper_tail), and
//     the skipped rows are zeroed after the product (ggml_cuda_mm_ids_zero_skipped);
//   - the generic fallback (ggml_cuda_mul_mat_id: get_rows + one mul_mat per expert): skipped slots are
//     gathered from a zero row appended to the sorted dst (mcmoe_mmid_route_skipped).
#pragma once

#include "common.cuh"
#include "mcmoe-ids.h"

#include <climits>

// mm_ids_helper's sort key of an id: skipped ids sort after every expert and match none
static __device__ __forceinline__ int mcmoe_mm_ids_key(const int id, const int n_as) {
    return mcmoe_id_skipped(id, n_as) ? INT_MAX : id;
}

// End of mm_ids_helper, run by the block of the last expert (all kept rows counted: n_kept). With skipped
// ids the compact tensors have n_kept < n_rows rows; keep every entry the quantizers read valid: the
// forward map points its unused tail at row 0; the inverse map sends skipped slots to the last compact
// row, which no kept slot uses when one is skipped. Their dst rows are zeroed afterwards.
template <int warp_size>
static __device__ __forceinline__ void mcmoe_mm_ids_helper_tail(
        const int32_t * __restrict__ ids, int32_t * __restrict__ ids_src1, const int n_tokens, const int n_expert_used,
        const int si1, const int n_as, const int n_kept, const bool write_inverse) {
    const int n_rows = n_tokens*n_expert_used;
    for (int i = threadIdx.x; i < n_rows; i += warp_size) {
        if (write_inverse) {
            if (mcmoe_id_skipped(ids[(i / n_expert_used)*si1 + i % n_expert_used], n_as)) {
                ids_src1[i] = n_rows - 1;
            }
        } else if (i >= n_kept) {
            ids_src1[i] = 0;
        }
    }
}

// In an MMVQ / MMVF kernel with ids: true if this block's expert id is skipped, in which case the
// thread(s) for which `writer` holds have written 0 to *dst_elem (their output element) and the block
// must return without computing.
static __device__ __forceinline__ bool mcmoe_mmv_zero_if_skipped(const int32_t id, const uint32_t n_as, const bool writer,
                                                                 float * dst_elem) {
    if (!mcmoe_id_skipped(id, n_as)) {
        return false;
    }
    if (writer) {
        *dst_elem = 0.0f;
    }
    return true;
}

// dst[:, slot, token] = 0 (strides s1, s2 in floats) for every skipped id (< 0 or >= n_as) of ids
// [n_expert_used, n_tokens] (row stride si1): after MMQ / MMF, which compute nothing for them.
void ggml_cuda_mm_ids_zero_skipped(const int32_t * ids, int n_as, int n_tokens, int n_expert_used, int si1,
        float * dst, int ne0, int64_t s1, int64_t s2, cudaStream_t stream);

// The generic fallback, on the host copy of ids (byte strides nb0, nb1): every skipped slot's entry of
// ids_from_sorted (the gather map dst <- sorted dst) is set to n_kept, the index of the zero row the
// caller appends after the n_kept computed rows.
void mcmoe_mmid_route_skipped(const char * ids_host, size_t nb0, size_t nb1, int64_t n_tokens, int64_t n_expert_used,
        int64_t n_as, int32_t n_kept, int32_t * ids_from_sorted);
