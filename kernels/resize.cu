// Bilinear resizes with torch's exact conventions (torch.nn.functional.interpolate,
// mode='bilinear', antialias=False): the taps are the CPU backend's `linear_taps` computed in the
// same f32 operations (xsam_vis::linear_taps), and the interpolation order is torch's (along w,
// then along h, no FMA), so f32 results are bit-identical to the CPU backend.
//
// resize_bilinear: x [planes, h, w] -> y [planes, oh, ow], either align_corners.
// mask_postprocess: X-SAM's final mask resize, fused:
//   logits [Q, h, w] --bilinear (align_corners=False)--> [Q, S, S] --crop--> [Q, newh, neww]
//          --bilinear (align_corners=False)--> y [Q, H0, W0].
//   Each output pixel samples the S x S intermediate at its 2 x 2 taps, and each of those is
//   computed on the fly from the h x w logits (16 reads, all from L1/L2; a 128 x 128 map is 32 KB
//   in bf16). The intermediate is rounded to T, as torch stores it, so the composition is the
//   two-step reference exactly. It is not one bilinear resize h x w -> H0 x W0: the two sets of
//   taps do not compose into one.
//
// Launch (both): block (bx, by), bx*by = 256, bx a power of two; output rows (plane, oy) over
// threadIdx.y and blockIdx.x (grid-stride), columns over threadIdx.x. Vertical taps are computed
// once per row.
#include "vision_common.cuh"

namespace xsam_resize {

using xsam_vis::Taps;

template <typename T>
__device__ __forceinline__ float sample(const T* __restrict__ img, int w, const Taps& ty,
                                        const Taps& tx) {
    const T* r0 = img + (size_t)ty.i0 * w;
    const T* r1 = img + (size_t)ty.i1 * w;
    return xsam_vis::bilerp(xsam::load_f32(&r0[tx.i0]), xsam::load_f32(&r0[tx.i1]),
                            xsam::load_f32(&r1[tx.i0]), xsam::load_f32(&r1[tx.i1]), ty, tx);
}

template <typename T>
__device__ __forceinline__ void resize_bilinear(const T* __restrict__ x, T* __restrict__ y,
                                                size_t planes, int h, int w, int oh, int ow,
                                                bool align_corners) {
    const size_t rows = planes * oh;
    const xsam_vis::Axis ay = xsam_vis::make_axis(h, oh, align_corners);
    const xsam_vis::Axis ax = xsam_vis::make_axis(w, ow, align_corners);
    for (size_t r = (size_t)blockIdx.x * blockDim.y + threadIdx.y; r < rows;
         r += (size_t)gridDim.x * blockDim.y) {
        const size_t plane = r / oh;
        const int oy = (int)(r % oh);
        const Taps ty = xsam_vis::linear_taps(ay, oy);
        const T* img = x + plane * h * w;
        T* out = y + r * ow;
        for (int ox = threadIdx.x; ox < ow; ox += blockDim.x) {
            const Taps tx = xsam_vis::linear_taps(ax, ox);
            xsam::store_f32(&out[ox], sample(img, w, ty, tx));
        }
    }
}

template <typename T>
__device__ __forceinline__ void mask_postprocess(const T* __restrict__ x, T* __restrict__ y,
                                                 int q, int h, int w, int S, int newh, int neww,
                                                 int H0, int W0) {
    const size_t rows = (size_t)q * H0;
    // stage 1: h x w -> S x S; stage 2: newh x neww -> H0 x W0 (both align_corners=False)
    const xsam_vis::Axis ay1 = xsam_vis::make_axis(h, S, false);
    const xsam_vis::Axis ax1 = xsam_vis::make_axis(w, S, false);
    const xsam_vis::Axis ay2 = xsam_vis::make_axis(newh, H0, false);
    const xsam_vis::Axis ax2 = xsam_vis::make_axis(neww, W0, false);
    for (size_t r = (size_t)blockIdx.x * blockDim.y + threadIdx.y; r < rows;
         r += (size_t)gridDim.x * blockDim.y) {
        const size_t plane = r / H0;
        const int oy = (int)(r % H0);
        // Stage 2 (newh x neww crop -> H0 x W0) vertical taps, and stage 1 (h x w -> S x S)
        // vertical taps of the two intermediate rows they touch.
        const Taps ty2 = xsam_vis::linear_taps(ay2, oy);
        const Taps ty1a = xsam_vis::linear_taps(ay1, ty2.i0);
        const Taps ty1b = xsam_vis::linear_taps(ay1, ty2.i1);
        const T* img = x + plane * h * w;
        T* out = y + r * W0;
        for (int ox = threadIdx.x; ox < W0; ox += blockDim.x) {
            const Taps tx2 = xsam_vis::linear_taps(ax2, ox);
            const Taps tx1a = xsam_vis::linear_taps(ax1, tx2.i0);
            const Taps tx1b = xsam_vis::linear_taps(ax1, tx2.i1);
            // intermediate I(y, x) at the four stage-2 taps, stored as T by torch
            const float i00 = xsam_vis::round_to<T>(sample(img, w, ty1a, tx1a));
            const float i01 = xsam_vis::round_to<T>(sample(img, w, ty1a, tx1b));
            const float i10 = xsam_vis::round_to<T>(sample(img, w, ty1b, tx1a));
            const float i11 = xsam_vis::round_to<T>(sample(img, w, ty1b, tx1b));
            xsam::store_f32(&out[ox], xsam_vis::bilerp(i00, i01, i10, i11, ty2, tx2));
        }
    }
}

}  // namespace xsam_resize

#define XSAM_RESIZE(T, SUF)                                                                        \
    XSAM_KERNEL void resize_bilinear_##SUF(const T* __restrict__ x, T* __restrict__ y,             \
                                           size_t planes, int h, int w, int oh, int ow,            \
                                           int align_corners) {                                    \
        xsam_resize::resize_bilinear<T>(x, y, planes, h, w, oh, ow, align_corners != 0);           \
    }                                                                                              \
    XSAM_KERNEL void mask_postprocess_##SUF(const T* __restrict__ x, T* __restrict__ y, int q,     \
                                            int h, int w, int S, int newh, int neww, int H0,       \
                                            int W0) {                                              \
        xsam_resize::mask_postprocess<T>(x, y, q, h, w, S, newh, neww, H0, W0);                    \
    }
XSAM_RESIZE(float, f32)
XSAM_RESIZE(__nv_bfloat16, bf16)
#undef XSAM_RESIZE
