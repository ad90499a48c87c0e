//! X-SAM's pixel shuffle on channels-last maps (architecture notes §5.1). Its channel order is not
//! torch.nn.PixelShuffle's: downsampling packs (row offset, column offset, c), upsampling unpacks
//! with the column offset as the slow bit.

use super::{check_len, numel};
use crate::{Error, Result};
use rayon::prelude::*;

/// Ratio 0.5: x `[h, w, c]` → out `[⌈h/2⌉, ⌈w/2⌉, 4c]`,
/// `out[i, j, (dh·2 + dw)·c + k] = x[2i + dh, 2j + dw, k]`, zero where 2i+dh or 2j+dw falls
/// outside (odd sizes are zero-padded at the end first).
pub fn pixel_shuffle_down(x: &[f32], h: usize, w: usize, c: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "pixel_shuffle_down";
    let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
    check_len(OP, "x", x.len(), numel(OP, &[h, w, c])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[oh, ow, 4, c])?)?;
    if out.is_empty() {
        return Ok(());
    }
    out.par_chunks_mut(ow * 4 * c)
        .enumerate()
        .for_each(|(i, orow)| {
            for (j, px) in orow.chunks_mut(4 * c).enumerate() {
                for (q, dst) in px.chunks_mut(c).enumerate() {
                    let (y, xx) = (2 * i + q / 2, 2 * j + q % 2);
                    if y < h && xx < w {
                        let s = (y * w + xx) * c;
                        dst.copy_from_slice(&x[s..s + c]);
                    } else {
                        dst.fill(0.0);
                    }
                }
            }
        });
    Ok(())
}

/// Ratio 2 (c divisible by 4): x `[h, w, c]` → out `[2h, 2w, c/4]`,
/// `out[2i + dh, 2j + dw, k] = x[i, j, dw·(c/2) + dh·(c/4) + k]`.
pub fn pixel_shuffle_up(x: &[f32], h: usize, w: usize, c: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "pixel_shuffle_up";
    if !c.is_multiple_of(4) {
        return Err(Error::shape(
            OP,
            format!("{c} channels are not divisible by 4"),
        ));
    }
    let q = c / 4;
    check_len(OP, "x", x.len(), numel(OP, &[h, w, c])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[2 * h, 2 * w, q])?)?;
    if out.is_empty() {
        return Ok(());
    }
    out.par_chunks_mut(2 * w * q)
        .enumerate()
        .for_each(|(oy, orow)| {
            let (i, dh) = (oy / 2, oy % 2);
            for (ox, dst) in orow.chunks_mut(q).enumerate() {
                let (j, dw) = (ox / 2, ox % 2);
                let s = (i * w + j) * c + dw * (c / 2) + dh * q;
                dst.copy_from_slice(&x[s..s + q]);
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 + 0.5).collect()
    }

    /// Literal loops over the formulas of §5.1, including odd (padded) sizes.
    #[test]
    fn down_matches_formula() {
        for &(h, w, c) in &[(4, 6, 3), (3, 5, 2), (1, 1, 1), (7, 2, 5)] {
            let x = data(h * w * c);
            let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
            let mut out = vec![f32::NAN; oh * ow * 4 * c];
            pixel_shuffle_down(&x, h, w, c, &mut out).unwrap();
            for i in 0..oh {
                for j in 0..ow {
                    for dh in 0..2 {
                        for dw in 0..2 {
                            for k in 0..c {
                                let got = out[(i * ow + j) * 4 * c + (dh * 2 + dw) * c + k];
                                let (y, xx) = (2 * i + dh, 2 * j + dw);
                                let want = if y < h && xx < w {
                                    x[(y * w + xx) * c + k]
                                } else {
                                    0.0
                                };
                                assert_eq!(got, want, "h{h} w{w} c{c} at {i},{j},{dh},{dw},{k}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn up_matches_formula() {
        for &(h, w, c) in &[(2, 3, 8), (1, 1, 4), (3, 5, 12)] {
            let x = data(h * w * c);
            let q = c / 4;
            let mut out = vec![f32::NAN; 4 * h * w * q];
            pixel_shuffle_up(&x, h, w, c, &mut out).unwrap();
            for i in 0..h {
                for j in 0..w {
                    for dh in 0..2 {
                        for dw in 0..2 {
                            for k in 0..q {
                                let got = out[((2 * i + dh) * 2 * w + 2 * j + dw) * q + k];
                                let want = x[(i * w + j) * c + dw * (c / 2) + dh * (c / 4) + k];
                                assert_eq!(got, want, "h{h} w{w} c{c}");
                            }
                        }
                    }
                }
            }
        }
        assert!(pixel_shuffle_up(&data(6), 1, 1, 6, &mut [0.0; 1]).is_err());
        assert!(pixel_shuffle_down(&data(5), 1, 1, 4, &mut [0.0; 16]).is_err());
    }
}
