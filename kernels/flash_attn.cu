// Prefill attention entry points (the template and its design notes are in flash_attn.cuh).
//
//   flash_attn_hd{64,72,96}_bf16   dense q/k/v, optional causal + sliding window, split-K
//   flash_attn_paged_hd96_bf16     keys/values through the paged KV pool (Phi-3 prefill of a
//                                  suffix after a cached prefix), causal + sliding window
//   sam_attn_window_bf16           SAM-L windowed blocks: 14x14 windows (K <= 16), rel-pos bias
//   sam_attn_global_bf16           SAM-L global blocks: the whole 64x64 grid (K <= 64), rel-pos
//   sam_attn_global_bm64_bf16      the same in 64-row tiles (62 KiB of shared memory), for GPUs
//                                  whose per-block limit is 99 KiB
//   attn_combine_splits_bf16       merges split-K partials (also used by masked and paged decode)
//
// All take one `FlashParams` by value and run 128 threads (4 warps). Grid: x = query tiles
// (SAM: windows * tiles per window), y = heads, z = key splits. Dynamic shared memory:
// FlashCfg<...>::SMEM bytes (mirrored in src/backend/cuda/attention.rs).
#include "flash_attn.cuh"

using xsam_attn::FlashParams;

// hd 64, 128 query rows per CTA (2 m-tiles per warp halve the K/V shared-memory reads per mma).
XSAM_KERNEL void __launch_bounds__(128, 1) flash_attn_hd64_bf16(const __grid_constant__ FlashParams p) {
    xsam_attn::flash_attention<64, 2, 4, xsam_attn::FLASH_DENSE, 6>(p);
}

// SigLIP (hd 72: QKᵀ padded to 80 in shared memory), 64 query rows per CTA.
XSAM_KERNEL void __launch_bounds__(128, 1) flash_attn_hd72_bf16(const __grid_constant__ FlashParams p) {
    xsam_attn::flash_attention<72, 1, 4, xsam_attn::FLASH_DENSE, 6>(p);
}

// Phi-3 prefill (hd 96), 64 query rows per CTA.
XSAM_KERNEL void __launch_bounds__(128, 1) flash_attn_hd96_bf16(const __grid_constant__ FlashParams p) {
    xsam_attn::flash_attention<96, 1, 4, xsam_attn::FLASH_DENSE, 6>(p);
}

XSAM_KERNEL void __launch_bounds__(128, 1) flash_attn_paged_hd96_bf16(const __grid_constant__ FlashParams p) {
    xsam_attn::flash_attention<96, 1, 4, xsam_attn::FLASH_PAGED, 6>(p);
}

// 14x14 windows: KW = 16, 64 query rows per CTA (196 queries = 4 tiles, the last one with a
// single active warp).
XSAM_KERNEL void __launch_bounds__(128, 1) sam_attn_window_bf16(const __grid_constant__ FlashParams p) {
    xsam_attn::flash_attention<64, 1, 4, xsam_attn::FLASH_SAM, 4>(p);
}

// Global attention over the 64x64 grid: KW = 64 (one grid row per key tile), 128 query rows.
XSAM_KERNEL void __launch_bounds__(128, 1) sam_attn_global_bf16(const __grid_constant__ FlashParams p) {
    xsam_attn::flash_attention<64, 2, 4, xsam_attn::FLASH_SAM, 6>(p);
}

// The same with 64 query rows per CTA: 62 KiB of shared memory instead of 105 KiB, for GPUs whose
// per-block opt-in limit is 99 KiB (sm_86, sm_89).
XSAM_KERNEL void __launch_bounds__(128, 1) sam_attn_global_bm64_bf16(const __grid_constant__ FlashParams p) {
    xsam_attn::flash_attention<64, 1, 4, xsam_attn::FLASH_SAM, 6>(p);
}

// out[r / heads][(r % heads) * hd + d] for r < rows (= queries * heads), d < hd, from `splits`
// partials (layouts in attn_common.cuh). 1-D grid-stride over rows * hd.
XSAM_KERNEL void attn_combine_splits_bf16(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                          __nv_bfloat16* __restrict__ out, long long rows, int heads, int hd,
                                          int splits, long long out_stride) {
    const size_t n = (size_t)rows * hd;
    for (size_t i = xsam::global_thread_id(); i < n; i += xsam::grid_stride()) {
        xsam_attn::combine_one(part_o, part_ml, out, rows, heads, hd, splits, out_stride, (long long)i);
    }
}
