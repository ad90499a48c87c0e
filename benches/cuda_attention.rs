//! Attention kernels at X-SAM's real shapes on the GPU: achieved TFLOP/s (prefill, masked) and
//! GB/s (decode), timed with CUDA events on the backend's stream (criterion's `iter_custom`), then
//! a summary table (median and p90 over single-launch event timings, achieved rate, the card's
//! ceiling, ratio).
//!
//! Ceilings: bandwidth is measured here (device-to-device copy of 1 GiB, read + write bytes);
//! the bf16 GEMM rate is not measured by this bench (no cuBLAS path yet): pass the card's measured
//! rate as `XSAM_BF16_GEMM_TFLOPS=<n>` to get a ratio, otherwise the column says "-".
//!
//! Without a GPU (or without compiled kernels) it prints one SKIP line and exits successfully.
//!
//! FLOP counts are the model's: 4·d per (query, key) pair that the reference computes (Q·Kᵀ and
//! P·V, 2 FLOPs per multiply-add), all heads; windows count their zero padding (the reference
//! computes it too); causal counts only visible pairs; masked counts every pair (the mask only
//! changes the softmax). Decode bytes are the K and V rows read for every head plus q and out.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use half::bf16;
use std::time::Duration;
use xsam::backend::cuda::{block_table_i32, CudaBackend, FlashMask};
use xsam::kv::{KvConfig, PagedKvCache};
use xsam::Tensor;

fn rand_bf16(b: &CudaBackend, n: usize, seed: u64, shape: &[usize]) -> Tensor {
    let mut s = seed;
    let v: Vec<bf16> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect();
    b.to_device(&Tensor::from_vec(v, shape.to_vec()).unwrap())
        .unwrap()
}

/// One benchmarked operation: what it computes, its work, and a closure that queues it once.
struct Case<'a> {
    name: &'static str,
    /// FLOPs (rate in TFLOP/s) or bytes (rate in GB/s) per launch.
    work: f64,
    bytes: bool,
    run: Box<dyn Fn() + 'a>,
}

fn ceiling_note(bytes: bool, bw_gbs: f64) -> (String, Option<f64>) {
    if bytes {
        (format!("{bw_gbs:.0} GB/s (copy)"), Some(bw_gbs))
    } else {
        match std::env::var("XSAM_BF16_GEMM_TFLOPS")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
        {
            Some(t) => (format!("{t:.0} TFLOP/s (given)"), Some(t)),
            None => ("-".to_string(), None),
        }
    }
}

fn bench(c: &mut Criterion) {
    let b = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIP cuda_attention bench: {e}");
            return;
        }
    };
    println!("cuda_attention bench on {b:?}");
    // The bandwidth ceiling: device-to-device copy of 1 GiB (read + write bytes), median of 10.
    let bw = b.copy_bandwidth_gbs(1 << 30, 10).unwrap();

    // SAM-L: 64x64 grid, 16 heads of 64, qkv [64, 64, 3072].
    let (g, heads_sam, c_sam) = (64usize, 16usize, 1024usize);
    let qkv = rand_bf16(&b, g * g * 3 * c_sam, 1, &[g, g, 3 * c_sam]);
    let qkv_bias = rand_bf16(&b, 3 * c_sam, 2, &[3 * c_sam]);
    let rel_g = rand_bf16(&b, 127 * 64, 3, &[127, 64]);
    let rel_w = rand_bf16(&b, 27 * 64, 4, &[27, 64]);
    // SigLIP: 729 tokens, 16 heads of 72.
    let sig = rand_bf16(&b, 729 * 1152, 5, &[729, 1152]);
    // Phi-3 prefill: 1853 tokens, 32 heads of 96, causal, window 2047.
    let phi = rand_bf16(&b, 1853 * 3072, 6, &[1853, 3072]);
    // Mask2Former: 200 queries over 128^2 keys, 8 heads of 32.
    let mq = rand_bf16(&b, 200 * 256, 7, &[200, 256]);
    let mk = rand_bf16(&b, 16384 * 256, 8, &[16384, 256]);
    let logits = rand_bf16(&b, 200 * 128 * 128, 9, &[200, 128, 128]);
    let bits = b.attention_mask_bits(&logits, (128, 128)).unwrap();
    // Phi-3 decode at 2048 tokens of context: one layer's pool, 32 heads of 96.
    let kv_cfg = KvConfig {
        num_layers: 1,
        kv_dim: 3072,
        block_size: 16,
        num_blocks: 130,
    };
    let mut cache = PagedKvCache::new(kv_cfg).unwrap();
    let seq = cache.new_sequence();
    cache.append(seq, 2048).unwrap();
    let table = block_table_i32(cache.block_table(seq).unwrap());
    let mut pool = b.alloc_paged_kv(kv_cfg, 96).unwrap();
    let slots: Vec<i32> = (0..2048)
        .map(|p| table[p / 16] * 16 + (p % 16) as i32)
        .collect();
    let kv_rows = rand_bf16(&b, 2048 * 3072, 10, &[2048, 3072]);
    b.kv_append(
        &mut pool,
        0,
        &kv_rows,
        &kv_rows,
        &b.upload_index(&slots).unwrap(),
    )
    .unwrap();
    // Uploaded once, as a decode step does for all its layers.
    let table = b.upload_index(&table).unwrap();
    let dq = rand_bf16(&b, 3072, 11, &[1, 3072]);

    let causal_pairs = (1853.0 * 1854.0) / 2.0;
    let cases: Vec<Case> = vec![
        Case {
            name: "sam_global 4096x4096x16x64",
            work: 4.0 * 4096.0 * 4096.0 * 64.0 * 16.0,
            bytes: false,
            run: Box::new(|| {
                b.sam_attention(
                    &qkv,
                    &qkv_bias,
                    &rel_g,
                    &rel_g,
                    (g, g),
                    heads_sam,
                    64,
                    0.125,
                )
                .unwrap();
            }),
        },
        Case {
            name: "sam_window 25x196^2x16x64",
            work: 4.0 * 25.0 * 196.0 * 196.0 * 64.0 * 16.0,
            bytes: false,
            run: Box::new(|| {
                b.sam_attention(
                    &qkv,
                    &qkv_bias,
                    &rel_w,
                    &rel_w,
                    (g, g),
                    heads_sam,
                    14,
                    0.125,
                )
                .unwrap();
            }),
        },
        Case {
            name: "siglip 729x729x16x72",
            work: 4.0 * 729.0 * 729.0 * 72.0 * 16.0,
            bytes: false,
            run: Box::new(|| {
                b.flash_attention(
                    &sig,
                    &sig,
                    &sig,
                    16,
                    16,
                    1.0 / 72f32.sqrt(),
                    FlashMask::None,
                    None,
                )
                .unwrap();
            }),
        },
        Case {
            name: "phi3_prefill 1853 causal x32x96",
            work: 4.0 * causal_pairs * 96.0 * 32.0,
            bytes: false,
            run: Box::new(|| {
                let m = FlashMask::Causal {
                    window: Some(2047),
                    q_offset: 0,
                };
                b.flash_attention(&phi, &phi, &phi, 32, 32, 1.0 / 96f32.sqrt(), m, None)
                    .unwrap();
            }),
        },
        Case {
            name: "masked 200x16384x8x32",
            work: 4.0 * 200.0 * 16384.0 * 32.0 * 8.0,
            bytes: false,
            run: Box::new(|| {
                b.masked_attention(&mq, &mk, &mk, &bits, 8, 1.0 / 32f32.sqrt(), None)
                    .unwrap();
            }),
        },
        Case {
            name: "mask_bits 200x128^2",
            // Reads the logits, writes the bits.
            work: 200.0 * 16384.0 * 2.0 + 200.0 * 16384.0 / 8.0,
            bytes: true,
            run: Box::new(|| {
                b.attention_mask_bits(&logits, (128, 128)).unwrap();
            }),
        },
        Case {
            name: "decode ctx 2048 x32x96",
            work: 2.0 * 2048.0 * 3072.0 * 2.0 + 2.0 * 3072.0 * 2.0,
            bytes: true,
            run: Box::new(|| {
                b.paged_decode(
                    &pool,
                    0,
                    &dq,
                    &table,
                    2047,
                    32,
                    1.0 / 96f32.sqrt(),
                    Some(2047),
                    None,
                )
                .unwrap();
            }),
        },
    ];

    let mut g = c.benchmark_group("cuda_attention");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for case in &cases {
        g.throughput(if case.bytes {
            Throughput::BytesDecimal(case.work as u64)
        } else {
            Throughput::Elements(case.work as u64)
        });
        g.bench_function(case.name, |bch| {
            bch.iter_custom(|iters| {
                let ms = b
                    .time_ms(|| {
                        for _ in 0..iters {
                            (case.run)();
                        }
                        Ok(())
                    })
                    .unwrap();
                b.synchronize().unwrap();
                Duration::from_secs_f64(ms as f64 / 1e3)
            })
        });
    }
    g.finish();

    // Summary: single-launch event timings after warm-up.
    println!(
        "\ncuda_attention on {} (criterion's Gelem/s above = GFLOP/s)",
        b.device_name()
    );
    println!(
        "{:34} {:>9} {:>9} {:>14} {:>22} {:>7}",
        "kernel", "median ms", "p90 ms", "achieved", "ceiling", "ratio"
    );
    for case in &cases {
        for _ in 0..3 {
            (case.run)();
        }
        let mut t: Vec<f64> = (0..30)
            .map(|_| {
                b.time_ms(|| {
                    (case.run)();
                    Ok(())
                })
                .unwrap() as f64
            })
            .collect();
        b.synchronize().unwrap();
        t.sort_by(f64::total_cmp);
        let (med, p90) = (t[t.len() / 2], t[t.len() * 9 / 10]);
        let rate = case.work / (med * 1e-3);
        let (achieved, unit_rate) = if case.bytes {
            (format!("{:.0} GB/s", rate / 1e9), rate / 1e9)
        } else {
            (format!("{:.1} TFLOP/s", rate / 1e12), rate / 1e12)
        };
        let (ceil, cv) = ceiling_note(case.bytes, bw);
        let ratio = cv.map_or("-".to_string(), |c| {
            format!("{:.0}%", 100.0 * unit_rate / c)
        });
        println!(
            "{:34} {med:>9.3} {p90:>9.3} {achieved:>14} {ceil:>22} {ratio:>7}",
            case.name
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
