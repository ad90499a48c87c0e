//! Every op family of the CPU backend (src/backend/cpu, the paged attention of src/kv, the region
//! sampler) alone, at the shapes the released model runs them at. Random inputs.
//!
//! Rates: products, attention and convolutions set `Throughput::Elements` to their FLOP count
//! (2 per multiply-add), so criterion's "elem/s" reads as FLOP/s; memory-bound ops set
//! `Throughput::Bytes` to the f32 bytes read + written once. Where the real shape would take
//! more than ~0.3 s per iteration on a 2-core machine the shape is reduced, and the name says so
//! (`reduced_...`).
//!
//! Run: `cargo bench --bench cpu_ops` (10 samples each, ~2 s per op: a few minutes in all), or
//! one family: `cargo bench --bench cpu_ops -- attention`.

use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use half::bf16;
use std::hint::black_box;
use std::time::Duration;
use xsam::backend::cpu::{self, AttnMask, SamAttnGeom, WeightRef};
use xsam::kv::attention::paged_attention;
use xsam::kv::{KvConfig, PagedKvCache};
use xsam::model::region::RegionSampler;
use xsam::Tensor;

/// Deterministic values in [-0.5, 0.5).
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

fn group<'a>(c: &'a mut Criterion, name: &str) -> Group<'a> {
    let mut g = c.benchmark_group(name);
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

/// FLOPs as criterion elements.
fn flops(g: &mut Group, f: usize) {
    g.throughput(Throughput::Elements(f as u64));
}

/// f32 bytes read + written.
fn bytes(g: &mut Group, elems_read: usize, elems_written: usize) {
    g.throughput(Throughput::Bytes(4 * (elems_read + elems_written) as u64));
}

/// `linear` with bf16 weights (widened per panel) at the model's products, and the f32
/// matrix products of activations (single and batched).
fn products(c: &mut Criterion) {
    let mut g = group(c, "cpu_ops/linear_bf16");
    // (name, m, k, n)
    let shapes = [
        ("sam_qkv_4096x1024x3072", 4096, 1024, 3072),
        ("siglip_fc1_729x1152x4304", 729, 1152, 4304),
        ("phi3_prefill256_gate_up_256x3072x16384", 256, 3072, 16384),
        ("phi3_decode_qkv_1x3072x9216", 1, 3072, 9216),
        ("phi3_decode_down_1x8192x3072", 1, 8192, 3072),
    ];
    for (name, m, k, n) in shapes {
        let x = data(m * k, 1);
        let w = bf16s(&data(n * k, 2));
        let bias = data(n, 3);
        let mut out = vec![0f32; m * n];
        if m == 1 {
            // one row: bound by reading the bf16 weights
            g.throughput(Throughput::Bytes((2 * n * k) as u64));
        } else {
            flops(&mut g, 2 * m * k * n);
        }
        g.bench_function(name, |b| {
            b.iter(|| {
                cpu::linear(&x, m, k, WeightRef::BF16(&w), n, Some(&bias), &mut out).unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();

    let mut g = group(c, "cpu_ops/matmul");
    // mask decoder: query embeddings [200, 256] · mask features [256, 128²]
    let (m, k, n) = (200, 256, 128 * 128);
    let a = data(m * k, 4);
    let bm = data(k * n, 5);
    let mut out = vec![0f32; m * n];
    flops(&mut g, 2 * m * k * n);
    g.bench_function("mask_logits_200x256x16384", |b| {
        b.iter(|| {
            cpu::matmul(&a, &bm, &mut out, m, k, n, false).unwrap();
            black_box(&out);
        })
    });
    // batched: SigLIP-sized per-head logits, 16 heads × [729, 72] · [729, 72]ᵀ
    let (batch, m, k, n) = (16, 729, 72, 729);
    let a = data(batch * m * k, 6);
    let bm = data(batch * n * k, 7);
    let mut out = vec![0f32; batch * m * n];
    flops(&mut g, 2 * batch * m * k * n);
    g.bench_function("batched_16x729x72x729_bt", |b| {
        b.iter(|| {
            cpu::batched_matmul(&a, &bm, &mut out, batch, m, k, n, true).unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

/// Dense attention (the blocked online-softmax kernel): SigLIP full, Phi-3 causal prefill,
/// Phi-3 with the sliding window binding, and Mask2Former's masked cross-attention.
fn dense_attention(c: &mut Criterion) {
    let mut g = group(c, "cpu_ops/attention");
    // (name, tq, tk, heads, head_dim, mask kind)
    struct Case {
        name: &'static str,
        tq: usize,
        tk: usize,
        heads: usize,
        hd: usize,
        causal: Option<(Option<usize>, usize)>,
        keep: bool,
    }
    let cases = [
        Case {
            name: "siglip_729tok_16x72",
            tq: 729,
            tk: 729,
            heads: 16,
            hd: 72,
            causal: None,
            keep: false,
        },
        Case {
            name: "phi3_causal_1024tok_32x96",
            tq: 1024,
            tk: 1024,
            heads: 32,
            hd: 96,
            causal: Some((Some(2047), 0)),
            keep: false,
        },
        // a 256-token chunk at positions 2048..2304: the 2047-token window cuts the keys
        Case {
            name: "phi3_windowed_256q_at2048_32x96",
            tq: 256,
            tk: 2304,
            heads: 32,
            hd: 96,
            causal: Some((Some(2047), 2048)),
            keep: false,
        },
        // 200 queries over the 128² level, about half of each query's keys masked off
        Case {
            name: "mask2former_masked_200q_16384k_8x32",
            tq: 200,
            tk: 128 * 128,
            heads: 8,
            hd: 32,
            causal: None,
            keep: true,
        },
    ];
    for cs in cases {
        let w = cs.heads * cs.hd;
        let q = data(cs.tq * w, 10);
        let k = data(cs.tk * w, 11);
        let v = data(cs.tk * w, 12);
        let keep: Vec<bool> = (0..cs.tq * cs.tk).map(|i| (i / 97) % 2 == 0).collect();
        let mut out = vec![0f32; cs.tq * w];
        // all (query, key) pairs; the causal cases compute about half of them
        let pairs = match cs.causal {
            Some((_, 0)) => cs.tq * (cs.tq + 1) / 2,
            Some((Some(win), _)) => cs.tq * win,
            _ => cs.tq * cs.tk,
        };
        flops(&mut g, 4 * pairs * w);
        let scale = 1.0 / (cs.hd as f32).sqrt();
        g.bench_function(cs.name, |b| {
            b.iter(|| {
                let mask = if cs.keep {
                    AttnMask::Keep(&keep)
                } else if let Some((window, q_offset)) = cs.causal {
                    AttnMask::Causal { window, q_offset }
                } else {
                    AttnMask::None
                };
                cpu::attention(
                    &q, &k, &v, cs.tq, cs.tk, cs.heads, cs.hd, cs.hd, scale, mask, None, &mut out,
                )
                .unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();

    // Paged decode attention: one Phi-3 query over 1024 cached tokens of one layer.
    let mut g = group(c, "cpu_ops/paged_attention");
    let (heads, hd, ctx) = (32usize, 96usize, 1024usize);
    let kv_dim = heads * hd;
    let mut kv = PagedKvCache::new(KvConfig {
        num_layers: 1,
        kv_dim,
        block_size: 16,
        num_blocks: ctx / 16 + 2,
    })
    .unwrap();
    let s = kv.new_sequence();
    kv.append(s, ctx + 1).unwrap();
    kv.write_rows(
        s,
        0,
        0,
        &data((ctx + 1) * kv_dim, 13),
        &data((ctx + 1) * kv_dim, 14),
    )
    .unwrap();
    let q = data(kv_dim, 15);
    let mut out = vec![0f32; kv_dim];
    // bound by reading K and V
    bytes(&mut g, 2 * (ctx + 1) * kv_dim, kv_dim);
    g.bench_function("phi3_decode_ctx1024_32x96", |b| {
        b.iter(|| {
            paged_attention(
                &kv,
                s,
                0,
                &q,
                ctx,
                heads,
                hd,
                1.0 / (hd as f32).sqrt(),
                Some(2047),
                &mut out,
            )
            .unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

/// SAM's fused attention (window partition + decomposed rel-pos): a windowed block at the real
/// geometry (64² grid, window 14 padded to 70), and a global block.
fn sam_attention(c: &mut Criterion) {
    let mut g = group(c, "cpu_ops/sam_attention");
    let (heads, dim) = (16usize, 1024usize);
    // (name, grid side, window); the global block is reduced to a 32² grid (a quarter of the
    // tokens, 1/16 of the real 64² block's logits) to stay well under a second per iteration
    for (name, side, window) in [
        ("windowed_64x64_w14_16x64", 64usize, Some(14usize)),
        ("reduced_global_32x32_16x64", 32, None),
    ] {
        let geom = SamAttnGeom {
            grid_h: side,
            grid_w: side,
            heads,
            dim,
            window,
        };
        let tokens = side * side;
        let (rh, rw) = geom.rel_rows();
        let hd = geom.head_dim();
        let qkv = data(tokens * 3 * dim, 20);
        let bias = data(3 * dim, 21);
        let rel_h = data(rh * hd, 22);
        let rel_w = data(rw * hd, 23);
        let mut out = vec![0f32; tokens * dim];
        // each real query sees its (padded) window's keys, or every token; padded queries are
        // cropped, never computed
        let keys = match window {
            Some(w) => w * w,
            None => tokens,
        };
        flops(&mut g, 4 * tokens * keys * dim);
        g.bench_function(name, |b| {
            b.iter(|| {
                cpu::sam_attention(&qkv, Some(&bias), &rel_h, &rel_w, geom, &mut out).unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();
}

/// Normalisations, softmax, activations, rope: memory-bound sweeps.
fn elementwise(c: &mut Criterion) {
    let mut g = group(c, "cpu_ops/norm");
    let (rows, cols) = (4096, 1024);
    let x = data(rows * cols, 30);
    let w = data(cols, 31);
    let bvec = data(cols, 32);
    let mut out = vec![0f32; rows * cols];
    bytes(&mut g, rows * cols, rows * cols);
    g.bench_function("layer_norm_sam_4096x1024", |b| {
        b.iter(|| {
            cpu::layer_norm(&x, Some(&w), Some(&bvec), cols, 1e-6, &mut out).unwrap();
            black_box(&out);
        })
    });
    let (rows, cols) = (256, 3072);
    let x = data(rows * cols, 33);
    let w = data(cols, 34);
    let mut out = vec![0f32; rows * cols];
    bytes(&mut g, rows * cols, rows * cols);
    g.bench_function("rms_norm_phi3_256x3072", |b| {
        b.iter(|| {
            cpu::rms_norm(&x, &w, cols, 1e-5, &mut out).unwrap();
            black_box(&out);
        })
    });
    // SAM neck LayerNorm2d: [256, 64²] channels first
    let (ch, hw) = (256, 64 * 64);
    let x = data(ch * hw, 35);
    let w = data(ch, 36);
    let bvec = data(ch, 37);
    let mut out = vec![0f32; ch * hw];
    bytes(&mut g, ch * hw, ch * hw);
    g.bench_function("layer_norm_2d_256x64x64", |b| {
        b.iter(|| {
            cpu::layer_norm_channels_first(&x, &w, &bvec, ch, hw, 1e-6, &mut out).unwrap();
            black_box(&out);
        })
    });
    // pixel decoder GroupNorm(32) on the 128² level
    let (ch, hw) = (256, 128 * 128);
    let x = data(ch * hw, 38);
    let w = data(ch, 39);
    let bvec = data(ch, 40);
    let mut out = vec![0f32; ch * hw];
    bytes(&mut g, ch * hw, ch * hw);
    g.bench_function("group_norm_32g_256x128x128", |b| {
        b.iter(|| {
            cpu::group_norm(&x, &w, &bvec, ch, hw, 32, 1e-5, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();

    let mut g = group(c, "cpu_ops/activation");
    // SigLIP logits: 16 heads × 729 rows of 729
    let (rows, cols) = (16 * 729, 729);
    let src = data(rows * cols, 41);
    let mut x = src.clone();
    bytes(&mut g, rows * cols, rows * cols);
    g.bench_function("softmax_16x729x729", |b| {
        b.iter(|| {
            x.copy_from_slice(&src);
            cpu::softmax_rows(&mut x, cols).unwrap();
            black_box(&x);
        })
    });
    // SigLIP MLP hidden (tanh GELU), SAM MLP hidden (erf GELU), a ReLU of the decoder FFN
    type InPlace = fn(&mut [f32]);
    let cases: [(&str, usize, InPlace); 3] = [
        ("gelu_tanh_siglip_729x4304", 729 * 4304, cpu::gelu_tanh),
        ("gelu_erf_sam_4096x4096", 4096 * 4096, cpu::gelu_erf),
        ("relu_decoder_200x2048", 200 * 2048, cpu::relu),
    ];
    for (name, n, f) in cases {
        let src = data(n, 42);
        let mut x = src.clone();
        bytes(&mut g, n, n);
        g.bench_function(name, |b| {
            b.iter(|| {
                x.copy_from_slice(&src);
                f(&mut x);
                black_box(&x);
            })
        });
    }
    // Phi-3 MLP: silu(gate) · up over [256, 2·8192] → [256, 8192]
    let (rows, inter) = (256, 8192);
    let gu = data(rows * 2 * inter, 43);
    let mut out = vec![0f32; rows * inter];
    bytes(&mut g, rows * 2 * inter, rows * inter);
    g.bench_function("silu_gate_phi3_256x8192", |b| {
        b.iter(|| {
            cpu::silu_gate(&gu, rows, inter, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();

    let mut g = group(c, "cpu_ops/rope");
    let (tokens, heads, hd) = (256, 32, 96);
    let src = data(tokens * heads * hd, 44);
    let mut x = src.clone();
    let pos: Vec<usize> = (0..tokens).collect();
    bytes(&mut g, tokens * heads * hd, tokens * heads * hd);
    g.bench_function("phi3_256tok_32x96", |b| {
        b.iter(|| {
            x.copy_from_slice(&src);
            cpu::rope(&mut x, tokens, heads, hd, &pos, 10000.0).unwrap();
            black_box(&x);
        })
    });
    g.finish();

    let mut g = group(c, "cpu_ops/elementwise");
    let n = 4096 * 1024;
    let a = data(n, 45);
    let bb = data(n, 46);
    let mut out = vec![0f32; n];
    bytes(&mut g, 2 * n, n);
    g.bench_function("add_residual_4096x1024", |b| {
        b.iter(|| {
            cpu::add(&a, &bb, &mut out).unwrap();
            black_box(&out);
        })
    });
    let (rows, cols) = (1024, 4096);
    bytes(&mut g, rows * cols, rows * cols);
    g.bench_function("transpose_1024x4096", |b| {
        b.iter(|| {
            cpu::transpose2d(&a, rows, cols, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

/// Convolutions, resampling, deformable attention, pixel shuffles, region pooling, gather.
fn vision(c: &mut Criterion) {
    let mut g = group(c, "cpu_ops/conv2d");
    // (name, cin, side, cout, k, stride, pad)
    let convs = [
        (
            "sam_patch_embed_3x1024_to_1024_k16s16",
            3,
            1024,
            1024,
            16,
            16,
            0,
        ),
        ("sam_neck_3x3_256x64", 256, 64, 256, 3, 1, 1),
        ("sam_neck_1x1_1024_to_256x64", 1024, 64, 256, 1, 1, 0),
    ];
    for (name, cin, side, cout, k, stride, pad) in convs {
        let x = data(cin * side * side, 50);
        let w = bf16s(&data(cout * cin * k * k, 51));
        let bias = data(cout, 52);
        let os = (side + 2 * pad - k) / stride + 1;
        let mut out = vec![0f32; cout * os * os];
        flops(&mut g, 2 * cout * os * os * cin * k * k);
        g.bench_function(name, |b| {
            b.iter(|| {
                cpu::conv2d(
                    &x,
                    cin,
                    side,
                    side,
                    WeightRef::BF16(&w),
                    Some(&bias),
                    cout,
                    k,
                    k,
                    stride,
                    pad,
                    &mut out,
                )
                .unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();

    let mut g = group(c, "cpu_ops/resample");
    // mask logits 128² → 1024² (10 masks), and the decoder's 128² → 32² attention-mask resize
    for (name, ch, from, to, align) in [
        ("resize_10x128_to_1024", 10usize, 128usize, 1024usize, false),
        ("resize_200x128_to_32", 200, 128, 32, false),
    ] {
        let x = data(ch * from * from, 53);
        let mut out = vec![0f32; ch * to * to];
        bytes(&mut g, ch * from * from, ch * to * to);
        g.bench_function(name, |b| {
            b.iter(|| {
                cpu::resize_bilinear(&x, ch, from, from, to, to, align, &mut out).unwrap();
                black_box(&out);
            })
        });
    }
    // grid sample: 256 channels of a 128² map at 16384 points
    let (ch, side, n) = (256, 128, 16384);
    let x = data(ch * side * side, 54);
    let grid: Vec<f32> = data(2 * n, 55).iter().map(|v| 1.9 * v).collect();
    let mut out = vec![0f32; ch * n];
    bytes(&mut g, 4 * ch * n, ch * n);
    g.bench_function("grid_sample_256x128x128_16384pts", |b| {
        b.iter(|| {
            cpu::grid_sample_bilinear(&x, ch, side, side, &grid, n, false, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();

    // One pixel-decoder layer's deformable sampling: 21504 queries, 8 heads × 32, 3 levels × 4.
    let mut g = group(c, "cpu_ops/ms_deform_attn");
    let levels = [(32usize, 32usize), (64, 64), (128, 128)];
    let tokens: usize = levels.iter().map(|(h, w)| h * w).sum();
    let (heads, hd, pts) = (8usize, 32usize, 4usize);
    let e = heads * hd;
    let value = data(tokens * e, 56);
    let offsets: Vec<f32> = data(tokens * heads * 3 * pts * 2, 57)
        .iter()
        .map(|v| 4.0 * v)
        .collect();
    let logits = data(tokens * heads * 3 * pts, 58);
    let refs = cpu::deform_reference_points(&levels);
    let mut out = vec![0f32; tokens * e];
    // 12 bilinear samples of 4 taps per (query, head, channel)
    bytes(&mut g, tokens * heads * 3 * pts * 4 * hd, tokens * e);
    g.bench_function("pixel_decoder_21504q_8x32_3lv_4pt", |b| {
        b.iter(|| {
            cpu::ms_deform_attn(
                &value, &levels, &refs, &offsets, &logits, tokens, heads, hd, pts, &mut out,
            )
            .unwrap();
            black_box(&out);
        })
    });
    g.finish();

    let mut g = group(c, "cpu_ops/pixel_shuffle");
    // connector: SAM's 64² × 1024 tokens up to 128² × 256, down to 32² × 4096
    let (side, ch) = (64, 1024);
    let x = data(side * side * ch, 59);
    let mut out = vec![0f32; side * side * ch];
    bytes(&mut g, side * side * ch, side * side * ch);
    g.bench_function("up_64x64x1024", |b| {
        b.iter(|| {
            cpu::pixel_shuffle_up(&x, side, side, ch, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.bench_function("down_64x64x1024", |b| {
        b.iter(|| {
            cpu::pixel_shuffle_down(&x, side, side, ch, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();

    let mut g = group(c, "cpu_ops/gather");
    // region sampler: 4 prompt masks at 1024² over the 32² × 1024 seg-projector tokens
    // (256 points each, grid-sampled and max-pooled)
    let (n, d, s) = (32 * 32, 1024, 1024);
    let tokens = Tensor::from_f32(data(n * d, 60), [n, d]).unwrap();
    let masks: Vec<Vec<u8>> = (0..4)
        .map(|r| {
            (0..s * s)
                .map(|i| u8::from(((i / s) / 128 + (i % s) / 128 + r) % 3 == 0))
                .collect()
        })
        .collect();
    let mrefs: Vec<&[u8]> = masks.iter().map(|m| m.as_slice()).collect();
    let sampler = RegionSampler::new(256);
    g.throughput(Throughput::Elements(4));
    g.bench_function("region_pool_4_masks_1024px_256pts", |b| {
        b.iter(|| black_box(sampler.sample(&tokens, &mrefs, s).unwrap()))
    });
    // token embedding lookup: 256 ids from the bf16 [32014, 3072] table
    let (vocab, cols) = (32014, 3072);
    let table = bf16s(&data(vocab * cols, 61));
    let ids: Vec<u32> = (0..256u32).map(|i| (i * 7919) % vocab as u32).collect();
    let mut out = vec![0f32; ids.len() * cols];
    g.throughput(Throughput::Bytes((ids.len() * cols * (2 + 4)) as u64));
    g.bench_function("embed_256_ids_bf16_3072", |b| {
        b.iter(|| {
            cpu::gather_rows(WeightRef::BF16(&table), cols, &ids, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    products,
    dense_attention,
    sam_attention,
    elementwise,
    vision
);
criterion_main!(benches);
