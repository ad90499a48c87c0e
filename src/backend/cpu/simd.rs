//! Run-time SIMD dispatch and the vector-friendly scalar maths the kernels share.
//!
//! The crate is built for baseline x86-64 (SSE2), so hot loops are compiled a second time with
//! AVX2+FMA+F16C enabled and picked at run time (`simd_fn!`). AVX-512 is left to the `gemm` crate:
//! its target features need Rust 1.89 (the crate's MSRV is 1.86), and the loops here are mostly
//! memory-bound, where it showed no measurable gain. The helpers below are branch-free (selects,
//! bit tricks) so LLVM vectorises them inside those loops; libm calls would not.

use half::{bf16, f16};

/// 0 = baseline, 1 = AVX2+FMA+F16C. Detected once; `XSAM_CPU_SIMD=0` forces the baseline path
/// (to test or compare it).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn x86_level() -> u8 {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
    let l = LEVEL.load(Ordering::Relaxed);
    if l != u8::MAX {
        return l;
    }
    let detected = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let cap = std::env::var("XSAM_CPU_SIMD")
        .ok()
        .and_then(|v| v.trim().parse::<u8>().ok())
        .unwrap_or(1);
    let l = u8::from(detected).min(cap);
    LEVEL.store(l, Ordering::Relaxed);
    l
}

/// Defines a function whose body is compiled for baseline and AVX2 and dispatched at run time.
/// Everything the body calls must be `#[inline(always)]` to benefit.
macro_rules! simd_fn {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if $crate::backend::cpu::simd::x86_level() == 1 {
                    // SAFETY: x86_level detected AVX2, FMA and F16C on this CPU.
                    return unsafe { v3($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

// ------------------------------------------------------------------ exp

/// e^x in f32, branch-free (Cephes expf polynomial after Cody-Waite reduction). Max relative error
/// about 2 ulp (< 2.5e-7) on [-86.6, 88.7]; results below e^-86.6 (2.4e-38) flush to 0, above
/// f32::MAX give inf, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // few mantissa bits: n * LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    const LO: f32 = -86.6;
    const HI: f32 = 88.72;
    // clamp keeps NaN (f32::max/min would swallow it).
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + MAGIC;
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let nf = t - MAGIC;
    let r = (xc - nf * LN2_HI) - nf * LN2_LO;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    // y * 2^n by adding n to the exponent field; y is in [0.7, 1.42] and n in [-125, 128], so
    // the result stays a normal number (or exactly overflows to inf at the top).
    let bits = (y.to_bits() as i32).wrapping_add(n.wrapping_shl(23)) as u32;
    let res = f32::from_bits(bits);
    let res = if x < LO { 0.0 } else { res };
    let res = if x > HI { f32::INFINITY } else { res };
    if x.is_nan() {
        x
    } else {
        res
    }
}

/// e^x in f64, branch-free (degree-11 Taylor after Cody-Waite reduction, relative error < 1e-14
/// on [-708, 709]; below -708 flushes to 0). Used where f32 is not enough (erfc inside GELU).
#[inline(always)]
pub(crate) fn exp_f64(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const LN2_HI: f64 = 6.931_471_803_691_238e-1;
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    const LO: f64 = -708.0;
    const HI: f64 = 709.0;
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + MAGIC;
    let n = (t.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
    let nf = t - MAGIC;
    let r = (xc - nf * LN2_HI) - nf * LN2_LO;
    // Horner on 1/k! coefficients.
    let mut p = 1.0 / 39_916_800.0;
    p = p * r + 1.0 / 3_628_800.0;
    p = p * r + 1.0 / 362_880.0;
    p = p * r + 1.0 / 40_320.0;
    p = p * r + 1.0 / 5_040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    let y = p * r + 1.0;
    let bits = (y.to_bits() as i64).wrapping_add(n.wrapping_shl(52)) as u64;
    let res = f64::from_bits(bits);
    let res = if x < LO { 0.0 } else { res };
    let res = if x > HI { f64::INFINITY } else { res };
    if x.is_nan() {
        x
    } else {
        res
    }
}

// ------------------------------------------------------------------ element widening

/// Weight element types the kernels read; widening is exact.
pub(crate) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Widen for f16 {
    /// Branch-free so it vectorises (half's own conversion checks the CPU per call).
    #[inline(always)]
    fn widen(self) -> f32 {
        let h = self.to_bits() as u32;
        let sign = (h & 0x8000) << 16;
        let em = h & 0x7fff;
        let normal = (em << 13) + ((127 - 15) << 23);
        let infnan = (em << 13) | 0x7f80_0000;
        // Subnormal (and zero): em * 2^-24, exact in f32.
        let sub = ((em as i32) as f32 * f32::from_bits(0x3380_0000)).to_bits();
        let bits = if em >= 0x7c00 {
            infnan
        } else if em < 0x0400 {
            sub
        } else {
            normal
        };
        f32::from_bits(bits | sign)
    }
}

#[inline(always)]
fn widen_generic<T: Widen>(src: &[T], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.widen();
    }
}

simd_fn! {
    pub(crate) fn widen_bf16(src: &[bf16], dst: &mut [f32]) { widen_generic(src, dst) }
}
simd_fn! {
    pub(crate) fn widen_f16(src: &[f16], dst: &mut [f32]) { widen_generic(src, dst) }
}

// ------------------------------------------------------------------ reductions

/// Independent accumulators per reduction: four AVX2 registers, enough to hide the add latency. Reductions cannot be vectorised by LLVM without reassociation, so they
/// are written as fixed-size lane arrays (which the SLP vectoriser maps onto registers) and the
/// tail is zero-padded into one more full block instead of a scalar loop.
const LANES: usize = 32;

/// Calls `f` on every full LANES-block of `a` and `b`, then once on the zero-padded tail.
#[inline(always)]
fn blocks2<A: Copy + Default, B: Copy + Default>(
    a: &[A],
    b: &[B],
    mut f: impl FnMut(&[A; LANES], &[B; LANES]),
) {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let full = n / LANES * LANES;
    for (x, y) in a[..full]
        .chunks_exact(LANES)
        .zip(b[..full].chunks_exact(LANES))
    {
        // The conversions cannot fail: chunks_exact yields LANES elements.
        f(x.try_into().unwrap(), y.try_into().unwrap());
    }
    if full < n {
        let mut x = [A::default(); LANES];
        let mut y = [B::default(); LANES];
        x[..n - full].copy_from_slice(&a[full..]);
        y[..n - full].copy_from_slice(&b[full..]);
        f(&x, &y);
    }
}

/// Calls `f` on every full LANES-block of `a`, then on the tail padded with `pad`.
#[inline(always)]
fn blocks1(a: &[f32], pad: f32, mut f: impl FnMut(&[f32; LANES])) {
    let full = a.len() / LANES * LANES;
    for x in a[..full].chunks_exact(LANES) {
        f(x.try_into().unwrap());
    }
    if full < a.len() {
        let mut x = [pad; LANES];
        x[..a.len() - full].copy_from_slice(&a[full..]);
        f(&x);
    }
}

/// Pairwise sum of the lanes (a fixed tree, so results do not depend on the SIMD level).
#[inline(always)]
fn sum_lanes(acc: &[f32; LANES]) -> f32 {
    let mut v = *acc;
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            v[l] += v[l + w];
        }
        w /= 2;
    }
    v[0]
}

/// Σ a[i]·b[i] over the common length.
#[inline(always)]
pub(crate) fn dot_generic<T: Widen + Default>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; LANES];
    blocks2(a, b, |x, y| {
        for l in 0..LANES {
            acc[l] += x[l] * y[l].widen();
        }
    });
    sum_lanes(&acc)
}

/// Σ x[i].
#[inline(always)]
pub(crate) fn sum_generic(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    blocks1(x, 0.0, |v| {
        for l in 0..LANES {
            acc[l] += v[l];
        }
    });
    sum_lanes(&acc)
}

/// Σ (x[i] - mean)².
#[inline(always)]
pub(crate) fn sq_dev_generic(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    // Padding with `mean` makes the tail contribute exactly zero.
    blocks1(x, mean, |v| {
        for l in 0..LANES {
            let d = v[l] - mean;
            acc[l] += d * d;
        }
    });
    sum_lanes(&acc)
}

/// max of x, NaN ignored; -inf for an empty slice.
#[inline(always)]
pub(crate) fn max_generic(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    blocks1(x, f32::NEG_INFINITY, |v| {
        for l in 0..LANES {
            acc[l] = if v[l] > acc[l] { v[l] } else { acc[l] };
        }
    });
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

simd_fn! {
    pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 { dot_generic(a, b) }
}
simd_fn! {
    pub(crate) fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 { dot_generic(a, b) }
}
simd_fn! {
    pub(crate) fn dot_f16(a: &[f32], b: &[f16]) -> f32 { dot_generic(a, b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widen_matches_half_exhaustively() {
        for bits in 0..=u16::MAX {
            let h = f16::from_bits(bits);
            let (a, b) = (h.widen(), h.to_f32());
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{bits:#x}: {a} vs {b}"
            );
        }
        let src: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut dst = vec![0f32; src.len()];
        widen_f16(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            assert!(s.to_f32().to_bits() == d.to_bits() || d.is_nan());
        }
    }

    #[test]
    fn exp_accuracy() {
        let mut worst = 0f64;
        let mut x = -86.5f32;
        while x < 88.7 {
            let e = exp_f32(x) as f64;
            let r = (x as f64).exp();
            worst = worst.max(((e - r) / r).abs());
            let x64 = (x as f64 * 8.0).clamp(-707.9, 708.9);
            let (e64, r64) = (exp_f64(x64), x64.exp());
            assert!(((e64 - r64) / r64).abs() < 1e-14, "exp_f64({x64})");
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "exp_f32 worst relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f64(f64::NAN).is_nan());
        assert_eq!(exp_f64(-1000.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
