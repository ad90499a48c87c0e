// X-SAM's pixel shuffle (architecture notes §5.1), both directions, channels-last and
// channels-first. Pure data movement: T is only the element size (no conversion, bit-exact).
//
// Channels-last, x [n, h, w, c]:
//   down (ratio 0.5): y [n, ceil(h/2), ceil(w/2), 4c], y[b, i, j, (dh*2 + dw)*c + k] =
//        x[b, 2i + dh, 2j + dw, k], zero where 2i + dh >= h or 2j + dw >= w (odd sizes are padded).
//   up (ratio 2, c % 4 == 0): y [n, 2h, 2w, c/4], y[b, 2i + dh, 2j + dw, k] =
//        x[b, i, j, dw*(c/2) + dh*(c/4) + k]   (the column offset is the slow bit).
// Channels-first is the same map with the channel axis in front (X-SAM permutes to channels-last,
// shuffles and permutes back), x [n, c, h, w]:
//   down: y [n, 4c, ceil(h/2), ceil(w/2)], y[b, (dh*2 + dw)*c + k, i, j] = x[b, k, 2i + dh, 2j + dw]
//   up:   y [n, c/4, 2h, 2w], y[b, k, 2i + dh, 2j + dw] = x[b, dw*(c/2) + dh*(c/4) + k, i, j]
//
// Launch shape (all four): block (bx, by) with bx*by = 256, bx a power of two; "rows" are
// spread over threadIdx.y and blockIdx.x, and each row's contiguous run over threadIdx.x:
//   channels-last: a row is one output channel chunk (c elements for down, c/4 for up), copied in
//                  16-byte units when sizes and pointers allow, else element by element;
//   channels-first: a row is one input row (down) or output row (up) along w, handled in pairs
//                  of adjacent elements so that both the reads and the writes are coalesced.
// Index decomposition happens once per row, not per element.
#include "vision_common.cuh"

namespace xsam_shuffle {

// ---------------------------------------------------------------- channels-last

// Copies `units` U-units from `src` (or zeros when src is null) to `dst`, over threadIdx.x.
template <typename U>
__device__ __forceinline__ void copy_run(const U* __restrict__ src, U* __restrict__ dst,
                                         size_t units) {
    if (src != nullptr) {
        for (size_t k = threadIdx.x; k < units; k += blockDim.x) dst[k] = src[k];
    } else {
        U z;
        memset(&z, 0, sizeof(U));
        for (size_t k = threadIdx.x; k < units; k += blockDim.x) dst[k] = z;
    }
}

// down: row r = ((b*oh + i)*ow + j)*4 + q, copying chunk q of output pixel (b, i, j).
template <typename T, typename U>
__device__ __forceinline__ void down_cl_row(const T* x, T* y, size_t r, int h, int w, int c) {
    const int oh = (h + 1) / 2, ow = (w + 1) / 2;
    const int q = (int)(r % 4);
    size_t t = r / 4;
    const int j = (int)(t % ow);
    t /= ow;
    const int i = (int)(t % oh);
    const size_t b = t / oh;
    const int yy = 2 * i + q / 2, xx = 2 * j + q % 2;
    const size_t units = (size_t)c * sizeof(T) / sizeof(U);
    const T* src = (yy < h && xx < w) ? x + ((b * h + yy) * w + xx) * (size_t)c : nullptr;
    copy_run<U>(reinterpret_cast<const U*>(src), reinterpret_cast<U*>(y + r * (size_t)c), units);
}

// up: row r = (b*2h + oy)*2w + ox, one output pixel of c/4 channels.
template <typename T, typename U>
__device__ __forceinline__ void up_cl_row(const T* x, T* y, size_t r, int h, int w, int c) {
    const int cq = c / 4;
    const int ox = (int)(r % (2 * (size_t)w));
    const size_t t = r / (2 * (size_t)w);
    const int oy = (int)(t % (2 * (size_t)h));
    const size_t b = t / (2 * (size_t)h);
    const int i = oy / 2, dh = oy % 2, j = ox / 2, dw = ox % 2;
    const T* src = x + ((b * h + i) * w + j) * (size_t)c + (size_t)dw * (c / 2) + (size_t)dh * cq;
    const size_t units = (size_t)cq * sizeof(T) / sizeof(U);
    copy_run<U>(reinterpret_cast<const U*>(src), reinterpret_cast<U*>(y + r * (size_t)cq), units);
}

template <typename T, bool UP>
__device__ __forceinline__ void shuffle_cl(const T* __restrict__ x, T* __restrict__ y, int n, int h,
                                           int w, int c) {
    const size_t rows = UP ? (size_t)n * 2 * h * 2 * w : (size_t)n * ((h + 1) / 2) * ((w + 1) / 2) * 4;
    const size_t run_bytes = (size_t)(UP ? c / 4 : c) * sizeof(T);
    // 16-byte units when every run (and, going up, every source offset c/4) is a multiple of 16
    // bytes and both bases are aligned; uniform over the grid.
    const bool vec = run_bytes % 16 == 0 && xsam_vis::aligned16(x) && xsam_vis::aligned16(y);
    for (size_t r = (size_t)blockIdx.x * blockDim.y + threadIdx.y; r < rows;
         r += (size_t)gridDim.x * blockDim.y) {
        if (UP) {
            if (vec) up_cl_row<T, uint4>(x, y, r, h, w, c);
            else up_cl_row<T, T>(x, y, r, h, w, c);
        } else {
            if (vec) down_cl_row<T, uint4>(x, y, r, h, w, c);
            else down_cl_row<T, T>(x, y, r, h, w, c);
        }
    }
}

// ---------------------------------------------------------------- channels-first

// down: row r = (b*c + k)*(2*oh) + yy over padded input rows yy < 2*oh; pairs j < ow.
template <typename T>
__device__ __forceinline__ void shuffle_down_cf(const T* __restrict__ x, T* __restrict__ y, int n,
                                                int c, int h, int w) {
    const int oh = (h + 1) / 2, ow = (w + 1) / 2;
    const size_t rows = (size_t)n * c * 2 * oh;
    const size_t plane = (size_t)oh * ow;
    for (size_t r = (size_t)blockIdx.x * blockDim.y + threadIdx.y; r < rows;
         r += (size_t)gridDim.x * blockDim.y) {
        const int yy = (int)(r % (2 * oh));
        const size_t bk = r / (2 * oh);
        const int k = (int)(bk % c);
        const size_t b = bk / c;
        const int i = yy / 2, dh = yy % 2;
        const T* xr = x + ((b * c + k) * h + yy) * (size_t)w;
        // output channels (dh*2 + 0)*c + k and (dh*2 + 1)*c + k of image b, row i
        T* y0 = y + ((b * 4 * c + (size_t)(dh * 2) * c + k) * plane) + (size_t)i * ow;
        T* y1 = y0 + (size_t)c * plane;
        for (int j = threadIdx.x; j < ow; j += blockDim.x) {
            const int x0 = 2 * j, x1 = 2 * j + 1;
            T v0, v1;
            memset(&v0, 0, sizeof(T));
            memset(&v1, 0, sizeof(T));
            if (yy < h) {
                v0 = xr[x0];  // x0 < w always (j < ceil(w/2))
                if (x1 < w) v1 = xr[x1];
            }
            y0[j] = v0;
            y1[j] = v1;
        }
    }
}

// up: row r = (b*cq + k)*(2h) + oy over output rows; pairs j < w (output columns 2j, 2j+1).
template <typename T>
__device__ __forceinline__ void shuffle_up_cf(const T* __restrict__ x, T* __restrict__ y, int n,
                                              int c, int h, int w) {
    const int cq = c / 4;
    const size_t rows = (size_t)n * cq * 2 * h;
    const size_t plane = (size_t)h * w;
    for (size_t r = (size_t)blockIdx.x * blockDim.y + threadIdx.y; r < rows;
         r += (size_t)gridDim.x * blockDim.y) {
        const int oy = (int)(r % (2 * (size_t)h));
        const size_t bk = r / (2 * (size_t)h);
        const int k = (int)(bk % cq);
        const size_t b = bk / cq;
        const int i = oy / 2, dh = oy % 2;
        // dw = 0 reads channel dh*cq + k, dw = 1 reads c/2 + dh*cq + k.
        const T* x0 = x + (b * c + (size_t)dh * cq + k) * plane + (size_t)i * w;
        const T* x1 = x0 + (size_t)(c / 2) * plane;
        T* yr = y + r * (size_t)(2 * w);
        for (int j = threadIdx.x; j < w; j += blockDim.x) {
            yr[2 * j] = x0[j];
            yr[2 * j + 1] = x1[j];
        }
    }
}

}  // namespace xsam_shuffle

#define XSAM_SHUFFLE(T, SUF)                                                                       \
    XSAM_KERNEL void pixel_shuffle_down_cl_##SUF(const T* __restrict__ x, T* __restrict__ y,       \
                                                 int n, int h, int w, int c) {                     \
        xsam_shuffle::shuffle_cl<T, false>(x, y, n, h, w, c);                                      \
    }                                                                                              \
    XSAM_KERNEL void pixel_shuffle_up_cl_##SUF(const T* __restrict__ x, T* __restrict__ y, int n,  \
                                               int h, int w, int c) {                              \
        xsam_shuffle::shuffle_cl<T, true>(x, y, n, h, w, c);                                       \
    }                                                                                              \
    XSAM_KERNEL void pixel_shuffle_down_cf_##SUF(const T* __restrict__ x, T* __restrict__ y,       \
                                                 int n, int c, int h, int w) {                     \
        xsam_shuffle::shuffle_down_cf<T>(x, y, n, c, h, w);                                        \
    }                                                                                              \
    XSAM_KERNEL void pixel_shuffle_up_cf_##SUF(const T* __restrict__ x, T* __restrict__ y, int n,  \
                                               int c, int h, int w) {                              \
        xsam_shuffle::shuffle_up_cf<T>(x, y, n, c, h, w);                                          \
    }
XSAM_SHUFFLE(float, f32)
XSAM_SHUFFLE(__nv_bfloat16, bf16)
#undef XSAM_SHUFFLE
