// mcmoe-gguf: per-expert MoE tensors grouped by type (see mcmoe-moe.h).
#include "mcmoe-moe.h"

#include "llama-impl.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include "gguf.h"
#include "mcq.h"

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

static const llm_tensor mcmoe_expert_tensor[MCMOE_MOE_N_PROJ] = {
    LLM_TENSOR_FFN_GATE_EXP, LLM_TENSOR_FFN_UP_EXP, LLM_TENSOR_FFN_DOWN_EXP,
};
static const llm_tensor mcmoe_merged_tensor[MCMOE_MOE_N_PROJ] = {
    LLM_TENSOR_FFN_GATE_EXPS, LLM_TENSOR_FFN_UP_EXPS, LLM_TENSOR_FFN_DOWN_EXPS,
};

// the type our writer stores an expert of `bits` in (mcmoe.expert_bits), GGML_TYPE_COUNT if none
static ggml_type mcmoe_type_of_bits(int64_t bits) {
    switch (bits) {
        case 1: return GGML_TYPE_MCQ1;
        case 2: return GGML_TYPE_MCQ2;
        case 3: return GGML_TYPE_MCQ3;
        case 4: return GGML_TYPE_MCQ4;
        default: return GGML_TYPE_COUNT;
    }
}

// "mcmoe.expert_bits" (layer-major, n_expert per layer): false if the file has no such key
static bool mcmoe_read_expert_bits(const gguf_context * meta, std::vector<int64_t> & out) {
    const char * key = "mcmoe.expert_bits";
    const int64_t kid = gguf_find_key(meta, key);
    if (kid < 0) {
        return false;
    }
    if (gguf_get_kv_type(meta, kid) != GGUF_TYPE_ARRAY) {
        throw std::runtime_error(format("%s is not an array", key));
    }
    const size_t n = gguf_get_arr_n(meta, kid);
    const void * data = n ? gguf_get_arr_data(meta, kid) : nullptr;
    out.resize(n);
    for (size_t i = 0; i < n; ++i) {
        switch (gguf_get_arr_type(meta, kid)) {
            case GGUF_TYPE_UINT8:  out[i] = ((const uint8_t  *) data)[i]; break;
            case GGUF_TYPE_INT8:   out[i] = ((const int8_t   *) data)[i]; break;
            case GGUF_TYPE_UINT16: out[i] = ((const uint16_t *) data)[i]; break;
            case GGUF_TYPE_INT16:  out[i] = ((const int16_t  *) data)[i]; break;
            case GGUF_TYPE_UINT32: out[i] = ((const uint32_t *) data)[i]; break;
            case GGUF_TYPE_INT32:  out[i] = ((const int32_t  *) data)[i]; break;
            case GGUF_TYPE_UINT64: out[i] = (int64_t) ((const uint64_t *) data)[i]; break;
            case GGUF_TYPE_INT64:  out[i] = ((const int64_t  *) data)[i]; break;
            default:
                throw std::runtime_error(format("%s must be an array of integers", key));
        }
    }
    return true;
}

// the buffer type the id maps of a layer go to: the weights' device (host memory for CPU-side weights,
// also when those are in an extra buffer type such as CPU_REPACK, which only takes weights)
static ggml_backend_buffer_type_t mcmoe_map_buft(const llama_model_loader & ml, const ggml_tensor * w) {
    ggml_backend_buffer_type_t buft = nullptr;
    for (const auto & [key, ctx] : ml.ctx_map) {
        if (ggml_get_tensor(ctx.get(), ggml_get_name(w)) == w) {
            buft = key.buft;
            break;
        }
    }
    ggml_backend_dev_t dev = buft ? ggml_backend_buft_get_device(buft) : nullptr;
    if (buft && dev && !ggml_backend_buft_is_host(buft)) {
        return ggml_backend_dev_buffer_type(dev);
    }
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu) {
        throw std::runtime_error("no CPU backend found");
    }
    return ggml_backend_dev_buffer_type(cpu);
}

static const char * mcmoe_proj_name(int p) {
    return p == MCMOE_MOE_GATE ? "gate" : p == MCMOE_MOE_UP ? "up" : "down";
}

// a per-expert layer? any expert tensor of any projection makes it one
static bool mcmoe_layer_is_split(const llama_model_loader & ml, const LLM_TN & tn, int il, int64_t n_expert) {
    for (int p = 0; p < MCMOE_MOE_N_PROJ; ++p) {
        for (int64_t e = 0; e < n_expert; ++e) {
            const std::string name = tn(mcmoe_expert_tensor[p], "weight", il, (int) e).str();
            if (ml.files.empty() ? gguf_find_tensor(ml.metadata, name.c_str()) >= 0
                                 : ml.get_weight(name.c_str()) != nullptr) {
                return true;
            }
        }
    }
    return false;
}

// a layer is either per-expert or merged, never both
static void mcmoe_check_one_layout(const llama_model_loader & ml, const LLM_TN & tn, int il) {
    if (ml.files.empty()) {
        throw std::runtime_error(format("layer %d: per-expert MoE tensors need a model file (no tensor data given)", il));
    }
    for (int p = 0; p < MCMOE_MOE_N_PROJ; ++p) {
        const std::string merged = tn(mcmoe_merged_tensor[p], "weight", il).str();
        if (ml.get_weight(merged.c_str())) {
            throw std::runtime_error(format("layer %d has both per-expert tensors and %s", il, merged.c_str()));
        }
    }
}

// "mcmoe.expert_bits" checked against the model's size; empty when the file has no such key
static std::vector<int64_t> mcmoe_expected_bits(const llama_model_loader & ml, int n_layer, int64_t n_expert) {
    std::vector<int64_t> bits;
    if (mcmoe_read_expert_bits(ml.metadata, bits) && (int64_t) bits.size() != (int64_t) n_layer * n_expert) {
        throw std::runtime_error(format("mcmoe.expert_bits has %zu entries, expected n_layer x n_expert = %d x %" PRId64,
                                        bits.size(), n_layer, n_expert));
    }
    return bits;
}

using mcmoe_weight = llama_model_loader::llama_tensor_weight;

// the n_expert tensors of projection p of layer il, each checked for presence, shape {ne0, ne1} and the
// type mcmoe.expert_bits gives it (bits: layer-major, empty = unchecked). Empty result: the projection
// is absent altogether, which only the gate may be.
static std::vector<const mcmoe_weight *> mcmoe_expert_weights(const llama_model_loader & ml, const LLM_TN & tn, int il,
        int p, int64_t ne0, int64_t ne1, int64_t n_expert, const std::vector<int64_t> & bits) {
    std::vector<const mcmoe_weight *> w(n_expert, nullptr);
    int64_t n_present = 0;
    for (int64_t e = 0; e < n_expert; ++e) {
        w[e] = ml.get_weight(tn(mcmoe_expert_tensor[p], "weight", il, (int) e).str().c_str());
        n_present += w[e] != nullptr;
    }
    if (n_present == 0 && p == MCMOE_MOE_GATE) {
        return {}; // no gate projection at all (as a merged layer without ffn_gate_exps)
    }
    for (int64_t e = 0; e < n_expert; ++e) {
        const std::string name = tn(mcmoe_expert_tensor[p], "weight", il, (int) e).str();
        if (!w[e]) {
            throw std::runtime_error(format("layer %d: expert tensor '%s' is missing (a per-expert MoE layer needs "
                                            "all %" PRId64 " experts of each projection)", il, name.c_str(), n_expert));
        }
        const ggml_tensor * t = w[e]->tensor;
        if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1) {
            throw std::runtime_error(format("tensor '%s' has wrong shape; expected %s, got %s", name.c_str(),
                                            llama_format_tensor_shape(std::vector<int64_t>{ne0, ne1}).c_str(),
                                            llama_format_tensor_shape(t).c_str()));
        }
        if (!bits.empty()) {
            const int64_t b = bits[(size_t) il * n_expert + e];
            const ggml_type want = mcmoe_type_of_bits(b);
            if (want != t->type) {
                throw std::runtime_error(format("tensor '%s' is %s but mcmoe.expert_bits gives expert %" PRId64
                                                " of layer %d %" PRId64 " bits (%s): the expert groups disagree "
                                                "with the metadata", name.c_str(), ggml_type_name(t->type), e, il, b,
                                                want == GGML_TYPE_COUNT ? "no such width" : ggml_type_name(want)));
            }
        }
    }
    return w;
}

// the experts cut into maximal runs of equal type, same file, bytes back to back (in file order): each
// run can be one zero-copy group tensor
static std::vector<std::vector<int32_t>> mcmoe_contiguous_runs(const std::vector<const mcmoe_weight *> & w) {
    std::vector<int32_t> order(w.size());
    for (size_t e = 0; e < w.size(); ++e) {
        order[e] = (int32_t) e;
    }
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return w[a]->idx != w[b]->idx ? w[a]->idx < w[b]->idx : w[a]->offs < w[b]->offs;
    });
    std::vector<std::vector<int32_t>> runs;
    for (size_t k = 0; k < order.size(); ++k) {
        const auto * cur = w[order[k]];
        const auto * prev = k ? w[order[k - 1]] : nullptr;
        const bool extends = prev && prev->idx == cur->idx && prev->tensor->type == cur->tensor->type &&
                             prev->offs + ggml_nbytes(prev->tensor) == cur->offs;
        if (!extends) {
            runs.emplace_back();
        }
        runs.back().push_back(order[k]);
    }
    return runs;
}

// more runs than types: correct, but slower (our writer never does this; another writer might)
static void mcmoe_warn_scattered(const std::vector<const mcmoe_weight *> & w, const std::vector<std::vector<int32_t>> & runs,
                                 int il, int p) {
    int n_types = 0;
    for (size_t r = 0; r < runs.size(); ++r) {
        bool seen = false;
        for (size_t q = 0; q < r; ++q) {
            seen = seen || w[runs[q][0]]->tensor->type == w[runs[r][0]]->tensor->type;
        }
        n_types += !seen;
    }
    if ((int) runs.size() > n_types) {
        LLAMA_LOG_WARN("%s: layer %d %s: experts of one type are not contiguous in the file, %zu groups "
                       "instead of %d (correct, but more mul_mat_id calls)\n", __func__, il, mcmoe_proj_name(p),
                       runs.size(), n_types);
    }
}

// the slots of the group being created (mcmoe_add_groups -> create_tensor -> the loader's buffer type choice
// -> mcmoe_buft_probe); 0 outside that call. Loading runs on one thread per model, but two models may load
// at once: hence thread_local.
static thread_local int64_t mcmoe_pending_slots = 0;

ggml_tensor * mcmoe_buft_probe(ggml_tensor * t_meta, ggml_op op, ggml_tensor * probe) {
    if (op != GGML_OP_MUL_MAT_ID || mcmoe_pending_slots < 2 || ggml_n_dims(t_meta) != 2) {
        return t_meta;
    }
    *probe = *t_meta;
    probe->ne[2] = mcmoe_pending_slots;
    probe->nb[3] = probe->nb[2] * mcmoe_pending_slots;
    return probe;
}

// one group tensor per run (the run's first expert tensor widened to the run: the loader maps/reads the
// run's bytes from that tensor's file offset; ne/nb are metadata until the buffers are allocated), each
// with its expert -> slot map, equal maps shared (maps: their contents, grown here)
static void mcmoe_add_groups(llama_model_base & model, mcmoe_moe_layer & mx, std::vector<std::vector<int32_t>> & maps,
                             int il, int p, int64_t ne0, int64_t ne1, const std::vector<std::vector<int32_t>> & runs) {
    for (const auto & run : runs) {
        mcmoe_moe_group g;
        g.experts = run;
        const int64_t n_slots = (int64_t) run.size();
        // the buffer type is chosen for the group it becomes (mcmoe_buft_probe), e.g. CPU_REPACK
        mcmoe_pending_slots = n_slots;
        try {
            g.w = model.create_tensor(model.tn(mcmoe_expert_tensor[p], "weight", il, run[0]), {ne0, ne1}, 0);
        } catch (...) {
            mcmoe_pending_slots = 0;
            throw;
        }
        mcmoe_pending_slots = 0;
        GGML_ASSERT(g.w != nullptr && g.w->data == nullptr && g.w->buffer == nullptr);
        g.w->ne[2] = n_slots;
        g.w->nb[3] = g.w->nb[2] * n_slots;
        model.ml->n_created += (int) n_slots - 1; // the other experts of the run are loaded through this tensor

        std::vector<int32_t> map(mx.n_expert + 1, -1); // entry n_expert (the skip marker) stays -1
        for (int64_t s = 0; s < n_slots; ++s) {
            map[run[s]] = (int32_t) s;
        }
        auto it = std::find(maps.begin(), maps.end(), map);
        g.map = (int) (it - maps.begin());
        if (it == maps.end()) {
            maps.push_back(std::move(map));
        }
        mx.groups[p].push_back(std::move(g));
    }
}

// the id maps as I32 tensors in one small buffer per layer, on the weights' device
static void mcmoe_upload_maps(const llama_model_loader & ml, mcmoe_moe_layer & mx, const std::vector<std::vector<int32_t>> & maps,
                              int il) {
    ggml_init_params params = { ggml_tensor_overhead() * maps.size(), nullptr, true };
    mx.ctx.reset(ggml_init(params));
    if (!mx.ctx) {
        throw std::runtime_error("failed to create the ggml context of the expert id maps");
    }
    for (size_t i = 0; i < maps.size(); ++i) {
        ggml_tensor * t = ggml_new_tensor_2d(mx.ctx.get(), GGML_TYPE_I32, 1, mx.n_expert + 1);
        ggml_format_name(t, "blk.%d.mcmoe_expert_map.%zu", il, i);
        mx.maps.push_back(t);
    }
    ggml_backend_buffer_type_t buft = mcmoe_map_buft(ml, mx.groups[MCMOE_MOE_DOWN][0].w);
    mx.buf.reset(ggml_backend_alloc_ctx_tensors_from_buft(mx.ctx.get(), buft));
    if (!mx.buf) {
        throw std::runtime_error(format("unable to allocate the expert id maps (%s)", ggml_backend_buft_name(buft)));
    }
    ggml_backend_buffer_set_usage(mx.buf.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (size_t i = 0; i < maps.size(); ++i) {
        ggml_backend_tensor_set(mx.maps[i], maps[i].data(), 0, maps[i].size() * sizeof(int32_t));
    }
}

static void mcmoe_log_groups(const mcmoe_moe_layer & mx, int il) {
    for (int p = 0; p < MCMOE_MOE_N_PROJ; ++p) {
        std::string desc;
        for (const auto & g : mx.groups[p]) {
            desc += format(" %s x%zu", ggml_type_name(g.w->type), g.experts.size());
        }
        if (!desc.empty()) {
            LLAMA_LOG_DEBUG("%s: layer %d %s groups:%s\n", __func__, il, mcmoe_proj_name(p), desc.c_str());
        }
    }
}

bool mcmoe_load_split_experts(llama_model_base & model, llama_layer & layer, int il,
                              int64_t n_embd, int64_t n_ff, int64_t n_expert) {
    GGML_ASSERT(model.ml != nullptr);
    const llama_model_loader & ml = *model.ml;
    if (!mcmoe_layer_is_split(ml, model.tn, il, n_expert)) {
        return false;
    }
    mcmoe_check_one_layout(ml, model.tn, il);
    const std::vector<int64_t> bits = mcmoe_expected_bits(ml, (int) model.hparams.n_layer(), n_expert);

    auto mx = std::make_shared<mcmoe_moe_layer>();
    mx->n_expert = n_expert;
    std::vector<std::vector<int32_t>> maps; // distinct maps' contents
    for (int p = 0; p < MCMOE_MOE_N_PROJ; ++p) {
        const int64_t ne0 = p == MCMOE_MOE_DOWN ? n_ff : n_embd;
        const int64_t ne1 = p == MCMOE_MOE_DOWN ? n_embd : n_ff;
        const auto w = mcmoe_expert_weights(ml, model.tn, il, p, ne0, ne1, n_expert, bits);
        if (w.empty()) {
            continue;
        }
        const auto runs = mcmoe_contiguous_runs(w);
        mcmoe_warn_scattered(w, runs, il, p);
        mcmoe_add_groups(model, *mx, maps, il, p, ne0, ne1, runs);
    }
    if (!mx->has(MCMOE_MOE_UP) || !mx->has(MCMOE_MOE_DOWN)) {
        throw std::runtime_error(format("layer %d: per-expert MoE tensors without up or down projection", il));
    }
    mcmoe_upload_maps(ml, *mx, maps, il);
    mcmoe_log_groups(*mx, il);

    layer.ffn_gate_exps = nullptr;
    layer.ffn_up_exps   = nullptr;
    layer.ffn_down_exps = nullptr;
    layer.mcmoe_exps    = std::move(mx);
    return true;
}

mcmoe_moe_ids mcmoe_moe_remap_ids(ggml_context * ctx, const mcmoe_moe_layer & mx, ggml_tensor * selected_experts) {
    GGML_ASSERT(selected_experts->type == GGML_TYPE_I32 && ggml_n_dims(selected_experts) <= 2);
    const int64_t n_used   = selected_experts->ne[0];
    const int64_t n_tokens = selected_experts->ne[1];
    // top-k is a view of the argsort: one contiguous column of ids, looked up in each map
    ggml_tensor * flat = ggml_reshape_2d(ctx, ggml_cont(ctx, selected_experts), n_used * n_tokens, 1);
    mcmoe_moe_ids out;
    for (ggml_tensor * map : mx.maps) {
        ggml_tensor * slots = ggml_get_rows(ctx, map, flat); // I32 [1, n_used * n_tokens]
        out.by_map.push_back(ggml_reshape_2d(ctx, slots, n_used, n_tokens));
    }
    return out;
}

ggml_tensor * mcmoe_moe_mul_mat_id(ggml_context * ctx, const mcmoe_moe_layer & mx, int proj, ggml_tensor * cur,
                                   const mcmoe_moe_ids & ids) {
    GGML_ASSERT(mx.has(proj));
    ggml_tensor * out = nullptr;
    for (const auto & g : mx.groups[proj]) {
        ggml_tensor * y = ggml_mul_mat_id(ctx, g.w, cur, ids.by_map.at(g.map));
        out = out ? ggml_add(ctx, out, y) : y; // rows of other groups' experts are exact zeros
    }
    return out;
}

void mcmoe_check_tensor(const ggml_tensor * t) {
    switch (t->type) {
        case GGML_TYPE_I8:
        case GGML_TYPE_I16:
        case GGML_TYPE_I32:
        case GGML_TYPE_I64:
        case GGML_TYPE_F64:
            throw std::runtime_error(format("mcmoe: tensor '%s' has type %s; a model weight is a float (F32, F16, BF16) "
                                            "or a quantized type", t->name, ggml_type_name(t->type)));
        default:
            break;
    }
    if (mcq_type_bits(t->type) && t->ne[0] % MCQ_ROW_MULTIPLE != 0) {
        throw std::runtime_error(std::string("mcmoe: tensor '") + t->name + "' of type " + ggml_type_name(t->type) +
                                 " has rows of " + std::to_string(t->ne[0]) +
                                 " weights; the mcq types need a multiple of 256 (the CPU kernels read activations as Q8_K)");
    }
}

void mcmoe_check_norm_eps(const char * key, float eps) {
    if (!(std::isfinite(eps) && eps >= 0.0f)) {
        throw std::runtime_error(format("mcmoe: %s must be a finite number >= 0 (got %g); ggml's norms assert it "
                                        "when the model runs", key, (double) eps));
    }
}
