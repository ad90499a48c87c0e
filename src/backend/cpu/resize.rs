//! Bilinear resize and point sampling with PyTorch's exact conventions (f32 index arithmetic,
//! same clamping, same weight order) so masks and sampled features match torch to the ulp.

use super::{check_len, numel};
use crate::{Error, Result};
use rayon::prelude::*;

/// Source taps of one output coordinate: `(i0, i1, w0, w1)`.
pub(crate) type Taps = (usize, usize, f32, f32);

/// torch `compute_indices_weights_linear` for one axis (antialias=False).
pub(crate) fn linear_taps(input: usize, output: usize, align_corners: bool) -> Vec<Taps> {
    if input == output {
        // torch copies when the size is unchanged.
        return (0..output).map(|i| (i, i, 1.0, 0.0)).collect();
    }
    let scale: f32 = if align_corners {
        if output > 1 {
            (input as f32 - 1.0) / (output as f32 - 1.0)
        } else {
            0.0
        }
    } else {
        input as f32 / output as f32
    };
    (0..output)
        .map(|o| {
            let src = if align_corners {
                scale * o as f32
            } else {
                let s = scale * (o as f32 + 0.5) - 0.5;
                if s < 0.0 {
                    0.0
                } else {
                    s
                }
            };
            let i0 = (src.floor() as usize).min(input - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// `torch.nn.functional.interpolate(mode='bilinear', antialias=False)` of x `[c, h, w]` to
/// out `[c, out_h, out_w]`.
#[allow(clippy::too_many_arguments)]
pub fn resize_bilinear(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    align_corners: bool,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "resize_bilinear";
    check_len(OP, "x", x.len(), numel(OP, &[c, h, w])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[c, out_h, out_w])?)?;
    if out.is_empty() {
        return Ok(());
    }
    if h == 0 || w == 0 {
        return Err(Error::shape(
            OP,
            "cannot resize an empty map to a non-empty one",
        ));
    }
    let ty = linear_taps(h, out_h, align_corners);
    let tx = linear_taps(w, out_w, align_corners);
    out.par_chunks_mut(out_w).enumerate().for_each(|(r, row)| {
        let (ci, oy) = (r / out_h, r % out_h);
        let (y0, y1, wy0, wy1) = ty[oy];
        let img = &x[ci * h * w..(ci + 1) * h * w];
        let (r0, r1) = (&img[y0 * w..(y0 + 1) * w], &img[y1 * w..(y1 + 1) * w]);
        for (o, &(x0, x1, wx0, wx1)) in row.iter_mut().zip(&tx) {
            // torch's order: interpolate along w within each row, then along h.
            let t0 = r0[x0] * wx0 + r0[x1] * wx1;
            let t1 = r1[x0] * wx0 + r1[x1] * wx1;
            *o = t0 * wy0 + t1 * wy1;
        }
    });
    Ok(())
}

/// `torch.nn.functional.grid_sample(mode='bilinear', padding_mode='zeros')` at `n` points.
///
/// x is `[c, h, w]`; grid holds `n` (x, y) pairs in [-1, 1] (x along the width); out is `[c, n]`.
/// Corners outside the map contribute zero.
#[allow(clippy::too_many_arguments)]
pub fn grid_sample_bilinear(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    grid: &[f32],
    n: usize,
    align_corners: bool,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "grid_sample_bilinear";
    check_len(OP, "x", x.len(), numel(OP, &[c, h, w])?)?;
    check_len(OP, "grid", grid.len(), numel(OP, &[n, 2])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[c, n])?)?;
    if out.is_empty() {
        return Ok(());
    }
    // Per point: four (flat index, weight) taps; out-of-range taps get index usize::MAX.
    let unnorm = |v: f32, size: usize| -> f32 {
        if align_corners {
            (v + 1.0) / 2.0 * (size as f32 - 1.0)
        } else {
            ((v + 1.0) * size as f32 - 1.0) / 2.0
        }
    };
    let taps: Vec<[(usize, f32); 4]> = grid
        .par_chunks(2)
        .map(|g| {
            let ix = unnorm(g[0], w);
            let iy = unnorm(g[1], h);
            let (fx, fy) = (ix.floor(), iy.floor());
            let (dx1, dy1) = (ix - fx, iy - fy); // distance to the west / north tap
            let (dx0, dy0) = ((fx + 1.0) - ix, (fy + 1.0) - iy);
            // Saturating casts: NaN or huge coordinates land outside and contribute nothing.
            let (xw, yn) = (fx as i64, fy as i64);
            let tap = |xi: i64, yi: i64, wt: f32| -> (usize, f32) {
                if xi >= 0 && yi >= 0 && (xi as u64) < w as u64 && (yi as u64) < h as u64 {
                    (yi as usize * w + xi as usize, wt)
                } else {
                    (usize::MAX, 0.0)
                }
            };
            [
                tap(xw, yn, dx0 * dy0),
                tap(xw.saturating_add(1), yn, dx1 * dy0),
                tap(xw, yn.saturating_add(1), dx0 * dy1),
                tap(xw.saturating_add(1), yn.saturating_add(1), dx1 * dy1),
            ]
        })
        .collect();
    let hw = h * w;
    out.par_chunks_mut(n).enumerate().for_each(|(ci, row)| {
        let img = &x[ci * hw..(ci + 1) * hw];
        for (o, t) in row.iter_mut().zip(&taps) {
            let mut acc = 0.0f32;
            for &(idx, wt) in t {
                if idx != usize::MAX {
                    acc += img[idx] * wt;
                }
            }
            *o = acc;
        }
    });
    Ok(())
}
