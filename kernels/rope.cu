// Rotary position embedding, HF "rotate half" layout (Llama / Phi-3): within each head, dimension
// i pairs with i + hd/2.
//
// x, y [tokens, heads, hd] (y may alias x: each pair is read before it is written by the same
// thread); token t is at position positions[t], or pos_offset + t when positions is null.
//
// Angles follow transformers: inv_freq [hd/2] f32 (1 / theta^(2i/hd), computed once on the host
// with the CPU backend's f32 formula: `rope_inv_freq`), the angle pos * inv_freq[i] rounded to
// f32, its cos and sin in f64 (sincospi) rounded to f32: the same values as the CPU backend. Under bf16, cos/sin are cast to bf16 and each product and the sum are
// rounded as in HF's `q * cos + rotate_half(q) * sin`; for f32 the arithmetic is the CPU's
// (no FMA contraction).
//
// Launch: block (32, 8): threadIdx.x over pairs i (blockIdx.y * 32 + threadIdx.x < hd/2),
// threadIdx.y over heads (stride 8); grid (tokens, ceil(hd/2 / 32)). cos/sin are computed once per
// (token, i) thread and reused over its heads.
#include "vision_common.cuh"

namespace xsam_rope {

template <typename T>
__device__ __forceinline__ void rope(const T* x, T* y, const float* __restrict__ inv_freq,
                                     const int* __restrict__ positions, int pos_offset, int heads,
                                     int hd) {
    const int half = hd / 2;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= half) return;
    const size_t t = blockIdx.x;
    const int pos = positions != nullptr ? positions[t] : pos_offset + (int)t;

    const float ang = __fmul_rn((float)pos, inv_freq[i]);
    // sincospi(ang / pi) in f64: its range reduction is exact and needs no local memory (the
    // Payne-Hanek path of cos/sin does); the f64 error (~|ang| * 1e-16) vanishes when rounded to
    // f32.
    double sd, cd;
    sincospi((double)ang * 0.31830988618379067154, &sd, &cd);
    const float c = xsam_vis::round_to<T>((float)cd);
    const float s = xsam_vis::round_to<T>((float)sd);

    for (int h = threadIdx.y; h < heads; h += blockDim.y) {
        const size_t base = (t * heads + h) * (size_t)hd;
        const float a = xsam::load_f32(&x[base + i]);
        const float b = xsam::load_f32(&x[base + i + half]);
        const float lo = __fsub_rn(xsam_vis::round_to<T>(__fmul_rn(a, c)),
                                   xsam_vis::round_to<T>(__fmul_rn(b, s)));
        const float hi = __fadd_rn(xsam_vis::round_to<T>(__fmul_rn(b, c)),
                                   xsam_vis::round_to<T>(__fmul_rn(a, s)));
        xsam::store_f32(&y[base + i], lo);
        xsam::store_f32(&y[base + i + half], hi);
    }
}

}  // namespace xsam_rope

XSAM_KERNEL void rope_f32(const float* x, float* y, const float* __restrict__ inv_freq,
                          const int* __restrict__ positions, int pos_offset, int heads, int hd) {
    xsam_rope::rope<float>(x, y, inv_freq, positions, pos_offset, heads, hd);
}

XSAM_KERNEL void rope_bf16(const __nv_bfloat16* x, __nv_bfloat16* y,
                           const float* __restrict__ inv_freq, const int* __restrict__ positions,
                           int pos_offset, int heads, int hd) {
    xsam_rope::rope<__nv_bfloat16>(x, y, inv_freq, positions, pos_offset, heads, hd);
}
