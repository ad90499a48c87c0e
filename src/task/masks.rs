//! Mask geometry: from the decoder's mask logits `[Q, h, w]` to image-resolution maps, and the
//! binary masks that come out of post-processing.
//!
//! The routine (architecture notes §13 and trap 18) is two bilinear resizes with
//! `align_corners=False`: the `h × w` logits go to the SAM canvas `S × S`, the canvas is cropped to
//! the scaled size `(newh, neww)` (the resized image sits top-left in the padded canvas), and the
//! crop goes to the original size `H0 × W0`. Only the crop of the canvas is ever computed (the
//! rows and columns outside it never reach the output), and only for the queries a task needs,
//! so nothing of size `Q × S × S` is materialised. The arithmetic is the CPU backend's
//! `resize_bilinear` (torch's taps and operation order), so the values equal torch's
//! `F.interpolate(..., (S, S))[..., :newh, :neww]` followed by `F.interpolate(..., (H0, W0))`.

use crate::backend::cpu::resize::{linear_taps, Taps};
use crate::{Error, Result};
use rayon::prelude::*;
use std::ops::Range;

/// Sizes involved in mapping one prediction back to the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskGeometry {
    /// `(h, w)` of the mask logits (the decoder's mask-feature grid, e.g. 128 × 128).
    pub grid: (usize, usize),
    /// Side `S` of the square SAM canvas (config `sam.image_size`, e.g. 1024).
    pub canvas: usize,
    /// `(newh, neww)`: the image's size inside the canvas (SAM longest-side resize).
    pub scaled: (usize, usize),
    /// `(H0, W0)`: the original image size.
    pub image: (usize, usize),
}

impl MaskGeometry {
    /// Every size positive and the scaled size inside the canvas.
    pub fn validate(&self) -> Result<()> {
        let (h, w) = self.grid;
        let (sh, sw) = self.scaled;
        let (ih, iw) = self.image;
        if h == 0 || w == 0 || self.canvas == 0 || sh == 0 || sw == 0 || ih == 0 || iw == 0 {
            return Err(Error::shape(
                "mask geometry",
                format!("every size must be positive: {self:?}"),
            ));
        }
        if sh > self.canvas || sw > self.canvas {
            return Err(Error::shape(
                "mask geometry",
                format!(
                    "scaled size {sh}x{sw} is larger than the canvas {0}x{0}",
                    self.canvas
                ),
            ));
        }
        Ok(())
    }

    /// Pixels of one logit map (`h * w`).
    pub fn grid_len(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// Pixels of one image-resolution map (`H0 * W0`).
    pub fn image_len(&self) -> usize {
        self.image.0 * self.image.1
    }
}

/// torch's sigmoid in f32: `1 / (1 + exp(-x))`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// One separable bilinear output row from two source rows (torch's order: along the width inside
/// each row, then along the height).
#[inline]
fn blend_row(r0: &[f32], r1: &[f32], wy0: f32, wy1: f32, tx: &[Taps], out: &mut [f32]) {
    for (o, &(x0, x1, wx0, wx1)) in out.iter_mut().zip(tx) {
        let t0 = r0[x0] * wx0 + r0[x1] * wx1;
        let t1 = r1[x0] * wx0 + r1[x1] * wx1;
        *o = t0 * wy0 + t1 * wy1;
    }
}

/// Precomputed taps of the upsample-crop-resize routine for one geometry.
#[derive(Clone, Debug)]
pub struct MaskResizer {
    geom: MaskGeometry,
    /// grid → canvas, only the first `newh` rows / `neww` columns (the crop).
    crop_y: Vec<Taps>,
    crop_x: Vec<Taps>,
    /// crop `(newh, neww)` → image `(H0, W0)`.
    out_y: Vec<Taps>,
    out_x: Vec<Taps>,
}

impl MaskResizer {
    pub fn new(geom: MaskGeometry) -> Result<Self> {
        geom.validate()?;
        let (h, w) = geom.grid;
        let (sh, sw) = geom.scaled;
        let (ih, iw) = geom.image;
        let mut crop_y = linear_taps(h, geom.canvas, false);
        crop_y.truncate(sh);
        let mut crop_x = linear_taps(w, geom.canvas, false);
        crop_x.truncate(sw);
        Ok(Self {
            geom,
            crop_y,
            crop_x,
            out_y: linear_taps(sh, ih, false),
            out_x: linear_taps(sw, iw, false),
        })
    }

    pub fn geometry(&self) -> MaskGeometry {
        self.geom
    }

    /// Crop rows `rows` (of `0..newh`) of the canvas-size upsample of one query's logits `[h*w]`,
    /// into `out` `[rows.len() * neww]`.
    pub(crate) fn crop_rows(&self, logits: &[f32], rows: Range<usize>, out: &mut [f32]) {
        let w = self.geom.grid.1;
        let sw = self.geom.scaled.1;
        for (r, o) in rows.zip(out.chunks_exact_mut(sw)) {
            let (y0, y1, wy0, wy1) = self.crop_y[r];
            blend_row(
                &logits[y0 * w..(y0 + 1) * w],
                &logits[y1 * w..(y1 + 1) * w],
                wy0,
                wy1,
                &self.crop_x,
                o,
            );
        }
    }

    /// The crop rows `lo..hi` that image rows `ys` read.
    pub(crate) fn crop_rows_for(&self, ys: Range<usize>) -> Range<usize> {
        if ys.is_empty() {
            return 0..0;
        }
        let lo = self.out_y[ys.start].0;
        let hi = self.out_y[ys.end - 1].1.max(self.out_y[ys.end - 1].0) + 1;
        lo..hi
    }

    /// Image row `y` from crop rows `crop_lo..` held in `crop` (`[n, neww]`), into `out` `[W0]`.
    pub(crate) fn image_row_from_crop(
        &self,
        crop: &[f32],
        crop_lo: usize,
        y: usize,
        out: &mut [f32],
    ) {
        let sw = self.geom.scaled.1;
        let (y0, y1, wy0, wy1) = self.out_y[y];
        let (a, b) = (y0 - crop_lo, y1 - crop_lo);
        blend_row(
            &crop[a * sw..(a + 1) * sw],
            &crop[b * sw..(b + 1) * sw],
            wy0,
            wy1,
            &self.out_x,
            out,
        );
    }

    /// Image rows `ys` of one query's logits `[h*w]` into `out` `[ys.len() * W0]`; `scratch` holds
    /// the crop rows in between (resized as needed).
    pub(crate) fn image_rows(
        &self,
        logits: &[f32],
        ys: Range<usize>,
        scratch: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let sw = self.geom.scaled.1;
        let iw = self.geom.image.1;
        let cr = self.crop_rows_for(ys.clone());
        scratch.resize(cr.len() * sw, 0.0);
        self.crop_rows(logits, cr.clone(), scratch);
        for (y, o) in ys.zip(out.chunks_exact_mut(iw)) {
            self.image_row_from_crop(scratch, cr.start, y, o);
        }
    }

    /// The full image-resolution map `[H0 * W0]` of one query's logits `[h * w]`.
    pub fn resize_one(&self, logits: &[f32]) -> Result<Vec<f32>> {
        if logits.len() != self.geom.grid_len() {
            return Err(Error::shape(
                "resize mask",
                format!(
                    "a logit map has {} values, the grid {:?} needs {}",
                    logits.len(),
                    self.geom.grid,
                    self.geom.grid_len()
                ),
            ));
        }
        let mut out = vec![0.0; self.geom.image_len()];
        let mut scratch = Vec::new();
        self.image_rows(logits, 0..self.geom.image.0, &mut scratch, &mut out);
        Ok(out)
    }

    /// Image-resolution maps `[queries.len(), H0 * W0]` of the selected queries of `logits`
    /// `[Q, h, w]` (in parallel over queries).
    pub fn resize_queries(&self, logits: &[f32], queries: &[usize]) -> Result<Vec<f32>> {
        let n = self.geom.grid_len();
        let q_total = logits.len() / n.max(1);
        if !logits.len().is_multiple_of(n) {
            return Err(Error::shape(
                "resize masks",
                format!(
                    "{} logits are not maps of {:?}",
                    logits.len(),
                    self.geom.grid
                ),
            ));
        }
        if let Some(&bad) = queries.iter().find(|&&q| q >= q_total) {
            return Err(Error::shape(
                "resize masks",
                format!("query {bad} out of range (Q = {q_total})"),
            ));
        }
        let len = self.geom.image_len();
        let mut out = vec![0.0; queries.len() * len];
        out.par_chunks_mut(len.max(1))
            .zip(queries.par_iter())
            .for_each_init(Vec::new, |scratch, (o, &q)| {
                self.image_rows(
                    &logits[q * n..(q + 1) * n],
                    0..self.geom.image.0,
                    scratch,
                    o,
                );
            });
        Ok(out)
    }
}

/// A binary mask `height × width`, row-major, one bit per pixel.
#[derive(Clone, PartialEq, Eq)]
pub struct BitMask {
    height: usize,
    width: usize,
    words: Vec<u64>,
}

impl std::fmt::Debug for BitMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BitMask({}x{}, {} on)",
            self.height,
            self.width,
            self.count_ones()
        )
    }
}

impl BitMask {
    /// All off.
    pub fn new(height: usize, width: usize) -> Self {
        Self {
            height,
            width,
            words: vec![0; (height * width).div_ceil(64)],
        }
    }

    /// On where `pred(value)` for a row-major map `values` `[height * width]` (packed in parallel).
    pub fn from_map(
        height: usize,
        width: usize,
        values: &[f32],
        pred: impl Fn(f32) -> bool + Sync,
    ) -> Result<Self> {
        if values.len() != height * width {
            return Err(Error::shape(
                "BitMask::from_map",
                format!("{} values for a {height}x{width} mask", values.len()),
            ));
        }
        let words = values
            .par_chunks(64)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u64, |acc, (i, &v)| acc | ((pred(v) as u64) << i))
            })
            .collect();
        Ok(Self {
            height,
            width,
            words,
        })
    }

    /// On where a row-major byte map `[height * width]` is nonzero.
    pub fn from_u8(height: usize, width: usize, values: &[u8]) -> Result<Self> {
        if values.len() != height * width {
            return Err(Error::shape(
                "BitMask::from_u8",
                format!("{} values for a {height}x{width} mask", values.len()),
            ));
        }
        let mut m = Self::new(height, width);
        for (i, _) in values.iter().enumerate().filter(|(_, &v)| v != 0) {
            m.words[i / 64] |= 1 << (i % 64);
        }
        Ok(m)
    }

    pub fn height(&self) -> usize {
        self.height
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Pixel (y, x); false outside the mask.
    #[inline]
    pub fn get(&self, y: usize, x: usize) -> bool {
        if y >= self.height || x >= self.width {
            return false;
        }
        self.get_index(y * self.width + x)
    }

    /// Pixel at row-major index `i`.
    #[inline]
    pub fn get_index(&self, i: usize) -> bool {
        (self.words[i / 64] >> (i % 64)) & 1 == 1
    }

    /// Sets pixel (y, x); ignored outside the mask.
    #[inline]
    pub fn set(&mut self, y: usize, x: usize, on: bool) {
        if y < self.height && x < self.width {
            self.set_index(y * self.width + x, on);
        }
    }

    #[inline]
    pub fn set_index(&mut self, i: usize, on: bool) {
        let bit = 1u64 << (i % 64);
        if on {
            self.words[i / 64] |= bit;
        } else {
            self.words[i / 64] &= !bit;
        }
    }

    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// True when no pixel is on.
    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Row-major bytes, 1 for on.
    pub fn to_u8(&self) -> Vec<u8> {
        (0..self.height * self.width)
            .map(|i| self.get_index(i) as u8)
            .collect()
    }

    /// Tight box `(x0, y0, x1, y1)` with exclusive ends (detectron2 `BitMasks.get_bounding_boxes`);
    /// `None` when empty.
    pub fn bbox(&self) -> Option<(usize, usize, usize, usize)> {
        let mut b: Option<(usize, usize, usize, usize)> = None;
        for y in 0..self.height {
            for x in 0..self.width {
                if self.get_index(y * self.width + x) {
                    b = Some(match b {
                        None => (x, y, x + 1, y + 1),
                        Some((x0, y0, x1, y1)) => (x0.min(x), y0, x1.max(x + 1), y1.max(y + 1)),
                    });
                }
            }
        }
        b
    }

    /// Intersection over union with a mask of the same size (1 when both are empty).
    pub fn iou(&self, other: &BitMask) -> Result<f64> {
        if (self.height, self.width) != (other.height, other.width) {
            return Err(Error::shape(
                "BitMask::iou",
                format!(
                    "{}x{} vs {}x{}",
                    self.height, self.width, other.height, other.width
                ),
            ));
        }
        let (mut inter, mut union) = (0usize, 0usize);
        for (a, b) in self.words.iter().zip(&other.words) {
            inter += (a & b).count_ones() as usize;
            union += (a | b).count_ones() as usize;
        }
        Ok(if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        })
    }

    /// `[:h, :w]` then torch `F.interpolate(mode='nearest')` to `out_h × out_w` (the prompt-mask
    /// path of `intseg_process_fn`: `sem_seg_postprocess(..., mode="nearest")`).
    pub fn crop_resize_nearest(
        &self,
        h: usize,
        w: usize,
        out_h: usize,
        out_w: usize,
    ) -> Result<BitMask> {
        if h > self.height || w > self.width || h == 0 || w == 0 {
            return Err(Error::shape(
                "BitMask::crop_resize_nearest",
                format!("crop {h}x{w} of a {}x{} mask", self.height, self.width),
            ));
        }
        let ys: Vec<usize> = (0..out_h).map(|o| nearest_index(o, h, out_h)).collect();
        let xs: Vec<usize> = (0..out_w).map(|o| nearest_index(o, w, out_w)).collect();
        let mut out = BitMask::new(out_h, out_w);
        for (oy, &sy) in ys.iter().enumerate() {
            for (ox, &sx) in xs.iter().enumerate() {
                if self.get_index(sy * self.width + sx) {
                    out.set_index(oy * out_w + ox, true);
                }
            }
        }
        Ok(out)
    }
}

/// torch `nearest_idx` (UpSample.h): identity for equal sizes, `o >> 1` for exact doubling, else
/// `min(floor(o * (in / out)), in - 1)` with the scale in f32.
fn nearest_index(o: usize, input: usize, output: usize) -> usize {
    if output == input {
        o
    } else if output == 2 * input {
        o >> 1
    } else {
        let scale = input as f32 / output as f32;
        ((o as f32 * scale).floor() as usize).min(input - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::resize_bilinear;

    #[test]
    fn matches_full_canvas_then_crop_then_resize() {
        let geom = MaskGeometry {
            grid: (5, 7),
            canvas: 24,
            scaled: (24, 15),
            image: (31, 19),
        };
        let logits: Vec<f32> = (0..35)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let mut canvas = vec![0.0; 24 * 24];
        resize_bilinear(&logits, 1, 5, 7, 24, 24, false, &mut canvas).unwrap();
        let crop: Vec<f32> = (0..24)
            .flat_map(|y| canvas[y * 24..y * 24 + 15].to_vec())
            .collect();
        let mut want = vec![0.0; 31 * 19];
        resize_bilinear(&crop, 1, 24, 15, 31, 19, false, &mut want).unwrap();
        let r = MaskResizer::new(geom).unwrap();
        assert_eq!(r.resize_one(&logits).unwrap(), want);
        // Row blocks give the same rows.
        let mut scratch = Vec::new();
        let mut part = vec![0.0; 5 * 19];
        r.image_rows(&logits, 10..15, &mut scratch, &mut part);
        assert_eq!(&part[..], &want[10 * 19..15 * 19]);
    }

    #[test]
    fn nearest_matches_torch_rules() {
        assert_eq!(nearest_index(5, 8, 8), 5);
        assert_eq!(nearest_index(5, 4, 8), 2);
        // 3 -> 7: scale 3/7 in f32.
        let got: Vec<usize> = (0..7).map(|o| nearest_index(o, 3, 7)).collect();
        assert_eq!(got, vec![0, 0, 0, 1, 1, 2, 2]);
    }
}
