// Element-wise and data-movement kernels the graph executor needs beyond the model-specific ones:
// binary and broadcast arithmetic, the remaining activations, the segmentation head's small ops,
// one generic strided copy (permute, narrow and concat are all "copy a strided view into a
// strided destination"), im2col for convolutions through the GEMM, and the masked-attention keep
// bits from a 0/1 keep matrix.
//
// All f32 (the executor keeps activations in f32 on the device). 1-D grid-stride loops with
// size_t indices; any grid size is correct. Each output element is written by the thread that
// reads its inputs, so in-place use (y == x) is fine for the element-wise kernels.
#include "common.cuh"

namespace xsam_tensor {

// Highest rank the strided copy takes (graph tensors have at most 5 dims).
constexpr int MAX_RANK = 8;

// Argument block of strided_copy_f32 (passed by value as a __grid_constant__ struct); the Rust
// mirror is `CopyParams` in src/backend/cuda/tensor_ops.rs.
struct CopyParams {
    long long dims[MAX_RANK];
    long long src_strides[MAX_RANK];
    long long dst_strides[MAX_RANK];
    long long src_offset;
    long long dst_offset;
    long long n;
    int rank;
    int reserved;
};
static_assert(sizeof(CopyParams) == 3 * 8 * MAX_RANK + 3 * 8 + 8, "CopyParams layout");

}  // namespace xsam_tensor

// ------------------------------------------------------------------ binary / broadcast

// out = a * b (same shape).
XSAM_KERNEL void mul_f32(const float* a, const float* b, float* out, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        out[i] = a[i] * b[i];
    }
}

// y = x * s.
XSAM_KERNEL void scale_f32(const float* x, float* y, float s, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        y[i] = x[i] * s;
    }
}

// y[.., c] = x[.., c] + row[c] (the last dim is `cols`).
XSAM_KERNEL void add_row_f32(const float* x, const float* __restrict__ row, float* y, size_t n, size_t cols) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        y[i] = x[i] + row[i % cols];
    }
}

// y[.., c, p] = x[.., c, p] + bias[c] for channels-first maps with `hw` pixels per channel and
// `channels` channels (a convolution's bias after the GEMM).
XSAM_KERNEL void add_channel_bias_f32(const float* x, const float* __restrict__ bias, float* y, size_t n,
                                      size_t hw, size_t channels) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        y[i] = x[i] + bias[(i / hw) % channels];
    }
}

// ------------------------------------------------------------------ unary

// torch.relu: `v > 0 ? v : 0`, NaN kept (as the CPU backend).
XSAM_KERNEL void relu_f32(const float* x, float* y, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        const float v = x[i];
        y[i] = (v > 0.0f || isnan(v)) ? v : 0.0f;
    }
}

// x / (1 + exp(-x)), the CPU backend's formula.
XSAM_KERNEL void silu_f32(const float* x, float* y, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        const float v = x[i];
        y[i] = v / (1.0f + expf(-v));
    }
}

// Rust's f32::clamp: below lo -> lo, above hi -> hi, NaN stays NaN.
XSAM_KERNEL void clamp_f32(const float* x, float* y, float lo, float hi, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        const float v = x[i];
        y[i] = v < lo ? lo : (v > hi ? hi : v);
    }
}

// Mask2Former's keep map: 1 where sigmoid(x) >= 0.5 (torch's `!(sigmoid(x) < 0.5)`), else 0.
XSAM_KERNEL void mask_keep_f32(const float* x, float* y, size_t n) {
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        const float p = 1.0f / (1.0f + expf(-x[i]));
        y[i] = p < 0.5f ? 0.0f : 1.0f;
    }
}

// F.normalize over rows of `cols`: y = x / max(||x||_2, eps). grid = rows, block = 256.
XSAM_KERNEL void l2_normalize_f32(const float* __restrict__ x, float* __restrict__ y, int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = y + (size_t)blockIdx.x * cols;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) acc += xr[c] * xr[c];
    const float norm = fmaxf(sqrtf(xsam::block_sum(acc, scratch)), eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = xr[c] / norm;
}

// ------------------------------------------------------------------ data movement

// For every index (i_0, .., i_{rank-1}) of `dims` in row-major order:
//   dst[dst_offset + sum i_d * dst_strides[d]] = src[src_offset + sum i_d * src_strides[d]].
// Permute: src strides permuted, dst contiguous. Narrow: src offset at the start, dst contiguous.
// Concat: one launch per part, dst strides of the output and dst offset at the part's start.
XSAM_KERNEL void strided_copy_f32(const float* __restrict__ src, float* __restrict__ dst,
                                  const __grid_constant__ xsam_tensor::CopyParams p) {
    const size_t n = (size_t)p.n;
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        size_t rem = i;
        long long s = p.src_offset, d = p.dst_offset;
        for (int k = p.rank - 1; k >= 0; --k) {
            const size_t dim = (size_t)p.dims[k];
            const long long idx = (long long)(rem % dim);
            rem /= dim;
            s += idx * p.src_strides[k];
            d += idx * p.dst_strides[k];
        }
        dst[d] = src[s];
    }
}

// im2col of one channels-first image x [cin, h, w] for a kh x kw convolution with `stride` and
// zero padding `pad`: cols [cin*kh*kw, oh*ow], row r = (c*kh + ki)*kw + kj (the order of a
// [cout, cin, kh, kw] weight flattened to [cout, cin*kh*kw]), column p = oy*ow + ox. Then
// y [cout, oh*ow] = w · cols is the convolution in channels-first layout.
XSAM_KERNEL void im2col_f32(const float* __restrict__ x, float* __restrict__ cols, int cin, int h, int w, int kh,
                            int kw, int stride, int pad, int oh, int ow) {
    const size_t pix = (size_t)oh * ow;
    const size_t n = (size_t)cin * kh * kw * pix;
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        const size_t r = i / pix, p = i % pix;
        const int kj = (int)(r % kw);
        const int ki = (int)((r / kw) % kh);
        const int c = (int)(r / ((size_t)kw * kh));
        const int oy = (int)(p / ow), ox = (int)(p % ow);
        const int iy = oy * stride - pad + ki, ix = ox * stride - pad + kj;
        float v = 0.0f;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = x[((size_t)c * h + iy) * w + ix];
        cols[i] = v;
    }
}

// Keep bits of masked attention from a keep matrix keep [nq, tk] (nonzero = attend): bit j%32 of
// word row*words + j/32, bits past tk 0, a row with no kept key made all-kept (the CPU
// backend's rule, and Mask2Former's). Same layout as attn_mask_from_logits_*.
// grid = (nq), block = multiple of 32.
XSAM_KERNEL void keep_bits_f32(const float* __restrict__ keep, uint32_t* __restrict__ bits, int tk, int words) {
    const float* row = keep + (size_t)blockIdx.x * tk;
    uint32_t* out = bits + (size_t)blockIdx.x * words;
    int any = 0;
    for (int w = threadIdx.x; w < words; w += blockDim.x) {
        uint32_t word = 0;
        for (int b = 0; b < 32; ++b) {
            const int k = w * 32 + b;
            if (k >= tk) break;
            if (row[k] != 0.0f) word |= 1u << b;
        }
        out[w] = word;
        any |= word != 0;
    }
    if (!__syncthreads_or(any)) {
        for (int w = threadIdx.x; w < words; w += blockDim.x) {
            const int left = tk - w * 32;
            out[w] = left >= 32 ? 0xffffffffu : (left <= 0 ? 0u : (1u << left) - 1u);
        }
    }
}
