// mcmoe-gguf: CUDA kernels of the mcn2 / mcn3 table types and the mct1 / mct2 / mct3 trellis types (see mcn.cuh).
// Every decode step is a helper of ../ggml/mcn-common.h or ../ggml/mct-common.h, the headers the CPU reference
// and tests/engine/test_mcn_cuda_helpers.py / test_mct_common.py run on the host.
//
// Blocks are 38 / 70 / 102 bytes (2 mod 4), so a block is only 2-byte aligned: the helpers load code planes as
// 16-bit halves (mcn_hd_le32_a2) or bytes (mct), never as uint32 from a block address.
#include "mcn.cuh"

#include "mmvq.cuh"    // MMVQ_MAX_BATCH_SIZE
#include "mcn-common.h"
#include "mct-common.h"
#include "mcmoe-ids.h"

static_assert(MCN_HD_SUB == QK8_1, "mcn kernels pair one sub-block of a block with one block_q8_1");

#define MCN_CUDA_BLOCK_SIZE  256 // threads of the dequantize / get_rows kernels (4 weights each)
#define MCN_MMVQ_NWARPS      4   // rows per CUDA block of the vec kernel (one warp per row)

// The kernels serve every type of 256-weight blocks that starts with mcn's header (fp16 d, eight 4-bit scales
// per 32): the table types and the trellis types. The template argument T (a ggml_type) picks how four weights'
// int8 levels are decoded and the block size; scales, the Q8_1 dot (dp4a) and the strides are common.
static constexpr __host__ __device__ bool sb_is_mct(int T) { return T == GGML_TYPE_MCT1 || T == GGML_TYPE_MCT2 || T == GGML_TYPE_MCT3; }
static constexpr __host__ __device__ int  sb_bits(int T) { return T == GGML_TYPE_MCN2 ? 2 : T == GGML_TYPE_MCN3 ? 3 : T - GGML_TYPE_MCT1 + 1; }
static constexpr __host__ __device__ int  sb_block_bytes(int T) {
    return sb_is_mct(T) ? MCT_HD_BLOCK_BYTES(sb_bits(T)) : MCN_HD_BLOCK_BYTES(sb_bits(T));
}

// levels of weights n0 .. n0+3 (n0 % 4 == 0) of a block as four int8 bytes
template <int T>
static __device__ __forceinline__ uint32_t sb_levels4(const uint8_t * blk, const int n0) {
    if constexpr (sb_is_mct(T)) {
        return mct_hd_levels4(sb_bits(T), blk, n0);
    } else {
        return mcn_hd_levels4(sb_bits(T), mcn_hd_codes4(sb_bits(T), blk, n0));
    }
}

// levels of sub-block j (weights 32j .. 32j+31) as eight levels4 words
template <int T>
static __device__ __forceinline__ void sb_levels32(const uint8_t * blk, const int j, uint32_t * lv) {
#pragma unroll
    for (int k = 0; k < MCN_HD_SUB/4; ++k) {
        lv[k] = sb_levels4<T>(blk, MCN_HD_SUB*j + 4*k);
    }
}

// weights n0 .. n0+3 (n0 % 4 == 0) of a block: fp32(d) * (s_j * level) rounded once to dst_t
template <int T, typename dst_t>
static __device__ __forceinline__ void mcn_dequant4(const uint8_t * blk, const int n0, dst_t * y) {
    const float    d  = mcn_hd_block_d(blk);
    const int      s  = mcn_hd_scale(blk, n0 / MCN_HD_SUB);
    const uint32_t lv = sb_levels4<T>(blk, n0);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        y[k] = ggml_cuda_cast<dst_t>(mcn_hd_value(d, s, mcn_hd_level_byte(lv, k)));
    }
}

// ---------------------------------------------------------------- dequantize (convert.cu)

// y (contiguous [ne00, ne01, ne02*ne03]) <- x with block strides s01, s02, s03 (blocks of 256); 4 weights per thread.
template <int T, typename dst_t>
static __global__ void k_mcn_dequantize(const void * __restrict__ vx, dst_t * __restrict__ y,
        const int64_t ne00, const int64_t ne01, const int64_t ne0203, const uint3 ne02,
        const int64_t s01, const int64_t s02, const int64_t s03) {
    constexpr int bb = sb_block_bytes(T);
    const int64_t i00 = 4*((int64_t) blockDim.x*blockIdx.x + threadIdx.x);
    if (i00 >= ne00) {
        return;
    }
    for (int64_t i01 = blockIdx.y; i01 < ne01; i01 += gridDim.y) {
        for (int64_t i0203 = blockIdx.z; i0203 < ne0203; i0203 += gridDim.z) {
            const uint2   dm = fast_div_modulo((uint32_t) i0203, ne02);
            const int64_t ib = dm.x*s03 + dm.y*s02 + i01*s01 + i00/MCN_HD_QK;
            mcn_dequant4<T>((const uint8_t *) vx + ib*bb, (int) (i00 % MCN_HD_QK), y + (i0203*ne01 + i01)*ne00 + i00);
        }
    }
}

template <int T, typename dst_t>
static void mcn_dequantize_nc_cuda(const void * vx, dst_t * y,
        const int64_t ne00, const int64_t ne01, const int64_t ne02, const int64_t ne03,
        const int64_t s01, const int64_t s02, const int64_t s03, cudaStream_t stream) {
    GGML_ASSERT(ne00 % MCN_HD_QK == 0);
    const int64_t ne0203 = ne02*ne03;
    const uint3 ne02_fdv = init_fastdiv_values((uint32_t) ne02);
    const dim3 num_blocks((ne00/4 + MCN_CUDA_BLOCK_SIZE - 1) / MCN_CUDA_BLOCK_SIZE,
                          (int) std::min(ne01, (int64_t) 65535), (int) std::min(ne0203, (int64_t) 65535));
    k_mcn_dequantize<T, dst_t><<<num_blocks, MCN_CUDA_BLOCK_SIZE, 0, stream>>>(vx, y, ne00, ne01, ne0203, ne02_fdv, s01, s02, s03);
}

// contiguous: k weights as one row of k/256 blocks
template <int T, typename dst_t>
static void mcn_dequantize_cuda(const void * vx, dst_t * y, const int64_t k, cudaStream_t stream) {
    mcn_dequantize_nc_cuda<T, dst_t>(vx, y, k, 1, 1, 1, k/MCN_HD_QK, k/MCN_HD_QK, k/MCN_HD_QK, stream);
}

template <typename dst_t>
static to_t_cuda_t<dst_t> mcn_get_to_t(ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCN2: return mcn_dequantize_cuda<GGML_TYPE_MCN2, dst_t>;
        case GGML_TYPE_MCN3: return mcn_dequantize_cuda<GGML_TYPE_MCN3, dst_t>;
        case GGML_TYPE_MCT1: return mcn_dequantize_cuda<GGML_TYPE_MCT1, dst_t>;
        case GGML_TYPE_MCT2: return mcn_dequantize_cuda<GGML_TYPE_MCT2, dst_t>;
        case GGML_TYPE_MCT3: return mcn_dequantize_cuda<GGML_TYPE_MCT3, dst_t>;
        default:             return nullptr;
    }
}

template <typename dst_t>
static to_t_nc_cuda_t<dst_t> mcn_get_to_t_nc(ggml_type type) {
    switch (type) {
        case GGML_TYPE_MCN2: return mcn_dequantize_nc_cuda<GGML_TYPE_MCN2, dst_t>;
        case GGML_TYPE_MCN3: return mcn_dequantize_nc_cuda<GGML_TYPE_MCN3, dst_t>;
        case GGML_TYPE_MCT1: return mcn_dequantize_nc_cuda<GGML_TYPE_MCT1, dst_t>;
        case GGML_TYPE_MCT2: return mcn_dequantize_nc_cuda<GGML_TYPE_MCT2, dst_t>;
        case GGML_TYPE_MCT3: return mcn_dequantize_nc_cuda<GGML_TYPE_MCT3, dst_t>;
        default:             return nullptr;
    }
}

to_fp32_cuda_t    ggml_cuda_mcn_get_to_fp32(ggml_type type)    { return mcn_get_to_t<float>(type); }
to_fp16_cuda_t    ggml_cuda_mcn_get_to_fp16(ggml_type type)    { return mcn_get_to_t<half>(type); }
to_bf16_cuda_t    ggml_cuda_mcn_get_to_bf16(ggml_type type)    { return mcn_get_to_t<nv_bfloat16>(type); }
to_fp32_nc_cuda_t ggml_cuda_mcn_get_to_fp32_nc(ggml_type type) { return mcn_get_to_t_nc<float>(type); }
to_fp16_nc_cuda_t ggml_cuda_mcn_get_to_fp16_nc(ggml_type type) { return mcn_get_to_t_nc<half>(type); }
to_bf16_nc_cuda_t ggml_cuda_mcn_get_to_bf16_nc(ggml_type type) { return mcn_get_to_t_nc<nv_bfloat16>(type); }

// ---------------------------------------------------------------- get_rows (getrows.cu)

// the indexing of getrows.cu's k_get_rows (grid x = i10, z = (i11, i12)); 4 weights per thread
template <int T, typename dst_t>
static __global__ void k_mcn_get_rows(
        const void * __restrict__ src0, const int32_t * __restrict__ src1, dst_t * __restrict__ dst,
        const int64_t ne00, const int64_t ne11, const uint3 ne12_fdv,
        const size_t s1, const size_t s2, const size_t s3, const size_t nb01, const size_t nb02, const size_t nb03,
        const size_t s10, const size_t s11, const size_t s12) {
    constexpr int bb = sb_block_bytes(T);
    for (int64_t z = blockIdx.z; z < ne11*(int64_t) ne12_fdv.z; z += gridDim.z) {
        for (int64_t i00 = 4*((int64_t) blockIdx.y*blockDim.x + threadIdx.x); i00 < ne00; i00 += 4*(int64_t) gridDim.y*blockDim.x) {
            const int   i10 = blockIdx.x;
            const uint2 dm  = fast_div_modulo((uint32_t) z, ne12_fdv);
            const int   i11 = dm.x;
            const int   i12 = dm.y;
            const int   i01 = src1[i10*s10 + i11*s11 + i12*s12];

            const uint8_t * blk = (const uint8_t *) src0 + i01*nb01 + i11*nb02 + i12*nb03 + (i00/MCN_HD_QK)*bb;
            mcn_dequant4<T>(blk, (int) (i00 % MCN_HD_QK), dst + i10*s1 + i11*s2 + i12*s3 + i00);
        }
    }
}

template <int T, typename dst_t>
static void mcn_get_rows_cuda(
        const void * src0_d, const int32_t * src1_d, dst_t * dst_d,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    GGML_ASSERT(ne00 % MCN_HD_QK == 0);
    GGML_ASSERT(ne12 > 0);
    GGML_ASSERT(ne11 <= std::numeric_limits<uint32_t>::max() / ne12);
    const int  block_num_y = (ne00/4 + MCN_CUDA_BLOCK_SIZE - 1) / MCN_CUDA_BLOCK_SIZE;
    const dim3 block_nums(ne10, MIN(block_num_y, UINT16_MAX), MIN(ne11*ne12, UINT16_MAX));
    k_mcn_get_rows<T, dst_t><<<block_nums, MCN_CUDA_BLOCK_SIZE, 0, stream>>>(
        src0_d, src1_d, dst_d, ne00, ne11, init_fastdiv_values((uint32_t) ne12),
        nb1/sizeof(dst_t), nb2/sizeof(dst_t), nb3/sizeof(dst_t), nb01, nb02, nb03,
        nb10/sizeof(int32_t), nb11/sizeof(int32_t), nb12/sizeof(int32_t));
}

template <typename dst_t>
static void mcn_get_rows_switch_type(
        const void * src0_d, ggml_type src0_type, const int32_t * src1_d, dst_t * dst_d,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
#define MCN_GET_ROWS_CASE(TYPE)                                                                     \
        case TYPE:                                                                                  \
            mcn_get_rows_cuda<TYPE, dst_t>(src0_d, src1_d, dst_d, ne00, nb01, nb02, nb03,              \
                ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);                         \
            break;
    switch (src0_type) {
        MCN_GET_ROWS_CASE(GGML_TYPE_MCN2)
        MCN_GET_ROWS_CASE(GGML_TYPE_MCN3)
        MCN_GET_ROWS_CASE(GGML_TYPE_MCT1)
        MCN_GET_ROWS_CASE(GGML_TYPE_MCT2)
        MCN_GET_ROWS_CASE(GGML_TYPE_MCT3)
        default:
            GGML_ABORT("%s: not an mcn type: %s", __func__, ggml_type_name(src0_type));
    }
#undef MCN_GET_ROWS_CASE
}

void ggml_cuda_mcn_get_rows(
        const void * src0_d, ggml_type src0_type, const int32_t * src1_d, void * dst_d, ggml_type dst_type,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    switch (dst_type) {
        case GGML_TYPE_F32:
            mcn_get_rows_switch_type(src0_d, src0_type, src1_d, (float *) dst_d,
                ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);
            break;
        case GGML_TYPE_F16:
            mcn_get_rows_switch_type(src0_d, src0_type, src1_d, (half *) dst_d,
                ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);
            break;
        case GGML_TYPE_BF16:
            mcn_get_rows_switch_type(src0_d, src0_type, src1_d, (nv_bfloat16 *) dst_d,
                ne00, nb01, nb02, nb03, ne10, ne11, ne12, nb10, nb11, nb12, nb1, nb2, nb3, stream);
            break;
        default:
            GGML_ABORT("%s: unsupported dst type: %s", __func__, ggml_type_name(dst_type));
    }
}

// ---------------------------------------------------------------- mul_mat_vec_q (mmvq.cu)

// One warp per row of x; lane l takes the sub-blocks l, l+32, ... of the row (sub-block j = block j/8,
// scale j%8, meeting the Q8_1 block j of every column), i.e. 4 consecutive blocks per warp step. A lane
// decodes its sub-block once (8 words of int8 levels, sb_levels32) and dots it with every column
// (8 dp4a each): sum_n d*s_j*T[q_n] * dy*qy_n = d*dy * (s_j * sumi). Without ids: ncols columns of y;
// with ids: grid z = token, one column, and a skipped id (mcmoe-ids.h: < 0 or >= n_as) writes a zero
// row and computes nothing. Strides of x in blocks of 256 weights (bb bytes).
template <int T, int ncols, bool has_ids>
__launch_bounds__(MCN_MMVQ_NWARPS*WARP_SIZE, 1)
static __global__ void k_mcn_mul_mat_vec_q(
        const void * __restrict__ vx, const void * __restrict__ vy, const int32_t * __restrict__ ids, float * __restrict__ dst,
        const int ncols_x, const int nrows_x, const int stride_row_x, const int stride_col_y, const int stride_col_dst,
        const int nchannels_y, const int channel_ratio, const int stride_channel_x, const int stride_channel_y,
        const int stride_channel_dst, const int sample_ratio, const int stride_sample_x, const int stride_sample_y,
        const int stride_sample_dst, const int ids_stride, const int n_as) {
    constexpr int bb = sb_block_bytes(T);
    const int row = blockIdx.x*MCN_MMVQ_NWARPS + threadIdx.y;
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
    const int nsub = ncols_x / MCN_HD_SUB;
    for (int j = lane; j < nsub; j += WARP_SIZE) {
        const uint8_t * blk = x + (j / MCN_HD_NSUB)*bb;
        const int       sub = j % MCN_HD_NSUB;
        const float     d   = mcn_hd_block_d(blk);
        const int       s   = mcn_hd_scale(blk, sub);
        uint32_t lv[MCN_HD_SUB/4];
        sb_levels32<T>(blk, sub, lv);
#pragma unroll
        for (int c = 0; c < ncols; ++c) {
            const block_q8_1 * yc = y + (int64_t) c*stride_col_y + j;
            acc[c] += mcn_hd_combine_q8_1(d, s, mcn_hd_dot32_lv(lv, yc->qs), __low2float(yc->ds));
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

template <int T, int ncols, bool has_ids>
static void mcn_mul_mat_vec_q_launch(const dim3 & grid, cudaStream_t stream,
        const void * vx, const void * vy, const int32_t * ids, float * dst,
        int ncols_x, int nrows_x, int stride_row_x, int stride_col_y, int stride_col_dst,
        int nchannels_y, int channel_ratio, int stride_channel_x, int stride_channel_y, int stride_channel_dst,
        int sample_ratio, int stride_sample_x, int stride_sample_y, int stride_sample_dst, int ids_stride, int n_as) {
    const dim3 block(WARP_SIZE, MCN_MMVQ_NWARPS, 1);
    k_mcn_mul_mat_vec_q<T, ncols, has_ids><<<grid, block, 0, stream>>>(vx, vy, ids, dst,
        ncols_x, nrows_x, stride_row_x, stride_col_y, stride_col_dst, nchannels_y, channel_ratio, stride_channel_x,
        stride_channel_y, stride_channel_dst, sample_ratio, stride_sample_x, stride_sample_y, stride_sample_dst, ids_stride, n_as);
}

template <int T>
static void mcn_mul_mat_vec_q_switch_ncols(
        const void * vx, const void * vy, const int32_t * ids, float * dst,
        int ncols_x, int nrows_x, int ncols_dst, int stride_row_x, int stride_col_y, int stride_col_dst,
        int nchannels_x, int nchannels_y, int nchannels_dst, int stride_channel_x, int stride_channel_y, int stride_channel_dst,
        int nsamples_x, int nsamples_dst, int stride_sample_x, int stride_sample_y, int stride_sample_dst,
        int ids_stride, cudaStream_t stream) {
    const int nblocks_x = (nrows_x + MCN_MMVQ_NWARPS - 1) / MCN_MMVQ_NWARPS;
    if (ids) {
        // mul_mat_id: columns are tokens (grid z), channels are expert slots; n_as = experts in x
        GGML_ASSERT(nsamples_x == 1 && nsamples_dst == 1);
        const dim3 grid(nblocks_x, nchannels_dst, ncols_dst);
        mcn_mul_mat_vec_q_launch<T, 1, true>(grid, stream, vx, vy, ids, dst, ncols_x, nrows_x, stride_row_x, stride_col_y,
            stride_col_dst, nchannels_y, 1, stride_channel_x, stride_channel_y, stride_channel_dst, 1, 0, 0, 0, ids_stride, nchannels_x);
        return;
    }
    GGML_ASSERT(nchannels_dst % nchannels_x == 0 && nsamples_dst % nsamples_x == 0);
    const int  channel_ratio = nchannels_dst / nchannels_x;
    const int  sample_ratio  = nsamples_dst / nsamples_x;
    const dim3 grid(nblocks_x, nchannels_dst, nsamples_dst);
#define MCN_MMVQ_CASE(N)                                                                                                       \
        case N:                                                                                                               \
            mcn_mul_mat_vec_q_launch<T, N, false>(grid, stream, vx, vy, nullptr, dst, ncols_x, nrows_x, stride_row_x,       \
                stride_col_y, stride_col_dst, nchannels_y, channel_ratio, stride_channel_x, stride_channel_y, stride_channel_dst, \
                sample_ratio, stride_sample_x, stride_sample_y, stride_sample_dst, 0, 0);                                     \
            break;
    switch (ncols_dst) {
        MCN_MMVQ_CASE(1)
        MCN_MMVQ_CASE(2)
        MCN_MMVQ_CASE(3)
        MCN_MMVQ_CASE(4)
        MCN_MMVQ_CASE(5)
        MCN_MMVQ_CASE(6)
        MCN_MMVQ_CASE(7)
        MCN_MMVQ_CASE(8)
        default:
            GGML_ABORT("%s: ncols_dst = %d > %d", __func__, ncols_dst, MMVQ_MAX_BATCH_SIZE);
    }
#undef MCN_MMVQ_CASE
}

void ggml_cuda_mcn_mul_mat_vec_q(
        ggml_type type_x, const void * vx, const void * vy, const int32_t * ids, float * dst,
        int ncols_x, int nrows_x, int ncols_dst, int stride_row_x, int stride_col_y, int stride_col_dst,
        int nchannels_x, int nchannels_y, int nchannels_dst, int stride_channel_x, int stride_channel_y, int stride_channel_dst,
        int nsamples_x, int nsamples_dst, int stride_sample_x, int stride_sample_y, int stride_sample_dst,
        int ids_stride, cudaStream_t stream) {
    GGML_ASSERT(ncols_x % MCN_HD_QK == 0);
#define MCN_MMVQ_TYPE(TYPE)                                                                                               \
        case TYPE:                                                                                                       \
            mcn_mul_mat_vec_q_switch_ncols<TYPE>(vx, vy, ids, dst, ncols_x, nrows_x, ncols_dst, stride_row_x, stride_col_y,  \
                stride_col_dst, nchannels_x, nchannels_y, nchannels_dst, stride_channel_x, stride_channel_y,              \
                stride_channel_dst, nsamples_x, nsamples_dst, stride_sample_x, stride_sample_y, stride_sample_dst,        \
                ids_stride, stream);                                                                                      \
            break;
    switch (type_x) {
        MCN_MMVQ_TYPE(GGML_TYPE_MCN2)
        MCN_MMVQ_TYPE(GGML_TYPE_MCN3)
        MCN_MMVQ_TYPE(GGML_TYPE_MCT1)
        MCN_MMVQ_TYPE(GGML_TYPE_MCT2)
        MCN_MMVQ_TYPE(GGML_TYPE_MCT3)
        default:
            GGML_ABORT("%s: not an mcn type: %s", __func__, ggml_type_name(type_x));
    }
#undef MCN_MMVQ_TYPE
    CUDA_CHECK(cudaGetLastError());
}
