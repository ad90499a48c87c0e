// Row-wise ops over the last dimension: LayerNorm, RMSNorm (plain and fused with the residual
// add), softmax. f32 and bf16 storage, f32 arithmetic.
//
// Layout: x and y are [rows, cols] contiguous. One block per row (grid.x = rows); blockDim.x is a
// multiple of 32 in [32, 1024] with cols <= 32 * blockDim.x (the host's `row_block`). The row is
// held in registers (xsam_vis::row_load), so each element is read from global memory once and
// written once; the statistics are exact two-pass ones over the cached values (mean, then the sum
// of squared deviations; never E[x^2] - E[x]^2, which cancels when |mean| >> std).
//
// bf16 rounding points follow the PyTorch modules the model uses:
//   LayerNorm (torch.nn.functional.layer_norm): f32 inside, one rounding of the affine result;
//   RMSNorm (Phi-3): s = bf16(x + r); y = bf16(w * bf16(s * rsqrt(mean(s^2) + eps)));
//   softmax: f32 inside, one rounding.
// For f32 the roundings are the identity and the kernels match the CPU backend's formulas.
#include "vision_common.cuh"

namespace xsam_norm {

using xsam_vis::RowMap;
using xsam_vis::ROW_ITEMS;
using xsam_vis::ROW_PACKS;

template <typename T>
__device__ __forceinline__ RowMap row_map(int cols, const void* a, const void* b, const void* c,
                                          const void* d) {
    RowMap m;
    m.cols = cols;
    m.packed = cols % 8 == 0 && xsam_vis::aligned16(a) && xsam_vis::aligned16(b) &&
               xsam_vis::aligned16(c) && xsam_vis::aligned16(d);
    return m;
}

// y = (x - mean) / sqrt(var + eps) * w + b, biased variance. weight and bias may be null.
template <typename T>
__device__ __forceinline__ void layer_norm_row(const T* __restrict__ x, const T* __restrict__ weight,
                                               const T* __restrict__ bias, T* __restrict__ y,
                                               int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * (size_t)cols;
    T* yr = y + row * (size_t)cols;
    const RowMap m = row_map<T>(cols, x, y, weight, bias);

    float v[ROW_ITEMS];
    xsam_vis::row_load(xr, m, v, 0.0f);
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) s += v[k];
    const float mean = xsam::block_sum(s, scratch) / (float)cols;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        const float d = v[k] - mean;
        if (m.col(k) >= 0) sq += d * d;
    }
    const float var = xsam::block_sum(sq, scratch) / (float)cols;
    // 1/sqrtf (both IEEE-rounded without fast-math), not the approximate rsqrtf.
    const float rstd = 1.0f / sqrtf(var + eps);
#pragma unroll
    for (int j = 0; j < ROW_PACKS; ++j) {
        float w8[8], b8[8];
        xsam_vis::row_param8(weight, m, j, w8, 1.0f);
        xsam_vis::row_param8(bias, m, j, b8, 0.0f);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float t = (v[8 * j + i] - mean) * rstd;
            if (weight != nullptr) t *= w8[i];
            if (bias != nullptr) t += b8[i];
            v[8 * j + i] = t;
        }
    }
    xsam_vis::row_store(yr, m, v);
}

// RMSNorm, optionally fused with the residual add before it:
//   s = x + r (rounded to T; written to `sum` when not null), y = s / sqrt(mean(s^2) + eps) * w.
// r, sum and weight may be null (no residual, no sum output, unit weight).
template <typename T>
__device__ __forceinline__ void rms_norm_row(const T* __restrict__ x, const T* __restrict__ r,
                                             const T* __restrict__ weight, T* __restrict__ sum,
                                             T* __restrict__ y, int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const size_t off = row * (size_t)cols;
    RowMap m = row_map<T>(cols, x, y, weight, r);
    m.packed = m.packed && xsam_vis::aligned16(sum);

    float v[ROW_ITEMS];
    xsam_vis::row_load(x + off, m, v, 0.0f);
    if (r != nullptr) {
        xsam_vis::row_add(r + off, m, v);  // padding slots stay 0
        if (sum != nullptr) xsam_vis::row_store(sum + off, m, v);
    }
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) sq += v[k] * v[k];  // padding slots are 0
    const float ms = xsam::block_sum(sq, scratch) / (float)cols;
    const float inv = 1.0f / sqrtf(ms + eps);
#pragma unroll
    for (int j = 0; j < ROW_PACKS; ++j) {
        float w8[8];
        xsam_vis::row_param8(weight, m, j, w8, 1.0f);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float t = xsam_vis::round_to<T>(v[8 * j + i] * inv);
            if (weight != nullptr) t *= w8[i];
            v[8 * j + i] = t;
        }
    }
    xsam_vis::row_store(y + off, m, v);
}

// Stable softmax: exp(x - max) * (1 / sum). An all -inf row gives NaN, as in PyTorch.
template <typename T>
__device__ __forceinline__ void softmax_row(const T* __restrict__ x, T* __restrict__ y, int cols) {
    __shared__ float scratch[32];
    const size_t off = blockIdx.x * (size_t)cols;
    const RowMap m = row_map<T>(cols, x, y, nullptr, nullptr);
    float v[ROW_ITEMS];
    xsam_vis::row_load(x + off, m, v, xsam_vis::neg_inf());
    float mx = xsam_vis::neg_inf();
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) mx = xsam_vis::nan_max(mx, v[k]);
    // A NaN anywhere poisons the row, as in torch.
    mx = xsam_vis::block_nan_max(mx, scratch);
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) {
        v[k] = m.col(k) >= 0 ? expf(v[k] - mx) : 0.0f;
        s += v[k];
    }
    const float inv = 1.0f / xsam::block_sum(s, scratch);
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; ++k) v[k] *= inv;
    xsam_vis::row_store(y + off, m, v);
}

}  // namespace xsam_norm

// ------------------------------------------------------------------ entry points
// grid = (rows), block = multiple of 32 <= 1024 with cols <= 32 * block. y must not alias x
// (except for softmax, where in place is fine: each thread reads its slots before writing them).

#define XSAM_ROW_OPS(T, SUF)                                                                       \
    XSAM_KERNEL void layer_norm_##SUF(const T* __restrict__ x, const T* __restrict__ weight,       \
                                      const T* __restrict__ bias, T* __restrict__ y, int cols,     \
                                      float eps) {                                                 \
        xsam_norm::layer_norm_row<T>(x, weight, bias, y, cols, eps);                               \
    }                                                                                              \
    XSAM_KERNEL void rms_norm_##SUF(const T* __restrict__ x, const T* __restrict__ weight,         \
                                    T* __restrict__ y, int cols, float eps) {                      \
        xsam_norm::rms_norm_row<T>(x, nullptr, weight, nullptr, y, cols, eps);                     \
    }                                                                                              \
    XSAM_KERNEL void rms_norm_residual_##SUF(const T* __restrict__ x, const T* __restrict__ r,     \
                                             const T* __restrict__ weight, T* __restrict__ sum,    \
                                             T* __restrict__ y, int cols, float eps) {             \
        xsam_norm::rms_norm_row<T>(x, r, weight, sum, y, cols, eps);                               \
    }                                                                                              \
    XSAM_KERNEL void softmax_rows_##SUF(const T* x, T* y, int cols) {                              \
        xsam_norm::softmax_row<T>(x, y, cols);                                                     \
    }
XSAM_ROW_OPS(float, f32)
XSAM_ROW_OPS(__nv_bfloat16, bf16)
#undef XSAM_ROW_OPS
