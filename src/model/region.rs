//! The region sampler for visual prompts (X-SAM's "naive" sampler, architecture notes §7, with
//! the deterministic point choice of interfaces.md §2).
//!
//! A prompt mask `[S, S]` (after the SAM resize and pad) gives its nonzero pixels in row-major
//! order, n of them; `num_points` of them are taken: indices `floor(k·n / P)` when n >= P, else
//! all n followed by repeats from the start. Each point (r, c) is sampled bilinearly
//! (`grid_sample`, align_corners=True, zero padding) at x = c / S, y = r / S (grid `2p − 1`) on
//! the seg-projector tokens laid out as a `√N × √N` map; the region vector is the per-channel
//! maximum over the points (already in LLM space).

use crate::backend::cpu;
use crate::{Error, Result, Tensor};

/// The `num_points` (row, col) points of a prompt mask `[s, s]` (any nonzero value is on).
pub fn region_points(mask: &[u8], s: usize, num_points: usize) -> Result<Vec<(usize, usize)>> {
    if mask.len() != s * s {
        return Err(Error::Input(format!(
            "prompt mask has {} pixels, expected {s}x{s}",
            mask.len()
        )));
    }
    if num_points == 0 {
        return Err(Error::Input(
            "region sampler needs at least one point".into(),
        ));
    }
    let on: Vec<usize> = mask
        .iter()
        .enumerate()
        .filter(|(_, &v)| v != 0)
        .map(|(i, _)| i)
        .collect();
    let n = on.len();
    if n == 0 {
        return Err(Error::Input(
            "visual prompt mask is empty (no nonzero pixel after resizing to the SAM input)".into(),
        ));
    }
    Ok((0..num_points)
        .map(|k| {
            let i = if n >= num_points {
                // k·n < P·n: no overflow for any mask that fits in memory
                ((k as u128 * n as u128) / num_points as u128) as usize
            } else {
                k % n
            };
            (on[i] / s, on[i] % s)
        })
        .collect())
}

/// The sampler (no parameters).
#[derive(Clone, Copy, Debug)]
pub struct RegionSampler {
    pub num_points: usize,
}

impl RegionSampler {
    pub fn new(num_points: usize) -> Self {
        RegionSampler { num_points }
    }

    /// `region.vectors` `[R, D]`: one vector per prompt mask (`[s, s]` each) on `tokens`
    /// (`[1, N, D]` or `[N, D]`, N a square: the seg-projector output).
    pub fn sample(&self, tokens: &Tensor, masks: &[&[u8]], s: usize) -> Result<Tensor> {
        let dims = tokens.dims();
        let (n, d) = match dims {
            [1, n, d] | [n, d] => (*n, *d),
            _ => {
                return Err(Error::shape(
                    "region_sampler",
                    format!("tokens {} are not [1, N, D] or [N, D]", tokens.shape()),
                ))
            }
        };
        let g = (n as f64).sqrt().round() as usize;
        if g * g != n {
            return Err(Error::shape(
                "region_sampler",
                format!("{n} tokens do not form a square map"),
            ));
        }
        // channels-first [D, g, g] map for grid sampling
        let map = crate::model::pixel_decoder::transpose(&tokens.to_vec_f32()?, n, d);
        let sf = s as f32;
        let mut out = Vec::with_capacity(masks.len() * d);
        let mut sampled = vec![0f32; d * self.num_points];
        for (ri, m) in masks.iter().enumerate() {
            let pts = region_points(m, s, self.num_points)
                .map_err(|e| Error::Input(format!("visual prompt {}: {e}", ri + 1)))?;
            // X-SAM: (r, c) / (H, W), flipped to (x, y), then 2p - 1 — in f32
            let grid: Vec<f32> = pts
                .iter()
                .flat_map(|&(r, c)| [2.0 * (c as f32 / sf) - 1.0, 2.0 * (r as f32 / sf) - 1.0])
                .collect();
            cpu::grid_sample_bilinear(&map, d, g, g, &grid, self.num_points, true, &mut sampled)?;
            out.extend(
                sampled
                    .chunks(self.num_points)
                    .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max)),
            );
        }
        Tensor::from_f32(out, [masks.len(), d])
    }
}
