// mcmoe-gguf: MoE layers whose experts are stored one tensor per expert, each in its own type.
//
// File (docs/FORMAT.md, "MoE layers with per-expert types"): blk.N.ffn_{gate,up,down}.E.weight, E =
// 0..n_expert-1, each 2-D ({n_embd, n_ff} for gate/up, {n_ff, n_embd} for down) in any ggml type,
// instead of the merged 3-D blk.N.ffn_{gate,up,down}_exps.weight of one type.
//
// Load (mcmoe_load_split_experts, called from the architecture's load_arch_tensors): per projection,
// the experts are sorted by file offset and cut into maximal runs of equal type whose bytes follow each
// other in the file; each run becomes ONE 3-D group tensor [ne0, ne1, n_slots] that the loader maps
// like any weight: it is the run's first expert tensor with ne[2] widened to the run's length, so with
// mmap its data is the file's bytes (zero copy), without mmap one read fills it. Our writer
// (export.py) puts experts of one width next to each other, so there is one group per width present.
// Each group has an id map: I32 [1, n_expert + 1], expert -> slot in the group or -1, and entry
// n_expert = -1 (a selected id equal to n_expert is the "skipped" marker and stays skipped).
//
// Graph (build_moe_ffn): the top-k ids are remapped once per distinct map (get_rows on the map), and
// each projection is the sum over its groups of mul_mat_id(group, x, remapped ids). Ids of other groups
// are -1, which mul_mat_id skips, writing zeros (mcmoe/ggml/mcmoe-ids.h), so each (token, slot) row of
// the sum is exactly one expert's output plus exact zeros: the same numbers as a merged tensor would give.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

struct llama_layer;
struct llama_model_base;

enum mcmoe_moe_proj {
    MCMOE_MOE_GATE = 0,
    MCMOE_MOE_UP   = 1,
    MCMOE_MOE_DOWN = 2,
    MCMOE_MOE_N_PROJ,
};

struct mcmoe_moe_group {
    ggml_tensor *        w   = nullptr; // [ne0, ne1, n_slots]: the experts' bytes as laid out in the file
    int                  map = -1;      // index into mcmoe_moe_layer::maps
    std::vector<int32_t> experts;       // slot -> expert id
};

struct mcmoe_moe_layer {
    int64_t n_expert = 0;
    std::array<std::vector<mcmoe_moe_group>, MCMOE_MOE_N_PROJ> groups; // empty for an absent gate projection
    std::vector<ggml_tensor *> maps;    // distinct id maps, I32 [1, n_expert + 1]
    ggml_context_ptr           ctx;     // owns the map tensors
    ggml_backend_buffer_ptr    buf;     // and their data

    bool has(int proj) const { return !groups[proj].empty(); }
};

// the remapped ids of one graph: by_map[i] = I32 [n_expert_used, n_tokens], slots of maps[i]
struct mcmoe_moe_ids {
    std::vector<ggml_tensor *> by_map;
};

// Loader. Returns false if layer `il` has no per-expert tensors (the caller loads the merged ones);
// otherwise creates the group tensors and sets layer.mcmoe_exps. Throws std::runtime_error (llama.cpp
// then fails the load cleanly) for: a missing expert tensor, a wrong shape, both layouts in one layer,
// and types that disagree with the "mcmoe.expert_bits" metadata (when the file has it).
bool mcmoe_load_split_experts(llama_model_base & model, llama_layer & layer, int il,
                              int64_t n_embd, int64_t n_ff, int64_t n_expert);

// Graph.
mcmoe_moe_ids mcmoe_moe_remap_ids(ggml_context * ctx, const mcmoe_moe_layer & mx, ggml_tensor * selected_experts);

// sum over the groups of `proj` of mul_mat_id(group, cur, remapped ids): [ne1 of the experts, n_expert_used, n_tokens]
ggml_tensor * mcmoe_moe_mul_mat_id(ggml_context * ctx, const mcmoe_moe_layer & mx, int proj, ggml_tensor * cur,
                                   const mcmoe_moe_ids & ids);

// Called by llama_model_loader for every tensor of a file: the CPU vec_dot of the mcq types reads its
// activations as Q8_K (one scale per 256), so an mcq tensor's rows must be a multiple of 256 weights.
// Throws std::runtime_error naming the tensor (llama-cpp-python turns that into a ValueError).
void mcmoe_check_tensor_shape(const ggml_tensor * t);

// ---------------------------------------------------------------- ODP (online dynamic pruning)
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

struct llama_model_loader;

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
