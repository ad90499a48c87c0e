//! CPU backend: f32 arithmetic, rayon threads, the `gemm` crate for matrix products.
//!
//! Every op works on row-major contiguous slices, checks the slice lengths against the sizes it
//! is given (an `Error::Shape` naming the op, never a panic) and fully overwrites its output.
//! Weights stay in their stored dtype (`WeightRef`) and are widened to f32 a panel at a time.

#[macro_use]
mod simd;

pub mod activation;
pub mod attention;
pub mod conv;
pub mod deform;
pub mod elementwise;
pub mod matmul;
pub mod norm;
pub mod resize;
pub mod rope;
pub mod sam_attention;
pub mod shuffle;

pub use activation::{erf, gelu_erf, gelu_tanh, relu, silu, silu_gate, softmax_rows};
pub use attention::{attention, AttnBias, AttnMask};
pub use conv::conv2d;
pub use deform::*;
pub use elementwise::{add, add_broadcast_rows, concat, gather_rows, mul, scale, transpose2d};
pub use matmul::{batched_matmul, linear, matmul, WeightRef};
pub use norm::{group_norm, layer_norm, layer_norm_channels_first, rms_norm};
pub use resize::{grid_sample_bilinear, resize_bilinear};
pub use rope::rope;
pub use sam_attention::{sam_attention, SamAttnGeom};
pub use shuffle::{pixel_shuffle_down, pixel_shuffle_up};
pub(crate) use simd::{dot_f32, exp_f32};

use crate::{Error, Result};

/// `a * b * ...` or a shape error: sizes come from callers (configs, images), so an overflow is an
/// input problem, not a reason to panic.
pub(crate) fn numel(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d)
            .ok_or_else(|| Error::shape(op, format!("size {dims:?} overflows")))
    })
}

/// Shape error unless `got == want`.
pub(crate) fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shape(
            op,
            format!("{what} has {got} elements, expected {want}"),
        ))
    }
}

/// A raw pointer that may cross threads. Used only where tasks write provably disjoint elements
/// of one output that safe slice splitting cannot express (strided panels, interleaved heads).
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
// SAFETY: users guarantee disjoint writes (see each use).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// Keeps closures capturing the whole `SyncPtr` (edition-2021 closures would otherwise
    /// capture the raw-pointer field alone, which is not `Send`).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}
