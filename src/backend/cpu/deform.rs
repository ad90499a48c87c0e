//! Multi-scale deformable attention (Deformable DETR, as used by the Mask2Former pixel decoder;
//! architecture notes §9 step 4).
//!
//! Per query and head: the attention logits over (level, point) pairs are soft-maxed together;
//! each point samples its level's value map bilinearly at `reference + offset / (W_l, H_l)`
//! (normalised coordinates), exactly as `grid_sample(2·loc − 1, align_corners=False,
//! padding_mode="zeros")` does; the samples are summed with the attention weights.

use super::{check_len, numel};
use crate::{Error, Result};
use rayon::prelude::*;

/// Reference points of an encoder whose queries are the value tokens themselves: the pixel
/// centre `((j + 0.5) / W_l, (i + 0.5) / H_l)` of every token, levels in order, row-major.
pub fn deform_reference_points(levels: &[(usize, usize)]) -> Vec<f32> {
    let mut out = Vec::with_capacity(levels.iter().map(|&(h, w)| 2 * h * w).sum());
    for &(h, w) in levels {
        for i in 0..h {
            let y = (i as f32 + 0.5) / h as f32;
            for j in 0..w {
                out.push((j as f32 + 0.5) / w as f32);
                out.push(y);
            }
        }
    }
    out
}

/// Multi-scale deformable attention.
///
/// * `value` `[Σ H_l·W_l, heads·head_dim]`: the value maps of all levels, concatenated, each
///   row-major;
/// * `levels`: `(H_l, W_l)` per level;
/// * `reference` `[nq, 2]`: (x, y) in [0, 1] per query (see [`deform_reference_points`]);
/// * `offsets` `[nq, heads, levels, points, 2]`: sampling offsets in pixels of each level, (x, y);
/// * `logits` `[nq, heads, levels·points]`: attention logits, soft-maxed here per (query, head);
/// * `out` `[nq, heads·head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn ms_deform_attn(
    value: &[f32],
    levels: &[(usize, usize)],
    reference: &[f32],
    offsets: &[f32],
    logits: &[f32],
    nq: usize,
    heads: usize,
    head_dim: usize,
    points: usize,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "ms_deform_attn";
    let nl = levels.len();
    let nv = levels
        .iter()
        .try_fold(0usize, |acc, &(h, w)| {
            acc.checked_add(numel(OP, &[h, w]).ok()?)
        })
        .ok_or_else(|| Error::shape(OP, format!("level sizes {levels:?} overflow")))?;
    let dim = numel(OP, &[heads, head_dim])?;
    let lp = numel(OP, &[nl, points])?;
    check_len(OP, "value", value.len(), numel(OP, &[nv, dim])?)?;
    check_len(OP, "reference", reference.len(), numel(OP, &[nq, 2])?)?;
    check_len(
        OP,
        "offsets",
        offsets.len(),
        numel(OP, &[nq, heads, lp, 2])?,
    )?;
    check_len(OP, "logits", logits.len(), numel(OP, &[nq, heads, lp])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[nq, dim])?)?;
    if out.is_empty() {
        return Ok(());
    }
    if lp == 0 {
        return Err(Error::shape(OP, "no sampling points"));
    }
    let mut starts = Vec::with_capacity(nl);
    let mut s = 0;
    for &(h, w) in levels {
        starts.push(s);
        s += h * w;
    }

    out.par_chunks_mut(dim).enumerate().for_each(|(q, orow)| {
        orow.fill(0.0);
        let (rx, ry) = (reference[2 * q], reference[2 * q + 1]);
        let mut wts = vec![0f32; lp];
        for hd in 0..heads {
            // softmax over the (level, point) pairs of this head
            let lg = &logits[(q * heads + hd) * lp..][..lp];
            let mx = lg.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (w, &l) in wts.iter_mut().zip(lg) {
                *w = (l - mx).exp();
                sum += *w;
            }
            for w in wts.iter_mut() {
                *w /= sum;
            }
            let acc = &mut orow[hd * head_dim..(hd + 1) * head_dim];
            let off = &offsets[(q * heads + hd) * lp * 2..][..lp * 2];
            for (l, &(h, w)) in levels.iter().enumerate() {
                let base = starts[l];
                for p in 0..points {
                    let k = l * points + p;
                    let aw = wts[k];
                    // the sequence of f32 operations of the reference: location, grid, pixel
                    let lx = rx + off[2 * k] / w as f32;
                    let ly = ry + off[2 * k + 1] / h as f32;
                    let gx = 2.0 * lx - 1.0;
                    let gy = 2.0 * ly - 1.0;
                    let ix = ((gx + 1.0) * w as f32 - 1.0) / 2.0;
                    let iy = ((gy + 1.0) * h as f32 - 1.0) / 2.0;
                    if !(ix.is_finite() && iy.is_finite()) {
                        continue;
                    }
                    let (fx, fy) = (ix.floor(), iy.floor());
                    let (x0, y0) = (fx as i64, fy as i64);
                    let (ex, ey) = (ix - fx, iy - fy);
                    let taps = [
                        (x0, y0, (1.0 - ex) * (1.0 - ey)),
                        (x0 + 1, y0, ex * (1.0 - ey)),
                        (x0, y0 + 1, (1.0 - ex) * ey),
                        (x0 + 1, y0 + 1, ex * ey),
                    ];
                    for (xi, yi, tw) in taps {
                        if xi < 0 || yi < 0 || xi as u64 >= w as u64 || yi as u64 >= h as u64 {
                            continue;
                        }
                        let row = base + yi as usize * w + xi as usize;
                        let v = &value[row * dim + hd * head_dim..][..head_dim];
                        let c = aw * tw;
                        for (a, &x) in acc.iter_mut().zip(v) {
                            *a += c * x;
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct f64 evaluation of the definition: softmax, location, bilinear with zero padding.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        value: &[f32],
        levels: &[(usize, usize)],
        refp: &[f32],
        off: &[f32],
        lg: &[f32],
        nq: usize,
        heads: usize,
        hd: usize,
        pts: usize,
    ) -> Vec<f64> {
        let dim = heads * hd;
        let lp = levels.len() * pts;
        let mut starts = vec![0];
        for &(h, w) in levels {
            starts.push(starts.last().unwrap() + h * w);
        }
        let mut out = vec![0f64; nq * dim];
        for q in 0..nq {
            for m in 0..heads {
                let l = &lg[(q * heads + m) * lp..][..lp];
                let mx = l.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
                let e: Vec<f64> = l.iter().map(|&x| (x as f64 - mx).exp()).collect();
                let s: f64 = e.iter().sum();
                for (li, &(h, w)) in levels.iter().enumerate() {
                    for p in 0..pts {
                        let k = li * pts + p;
                        let o = &off[((q * heads + m) * lp + k) * 2..];
                        let x = (refp[2 * q] as f64 + o[0] as f64 / w as f64) * w as f64 - 0.5;
                        let y = (refp[2 * q + 1] as f64 + o[1] as f64 / h as f64) * h as f64 - 0.5;
                        let (x0, y0) = (x.floor(), y.floor());
                        for (dx, dy) in [(0., 0.), (1., 0.), (0., 1.), (1., 1.)] {
                            let (xi, yi) = (x0 + dx, y0 + dy);
                            if xi < 0.0 || yi < 0.0 || xi >= w as f64 || yi >= h as f64 {
                                continue;
                            }
                            let wt = (1.0 - (x - xi).abs()) * (1.0 - (y - yi).abs());
                            let row = starts[li] + yi as usize * w + xi as usize;
                            for d in 0..hd {
                                out[q * dim + m * hd + d] +=
                                    e[k] / s * wt * value[row * dim + m * hd + d] as f64;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn rnd(n: usize, seed: &mut u64, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn matches_definition_including_borders() {
        let levels = [(3, 5), (2, 2), (7, 4)];
        let (heads, hd, pts) = (3, 4, 4);
        let nq: usize = levels.iter().map(|&(h, w)| h * w).sum();
        let lp = levels.len() * pts;
        let mut seed = 7;
        let value = rnd(nq * heads * hd, &mut seed, 1.0);
        // offsets up to ±3 px: many samples leave the map (zero padding)
        let off = rnd(nq * heads * lp * 2, &mut seed, 3.0);
        let lg = rnd(nq * heads * lp, &mut seed, 2.0);
        let refp = deform_reference_points(&levels);
        let mut out = vec![f32::NAN; nq * heads * hd];
        ms_deform_attn(
            &value, &levels, &refp, &off, &lg, nq, heads, hd, pts, &mut out,
        )
        .unwrap();
        let want = reference(&value, &levels, &refp, &off, &lg, nq, heads, hd, pts);
        for (a, b) in out.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn zero_offsets_sample_the_pixel_itself() {
        let levels = [(2, 3)];
        let value: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let refp = deform_reference_points(&levels);
        let off = vec![0f32; 6 * 4 * 2];
        let lg = vec![0f32; 6 * 4];
        let mut out = vec![0f32; 6];
        ms_deform_attn(&value, &levels, &refp, &off, &lg, 6, 1, 1, 4, &mut out).unwrap();
        // up to the f32 rounding of centre -> grid -> pixel (as in the reference)
        for (a, b) in out.iter().zip(&value) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        let mut out = vec![0f32; 4];
        let e = ms_deform_attn(
            &[0.0; 3],
            &[(2, 2)],
            &[0.0; 8],
            &[0.0; 32],
            &[0.0; 16],
            4,
            1,
            1,
            4,
            &mut out,
        );
        assert!(e.is_err());
    }
}
