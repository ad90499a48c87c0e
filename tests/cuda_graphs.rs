//! CUDA graph mode of the CUDA executor: a captured and replayed graph gives the same bits as
//! the eager walk (same kernels, same arguments), also when replayed with new input values; the
//! Phi-3 decode step (kernel-shaped: head dim 64) gives the same logits and ids with graphs on
//! and off, through recaptures that update the executable graph; and 200 captured decode steps
//! do not grow the device memory pools. Skips without a GPU (tests/gpu/mod.rs).

mod gpu;

use gpu::Rng;
use std::sync::Arc;
use xsam::backend::cuda::CudaBackend;
use xsam::graph::{CudaExecutor, DeviceWeights, Graph, NodeId, Op, Plan};
use xsam::kv::PagedKvCache;
use xsam::model::phi3::Phi3;
use xsam::{Config, Tensor, Weights};

fn executors(b: CudaBackend) -> (Arc<CudaBackend>, CudaExecutor, CudaExecutor) {
    let b = Arc::new(b);
    let w = Arc::new(DeviceWeights::new(b.clone()));
    let mut eager = CudaExecutor::new(w.clone());
    eager.set_cuda_graphs(false);
    let mut graphs = CudaExecutor::new(w);
    graphs.set_cuda_graphs(true);
    (b, eager, graphs)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec_f32()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// linear (+bias) -> layer norm -> attention (2 heads of 64, flash kernel) -> add.
fn small_graph(rng: &mut Rng) -> (Graph, [NodeId; 3]) {
    let (t, c) = (8usize, 128usize);
    let mut g = Graph::new();
    let x = g.input("x", [t, c]).unwrap();
    let v = g.input("v", [t, c]).unwrap();
    let bf = |rng: &mut Rng, n: usize| -> Vec<half::bf16> {
        rng.vec(n, -0.1, 0.1)
            .into_iter()
            .map(half::bf16::from_f32)
            .collect()
    };
    let w = g
        .weight("w", Tensor::from_vec(bf(rng, c * c), [c, c]).unwrap())
        .unwrap();
    let bias = g
        .weight("b", Tensor::from_f32(rng.vec(c, -0.1, 0.1), [c]).unwrap())
        .unwrap();
    let gamma = g
        .weight("g", Tensor::from_f32(rng.vec(c, 0.5, 1.5), [c]).unwrap())
        .unwrap();
    let beta = g
        .weight(
            "beta",
            Tensor::from_f32(rng.vec(c, -0.1, 0.1), [c]).unwrap(),
        )
        .unwrap();
    let l = g.push("lin", Op::Linear, &[x, w, bias]).unwrap();
    let n = g
        .push("norm", Op::LayerNorm { eps: 1e-6 }, &[l, gamma, beta])
        .unwrap();
    let attn = Op::Attention {
        heads: 2,
        scale: 0.125,
        causal: false,
        window: None,
        q_offset: 0,
    };
    let a = g.push("attn", attn, &[n, n, v]).unwrap();
    let o = g.push("out", Op::Add, &[a, x]).unwrap();
    g.mark_output(o);
    (g, [x, v, o])
}

#[test]
fn captured_and_replayed_graphs_match_eager_bit_for_bit() {
    let Some(b) = gpu::backend(
        "cuda_graphs",
        "captured_and_replayed_graphs_match_eager_bit_for_bit",
    ) else {
        return;
    };
    let (_b, mut eager, mut graphs) = executors(b);
    let mut rng = Rng(7);
    let (g, [x, v, o]) = small_graph(&mut rng);
    let plan = Plan::new(&g, &[]).unwrap();
    assert!(xsam::graph::cuda_executor::not_capturable(&g).is_none());
    let mut previous: Option<Vec<u32>> = None;
    for round in 0..3 {
        let xs = Tensor::from_f32(rng.vec(8 * 128, -1.0, 1.0), [8, 128]).unwrap();
        let vs = Tensor::from_f32(rng.vec(8 * 128, -1.0, 1.0), [8, 128]).unwrap();
        let feeds = [(x, &xs), (v, &vs)];
        let want = bits(eager.run(&g, &plan, &feeds).unwrap().get(o).unwrap());
        let got = bits(graphs.run(&g, &plan, &feeds).unwrap().get(o).unwrap());
        assert_eq!(want, got, "round {round}: captured differs from eager");
        assert!(
            want.iter().all(|&w| !f32::from_bits(w).is_nan()),
            "round {round}: NaN (poisoned memory read)"
        );
        if let Some(p) = &previous {
            assert_ne!(p, &got, "round {round}: the replay returned stale outputs");
        }
        previous = Some(got);
        let s = graphs.graph_stats();
        assert_eq!(s.captured, 1, "one capture, then replays: {s:?}");
        assert_eq!(s.replayed, round + 1, "{s:?}");
        assert_eq!((s.eager, s.rejected, s.updated), (0, 0, 0), "{s:?}");
    }
    assert_eq!(eager.graph_stats().replayed, 0);
    assert_eq!(eager.graph_stats().eager, 3);
}

/// The tiny preset's LLM with one head of 64 (the same tensors as its 4 heads of 16), so every
/// node of a forward has a kernel and the graphs are capturable.
fn kernel_shaped_phi3() -> Phi3 {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda-graphs-model");
    let cfg = Config::preset("tiny").unwrap();
    let opts = xsam::init::InitOptions {
        seed: 5,
        force: true,
        ..Default::default()
    };
    xsam::init::write_random_model_with(&cfg, &dir, &opts).unwrap();
    let mut llm = cfg.llm.clone();
    llm.num_attention_heads = 1;
    llm.num_key_value_heads = 1;
    let w = Weights::load(&dir).unwrap();
    Phi3::load(&w.pp("llm"), &llm).unwrap()
}

/// Prompt of 7 tokens, then `steps` greedy decode steps: (ids, logits bits of every forward).
fn decode(m: &Phi3, exec: &mut CudaExecutor, steps: usize) -> (Vec<u32>, Vec<Vec<u32>>) {
    let d = m.config().hidden_size;
    let mut cache = PagedKvCache::metadata_only(m.kv_config(16, 16 << 20).unwrap());
    let seq = cache.new_sequence();
    let prompt: Vec<u32> = vec![1, 17, 300, 4000, 22, 9, 31000];
    let e = m.embed(&prompt).unwrap();
    let mut f = m
        .forward(
            exec,
            &mut cache,
            seq,
            &Tensor::from_f32(e, [prompt.len(), d]).unwrap(),
        )
        .unwrap();
    let (mut ids, mut logits) = (vec![], vec![]);
    for _ in 0..steps {
        logits.push(f.last_logits.iter().map(|v| v.to_bits()).collect());
        let id = f
            .last_logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32;
        ids.push(id);
        let e = m.embed(&[id]).unwrap();
        f = m
            .forward(exec, &mut cache, seq, &Tensor::from_f32(e, [1, d]).unwrap())
            .unwrap();
    }
    logits.push(f.last_logits.iter().map(|v| v.to_bits()).collect());
    (ids, logits)
}

#[test]
fn phi3_decode_steps_match_with_graphs_on_and_off() {
    let Some(b) = gpu::backend(
        "cuda_graphs",
        "phi3_decode_steps_match_with_graphs_on_and_off",
    ) else {
        return;
    };
    let m = kernel_shaped_phi3();
    let (_b, mut eager, mut graphs) = executors(b);
    let (ids_off, logits_off) = decode(&m, &mut eager, 20);
    let (ids_on, logits_on) = decode(&m, &mut graphs, 20);
    assert_eq!(ids_off, ids_on, "greedy ids");
    for (i, (a, b)) in logits_off.iter().zip(&logits_on).enumerate() {
        assert_eq!(a, b, "logits of forward {i} differ");
    }
    assert!(eager.fallbacks().is_empty(), "{:?}", eager.fallbacks());
    let s = graphs.graph_stats();
    println!("graph stats after 20 decode steps: {s:?}");
    // The prefill and the first decode step are captured; each later step (another position)
    // is captured again and applied to the same executable graph.
    assert_eq!((s.eager, s.rejected), (0, 0), "{s:?}");
    assert_eq!(s.captured, 2, "{s:?}");
    assert_eq!(s.updated + s.reinstantiated, 19, "{s:?}");
    assert_eq!(s.replayed, 21, "{s:?}");
}

#[test]
fn two_hundred_captured_decode_steps_do_not_grow_the_pools() {
    let Some(b) = gpu::backend(
        "cuda_graphs",
        "two_hundred_captured_decode_steps_do_not_grow_the_pools",
    ) else {
        return;
    };
    let m = kernel_shaped_phi3();
    let (b, _eager, mut graphs) = executors(b);
    let d = m.config().hidden_size;
    let mut cache = PagedKvCache::metadata_only(m.kv_config(16, 16 << 20).unwrap());
    let seq = cache.new_sequence();
    let e = m.embed(&[1, 2, 3]).unwrap();
    m.forward(
        &mut graphs,
        &mut cache,
        seq,
        &Tensor::from_f32(e, [3, d]).unwrap(),
    )
    .unwrap();
    // Past the sliding window (48) the attended range, hence every launch shape, is fixed.
    let mut after_warmup = None;
    for step in 0..200 {
        let e = m.embed(&[(step % 1000) as u32 + 5]).unwrap();
        m.forward(
            &mut graphs,
            &mut cache,
            seq,
            &Tensor::from_f32(e, [1, d]).unwrap(),
        )
        .unwrap();
        if step == 59 {
            after_warmup = Some(b.pool_stats().unwrap());
        }
    }
    let (w, end) = (after_warmup.unwrap(), b.pool_stats().unwrap());
    println!("pools after 60 steps: {w:?}\npools after 200 steps: {end:?}");
    println!("graph stats: {:?}", graphs.graph_stats());
    assert_eq!(graphs.graph_stats().eager, 0);
    assert!(graphs.graph_stats().replayed >= 200);
    assert!(
        end.reserved <= w.reserved,
        "default pool grew: {} -> {}",
        w.reserved,
        end.reserved
    );
    assert!(
        end.graph_reserved <= w.graph_reserved,
        "graph memory grew: {} -> {}",
        w.graph_reserved,
        end.graph_reserved
    );
}
