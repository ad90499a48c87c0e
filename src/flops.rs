//! FLOPs of each pipeline stage as functions of the [`Config`] (FLOPs = 2 × MACs), following
//! docs/xsam-architecture.md §16. Matrix products and attention only: norms, activations,
//! resampling and relative-position terms are left out (each < 1% at the full geometry).

use crate::Config;

/// SAM ViT encoder on its `image_size`² canvas: patch embedding and every block (windowed
/// blocks count qkv / proj on the padded token grid, as the reference computes them).
pub fn sam_encoder(c: &Config) -> f64 {
    let s = &c.sam;
    let d = s.hidden_size as f64;
    let g = s.image_size / s.patch_size;
    let n = (g * g) as f64;
    let patch = n * 3.0 * (s.patch_size * s.patch_size) as f64 * d;
    let mlp = n * 2.0 * d * s.mlp_dim as f64;
    let mut macs = patch;
    for i in 0..s.num_hidden_layers {
        if s.global_attn_indexes.contains(&i) || s.window_size == 0 {
            macs += n * 4.0 * d * d + mlp + 2.0 * n * n * d;
        } else {
            let w = s.window_size;
            let gp = g.div_ceil(w) * w;
            let np = (gp * gp) as f64;
            let windows = ((gp / w) * (gp / w)) as f64;
            let ws2 = (w * w) as f64;
            macs += np * 4.0 * d * d + mlp + 2.0 * windows * ws2 * ws2 * d;
        }
    }
    2.0 * macs
}

/// Layers of SigLIP the pipeline runs (`select_layer` counts from the end, -1 = last).
pub fn siglip_layers(c: &Config) -> usize {
    let v = &c.vision;
    if v.select_layer < 0 {
        (v.num_hidden_layers as i64 + 1 + v.select_layer).max(0) as usize
    } else {
        v.select_layer as usize
    }
}

/// Tokens of the SigLIP encoder (729 at 384² / 14).
pub fn siglip_tokens(c: &Config) -> usize {
    let g = c.vision.image_size / c.vision.patch_size;
    g * g
}

/// SigLIP vision encoder, the used layers only.
pub fn siglip_encoder(c: &Config) -> f64 {
    let v = &c.vision;
    let d = v.hidden_size as f64;
    let n = siglip_tokens(c) as f64;
    let layer = n * (4.0 * d * d + 2.0 * d * v.intermediate_size as f64) + 2.0 * n * n * d;
    let patch = n * 3.0 * (v.patch_size * v.patch_size) as f64 * d;
    2.0 * (patch + siglip_layers(c) as f64 * layer)
}

/// Linear MACs of one LLM layer for one token.
fn llm_layer_linear(c: &Config) -> f64 {
    let l = &c.llm;
    let h = l.hidden_size as f64;
    let kv = h * l.num_key_value_heads as f64 / l.num_attention_heads as f64;
    h * (h + 2.0 * kv) + h * h + 3.0 * h * l.intermediate_size as f64
}

/// LLM prefill of `t` tokens into an empty cache (causal attention as t(t+1)/2 pairs), with the
/// lm_head on the last position only.
pub fn llm_prefill(c: &Config, t: usize) -> f64 {
    llm_prefill_after(c, 0, t)
}

/// LLM prefill of `t` tokens after `past` cached ones.
pub fn llm_prefill_after(c: &Config, past: usize, t: usize) -> f64 {
    let l = &c.llm;
    let h = l.hidden_size as f64;
    let layers = l.num_hidden_layers as f64;
    let (p, t) = (past as f64, t as f64);
    let pairs = t * p + t * (t + 1.0) / 2.0;
    let macs = layers * (t * llm_layer_linear(c) + 2.0 * pairs * h) + l.vocab_size as f64 * h;
    2.0 * macs
}

/// One decode step at a context of `ctx` tokens (lm_head included).
pub fn llm_decode_token(c: &Config, ctx: usize) -> f64 {
    let l = &c.llm;
    let h = l.hidden_size as f64;
    let layers = l.num_hidden_layers as f64;
    2.0 * (layers * (llm_layer_linear(c) + 2.0 * ctx as f64 * h) + l.vocab_size as f64 * h)
}

/// Bytes a decode step must read: the weights (bf16) and the KV cache at `ctx` (f32 cache
/// entries count 4 bytes: `kv_bytes`).
pub fn llm_decode_bytes(c: &Config, ctx: usize, kv_bytes: usize) -> f64 {
    let l = &c.llm;
    let h = l.hidden_size as f64;
    let kv = h * l.num_key_value_heads as f64 / l.num_attention_heads as f64;
    let weights = l.num_hidden_layers as f64 * llm_layer_linear(c) + l.vocab_size as f64 * h;
    2.0 * weights + l.num_hidden_layers as f64 * 2.0 * kv * ctx as f64 * kv_bytes as f64
}

/// SAM tokens after the seg projector's pixel-shuffle downsampling (1024 at the full geometry).
pub fn seg_tokens(c: &Config) -> usize {
    let g = c.sam.image_size / c.sam.patch_size;
    let r = c.projector.seg_downsample_ratio;
    let gd = ((g as f64) * r).round() as usize;
    gd * gd
}

/// The image block the LLM sees: SigLIP tokens then downsampled SAM tokens.
pub fn image_tokens(c: &Config) -> usize {
    siglip_tokens(c) + seg_tokens(c)
}

/// visual_projector (SigLIP → LLM) and seg_projector (SAM → LLM), two-layer MLPs.
pub fn projectors(c: &Config) -> f64 {
    let h = c.llm.hidden_size as f64;
    let vis = siglip_tokens(c) as f64 * (c.vision.hidden_size as f64 * h + h * h);
    let r = c.projector.seg_downsample_ratio;
    let seg_in = c.sam.hidden_size as f64 / (r * r);
    let seg = seg_tokens(c) as f64 * (seg_in * h + h * h);
    2.0 * (vis + seg)
}

/// Token counts of the pixel decoder's levels (connector outputs, SAM grid × scale factor).
pub fn pixel_levels(c: &Config) -> Vec<usize> {
    let g = (c.sam.image_size / c.sam.patch_size) as f64;
    c.connector
        .scale_factors
        .iter()
        .map(|s| {
            let n = (g * s).round() as usize;
            n * n
        })
        .collect()
}

/// Connector: per level a 1×1 and a 3×3 convolution to `hidden_size` (the resampling
/// deconvolutions / pooling are left out).
pub fn connector(c: &Config) -> f64 {
    let d_in = c.sam.hidden_size as f64;
    let d = c.connector.hidden_size as f64;
    let g = (c.sam.image_size / c.sam.patch_size) as f64;
    let per_level = g * g * (d_in * d + d * d * 9.0);
    2.0 * per_level * c.connector.scale_factors.len() as f64
}

/// Pixel decoder: the multi-scale deformable-attention encoder layers over all levels.
pub fn pixel_decoder(c: &Config) -> f64 {
    let dc = &c.decoder;
    let d = dc.hidden_dim as f64;
    let s: usize = pixel_levels(c).iter().sum();
    let hlp = (dc.num_attention_heads * dc.num_feature_levels * dc.encoder_n_points) as f64;
    let per_token = 2.0 * d * d + d * hlp * 3.0 + 2.0 * d * dc.encoder_feedforward_dim as f64;
    2.0 * dc.encoder_layers as f64 * s as f64 * per_token
}

/// Transformer (mask) decoder: masked cross-attention on the memory levels, self-attention and
/// FFN of the queries, and a mask prediction at the largest level per layer (+1 initial).
pub fn mask_decoder(c: &Config) -> f64 {
    let dc = &c.decoder;
    let d = dc.hidden_dim as f64;
    let q = dc.num_queries as f64;
    let levels = pixel_levels(c);
    let nl = levels.len().max(1);
    let mask_hw = levels.iter().copied().max().unwrap_or(0) as f64;
    let mut macs = 0.0;
    for i in 0..dc.decoder_layers {
        let s = levels.get(i % nl).copied().unwrap_or(0) as f64;
        macs += 2.0 * s * d * d + 2.0 * q * s * d; // k/v of the memory, attention
        macs += q * (8.0 * d * d + 2.0 * d * dc.dim_feedforward as f64) + 2.0 * q * q * d;
    }
    macs += (dc.decoder_layers + 1) as f64 * q * d * mask_hw;
    2.0 * macs
}
