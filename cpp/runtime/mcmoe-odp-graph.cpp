// mcmoe-gguf: ODP in llama.cpp's graph (see mcmoe-odp-graph.h).
#include "mcmoe-odp-graph.h"

#include "llama-impl.h"
#include "llama-model-loader.h"

#include "ggml-backend.h"
#include "gguf.h"
#include "mcmoe-odp.h"

#include <cmath>
#include <stdexcept>
#include <string>


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

ggml_tensor * mcmoe_cells_input_new(ggml_context * ctx, const ggml_tensor * self_k_idxs) {
    if (!self_k_idxs || self_k_idxs->type != GGML_TYPE_I64) {
        return nullptr;
    }
    ggml_tensor * cells = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, self_k_idxs->ne[0]);
    ggml_set_input(cells);
    return cells;
}

void mcmoe_cells_input_set(const ggml_tensor * self_k_idxs, ggml_tensor * cells) {
    if (!cells || !cells->buffer) {
        return;
    }
    GGML_ASSERT(ggml_backend_buffer_is_host(self_k_idxs->buffer) && ggml_backend_buffer_is_host(cells->buffer));
    GGML_ASSERT(ggml_nelements(self_k_idxs) == ggml_nelements(cells));
    for (int64_t i = 0; i < ggml_nelements(cells); ++i) {
        ((int32_t *) cells->data)[i] = (int32_t) ((const int64_t *) self_k_idxs->data)[i];
    }
}
