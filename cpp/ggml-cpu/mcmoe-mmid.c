// mcmoe-gguf: the CPU mul_mat_id's additions (see mcmoe-mmid.h).
#include "mcmoe-mmid.h"
#include "mcq-cpu.h"
#include "mcn-cpu.h"

#include <string.h>

bool mcmoe_mmid_skip(int32_t id, int64_t n_as, struct ggml_tensor * dst, int64_t slot, int64_t token) {
    if (!mcmoe_id_skipped(id, n_as)) {
        return false;
    }
    memset((char *) dst->data + slot*dst->nb[1] + token*dst->nb[2], 0, dst->ne[0]*sizeof(float));
    return true;
}

bool mcmoe_mmid_tile_chunk(const struct ggml_tensor * src0, const struct ggml_tensor * src1, struct ggml_tensor * dst,
                           const char * w, const int32_t * rows, int64_t ir0_start, int64_t ir0_end,
                           int64_t ir1_start, int64_t ir1_end, const void * wdata, size_t row_size, bool packed,
                           bool use_ref) {
    const enum ggml_type type = src0->type;
    const bool mcq = mcq_cpu_has_tile(type);
    if (use_ref || (!mcq && !mcn_cpu_has_tile(type))) {
        return false;
    }
    const int64_t blck = 16; // = mcq_gemm_tile's and mcn_gemm_tile's limit on rows and on columns
    const int64_t ne11 = src1->ne[1];
    const void * cols[16];
    float      * dsts[16];
    for (int64_t iir1 = ir1_start; iir1 < ir1_end; iir1 += blck) {
        for (int64_t iir0 = ir0_start; iir0 < ir0_end; iir0 += blck) {
            int nc = 0;
            for (int64_t ir1 = iir1; ir1 < iir1 + blck && ir1 < ir1_end; ++ir1) {
                const int64_t slot  = rows[2*ir1 + 0];
                const int64_t token = rows[2*ir1 + 1];
                const int64_t i11   = slot % ne11;
                cols[nc] = (const char *) wdata + (packed ? (i11 + token*ne11)*row_size
                                                          : (size_t) (i11*src1->nb[1] + token*src1->nb[2]));
                dsts[nc++] = (float *) ((char *) dst->data + slot*dst->nb[1] + token*dst->nb[2]) + iir0;
            }
            const int nr = (int) ((iir0 + blck < ir0_end ? iir0 + blck : ir0_end) - iir0);
            GGML_ASSERT((mcq ? mcq_gemm_tile : mcn_gemm_tile)(type, (int) src0->ne[0], w + iir0*src0->nb[1], src0->nb[1],
                                                             nr, cols, nc, dsts));
        }
    }
    return true;
}
