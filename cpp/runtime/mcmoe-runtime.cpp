// mcmoe runtime identity: lets Python refuse a stock or stale libllama.
//
// The hash of our sources (cpp/ + patches/) is computed by scripts/build_runtime.py and
// written to mcmoe-source-hash.h next to this directory in the patched tree; Python
// recomputes it from the checkout and compares (mcmoe_gguf/engine/libllama.py).
#include "mcmoe-runtime.h"

#include "mcmoe-source-hash.h"

#ifndef MCMOE_SOURCE_HASH
#error "mcmoe-source-hash.h must define MCMOE_SOURCE_HASH (written by scripts/build_runtime.py)"
#endif

extern "C" const char * mcmoe_runtime_info(void) {
    // One line, "key=value" pairs: stable enough for Python to parse, readable in a debugger.
    // features: what tests can ask for before relying on it (a stale build lacks them)
    //   mmid-skip       mul_mat_id skips ids < 0 or >= n_as and zeroes their rows (mcmoe/ggml/mcmoe-ids.h)
    //   split-experts   per-expert MoE tensors grouped by type at load (mcmoe/runtime/mcmoe-moe.h)
    //   q8k-act         the mcq CPU kernels read activations as Q8_K (rows of 256)
    //   odp             GGML_OP_MCMOE_ODP, mcmoe.odp.* parameters, mcmoe_odp_* counters (mcmoe/ggml/mcmoe-odp.h)
    return "mcmoe-runtime abi=1 source_hash=" MCMOE_SOURCE_HASH " features=mmid-skip,split-experts,q8k-act,odp";
}
