// Normalisations of channels-first maps x [n, C, HW]: SAM's LayerNorm2d (over the channels of
// each pixel; the segmentation connector) and GroupNorm (Mask2Former input projections and FPN),
// optionally followed by ReLU. f32 and bf16 storage, f32 arithmetic, two-pass statistics.
#include "vision_common.cuh"

namespace xsam_norm2d {

// ---------------------------------------------------------------- LayerNorm2d
//
// Block = 32 pixels (lanes) x 8 warps; warp k sums channels k, k+8, ... of its lane's pixel, and
// the 8 partial sums meet in shared memory. Three passes over the block's [C, 32] tile (mean,
// squared deviations, output): the first reads DRAM, the others hit L2 (every X-SAM connector map
// is <= 16 MB). A warp reads 32 consecutive pixels of one channel: coalesced.
//
// Rounding as SAM's LayerNorm2d (HF SamLayerNorm, channels_first) under bf16: statistics and
// (x - u) / sqrt(s + eps) in f32, cast to T, then weight * x and + bias each rounded to T.

constexpr int PIX = 32;
constexpr int WARPS = 8;

template <typename T>
__device__ __forceinline__ void layer_norm_cf(const T* __restrict__ x, const T* __restrict__ weight,
                                              const T* __restrict__ bias, T* __restrict__ y, int C,
                                              int HW, float eps) {
    __shared__ float red[WARPS][PIX];
    const int lane = threadIdx.x % PIX;
    const int warp = threadIdx.x / PIX;
    const int p = blockIdx.x * PIX + lane;
    const bool ok = p < HW;
    const size_t base = (size_t)blockIdx.y * C * HW + p;

    float s = 0.0f;
    if (ok)
        for (int c = warp; c < C; c += WARPS) s += xsam::load_f32(&x[base + (size_t)c * HW]);
    red[warp][lane] = s;
    __syncthreads();
    s = 0.0f;
#pragma unroll
    for (int k = 0; k < WARPS; ++k) s += red[k][lane];
    const float mean = s / (float)C;
    __syncthreads();

    float sq = 0.0f;
    if (ok)
        for (int c = warp; c < C; c += WARPS) {
            const float d = xsam::load_f32(&x[base + (size_t)c * HW]) - mean;
            sq += d * d;
        }
    red[warp][lane] = sq;
    __syncthreads();
    sq = 0.0f;
#pragma unroll
    for (int k = 0; k < WARPS; ++k) sq += red[k][lane];
    const float den = sqrtf(sq / (float)C + eps);

    if (ok)
        for (int c = warp; c < C; c += WARPS) {
            const size_t i = base + (size_t)c * HW;
            float t = xsam_vis::round_to<T>(__fdiv_rn(xsam::load_f32(&x[i]) - mean, den));
            t = xsam_vis::round_to<T>(__fmul_rn(xsam::load_f32(&weight[c]), t));
            t = __fadd_rn(t, xsam::load_f32(&bias[c]));
            xsam::store_f32(&y[i], t);
        }
}

// ---------------------------------------------------------------- GroupNorm
//
// Group g of image b is one contiguous run of (C/G)*HW elements. It is cut into chunks of
// GN_CHUNK elements (one block each, held in registers: 256 threads x 16):
//   stats: each chunk's (count, mean, M2) with exact two-pass statistics over the chunk;
//   apply: each block merges its group's chunk statistics (Chan et al.'s pairwise formula, one
//          warp) and normalises its chunk: y = (x - mean) * (rstd * w[c]) + b[c] (the CPU
//          backend's formula; torch's fused form is the same up to rounding), then optional ReLU.
// Two launches, 2 reads + 1 write; the second read mostly hits L2.

constexpr int GN_THREADS = 256;
constexpr int GN_ITEMS = 16;
constexpr int GN_CHUNK = GN_THREADS * GN_ITEMS;

template <typename T>
__device__ __forceinline__ void load_chunk(const T* __restrict__ g, size_t start, size_t len,
                                           float* v) {
#pragma unroll
    for (int k = 0; k < GN_ITEMS; ++k) {
        const size_t o = start + threadIdx.x + (size_t)k * GN_THREADS;
        v[k] = o < len ? xsam::load_f32(&g[o]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void group_norm_stats(const T* __restrict__ x, float* __restrict__ part,
                                                 int C, int HW, int G) {
    __shared__ float scratch[32];
    const size_t gs = (size_t)(C / G) * HW;
    const int split = blockIdx.x, splits = gridDim.x;
    const size_t bg = blockIdx.y;  // b * G + g
    const T* grp = x + bg * gs;
    const size_t start = (size_t)split * GN_CHUNK;
    const size_t cnt = min((size_t)GN_CHUNK, gs - start);

    float v[GN_ITEMS];
    load_chunk(grp, start, gs, v);
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < GN_ITEMS; ++k) s += v[k];
    const float mean = xsam::block_sum(s, scratch) / (float)cnt;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < GN_ITEMS; ++k) {
        const size_t o = start + threadIdx.x + (size_t)k * GN_THREADS;
        const float d = v[k] - mean;
        if (o < gs) sq += d * d;
    }
    const float m2 = xsam::block_sum(sq, scratch);
    if (threadIdx.x == 0) {
        float* out = part + (bg * splits + split) * 3;
        out[0] = (float)cnt;
        out[1] = mean;
        out[2] = m2;
    }
}

// (n, mean, M2) of the union of two sets.
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float nb, float meanb,
                                           float m2b) {
    const float tot = n + nb;
    if (tot == 0.0f) return;
    const float delta = meanb - mean;
    const float fb = nb / tot;
    mean = mean + delta * fb;
    m2 = m2 + m2b + delta * delta * n * fb;
    n = tot;
}

template <typename T>
__device__ __forceinline__ void group_norm_apply(const T* __restrict__ x,
                                                 const float* __restrict__ part,
                                                 const T* __restrict__ weight,
                                                 const T* __restrict__ bias, T* __restrict__ y,
                                                 int C, int HW, int G, float eps, int relu) {
    __shared__ float stats[2];
    const size_t gs = (size_t)(C / G) * HW;
    const int split = blockIdx.x, splits = gridDim.x;
    const size_t bg = blockIdx.y;
    const int g = (int)(bg % G);

    if (threadIdx.x < 32) {
        float n = 0.0f, mean = 0.0f, m2 = 0.0f;
        for (int s = threadIdx.x; s < splits; s += 32) {
            const float* p = part + (bg * splits + s) * 3;
            chan_merge(n, mean, m2, p[0], p[1], p[2]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float nb = __shfl_xor_sync(xsam::FULL_MASK, n, off);
            const float mb = __shfl_xor_sync(xsam::FULL_MASK, mean, off);
            const float qb = __shfl_xor_sync(xsam::FULL_MASK, m2, off);
            chan_merge(n, mean, m2, nb, mb, qb);
        }
        if (threadIdx.x == 0) {
            stats[0] = mean;
            stats[1] = 1.0f / sqrtf(m2 / n + eps);
        }
    }
    __syncthreads();
    const float mean = stats[0], rstd = stats[1];

    const T* grp = x + bg * gs;
    T* out = y + bg * gs;
    const size_t start = (size_t)split * GN_CHUNK;
    float v[GN_ITEMS];
    load_chunk(grp, start, gs, v);
    // Channel of each element without a division per element: walk (channel, pixel) forward.
    const size_t first = start + threadIdx.x;
    int ch = (int)(first / HW);
    int pix = (int)(first % HW);
#pragma unroll
    for (int k = 0; k < GN_ITEMS; ++k) {
        const size_t o = first + (size_t)k * GN_THREADS;
        if (o < gs) {
            const int c = g * (C / G) + ch;
            const float sc = rstd * xsam::load_f32(&weight[c]);
            float t = (v[k] - mean) * sc + xsam::load_f32(&bias[c]);
            if (relu && !(t > 0.0f) && t == t) t = 0.0f;  // torch.relu keeps NaN
            xsam::store_f32(&out[o], t);
        }
        pix += GN_THREADS;
        while (pix >= HW) {
            pix -= HW;
            ++ch;
        }
    }
}

}  // namespace xsam_norm2d

// layer_norm_cf: grid (ceil(HW/32), n), block 256. weight and bias are [C] (required).
// group_norm_stats: grid (splits = ceil((C/G)*HW / 4096), n*G), block 256; part [n*G, splits, 3].
// group_norm_apply: same grid and block; relu != 0 applies ReLU after the affine.
#define XSAM_NORM2D(T, SUF)                                                                        \
    XSAM_KERNEL void layer_norm_cf_##SUF(const T* __restrict__ x, const T* __restrict__ weight,    \
                                         const T* __restrict__ bias, T* __restrict__ y, int C,     \
                                         int HW, float eps) {                                      \
        xsam_norm2d::layer_norm_cf<T>(x, weight, bias, y, C, HW, eps);                             \
    }                                                                                              \
    XSAM_KERNEL void group_norm_stats_##SUF(const T* __restrict__ x, float* __restrict__ part,     \
                                            int C, int HW, int G) {                                \
        xsam_norm2d::group_norm_stats<T>(x, part, C, HW, G);                                       \
    }                                                                                              \
    XSAM_KERNEL void group_norm_apply_##SUF(const T* __restrict__ x,                               \
                                            const float* __restrict__ part,                        \
                                            const T* __restrict__ weight,                          \
                                            const T* __restrict__ bias, T* __restrict__ y, int C,  \
                                            int HW, int G, float eps, int relu) {                  \
        xsam_norm2d::group_norm_apply<T>(x, part, weight, bias, y, C, HW, G, eps, relu);           \
    }
XSAM_NORM2D(float, f32)
XSAM_NORM2D(__nv_bfloat16, bf16)
#undef XSAM_NORM2D
