// Element-wise kernels: casts, binary arithmetic, activations.
//
// All are 1-D grid-stride loops over `n` contiguous elements (the host makes inputs contiguous and
// picks the grid; any grid size is correct). Outputs may alias inputs element-for-element
// (in-place is fine), since each element is read before it is written by the same thread.
#include "common.cuh"

namespace xsam_elementwise {

// GELU with the exact erf form, as torch.nn.GELU(approximate="none"):
// 0.5 * x * (1 + erf(x / sqrt(2))). erff is the accurate libdevice version (no fast-math).
__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}

}  // namespace xsam_elementwise

// ------------------------------------------------------------------ casts

XSAM_KERNEL void cast_f32_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ y, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        xsam::store_f32(&y[i], x[i]);
    }
}

XSAM_KERNEL void cast_bf16_f32(const __nv_bfloat16* __restrict__ x, float* __restrict__ y, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        y[i] = xsam::load_f32(&x[i]);
    }
}

// ------------------------------------------------------------------ binary

// out = a + b (same shape; broadcasting is the host's job).
XSAM_KERNEL void add_f32(const float* a, const float* b, float* out, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        out[i] = a[i] + b[i];
    }
}

// ------------------------------------------------------------------ activations

XSAM_KERNEL void gelu_erf_f32(const float* x, float* y, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        y[i] = xsam_elementwise::gelu_erf(x[i]);
    }
}
