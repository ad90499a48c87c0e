//! SAM ViT attention (HF `SamVisionAttention` with `SamVisionLayer`'s window partition), fused:
//! window partition with zero padding, decomposed relative-position bias, crop.
//!
//! Semantics (xsam-architecture.md §3, transformers 4.57.1 `modeling_sam.py`):
//! * the block's input is zero-padded at the bottom/right to a multiple of the window AFTER
//!   layer_norm1, so a padded token enters the qkv linear as zeros and its q/k/v equal the qkv
//!   bias; there is no attention mask: real queries attend padded keys;
//! * `logits = (q · scale) · kᵀ + rel_h[q, kh] + rel_w[q, kw]` with `scale = head_dim^-0.5` and the
//!   rel-pos terms from the UNSCALED q: `rel_h[(qh,qw), kh] = Σ_c q[c] · Rh[qh - kh + K - 1][c]`
//!   (K = window or grid side), likewise `rel_w` with `qw - kw`;
//! * softmax in f32, `· v`, and the padded rows are cropped away.
//!
//! Padded queries are never computed (they are cropped), only the padded keys/values exist,
//! built from the bias. Per window, the rel-pos products are one matrix product per table:
//! `P = Q [n·heads, hd] · Rᵀ [hd, 2K-1]`, read as `rel_h[q, kh] = P[q, qh - kh + K - 1]`, so the
//! bias callback of [`attention`](super::attention) only adds two table entries per logit.

use super::attention::{attention, AttnMask};
use super::{check_len, matmul, numel};
use crate::{Error, Result};
use rayon::prelude::*;

/// Geometry of one SAM attention call.
#[derive(Clone, Copy, Debug)]
pub struct SamAttnGeom {
    /// Token grid (rows, columns); tokens are row-major.
    pub grid_h: usize,
    pub grid_w: usize,
    pub heads: usize,
    /// Channels (`heads * head_dim`).
    pub dim: usize,
    /// Window side for windowed blocks, `None` for global attention over the whole grid.
    pub window: Option<usize>,
}

impl SamAttnGeom {
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads.max(1)
    }

    /// (window rows, window columns): the attention side per axis.
    pub fn side(&self) -> (usize, usize) {
        match self.window {
            Some(w) => (w, w),
            None => (self.grid_h, self.grid_w),
        }
    }

    /// Rows the `rel_pos_h` / `rel_pos_w` tables must have (`2·side − 1`).
    pub fn rel_rows(&self) -> (usize, usize) {
        let (sh, sw) = self.side();
        ((2 * sh).saturating_sub(1), (2 * sw).saturating_sub(1))
    }
}

/// `qkv [grid_h·grid_w, 3·dim]` (rows `[q | k | v]`, each `[heads, head_dim]`), optional
/// `qkv_bias [3·dim]` (what a zero padded token's q/k/v are; zeros when absent),
/// `rel_pos_h [2·Kh − 1, head_dim]`, `rel_pos_w [2·Kw − 1, head_dim]` → `out [grid_h·grid_w, dim]`.
pub fn sam_attention(
    qkv: &[f32],
    qkv_bias: Option<&[f32]>,
    rel_pos_h: &[f32],
    rel_pos_w: &[f32],
    g: SamAttnGeom,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "sam_attention";
    let SamAttnGeom {
        grid_h,
        grid_w,
        heads,
        dim,
        window,
    } = g;
    if heads == 0 || dim % heads != 0 || window == Some(0) || grid_h == 0 || grid_w == 0 {
        return Err(Error::shape(
            OP,
            format!("{heads} heads over {dim} channels, window {window:?}, grid {grid_h}x{grid_w}"),
        ));
    }
    let hd = dim / heads;
    let tokens = numel(OP, &[grid_h, grid_w])?;
    let (kh_side, kw_side) = g.side();
    let (rh_rows, rw_rows) = g.rel_rows();
    check_len(OP, "qkv", qkv.len(), numel(OP, &[tokens, 3 * dim])?)?;
    check_len(OP, "rel_pos_h", rel_pos_h.len(), numel(OP, &[rh_rows, hd])?)?;
    check_len(OP, "rel_pos_w", rel_pos_w.len(), numel(OP, &[rw_rows, hd])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[tokens, dim])?)?;
    if let Some(b) = qkv_bias {
        check_len(OP, "qkv_bias", b.len(), 3 * dim)?;
    }
    let (nwh, nww) = (grid_h.div_ceil(kh_side), grid_w.div_ceil(kw_side));
    let nk = kh_side * kw_side;
    let scale = 1.0 / (hd as f32).sqrt();

    let results: Vec<(usize, usize, Vec<f32>)> = (0..nwh * nww)
        .into_par_iter()
        .map(|win| -> Result<(usize, usize, Vec<f32>)> {
            let (wy, wx) = (win / nww, win % nww);
            let (y0, x0) = (wy * kh_side, wx * kw_side);
            // Real (unpadded) extent of this window.
            let (rows, cols) = ((grid_h - y0).min(kh_side), (grid_w - x0).min(kw_side));
            let nq = rows * cols;
            // Queries: real tokens only, window-local (qh, qw) in row-major order.
            let mut q = vec![0f32; nq * dim];
            // Keys and values: every window position; padded ones get the bias.
            let mut k = vec![0f32; nk * dim];
            let mut v = vec![0f32; nk * dim];
            if let Some(b) = qkv_bias {
                for j in 0..nk {
                    k[j * dim..(j + 1) * dim].copy_from_slice(&b[dim..2 * dim]);
                    v[j * dim..(j + 1) * dim].copy_from_slice(&b[2 * dim..]);
                }
            }
            for r in 0..rows {
                for c in 0..cols {
                    let t = (y0 + r) * grid_w + x0 + c;
                    let src = &qkv[t * 3 * dim..(t + 1) * 3 * dim];
                    let qi = r * cols + c;
                    let kj = r * kw_side + c;
                    q[qi * dim..(qi + 1) * dim].copy_from_slice(&src[..dim]);
                    k[kj * dim..(kj + 1) * dim].copy_from_slice(&src[dim..2 * dim]);
                    v[kj * dim..(kj + 1) * dim].copy_from_slice(&src[2 * dim..]);
                }
            }
            // P[(qi, h), i] = q[qi, h, :] · R[i, :]; q rows are [heads, hd], so q is
            // [nq·heads, hd] as it lies.
            let mut ph = vec![0f32; nq * heads * rh_rows];
            let mut pw = vec![0f32; nq * heads * rw_rows];
            matmul(&q, rel_pos_h, &mut ph, nq * heads, hd, rh_rows, true)?;
            matmul(&q, rel_pos_w, &mut pw, nq * heads, hd, rw_rows, true)?;
            let bias = |h: usize, qi: usize, key_start: usize, row: &mut [f32]| {
                let (qh, qw) = (qi / cols, qi % cols);
                let th = &ph[(qi * heads + h) * rh_rows..(qi * heads + h + 1) * rh_rows];
                let tw = &pw[(qi * heads + h) * rw_rows..(qi * heads + h + 1) * rw_rows];
                // Key j sits at (j / kw_side, j % kw_side) of the window; index
                // qh - kh + Kh - 1 is always in 0..2Kh-1.
                let (mut kh, mut kw) = (key_start / kw_side, key_start % kw_side);
                for x in row.iter_mut() {
                    *x += th[qh + kh_side - 1 - kh] + tw[qw + kw_side - 1 - kw];
                    kw += 1;
                    if kw == kw_side {
                        kw = 0;
                        kh += 1;
                    }
                }
            };
            let mut o = vec![0f32; nq * dim];
            attention(
                &q,
                &k,
                &v,
                nq,
                nk,
                heads,
                hd,
                hd,
                scale,
                AttnMask::None,
                Some(&bias),
                &mut o,
            )?;
            Ok((y0, x0, o))
        })
        .collect::<Result<_>>()?;
    for (y0, x0, o) in results {
        let (rows, cols) = ((grid_h - y0).min(kh_side), (grid_w - x0).min(kw_side));
        for r in 0..rows {
            let t = (y0 + r) * grid_w + x0;
            out[t * dim..(t + cols) * dim]
                .copy_from_slice(&o[r * cols * dim..(r + 1) * cols * dim]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The HF procedure spelled out in f64: pad the grid with bias-valued tokens, partition,
    /// full softmax per window with the rel-pos terms, crop.
    fn naive(qkv: &[f32], bias: &[f32], rh: &[f32], rw: &[f32], g: SamAttnGeom) -> Vec<f32> {
        let (c, hd) = (g.dim, g.head_dim());
        let (kh_s, kw_s) = g.side();
        let (ph, pw) = (
            g.grid_h.div_ceil(kh_s) * kh_s,
            g.grid_w.div_ceil(kw_s) * kw_s,
        );
        let tok = |y: usize, x: usize| -> Vec<f64> {
            if y < g.grid_h && x < g.grid_w {
                qkv[(y * g.grid_w + x) * 3 * c..(y * g.grid_w + x + 1) * 3 * c]
                    .iter()
                    .map(|&v| v as f64)
                    .collect()
            } else {
                bias.iter().map(|&v| v as f64).collect()
            }
        };
        let mut out = vec![0f32; g.grid_h * g.grid_w * c];
        let scale = 1.0 / (hd as f64).sqrt();
        for y in 0..g.grid_h {
            for x in 0..g.grid_w {
                let (y0, x0) = (y / kh_s * kh_s, x / kw_s * kw_s);
                let (qh, qw) = (y - y0, x - x0);
                let q = tok(y, x);
                for h in 0..g.heads {
                    let qv = &q[h * hd..(h + 1) * hd];
                    let mut logits = vec![];
                    let mut vals = vec![];
                    for kh in 0..kh_s {
                        for kw in 0..kw_s {
                            assert!(y0 + kh < ph && x0 + kw < pw);
                            let t = tok(y0 + kh, x0 + kw);
                            let kv = &t[c + h * hd..c + (h + 1) * hd];
                            let dot: f64 = qv.iter().zip(kv).map(|(a, b)| a * b).sum();
                            let ih = (qh + kh_s - 1 - kh) * hd;
                            let iw = (qw + kw_s - 1 - kw) * hd;
                            let relh: f64 = (0..hd).map(|i| qv[i] * rh[ih + i] as f64).sum();
                            let relw: f64 = (0..hd).map(|i| qv[i] * rw[iw + i] as f64).sum();
                            logits.push(dot * scale + relh + relw);
                            vals.push(t[2 * c + h * hd..2 * c + (h + 1) * hd].to_vec());
                        }
                    }
                    let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for i in 0..hd {
                        let o: f64 = e.iter().zip(&vals).map(|(p, v)| p * v[i]).sum::<f64>() / z;
                        out[(y * g.grid_w + x) * c + h * hd + i] = o as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_padded_window_procedure() {
        // Non-square grid, a window that pads both axes, and global attention.
        for window in [Some(3), Some(4), None] {
            let g = SamAttnGeom {
                grid_h: 5,
                grid_w: 7,
                heads: 2,
                dim: 8,
                window,
            };
            let (rows_h, rows_w) = g.rel_rows();
            let qkv = data(35 * 24, 1);
            let bias = data(24, 2);
            let rh = data(rows_h * 4, 3);
            let rw = data(rows_w * 4, 4);
            let mut out = vec![0f32; 35 * 8];
            sam_attention(&qkv, Some(&bias), &rh, &rw, g, &mut out).unwrap();
            let want = naive(&qkv, &bias, &rh, &rw, g);
            let err = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-5, "window {window:?}: max diff {err}");
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        let g = SamAttnGeom {
            grid_h: 2,
            grid_w: 2,
            heads: 2,
            dim: 8,
            window: None,
        };
        let mut out = vec![0f32; 4 * 8];
        assert!(sam_attention(
            &[0.0; 4 * 24],
            None,
            &[0.0; 3 * 4],
            &[0.0; 2 * 4],
            g,
            &mut out
        )
        .is_err());
        assert!(sam_attention(&[0.0; 5], None, &[0.0; 3 * 4], &[0.0; 3 * 4], g, &mut out).is_err());
        let g0 = SamAttnGeom {
            window: Some(0),
            ..g
        };
        assert!(sam_attention(
            &[0.0; 4 * 24],
            None,
            &[0.0; 3 * 4],
            &[0.0; 3 * 4],
            g0,
            &mut out
        )
        .is_err());
    }
}
