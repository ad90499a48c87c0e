// Decode attention over the paged KV cache, and the kernel that appends K/V rows to it.
//
// Device pool layout (bf16). One pool for K and one for V, each num_blocks * num_layers blocks
// of block_size tokens. Block b of layer l starts at element (b * num_layers + l) * block_elems
// (block_stride = num_layers * block_elems between consecutive blocks of one layer; the host
// offsets the pool pointer by l * block_elems), block_elems = kv_heads * block_size * head_dim.
// Inside a block the layout is HEAD-MAJOR: [kv_heads][block_size][head_dim], so one head's keys
// of a block are one contiguous run (block_size * head_dim * 2 bytes, 3 KiB for 16 x 96) that a
// warp reads with full 32-byte sectors. (The CPU cache keeps [block_size][kv_dim] per block; the
// logical contents are the same: token t, kv head kh, dim d.)
// Block table: int32 per logical block of the sequence (block of token j = table[j / block_size]);
// a negative entry (released by the sliding window) is never read: its keys count as absent.
// Slot of token j = table[j / block_size] * block_size + j % block_size (append's addressing).
//
// paged_decode_hd{64,96,128}_bf16: grid = (heads, splits, queries), 256 threads (8 warps).
//   Query qi sits at position pos0 + qi and sees keys [max(0, pos - window + 1), pos] (window <= 0:
//   all of [0, pos]), the same rule as the prefill kernels and the CPU paged_attention. Split s
//   takes keys [lo + s*split_len, lo + (s+1)*split_len); with gridDim.y > 1 it writes f32
//   partials for attn_combine_splits_bf16, else the bf16 output directly.
//   Inside a split each warp walks 16 keys at a time: lanes 2k and 2k+1 own key k and split its
//   head dim in interleaved 16-byte chunks (lane parity p takes chunks p, p+2, ...), so each load
//   instruction of the warp reads 16 whole 32-byte sectors; a dot product is a chunked FMA chain
//   plus one shuffle. Scores share one running max per warp (online softmax in f32); each lane
//   accumulates its own dims, reduced over the 16 lanes of a parity at the end, then the 8 warps
//   merge through shared memory (dynamic: 8 * (hd + 2) floats).
// paged_kv_append_bf16: writes T tokens' K and V rows (row-strided, e.g. straight from the
//   qkv projection) to their slots; a negative slot is skipped.
#include "attn_common.cuh"

namespace xsam_paged {

using xsam_attn::bf16;

// Launch parameters for paged_decode_*; mirrored by PagedDecodeParams in
// src/backend/cuda/attention.rs (pointers, 64-bit, 32-bit fields, in this order).
struct PagedDecodeParams {
    const bf16* q;           // [nq] rows of heads*HD, q_stride apart
    const bf16* k_pool;      // layer's K pool (block 0 of this layer)
    const bf16* v_pool;
    const int* block_table;  // the sequence's table
    bf16* o;                 // [nq] rows of heads*HD, o_stride apart
    float* part_o;           // [splits][nq*heads][HD]
    float* part_ml;          // [splits][nq*heads][2]
    long long q_stride;
    long long o_stride;
    long long block_stride;
    int nq;
    int heads;
    int kv_heads;
    int block_size;
    int pos0;
    int window;
    int split_len;
    float scale;
};

static_assert(sizeof(PagedDecodeParams) == 10 * 8 + 8 * 4 && offsetof(PagedDecodeParams, q_stride) == 56 &&
                  offsetof(PagedDecodeParams, nq) == 80 && offsetof(PagedDecodeParams, scale) == 108,
              "PagedDecodeParams layout changed: update attention.rs");

constexpr int DECODE_WARPS = 8;

__device__ __forceinline__ void unpack8(uint4 u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = xsam_attn::bf16_lo(w[i]);
        f[2 * i + 1] = xsam_attn::bf16_hi(w[i]);
    }
}

template <int HD>
__device__ __forceinline__ void paged_decode(const PagedDecodeParams& p) {
    static_assert(HD % 16 == 0, "two lanes per key split the head dim in 16-byte chunks");
    constexpr int CPL = HD / 16;  // chunks of 8 dims per lane
    constexpr int DPL = CPL * 8;  // dims per lane
    constexpr int NW = DECODE_WARPS;
    XSAM_ATTN_SMEM(smem);
    xsam_attn::check_smem(NW * (HD + 2) * 4);
    float* s_acc = reinterpret_cast<float*>(smem);  // [NW][HD]
    float* s_m = s_acc + NW * HD;                   // [NW]
    float* s_l = s_m + NW;                          // [NW]

    const int h = blockIdx.x, split = blockIdx.y, qi = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int par = lane & 1, key = lane >> 1;
    const int kvh = h / (p.heads / p.kv_heads);
    const int pos = p.pos0 + qi;
    const int lo = p.window > 0 ? max(0, pos - p.window + 1) : 0;
    const int s_lo = lo + split * p.split_len;
    const int s_hi = min(pos + 1, s_lo + p.split_len);

    float qv[DPL];
    {
        const bf16* qrow = p.q + (long long)qi * p.q_stride + (long long)h * HD;
#pragma unroll
        for (int i = 0; i < CPL; ++i) {
            float f[8];
            unpack8(xsam_attn::ld_nc_16(qrow + (2 * i + par) * 8), f);
#pragma unroll
            for (int e = 0; e < 8; ++e) qv[i * 8 + e] = f[e] * p.scale;
        }
    }
    float acc[DPL];
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] = 0.0f;
    float m = xsam_attn::neg_inf(), l = 0.0f;

    for (int base = s_lo + warp * 16; base < s_hi; base += NW * 16) {
        const int j = base + key;
        bool valid = j < s_hi;
        long long off = 0;
        if (valid) {
            const int blk = p.block_table[j / p.block_size];
            valid = blk >= 0;
            off = (long long)blk * p.block_stride + ((long long)kvh * p.block_size + (j % p.block_size)) * HD;
        }
        uint4 kr[CPL], vr[CPL];
#pragma unroll
        for (int i = 0; i < CPL; ++i) {
            const uint4 z = make_uint4(0, 0, 0, 0);
            kr[i] = valid ? xsam_attn::ld_nc_16(p.k_pool + off + (2 * i + par) * 8) : z;
            vr[i] = valid ? xsam_attn::ld_nc_16(p.v_pool + off + (2 * i + par) * 8) : z;
        }
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < CPL; ++i) {
            float f[8];
            unpack8(kr[i], f);
#pragma unroll
            for (int e = 0; e < 8; ++e) dot = fmaf(qv[i * 8 + e], f[e], dot);
        }
        dot += __shfl_xor_sync(xsam::FULL_MASK, dot, 1);
        const float sc = valid ? dot : xsam_attn::neg_inf();
        const float m_new = fmaxf(m, xsam::warp_max(sc));
        const float m_use = m_new == xsam_attn::neg_inf() ? 0.0f : m_new;
        const float corr = exp2f((m - m_use) * xsam_attn::LOG2E);
        const float pe = exp2f((sc - m_use) * xsam_attn::LOG2E);
        m = m_new;
        l = l * corr + pe;
#pragma unroll
        for (int i = 0; i < CPL; ++i) {
            float f[8];
            unpack8(vr[i], f);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[i * 8 + e] = fmaf(pe, f[e], acc[i * 8 + e] * corr);
        }
    }

    // Sum over the 16 lanes of each parity (each holds other keys of the same dims); l counts
    // every key once per parity.
#pragma unroll
    for (int off = 2; off < 32; off <<= 1) {
        l += __shfl_xor_sync(xsam::FULL_MASK, l, off);
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[d] += __shfl_xor_sync(xsam::FULL_MASK, acc[d], off);
    }
    if (lane < 2) {
#pragma unroll
        for (int i = 0; i < CPL; ++i)
#pragma unroll
            for (int e = 0; e < 8; ++e) s_acc[warp * HD + (2 * i + lane) * 8 + e] = acc[i * 8 + e];
        if (lane == 0) {
            s_m[warp] = m;
            s_l[warp] = l;
        }
    }
    __syncthreads();

    float mx = xsam_attn::neg_inf();
#pragma unroll
    for (int w = 0; w < NW; ++w)
        if (s_l[w] > 0.0f) mx = fmaxf(mx, s_m[w]);
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            if (s_l[w] > 0.0f) {
                const float wt = exp2f((s_m[w] - mx) * xsam_attn::LOG2E);
                num += wt * s_acc[w * HD + d];
                den += wt * s_l[w];
            }
        }
        if (gridDim.y == 1) {
            p.o[(long long)qi * p.o_stride + (long long)h * HD + d] =
                __float2bfloat16_rn(den > 0.0f ? num / den : 0.0f);
        } else {
            const long long r = ((long long)split * p.nq + qi) * p.heads + h;
            p.part_o[r * HD + d] = num;
            if (d == 0) {
                p.part_ml[r * 2] = mx;
                p.part_ml[r * 2 + 1] = den;
            }
        }
    }
}

}  // namespace xsam_paged

XSAM_KERNEL void __launch_bounds__(256) paged_decode_hd64_bf16(const __grid_constant__ xsam_paged::PagedDecodeParams p) {
    xsam_paged::paged_decode<64>(p);
}

XSAM_KERNEL void __launch_bounds__(256) paged_decode_hd96_bf16(const __grid_constant__ xsam_paged::PagedDecodeParams p) {
    xsam_paged::paged_decode<96>(p);
}

XSAM_KERNEL void __launch_bounds__(256) paged_decode_hd128_bf16(const __grid_constant__ xsam_paged::PagedDecodeParams p) {
    xsam_paged::paged_decode<128>(p);
}

// k/v: `tokens` rows of kv_heads*head_dim bf16, k_stride / v_stride elements apart (multiples of
// 8, 16-byte aligned rows). slots[t] = block * block_size + offset, negative = skip. The pools
// are the layer's (see the layout above). 1-D grid-stride over tokens * kv_heads*head_dim/8
// chunks of 16 bytes.
XSAM_KERNEL void paged_kv_append_bf16(const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                                      long long k_stride, long long v_stride, const int* __restrict__ slots,
                                      __nv_bfloat16* __restrict__ k_pool, __nv_bfloat16* __restrict__ v_pool,
                                      long long block_stride, int block_size, int kv_heads, int head_dim,
                                      int tokens) {
    const int cpt = kv_heads * head_dim / 8;
    const size_t n = (size_t)tokens * cpt;
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        const int t = (int)(i / cpt);
        const int c = (int)(i - (size_t)t * cpt);
        const int slot = slots[t];
        if (slot < 0) continue;
        const int blk = slot / block_size, off = slot - blk * block_size;
        const int d0 = c * 8;
        const int kh = d0 / head_dim, dd = d0 - kh * head_dim;
        const long long dst = (long long)blk * block_stride + ((long long)kh * block_size + off) * head_dim + dd;
        *reinterpret_cast<uint4*>(k_pool + dst) = *reinterpret_cast<const uint4*>(k + (long long)t * k_stride + d0);
        *reinterpret_cast<uint4*>(v_pool + dst) = *reinterpret_cast<const uint4*>(v + (long long)t * v_stride + d0);
    }
}
