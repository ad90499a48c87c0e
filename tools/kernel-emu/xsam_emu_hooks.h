// A small host-side SIMT emulator for xsam's attention kernels: runs the CUDA source of
// kernels/*.cu as plain C++ (compiled with -DXSAM_EMU), one fiber per CUDA thread, so the kernels'
// indexing, masking, pipelining and fragment bookkeeping can be tested on a machine without a GPU.
//
// What it models:
//   - threads of a CTA as cooperatively scheduled fibers (ucontext); CTAs run one after another;
//   - __syncthreads / __syncthreads_or as CTA barriers, warp collectives (shuffles, ldmatrix, mma,
//     __any_sync) as warp barriers with an exchange area; a deadlock (some threads waiting on a
//     barrier the others never reach) aborts with a message;
//   - ldmatrix (.x2/.x4, .trans) and mma.m16n8k16 bf16 with the fragment layouts of the PTX ISA
//     (the same table as the comment in kernels/attn_common.cuh, implemented independently here:
//     element (row, col) -> (lane, register, half));
//   - cp.async copies deferred to the issuing thread's cp.async.wait_all, so a missing wait or a
//     missing barrier after it reads stale (poisoned) shared memory, as on hardware;
//   - shared memory poisoned with 0xFF (NaN) at CTA start, bounds- and alignment-checked for
//     ldmatrix and cp.async; global reads by cp.async / ld_nc_16 checked against registered
//     allocations.
// What it does not model: timing, memory-model subtleties beyond the above, f32 accumulation
// order inside the tensor cores (it sums in order in f32).
#pragma once

#ifndef XSAM_EMU
#error "xsam_emu_hooks.h is for emulator builds (-DXSAM_EMU)"
#endif

#include <cuda_bf16.h>
#include <vector_functions.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __launch_bounds__(...)

namespace xsam_emu {

struct Dim {
    unsigned x = 1, y = 1, z = 1;
};

[[noreturn]] inline void fail(const char* msg) {
    std::fprintf(stderr, "EMU FAILURE: %s\n", msg);
    std::abort();
}

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    Dim tid;
    bool done = false;
    struct Copy {
        void* dst;
        const void* src;
        bool valid;
    };
    std::vector<Copy> pending;
};

struct WarpState {
    int arrived = 0;
    unsigned gen = 0;
    unsigned char slot[32][64];
};

struct Alloc {
    const char* base;
    size_t bytes;
};

struct State {
    Dim grid, block, block_idx;
    int nt = 0;
    std::vector<unsigned char> smem;
    std::vector<Fiber> fibers;
    int cur = -1;
    ucontext_t main_ctx;
    int block_arrived = 0;
    unsigned block_gen = 0;
    bool or_acc = false, or_result = false;
    std::vector<WarpState> warps;
    unsigned long long progress = 0;
    std::vector<Alloc> allocs;
    std::function<void()> body;
};

inline State& st() {
    static State s;
    return s;
}
inline Fiber& cur() { return st().fibers[st().cur]; }

inline void yield() {
    State& s = st();
    swapcontext(&s.fibers[s.cur].ctx, &s.main_ctx);
}

// ---------------------------------------------------------------- global memory registry

inline void register_alloc(const void* p, size_t bytes) {
    st().allocs.push_back({static_cast<const char*>(p), bytes});
}
inline void clear_allocs() { st().allocs.clear(); }
inline void check_global(const void* p, size_t n, const char* what) {
    const char* c = static_cast<const char*>(p);
    for (const Alloc& a : st().allocs)
        if (c >= a.base && c + n <= a.base + a.bytes) return;
    std::fprintf(stderr, "EMU: %s reads %zu bytes at %p outside every registered allocation\n", what, n, p);
    std::abort();
}

inline unsigned char* dyn_smem() { return st().smem.data(); }
inline uint32_t dynamic_smem_size() { return (uint32_t)st().smem.size(); }

inline void check_smem_range(const void* p, size_t n, size_t align, const char* what) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    const unsigned char* b = st().smem.data();
    if (c < b || c + n > b + st().smem.size()) {
        std::fprintf(stderr, "EMU: %s touches shared memory out of bounds (offset %td, %zu bytes, size %zu)\n", what,
                     c - b, n, st().smem.size());
        std::abort();
    }
    if (((uintptr_t)(c - b)) % align != 0) {
        std::fprintf(stderr, "EMU: %s misaligned shared address (offset %td)\n", what, c - b);
        std::abort();
    }
}

// ---------------------------------------------------------------- barriers

inline void block_barrier() {
    State& s = st();
    const unsigned gen = s.block_gen;
    if (++s.block_arrived == s.nt) {
        s.block_arrived = 0;
        s.or_result = s.or_acc;
        s.or_acc = false;
        ++s.block_gen;
        ++s.progress;
    } else {
        while (s.block_gen == gen) yield();
    }
}

inline bool block_any(bool p) {
    st().or_acc = st().or_acc || p;
    block_barrier();
    return st().or_result;
}

inline int lane_id() { return (int)(cur().tid.x & 31); }
inline WarpState& warp_state() { return st().warps[cur().tid.x >> 5]; }

inline void warp_barrier() {
    State& s = st();
    WarpState& w = warp_state();
    const unsigned gen = w.gen;
    const int members = std::min(32, s.nt - (int)(cur().tid.x & ~31u));
    if (++w.arrived == members) {
        w.arrived = 0;
        ++w.gen;
        ++s.progress;
    } else {
        while (w.gen == gen) yield();
    }
}

// Every lane deposits `n` bytes, then reads all 32 deposits through `f`.
template <class F>
inline void warp_exchange(const void* mine, size_t n, F f) {
    WarpState& w = warp_state();
    std::memcpy(w.slot[lane_id()], mine, n);
    warp_barrier();
    f(w.slot);
    warp_barrier();
}

inline float shfl_xor(float v, int mask) {
    float r = 0;
    const int l = lane_id();
    warp_exchange(&v, 4, [&](unsigned char (*sl)[64]) { std::memcpy(&r, sl[l ^ mask], 4); });
    return r;
}

inline bool warp_any(bool p) {
    bool r = false;
    warp_exchange(&p, 1, [&](unsigned char (*sl)[64]) {
        for (int i = 0; i < 32; ++i) r = r || sl[i][0];
    });
    return r;
}

// ---------------------------------------------------------------- bf16 helpers

inline float bf(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint16_t lo16(uint32_t u) { return (uint16_t)(u & 0xffff); }
inline uint16_t hi16(uint32_t u) { return (uint16_t)(u >> 16); }

// ---------------------------------------------------------------- ldmatrix / mma

// ldmatrix.m8n8.x{n}{.trans}.b16: lanes 8i..8i+7 address the 8 rows (16 bytes each) of matrix i.
// Without .trans, lane l receives row l/4, elements 2(l%4), 2(l%4)+1 of each matrix; with .trans,
// elements (row 2(l%4), col l/4) and (row 2(l%4)+1, col l/4).
inline void ldsm(uint32_t* r, int n, const void* p, bool trans) {
    struct Addr {
        const void* p;
    } a{p};
    const int l = lane_id();
    uint32_t out[4] = {0, 0, 0, 0};
    warp_exchange(&a, sizeof a, [&](unsigned char (*sl)[64]) {
        for (int m = 0; m < n; ++m) {
            uint16_t mat[8][8];
            for (int row = 0; row < 8; ++row) {
                Addr ra;
                std::memcpy(&ra, sl[8 * m + row], sizeof ra);
                check_smem_range(ra.p, 16, 16, "ldmatrix");
                std::memcpy(mat[row], ra.p, 16);
            }
            const int g = l >> 2, c = l & 3;
            uint16_t e0, e1;
            if (!trans) {
                e0 = mat[g][2 * c];
                e1 = mat[g][2 * c + 1];
            } else {
                e0 = mat[2 * c][g];
                e1 = mat[2 * c + 1][g];
            }
            out[m] = (uint32_t)e0 | ((uint32_t)e1 << 16);
        }
    });
    for (int m = 0; m < n; ++m) r[m] = out[m];
}

// mma.m16n8k16.row.col f32.bf16.bf16.f32, built from the element ownership table:
//   A[row][k]: lane = (row % 8) * 4 + (k % 8) / 2, reg = (row / 8) + 2 * (k / 8), half = k % 2
//   B[k][n]:   lane = n * 4 + (k % 8) / 2,         reg = k / 8,                  half = k % 2
//   C[row][n]: lane = (row % 8) * 4 + n / 2,       reg = 2 * (row / 8) + n % 2
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    struct Frag {
        uint32_t a[4];
        uint32_t b[2];
        float c[4];
    } mine{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
    const int l = lane_id();
    float res[4];
    warp_exchange(&mine, sizeof mine, [&](unsigned char (*sl)[64]) {
        auto frag = [&](int lane) {
            Frag f;
            std::memcpy(&f, sl[lane], sizeof f);
            return f;
        };
        auto A = [&](int row, int k) {
            const Frag f = frag((row % 8) * 4 + (k % 8) / 2);
            const uint32_t w = f.a[(row / 8) + 2 * (k / 8)];
            return bf(k % 2 ? hi16(w) : lo16(w));
        };
        auto B = [&](int k, int n) {
            const Frag f = frag(n * 4 + (k % 8) / 2);
            const uint32_t w = f.b[k / 8];
            return bf(k % 2 ? hi16(w) : lo16(w));
        };
        for (int r = 0; r < 4; ++r) {
            // This lane's C/D element r: row (l/4) + 8*(r/2), col 2*(l%4) + r%2.
            const int row = (l >> 2) + 8 * (r >> 1);
            const int n = 2 * (l & 3) + (r & 1);
            float acc = frag(l).c[r];
            for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, n);
            res[r] = acc;
        }
    });
    for (int r = 0; r < 4; ++r) d[r] = res[r];
}

// ---------------------------------------------------------------- cp.async / loads

inline void cp_async_16(void* dst, const void* src, bool valid) {
    check_smem_range(dst, 16, 16, "cp.async destination");
    if (valid) {
        if (((uintptr_t)src) % 16 != 0) fail("cp.async source not 16-byte aligned");
        check_global(src, 16, "cp.async");
    }
    cur().pending.push_back({dst, src, valid});
}

inline void cp_async_wait_all() {
    for (const Fiber::Copy& c : cur().pending) {
        if (c.valid)
            std::memcpy(c.dst, c.src, 16);
        else
            std::memset(c.dst, 0, 16);
    }
    cur().pending.clear();
}

inline uint4 ld_16(const void* p) {
    if (((uintptr_t)p) % 16 != 0) fail("16-byte load not aligned");
    check_global(p, 16, "ld.global.nc.v4");
    uint4 u;
    std::memcpy(&u, p, 16);
    return u;
}

// ---------------------------------------------------------------- launch

inline void fiber_entry() {
    State& s = st();
    s.body();
    if (!cur().pending.empty()) fail("kernel exited with cp.async copies never waited for");
    cur().done = true;
    ++s.progress;
    swapcontext(&cur().ctx, &s.main_ctx);
}

// Runs `body` (the kernel call) on every thread of every CTA of the grid.
inline void launch(Dim grid, Dim block, size_t smem_bytes, std::function<void()> body) {
    State& s = st();
    s.grid = grid;
    s.block = block;
    s.nt = (int)(block.x * block.y * block.z);
    if (block.y != 1 || block.z != 1) fail("emulator supports 1-D blocks only");
    s.body = std::move(body);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                s.block_idx = {bx, by, bz};
                s.smem.assign(smem_bytes, 0xFF);
                s.fibers.assign(s.nt, Fiber());
                s.warps.assign((s.nt + 31) / 32, WarpState());
                s.block_arrived = 0;
                s.or_acc = s.or_result = false;
                for (int t = 0; t < s.nt; ++t) {
                    Fiber& f = s.fibers[t];
                    f.tid = {(unsigned)t, 0, 0};
                    f.stack.resize(256 * 1024);
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, fiber_entry, 0);
                }
                int live = s.nt;
                while (live > 0) {
                    const unsigned long long before = s.progress;
                    for (int t = 0; t < s.nt; ++t) {
                        if (s.fibers[t].done) continue;
                        s.cur = t;
                        swapcontext(&s.main_ctx, &s.fibers[t].ctx);
                    }
                    live = 0;
                    for (const Fiber& f : s.fibers) live += !f.done;
                    if (live > 0 && s.progress == before) {
                        std::fprintf(stderr, "EMU: deadlock in CTA (%u,%u,%u): %d threads wait on barriers never reached\n",
                                     bx, by, bz, live);
                        std::abort();
                    }
                }
                s.cur = -1;
            }
}

}  // namespace xsam_emu

// ---------------------------------------------------------------- CUDA built-ins

#define threadIdx (xsam_emu::cur().tid)
#define blockIdx (xsam_emu::st().block_idx)
#define blockDim (xsam_emu::st().block)
#define gridDim (xsam_emu::st().grid)

inline void __syncthreads() { xsam_emu::block_barrier(); }
inline float __shfl_xor_sync(unsigned, float v, int m) { return xsam_emu::shfl_xor(v, m); }
inline float __int_as_float(int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __uint_as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
