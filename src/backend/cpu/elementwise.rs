//! Elementwise arithmetic, concatenation, embedding lookup and 2-D transpose.

use super::matmul::WeightRef;
use super::{check_len, numel};
use crate::{Error, Result};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

fn binary(
    op: &'static str,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<()> {
    check_len(op, "b", b.len(), a.len())?;
    check_len(op, "out", out.len(), a.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    Ok(())
}

/// `out = a + b` (same lengths).
pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) -> Result<()> {
    binary("add", a, b, out, |a, b| a + b)
}

/// `out = a · b` (same lengths).
pub fn mul(a: &[f32], b: &[f32], out: &mut [f32]) -> Result<()> {
    binary("mul", a, b, out, |a, b| a * b)
}

/// `out[r, j] = x[r, j] + row[j]` for x `[len / row.len(), row.len()]`.
pub fn add_broadcast_rows(x: &[f32], row: &[f32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "add_broadcast_rows";
    check_len(OP, "out", out.len(), x.len())?;
    let c = row.len();
    if c == 0 {
        return if x.is_empty() {
            Ok(())
        } else {
            Err(Error::shape(OP, "empty row for a non-empty input"))
        };
    }
    if !x.len().is_multiple_of(c) {
        return Err(Error::shape(
            OP,
            format!("{} elements are not rows of {c}", x.len()),
        ));
    }
    let step = (CHUNK / c).max(1) * c;
    out.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(o, xs)| {
            for (o, xs) in o.chunks_mut(c).zip(xs.chunks(c)) {
                for ((o, &v), &r) in o.iter_mut().zip(xs).zip(row) {
                    *o = v + r;
                }
            }
        });
    Ok(())
}

/// `x *= s` in place.
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| {
        for v in c {
            *v *= s;
        }
    });
}

/// Concatenation along one axis: part i is viewed as `[outer, inner_i]`, out as
/// `[outer, Σ inner_i]`.
pub fn concat(parts: &[(&[f32], usize)], outer: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "concat";
    let mut total = 0usize;
    for (i, &(p, inner)) in parts.iter().enumerate() {
        let want = numel(OP, &[outer, inner])?;
        if p.len() != want {
            return Err(Error::shape(
                OP,
                format!(
                    "part {i} has {} elements, expected {outer}x{inner}",
                    p.len()
                ),
            ));
        }
        total = total
            .checked_add(inner)
            .ok_or_else(|| Error::shape(OP, "total size overflows"))?;
    }
    check_len(OP, "out", out.len(), numel(OP, &[outer, total])?)?;
    if total == 0 {
        return Ok(());
    }
    out.par_chunks_mut(total).enumerate().for_each(|(o, row)| {
        let mut at = 0;
        for &(p, inner) in parts {
            row[at..at + inner].copy_from_slice(&p[o * inner..(o + 1) * inner]);
            at += inner;
        }
    });
    Ok(())
}

/// Embedding lookup: `out[i] = table[ids[i]]`, table `[rows, cols]` in its stored dtype.
pub fn gather_rows(table: WeightRef, cols: usize, ids: &[u32], out: &mut [f32]) -> Result<()> {
    const OP: &str = "gather_rows";
    check_len(OP, "out", out.len(), numel(OP, &[ids.len(), cols])?)?;
    if cols == 0 {
        return Ok(());
    }
    if !table.len().is_multiple_of(cols) {
        return Err(Error::shape(
            OP,
            format!("table of {} elements is not rows of {cols}", table.len()),
        ));
    }
    let rows = table.len() / cols;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
        return Err(Error::shape(
            OP,
            format!("id {bad} is out of range for a table of {rows} rows"),
        ));
    }
    out.par_chunks_mut(cols)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| table.widen_into(id as usize * cols, o));
    Ok(())
}

/// out `[cols, rows]` = xᵀ for x `[rows, cols]`, in cache-sized tiles.
pub fn transpose2d(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) -> Result<()> {
    const OP: &str = "transpose2d";
    let n = numel(OP, &[rows, cols])?;
    check_len(OP, "x", x.len(), n)?;
    check_len(OP, "out", out.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    const T: usize = 32;
    // Each task owns T output rows (= T input columns).
    out.par_chunks_mut(T * rows)
        .enumerate()
        .for_each(|(bj, ob)| {
            let j0 = bj * T;
            let jn = ob.len() / rows;
            for i0 in (0..rows).step_by(T) {
                let i1 = (i0 + T).min(rows);
                for jj in 0..jn {
                    let orow = &mut ob[jj * rows..(jj + 1) * rows];
                    for i in i0..i1 {
                        orow[i] = x[i * cols + j0 + jj];
                    }
                }
            }
        });
    Ok(())
}
