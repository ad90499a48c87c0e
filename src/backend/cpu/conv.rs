//! 2-D convolution as im2col + the weight-widening product of `matmul`.
//!
//! The im2col matrix is built a block of output pixels at a time (about 8 MB) so a 3×3 conv on a
//! 128² map does not need a 150 MB buffer; 1×1 stride-1 convs read the input in place.

use super::matmul::{xwt, Strided, WeightRef};
use super::{check_len, numel};
use crate::{Error, Result};
use rayon::prelude::*;

/// im2col block elements (f32) before the product.
const COL_BLOCK: usize = 1 << 21;

/// x `[cin, h, w]`, weight `[cout, cin, kh, kw]` (any stored dtype), optional bias `[cout]`,
/// out `[cout, ho, wo]` with `ho = (h + 2·pad - kh) / stride + 1` (zero padding).
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    weight: WeightRef,
    bias: Option<&[f32]>,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    out: &mut [f32],
) -> Result<()> {
    const OP: &str = "conv2d";
    if stride == 0 || kh == 0 || kw == 0 {
        return Err(Error::shape(
            OP,
            format!("kernel {kh}x{kw} and stride {stride} must be positive"),
        ));
    }
    let (hp, wp) = (
        h.saturating_add(pad.saturating_mul(2)),
        w.saturating_add(pad.saturating_mul(2)),
    );
    if hp < kh || wp < kw {
        return Err(Error::shape(
            OP,
            format!("kernel {kh}x{kw} larger than the padded input {hp}x{wp}"),
        ));
    }
    let (ho, wo) = ((hp - kh) / stride + 1, (wp - kw) / stride + 1);
    let kk = numel(OP, &[cin, kh, kw])?;
    let npix = numel(OP, &[ho, wo])?;
    check_len(OP, "x", x.len(), numel(OP, &[cin, h, w])?)?;
    check_len(OP, "weight", weight.len(), numel(OP, &[cout, kk])?)?;
    check_len(OP, "out", out.len(), numel(OP, &[cout, npix])?)?;
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), cout)?;
    }
    if out.is_empty() {
        return Ok(());
    }
    // Output is channels-first: pixel i of channel j at i + j·npix.
    let dst_s = Strided { rs: 1, cs: npix };

    if kh == 1 && kw == 1 && stride == 1 && pad == 0 {
        // x [cin, hw] is already the (pixel, cin) matrix, column-major.
        xwt(
            npix,
            cout,
            cin,
            x,
            Strided { rs: 1, cs: npix },
            weight,
            bias,
            out,
            dst_s,
        );
        return Ok(());
    }

    let rows = (COL_BLOCK / kk.max(1)).clamp(1, npix);
    let mut col = vec![0f32; rows * kk];
    let mut p0 = 0;
    while p0 < npix {
        let m = rows.min(npix - p0);
        let col = &mut col[..m * kk];
        col.par_chunks_mut(kk).enumerate().for_each(|(r, c)| {
            let p = p0 + r;
            let (oy, ox) = (p / wo, p % wo);
            im2col_pixel(x, h, w, kh, kw, oy * stride, ox * stride, pad, c);
        });
        xwt(
            m,
            cout,
            kk,
            col,
            Strided { rs: kk, cs: 1 },
            weight,
            bias,
            &mut out[p0..],
            dst_s,
        );
        p0 += m;
    }
    Ok(())
}

/// One im2col row: the (cin, ky, kx) patch whose top-left corner in padded coordinates is
/// (y0, x0), zeros outside the input.
#[allow(clippy::too_many_arguments)]
fn im2col_pixel(
    x: &[f32],
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    y0: usize,
    x0: usize,
    pad: usize,
    c: &mut [f32],
) {
    let inside_x = x0 >= pad && x0 - pad + kw <= w;
    for (ci, plane) in c.chunks_mut(kh * kw).enumerate() {
        let img = &x[ci * h * w..(ci + 1) * h * w];
        for (ky, dst) in plane.chunks_mut(kw).enumerate() {
            let iy = y0 + ky;
            if iy < pad || iy - pad >= h {
                dst.fill(0.0);
                continue;
            }
            let row = &img[(iy - pad) * w..(iy - pad + 1) * w];
            if inside_x {
                dst.copy_from_slice(&row[x0 - pad..x0 - pad + kw]);
            } else {
                for (kx, d) in dst.iter_mut().enumerate() {
                    let ix = x0 + kx;
                    *d = if ix < pad || ix - pad >= w {
                        0.0
                    } else {
                        row[ix - pad]
                    };
                }
            }
        }
    }
}
