// mcmoe-gguf: skipped ids in the CPU mul_mat_id (ggml-cpu.c and repack.cpp), see ../ggml/mcmoe-ids.h.
//
// Called where the CPU groups the rows of `ids` by expert (thread 0, before the barrier that precedes
// the products): a skipped id gets its dst row zeroed and is left out of the grouping, so no thread
// computes it. Rows of kept ids are disjoint from it, so no other thread writes there.
#pragma once

#include "ggml.h"
#include "mcmoe-ids.h"

#include <string.h>

// true if ids[slot, token] = `id` is skipped (and dst[:, slot, token] now holds zeros)
static inline bool mcmoe_mmid_skip(int32_t id, int64_t n_as, struct ggml_tensor * dst, int64_t slot, int64_t token) {
    if (!mcmoe_id_skipped(id, n_as)) {
        return false;
    }
    memset((char *) dst->data + slot*dst->nb[1] + token*dst->nb[2], 0, dst->ne[0]*sizeof(float));
    return true;
}
