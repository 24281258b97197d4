// mcmoe-gguf: CUDA kernels of the mcq1..mcq4 types (mcq.cu), called from small hooks in ggml-cuda.
//
// The kernels live in their own translation unit so that the stock files (convert.cu, getrows.cu,
// mmvq.cu, ggml-cuda.cu) only gain a `case` each and do not instantiate anything of ours: a change to the
// kernels recompiles mcq.cu alone. Per-block arithmetic: ../ggml/mcq-common.h (shared with the CPU).
//
//   convert (to f32 / f16 / bf16, contiguous and not): dequantize for cuBLAS (prefill, batches > 8)
//   get_rows:                                           GGML_OP_GET_ROWS
//   mul_mat_vec_q:                                      MMVQ (decode, batches <= 8), with and without ids;
//                                                       skipped ids (mcmoe-ids.h) give zero rows.
// No MMQ tiles (mmq.cu): for batches > MMVQ_MAX_BATCH_SIZE, mul_mat dequantizes to f16 + cuBLAS and
// mul_mat_id takes ggml-cuda.cu's per-expert cuBLAS path.
//
// The mcn2 / mcn3 types (mcn.cuh) ride on these hooks: GGML_CUDA_MCQ_CASES and ggml_cuda_mcq_is_mcq()
// include them and every ggml_cuda_mcq_* entry point forwards them to its ggml_cuda_mcn_* twin, so the
// stock files need no hook of their own for them.
#pragma once

#include "common.cuh"
#include "convert.cuh"
#include "mcn.cuh"

#define GGML_CUDA_MCQ_CASES case GGML_TYPE_MCQ1: case GGML_TYPE_MCQ2: case GGML_TYPE_MCQ3: case GGML_TYPE_MCQ4: \
                            GGML_CUDA_MCN_CASES

static inline bool ggml_cuda_mcq_is_mcq(ggml_type type) {
    return type == GGML_TYPE_MCQ1 || type == GGML_TYPE_MCQ2 || type == GGML_TYPE_MCQ3 || type == GGML_TYPE_MCQ4 ||
           ggml_cuda_mcn_is_mcn(type);
}

to_fp32_cuda_t    ggml_cuda_mcq_get_to_fp32(ggml_type type);
to_fp16_cuda_t    ggml_cuda_mcq_get_to_fp16(ggml_type type);
to_bf16_cuda_t    ggml_cuda_mcq_get_to_bf16(ggml_type type);
to_fp32_nc_cuda_t ggml_cuda_mcq_get_to_fp32_nc(ggml_type type);
to_fp16_nc_cuda_t ggml_cuda_mcq_get_to_fp16_nc(ggml_type type);
to_bf16_nc_cuda_t ggml_cuda_mcq_get_to_bf16_nc(ggml_type type);

// get_rows_cuda's arguments (strides in bytes)
void ggml_cuda_mcq_get_rows(
        const void * src0_d, ggml_type src0_type, const int32_t * src1_d, void * dst_d, ggml_type dst_type,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream);

// mmvq.cu's mul_mat_vec_q_switch_type arguments (vy: block_q8_1 activations; strides of x in blocks of 128 (mcn: 256),
// of y in Q8_1 blocks, of dst in floats; with ids: columns = tokens, channels = expert slots). No fusion.
void ggml_cuda_mcq_mul_mat_vec_q(
        ggml_type type_x, const void * vx, const void * vy, const int32_t * ids, float * dst,
        int ncols_x, int nrows_x, int ncols_dst, int stride_row_x, int stride_col_y, int stride_col_dst,
        int nchannels_x, int nchannels_y, int nchannels_dst, int stride_channel_x, int stride_channel_y, int stride_channel_dst,
        int nsamples_x, int nsamples_dst, int stride_sample_x, int stride_sample_y, int stride_sample_dst,
        int ids_stride, cudaStream_t stream);
