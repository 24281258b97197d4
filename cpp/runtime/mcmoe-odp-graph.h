// mcmoe-gguf: online dynamic pruning (ODP) in llama.cpp's graph: its parameters, the importance of
// tokens, the ODP op (../ggml/mcmoe-odp.h) placed in build_moe_ffn, and the one graph input it adds.
//
// Parameters from GGUF metadata, each overridable per load with llama.cpp's kv-overrides
// (llama-cpp-python: kv_overrides={"mcmoe.odp.enabled": True, ...}); docs/FORMAT.md lists them:
//   mcmoe.odp.enabled     bool    default false (our converter writes true)
//   mcmoe.odp.mu          f32[L]  per-layer median of w1/w0 from calibration (not overridable: an array)
//   mcmoe.odp.mu_scale    f32     multiplies every mu (default 1)
//   mcmoe.odp.mu_override f32     >= 0: this mu for every layer instead of the array (default -1)
//   mcmoe.odp.protect     f32     fraction of a micro-batch's tokens protected (default 0.02)
//   mcmoe.odp.importance  str     attn | rowsum | norm | none (default attn)
//   mcmoe.odp.if_calibrated bool  with enabled: a file without mu (and no mu_override) runs unpruned
//                                 instead of being refused (what mcmoe_gguf.load(odp=True) asks for)
// Values are checked: mu in [0, 1] and finite, mu_scale finite >= 0 (<= 16 when it comes from the file),
// protect in [0, 1]; anything else is refused with the key named.
#pragma once

#include "ggml.h"

#include <memory>
#include <vector>

struct llama_model_loader;

enum mcmoe_odp_importance {
    MCMOE_ODP_IMP_ATTN   = 0, // ||x_j||_1 * attention received by j from later queries (all heads) / (L - j)
    MCMOE_ODP_IMP_ROWSUM = 1, // the reference code's: ||x_j||_1 * sum of j's own attention row / (L - j)
    MCMOE_ODP_IMP_NORM   = 2, // ||x_j||_1 only (also the fallback when the attention matrix does not exist)
    MCMOE_ODP_IMP_NONE   = 3, // no protection: weight rule only
};

struct mcmoe_odp_config {
    bool               enabled    = false;
    std::vector<float> mu;                  // effective per-layer mu (scaled / overridden); empty: off
    float              protect    = 0.02f;
    int                importance = MCMOE_ODP_IMP_ATTN;

    bool active(int il) const { return enabled && il >= 0 && il < (int) mu.size(); }
};


// Reads the keys above (throws std::runtime_error on a bad value or type). enabled without any mu
// (no mcmoe.odp.mu and no mu_override) is an error unless if_calibrated: the caller asked for pruning
// the file cannot do.
std::shared_ptr<mcmoe_odp_config> mcmoe_load_odp_config(llama_model_loader & ml, int n_layer);

// The graph part, in build_moe_ffn after the routing weights are final: computes the importance of the
// micro-batch's tokens (x: MoE input [n_embd, n_tokens]; kq: this layer's attention probabilities
// [n_kv, n_tokens, n_head] or null with flash attention; cells: I32 [n_tokens] KV cell of each token, or
// null), then replaces *ids ([k, n_tokens] I32) and *weights ([1, k, n_tokens] F32) by the ODP op's
// outputs. Pruned slots get id n_expert (skipped by mul_mat_id).
void mcmoe_odp_build(ggml_context * ctx, ggml_cgraph * gf, const mcmoe_odp_config & cfg, int il, int64_t n_expert,
                     ggml_tensor * x, ggml_tensor * kq, ggml_tensor * cells, ggml_tensor ** ids, ggml_tensor ** weights);

// The KV cell of each token of the micro-batch as I32 (ODP's importance gathers the attention a token
// received by its cell with get_rows, which takes I32; llama.cpp's self_k_idxs are I64). Graph input
// created next to self_k_idxs (null when those are not I64), filled from them in set_input.
ggml_tensor * mcmoe_cells_input_new(ggml_context * ctx, const ggml_tensor * self_k_idxs);
void mcmoe_cells_input_set(const ggml_tensor * self_k_idxs, ggml_tensor * cells);
