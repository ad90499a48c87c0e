//! COCO uncompressed run-length encoding (interfaces.md §4): the mask is read in column-major
//! (Fortran) order, `counts` alternates runs of 0s and 1s starting with 0s (a mask whose first
//! pixel is on starts with a 0-length run), `size` is `[height, width]`. Same output as
//! pycocotools' `rleEncode` (the last run is always written, so an empty 0×0 mask gives `[0]`).

use super::masks::BitMask;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rle {
    /// `[height, width]`.
    pub size: [usize; 2],
    pub counts: Vec<u64>,
}

/// Encodes a mask (stored row-major) column by column.
pub fn encode(mask: &BitMask) -> Rle {
    let (h, w) = (mask.height(), mask.width());
    let mut counts = Vec::new();
    let (mut prev, mut run) = (false, 0u64);
    for x in 0..w {
        for y in 0..h {
            let v = mask.get_index(y * w + x);
            if v != prev {
                counts.push(run);
                run = 0;
                prev = v;
            }
            run += 1;
        }
    }
    counts.push(run);
    Rle {
        size: [h, w],
        counts,
    }
}

/// Decodes an uncompressed RLE; the runs must cover exactly `height * width` pixels.
pub fn decode(rle: &Rle) -> Result<BitMask> {
    let [h, w] = rle.size;
    let total: u64 = rle.counts.iter().sum();
    if total != (h * w) as u64 {
        return Err(Error::Input(format!(
            "RLE runs cover {total} pixels, the size {h}x{w} has {}",
            h * w
        )));
    }
    let mut m = BitMask::new(h, w);
    let (mut pos, mut on) = (0usize, false);
    for &c in &rle.counts {
        if on {
            for p in pos..pos + c as usize {
                // Column-major position p → (y, x).
                m.set_index((p % h) * w + p / h, true);
            }
        }
        pos += c as usize;
        on = !on;
    }
    Ok(m)
}
