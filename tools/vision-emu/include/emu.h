// Host emulation of the CUDA subset used by xsam's vision kernels (kernels/*.cu except the
// attention kernels and bench.cu), so their indexing, synchronisation and arithmetic can be
// checked on a machine without a GPU. Stands in for <cuda_bf16.h> / <cuda_fp16.h> (the include
// directory of this tool shadows them).
//
// Model: one std::thread per CUDA thread of a block; blocks run one after another, so
// `__shared__` can be a function-local `static`; __syncthreads is a block barrier, __syncwarp and
// __shfl_xor_sync a warp barrier with an exchange area (every lane of the warp must take part, as
// the kernels guarantee). __f*_rn are the plain IEEE operations (build with -ffp-contract=off so
// nothing is fused), bf16 rounding is round-to-nearest-even, f16 uses _Float16.
// Not modelled: timing, memory alignment faults, the memory model beyond barriers, warp
// divergence (lanes run as independent threads).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
using std::min;
using std::max;
using std::isnan;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define __grid_constant__

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
extern unsigned char* emu_dyn_smem;

struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half { uint16_t x; };

inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = (uint32_t)h.x << 16; float f; memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = (uint16_t)((u >> 16) | 0x40); return r; }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.x = (uint16_t)(u >> 16);
    return r;
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline float __half2float(__half h) { _Float16 v; memcpy(&v, &h.x, 2); return (float)v; }
inline __half __float2half_rn(float f) { _Float16 v = (_Float16)f; __half h; memcpy(&h.x, &v, 2); return h; }

inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline void sincospi(double x, double* s, double* c) { *s = std::sin(M_PI * x); *c = std::cos(M_PI * x); }
inline void __nanosleep(unsigned) {}

// --- block execution: one std::thread per CUDA thread, blocks in sequence
struct EmuBlock {
    std::unique_ptr<std::barrier<>> block_bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
    std::vector<float> warp_buf;
    std::atomic<int> or_flag{0};
};
extern EmuBlock* emu_block;
thread_local extern int emu_tid;

inline void __syncthreads() { emu_block->block_bar->arrive_and_wait(); }
// Block-wide OR of `pred`, returned to every thread (a barrier, like the real one).
inline int __syncthreads_or(int pred) {
    auto& f = emu_block->or_flag;
    __syncthreads();  // the previous call's reset is done
    if (pred) f.store(1);
    __syncthreads();
    const int r = f.load();
    __syncthreads();
    if (emu_tid == 0) f.store(0);
    return r;
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu_block->warp_bar[emu_tid / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off, int width = 32) {
    (void)width;
    const int w = emu_tid / 32, lane = emu_tid % 32;
    auto& bar = *emu_block->warp_bar[w];
    emu_block->warp_buf[w * 32 + lane] = v;
    bar.arrive_and_wait();
    float r = emu_block->warp_buf[w * 32 + (lane ^ off)];
    bar.arrive_and_wait();
    return r;
}

void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
