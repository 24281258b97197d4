// mcmoe-gguf: per-expert MoE tensors grouped by type (see mcmoe-moe.h).
#include "mcmoe-moe.h"

#include "llama-impl.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include "gguf.h"
#include "mcmoe-odp.h"

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

bool mcmoe_load_split_experts(llama_model_base & model, llama_layer & layer, int il,
                              int64_t n_embd, int64_t n_ff, int64_t n_expert) {
    GGML_ASSERT(model.ml != nullptr);
    llama_model_loader & ml = *model.ml;
    const LLM_TN & tn = model.tn;

    auto name_of = [&](int p, int e) { return tn(mcmoe_expert_tensor[p], "weight", il, e).str(); };

    // per-expert layer? any expert tensor of any projection makes it one
    bool split = false;
    for (int p = 0; p < MCMOE_MOE_N_PROJ && !split; ++p) {
        for (int64_t e = 0; e < n_expert && !split; ++e) {
            const std::string name = name_of(p, (int) e);
            split = ml.files.empty() ? gguf_find_tensor(ml.metadata, name.c_str()) >= 0
                                     : ml.get_weight(name.c_str()) != nullptr;
        }
    }
    if (!split) {
        return false;
    }
    if (ml.files.empty()) {
        throw std::runtime_error(format("layer %d: per-expert MoE tensors need a model file (no tensor data given)", il));
    }
    for (int p = 0; p < MCMOE_MOE_N_PROJ; ++p) {
        const std::string merged = tn(mcmoe_merged_tensor[p], "weight", il).str();
        if (ml.get_weight(merged.c_str())) {
            throw std::runtime_error(format("layer %d has both per-expert tensors and %s", il, merged.c_str()));
        }
    }

    std::vector<int64_t> bits;
    const bool have_bits = mcmoe_read_expert_bits(ml.metadata, bits);
    if (have_bits && (int64_t) bits.size() != (int64_t) model.hparams.n_layer() * n_expert) {
        throw std::runtime_error(format("mcmoe.expert_bits has %zu entries, expected n_layer x n_expert = %d x %" PRId64,
                                        bits.size(), (int) model.hparams.n_layer(), n_expert));
    }

    auto mx = std::make_shared<mcmoe_moe_layer>();
    mx->n_expert = n_expert;
    std::vector<std::vector<int32_t>> maps; // distinct maps' contents

    for (int p = 0; p < MCMOE_MOE_N_PROJ; ++p) {
        const int64_t ne0 = p == MCMOE_MOE_DOWN ? n_ff : n_embd;
        const int64_t ne1 = p == MCMOE_MOE_DOWN ? n_embd : n_ff;

        std::vector<const llama_model_loader::llama_tensor_weight *> w(n_expert, nullptr);
        int64_t n_present = 0;
        for (int64_t e = 0; e < n_expert; ++e) {
            w[e] = ml.get_weight(name_of(p, (int) e).c_str());
            n_present += w[e] != nullptr;
        }
        if (n_present == 0 && p == MCMOE_MOE_GATE) {
            continue; // no gate projection at all (as a merged layer without ffn_gate_exps)
        }
        for (int64_t e = 0; e < n_expert; ++e) {
            const std::string name = name_of(p, (int) e);
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
            if (have_bits) {
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

        // maximal runs of equal type, same file, bytes back to back: each is one zero-copy group
        std::vector<int32_t> order(n_expert);
        for (int64_t e = 0; e < n_expert; ++e) {
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
                           "instead of %d (correct, but more mul_mat_id calls)\n", __func__, il,
                           p == MCMOE_MOE_GATE ? "gate" : p == MCMOE_MOE_UP ? "up" : "down", runs.size(), n_types);
        }

        for (const auto & run : runs) {
            mcmoe_moe_group g;
            g.experts = run;
            const int64_t n_slots = (int64_t) run.size();
            // the run's first expert tensor, widened to the run: the loader maps/reads n_slots experts'
            // bytes from that tensor's file offset (ne/nb are metadata until the buffers are allocated)
            g.w = model.create_tensor(tn(mcmoe_expert_tensor[p], "weight", il, run[0]), {ne0, ne1}, 0);
            GGML_ASSERT(g.w != nullptr && g.w->data == nullptr && g.w->buffer == nullptr);
            g.w->ne[2] = n_slots;
            g.w->nb[3] = g.w->nb[2] * n_slots;
            ml.n_created += (int) n_slots - 1; // the other experts of the run are loaded through this tensor

            std::vector<int32_t> map(n_expert + 1, -1);
            for (int64_t s = 0; s < n_slots; ++s) {
                map[run[s]] = (int32_t) s;
            }
            auto it = std::find(maps.begin(), maps.end(), map);
            g.map = (int) (it - maps.begin());
            if (it == maps.end()) {
                maps.push_back(std::move(map));
            }
            mx->groups[p].push_back(std::move(g));
        }
    }
    if (!mx->has(MCMOE_MOE_UP) || !mx->has(MCMOE_MOE_DOWN)) {
        throw std::runtime_error(format("layer %d: per-expert MoE tensors without up or down projection", il));
    }

    // the id maps: one small host (or device) buffer per layer
    ggml_init_params params = { ggml_tensor_overhead() * maps.size(), nullptr, true };
    mx->ctx.reset(ggml_init(params));
    if (!mx->ctx) {
        throw std::runtime_error("failed to create the ggml context of the expert id maps");
    }
    for (size_t i = 0; i < maps.size(); ++i) {
        ggml_tensor * t = ggml_new_tensor_2d(mx->ctx.get(), GGML_TYPE_I32, 1, n_expert + 1);
        ggml_format_name(t, "blk.%d.mcmoe_expert_map.%zu", il, i);
        mx->maps.push_back(t);
    }
    ggml_backend_buffer_type_t buft = mcmoe_map_buft(ml, mx->groups[MCMOE_MOE_DOWN][0].w);
    mx->buf.reset(ggml_backend_alloc_ctx_tensors_from_buft(mx->ctx.get(), buft));
    if (!mx->buf) {
        throw std::runtime_error(format("unable to allocate the expert id maps (%s)", ggml_backend_buft_name(buft)));
    }
    ggml_backend_buffer_set_usage(mx->buf.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (size_t i = 0; i < maps.size(); ++i) {
        ggml_backend_tensor_set(mx->maps[i], maps[i].data(), 0, maps[i].size() * sizeof(int32_t));
    }

    for (int p = 0; p < MCMOE_MOE_N_PROJ; ++p) {
        std::string desc;
        for (const auto & g : mx->groups[p]) {
            desc += format(" %s x%zu", ggml_type_name(g.w->type), g.experts.size());
        }
        if (!desc.empty()) {
            LLAMA_LOG_DEBUG("%s: layer %d %s groups:%s\n", __func__, il,
                            p == MCMOE_MOE_GATE ? "gate" : p == MCMOE_MOE_UP ? "up" : "down", desc.c_str());
        }
    }

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

void mcmoe_check_tensor_shape(const ggml_tensor * t) {
    const bool is_mcq = t->type == GGML_TYPE_MCQ1 || t->type == GGML_TYPE_MCQ2 || t->type == GGML_TYPE_MCQ3 ||
                        t->type == GGML_TYPE_MCQ4;
    if (is_mcq && t->ne[0] % 256 != 0) {
        throw std::runtime_error(std::string("mcmoe: tensor '") + t->name + "' of type " + ggml_type_name(t->type) +
                                 " has rows of " + std::to_string(t->ne[0]) +
                                 " weights; the mcq types need a multiple of 256 (the CPU kernels read activations as Q8_K)");
    }
}

// ---------------------------------------------------------------- ODP

// a scalar key: the kv-override if there is one, else the file's value; false if neither exists
static bool mcmoe_odp_key(const llama_model_loader & ml, const char * key, double * f, bool * b, std::string * s) {
    const auto it = ml.kv_overrides.find(key);
    if (it != ml.kv_overrides.end()) {
        const llama_model_kv_override & o = it->second;
        if (f && o.tag == LLAMA_KV_OVERRIDE_TYPE_FLOAT) { *f = o.val_f64; return true; }
        if (f && o.tag == LLAMA_KV_OVERRIDE_TYPE_INT)   { *f = (double) o.val_i64; return true; }
        if (b && o.tag == LLAMA_KV_OVERRIDE_TYPE_BOOL)  { *b = o.val_bool; return true; }
        if (s && o.tag == LLAMA_KV_OVERRIDE_TYPE_STR)   { *s = o.val_str; return true; }
        throw std::runtime_error(format("kv-override %s has the wrong type (expected %s)", key,
                                        f ? "float" : b ? "bool" : "str"));
    }
    const int64_t kid = gguf_find_key(ml.metadata, key);
    if (kid < 0) {
        return false;
    }
    const gguf_type t = gguf_get_kv_type(ml.metadata, kid);
    if (f && t == GGUF_TYPE_FLOAT32) { *f = gguf_get_val_f32(ml.metadata, kid); return true; }
    if (f && t == GGUF_TYPE_FLOAT64) { *f = gguf_get_val_f64(ml.metadata, kid); return true; }
    if (b && t == GGUF_TYPE_BOOL)    { *b = gguf_get_val_bool(ml.metadata, kid); return true; }
    if (s && t == GGUF_TYPE_STRING)  { *s = gguf_get_val_str(ml.metadata, kid); return true; }
    throw std::runtime_error(format("metadata %s has the wrong type %s", key, gguf_type_name(t)));
}

// whether the value came from a kv-override (the caller's choice at load) rather than the file
static bool mcmoe_odp_overridden(const llama_model_loader & ml, const char * key) {
    return ml.kv_overrides.find(key) != ml.kv_overrides.end();
}

// mu is a ratio of routing weights (w1 / w0 <= 1): a file's calibrated value outside [0, 1] is corrupt.
// A caller may pass larger values on purpose (any mu >= 1 prunes every second expert), but not NaN/inf.
static const double MCMOE_ODP_MAX_FILE_MU_SCALE = 16.0;

std::shared_ptr<mcmoe_odp_config> mcmoe_load_odp_config(llama_model_loader & ml, int n_layer) {
    auto cfg = std::make_shared<mcmoe_odp_config>();
    bool enabled = false, if_calibrated = false;
    mcmoe_odp_key(ml, "mcmoe.odp.enabled", nullptr, &enabled, nullptr);
    mcmoe_odp_key(ml, "mcmoe.odp.if_calibrated", nullptr, &if_calibrated, nullptr);
    if (!enabled) {
        return cfg;
    }
    double scale = 1.0, over = -1.0, protect = 0.02;
    std::string imp = "attn";
    mcmoe_odp_key(ml, "mcmoe.odp.mu_scale", &scale, nullptr, nullptr);
    mcmoe_odp_key(ml, "mcmoe.odp.mu_override", &over, nullptr, nullptr);
    mcmoe_odp_key(ml, "mcmoe.odp.protect", &protect, nullptr, nullptr);
    mcmoe_odp_key(ml, "mcmoe.odp.importance", nullptr, nullptr, &imp);
    const char * src_scale = mcmoe_odp_overridden(ml, "mcmoe.odp.mu_scale") ? "kv-override" : "file";
    const char * src_protect = mcmoe_odp_overridden(ml, "mcmoe.odp.protect") ? "kv-override" : "file";
    if (!std::isfinite(scale) || scale < 0.0 ||
        (!mcmoe_odp_overridden(ml, "mcmoe.odp.mu_scale") && scale > MCMOE_ODP_MAX_FILE_MU_SCALE)) {
        throw std::runtime_error(format("mcmoe.odp.mu_scale (%s) must be a finite number >= 0%s (got %g)", src_scale,
                                        src_scale[0] == 'f' ? " and <= 16 in a file" : "", scale));
    }
    if (!(protect >= 0.0 && protect <= 1.0)) {
        throw std::runtime_error(format("mcmoe.odp.protect (%s) must be a fraction in [0, 1] (got %g)", src_protect, protect));
    }
    if (std::isnan(over) || std::isinf(over)) {
        throw std::runtime_error(format("mcmoe.odp.mu_override must be finite (got %g)", over));
    }
    static const char * names[] = { "attn", "rowsum", "norm", "none" };
    cfg->importance = -1;
    for (int i = 0; i < 4; ++i) {
        if (imp == names[i]) {
            cfg->importance = i;
        }
    }
    if (cfg->importance < 0) {
        throw std::runtime_error(format("mcmoe.odp.importance must be attn, rowsum, norm or none (got '%s')", imp.c_str()));
    }
    cfg->protect = (float) protect;

    std::vector<float> mu;
    if (over >= 0.0) {
        mu.assign(n_layer, (float) over);
    } else {
        const int64_t kid = gguf_find_key(ml.metadata, "mcmoe.odp.mu");
        if (kid < 0) {
            if (if_calibrated) {
                // asked for "prune where the file is calibrated": an uncalibrated (e.g. F16) file runs whole
                LLAMA_LOG_INFO("mcmoe: ODP requested but the file has no mcmoe.odp.mu: running unpruned\n");
                return std::make_shared<mcmoe_odp_config>();
            }
            throw std::runtime_error("mcmoe.odp.enabled is set but the file has no mcmoe.odp.mu (calibrated per-layer "
                                     "thresholds) and no mcmoe.odp.mu_override was given");
        }
        if (gguf_get_kv_type(ml.metadata, kid) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ml.metadata, kid) != GGUF_TYPE_FLOAT32 ||
            (int64_t) gguf_get_arr_n(ml.metadata, kid) != n_layer) {
            throw std::runtime_error(format("mcmoe.odp.mu must be an array of %d float32 (one per layer), found %s of %zu %s",
                                            n_layer, gguf_type_name(gguf_get_kv_type(ml.metadata, kid)),
                                            gguf_get_kv_type(ml.metadata, kid) == GGUF_TYPE_ARRAY ? gguf_get_arr_n(ml.metadata, kid) : (size_t) 1,
                                            gguf_get_kv_type(ml.metadata, kid) == GGUF_TYPE_ARRAY ? gguf_type_name(gguf_get_arr_type(ml.metadata, kid)) : ""));
        }
        const float * d = (const float *) gguf_get_arr_data(ml.metadata, kid);
        mu.assign(d, d + n_layer);
        for (int il = 0; il < n_layer; ++il) {
            if (!(mu[il] >= 0.0f && mu[il] <= 1.0f)) {   // also false for NaN
                throw std::runtime_error(format("mcmoe.odp.mu[%d] = %g: a calibrated threshold is a ratio w1/w0 in [0, 1]",
                                                il, (double) mu[il]));
            }
        }
    }
    for (float & m : mu) {
        m = (float) (m * scale);
        if (!std::isfinite(m)) {
            throw std::runtime_error(format("mcmoe.odp: mu x mu_scale is not finite (mu_scale %g)", scale));
        }
    }
    cfg->mu = std::move(mu);
    cfg->enabled = true;
    LLAMA_LOG_INFO("mcmoe: ODP on: mu x %.3g%s, protect %.3g, importance %s\n", scale,
                   over >= 0.0 ? " (override)" : "", protect, names[cfg->importance]);
    return cfg;
}

static ggml_tensor * mcmoe_odp_importance(ggml_context * ctx, const mcmoe_odp_config & cfg, ggml_tensor * x,
                                          ggml_tensor * kq, ggml_tensor * cells) {
    const int64_t n_tokens = x->ne[1];
    int mode = cfg.importance;
    const bool have_attn = kq && cells && kq->ne[1] == n_tokens && kq->ne[3] == 1 && ggml_is_contiguous(kq);
    if ((mode == MCMOE_ODP_IMP_ATTN || mode == MCMOE_ODP_IMP_ROWSUM) && !have_attn) {
        mode = MCMOE_ODP_IMP_NORM; // flash attention (no probabilities) or an unusual cache: the norm part only
    }
    if (mode == MCMOE_ODP_IMP_NONE) {
        return nullptr;
    }
    ggml_tensor * l1 = ggml_reshape_1d(ctx, ggml_sum_rows(ctx, ggml_abs(ctx, x)), n_tokens); // ||x_j||_1
    if (mode == MCMOE_ODP_IMP_NORM) {
        return l1;
    }
    const int64_t n_kv = kq->ne[0], n_head = kq->ne[2];
    ggml_tensor * a;
    if (mode == MCMOE_ODP_IMP_ATTN) {
        // received[c] = sum over queries i and heads h of A[c, i, h]; masked (earlier) queries add 0, so
        // for the token j stored in cell c this is the sum over i >= j
        ggml_tensor * t = ggml_cont(ctx, ggml_transpose(ctx, ggml_reshape_2d(ctx, kq, n_kv, n_tokens * n_head)));
        ggml_tensor * recv = ggml_sum_rows(ctx, t);                                   // [1, n_kv]
        a = ggml_reshape_1d(ctx, ggml_get_rows(ctx, recv, cells), n_tokens);          // [n_tokens]
    } else {
        // the reference implementation's: token j's own row summed over keys and heads
        ggml_tensor * rows = ggml_reshape_2d(ctx, ggml_sum_rows(ctx, kq), n_tokens, n_head);  // [n_tokens, n_head]
        a = ggml_reshape_1d(ctx, ggml_sum_rows(ctx, ggml_cont(ctx, ggml_transpose(ctx, rows))), n_tokens);
    }
    // L - j = L, L-1, ..., 1 (arange only counts up)
    ggml_tensor * later = ggml_scale_bias(ctx, ggml_arange(ctx, 0.0f, (float) n_tokens, 1.0f), -1.0f, (float) n_tokens);
    return ggml_mul(ctx, ggml_div(ctx, a, later), l1);
}

void mcmoe_odp_build(ggml_context * ctx, ggml_cgraph * gf, const mcmoe_odp_config & cfg, int il, int64_t n_expert,
                     ggml_tensor * x, ggml_tensor * kq, ggml_tensor * cells, ggml_tensor ** ids, ggml_tensor ** weights) {
    const int64_t n_tokens = x->ne[1];
    mcmoe_odp_params p = {};
    p.mu        = cfg.mu[il];
    p.n_protect = mcmoe_odp_n_protect(cfg.protect, (int) n_tokens);
    p.marker    = (int32_t) n_expert;
    p.layer     = il;
    ggml_tensor * imp = p.n_protect > 0 ? mcmoe_odp_importance(ctx, cfg, x, kq, cells) : nullptr;
    if (imp == nullptr) {
        p.n_protect = 0;
    }
    ggml_tensor * w = ggml_is_contiguous(*weights) ? *weights : ggml_cont(ctx, *weights);
    ggml_tensor * i = ggml_is_contiguous(*ids) ? *ids : ggml_cont(ctx, *ids);
    p.what = MCMOE_ODP_WEIGHTS;
    ggml_tensor * w_new = ggml_mcmoe_odp(ctx, i, w, imp, p);
    p.what = MCMOE_ODP_IDS;
    ggml_tensor * i_new = ggml_mcmoe_odp(ctx, i, w, imp, p);
    ggml_format_name(w_new, "mcmoe_odp_weights-%d", il);
    ggml_format_name(i_new, "mcmoe_odp_ids-%d", il);
    ggml_build_forward_expand(gf, i_new); // the counters are updated by this node: keep it in the graph
    *weights = w_new;
    *ids     = i_new;
}
