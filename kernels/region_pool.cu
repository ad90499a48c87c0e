// Point-sampled region pooling: X-SAM's "naive" region sampler (architecture notes §7).
//
// For each prompt r and each of its P points (row, col) in mask pixels (the mask is mask_h x
// mask_w, i.e. the padded SAM canvas):
//   x = col / mask_w, y = row / mask_h              (divide by the size, not size - 1)
//   sample = grid_sample(feat, (2x - 1, 2y - 1), bilinear, zeros, align_corners=True)
//   out[r, :] = max over the P samples (per channel; NaN propagates like torch.max).
// feat is the seg-projector token map [gh, gw, D] (tokens row-major, channels last); out is
// [R, D]. The points are chosen on the host (interfaces.md §2, `region_points` in
// src/backend/cuda/vision.rs): the prompt mask is produced on the host by image preprocessing,
// and uploading 2P ints is cheaper than uploading the mask and compacting it on the device.
//
// Launch: grid (ceil(D / 32), R), block 256 = 32 channels (threadIdx.x % 32) x 8 point groups.
// Each tile of 256 points gets its 4 corners (flat token index or -1, bilinear weight) computed
// once into shared memory, one point per thread; then each thread samples its channel at the
// points of its group (a warp reads 32 consecutive channels of one token: coalesced) and keeps
// the running max; the 8 groups are combined through shared memory at the end.
#include "vision_common.cuh"

namespace xsam_region {

constexpr int BLOCK = 256;
constexpr int CH = 32;               // channels per block
constexpr int GROUPS = BLOCK / CH;   // point groups
constexpr int TILE = BLOCK;          // points per shared-memory tile

template <typename T>
__device__ __forceinline__ void region_pool(const T* __restrict__ feat,
                                            const int* __restrict__ points, T* __restrict__ out,
                                            int gh, int gw, int D, int P, int mask_h,
                                            int mask_w) {
    __shared__ int s_idx[TILE][4];
    __shared__ float s_w[TILE][4];
    __shared__ float s_red[GROUPS][CH];

    const int r = blockIdx.y;
    const int lane = threadIdx.x % CH;
    const int grp = threadIdx.x / CH;
    const int c = blockIdx.x * CH + lane;
    const bool has_c = c < D;
    const int* pts = points + (size_t)r * P * 2;

    float m = xsam_vis::neg_inf();
    for (int p0 = 0; p0 < P; p0 += TILE) {
        const int n = min(TILE, P - p0);
        if (threadIdx.x < n) {
            const int row = pts[2 * (p0 + threadIdx.x)];
            const int col = pts[2 * (p0 + threadIdx.x) + 1];
            // torch: coords / size, grid = 2 p - 1, ix = ((grid + 1) / 2) * (size - 1).
            const float gx = __fsub_rn(__fmul_rn(2.0f, __fdiv_rn((float)col, (float)mask_w)), 1.0f);
            const float gy = __fsub_rn(__fmul_rn(2.0f, __fdiv_rn((float)row, (float)mask_h)), 1.0f);
            const float ix = __fmul_rn(__fmul_rn(__fadd_rn(gx, 1.0f), 0.5f), (float)(gw - 1));
            const float iy = __fmul_rn(__fmul_rn(__fadd_rn(gy, 1.0f), 0.5f), (float)(gh - 1));
            const float fx = floorf(ix), fy = floorf(iy);
            const float ex = __fsub_rn(__fadd_rn(fx, 1.0f), ix), dx = __fsub_rn(ix, fx);
            const float ey = __fsub_rn(__fadd_rn(fy, 1.0f), iy), dy = __fsub_rn(iy, fy);
            const float wts[4] = {__fmul_rn(ex, ey), __fmul_rn(dx, ey), __fmul_rn(ex, dy),
                                  __fmul_rn(dx, dy)};
            const bool vx[2] = {fx >= 0.0f && fx < (float)gw, fx + 1.0f >= 0.0f && fx + 1.0f < (float)gw};
            const bool vy[2] = {fy >= 0.0f && fy < (float)gh, fy + 1.0f >= 0.0f && fy + 1.0f < (float)gh};
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int cx = k & 1, cy = k >> 1;
                s_idx[threadIdx.x][k] =
                    vx[cx] && vy[cy] ? ((int)fy + cy) * gw + ((int)fx + cx) : -1;
                s_w[threadIdx.x][k] = wts[k];
            }
        }
        __syncthreads();
        if (has_c) {
#pragma unroll 4
            for (int i = grp; i < n; i += GROUPS) {
                float v[4];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int t = s_idx[i][k];
                    v[k] = t >= 0 ? xsam::load_f32(&feat[(size_t)t * D + c]) : 0.0f;
                }
                // torch's accumulation order nw, ne, sw, se; corners outside add nothing.
                float s = 0.0f;
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    if (s_idx[i][k] >= 0) s = fmaf(v[k], s_w[i][k], s);
                m = xsam_vis::nan_max(m, s);
            }
        }
        __syncthreads();  // the tile is rewritten next iteration
    }

    s_red[grp][lane] = m;
    __syncthreads();
    if (grp == 0 && has_c) {
#pragma unroll
        for (int g = 1; g < GROUPS; ++g) m = xsam_vis::nan_max(m, s_red[g][lane]);
        xsam::store_f32(&out[(size_t)r * D + c], m);
    }
}

}  // namespace xsam_region

// grid (ceil(D/32), R), block 256. points int32 [R, P, 2] (row, col), P >= 1.
XSAM_KERNEL void region_pool_f32(const float* __restrict__ feat, const int* __restrict__ points,
                                 float* __restrict__ out, int gh, int gw, int D, int P, int mask_h,
                                 int mask_w) {
    xsam_region::region_pool<float>(feat, points, out, gh, gw, D, P, mask_h, mask_w);
}

XSAM_KERNEL void region_pool_bf16(const __nv_bfloat16* __restrict__ feat,
                                  const int* __restrict__ points, __nv_bfloat16* __restrict__ out,
                                  int gh, int gw, int D, int P, int mask_h, int mask_w) {
    xsam_region::region_pool<__nv_bfloat16>(feat, points, out, gh, gw, D, P, mask_h, mask_w);
}
