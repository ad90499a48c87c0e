//! CUDA backend: cudarc (driver API, dynamically loaded) plus the hand-written kernels in
//! kernels/*.cu, compiled by build.rs into one embedded fatbin.
//!
//! The crate builds and runs with no CUDA present: `CudaBackend::new` then returns
//! `Error::Backend { backend: "cuda", .. }` saying what is missing (driver, device, or kernels when
//! the crate was built without nvcc). `cuda_available()` gives the same answer as a string, for
//! device selection and for tests that skip without a GPU.
//!
//! - `context`: driver detection (never panics), `CudaBackend` (context, stream, kernel module).
//! - `buffer`: `DeviceBuffer`, the device storage of a `Tensor`.
//! - `gemm`: cuBLASLt GEMMs (bf16 in, f32 accumulate, bias/GELU epilogues, descriptor cache).
//! - `memory`: pool statistics, the memory budget check, weight upload in bf16, `copy_into`.
//! - `capture`: CUDA graph capture, replay and in-place update.
//! - `attention`: flash attention (dense, SAM windowed/global with relative positions, paged
//!   prefill), Mask2Former masked attention, the device paged KV pool and decode attention.
//! - `ops`: host <-> device copies and element-wise launchers (`cast`, `add`, `gelu_erf`).
//! - `vision`: launchers of the vision/segmentation kernels (row and 2-D norms, softmax, RoPE,
//!   activations, resize and the mask post-process, pixel shuffle, deformable attention, region
//!   pooling, embeddings) and benchmark helpers.
//! - `tensor_ops`: the graph executor's element-wise and data-movement launchers (mul, scale,
//!   add_row, relu, silu, clamp, mask_keep, L2-normalise, permute / narrow / concat, im2col
//!   convolution, masked-attention keep bits).
//! - `kernels`: what build.rs produced (fatbin, ptxas report path, kernel names).

mod attention;
mod buffer;
mod capture;
mod context;
mod gemm;
pub mod kernels;
mod memory;
mod ops;
mod tensor_ops;
mod vision;

pub use attention::{
    block_table_i32, AttnMaskBits, DeviceIndex, DevicePagedKv, FlashMask, ATTENTION_KERNELS,
};
pub use buffer::DeviceBuffer;
pub use capture::{CapturedGraph, GraphUpdate};
pub use context::{cuda_available, device_count, driver_version, CudaBackend};
pub use gemm::{Epilogue, WORKSPACE_BYTES};
pub use kernels::kernels_compiled;
pub use memory::{budget_check, human_bytes, PoolStats, UPLOAD_CHUNK_BYTES};
pub use tensor_ops::MAX_COPY_RANK;
pub use vision::{Gelu, MapLayout, RopePositions, Shuffle, DEFORM_LEVELS, DEFORM_POINTS, MAX_ROW};
