//! Multi-head attention, blocked with an online softmax (flash-attention style) so memory holds
//! one query tile × key tile of logits, never tq × tk. Tasks are (head, query tile) pairs on
//! rayon; inside a task both products (q·kᵀ and p·v) are single-threaded gemm calls on strided
//! views of the `[tokens, heads, dim]` inputs, so nothing is transposed or copied.

use super::matmul::{gemm_raw, Strided};
use super::simd::{exp_f32, max_generic, sum_generic};
use super::{check_len, numel, SyncPtr};
use crate::{Error, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// Which keys each query sees.
#[derive(Clone, Copy, Debug)]
pub enum AttnMask<'a> {
    /// Every query attends every key.
    None,
    /// Query i sits at absolute position `q_offset + i`; key j is position j. Query i attends key
    /// j iff `0 <= (q_offset + i) - j < window` (`None`: no window). A query that sees no key
    /// at all gets a zero output.
    Causal {
        window: Option<usize>,
        q_offset: usize,
    },
    /// `[tq, tk]`, true = attend. A row with no true entry attends every key (Mask2Former's rule
    /// for fully blocked queries).
    Keep(&'a [bool]),
}

/// Additive logit bias: `bias(head, query, key_start, row)` adds into `row`, the logits of that
/// query for keys `key_start..key_start + row.len()` (SAM's relative positions).
pub type AttnBias<'a> = dyn Fn(usize, usize, usize, &mut [f32]) + Sync + 'a;

/// Most queries per task (tiles are evened out: 196 queries give 4 tiles of 49, not 64+64+64+4).
const QT: usize = 64;
/// Keys per tile.
const KT: usize = 256;

simd_fn! {
    /// Online-softmax step for one row of logits: turns `row` into exp(row - m_new) and returns
    /// (m_new, l_new, correction for the previous accumulator). A fully masked row leaves the
    /// state alone (NaN logits poison it instead of vanishing).
    fn online_row(row: &mut [f32], m_old: f32, l_old: f32) -> (f32, f32, f32) {
        let mx = max_generic(row);
        if mx == f32::NEG_INFINITY {
            let nan = row.iter().any(|v| v.is_nan());
            row.fill(0.0);
            return (m_old, if nan { f32::NAN } else { l_old }, 1.0);
        }
        let m_new = if mx > m_old { mx } else { m_old };
        let corr = exp_f32(m_old - m_new);
        for v in row.iter_mut() {
            *v = exp_f32(*v - m_new);
        }
        (m_new, l_old * corr + sum_generic(row), corr)
    }
}

/// Scaled dot-product attention over q `[tq, heads, head_dim]`, k `[tk, heads, head_dim]`,
/// v `[tk, heads, v_dim]` into out `[tq, heads, v_dim]`:
/// `softmax(scale·q·kᵀ + bias, masked) · v` per head.
// The bias type is spelled out (it is `AttnBias`) so the signature reads as agreed.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tq: usize,
    tk: usize,
    heads: usize,
    head_dim: usize,
    v_dim: usize,
    scale: f32,
    mask: AttnMask,
    bias: Option<&(dyn Fn(usize, usize, usize, &mut [f32]) + Sync)>,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "attention";
    check_len(OP, "q", q.len(), numel(OP, &[tq, heads, head_dim])?)?;
    check_len(OP, "k", k.len(), numel(OP, &[tk, heads, head_dim])?)?;
    check_len(OP, "v", v.len(), numel(OP, &[tk, heads, v_dim])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[tq, heads, v_dim])?)?;
    let keep_any: Vec<bool> = match mask {
        AttnMask::Keep(m) => {
            check_len(OP, "mask", m.len(), numel(OP, &[tq, tk])?)?;
            if tk == 0 {
                vec![false; tq]
            } else {
                m.par_chunks(tk).map(|r| r.iter().any(|&b| b)).collect()
            }
        }
        AttnMask::Causal {
            window: Some(0), ..
        } => return Err(Error::shape(OP, "causal window of 0 keys")),
        _ => Vec::new(),
    };
    if out.is_empty() {
        return Ok(());
    }
    if tk == 0 {
        out.fill(0.0);
        return Ok(());
    }

    let (qs, vs) = (heads * head_dim, heads * v_dim);
    let tiles = tq.div_ceil(QT);
    let qt_size = tq.div_ceil(tiles);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    (0..heads * tiles).into_par_iter().for_each(|t| {
        let (h, tile) = (t % heads, t / heads);
        let (i0, i1) = (tile * qt_size, ((tile + 1) * qt_size).min(tq));
        if i0 >= i1 {
            return;
        }
        let qt = i1 - i0;
        // Keys any query of the tile can see.
        let (kstart, kend) = match mask {
            AttnMask::Causal { window, q_offset } => {
                let first = q_offset.saturating_add(i0);
                let last = q_offset.saturating_add(i1 - 1);
                let kend = tk.min(last.saturating_add(1));
                let kstart = window.map_or(0, |w| (first + 1).saturating_sub(w));
                (kstart.min(kend), kend)
            }
            _ => (0, tk),
        };
        let mut s = vec![0f32; qt * KT];
        let mut o = vec![0f32; qt * v_dim];
        let mut m_run = vec![f32::NEG_INFINITY; qt];
        let mut l_run = vec![0f32; qt];
        let mut j0 = kstart;
        while j0 < kend {
            let kt = KT.min(kend - j0);
            let s = &mut s[..qt * kt];
            // SAFETY: q rows i0..i1 and k rows j0..j0+kt of head h lie inside the checked
            // slices; s is qt×kt.
            unsafe {
                gemm_raw(
                    qt,
                    kt,
                    head_dim,
                    s.as_mut_ptr(),
                    Strided { rs: kt, cs: 1 },
                    false,
                    q.as_ptr().add(i0 * qs + h * head_dim),
                    Strided { rs: qs, cs: 1 },
                    k.as_ptr().add(j0 * qs + h * head_dim),
                    Strided { rs: 1, cs: qs },
                    scale,
                    Parallelism::None,
                );
            }
            for (r, row) in s.chunks_mut(kt).enumerate() {
                let i = i0 + r;
                if let Some(b) = bias {
                    b(h, i, j0, row);
                }
                match mask {
                    AttnMask::None => {}
                    AttnMask::Causal { window, q_offset } => {
                        let p = q_offset.saturating_add(i);
                        for (jj, x) in row.iter_mut().enumerate() {
                            let j = j0 + jj;
                            if j > p || window.is_some_and(|w| p - j >= w) {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                    AttnMask::Keep(m) => {
                        if keep_any[i] {
                            let keep = &m[i * tk + j0..i * tk + j0 + kt];
                            for (x, &kb) in row.iter_mut().zip(keep) {
                                if !kb {
                                    *x = f32::NEG_INFINITY;
                                }
                            }
                        }
                    }
                }
                let (mn, ln, corr) = online_row(row, m_run[r], l_run[r]);
                m_run[r] = mn;
                l_run[r] = ln;
                if corr != 1.0 {
                    for x in &mut o[r * v_dim..(r + 1) * v_dim] {
                        *x *= corr;
                    }
                }
            }
            // SAFETY: v rows j0..j0+kt of head h are inside v; o is qt×v_dim.
            unsafe {
                gemm_raw(
                    qt,
                    v_dim,
                    kt,
                    o.as_mut_ptr(),
                    Strided { rs: v_dim, cs: 1 },
                    true,
                    s.as_ptr(),
                    Strided { rs: kt, cs: 1 },
                    v.as_ptr().add(j0 * vs + h * v_dim),
                    Strided { rs: vs, cs: 1 },
                    1.0,
                    Parallelism::None,
                );
            }
            j0 += kt;
        }
        for r in 0..qt {
            let l = l_run[r];
            let inv = if l == 0.0 { 0.0 } else { 1.0 / l };
            let src = &o[r * v_dim..(r + 1) * v_dim];
            // SAFETY: row i0+r, head h of out belongs to this task only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out_ptr.get().add((i0 + r) * vs + h * v_dim), v_dim)
            };
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = x * inv;
            }
        }
    });
    Ok(())
}
