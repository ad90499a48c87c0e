//! What build.rs compiled: the embedded kernels fatbin and where its ptxas report lies.

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The kernels fatbin (sm_80, sm_89, sm_90 SASS + compute_80 PTX), `None` when the crate was built
/// without nvcc.
pub const FATBIN: Option<&[u8]> = generated::FATBIN;

/// Path of the `-Xptxas -v` output of the kernel build (registers, stack and spills for every
/// kernel and architecture), `None` without kernels. The file lives in the build's OUT_DIR: it is
/// meant for tests run from the same build tree, not for installed binaries.
pub const PTXAS_REPORT: Option<&str> = generated::PTXAS_REPORT;

/// The nvcc that compiled the kernels.
pub const NVCC: Option<&str> = generated::NVCC;

/// The `-gencode` targets of the fatbin.
pub const GENCODE: &[&str] = generated::GENCODE;

/// Every kernel entry point the host side launches; `CudaBackend::new` checks that each is present
/// in the loaded module, so a missing or misspelled kernel fails at start-up, not mid-forward.
pub const KERNEL_NAMES: &[&str] = &[
    // elementwise.cu
    "cast_f32_bf16",
    "cast_bf16_f32",
    "add_f32",
    "gelu_erf_f32",
    // norm.cu
    "layer_norm_f32",
    "layer_norm_bf16",
    "rms_norm_f32",
    // flash_attn.cu
    "flash_attn_hd64_bf16",
    "flash_attn_hd72_bf16",
    "flash_attn_hd96_bf16",
    "flash_attn_paged_hd96_bf16",
    "sam_attn_window_bf16",
    "sam_attn_global_bf16",
    "sam_attn_global_bm64_bf16",
    "attn_combine_splits_bf16",
    // masked_attn.cu
    "masked_attn_hd32_bf16",
    "attn_mask_from_logits_bf16",
    "attn_mask_from_logits_f32",
    // paged_attn.cu
    "paged_decode_hd64_bf16",
    "paged_decode_hd96_bf16",
    "paged_decode_hd128_bf16",
    "paged_kv_append_bf16",
    "rms_norm_bf16",
    "rms_norm_residual_f32",
    "rms_norm_residual_bf16",
    "softmax_rows_f32",
    "softmax_rows_bf16",
    // norm2d.cu
    "layer_norm_cf_f32",
    "layer_norm_cf_bf16",
    "group_norm_stats_f32",
    "group_norm_stats_bf16",
    "group_norm_apply_f32",
    "group_norm_apply_bf16",
    // activation.cu
    "gelu_erf_bf16",
    "gelu_tanh_f32",
    "gelu_tanh_bf16",
    "silu_gate_f32",
    "silu_gate_bf16",
    "cast_f32_f16",
    "cast_f16_f32",
    "cast_bf16_f16",
    "cast_f16_bf16",
    // rope.cu
    "rope_f32",
    "rope_bf16",
    // resize.cu
    "resize_bilinear_f32",
    "resize_bilinear_bf16",
    "mask_postprocess_f32",
    "mask_postprocess_bf16",
    // pixel_shuffle.cu
    "pixel_shuffle_down_cl_f32",
    "pixel_shuffle_down_cl_bf16",
    "pixel_shuffle_up_cl_f32",
    "pixel_shuffle_up_cl_bf16",
    "pixel_shuffle_down_cf_f32",
    "pixel_shuffle_down_cf_bf16",
    "pixel_shuffle_up_cf_f32",
    "pixel_shuffle_up_cf_bf16",
    // ms_deform_attn.cu
    "ms_deform_attn_f32",
    "ms_deform_attn_bf16",
    // region_pool.cu
    "region_pool_f32",
    "region_pool_bf16",
    // embed.cu
    "gather_rows_bf16_f32",
    "gather_rows_bf16_bf16",
    "gather_rows_f32_f32",
    "pos_embed_sine_f32",
    "pos_embed_sine_bf16",
    // tensor_ops.cu
    "mul_f32",
    "scale_f32",
    "add_row_f32",
    "add_channel_bias_f32",
    "relu_f32",
    "silu_f32",
    "clamp_f32",
    "mask_keep_f32",
    "l2_normalize_f32",
    "strided_copy_f32",
    "im2col_f32",
    "keep_bits_f32",
    // bench.cu
    "bench_spin",
];

/// True when build.rs found nvcc and the fatbin is embedded.
pub fn kernels_compiled() -> bool {
    FATBIN.is_some()
}
