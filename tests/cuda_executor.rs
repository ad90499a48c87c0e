//! The CUDA graph executor against the CPU executor: every `Op` (and `SegOp`) in a small random
//! graph, kernel-shaped configurations that must not fall back to the CPU, and paged attention
//! through the device KV pool (prefill, a forked prefix with copy on write, 20 decode steps).
//! Skips without a GPU (tests/gpu/mod.rs; allocations are NaN-poisoned, and NaN never passes).
//!
//! Tolerances, relative to the largest magnitude of the CPU result (at least 1):
//! - `EXACT` 1e-5: f32 element-wise and data movement (same formula, f32 on both sides; expf vs
//!   the CPU's exp differ by an ulp or two);
//! - `REDUCE` 1e-4: f32 reductions in a different order (norms, softmax, L2, deformable sums);
//! - `BF16` 3e-2: bf16 operands (GEMMs on cuBLASLt, flash / SAM / masked / paged attention, the
//!   bf16 device KV pool): each operand rounded to 8 mantissa bits, f32 accumulation.

mod gpu;

use gpu::Rng;
use std::sync::Arc;
use xsam::graph::op::{SegOp, Unary};
use xsam::graph::{CudaExecutor, DeviceWeights, Executor, Graph, NodeId, Op, Plan};
use xsam::kv::{KvConfig, PagedKvCache};
use xsam::Tensor;

const EXACT: f32 = 1e-5;
const REDUCE: f32 = 1e-4;
const BF16: f32 = 3e-2;

fn exec(b: xsam::backend::cuda::CudaBackend) -> CudaExecutor {
    CudaExecutor::new(Arc::new(DeviceWeights::new(Arc::new(b))))
}

fn close(what: &str, cpu: &[f32], gpu: &[f32], tol: f32) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: lengths");
    let scale = cpu.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (&c, &g)) in cpu.iter().zip(gpu).enumerate() {
        let ok = (c - g).abs() <= tol * scale; // false for NaN
        assert!(
            ok,
            "{what}: element {i}: cpu {c} gpu {g} (tol {tol} x {scale})"
        );
    }
}

/// A graph under test: inputs with their values, the node to compare, its tolerance.
struct Case {
    name: &'static str,
    g: Graph,
    feeds: Vec<(NodeId, Tensor)>,
    out: NodeId,
    tol: f32,
    /// Whether a kernel must run it (no CPU fallback).
    kernel: bool,
}

fn input(
    g: &mut Graph,
    rng: &mut Rng,
    feeds: &mut Vec<(NodeId, Tensor)>,
    name: &str,
    dims: &[usize],
) -> NodeId {
    let n: usize = dims.iter().product();
    let id = g.input(name, dims.to_vec()).unwrap();
    feeds.push((
        id,
        Tensor::from_f32(rng.vec(n, -2.0, 2.0), dims.to_vec()).unwrap(),
    ));
    id
}

/// A bf16 weight (as model weights are), so the device's bf16 copy is exact.
fn weight(g: &mut Graph, rng: &mut Rng, name: &str, dims: &[usize], scale: f32) -> NodeId {
    let n: usize = dims.iter().product();
    let v: Vec<half::bf16> = rng
        .vec(n, -scale, scale)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect();
    g.weight(name, Tensor::from_vec(v, dims.to_vec()).unwrap())
        .unwrap()
}

fn f32_weight(
    g: &mut Graph,
    rng: &mut Rng,
    name: &str,
    dims: &[usize],
    lo: f32,
    hi: f32,
) -> NodeId {
    let n: usize = dims.iter().product();
    g.weight(
        name,
        Tensor::from_f32(rng.vec(n, lo, hi), dims.to_vec()).unwrap(),
    )
    .unwrap()
}

/// Builds a case's graph: (graph, rng, feeds) -> the node to compare.
type Build<'a> = &'a dyn Fn(&mut Graph, &mut Rng, &mut Vec<(NodeId, Tensor)>) -> NodeId;

/// One case per op (several for ops with kernel limits).
fn cases() -> Vec<Case> {
    let mut out = vec![];
    let mut rng = Rng(42);
    let mut add = |name: &'static str, tol: f32, kernel: bool, build: Build| {
        let mut g = Graph::new();
        let mut feeds = vec![];
        let o = build(&mut g, &mut rng, &mut feeds);
        g.mark_output(o);
        out.push(Case {
            name,
            g,
            feeds,
            out: o,
            tol,
            kernel,
        });
    };
    add("linear", BF16, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[2, 5, 48]);
        let w = weight(g, r, "w", &[40, 48], 0.2);
        let b = f32_weight(g, r, "b", &[40], -1.0, 1.0);
        g.push("y", Op::Linear, &[x, w, b]).unwrap()
    });
    for bt in [false, true] {
        add("matmul", BF16, true, &|g, r, f| {
            let a = input(g, r, f, "a", &[6, 32]);
            let b = input(g, r, f, "b", if bt { &[24, 32] } else { &[32, 24] });
            g.push("y", Op::MatMul { b_transposed: bt }, &[a, b])
                .unwrap()
        });
        add("batched_matmul", BF16, true, &|g, r, f| {
            let a = input(g, r, f, "a", &[3, 6, 32]);
            let b = input(g, r, f, "b", if bt { &[3, 24, 32] } else { &[3, 32, 24] });
            g.push("y", Op::BatchedMatMul { b_transposed: bt }, &[a, b])
                .unwrap()
        });
    }
    add("layer_norm", REDUCE, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[7, 96]);
        let w = f32_weight(g, r, "w", &[96], 0.5, 1.5);
        let b = f32_weight(g, r, "b", &[96], -0.5, 0.5);
        g.push("y", Op::LayerNorm { eps: 1e-5 }, &[x, w, b])
            .unwrap()
    });
    add("layer_norm (no params)", REDUCE, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[7, 96]);
        g.push("y", Op::LayerNorm { eps: 1e-6 }, &[x]).unwrap()
    });
    add("layer_norm_2d", REDUCE, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[1, 24, 5, 7]);
        let w = f32_weight(g, r, "w", &[24], 0.5, 1.5);
        let b = f32_weight(g, r, "b", &[24], -0.5, 0.5);
        g.push("y", Op::LayerNorm2d { eps: 1e-6 }, &[x, w, b])
            .unwrap()
    });
    add("group_norm", REDUCE, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[1, 32, 6, 5]);
        let w = f32_weight(g, r, "w", &[32], 0.5, 1.5);
        let b = f32_weight(g, r, "b", &[32], -0.5, 0.5);
        g.push(
            "y",
            Op::GroupNorm {
                groups: 8,
                eps: 1e-5,
            },
            &[x, w, b],
        )
        .unwrap()
    });
    add("rms_norm", REDUCE, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[5, 64]);
        let w = f32_weight(g, r, "w", &[64], 0.5, 1.5);
        g.push("y", Op::RmsNorm { eps: 1e-5 }, &[x, w]).unwrap()
    });
    for u in [Unary::GeluErf, Unary::GeluTanh, Unary::Relu, Unary::Silu] {
        add("unary", EXACT, true, &move |g, r, f| {
            let x = input(g, r, f, "x", &[3, 37]);
            g.push("y", Op::Unary(u), &[x]).unwrap()
        });
    }
    add("silu_gate", EXACT, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[4, 2, 40]);
        g.push("y", Op::SiluGate, &[x]).unwrap()
    });
    add("softmax", REDUCE, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[9, 33]);
        g.push("y", Op::Softmax, &[x]).unwrap()
    });
    add("rope", REDUCE, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[6, 4 * 32]);
        let op = Op::Rope {
            heads: 4,
            head_dim: 32,
            theta: 10000.0,
            pos_offset: 5,
        };
        g.push("y", op, &[x]).unwrap()
    });
    add("conv2d 3x3", BF16, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[1, 8, 9, 7]);
        let w = weight(g, r, "w", &[16, 8, 3, 3], 0.2);
        let b = f32_weight(g, r, "b", &[16], -1.0, 1.0);
        g.push("y", Op::Conv2d { stride: 1, pad: 1 }, &[x, w, b])
            .unwrap()
    });
    add("conv2d patchify", BF16, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[2, 3, 8, 8]);
        let w = weight(g, r, "w", &[12, 3, 4, 4], 0.2);
        g.push("y", Op::Conv2d { stride: 4, pad: 0 }, &[x, w])
            .unwrap()
    });
    for ac in [false, true] {
        add("resize_bilinear", EXACT, true, &move |g, r, f| {
            let x = input(g, r, f, "x", &[3, 5, 6]);
            let op = Op::ResizeBilinear {
                out_h: 11,
                out_w: 4,
                align_corners: ac,
            };
            g.push("y", op, &[x]).unwrap()
        });
    }
    add("pixel_shuffle_down", EXACT, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[1, 5, 7, 6]);
        g.push("y", Op::PixelShuffleDown, &[x]).unwrap()
    });
    add("pixel_shuffle_up", EXACT, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[1, 3, 4, 8]);
        g.push("y", Op::PixelShuffleUp, &[x]).unwrap()
    });
    let attn = |heads, causal, window, q_offset| Op::Attention {
        heads,
        scale: 0.125,
        causal,
        window,
        q_offset,
    };
    add(
        "attention hd 16 (fallback)",
        REDUCE,
        false,
        &move |g, r, f| {
            let q = input(g, r, f, "q", &[5, 32]);
            let k = input(g, r, f, "k", &[7, 32]);
            let v = input(g, r, f, "v", &[7, 32]);
            g.push("y", attn(2, false, None, 0), &[q, k, v]).unwrap()
        },
    );
    for hd in [64usize, 72, 96] {
        add("attention (flash)", BF16, true, &move |g, r, f| {
            let q = input(g, r, f, "q", &[37, 2 * hd]);
            let k = input(g, r, f, "k", &[45, 2 * hd]);
            let v = input(g, r, f, "v", &[45, 2 * hd]);
            g.push("y", attn(2, false, None, 0), &[q, k, v]).unwrap()
        });
    }
    add(
        "attention causal window (flash)",
        BF16,
        true,
        &move |g, r, f| {
            let q = input(g, r, f, "q", &[20, 2 * 96]);
            let k = input(g, r, f, "k", &[28, 2 * 96]);
            let v = input(g, r, f, "v", &[28, 2 * 96]);
            g.push("y", attn(2, true, Some(9), 8), &[q, k, v]).unwrap()
        },
    );
    add("masked attention 8x32", BF16, true, &move |g, r, f| {
        let q = input(g, r, f, "q", &[10, 256]);
        let k = input(g, r, f, "k", &[50, 256]);
        let v = input(g, r, f, "v", &[50, 256]);
        let logits = input(g, r, f, "logits", &[10, 50]);
        let keep = g.push("keep", Op::Seg(SegOp::MaskKeep), &[logits]).unwrap();
        g.push("y", attn(8, false, None, 0), &[q, k, v, keep])
            .unwrap()
    });
    add(
        "attention 8x32 unmasked (masked kernel)",
        BF16,
        true,
        &move |g, r, f| {
            let q = input(g, r, f, "q", &[12, 256]);
            let k = input(g, r, f, "k", &[12, 256]);
            let v = input(g, r, f, "v", &[12, 256]);
            g.push("y", attn(8, false, None, 0), &[q, k, v]).unwrap()
        },
    );
    add("add", EXACT, true, &|g, r, f| {
        let a = input(g, r, f, "a", &[3, 17]);
        let b = input(g, r, f, "b", &[3, 17]);
        g.push("y", Op::Add, &[a, b]).unwrap()
    });
    add("mul", EXACT, true, &|g, r, f| {
        let a = input(g, r, f, "a", &[3, 17]);
        let b = f32_weight(g, r, "b", &[3, 17], -1.0, 1.0);
        g.push("y", Op::Mul, &[a, b]).unwrap()
    });
    add("add_row", EXACT, true, &|g, r, f| {
        let a = input(g, r, f, "a", &[2, 3, 17]);
        let b = f32_weight(g, r, "b", &[17], -1.0, 1.0);
        g.push("y", Op::AddRow, &[a, b]).unwrap()
    });
    add("scale", EXACT, true, &|g, r, f| {
        let a = input(g, r, f, "a", &[3, 17]);
        g.push("y", Op::Scale(-0.37), &[a]).unwrap()
    });
    add("concat", EXACT, true, &|g, r, f| {
        let a = input(g, r, f, "a", &[2, 3, 5]);
        let b = input(g, r, f, "b", &[2, 4, 5]);
        let c = input(g, r, f, "c", &[2, 1, 5]);
        g.push("y", Op::Concat { axis: 1 }, &[a, b, c]).unwrap()
    });
    add("reshape + permute", EXACT, true, &|g, r, f| {
        let a = input(g, r, f, "a", &[2, 3, 20]);
        let v = g.push("v", Op::Reshape([2, 3, 4, 5].into()), &[a]).unwrap();
        g.push("y", Op::Permute(vec![2, 0, 3, 1]), &[v]).unwrap()
    });
    add("narrow", EXACT, true, &|g, r, f| {
        let a = input(g, r, f, "a", &[4, 9, 3]);
        g.push(
            "y",
            Op::Narrow {
                axis: 1,
                start: 2,
                len: 5,
            },
            &[a],
        )
        .unwrap()
    });
    add("gather (bf16 table)", EXACT, true, &|g, r, _f| {
        let t = weight(g, r, "table", &[30, 24], 1.0);
        g.push(
            "y",
            Op::Gather {
                ids: vec![3, 0, 29, 3, 7],
            },
            &[t],
        )
        .unwrap()
    });
    add("sam_attention window (kernel)", BF16, true, &|g, r, f| {
        let qkv = input(g, r, f, "qkv", &[36, 3 * 128]);
        let rh = f32_weight(g, r, "rh", &[7, 64], -0.5, 0.5);
        let rw = f32_weight(g, r, "rw", &[7, 64], -0.5, 0.5);
        let b = f32_weight(g, r, "b", &[3 * 128], -0.5, 0.5);
        let op = Op::SamAttention {
            heads: 2,
            window: Some(4),
            grid_h: 6,
            grid_w: 6,
        };
        g.push("y", op, &[qkv, rh, rw, b]).unwrap()
    });
    add("sam_attention global (kernel)", BF16, true, &|g, r, f| {
        let qkv = input(g, r, f, "qkv", &[25, 3 * 64]);
        let rh = f32_weight(g, r, "rh", &[9, 64], -0.5, 0.5);
        let rw = f32_weight(g, r, "rw", &[9, 64], -0.5, 0.5);
        let op = Op::SamAttention {
            heads: 1,
            window: None,
            grid_h: 5,
            grid_w: 5,
        };
        g.push("y", op, &[qkv, rh, rw]).unwrap()
    });
    add(
        "sam_attention hd 16 (fallback)",
        REDUCE,
        false,
        &|g, r, f| {
            let qkv = input(g, r, f, "qkv", &[16, 3 * 32]);
            let rh = f32_weight(g, r, "rh", &[7, 16], -0.5, 0.5);
            let rw = f32_weight(g, r, "rw", &[7, 16], -0.5, 0.5);
            let op = Op::SamAttention {
                heads: 2,
                window: None,
                grid_h: 4,
                grid_w: 4,
            };
            g.push("y", op, &[qkv, rh, rw]).unwrap()
        },
    );
    let levels = vec![(6, 5), (3, 3), (2, 2)];
    for with_ref in [false, true] {
        let levels = levels.clone();
        add("ms_deform_attn (kernel)", REDUCE, true, &move |g, r, f| {
            let s: usize = levels.iter().map(|&(h, w)| h * w).sum();
            let nq = if with_ref { 7 } else { s };
            let (heads, points) = (2, 4);
            let value = input(g, r, f, "value", &[s, heads * 16]);
            let off = input(g, r, f, "off", &[nq, heads * 3 * points * 2]);
            let logits = input(g, r, f, "logits", &[nq, heads * 3 * points]);
            let op = Op::Seg(SegOp::MsDeformAttn {
                heads,
                points,
                levels: levels.clone(),
            });
            if with_ref {
                let id = g.input("ref", [nq, 2]).unwrap();
                f.push((
                    id,
                    Tensor::from_f32(r.vec(2 * nq, 0.05, 0.95), [nq, 2]).unwrap(),
                ));
                g.push("y", op, &[value, off, logits, id]).unwrap()
            } else {
                g.push("y", op, &[value, off, logits]).unwrap()
            }
        });
    }
    add(
        "ms_deform_attn 2 levels (fallback)",
        REDUCE,
        false,
        &|g, r, f| {
            let levels = vec![(4, 4), (2, 2)];
            let value = input(g, r, f, "value", &[20, 16]);
            let off = input(g, r, f, "off", &[20, 2 * 2 * 2]);
            let logits = input(g, r, f, "logits", &[20, 2 * 2]);
            let op = Op::Seg(SegOp::MsDeformAttn {
                heads: 1,
                points: 2,
                levels,
            });
            g.push("y", op, &[value, off, logits]).unwrap()
        },
    );
    add("mask_keep", EXACT, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[4, 33]);
        g.push("y", Op::Seg(SegOp::MaskKeep), &[x]).unwrap()
    });
    add("l2_normalize", REDUCE, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[5, 300]);
        g.push("y", Op::Seg(SegOp::L2Normalize { eps: 1e-12 }), &[x])
            .unwrap()
    });
    add("clamp", EXACT, true, &|g, r, f| {
        let x = input(g, r, f, "x", &[5, 30]);
        g.push(
            "y",
            Op::Seg(SegOp::Clamp {
                min: -0.5,
                max: 1.25,
            }),
            &[x],
        )
        .unwrap()
    });
    out
}

#[test]
fn every_op_matches_the_cpu_executor() {
    let Some(b) = gpu::backend("cuda_executor", "every_op_matches_the_cpu_executor") else {
        return;
    };
    let mut cuda = exec(b);
    let mut kinds = std::collections::BTreeSet::new();
    for c in cases() {
        let plan = Plan::new(&c.g, &[]).unwrap();
        let feeds: Vec<(NodeId, &Tensor)> = c.feeds.iter().map(|(i, t)| (*i, t)).collect();
        let want = Executor::new().run(&c.g, &plan, &feeds).unwrap();
        let before: usize = cuda.fallbacks().values().sum();
        let got = cuda.run(&c.g, &plan, &feeds).unwrap();
        let fell_back = cuda.fallbacks().values().sum::<usize>() > before;
        assert_eq!(fell_back, !c.kernel, "{}: fallback {fell_back}", c.name);
        let (w, gt) = (want.get(c.out).unwrap(), got.get(c.out).unwrap());
        assert!(gt.is_host());
        assert_eq!(w.dims(), gt.dims(), "{}", c.name);
        close(
            c.name,
            &w.to_vec_f32().unwrap(),
            &gt.to_vec_f32().unwrap(),
            c.tol,
        );
        kinds.insert(c.g.node(c.out).op.kind());
    }
    println!(
        "compared {} op kinds; fallbacks {:?}",
        kinds.len(),
        cuda.fallbacks()
    );
}

/// One paged-attention step: q, k, v inputs for `t` tokens at `pos0`.
fn paged_step(
    t: usize,
    pos0: usize,
    heads: usize,
    hd: usize,
    window: Option<usize>,
) -> (Graph, [NodeId; 4]) {
    let mut g = Graph::new();
    let q = g.input("q", [t, heads * hd]).unwrap();
    let k = g.input("k", [t, heads * hd]).unwrap();
    let v = g.input("v", [t, heads * hd]).unwrap();
    let scale = 1.0 / (hd as f32).sqrt();
    let op = Op::PagedAttention {
        layer: 1,
        pos0,
        heads,
        head_dim: hd,
        scale,
        window,
    };
    let o = g.push("o", op, &[q, k, v]).unwrap();
    g.mark_output(o);
    (g, [q, k, v, o])
}

#[test]
fn paged_attention_with_a_forked_prefix_matches_the_cpu() {
    let Some(b) = gpu::backend(
        "cuda_executor",
        "paged_attention_with_a_forked_prefix_matches_the_cpu",
    ) else {
        return;
    };
    let mut cuda = exec(b);
    // hd 64 and 96 run on kernels (flash prefill, paged decode / prefill); 16 falls back.
    for (hd, kernel) in [(64usize, true), (96, true), (16, false)] {
        let heads = 2;
        let window = Some(40);
        let cfg = KvConfig {
            num_layers: 2,
            kv_dim: heads * hd,
            block_size: 16,
            num_blocks: 16,
        };
        let mut host = PagedKvCache::new(cfg).unwrap();
        let mut meta = PagedKvCache::metadata_only(cfg);
        assert!(meta.is_metadata_only() && !host.is_metadata_only());
        let (a_h, a_m) = (host.new_sequence(), meta.new_sequence());
        let mut rng = Rng(hd as u64);
        let mut cpu = Executor::new();
        let before: usize = cuda.fallbacks().values().sum();
        let mut step = |cpu: &mut Executor,
                        cuda: &mut CudaExecutor,
                        host: &mut PagedKvCache,
                        meta: &mut PagedKvCache,
                        (sh, sm),
                        t: usize,
                        what: String| {
            let pos0 = host.len(sh).unwrap();
            host.append(sh, t).unwrap();
            meta.append(sm, t).unwrap();
            let (g, [q, k, v, o]) = paged_step(t, pos0, heads, hd, window);
            let plan = Plan::new(&g, &[]).unwrap();
            let vals: Vec<Tensor> = (0..3)
                .map(|_| {
                    Tensor::from_f32(rng.bf16_vec(t * heads * hd, -1.0, 1.0), [t, heads * hd])
                        .unwrap()
                })
                .collect();
            let feeds = [(q, &vals[0]), (k, &vals[1]), (v, &vals[2])];
            let want = cpu
                .run_with_kv(&g, &plan, &feeds, Some((host, sh)))
                .unwrap();
            let got = cuda
                .run_with_kv(&g, &plan, &feeds, Some((meta, sm)))
                .unwrap();
            close(
                &what,
                &want.get(o).unwrap().to_vec_f32().unwrap(),
                &got.get(o).unwrap().to_vec_f32().unwrap(),
                BF16,
            );
        };
        // Prefill 20 tokens (a partial second block), fork, then decode on the fork: its first
        // append copies the shared partial block (copy on write, replayed on the device).
        step(
            &mut cpu,
            &mut cuda,
            &mut host,
            &mut meta,
            (a_h, a_m),
            20,
            format!("hd {hd} prefill"),
        );
        let (b_h, b_m) = (host.fork(a_h).unwrap(), meta.fork(a_m).unwrap());
        for i in 0..20 {
            step(
                &mut cpu,
                &mut cuda,
                &mut host,
                &mut meta,
                (b_h, b_m),
                1,
                format!("hd {hd} decode {i}"),
            );
            if i == 0 {
                assert_eq!(
                    host.block_table(b_h).unwrap(),
                    meta.block_table(b_m).unwrap()
                );
            }
        }
        // The parent is untouched by the fork's writes; a multi-token suffix (paged prefill).
        step(
            &mut cpu,
            &mut cuda,
            &mut host,
            &mut meta,
            (a_h, a_m),
            5,
            format!("hd {hd} parent suffix"),
        );
        let fell_back = cuda.fallbacks().values().sum::<usize>() > before;
        assert_eq!(
            fell_back,
            !kernel,
            "hd {hd}: fallbacks {:?}",
            cuda.fallbacks()
        );
        meta.check_consistency().unwrap();
    }
}
