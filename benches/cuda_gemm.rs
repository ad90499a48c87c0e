//! cuBLASLt GEMMs at X-SAM's real shapes on the GPU: achieved TFLOP/s (GB/s of weights for the
//! decode products, which are memory-bound) against the card's measured ceilings, then a table.
//!
//! Ceilings measured here: a large square bf16 GEMM (8192³, bf16 out) for compute and a 1 GiB
//! device-to-device copy (read + write bytes) for bandwidth. Timing: a spin kernel holds the GPU
//! while `REPS` launches are queued, then CUDA events around the batch give back-to-back GPU time
//! per launch (no host launch gaps); the median of `ROUNDS` batches is reported.
//!
//! Without a GPU (or without compiled kernels) it prints one SKIP line and exits successfully.
//! Machine-readable lines for scripts/gpu-bundle.sh (`RATE`, `CEILING`): see benches/gpu_common.
//! `XSAM_BENCH_ROUNDS=<n>` changes the number of timed batches (default 15).

#[path = "gpu_common/mod.rs"]
mod gpu_common;

use gpu_common::{print_rate, rand_bf16, time_median, Rate};
use xsam::backend::cuda::{CudaBackend, Epilogue};
use xsam::DType;

/// One linear layer `x [m, k] · w [n, k]ᵀ (+ bias) (epilogue)` as the model runs it.
struct Case {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    bias: bool,
    epilogue: Epilogue,
}

const fn case(name: &'static str, m: usize, k: usize, n: usize, bias: bool, e: Epilogue) -> Case {
    Case {
        name,
        m,
        k,
        n,
        bias,
        epilogue: e,
    }
}

const CASES: &[Case] = &[
    // Phi-3-mini prefill (1853 tokens: 1024 SAM tokens + 729 SigLIP + ~100 text) and decode.
    case("phi3.qkv prefill", 1853, 3072, 9216, false, Epilogue::None),
    case("phi3.o prefill", 1853, 3072, 3072, false, Epilogue::None),
    case(
        "phi3.gate_up prefill",
        1853,
        3072,
        16384,
        false,
        Epilogue::None,
    ),
    case("phi3.down prefill", 1853, 8192, 3072, false, Epilogue::None),
    case("phi3.qkv decode", 1, 3072, 9216, false, Epilogue::None),
    case("phi3.o decode", 1, 3072, 3072, false, Epilogue::None),
    case("phi3.gate_up decode", 1, 3072, 16384, false, Epilogue::None),
    case("phi3.down decode", 1, 8192, 3072, false, Epilogue::None),
    // SAM ViT-L at 1024² (64x64 tokens): qkv, MLP (exact GELU is a separate kernel).
    case("sam.qkv", 4096, 1024, 3072, true, Epilogue::None),
    case("sam.proj", 4096, 1024, 1024, true, Epilogue::None),
    case("sam.mlp1", 4096, 1024, 4096, true, Epilogue::None),
    case("sam.mlp2", 4096, 4096, 1024, true, Epilogue::None),
    // SigLIP so400m at 384² (729 tokens): gelu_pytorch_tanh fuses into the epilogue.
    case("siglip.qkv", 729, 1152, 3456, true, Epilogue::None),
    case("siglip.fc1+gelu", 729, 1152, 4304, true, Epilogue::GeluTanh),
    case("siglip.fc2", 729, 4304, 1152, true, Epilogue::None),
    // Projectors into the LLM (their GELU is exact: separate kernel).
    case("seg_projector.1", 1024, 4096, 3072, true, Epilogue::None),
    case("seg_projector.2", 1024, 3072, 3072, true, Epilogue::None),
    case("visual_projector.1", 729, 1152, 3072, true, Epilogue::None),
];

fn main() {
    let b = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIP cuda_gemm bench: {e}");
            return;
        }
    };
    if let Err(e) = run(&b) {
        // A failure on a GPU is a real failure of the bench.
        eprintln!("cuda_gemm bench failed on {b:?}: {e}");
        std::process::exit(1);
    }
}

fn run(b: &CudaBackend) -> xsam::Result<()> {
    println!("cuda_gemm bench on {b:?}");
    let rounds = gpu_common::rounds(15);

    // Ceilings.
    let bw = gpu_common::copy_ceiling_gbs(b)?;
    let peak = gpu_common::gemm_ceiling_tflops(b, rounds)?;

    let mut rows = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let x = rand_bf16(b, &[c.m, c.k], 10 + i as u64)?;
        let w = rand_bf16(b, &[c.n, c.k], 100 + i as u64)?;
        let bias = if c.bias {
            Some(rand_bf16(b, &[c.n], 1000 + i as u64)?)
        } else {
            None
        };
        let ms = time_median(b, rounds, &|| {
            b.gemm(&x, &w, true, bias.as_ref(), c.epilogue, DType::BF16)
                .map(drop)
        })?;
        // Decode (m = 1) reads the whole weight once per product: report bandwidth.
        let rate = if c.m == 1 {
            Rate::bytes(((c.n * c.k + c.m * c.k + c.m * c.n) * 2) as f64, ms)
        } else {
            Rate::flops(2.0 * (c.m * c.n * c.k) as f64, ms)
        };
        print_rate(&c.name.replace(' ', "_"), ms, rate, None);
        let ratio = rate.ratio(Some(peak), Some(bw)).unwrap_or(f64::NAN);
        let rate = rate.show();
        rows.push((c, ms, rate, ratio));
    }

    println!();
    println!(
        "{:<22} {:>18} {:>10} {:>16} {:>7}",
        "gemm (bf16 out)", "m x k -> n", "median ms", "achieved", "ceiling"
    );
    for (c, ms, rate, ratio) in rows {
        println!(
            "{:<22} {:>18} {:>10.4} {:>16} {:>6.0}%",
            c.name,
            format!("{}x{}->{}", c.m, c.k, c.n),
            ms,
            rate,
            ratio * 100.0
        );
    }
    println!(
        "ceilings on {}: bf16 GEMM {peak:.0} TFLOP/s (8192^3), copy {bw:.0} GB/s",
        b.device_name()
    );
    Ok(())
}
