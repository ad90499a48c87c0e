//! Attention kernels (kernels/flash_attn.cu, masked_attn.cu, paged_attn.cu) against the CPU
//! backend.
//!
//! Three kinds of tests:
//! - Build checks that run everywhere: every attention kernel is in the ptxas report for sm_80,
//!   sm_89 and sm_90 without register spills (registers printed).
//! - Host emulation that runs everywhere a C++ compiler and the CUDA headers are found: the kernels'
//!   CUDA source compiled for the SIMT emulator in tools/kernel-emu and run against a double
//!   reference (indexing, masking, pipelining, fragment layouts; no GPU involved).
//! - GPU tests against the CPU backend (`cpu::attention`, `kv::attention::paged_attention`,
//!   `cpu::resize_bilinear`). Without a driver, a device or compiled kernels they print
//!   `SKIP cuda_attention::<test>: <reason>` and pass; `XSAM_REQUIRE_GPU=1` turns skips into
//!   failures.
//!
//! Inputs are rounded to bf16 once and both sides compute from the same rounded values (the CPU in
//! f32 from their f32 widening), so differences come only from the kernels' own arithmetic:
//! - P (the softmax weights) is rounded to bf16 before P·V on the tensor cores: each weight is off
//!   by at most 2^-8 relative (bf16 keeps 8 significant bits), so the output moves by at most
//!   2^-8 * max|v| (all roundings in one direction; typically far less as they are random);
//! - the output is rounded to bf16: at most 2^-8 relative;
//! - f32 accumulation and exp2f: ~1e-6 relative, negligible here.
//!
//! With values in [-1, 1]: |err| <= 6e-3 + 8e-3 * |want| (BF16_ATOL, BF16_RTOL) covers the worst
//! case with margin, while a wrong key, a missed mask, a wrong bias term or a wrong row is O(0.1)
//! or more, and an element the kernel never wrote is NaN (outputs are allocated poisoned) which
//! fails every comparison. Decode keeps P in f32, so only the output rounding is left (tighter).

mod gpu;

use std::path::{Path, PathBuf};
use xsam::backend::cpu::{self, AttnMask};
use xsam::backend::cuda::{self, block_table_i32, kernels, CudaBackend, FlashMask};
use xsam::kv::{attention::paged_attention, KvConfig, PagedKvCache};
use xsam::{DType, Tensor};

const BF16_ATOL: f64 = 6e-3;
const BF16_RTOL: f64 = 8e-3;
/// Decode: P stays f32, only the bf16 output rounding (2^-8 relative, < 2^-8 absolute for |o| <= 1).
const DECODE_ATOL: f64 = 3e-3;
const DECODE_RTOL: f64 = 5e-3;

// ---------------------------------------------------------------------------- helpers

fn backend(test: &str) -> Option<CudaBackend> {
    gpu::backend("cuda_attention", test)
}

use gpu::Rng;

/// A bf16 device tensor holding `v` (already bf16-exact).
fn dev_bf16(b: &CudaBackend, v: &[f32], shape: &[usize]) -> Tensor {
    let t = Tensor::from_f32(v.to_vec(), shape.to_vec())
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    b.to_device(&t).unwrap()
}

fn host_f32(b: &CudaBackend, t: &Tensor) -> Vec<f32> {
    b.to_host(t).unwrap().to_vec_f32().unwrap()
}

/// |got - want| <= atol + rtol * |want| everywhere; NaN or inf in `got` fails (never passes).
/// Returns the worst errors, for the PARITY line.
fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f64, rtol: f64) -> gpu::Parity {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    let mut par = gpu::Parity::default();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w as f64).abs();
        let tol = atol + rtol * (w as f64).abs();
        assert!(
            g.is_finite() && err <= tol,
            "{what}: element {i}: got {g}, want {w} (|err| {err:e} > tol {tol:e}); NaN means the \
             kernel did not write it"
        );
        par.add(g as f64, w as f64);
        if err / tol > worst.1 {
            worst = (i, err / tol);
        }
    }
    println!("  {what}: max |err|/tol = {:.3} at {}", worst.1, worst.0);
    par
}

/// CPU reference: `cpu::attention` on f32 data.
#[allow(clippy::too_many_arguments)]
fn cpu_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tq: usize,
    tk: usize,
    heads: usize,
    hd: usize,
    scale: f32,
    mask: AttnMask,
) -> Vec<f32> {
    let mut out = vec![0f32; tq * heads * hd];
    cpu::attention(q, k, v, tq, tk, heads, hd, hd, scale, mask, None, &mut out).unwrap();
    out
}

/// K/V with `kv_heads` heads expanded to `heads` (the CPU attention has no grouped heads).
fn expand_kv(x: &[f32], t: usize, kv_heads: usize, heads: usize, hd: usize) -> Vec<f32> {
    let g = heads / kv_heads;
    let mut out = Vec::with_capacity(t * heads * hd);
    for r in 0..t {
        for h in 0..heads {
            let src = (r * kv_heads + h / g) * hd;
            out.extend_from_slice(&x[src..src + hd]);
        }
    }
    out
}

// ---------------------------------------------------------------------------- build checks

#[test]
fn attention_kernels_compile_without_spills() {
    let Some(path) = kernels::PTXAS_REPORT else {
        println!(
            "SKIP cuda_attention::attention_kernels_compile_without_spills: built without kernels"
        );
        return;
    };
    let report = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    for k in cuda::ATTENTION_KERNELS {
        for sm in ["sm_80", "sm_89", "sm_90"] {
            let head = format!("Compiling entry function '{k}' for '{sm}'");
            let at = report
                .find(&head)
                .unwrap_or_else(|| panic!("{path} has no `{head}`"));
            // The entry's block ends at the next "Compiling entry function".
            let rest = &report[at + head.len()..];
            let block = &rest[..rest.find("Compiling entry function").unwrap_or(rest.len())];
            let spill = block
                .lines()
                .find(|l| l.contains("bytes spill stores"))
                .unwrap_or_else(|| panic!("no spill line for {k} on {sm}"));
            assert!(
                spill.contains(" 0 bytes spill stores") && spill.contains(" 0 bytes spill loads"),
                "register spills in {k} on {sm}: {}",
                spill.trim()
            );
            let regs = block
                .lines()
                .find_map(|l| l.split("Used ").nth(1))
                .and_then(|s| s.split(' ').next())
                .unwrap_or("?");
            println!("  {k:32} {sm}: {regs:>3} registers, no spills");
        }
    }
}

/// The CUDA include directory of the toolkit that built the kernels (for the emulator).
fn cuda_include() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("CUDA_INCLUDE") {
        candidates.push(PathBuf::from(dir));
    }
    if let Some(nvcc) = kernels::NVCC {
        if let Some(root) = Path::new(nvcc).parent().and_then(Path::parent) {
            candidates.push(root.join("include"));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-cuda/cuda/include"));
    candidates
        .into_iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
}

#[test]
fn kernels_pass_host_emulation() {
    const T: &str = "kernels_pass_host_emulation";
    let Some(inc) = cuda_include() else {
        println!("SKIP cuda_attention::{T}: no CUDA headers (cuda_bf16.h) found");
        return;
    };
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    if std::process::Command::new(&cxx)
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP cuda_attention::{T}: no C++ compiler (`{cxx}`)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("attn_emu");
    let out = std::process::Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-DXSAM_EMU", "-ffp-contract=off", "-I"])
        .arg(root.join("tools/kernel-emu"))
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-I")
        .arg(&inc)
        .arg(root.join("tools/kernel-emu/attn_emu.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the emulator failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --quick leaves out the 64x64 global SAM case (about a minute in the emulator).
    let run = std::process::Command::new(&exe)
        .arg("--quick")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stdout);
    println!("{log}{}", String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "emulated kernels failed (see above)");
    assert!(log.contains("PASSED"), "no PASSED line");
}

// ---------------------------------------------------------------------------- flash attention

struct DenseCase {
    hd: usize,
    heads: usize,
    kv_heads: usize,
    tq: usize,
    tk: usize,
    mask: FlashMask,
    splits: Option<usize>,
}

#[test]
fn flash_attention_matches_cpu() {
    let Some(b) = backend("flash_attention_matches_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(11);
    let causal = |window, q_offset| FlashMask::Causal { window, q_offset };
    let cases = [
        // Tiny and ragged (tiles of 64 keys, 64 or 128 queries).
        DenseCase {
            hd: 64,
            heads: 2,
            kv_heads: 2,
            tq: 1,
            tk: 1,
            mask: FlashMask::None,
            splits: None,
        },
        DenseCase {
            hd: 64,
            heads: 4,
            kv_heads: 2,
            tq: 130,
            tk: 77,
            mask: FlashMask::None,
            splits: None,
        },
        DenseCase {
            hd: 64,
            heads: 3,
            kv_heads: 3,
            tq: 129,
            tk: 300,
            mask: FlashMask::None,
            splits: Some(3),
        },
        // SigLIP: 729 tokens, 16 heads of 72 (k-dim padded to 80 in the kernel).
        DenseCase {
            hd: 72,
            heads: 16,
            kv_heads: 16,
            tq: 729,
            tk: 729,
            mask: FlashMask::None,
            splits: None,
        },
        DenseCase {
            hd: 72,
            heads: 3,
            kv_heads: 3,
            tq: 65,
            tk: 130,
            mask: FlashMask::None,
            splits: Some(2),
        },
        // Phi-3: causal, windows crossed, query offsets (suffix after a prefix), GQA, splits.
        DenseCase {
            hd: 96,
            heads: 4,
            kv_heads: 4,
            tq: 257,
            tk: 257,
            mask: causal(None, 0),
            splits: None,
        },
        DenseCase {
            hd: 96,
            heads: 2,
            kv_heads: 2,
            tq: 300,
            tk: 300,
            mask: causal(Some(100), 0),
            splits: None,
        },
        DenseCase {
            hd: 96,
            heads: 2,
            kv_heads: 1,
            tq: 37,
            tk: 237,
            mask: causal(Some(150), 200),
            splits: Some(2),
        },
        DenseCase {
            hd: 96,
            heads: 4,
            kv_heads: 4,
            tq: 2100,
            tk: 2100,
            mask: causal(Some(2047), 0),
            splits: None,
        },
    ];
    for (ci, c) in cases.iter().enumerate() {
        let (qd, kd) = (c.heads * c.hd, c.kv_heads * c.hd);
        let q = rng.bf16_vec(c.tq * qd, -1.0, 1.0);
        let k = rng.bf16_vec(c.tk * kd, -1.0, 1.0);
        let v = rng.bf16_vec(c.tk * kd, -1.0, 1.0);
        let scale = 1.0 / (c.hd as f32).sqrt();
        let got = b
            .flash_attention(
                &dev_bf16(&b, &q, &[c.tq, qd]),
                &dev_bf16(&b, &k, &[c.tk, kd]),
                &dev_bf16(&b, &v, &[c.tk, kd]),
                c.heads,
                c.kv_heads,
                scale,
                c.mask,
                c.splits,
            )
            .unwrap();
        assert_eq!(got.dims(), &[c.tq, qd]);
        let mask = match c.mask {
            FlashMask::None => AttnMask::None,
            FlashMask::Causal { window, q_offset } => AttnMask::Causal { window, q_offset },
        };
        let (ke, ve) = (
            expand_kv(&k, c.tk, c.kv_heads, c.heads, c.hd),
            expand_kv(&v, c.tk, c.kv_heads, c.heads, c.hd),
        );
        let want = cpu_attention(&q, &ke, &ve, c.tq, c.tk, c.heads, c.hd, scale, mask);
        par.merge(assert_close(
            &format!(
                "case {ci}: hd {} heads {}/{} tq {} tk {} {:?} splits {:?}",
                c.hd, c.heads, c.kv_heads, c.tq, c.tk, c.mask, c.splits
            ),
            &host_f32(&b, &got),
            &want,
            BF16_ATOL,
            BF16_RTOL,
        ));
    }
    b.synchronize().unwrap();
    par.print("flash_attention");
}

#[test]
fn flash_attention_reads_column_slices_of_a_fused_projection() {
    let Some(b) = backend("flash_attention_reads_column_slices_of_a_fused_projection") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(12);
    // Phi-3's qkv_proj output [T, 3C] sliced into q, k, v without copies.
    let (t, heads, hd) = (150, 4, 96);
    let c = heads * hd;
    let qkv = rng.bf16_vec(t * 3 * c, -1.0, 1.0);
    let d = dev_bf16(&b, &qkv, &[t, 3 * c]);
    let (q, k, v) = (
        d.narrow(1, 0, c).unwrap(),
        d.narrow(1, c, c).unwrap(),
        d.narrow(1, 2 * c, c).unwrap(),
    );
    let mask = FlashMask::Causal {
        window: Some(64),
        q_offset: 0,
    };
    let got = b
        .flash_attention(&q, &k, &v, heads, heads, 0.1, mask, None)
        .unwrap();
    let col = |o: usize| -> Vec<f32> {
        qkv.chunks(3 * c)
            .flat_map(|r| r[o..o + c].to_vec())
            .collect()
    };
    let want = cpu_attention(
        &col(0),
        &col(c),
        &col(2 * c),
        t,
        t,
        heads,
        hd,
        0.1,
        AttnMask::Causal {
            window: Some(64),
            q_offset: 0,
        },
    );
    par.merge(assert_close(
        "strided q/k/v",
        &host_f32(&b, &got),
        &want,
        BF16_ATOL,
        BF16_RTOL,
    ));

    // Refused: host tensors, f32, a head dim without a kernel, misaligned rows.
    let hq = Tensor::from_f32(vec![0.0; 64 * 2], [2, 64]).unwrap();
    assert!(b
        .flash_attention(&hq, &hq, &hq, 1, 1, 1.0, FlashMask::None, None)
        .is_err());
    let f = b.to_device(&hq).unwrap();
    assert!(b
        .flash_attention(&f, &f, &f, 1, 1, 1.0, FlashMask::None, None)
        .is_err());
    let x = dev_bf16(&b, &vec![0.0; 2 * 48], &[2, 48]);
    assert!(b
        .flash_attention(&x, &x, &x, 1, 1, 1.0, FlashMask::None, None)
        .is_err());
    let y = dev_bf16(&b, &vec![0.0; 2 * 80], &[2, 80])
        .narrow(1, 4, 64)
        .unwrap();
    assert!(b
        .flash_attention(&y, &y, &y, 1, 1, 1.0, FlashMask::None, None)
        .is_err());
    let z = dev_bf16(&b, &vec![0.0; 2 * 64], &[2, 64]);
    let zero_window = FlashMask::Causal {
        window: Some(0),
        q_offset: 0,
    };
    assert!(b
        .flash_attention(&z, &z, &z, 1, 1, 1.0, zero_window, None)
        .is_err());
    b.synchronize().unwrap();
    par.print("flash_attention_strided");
}

// ---------------------------------------------------------------------------- SAM

/// The reference model's SAM attention for one grid: zero-pad to whole windows before the qkv
/// linear (so a padded position's q/k/v are the bias), attend inside each window with the
/// decomposed relative-position bias from the unscaled q, crop. `qkv` is [H*W, 3C] rows.
#[allow(clippy::too_many_arguments)]
fn sam_reference(
    qkv: &[f32],
    bias: &[f32],
    rel_h: &[f32],
    rel_w: &[f32],
    (gh, gw): (usize, usize),
    heads: usize,
    k: usize,
    scale: f32,
) -> Vec<f32> {
    const HD: usize = 64;
    let c = heads * HD;
    let mut out = vec![0f32; gh * gw * c];
    let n = k * k;
    for wy in 0..gh.div_ceil(k) {
        for wx in 0..gw.div_ceil(k) {
            let (mut q, mut kk, mut v) = (vec![0f32; n * c], vec![0f32; n * c], vec![0f32; n * c]);
            for t in 0..n {
                let (y, x) = (wy * k + t / k, wx * k + t % k);
                let row = if y < gh && x < gw {
                    &qkv[(y * gw + x) * 3 * c..(y * gw + x + 1) * 3 * c]
                } else {
                    bias
                };
                q[t * c..(t + 1) * c].copy_from_slice(&row[..c]);
                kk[t * c..(t + 1) * c].copy_from_slice(&row[c..2 * c]);
                v[t * c..(t + 1) * c].copy_from_slice(&row[2 * c..]);
            }
            let qr = &q;
            let bias_fn = move |h: usize, i: usize, j0: usize, row: &mut [f32]| {
                let qi = &qr[i * c + h * HD..i * c + (h + 1) * HD];
                let dot = |t: &[f32], r: usize| -> f32 {
                    qi.iter()
                        .zip(&t[r * HD..(r + 1) * HD])
                        .map(|(a, b)| a * b)
                        .sum()
                };
                let (hq, wq) = (i / k, i % k);
                for (jj, x) in row.iter_mut().enumerate() {
                    let j = j0 + jj;
                    let (hk, wk) = (j / k, j % k);
                    *x += dot(rel_h, hq + k - 1 - hk) + dot(rel_w, wq + k - 1 - wk);
                }
            };
            let mut o = vec![0f32; n * c];
            cpu::attention(
                &q,
                &kk,
                &v,
                n,
                n,
                heads,
                HD,
                HD,
                scale,
                AttnMask::None,
                Some(&bias_fn),
                &mut o,
            )
            .unwrap();
            for t in 0..n {
                let (y, x) = (wy * k + t / k, wx * k + t % k);
                if y < gh && x < gw {
                    out[(y * gw + x) * c..(y * gw + x + 1) * c]
                        .copy_from_slice(&o[t * c..(t + 1) * c]);
                }
            }
        }
    }
    out
}

#[test]
fn sam_attention_matches_cpu() {
    let Some(b) = backend("sam_attention_matches_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(13);
    // (grid, heads, window): SAM-L windowed (64 = 4*14 + 8: padded edge windows), a ragged grid,
    // a grid smaller than one window, global attention at SAM-L's size and a smaller one.
    let cases = [
        ((64, 64), 16, 14),
        ((20, 27), 2, 14),
        ((9, 9), 1, 14),
        ((64, 64), 2, 64),
        ((30, 30), 3, 30),
    ];
    for ((gh, gw), heads, k) in cases {
        let c = heads * 64;
        let qkv = rng.bf16_vec(gh * gw * 3 * c, -1.0, 1.0);
        let bias = rng.bf16_vec(3 * c, -1.0, 1.0);
        let rel_h = rng.bf16_vec((2 * k - 1) * 64, -0.5, 0.5);
        let rel_w = rng.bf16_vec((2 * k - 1) * 64, -0.5, 0.5);
        let got = b
            .sam_attention(
                &dev_bf16(&b, &qkv, &[gh, gw, 3 * c]),
                &dev_bf16(&b, &bias, &[3 * c]),
                &dev_bf16(&b, &rel_h, &[2 * k - 1, 64]),
                &dev_bf16(&b, &rel_w, &[2 * k - 1, 64]),
                (gh, gw),
                heads,
                k,
                0.125,
            )
            .unwrap();
        assert_eq!(got.dims(), &[gh * gw, c]);
        let want = sam_reference(&qkv, &bias, &rel_h, &rel_w, (gh, gw), heads, k, 0.125);
        par.merge(assert_close(
            &format!("sam grid {gh}x{gw} heads {heads} window {k}"),
            &host_f32(&b, &got),
            &want,
            BF16_ATOL,
            BF16_RTOL,
        ));
    }
    // Bad geometry is an error.
    let z = dev_bf16(&b, &vec![0.0; 4 * 192], &[4, 192]);
    let bias = dev_bf16(&b, &vec![0.0; 192], &[192]);
    let r = dev_bf16(&b, &vec![0.0; 3 * 64], &[3, 64]);
    assert!(b
        .sam_attention(&z, &bias, &r, &r, (2, 2), 1, 2, 0.125)
        .is_ok());
    assert!(b
        .sam_attention(&z, &bias, &r, &r, (2, 3), 1, 2, 0.125)
        .is_err());
    assert!(b
        .sam_attention(&z, &bias, &r, &r, (2, 2), 1, 3, 0.125)
        .is_err());
    b.synchronize().unwrap();
    par.print("sam_attention");
}

// ---------------------------------------------------------------------------- masked attention

/// CPU keep mask: `cpu::resize_bilinear` (align_corners=False) then torch's `!(sigmoid < 0.5)`;
/// fully blocked rows are left blocked (cpu::attention unblocks them itself).
fn cpu_keep(logits: &[f32], nq: usize, hs: usize, ws: usize, ht: usize, wt: usize) -> Vec<bool> {
    let mut r = vec![0f32; nq * ht * wt];
    cpu::resize_bilinear(logits, nq, hs, ws, ht, wt, false, &mut r).unwrap();
    r.iter()
        .map(|&v| {
            // torch blocks where sigmoid < 0.5 (so a NaN logit is kept).
            let sig = 1.0 / (1.0 + (-v).exp());
            sig.partial_cmp(&0.5f32) != Some(std::cmp::Ordering::Less)
        })
        .collect()
}

#[test]
fn masked_attention_matches_cpu() {
    let Some(b) = backend("masked_attention_matches_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(14);
    let (heads, hd) = (8, 32);
    let width = heads * hd;
    // Mask2Former: 200 queries, previous mask logits at 128^2 resized to each level (32^2, 64^2,
    // 128^2: identity), plus ragged sizes and f32 logits.
    let cases = [
        (200, (128, 128), (32, 32), DType::BF16, None),
        (200, (128, 128), (64, 64), DType::BF16, None),
        (200, (128, 128), (128, 128), DType::BF16, None),
        (37, (20, 13), (9, 31), DType::F32, Some(3)),
        (129, (16, 16), (16, 16), DType::F32, Some(1)),
    ];
    for (nq, (hs, ws), (ht, wt), ldt, splits) in cases {
        let tk = ht * wt;
        let mut lg = rng.bf16_vec(nq * hs * ws, -4.0, 3.0);
        // Query 3 blocked everywhere (must see every key), query 5 keeps everything.
        for e in 0..hs * ws {
            lg[3 * hs * ws + e] = -0.75;
            lg[5 * hs * ws + e] = 0.5;
        }
        let lt = Tensor::from_f32(lg.clone(), [nq, hs, ws])
            .unwrap()
            .to_dtype(ldt)
            .unwrap();
        let bits = b
            .attention_mask_bits(&b.to_device(&lt).unwrap(), (ht, wt))
            .unwrap();
        assert_eq!((bits.rows(), bits.keys()), (nq, tk));
        // Bits: exactly the CPU's resize + threshold (same f32 operation order), with fully
        // blocked rows unblocked and nothing past the last key.
        let keep = cpu_keep(&lg, nq, hs, ws, ht, wt);
        let words = bits.words_per_row();
        let host_bits = b.mask_bits_to_host(&bits).unwrap();
        for qi in 0..nq {
            let row = &keep[qi * tk..(qi + 1) * tk];
            let any = row.iter().any(|&x| x);
            for j in 0..words * 32 {
                let want = j < tk && (!any || row[j]);
                let got = host_bits[qi * words + j / 32] >> (j % 32) & 1 == 1;
                assert_eq!(
                    got, want,
                    "mask bit query {qi} key {j} ({hs}x{ws} -> {ht}x{wt})"
                );
            }
        }
        assert!(
            keep[3 * tk..4 * tk].iter().all(|&x| !x),
            "query 3 should be fully blocked"
        );

        let q = rng.bf16_vec(nq * width, -1.0, 1.0);
        let k = rng.bf16_vec(tk * width, -1.0, 1.0);
        let v = rng.bf16_vec(tk * width, -1.0, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let got = b
            .masked_attention(
                &dev_bf16(&b, &q, &[nq, width]),
                &dev_bf16(&b, &k, &[tk, width]),
                &dev_bf16(&b, &v, &[tk, width]),
                &bits,
                heads,
                scale,
                splits,
            )
            .unwrap();
        let want = cpu_attention(&q, &k, &v, nq, tk, heads, hd, scale, AttnMask::Keep(&keep));
        par.merge(assert_close(
            &format!("masked nq {nq} {hs}x{ws} -> {ht}x{wt} {ldt} splits {splits:?}"),
            &host_f32(&b, &got),
            &want,
            BF16_ATOL,
            BF16_RTOL,
        ));
    }
    b.synchronize().unwrap();
    par.print("masked_attention");
    // The bits were compared exactly (assert_eq above): zero error.
    gpu::Parity::default().print("attention_mask_bits");
}

// ---------------------------------------------------------------------------- paged KV

/// A CPU cache and a device pool kept in step: the CPU side does the bookkeeping (blocks, fork,
/// copy on write, sliding-window release) and holds f32 copies of the same bf16 values.
struct Mirror {
    cpu: PagedKvCache,
    gpu: cuda::DevicePagedKv,
}

impl Mirror {
    fn new(b: &CudaBackend, cfg: KvConfig, head_dim: usize) -> Self {
        Mirror {
            cpu: PagedKvCache::new(cfg).unwrap(),
            gpu: b.alloc_paged_kv(cfg, head_dim).unwrap(),
        }
    }

    /// Appends `n` tokens of random K/V (every layer) to `s` on both sides.
    fn append(&mut self, b: &CudaBackend, rng: &mut Rng, s: xsam::kv::SeqId, n: usize) {
        let bs = self.cpu.config().block_size;
        let kv_dim = self.cpu.config().kv_dim;
        let before = block_table_i32(self.cpu.block_table(s).unwrap());
        let pos0 = self.cpu.len(s).unwrap();
        self.cpu.append(s, n).unwrap();
        let after = block_table_i32(self.cpu.block_table(s).unwrap());
        // Copy on write: a replaced last block is copied on the device too.
        if let (Some(&old), Some(&new)) = (before.last(), after.get(before.len().wrapping_sub(1))) {
            if old != new && old >= 0 {
                b.kv_copy_block(&mut self.gpu, old as usize, new as usize)
                    .unwrap();
            }
        }
        let slots: Vec<i32> = (pos0..pos0 + n)
            .map(|p| after[p / bs] * bs as i32 + (p % bs) as i32)
            .collect();
        for layer in 0..self.cpu.config().num_layers {
            let k = rng.bf16_vec(n * kv_dim, -1.0, 1.0);
            let v = rng.bf16_vec(n * kv_dim, -1.0, 1.0);
            self.cpu.write_rows(s, layer, pos0, &k, &v).unwrap();
            b.kv_append(
                &mut self.gpu,
                layer,
                &dev_bf16(b, &k, &[n, kv_dim]),
                &dev_bf16(b, &v, &[n, kv_dim]),
                &b.upload_index(&slots).unwrap(),
            )
            .unwrap();
        }
    }
}

#[test]
fn kv_append_writes_the_documented_layout() {
    let Some(b) = backend("kv_append_writes_the_documented_layout") else {
        return;
    };
    let mut rng = Rng(15);
    let cfg = KvConfig {
        num_layers: 3,
        kv_dim: 2 * 96,
        block_size: 16,
        num_blocks: 5,
    };
    let mut m = Mirror::new(&b, cfg, 96);
    let s = m.cpu.new_sequence();
    m.append(&b, &mut rng, s, 37);
    let (kp, vp) = b.paged_kv_to_host(&m.gpu).unwrap();
    let table = m.cpu.block_table(s).unwrap().to_vec();
    let (hd, kvh, bs) = (96, 2, 16);
    for layer in 0..3 {
        for (blk, id) in table.iter().enumerate() {
            let id = id.unwrap() as usize;
            let (ck, cv) = m.cpu.block(id as u32, layer);
            for slot in 0..bs.min(37 - blk * bs) {
                for h in 0..kvh {
                    for d in 0..hd {
                        // Device: [block][layer][kv_head][slot][dim]; CPU: [block][layer][slot][kv_dim].
                        let at = ((id * 3 + layer) * kvh * bs + h * bs + slot) * hd + d;
                        let cpu_at = slot * kvh * hd + h * hd + d;
                        assert_eq!(
                            kp[at].to_f32(),
                            ck[cpu_at],
                            "K layer {layer} block {id} slot {slot}"
                        );
                        assert_eq!(
                            vp[at].to_f32(),
                            cv[cpu_at],
                            "V layer {layer} block {id} slot {slot}"
                        );
                    }
                }
            }
        }
    }
    // Out-of-pool or repeated slots are refused.
    let k = dev_bf16(&b, &vec![0.0; 2 * 192], &[2, 192]);
    let idx = |v: &[i32]| b.upload_index(v).unwrap();
    assert!(b
        .kv_append(&mut m.gpu, 0, &k, &k, &idx(&[5 * 16, 0]))
        .is_err());
    assert!(b.kv_append(&mut m.gpu, 0, &k, &k, &idx(&[3, 3])).is_err());
    assert!(b.kv_append(&mut m.gpu, 3, &k, &k, &idx(&[3, 4])).is_err());
    assert!(b.kv_append(&mut m.gpu, 0, &k, &k, &idx(&[3])).is_err());
    b.synchronize().unwrap();
    // Every stored value was compared exactly (assert_eq above): zero error.
    gpu::Parity::default().print("kv_append");
}

#[test]
fn paged_decode_matches_cpu() {
    let Some(b) = backend("paged_decode_matches_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(16);
    // (head_dim, heads, kv_heads, window): Phi-3 (96, MHA), grouped heads at 64 and 128.
    for (hd, heads, kv_heads, window) in [
        (96, 4, 4, Some(100)),
        (96, 4, 4, None),
        (64, 8, 4, Some(45)),
        (128, 2, 1, None),
    ] {
        let cfg = KvConfig {
            num_layers: 2,
            kv_dim: kv_heads * hd,
            block_size: 16,
            num_blocks: 64,
        };
        let mut m = Mirror::new(&b, cfg, hd);
        let s = m.cpu.new_sequence();
        m.append(&b, &mut rng, s, 203); // partly filled last block
        let scale = 1.0 / (hd as f32).sqrt();
        let mut check = |m: &mut Mirror, rng: &mut Rng, s, label: &str| {
            let len = m.cpu.len(s).unwrap();
            let pos0 = len - 1;
            let q = rng.bf16_vec(heads * hd, -1.0, 1.0);
            let table = b
                .upload_index(&block_table_i32(m.cpu.block_table(s).unwrap()))
                .unwrap();
            for split_len in [None, Some(16), Some(48), Some(10_000)] {
                for layer in 0..2 {
                    let got = b
                        .paged_decode(
                            &m.gpu,
                            layer,
                            &dev_bf16(&b, &q, &[1, heads * hd]),
                            &table,
                            pos0,
                            heads,
                            scale,
                            window,
                            split_len,
                        )
                        .unwrap();
                    let mut want = vec![0f32; heads * hd];
                    paged_attention(
                        &m.cpu, s, layer, &q, pos0, heads, hd, scale, window, &mut want,
                    )
                    .unwrap();
                    par.merge(assert_close(
                        &format!(
                            "decode {label} hd {hd} heads {heads}/{kv_heads} len {len} window \
                             {window:?} split {split_len:?} layer {layer}"
                        ),
                        &host_f32(&b, &got),
                        &want,
                        DECODE_ATOL,
                        DECODE_RTOL,
                    ));
                }
            }
        };
        check(&mut m, &mut rng, s, "prefix");
        // Decode steps crossing the window, releasing blocks that fall out of it.
        for _ in 0..3 {
            m.append(&b, &mut rng, s, 1);
            if let Some(w) = window {
                let len = m.cpu.len(s).unwrap();
                m.cpu.release_before(s, len.saturating_sub(w)).unwrap();
            }
            check(&mut m, &mut rng, s, "step");
        }
        // A fork shares the prefix; its first append copies the shared partial block.
        let f = m.cpu.fork(s).unwrap();
        m.append(&b, &mut rng, f, 1);
        m.append(&b, &mut rng, s, 1);
        check(&mut m, &mut rng, f, "fork");
        check(&mut m, &mut rng, s, "parent");
        m.cpu.check_consistency().unwrap();
    }
    b.synchronize().unwrap();
    par.print("paged_decode");
}

#[test]
fn paged_prefill_matches_cpu() {
    let Some(b) = backend("paged_prefill_matches_cpu") else {
        return;
    };
    let mut par = gpu::Parity::default();
    let mut rng = Rng(17);
    let (hd, heads) = (96, 4);
    for (prefix, suffix, window) in [(200, 37, None), (300, 70, Some(120)), (5, 3, None)] {
        let cfg = KvConfig {
            num_layers: 1,
            kv_dim: heads * hd,
            block_size: 16,
            num_blocks: 40,
        };
        let mut m = Mirror::new(&b, cfg, hd);
        let s = m.cpu.new_sequence();
        m.append(&b, &mut rng, s, prefix);
        m.append(&b, &mut rng, s, suffix);
        if let Some(w) = window {
            m.cpu
                .release_before(s, (prefix + 1).saturating_sub(w))
                .unwrap();
        }
        let table = b
            .upload_index(&block_table_i32(m.cpu.block_table(s).unwrap()))
            .unwrap();
        let q = rng.bf16_vec(suffix * heads * hd, -1.0, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let got = b
            .paged_prefill(
                &m.gpu,
                0,
                &dev_bf16(&b, &q, &[suffix, heads * hd]),
                &table,
                prefix,
                heads,
                scale,
                window,
            )
            .unwrap();
        let mut want = vec![0f32; suffix * heads * hd];
        paged_attention(
            &m.cpu, s, 0, &q, prefix, heads, hd, scale, window, &mut want,
        )
        .unwrap();
        par.merge(assert_close(
            &format!("paged prefill prefix {prefix} suffix {suffix} window {window:?}"),
            &host_f32(&b, &got),
            &want,
            BF16_ATOL,
            BF16_RTOL,
        ));
        // A query that needs a released block is an error, not a read of freed memory.
        if window.is_some() {
            let all = b.paged_prefill(
                &m.gpu,
                0,
                &dev_bf16(&b, &vec![0.0; 2 * heads * hd], &[2, heads * hd]),
                &table,
                0,
                heads,
                scale,
                window,
            );
            assert!(all.is_err(), "released blocks must be refused");
        }
    }
    b.synchronize().unwrap();
    par.print("paged_prefill");
}
