// Mask2Former masked cross-attention (architecture notes §10): 8 heads x 32 dims, up to 200
// queries over up to 128^2 keys, keys a query may see given by the previous prediction's mask
// logits resized to the level's size, passed through a sigmoid and kept where >= 0.5; a query
// blocked everywhere sees every key.
//
// Two kernels:
//   attn_mask_from_logits_{bf16,f32}  logits [nq, hs, ws] -> keep bits [nq, words] (u32, bit j%32
//       of word j/32 for key j = y*wt + x of the [ht, wt] level). Bilinear resize
//       (align_corners=False, torch's index and weight arithmetic in the same f32 operation
//       order as the CPU backend's resize_bilinear, no FMA contraction: the sampled logits are
//       bit-identical), then keep = !(sigmoid(v) < 0.5) with sigmoid(v) = 1 / (1 + exp(-v)) in
//       f32, torch's predicate (a NaN logit keeps the key, as `sigmoid(NaN) < 0.5` is false).
//       A row with no kept key is rewritten as all keys kept. Fused: the resized logits never
//       exist in memory. One CTA per query row; words >= ceil(ht*wt/32), bits past the last key 0.
//   masked_attn_hd32_bf16  the flash template in bit-mask mode (flash_attn.cuh): q [tq, heads*32],
//       k/v [tk, heads*32] row-strided, 128 queries per CTA (2 m-tiles per warp), keys split over
//       gridDim.z with attn_combine_splits_bf16 merging (200 queries x 8 heads alone is 16 CTAs).
#include "flash_attn.cuh"

namespace xsam_masked {

// torch's compute_indices_weights_linear for one output coordinate (align_corners=False,
// antialias=False), as src/backend/cpu/resize.rs: same size is a copy; otherwise
// src = max(0, scale * (o + 0.5) - 0.5) with scale = in / out in f32.
struct Taps {
    int i0, i1;
    float w0, w1;
};

__device__ __forceinline__ Taps linear_taps(int in, int out, int o) {
    Taps t;
    if (in == out) {
        t.i0 = t.i1 = o;
        t.w0 = 1.0f;
        t.w1 = 0.0f;
        return t;
    }
    const float scale = __fdiv_rn((float)in, (float)out);
    float src = __fsub_rn(__fmul_rn(scale, __fadd_rn((float)o, 0.5f)), 0.5f);
    if (src < 0.0f) src = 0.0f;
    const int i0 = min((int)floorf(src), in - 1);
    const float l1 = fminf(fmaxf(__fsub_rn(src, (float)i0), 0.0f), 1.0f);
    t.i0 = i0;
    t.i1 = i0 < in - 1 ? i0 + 1 : i0;
    t.w0 = __fsub_rn(1.0f, l1);
    t.w1 = l1;
    return t;
}

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
    return xsam::load_f32(p);
}

template <typename T>
__device__ __forceinline__ void mask_from_logits(const T* __restrict__ logits, uint32_t* __restrict__ bits, int hs,
                                                 int ws, int ht, int wt, int words) {
    const int q = blockIdx.x;
    const T* img = logits + (size_t)q * hs * ws;
    uint32_t* out = bits + (size_t)q * words;
    const int tk = ht * wt;
    bool any = false;
    for (int w = threadIdx.x; w < words; w += blockDim.x) {
        uint32_t word = 0;
        for (int b = 0; b < 32; ++b) {
            const int k = w * 32 + b;
            if (k >= tk) break;
            const int y = k / wt, x = k - y * wt;
            const Taps ty = linear_taps(hs, ht, y);
            const Taps tx = linear_taps(ws, wt, x);
            const T* r0 = img + (size_t)ty.i0 * ws;
            const T* r1 = img + (size_t)ty.i1 * ws;
            // Along w within each row, then along h (torch's order, as the CPU backend).
            const float t0 = __fadd_rn(__fmul_rn(ld(r0 + tx.i0), tx.w0), __fmul_rn(ld(r0 + tx.i1), tx.w1));
            const float t1 = __fadd_rn(__fmul_rn(ld(r1 + tx.i0), tx.w0), __fmul_rn(ld(r1 + tx.i1), tx.w1));
            const float v = __fadd_rn(__fmul_rn(t0, ty.w0), __fmul_rn(t1, ty.w1));
            const float sig = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-v)));
            if (!(sig < 0.5f)) word |= 1u << b;
        }
        out[w] = word;
        any = any || word != 0;
    }
    // Mask2Former: a query blocked everywhere attends everything.
    if (!xsam_attn::block_any(any)) {
        for (int w = threadIdx.x; w < words; w += blockDim.x) {
            const int left = tk - w * 32;
            out[w] = left >= 32 ? 0xffffffffu : (left <= 0 ? 0u : (1u << left) - 1u);
        }
    }
}

}  // namespace xsam_masked

// grid = (nq), block = (multiple of 32, e.g. 256).
XSAM_KERNEL void attn_mask_from_logits_bf16(const __nv_bfloat16* __restrict__ logits, uint32_t* __restrict__ bits,
                                            int hs, int ws, int ht, int wt, int words) {
    xsam_masked::mask_from_logits(logits, bits, hs, ws, ht, wt, words);
}

XSAM_KERNEL void attn_mask_from_logits_f32(const float* __restrict__ logits, uint32_t* __restrict__ bits, int hs,
                                           int ws, int ht, int wt, int words) {
    xsam_masked::mask_from_logits(logits, bits, hs, ws, ht, wt, words);
}

XSAM_KERNEL void __launch_bounds__(128, 1) masked_attn_hd32_bf16(const __grid_constant__ xsam_attn::FlashParams p) {
    xsam_attn::flash_attention<32, 2, 4, xsam_attn::FLASH_BITS, 6>(p);
}
