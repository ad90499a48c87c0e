//! CUDA backend tests.
//!
//! Two kinds:
//! - Build checks that run everywhere: `kernels_compiled()` agrees with what build.rs did, and the
//!   ptxas report of a kernel build shows every kernel for every architecture with no spills.
//! - GPU tests: copies and kernels against f64 CPU references. Without a driver, a device or
//!   compiled kernels they print `SKIP cuda_backend::<test>: <reason>` and pass. When all three are
//!   present, failing to open the backend is a failure, not a skip. Set `XSAM_REQUIRE_GPU=1` to
//!   turn skips into failures (for runs that must exercise the GPU).
//!
//! Every kernel output is allocated poisoned (all bytes 0xFF = NaN), so an element a kernel does
//! not write stays NaN, and every comparison is written so that NaN fails it.

mod gpu;
use half::bf16;
use xsam::backend::cuda::{self, kernels, CudaBackend};
use xsam::{DType, Tensor};

// ---------------------------------------------------------------------------- helpers

fn backend(test: &str) -> Option<CudaBackend> {
    gpu::backend("cuda_backend", test)
}

use gpu::Rng;

/// Asserts |got - want| <= atol + rtol * |want| for every element; NaN or inf in `got` fails
/// (the comparison is false for NaN). Returns the worst errors, for the PARITY line.
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
        if err / tol > worst.1 {
            worst = (i, err / tol);
        }
    }
    println!("  {what}: max |err|/tol = {:.3} at {}", worst.1, worst.0);
    par
}

fn host_f32(b: &CudaBackend, t: &Tensor) -> Vec<f32> {
    let h = b.to_host(t).expect("to_host");
    assert!(h.is_host());
    h.to_vec_f32().expect("to_vec_f32")
}

use gpu::layer_norm_ref;

/// erf in f64 by its Maclaurin series; for |z| <= 4.5 the terms peak near e^(z^2) ~ 6e8, so about
/// 1e-7 absolute accuracy is left, well below the f32 tolerances used with it.
fn erf64(z: f64) -> f64 {
    assert!(z.abs() <= 4.5);
    let mut sum = 0.0;
    let mut term = z; // z^(2n+1) (-1)^n / n!
    for n in 0..200 {
        sum += term / (2 * n + 1) as f64;
        term *= -z * z / (n + 1) as f64;
        if term.abs() < 1e-30 {
            break;
        }
    }
    (sum * 2.0 / std::f64::consts::PI.sqrt()).clamp(-1.0, 1.0)
}

// ---------------------------------------------------------------------------- build checks

#[test]
fn kernels_compiled_matches_build() {
    let compiled = cuda::kernels_compiled();
    // build.rs sets XSAM_KERNELS for the package's targets and writes the generated constants;
    // all three must tell the same story.
    assert_eq!(
        compiled,
        env!("XSAM_KERNELS") == "1",
        "XSAM_KERNELS disagrees"
    );
    assert_eq!(compiled, kernels::NVCC.is_some(), "NVCC constant disagrees");
    assert_eq!(
        compiled,
        kernels::PTXAS_REPORT.is_some(),
        "PTXAS_REPORT disagrees"
    );
    if let Some(f) = kernels::FATBIN {
        assert!(f.len() > 1000, "fatbin is only {} bytes", f.len());
    }
    if std::env::var("XSAM_EXPECT_KERNELS").is_ok_and(|v| v == "1") {
        assert!(
            compiled,
            "XSAM_EXPECT_KERNELS=1 but the crate was built without kernels"
        );
    }
    println!(
        "kernels compiled: {compiled}{}",
        kernels::NVCC
            .map(|n| format!(" (nvcc {n})"))
            .unwrap_or_default()
    );
}

#[test]
fn ptxas_report_lists_every_kernel_without_spills() {
    let Some(path) = kernels::PTXAS_REPORT else {
        println!("SKIP cuda_backend::ptxas_report_lists_every_kernel_without_spills: built without kernels");
        return;
    };
    let report = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    for k in kernels::KERNEL_NAMES {
        for sm in ["sm_80", "sm_89", "sm_90"] {
            let line = format!("Compiling entry function '{k}' for '{sm}'");
            assert!(report.contains(&line), "{path} has no `{line}`");
        }
    }
    // ptxas -v prints one "N bytes stack frame, N bytes spill stores, N bytes spill loads" line per
    // function and architecture. Every one must say 0 spill stores and 0 spill loads.
    let mut entries = 0;
    let mut last_function = "?";
    for line in report.lines() {
        if let Some(f) = line.split("Function properties for ").nth(1) {
            last_function = f.trim();
        }
        if line.contains("bytes spill stores") {
            entries += 1;
            assert!(
                line.contains(" 0 bytes spill stores") && line.contains(" 0 bytes spill loads"),
                "register spills in `{last_function}`: `{}` (see {path})",
                line.trim()
            );
        }
    }
    assert!(
        entries >= kernels::KERNEL_NAMES.len() * 3,
        "only {entries} spill lines in {path}"
    );
}

// ---------------------------------------------------------------------------- GPU tests

#[test]
fn open_reports_clearly_or_works() {
    match CudaBackend::new(0) {
        Ok(b) => {
            assert!(!b.device_name().is_empty());
            let (cc_major, _) = b.compute_capability();
            assert!(cc_major >= 8, "kernels need sm_80+, device is {b:?}");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("backend cuda: "),
                "unexpected error kind: {msg}"
            );
            println!("SKIP cuda_backend::open_reports_clearly_or_works: {msg}");
            if !cuda::kernels_compiled() {
                assert!(msg.contains("built without kernels"), "{msg}");
            }
            // cuda_available() must give the same reason.
            let reason = cuda::cuda_available().expect_err("cuda_available disagrees with new()");
            assert!(msg.contains(&reason), "`{msg}` vs `{reason}`");
        }
    }
    // Out-of-range ordinals are an error, never a panic.
    assert!(CudaBackend::new(1 << 20).is_err());
}

#[test]
fn round_trip_copies() {
    let Some(b) = backend("round_trip_copies") else {
        return;
    };
    let mut rng = Rng(1);

    // Poisoning works: a fresh allocation reads back as NaN (or the NaN checks below are void).
    let p = b.alloc_tensor([3, 5], DType::F32).unwrap();
    assert!(host_f32(&b, &p).iter().all(|v| v.is_nan()));

    for &n in &[0usize, 1, 7, 1000, 65_537] {
        let v = rng.vec(n, -100.0, 100.0);
        let t = Tensor::from_f32(v.clone(), [n]).unwrap();
        let d = b.to_device(&t).unwrap();
        assert!(!d.is_host());
        assert_eq!(d.dims(), &[n]);
        let h = b.to_host(&d).unwrap();
        assert_eq!(h.f32s().unwrap(), &v[..], "f32 round trip, n={n}");

        let tb = t.to_dtype(DType::BF16).unwrap();
        let hb = b.to_host(&b.to_device(&tb).unwrap()).unwrap();
        assert_eq!(hb.dtype(), DType::BF16);
        let (x, y) = (
            tb.as_slice::<bf16>().unwrap(),
            hb.as_slice::<bf16>().unwrap(),
        );
        assert!(
            x.iter().zip(y).all(|(a, c)| a.to_bits() == c.to_bits()),
            "bf16 round trip, n={n}"
        );
    }

    // A strided host view goes up contiguous; a strided device view comes back gathered.
    let t = Tensor::from_f32((0..24).map(|x| x as f32).collect(), [2, 3, 4]).unwrap();
    let tt = t.permute(&[2, 0, 1]).unwrap();
    let d = b.to_device(&tt).unwrap();
    assert_eq!(host_f32(&b, &d), tt.to_vec_f32().unwrap());
    let dn = b.to_device(&t).unwrap().narrow(2, 1, 2).unwrap();
    assert_eq!(
        host_f32(&b, &dn),
        t.narrow(2, 1, 2).unwrap().to_vec_f32().unwrap()
    );
    let dp = b.to_device(&t).unwrap().permute(&[1, 2, 0]).unwrap();
    assert_eq!(
        host_f32(&b, &dp),
        t.permute(&[1, 2, 0]).unwrap().to_vec_f32().unwrap()
    );

    // Host-only APIs refuse device tensors with an error.
    assert!(d.to_vec_f32().is_err());
    b.synchronize().unwrap();
}

#[test]
fn layer_norm_matches_f64_reference() {
    let Some(b) = backend("layer_norm_matches_f64_reference") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(2);
    // Row lengths around the block-size boundaries (32, 1024) and the model's widths
    // (SAM 768/1024, SigLIP 1152, Phi-3 3072), odd sizes for ragged last warps.
    let shapes: &[&[usize]] = &[
        &[1, 1],
        &[3, 7],
        &[2, 32],
        &[4, 33],
        &[5, 768],
        &[2, 3, 1000],
        &[3, 1024],
        &[2, 1025],
        &[7, 1152],
        &[4, 3072],
        &[3, 4097],
        &[1, 20_000],
    ];
    for (si, &dims) in shapes.iter().enumerate() {
        let cols = *dims.last().unwrap();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        // Mean 3 with spread 1: LayerNorm must subtract the mean accurately (a one-pass
        // E[x^2]-E[x]^2 would lose ~3 digits here).
        let x = rng.vec(rows * cols, 2.0, 4.0);
        let w = rng.vec(cols, 0.5, 1.5);
        let bias = rng.vec(cols, -1.0, 1.0);
        let xd = b
            .to_device(&Tensor::from_f32(x.clone(), dims.to_vec()).unwrap())
            .unwrap();
        let wd = b
            .to_device(&Tensor::from_f32(w.clone(), [cols]).unwrap())
            .unwrap();
        let bd = b
            .to_device(&Tensor::from_f32(bias.clone(), [cols]).unwrap())
            .unwrap();

        for (case, use_w, use_b, eps) in [
            ("w+b", true, true, 1e-6f32),
            ("w", true, false, 1e-5),
            ("none", false, false, 1e-5),
        ] {
            let y = b
                .layer_norm(&xd, use_w.then_some(&wd), use_b.then_some(&bd), eps)
                .unwrap();
            assert_eq!(y.dims(), dims);
            let got = host_f32(&b, &y);
            let mut want = Vec::with_capacity(rows * cols);
            for r in 0..rows {
                want.extend(layer_norm_ref(
                    &x[r * cols..(r + 1) * cols],
                    use_w.then_some(&w[..]),
                    use_b.then_some(&bias[..]),
                    eps,
                ));
            }
            // Tolerance. The kernel sums a row in f32: each thread adds its ceil(cols/block)
            // elements (<= 20 here), then 5 + 5 shuffle levels, so the sum's relative error is at
            // most about depth * 2^-24 with depth <= 30: a worst-case mean error of
            // 30 * 6e-8 * 3 = 5.4e-6, i.e. ~9e-6 in the normalised value (std ~0.58), ~1.4e-5
            // after |w| <= 1.5. Subtracting, scaling and adding the bias add a few ulp of values
            // <= ~4. Typical errors are ~10x below the worst case. atol 3e-5 + rtol 2e-5 covers
            // the worst case and still catches any real bug (wrong mean or variance, a skipped
            // element, a wrong eps: errors >= 1e-3; NaN poison fails outright).
            par.merge(assert_close(
                &format!("layer_norm {dims:?} {case} (shape #{si})"),
                &got,
                &want,
                3e-5,
                2e-5,
            ));
        }
    }

    // Bad inputs are errors, not launches.
    let x = b
        .to_device(&Tensor::from_f32(vec![1.0; 6], [2, 3]).unwrap())
        .unwrap();
    let bad_w = b
        .to_device(&Tensor::from_f32(vec![1.0; 4], [4]).unwrap())
        .unwrap();
    assert!(b.layer_norm(&x, Some(&bad_w), None, 1e-5).is_err());
    let xh = Tensor::from_f32(vec![1.0; 6], [2, 3]).unwrap();
    assert!(
        b.layer_norm(&xh, None, None, 1e-5).is_err(),
        "host input must be refused"
    );
    let xb = b.cast(&x, DType::BF16).unwrap();
    let w3 = b
        .to_device(&Tensor::from_f32(vec![1.0; 3], [3]).unwrap())
        .unwrap();
    assert!(
        b.layer_norm(&xb, Some(&w3), None, 1e-5).is_err(),
        "a bf16 input with an f32 weight must be refused (parameters share x's dtype)"
    );
    let xh16 = b.cast(&x, DType::F16).unwrap();
    assert!(
        b.layer_norm(&xh16, None, None, 1e-5).is_err(),
        "f16 input has no kernel"
    );
    // A constant row normalises to 0 (variance 0, eps keeps it finite).
    let y = b.layer_norm(&x, None, None, 1e-5).unwrap();
    assert!(host_f32(&b, &y).iter().all(|&v| v == 0.0));
    b.synchronize().unwrap();
    par.print("layer_norm_f32");
}

#[test]
fn rms_norm_matches_f64_reference() {
    let Some(b) = backend("rms_norm_matches_f64_reference") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(3);
    for &(rows, cols) in &[(1usize, 1usize), (3, 31), (4, 3072), (2, 4097)] {
        let x = rng.vec(rows * cols, -2.0, 2.0);
        let w = rng.vec(cols, 0.5, 1.5);
        let xd = b
            .to_device(&Tensor::from_f32(x.clone(), [rows, cols]).unwrap())
            .unwrap();
        let wd = b
            .to_device(&Tensor::from_f32(w.clone(), [cols]).unwrap())
            .unwrap();
        let eps = 1e-5f32;
        let got = host_f32(&b, &b.rms_norm(&xd, Some(&wd), eps).unwrap());
        let mut want = Vec::new();
        for r in 0..rows {
            let row = &x[r * cols..(r + 1) * cols];
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            want.extend(
                row.iter()
                    .zip(&w)
                    .map(|(&v, &wc)| v as f64 * inv * wc as f64),
            );
        }
        // No mean subtraction, so only the sum of squares' rounding (~15 * 2^-24 relative) and a
        // few ulp per multiply: 1e-5 relative + 1e-6 absolute has ample margin.
        par.merge(assert_close(
            &format!("rms_norm [{rows}, {cols}]"),
            &got,
            &want,
            1e-6,
            1e-5,
        ));
    }
    par.print("rms_norm_f32");
}

#[test]
fn elementwise_kernels_match_reference() {
    let Some(b) = backend("elementwise_kernels_match_reference") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(4);
    // Sizes around the block (256) and beyond the grid cap so the grid-stride loop wraps.
    for &n in &[1usize, 255, 257, 100_003, 3_000_001] {
        let a = rng.vec(n, -6.0, 6.0);
        let c = rng.vec(n, -6.0, 6.0);
        let ad = b
            .to_device(&Tensor::from_f32(a.clone(), [n]).unwrap())
            .unwrap();
        let cd = b
            .to_device(&Tensor::from_f32(c.clone(), [n]).unwrap())
            .unwrap();

        // add: one f32 rounding, exactly what the host does.
        let got = host_f32(&b, &b.add(&ad, &cd).unwrap());
        let want: Vec<f32> = a.iter().zip(&c).map(|(x, y)| x + y).collect();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(g, w)| g.to_bits() == w.to_bits()),
            "add_f32 not bit-exact, n={n}"
        );

        // gelu (erf form) vs f64; erff is within 2 ulp, so a few ulp of results <= 6.
        let got = host_f32(&b, &b.gelu_erf(&ad).unwrap());
        let want: Vec<f64> = a
            .iter()
            .map(|&x| {
                let x = x as f64;
                0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2))
            })
            .collect();
        par.merge(assert_close(
            &format!("gelu_erf n={n}"),
            &got,
            &want,
            1e-6,
            1e-6,
        ));

        // casts: bit-exact against half's round-to-nearest-even.
        let bd = b.cast(&ad, DType::BF16).unwrap();
        assert_eq!(bd.dtype(), DType::BF16);
        let hb = b.to_host(&bd).unwrap();
        let got = hb.as_slice::<bf16>().unwrap();
        assert!(
            a.iter()
                .zip(got)
                .all(|(&x, g)| bf16::from_f32(x).to_bits() == g.to_bits()),
            "cast_f32_bf16 differs from bf16::from_f32, n={n}"
        );
        let back = host_f32(&b, &b.cast(&bd, DType::F32).unwrap());
        assert!(got
            .iter()
            .zip(&back)
            .all(|(g, &f)| g.to_f32().to_bits() == f.to_bits()));
    }

    // Rounding edge cases: ties to even, subnormals, infinities, the largest finite values.
    let special: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0 + 2f32.powi(-8),       // exact tie between 1 and 1 + 2^-7 -> 1 (even)
        1.0 + 3.0 * 2f32.powi(-8), // tie between 1 + 2^-7 and 1 + 2^-6 -> 1 + 2^-6 (even)
        1.0 + 2f32.powi(-8) + 2f32.powi(-20), // just above the tie -> up
        f32::MIN_POSITIVE,
        f32::MIN_POSITIVE / 3.0,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3.4e38,
        1e-45,
    ];
    let d = b
        .to_device(&Tensor::from_f32(special.clone(), [special.len()]).unwrap())
        .unwrap();
    let got = b.to_host(&b.cast(&d, DType::BF16).unwrap()).unwrap();
    for (x, g) in special.iter().zip(got.as_slice::<bf16>().unwrap()) {
        assert_eq!(bf16::from_f32(*x).to_bits(), g.to_bits(), "cast of {x:e}");
    }
    b.synchronize().unwrap();
    par.print("gelu_erf_f32");
}
