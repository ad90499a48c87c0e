//! Shared by the GPU test files: the skip rule, a seeded random generator, an f64 LayerNorm and
//! the PARITY line of the GPU suite's table.
#![allow(dead_code)]

use half::bf16;
use xsam::backend::cuda::{self, CudaBackend};

/// The backend on device 0 with poisoned allocations (so unwritten outputs read as NaN), or
/// `None` after printing why `suite::test` is skipped. `XSAM_REQUIRE_GPU=1` turns a skip into a
/// failure (CI sets it when a GPU is visible).
pub fn backend(suite: &str, test: &str) -> Option<CudaBackend> {
    let reason = if let Err(r) = cuda::driver_version() {
        Some(r)
    } else if cuda::device_count() == 0 {
        Some("no CUDA device found".to_string())
    } else if !cuda::kernels_compiled() {
        Some("built without kernels (nvcc was not found at build time)".to_string())
    } else {
        None
    };
    if let Some(reason) = reason {
        if std::env::var("XSAM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
            panic!("XSAM_REQUIRE_GPU=1 but {suite}::{test} cannot run: {reason}");
        }
        println!("SKIP {suite}::{test}: {reason}");
        return None;
    }
    // Driver, device and kernels are all there: a failure to open is a real failure, except on a
    // GPU older than the kernels' minimum (sm_80), which is unsupported rather than broken.
    let b = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) if e.to_string().contains("compute capability") => {
            println!("SKIP {suite}::{test}: {e}");
            return None;
        }
        Err(e) => panic!("CudaBackend::new(0) failed: {e}"),
    };
    b.set_poison_allocations(true);
    println!("{suite}::{test} on {b:?}");
    Some(b)
}

/// Deterministic pseudo-random numbers (SplitMix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    /// `n` values in [lo, hi) already rounded to bf16 (kept as f32).
    pub fn bf16_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n)
            .map(|_| bf16::from_f32(self.uniform(lo, hi)).to_f32())
            .collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// f64 LayerNorm of one row (two-pass, biased variance), the reference for the norm kernels.
pub fn layer_norm_ref(x: &[f32], w: Option<&[f32]>, b: Option<&[f32]>, eps: f32) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let inv = 1.0 / (var + eps as f64).sqrt();
    (0..x.len())
        .map(|c| {
            let mut y = (x[c] as f64 - mean) * inv;
            if let Some(w) = w {
                y *= w[c] as f64;
            }
            if let Some(b) = b {
                y += b[c] as f64;
            }
            y
        })
        .collect()
}

/// The worst error of a group of GPU-vs-reference comparisons, for the suite's table: printed as
/// `PARITY <name> max_abs=<x> max_rel=<y>` (scripts/gpu-bundle.sh parses it). The relative error
/// divides by `max(|want|, 1e-3)` so that values near zero do not dominate it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Parity {
    pub abs: f64,
    pub rel: f64,
}

impl Parity {
    /// Records one compared element.
    pub fn add(&mut self, got: f64, want: f64) {
        let err = (got - want).abs();
        self.abs = self.abs.max(err);
        self.rel = self.rel.max(err / want.abs().max(1e-3));
    }

    /// Folds in the worst errors of another comparison.
    pub fn merge(&mut self, other: Parity) {
        self.abs = self.abs.max(other.abs);
        self.rel = self.rel.max(other.rel);
    }

    /// Prints the PARITY line; call it only after the comparisons passed. `name` has no spaces.
    pub fn print(&self, name: &str) {
        assert!(!name.contains(char::is_whitespace), "PARITY name {name:?}");
        println!(
            "PARITY {name} max_abs={:.3e} max_rel={:.3e}",
            self.abs, self.rel
        );
    }
}
