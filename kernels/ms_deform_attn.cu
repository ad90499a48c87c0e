// Multi-scale deformable attention (Deformable-DETR / Mask2Former pixel decoder), forward only,
// fused with the softmax over the (level, point) attention logits.
//
// Fixed geometry: 3 levels x 4 points per head (the only values X-SAM's config allows); heads and
// head_dim are run-time values (the test model has 4 heads of 8 channels, the real one 8 x 32).
//
// Inputs (T = float or bf16, all row-major):
//   value   [S, heads*hd]   the three level maps flattened row-major and concatenated (level 0 first);
//                           S = h0*w0 + h1*w1 + h2*w2
//   offsets [Q, off_stride] row q holds [heads, 3, 4, (x, y)] raw sampling offsets (the linear
//                           layer's output) in its first heads*24 entries. off_stride lets the caller
//                           pass a column slice of a fused projection.
//   logits  [Q, logit_stride] row q holds [heads, 12] attention logits in its first heads*12 entries.
//   ref     [Q, 2] f32 (x, y) normalised reference points, or null: then Q == S and query q is the
//                           pixel q of the flattened levels, whose reference point is its pixel
//                           centre ((j + 0.5) / W_l, (i + 0.5) / H_l).
// Output  out [Q, heads*hd].
//
// Per (q, head): a = softmax_12(logits); for each level l and point p:
//   loc = ref + offset / (W_l, H_l);  grid = 2 loc - 1;
//   sample = grid_sample(value_l, grid, bilinear, padding zeros, align_corners=False)
//   out = sum_{l,p} a[l,p] * sample.
// The coordinate arithmetic is PyTorch's, op for op in f32 without FMA contraction, so sampling
// positions are the reference's to the ulp.
//
// Mapping: a group of G lanes (G = min(32, next_pow2(hd)), a power of two dividing 32) per
// (query, head); groups are consecutive heads of one query. The group's lanes compute the 12
// softmax weights and the 12 x 4 bilinear corners (flat row index or -1 when outside, weight
// already multiplied by the softmax weight) into shared memory, then each lane accumulates its
// channels (c = lane, lane + G, ...) over the 48 corners. A corner row of a head is hd contiguous
// channels, so the lanes' loads are coalesced; the level maps (11 MB at full size in bf16) stay
// in L2. Branches on corner validity are uniform across the group.
#include "vision_common.cuh"

namespace xsam_msda {

constexpr int LEVELS = 3;
constexpr int POINTS = 4;
constexpr int SAMPLES = LEVELS * POINTS;  // 12

struct Corner {
    int row[SAMPLES][4];    // flat row in value (start_l + y*W_l + x), -1 when outside the map
    float w[SAMPLES][4];    // bilinear weight x softmax weight
};

template <typename T>
__device__ __forceinline__ void ms_deform_attn(const T* __restrict__ value,
                                               const T* __restrict__ offsets, int off_stride,
                                               const T* __restrict__ logits, int logit_stride,
                                               const float* __restrict__ ref, T* __restrict__ out,
                                               int num_queries, int heads, int hd, int h0, int w0,
                                               int h1, int w1, int h2, int w2, int group) {
    extern __shared__ __align__(16) unsigned char msda_smem[];
    Corner* corners = reinterpret_cast<Corner*>(msda_smem);

    const int lane = threadIdx.x & (group - 1);
    const int gib = threadIdx.x / group;  // group index inside the block
    const long long gid = (long long)blockIdx.x * (blockDim.x / group) + gib;
    const bool active = gid < (long long)num_queries * heads;
    const int q = active ? (int)(gid / heads) : 0;
    const int h = active ? (int)(gid % heads) : 0;
    Corner& cr = corners[gib];

    const int start1 = h0 * w0, start2 = h0 * w0 + h1 * w1;

    // Reference point.
    float rx, ry;
    if (ref != nullptr) {
        rx = active ? ref[2 * (size_t)q] : 0.0f;
        ry = active ? ref[2 * (size_t)q + 1] : 0.0f;
    } else {
        // Selects, not arrays indexed by the level (those would go to local memory).
        const int l = q < start1 ? 0 : (q < start2 ? 1 : 2);
        const int lw = l == 0 ? w0 : (l == 1 ? w1 : w2);
        const int lh = l == 0 ? h0 : (l == 1 ? h1 : h2);
        const int local = q - (l == 0 ? 0 : (l == 1 ? start1 : start2));
        const int i = local / lw, j = local % lw;
        // torch: linspace(0.5, W - 0.5, W)[j] / W, and linspace's values are exactly j + 0.5.
        rx = __fdiv_rn((float)j + 0.5f, (float)lw);
        ry = __fdiv_rn((float)i + 0.5f, (float)lh);
    }

    // Softmax over the 12 logits of (q, h). Lane `lane` owns samples lane, lane + G, ... (one
    // sample per lane when G >= 12); the loops are not unrolled, so a warp runs each step once
    // per owned sample rather than once per sample. The exponentials wait in cr.w[s][0], which
    // only the owning lane touches until it writes the final corner weights.
    const T* lrow = logits + (size_t)q * logit_stride + (size_t)h * SAMPLES;
    float m = xsam_vis::neg_inf();
#pragma unroll 1
    for (int s = lane; s < SAMPLES; s += group) {
        const float v = active ? xsam::load_f32(&lrow[s]) : 0.0f;
        cr.w[s][0] = v;
        m = xsam_vis::nan_max(m, v);
    }
    for (int off = group / 2; off > 0; off >>= 1)
        m = xsam_vis::nan_max(m, __shfl_xor_sync(xsam::FULL_MASK, m, off, group));
    float sum = 0.0f;
#pragma unroll 1
    for (int s = lane; s < SAMPLES; s += group) {
        const float e = expf(cr.w[s][0] - m);
        cr.w[s][0] = e;
        sum += e;
    }
    for (int off = group / 2; off > 0; off >>= 1)
        sum += __shfl_xor_sync(xsam::FULL_MASK, sum, off, group);

    // Corners of the samples this lane owns.
    const T* orow = offsets + (size_t)q * off_stride + (size_t)h * SAMPLES * 2;
#pragma unroll 1
    for (int s = lane; s < SAMPLES; s += group) {
        // Level of sample s by selects (an array indexed by l would live in local memory).
        const int l = s / POINTS;
        const int lw = l == 0 ? w0 : (l == 1 ? w1 : w2);
        const int lstart = l == 0 ? 0 : (l == 1 ? start1 : start2);
        const float Wf = (float)lw, Hf = (float)(l == 0 ? h0 : (l == 1 ? h1 : h2));
        const float a = active ? __fdiv_rn(cr.w[s][0], sum) : 0.0f;
        const float ox = active ? xsam::load_f32(&orow[2 * s]) : 0.0f;
        const float oy = active ? xsam::load_f32(&orow[2 * s + 1]) : 0.0f;
        // loc = ref + off / (W, H); grid = 2 loc - 1; ix = ((grid + 1) W - 1) / 2.
        const float lx = __fadd_rn(rx, __fdiv_rn(ox, Wf));
        const float ly = __fadd_rn(ry, __fdiv_rn(oy, Hf));
        const float gx = __fsub_rn(__fmul_rn(2.0f, lx), 1.0f);
        const float gy = __fsub_rn(__fmul_rn(2.0f, ly), 1.0f);
        const float ix = __fmul_rn(__fsub_rn(__fmul_rn(__fadd_rn(gx, 1.0f), Wf), 1.0f), 0.5f);
        const float iy = __fmul_rn(__fsub_rn(__fmul_rn(__fadd_rn(gy, 1.0f), Hf), 1.0f), 0.5f);
        const float fx = floorf(ix), fy = floorf(iy);
        // Distances to the far corners (torch's nw/ne/sw/se weights).
        const float ex = __fsub_rn(__fadd_rn(fx, 1.0f), ix), dx = __fsub_rn(ix, fx);
        const float ey = __fsub_rn(__fadd_rn(fy, 1.0f), iy), dy = __fsub_rn(iy, fy);
        // Validity in float space first (NaN and huge coordinates fail every comparison, and
        // nothing out of range is ever converted to int).
        const bool x0 = fx >= 0.0f && fx < Wf, x1 = fx + 1.0f >= 0.0f && fx + 1.0f < Wf;
        const bool y0 = fy >= 0.0f && fy < Hf, y1 = fy + 1.0f >= 0.0f && fy + 1.0f < Hf;
        const int base = (x0 || x1) && (y0 || y1) ? lstart + (int)fy * lw + (int)fx : 0;
        cr.row[s][0] = active && x0 && y0 ? base : -1;
        cr.row[s][1] = active && x1 && y0 ? base + 1 : -1;
        cr.row[s][2] = active && x0 && y1 ? base + lw : -1;
        cr.row[s][3] = active && x1 && y1 ? base + lw + 1 : -1;
        cr.w[s][0] = __fmul_rn(__fmul_rn(ex, ey), a);
        cr.w[s][1] = __fmul_rn(__fmul_rn(dx, ey), a);
        cr.w[s][2] = __fmul_rn(__fmul_rn(ex, dy), a);
        cr.w[s][3] = __fmul_rn(__fmul_rn(dx, dy), a);
    }
    __syncwarp();

    if (active) {
        const size_t C = (size_t)heads * hd;
        const T* vh = value + (size_t)h * hd;
        T* oh = out + (size_t)q * C + (size_t)h * hd;
        for (int c = lane; c < hd; c += group) {
            float acc = 0.0f;
            // Two samples (8 loads) in flight per step: enough memory-level parallelism with ~40
            // registers; unrolling all 48 loads made ptxas use 250 registers for f32.
#pragma unroll 2
            for (int s = 0; s < SAMPLES; ++s) {
                float v[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int r = cr.row[s][k];
                    v[k] = r >= 0 ? xsam::load_f32(&vh[(size_t)r * C + c]) : 0.0f;
                }
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    // A corner outside the map contributes nothing, even with a NaN weight.
                    if (cr.row[s][k] >= 0) acc = fmaf(cr.w[s][k], v[k], acc);
                }
            }
            xsam::store_f32(&oh[c], acc);
        }
    }
}

}  // namespace xsam_msda

// grid = ceil(Q*heads / (block/group)), block = a multiple of 32 with block/group groups,
// dynamic shared memory = (block/group) * sizeof(Corner) (384 bytes per group).
#define XSAM_MSDA(NAME, T)                                                                        \
    XSAM_KERNEL void NAME(const T* __restrict__ value, const T* __restrict__ offsets,             \
                          int off_stride, const T* __restrict__ logits, int logit_stride,         \
                          const float* __restrict__ ref, T* __restrict__ out, int num_queries,    \
                          int heads, int hd, int h0, int w0, int h1, int w1, int h2, int w2,      \
                          int group) {                                                            \
        xsam_msda::ms_deform_attn<T>(value, offsets, off_stride, logits, logit_stride, ref, out,  \
                                     num_queries, heads, hd, h0, w0, h1, w1, h2, w2, group);      \
    }
XSAM_MSDA(ms_deform_attn_f32, float)
XSAM_MSDA(ms_deform_attn_bf16, __nv_bfloat16)
#undef XSAM_MSDA
