// mcmoe-gguf: CUDA forward of GGML_OP_MCMOE_ODP (online dynamic pruning, ../ggml/mcmoe-odp.h).
//
// One thread per token: the token's rank among the micro-batch's importances (mcmoe_odp_rank over the
// importance vector in global memory, O(n) per thread: fine for micro-batches up to a few thousand
// tokens) and the rule (mcmoe_odp_token), the same MCMOE_HOST_DEVICE helpers as the CPU op.
//
// Counters (IDS node only) without a host round trip per layer: the kernel writes a small report
// (layer, k, tokens, pruned slots, protected tokens, per-token flags) to pool memory of the stream, a
// cudaMemcpyAsync copies it into a pinned host slot of (device, layer), and a cudaLaunchHostFunc on the
// same stream calls mcmoe_odp_record (ggml-base) from that slot. Everything is stream-ordered and
// capturable in a CUDA graph; nothing blocks the stream. See mcmoe-odp.cu for the slot management.
#pragma once

#include "common.cuh"

#define MCMOE_ODP_CUDA_K_MAX 16   // top-k slots per token (the CPU op's limit too)

bool ggml_cuda_mcmoe_odp_supported(const ggml_tensor * op);
void ggml_cuda_mcmoe_odp(ggml_backend_cuda_context & ctx, ggml_tensor * dst);
