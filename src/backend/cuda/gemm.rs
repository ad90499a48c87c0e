//! GEMMs through cuBLASLt: bf16 operands, f32 accumulation, bf16 or f32 output, fused bias and
//! GELU epilogues, a per-shape cache of matmul descriptors and chosen algorithms.
//!
//! Interface fixed first so the graph executor can be written against it; the cuBLASLt body
//! lands in the same file.

use super::context::{backend_err, CudaBackend};
use crate::{DType, Result, Tensor};

/// What cuBLASLt fuses after the product (and the bias, when given).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    None,
    /// cuBLASLt's GELU is the tanh approximation: only for SigLIP's `gelu_pytorch_tanh`.
    GeluTanh,
    Relu,
}

impl CudaBackend {
    /// `y[m, n] = a[m, k] · b (+ bias[n]) (epilogue)`, where `b` is `[n, k]` when `b_transposed`
    /// (a linear layer's weight) else `[k, n]`. `a` may have leading dims (flattened into m).
    /// Operands are bf16 (f32 operands are cast to bf16 first), accumulation is f32, `bias` is
    /// bf16 or f32, the output dtype is `out` (bf16 or f32).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        a: &Tensor,
        b: &Tensor,
        b_transposed: bool,
        bias: Option<&Tensor>,
        epilogue: Epilogue,
        out: DType,
    ) -> Result<Tensor> {
        let _ = (a, b, b_transposed, bias, epilogue, out);
        Err(backend_err("gemm: cuBLASLt path not written yet"))
    }

    /// Strided-batched `y[i] = a[i] · b[i]` for `a [B, m, k]` and `b [B, k, n]` (or `[B, n, k]`
    /// when `b_transposed`), same dtype rules as [`gemm`](Self::gemm).
    pub fn gemm_batched(
        &self,
        a: &Tensor,
        b: &Tensor,
        b_transposed: bool,
        out: DType,
    ) -> Result<Tensor> {
        let _ = (a, b, b_transposed, out);
        Err(backend_err("gemm_batched: cuBLASLt path not written yet"))
    }
}
