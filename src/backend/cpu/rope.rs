//! Rotary position embedding, HF "rotate half" layout (Llama/Phi-3): dimension i pairs with
//! i + head_dim/2.

use super::{check_len, numel};
use crate::{Error, Result};
use rayon::prelude::*;

/// Rotates x `[tokens, heads, head_dim]` in place; token t is at position `positions[t]`.
///
/// Angles follow transformers exactly rather than being "more accurate": `inv_freq[i] =
/// 1 / theta^(2i/hd)` and `pos · inv_freq[i]` are both rounded to f32 (HF computes them as f32
/// tensors), because at positions in the thousands the f32 rounding of the angle (~1e-4 rad) is
/// larger than any error in cos/sin, and parity with transformers depends on reproducing it.
/// cos/sin of that f32 angle are then taken in f64 and rounded, as good as torch's f32 cos/sin.
pub fn rope(
    x: &mut [f32],
    tokens: usize,
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    theta: f32,
) -> Result<()> {
    const OP: &str = "rope";
    check_len(OP, "x", x.len(), numel(OP, &[tokens, heads, head_dim])?)?;
    check_len(OP, "positions", positions.len(), tokens)?;
    if !head_dim.is_multiple_of(2) {
        return Err(Error::shape(OP, format!("head_dim {head_dim} is odd")));
    }
    if x.is_empty() {
        return Ok(());
    }
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    x.par_chunks_mut(heads * head_dim)
        .zip(positions.par_iter())
        .for_each(|(tok, &pos)| {
            let p = pos as f32;
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = (p * f) as f64;
                    (a.cos() as f32, a.sin() as f32)
                })
                .unzip();
            for h in tok.chunks_mut(head_dim) {
                let (lo, hi) = h.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * cos[i] - b * sin[i];
                    hi[i] = b * cos[i] + a * sin[i];
                }
            }
        });
    Ok(())
}
