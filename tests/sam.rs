//! SAM ViT encoder parity with transformers' `SamVisionEncoder` (tests/fixtures/sam_{a,b}, made
//! by reference/make_fixtures_encoders.py).
//!
//! Tolerance: relative error `||ours - ref|| / ||ref|| <= 1e-4` per hidden state (the issue's
//! requirement). Everything is f32; the reference itself is within 6e-7 of a float64
//! computation, so what remains is f32 rounding in a different summation order (~1e-6). We
//! also hold the states to 1e-5, which still separates exact-erf from tanh GELU (those differ by
//! 1.6e-4 on these fixtures); the other plausible mistakes (masking padded keys, scaled q in the
//! rel-pos term, no rel-pos) move the states by 0.2-0.4.

mod common;

use common::{config_from, rel_err, tensor, Fixture};
use xsam::graph::Executor;
use xsam::image::preprocess_sam;
use xsam::model::sam::SamEncoder;
use xsam::Weights;

const TOL: f64 = 1e-4;
const STRICT: f64 = 1e-5;

fn open(stem: &str) -> (Fixture, xsam::Config, Weights) {
    let fx = Fixture::open(stem);
    let cfg = config_from(&fx);
    let w = Weights::load(common::fixture_path(stem, "safetensors")).unwrap();
    (fx, cfg, w)
}

#[test]
fn hidden_states_match_transformers() {
    let mut worst = 0f64;
    for stem in ["sam_a", "sam_b"] {
        let (fx, cfg, w) = open(stem);
        let layers = cfg.sam.num_hidden_layers;
        let all: Vec<usize> = (0..=layers).collect();
        let enc = SamEncoder::new(&cfg.sam, &w.pp("segmentor.encoder"), &all).unwrap();
        let mut exec = Executor::new();
        for n in 0..fx.cases().len() {
            let px = tensor(&fx, &format!("case{n}.input.sam_pixel_values"));
            let out = enc.forward(&mut exec, &px).unwrap();
            assert_eq!(out.len(), layers + 1);
            for (k, t) in out {
                let (want, shape) = fx.f32(&format!("case{n}.sam.hidden_states.{k}"));
                assert_eq!(t.dims(), &shape[..], "{stem} case {n} hs {k}");
                let e = rel_err(&t.to_vec_f32().unwrap(), &want);
                println!("{stem} case {n} hidden_states[{k}]: rel err {e:.3e}");
                assert!(e <= TOL, "{stem} case {n} hidden_states[{k}]: rel err {e}");
                assert!(
                    e <= STRICT,
                    "{stem} case {n} hidden_states[{k}]: rel err {e}"
                );
                worst = worst.max(e);
            }
        }
    }
    println!("SAM: max rel err {worst:.3e}");
}

#[test]
fn end_to_end_from_the_raw_image() {
    for stem in ["sam_a", "sam_b"] {
        let (fx, cfg, w) = open(stem);
        let l = cfg.sam.num_hidden_layers;
        // Only the deepest state: the blocks before it still run, later ones are not built.
        let enc = SamEncoder::new(&cfg.sam, &w.pp("segmentor.encoder"), &[l - 1, l]).unwrap();
        let mut exec = Executor::new();
        for n in 0..fx.cases().len() {
            let input = preprocess_sam(&fx.image(n), cfg.sam.image_size).unwrap();
            let out = enc.forward(&mut exec, &input.pixel_values).unwrap();
            for (k, t) in out {
                let (want, _) = fx.f32(&format!("case{n}.sam.hidden_states.{k}"));
                let e = rel_err(&t.to_vec_f32().unwrap(), &want);
                println!("{stem} case {n} image -> hidden_states[{k}]: rel err {e:.3e}");
                assert!(e <= STRICT, "{stem} case {n} hs {k}: {e}");
            }
        }
    }
}

#[test]
fn builds_only_the_needed_blocks_and_names_nodes() {
    let (_, cfg, w) = open("sam_a");
    let enc = SamEncoder::new(&cfg.sam, &w.pp("segmentor.encoder"), &[2]).unwrap();
    let g = &enc.built.graph;
    assert!(g.find("sam.blk1.attn").is_some());
    assert!(
        g.find("sam.blk2.attn").is_none(),
        "block 3 (0-based 2) must not be built"
    );
    assert!(g.find("sam.hidden_states.2").is_some());
    assert!(enc.peak_bytes() > 0);
    // Out-of-range request and missing weights are errors, not panics.
    assert!(SamEncoder::new(&cfg.sam, &w.pp("segmentor.encoder"), &[5]).is_err());
    let e = SamEncoder::new(&cfg.sam, &w.pp("segmentor.nothing"), &[1])
        .err()
        .unwrap();
    assert!(e.to_string().contains("patch_embed"), "{e}");
    // A wrongly sized input is an input error.
    let mut exec = Executor::new();
    let bad = xsam::Tensor::from_f32(vec![0.0; 3 * 8 * 8], [1, 3, 8, 8]).unwrap();
    assert!(matches!(
        enc.forward(&mut exec, &bad),
        Err(xsam::Error::Input(_))
    ));
}

/// Both encoders at the released geometry (SAM ViT-L 1024², SigLIP so400m 384²) with random
/// bf16 weights, on the CPU. Ignored by default (about a minute on two cores); run with
/// `cargo test --release --test sam -- --ignored --nocapture` (and `/usr/bin/time -v` for the
/// peak RSS).
#[test]
#[ignore]
fn full_geometry_on_cpu() {
    use std::time::Instant;
    use xsam::model::siglip::SiglipEncoder;
    let cfg = xsam::Config::preset("full").unwrap();
    let t0 = Instant::now();
    let w = common::random_encoder_weights(&cfg, 0);
    println!(
        "random encoder weights: {} tensors in {:.1?}",
        w.len(),
        t0.elapsed()
    );
    let img = common::test_picture(800, 600);
    let mut exec = Executor::new();

    let sam = SamEncoder::for_xsam(&cfg, &w.pp("segmentor.encoder")).unwrap();
    let input = preprocess_sam(&img, cfg.sam.image_size).unwrap();
    println!(
        "SAM: {} nodes, keeps {:?}, planner peak arena {:.1} MiB",
        sam.built.graph.len(),
        sam.built
            .hidden_states
            .iter()
            .map(|h| h.0)
            .collect::<Vec<_>>(),
        sam.peak_bytes() as f64 / (1 << 20) as f64
    );
    let t = Instant::now();
    let hs = sam.forward(&mut exec, &input.pixel_values).unwrap();
    println!("SAM forward: {:.2?}", t.elapsed());
    let g = cfg.sam.grid();
    for (k, h) in &hs {
        assert_eq!(h.dims(), [1, g, g, cfg.sam.hidden_size]);
        let v = h.to_vec_f32().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "hidden_states[{k}] not finite"
        );
        let rms = (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        println!("  sam.hidden_states.{k}: rms {rms:.3}");
    }

    let sig = SiglipEncoder::for_xsam(&cfg.vision, &w.pp("visual_encoder.vision_model")).unwrap();
    let px =
        xsam::image::preprocess_siglip(&img, cfg.vision.image_size, cfg.vision.resample.into())
            .unwrap();
    println!(
        "SigLIP: {} nodes, keeps {:?}, planner peak arena {:.1} MiB",
        sig.built.graph.len(),
        sig.built
            .hidden_states
            .iter()
            .map(|h| h.0)
            .collect::<Vec<_>>(),
        sig.peak_bytes() as f64 / (1 << 20) as f64
    );
    let t = Instant::now();
    let out = sig.forward(&mut exec, &px).unwrap();
    println!("SigLIP forward: {:.2?}", t.elapsed());
    let (k, h) = &out[0];
    assert_eq!(*k, cfg.vision.num_hidden_layers - 1);
    assert_eq!(
        h.dims(),
        [1, cfg.vision.num_patches(), cfg.vision.hidden_size]
    );
    assert!(h.to_vec_f32().unwrap().iter().all(|x| x.is_finite()));
    println!(
        "executor arena held: {:.1} MiB",
        exec.arena_bytes() as f64 / (1 << 20) as f64
    );
}
