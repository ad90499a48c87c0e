// Helpers shared by the vision/segmentation kernels (norms, resize, shuffle, deformable attention,
// region pooling). Everything lives in `namespace xsam_vis` (all kernels/*.cu are one TU).
//
// Storage types are float and __nv_bfloat16; arithmetic is f32. `round_to<T>` reproduces what
// PyTorch does when an intermediate result is stored in T between two ops (identity for f32), so
// the bf16 kernels round at the same points as the bf16 reference model.
#pragma once

#include "common.cuh"

namespace xsam_vis {

typedef __nv_bfloat16 bf16;

// ------------------------------------------------------------------ rounding

template <typename T>
__device__ __forceinline__ float round_to(float v);
template <>
__device__ __forceinline__ float round_to<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ float round_to<bf16>(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
}

// ------------------------------------------------------------------ 8-element packs
//
// A pack is 8 consecutive elements: 16 bytes of bf16 (one uint4) or 32 bytes of f32 (two float4).
// The caller guarantees 16-byte alignment of `p` (see `aligned16`). Plain loads (not __ldg), so
// in-place element-wise kernels stay within the rules; `const __restrict__` callers still get the
// read-only path from the compiler.

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ void load8(const float* __restrict__ p, float* v) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void load8(const bf16* __restrict__ p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        __nv_bfloat162 h;
        memcpy(&h, &w[i], 4);
        const float2 f = __bfloat1622float2(h);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ void store8(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void store8(bf16* p, const float* v) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        // __floats2bfloat162_rn rounds each half to nearest even, like store_f32.
        const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        memcpy(&w[i], &h, 4);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// ------------------------------------------------------------------ misc

// max that propagates NaN (torch.max does; fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) {
    return (a > b || a != a) ? a : b;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Max over the block with NaN propagation (xsam::block_max drops NaN, as fmaxf does). Same
// contract as xsam::block_max: blockDim.x a multiple of 32, scratch = __shared__ float[32].
__device__ __forceinline__ float block_nan_max(float v, float* scratch) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int num_warps = blockDim.x / 32;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(xsam::FULL_MASK, v, off));
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < num_warps ? scratch[lane] : neg_inf();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(xsam::FULL_MASK, v, off));
    __syncthreads();
    return v;
}

// Bilinear source taps along one axis for torch's upsample_bilinear2d (antialias=False), exactly
// as the CPU backend's `linear_taps`: f32 index arithmetic, clamping and the copy special case when
// the size is unchanged. The explicit __fmul_rn/__fadd_rn stop nvcc from contracting into FMAs,
// so the taps are bit-identical to the host's. `Axis` holds the per-axis scale (one IEEE division,
// computed once per kernel instead of once per output pixel).
struct Taps {
    int i0, i1;
    float w0, w1;
};

struct Axis {
    int input, output;
    bool align_corners;
    float scale;
};

__device__ __forceinline__ Axis make_axis(int input, int output, bool align_corners) {
    Axis a;
    a.input = input;
    a.output = output;
    a.align_corners = align_corners;
    if (align_corners)
        a.scale = output > 1 ? __fdiv_rn((float)input - 1.0f, (float)output - 1.0f) : 0.0f;
    else
        a.scale = __fdiv_rn((float)input, (float)output);
    return a;
}

__device__ __forceinline__ Taps linear_taps(const Axis& a, int o) {
    Taps t;
    if (a.input == a.output) {
        t.i0 = o;
        t.i1 = o;
        t.w0 = 1.0f;
        t.w1 = 0.0f;
        return t;
    }
    float src;
    if (a.align_corners) {
        src = __fmul_rn(a.scale, (float)o);
    } else {
        src = __fadd_rn(__fmul_rn(a.scale, __fadd_rn((float)o, 0.5f)), -0.5f);
        if (src < 0.0f) src = 0.0f;
    }
    int i0 = (int)floorf(src);
    if (i0 > a.input - 1) i0 = a.input - 1;
    float l1 = __fsub_rn(src, (float)i0);
    l1 = fminf(fmaxf(l1, 0.0f), 1.0f);
    t.i0 = i0;
    t.i1 = i0 < a.input - 1 ? i0 + 1 : i0;
    t.w0 = __fsub_rn(1.0f, l1);
    t.w1 = l1;
    return t;
}

// torch's order for one bilinear output: along w within each row, then along h, no FMA.
__device__ __forceinline__ float bilerp(float v00, float v01, float v10, float v11, const Taps& ty,
                                        const Taps& tx) {
    const float t0 = __fadd_rn(__fmul_rn(v00, tx.w0), __fmul_rn(v01, tx.w1));
    const float t1 = __fadd_rn(__fmul_rn(v10, tx.w0), __fmul_rn(v11, tx.w1));
    return __fadd_rn(__fmul_rn(t0, ty.w0), __fmul_rn(t1, ty.w1));
}

// ------------------------------------------------------------------ cached rows
//
// One block per row; the row is loaded once into registers (ROW_ITEMS floats per thread), so a
// row op reads and writes global memory exactly once. The host picks blockDim (a multiple of 32,
// <= 1024) with cols <= ROW_ITEMS * blockDim, i.e. rows of up to 32768 elements.
//
// Two layouts of a thread's slots, chosen per launch (uniform):
//   packed (cols % 8 == 0 and every pointer 16-byte aligned): slot k is element
//          8 * (threadIdx.x + (k / 8) * blockDim.x) + k % 8, loaded and stored 8 at a time;
//   scalar: slot k is element threadIdx.x + k * blockDim.x.
// Both are coalesced. Slots past the end of the row hold `fill`.

constexpr int ROW_ITEMS = 32;
constexpr int ROW_PACKS = ROW_ITEMS / 8;

struct RowMap {
    int cols;
    bool packed;
    // Column of slot k, or -1 past the end of the row.
    __device__ __forceinline__ int col(int k) const {
        const int c = packed ? 8 * ((int)threadIdx.x + (k / 8) * (int)blockDim.x) + k % 8
                             : (int)threadIdx.x + k * (int)blockDim.x;
        return c < cols ? c : -1;
    }
};

template <typename T>
__device__ __forceinline__ void row_load(const T* __restrict__ row, const RowMap& m, float* v,
                                         float fill) {
    if (m.packed) {
#pragma unroll
        for (int j = 0; j < ROW_PACKS; ++j) {
            const int c = 8 * ((int)threadIdx.x + j * (int)blockDim.x);
            if (c < m.cols) {
                load8(row + c, v + 8 * j);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) v[8 * j + i] = fill;
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < ROW_ITEMS; ++k) {
            const int c = m.col(k);
            v[k] = c >= 0 ? xsam::load_f32(&row[c]) : fill;
        }
    }
}

template <typename T>
__device__ __forceinline__ void row_store(T* __restrict__ row, const RowMap& m, const float* v) {
    if (m.packed) {
#pragma unroll
        for (int j = 0; j < ROW_PACKS; ++j) {
            const int c = 8 * ((int)threadIdx.x + j * (int)blockDim.x);
            if (c < m.cols) store8(row + c, v + 8 * j);
        }
    } else {
#pragma unroll
        for (int k = 0; k < ROW_ITEMS; ++k) {
            const int c = m.col(k);
            if (c >= 0) xsam::store_f32(&row[c], v[k]);
        }
    }
}

// v[k] = round_to<T>(v[k] + r[slot k]) for every slot, loading r pack by pack (so only 8 extra
// values are live, not a second row cache).
template <typename T>
__device__ __forceinline__ void row_add(const T* __restrict__ r, const RowMap& m, float* v) {
    if (m.packed) {
#pragma unroll
        for (int j = 0; j < ROW_PACKS; ++j) {
            const int c = 8 * ((int)threadIdx.x + j * (int)blockDim.x);
            if (c < m.cols) {
                float t[8];
                load8(r + c, t);
#pragma unroll
                for (int i = 0; i < 8; ++i) v[8 * j + i] = round_to<T>(v[8 * j + i] + t[i]);
            }
        }
    } else {
#pragma unroll
        for (int k = 0; k < ROW_ITEMS; ++k) {
            const int c = m.col(k);
            if (c >= 0) v[k] = round_to<T>(v[k] + xsam::load_f32(&r[c]));
        }
    }
}

// Per-column parameters (norm weight, bias) for slots 8j .. 8j+7 of this thread; `dflt` when p is
// null or past the end of the row.
template <typename T>
__device__ __forceinline__ void row_param8(const T* __restrict__ p, const RowMap& m, int j,
                                           float* out, float dflt) {
    if (p == nullptr) {
#pragma unroll
        for (int i = 0; i < 8; ++i) out[i] = dflt;
        return;
    }
    if (m.packed) {
        const int c = 8 * ((int)threadIdx.x + j * (int)blockDim.x);
        if (c < m.cols) {
            load8(p + c, out);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) out[i] = dflt;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int c = m.col(8 * j + i);
            out[i] = c >= 0 ? xsam::load_f32(&p[c]) : dflt;
        }
    }
}

}  // namespace xsam_vis
