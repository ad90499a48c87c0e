//! Normalisations. Statistics use a two-pass mean/variance (no E[x²]-E[x]² cancellation), biased
//! variance as in PyTorch; sums over long axes (channels-first LN, group norm) accumulate in f64.

use super::simd::{sq_dev_generic, sum_generic};
use super::{check_len, numel};
use crate::{Error, Result};
use rayon::prelude::*;

/// Rows per rayon task for row-wise norms: about 16k elements per task.
fn rows_per_task(cols: usize) -> usize {
    ((1 << 14) / cols.max(1)).max(1)
}

fn check_rows(op: &'static str, x: &[f32], cols: usize, out: &[f32]) -> Result<()> {
    if cols == 0 && !x.is_empty() {
        return Err(Error::shape(op, "cols is 0 for a non-empty input"));
    }
    if cols != 0 && !x.len().is_multiple_of(cols) {
        return Err(Error::shape(
            op,
            format!("{} elements are not rows of {cols}", x.len()),
        ));
    }
    check_len(op, "out", out.len(), x.len())
}

simd_fn! {
    fn ln_row(x: &[f32], w: Option<&[f32]>, b: Option<&[f32]>, eps: f32, out: &mut [f32]) {
        let n = x.len() as f32;
        let mean = sum_generic(x) / n;
        let var = sq_dev_generic(x, mean) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        match (w, b) {
            (Some(w), Some(b)) => {
                for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
                    *o = (v - mean) * rstd * w + b;
                }
            }
            (Some(w), None) => {
                for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
                    *o = (v - mean) * rstd * w;
                }
            }
            (None, Some(b)) => {
                for ((o, &v), &b) in out.iter_mut().zip(x).zip(b) {
                    *o = (v - mean) * rstd + b;
                }
            }
            (None, None) => {
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = (v - mean) * rstd;
                }
            }
        }
    }
}

/// LayerNorm over the last axis (`cols`) of `[len / cols, cols]`, optional affine weight/bias.
pub fn layer_norm(
    x: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    cols: usize,
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "layer_norm";
    check_rows(OP, x, cols, out)?;
    if let Some(w) = w {
        check_len(OP, "weight", w.len(), cols)?;
    }
    if let Some(b) = b {
        check_len(OP, "bias", b.len(), cols)?;
    }
    if x.is_empty() {
        return Ok(());
    }
    let step = rows_per_task(cols) * cols;
    out.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(o, xs)| {
            for (o, xs) in o.chunks_mut(cols).zip(xs.chunks(cols)) {
                ln_row(xs, w, b, eps, o);
            }
        });
    Ok(())
}

simd_fn! {
    fn rms_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let ms = sq_dev_generic(x, 0.0) / x.len() as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
            *o = v * r * w;
        }
    }
}

/// RMSNorm as in Phi-3: `x · rsqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &[f32], w: &[f32], cols: usize, eps: f32, out: &mut [f32]) -> Result<()> {
    const OP: &str = "rms_norm";
    check_rows(OP, x, cols, out)?;
    check_len(OP, "weight", w.len(), cols)?;
    if x.is_empty() {
        return Ok(());
    }
    let step = rows_per_task(cols) * cols;
    out.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(o, xs)| {
            for (o, xs) in o.chunks_mut(cols).zip(xs.chunks(cols)) {
                rms_row(xs, w, eps, o);
            }
        });
    Ok(())
}

simd_fn! {
    /// Per-pixel mean and 1/std over channels for pixels p0..p0+mean.len() of x [C, HW].
    fn cf_stats(x: &[f32], hw: usize, p0: usize, eps: f32, mean: &mut [f32], rstd: &mut [f32]) {
        let np = mean.len();
        let channels = x.len() / hw;
        let mut acc = vec![0f64; np];
        for c in 0..channels {
            let row = &x[c * hw + p0..c * hw + p0 + np];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        let inv_c = 1.0 / channels as f64;
        for a in acc.iter_mut() {
            *a *= inv_c;
        }
        let mut var = vec![0f64; np];
        for c in 0..channels {
            let row = &x[c * hw + p0..c * hw + p0 + np];
            for ((s, &v), &m) in var.iter_mut().zip(row).zip(&acc) {
                let d = v as f64 - m;
                *s += d * d;
            }
        }
        for (((m, r), &a), &s) in mean.iter_mut().zip(rstd.iter_mut()).zip(&acc).zip(&var) {
            *m = a as f32;
            *r = (1.0 / (s * inv_c + eps as f64).sqrt()) as f32;
        }
    }
}

simd_fn! {
    fn cf_apply(x: &[f32], mean: &[f32], rstd: &[f32], w: f32, b: f32, out: &mut [f32]) {
        for (((o, &v), &m), &r) in out.iter_mut().zip(x).zip(mean).zip(rstd) {
            *o = (v - m) * r * w + b;
        }
    }
}

/// SAM's LayerNorm2d: x is `[C, HW]`, each pixel normalised over its C channels, then the
/// per-channel affine.
pub fn layer_norm_channels_first(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    channels: usize,
    hw: usize,
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "layer_norm_channels_first";
    let n = numel(OP, &[channels, hw])?;
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "out", out.len(), n)?;
    check_len(OP, "weight", w.len(), channels)?;
    check_len(OP, "bias", b.len(), channels)?;
    if n == 0 {
        return Ok(());
    }
    let mut mean = vec![0f32; hw];
    let mut rstd = vec![0f32; hw];
    const PIX: usize = 256;
    mean.par_chunks_mut(PIX)
        .zip(rstd.par_chunks_mut(PIX))
        .enumerate()
        .for_each(|(i, (m, r))| cf_stats(x, hw, i * PIX, eps, m, r));
    out.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(c, (o, xs))| cf_apply(xs, &mean, &rstd, w[c], b[c], o));
    Ok(())
}

simd_fn! {
    fn row_sum(x: &[f32]) -> f32 { sum_generic(x) }
}
simd_fn! {
    fn row_sq_dev(x: &[f32], mean: f32) -> f32 { sq_dev_generic(x, mean) }
}

/// GroupNorm over x `[C, HW]`: `groups` groups of C/groups consecutive channels, each normalised
/// over all its channels and pixels, then the per-channel affine.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    channels: usize,
    hw: usize,
    groups: usize,
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "group_norm";
    let n = numel(OP, &[channels, hw])?;
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "out", out.len(), n)?;
    check_len(OP, "weight", w.len(), channels)?;
    check_len(OP, "bias", b.len(), channels)?;
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(Error::shape(
            OP,
            format!("{channels} channels do not split into {groups} groups"),
        ));
    }
    if n == 0 {
        return Ok(());
    }
    let gsize = channels / groups * hw;
    let stats: Vec<(f32, f32)> = x
        .par_chunks(gsize)
        .map(|g| {
            let cnt = g.len() as f64;
            let mean = g.chunks(hw).map(|r| row_sum(r) as f64).sum::<f64>() / cnt;
            let var = g
                .chunks(hw)
                .map(|r| row_sq_dev(r, mean as f32) as f64)
                .sum::<f64>()
                / cnt;
            (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
        })
        .collect();
    let cpg = channels / groups;
    out.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(c, (o, xs))| {
            let (m, r) = stats[c / cpg];
            let (sc, sh) = (r * w[c], b[c]);
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = (v - m) * sc + sh;
            }
        });
    Ok(())
}
