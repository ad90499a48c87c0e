// Row normalisations: LayerNorm and RMSNorm over the last dimension.
//
// Layout: x and y are [rows, cols] contiguous. One block per row (grid.x = rows), blockDim.x a
// multiple of 32 in [32, 1024] chosen by the host (e.g. 256, fewer for short rows); each thread
// strides over the row. All arithmetic is f32.
//
// LayerNorm uses two passes over the row (mean, then the sum of squared deviations), not
// E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std. The row is re-read from
// global memory for each pass; rows of a few thousand floats stay in L1/L2, so the cost is small
// next to the launch.
#include "common.cuh"

namespace xsam_norm {

// y = (x - mean) / sqrt(var + eps) * w + b, biased variance (divide by cols) like torch.
// weight and bias may be null (then 1 and 0).
template <typename T>
__device__ __forceinline__ void layer_norm_row(const T* __restrict__ x, const T* __restrict__ weight,
                                               const T* __restrict__ bias, T* __restrict__ y,
                                               int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * (size_t)cols;
    T* yr = y + row * (size_t)cols;

    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += xsam::load_f32(&xr[c]);
    const float mean = xsam::block_sum(sum, scratch) / (float)cols;

    float sq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = xsam::load_f32(&xr[c]) - mean;
        sq += d * d;
    }
    const float var = xsam::block_sum(sq, scratch) / (float)cols;
    // 1/sqrtf (both IEEE-rounded without fast-math), not rsqrtf (approximate, ~2 ulp).
    const float inv_std = 1.0f / sqrtf(var + eps);

    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = (xsam::load_f32(&xr[c]) - mean) * inv_std;
        if (weight != nullptr) v *= xsam::load_f32(&weight[c]);
        if (bias != nullptr) v += xsam::load_f32(&bias[c]);
        xsam::store_f32(&yr[c], v);
    }
}

// y = x / sqrt(mean(x^2) + eps) * w. weight may be null (then 1).
template <typename T>
__device__ __forceinline__ void rms_norm_row(const T* __restrict__ x, const T* __restrict__ weight,
                                             T* __restrict__ y, int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * (size_t)cols;
    T* yr = y + row * (size_t)cols;

    float sq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = xsam::load_f32(&xr[c]);
        sq += v * v;
    }
    const float ms = xsam::block_sum(sq, scratch) / (float)cols;
    const float inv_rms = 1.0f / sqrtf(ms + eps);

    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = xsam::load_f32(&xr[c]) * inv_rms;
        if (weight != nullptr) v *= xsam::load_f32(&weight[c]);
        xsam::store_f32(&yr[c], v);
    }
}

}  // namespace xsam_norm

// grid = (rows), block = (multiple of 32, <= 1024). y must not alias x (rows are read three times).
XSAM_KERNEL void layer_norm_f32(const float* __restrict__ x, const float* __restrict__ weight,
                                const float* __restrict__ bias, float* __restrict__ y, int cols,
                                float eps) {
    xsam_norm::layer_norm_row<float>(x, weight, bias, y, cols, eps);
}

XSAM_KERNEL void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ weight,
                              float* __restrict__ y, int cols, float eps) {
    xsam_norm::rms_norm_row<float>(x, weight, y, cols, eps);
}
