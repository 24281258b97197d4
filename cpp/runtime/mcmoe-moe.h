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
// mmap its data is the file's bytes (zero copy), without mmap one read fills it; a group of >= 2 experts
// of a type ggml-cpu repacks goes to CPU_REPACK instead (copied and interleaved at load, mcmoe_buft_probe),
// as llama.cpp's own merged expert tensors do. Our writer
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

// Called by llama_model_loader where it picks a weight's buffer type: the tensor to test the buffer types
// with. A per-expert tensor is 2-D in the file but runs as a 3-D group of mul_mat_id; ggml's CPU_REPACK
// (Q4_0/Q4_K/IQ4_NL with AVX2, Q2_K with AVX-512: interleaved rows, ~1.3-1.6x faster decode) only takes
// 3-D mul_mat_id weights, so while mcmoe_add_groups creates a group of n_slots >= 2 this returns `probe`,
// a copy of t_meta widened to n_slots (what the buffer will hold); for any other tensor t_meta itself.
// A group of one expert stays 2-D at run time too, so it is tested as it is.
ggml_tensor * mcmoe_buft_probe(ggml_tensor * t_meta, ggml_op op, ggml_tensor * probe);

// Called by llama_model_loader for every tensor of a file. Throws std::runtime_error naming the tensor
// (llama-cpp-python turns that into a ValueError) for
// - an integer or F64 type: no llama weight is one, and ggml's CPU ops abort on them when the graph first
//   runs (a norm weight's F32 type id flipped to I32 keeps its byte size, so the loader's size checks pass);
// - an mcq tensor whose rows are not a multiple of 256 weights: the CPU vec_dot of the mcq types reads its
//   activations as Q8_K (one scale per 256).
void mcmoe_check_tensor(const ggml_tensor * t);

// Called by the architecture's load_arch_hparams: ggml's rms_norm asserts eps >= 0 when the graph first
// runs, on a compute thread where no guard can catch it (mcmoe-load-guard.h covers loading only), so a
// negative or NaN epsilon (one flipped sign bit in the file, or a kv-override) would abort the process at
// the first evaluation. Refused here instead, at load, naming the key. Throws std::runtime_error.
void mcmoe_check_norm_eps(const char * key, float eps);

// ODP's graph part (config, importance, the op in build_moe_ffn) is in mcmoe-odp-graph.h
#include "mcmoe-odp-graph.h"
