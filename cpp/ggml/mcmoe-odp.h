// mcmoe-gguf: Online Dynamic Pruning (ODP, the paper's section 3.3) as a ggml op, GGML_OP_MCMOE_ODP.
//
// Per MoE layer and token, with the router's top-k slots (ids, weights w after normalisation):
//   - the slot of largest weight (w_max, first on ties) always runs;
//   - another slot s is PRUNED when w_s < mu * w_max and the token is not protected;
//   - a pruned slot's id becomes `marker` (= n_expert: mul_mat_id skips it, mcmoe-ids.h, no compute,
//     zero rows) and its weight 0; the kept weights are rescaled so their sum stays the sum of all k
//     weights (top-2 Mixtral: w0 -> w0 + w1 = 1, the paper's "w0 becomes 1"). A token with nothing
//     pruned keeps its ids and weights bit for bit, so mu = 0 gives exactly the unpruned model.
// Protection (prefill): the n_protect tokens of the micro-batch with the largest importance keep all
// slots. Rank of token j = #{i : I_i > I_j or (I_i == I_j and i < j)}; protected iff rank < n_protect.
// The importance vector is computed by ordinary ggml ops in the graph (llama-graph.cpp, mcmoe-moe.cpp);
// this op only applies the rule.
//
// One op, two outputs: `what` = MCMOE_ODP_WEIGHTS gives the new weights [1, k, n_tokens] F32,
// MCMOE_ODP_IDS the new ids [k, n_tokens] I32. Both evaluate the same pure function of the inputs, so
// the two nodes agree; only the IDS node updates the counters. The per-token arithmetic lives in the
// MCMOE_HOST_DEVICE helpers below, which the CPU op, the CUDA kernel and the tests share.
#pragma once

#include "ggml.h"
#include "mcmoe-ids.h"

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum mcmoe_odp_what {
    MCMOE_ODP_WEIGHTS = 0,
    MCMOE_ODP_IDS     = 1,
};

// per-token decision flags (the debug record of the last micro-batch, see mcmoe_odp_last_flags)
enum mcmoe_odp_flag {
    MCMOE_ODP_FLAG_RULE      = 1, // some slot had w_s < mu * w_max
    MCMOE_ODP_FLAG_PROTECTED = 2, // the token is among the n_protect most important
    MCMOE_ODP_FLAG_PRUNED    = 4, // at least one slot was pruned (RULE and not PROTECTED)
};

// op parameters (op_params of the node, as int32 words)
struct mcmoe_odp_params {
    float   mu;        // threshold ratio of this layer (already scaled / overridden)
    int32_t n_protect; // tokens of the micro-batch that keep every slot
    int32_t marker;    // id written into a pruned slot (n_expert)
    int32_t layer;     // for the counters
    int32_t what;      // enum mcmoe_odp_what
};

// rank of token j among n importances (0 = most important), ties to the lower index
static inline MCMOE_HOST_DEVICE int mcmoe_odp_rank(const float * imp, int n, int j) {
    int r = 0;
    for (int i = 0; i < n; ++i) {
        r += imp[i] > imp[j] || (imp[i] == imp[j] && i < j);
    }
    return r;
}

// slot s of a token whose largest weight is w[top] meets the pruning condition
static inline MCMOE_HOST_DEVICE bool mcmoe_odp_fires(const float * w, int s, int top, float mu) {
    return s != top && w[s] < mu * w[top];
}

// The rule for one token: k slots of ids / w in, ids_out / w_out written (must not alias the inputs).
// Returns the flags (enum mcmoe_odp_flag) of the token; *n_pruned = slots pruned.
static inline MCMOE_HOST_DEVICE int mcmoe_odp_token(const int32_t * ids, const float * w, int k, float mu,
                                                    bool is_protected, int32_t marker,
                                                    int32_t * ids_out, float * w_out, int * n_pruned) {
    int top = 0;
    for (int s = 1; s < k; ++s) {
        if (w[s] > w[top]) {
            top = s;
        }
    }
    bool rule = false;
    float sum_all = 0.0f;
    for (int s = 0; s < k; ++s) {
        sum_all += w[s];
        rule = rule || mcmoe_odp_fires(w, s, top, mu);
    }
    const bool prune = rule && !is_protected;
    float sum_kept = 0.0f;
    int n_kept = 0;
    for (int s = 0; s < k; ++s) {
        if (!(prune && mcmoe_odp_fires(w, s, top, mu))) {
            sum_kept += w[s];
            n_kept++;
        }
    }
    int pruned = 0;
    for (int s = 0; s < k; ++s) {
        const bool  cut = prune && mcmoe_odp_fires(w, s, top, mu);
        const float ws  = w[s];
        if (cut) {
            ids_out[s] = marker;
            w_out[s]   = 0.0f;
            pruned++;
        } else {
            ids_out[s] = ids[s];
            // one kept slot (top-2): exactly the sum, not w * sum / w
            w_out[s] = !prune ? ws : (n_kept == 1 ? sum_all : ws * (sum_all / sum_kept));
        }
    }
    *n_pruned = pruned;
    return (rule ? MCMOE_ODP_FLAG_RULE : 0) | (is_protected ? MCMOE_ODP_FLAG_PROTECTED : 0) |
           (pruned ? MCMOE_ODP_FLAG_PRUNED : 0);
}

// Protected tokens of a micro-batch of n: ceil(ratio * n), but none for a single token (decode: weight
// rule only). The 1e-6 keeps ceil(0.02 * 100) = 2 despite binary rounding; Python uses the same rule.
static inline int mcmoe_odp_n_protect(double ratio, int n_tokens) {
    if (n_tokens <= 1 || ratio <= 0.0) {
        return 0;
    }
    double k = ratio * n_tokens - 1e-6;
    int    c = (int) k;
    c += (double) c < k;
    return c < n_tokens ? c : n_tokens;
}

// ---- graph construction (ggml-base)

// ids [k, n_tokens] I32, weights [1, k, n_tokens] F32 (contiguous), importance [n_tokens] F32 or NULL
// (NULL: no protection). Returns the WEIGHTS or IDS output (see above).
GGML_API struct ggml_tensor * ggml_mcmoe_odp(struct ggml_context * ctx, struct ggml_tensor * ids,
                                             struct ggml_tensor * weights, struct ggml_tensor * importance,
                                             struct mcmoe_odp_params params);

// ---- counters (process-wide; updated by the backends when an IDS node runs)

#define MCMOE_ODP_MAX_LAYERS 256
#define MCMOE_ODP_MAX_FLAGS  8192

GGML_API void mcmoe_odp_record(int layer, int64_t slots, int64_t pruned, int64_t tokens, int64_t protected_tokens,
                               const uint8_t * flags, int n_flags);
// totals since the last reset: top-k slots seen, slots pruned, tokens, protected tokens. 0 on success
GGML_API int  mcmoe_odp_counters(int layer, int64_t * slots, int64_t * pruned, int64_t * tokens,
                                 int64_t * protected_tokens);
GGML_API void mcmoe_odp_reset(void);
// flags (enum mcmoe_odp_flag) of the tokens of the last micro-batch seen by `layer`; returns how many
// were written (<= max), -1 for a bad layer
GGML_API int  mcmoe_odp_last_flags(int layer, uint8_t * out, int max);

#ifdef __cplusplus
}
#endif
