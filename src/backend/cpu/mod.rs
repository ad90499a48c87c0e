//! CPU backend: f32 arithmetic, rayon threads, the `gemm` crate for matrix products.
