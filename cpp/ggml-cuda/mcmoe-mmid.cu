// mcmoe-gguf: skipped ids in the CUDA mul_mat_id paths (see mcmoe-mmid.cuh).
#include "mcmoe-mmid.cuh"

static __global__ void mm_ids_zero_skipped(const int32_t * __restrict__ ids, const int n_as, const int si1,
        float * __restrict__ dst, const int ne0, const int64_t s1, const int64_t s2) {
    const int iex = blockIdx.x;
    const int it  = blockIdx.y;
    if (!mcmoe_id_skipped(ids[it*si1 + iex], n_as)) {
        return;
    }
    float * row = dst + iex*s1 + it*s2;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) {
        row[i] = 0.0f;
    }
}

void ggml_cuda_mm_ids_zero_skipped(const int32_t * ids, int n_as, int n_tokens, int n_expert_used, int si1,
        float * dst, int ne0, int64_t s1, int64_t s2, cudaStream_t stream) {
    if (n_tokens == 0 || n_expert_used == 0) {
        return;
    }
    GGML_ASSERT(n_tokens <= 65535); // grid y
    mm_ids_zero_skipped<<<dim3(n_expert_used, n_tokens, 1), 256, 0, stream>>>(ids, n_as, si1, dst, ne0, s1, s2);
}

void mcmoe_mmid_route_skipped(const char * ids_host, size_t nb0, size_t nb1, int64_t n_tokens, int64_t n_expert_used,
        int64_t n_as, int32_t n_kept, int32_t * ids_from_sorted) {
    for (int64_t it = 0; it < n_tokens; ++it) {
        for (int64_t iex = 0; iex < n_expert_used; ++iex) {
            const int32_t id = *(const int32_t *) (ids_host + it*nb1 + iex*nb0);
            if (mcmoe_id_skipped(id, n_as)) {
                ids_from_sorted[it*n_expert_used + iex] = n_kept;
            }
        }
    }
}
