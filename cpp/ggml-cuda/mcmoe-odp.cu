// mcmoe-gguf: CUDA forward of GGML_OP_MCMOE_ODP, see mcmoe-odp.cuh and ../ggml/mcmoe-odp.h.
#include "mcmoe-odp.cuh"
#include "mcmoe-odp.h"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>

#define MCMOE_ODP_CUDA_BLOCK 256

// What one IDS node reports to the counters. The kernel fills it in device memory (pool of the stream);
// it is copied as a whole (header + min(n, MCMOE_ODP_MAX_FLAGS) flags) into a pinned host slot and read
// there by the host function. Everything the host function needs is in the copied bytes, never in host
// variables of the launch: a CUDA graph replays the copy and the host function with the pointers of its
// capture, and then reads exactly what that replay's kernel wrote.
struct mcmoe_odp_report {
    int32_t layer;
    int32_t k;
    int32_t n_tokens;
    int32_t n_flags;          // flags[] entries that are valid: min(n_tokens, MCMOE_ODP_MAX_FLAGS)
    int32_t pruned;           // slots pruned in the micro-batch (atomics: zeroed before the kernel)
    int32_t protected_tokens; // tokens protected (atomics: zeroed before the kernel)
    int32_t pad[2];
    uint8_t flags[MCMOE_ODP_MAX_FLAGS]; // enum mcmoe_odp_flag per token
};

#define MCMOE_ODP_REPORT_HEADER offsetof(mcmoe_odp_report, flags)

template <bool ids_out>
static __global__ void k_mcmoe_odp(const int32_t * __restrict__ ids, const float * __restrict__ w,
                                   const float * __restrict__ imp, void * __restrict__ dst, const int k, const int n,
                                   const mcmoe_odp_params p, mcmoe_odp_report * __restrict__ rep) {
    const int t = blockIdx.x*blockDim.x + threadIdx.x;

    __shared__ int s_pruned;
    __shared__ int s_protected;
    if constexpr (ids_out) {
        if (threadIdx.x == 0) {
            s_pruned    = 0;
            s_protected = 0;
        }
        __syncthreads();
    }

    int  n_pruned = 0;
    bool prot     = false;
    if (t < n) {
        prot = imp != nullptr && p.n_protect > 0 && mcmoe_odp_rank(imp, n, t) < p.n_protect;
        int32_t id_tmp[MCMOE_ODP_CUDA_K_MAX];
        float   w_tmp[MCMOE_ODP_CUDA_K_MAX];
        const int f = mcmoe_odp_token(ids + (size_t) t*k, w + (size_t) t*k, k, p.mu, prot, p.marker,
                                      id_tmp, w_tmp, &n_pruned);
        if constexpr (ids_out) {
            int32_t * out = (int32_t *) dst + (size_t) t*k;
            for (int s = 0; s < k; ++s) {
                out[s] = id_tmp[s];
            }
            if (t < MCMOE_ODP_MAX_FLAGS) {
                rep->flags[t] = (uint8_t) f;
            }
        } else {
            float * out = (float *) dst + (size_t) t*k;
            for (int s = 0; s < k; ++s) {
                out[s] = w_tmp[s];
            }
        }
    }

    if constexpr (ids_out) {
        if (n_pruned) {
            atomicAdd(&s_pruned, n_pruned);
        }
        if (prot) {
            atomicAdd(&s_protected, 1);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            atomicAdd(&rep->pruned, s_pruned);
            atomicAdd(&rep->protected_tokens, s_protected);
        }
        if (t == 0) {
            rep->layer    = p.layer;
            rep->k        = k;
            rep->n_tokens = n;
            rep->n_flags  = n < MCMOE_ODP_MAX_FLAGS ? n : MCMOE_ODP_MAX_FLAGS;
        }
    }
}

// ---- pinned host slots
//
// One slot (a whole mcmoe_odp_report, ~8 KiB) per (device, layer), allocated with cudaHostAlloc the first
// time that layer runs on that device and then kept for the life of the process: never reallocated nor
// freed, so a captured CUDA graph's copy and host function can never point to freed memory, and there
// is no allocation per call (a model of L layers on one device pins L slots, e.g. 32 x 8 KiB for
// Mixtral). A per-layer slot (rather than one per stream) keeps nodes running on ggml-cuda's concurrent
// streams apart. Reuse is safe: the next write to a layer's slot is the same layer's copy of a later
// graph evaluation, which the stream orders after the previous host function. (Two llama contexts
// evaluating the same layers at the same time could interleave, as the counters themselves could: the
// counters are documented as one model evaluating at a time.) Not freed at exit: cudaFreeHost during
// static destruction races the CUDA runtime's own teardown; the OS reclaims the pages.
static std::mutex          g_odp_slots_mutex;
static mcmoe_odp_report  * g_odp_slots[GGML_CUDA_MAX_DEVICES][MCMOE_ODP_MAX_LAYERS];

static mcmoe_odp_report * mcmoe_odp_host_slot(int device, int layer) {
    if (device < 0 || device >= GGML_CUDA_MAX_DEVICES || layer < 0 || layer >= MCMOE_ODP_MAX_LAYERS) {
        return nullptr;   // mcmoe_odp_record ignores such layers too
    }
    std::lock_guard<std::mutex> lock(g_odp_slots_mutex);
    mcmoe_odp_report *& slot = g_odp_slots[device][layer];
    if (slot == nullptr) {
        // portable: pinned for every device's context. Allowed during a (relaxed-mode) stream capture.
        CUDA_CHECK(cudaHostAlloc((void **) &slot, sizeof(mcmoe_odp_report), cudaHostAllocPortable));
        memset(slot, 0, sizeof(mcmoe_odp_report));
    }
    return slot;
}

// cudaLaunchHostFunc callback: runs on a CUDA runtime thread once the copy before it on the stream is
// done; it must not call CUDA. mcmoe_odp_record only adds to ggml-base's counters.
static void CUDART_CB mcmoe_odp_host_record(void * data) {
    const mcmoe_odp_report * r = (const mcmoe_odp_report *) data;
    mcmoe_odp_record(r->layer, (int64_t) r->k * r->n_tokens, r->pruned, r->n_tokens, r->protected_tokens,
                     r->flags, r->n_flags);
}

// ---- op

bool ggml_cuda_mcmoe_odp_supported(const ggml_tensor * op) {
    const ggml_tensor * ids = op->src[0];
    const ggml_tensor * w   = op->src[1];
    const ggml_tensor * imp = op->src[2];
    if (ids == nullptr || w == nullptr || ids->type != GGML_TYPE_I32 || w->type != GGML_TYPE_F32 ||
        !ggml_is_contiguous(ids) || !ggml_is_contiguous(w) || !ggml_is_contiguous(op)) {
        return false;
    }
    if (imp != nullptr && (imp->type != GGML_TYPE_F32 || !ggml_is_contiguous(imp))) {
        return false;
    }
    mcmoe_odp_params p;
    memcpy(&p, op->op_params, sizeof(p));
    const bool type_ok = p.what == MCMOE_ODP_IDS ? op->type == GGML_TYPE_I32 : op->type == GGML_TYPE_F32;
    return type_ok && ids->ne[0] <= MCMOE_ODP_CUDA_K_MAX && ids->ne[1] <= INT32_MAX;
}

void ggml_cuda_mcmoe_odp(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    mcmoe_odp_params p;
    memcpy(&p, dst->op_params, sizeof(p));
    const ggml_tensor * ids = dst->src[0];
    const ggml_tensor * w   = dst->src[1];
    const ggml_tensor * imp = dst->src[2];
    const int k = (int) ids->ne[0];
    const int n = (int) ids->ne[1];
    GGML_ASSERT(k <= MCMOE_ODP_CUDA_K_MAX);
    if (n <= 0) {
        return;
    }
    cudaStream_t stream = ctx.stream();
    const dim3 grid((n + MCMOE_ODP_CUDA_BLOCK - 1) / MCMOE_ODP_CUDA_BLOCK);
    const dim3 block(MCMOE_ODP_CUDA_BLOCK);
    const int32_t * ids_d = (const int32_t *) ids->data;
    const float   * w_d   = (const float *) w->data;
    const float   * imp_d = imp ? (const float *) imp->data : nullptr;

    if (p.what != MCMOE_ODP_IDS) {
        k_mcmoe_odp<false><<<grid, block, 0, stream>>>(ids_d, w_d, imp_d, dst->data, k, n, p, nullptr);
        return;
    }

    const int    n_flags = n < MCMOE_ODP_MAX_FLAGS ? n : MCMOE_ODP_MAX_FLAGS;
    const size_t bytes   = MCMOE_ODP_REPORT_HEADER + (size_t) n_flags;
    ggml_cuda_pool_alloc<char> rep_d(ctx.pool(), bytes);   // freed (stream-ordered reuse) after the copy below
    mcmoe_odp_report * rep = (mcmoe_odp_report *) rep_d.get();
    CUDA_CHECK(cudaMemsetAsync(rep, 0, MCMOE_ODP_REPORT_HEADER, stream));
    k_mcmoe_odp<true><<<grid, block, 0, stream>>>(ids_d, w_d, imp_d, dst->data, k, n, p, rep);
    CUDA_CHECK(cudaGetLastError());

    mcmoe_odp_report * slot = mcmoe_odp_host_slot(ctx.device, p.layer);
    if (slot == nullptr) {
        return;
    }
    CUDA_CHECK(cudaMemcpyAsync(slot, rep, bytes, cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaLaunchHostFunc(stream, mcmoe_odp_host_record, slot));
}
