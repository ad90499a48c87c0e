//! Activations (in place), the Phi-3 SiLU gate and row softmax.
//!
//! Transcendentals use the branch-free exp in `simd` so the loops vectorise; chunks of a large
//! slice run on rayon threads.

use super::simd::{exp_f32, exp_f64, max_generic, sum_generic};
use super::{check_len, numel};
use crate::{Error, Result};
use rayon::prelude::*;

/// Elements per rayon task for elementwise work.
const CHUNK: usize = 1 << 14;

/// erfc(z) for z >= 0: Numerical Recipes `erfcc` (Chebyshev fit of log erfc), evaluated in f64.
/// Fractional error below 1.2e-7 for every z >= 0 (checked against an f64 series/continued
/// fraction in tests/cpu_ops.rs).
#[inline(always)]
fn erfc_nonneg(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp_f64(-z * z + p)
}

/// Error function. Relative error below 1.2e-7 (plus the final f32 rounding): a Taylor series for
/// |x| < 0.5, where 1 - erfc would lose relative accuracy, and 1 - erfc(|x|) above.
pub fn erf(x: f32) -> f32 {
    let xd = x as f64;
    let z = xd.abs();
    let r = if z < 0.5 {
        // 2/√π Σ (-1)^n z^(2n+1) / (n! (2n+1)); 12 terms reach 1e-16 at z = 0.5.
        let z2 = z * z;
        let mut term = z;
        let mut sum = z;
        for n in 1..12 {
            term *= -z2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        1.0 - erfc_nonneg(z)
    };
    (if xd < 0.0 { -r } else { r }) as f32
}

/// GELU with exact erf: x/2 · erfc(-x/√2). Written with erfc so both tails keep relative
/// accuracy: max relative error about 1.3e-7 (erfc's 1.2e-7 plus rounding).
#[inline(always)]
fn gelu_erf_scalar(x: f32) -> f32 {
    let xd = x as f64;
    let a = erfc_nonneg((xd * std::f64::consts::FRAC_1_SQRT_2).abs());
    let e = if xd <= 0.0 { a } else { 2.0 - a };
    (0.5 * xd * e) as f32
}

/// PyTorch gelu(approximate='tanh'): x/2·(1 + tanh(y)) = x·sigmoid(2y), the sigmoid form avoiding
/// the cancellation of 1 + tanh in the negative tail.
#[inline(always)]
fn gelu_tanh_scalar(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let y = C * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_f32(-2.0 * y))
}

#[inline(always)]
fn silu_scalar(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

simd_fn! {
    fn gelu_erf_chunk(x: &mut [f32]) { for v in x.iter_mut() { *v = gelu_erf_scalar(*v); } }
}
simd_fn! {
    fn gelu_tanh_chunk(x: &mut [f32]) { for v in x.iter_mut() { *v = gelu_tanh_scalar(*v); } }
}
simd_fn! {
    fn silu_chunk(x: &mut [f32]) { for v in x.iter_mut() { *v = silu_scalar(*v); } }
}
simd_fn! {
    fn relu_chunk(x: &mut [f32]) {
        // `v > 0 ? v : 0` keeps NaN (like torch.relu).
        for v in x.iter_mut() { *v = if *v > 0.0 || v.is_nan() { *v } else { 0.0 }; }
    }
}
simd_fn! {
    fn silu_gate_row(gate_up: &[f32], out: &mut [f32]) {
        let (gate, up) = gate_up.split_at(out.len());
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu_scalar(g) * u;
        }
    }
}
simd_fn! {
    /// Stable softmax: subtract the max first. An all -inf row gives NaN, as in PyTorch.
    pub(crate) fn softmax_row(row: &mut [f32]) {
        let m = max_generic(row);
        for v in row.iter_mut() { *v = exp_f32(*v - m); }
        let inv = 1.0 / sum_generic(row);
        for v in row.iter_mut() { *v *= inv; }
    }
}

pub fn gelu_erf(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(gelu_erf_chunk);
}

pub fn gelu_tanh(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(gelu_tanh_chunk);
}

pub fn relu(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(relu_chunk);
}

pub fn silu(x: &mut [f32]) {
    x.par_chunks_mut(CHUNK).for_each(silu_chunk);
}

/// Phi-3's fused MLP gate: each row of `gate_up` is `[gate(inter) | up(inter)]`;
/// `out[r, i] = silu(gate[r, i]) · up[r, i]`.
pub fn silu_gate(gate_up: &[f32], rows: usize, inter: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "silu_gate";
    check_len(OP, "gate_up", gate_up.len(), numel(OP, &[rows, 2, inter])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[rows, inter])?)?;
    if inter == 0 {
        return Ok(());
    }
    out.par_chunks_mut(inter)
        .zip(gate_up.par_chunks(2 * inter))
        .for_each(|(o, gu)| silu_gate_row(gu, o));
    Ok(())
}

/// Softmax over each row of `[len / cols, cols]`, in place.
pub fn softmax_rows(x: &mut [f32], cols: usize) -> Result<()> {
    if cols == 0 {
        return if x.is_empty() {
            Ok(())
        } else {
            Err(Error::shape(
                "softmax_rows",
                "cols is 0 for a non-empty input",
            ))
        };
    }
    if !x.len().is_multiple_of(cols) {
        return Err(Error::shape(
            "softmax_rows",
            format!("{} elements are not rows of {cols}", x.len()),
        ));
    }
    // Group short rows per task so rayon overhead stays small.
    let rows_per_task = (CHUNK / cols).max(1);
    x.par_chunks_mut(rows_per_task * cols)
        .for_each(|block| block.chunks_mut(cols).for_each(softmax_row));
    Ok(())
}
