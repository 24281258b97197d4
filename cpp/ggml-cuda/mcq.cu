// mcmoe-gguf: CUDA kernels of the mcq1..mcq4 types (see mcq.cuh). Every decode step is a helper of
// ../ggml/mcq-common.h, the header the CPU reference and tests/engine/test_cuda_helpers.py run on the host.
#include "mcq.cuh"

#include "mmvq.cuh"    // MMVQ_MAX_BATCH_SIZE
#include "mcq-common.h"
#include "mcmoe-ids.h"

static_assert(MCQ_HD_QK_Y == QK8_1, "mcq kernels pair one 32-slice of a block with one block_q8_1");

#define MCQ_CUDA_BLOCK_SIZE  256 // threads of the dequantize / get_rows kernels (4 weights each)
#define MCQ_MMVQ_NWARPS      4   // rows per CUDA block of the vec kernel (one warp per row)

// ---------------------------------------------------------------- dequantize (convert.cu)

// y (contiguous [ne00, ne01, ne02*ne03]) <- x with block strides s01, s02, s03; 4 weights per thread.
// The value is computed in fp32 (bit-exact with formats.py) and rounded once to dst_t.
template <int bits, typename dst_t>
static __global__ void k_mcq_dequantize(const void * __restrict__ vx, dst_t * __restrict__ y,
        const int64_t ne00, const int64_t ne01, const int64_t ne0203, const uint3 ne02,
        const int64_t s01, const int64_t s02, const int64_t s03) {
    constexpr int bb = MCQ_HD_BLOCK_BYTES(bits);
    const int64_t i00 = 4*((int64_t) blockDim.x*blockIdx.x + threadIdx.x);
    if (i00 >= ne00) {
        return;
    }
    for (int64_t i01 = blockIdx.y; i01 < ne01; i01 += gridDim.y) {
        for (int64_t i0203 = blockIdx.z; i0203 < ne0203; i0203 += gridDim.z) {
            const uint2   dm  = fast_div_modulo((uint32_t) i0203, ne02);
            const int64_t ib  = dm.x*s03 + dm.y*s02 + i01*s01 + i00/MCQ_HD_QK;
            const uint8_t * blk = (const uint8_t *) vx + ib*bb;
            const float    d  = mcq_hd_block_d(blk);
            const float    m  = mcq_hd_block_m(blk);
            const uint32_t q4 = mcq_hd_codes4(bits, blk + 4, (int) (i00 % MCQ_HD_QK));
            dst_t * yy = y + (i0203*ne01 + i01)*ne00 + i00;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                yy[k] = ggml_cuda_cast<dst_t>(mcq_hd_value(d, m, (int) ((q4 >> 8*k) & 0xFF)));
            }
        }
    }
}

template <int bits, typename dst_t>
static void mcq_dequantize_nc_cuda(const void * vx, dst_t * y,
        const int64_t ne00, const int64_t ne01, const int64_t ne02, const int64_t ne03,
        const int64_t s01, const int64_t s02, const int64_t s03, cudaStream_t stream) {
    GGML_ASSERT(ne00 % MCQ_HD_QK == 0);
    const int64_t ne0203 = ne02*ne03;
    const uint3 ne02_fdv = init_fastdiv_values((uint32_t) ne02);
    const dim3 num_blocks((ne00/4 + MCQ_CUDA_BLOCK_SIZE - 1) / MCQ_CUDA_BLOCK_SIZE,
                          (int) std::min(ne01, (int64_t) 65535), (int) std::min(ne0203, (int64_t) 65535));
    k_mcq_dequantize<bits, dst_t><<<num_blocks, MCQ_CUDA_BLOCK_SIZE, 0, stream>>>(vx, y, ne00, ne01, ne0203, ne02_fdv, s01, s02, s03);
}

template <int bits, typename dst_t>
static void mcq_dequantize_cuda(const void * vx, dst_t * y, const int64_t k, cudaStream_t stream) {
    mcq_dequantize_nc_cuda<bits, dst_t>(vx, y, k, 1, 1, 1, k/MCQ_HD_QK, k/MCQ_HD_QK, k/MCQ_HD_QK, stream);
}

template <typename dst_t>
static to_t_cuda_t<dst_t> mcq_get_to_t(ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCQ1: return mcq_dequantize_cuda<1, dst_t>;
        case GGML_TYPE_MCQ2: return mcq_dequantize_cuda<2, dst_t>;
        case GGML_TYPE_MCQ3: return mcq_dequantize_cuda<3, dst_t>;
        case GGML_TYPE_MCQ4: return mcq_dequantize_cuda<4, dst_t>;
        default:             return nullptr;
    }
}

template <typename dst_t>
static to_t_nc_cuda_t<dst_t> mcq_get_to_t_nc(ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCQ1: return mcq_dequantize_nc_cuda<1, dst_t>;
        case GGML_TYPE_MCQ2: return mcq_dequantize_nc_cuda<2, dst_t>;
        case GGML_TYPE_MCQ3: return mcq_dequantize_nc_cuda<3, dst_t>;
        case GGML_TYPE_MCQ4: return mcq_dequantize_nc_cuda<4, dst_t>;
        default:             return nullptr;
    }
}

// the mcn types (in GGML_CUDA_MCQ_CASES) go to mcn.cu
to_fp32_cuda_t ggml_cuda_mcq_get_to_fp32(ggml_type type) {
    return ggml_cuda_mcn_is_mcn(type) ? ggml_cuda_mcn_get_to_fp32(type) : mcq_get_to_t<float>(type);
}
to_fp16_cuda_t ggml_cuda_mcq_get_to_fp16(ggml_type type) {
    return ggml_cuda_mcn_is_mcn(type) ? ggml_cuda_mcn_get_to_fp16(type) : mcq_get_to_t<half>(type);
}
to_bf16_cuda_t ggml_cuda_mcq_get_to_bf16(ggml_type type) {
    return ggml_cuda_mcn_is_mcn(type) ? ggml_cuda_mcn_get_to_bf16(type) : mcq_get_to_t<nv_bfloat16>(type);
}
to_fp32_nc_cuda_t ggml_cuda_mcq_get_to_fp32_nc(ggml_type type) {
    return ggml_cuda_mcn_is_mcn(type) ? ggml_cuda_mcn_get_to_fp32_nc(type) : mcq_get_to_t_nc<float>(type);
}
to_fp16_nc_cuda_t ggml_cuda_mcq_get_to_fp16_nc(ggml_type type) {
    return ggml_cuda_mcn_is_mcn(type) ? ggml_cuda_mcn_get_to_fp16_nc(type) : mcq_get_to_t_nc<half>(type);
}
to_bf16_nc_cuda_t ggml_cuda_mcq_get_to_bf16_nc(ggml_type type) {
    return ggml_cuda_mcn_is_mcn(type) ? ggml_cuda_mcn_get_to_bf16_nc(type) : mcq_get_to_t_nc<nv_bfloat16>(type);
}

// ---------------------------------------------------------------- get_rows (getrows.cu)

// the indexing of getrows.cu's k_get_rows (grid x = i10, z = (i11, i12)); 4 weights per thread
template <int bits, typename dst_t>
static __global__ void k_mcq_get_rows(
        const void * __restrict__ src0, const int32_t * __restrict__ src1, dst_t * __restrict__ dst,
        const int64_t ne00, const int64_t ne11, const uint3 ne12_fdv,
        const size_t s1, const size_t s2, const size_t s3, const size_t nb01, const size_t nb02, const size_t nb03,
        const size_t s10, const size_t s11, const size_t s12) {
    constexpr int bb = MCQ_HD_BLOCK_BYTES(bits);
    for (int64_t z = blockIdx.z; z < ne11*(int64_t) ne12_fdv.z; z += gridDim.z) {
        for (int64_t i00 = 4*((int64_t) blockIdx.y*blockDim.x + threadIdx.x); i00 < ne00; i00 += 4*(int64_t) gridDim.y*blockDim.x) {
            const int   i10 = blockIdx.x;
            const uint2 dm  = fast_div_modulo((uint32_t) z, ne12_fdv);
            const int   i11 = dm.x;
            const int   i12 = dm.y;
            const int   i01 = src1[i10*s10 + i11*s11 + i12*s12];

            const uint8_t * blk = (const uint8_t *) src0 + i01*nb01 + i11*nb02 + i12*nb03 + (i00/MCQ_HD_QK)*bb;
            const float    d  = mcq_hd_block_d(blk);
            const float    m  = mcq_hd_block_m(blk);
            const uint32_t q4 = mcq_hd_codes4(bits, blk + 4, (int) (i00 % MCQ_HD_QK));
            dst_t * yy = dst + i10*s1 + i11*s2 + i12*s3 + i00;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                yy[k] = ggml_cuda_cast<dst_t>(mcq_hd_value(d, m, (int) ((q4 >> 8*k) & 0xFF)));
            }
        }
    }
}

template <int bits, typename dst_t>
static void mcq_get_rows_cuda(
        const void * src0_d, const int32_t * src1_d, dst_t * dst_d,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    GGML_ASSERT(ne00 % MCQ_HD_QK == 0);
    GGML_ASSERT(ne12 > 0);
    GGML_ASSERT(ne11 <= std::numeric_limits<uint32_t>::max() / ne12);
    const int  block_num_y = (ne00/4 + MCQ_CUDA_BLOCK_SIZE - 1) / MCQ_CUDA_BLOCK_SIZE;
    const dim3 block_nums(ne10, MIN(block_num_y, UINT16_MAX), MIN(ne11*ne12, UINT16_MAX));
    k_mcq_get_rows<bits, dst_t><<<block_nums, MCQ_CUDA_BLOCK_SIZE, 0, stream>>>(
        src0_d, src1_d, dst_d, ne00, ne11, init_fastdiv_values((uint32_t) ne12),
        nb1/sizeof(dst_t), nb2/sizeof(dst_t), nb3/sizeof(dst_t), nb01, nb02, nb03,
        nb10/sizeof(int32_t), nb11/sizeof(int32_t), nb12/sizeof(int32_t));
}

template <typename dst_t>
static void mcq_get_rows_switch_type(
        const void * src0_d, ggml_type src0_type, const int32_t * src1_d, dst_t * dst_d,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
#define MCQ_GET_ROWS_CASE(B)                                                                        \
        case GGML_TYPE_MCQ##B:                                                                      \
            mcq_get_rows_cuda<B, dst_t>(src0_d, src1_d, dst_d, ne00, nb01, nb02, nb03,              \
                ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);                         \
            break;
    switch (src0_type) {
        MCQ_GET_ROWS_CASE(1)
        MCQ_GET_ROWS_CASE(2)
        MCQ_GET_ROWS_CASE(3)
        MCQ_GET_ROWS_CASE(4)
        default:
            GGML_ABORT("%s: not an mcq type: %s", __func__, ggml_type_name(src0_type));
    }
#undef MCQ_GET_ROWS_CASE
}

void ggml_cuda_mcq_get_rows(
        const void * src0_d, ggml_type src0_type, const int32_t * src1_d, void * dst_d, ggml_type dst_type,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    if (ggml_cuda_mcn_is_mcn(src0_type)) { // mcn.cu
        ggml_cuda_mcn_get_rows(src0_d, src0_type, src1_d, dst_d, dst_type, ne00, nb01, nb02, nb03,
            ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);
        return;
    }
    switch (dst_type) {
        case GGML_TYPE_F32:
            mcq_get_rows_switch_type(src0_d, src0_type, src1_d, (float *) dst_d,
                ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);
            break;
        case GGML_TYPE_F16:
            mcq_get_rows_switch_type(src0_d, src0_type, src1_d, (half *) dst_d,
                ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);
            break;
        case GGML_TYPE_BF16:
            mcq_get_rows_switch_type(src0_d, src0_type, src1_d, (nv_bfloat16 *) dst_d,
                ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);
            break;
        default:
            GGML_ABORT("%s: unsupported dst type: %s", __func__, ggml_type_name(dst_type));
    }
}

// ---------------------------------------------------------------- mul_mat_vec_q (mmvq.cu)

// One warp per row of x; lane l takes the 32-slices l, l+32, ... of the row (slice j = block j/4, sub
// j%4, meeting the Q8_1 block j of every column), i.e. 8 consecutive blocks per warp step. Without ids:
// ncols columns of y share the loads of x; with ids: grid z = token, one column, and a skipped id
// (mcmoe-ids.h: < 0 or >= n_as) writes a zero row and computes nothing.
template <int bits, int ncols, bool has_ids>
__launch_bounds__(MCQ_MMVQ_NWARPS*WARP_SIZE, 1)
static __global__ void k_mcq_mul_mat_vec_q(
        const void * __restrict__ vx, const void * __restrict__ vy, const int32_t * __restrict__ ids, float * __restrict__ dst,
        const int ncols_x, const int nrows_x, const int stride_row_x, const int stride_col_y, const int stride_col_dst,
        const int nchannels_y, const int channel_ratio, const int stride_channel_x, const int stride_channel_y,
        const int stride_channel_dst, const int sample_ratio, const int stride_sample_x, const int stride_sample_y,
        const int stride_sample_dst, const int ids_stride, const int n_as) {
    constexpr int bb = MCQ_HD_BLOCK_BYTES(bits);
    const int row = blockIdx.x*MCQ_MMVQ_NWARPS + threadIdx.y;
    if (row >= nrows_x) {
        return;
    }
    const int lane        = threadIdx.x;
    const int channel_dst = blockIdx.y;

    int64_t ix;   // first block of the row
    int64_t iy;   // first Q8_1 block of column 0
    int64_t idst; // dst of column 0
    if constexpr (has_ids) {
        const int     token = blockIdx.z;
        const int32_t id    = ids[channel_dst + (int64_t) token*ids_stride];
        idst = (int64_t) channel_dst*stride_channel_dst + (int64_t) token*stride_col_dst + row;
        if (mcmoe_id_skipped(id, n_as)) {
            if (lane == 0) {
                dst[idst] = 0.0f;
            }
            return;
        }
        ix = (int64_t) id*stride_channel_x + (int64_t) row*stride_row_x;
        iy = (int64_t) (channel_dst % nchannels_y)*stride_channel_y + (int64_t) token*stride_col_y;
    } else {
        const int sample_dst = blockIdx.z;
        ix   = (int64_t) (sample_dst/sample_ratio)*stride_sample_x + (int64_t) (channel_dst/channel_ratio)*stride_channel_x
             + (int64_t) row*stride_row_x;
        iy   = (int64_t) sample_dst*stride_sample_y + (int64_t) channel_dst*stride_channel_y;
        idst = (int64_t) sample_dst*stride_sample_dst + (int64_t) channel_dst*stride_channel_dst + row;
    }
    const uint8_t    * x = (const uint8_t *) vx + ix*bb;
    const block_q8_1 * y = (const block_q8_1 *) vy + iy;

    float acc[ncols] = {0.0f};
    const int nslices = ncols_x / QK8_1;
    for (int j = lane; j < nslices; j += WARP_SIZE) {
        const uint8_t * blk = x + (j / (MCQ_HD_QK/QK8_1))*bb;
        const int       sub = j % (MCQ_HD_QK/QK8_1);
        const float     d   = mcq_hd_block_d(blk);
        const float     m   = mcq_hd_block_m(blk);
#pragma unroll
        for (int c = 0; c < ncols; ++c) {
            const block_q8_1 * yc = y + (int64_t) c*stride_col_y + j;
            const float2       ds = __half22float2(yc->ds);
            acc[c] += mcq_hd_combine_q8_1(d, m, mcq_hd_dot32(bits, blk + 4, sub, yc->qs), ds.x, ds.y);
        }
    }
#pragma unroll
    for (int c = 0; c < ncols; ++c) {
        acc[c] = warp_reduce_sum<WARP_SIZE>(acc[c]);
    }
    if (lane == 0) {
#pragma unroll
        for (int c = 0; c < ncols; ++c) {
            dst[idst + (int64_t) c*stride_col_dst] = acc[c];
        }
    }
}

template <int bits, int ncols, bool has_ids>
static void mcq_mul_mat_vec_q_launch(const dim3 & grid, cudaStream_t stream,
        const void * vx, const void * vy, const int32_t * ids, float * dst,
        int ncols_x, int nrows_x, int stride_row_x, int stride_col_y, int stride_col_dst,
        int nchannels_y, int channel_ratio, int stride_channel_x, int stride_channel_y, int stride_channel_dst,
        int sample_ratio, int stride_sample_x, int stride_sample_y, int stride_sample_dst, int ids_stride, int n_as) {
    const dim3 block(WARP_SIZE, MCQ_MMVQ_NWARPS, 1);
    k_mcq_mul_mat_vec_q<bits, ncols, has_ids><<<grid, block, 0, stream>>>(vx, vy, ids, dst,
        ncols_x, nrows_x, stride_row_x, stride_col_y, stride_col_dst, nchannels_y, channel_ratio, stride_channel_x,
        stride_channel_y, stride_channel_dst, sample_ratio, stride_sample_x, stride_sample_y, stride_sample_dst, ids_stride, n_as);
}

template <int bits>
static void mcq_mul_mat_vec_q_switch_ncols(
        const void * vx, const void * vy, const int32_t * ids, float * dst,
        int ncols_x, int nrows_x, int ncols_dst, int stride_row_x, int stride_col_y, int stride_col_dst,
        int nchannels_x, int nchannels_y, int nchannels_dst, int stride_channel_x, int stride_channel_y, int stride_channel_dst,
        int nsamples_x, int nsamples_dst, int stride_sample_x, int stride_sample_y, int stride_sample_dst,
        int ids_stride, cudaStream_t stream) {
    const int nblocks_x = (nrows_x + MCQ_MMVQ_NWARPS - 1) / MCQ_MMVQ_NWARPS;
    if (ids) {
        // mul_mat_id: columns are tokens (grid z), channels are expert slots; n_as = experts in x
        GGML_ASSERT(nsamples_x == 1 && nsamples_dst == 1);
        const dim3 grid(nblocks_x, nchannels_dst, ncols_dst);
        mcq_mul_mat_vec_q_launch<bits, 1, true>(grid, stream, vx, vy, ids, dst, ncols_x, nrows_x, stride_row_x, stride_col_y,
            stride_col_dst, nchannels_y, 1, stride_channel_x, stride_channel_y, stride_channel_dst, 1, 0, 0, 0, ids_stride, nchannels_x);
        return;
    }
    GGML_ASSERT(nchannels_dst % nchannels_x == 0 && nsamples_dst % nsamples_x == 0);
    const int  channel_ratio = nchannels_dst / nchannels_x;
    const int  sample_ratio  = nsamples_dst / nsamples_x;
    const dim3 grid(nblocks_x, nchannels_dst, nsamples_dst);
#define MCQ_MMVQ_CASE(N)                                                                                                       \
        case N:                                                                                                               \
            mcq_mul_mat_vec_q_launch<bits, N, false>(grid, stream, vx, vy, nullptr, dst, ncols_x, nrows_x, stride_row_x,       \
                stride_col_y, stride_col_dst, nchannels_y, channel_ratio, stride_channel_x, stride_channel_y, stride_channel_dst, \
                sample_ratio, stride_sample_x, stride_sample_y, stride_sample_dst, 0, 0);                                     \
            break;
    switch (ncols_dst) {
        MCQ_MMVQ_CASE(1)
        MCQ_MMVQ_CASE(2)
        MCQ_MMVQ_CASE(3)
        MCQ_MMVQ_CASE(4)
        MCQ_MMVQ_CASE(5)
        MCQ_MMVQ_CASE(6)
        MCQ_MMVQ_CASE(7)
        MCQ_MMVQ_CASE(8)
        default:
            GGML_ABORT("%s: ncols_dst = %d > %d", __func__, ncols_dst, MMVQ_MAX_BATCH_SIZE);
    }
#undef MCQ_MMVQ_CASE
}

void ggml_cuda_mcq_mul_mat_vec_q(
        ggml_type type_x, const void * vx, const void * vy, const int32_t * ids, float * dst,
        int ncols_x, int nrows_x, int ncols_dst, int stride_row_x, int stride_col_y, int stride_col_dst,
        int nchannels_x, int nchannels_y, int nchannels_dst, int stride_channel_x, int stride_channel_y, int stride_channel_dst,
        int nsamples_x, int nsamples_dst, int stride_sample_x, int stride_sample_y, int stride_sample_dst,
        int ids_stride, cudaStream_t stream) {
    if (ggml_cuda_mcn_is_mcn(type_x)) { // mcn.cu (strides of x are in its blocks of 256)
        ggml_cuda_mcn_mul_mat_vec_q(type_x, vx, vy, ids, dst, ncols_x, nrows_x, ncols_dst, stride_row_x, stride_col_y,
            stride_col_dst, nchannels_x, nchannels_y, nchannels_dst, stride_channel_x, stride_channel_y, stride_channel_dst,
            nsamples_x, nsamples_dst, stride_sample_x, stride_sample_y, stride_sample_dst, ids_stride, stream);
        return;
    }
    GGML_ASSERT(ncols_x % MCQ_HD_QK == 0);
#define MCQ_MMVQ_TYPE(B)                                                                                                  \
        case GGML_TYPE_MCQ##B:                                                                                           \
            mcq_mul_mat_vec_q_switch_ncols<B>(vx, vy, ids, dst, ncols_x, nrows_x, ncols_dst, stride_row_x, stride_col_y,  \
                stride_col_dst, nchannels_x, nchannels_y, nchannels_dst, stride_channel_x, stride_channel_y,              \
                stride_channel_dst, nsamples_x, nsamples_dst, stride_sample_x, stride_sample_y, stride_sample_dst,        \
                ids_stride, stream);                                                                                      \
            break;
    switch (type_x) {
        MCQ_MMVQ_TYPE(1)
        MCQ_MMVQ_TYPE(2)
        MCQ_MMVQ_TYPE(3)
        MCQ_MMVQ_TYPE(4)
        default:
            GGML_ABORT("%s: not an mcq type: %s", __func__, ggml_type_name(type_x));
    }
#undef MCQ_MMVQ_TYPE
    CUDA_CHECK(cudaGetLastError());
}
