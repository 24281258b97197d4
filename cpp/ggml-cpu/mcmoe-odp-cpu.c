// mcmoe-gguf: CPU forward of the ODP op, see mcmoe-odp-cpu.h and ../ggml/mcmoe-odp.h.
#include "mcmoe-odp-cpu.h"
#include "mcmoe-odp.h"

#include "ggml-cpu-impl.h"

#include <stdlib.h>
#include <string.h>

void mcmoe_odp_compute_forward(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    if (params->ith != 0) {
        return;
    }
    struct mcmoe_odp_params p;
    memcpy(&p, dst->op_params, sizeof(p));
    const struct ggml_tensor * ids = dst->src[0];
    const struct ggml_tensor * w   = dst->src[1];
    const struct ggml_tensor * imp = dst->src[2];
    const int k = (int) ids->ne[0], n = (int) ids->ne[1];
    const int32_t * id_in = (const int32_t *) ids->data;
    const float   * w_in  = (const float *) w->data;
    const float   * I     = imp ? (const float *) imp->data : NULL;

    uint8_t * flags = p.what == MCMOE_ODP_IDS ? (uint8_t *) malloc((size_t) n) : NULL;
    int64_t pruned_total = 0, protected_total = 0;
    int32_t id_tmp[16];
    float   w_tmp[16];
    GGML_ASSERT(k <= 16);
    for (int t = 0; t < n; ++t) {
        const bool prot = I != NULL && p.n_protect > 0 && mcmoe_odp_rank(I, n, t) < p.n_protect;
        int n_pruned = 0;
        const int f = mcmoe_odp_token(id_in + (size_t) t*k, w_in + (size_t) t*k, k, p.mu, prot, p.marker,
                                      id_tmp, w_tmp, &n_pruned);
        if (p.what == MCMOE_ODP_IDS) {
            memcpy((int32_t *) dst->data + (size_t) t*k, id_tmp, sizeof(int32_t)*k);
            flags[t] = (uint8_t) f;
            pruned_total += n_pruned;
            protected_total += prot;
        } else {
            memcpy((float *) dst->data + (size_t) t*k, w_tmp, sizeof(float)*k);
        }
    }
    if (p.what == MCMOE_ODP_IDS) {
        mcmoe_odp_record(p.layer, (int64_t) k*n, pruned_total, n, protected_total, flags, n);
        free(flags);
    }
}
