//! Phi-3 on the CPU at a medium size (a tenth of Phi-3-mini's width; the tiny preset and the
//! released geometry are in `benches/stages.rs`): prefill, and one decode step at a few hundred
//! tokens of context. Random weights (bf16, written by `xsam init`'s writer).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::Duration;
use xsam::graph::Executor;
use xsam::kv::PagedKvCache;
use xsam::model::phi3::Phi3;
use xsam::{Config, Tensor, Weights};

struct Bench {
    _dir: tempfile::TempDir,
    model: Phi3,
}

fn model(name: &str, medium: bool) -> Bench {
    let mut cfg = Config::preset("tiny").expect("preset");
    if medium {
        // A tenth of Phi-3-mini's width, a few layers: big enough that the GEMMs dominate.
        cfg.llm.hidden_size = 768;
        cfg.llm.intermediate_size = 2048;
        cfg.llm.num_hidden_layers = 4;
        cfg.llm.num_attention_heads = 8;
        cfg.llm.num_key_value_heads = 8;
        cfg.llm.sliding_window = 2047;
        cfg.llm.max_position_embeddings = 4096;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    xsam::init::write_random_model(&cfg, dir.path(), 1, false)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let w = Weights::load(dir.path()).expect("weights");
    let model = Phi3::load(&w.pp("llm"), &cfg.llm).expect("phi3");
    Bench { _dir: dir, model }
}

fn embeds(m: &Phi3, t: usize) -> Tensor {
    let ids: Vec<u32> = (0..t as u32).map(|i| 300 + (i * 7919) % 30000).collect();
    Tensor::from_f32(m.embed(&ids).expect("embed"), [t, m.config().hidden_size]).expect("tensor")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("phi3");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    {
        let (name, medium, t) = ("medium", true, 256usize);
        let b = model(name, medium);
        let x = embeds(&b.model, t);
        let mut exec = Executor::new();
        let mut kv = PagedKvCache::new(b.model.kv_config(16, 256 << 20).expect("kv")).expect("kv");
        g.throughput(Throughput::Elements(t as u64));
        g.bench_function(format!("prefill/{name}/{t}tok"), |bn| {
            bn.iter(|| {
                let s = kv.new_sequence();
                b.model.forward(&mut exec, &mut kv, s, &x).expect("forward");
                kv.free(s).expect("free");
            })
        });
        // Decode: one token after a `t`-token context (the context is built once, each
        // iteration forks it and decodes one token).
        let ctx = kv.new_sequence();
        b.model
            .forward(&mut exec, &mut kv, ctx, &x)
            .expect("forward");
        let one = embeds(&b.model, 1);
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("decode/{name}/ctx{t}"), |bn| {
            bn.iter(|| {
                let s = kv.fork(ctx).expect("fork");
                b.model
                    .forward(&mut exec, &mut kv, s, &one)
                    .expect("decode");
                kv.free(s).expect("free");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
