// mcmoe-gguf: CUDA kernels of the mcn2 / mcn3 types and of the mct1 / mct2 / mct3 trellis types (mcn.cu: both
// families have 256-weight blocks with the same fp16 d + 4-bit scale header and differ only in how a weight's
// int8 level is decoded), reached through the mcq hooks.
//
// The stock files (convert.cu, getrows.cu, mmvq.cu, ggml-cuda.cu) know only the mcq hooks of mcq.cuh:
// GGML_CUDA_MCQ_CASES and ggml_cuda_mcq_is_mcq() include these types, and the ggml_cuda_mcq_* entry
// points forward them to the functions below (same arguments). Per-block arithmetic:
// ../ggml/mcn-common.h and ../ggml/mct-common.h (shared with the CPU; the four-at-a-time helpers tested on the host
// by tests/engine/test_mcn_cuda_helpers.py and test_mct_common.py).
//
//   convert (to f32 / f16 / bf16, contiguous and not): dequantize for cuBLAS (prefill, batches > 8)
//   get_rows:                                           GGML_OP_GET_ROWS
//   mul_mat_vec_q:                                      MMVQ (decode, batches <= 8), with and without ids;
//                                                       skipped ids (mcmoe-ids.h) give zero rows.
// No MMQ tiles: as for mcq, larger batches dequantize to f16 + cuBLAS.
#pragma once

#include "common.cuh"
#include "convert.cuh"

#define GGML_CUDA_MCN_CASES case GGML_TYPE_MCN2: case GGML_TYPE_MCN3: \
                            case GGML_TYPE_MCT1: case GGML_TYPE_MCT2: case GGML_TYPE_MCT3

// an mcn or mct type (the kernels of mcn.cu)
static inline bool ggml_cuda_mcn_is_mcn(ggml_type type) {
    return type == GGML_TYPE_MCN2 || type == GGML_TYPE_MCN3 ||
           type == GGML_TYPE_MCT1 || type == GGML_TYPE_MCT2 || type == GGML_TYPE_MCT3;
}

to_fp32_cuda_t    ggml_cuda_mcn_get_to_fp32(ggml_type type);
to_fp16_cuda_t    ggml_cuda_mcn_get_to_fp16(ggml_type type);
to_bf16_cuda_t    ggml_cuda_mcn_get_to_bf16(ggml_type type);
to_fp32_nc_cuda_t ggml_cuda_mcn_get_to_fp32_nc(ggml_type type);
to_fp16_nc_cuda_t ggml_cuda_mcn_get_to_fp16_nc(ggml_type type);
to_bf16_nc_cuda_t ggml_cuda_mcn_get_to_bf16_nc(ggml_type type);

// get_rows_cuda's arguments (strides in bytes)
void ggml_cuda_mcn_get_rows(
        const void * src0_d, ggml_type src0_type, const int32_t * src1_d, void * dst_d, ggml_type dst_type,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream);

// mmvq.cu's mul_mat_vec_q_switch_type arguments (vy: block_q8_1 activations; strides of x in blocks of the
// type, i.e. of 256 weights = nb / ggml_type_size, as mmvq.cu computes them; of y in Q8_1 blocks, of dst
// in floats; with ids: columns = tokens, channels = expert slots). No fusion.
void ggml_cuda_mcn_mul_mat_vec_q(
        ggml_type type_x, const void * vx, const void * vy, const int32_t * ids, float * dst,
        int ncols_x, int nrows_x, int ncols_dst, int stride_row_x, int stride_col_y, int stride_col_dst,
        int nchannels_x, int nchannels_y, int nchannels_dst, int stride_channel_x, int stride_channel_y, int stride_channel_dst,
        int nsamples_x, int nsamples_dst, int stride_sample_x, int stride_sample_y, int stride_sample_dst,
        int ids_stride, cudaStream_t stream);
