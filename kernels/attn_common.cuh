// Helpers shared by the attention kernels (flash_attn.cu, masked_attn.cu, paged_attn.cu).
//
// Tensor-core and async-copy primitives as thin inline-PTX wrappers (sm_80+):
//   ldsm_x4 / ldsm_x4_t / ldsm_x2_t  ldmatrix.sync.aligned.m8n8 (.trans) from shared memory
//   mma_bf16                          mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
//   cp_async_16                       cp.async.cg 16 bytes global -> shared, zero-filled when the
//                                     source is invalid (src-size 0)
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, c = lane % 4:
//   A 16x16 (row-major), 4 regs of 2 bf16: a0 (row g, cols 2c..2c+1), a1 (row g+8, same cols),
//                                          a2 (row g, cols 2c+8..), a3 (row g+8, cols 2c+8..)
//   B 16x8 ("col"),      2 regs:           b0 (k 2c..2c+1, col g), b1 (k 2c+8..2c+9, col g)
//   C/D 16x8 f32,        4 regs:           d0,d1 (row g, cols 2c, 2c+1), d2,d3 (row g+8, same cols)
//   ldmatrix x4: lanes 8i..8i+7 give the row addresses of matrix i; register i receives matrix i
//   with lane holding row g, elements 2c, 2c+1 (.trans: row 2c and 2c+1 of column g instead).
// The lower-indexed element of a bf16 pair always sits in the low 16 bits.
//
// When compiled with XSAM_EMU (tools/kernel-emu, a host-side SIMT emulator used to test the
// kernels' indexing without a GPU) the wrappers call the emulator instead of emitting PTX.
#pragma once

#include <math.h>
#include <string.h>

#include "common.cuh"

#ifdef XSAM_EMU
#include "xsam_emu_hooks.h"
#endif

// The attention kernels' dynamic shared memory (one name for all, so the declarations agree in
// the single translation unit).
#ifndef XSAM_EMU
#define XSAM_ATTN_SMEM(name) extern __shared__ __align__(16) unsigned char xsam_attn_smem[]; \
    unsigned char* name = xsam_attn_smem
#else
#define XSAM_ATTN_SMEM(name) unsigned char* name = xsam_emu::dyn_smem()
#endif

namespace xsam_attn {

typedef __nv_bfloat16 bf16;

constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ float neg_inf() { return -INFINITY; }

// Two floats rounded to bf16 (nearest even) and packed, `lo` in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

__device__ __forceinline__ float bf16_lo(uint32_t u) {
    return __uint_as_float(u << 16);
}
__device__ __forceinline__ float bf16_hi(uint32_t u) {
    return __uint_as_float(u & 0xffff0000u);
}

#ifndef XSAM_EMU

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

// Only lanes 0..15 supply addresses (matrices 0 and 1).
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_u32(p)));
}

// d += a * b (16x16 by 16x8, f32 accumulators).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 bytes global -> shared, asynchronously. `valid == false` writes 16 zero bytes and reads
// nothing (src must still be a mapped address; callers pass a tensor base pointer).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
                 "l"(gmem), "r"(n)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits for every cp.async this thread issued (other threads' copies need a __syncthreads too).
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}

__device__ __forceinline__ bool warp_any(bool p) { return __any_sync(xsam::FULL_MASK, p); }

// __syncthreads() that also returns whether `p` was true in any thread of the block.
__device__ __forceinline__ bool block_any(bool p) { return __syncthreads_or(p) != 0; }

// 16-byte read-only (non-coherent) global load.
__device__ __forceinline__ uint4 ld_nc_16(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

// Size of the dynamic shared memory this launch got, for a guard against host/device
// disagreement on the layout.
__device__ __forceinline__ uint32_t dynamic_smem_size() {
    uint32_t r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

#else  // XSAM_EMU: the emulator implements the same contracts on the host.

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* p) { xsam_emu::ldsm(r, 4, p, false); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const bf16* p) { xsam_emu::ldsm(r, 4, p, true); }
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const bf16* p) { xsam_emu::ldsm(r, 2, p, true); }
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    xsam_emu::mma_bf16(d, a, b0, b1);
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
    xsam_emu::cp_async_16(smem, gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() { xsam_emu::cp_async_wait_all(); }
__device__ __forceinline__ bool warp_any(bool p) { return xsam_emu::warp_any(p); }
__device__ __forceinline__ bool block_any(bool p) { return xsam_emu::block_any(p); }
__device__ __forceinline__ uint4 ld_nc_16(const void* p) { return xsam_emu::ld_16(p); }
__device__ __forceinline__ uint32_t dynamic_smem_size() { return xsam_emu::dynamic_smem_size(); }

#endif

// Traps when the launch got less dynamic shared memory than the kernel's layout needs (the host
// computes the same size from the same formula; a mismatch is a bug, never a silent overrun).
__device__ __forceinline__ void check_smem(uint32_t need) {
    if (dynamic_smem_size() < need) {
#ifndef XSAM_EMU
        __trap();
#else
        xsam_emu::fail("dynamic shared memory smaller than the kernel layout");
#endif
    }
}

// Combine split-K partials: for output row r (a (query, head) pair) and split s, part_ml holds
// (m, l) = (running max logit, sum of exp(logit - m)) and part_o the unnormalised sum of
// exp(logit - m) * v over the split's keys. Splits that saw no key have l == 0 and are skipped; a
// row with no key at all is written as zeros (the CPU backend's convention).
// Layouts: part_o [splits][rows][hd] f32, part_ml [splits][rows][2] f32,
// out row r = (query r / heads, head r % heads) at out + (r / heads) * out_stride + (r % heads) * hd.
__device__ __forceinline__ void combine_one(const float* __restrict__ part_o,
                                            const float* __restrict__ part_ml,
                                            bf16* __restrict__ out, long long rows, int heads,
                                            int hd, int splits, long long out_stride,
                                            long long idx) {
    const long long r = idx / hd;
    const int d = (int)(idx - r * hd);
    float mx = neg_inf();
    for (int s = 0; s < splits; ++s) {
        const float* ml = part_ml + ((long long)s * rows + r) * 2;
        if (ml[1] > 0.0f) mx = fmaxf(mx, ml[0]);
    }
    float num = 0.0f, den = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float* ml = part_ml + ((long long)s * rows + r) * 2;
        if (ml[1] > 0.0f) {
            const float w = exp2f((ml[0] - mx) * LOG2E);
            num += w * part_o[((long long)s * rows + r) * hd + d];
            den += w * ml[1];
        }
    }
    const long long q = r / heads;
    const int h = (int)(r - q * heads);
    out[q * out_stride + (long long)h * hd + d] = __float2bfloat16_rn(den > 0.0f ? num / den : 0.0f);
}

}  // namespace xsam_attn
