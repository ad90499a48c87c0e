// Flash attention (FlashAttention-2 schedule) on bf16 tensor cores: one template, four ways of
// finding queries and keys. Entry points live in flash_attn.cu (dense, paged, SAM) and
// masked_attn.cu (Mask2Former's bit-masked cross-attention).
//
// Work split. A CTA of NW warps owns BM = 16*MT*NW query rows of one head (each warp MT m-tiles of
// 16 rows) and walks key tiles of BN = 64 keys: S = Q Kᵀ on mma.sync m16n8k16 (f32 accumulators),
// scale, bias and mask in registers, online softmax in f32 (running max m and sum l per row; the
// four lanes of a quad own one row), P rounded to bf16 feeds O += P V straight from the S
// registers (the C layout of two adjacent n-blocks is the A layout of one k-step). Nothing of S
// or P touches memory. gridDim.z > 1 splits the key tiles; each split writes unnormalised f32
// partials (O, m, l) that attn_combine_splits_bf16 merges.
//
// Shared memory (dynamic, FlashCfg::SMEM bytes; the host mirrors the formula and the kernel traps
// on a shortfall): Q [BM][SK], K [BN][SK], V [BN][SK] bf16 with SK = HDP + 8 (HDP = head dim
// rounded up to 16; the +8 elements make the 8 rows of every ldmatrix hit distinct 16-byte bank
// groups, so ldmatrix is conflict-free without a swizzle), then for SAM the relative-position
// terms relh [BM][KW+1] and relw [BM][KW+8] in f32.
// Pipeline: cp.async (16 B, zero-filled past the edges). At the top of tile t the K tile has
// landed; V(t) is issued before S = Q K(t)ᵀ is computed, K(t+1) before P V(t): each copy overlaps
// one of the two products (single buffers, two barriers per tile).
//
// Head dims: any multiple of 8 (64, 72, 96, 32 are instantiated). For QKᵀ the k-dim is padded to
// HDP with zero columns in Q and K shared memory (72 -> 80); for P V the n-dim is the real head
// dim in 8-column blocks (72 = 9 blocks, the odd one through ldmatrix .x2).
//
// Modes:
//   FLASH_DENSE  q [tq, *], k/v [tk, *] row-strided (token t of head h at base + t*stride + h*HD),
//                optional causal mask with sliding window: query i sits at q_offset + i and sees
//                key j iff 0 <= (q_offset + i) - j < window (window <= 0: unbounded).
//   FLASH_PAGED  as DENSE but K/V rows come from the paged pool through a block table (layout in
//                paged_attn.cu); a negative table entry reads as zeros (never dereferenced).
//   FLASH_BITS   as DENSE plus a keep bit-mask [tq][mask_words] u32 (bit j%32 of word j/32).
//   FLASH_SAM    SAM's windowed / global attention read straight from the qkv projection
//                [H*W, 3C] (q, k, v = column offsets 0, C, 2C): CTA x = window * qtiles + qtile.
//                Window (wy, wx) covers grid rows wy*K.. and columns wx*K..; positions past the
//                grid are the zero padding of the reference, whose q/k/v equal the qkv bias, so
//                their keys/values are read from pad_k / pad_v (no mask: queries attend them);
//                padded queries are never written. Global attention is the same with K = H = W.
//                Keys are visited in "KW layout": slot s is window position (s >> LOG_KW,
//                s & (KW-1)), KW = K rounded up to a power of two dividing BN, so every key
//                column of a tile has a compile-time window column and the bias lookups need no
//                division; slots with a column >= K are masked.
//                Decomposed relative position bias (unscaled q):
//                  logit(q, k) = scale*q·k + q·Rh[hq-hk+K-1] + q·Rw[wq-wk+K-1]
//                The prologue computes relh[row][hk] = q·Rh[hq-hk+K-1] and relw[row][wk] for the
//                CTA's rows with the same mma (Q times the table, 2K-1 <= 128 rows loaded where K
//                and V live) and scatters them into shared memory; the main loop adds two shared
//                loads per logit. No bias tensor exists anywhere.
#pragma once

#include "attn_common.cuh"

namespace xsam_attn {

enum FlashMode : int { FLASH_DENSE = 0, FLASH_PAGED = 1, FLASH_SAM = 2, FLASH_BITS = 3 };

// Launch parameters, passed by value. The Rust side (src/backend/cuda/attention.rs, FlashParams)
// mirrors this struct field for field as #[repr(C)]: pointers, then 64-bit, then 32-bit fields.
struct FlashParams {
    const bf16* q;
    const bf16* k;
    const bf16* v;
    bf16* o;
    float* part_o;          // split partials [splits][tq*heads][HD] (gridDim.z > 1)
    float* part_ml;         // [splits][tq*heads][2]
    const uint32_t* mask;   // BITS: [tq][mask_words]
    const int* block_table; // PAGED: pool block of every block_size keys
    const bf16* rel_h;      // SAM: [2K-1][HD]
    const bf16* rel_w;      // SAM: [2K-1][HD]
    const bf16* pad_k;      // SAM: K row of a padded position, [heads*HD]
    const bf16* pad_v;      // SAM: V row of a padded position, [heads*HD]
    long long q_stride;     // elements between consecutive tokens
    long long k_stride;
    long long v_stride;
    long long o_stride;
    long long block_stride; // PAGED: elements between consecutive pool blocks
    int tq;
    int tk;
    int heads;
    int kv_heads;           // heads % kv_heads == 0; query head h reads kv head h / (heads/kv_heads)
    int causal;
    int window;             // <= 0: no sliding window
    int q_offset;
    int mask_words;         // BITS: even, >= 2*ceil(tk/64)
    float scale;
    int block_size;         // PAGED
    int grid_h;             // SAM
    int grid_w;
    int win;                // SAM window side K (<= KW)
    int win_cols;           // SAM windows per grid row: ceil(grid_w / K)
    int qtiles_per_win;     // SAM: ceil(K*K / BM)
    int reserved;
};

// Pin the layout the Rust mirror asserts too (size and a few offsets).
static_assert(sizeof(FlashParams) == 17 * 8 + 16 * 4, "FlashParams layout changed: update attention.rs");
static_assert(offsetof(FlashParams, q_stride) == 96 && offsetof(FlashParams, tq) == 136 &&
                  offsetof(FlashParams, scale) == 168 && offsetof(FlashParams, reserved) == 196,
              "FlashParams layout changed: update attention.rs");

template <int HD, int MT, int NW, int MODE, int LOG_KW>
struct FlashCfg {
    static_assert(HD % 8 == 0 && HD >= 16 && HD <= 256, "head dim must be a multiple of 8");
    static constexpr int HDP = (HD + 15) / 16 * 16;
    static constexpr int SK = HDP + 8;
    static constexpr int BN = 64;
    static constexpr int BM = 16 * MT * NW;
    static constexpr int NT = 32 * NW;
    static constexpr int KS = HDP / 16;
    static constexpr int NB = BN / 8;
    static constexpr int OB = HD / 8;
    static constexpr int CH = HD / 8;
    static constexpr int KW = 1 << LOG_KW;
    static_assert(BN % KW == 0, "KW must divide the key tile");
    static constexpr int RHS = KW + 1;
    static constexpr int RWS = KW + 8;
    static constexpr bool SAM = MODE == FLASH_SAM;
    static constexpr int SMEM = (BM + 2 * BN) * SK * 2 + (SAM ? BM * (RHS + RWS) * 4 : 0);
};

// ROWS rows of HD bf16 into shared rows of stride SK, 16 bytes per cp.async. row_src(r) gives
// the global row or nullptr for a zero row; `base` is any mapped address for the zero fills.
template <class C, int ROWS, class F>
__device__ __forceinline__ void load_rows(bf16* s, const bf16* base, F row_src) {
    for (int idx = threadIdx.x; idx < ROWS * C::CH; idx += C::NT) {
        const int r = idx / C::CH;
        const int c = idx - r * C::CH;
        const bf16* src = row_src(r);
        cp_async_16(s + r * C::SK + c * 8, src != nullptr ? src + c * 8 : base, src != nullptr);
    }
}

template <int HD, int MT, int NW, int MODE, int LOG_KW>
__device__ __forceinline__ void flash_attention(const FlashParams& p) {
    using C = FlashCfg<HD, MT, NW, MODE, LOG_KW>;
    constexpr int BM = C::BM, BN = C::BN, SK = C::SK, NB = C::NB, OB = C::OB, KS = C::KS;
    constexpr int KW = C::KW;
    constexpr bool SAM = MODE == FLASH_SAM;
    constexpr bool BITS = MODE == FLASH_BITS;
    constexpr bool PAGED = MODE == FLASH_PAGED;

    XSAM_ATTN_SMEM(smem);
    check_smem(C::SMEM);
    bf16* sQ = reinterpret_cast<bf16*>(smem);
    bf16* sK = sQ + BM * SK;
    bf16* sV = sK + BN * SK;
    float* sRh = reinterpret_cast<float*>(sV + BN * SK);
    float* sRw = sRh + BM * C::RHS;

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, c4 = lane & 3;
    const int h = blockIdx.y;
    const int kvh = h / (p.heads / p.kv_heads);
    const int wrow = warp * 16 * MT;  // first CTA row of this warp

    // Queries: global rows i0.. (DENSE/PAGED/BITS) or window-local raster indices (SAM).
    const int K = p.win;
    int qtile = blockIdx.x, wy = 0, wx = 0;
    if (SAM) {
        const int w = blockIdx.x / p.qtiles_per_win;
        qtile = blockIdx.x - w * p.qtiles_per_win;
        wy = w / p.win_cols;
        wx = w - wy * p.win_cols;
    }
    const int i0 = qtile * BM;
    const int nq = SAM ? K * K : p.tq;
    const bool warp_active = i0 + wrow < nq;

    // SAM: token index of window position (r, c), or -1 in the padding past the grid.
    auto sam_token = [&](int r, int c) -> int {
        const int y = wy * K + r, x = wx * K + c;
        return (y < p.grid_h && x < p.grid_w) ? y * p.grid_w + x : -1;
    };
    // Global row of key j (SAM: slot j) in base (k or v), nullptr for a zero row.
    auto key_src = [&](const bf16* base, const bf16* pad, long long stride, int j) -> const bf16* {
        if (SAM) {
            const int r = j >> LOG_KW, c = j & (KW - 1);
            if (r >= K || c >= K) return nullptr;
            const int t = sam_token(r, c);
            return t < 0 ? pad + (long long)h * HD : base + (long long)t * stride + (long long)h * HD;
        } else if (PAGED) {
            if (j >= p.tk) return nullptr;
            const int blk = p.block_table[j / p.block_size];
            if (blk < 0) return nullptr;
            return base + (long long)blk * p.block_stride +
                   ((long long)kvh * p.block_size + (j % p.block_size)) * HD;
        } else {
            if (j >= p.tk) return nullptr;
            return base + (long long)j * stride + (long long)kvh * HD;
        }
    };

    // Zero the k-dim padding columns of Q and K once; cp.async never writes them.
    if (C::HDP > HD) {
        for (int r = tid; r < BM + BN; r += C::NT) {
            for (int c = HD; c < C::HDP; ++c) sQ[r * SK + c] = __float2bfloat16_rn(0.0f);
        }
    }

    load_rows<C, BM>(sQ, p.q, [&](int r) -> const bf16* {
        const int i = i0 + r;
        if (i >= nq) return nullptr;
        long long t = i;
        if (SAM) {
            const int rr = i / K;
            const int tok = sam_token(rr, i - rr * K);
            if (tok < 0) return nullptr;  // padded query: computed on zeros, never written
            t = tok;
        }
        return p.q + t * p.q_stride + (long long)h * HD;
    });
    cp_async_commit();

    uint32_t qf[MT][KS][4];

    if constexpr (SAM) {
        // relh[row][hk] = q_row · Rh[hq - hk + K - 1], relw likewise with (wq, wk): Q times the
        // whole table on the tensor cores, then each product lands where it is used.
        const int nr = 2 * K - 1;
        for (int pass = 0; pass < 2; ++pass) {
            const bf16* table = pass == 0 ? p.rel_h : p.rel_w;
            load_rows<C, 2 * BN>(sK, table, [&](int r) -> const bf16* {
                return r < nr ? table + (long long)r * HD : nullptr;
            });
            cp_async_commit();
            cp_async_wait_all();
            __syncthreads();
            if (warp_active) {
                if (pass == 0) {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                        for (int ks = 0; ks < KS; ++ks)
                            ldsm_x4(qf[mt][ks], sQ + (wrow + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SK +
                                                    ks * 16 + (lane >> 4) * 8);
                }
                float* dst = pass == 0 ? sRh : sRw;
                const int dstride = pass == 0 ? C::RHS : C::RWS;
                const int npairs = (nr + 15) / 16;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    int pos[2];
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int i = i0 + wrow + mt * 16 + g + half * 8;
                        const int rr = i / K;
                        pos[half] = i < K * K ? (pass == 0 ? rr : i - rr * K) : 0;
                    }
                    for (int np = 0; np < npairs; ++np) {
                        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
                        for (int ks = 0; ks < KS; ++ks) {
                            uint32_t kb[4];
                            ldsm_x4(kb, sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * SK + ks * 16 +
                                            ((lane >> 3) & 1) * 8);
                            mma_bf16(acc[0], qf[mt][ks], kb[0], kb[1]);
                            mma_bf16(acc[1], qf[mt][ks], kb[2], kb[3]);
                        }
#pragma unroll
                        for (int j = 0; j < 2; ++j)
#pragma unroll
                            for (int e = 0; e < 4; ++e) {
                                const int half = e >> 1;
                                const int t = np * 16 + j * 8 + c4 * 2 + (e & 1);
                                const int kk = pos[half] + K - 1 - t;
                                if (t < nr && kk >= 0 && kk < K)
                                    dst[(wrow + mt * 16 + g + half * 8) * dstride + kk] = acc[j][e];
                            }
                    }
                }
            }
            __syncthreads();  // the table area is reloaded next (the second table, then K)
        }
    }

    // Key tiles of this CTA and split.
    int t_begin = 0, t_end = 0, qp_first = 0, qp_last = 0;
    if (SAM) {
        t_end = (K * KW + BN - 1) / BN;
    } else {
        int lo = 0, hi = p.tk;
        if (p.causal) {
            qp_first = p.q_offset + i0;
            qp_last = p.q_offset + min(i0 + BM, nq) - 1;
            hi = min(hi, qp_last + 1);
            if (p.window > 0) lo = max(0, qp_first - p.window + 1);
        }
        t_begin = lo / BN;
        t_end = hi > lo ? (hi + BN - 1) / BN : t_begin;
    }
    const int per = (t_end - t_begin + (int)gridDim.z - 1) / (int)gridDim.z;
    const int sb = min(t_end, t_begin + (int)blockIdx.z * per);
    const int se = min(t_end, sb + per);

    if (sb < se) {
        load_rows<C, BN>(sK, p.k, [&](int r) { return key_src(p.k, p.pad_k, p.k_stride, sb * BN + r); });
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    if (!SAM && warp_active) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int ks = 0; ks < KS; ++ks)
                ldsm_x4(qf[mt][ks], sQ + (wrow + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SK + ks * 16 +
                                        (lane >> 4) * 8);
    }

    float o[MT][OB][4];
    float m_run[MT][2], l_run[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int ob = 0; ob < OB; ++ob)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[mt][ob][e] = 0.0f;
        m_run[mt][0] = m_run[mt][1] = neg_inf();
        l_run[mt][0] = l_run[mt][1] = 0.0f;
    }

    for (int t = sb; t < se; ++t) {
        const int j0 = t * BN;
        if (t > sb) {
            cp_async_wait_all();  // K(t)
            __syncthreads();      // ... from every thread; and everyone is done with V(t-1)
        }
        load_rows<C, BN>(sV, p.v, [&](int r) { return key_src(p.v, p.pad_v, p.v_stride, j0 + r); });
        cp_async_commit();

        float s[MT][NB][4];
        if (warp_active) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nb][e] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
                for (int np = 0; np < NB / 2; ++np) {
                    uint32_t kb[4];
                    ldsm_x4(kb, sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * SK + ks * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16(s[mt][2 * np], qf[mt][ks], kb[0], kb[1]);
                        mma_bf16(s[mt][2 * np + 1], qf[mt][ks], kb[2], kb[3]);
                    }
                }
            }

            // Does any logit of this tile need masking? (uniform over the CTA)
            bool need_mask;
            if (SAM) {
                need_mask = K != KW || (t + 1) * (BN / KW) > K;
            } else if (BITS) {
                need_mask = true;
            } else {
                need_mask = j0 + BN > p.tk;
                if (p.causal) {
                    need_mask = need_mask || j0 + BN - 1 > qp_first;
                    if (p.window > 0) need_mask = need_mask || qp_last - j0 >= p.window;
                }
            }

#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int lr = wrow + mt * 16 + g + half * 8;  // CTA row
                    const int i = i0 + lr;
                    const int qp = p.q_offset + i;
                    uint32_t wlo = 0, whi = 0;
                    if (BITS && i < nq) {
                        const uint32_t* mw = p.mask + (long long)i * p.mask_words + (j0 >> 5);
                        wlo = mw[0];
                        whi = mw[1];
                    }
                    const float* rh = sRh + lr * C::RHS;
                    const float* rw = sRw + lr * C::RWS;
                    float mx = neg_inf();
#pragma unroll
                    for (int nb = 0; nb < NB; ++nb) {
                        float rwv[2] = {0.0f, 0.0f};
                        const int col0 = nb * 8 + c4 * 2;
                        if (SAM) {
                            const float2 w2 = *reinterpret_cast<const float2*>(rw + (col0 & (KW - 1)));
                            rwv[0] = w2.x;
                            rwv[1] = w2.y;
                        }
#pragma unroll
                        for (int e1 = 0; e1 < 2; ++e1) {
                            const int col = col0 + e1;
                            float x = s[mt][nb][half * 2 + e1] * p.scale;
                            if (SAM) {
                                const int rr = t * (BN / KW) + (col >> LOG_KW);
                                const int cc = col & (KW - 1);
                                if (need_mask && (rr >= K || cc >= K)) {
                                    x = neg_inf();
                                } else {
                                    x += rh[rr] + rwv[e1];
                                }
                            } else if (need_mask) {
                                const int j = j0 + col;
                                bool ok = j < p.tk;
                                if (p.causal) ok = ok && j <= qp && (p.window <= 0 || qp - j < p.window);
                                if (BITS) ok = ok && (((col < 32 ? wlo >> col : whi >> (col - 32)) & 1u) != 0);
                                if (!ok) x = neg_inf();
                            }
                            s[mt][nb][half * 2 + e1] = x;
                            mx = fmaxf(mx, x);
                        }
                    }
                    // Online softmax for this row (the quad c4 = 0..3 shares it).
                    mx = fmaxf(mx, __shfl_xor_sync(xsam::FULL_MASK, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(xsam::FULL_MASK, mx, 2));
                    const float m_new = fmaxf(m_run[mt][half], mx);
                    // A row that has seen only masked keys keeps m = -inf; use 0 as the base so
                    // exp() gives 0 instead of NaN from (-inf) - (-inf).
                    const float m_use = m_new == neg_inf() ? 0.0f : m_new;
                    const float corr = exp2f((m_run[mt][half] - m_use) * LOG2E);
                    m_run[mt][half] = m_new;
                    float sum = 0.0f;
#pragma unroll
                    for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                        for (int e1 = 0; e1 < 2; ++e1) {
                            const float pe = exp2f((s[mt][nb][half * 2 + e1] - m_use) * LOG2E);
                            s[mt][nb][half * 2 + e1] = pe;
                            sum += pe;
                        }
                    l_run[mt][half] = l_run[mt][half] * corr + sum;
#pragma unroll
                    for (int ob = 0; ob < OB; ++ob) {
                        o[mt][ob][half * 2] *= corr;
                        o[mt][ob][half * 2 + 1] *= corr;
                    }
                }
            }
        }

        cp_async_wait_all();  // V(t)
        __syncthreads();      // ... from every thread; and everyone is done with K(t)
        if (t + 1 < se) {
            load_rows<C, BN>(sK, p.k, [&](int r) { return key_src(p.k, p.pad_k, p.k_stride, j0 + BN + r); });
        }
        cp_async_commit();

        if (warp_active) {
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                uint32_t a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    a[mt][0] = pack_bf16x2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    a[mt][1] = pack_bf16x2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    a[mt][2] = pack_bf16x2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    a[mt][3] = pack_bf16x2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
                const bf16* vrow = sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SK;
#pragma unroll
                for (int ob2 = 0; ob2 < OB / 2; ++ob2) {
                    uint32_t vb[4];
                    ldsm_x4_t(vb, vrow + ob2 * 16 + (lane >> 4) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16(o[mt][2 * ob2], a[mt], vb[0], vb[1]);
                        mma_bf16(o[mt][2 * ob2 + 1], a[mt], vb[2], vb[3]);
                    }
                }
                if (OB & 1) {
                    uint32_t vb[2];
                    ldsm_x2_t(vb, vrow + (OB - 1) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) mma_bf16(o[mt][OB - 1], a[mt], vb[0], vb[1]);
                }
            }
        }
    }

    if (!warp_active) return;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            float l = l_run[mt][half];
            l += __shfl_xor_sync(xsam::FULL_MASK, l, 1);
            l += __shfl_xor_sync(xsam::FULL_MASK, l, 2);
            const int i = i0 + wrow + mt * 16 + g + half * 8;
            if (i >= nq) continue;
            if (gridDim.z == 1) {
                long long tok = i;
                if (SAM) {
                    const int rr = i / K;
                    const int tk_ = sam_token(rr, i - rr * K);
                    if (tk_ < 0) continue;  // padding: cropped by the reference
                    tok = tk_;
                }
                const float inv = l > 0.0f ? 1.0f / l : 0.0f;
                bf16* orow = p.o + tok * p.o_stride + (long long)h * HD + c4 * 2;
#pragma unroll
                for (int ob = 0; ob < OB; ++ob) {
                    const uint32_t v2 = pack_bf16x2(o[mt][ob][half * 2] * inv, o[mt][ob][half * 2 + 1] * inv);
                    *reinterpret_cast<uint32_t*>(orow + ob * 8) = v2;
                }
            } else {
                const long long r = ((long long)blockIdx.z * nq + i) * p.heads + h;
                float* po = p.part_o + r * HD + c4 * 2;
#pragma unroll
                for (int ob = 0; ob < OB; ++ob) {
                    *reinterpret_cast<float2*>(po + ob * 8) = make_float2(o[mt][ob][half * 2], o[mt][ob][half * 2 + 1]);
                }
                if (c4 == 0) {
                    p.part_ml[r * 2] = m_run[mt][half];
                    p.part_ml[r * 2 + 1] = l;
                }
            }
        }
    }
}

}  // namespace xsam_attn
