//! `linear` against the `gemm` crate's own f32 rate on an encoder-sized product
//! (m, k, n) = (1024, 4096, 1024). Target: bf16-weight `linear` >= 70% of plain f32 gemm.
//! Reports are in elements = FLOPs (2·m·k·n per iteration), so criterion prints GFLOP/s as Gelem/s.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use half::bf16;
use std::hint::black_box;
use std::time::Duration;
use xsam::backend::cpu::{linear, WeightRef};

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let (m, k, n) = (1024usize, 4096usize, 1024usize);
    let x = data(m * k, 1);
    let w = data(n * k, 2);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut out = vec![0f32; m * n];

    let mut g = c.benchmark_group(format!("matmul_{m}x{k}x{n}"));
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements((2 * m * k * n) as u64));

    g.bench_function("a_gemm_crate_f32", |b| {
        b.iter(|| {
            // SAFETY: x is m×k row-major, w is n×k row-major read as k×n (rs 1, cs k), out m×n.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
            black_box(&out);
        })
    });
    g.bench_function("b_linear_bf16_weights", |b| {
        b.iter(|| {
            linear(&x, m, k, WeightRef::BF16(&wb), n, None, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.bench_function("c_linear_f32_weights", |b| {
        b.iter(|| {
            linear(&x, m, k, WeightRef::F32(&w), n, None, &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
