// Activations and casts not covered by elementwise.cu: GELU (erf, bf16; tanh, both), the Phi-3
// SiLU gate, and casts involving f16.
//
// Element-wise kernels are grid-stride loops over 8-element packs (16-byte loads/stores for bf16)
// when both pointers are 16-byte aligned, plus a scalar tail; any grid size is correct. In place
// (y == x) is allowed. Math is f32 (no fast-math: erff, tanhf, expf are the accurate versions);
// bf16 results are rounded once, at the store, as PyTorch does for these ops.
#include "vision_common.cuh"

namespace xsam_act {

__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}

// PyTorch's gelu(approximate='tanh'): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
__device__ __forceinline__ float gelu_tanh(float x) {
    const float kBeta = 0.7978845608028654f;
    const float kKappa = 0.044715f;
    const float x_cube = x * x * x;
    const float inner = kBeta * (x + kKappa * x_cube);
    return 0.5f * x * (1.0f + tanhf(inner));
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

struct GeluErf {
    __device__ float operator()(float x) const { return gelu_erf(x); }
};
struct GeluTanh {
    __device__ float operator()(float x) const { return gelu_tanh(x); }
};

template <typename T, typename F>
__device__ __forceinline__ void map(const T* x, T* y, size_t n, F f) {
    const bool packed = xsam_vis::aligned16(x) && xsam_vis::aligned16(y);
    const size_t npk = packed ? n / 8 : 0;
    for (size_t p = xsam::global_thread_id(); p < npk; p += xsam::grid_stride()) {
        float v[8];
        xsam_vis::load8(x + 8 * p, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = f(v[i]);
        xsam_vis::store8(y + 8 * p, v);
    }
    for (size_t i = npk * 8 + xsam::global_thread_id(); i < n; i += xsam::grid_stride())
        xsam::store_f32(&y[i], f(xsam::load_f32(&x[i])));
}

// out[r, i] = silu(gate[r, i]) * up[r, i] with each row of gu = [gate (inter) | up (inter)].
// Under bf16 the activation is rounded before the product, as HF's act(gate) * up.
template <typename T>
__device__ __forceinline__ void silu_gate(const T* __restrict__ gu, T* __restrict__ y, size_t rows,
                                          int inter) {
    const bool packed = inter % 8 == 0 && xsam_vis::aligned16(gu) && xsam_vis::aligned16(y);
    if (packed) {
        const int ppr = inter / 8;  // packs per row
        const size_t npk = rows * ppr;
        for (size_t p = xsam::global_thread_id(); p < npk; p += xsam::grid_stride()) {
            const size_t r = p / ppr;
            const int i = (int)(p % ppr) * 8;
            float g[8], u[8];
            xsam_vis::load8(gu + r * 2 * inter + i, g);
            xsam_vis::load8(gu + r * 2 * inter + inter + i, u);
#pragma unroll
            for (int k = 0; k < 8; ++k) g[k] = xsam_vis::round_to<T>(silu(g[k])) * u[k];
            xsam_vis::store8(y + r * inter + i, g);
        }
    } else {
        const size_t n = rows * inter;
        for (size_t e = xsam::global_thread_id(); e < n; e += xsam::grid_stride()) {
            const size_t r = e / inter;
            const int i = (int)(e % inter);
            const float g = xsam::load_f32(&gu[r * 2 * inter + i]);
            const float u = xsam::load_f32(&gu[r * 2 * inter + inter + i]);
            xsam::store_f32(&y[e], xsam_vis::round_to<T>(silu(g)) * u);
        }
    }
}

template <typename I, typename O>
__device__ __forceinline__ void cast(const I* __restrict__ x, O* __restrict__ y, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride())
        xsam::store_f32(&y[i], xsam::load_f32(&x[i]));
}

}  // namespace xsam_act

XSAM_KERNEL void gelu_erf_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, size_t n) {
    xsam_act::map(x, y, n, xsam_act::GeluErf());
}
XSAM_KERNEL void gelu_tanh_f32(const float* x, float* y, size_t n) {
    xsam_act::map(x, y, n, xsam_act::GeluTanh());
}
XSAM_KERNEL void gelu_tanh_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, size_t n) {
    xsam_act::map(x, y, n, xsam_act::GeluTanh());
}

// gu [rows, 2*inter] -> y [rows, inter]; y must not alias gu.
XSAM_KERNEL void silu_gate_f32(const float* __restrict__ gu, float* __restrict__ y, size_t rows,
                               int inter) {
    xsam_act::silu_gate<float>(gu, y, rows, inter);
}
XSAM_KERNEL void silu_gate_bf16(const __nv_bfloat16* __restrict__ gu, __nv_bfloat16* __restrict__ y,
                                size_t rows, int inter) {
    xsam_act::silu_gate<__nv_bfloat16>(gu, y, rows, inter);
}

// Casts with f16 (f32 <-> bf16 are in elementwise.cu). Round to nearest even when narrowing.
XSAM_KERNEL void cast_f32_f16(const float* __restrict__ x, __half* __restrict__ y, size_t n) {
    xsam_act::cast(x, y, n);
}
XSAM_KERNEL void cast_f16_f32(const __half* __restrict__ x, float* __restrict__ y, size_t n) {
    xsam_act::cast(x, y, n);
}
XSAM_KERNEL void cast_bf16_f16(const __nv_bfloat16* __restrict__ x, __half* __restrict__ y,
                               size_t n) {
    xsam_act::cast(x, y, n);
}
XSAM_KERNEL void cast_f16_bf16(const __half* __restrict__ x, __nv_bfloat16* __restrict__ y,
                               size_t n) {
    xsam_act::cast(x, y, n);
}
