//! Vision and segmentation kernels (src/backend/cuda/vision.rs) against the CPU backend and/or
//! straightforward f64 references written here from the spec (deformable attention and region
//! pooling are checked against both; the sine position embedding against the f64 formula).
//!
//! Without a driver, a device or compiled kernels every GPU test prints
//! `SKIP cuda_vision::<test>: <reason>` and passes (`XSAM_REQUIRE_GPU=1` turns that into a
//! failure). The ptxas test runs wherever the kernels were compiled.
//!
//! Every output is allocated poisoned (0xFF bytes = NaN in f32 and bf16), so an element a kernel
//! does not write stays NaN, and every comparison fails on NaN or inf (`assert_close`).
//!
//! Tolerances. f32 kernels compute in f32 and the references in f64 (or the CPU backend's f32):
//! a few ulp of the result plus the f32 rounding of sums (stated per test). bf16 kernels store
//! bf16: inputs are rounded to bf16 on the host first and the reference is computed from the
//! rounded values, so the difference is the output rounding, at most half a bf16 ulp, i.e.
//! 2^-8 = 3.9e-3 relative, plus the f32 error; kernels that round intermediates as PyTorch does
//! under bf16 (RMSNorm, LayerNorm2d, SiLU gate, RoPE) are compared with references that round at
//! the same points, where an f32-vs-f64 difference can flip one intermediate rounding: 2^-6
//! relative covers two such flips.

mod gpu;
use half::{bf16, f16};
use xsam::backend::cpu;
use xsam::backend::cuda::{kernels, CudaBackend, Gelu, MapLayout, RopePositions, Shuffle};
use xsam::model::region::{region_points, RegionSampler};
use xsam::task::masks::{MaskGeometry, MaskResizer};
use xsam::{DType, Tensor};

// ---------------------------------------------------------------------------- helpers

fn backend(test: &str) -> Option<CudaBackend> {
    gpu::backend("cuda_vision", test)
}

use gpu::Rng;

/// Rounds to the storage dtype and back (what the kernel sees).
fn q(v: &[f32], dt: DType) -> Vec<f32> {
    match dt {
        DType::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        DType::F32 => v.to_vec(),
    }
}

fn rb(x: f64) -> f64 {
    bf16::from_f64(x).to_f64()
}

/// |got - want| <= atol + rtol |want| everywhere; NaN/inf in `got` fail. Returns the worst
/// errors, for the PARITY line.
fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) -> gpu::Parity {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    let mut par = gpu::Parity::default();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        let tol = atol + rtol * w.abs();
        assert!(
            g.is_finite() && err <= tol,
            "{what}: element {i}: got {g}, want {w} (|err| {err:e} > tol {tol:e}); \
             NaN means the kernel did not write it"
        );
        par.add(g as f64, w);
        if tol > 0.0 && err / tol > worst.1 {
            worst = (i, err / tol);
        }
    }
    println!("  {what}: max |err|/tol = {:.3} at {}", worst.1, worst.0);
    par
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) -> gpu::Parity {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: element {i}: got {g}, want {w} (must be bit-exact)"
        );
    }
    // Bit-exact: the measured error is zero.
    gpu::Parity::default()
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A device tensor of `dt` holding `v` (rounded to dt).
fn dev(b: &CudaBackend, v: &[f32], shape: &[usize], dt: DType) -> Tensor {
    let t = Tensor::from_f32(v.to_vec(), shape.to_vec())
        .unwrap()
        .to_dtype(dt)
        .unwrap();
    b.to_device(&t).unwrap()
}

fn host(b: &CudaBackend, t: &Tensor) -> Vec<f32> {
    b.to_host(t).unwrap().to_vec_f32().unwrap()
}

/// A device copy whose first element sits 1 element past a 16-byte boundary (so kernels take
/// their scalar, unaligned path), same logical contents.
fn dev_misaligned(b: &CudaBackend, v: &[f32], shape: &[usize], dt: DType) -> Tensor {
    let mut padded = vec![0.0f32];
    padded.extend_from_slice(v);
    let t = dev(b, &padded, &[padded.len()], dt);
    t.narrow(0, 1, v.len())
        .unwrap()
        .reshape(shape.to_vec())
        .unwrap()
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

// ---------------------------------------------------------------------------- build checks

const VISION_FILES: &[&str] = &[
    "layer_norm_",
    "rms_norm",
    "softmax_rows_",
    "layer_norm_cf_",
    "group_norm_",
    "gelu_",
    "silu_gate_",
    "cast_",
    "rope_",
    "resize_bilinear_",
    "mask_postprocess_",
    "pixel_shuffle_",
    "ms_deform_attn_",
    "region_pool_",
    "gather_rows_",
    "pos_embed_sine_",
    "bench_spin",
];

/// Every vision kernel is in the ptxas report for sm_80/89/90 with no stack frame and no spills;
/// prints the registers per kernel (sm_90).
#[test]
fn ptxas_vision_kernels_have_no_spills() {
    let Some(path) = kernels::PTXAS_REPORT else {
        println!("SKIP cuda_vision::ptxas_vision_kernels_have_no_spills: built without kernels");
        return;
    };
    let report = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let names: Vec<&str> = kernels::KERNEL_NAMES
        .iter()
        .copied()
        .filter(|k| VISION_FILES.iter().any(|p| k.starts_with(p)))
        .collect();
    assert!(
        names.len() >= 45,
        "only {} vision kernels listed",
        names.len()
    );
    // Walk the report: "Compiling entry function 'k' for 'sm_XX'", then its properties.
    let mut current: Option<(String, String)> = None;
    let mut seen = std::collections::HashMap::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            let sm = rest
                .split("for '")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or("")
                .to_string();
            current = Some((name, sm));
            continue;
        }
        let Some((name, sm)) = &current else { continue };
        if !names.contains(&name.as_str()) {
            continue;
        }
        if line.contains("bytes stack frame") {
            assert!(
                line.trim_start().starts_with("0 bytes stack frame")
                    && line.contains(" 0 bytes spill stores")
                    && line.contains(" 0 bytes spill loads"),
                "`{name}` ({sm}) uses local memory: `{}` (see {path})",
                line.trim()
            );
        }
        if let Some(r) = line.split("Used ").nth(1) {
            let regs: u32 = r.split(' ').next().unwrap_or("0").parse().unwrap_or(0);
            seen.insert((name.clone(), sm.clone()), regs);
        }
    }
    println!("registers per kernel (sm_80 / sm_89 / sm_90):");
    for k in &names {
        let r: Vec<String> = ["sm_80", "sm_89", "sm_90"]
            .iter()
            .map(|sm| {
                seen.get(&(k.to_string(), sm.to_string()))
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| panic!("{path}: no entry for `{k}` on {sm}"))
            })
            .collect();
        println!("  {k:28} {}", r.join(" / "));
    }
}

// ---------------------------------------------------------------------------- row ops

use gpu::layer_norm_ref as ln_ref;

/// Row lengths around the pack size (8), the warp and block limits, the model widths
/// (256, 1024, 1152, 3072, 4304) and the maximum (32768).
const ROW_COLS: &[usize] = &[
    1, 7, 8, 33, 256, 1000, 1024, 1152, 3072, 4097, 4304, 20_000, 32_768,
];

#[test]
fn layer_norm_rows_match_f64_reference() {
    let Some(b) = backend("layer_norm_rows_match_f64_reference") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(11);
    for dt in DTYPES {
        for (si, &cols) in ROW_COLS.iter().enumerate() {
            let rows = if cols > 5000 { 2 } else { 5 };
            // mean 3, spread 1: the mean must be subtracted accurately.
            let x = q(&rng.vec(rows * cols, 2.0, 4.0), dt);
            let w = q(&rng.vec(cols, 0.5, 1.5), dt);
            let bias = q(&rng.vec(cols, -1.0, 1.0), dt);
            let misaligned = si % 2 == 1;
            let xd = if misaligned {
                dev_misaligned(&b, &x, &[rows, cols], dt)
            } else {
                dev(&b, &x, &[rows, cols], dt)
            };
            let wd = dev(&b, &w, &[cols], dt);
            let bd = dev(&b, &bias, &[cols], dt);
            for (case, use_w, use_b) in [
                ("w+b", true, true),
                ("w", true, false),
                ("none", false, false),
            ] {
                let eps = 1e-6f32;
                let y = b
                    .layer_norm(&xd, use_w.then_some(&wd), use_b.then_some(&bd), eps)
                    .unwrap();
                assert_eq!(y.dtype(), dt);
                let got = host(&b, &y);
                let mut want = Vec::new();
                for r in 0..rows {
                    want.extend(ln_ref(
                        &x[r * cols..(r + 1) * cols],
                        use_w.then_some(&w[..]),
                        use_b.then_some(&bias[..]),
                        eps,
                    ));
                }
                // f32: per-thread partial sums of <= 32 values then 10 shuffle/shared levels:
                // the mean's relative error is < 50 * 2^-24, ~1e-5 of a normalised value after
                // |w| <= 1.5 (as in cuda_backend.rs). bf16: one output rounding (2^-8 relative).
                let (atol, rtol) = if dt == DType::F32 {
                    (3e-5, 2e-5)
                } else {
                    (5e-5, 4e-3)
                };
                par.merge(assert_close(
                    &format!(
                        "layer_norm {dt} [{rows}, {cols}] {case}{}",
                        if misaligned { " misaligned" } else { "" }
                    ),
                    &got,
                    &want,
                    atol,
                    rtol,
                ));
            }
        }
    }
    // Rows longer than the register cache are refused, not mis-computed.
    let x = dev(&b, &vec![1.0; 40_000], &[1, 40_000], DType::F32);
    assert!(b.layer_norm(&x, None, None, 1e-5).is_err());
    b.synchronize().unwrap();
    par.print("layer_norm");
}

#[test]
fn rms_norm_and_residual_match_reference() {
    let Some(b) = backend("rms_norm_and_residual_match_reference") else {
        return;
    };
    let mut par_rms = gpu::Parity::default();
    let mut par_res = gpu::Parity::default();
    let mut rng = Rng(12);
    for dt in DTYPES {
        for (si, &cols) in ROW_COLS.iter().enumerate() {
            let rows = if cols > 5000 { 2 } else { 4 };
            let x = q(&rng.vec(rows * cols, -2.0, 2.0), dt);
            let r = q(&rng.vec(rows * cols, -2.0, 2.0), dt);
            let w = q(&rng.vec(cols, 0.5, 1.5), dt);
            let misaligned = si % 3 == 2;
            let xd = if misaligned {
                dev_misaligned(&b, &x, &[rows, cols], dt)
            } else {
                dev(&b, &x, &[rows, cols], dt)
            };
            let rd = dev(&b, &r, &[rows, cols], dt);
            let wd = dev(&b, &w, &[cols], dt);
            let eps = 1e-5f32;
            let round = |v: f64| if dt == DType::BF16 { rb(v) } else { v };
            // reference: s = T(x + r); y = T(T(s * inv) * w) (Phi-3 under bf16; f32: no rounding)
            let norm = |s: &[f64]| -> Vec<f64> {
                let ms = s.iter().map(|v| v * v).sum::<f64>() / cols as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                s.iter()
                    .zip(&w)
                    .map(|(&v, &wc)| round(round(v * inv) * wc as f64))
                    .collect()
            };
            let (atol, rtol) = if dt == DType::F32 {
                (1e-6, 1e-5)
            } else {
                (1e-5, 1.6e-2)
            };

            let got = host(&b, &b.rms_norm(&xd, Some(&wd), eps).unwrap());
            let mut want = Vec::new();
            for row in x.chunks(cols) {
                want.extend(norm(&widen(row)));
            }
            par_rms.merge(assert_close(
                &format!("rms_norm {dt} [{rows}, {cols}]"),
                &got,
                &want,
                atol,
                rtol,
            ));

            let (s, y) = b.rms_norm_residual(&xd, &rd, Some(&wd), eps).unwrap();
            let s_want: Vec<f64> = x
                .iter()
                .zip(&r)
                .map(|(&a, &c)| {
                    if dt == DType::BF16 {
                        rb(a as f64 + c as f64)
                    } else {
                        (a + c) as f64
                    }
                })
                .collect();
            // The sum is one addition rounded to T: exact. (bf16: the sum of two bf16 values
            // is exact in f32 unless their exponents differ by more than 16, so rounding the
            // f32 sum to bf16 is rounding the exact sum.)
            par_res.merge(assert_close(
                &format!("rms_norm_residual sum {dt} [{rows}, {cols}]"),
                &host(&b, &s),
                &s_want,
                0.0,
                0.0,
            ));
            let mut want = Vec::new();
            for row in s_want.chunks(cols) {
                want.extend(norm(row));
            }
            par_res.merge(assert_close(
                &format!("rms_norm_residual {dt} [{rows}, {cols}]"),
                &host(&b, &y),
                &want,
                atol,
                rtol,
            ));
        }
    }
    b.synchronize().unwrap();
    par_rms.print("rms_norm");
    par_res.print("rms_norm_residual");
}

#[test]
fn softmax_rows_match_cpu() {
    let Some(b) = backend("softmax_rows_match_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(13);
    for dt in DTYPES {
        for &cols in &[1usize, 3, 8, 12, 201, 1024, 4097, 32_768] {
            let rows = 3;
            let mut x = q(&rng.vec(rows * cols, -20.0, 20.0), dt);
            // a masked (-inf) entry in row 0 when there is room
            if cols > 1 {
                x[0] = f32::NEG_INFINITY;
            }
            let got = host(
                &b,
                &b.softmax_rows(&dev(&b, &x, &[rows, cols], dt)).unwrap(),
            );
            let want: Vec<f64> = x
                .chunks(cols)
                .flat_map(|row| {
                    let m = row.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
                    let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
                    let s: f64 = e.iter().sum();
                    e.into_iter().map(move |v| v / s)
                })
                .collect();
            // x - max is rounded to f32 (half an ulp of values up to 40: 1.9e-6, which exp turns
            // into a relative error), expf is within 2 ulp, the f32 sum adds ~1e-6: 6e-6
            // relative. bf16: one output rounding (3.9e-3) plus that.
            let (atol, rtol) = if dt == DType::F32 {
                (1e-9, 6e-6)
            } else {
                (1e-9, 4e-3)
            };
            par.merge(assert_close(
                &format!("softmax {dt} [{rows}, {cols}]"),
                &got,
                &want,
                atol,
                rtol,
            ));
        }
    }
    // A NaN poisons its row; an all -inf row is NaN (torch semantics).
    let x = dev(
        &b,
        &[
            1.0,
            f32::NAN,
            2.0,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY,
        ],
        &[2, 3],
        DType::F32,
    );
    let y = host(&b, &b.softmax_rows(&x).unwrap());
    assert!(y.iter().all(|v| v.is_nan()), "{y:?}");
    b.synchronize().unwrap();
    par.print("softmax_rows");
}

// ---------------------------------------------------------------------------- 2-D norms

#[test]
fn layer_norm_2d_matches_cpu() {
    let Some(b) = backend("layer_norm_2d_matches_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(14);
    for dt in DTYPES {
        for &(n, c, h, w) in &[
            (1usize, 1usize, 1usize, 1usize),
            (1, 3, 5, 7),
            (2, 8, 4, 9),
            (1, 512, 16, 16),
            (1, 2048, 8, 8),
            (1, 37, 33, 3),
        ] {
            let hw = h * w;
            let x = q(&rng.vec(n * c * hw, -3.0, 5.0), dt);
            let wt = q(&rng.vec(c, 0.5, 1.5), dt);
            let bs = q(&rng.vec(c, -1.0, 1.0), dt);
            let eps = 1e-6f32;
            let got = host(
                &b,
                &b.layer_norm_2d(
                    &dev(&b, &x, &[n, c, h, w], dt),
                    &dev(&b, &wt, &[c], dt),
                    &dev(&b, &bs, &[c], dt),
                    eps,
                )
                .unwrap(),
            );
            // reference: f64 statistics; bf16 rounds (x-u)/sqrt(s+eps), w*x and +b (SAM's module).
            let round = |v: f64| if dt == DType::BF16 { rb(v) } else { v };
            let mut want = vec![0.0f64; n * c * hw];
            for img in 0..n {
                for p in 0..hw {
                    let at = |ch: usize| x[(img * c + ch) * hw + p] as f64;
                    let mean = (0..c).map(at).sum::<f64>() / c as f64;
                    let var = (0..c).map(|ch| (at(ch) - mean).powi(2)).sum::<f64>() / c as f64;
                    let den = (var + eps as f64).sqrt();
                    for ch in 0..c {
                        let t = round((at(ch) - mean) / den);
                        let t = round(wt[ch] as f64 * t);
                        want[(img * c + ch) * hw + p] = round(t + bs[ch] as f64);
                    }
                }
            }
            // Cross-check the f32 reference against the CPU backend's layer_norm_channels_first.
            if dt == DType::F32 && n == 1 {
                let mut cpu_out = vec![0.0f32; c * hw];
                cpu::layer_norm_channels_first(&x, &wt, &bs, c, hw, eps, &mut cpu_out).unwrap();
                assert_close("layer_norm_2d f64 ref vs cpu", &cpu_out, &want, 1e-5, 1e-5);
            }
            // f32: three passes of per-thread sums (<= 256 terms) and an 8-way combine: the mean
            // error is < 300 * 2^-24 relative of values <= 5: atol 1e-4 on outputs of size ~2.
            let (atol, rtol) = if dt == DType::F32 {
                (1e-4, 1e-5)
            } else {
                (1e-4, 1.6e-2)
            };
            par.merge(assert_close(
                &format!("layer_norm_2d {dt} [{n}, {c}, {h}, {w}]"),
                &got,
                &want,
                atol,
                rtol,
            ));
        }
    }
    b.synchronize().unwrap();
    par.print("layer_norm_2d");
}

#[test]
fn group_norm_matches_cpu() {
    let Some(b) = backend("group_norm_matches_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(15);
    for dt in DTYPES {
        // (n, c, h, w, groups): the real shape (256 x 128^2 / 32 groups: 131072-element groups in
        // 32 chunks), odd maps, groups bigger than one chunk with a ragged last chunk, batch 2.
        for &(n, c, h, w, g) in &[
            (1usize, 256usize, 128usize, 128usize, 32usize),
            (1, 6, 5, 7, 3),
            (2, 8, 9, 11, 4),
            (1, 16, 65, 67, 2),
            (1, 1, 1, 1, 1),
            (1, 32, 32, 32, 32),
        ] {
            let hw = h * w;
            let x = q(&rng.vec(n * c * hw, 1.0, 3.0), dt);
            let wt = q(&rng.vec(c, 0.5, 1.5), dt);
            let bs = q(&rng.vec(c, -1.0, 1.0), dt);
            let eps = 1e-5f32;
            let xd = dev(&b, &x, &[n, c, h, w], dt);
            let (wd, bd) = (dev(&b, &wt, &[c], dt), dev(&b, &bs, &[c], dt));
            for relu in [false, true] {
                let got = host(&b, &b.group_norm(&xd, &wd, &bd, g, eps, relu).unwrap());
                let mut want = Vec::with_capacity(n * c * hw);
                for img in 0..n {
                    let mut o = vec![0.0f32; c * hw];
                    cpu::group_norm(
                        &x[img * c * hw..(img + 1) * c * hw],
                        &wt,
                        &bs,
                        c,
                        hw,
                        g,
                        eps,
                        &mut o,
                    )
                    .unwrap();
                    want.extend(
                        o.iter()
                            .map(|&v| if relu { (v as f64).max(0.0) } else { v as f64 }),
                    );
                }
                // Both compute exact two-pass statistics (chunk-wise merged on the GPU, f64 on the
                // CPU) and the same affine formula: ~1e-6 relative on values <= ~4. bf16: one
                // output rounding.
                let (atol, rtol) = if dt == DType::F32 {
                    (2e-5, 1e-5)
                } else {
                    (2e-5, 4e-3)
                };
                par.merge(assert_close(
                    &format!("group_norm {dt} [{n}, {c}, {h}, {w}] g{g} relu={relu}"),
                    &got,
                    &want,
                    atol,
                    rtol,
                ));
            }
        }
    }
    let x = dev(&b, &[0.0; 12], &[1, 6, 1, 2], DType::F32);
    let p = dev(&b, &[1.0; 6], &[6], DType::F32);
    assert!(
        b.group_norm(&x, &p, &p, 4, 1e-5, false).is_err(),
        "6 channels into 4 groups"
    );
    b.synchronize().unwrap();
    par.print("group_norm");
}

// ---------------------------------------------------------------------------- element-wise

#[test]
fn activations_and_casts_match_cpu() {
    let Some(b) = backend("activations_and_casts_match_cpu") else {
        return;
    };
    let mut par_gelu = gpu::Parity::default();
    let mut par_silu = gpu::Parity::default();
    let mut par_cast = gpu::Parity::default();
    let mut rng = Rng(16);
    for dt in DTYPES {
        for &n in &[1usize, 7, 8, 9, 4096, 100_003] {
            let x = q(&rng.vec(n, -8.0, 8.0), dt);
            for (kind, cpu_fn) in [
                (Gelu::Erf, cpu::gelu_erf as fn(&mut [f32])),
                (Gelu::Tanh, cpu::gelu_tanh),
            ] {
                for misaligned in [false, true] {
                    let xd = if misaligned {
                        dev_misaligned(&b, &x, &[n], dt)
                    } else {
                        dev(&b, &x, &[n], dt)
                    };
                    let got = host(&b, &b.gelu(&xd, kind).unwrap());
                    let mut want = x.clone();
                    cpu_fn(&mut want);
                    // erff / tanhf within 2 ulp, the CPU's erf within 1.2e-7 relative; the tanh
                    // form cancels in 1 + tanh for x < -5 (torch's form, kept on purpose), where
                    // values are < 1e-5: atol. bf16: one output rounding.
                    let (atol, rtol) = if dt == DType::F32 {
                        (2e-6, 1e-6)
                    } else {
                        (2e-6, 4e-3)
                    };
                    par_gelu.merge(assert_close(
                        &format!("gelu {kind:?} {dt} n={n} misaligned={misaligned}"),
                        &got,
                        &widen(&want),
                        atol,
                        rtol,
                    ));
                }
            }
        }
        // SiLU gate: inter a multiple of 8 (packed) and odd (scalar).
        for &(rows, inter) in &[(1usize, 1usize), (3, 8), (5, 13), (2, 8192)] {
            let gu = q(&rng.vec(rows * 2 * inter, -6.0, 6.0), dt);
            let got = host(
                &b,
                &b.silu_gate(&dev(&b, &gu, &[rows, 2 * inter], dt)).unwrap(),
            );
            let want: Vec<f64> = gu
                .chunks(2 * inter)
                .flat_map(|r| {
                    (0..inter).map(move |i| {
                        let g = r[i] as f64;
                        let s = g / (1.0 + (-g).exp());
                        let s = if dt == DType::BF16 { rb(s) } else { s };
                        s * r[inter + i] as f64
                    })
                })
                .collect();
            // expf 2 ulp + division: 1e-6 relative. bf16: the activation rounding (mirrored) can
            // flip against the f64 reference, plus the output rounding.
            let (atol, rtol) = if dt == DType::F32 {
                (1e-6, 1e-6)
            } else {
                (1e-5, 1.6e-2)
            };
            par_silu.merge(assert_close(
                &format!("silu_gate {dt} [{rows}, {inter}]"),
                &got,
                &want,
                atol,
                rtol,
            ));
        }
    }
    // Casts through f16: bit-exact against the half crate's round-to-nearest-even.
    let mut x = rng.vec(1000, -70_000.0, 70_000.0);
    x.extend([
        0.0,
        -0.0,
        1e-8,
        65_504.0,
        65_520.0,
        f32::INFINITY,
        1.0 + 2f32.powi(-11),
    ]);
    let n = x.len();
    let xd = dev(&b, &x, &[n], DType::F32);
    let h = b.cast(&xd, DType::F16).unwrap();
    let hh = b.to_host(&h).unwrap();
    let want16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    assert!(
        hh.as_slice::<f16>()
            .unwrap()
            .iter()
            .zip(&want16)
            .all(|(a, c)| a.to_bits() == c.to_bits()),
        "cast f32 -> f16"
    );
    let back = host(&b, &b.cast(&h, DType::F32).unwrap());
    par_cast.merge(assert_bits_eq(
        "cast f16 -> f32",
        &back,
        &want16.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
    ));
    let hb = b.to_host(&b.cast(&h, DType::BF16).unwrap()).unwrap();
    assert!(
        hb.as_slice::<bf16>()
            .unwrap()
            .iter()
            .zip(&want16)
            .all(|(a, c)| a.to_bits() == bf16::from_f32(c.to_f32()).to_bits()),
        "cast f16 -> bf16"
    );
    let xb = b.cast(&xd, DType::BF16).unwrap();
    let bh = b.to_host(&b.cast(&xb, DType::F16).unwrap()).unwrap();
    let xbh = b.to_host(&xb).unwrap();
    assert!(
        bh.as_slice::<f16>()
            .unwrap()
            .iter()
            .zip(xbh.as_slice::<bf16>().unwrap())
            .all(|(a, c)| a.to_bits() == f16::from_f32(c.to_f32()).to_bits()),
        "cast bf16 -> f16"
    );
    b.synchronize().unwrap();
    par_gelu.print("gelu");
    par_silu.print("silu_gate");
    par_cast.print("cast");
}

#[test]
fn rope_matches_cpu() {
    let Some(b) = backend("rope_matches_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(17);
    for dt in DTYPES {
        for &(tokens, heads, hd, theta) in &[
            (1usize, 1usize, 2usize, 10_000.0f32),
            (7, 3, 96, 10_000.0),
            (5, 32, 96, 10_000.0),
            (3, 2, 130, 500_000.0),
        ] {
            let x = q(&rng.vec(tokens * heads * hd, -2.0, 2.0), dt);
            let xd = dev(&b, &x, &[tokens, heads * hd], dt);
            let inv_freq = b.rope_inv_freq(hd, theta).unwrap();
            let list: Vec<u32> = (0..tokens).map(|t| (t * 577 + 3) as u32 % 4096).collect();
            for (name, pos) in [
                ("offset 2040", RopePositions::Offset(2040)),
                ("list", RopePositions::List(&list)),
            ] {
                let positions: Vec<usize> = match pos {
                    RopePositions::Offset(o) => (0..tokens).map(|t| o + t).collect(),
                    RopePositions::List(l) => l.iter().map(|&p| p as usize).collect(),
                };
                let got = host(&b, &b.rope(&xd, heads, hd, &inv_freq, pos).unwrap());
                let want: Vec<f64> = if dt == DType::F32 {
                    let mut w = x.clone();
                    cpu::rope(&mut w, tokens, heads, hd, &positions, theta).unwrap();
                    widen(&w)
                } else {
                    // HF under bf16: cos/sin in bf16, products and sum rounded.
                    let half = hd / 2;
                    let mut w = vec![0.0f64; x.len()];
                    for (t, &pos) in positions.iter().enumerate() {
                        for i in 0..half {
                            let f = 1.0f32 / theta.powf((2 * i) as f32 / hd as f32);
                            let a = (pos as f32 * f) as f64;
                            let (c, s) = (rb(a.cos() as f32 as f64), rb(a.sin() as f32 as f64));
                            for h in 0..heads {
                                let base = (t * heads + h) * hd;
                                let (lo, hi) = (x[base + i] as f64, x[base + i + half] as f64);
                                w[base + i] = rb(rb(lo * c) - rb(hi * s));
                                w[base + i + half] = rb(rb(hi * c) + rb(lo * s));
                            }
                        }
                    }
                    w
                };
                // f32: the same inv_freq table and f32 angle, cos/sin of it in f64 on both sides
                // and the same non-fused arithmetic: equal up to a (very rare) 1-ulp difference
                // between f64 cos and sincospi after rounding to f32.
                let (atol, rtol) = if dt == DType::F32 {
                    (1e-6, 1e-6)
                } else {
                    (1e-5, 1.6e-2)
                };
                par.merge(assert_close(
                    &format!("rope {dt} [{tokens}, {heads}x{hd}] theta {theta} {name}"),
                    &got,
                    &want,
                    atol,
                    rtol,
                ));
            }
        }
    }
    b.synchronize().unwrap();
    par.print("rope");
}

// ---------------------------------------------------------------------------- resize

#[test]
fn resize_bilinear_matches_cpu() {
    let Some(b) = backend("resize_bilinear_matches_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(18);
    for dt in DTYPES {
        for &(c, h, w, oh, ow) in &[
            (1usize, 1usize, 1usize, 5usize, 3usize),
            (2, 4, 6, 4, 6),
            (3, 7, 5, 16, 11),
            (2, 32, 32, 64, 64),
            (1, 64, 48, 17, 9),
            (4, 128, 128, 32, 32),
            (1, 3, 9, 1, 1),
        ] {
            let x = q(&rng.vec(c * h * w, -5.0, 5.0), dt);
            for ac in [false, true] {
                let got = host(
                    &b,
                    &b.resize_bilinear(&dev(&b, &x, &[1, c, h, w], dt), oh, ow, ac)
                        .unwrap(),
                );
                let mut want = vec![0.0f32; c * oh * ow];
                cpu::resize_bilinear(&x, c, h, w, oh, ow, ac, &mut want).unwrap();
                let what = format!("resize {dt} [{c}, {h}, {w}] -> {oh}x{ow} ac={ac}");
                if dt == DType::F32 {
                    // Same taps and the same non-fused f32 arithmetic as the CPU: bit-exact.
                    par.merge(assert_bits_eq(&what, &got, &want));
                } else {
                    par.merge(assert_bits_eq(&what, &got, &q(&want, DType::BF16)));
                }
            }
        }
    }
    b.synchronize().unwrap();
    par.print("resize_bilinear");
}

/// The reference two-step: resize to pad x pad (align_corners=False), stored as T, crop, resize.
#[allow(clippy::too_many_arguments)]
fn mask_post_ref(
    x: &[f32],
    qn: usize,
    h: usize,
    w: usize,
    pad: usize,
    scaled: (usize, usize),
    out: (usize, usize),
    dt: DType,
) -> Vec<f32> {
    let mut big = vec![0.0f32; qn * pad * pad];
    cpu::resize_bilinear(x, qn, h, w, pad, pad, false, &mut big).unwrap();
    let big = q(&big, dt);
    let (nh, nw) = scaled;
    let mut crop = Vec::with_capacity(qn * nh * nw);
    for p in 0..qn {
        for y in 0..nh {
            crop.extend_from_slice(&big[(p * pad + y) * pad..(p * pad + y) * pad + nw]);
        }
    }
    let mut o = vec![0.0f32; qn * out.0 * out.1];
    cpu::resize_bilinear(&crop, qn, nh, nw, out.0, out.1, false, &mut o).unwrap();
    q(&o, dt)
}

#[test]
fn mask_postprocess_matches_two_step_cpu() {
    let Some(b) = backend("mask_postprocess_matches_two_step_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(19);
    for dt in DTYPES {
        // (Q, h, w, pad, scaled, image): landscape and portrait crops, a crop equal to the canvas
        // (identity second step when the image is the canvas), small odd sizes.
        for &(qn, h, w, pad, scaled, out) in &[
            (
                3usize,
                16usize,
                16usize,
                128usize,
                (96usize, 128usize),
                (75usize, 100usize),
            ),
            (2, 16, 16, 128, (128, 57), (301, 134)),
            (1, 32, 32, 256, (256, 256), (256, 256)),
            (2, 5, 7, 40, (40, 23), (13, 8)),
            (1, 8, 8, 64, (1, 1), (3, 2)),
        ] {
            let x = q(&rng.vec(qn * h * w, -10.0, 10.0), dt);
            let got = host(
                &b,
                &b.mask_postprocess(&dev(&b, &x, &[qn, h, w], dt), pad, scaled, out)
                    .unwrap(),
            );
            let want = mask_post_ref(&x, qn, h, w, pad, scaled, out, dt);
            if dt == DType::F32 {
                // The CPU post-processing's resizer computes the same thing (crop only).
                let r = MaskResizer::new(MaskGeometry {
                    grid: (h, w),
                    canvas: pad,
                    scaled,
                    image: out,
                })
                .unwrap();
                let all: Vec<usize> = (0..qn).collect();
                let cpu_maps = r.resize_queries(&x, &all).unwrap();
                assert_bits_eq(
                    "mask_post_ref vs task::masks::MaskResizer",
                    &want,
                    &cpu_maps,
                );
            }
            // Same taps and arithmetic as the CPU two-step, the intermediate rounded to T at the
            // same point: bit-exact for both dtypes.
            par.merge(assert_bits_eq(
                &format!("mask_postprocess {dt} Q{qn} {h}x{w} -> {pad} -> {scaled:?} -> {out:?}"),
                &got,
                &want,
            ));
        }
    }
    // The composition is not a single resize (the reason the kernel composes the taps).
    let x = Rng(20).vec(16 * 16, -1.0, 1.0);
    let two = mask_post_ref(&x, 1, 16, 16, 128, (96, 128), (75, 100), DType::F32);
    let mut one = vec![0.0f32; 75 * 100];
    let mut crop_src = vec![0.0f32; 16 * 16];
    crop_src.copy_from_slice(&x);
    cpu::resize_bilinear(&crop_src, 1, 16, 16, 75, 100, false, &mut one).unwrap();
    assert!(two.iter().zip(&one).any(|(a, c)| (a - c).abs() > 1e-3));
    b.synchronize().unwrap();
    par.print("mask_postprocess");
}

// ---------------------------------------------------------------------------- pixel shuffle

fn to_cf(x: &[f32], n: usize, h: usize, w: usize, c: usize) -> Vec<f32> {
    let mut o = vec![0.0; x.len()];
    for b in 0..n {
        for y in 0..h {
            for xx in 0..w {
                for ch in 0..c {
                    o[((b * c + ch) * h + y) * w + xx] = x[((b * h + y) * w + xx) * c + ch];
                }
            }
        }
    }
    o
}

#[test]
fn pixel_shuffle_matches_cpu_in_both_layouts() {
    let Some(b) = backend("pixel_shuffle_matches_cpu_in_both_layouts") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(21);
    for dt in DTYPES {
        // (n, h, w, c): the model's (64x64x1024, 64x64x2048), odd sizes (padding), c not a
        // multiple of 8 (unvectorised runs), batch 2, a single pixel.
        for &(n, h, w, c) in &[
            (1usize, 64usize, 64usize, 1024usize),
            (1, 32, 32, 2048),
            (1, 5, 7, 12),
            (2, 4, 6, 8),
            (1, 1, 1, 4),
            (1, 3, 3, 3),
            (2, 9, 2, 20),
        ] {
            let x = q(&rng.vec(n * h * w * c, -3.0, 3.0), dt);
            for dir in [Shuffle::Down, Shuffle::Up] {
                if dir == Shuffle::Up && c % 4 != 0 {
                    continue;
                }
                // CPU reference (channels-last, one image at a time)
                let (oh, ow, oc) = match dir {
                    Shuffle::Down => (h.div_ceil(2), w.div_ceil(2), 4 * c),
                    Shuffle::Up => (2 * h, 2 * w, c / 4),
                };
                let mut want = Vec::new();
                for img in 0..n {
                    let xi = &x[img * h * w * c..(img + 1) * h * w * c];
                    let mut o = vec![f32::NAN; oh * ow * oc];
                    match dir {
                        Shuffle::Down => cpu::pixel_shuffle_down(xi, h, w, c, &mut o).unwrap(),
                        Shuffle::Up => cpu::pixel_shuffle_up(xi, h, w, c, &mut o).unwrap(),
                    }
                    want.extend(o);
                }
                let what = format!("pixel_shuffle {dir:?} {dt} [{n}, {h}, {w}, {c}]");
                for misaligned in [false, true] {
                    let xd = if misaligned {
                        dev_misaligned(&b, &x, &[n, h, w, c], dt)
                    } else {
                        dev(&b, &x, &[n, h, w, c], dt)
                    };
                    let y = b.pixel_shuffle(&xd, dir, MapLayout::ChannelsLast).unwrap();
                    assert_eq!(y.dims(), &[n, oh, ow, oc]);
                    par.merge(assert_bits_eq(
                        &format!("{what} channels-last misaligned={misaligned}"),
                        &host(&b, &y),
                        &want,
                    ));
                }
                let xcf = to_cf(&x, n, h, w, c);
                let y = b
                    .pixel_shuffle(
                        &dev(&b, &xcf, &[n, c, h, w], dt),
                        dir,
                        MapLayout::ChannelsFirst,
                    )
                    .unwrap();
                assert_eq!(y.dims(), &[n, oc, oh, ow]);
                par.merge(assert_bits_eq(
                    &format!("{what} channels-first"),
                    &host(&b, &y),
                    &to_cf(&want, n, oh, ow, oc),
                ));
            }
        }
    }
    let x = dev(&b, &[0.0; 6], &[1, 1, 6], DType::F32);
    assert!(
        b.pixel_shuffle(&x, Shuffle::Up, MapLayout::ChannelsLast)
            .is_err(),
        "6 channels up"
    );
    b.synchronize().unwrap();
    par.print("pixel_shuffle");
}

// ---------------------------------------------------------------------------- deformable attention

/// f64 multi-scale deformable attention from the spec (architecture notes §9): softmax over the
/// 12 (level, point) logits per head, loc = ref + offset / (W, H), bilinear grid_sample with
/// align_corners=False (pixel x = loc * W - 0.5) and zero padding.
#[allow(clippy::too_many_arguments)]
fn msda_ref(
    value: &[f32],
    levels: &[(usize, usize); 3],
    heads: usize,
    hd: usize,
    offsets: &[f32],
    ostride: usize,
    logits: &[f32],
    lstride: usize,
    refs: Option<&[f32]>,
    nq: usize,
) -> Vec<f64> {
    let c = heads * hd;
    let starts = [
        0,
        levels[0].0 * levels[0].1,
        levels[0].0 * levels[0].1 + levels[1].0 * levels[1].1,
    ];
    let mut out = vec![0.0f64; nq * c];
    for qi in 0..nq {
        let (rx, ry) = match refs {
            Some(r) => (r[2 * qi] as f64, r[2 * qi + 1] as f64),
            None => {
                let l = (0..3).rev().find(|&l| qi >= starts[l]).unwrap();
                let (lh, lw) = levels[l];
                let local = qi - starts[l];
                (
                    ((local % lw) as f64 + 0.5) / lw as f64,
                    ((local / lw) as f64 + 0.5) / lh as f64,
                )
            }
        };
        for h in 0..heads {
            let lg: Vec<f64> = (0..12)
                .map(|s| logits[qi * lstride + h * 12 + s] as f64)
                .collect();
            let m = lg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = lg.iter().map(|v| (v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for s in 0..12 {
                let a = e[s] / sum;
                let l = s / 4;
                let (lh, lw) = levels[l];
                let ox = offsets[qi * ostride + h * 24 + 2 * s] as f64;
                let oy = offsets[qi * ostride + h * 24 + 2 * s + 1] as f64;
                let ix = (rx + ox / lw as f64) * lw as f64 - 0.5;
                let iy = (ry + oy / lh as f64) * lh as f64 - 0.5;
                let (fx, fy) = (ix.floor(), iy.floor());
                for (cx, cy, wgt) in [
                    (0.0, 0.0, (fx + 1.0 - ix) * (fy + 1.0 - iy)),
                    (1.0, 0.0, (ix - fx) * (fy + 1.0 - iy)),
                    (0.0, 1.0, (fx + 1.0 - ix) * (iy - fy)),
                    (1.0, 1.0, (ix - fx) * (iy - fy)),
                ] {
                    let (xx, yy) = (fx + cx, fy + cy);
                    if xx < 0.0 || yy < 0.0 || xx >= lw as f64 || yy >= lh as f64 {
                        continue;
                    }
                    let row = starts[l] + yy as usize * lw + xx as usize;
                    for ch in 0..hd {
                        out[qi * c + h * hd + ch] += a * wgt * value[row * c + h * hd + ch] as f64;
                    }
                }
            }
        }
    }
    out
}

#[test]
fn ms_deform_attn_matches_f64_reference() {
    let Some(b) = backend("ms_deform_attn_matches_f64_reference") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(22);
    for dt in DTYPES {
        // (levels, heads, hd): the real head geometry (8 x 32) on small maps, the test model's
        // (4 x 8), head dims that need several channels per lane (64), a non-power of two (12),
        // degenerate 1-pixel levels, and odd rectangular levels.
        for &(levels, heads, hd) in &[
            ([(4usize, 4usize), (3, 5), (2, 2)], 8usize, 32usize),
            ([(8, 8), (4, 4), (2, 2)], 4, 8),
            ([(6, 7), (3, 4), (1, 2)], 2, 64),
            ([(5, 3), (2, 5), (1, 1)], 3, 12),
            ([(1, 1), (1, 1), (1, 1)], 1, 32),
            ([(16, 16), (8, 8), (4, 4)], 8, 32),
        ] {
            let s: usize = levels.iter().map(|&(h, w)| h * w).sum();
            let c = heads * hd;
            let value = q(&rng.vec(s * c, -1.0, 1.0), dt);
            let vd = dev(&b, &value, &[s, c], dt);
            for with_refs in [false, true] {
                let nq = if with_refs { 37 } else { s };
                // offsets mostly within a few pixels, every 7th far outside the map (zero padding)
                let mut offs = rng.vec(nq * heads * 24, -3.0, 3.0);
                for (i, o) in offs.iter_mut().enumerate() {
                    if i % 7 == 3 {
                        *o *= 20.0;
                    }
                }
                let offs = q(&offs, dt);
                let logits = q(&rng.vec(nq * heads * 12, -4.0, 4.0), dt);
                // reference points inside and slightly outside [0, 1]
                let refs = rng.vec(nq * 2, -0.1, 1.1);
                // Fused projection layout: [Q, heads*24 | heads*12 | 5 spare], offsets and logits
                // are column slices with row stride heads*36 + 5.
                let stride = heads * 36 + 5;
                let mut fused = vec![0.0f32; nq * stride];
                for qi in 0..nq {
                    fused[qi * stride..qi * stride + heads * 24]
                        .copy_from_slice(&offs[qi * heads * 24..(qi + 1) * heads * 24]);
                    fused[qi * stride + heads * 24..qi * stride + heads * 36]
                        .copy_from_slice(&logits[qi * heads * 12..(qi + 1) * heads * 12]);
                }
                let fd = dev(&b, &fused, &[nq, stride], dt);
                let od = fd.narrow(1, 0, heads * 24).unwrap();
                let ld = fd.narrow(1, heads * 24, heads * 12).unwrap();
                let rd = dev(&b, &refs, &[nq, 2], DType::F32);
                let y = b
                    .ms_deform_attn(&vd, levels, heads, &od, &ld, with_refs.then_some(&rd))
                    .unwrap();
                assert_eq!(y.dims(), &[nq, c]);
                let want = msda_ref(
                    &value,
                    &levels,
                    heads,
                    hd,
                    &fused,
                    stride,
                    &fused[heads * 24..],
                    stride,
                    with_refs.then_some(&refs[..]),
                    nq,
                );
                // f32: sampling positions carry f32 rounding (~6e-8 relative of coordinates up to
                // ~70 pixels: < 1e-5 pixel), and the 48-term sum ~48 ulp of values <= 1; bilinear
                // sampling with zero padding is continuous, so floor() differences do not jump.
                // bf16: one output rounding.
                let (atol, rtol) = if dt == DType::F32 {
                    (3e-5, 1e-5)
                } else {
                    (1e-4, 4e-3)
                };
                let got = host(&b, &y);
                par.merge(assert_close(
                    &format!("ms_deform_attn {dt} {levels:?} {heads}x{hd} refs={with_refs}"),
                    &got,
                    &want,
                    atol,
                    rtol,
                ));
                if dt == DType::F32 {
                    // The CPU backend's kernel: the same f32 coordinate arithmetic, sums in
                    // another order and corner weights as (1 - ex) rather than (fx + 1 - ix).
                    let reference = if with_refs {
                        refs.clone()
                    } else {
                        cpu::deform_reference_points(&levels)
                    };
                    let mut cpu_out = vec![0.0f32; nq * c];
                    cpu::ms_deform_attn(
                        &value,
                        &levels,
                        &reference,
                        &offs,
                        &logits,
                        nq,
                        heads,
                        hd,
                        4,
                        &mut cpu_out,
                    )
                    .unwrap();
                    par.merge(assert_close(
                        &format!("ms_deform_attn vs cpu {levels:?} {heads}x{hd} refs={with_refs}"),
                        &got,
                        &widen(&cpu_out),
                        2e-5,
                        1e-5,
                    ));
                }
            }
        }
    }
    // Contiguous offsets/logits work as well; wrong geometry is an error.
    let levels = [(2usize, 2usize), (1, 1), (1, 1)];
    let v = dev(&b, &[0.5; 6 * 8], &[6, 8], DType::F32);
    let o = dev(&b, &[0.0; 6 * 48], &[6, 48], DType::F32);
    let l = dev(&b, &[0.0; 6 * 24], &[6, 24], DType::F32);
    let y = host(&b, &b.ms_deform_attn(&v, levels, 2, &o, &l, None).unwrap());
    // zero offsets at pixel centres sample the pixel itself: every output is 0.5
    assert!(y.iter().all(|&x| (x - 0.5).abs() < 1e-6), "{y:?}");
    assert!(
        b.ms_deform_attn(&v, [(2, 2), (1, 1), (2, 1)], 2, &o, &l, None)
            .is_err(),
        "S mismatch"
    );
    assert!(
        b.ms_deform_attn(&v, levels, 3, &o, &l, None).is_err(),
        "8 channels in 3 heads"
    );
    let l_short = dev(&b, &[0.0; 6 * 20], &[6, 20], DType::F32);
    assert!(
        b.ms_deform_attn(&v, levels, 2, &o, &l_short, None).is_err(),
        "short logits"
    );
    b.synchronize().unwrap();
    par.print("ms_deform_attn");
}

// ---------------------------------------------------------------------------- region pooling

/// f64 region pooling from the spec (architecture notes §7): x = col / W_mask, y = row / H_mask,
/// bilinear grid_sample with align_corners=True (pixel x = x * (gw - 1)), zero padding, max.
fn region_ref(
    tokens: &[f32],
    gh: usize,
    gw: usize,
    d: usize,
    pts: &[(usize, usize)],
    mask: (usize, usize),
) -> Vec<f64> {
    let mut out = vec![f64::NEG_INFINITY; d];
    for p in pts {
        let ix = p.1 as f64 / mask.1 as f64 * (gw - 1) as f64;
        let iy = p.0 as f64 / mask.0 as f64 * (gh - 1) as f64;
        let (fx, fy) = (ix.floor(), iy.floor());
        for ch in 0..d {
            let mut v = 0.0;
            for (cx, cy, wgt) in [
                (0.0, 0.0, (fx + 1.0 - ix) * (fy + 1.0 - iy)),
                (1.0, 0.0, (ix - fx) * (fy + 1.0 - iy)),
                (0.0, 1.0, (fx + 1.0 - ix) * (iy - fy)),
                (1.0, 1.0, (ix - fx) * (iy - fy)),
            ] {
                let (xx, yy) = (fx + cx, fy + cy);
                if xx >= 0.0 && yy >= 0.0 && xx < gw as f64 && yy < gh as f64 {
                    v += wgt * tokens[(yy as usize * gw + xx as usize) * d + ch] as f64;
                }
            }
            out[ch] = out[ch].max(v);
        }
    }
    out
}

#[test]
fn region_pool_matches_f64_reference() {
    let Some(b) = backend("region_pool_matches_f64_reference") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(23);
    for dt in DTYPES {
        // (grid, D, mask size, P): the real geometry (32x32 tokens of 3072, 1024 mask, 256
        // points), an odd channel count, a non-square token map, few points.
        for &(gh, gw, d, ms, np) in &[
            (32usize, 32usize, 3072usize, 1024usize, 256usize),
            (8, 8, 37, 64, 16),
            (5, 7, 64, 50, 300),
            (2, 2, 1, 4, 3),
        ] {
            let tokens = q(&rng.vec(gh * gw * d, -2.0, 2.0), dt);
            let td = dev(&b, &tokens, &[gh * gw, d], dt);
            // prompts: one pixel, the last (bottom-right) pixel, the full mask, a random blob
            let mut masks = Vec::new();
            let mut one = vec![0u8; ms * ms];
            one[rng.below(ms * ms)] = 1;
            masks.push(("single pixel", one));
            let mut corner = vec![0u8; ms * ms];
            corner[ms * ms - 1] = 255;
            masks.push(("bottom-right pixel", corner));
            masks.push(("full", vec![1u8; ms * ms]));
            let (cy, cx, r) = (rng.below(ms), rng.below(ms), ms / 5 + 1);
            let blob: Vec<u8> = (0..ms * ms)
                .map(|i| {
                    u8::from(
                        ((i / ms) as i64 - cy as i64).pow(2) + ((i % ms) as i64 - cx as i64).pow(2)
                            <= (r * r) as i64,
                    )
                })
                .collect();
            masks.push(("blob", blob));
            let mut all_pts = Vec::new();
            for (_, m) in &masks {
                all_pts.extend(region_points(m, ms, np).unwrap());
            }
            let y = b
                .region_pool(&td, (gh, gw), &all_pts, np, (ms, ms))
                .unwrap();
            assert_eq!(y.dims(), &[masks.len(), d]);
            let got = host(&b, &y);
            // The CPU backend's region sampler (square token maps only), f32.
            if dt == DType::F32 && gh == gw {
                let host_tokens = Tensor::from_f32(tokens.clone(), [gh * gw, d]).unwrap();
                let refs: Vec<&[u8]> = masks.iter().map(|(_, m)| &m[..]).collect();
                let cpu_out = RegionSampler::new(np)
                    .sample(&host_tokens, &refs, ms)
                    .unwrap()
                    .to_vec_f32()
                    .unwrap();
                // Same f32 coordinates; the CPU sums the 4 taps without FMA: a few ulp.
                par.merge(assert_close(
                    &format!("region_pool vs cpu RegionSampler {gh}x{gw}x{d} P{np}"),
                    &got,
                    &widen(&cpu_out),
                    1e-6,
                    1e-6,
                ));
            }
            for (ri, (name, _)) in masks.iter().enumerate() {
                let want = region_ref(
                    &tokens,
                    gh,
                    gw,
                    d,
                    &all_pts[ri * np..(ri + 1) * np],
                    (ms, ms),
                );
                // f32: the sample position is exact up to f32 rounding of x/S*(gw-1) (~2e-6 token)
                // and each sample is 4 products: 1e-5. bf16: one output rounding of the max.
                let (atol, rtol) = if dt == DType::F32 {
                    (1e-5, 1e-6)
                } else {
                    (1e-5, 4e-3)
                };
                par.merge(assert_close(
                    &format!("region_pool {dt} {gh}x{gw}x{d} mask {ms} P{np} {name}"),
                    &got[ri * d..(ri + 1) * d],
                    &want,
                    atol,
                    rtol,
                ));
            }
        }
    }
    let td = dev(&b, &[0.0; 4 * 3], &[4, 3], DType::F32);
    assert!(
        b.region_pool(&td, (2, 2), &[(4, 0)], 1, (4, 4)).is_err(),
        "point outside the mask"
    );
    assert!(
        b.region_pool(&td, (2, 2), &[(0, 0); 3], 2, (4, 4)).is_err(),
        "3 points, prompts of 2"
    );
    b.synchronize().unwrap();
    par.print("region_pool");
}

// ---------------------------------------------------------------------------- embeddings

#[test]
fn gather_rows_and_sine_embedding_match_reference() {
    let Some(b) = backend("gather_rows_and_sine_embedding_match_reference") else {
        return;
    };
    let mut par_gather = gpu::Parity::default();
    let mut par_sine = gpu::Parity::default();
    let mut rng = Rng(24);
    for &(rows, cols) in &[(10usize, 3072usize), (7, 13), (1, 1)] {
        let table = q(&rng.vec(rows * cols, -1.0, 1.0), DType::BF16);
        let ids: Vec<u32> = (0..9).map(|i| (i * 5 % rows) as u32).collect();
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| table[i as usize * cols..(i as usize + 1) * cols].to_vec())
            .collect();
        // CPU gather agrees with the plain copy
        let tb: Vec<bf16> = table.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut cpu_out = vec![0.0f32; ids.len() * cols];
        cpu::gather_rows(cpu::WeightRef::BF16(&tb), cols, &ids, &mut cpu_out).unwrap();
        assert_bits_eq("cpu gather", &cpu_out, &want);
        let td = dev(&b, &table, &[rows, cols], DType::BF16);
        for out_dt in [DType::F32, DType::BF16] {
            let y = b.gather_rows(&td, &ids, out_dt).unwrap();
            assert_eq!((y.dtype(), y.dims()), (out_dt, &[ids.len(), cols][..]));
            par_gather.merge(assert_bits_eq(
                &format!("gather bf16 -> {out_dt} [{rows}, {cols}]"),
                &host(&b, &y),
                &want,
            ));
        }
        let tf = dev(&b, &table, &[rows, cols], DType::F32);
        par_gather.merge(assert_bits_eq(
            "gather f32",
            &host(&b, &b.gather_rows(&tf, &ids, DType::F32).unwrap()),
            &want,
        ));
        assert!(
            b.gather_rows(&td, &[rows as u32], DType::F32).is_err(),
            "id out of range"
        );
    }

    for dt in DTYPES {
        for &(h, w, f) in &[
            (32usize, 32usize, 128usize),
            (5, 7, 4),
            (1, 1, 2),
            (128, 128, 16),
        ] {
            let add = q(&rng.vec(2 * f, -1.0, 1.0), dt);
            let ad = dev(&b, &add, &[2 * f], dt);
            let temp = 10_000.0f32;
            // f64 reference of the spec formula, [2F, h, w]
            let mut want = vec![0.0f64; 2 * f * h * w];
            for ch in 0..2 * f {
                let (k, is_y) = if ch < f { (ch, true) } else { (ch - f, false) };
                let dim_t = (temp as f64).powf((2 * (k / 2)) as f64 / f as f64);
                for y in 0..h {
                    for x in 0..w {
                        let (idx, size) = if is_y { (y, h) } else { (x, w) };
                        let p =
                            (idx + 1) as f64 / (size as f64 + 1e-6) * 2.0 * std::f64::consts::PI;
                        let a = p / dim_t;
                        want[(ch * h + y) * w + x] = if k % 2 == 0 { a.sin() } else { a.cos() };
                    }
                }
            }
            for layout in [MapLayout::ChannelsFirst, MapLayout::ChannelsLast] {
                for with_add in [false, true] {
                    let y = b
                        .sine_position_embedding(h, w, f, temp, dt, layout, with_add.then_some(&ad))
                        .unwrap();
                    let mut got = host(&b, &y);
                    if layout == MapLayout::ChannelsLast {
                        assert_eq!(y.dims(), &[h * w, 2 * f]);
                        got = to_cf(&got, 1, h, w, 2 * f);
                    } else {
                        assert_eq!(y.dims(), &[2 * f, h, w]);
                    }
                    let want: Vec<f64> = want
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            let v = if dt == DType::BF16 { rb(v) } else { v };
                            if with_add {
                                v + add[i / (h * w)] as f64
                            } else {
                                v
                            }
                        })
                        .collect();
                    // f32: the angle carries ~3 f32 roundings (< 1e-6 of <= 2 pi) and the
                    // f32 (size + 1e-6); sin/cos themselves are exact to f32. bf16: the mirrored
                    // rounding of the embedding plus the output rounding.
                    let (atol, rtol) = if dt == DType::F32 {
                        (3e-6, 1e-6)
                    } else {
                        (8e-3, 8e-3)
                    };
                    par_sine.merge(assert_close(
                        &format!("sine pos {dt} {h}x{w} F{f} {layout:?} add={with_add}"),
                        &got,
                        &want,
                        atol,
                        rtol,
                    ));
                }
            }
        }
    }
    b.synchronize().unwrap();
    par_gather.print("gather_rows");
    par_sine.print("sine_position_embedding");
}

// ---------------------------------------------------------------------------- bench helpers

#[test]
fn timing_and_copy_helpers_work() {
    let Some(b) = backend("timing_and_copy_helpers_work") else {
        return;
    };
    let x: Vec<f32> = (0..100_001).map(|i| i as f32).collect();
    let xd = dev(&b, &x, &[x.len()], DType::F32);
    let mut y = None;
    let ms = b
        .time_queued(|| {
            b.spin(std::time::Duration::from_micros(200))?;
            y = Some(b.copy_device(&xd)?);
            Ok(())
        })
        .unwrap();
    assert!(ms >= 0.15, "spin of 200 us timed as {ms} ms");
    assert_bits_eq("copy_device", &host(&b, &y.unwrap()), &x);
}

// ---------------------------------------------------------------------------- references

/// The f64 references above agree with the CPU backend (runs without a GPU): a wrong reference
/// would make the GPU tests prove nothing.
#[test]
fn f64_references_agree_with_cpu_backend() {
    let mut rng = Rng(25);
    // deformable attention, with and without explicit reference points
    for &(levels, heads, hd) in &[
        ([(4usize, 4usize), (3, 5), (2, 2)], 8usize, 32usize),
        ([(5, 3), (2, 5), (1, 1)], 3, 12),
    ] {
        let s: usize = levels.iter().map(|&(h, w)| h * w).sum();
        let c = heads * hd;
        let value = rng.vec(s * c, -1.0, 1.0);
        for with_refs in [false, true] {
            let nq = if with_refs { 11 } else { s };
            let mut offs = rng.vec(nq * heads * 24, -3.0, 3.0);
            for o in offs.iter_mut().step_by(7) {
                *o *= 20.0;
            }
            let logits = rng.vec(nq * heads * 12, -4.0, 4.0);
            let refs = rng.vec(nq * 2, -0.1, 1.1);
            let want = msda_ref(
                &value,
                &levels,
                heads,
                hd,
                &offs,
                heads * 24,
                &logits,
                heads * 12,
                with_refs.then_some(&refs[..]),
                nq,
            );
            let reference = if with_refs {
                refs.clone()
            } else {
                cpu::deform_reference_points(&levels)
            };
            let mut got = vec![0.0f32; nq * c];
            cpu::ms_deform_attn(
                &value, &levels, &reference, &offs, &logits, nq, heads, hd, 4, &mut got,
            )
            .unwrap();
            assert_close(
                &format!("cpu ms_deform_attn vs f64 ref {levels:?} refs={with_refs}"),
                &got,
                &want,
                3e-5,
                1e-5,
            );
        }
    }
    // region pooling on a square token map
    let (g, d, ms, np) = (8usize, 19usize, 64usize, 40usize);
    let tokens = rng.vec(g * g * d, -2.0, 2.0);
    let mut mask = vec![0u8; ms * ms];
    for _ in 0..100 {
        mask[rng.below(ms * ms)] = 1;
    }
    mask[ms * ms - 1] = 1;
    let pts = region_points(&mask, ms, np).unwrap();
    let want = region_ref(&tokens, g, g, d, &pts, (ms, ms));
    let got = RegionSampler::new(np)
        .sample(&Tensor::from_f32(tokens, [g * g, d]).unwrap(), &[&mask], ms)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_close("cpu RegionSampler vs f64 ref", &got, &want, 1e-5, 1e-6);
    // mask post-processing: the two-step reference and the CPU post-processing's resizer
    let (qn, h, w, pad, scaled, out) = (
        2usize,
        16usize,
        16usize,
        128usize,
        (96usize, 128usize),
        (75usize, 100usize),
    );
    let x = rng.vec(qn * h * w, -10.0, 10.0);
    let two = mask_post_ref(&x, qn, h, w, pad, scaled, out, DType::F32);
    let r = MaskResizer::new(MaskGeometry {
        grid: (h, w),
        canvas: pad,
        scaled,
        image: out,
    })
    .unwrap();
    assert_bits_eq(
        "two-step reference vs MaskResizer",
        &two,
        &r.resize_queries(&x, &[0, 1]).unwrap(),
    );
}
