// Runs the attention kernels (kernels/flash_attn.cu, masked_attn.cu, paged_attn.cu) in the SIMT
// emulator (xsam_emu_hooks.h) on small shapes and checks them against a naive double-precision
// reference on the same bf16 inputs. Exit status 0 = every case passed.
//
// Build and run (tools/kernel-emu/run.sh does this):
//   c++ -std=c++17 -O1 -DXSAM_EMU -ffp-contract=off -I tools/kernel-emu -I kernels \
//       -I <cuda>/include tools/kernel-emu/attn_emu.cpp -o attn_emu && ./attn_emu
//
// Tolerances: inputs are bf16 on both sides; the kernel rounds P to bf16 before P·V (relative
// error <= 2^-9 per weight) and the output to bf16 (<= 2^-9 relative), and sums in f32. With |v|
// <= 1 that bounds the error by about 2 * 2^-9 ≈ 4e-3 plus f32 noise; atol 1e-2 + rtol 1e-2
// leaves margin and still fails any indexing or masking error (those are O(0.1) or NaN).
#include "xsam_emu_hooks.h"

#include "flash_attn.cu"
#include "masked_attn.cu"
#include "paged_attn.cu"

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

using bf16 = __nv_bfloat16;
using xsam_attn::FlashParams;
using xsam_emu::Dim;

static int g_failures = 0;

struct Rng {
    uint64_t s;
    uint64_t next() {
        s += 0x9E3779B97F4A7C15ull;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    float uni(float lo, float hi) { return lo + (hi - lo) * (float)((next() >> 40) * (1.0 / (1ull << 24))); }
};

static float f(bf16 b) { return __bfloat162float(b); }

static std::vector<bf16> rand_bf16(size_t n, Rng& r, float lo = -1.0f, float hi = 1.0f) {
    std::vector<bf16> v(n);
    for (auto& x : v) x = __float2bfloat16_rn(r.uni(lo, hi));
    xsam_emu::register_alloc(v.data(), v.size() * sizeof(bf16));
    return v;
}

template <class T>
static void reg(std::vector<T>& v) {
    xsam_emu::register_alloc(v.data(), v.size() * sizeof(T));
}

static std::vector<bf16> poisoned(size_t n) {
    std::vector<bf16> v(n);
    for (auto& x : v) {
        uint16_t nan = 0xFFFF;
        std::memcpy(&x, &nan, 2);
    }
    return v;
}

// Naive attention in double. keep(h, i, j), bias(h, i, j) (added to scale·q·k), rows that see no
// key produce zeros. qv(i, h) / kv(j, h) / vv(j, h) return pointers to hd floats.
struct RefSpec {
    int tq, tk, heads, hd;
    double scale;
    std::function<const float*(int i, int h)> q;
    std::function<const float*(int j, int h)> k;
    std::function<const float*(int j, int h)> v;
    std::function<bool(int h, int i, int j)> keep;
    std::function<double(int h, int i, int j)> bias;
};

static std::vector<double> reference(const RefSpec& s) {
    std::vector<double> out((size_t)s.tq * s.heads * s.hd, 0.0);
    std::vector<double> lg(s.tk);
    for (int i = 0; i < s.tq; ++i)
        for (int h = 0; h < s.heads; ++h) {
            double mx = -INFINITY;
            const float* q = s.q(i, h);
            for (int j = 0; j < s.tk; ++j) {
                if (s.keep && !s.keep(h, i, j)) {
                    lg[j] = -INFINITY;
                    continue;
                }
                const float* k = s.k(j, h);
                double d = 0;
                for (int c = 0; c < s.hd; ++c) d += (double)q[c] * k[c];
                d *= s.scale;
                if (s.bias) d += s.bias(h, i, j);
                lg[j] = d;
                mx = std::max(mx, d);
            }
            if (mx == -INFINITY) continue;
            double den = 0;
            double* o = &out[((size_t)i * s.heads + h) * s.hd];
            for (int j = 0; j < s.tk; ++j) {
                if (lg[j] == -INFINITY) continue;
                const double w = std::exp(lg[j] - mx);
                den += w;
                const float* v = s.v(j, h);
                for (int c = 0; c < s.hd; ++c) o[c] += w * v[c];
            }
            for (int c = 0; c < s.hd; ++c) o[c] /= den;
        }
    return out;
}

// got(i, h, c) vs want[(i*heads + h)*hd + c]; `written(i)` false rows must stay poisoned.
static void compare(const std::string& what, int tq, int heads, int hd, const std::vector<double>& want,
                    std::function<float(int i, int h, int c)> got, double atol = 1e-2, double rtol = 1e-2) {
    double worst = 0;
    long bad = 0;
    for (int i = 0; i < tq; ++i)
        for (int h = 0; h < heads; ++h)
            for (int c = 0; c < hd; ++c) {
                const double w = want[((size_t)i * heads + h) * hd + c];
                const float g = got(i, h, c);
                const double err = std::fabs((double)g - w);
                const double tol = atol + rtol * std::fabs(w);
                if (!(std::isfinite(g) && err <= tol)) {
                    if (bad < 5)
                        std::printf("  %s: (%d, %d, %d) got %g want %g\n", what.c_str(), i, h, c, g, w);
                    ++bad;
                } else {
                    worst = std::max(worst, err / tol);
                }
            }
    std::printf("%-60s %s (max err/tol %.3f%s)\n", what.c_str(), bad ? "FAIL" : "ok", worst,
                bad ? (", " + std::to_string(bad) + " bad").c_str() : "");
    if (bad) ++g_failures;
}

static std::vector<float> to_f(const std::vector<bf16>& v) {
    std::vector<float> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = f(v[i]);
    return r;
}

static FlashParams blank_params() {
    FlashParams p;
    std::memset(&p, 0, sizeof p);
    p.kv_heads = 1;
    p.heads = 1;
    p.win = 1;
    p.qtiles_per_win = 1;
    p.win_cols = 1;
    p.block_size = 1;
    return p;
}

// Runs the combine kernel over split partials into `out`.
static void run_combine(std::vector<float>& po, std::vector<float>& pml, bf16* out, long long rows, int heads, int hd,
                        int splits, long long out_stride) {
    xsam_emu::launch({4, 1, 1}, {64, 1, 1}, 0, [&] {
        attn_combine_splits_bf16(po.data(), pml.data(), out, rows, heads, hd, splits, out_stride);
    });
}

// ------------------------------------------------------------------------------- dense / paged

template <int HD, int BM>
static void dense_case(const char* name, void (*kern)(const FlashParams), size_t smem, int tq, int tk, int heads,
                       int kv_heads, bool causal, int window, int q_offset, int splits, Rng& rng) {
    xsam_emu::clear_allocs();
    const int qs = heads * HD + 8, ks = kv_heads * HD + 16, os = heads * HD + 8;
    auto q = rand_bf16((size_t)tq * qs, rng);
    auto k = rand_bf16((size_t)tk * ks, rng);
    auto v = rand_bf16((size_t)tk * ks, rng);
    auto o = poisoned((size_t)tq * os);
    const auto qf = to_f(q), kf = to_f(k), vf = to_f(v);
    FlashParams p = blank_params();
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.o = o.data();
    p.q_stride = qs;
    p.k_stride = ks;
    p.v_stride = ks;
    p.o_stride = os;
    p.tq = tq;
    p.tk = tk;
    p.heads = heads;
    p.kv_heads = kv_heads;
    p.causal = causal;
    p.window = window;
    p.q_offset = q_offset;
    p.scale = 1.0f / std::sqrt((float)HD);
    std::vector<float> po, pml;
    if (splits > 1) {
        po.assign((size_t)splits * tq * heads * HD, NAN);
        pml.assign((size_t)splits * tq * heads * 2, NAN);
        reg(po);
        reg(pml);
        p.part_o = po.data();
        p.part_ml = pml.data();
    }
    xsam_emu::launch({(unsigned)((tq + BM - 1) / BM), (unsigned)heads, (unsigned)splits}, {128, 1, 1}, smem,
                     [&] { kern(p); });
    if (splits > 1) run_combine(po, pml, o.data(), (long long)tq * heads, heads, HD, splits, os);
    const int group = heads / kv_heads;
    RefSpec s{tq, tk, heads, HD, 1.0 / std::sqrt((double)HD),
              [&](int i, int h) { return &qf[(size_t)i * qs + h * HD]; },
              [&](int j, int h) { return &kf[(size_t)j * ks + (h / group) * HD]; },
              [&](int j, int h) { return &vf[(size_t)j * ks + (h / group) * HD]; },
              nullptr, nullptr};
    if (causal)
        s.keep = [&](int, int i, int j) {
            const int qp = q_offset + i;
            return j <= qp && (window <= 0 || qp - j < window);
        };
    const auto want = reference(s);
    char what[200];
    std::snprintf(what, sizeof what, "%s tq=%d tk=%d h=%d/%d causal=%d win=%d off=%d splits=%d", name, tq, tk, heads,
                  kv_heads, causal, window, q_offset, splits);
    compare(what, tq, heads, HD, want, [&](int i, int h, int c) { return f(o[(size_t)i * os + h * HD + c]); });
}

static void paged_flash_case(int tq, int q_offset, int window, int bs, Rng& rng) {
    constexpr int HD = 96;
    xsam_emu::clear_allocs();
    const int heads = 2, kv_heads = 2, layers = 2, layer = 1;
    const int tk = q_offset + tq;
    const int nblk = (tk + bs - 1) / bs;
    const int pool_blocks = nblk + 3;
    const long long block_elems = (long long)kv_heads * bs * HD;
    auto kp = rand_bf16((size_t)pool_blocks * layers * block_elems, rng);
    auto vp = rand_bf16((size_t)pool_blocks * layers * block_elems, rng);
    // Table: a permutation of pool blocks; blocks wholly before every query's window released.
    std::vector<int> table(nblk);
    for (int b = 0; b < nblk; ++b) table[b] = (b * 5 + 2) % pool_blocks;
    const int first_needed = window > 0 ? std::max(0, q_offset - window + 1) : 0;
    for (int b = 0; b < first_needed / bs; ++b) {
        // Poison the released block: it must never be read.
        for (long long e = 0; e < block_elems; ++e) {
            uint16_t nan = 0xFFFF;
            std::memcpy(&kp[((size_t)table[b] * layers + layer) * block_elems + e], &nan, 2);
            std::memcpy(&vp[((size_t)table[b] * layers + layer) * block_elems + e], &nan, 2);
        }
        table[b] = -1;
    }
    reg(table);
    const int qs = heads * HD;
    auto q = rand_bf16((size_t)tq * qs, rng);
    auto o = poisoned((size_t)tq * qs);
    FlashParams p = blank_params();
    p.q = q.data();
    p.k = kp.data() + layer * block_elems;
    p.v = vp.data() + layer * block_elems;
    p.o = o.data();
    p.block_table = table.data();
    p.q_stride = qs;
    p.o_stride = qs;
    p.block_stride = layers * block_elems;
    p.tq = tq;
    p.tk = tk;
    p.heads = heads;
    p.kv_heads = kv_heads;
    p.causal = 1;
    p.window = window;
    p.q_offset = q_offset;
    p.block_size = bs;
    p.scale = 1.0f / std::sqrt((float)HD);
    using C = xsam_attn::FlashCfg<96, 1, 4, xsam_attn::FLASH_PAGED, 6>;
    xsam_emu::launch({(unsigned)((tq + C::BM - 1) / C::BM), (unsigned)heads, 1}, {128, 1, 1}, C::SMEM,
                     [&] { flash_attn_paged_hd96_bf16(p); });
    const auto qf = to_f(q), kf = to_f(kp), vf = to_f(vp);
    auto row = [&](const std::vector<float>& pool, int j, int h) {
        const int blk = table[j / bs];
        return &pool[((size_t)blk * layers + layer) * block_elems + ((size_t)h * bs + j % bs) * HD];
    };
    RefSpec s{tq, tk, heads, HD, 1.0 / std::sqrt((double)HD), [&](int i, int h) { return &qf[(size_t)i * qs + h * HD]; },
              [&](int j, int h) { return row(kf, j, h); }, [&](int j, int h) { return row(vf, j, h); },
              [&](int, int i, int j) {
                  const int qp = q_offset + i;
                  return j <= qp && (window <= 0 || qp - j < window);
              },
              nullptr};
    const auto want = reference(s);
    char what[200];
    std::snprintf(what, sizeof what, "flash_attn_paged_hd96 tq=%d off=%d win=%d bs=%d", tq, q_offset, window, bs);
    compare(what, tq, heads, HD, want, [&](int i, int h, int c) { return f(o[(size_t)i * qs + h * HD + c]); });
}

// ------------------------------------------------------------------------------- SAM

template <int MT, int LOG_KW>
static void sam_case(const char* name, void (*kern)(const FlashParams), int H, int W, int K, int heads, Rng& rng) {
    constexpr int HD = 64;
    using C = xsam_attn::FlashCfg<HD, MT, 4, xsam_attn::FLASH_SAM, LOG_KW>;
    xsam_emu::clear_allocs();
    const int Cw = heads * HD;
    auto qkv = rand_bf16((size_t)H * W * 3 * Cw, rng);
    auto bias = rand_bf16((size_t)3 * Cw, rng);
    auto rh = rand_bf16((size_t)(2 * K - 1) * HD, rng, -0.5f, 0.5f);
    auto rw = rand_bf16((size_t)(2 * K - 1) * HD, rng, -0.5f, 0.5f);
    auto o = poisoned((size_t)H * W * Cw);
    const int wr = (H + K - 1) / K, wc = (W + K - 1) / K;
    FlashParams p = blank_params();
    p.q = qkv.data();
    p.k = qkv.data() + Cw;
    p.v = qkv.data() + 2 * Cw;
    p.o = o.data();
    p.rel_h = rh.data();
    p.rel_w = rw.data();
    p.pad_k = bias.data() + Cw;
    p.pad_v = bias.data() + 2 * Cw;
    p.q_stride = p.k_stride = p.v_stride = 3 * Cw;
    p.o_stride = Cw;
    p.heads = p.kv_heads = heads;
    p.scale = 0.125f;
    p.grid_h = H;
    p.grid_w = W;
    p.win = K;
    p.win_cols = wc;
    p.qtiles_per_win = (K * K + C::BM - 1) / C::BM;
    p.tq = H * W;
    p.tk = K * K;
    xsam_emu::launch({(unsigned)(wr * wc * p.qtiles_per_win), (unsigned)heads, 1}, {128, 1, 1}, C::SMEM,
                     [&] { kern(p); });

    // Reference: per window, the padded partition of the reference model.
    const auto qkvf = to_f(qkv), biasf = to_f(bias), rhf = to_f(rh), rwf = to_f(rw);
    std::vector<double> want((size_t)H * W * heads * HD, 0.0);
    std::vector<float> qw((size_t)K * K * 3 * Cw);
    for (int wy = 0; wy < wr; ++wy)
        for (int wx = 0; wx < wc; ++wx) {
            for (int t = 0; t < K * K; ++t) {
                const int y = wy * K + t / K, x = wx * K + t % K;
                const float* src = (y < H && x < W) ? &qkvf[((size_t)y * W + x) * 3 * Cw] : biasf.data();
                std::memcpy(&qw[(size_t)t * 3 * Cw], src, 3 * Cw * sizeof(float));
            }
            RefSpec s{K * K, K * K, heads, HD, 0.125, [&](int i, int h) { return &qw[(size_t)i * 3 * Cw + h * HD]; },
                      [&](int j, int h) { return &qw[(size_t)j * 3 * Cw + Cw + h * HD]; },
                      [&](int j, int h) { return &qw[(size_t)j * 3 * Cw + 2 * Cw + h * HD]; }, nullptr,
                      [&](int h, int i, int j) {
                          const float* q = &qw[(size_t)i * 3 * Cw + h * HD];
                          const float* a = &rhf[(size_t)(i / K - j / K + K - 1) * HD];
                          const float* b = &rwf[(size_t)(i % K - j % K + K - 1) * HD];
                          double d = 0;
                          for (int c = 0; c < HD; ++c) d += (double)q[c] * a[c] + (double)q[c] * b[c];
                          return d;
                      }};
            const auto r = reference(s);
            for (int t = 0; t < K * K; ++t) {
                const int y = wy * K + t / K, x = wx * K + t % K;
                if (y >= H || x >= W) continue;
                std::memcpy(&want[((size_t)y * W + x) * heads * HD], &r[(size_t)t * heads * HD],
                            heads * HD * sizeof(double));
            }
        }
    char what[200];
    std::snprintf(what, sizeof what, "%s grid=%dx%d K=%d heads=%d", name, H, W, K, heads);
    compare(what, H * W, heads, HD, want, [&](int i, int h, int c) { return f(o[(size_t)i * Cw + h * HD + c]); });
}

// ------------------------------------------------------------------------------- masked

static bool keep_host(const std::vector<bf16>& lg, int q, int hs, int ws, int ht, int wt, int key) {
    auto taps = [](int in, int out, int o, int& i0, int& i1, float& w0, float& w1) {
        if (in == out) {
            i0 = i1 = o;
            w0 = 1;
            w1 = 0;
            return;
        }
        const float scale = (float)in / (float)out;
        float src = scale * ((float)o + 0.5f) - 0.5f;
        if (src < 0) src = 0;
        i0 = std::min((int)std::floor(src), in - 1);
        const float l1 = std::min(std::max(src - (float)i0, 0.0f), 1.0f);
        i1 = i0 < in - 1 ? i0 + 1 : i0;
        w0 = 1.0f - l1;
        w1 = l1;
    };
    const int y = key / wt, x = key % wt;
    int y0, y1, x0, x1;
    float wy0, wy1, wx0, wx1;
    taps(hs, ht, y, y0, y1, wy0, wy1);
    taps(ws, wt, x, x0, x1, wx0, wx1);
    const bf16* img = &lg[(size_t)q * hs * ws];
    auto L = [&](int yy, int xx) { return f(img[(size_t)yy * ws + xx]); };
    const float t0 = L(y0, x0) * wx0 + L(y0, x1) * wx1;
    const float t1 = L(y1, x0) * wx0 + L(y1, x1) * wx1;
    const float v = t0 * wy0 + t1 * wy1;
    const float sig = 1.0f / (1.0f + std::exp(-v));
    return !(sig < 0.5f);
}

static void masked_case(int nq, int hs, int ws, int ht, int wt, int splits, Rng& rng) {
    constexpr int HD = 32;
    using C = xsam_attn::FlashCfg<32, 2, 4, xsam_attn::FLASH_BITS, 6>;
    xsam_emu::clear_allocs();
    const int heads = 8, width = heads * HD;
    const int tk = ht * wt;
    const int words = 2 * ((tk + 63) / 64);
    auto lg = rand_bf16((size_t)nq * hs * ws, rng, -3.0f, 2.0f);
    // Row 1: blocked everywhere (must be unblocked); row 2: everything kept.
    for (int e = 0; e < hs * ws; ++e) {
        lg[(size_t)1 * hs * ws + e] = __float2bfloat16_rn(-0.5f - 0.01f * (e % 7));
        lg[(size_t)2 * hs * ws + e] = __float2bfloat16_rn(0.25f);
    }
    std::vector<uint32_t> bits((size_t)nq * words, 0xDEADBEEFu);
    reg(bits);
    xsam_emu::launch({(unsigned)nq, 1, 1}, {64, 1, 1}, 0,
                     [&] { attn_mask_from_logits_bf16(lg.data(), bits.data(), hs, ws, ht, wt, words); });
    // Check the bits.
    long bad = 0;
    for (int qq = 0; qq < nq; ++qq) {
        bool any = false;
        for (int j = 0; j < tk; ++j) any = any || keep_host(lg, qq, hs, ws, ht, wt, j);
        for (int j = 0; j < words * 32; ++j) {
            const bool want = j < tk && (!any || keep_host(lg, qq, hs, ws, ht, wt, j));
            const bool got = (bits[(size_t)qq * words + j / 32] >> (j % 32)) & 1u;
            bad += want != got;
        }
    }
    std::printf("%-60s %s\n", ("attn_mask_from_logits_bf16 " + std::to_string(hs) + "^2 -> " + std::to_string(ht) + "x" +
                               std::to_string(wt))
                                  .c_str(),
                bad ? "FAIL" : "ok");
    if (bad) ++g_failures;

    auto q = rand_bf16((size_t)nq * width, rng);
    auto k = rand_bf16((size_t)tk * width, rng);
    auto v = rand_bf16((size_t)tk * width, rng);
    auto o = poisoned((size_t)nq * width);
    FlashParams p = blank_params();
    p.q = q.data();
    p.k = k.data();
    p.v = v.data();
    p.o = o.data();
    p.mask = bits.data();
    p.mask_words = words;
    p.q_stride = p.k_stride = p.v_stride = p.o_stride = width;
    p.tq = nq;
    p.tk = tk;
    p.heads = p.kv_heads = heads;
    p.scale = 1.0f / std::sqrt(32.0f);
    std::vector<float> po((size_t)splits * nq * heads * HD, NAN), pml((size_t)splits * nq * heads * 2, NAN);
    reg(po);
    reg(pml);
    p.part_o = po.data();
    p.part_ml = pml.data();
    xsam_emu::launch({(unsigned)((nq + C::BM - 1) / C::BM), (unsigned)heads, (unsigned)splits}, {128, 1, 1}, C::SMEM,
                     [&] { masked_attn_hd32_bf16(p); });
    if (splits > 1) run_combine(po, pml, o.data(), (long long)nq * heads, heads, HD, splits, width);
    const auto qf = to_f(q), kf = to_f(k), vf = to_f(v);
    RefSpec s{nq, tk, heads, HD, 1.0 / std::sqrt(32.0), [&](int i, int h) { return &qf[(size_t)i * width + h * HD]; },
              [&](int j, int h) { return &kf[(size_t)j * width + h * HD]; },
              [&](int j, int h) { return &vf[(size_t)j * width + h * HD]; },
              [&](int, int i, int j) { return ((bits[(size_t)i * words + j / 32] >> (j % 32)) & 1u) != 0; }, nullptr};
    const auto want = reference(s);
    char what[200];
    std::snprintf(what, sizeof what, "masked_attn_hd32 nq=%d tk=%d splits=%d", nq, tk, splits);
    compare(what, nq, heads, HD, want, [&](int i, int h, int c) { return f(o[(size_t)i * width + h * HD + c]); });
}

// ------------------------------------------------------------------------------- decode / append

template <int HD>
static void decode_case(void (*kern)(const xsam_paged::PagedDecodeParams), int nq, int pos0, int window, int bs,
                        int split_len, int heads, int kv_heads, Rng& rng) {
    xsam_emu::clear_allocs();
    const int layers = 3, layer = 2;
    const int len = pos0 + nq;
    const int nblk = (len + bs - 1) / bs;
    const int pool_blocks = nblk + 2;
    const long long be = (long long)kv_heads * bs * HD;
    auto kp = rand_bf16((size_t)pool_blocks * layers * be, rng);
    auto vp = rand_bf16((size_t)pool_blocks * layers * be, rng);
    std::vector<int> table(nblk);
    for (int b = 0; b < nblk; ++b) table[b] = (b * 3 + 1) % pool_blocks;
    const int first_needed = window > 0 ? std::max(0, pos0 - window + 1) : 0;
    for (int b = 0; b < first_needed / bs; ++b) table[b] = -1;
    reg(table);
    const int qs = heads * HD + 8;
    auto q = rand_bf16((size_t)nq * qs, rng);
    auto o = poisoned((size_t)nq * qs);
    const int lo_min = window > 0 ? std::max(0, pos0 - window + 1) : 0;
    const int range = len - lo_min;
    const int splits = (range + split_len - 1) / split_len;
    std::vector<float> po((size_t)splits * nq * heads * HD, NAN), pml((size_t)splits * nq * heads * 2, NAN);
    reg(po);
    reg(pml);
    xsam_paged::PagedDecodeParams p;
    std::memset(&p, 0, sizeof p);
    p.q = q.data();
    p.k_pool = kp.data() + layer * be;
    p.v_pool = vp.data() + layer * be;
    p.block_table = table.data();
    p.o = o.data();
    p.part_o = po.data();
    p.part_ml = pml.data();
    p.q_stride = qs;
    p.o_stride = qs;
    p.block_stride = layers * be;
    p.nq = nq;
    p.heads = heads;
    p.kv_heads = kv_heads;
    p.block_size = bs;
    p.pos0 = pos0;
    p.window = window;
    p.split_len = split_len;
    p.scale = 1.0f / std::sqrt((float)HD);
    const int nw = xsam_paged::DECODE_WARPS;
    xsam_emu::launch({(unsigned)heads, (unsigned)splits, (unsigned)nq}, {(unsigned)(32 * nw), 1, 1},
                     nw * (HD + 2) * 4, [&] { kern(p); });
    if (splits > 1) run_combine(po, pml, o.data(), (long long)nq * heads, heads, HD, splits, qs);
    const auto qf = to_f(q), kf = to_f(kp), vf = to_f(vp);
    const int group = heads / kv_heads;
    auto row = [&](const std::vector<float>& pool, int j, int h) {
        return &pool[((size_t)table[j / bs] * layers + layer) * be + ((size_t)(h / group) * bs + j % bs) * HD];
    };
    RefSpec s{nq, len, heads, HD, 1.0 / std::sqrt((double)HD),
              [&](int i, int h) { return &qf[(size_t)i * qs + h * HD]; }, [&](int j, int h) { return row(kf, j, h); },
              [&](int j, int h) { return row(vf, j, h); },
              [&](int, int i, int j) {
                  const int qp = pos0 + i;
                  return j <= qp && (window <= 0 || qp - j < window);
              },
              nullptr};
    const auto want = reference(s);
    char what[200];
    std::snprintf(what, sizeof what, "paged_decode_hd%d nq=%d pos0=%d win=%d bs=%d splits=%d h=%d/%d", HD, nq, pos0,
                  window, bs, splits, heads, kv_heads);
    // Decode keeps P in f32 (no bf16 rounding of the weights): only the output rounding remains.
    compare(what, nq, heads, HD, want, [&](int i, int h, int c) { return f(o[(size_t)i * qs + h * HD + c]); }, 5e-3,
            5e-3);
}

static void append_case(Rng& rng) {
    xsam_emu::clear_allocs();
    const int hd = 96, kvh = 2, bs = 16, layers = 2, nblocks = 4, T = 6;
    const long long be = (long long)kvh * bs * hd;
    std::vector<bf16> kp((size_t)nblocks * layers * be, __float2bfloat16_rn(7.0f));
    std::vector<bf16> vp = kp;
    reg(kp);
    reg(vp);
    const int ks = kvh * hd * 3;  // rows straight out of a fused qkv projection
    auto k = rand_bf16((size_t)T * ks, rng);
    auto v = rand_bf16((size_t)T * ks, rng);
    std::vector<int> slots = {3, 17, 18, -1, 63, 0};
    reg(slots);
    const int layer = 1;
    xsam_emu::launch({3, 1, 1}, {64, 1, 1}, 0, [&] {
        paged_kv_append_bf16(k.data(), v.data() + 5 * 8, ks, ks, slots.data(), kp.data() + layer * be,
                             vp.data() + layer * be, layers * be, bs, kvh, hd, T);
    });
    long bad = 0;
    for (int b = 0; b < nblocks; ++b)
        for (int l = 0; l < layers; ++l)
            for (int h = 0; h < kvh; ++h)
                for (int s = 0; s < bs; ++s)
                    for (int d = 0; d < hd; ++d) {
                        const size_t at = ((size_t)b * layers + l) * be + ((size_t)h * bs + s) * hd + d;
                        float wk = 7.0f, wv = 7.0f;
                        for (int t = 0; t < T; ++t)
                            if (l == layer && slots[t] == b * bs + s) {
                                wk = f(k[(size_t)t * ks + h * hd + d]);
                                wv = f(v[(size_t)t * ks + 5 * 8 + h * hd + d]);
                            }
                        bad += f(kp[at]) != wk || f(vp[at]) != wv;
                    }
    std::printf("%-60s %s\n", "paged_kv_append_bf16", bad ? "FAIL" : "ok");
    if (bad) ++g_failures;
}

int main(int argc, char** argv) {
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    Rng rng{42};
    using namespace xsam_attn;
    // Dense: ragged lengths, GQA, causal with offsets and windows, split-K.
    dense_case<64, 128>("flash_attn_hd64", flash_attn_hd64_bf16, FlashCfg<64, 2, 4, FLASH_DENSE, 6>::SMEM, 130, 70, 2,
                        1, false, 0, 0, 1, rng);
    dense_case<64, 128>("flash_attn_hd64", flash_attn_hd64_bf16, FlashCfg<64, 2, 4, FLASH_DENSE, 6>::SMEM, 40, 200, 2,
                        2, false, 0, 0, 3, rng);
    dense_case<72, 64>("flash_attn_hd72", flash_attn_hd72_bf16, FlashCfg<72, 1, 4, FLASH_DENSE, 6>::SMEM, 65, 100, 2,
                       2, false, 0, 0, 1, rng);
    dense_case<96, 64>("flash_attn_hd96", flash_attn_hd96_bf16, FlashCfg<96, 1, 4, FLASH_DENSE, 6>::SMEM, 150, 150, 2,
                       2, true, 0, 0, 1, rng);
    dense_case<96, 64>("flash_attn_hd96", flash_attn_hd96_bf16, FlashCfg<96, 1, 4, FLASH_DENSE, 6>::SMEM, 150, 150, 1,
                       1, true, 37, 0, 1, rng);
    dense_case<96, 64>("flash_attn_hd96", flash_attn_hd96_bf16, FlashCfg<96, 1, 4, FLASH_DENSE, 6>::SMEM, 20, 90, 2,
                       1, true, 50, 70, 2, rng);
    paged_flash_case(30, 45, 0, 16, rng);
    paged_flash_case(21, 70, 40, 16, rng);
    paged_flash_case(9, 13, 0, 8, rng);
    // SAM: windows with padding (20 = 14 + 6), a grid smaller than a window, global attention.
    sam_case<1, 4>("sam_attn_window", sam_attn_window_bf16, 20, 17, 14, 2, rng);
    sam_case<1, 4>("sam_attn_window", sam_attn_window_bf16, 9, 9, 14, 1, rng);
    sam_case<2, 6>("sam_attn_global", sam_attn_global_bf16, 20, 20, 20, 1, rng);
    sam_case<1, 6>("sam_attn_global_bm64", sam_attn_global_bm64_bf16, 13, 13, 13, 2, rng);
    if (!quick) sam_case<2, 6>("sam_attn_global", sam_attn_global_bf16, 64, 64, 64, 1, rng);
    // Masked cross-attention: downsampled, identity and upsampled mask sizes.
    masked_case(130, 12, 12, 9, 9, 1, rng);
    masked_case(40, 10, 10, 10, 10, 3, rng);
    masked_case(20, 8, 8, 19, 13, 2, rng);
    // Decode: partial blocks, window crossing, GQA, several splits.
    decode_case<96>(paged_decode_hd96_bf16, 1, 40, 0, 16, 512, 4, 4, rng);
    decode_case<96>(paged_decode_hd96_bf16, 3, 77, 30, 16, 16, 4, 2, rng);
    decode_case<64>(paged_decode_hd64_bf16, 2, 150, 0, 16, 48, 2, 2, rng);
    decode_case<128>(paged_decode_hd128_bf16, 1, 5, 0, 4, 512, 2, 1, rng);
    append_case(rng);
    std::printf("%s: %d failing case(s)\n", g_failures ? "FAILED" : "PASSED", g_failures);
    return g_failures ? 1 : 0;
}
