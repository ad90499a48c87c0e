// Embedding lookup (rows of a table) and the sine position embedding of Mask2Former.
#include "vision_common.cuh"

namespace xsam_embed {

// out[i, :] = table[ids[i], :] converted to O. An id >= rows (the host validates, so this is a
// bug guard) writes NaN. grid-stride over rows (blockIdx.x), threads over columns in 8-element
// packs when cols % 8 == 0 and the pointers are aligned.
template <typename I, typename O>
__device__ __forceinline__ void gather_rows(const I* __restrict__ table, const int* __restrict__ ids,
                                            O* __restrict__ out, int n, int cols, int rows) {
    const bool packed = cols % 8 == 0 && xsam_vis::aligned16(table) && xsam_vis::aligned16(out);
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        const int id = ids[i];
        const bool ok = id >= 0 && id < rows;
        const I* src = table + (size_t)(ok ? id : 0) * cols;
        O* dst = out + (size_t)i * cols;
        const float nan = __int_as_float(0x7fc00000);
        if (packed) {
            for (int c = 8 * threadIdx.x; c < cols; c += 8 * blockDim.x) {
                float v[8];
                xsam_vis::load8(src + c, v);
                if (!ok)
#pragma unroll
                    for (int k = 0; k < 8; ++k) v[k] = nan;
                xsam_vis::store8(dst + c, v);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x)
                xsam::store_f32(&dst[c], ok ? xsam::load_f32(&src[c]) : nan);
        }
    }
}

// Mask2Former's sine position embedding (normalize=True), architecture notes §9.2:
//   channel k < F (F = num_pos_feats) embeds the row, channel F + k the column:
//   p = (index + 1) / (size + 1e-6) * scale, d_k = temperature^(2 floor(k/2) / F),
//   value = sin(p / d_k) for even k, cos(p / d_k) for odd k.
// Computed in f32 op for op as the reference (f32 tensors), with sin/cos/pow in f64 rounded to f32.
// Optional `add` [2F] (e.g. a level embedding) is added after rounding the embedding to T.
// channels_last != 0: out [h*w, 2F]; else out [2F, h, w].
template <typename T>
__device__ __forceinline__ void pos_embed_sine(T* __restrict__ out, const T* __restrict__ add, int h,
                                               int w, int F, float temperature, float scale,
                                               int channels_last) {
    const int C = 2 * F;
    const size_t n = (size_t)C * h * w;
    for (size_t e = xsam::global_thread_id(); e < n; e += xsam::grid_stride()) {
        int ch, yy, xx;
        if (channels_last) {
            ch = (int)(e % C);
            const size_t p = e / C;
            yy = (int)(p / w);
            xx = (int)(p % w);
        } else {
            xx = (int)(e % w);
            const size_t t = e / w;
            yy = (int)(t % h);
            ch = (int)(t / h);
        }
        const bool is_y = ch < F;
        const int k = is_y ? ch : ch - F;
        const float idx = (float)((is_y ? yy : xx) + 1);
        const float size = (float)(is_y ? h : w);
        const float pnorm = __fmul_rn(__fdiv_rn(idx, __fadd_rn(size, 1e-6f)), scale);
        const float ex = __fdiv_rn((float)(2 * (k / 2)), (float)F);
        const float dim_t = (float)pow((double)temperature, (double)ex);
        const float a = __fdiv_rn(pnorm, dim_t);
        // f64 sincospi: exact range reduction without the local-memory path of sin/cos.
        double sd, cd;
        sincospi((double)a * 0.31830988618379067154, &sd, &cd);
        float v = (float)((k % 2 == 0) ? sd : cd);
        if (add != nullptr) v = xsam_vis::round_to<T>(v) + xsam::load_f32(&add[ch]);
        xsam::store_f32(&out[e], v);
    }
}

}  // namespace xsam_embed

// grid (min(n, many)), block 256 (threads over columns). ids int32 [n].
#define XSAM_GATHER(I, O, NAME)                                                                    \
    XSAM_KERNEL void NAME(const I* __restrict__ table, const int* __restrict__ ids,                \
                          O* __restrict__ out, int n, int cols, int rows) {                        \
        xsam_embed::gather_rows<I, O>(table, ids, out, n, cols, rows);                             \
    }
XSAM_GATHER(__nv_bfloat16, float, gather_rows_bf16_f32)
XSAM_GATHER(__nv_bfloat16, __nv_bfloat16, gather_rows_bf16_bf16)
XSAM_GATHER(float, float, gather_rows_f32_f32)
#undef XSAM_GATHER

// 1-D grid-stride over 2F*h*w outputs. add may be null.
XSAM_KERNEL void pos_embed_sine_f32(float* __restrict__ out, const float* __restrict__ add, int h,
                                    int w, int F, float temperature, float scale,
                                    int channels_last) {
    xsam_embed::pos_embed_sine<float>(out, add, h, w, F, temperature, scale, channels_last);
}
XSAM_KERNEL void pos_embed_sine_bf16(__nv_bfloat16* __restrict__ out,
                                     const __nv_bfloat16* __restrict__ add, int h, int w, int F,
                                     float temperature, float scale, int channels_last) {
    xsam_embed::pos_embed_sine<__nv_bfloat16>(out, add, h, w, F, temperature, scale,
                                              channels_last);
}
