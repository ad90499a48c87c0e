//! Attention over a sequence's cached K/V, read block by block through its block table (no
//! gather into a contiguous copy). Causal, with Phi-3's sliding window: query at position i sees
//! key j iff `0 <= i - j < window`. Online softmax in f32, parallel over (query, head).

use super::{PagedKvCache, SeqId};
use crate::backend::cpu::{dot_f32, exp_f32};
use crate::{Error, Result};
use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    cache: &PagedKvCache,
    s: SeqId,
    layer: usize,
    q: &[f32],
    q_pos0: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    window: Option<usize>,
    out: &mut [f32],
) -> Result<()> {
    let cfg = *cache.config();
    let width = heads * head_dim;
    if head_dim == 0 || heads == 0 || !q.len().is_multiple_of(width) || out.len() != q.len() {
        return Err(Error::shape(
            "paged_attention",
            format!("q {} / out {} for {heads}x{head_dim}", q.len(), out.len()),
        ));
    }
    if !cfg.kv_dim.is_multiple_of(head_dim)
        || !heads.is_multiple_of((cfg.kv_dim / head_dim).max(1))
        || layer >= cfg.num_layers
    {
        return Err(Error::shape(
            "paged_attention",
            format!("kv_dim {} vs {heads}x{head_dim}", cfg.kv_dim),
        ));
    }
    if window == Some(0) {
        return Err(Error::Input("sliding window must be at least 1".into()));
    }
    if cache.is_metadata_only() {
        return Err(Error::Graph(
            "CPU paged attention on a metadata-only KV cache (its K/V live on a device)".into(),
        ));
    }
    let kv_heads = cfg.kv_dim / head_dim;
    let group = heads / kv_heads;
    let tq = q.len() / width;
    let len = cache.len(s)?;
    if q_pos0 + tq > len {
        return Err(Error::shape(
            "paged_attention",
            format!("queries up to {} beyond cached length {len}", q_pos0 + tq),
        ));
    }
    let table = cache.block_table(s)?;
    let bs = cfg.block_size;
    let window = window.unwrap_or(usize::MAX);
    // Every key a query can see must still be cached.
    let first_needed = (q_pos0 + 1).saturating_sub(window);
    if table[first_needed / bs..(q_pos0 + tq).div_ceil(bs)]
        .iter()
        .any(|b| b.is_none())
    {
        return Err(Error::Input(
            "attention needs KV blocks already released by the sliding window".into(),
        ));
    }

    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(row, o)| {
            let (i, h) = (row / heads, row % heads);
            let p = q_pos0 + i;
            let qh = &q[i * width + h * head_dim..][..head_dim];
            let kvh = (h / group) * head_dim;
            let lo = (p + 1).saturating_sub(window);
            let mut m = f32::NEG_INFINITY;
            let mut l = 0f32;
            let mut acc = vec![0f32; head_dim];
            let mut scores = vec![0f32; bs];
            let visible = table.iter().enumerate().take(p / bs + 1).skip(lo / bs);
            for (blk, &b) in visible {
                // Checked above: every block in this range is present.
                let Some(b) = b else { continue };
                let (kb, vb) = cache.block(b, layer);
                let (s0, s1) = (
                    lo.max(blk * bs) - blk * bs,
                    (p + 1).min(blk * bs + bs) - blk * bs,
                );
                let mut bmax = f32::NEG_INFINITY;
                for t in s0..s1 {
                    let kr = &kb[t * cfg.kv_dim + kvh..][..head_dim];
                    // A plain `.sum()` is one serial add chain (no reassociation, no SIMD);
                    // the backend's lane-split dot vectorises.
                    let d = dot_f32(qh, kr) * scale;
                    scores[t] = d;
                    bmax = bmax.max(d);
                }
                let new_m = m.max(bmax);
                let corr = exp_f32(m - new_m);
                l *= corr;
                acc.iter_mut().for_each(|a| *a *= corr);
                for t in s0..s1 {
                    let w = exp_f32(scores[t] - new_m);
                    l += w;
                    let vr = &vb[t * cfg.kv_dim + kvh..][..head_dim];
                    acc.iter_mut().zip(vr).for_each(|(a, v)| *a += w * v);
                }
                m = new_m;
            }
            let inv = 1.0 / l;
            o.iter_mut().zip(&acc).for_each(|(o, a)| *o = a * inv);
        });
    Ok(())
}
