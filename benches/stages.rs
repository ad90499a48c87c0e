//! Every stage of the model alone on the CPU, chained as the session chains them (each stage's
//! input is the previous stage's real output), with the stage names of `xsam bench` and
//! reference/bench_torch.py: sam_encoder, seg_projector, siglip_encoder, visual_projector,
//! connector, pixel_decoder, mask_decoder, llm_prefill_<T>, llm_decode_ctx<T>.
//!
//! Always at the tiny preset (random weights written into a temporary directory). At the full
//! (released) geometry too when `XSAM_BENCH_FULL=1`: the random full model (9.25 GB) is written
//! once by the crate's init code into `XSAM_BENCH_FULL_DIR` (default `xsam-bench/model-full`,
//! the same cache `xsam bench --preset full` uses) and reused. A full SAM iteration takes 20 s or
//! more on a 2-core machine and criterion needs 10 of them: the full set took 14 minutes there.
//!
//! Run: `cargo bench --bench stages` (tiny), `XSAM_BENCH_FULL=1 cargo bench --bench stages`.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;
use xsam::graph::Executor;
use xsam::image::{preprocess_sam, preprocess_siglip, Filter};
use xsam::init::SplitMix64;
use xsam::kv::PagedKvCache;
use xsam::model::connector::Connector;
use xsam::model::mask_decoder::MaskDecoder;
use xsam::model::phi3::Phi3;
use xsam::model::pixel_decoder::PixelDecoder;
use xsam::model::projector::Projector;
use xsam::model::sam::SamEncoder;
use xsam::model::siglip::SiglipEncoder;
use xsam::{flops, render, Config, Tensor, Weights};

fn random(dims: &[usize], seed: u64) -> Tensor {
    let mut r = SplitMix64::new(seed);
    let n = dims.iter().product();
    let v = (0..n).map(|_| 2.0 * r.next_f32() - 1.0).collect();
    Tensor::from_f32(v, dims.to_vec()).expect("tensor")
}

/// Criterion's elements are FLOPs here (its "elem/s" reads as FLOP/s).
fn with_flops(g: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>, f: f64) {
    g.throughput(Throughput::Elements(f as u64));
}

fn state(hs: &[(usize, Tensor)], k: usize) -> &Tensor {
    &hs.iter().find(|(i, _)| *i == k).expect("kept state").1
}

/// Benches every stage of the model in `dir`; `label` prefixes the names (tiny / full).
fn stages(c: &mut Criterion, label: &str, dir: &Path, prefill: usize, ctx: usize, full: bool) {
    let cfg = Config::load(dir).expect("config");
    let w = Weights::load(dir).expect("weights");
    let root = w.root();
    let image = render::demo_image(1024, 768, 0);
    let mut exec = Executor::new();

    let mut g = c.benchmark_group(format!("stages_{label}"));
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    if full {
        // 10 samples of one iteration each; criterion stretches the time to fit them.
        g.warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_secs(30));
    } else {
        g.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
    }

    // SAM side: encoder, then the seg projector on its selected state.
    let sam = SamEncoder::for_xsam(&cfg, &root.pp("segmentor.encoder")).expect("sam");
    let px = preprocess_sam(&image, cfg.sam.image_size)
        .expect("sam input")
        .pixel_values;
    with_flops(&mut g, flops::sam_encoder(&cfg));
    g.bench_function("sam_encoder", |b| {
        b.iter(|| black_box(sam.forward(&mut exec, &px).expect("sam")))
    });
    let sam_hidden = sam.forward(&mut exec, &px).expect("sam");
    drop(sam);
    let seg_proj = Projector::seg(&root, &cfg).expect("seg projector");
    let hs = state(&sam_hidden, cfg.seg_select_index());
    // projectors: elements are the input values (their FLOPs are counted together in flops.rs)
    g.throughput(Throughput::Elements(hs.numel() as u64));
    g.bench_function("seg_projector", |b| {
        b.iter(|| {
            black_box(
                seg_proj
                    .forward(&mut exec, "proj.seg", hs)
                    .expect("seg proj"),
            )
        })
    });

    // SigLIP side: encoder, then the visual projector.
    let sig = SiglipEncoder::for_xsam(&cfg.vision, &root.pp("visual_encoder.vision_model"))
        .expect("siglip");
    let spx =
        preprocess_siglip(&image, cfg.vision.image_size, Filter::Bilinear).expect("siglip input");
    with_flops(&mut g, flops::siglip_encoder(&cfg));
    g.bench_function("siglip_encoder", |b| {
        b.iter(|| black_box(sig.forward(&mut exec, &spx).expect("siglip")))
    });
    let sig_hidden = sig.forward(&mut exec, &spx).expect("siglip");
    drop(sig);
    let vis_proj = Projector::visual(&root, &cfg).expect("visual projector");
    let vs = state(&sig_hidden, cfg.vision.select_index().unwrap_or(0));
    g.throughput(Throughput::Elements(vs.numel() as u64));
    g.bench_function("visual_projector", |b| {
        b.iter(|| {
            black_box(
                vis_proj
                    .forward(&mut exec, "proj.visual", vs)
                    .expect("vis proj"),
            )
        })
    });

    // Segmentation side: connector → pixel decoder → mask decoder.
    let connector = Connector::load(&root, &cfg).expect("connector");
    let levels: Vec<&Tensor> = cfg
        .connector
        .select_layers
        .iter()
        .map(|&k| state(&sam_hidden, k))
        .collect();
    with_flops(&mut g, flops::connector(&cfg));
    g.bench_function("connector", |b| {
        b.iter(|| black_box(connector.forward(&mut exec, &levels).expect("connector")))
    });
    let conn = connector.forward(&mut exec, &levels).expect("connector");
    let pd = PixelDecoder::load(&root, &cfg).expect("pixel decoder");
    let conn_refs: Vec<&Tensor> = conn.iter().collect();
    with_flops(&mut g, flops::pixel_decoder(&cfg));
    g.bench_function("pixel_decoder", |b| {
        b.iter(|| black_box(pd.forward(&mut exec, &conn_refs).expect("pixel decoder")))
    });
    let pixel = pd.forward(&mut exec, &conn_refs).expect("pixel decoder");
    let dec = MaskDecoder::load(&root, &cfg).expect("mask decoder");
    let e = cfg.decoder.hidden_dim;
    // the llm projector's <SEG> embedding and a class table of 10 phrases + background
    let seg = random(&[e], 1);
    let table = random(&[11, e], 2);
    let ms: Vec<&Tensor> = pixel.multi_scale.iter().collect();
    with_flops(&mut g, flops::mask_decoder(&cfg));
    g.bench_function("mask_decoder", |b| {
        b.iter(|| {
            black_box(
                dec.forward(&mut exec, &ms, &pixel.mask_features, &seg, &table)
                    .expect("mask decoder"),
            )
        })
    });
    drop((dec, pd, connector, sam_hidden, sig_hidden));

    // LLM: prefill of `prefill` tokens, and one decode step after `ctx` cached tokens.
    let llm = Phi3::load(&root.pp("llm"), &cfg.llm).expect("phi3");
    let h = cfg.llm.hidden_size;
    let embeds = |t: usize| {
        let ids: Vec<u32> = (0..t as u32).map(|i| 300 + (i * 7919) % 30000).collect();
        Tensor::from_f32(llm.embed(&ids).expect("embed"), [t, h]).expect("embeds")
    };
    let budget = (prefill.max(ctx) + 64) * 2 * h * 4 * cfg.llm.num_hidden_layers * 2;
    let mut kv = PagedKvCache::new(llm.kv_config(16, budget).expect("kv")).expect("kv");
    let x = embeds(prefill);
    with_flops(&mut g, flops::llm_prefill(&cfg, prefill));
    g.bench_function(format!("llm_prefill_{prefill}"), |b| {
        b.iter(|| {
            let s = kv.new_sequence();
            black_box(llm.forward(&mut exec, &mut kv, s, &x).expect("prefill"));
            kv.free(s).expect("free");
        })
    });
    let cx = embeds(ctx);
    let base = kv.new_sequence();
    llm.forward(&mut exec, &mut kv, base, &cx).expect("context");
    let one = embeds(1);
    // decode reads every weight once: bytes of bf16 weights + f32 KV of the context
    g.throughput(Throughput::Bytes(
        flops::llm_decode_bytes(&cfg, ctx, 4) as u64
    ));
    g.bench_function(format!("llm_decode_ctx{ctx}"), |b| {
        b.iter(|| {
            let s = kv.fork(base).expect("fork");
            black_box(llm.forward(&mut exec, &mut kv, s, &one).expect("decode"));
            kv.free(s).expect("free");
        })
    });
    g.finish();
}

fn full_dir() -> PathBuf {
    let d = std::env::var_os("XSAM_BENCH_FULL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("xsam-bench/model-full"));
    if !d.join("config.json").is_file() || !d.join("tokenizer.json").is_file() {
        eprintln!("writing the random full model to {} (once)", d.display());
        let opts = xsam::init::InitOptions {
            force: true,
            ..Default::default()
        };
        xsam::init::write_random_preset("full", &d, &opts).expect("full model");
    }
    d
}

fn bench(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tiny = tmp.path().join("model-tiny");
    xsam::init::write_random_preset("tiny", &tiny, &Default::default()).expect("tiny model");
    stages(c, "tiny", &tiny, 64, 64, false);
    if std::env::var_os("XSAM_BENCH_FULL").is_some_and(|v| v == "1") {
        stages(c, "full", &full_dir(), 256, 1024, true);
    } else {
        eprintln!("stages at the full geometry skipped: set XSAM_BENCH_FULL=1");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
