// mcmoe-gguf: the ODP op's graph constructor and the process-wide counters (ggml-base), see mcmoe-odp.h.
#include "mcmoe-odp.h"

#include "ggml-impl.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct ggml_tensor * ggml_mcmoe_odp(struct ggml_context * ctx, struct ggml_tensor * ids, struct ggml_tensor * weights,
                                    struct ggml_tensor * importance, struct mcmoe_odp_params params) {
    GGML_ASSERT(ids->type == GGML_TYPE_I32 && weights->type == GGML_TYPE_F32);
    GGML_ASSERT(ggml_is_contiguous(ids) && ggml_is_contiguous(weights));
    const int64_t k = ids->ne[0], n_tokens = ids->ne[1];
    GGML_ASSERT(ggml_nelements(ids) == k * n_tokens && ggml_nelements(weights) == k * n_tokens);
    GGML_ASSERT(importance == NULL || (importance->type == GGML_TYPE_F32 && ggml_is_contiguous(importance) &&
                                       ggml_nelements(importance) == n_tokens));
    GGML_ASSERT(params.what == MCMOE_ODP_WEIGHTS || params.what == MCMOE_ODP_IDS);
    GGML_ASSERT(params.n_protect >= 0 && params.n_protect <= n_tokens);

    struct ggml_tensor * result = params.what == MCMOE_ODP_IDS
        ? ggml_new_tensor_2d(ctx, GGML_TYPE_I32, k, n_tokens)
        : ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, k, n_tokens);
    GGML_ASSERT(sizeof(params) <= GGML_MAX_OP_PARAMS);
    ggml_set_op_params(result, &params, sizeof(params));
    result->op     = GGML_OP_MCMOE_ODP;
    result->src[0] = ids;
    result->src[1] = weights;
    result->src[2] = importance;
    return result;
}

// Counters: written by the backend thread that runs an IDS node (one per layer per graph), read by
// Python between evaluations. Not atomic: one llama context at a time (documented in docs/FORMAT.md).
static int64_t g_slots[MCMOE_ODP_MAX_LAYERS], g_pruned[MCMOE_ODP_MAX_LAYERS];
static int64_t g_tokens[MCMOE_ODP_MAX_LAYERS], g_protected[MCMOE_ODP_MAX_LAYERS];
static uint8_t g_flags[MCMOE_ODP_MAX_LAYERS][MCMOE_ODP_MAX_FLAGS];
static int     g_n_flags[MCMOE_ODP_MAX_LAYERS];

// MCMOE_ODP_REPORT=1 (any value but empty or 0): the totals are printed to stderr at exit, so llama.cpp's
// own tools (llama-perplexity, llama-cli, ...) report what ODP pruned; scripts/device_check.py compares
// the CPU's and the GPU's. Registered at the first record: a process that never runs the op prints nothing.
static void mcmoe_odp_report(void) {
    int64_t s = 0, p = 0, t = 0, pr = 0;
    for (int l = 0; l < MCMOE_ODP_MAX_LAYERS; ++l) {
        if (g_slots[l] == 0) {
            continue;
        }
        fprintf(stderr, "mcmoe-odp: layer %d: %lld of %lld slots pruned, %lld tokens, %lld protected\n", l,
                (long long) g_pruned[l], (long long) g_slots[l], (long long) g_tokens[l], (long long) g_protected[l]);
        s += g_slots[l];
        p += g_pruned[l];
        t += g_tokens[l];
        pr += g_protected[l];
    }
    fprintf(stderr, "mcmoe-odp: total: %lld of %lld slots pruned (%.2f%%), %lld tokens, %lld protected\n",
            (long long) p, (long long) s, s ? 100.0 * (double) p / (double) s : 0.0, (long long) t, (long long) pr);
}

void mcmoe_odp_record(int layer, int64_t slots, int64_t pruned, int64_t tokens, int64_t protected_tokens,
                      const uint8_t * flags, int n_flags) {
    static atomic_flag report_registered = ATOMIC_FLAG_INIT;
    if (!atomic_flag_test_and_set(&report_registered)) {
        const char * e = getenv("MCMOE_ODP_REPORT");
        if (e && e[0] && strcmp(e, "0") != 0) {
            atexit(mcmoe_odp_report);
        }
    }
    if (layer < 0 || layer >= MCMOE_ODP_MAX_LAYERS) {
        return;
    }
    g_slots[layer] += slots;
    g_pruned[layer] += pruned;
    g_tokens[layer] += tokens;
    g_protected[layer] += protected_tokens;
    n_flags = n_flags < MCMOE_ODP_MAX_FLAGS ? n_flags : MCMOE_ODP_MAX_FLAGS;
    if (flags && n_flags > 0) {
        memcpy(g_flags[layer], flags, (size_t) n_flags);
    }
    g_n_flags[layer] = n_flags > 0 ? n_flags : 0;
}

int mcmoe_odp_counters(int layer, int64_t * slots, int64_t * pruned, int64_t * tokens, int64_t * protected_tokens) {
    if (layer < 0 || layer >= MCMOE_ODP_MAX_LAYERS) {
        return -1;
    }
    *slots = g_slots[layer];
    *pruned = g_pruned[layer];
    *tokens = g_tokens[layer];
    *protected_tokens = g_protected[layer];
    return 0;
}

void mcmoe_odp_reset(void) {
    memset(g_slots, 0, sizeof(g_slots));
    memset(g_pruned, 0, sizeof(g_pruned));
    memset(g_tokens, 0, sizeof(g_tokens));
    memset(g_protected, 0, sizeof(g_protected));
    memset(g_n_flags, 0, sizeof(g_n_flags));
}

int mcmoe_odp_last_flags(int layer, uint8_t * out, int max) {
    if (layer < 0 || layer >= MCMOE_ODP_MAX_LAYERS) {
        return -1;
    }
    const int n = g_n_flags[layer] < max ? g_n_flags[layer] : max;
    memcpy(out, g_flags[layer], (size_t) (n > 0 ? n : 0));
    return n;
}
