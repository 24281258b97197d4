// mcmoe-gguf: CPU forward of GGML_OP_MCMOE_ODP (../ggml/mcmoe-odp.h). One thread (n_tasks = 1): the op
// touches k * n_tokens numbers, and the protection ranking needs the whole micro-batch.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;

void mcmoe_odp_compute_forward(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
