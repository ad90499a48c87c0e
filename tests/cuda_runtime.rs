//! CUDA runtime tests: cuBLASLt GEMMs against an f64 CPU reference, the memory pool's reuse over
//! repeated forward passes, and CUDA graph capture / replay / update against eager execution.
//!
//! Without a driver, a device or compiled kernels every test prints
//! `SKIP cuda_runtime::<test>: <reason>` and passes (`XSAM_REQUIRE_GPU=1` makes that a failure).
//! Allocations are poisoned (0xFF bytes = NaN), so an output element cuBLASLt or a kernel does not
//! write reads as NaN, and every comparison is written so that NaN fails it.
//!
//! GEMM tolerances (per element, against the f64 product of the same bf16-rounded inputs):
//! - accumulation: the products of two bf16 values are exact in f32; summing k of them in f32 (in
//!   whatever order and split the chosen kernel uses) errs by at most about k·2^-24·Σ|a·b|; we
//!   allow twice that, k·2^-23·Σ|a·b|;
//! - output rounding: half an ulp of the output, 2^-9·|y| for bf16 and 2^-24·|y| for f32;
//! - the bias is added in the output dtype (rounded to bf16 first for a bf16 output: the
//!   reference rounds it too);
//! - GELU: cuBLASLt's tanh-approximate GELU may use a fast tanh; 1e-4·(1 + |x|) more. Its slope
//!   is below 1.13 and ReLU's is at most 1, so the accumulation term is scaled by 1.2 after them.
//!
//! Machine-readable lines for scripts/gpu-bundle.sh: `PARITY <name> max_abs=<x> max_rel=<y>`.

mod gpu;
use half::bf16;
use xsam::backend::cuda::{CudaBackend, Epilogue, GraphUpdate};
use xsam::{DType, Error, Tensor};

use gpu::Rng;

fn backend(test: &str) -> Option<CudaBackend> {
    gpu::backend("cuda_runtime", test)
}

/// A device tensor of `vals` stored as `dt`.
fn dev(b: &CudaBackend, vals: &[f32], shape: &[usize], dt: DType) -> Tensor {
    let h = Tensor::from_vec(vals.to_vec(), shape.to_vec()).expect("host tensor");
    let h = h.to_dtype(dt).expect("to_dtype");
    b.to_device(&h).expect("to_device")
}

fn host_f32(b: &CudaBackend, t: &Tensor) -> Vec<f32> {
    b.to_host(t)
        .expect("to_host")
        .to_vec_f32()
        .expect("to_vec_f32")
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

fn gelu_tanh(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

/// One GEMM problem on the host: `a [batch, m, k]`, `b [batch, n, k]` (transposed) or
/// `[batch, k, n]`, values already as the GPU sees them (bf16-rounded).
struct Problem<'a> {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &'a [f32],
    b: &'a [f32],
    b_transposed: bool,
    /// Already rounded to the output dtype.
    bias: Option<&'a [f32]>,
    epilogue: Epilogue,
    out: DType,
}

/// Worst error seen over a test, for the PARITY line, and the worst error / tolerance.
#[derive(Default)]
struct Worst {
    parity: gpu::Parity,
    ratio: f64,
}

impl Worst {
    fn print(&self, name: &str) {
        self.parity.print(name);
        println!("  {name}: worst err/tol {:.3}", self.ratio);
    }
}

/// Checks `got` against the f64 reference of `p` with the tolerances in the module docs.
fn check_gemm(what: &str, p: &Problem, got: &[f32], worst: &mut Worst) {
    let (m, n, k) = (p.m, p.n, p.k);
    assert_eq!(got.len(), p.batch * m * n, "{what}: output length");
    let out_half_ulp = if p.out == DType::BF16 {
        2f64.powi(-9)
    } else {
        2f64.powi(-24)
    };
    for bi in 0..p.batch {
        let a = &p.a[bi * m * k..(bi + 1) * m * k];
        let b = &p.b[bi * n * k..(bi + 1) * n * k];
        for i in 0..m {
            for j in 0..n {
                let (mut dot, mut mag) = (0f64, 0f64);
                for l in 0..k {
                    let bv = if p.b_transposed {
                        b[j * k + l]
                    } else {
                        b[l * n + j]
                    };
                    let prod = a[i * k + l] as f64 * bv as f64;
                    dot += prod;
                    mag += prod.abs();
                }
                let pre = dot + p.bias.map_or(0.0, |bias| bias[j] as f64);
                let (want, slope, extra) = match p.epilogue {
                    Epilogue::None => (pre, 1.0, 0.0),
                    Epilogue::Relu => (pre.max(0.0), 1.0, 0.0),
                    Epilogue::GeluTanh => (gelu_tanh(pre), 1.2, 1e-4 * (1.0 + pre.abs())),
                };
                let tol = slope * (k as f64) * 2f64.powi(-23) * mag
                    + out_half_ulp * want.abs()
                    + extra
                    + 1e-30;
                let g = got[(bi * m + i) * n + j];
                let err = (g as f64 - want).abs();
                assert!(
                    err <= tol,
                    "{what}: batch {bi} element ({i}, {j}): got {g}, want {want} \
                     (|err| {err:e} > tol {tol:e}); NaN means it was not written"
                );
                worst.parity.add(g as f64, want);
                worst.ratio = worst.ratio.max(err / tol);
            }
        }
    }
}

const EPILOGUES: [(Epilogue, bool); 6] = [
    (Epilogue::None, false),
    (Epilogue::None, true),
    (Epilogue::GeluTanh, true),
    (Epilogue::Relu, true),
    (Epilogue::GeluTanh, false),
    (Epilogue::Relu, false),
];

/// Runs `gemm` on device copies of random bf16 data and checks it.
#[allow(clippy::too_many_arguments)]
fn run_gemm_case(
    b: &CudaBackend,
    rng: &mut Rng,
    (m, n, k): (usize, usize, usize),
    b_transposed: bool,
    (epilogue, with_bias): (Epilogue, bool),
    out: DType,
    operands: DType,
    worst: &mut Worst,
) {
    // f32 operands are cast to bf16 on the device: the reference uses the rounded values.
    let a_raw = rng.vec(m * k, -1.0, 1.0);
    let w_raw = rng.vec(n * k, -1.0, 1.0);
    let bias_raw = rng.vec(n, -1.0, 1.0);
    let (a_h, w_h) = (round_bf16(&a_raw), round_bf16(&w_raw));
    let w_shape = if b_transposed { [n, k] } else { [k, n] };
    let a_d = dev(
        b,
        if operands == DType::F32 { &a_raw } else { &a_h },
        &[m, k],
        operands,
    );
    let w_d = dev(
        b,
        if operands == DType::F32 { &w_raw } else { &w_h },
        &w_shape,
        operands,
    );
    // The bias is given in bf16; cuBLASLt adds it in the output dtype.
    let bias_h = round_bf16(&bias_raw);
    let bias_d = with_bias.then(|| dev(b, &bias_h, &[n], DType::BF16));
    let y = b
        .gemm(&a_d, &w_d, b_transposed, bias_d.as_ref(), epilogue, out)
        .unwrap_or_else(|e| panic!("gemm {m}x{n}x{k}: {e}"));
    assert_eq!(y.dims(), &[m, n]);
    assert_eq!(y.dtype(), out);
    let got = host_f32(b, &y);
    let what = format!(
        "gemm m={m} n={n} k={k} bT={b_transposed} {epilogue:?} bias={with_bias} out={out} \
         operands={operands}"
    );
    check_gemm(
        &what,
        &Problem {
            batch: 1,
            m,
            n,
            k,
            a: &a_h,
            b: &w_h,
            b_transposed,
            bias: with_bias.then_some(&bias_h[..]),
            epilogue,
            out,
        },
        &got,
        worst,
    );
}

const SHAPES: [(usize, usize, usize); 10] = [
    (1, 1, 1),
    (1, 3072, 3072),
    (7, 129, 64),
    (129, 7, 1000),
    (64, 64, 64),
    (1000, 129, 7),
    (129, 1000, 129),
    (3072, 64, 129),
    (7, 3072, 1),
    (1000, 1000, 64),
];

#[test]
fn gemm_matches_cpu_over_shapes() {
    let Some(b) = backend("gemm_matches_cpu_over_shapes") else {
        return;
    };
    let mut rng = Rng(1);
    let (mut w_bf16, mut w_f32) = (Worst::default(), Worst::default());
    let mut case = 0;
    for &shape in &SHAPES {
        for b_transposed in [true, false] {
            for out in [DType::BF16, DType::F32] {
                let epi = EPILOGUES[case % EPILOGUES.len()];
                case += 1;
                let worst = if out == DType::BF16 {
                    &mut w_bf16
                } else {
                    &mut w_f32
                };
                run_gemm_case(
                    &b,
                    &mut rng,
                    shape,
                    b_transposed,
                    epi,
                    out,
                    DType::BF16,
                    worst,
                );
            }
        }
    }
    // Every epilogue with every output dtype at one ragged shape.
    for (i, &epi) in EPILOGUES.iter().enumerate() {
        for out in [DType::BF16, DType::F32] {
            let worst = if out == DType::BF16 {
                &mut w_bf16
            } else {
                &mut w_f32
            };
            run_gemm_case(
                &b,
                &mut rng,
                (33, 65, 129),
                i % 2 == 0,
                epi,
                out,
                DType::BF16,
                worst,
            );
        }
    }
    w_bf16.print("gemm_bf16_out");
    w_f32.print("gemm_f32_out");
}

#[test]
fn gemm_casts_f32_operands_to_bf16() {
    let Some(b) = backend("gemm_casts_f32_operands_to_bf16") else {
        return;
    };
    let mut rng = Rng(2);
    let mut worst = Worst::default();
    for (shape, bt, epi) in [
        ((64, 96, 80), true, EPILOGUES[1]),
        ((7, 129, 1000), false, EPILOGUES[2]),
        ((1, 1024, 4096), true, EPILOGUES[0]),
    ] {
        for out in [DType::BF16, DType::F32] {
            run_gemm_case(&b, &mut rng, shape, bt, epi, out, DType::F32, &mut worst);
        }
    }
    worst.print("gemm_f32_operands");
}

#[test]
fn gemm_flattens_leading_dims_and_reads_views() {
    let Some(b) = backend("gemm_flattens_leading_dims_and_reads_views") else {
        return;
    };
    let mut rng = Rng(3);
    let (m0, m1, n, k) = (3usize, 5usize, 33usize, 7usize);
    // One spare row in front: the view starts 7 bf16 = 14 bytes in (2-byte alignment only), so
    // cuBLASLt must pick a kernel for unaligned operands.
    let a_full = rng.bf16_vec((m0 * m1 + 1) * k, -1.0, 1.0);
    let w = rng.bf16_vec(n * k, -1.0, 1.0);
    let a_dev = dev(&b, &a_full, &[m0 * m1 + 1, k], DType::BF16);
    let a_view = a_dev
        .narrow(0, 1, m0 * m1)
        .and_then(|t| t.reshape(vec![m0, m1, k]))
        .expect("view");
    let w_dev = dev(&b, &w, &[n, k], DType::BF16);
    let y = b
        .gemm(&a_view, &w_dev, true, None, Epilogue::None, DType::F32)
        .expect("gemm on a view");
    assert_eq!(y.dims(), &[m0, m1, n]);
    let mut worst = Worst::default();
    let got = host_f32(&b, &y);
    check_gemm(
        "gemm on an offset view with leading dims",
        &Problem {
            batch: 1,
            m: m0 * m1,
            n,
            k,
            a: &a_full[k..],
            b: &w,
            b_transposed: true,
            bias: None,
            epilogue: Epilogue::None,
            out: DType::F32,
        },
        &got,
        &mut worst,
    );
    worst.print("gemm_view");
}

#[test]
fn gemm_batched_matches_cpu() {
    let Some(b) = backend("gemm_batched_matches_cpu") else {
        return;
    };
    let mut rng = Rng(4);
    let mut worst = Worst::default();
    for (batch, m, n, k) in [
        (16, 129, 64, 72),
        (5, 7, 1, 129),
        (3, 1, 1000, 64),
        (1, 64, 65, 66),
    ] {
        for bt in [true, false] {
            for out in [DType::BF16, DType::F32] {
                let a = rng.bf16_vec(batch * m * k, -1.0, 1.0);
                let w = rng.bf16_vec(batch * n * k, -1.0, 1.0);
                let a_d = dev(&b, &a, &[batch, m, k], DType::BF16);
                let w_shape = if bt { [batch, n, k] } else { [batch, k, n] };
                let w_d = dev(&b, &w, &w_shape, DType::BF16);
                let y = b
                    .gemm_batched(&a_d, &w_d, bt, out)
                    .unwrap_or_else(|e| panic!("gemm_batched {batch}x{m}x{n}x{k}: {e}"));
                assert_eq!(y.dims(), &[batch, m, n]);
                let got = host_f32(&b, &y);
                check_gemm(
                    &format!("gemm_batched B={batch} m={m} n={n} k={k} bT={bt} out={out}"),
                    &Problem {
                        batch,
                        m,
                        n,
                        k,
                        a: &a,
                        b: &w,
                        b_transposed: bt,
                        bias: None,
                        epilogue: Epilogue::None,
                        out,
                    },
                    &got,
                    &mut worst,
                );
            }
        }
    }
    worst.print("gemm_batched");
}

#[test]
fn gemm_zero_sizes() {
    let Some(b) = backend("gemm_zero_sizes") else {
        return;
    };
    // m = 0: an empty output of the right shape.
    let a = b.alloc_tensor(vec![0, 16], DType::BF16).expect("alloc");
    let w = dev(&b, &[0.5; 32], &[2, 16], DType::BF16);
    let y = b
        .gemm(&a, &w, true, None, Epilogue::None, DType::F32)
        .expect("m = 0");
    assert_eq!(y.dims(), &[0, 2]);
    // k = 0: the product is zero, so each row is epilogue(bias).
    let a = b.alloc_tensor(vec![3, 0], DType::BF16).expect("alloc");
    let w = b.alloc_tensor(vec![4, 0], DType::BF16).expect("alloc");
    let bias = dev(&b, &[-1.0, 0.5, 2.0, -0.25], &[4], DType::F32);
    let y = b
        .gemm(&a, &w, true, Some(&bias), Epilogue::Relu, DType::F32)
        .expect("k = 0");
    assert_eq!(y.dims(), &[3, 4]);
    assert_eq!(host_f32(&b, &y), [0.0, 0.5, 2.0, 0.0].repeat(3));
}

#[test]
fn gemm_rejects_bad_inputs_with_errors() {
    let Some(b) = backend("gemm_rejects_bad_inputs_with_errors") else {
        return;
    };
    let a = dev(&b, &[1.0; 12], &[3, 4], DType::BF16);
    let w = dev(&b, &[1.0; 20], &[5, 4], DType::BF16);
    let shape_err = |r: xsam::Result<Tensor>| matches!(r, Err(Error::Shape { .. }));
    // Inner dims differ (w is [5, 4]: as [k, n] its k is 5).
    assert!(shape_err(b.gemm(
        &a,
        &w,
        false,
        None,
        Epilogue::None,
        DType::F32
    )));
    // Bias of the wrong length.
    let bias = dev(&b, &[0.0; 4], &[4], DType::F32);
    assert!(shape_err(b.gemm(
        &a,
        &w,
        true,
        Some(&bias),
        Epilogue::None,
        DType::F32
    )));
    // f16 output is not offered.
    assert!(matches!(
        b.gemm(&a, &w, true, None, Epilogue::None, DType::F16),
        Err(Error::DType { .. })
    ));
    // Host operand.
    let host = Tensor::from_vec(vec![1.0f32; 12], vec![3, 4]).expect("host");
    assert!(b
        .gemm(&host, &w, true, None, Epilogue::None, DType::F32)
        .is_err());
    // Batched: batch counts differ.
    let a3 = dev(&b, &[1.0; 24], &[2, 3, 4], DType::BF16);
    let w3 = dev(&b, &[1.0; 60], &[3, 5, 4], DType::BF16);
    assert!(shape_err(b.gemm_batched(&a3, &w3, true, DType::F32)));
    // The backend still works after the errors.
    let y = b
        .gemm(&a, &w, true, None, Epilogue::None, DType::F32)
        .expect("valid gemm");
    assert_eq!(host_f32(&b, &y), vec![4.0; 15]);
}

#[test]
fn gemm_plans_are_cached_per_shape() {
    let Some(b) = backend("gemm_plans_are_cached_per_shape") else {
        return;
    };
    let mut rng = Rng(5);
    let a = dev(
        &b,
        &rng.bf16_vec(64 * 128, -1.0, 1.0),
        &[64, 128],
        DType::BF16,
    );
    let w = dev(
        &b,
        &rng.bf16_vec(256 * 128, -1.0, 1.0),
        &[256, 128],
        DType::BF16,
    );
    b.gemm(&a, &w, true, None, Epilogue::None, DType::BF16)
        .expect("gemm");
    let after_one = b.gemm_plan_count();
    for _ in 0..10 {
        b.gemm(&a, &w, true, None, Epilogue::None, DType::BF16)
            .expect("gemm");
    }
    assert_eq!(
        b.gemm_plan_count(),
        after_one,
        "a repeated shape must reuse its plan"
    );
    b.gemm(&a, &w, true, None, Epilogue::Relu, DType::BF16)
        .expect("gemm");
    assert_eq!(
        b.gemm_plan_count(),
        after_one + 1,
        "a new epilogue is a new plan"
    );
}

/// A fixed chain of launchers: a "forward pass" of two linear layers with fused epilogues, an
/// element-wise tail and a batched product, every intermediate allocated and dropped.
fn forward(b: &CudaBackend, x: &Tensor, w1: &Tensor, b1: &Tensor, w2: &Tensor) -> Tensor {
    let h = b
        .gemm(x, w1, true, Some(b1), Epilogue::GeluTanh, DType::BF16)
        .expect("gemm 1");
    let y = b
        .gemm(&h, w2, true, None, Epilogue::None, DType::F32)
        .expect("gemm 2");
    let g = b.gelu_erf(&y).expect("gelu");
    let s = b.add(&g, &y).expect("add");
    let s3 = s.reshape(vec![4, 16, 64]).expect("reshape");
    let p = b.gemm_batched(&s3, &s3, true, DType::F32).expect("batched");
    b.cast(&p, DType::BF16).expect("cast")
}

#[test]
fn pool_is_reused_over_1000_forward_passes() {
    let Some(b) = backend("pool_is_reused_over_1000_forward_passes") else {
        return;
    };
    let mut rng = Rng(6);
    let x = dev(&b, &rng.vec(64 * 96, -1.0, 1.0), &[64, 96], DType::F32);
    let w1 = dev(&b, &rng.vec(128 * 96, -0.2, 0.2), &[128, 96], DType::BF16);
    let b1 = dev(&b, &rng.vec(128, -0.2, 0.2), &[128], DType::BF16);
    let w2 = dev(&b, &rng.vec(64 * 128, -0.2, 0.2), &[64, 128], DType::BF16);
    let mut at10 = None;
    for pass in 1..=1000 {
        let out = forward(&b, &x, &w1, &b1, &w2);
        drop(out);
        if pass == 10 {
            b.synchronize().expect("sync");
            at10 = Some(b.pool_stats().expect("pool_stats"));
        }
    }
    b.synchronize().expect("sync");
    let at1000 = b.pool_stats().expect("pool_stats");
    let at10 = at10.expect("stats at pass 10");
    println!("POOL after pass 10: {at10:?}");
    println!("POOL after pass 1000: {at1000:?}");
    assert_eq!(
        at1000.reserved, at10.reserved,
        "the pool grew between pass 10 and pass 1000: freed memory is not being reused"
    );
    assert_eq!(
        at1000.used, at10.used,
        "live pool memory changed: something leaks"
    );
}

#[test]
fn captured_graph_replays_like_eager() {
    let Some(b) = backend("captured_graph_replays_like_eager") else {
        return;
    };
    let mut rng = Rng(7);
    let x = dev(&b, &rng.vec(64 * 96, -1.0, 1.0), &[64, 96], DType::F32);
    let w1 = dev(&b, &rng.vec(128 * 96, -0.2, 0.2), &[128, 96], DType::BF16);
    let b1 = dev(&b, &rng.vec(128, -0.2, 0.2), &[128], DType::BF16);
    let w2 = dev(&b, &rng.vec(64 * 128, -0.2, 0.2), &[64, 128], DType::BF16);
    let eager = host_f32(&b, &forward(&b, &x, &w1, &b1, &w2));

    // The output lives outside the graph: allocated before, written by copy_into.
    let out = b.alloc_tensor(vec![4, 16, 16], DType::BF16).expect("alloc");
    let (graph, ()) = b
        .capture(|| {
            let y = forward(&b, &x, &w1, &b1, &w2);
            b.copy_into(&y, &out)
        })
        .expect("capture");
    println!("captured {graph:?}");
    // Capturing queues nothing: the output is still poisoned (NaN).
    b.synchronize().expect("sync");
    assert!(
        host_f32(&b, &out).iter().all(|v| v.is_nan()),
        "capture ran the work eagerly"
    );

    graph.replay().expect("replay");
    let first = host_f32(&b, &out);
    assert_eq!(
        first.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        eager.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "graph replay differs from eager execution"
    );
    let stats1 = b.pool_stats().expect("pool_stats");
    for _ in 0..100 {
        graph.replay().expect("replay");
    }
    b.synchronize().expect("sync");
    let stats100 = b.pool_stats().expect("pool_stats");
    println!("POOL after 1 replay: {stats1:?}\nPOOL after 101 replays: {stats100:?}");
    assert_eq!(
        stats100.reserved, stats1.reserved,
        "default pool grew over replays"
    );
    assert_eq!(
        stats100.graph_reserved, stats1.graph_reserved,
        "graph memory grew over replays"
    );
    let last = host_f32(&b, &out);
    assert!(first
        .iter()
        .zip(&last)
        .all(|(a, c)| a.to_bits() == c.to_bits()));
    // Bit-identical to eager (asserted above): zero error.
    gpu::Parity::default().print("graph_replay");
}

/// The decode-step pattern: the same chain with a new input pointer and a new scalar argument.
fn step(b: &CudaBackend, x: &Tensor, w: &Tensor, eps: f32, out: &Tensor) -> xsam::Result<()> {
    let h = b.gemm(x, w, true, None, Epilogue::None, DType::F32)?;
    let n = b.rms_norm(&h, None, eps)?;
    b.copy_into(&n, out)
}

#[test]
fn captured_graph_update_takes_new_arguments() {
    let Some(b) = backend("captured_graph_update_takes_new_arguments") else {
        return;
    };
    let mut rng = Rng(8);
    let x1 = dev(&b, &rng.vec(8 * 64, -1.0, 1.0), &[8, 64], DType::BF16);
    let x2 = dev(&b, &rng.vec(8 * 64, -1.0, 1.0), &[8, 64], DType::BF16);
    let w = dev(&b, &rng.vec(32 * 64, -0.5, 0.5), &[32, 64], DType::BF16);
    let (eps1, eps2) = (1e-6f32, 4.0f32);
    let eager_out = b.alloc_tensor(vec![8, 32], DType::F32).expect("alloc");
    step(&b, &x1, &w, eps1, &eager_out).expect("eager 1");
    let want1 = host_f32(&b, &eager_out);
    step(&b, &x2, &w, eps2, &eager_out).expect("eager 2");
    let want2 = host_f32(&b, &eager_out);
    assert_ne!(want1, want2);

    let out = b.alloc_tensor(vec![8, 32], DType::F32).expect("alloc");
    let (mut graph, ()) = b
        .capture(|| step(&b, &x1, &w, eps1, &out))
        .expect("capture");
    graph.replay().expect("replay");
    assert_eq!(host_f32(&b, &out), want1);

    // Through update() with a separately captured graph...
    let (newer, ()) = b
        .capture(|| step(&b, &x2, &w, eps2, &out))
        .expect("capture 2");
    let how = graph.update(newer).expect("update");
    println!("update(): {how:?}");
    graph.replay().expect("replay");
    assert_eq!(host_f32(&b, &out), want2, "after update ({how:?})");

    // ...and through recapture (the new capture is only instantiated if the update fails).
    let (how, ()) = b
        .recapture(&mut graph, || step(&b, &x1, &w, eps1, &out))
        .expect("recapture");
    println!("recapture(): {how:?}");
    assert!(matches!(
        how,
        GraphUpdate::Updated | GraphUpdate::Reinstantiated
    ));
    graph.replay().expect("replay");
    assert_eq!(host_f32(&b, &out), want1, "after recapture ({how:?})");
}

#[test]
fn failed_capture_ends_cleanly() {
    let Some(b) = backend("failed_capture_ends_cleanly") else {
        return;
    };
    let x = dev(&b, &[1.0; 64], &[8, 8], DType::F32);
    // An error from the closure is returned as is.
    let r = b.capture(|| -> xsam::Result<()> {
        let _y = b.gelu_erf(&x)?;
        Err(Error::Input("stop here".into()))
    });
    assert!(matches!(r, Err(Error::Input(ref m)) if m == "stop here"));
    // Waiting for the GPU inside a capture is refused by the driver: an error, not a hang.
    let r = b.capture(|| b.to_host(&x).map(|_| ()));
    assert!(r.is_err(), "to_host inside a capture must fail");
    println!(
        "to_host inside a capture: {}",
        r.err().map(|e| e.to_string()).unwrap_or_default()
    );
    // The stream is out of capture mode and usable.
    let y = b.gelu_erf(&x).expect("eager after failed captures");
    let got = host_f32(&b, &y);
    let want = 0.5 * (1.0 + libm_erf(1.0 / 2f64.sqrt()));
    assert!(got.iter().all(|&v| (v as f64 - want).abs() < 1e-6));
}

/// erf(x) for 0 <= x <= 1 by its Maclaurin series (converges fast there).
fn libm_erf(x: f64) -> f64 {
    let (mut sum, mut term) = (0.0, x);
    for n in 0..30 {
        sum += term / (2 * n + 1) as f64;
        term *= -x * x / (n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn upload_bf16_converts_in_chunks() {
    let Some(b) = backend("upload_bf16_converts_in_chunks") else {
        return;
    };
    let mut rng = Rng(9);
    // Just over one chunk of bf16, from f32: two copies.
    let n = xsam::backend::cuda::UPLOAD_CHUNK_BYTES / 2 + 3;
    let v = rng.vec(n, -3.0, 3.0);
    let host = Tensor::from_vec(v.clone(), vec![n]).expect("host");
    let mut calls = Vec::new();
    let d = b
        .upload_bf16(&host, &mut |done| calls.push(done))
        .expect("upload");
    assert_eq!(d.dtype(), DType::BF16);
    assert_eq!(
        calls,
        vec![(n - 3) * 4, n * 4],
        "progress after each chunk, in source bytes"
    );
    let got = b.to_host(&d).expect("to_host");
    let got = got.as_slice::<bf16>().expect("bf16");
    assert!(got
        .iter()
        .zip(&v)
        .all(|(g, &x)| g.to_bits() == bf16::from_f32(x).to_bits()));
    // f16 and bf16 sources, a strided view.
    let h16 = Tensor::from_vec(v[..600].to_vec(), vec![20, 30])
        .and_then(|t| t.to_dtype(DType::F16))
        .expect("f16");
    let t = h16.transpose(0, 1).expect("transpose");
    let d = b.upload_bf16(&t, &mut |_| {}).expect("upload f16 view");
    assert_eq!(d.dims(), &[30, 20]);
    let want: Vec<f32> = t
        .to_vec_f32()
        .expect("f32")
        .iter()
        .map(|&x| bf16::from_f32(x).to_f32())
        .collect();
    assert_eq!(host_f32(&b, &d), want);
}

#[test]
fn budget_fails_with_a_clear_message() {
    let Some(b) = backend("budget_fails_with_a_clear_message") else {
        return;
    };
    let (free, total) = b.mem_info().expect("mem_info");
    b.check_budget(&[("weights", 1 << 20), ("arena", 1 << 20)])
        .expect("2 MiB fits");
    let err = b
        .check_budget(&[("weights", free), ("kv pool", total)])
        .expect_err("more than the card");
    let msg = err.to_string();
    println!("{msg}");
    assert!(matches!(err, Error::OutOfMemory(_)));
    assert!(msg.contains("weights") && msg.contains("kv pool") && msg.contains("free of"));
}
