//! Matrix products. f32 × f32 goes straight to the `gemm` crate; bf16/f16 weights are widened a
//! panel of output columns at a time into per-thread scratch (never the whole matrix), each panel
//! multiplied by one single-threaded gemm call while rayon runs panels side by side. Decode-sized
//! products (a few rows) read the weight once with fused widen+dot loops instead.

use super::simd::{dot_bf16, dot_f16, dot_f32, widen_bf16, widen_f16};
use super::{check_len, numel, SyncPtr};
use crate::tensor::{DType, Tensor};
use crate::Result;
use gemm::Parallelism;
use half::{bf16, f16};
use rayon::prelude::*;
use std::cell::RefCell;

/// A weight matrix in its stored dtype (row-major, contiguous, host memory).
#[derive(Clone, Copy, Debug)]
pub enum WeightRef<'a> {
    F32(&'a [f32]),
    BF16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> WeightRef<'a> {
    /// Views a contiguous host tensor of any supported dtype.
    pub fn from_tensor(t: &'a Tensor) -> Result<Self> {
        Ok(match t.dtype() {
            DType::F32 => WeightRef::F32(t.as_slice::<f32>()?),
            DType::BF16 => WeightRef::BF16(t.as_slice::<bf16>()?),
            DType::F16 => WeightRef::F16(t.as_slice::<f16>()?),
        })
    }

    pub fn len(&self) -> usize {
        match self {
            WeightRef::F32(s) => s.len(),
            WeightRef::BF16(s) => s.len(),
            WeightRef::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            WeightRef::F32(_) => DType::F32,
            WeightRef::BF16(_) => DType::BF16,
            WeightRef::F16(_) => DType::F16,
        }
    }

    /// Writes elements `start..start + dst.len()` as f32. Caller checks the range.
    pub(crate) fn widen_into(&self, start: usize, dst: &mut [f32]) {
        let end = start + dst.len();
        match self {
            WeightRef::F32(s) => dst.copy_from_slice(&s[start..end]),
            WeightRef::BF16(s) => widen_bf16(&s[start..end], dst),
            WeightRef::F16(s) => widen_f16(&s[start..end], dst),
        }
    }

    /// Σ x[i]·w[start + i] for i < x.len(). Caller checks the range.
    #[inline]
    fn dot(&self, x: &[f32], start: usize) -> f32 {
        let end = start + x.len();
        match self {
            WeightRef::F32(s) => dot_f32(x, &s[start..end]),
            WeightRef::BF16(s) => dot_bf16(x, &s[start..end]),
            WeightRef::F16(s) => dot_f16(x, &s[start..end]),
        }
    }
}

thread_local! {
    /// Widened weight panel of the current thread; kept between calls so big products do not
    /// allocate per panel.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Up to this many rows, products read the weight once through dot products (decode path).
const SMALL_M: usize = 4;
/// Output columns per widened panel, before rounding to balance the threads.
const PANEL_COLS: usize = 256;

/// A strided f32 matrix view: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub rs: usize,
    pub cs: usize,
}

/// Largest offset touched by an `rows × cols` view with these strides, plus one.
fn extent(rows: usize, cols: usize, s: Strided) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * s.rs + (cols - 1) * s.cs + 1
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), times `scale`, f32 throughout.
///
/// # Safety
/// Each pointer must address its whole strided view (m×k, k×n, m×n), dst must not alias the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_s: Strided,
    accumulate: bool,
    lhs: *const f32,
    lhs_s: Strided,
    rhs: *const f32,
    rhs_s: Strided,
    scale: f32,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_s.rs + j * dst_s.cs) = 0.0;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_s.cs as isize,
        dst_s.rs as isize,
        accumulate,
        lhs,
        lhs_s.cs as isize,
        lhs_s.rs as isize,
        rhs,
        rhs_s.cs as isize,
        rhs_s.rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        par,
    );
}

/// The core of `linear` and `conv2d`: dst(i, j) = Σ_kk x(i, kk)·w[j·k + kk] (+ bias[j]) for an
/// arbitrarily strided x and dst. Slices must already be checked to cover the views.
#[allow(clippy::too_many_arguments)]
pub(crate) fn xwt(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    x_s: Strided,
    w: WeightRef,
    bias: Option<&[f32]>,
    dst: &mut [f32],
    dst_s: Strided,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(extent(m, k, x_s) <= x.len() && extent(m, n, dst_s) <= dst.len() && n * k <= w.len());
    if let Some(b) = bias {
        assert!(b.len() >= n);
    }

    if m <= SMALL_M {
        return xwt_small(m, n, k, x, x_s, w, bias, dst, dst_s);
    }

    // Start from the bias (gemm then accumulates) or let gemm overwrite.
    let accumulate = match bias {
        Some(b) => {
            if dst_s.cs == 1 && dst_s.rs >= n {
                dst.par_chunks_mut(dst_s.rs)
                    .take(m)
                    .for_each(|row| row[..n].copy_from_slice(&b[..n]));
            } else {
                for i in 0..m {
                    for (j, &bj) in b[..n].iter().enumerate() {
                        dst[i * dst_s.rs + j * dst_s.cs] = bj;
                    }
                }
            }
            true
        }
        None => false,
    };

    let dst_ptr = SyncPtr(dst.as_mut_ptr());
    let x_ptr = x.as_ptr();
    if let WeightRef::F32(wf) = w {
        // SAFETY: extents checked above; w viewed as k×n with rs=1, cs=k covers n·k elements.
        unsafe {
            gemm_raw(
                m,
                n,
                k,
                dst_ptr.get(),
                dst_s,
                accumulate,
                x_ptr,
                x_s,
                wf.as_ptr(),
                Strided { rs: 1, cs: k },
                1.0,
                Parallelism::Rayon(0),
            );
        }
        return;
    }

    // Panels of output columns, as many as a multiple of the thread count so they balance. When
    // n is too narrow for one panel per thread, rows are split too (each row block widens its own
    // copy of the panel, cheap at that width).
    let threads = rayon::current_num_threads().max(1);
    let per_thread = n.div_ceil(threads * PANEL_COLS).max(1);
    let nb = n.div_ceil(threads * per_thread).next_multiple_of(16).min(n);
    let panels = n.div_ceil(nb);
    let row_blocks = threads.div_ceil(panels).min(m.div_ceil(16)).max(1);
    let mb = m.div_ceil(row_blocks);
    let x_addr = x_ptr as usize;
    (0..panels * row_blocks).into_par_iter().for_each(|t| {
        let (p, r) = (t % panels, t / panels);
        let (j0, i0) = (p * nb, r * mb);
        let cols = nb.min(n - j0);
        let rows = mb.min(m.saturating_sub(i0));
        if rows == 0 {
            return;
        }
        PANEL.with(|cell| {
            let mut buf = cell.borrow_mut();
            if buf.len() < cols * k {
                buf.resize(cols * k, 0.0);
            }
            let panel = &mut buf[..cols * k];
            w.widen_into(j0 * k, panel);
            // SAFETY: the task writes dst rows i0..i0+rows, columns j0..j0+cols only, disjoint
            // across tasks; extents were checked above.
            unsafe {
                gemm_raw(
                    rows,
                    cols,
                    k,
                    dst_ptr.get().add(i0 * dst_s.rs + j0 * dst_s.cs),
                    dst_s,
                    accumulate,
                    (x_addr as *const f32).add(i0 * x_s.rs),
                    x_s,
                    panel.as_ptr(),
                    Strided { rs: 1, cs: k },
                    1.0,
                    Parallelism::None,
                );
            }
        });
    });
}

/// Few rows: every weight row is read once and dotted with each x row.
#[allow(clippy::too_many_arguments)]
fn xwt_small(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    x_s: Strided,
    w: WeightRef,
    bias: Option<&[f32]>,
    dst: &mut [f32],
    dst_s: Strided,
) {
    // Contiguous copies of the (at most SMALL_M) x rows.
    let rows: Vec<f32> = if x_s.cs == 1 {
        let mut v = Vec::with_capacity(m * k);
        for i in 0..m {
            v.extend_from_slice(&x[i * x_s.rs..i * x_s.rs + k]);
        }
        v
    } else {
        (0..m)
            .flat_map(|i| (0..k).map(move |kk| (i, kk)))
            .map(|(i, kk)| x[i * x_s.rs + kk * x_s.cs])
            .collect()
    };
    let threads = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(threads * 8).max(8);
    let dst_ptr = SyncPtr(dst.as_mut_ptr());
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        for j in c * chunk..((c + 1) * chunk).min(n) {
            let b = bias.map_or(0.0, |b| b[j]);
            for i in 0..m {
                let v = w.dot(&rows[i * k..(i + 1) * k], j * k) + b;
                // SAFETY: (i, j) is inside the checked dst extent; each j belongs to one task.
                unsafe { *dst_ptr.get().add(i * dst_s.rs + j * dst_s.cs) = v };
            }
        }
    });
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ (+ bias[n])`, PyTorch `nn.Linear` layout.
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: WeightRef,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "linear";
    check_len(OP, "x", x.len(), numel(OP, &[m, k])?)?;
    check_len(OP, "weight", w.len(), numel(OP, &[n, k])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[m, n])?)?;
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), n)?;
    }
    xwt(
        m,
        n,
        k,
        x,
        Strided { rs: k, cs: 1 },
        w,
        bias,
        out,
        Strided { rs: n, cs: 1 },
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_matmul(
    op: &'static str,
    a: &[f32],
    b: &[f32],
    out: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Result<()> {
    check_len(op, "a", a.len(), numel(op, &[batch, m, k])?)?;
    check_len(op, "b", b.len(), numel(op, &[batch, k, n])?)?;
    check_len(op, "out", out.len(), numel(op, &[batch, m, n])?)?;
    Ok(())
}

fn b_strides(k: usize, n: usize, b_transposed: bool) -> Strided {
    if b_transposed {
        Strided { rs: 1, cs: k }
    } else {
        Strided { rs: n, cs: 1 }
    }
}

/// `out[m, n] = a[m, k] · b[k, n]`, or `a · bᵀ` with b given as `[n, k]` when `b_transposed`.
pub fn matmul(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    b_transposed: bool,
) -> Result<()> {
    check_matmul("matmul", a, b, out, 1, m, k, n)?;
    // SAFETY: lengths checked; out does not alias a or b (distinct borrows).
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            out.as_mut_ptr(),
            Strided { rs: n, cs: 1 },
            false,
            a.as_ptr(),
            Strided { rs: k, cs: 1 },
            b.as_ptr(),
            b_strides(k, n, b_transposed),
            1.0,
            Parallelism::Rayon(0),
        );
    }
    Ok(())
}

/// `batch` independent `matmul`s over consecutive `[m, k]`, `[k, n]` (or `[n, k]`), `[m, n]` blocks.
#[allow(clippy::too_many_arguments)]
pub fn batched_matmul(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    b_transposed: bool,
) -> Result<()> {
    check_matmul("batched_matmul", a, b, out, batch, m, k, n)?;
    let (sa, sb, so) = (m * k, k * n, m * n);
    if so == 0 {
        return Ok(());
    }
    let bs = b_strides(k, n, b_transposed);
    // Small products: one per task; big ones: gemm threads each.
    let small = m.saturating_mul(n).saturating_mul(k) < (1 << 21);
    let one = |i: usize, o: &mut [f32], par: Parallelism| {
        // SAFETY: block i of each operand lies inside the checked slices.
        unsafe {
            gemm_raw(
                m,
                n,
                k,
                o.as_mut_ptr(),
                Strided { rs: n, cs: 1 },
                false,
                a.as_ptr().add(i * sa),
                Strided { rs: k, cs: 1 },
                b.as_ptr().add(i * sb),
                bs,
                1.0,
                par,
            );
        }
    };
    if small {
        out.par_chunks_mut(so)
            .enumerate()
            .for_each(|(i, o)| one(i, o, Parallelism::None));
    } else {
        for (i, o) in out.chunks_mut(so).enumerate() {
            one(i, o, Parallelism::Rayon(0));
        }
    }
    Ok(())
}
