//! Shared by the CUDA benches (`#[path = "gpu_common/mod.rs"] mod gpu_common;`): the card's
//! measured ceilings and the machine-readable lines of scripts/gpu-bundle.sh:
//!
//!   RATE <name> median_ms=<t> tflops=<f>|gbs=<g> [target=<percent>]
//!   CEILING gemm_bf16 tflops=<f>  /  CEILING copy gbs=<g>
//!
//! `target` is the share of the ceiling an issue asks for (the table shows it next to the ratio).
#![allow(dead_code)]

use half::bf16;
use std::time::Duration;
use xsam::backend::cuda::{CudaBackend, Epilogue};
use xsam::{DType, Tensor};

/// Number of timed batches: `XSAM_BENCH_ROUNDS` (run.sh sets it) or `default`.
pub fn rounds(default: usize) -> usize {
    std::env::var("XSAM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&r| r > 0)
        .unwrap_or(default)
}

/// A bf16 device tensor of seeded values in [-0.1, 0.1).
pub fn rand_bf16(b: &CudaBackend, shape: &[usize], seed: u64) -> xsam::Result<Tensor> {
    rand_bf16_in(b, shape, seed, 0.1)
}

/// A bf16 device tensor of seeded values in [-amp, amp).
pub fn rand_bf16_in(b: &CudaBackend, shape: &[usize], seed: u64, amp: f32) -> xsam::Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed;
    let v: Vec<bf16> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 * amp - amp)
        })
        .collect();
    b.to_device(&Tensor::from_vec(v, shape.to_vec())?)
}

/// Launches queued per timed batch.
pub const REPS: usize = 20;

/// Median GPU milliseconds of one call of `f`: a spin kernel holds the GPU while `REPS` calls are
/// queued, then CUDA events around the batch give back-to-back GPU time per call (no host launch
/// gaps); the median over `rounds` batches, after one warm-up call.
pub fn time_median(
    b: &CudaBackend,
    rounds: usize,
    f: &dyn Fn() -> xsam::Result<()>,
) -> xsam::Result<f64> {
    f()?; // warm-up (plan creation, pool growth)
    b.synchronize()?;
    let mut t = Vec::with_capacity(rounds.max(1));
    for _ in 0..rounds.max(1) {
        b.spin(Duration::from_millis(2))?;
        let ms = b.time_queued(|| {
            for _ in 0..REPS {
                f()?;
            }
            Ok(())
        })?;
        t.push(ms as f64 / REPS as f64);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// The bandwidth ceiling: a 1 GiB device-to-device copy (read + write bytes), median of 10;
/// prints its CEILING line.
pub fn copy_ceiling_gbs(b: &CudaBackend) -> xsam::Result<f64> {
    let bw = b.copy_bandwidth_gbs(1 << 30, 10)?;
    println!("CEILING copy gbs={bw:.1}");
    Ok(bw)
}

/// The compute ceiling: an 8192³ bf16 GEMM through cuBLASLt (bf16 out); prints its CEILING line.
pub fn gemm_ceiling_tflops(b: &CudaBackend, rounds: usize) -> xsam::Result<f64> {
    let sq = 8192;
    let xa = rand_bf16(b, &[sq, sq], 1)?;
    let xb = rand_bf16(b, &[sq, sq], 2)?;
    let ms = time_median(b, rounds.min(5), &|| {
        b.gemm(&xa, &xb, true, None, Epilogue::None, DType::BF16)
            .map(drop)
    })?;
    let peak = 2.0 * (sq as f64).powi(3) / (ms * 1e-3) / 1e12;
    println!("CEILING gemm_bf16 tflops={peak:.1} (8192^3 bf16, {ms:.3} ms)");
    Ok(peak)
}

/// An achieved rate: compute (TFLOP/s) or memory (GB/s).
#[derive(Clone, Copy, Debug)]
pub enum Rate {
    Tflops(f64),
    Gbs(f64),
}

impl Rate {
    /// `work` FLOPs or bytes done in `ms` milliseconds.
    pub fn flops(work: f64, ms: f64) -> Rate {
        Rate::Tflops(work / (ms * 1e-3) / 1e12)
    }

    pub fn bytes(work: f64, ms: f64) -> Rate {
        Rate::Gbs(work / (ms * 1e-3) / 1e9)
    }

    /// "12.3 TFLOP/s" or "2345 GB/s".
    pub fn show(&self) -> String {
        match *self {
            Rate::Tflops(t) => format!("{t:.1} TFLOP/s"),
            Rate::Gbs(g) => format!("{g:.0} GB/s"),
        }
    }

    /// Share of the matching ceiling (`None` when that ceiling was not measured).
    pub fn ratio(&self, gemm_tflops: Option<f64>, copy_gbs: Option<f64>) -> Option<f64> {
        match *self {
            Rate::Tflops(t) => gemm_tflops.map(|c| t / c),
            Rate::Gbs(g) => copy_gbs.map(|c| g / c),
        }
    }
}

/// Prints the RATE line of `name` (no spaces): median and achieved rate, and the target share of
/// the ceiling in percent where an issue sets one.
pub fn print_rate(name: &str, median_ms: f64, rate: Rate, target_pct: Option<u32>) {
    assert!(
        !name.contains(char::is_whitespace),
        "RATE name {name:?} has spaces"
    );
    let r = match rate {
        Rate::Tflops(t) => format!("tflops={t:.1}"),
        Rate::Gbs(g) => format!("gbs={g:.1}"),
    };
    let t = target_pct.map_or(String::new(), |p| format!(" target={p}"));
    println!("RATE {name} median_ms={median_ms:.4} {r}{t}");
}
