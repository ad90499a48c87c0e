//! The pixel decoder and the masked-attention transformer decoder at the released geometry
//! (`Config::preset("full")`: connector maps 512@128², 1024@64², 2048@32² → 21504 encoder tokens,
//! 6 deformable encoder layers; 200 queries, 9 decoder layers, masks at 128²), on the CPU with
//! random bf16 weights (as the runtime keeps them) and random inputs. Also the deformable
//! attention kernel alone (one encoder layer's sampling).
//!
//! Run: `cargo bench --bench segmentation` (short measurement: 10 samples).

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use half::bf16;
use std::hint::black_box;
use std::time::Duration;
use xsam::backend::cpu::{deform_reference_points, ms_deform_attn};
use xsam::graph::Executor;
use xsam::init::SplitMix64;
use xsam::model::mask_decoder::MaskDecoder;
use xsam::model::pixel_decoder::PixelDecoder;
use xsam::model::{checkpoint_tensors, Init, Module};
use xsam::{Config, Tensor, Weights};

fn uniform(n: usize, seed: u64, center: f32, half: f32) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n)
        .map(|_| center + (2.0 * r.next_f32() - 1.0) * half)
        .collect()
}

/// Random bf16 weights for the pixel decoder, decoder and class head of `cfg`.
fn weights(cfg: &Config) -> Weights {
    let tensors = checkpoint_tensors(cfg)
        .into_iter()
        .filter(|s| {
            matches!(
                s.module,
                Module::PixelDecoder | Module::Decoder | Module::ClassHead
            )
        })
        .enumerate()
        .map(|(i, s)| {
            let (c, h) = match s.init {
                Init::Weight { fan_in } | Init::Bias { fan_in } => {
                    (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
                }
                Init::NormWeight => (1.0, 0.1),
                Init::NormBias => (0.0, 0.1),
                Init::Embedding => (0.0, 0.5),
                Init::Constant(v) => (v, 0.0),
            };
            let v: Vec<bf16> = uniform(s.numel(), i as u64 + 1, c, h)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            (
                s.name.clone(),
                Tensor::from_vec(v, s.shape.clone()).unwrap(),
            )
        });
    Weights::from_tensors(tensors, "random")
}

fn input(dims: &[usize], seed: u64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_f32(uniform(n, seed, 0.0, 1.0), dims.to_vec()).unwrap()
}

fn bench(c: &mut Criterion) {
    let cfg = Config::preset("full").unwrap();
    let w = weights(&cfg);
    let root = w.root();
    let d = &cfg.decoder;
    let e = d.hidden_dim;

    // connector outputs, highest resolution first
    let chans = cfg.connector_out_channels();
    let sides = cfg.connector_out_sides();
    let feats: Vec<Tensor> = chans
        .iter()
        .zip(&sides)
        .enumerate()
        .map(|(i, (&ch, &s))| input(&[1, ch, s, s], 100 + i as u64))
        .collect();
    let pd = PixelDecoder::load(&root, &cfg).unwrap();
    let dec = MaskDecoder::load(&root, &cfg).unwrap();
    let mut exec = Executor::new();

    let mut g = c.benchmark_group("segmentation_full_cpu");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));

    let tokens: usize = sides.iter().map(|s| s * s).sum();
    g.bench_function(
        format!("pixel_decoder_{tokens}_tokens_{}_layers", d.encoder_layers),
        |b| {
            b.iter(|| {
                black_box(
                    pd.forward(&mut exec, &feats.iter().collect::<Vec<_>>())
                        .unwrap(),
                )
            })
        },
    );

    // decoder inputs: multi-scale maps lowest resolution first, mask features at stride 8
    let mut ms_sides = sides.clone();
    ms_sides.reverse();
    let ms: Vec<Tensor> = ms_sides
        .iter()
        .enumerate()
        .map(|(i, &s)| input(&[1, e, s, s], 200 + i as u64))
        .collect();
    let ms_side = sides[0];
    let mf = input(&[1, d.mask_feature_size, ms_side, ms_side], 300);
    let seg = input(&[e], 301);
    let classes = 10;
    let table = input(&[classes + 1, e], 302);
    g.bench_function(
        format!(
            "mask_decoder_{}_queries_{}_layers_{classes}_classes",
            d.num_queries,
            dec.num_layers()
        ),
        |b| {
            b.iter(|| {
                black_box(
                    dec.forward(&mut exec, &ms.iter().collect::<Vec<_>>(), &mf, &seg, &table)
                        .unwrap(),
                )
            })
        },
    );

    // the deformable sampling of one encoder layer alone
    let levels: Vec<(usize, usize)> = ms_sides.iter().map(|&s| (s, s)).collect();
    let (heads, pts, nl) = (d.num_attention_heads, d.encoder_n_points, levels.len());
    let value = uniform(tokens * e, 400, 0.0, 1.0);
    let offsets = uniform(tokens * heads * nl * pts * 2, 401, 0.0, 2.0);
    let logits = uniform(tokens * heads * nl * pts, 402, 0.0, 1.0);
    let refs = deform_reference_points(&levels);
    let mut out = vec![0f32; tokens * e];
    g.bench_function(format!("ms_deform_attn_{tokens}_tokens"), |b| {
        b.iter(|| {
            ms_deform_attn(
                &value,
                &levels,
                &refs,
                &offsets,
                &logits,
                tokens,
                heads,
                e / heads,
                pts,
                &mut out,
            )
            .unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
