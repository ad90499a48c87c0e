// Shared helpers for xsam's hand-written kernels.
//
// Conventions (every kernels/*.cu follows them):
//   - Entry points are `extern "C" __global__` (XSAM_KERNEL), so the host loads them by their plain
//     name from the fatbin. Names are `{op}_{dtype}`: `layer_norm_f32`, `add_f32`, and for casts
//     `cast_{from}_{to}` (`cast_f32_bf16`). dtype tags: f32, bf16, f16.
//   - Storage is f32 or bf16; arithmetic is f32 (load_f32 / store_f32 convert at the edges).
//     Reductions (norms, softmax) accumulate in f32 with warp shuffles.
//   - Element counts and row lengths that can exceed 2^31 are `size_t` (host passes usize);
//     per-row sizes that always fit are `int`.
//   - build.rs compiles every kernels/*.cu as ONE translation unit (a generated file #includes them
//     all), so helpers that are not in this header must live in a per-file namespace
//     (`namespace xsam_norm { ... }`) to keep names from colliding across files.
//   - No --use_fast_math: erff, expf, sqrtf and division are the IEEE-accurate versions so that
//     results match the CPU backend within a few ulp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

#define XSAM_KERNEL extern "C" __global__

namespace xsam {

constexpr unsigned FULL_MASK = 0xffffffffu;
constexpr int WARP_SIZE = 32;

// ------------------------------------------------------------------ dtype conversion

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_f32(const __half* p) { return __half2float(*p); }

// Narrowing rounds to nearest even (same as half::bf16::from_f32 / f16::from_f32 on the host);
// NaN stays NaN, overflow goes to +-inf.
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_f32(__half* p, float v) { *p = __float2half_rn(v); }

// ------------------------------------------------------------------ indexing

// First index and stride of a 1-D grid-stride loop, in size_t so n > 2^31 works.
__device__ __forceinline__ size_t global_thread_id() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ size_t grid_stride() { return (size_t)gridDim.x * blockDim.x; }

// ------------------------------------------------------------------ reductions

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = WARP_SIZE / 2; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int off = WARP_SIZE / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
    return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32
// (<= 1024). `scratch` is __shared__ float[32]; it may be reused after the call returns (the
// trailing barrier makes the next writer wait until everyone has read the broadcast value).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < num_warps) ? scratch[lane] : 0.0f;
    v = warp_sum(v);  // every warp reduces the per-warp partials itself: no second broadcast
    __syncthreads();
    return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < num_warps) ? scratch[lane] : __int_as_float(0xff800000);  // -inf
    v = warp_max(v);
    __syncthreads();
    return v;
}

}  // namespace xsam
