//! The image side on the CPU: SAM ViT and SigLIP encoders at a medium size (between the tiny
//! preset and the released geometry, both of which are in `benches/stages.rs`), plus the two
//! preprocessing paths at the released sizes. Random weights (bf16, written by
//! `xsam init`'s writer into a temporary directory).
//!
//! Medium sizes: SAM 256² image, patch 16 (16×16 tokens), hidden 256, 8 heads, MLP 1024,
//! 4 blocks, window 7 (padded 16 → 21), global blocks 1 and 3; SigLIP 224² image, patch 14
//! (256 tokens), hidden 384, 6 heads, MLP 1536, all 4 layers.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;
use xsam::graph::Executor;
use xsam::image::{preprocess_sam, preprocess_siglip, Filter, RgbImage};
use xsam::model::sam::SamEncoder;
use xsam::model::siglip::SiglipEncoder;
use xsam::{Config, Weights};

fn picture(width: usize, height: usize) -> RgbImage {
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            data.extend([
                (x * 255 / width) as u8,
                (y * 255 / height) as u8,
                ((x ^ y) & 255) as u8,
            ]);
        }
    }
    RgbImage::new(width, height, data).expect("image")
}

fn config(medium: bool) -> Config {
    let mut cfg = Config::preset("tiny").expect("preset");
    if medium {
        let s = &mut cfg.sam;
        s.image_size = 256;
        s.patch_size = 16;
        s.hidden_size = 256;
        s.num_attention_heads = 8;
        s.mlp_dim = 1024;
        s.num_hidden_layers = 4;
        s.window_size = 7;
        s.global_attn_indexes = vec![1, 3];
        let v = &mut cfg.vision;
        v.image_size = 224;
        v.patch_size = 14;
        v.hidden_size = 384;
        v.num_attention_heads = 6;
        v.intermediate_size = 1536;
        v.num_hidden_layers = 4;
    }
    cfg
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("encoders");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    {
        let (label, medium) = ("medium", true);
        let cfg = config(medium);
        let dir = tempfile::tempdir().expect("tempdir");
        xsam::init::write_random_model(&cfg, dir.path(), 1, false)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let w = Weights::load(dir.path()).expect("weights");
        let img = picture(320, 240);
        let mut exec = Executor::new();

        let sam = SamEncoder::new(
            &cfg.sam,
            &w.pp("segmentor.encoder"),
            &[cfg.sam.num_hidden_layers],
        )
        .expect("sam");
        let px = preprocess_sam(&img, cfg.sam.image_size)
            .expect("sam input")
            .pixel_values;
        g.bench_function(format!("sam_{label}_{}px", cfg.sam.image_size), |b| {
            b.iter(|| black_box(sam.forward(&mut exec, &px).expect("sam forward")))
        });

        let keep = [cfg.vision.num_hidden_layers];
        let sig = SiglipEncoder::new(&cfg.vision, &w.pp("visual_encoder.vision_model"), &keep)
            .expect("siglip");
        let px =
            preprocess_siglip(&img, cfg.vision.image_size, Filter::Bilinear).expect("siglip input");
        g.bench_function(format!("siglip_{label}_{}px", cfg.vision.image_size), |b| {
            b.iter(|| black_box(sig.forward(&mut exec, &px).expect("siglip forward")))
        });
    }
    // Preprocessing at the released sizes from a 1280×960 photo-sized image.
    let img = picture(1280, 960);
    g.bench_function("preprocess_sam_1280x960_to_1024", |b| {
        b.iter(|| black_box(preprocess_sam(&img, 1024).expect("sam")))
    });
    g.bench_function("preprocess_siglip_1280x960_to_384", |b| {
        b.iter(|| black_box(preprocess_siglip(&img, 384, Filter::Bilinear).expect("siglip")))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
