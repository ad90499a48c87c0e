//! Every CPU op against a naive f64 reference written here (plain loops, f64 accumulation), on
//! seeded random inputs at awkward sizes (1, 3, 7, 17, 33, 65, 127, ...).
//!
//! Tolerances: an f32 sum of k products has a worst-case error of about k·eps·Σ|terms| and a
//! typical one of sqrt(k)·eps·Σ|terms| (eps = 2^-24 ≈ 6e-8 per rounding); product tests therefore
//! bound each element by `C·sqrt(k)·eps·Σ|x·w|` computed alongside the reference, which is tight
//! enough to catch a wrong index (errors of order Σ|x·w| itself) with a wide margin. Every
//! comparison fails on a non-finite output, so NaN can never pass.

// Index loops mirror the formulas they check.
#![allow(clippy::needless_range_loop)]

use half::{bf16, f16};
use xsam::backend::cpu::*;
use xsam::Error;

const EPS: f64 = f32::EPSILON as f64 / 2.0; // unit roundoff of f32

// ---------------------------------------------------------------- helpers

/// splitmix64: small, seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uni(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uni() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// |got - want| <= atol + rtol·|want| element-wise; a non-finite output (or reference) fails.
fn close(name: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{name}: non-finite output {g} at {i}");
        assert!(w.is_finite(), "{name}: non-finite reference {w} at {i}");
        let err = (g as f64 - w).abs();
        let tol = atol + rtol * w.abs();
        assert!(
            err <= tol,
            "{name}: at {i} got {g}, want {w} (err {err:e} > tol {tol:e})"
        );
    }
}

/// Per-element bound for sums of products: `c·(sqrt(k) + 2)·eps·mag[i]`, mag = Σ|terms|.
fn close_mag(name: &str, got: &[f32], want: &[f64], mag: &[f64], k: usize, c: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, ((&g, &w), &m)) in got.iter().zip(want).zip(mag).enumerate() {
        assert!(g.is_finite(), "{name}: non-finite output {g} at {i}");
        let tol = c * ((k as f64).sqrt() + 2.0) * EPS * m + 1e-30;
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol,
            "{name}: at {i} got {g}, want {w} (err {err:e} > tol {tol:e})"
        );
    }
}

fn is_shape_err(r: xsam::Result<()>) -> bool {
    matches!(r, Err(Error::Shape { .. }))
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// The weight as the kernels see it (after rounding to the stored dtype), and its WeightRef.
enum W {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl W {
    fn new(kind: usize, w: &[f32]) -> W {
        match kind {
            0 => W::F32(w.to_vec()),
            1 => W::BF16(w.iter().map(|&v| bf16::from_f32(v)).collect()),
            _ => W::F16(w.iter().map(|&v| f16::from_f32(v)).collect()),
        }
    }
    fn as_ref(&self) -> WeightRef<'_> {
        match self {
            W::F32(v) => WeightRef::F32(v),
            W::BF16(v) => WeightRef::BF16(v),
            W::F16(v) => WeightRef::F16(v),
        }
    }
    fn f64s(&self) -> Vec<f64> {
        match self {
            W::F32(v) => v.iter().map(|&x| x as f64).collect(),
            W::BF16(v) => v.iter().map(|&x| x.to_f64()).collect(),
            W::F16(v) => v.iter().map(|&x| x.to_f64()).collect(),
        }
    }
}

/// out[i, j] = Σ x[i, kk]·w[j, kk] + b[j] and the magnitude Σ|x·w| + |b|.
fn ref_xwt(
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    m: usize,
    k: usize,
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; m * n];
    let mut mag = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut a) = (0.0, 0.0);
            for kk in 0..k {
                let p = x[i * k + kk] * w[j * k + kk];
                s += p;
                a += p.abs();
            }
            if let Some(b) = b {
                s += b[j];
                a += b[j].abs();
            }
            out[i * n + j] = s;
            mag[i * n + j] = a;
        }
    }
    (out, mag)
}

// ---------------------------------------------------------------- matrix products

#[test]
fn linear_all_dtypes_bias_and_sizes() {
    let mut rng = Rng(1);
    // Around the small-m (<= 4) / panel boundaries, odd k and n, n below and above one panel.
    let shapes = [
        (1, 1, 1),
        (1, 7, 3),
        (1, 300, 257),
        (3, 17, 5),
        (4, 33, 65),
        (5, 65, 17),
        (7, 127, 33),
        (33, 64, 127),
        (65, 300, 70),
        (127, 129, 600),
        (2, 4096, 9),
        (65, 40, 9), // narrower than one panel per thread: rows split too
        (33, 7, 1),
    ];
    for &(m, k, n) in &shapes {
        for kind in 0..3 {
            for with_bias in [false, true] {
                let x = rng.vec(m * k, 1.0);
                let w = W::new(kind, &rng.vec(n * k, 0.5));
                let b = rng.vec(n, 1.0);
                let bias = with_bias.then_some(&b[..]);
                let mut out = vec![f32::NAN; m * n];
                linear(&x, m, k, w.as_ref(), n, bias, &mut out).unwrap();
                let (want, mag) =
                    ref_xwt(&to_f64(&x), &w.f64s(), bias.map(to_f64).as_deref(), m, k, n);
                // gemm's blocked sums stay within a few sqrt(k)·eps of the magnitude.
                close_mag(
                    &format!("linear m{m} k{k} n{n} dtype{kind} bias{with_bias}"),
                    &out,
                    &want,
                    &mag,
                    k,
                    4.0,
                );
            }
        }
    }
}

#[test]
fn linear_overwrites_output_and_checks_sizes() {
    let mut rng = Rng(2);
    let (m, k, n) = (9, 20, 11);
    let x = rng.vec(m * k, 1.0);
    let w = rng.vec(n * k, 1.0);
    let mut a = vec![123.0; m * n];
    let mut b = vec![-7.0; m * n];
    linear(&x, m, k, WeightRef::F32(&w), n, None, &mut a).unwrap();
    linear(&x, m, k, WeightRef::F32(&w), n, None, &mut b).unwrap();
    assert_eq!(a, b, "output must not depend on its previous contents");
    assert!(is_shape_err(linear(
        &x,
        m,
        k + 1,
        WeightRef::F32(&w),
        n,
        None,
        &mut a
    )));
    assert!(is_shape_err(linear(
        &x,
        m,
        k,
        WeightRef::F32(&w[1..]),
        n,
        None,
        &mut a
    )));
    assert!(is_shape_err(linear(
        &x,
        m,
        k,
        WeightRef::F32(&w),
        n,
        Some(&[0.0; 3]),
        &mut a
    )));
    assert!(is_shape_err(linear(
        &x,
        m,
        k,
        WeightRef::F32(&w),
        n,
        None,
        &mut a[1..]
    )));
    assert!(is_shape_err(linear(
        &x,
        usize::MAX,
        2,
        WeightRef::F32(&w),
        n,
        None,
        &mut a
    )));
    // Empty products are fine and leave nothing to write.
    linear(&[], 0, k, WeightRef::F32(&w), n, None, &mut []).unwrap();
    // k = 0: the result is the bias alone.
    let mut o = vec![5.0; 3 * 2];
    linear(
        &[],
        3,
        0,
        WeightRef::F32(&[]),
        2,
        Some(&[1.5, -2.0]),
        &mut o,
    )
    .unwrap();
    assert_eq!(o, vec![1.5, -2.0, 1.5, -2.0, 1.5, -2.0]);
    let mut o = vec![9.0; 12];
    linear(&[], 6, 0, WeightRef::BF16(&[]), 2, None, &mut o).unwrap();
    assert!(o.iter().all(|&v| v == 0.0));
}

#[test]
fn weight_ref_from_tensor() {
    let t = xsam::Tensor::from_f32(vec![1.0, -2.0, 3.0, 0.5, 0.25, 8.0], [2, 3]).unwrap();
    for dt in [xsam::DType::F32, xsam::DType::BF16, xsam::DType::F16] {
        let c = t.to_dtype(dt).unwrap();
        let w = WeightRef::from_tensor(&c).unwrap();
        assert_eq!(w.len(), 6);
        let mut out = vec![0.0; 2];
        linear(&[1.0, 1.0, 1.0], 1, 3, w, 2, None, &mut out).unwrap();
        assert_eq!(out, vec![2.0, 8.75]);
    }
    // A strided view is refused rather than read wrongly.
    let tt = t.transpose(0, 1).unwrap();
    assert!(WeightRef::from_tensor(&tt).is_err());
}

fn ref_matmul(
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    bt: bool,
) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                let bv = if bt { b[j * k + kk] } else { b[kk * n + j] };
                let p = a[i * k + kk] as f64 * bv as f64;
                out[i * n + j] += p;
                mag[i * n + j] += p.abs();
            }
        }
    }
    (out, mag)
}

#[test]
fn matmul_both_layouts_and_batched() {
    let mut rng = Rng(3);
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 7, 17),
        (33, 65, 1),
        (127, 33, 65),
        (64, 256, 96),
    ] {
        for bt in [false, true] {
            let a = rng.vec(m * k, 1.0);
            let b = rng.vec(k * n, 1.0);
            let mut out = vec![f32::NAN; m * n];
            matmul(&a, &b, &mut out, m, k, n, bt).unwrap();
            let (want, mag) = ref_matmul(&a, &b, m, k, n, bt);
            close_mag(
                &format!("matmul {m}x{k}x{n} bt{bt}"),
                &out,
                &want,
                &mag,
                k,
                4.0,
            );
        }
    }
    // Small batches run one product per task; 128³ products take the threaded-gemm branch.
    for &(batch, m, k, n) in &[(5, 3, 7, 17), (3, 1, 65, 33), (2, 128, 128, 128)] {
        for bt in [false, true] {
            let a = rng.vec(batch * m * k, 1.0);
            let b = rng.vec(batch * k * n, 1.0);
            let mut out = vec![f32::NAN; batch * m * n];
            batched_matmul(&a, &b, &mut out, batch, m, k, n, bt).unwrap();
            for i in 0..batch {
                let (want, mag) = ref_matmul(
                    &a[i * m * k..(i + 1) * m * k],
                    &b[i * k * n..(i + 1) * k * n],
                    m,
                    k,
                    n,
                    bt,
                );
                close_mag(
                    &format!("batched {i}/{batch} {m}x{k}x{n} bt{bt}"),
                    &out[i * m * n..(i + 1) * m * n],
                    &want,
                    &mag,
                    k,
                    4.0,
                );
            }
        }
    }
    let mut o = vec![0.0; 6];
    assert!(is_shape_err(matmul(
        &[0.0; 6], &[0.0; 5], &mut o, 2, 3, 2, false
    )));
    assert!(is_shape_err(batched_matmul(
        &[0.0; 6], &[0.0; 6], &mut o, 2, 1, 3, 1, true
    )));
}

// ---------------------------------------------------------------- attention

#[derive(Clone, Copy)]
enum RefMask<'a> {
    None,
    Causal(Option<usize>, usize),
    Keep(&'a [bool]),
}

#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tq: usize,
    tk: usize,
    heads: usize,
    hd: usize,
    vd: usize,
    scale: f32,
    mask: RefMask,
    bias: Option<&AttnBias>,
) -> Vec<f64> {
    let mut out = vec![0.0; tq * heads * vd];
    for h in 0..heads {
        for i in 0..tq {
            let mut b = vec![0f32; tk];
            if let Some(f) = bias {
                f(h, i, 0, &mut b);
            }
            let keep_row_any = match mask {
                RefMask::Keep(m) => m[i * tk..(i + 1) * tk].iter().any(|&x| x),
                _ => true,
            };
            let mut logits: Vec<Option<f64>> = (0..tk)
                .map(|j| {
                    let allowed = match mask {
                        RefMask::None => true,
                        RefMask::Causal(w, off) => {
                            let p = off + i;
                            j <= p && w.is_none_or(|w| p - j < w)
                        }
                        RefMask::Keep(m) => !keep_row_any || m[i * tk + j],
                    };
                    allowed.then(|| {
                        let mut s = 0.0;
                        for d in 0..hd {
                            s += q[(i * heads + h) * hd + d] as f64
                                * k[(j * heads + h) * hd + d] as f64;
                        }
                        s * scale as f64 + b[j] as f64
                    })
                })
                .collect();
            let mx = logits
                .iter()
                .flatten()
                .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            if mx == f64::NEG_INFINITY {
                continue; // no visible key: zero output
            }
            let mut sum = 0.0;
            for l in logits.iter_mut().flatten() {
                *l = (*l - mx).exp();
                sum += *l;
            }
            for (j, l) in logits.iter().enumerate() {
                if let Some(p) = l {
                    for c in 0..vd {
                        out[(i * heads + h) * vd + c] +=
                            p / sum * v[(j * heads + h) * vd + c] as f64;
                    }
                }
            }
        }
    }
    out
}

/// Attention outputs are convex combinations of v (|v| <= 1 here); logit errors of order
/// sqrt(hd)·eps·|q||k|·scale (~1e-6) move the weights by about as much, so 2e-5 absolute is a
/// safe bound that a wrong mask, tile seam or rescale would exceed by orders of magnitude.
const ATT_TOL: f64 = 2e-5;

#[allow(clippy::too_many_arguments)]
fn check_attention(
    name: &str,
    rng: &mut Rng,
    tq: usize,
    tk: usize,
    heads: usize,
    hd: usize,
    vd: usize,
    qscale: f32,
    mask: AttnMask,
    bias: Option<&AttnBias>,
) {
    let q = rng.vec(tq * heads * hd, qscale);
    let k = rng.vec(tk * heads * hd, 1.0);
    let v = rng.vec(tk * heads * vd, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![f32::NAN; tq * heads * vd];
    attention(
        &q, &k, &v, tq, tk, heads, hd, vd, scale, mask, bias, &mut out,
    )
    .unwrap();
    let rm = match mask {
        AttnMask::None => RefMask::None,
        AttnMask::Causal { window, q_offset } => RefMask::Causal(window, q_offset),
        AttnMask::Keep(m) => RefMask::Keep(m),
    };
    let want = ref_attention(&q, &k, &v, tq, tk, heads, hd, vd, scale, rm, bias);
    close(name, &out, &want, ATT_TOL, 0.0);
}

#[test]
fn attention_no_mask_and_head_dims() {
    let mut rng = Rng(4);
    for &(tq, tk, heads, hd) in &[
        (1, 1, 1, 64),
        (7, 13, 3, 64),
        (65, 33, 2, 72),
        (17, 300, 2, 96),
        (3, 1000, 1, 64),
    ] {
        check_attention(
            &format!("plain tq{tq} tk{tk} h{heads} hd{hd}"),
            &mut rng,
            tq,
            tk,
            heads,
            hd,
            hd,
            1.0,
            AttnMask::None,
            None,
        );
    }
    // Large logits (|logit| up to ~100s): the online softmax must rescale without overflow.
    check_attention(
        "large logits",
        &mut rng,
        70,
        600,
        2,
        64,
        64,
        40.0,
        AttnMask::None,
        None,
    );
    // v_dim different from head_dim (Mask2Former-style projections).
    check_attention(
        "vd != hd",
        &mut rng,
        9,
        50,
        3,
        32,
        16,
        1.0,
        AttnMask::None,
        None,
    );
}

#[test]
fn attention_causal_window_and_decode() {
    let mut rng = Rng(5);
    let causal = |window, q_offset| AttnMask::Causal { window, q_offset };
    // Prefill spanning several query tiles (64) and key tiles (256).
    check_attention(
        "causal prefill",
        &mut rng,
        300,
        300,
        2,
        96,
        96,
        1.0,
        causal(None, 0),
        None,
    );
    check_attention(
        "causal window 37",
        &mut rng,
        300,
        300,
        2,
        72,
        72,
        1.0,
        causal(Some(37), 0),
        None,
    );
    check_attention(
        "causal window 1",
        &mut rng,
        33,
        33,
        1,
        64,
        64,
        1.0,
        causal(Some(1), 0),
        None,
    );
    // Decode: one query at the end of a long cache, with and without a window.
    check_attention(
        "decode",
        &mut rng,
        1,
        1000,
        4,
        96,
        96,
        1.0,
        causal(None, 999),
        None,
    );
    check_attention(
        "decode window",
        &mut rng,
        1,
        1000,
        4,
        96,
        96,
        1.0,
        causal(Some(100), 999),
        None,
    );
    // Chunked prefill: 5 new queries after 15 cached keys, window crossing a tile seam.
    check_attention(
        "chunk",
        &mut rng,
        5,
        20,
        3,
        64,
        64,
        1.0,
        causal(None, 15),
        None,
    );
    check_attention(
        "chunk window",
        &mut rng,
        40,
        600,
        2,
        64,
        64,
        1.0,
        causal(Some(300), 560),
        None,
    );
    // Queries past every key's window see nothing: zero output, not NaN.
    check_attention(
        "nothing visible",
        &mut rng,
        3,
        10,
        1,
        64,
        64,
        1.0,
        causal(Some(2), 20),
        None,
    );
    let mut o = vec![0.0; 64];
    let z = vec![0.0; 64];
    assert!(is_shape_err(attention(
        &z,
        &z,
        &z,
        1,
        1,
        1,
        64,
        64,
        1.0,
        causal(Some(0), 0),
        None,
        &mut o
    )));
}

#[test]
fn attention_keep_mask() {
    let mut rng = Rng(6);
    let (tq, tk) = (9, 1000);
    let mut keep: Vec<bool> = (0..tq * tk).map(|_| rng.below(10) < 3).collect();
    // Row 0 fully blocked (attends everything), row 1 keeps a single key in the 4th tile.
    keep[..tk].fill(false);
    keep[tk..2 * tk].fill(false);
    keep[tk + 777] = true;
    check_attention(
        "keep",
        &mut rng,
        tq,
        tk,
        2,
        32,
        32,
        1.0,
        AttnMask::Keep(&keep),
        None,
    );
    check_attention(
        "keep vd",
        &mut rng,
        tq,
        tk,
        1,
        64,
        16,
        3.0,
        AttnMask::Keep(&keep),
        None,
    );
    let mut o = vec![0.0; 64];
    let z = vec![0.0; 64];
    assert!(is_shape_err(attention(
        &z,
        &z,
        &z,
        1,
        1,
        1,
        64,
        64,
        1.0,
        AttnMask::Keep(&[true, false]),
        None,
        &mut o
    )));
}

#[test]
fn attention_bias_callback() {
    let mut rng = Rng(7);
    // Deterministic per (head, query, key) bias, like SAM's decomposed relative positions.
    let f = |h: usize, i: usize, j0: usize, row: &mut [f32]| {
        for (jj, x) in row.iter_mut().enumerate() {
            let j = j0 + jj;
            *x += ((h as f32) * 0.7 + (i as f32) * 0.013 - (j as f32) * 0.029).sin() * 2.0;
        }
    };
    check_attention(
        "bias",
        &mut rng,
        50,
        600,
        3,
        64,
        64,
        1.0,
        AttnMask::None,
        Some(&f),
    );
    check_attention(
        "bias+causal",
        &mut rng,
        70,
        300,
        2,
        64,
        64,
        1.0,
        AttnMask::Causal {
            window: Some(100),
            q_offset: 0,
        },
        Some(&f),
    );
    // A bias of -inf masks (all keys of a row: zero output).
    let g = |_: usize, i: usize, _: usize, row: &mut [f32]| {
        if i == 0 {
            row.fill(f32::NEG_INFINITY)
        }
    };
    check_attention(
        "bias -inf",
        &mut rng,
        3,
        20,
        1,
        64,
        64,
        1.0,
        AttnMask::None,
        Some(&g),
    );
}

#[test]
fn attention_propagates_nan() {
    let mut q = vec![0.5f32; 2 * 64];
    q[3] = f32::NAN;
    let kv = vec![0.25f32; 4 * 64];
    let mut out = vec![0.0; 2 * 64];
    attention(
        &q,
        &kv,
        &kv,
        2,
        4,
        1,
        64,
        64,
        0.125,
        AttnMask::None,
        None,
        &mut out,
    )
    .unwrap();
    assert!(
        out[..64].iter().all(|v| v.is_nan()),
        "NaN query must give NaN, not a number"
    );
    assert!(out[64..].iter().all(|v| (v - 0.25).abs() < 1e-6));
}

// ---------------------------------------------------------------- convolution

#[allow(clippy::too_many_arguments)]
fn ref_conv(
    x: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    wt: &[f64],
    b: Option<&[f32]>,
    cout: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
) -> (Vec<f64>, Vec<f64>) {
    let ho = (h + 2 * p - kh) / s + 1;
    let wo = (w + 2 * p - kw) / s + 1;
    let (mut out, mut mag) = (vec![0.0; cout * ho * wo], vec![0.0; cout * ho * wo]);
    for co in 0..cout {
        for oy in 0..ho {
            for ox in 0..wo {
                let (mut acc, mut a) = (
                    b.map_or(0.0, |b| b[co] as f64),
                    b.map_or(0.0, |b| (b[co] as f64).abs()),
                );
                for ci in 0..cin {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * s + ky) as isize - p as isize;
                            let ix = (ox * s + kx) as isize - p as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let t = x[(ci * h + iy as usize) * w + ix as usize] as f64
                                * wt[((co * cin + ci) * kh + ky) * kw + kx];
                            acc += t;
                            a += t.abs();
                        }
                    }
                }
                out[(co * ho + oy) * wo + ox] = acc;
                mag[(co * ho + oy) * wo + ox] = a;
            }
        }
    }
    (out, mag)
}

#[test]
fn conv2d_patch_3x3_1x1() {
    let mut rng = Rng(8);
    // (cin, h, w, cout, k, stride, pad, dtype, bias)
    let cases = [
        (3, 32, 32, 5, 16, 16, 0, 1, true), // SAM patch embed shape (k = s = 16)
        (3, 33, 47, 4, 16, 16, 0, 0, true), // ragged: trailing pixels dropped like torch
        (3, 28, 42, 7, 14, 14, 0, 2, true), // SigLIP patch embed (k = s = 14)
        (7, 9, 11, 17, 3, 1, 1, 2, true),   // 3x3 pad 1
        (5, 7, 5, 3, 3, 2, 1, 1, false),    // 3x3 stride 2 on odd sizes
        (33, 5, 7, 65, 1, 1, 0, 0, true),   // 1x1 fast path
        (64, 16, 16, 40, 1, 1, 0, 1, false), // 1x1, several bf16 panels
        (17, 1, 2, 9, 1, 1, 0, 1, true),    // 1x1 with 2 pixels: the few-rows path, strided x
        (4, 1, 1, 3, 3, 1, 1, 0, true),     // 1x1 image, 3x3 kernel
        (64, 64, 64, 8, 3, 1, 1, 1, false), // im2col in several blocks
    ];
    for &(cin, h, w, cout, k, s, p, kind, with_bias) in &cases {
        let x = rng.vec(cin * h * w, 1.0);
        let wt = W::new(kind, &rng.vec(cout * cin * k * k, 0.5));
        let b = rng.vec(cout, 1.0);
        let bias = with_bias.then_some(&b[..]);
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let mut out = vec![f32::NAN; cout * ho * wo];
        conv2d(&x, cin, h, w, wt.as_ref(), bias, cout, k, k, s, p, &mut out).unwrap();
        let (want, mag) = ref_conv(&x, cin, h, w, &wt.f64s(), bias, cout, k, k, s, p);
        close_mag(
            &format!("conv cin{cin} {h}x{w} cout{cout} k{k} s{s} p{p}"),
            &out,
            &want,
            &mag,
            cin * k * k,
            4.0,
        );
    }
    let mut o = vec![0.0; 4];
    let x = vec![0.0; 4];
    assert!(is_shape_err(conv2d(
        &x,
        1,
        2,
        2,
        WeightRef::F32(&[0.0; 9]),
        None,
        1,
        3,
        3,
        1,
        0,
        &mut o
    )));
    assert!(is_shape_err(conv2d(
        &x,
        1,
        2,
        2,
        WeightRef::F32(&[0.0; 1]),
        None,
        1,
        1,
        1,
        0,
        0,
        &mut o
    )));
    assert!(is_shape_err(conv2d(
        &x,
        1,
        2,
        2,
        WeightRef::F32(&[0.0; 2]),
        None,
        1,
        1,
        1,
        1,
        0,
        &mut o
    )));
}

// ---------------------------------------------------------------- resize and sampling

/// Straight transcription of torch's bilinear (antialias=False) rules. The source coordinate is
/// formed in f32 as torch does (its error, ~size·eps pixels, would otherwise dominate the
/// comparison); the interpolation itself is f64.
fn ref_resize(x: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize, ac: bool) -> Vec<f64> {
    let src = |o: usize, i: usize, n_out: usize| -> (usize, usize, f64) {
        if i == n_out {
            return (o, o, 0.0); // torch copies unchanged axes
        }
        let s: f32 = if ac {
            if n_out > 1 {
                (i as f32 - 1.0) / (n_out as f32 - 1.0) * o as f32
            } else {
                0.0
            }
        } else {
            (i as f32 / n_out as f32 * (o as f32 + 0.5) - 0.5).max(0.0)
        };
        let i0 = (s.floor() as usize).min(i - 1);
        let i1 = (i0 + 1).min(i - 1);
        (i0, i1, (s as f64 - i0 as f64).clamp(0.0, 1.0))
    };
    let mut out = vec![0.0; c * oh * ow];
    for ci in 0..c {
        for oy in 0..oh {
            let (y0, y1, ly) = src(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1, lx) = src(ox, w, ow);
                let g = |y: usize, xx: usize| x[(ci * h + y) * w + xx] as f64;
                out[(ci * oh + oy) * ow + ox] = (1.0 - ly)
                    * ((1.0 - lx) * g(y0, x0) + lx * g(y0, x1))
                    + ly * ((1.0 - lx) * g(y1, x0) + lx * g(y1, x1));
            }
        }
    }
    out
}

#[test]
fn resize_bilinear_matches_torch_rules() {
    // Hand-checked against torch: 2x2 → 4x4, align_corners=False.
    let x = [0.0, 1.0, 2.0, 3.0];
    let mut o = vec![0.0; 16];
    resize_bilinear(&x, 1, 2, 2, 4, 4, false, &mut o).unwrap();
    assert_eq!(&o[..8], &[0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5]);
    resize_bilinear(&x, 1, 2, 2, 3, 3, true, &mut o[..9]).unwrap();
    assert_eq!(&o[..9], &[0.0, 0.5, 1.0, 1.0, 1.5, 2.0, 2.0, 2.5, 3.0]);

    let mut rng = Rng(9);
    let sizes = [
        (5, 7, 11, 13),
        (8, 8, 3, 5),
        (1, 1, 4, 4),
        (4, 4, 1, 1),
        (7, 3, 7, 9),
        (17, 33, 65, 7),
        (128, 128, 33, 127),
        (3, 65, 127, 1),
    ];
    for &(h, w, oh, ow) in &sizes {
        for ac in [false, true] {
            let c = 3;
            let x = rng.vec(c * h * w, 1.0);
            let mut out = vec![f32::NAN; c * oh * ow];
            resize_bilinear(&x, c, h, w, oh, ow, ac, &mut out).unwrap();
            // Same coordinates; four f32 products of O(1) values.
            close(
                &format!("resize {h}x{w}->{oh}x{ow} ac{ac}"),
                &out,
                &ref_resize(&x, c, h, w, oh, ow, ac),
                1e-6,
                0.0,
            );
        }
    }
    assert!(is_shape_err(resize_bilinear(
        &[0.0; 4],
        1,
        2,
        2,
        3,
        3,
        false,
        &mut [0.0; 8]
    )));
    assert!(resize_bilinear(&[], 1, 0, 0, 3, 3, false, &mut [0.0; 9]).is_err());
}

fn ref_grid_sample(x: &[f32], c: usize, h: usize, w: usize, grid: &[f32], ac: bool) -> Vec<f64> {
    let n = grid.len() / 2;
    // torch unnormalises in f32; the rest is f64.
    let un = |v: f32, size: usize| -> f64 {
        (if ac {
            (v + 1.0) / 2.0 * (size as f32 - 1.0)
        } else {
            ((v + 1.0) * size as f32 - 1.0) / 2.0
        }) as f64
    };
    let mut out = vec![0.0; c * n];
    for p in 0..n {
        let (ix, iy) = (un(grid[2 * p], w), un(grid[2 * p + 1], h));
        let (x0, y0) = (ix.floor(), iy.floor());
        for (dy, wy) in [(0, 1.0 - (iy - y0)), (1, iy - y0)] {
            for (dx, wx) in [(0, 1.0 - (ix - x0)), (1, ix - x0)] {
                let (xx, yy) = (x0 as i64 + dx, y0 as i64 + dy);
                if xx < 0 || yy < 0 || xx >= w as i64 || yy >= h as i64 {
                    continue;
                }
                for ci in 0..c {
                    out[ci * n + p] += wx * wy * x[(ci * h + yy as usize) * w + xx as usize] as f64;
                }
            }
        }
    }
    out
}

#[test]
fn grid_sample_zero_padding_both_conventions() {
    let mut rng = Rng(10);
    for &(c, h, w) in &[(3, 5, 7), (1, 1, 1), (4, 32, 32), (2, 17, 3)] {
        // Points well outside, on the border, exactly on the corners, and inside.
        let mut grid = rng.vec(2 * 60, 1.5);
        grid.extend_from_slice(&[
            -1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 0.0, 0.0, 3.0, 0.2, -1.0001, 0.5,
        ]);
        let n = grid.len() / 2;
        let x = rng.vec(c * h * w, 1.0);
        for ac in [false, true] {
            let mut out = vec![f32::NAN; c * n];
            grid_sample_bilinear(&x, c, h, w, &grid, n, ac, &mut out).unwrap();
            close(
                &format!("grid_sample {c}x{h}x{w} ac{ac}"),
                &out,
                &ref_grid_sample(&x, c, h, w, &grid, ac),
                1e-6,
                0.0,
            );
        }
    }
    // align_corners=True puts -1/+1 exactly on the corner pixels (region sampler convention).
    let x: Vec<f32> = (0..6).map(|v| v as f32).collect(); // 2x3
    let mut o = vec![0.0; 2];
    grid_sample_bilinear(&x, 1, 2, 3, &[-1.0, -1.0, 1.0, 1.0], 2, true, &mut o).unwrap();
    assert_eq!(o, vec![0.0, 5.0]);
    // align_corners=False: the corner is half a pixel outside, so three taps are zero padding.
    grid_sample_bilinear(&x, 1, 2, 3, &[-1.0, -1.0, 1.0, 1.0], 2, false, &mut o).unwrap();
    assert_eq!(o, vec![0.0, 5.0 * 0.25]);
    assert!(is_shape_err(grid_sample_bilinear(
        &x, 1, 2, 3, &[0.0; 3], 2, true, &mut o
    )));
}

// ---------------------------------------------------------------- norms

fn ref_layer_norm(
    x: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    cols: usize,
    eps: f64,
) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for (r, row) in x.chunks(cols).enumerate() {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        for j in 0..cols {
            let mut y = (row[j] as f64 - mean) / (var + eps).sqrt();
            if let Some(w) = w {
                y *= w[j] as f64;
            }
            if let Some(b) = b {
                y += b[j] as f64;
            }
            out[r * cols + j] = y;
        }
    }
    out
}

/// Normalised values are O(1); f32 two-pass statistics over n values err by ~sqrt(n)·eps
/// relative, so 1e-5 absolute (on |w|, |b| <= 1 and inputs with a non-zero mean) is ample.
const NORM_TOL: f64 = 1e-5;

#[test]
fn layer_norm_rows_and_channels_first() {
    let mut rng = Rng(11);
    for &(rows, cols) in &[(1, 1), (3, 7), (17, 65), (5, 1024), (2, 4099)] {
        // Offset mean so a one-pass E[x²]-E[x]² formula would visibly lose precision.
        let x: Vec<f32> = rng.vec(rows * cols, 1.0).iter().map(|v| v + 3.0).collect();
        let w = rng.vec(cols, 1.0);
        let b = rng.vec(cols, 1.0);
        for (wo, bo) in [
            (Some(&w[..]), Some(&b[..])),
            (None, None),
            (Some(&w[..]), None),
            (None, Some(&b[..])),
        ] {
            let mut out = vec![f32::NAN; rows * cols];
            layer_norm(&x, wo, bo, cols, 1e-6, &mut out).unwrap();
            // cols = 1: variance 0, output = bias; the eps keeps it finite.
            close(
                &format!("layer_norm {rows}x{cols}"),
                &out,
                &ref_layer_norm(&x, wo, bo, cols, 1e-6),
                NORM_TOL,
                0.0,
            );
        }
    }
    for &(c, hw) in &[(1, 1), (33, 17), (256, 65), (7, 1000)] {
        let x: Vec<f32> = rng.vec(c * hw, 2.0).iter().map(|v| v - 1.0).collect();
        let w = rng.vec(c, 1.0);
        let b = rng.vec(c, 1.0);
        let mut out = vec![f32::NAN; c * hw];
        layer_norm_channels_first(&x, &w, &b, c, hw, 1e-6, &mut out).unwrap();
        // Reference: transpose to [hw, c] rows and reuse the row layer norm.
        let xt: Vec<f32> = (0..hw * c).map(|i| x[(i % c) * hw + i / c]).collect();
        let rt = ref_layer_norm(&xt, Some(&w), Some(&b), c, 1e-6);
        let want: Vec<f64> = (0..c * hw).map(|i| rt[(i % hw) * c + i / hw]).collect();
        close(&format!("ln2d {c}x{hw}"), &out, &want, NORM_TOL, 0.0);
    }
    let mut o = vec![0.0; 6];
    assert!(is_shape_err(layer_norm(
        &[0.0; 6], None, None, 4, 1e-5, &mut o
    )));
    assert!(is_shape_err(layer_norm(
        &[0.0; 6],
        Some(&[1.0; 2]),
        None,
        3,
        1e-5,
        &mut o
    )));
    assert!(is_shape_err(layer_norm(
        &[0.0; 6], None, None, 0, 1e-5, &mut o
    )));
    assert!(is_shape_err(layer_norm_channels_first(
        &[0.0; 6], &[1.0; 2], &[0.0; 2], 2, 4, 1e-6, &mut o
    )));
}

#[test]
fn group_norm_matches_reference() {
    let mut rng = Rng(12);
    for &(c, hw, g) in &[(32, 65, 8), (6, 1, 3), (256, 33, 32), (5, 17, 1), (7, 7, 7)] {
        let x: Vec<f32> = rng.vec(c * hw, 1.5).iter().map(|v| v + 0.7).collect();
        let w = rng.vec(c, 1.0);
        let b = rng.vec(c, 1.0);
        let mut out = vec![f32::NAN; c * hw];
        group_norm(&x, &w, &b, c, hw, g, 1e-5, &mut out).unwrap();
        let cpg = c / g;
        let mut want = vec![0.0; c * hw];
        for gi in 0..g {
            let blk = &x[gi * cpg * hw..(gi + 1) * cpg * hw];
            let n = blk.len() as f64;
            let mean = blk.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = blk.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            for ci in gi * cpg..(gi + 1) * cpg {
                for p in 0..hw {
                    want[ci * hw + p] = (x[ci * hw + p] as f64 - mean) / (var + 1e-5).sqrt()
                        * w[ci] as f64
                        + b[ci] as f64;
                }
            }
        }
        close(
            &format!("group_norm c{c} hw{hw} g{g}"),
            &out,
            &want,
            NORM_TOL,
            0.0,
        );
    }
    let mut o = vec![0.0; 6];
    assert!(is_shape_err(group_norm(
        &[0.0; 6], &[1.0; 3], &[0.0; 3], 3, 2, 2, 1e-5, &mut o
    )));
    assert!(is_shape_err(group_norm(
        &[0.0; 6], &[1.0; 3], &[0.0; 3], 3, 2, 0, 1e-5, &mut o
    )));
}

#[test]
fn rms_norm_matches_reference() {
    let mut rng = Rng(13);
    for &(rows, cols) in &[(1, 1), (7, 3), (5, 3072), (3, 97)] {
        let x = rng.vec(rows * cols, 2.0);
        let w = rng.vec(cols, 1.0);
        let mut out = vec![f32::NAN; rows * cols];
        rms_norm(&x, &w, cols, 1e-5, &mut out).unwrap();
        let mut want = vec![0.0; rows * cols];
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
            for j in 0..cols {
                want[r * cols + j] = row[j] as f64 / (ms + 1e-5).sqrt() * w[j] as f64;
            }
        }
        close(&format!("rms {rows}x{cols}"), &out, &want, NORM_TOL, 0.0);
    }
    assert!(is_shape_err(rms_norm(
        &[0.0; 6],
        &[1.0; 4],
        3,
        1e-5,
        &mut [0.0; 6]
    )));
}

// ---------------------------------------------------------------- rope

#[test]
fn rope_matches_hf_rotate_half() {
    let mut rng = Rng(14);
    for &(tokens, heads, hd) in &[(7, 3, 96), (1, 32, 64), (17, 2, 2)] {
        let x = rng.vec(tokens * heads * hd, 1.0);
        let positions: Vec<usize> = (0..tokens).map(|_| rng.below(4096)).collect();
        let mut out = x.clone();
        rope(&mut out, tokens, heads, hd, &positions, 10000.0).unwrap();
        let half = hd / 2;
        let mut want = vec![0.0; x.len()];
        for t in 0..tokens {
            for h in 0..heads {
                let base = (t * heads + h) * hd;
                for i in 0..half {
                    // The angle as transformers forms it: f32 inv_freq, f32 product (see rope.rs).
                    let inv = 1.0f32 / 10000f32.powf((2 * i) as f32 / hd as f32);
                    let a = (positions[t] as f32 * inv) as f64;
                    let (x1, x2) = (x[base + i] as f64, x[base + i + half] as f64);
                    want[base + i] = x1 * a.cos() - x2 * a.sin();
                    want[base + i + half] = x2 * a.cos() + x1 * a.sin();
                }
            }
        }
        // Two f32 products and a sum of O(1) values.
        close(
            &format!("rope {tokens}x{heads}x{hd}"),
            &out,
            &want,
            1e-6,
            0.0,
        );
    }
    // Position 0 is the identity.
    let x = rng.vec(64, 1.0);
    let mut y = x.clone();
    rope(&mut y, 1, 1, 64, &[0], 10000.0).unwrap();
    assert_eq!(x, y);
    assert!(is_shape_err(rope(&mut [0.0; 6], 1, 2, 3, &[0], 1e4)));
    assert!(is_shape_err(rope(&mut [0.0; 8], 2, 1, 4, &[0], 1e4)));
}

// ---------------------------------------------------------------- activations

/// erf in f64 by its Taylor series; accurate to ~1e-13 for |z| < 2.5 (cancellation grows as
/// e^{z²}).
fn taylor_erf(z: f64) -> f64 {
    let (mut term, mut sum) = (z, z);
    for n in 1..200 {
        term *= -z * z / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    sum * std::f64::consts::FRAC_2_SQRT_PI
}

/// erfc in f64: continued fraction for z >= 2.5 (relative ~1e-15), Taylor below.
fn ref_erfc(z: f64) -> f64 {
    if z >= 2.5 {
        // erfc(z) = exp(-z²)/√π · 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))).
        let mut f = z;
        for n in (1..200).rev() {
            f = z + (n as f64 / 2.0) / f;
        }
        (-z * z).exp() / std::f64::consts::PI.sqrt() / f
    } else if z <= -2.5 {
        2.0 - ref_erfc(-z)
    } else {
        1.0 - taylor_erf(z)
    }
}

fn ref_erf(z: f64) -> f64 {
    if z.abs() < 2.5 {
        taylor_erf(z)
    } else {
        z.signum() * (1.0 - ref_erfc(z.abs()))
    }
}

fn sweep(lo: f32, hi: f32, n: usize) -> Vec<f32> {
    (0..=n)
        .map(|i| lo + (hi - lo) * i as f32 / n as f32)
        .collect()
}

#[test]
fn erf_and_gelu_erf_accuracy() {
    // Small |x| is where 1 - erfc loses relative accuracy; include it densely.
    let mut xs = sweep(-6.0, 6.0, 20001);
    xs.extend(sweep(-1e-3, 1e-3, 101));
    xs.extend([1e-30, -1e-20, 0.0]);
    let mut worst = 0.0f64;
    for &x in &xs {
        let want = ref_erf(x as f64);
        let got = erf(x);
        assert!(got.is_finite());
        if want != 0.0 {
            worst = worst.max(((got as f64 - want) / want).abs());
        } else {
            assert_eq!(got, 0.0);
        }
    }
    // Documented: NR erfc fractional error < 1.2e-7, plus the final f32 rounding (6e-8).
    assert!(worst < 2.0e-7, "erf worst relative error {worst:e}");

    let xs = sweep(-12.0, 12.0, 24001);
    let mut g = xs.clone();
    gelu_erf(&mut g);
    let want: Vec<f64> = xs
        .iter()
        .map(|&x| {
            let x = x as f64;
            0.5 * x * ref_erfc(-x / std::f64::consts::SQRT_2)
        })
        .collect();
    // Relative accuracy holds in both tails (gelu(-12) ~ 1e-32).
    close("gelu_erf", &g, &want, 1e-37, 2.0e-7);
}

#[test]
fn gelu_tanh_silu_relu() {
    let xs = sweep(-20.0, 20.0, 40001);
    let mut g = xs.clone();
    gelu_tanh(&mut g);
    let want: Vec<f64> = xs
        .iter()
        .map(|&x| {
            let x = x as f64;
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        })
        .collect();
    // The cubic inside is formed in f32 (as in torch): for x << 0 its absolute error (~1e-5 at
    // x = -10) becomes a 1e-5 relative error of a value that is ~1e-37 there, hence atol.
    close("gelu_tanh", &g, &want, 1e-6, 1e-6);

    let xs = sweep(-80.0, 80.0, 32001);
    let mut s = xs.clone();
    silu(&mut s);
    let want: Vec<f64> = xs
        .iter()
        .map(|&x| x as f64 / (1.0 + (-(x as f64)).exp()))
        .collect();
    close("silu", &s, &want, 1e-37, 1e-6);

    let mut r = vec![-1.0, 0.0, 2.5, -0.0, f32::NAN];
    relu(&mut r);
    assert_eq!(&r[..4], &[0.0, 0.0, 2.5, 0.0]);
    assert!(r[4].is_nan(), "relu keeps NaN like torch");
}

#[test]
fn silu_gate_matches_reference() {
    let mut rng = Rng(15);
    for &(rows, inter) in &[(1, 1), (3, 17), (7, 8192)] {
        let gu = rng.vec(rows * 2 * inter, 6.0);
        let mut out = vec![f32::NAN; rows * inter];
        silu_gate(&gu, rows, inter, &mut out).unwrap();
        let mut want = vec![0.0; rows * inter];
        for r in 0..rows {
            for i in 0..inter {
                let (g, u) = (
                    gu[r * 2 * inter + i] as f64,
                    gu[r * 2 * inter + inter + i] as f64,
                );
                want[r * inter + i] = g / (1.0 + (-g).exp()) * u;
            }
        }
        close(
            &format!("silu_gate {rows}x{inter}"),
            &out,
            &want,
            1e-30,
            1e-6,
        );
    }
    assert!(is_shape_err(silu_gate(&[0.0; 6], 1, 3, &mut [0.0; 2])));
    assert!(is_shape_err(silu_gate(&[0.0; 5], 1, 3, &mut [0.0; 3])));
}

#[test]
fn softmax_stable_and_exact_rows() {
    let mut rng = Rng(16);
    for &(rows, cols) in &[(1, 1), (3, 7), (17, 65), (2, 1000), (40, 33)] {
        // Logits around ±1e4: exp without the max shift would overflow.
        let mut x: Vec<f32> = rng.vec(rows * cols, 50.0).iter().map(|v| v + 1e4).collect();
        if rows > 2 {
            x[cols] = f32::NEG_INFINITY; // a masked entry
            x[2 * cols..3 * cols].fill(-3e4); // all equal
        }
        let want: Vec<f64> = x
            .chunks(cols)
            .flat_map(|r| {
                let mx = r.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
                let e: Vec<f64> = r.iter().map(|&v| (v as f64 - mx).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |v| v / s)
            })
            .collect();
        softmax_rows(&mut x, cols).unwrap();
        // exp of an f32 difference: ~2.5e-7 relative per term, plus the sum.
        close(&format!("softmax {rows}x{cols}"), &x, &want, 1e-7, 2e-6);
    }
    assert!(is_shape_err(softmax_rows(&mut [0.0; 5], 3)));
    assert!(is_shape_err(softmax_rows(&mut [0.0; 5], 0)));
}

// ---------------------------------------------------------------- elementwise

#[test]
fn elementwise_ops() {
    let mut rng = Rng(17);
    for &n in &[0usize, 1, 7, 65, 100_003] {
        let a = rng.vec(n, 3.0);
        let b = rng.vec(n, 3.0);
        let mut o = vec![f32::NAN; n];
        add(&a, &b, &mut o).unwrap();
        close(
            "add",
            &o,
            &a.iter()
                .zip(&b)
                .map(|(x, y)| *x as f64 + *y as f64)
                .collect::<Vec<_>>(),
            0.0,
            1e-7,
        );
        mul(&a, &b, &mut o).unwrap();
        close(
            "mul",
            &o,
            &a.iter()
                .zip(&b)
                .map(|(x, y)| *x as f64 * *y as f64)
                .collect::<Vec<_>>(),
            0.0,
            1e-7,
        );
        let mut s = a.clone();
        scale(&mut s, -0.5);
        close(
            "scale",
            &s,
            &a.iter().map(|x| *x as f64 * -0.5).collect::<Vec<_>>(),
            0.0,
            0.0,
        );
    }
    for &(r, c) in &[(1, 1), (7, 3), (33, 65), (1000, 17)] {
        let x = rng.vec(r * c, 1.0);
        let row = rng.vec(c, 1.0);
        let mut o = vec![f32::NAN; r * c];
        add_broadcast_rows(&x, &row, &mut o).unwrap();
        let want: Vec<f64> = (0..r * c)
            .map(|i| x[i] as f64 + row[i % c] as f64)
            .collect();
        close("add_broadcast_rows", &o, &want, 0.0, 1e-7);
    }
    assert!(is_shape_err(add(&[0.0; 3], &[0.0; 2], &mut [0.0; 3])));
    assert!(is_shape_err(mul(&[0.0; 3], &[0.0; 3], &mut [0.0; 2])));
    assert!(is_shape_err(add_broadcast_rows(
        &[0.0; 7],
        &[0.0; 2],
        &mut [0.0; 7]
    )));
    assert!(is_shape_err(add_broadcast_rows(
        &[0.0; 3],
        &[],
        &mut [0.0; 3]
    )));
}

#[test]
fn concat_gather_transpose() {
    let mut rng = Rng(18);
    let outer = 5;
    let (p1, p2, p3) = (
        rng.vec(outer * 3, 1.0),
        rng.vec(0, 1.0),
        rng.vec(outer * 7, 1.0),
    );
    let mut o = vec![f32::NAN; outer * 10];
    concat(&[(&p1, 3), (&p2, 0), (&p3, 7)], outer, &mut o).unwrap();
    for r in 0..outer {
        assert_eq!(&o[r * 10..r * 10 + 3], &p1[r * 3..r * 3 + 3]);
        assert_eq!(&o[r * 10 + 3..r * 10 + 10], &p3[r * 7..r * 7 + 7]);
    }
    assert!(is_shape_err(concat(&[(&p1, 3), (&p3, 6)], outer, &mut o)));
    assert!(is_shape_err(concat(&[(&p1, 3)], outer, &mut o)));

    let (rows, cols) = (11, 33);
    let table = rng.vec(rows * cols, 2.0);
    let ids = [0u32, 10, 3, 3, 7];
    for kind in 0..3 {
        let t = W::new(kind, &table);
        let tf = t.f64s();
        let mut out = vec![f32::NAN; ids.len() * cols];
        gather_rows(t.as_ref(), cols, &ids, &mut out).unwrap();
        let want: Vec<f64> = ids
            .iter()
            .flat_map(|&id| tf[id as usize * cols..(id as usize + 1) * cols].to_vec())
            .collect();
        close("gather_rows", &out, &want, 0.0, 0.0);
        let err = gather_rows(t.as_ref(), cols, &[1, 11], &mut out[..2 * cols]).unwrap_err();
        assert!(err.to_string().contains("id 11"), "{err}");
    }
    assert!(is_shape_err(gather_rows(
        WeightRef::F32(&table),
        cols,
        &ids,
        &mut [0.0; 3]
    )));
    assert!(is_shape_err(gather_rows(
        WeightRef::F32(&table[1..]),
        cols,
        &ids,
        &mut vec![0.0; ids.len() * cols]
    )));

    for &(r, c) in &[(1, 1), (33, 65), (127, 3), (3, 127), (64, 64)] {
        let x = rng.vec(r * c, 1.0);
        let mut t = vec![f32::NAN; r * c];
        transpose2d(&x, r, c, &mut t).unwrap();
        for i in 0..r {
            for j in 0..c {
                assert_eq!(t[j * r + i], x[i * c + j], "transpose {r}x{c} at {i},{j}");
            }
        }
    }
    assert!(is_shape_err(transpose2d(&[0.0; 6], 2, 3, &mut [0.0; 5])));
}

#[test]
fn pixel_shuffle_round_sizes() {
    // Index-level checks live next to the code (src/backend/cpu/shuffle.rs); here the SAM-sized
    // geometry of the seg projector: 64x64x1024 → 32x32x4096 and the stride-8 connector level.
    let mut rng = Rng(19);
    let (h, w, c) = (64, 64, 16);
    let x = rng.vec(h * w * c, 1.0);
    let mut d = vec![f32::NAN; h * w * c];
    pixel_shuffle_down(&x, h, w, c, &mut d).unwrap();
    assert_eq!(
        d[(3 * 32 + 5) * 4 * c + 3 * c + 2],
        x[(7 * 64 + 11) * c + 2]
    );
    let mut u = vec![f32::NAN; h * w * c];
    pixel_shuffle_up(&x, h, w, c, &mut u).unwrap();
    // oy 9 = 2·4 + 1 (dh 1), ox 6 = 2·3 + 0 (dw 0): channel dw·c/2 + dh·c/4 + k.
    assert_eq!(
        u[(9 * 128 + 6) * (c / 4) + 1],
        x[(4 * 64 + 3) * c + c / 4 + 1]
    );
    assert!(u.iter().chain(&d).all(|v| v.is_finite()));
    assert!(is_shape_err(pixel_shuffle_down(&x, h, w, c, &mut d[1..])));
    assert!(is_shape_err(pixel_shuffle_up(&x, h, w, 15, &mut u)));
}
