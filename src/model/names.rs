//! The checkpoint's tensor table: every tensor name of the released X-SAM checkpoint, its shape
//! as a function of the [`Config`], the module it belongs to, and whether inference reads it.
//!
//! Derived from the architecture notes (§3-§11 for the modules, §15.3 for the names); the
//! parameter counts of the `full` preset are checked against §15.4 in the tests.
//!
//! Unused tensors (the SAM neck, SigLIP's head, post-layernorm and the layers after
//! `vision.select_layer`, SAM's `shared_image_embedding`) are listed so that a writer produces
//! the released layout; a loader must accept their absence.

use super::config::Config;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// Top-level module of a tensor (the rows of the §15.4 table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Llm,
    Vision,
    Sam,
    VisualProjector,
    SegProjector,
    LlmProjector,
    Connector,
    PixelDecoder,
    Decoder,
    /// `segmentor.logit_scale` and `bg_embeds`.
    ClassHead,
    /// `segmentor.shared_image_embedding` (SAM prompt-encoder buffer; not in the §15.4 rows).
    SamPromptEmbedding,
}

impl Module {
    pub const ALL: [Module; 11] = [
        Module::Llm,
        Module::Vision,
        Module::Sam,
        Module::VisualProjector,
        Module::SegProjector,
        Module::LlmProjector,
        Module::Connector,
        Module::PixelDecoder,
        Module::Decoder,
        Module::ClassHead,
        Module::SamPromptEmbedding,
    ];
}

/// How a random model initialises a tensor (used by `init`; meaningless for real weights).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// A weight matrix / conv kernel with this fan-in: uniform in ±1/sqrt(fan_in).
    Weight { fan_in: usize },
    /// A bias of a layer with this fan-in: uniform in ±1/sqrt(fan_in) (PyTorch's default).
    Bias { fan_in: usize },
    /// A LayerNorm / RMSNorm / GroupNorm scale: around 1.
    NormWeight,
    /// A LayerNorm / GroupNorm shift: around 0.
    NormBias,
    /// An embedding table, positional table or learned query: moderate random values.
    Embedding,
    /// Every element equal to this value.
    Constant(f32),
}

/// One tensor of the checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub module: Module,
    /// Read by inference; `false` for tensors the released file holds but nothing uses.
    pub needed: bool,
    pub init: Init,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Value of `segmentor.logit_scale` at initialisation: ln(1 / 0.07).
pub const LOGIT_SCALE_INIT: f32 = 2.659_26;

/// Output channels of the SAM neck (`SamVisionConfig.output_channels`, fixed at 256; unused).
pub const SAM_NECK_CHANNELS: usize = 256;
/// Features per axis of SAM's prompt-encoder positional embedding buffer (unused).
pub const SAM_PROMPT_POS_FEATS: usize = 128;

struct Table {
    out: Vec<TensorSpec>,
    module: Module,
    needed: bool,
}

impl Table {
    fn t(&mut self, name: String, shape: &[usize], init: Init) {
        self.out.push(TensorSpec {
            name,
            shape: shape.to_vec(),
            module: self.module,
            needed: self.needed,
            init,
        });
    }
    /// `p.weight` [out, in] and, with `bias`, `p.bias` [out].
    fn linear(&mut self, p: &str, out: usize, inp: usize, bias: bool) {
        self.t(
            format!("{p}.weight"),
            &[out, inp],
            Init::Weight { fan_in: inp },
        );
        if bias {
            self.t(format!("{p}.bias"), &[out], Init::Bias { fan_in: inp });
        }
    }
    /// Conv2d `p.weight` [out, in, k, k] (+ `p.bias`).
    fn conv(&mut self, p: &str, out: usize, inp: usize, k: usize, bias: bool) {
        let fan_in = inp * k * k;
        self.t(
            format!("{p}.weight"),
            &[out, inp, k, k],
            Init::Weight { fan_in },
        );
        if bias {
            self.t(format!("{p}.bias"), &[out], Init::Bias { fan_in });
        }
    }
    /// LayerNorm / GroupNorm `p.weight`, `p.bias` [c].
    fn norm(&mut self, p: &str, c: usize) {
        self.t(format!("{p}.weight"), &[c], Init::NormWeight);
        self.t(format!("{p}.bias"), &[c], Init::NormBias);
    }
    /// RMSNorm `p.weight` [c].
    fn rms(&mut self, p: &str, c: usize) {
        self.t(format!("{p}.weight"), &[c], Init::NormWeight);
    }
    fn module(&mut self, m: Module) {
        self.module = m;
        self.needed = true;
    }
}

/// Every tensor of the checkpoint for `cfg`, in a stable order (module by module, layer by
/// layer). Expects a valid config.
pub fn checkpoint_tensors(cfg: &Config) -> Vec<TensorSpec> {
    let mut t = Table {
        out: Vec::new(),
        module: Module::Llm,
        needed: true,
    };

    // ---------------------------------------------------------------- Phi-3 (§6)
    let l = &cfg.llm;
    let h = l.hidden_size;
    t.module(Module::Llm);
    t.t(
        "llm.model.embed_tokens.weight".into(),
        &[l.vocab_size, h],
        Init::Embedding,
    );
    for i in 0..l.num_hidden_layers {
        let p = format!("llm.model.layers.{i}");
        t.rms(&format!("{p}.input_layernorm"), h);
        t.linear(&format!("{p}.self_attn.qkv_proj"), l.qkv_rows(), h, false);
        t.linear(
            &format!("{p}.self_attn.o_proj"),
            h,
            l.num_attention_heads * l.head_dim(),
            false,
        );
        t.rms(&format!("{p}.post_attention_layernorm"), h);
        t.linear(
            &format!("{p}.mlp.gate_up_proj"),
            2 * l.intermediate_size,
            h,
            false,
        );
        t.linear(&format!("{p}.mlp.down_proj"), h, l.intermediate_size, false);
    }
    t.rms("llm.model.norm", h);
    t.linear("llm.lm_head", l.vocab_size, h, false);

    // ---------------------------------------------------------------- SigLIP (§4)
    let v = &cfg.vision;
    let c = v.hidden_size;
    let vp = "visual_encoder.vision_model";
    t.module(Module::Vision);
    t.conv(
        &format!("{vp}.embeddings.patch_embedding"),
        c,
        3,
        v.patch_size,
        true,
    );
    t.t(
        format!("{vp}.embeddings.position_embedding.weight"),
        &[v.num_patches(), c],
        Init::Embedding,
    );
    let used = cfg.vision_layers_needed();
    for i in 0..v.num_hidden_layers {
        t.needed = i < used;
        let p = format!("{vp}.encoder.layers.{i}");
        t.norm(&format!("{p}.layer_norm1"), c);
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.linear(&format!("{p}.self_attn.{proj}"), c, c, true);
        }
        t.norm(&format!("{p}.layer_norm2"), c);
        t.linear(&format!("{p}.mlp.fc1"), v.intermediate_size, c, true);
        t.linear(&format!("{p}.mlp.fc2"), c, v.intermediate_size, true);
    }
    t.needed = false;
    t.norm(&format!("{vp}.post_layernorm"), c);
    // SiglipMultiheadAttentionPoolingHead.
    t.t(format!("{vp}.head.probe"), &[1, 1, c], Init::Embedding);
    t.t(
        format!("{vp}.head.attention.in_proj_weight"),
        &[3 * c, c],
        Init::Weight { fan_in: c },
    );
    t.t(
        format!("{vp}.head.attention.in_proj_bias"),
        &[3 * c],
        Init::Bias { fan_in: c },
    );
    t.linear(&format!("{vp}.head.attention.out_proj"), c, c, true);
    t.norm(&format!("{vp}.head.layernorm"), c);
    t.linear(&format!("{vp}.head.mlp.fc1"), v.intermediate_size, c, true);
    t.linear(&format!("{vp}.head.mlp.fc2"), c, v.intermediate_size, true);

    // ---------------------------------------------------------------- SAM (§3)
    let s = &cfg.sam;
    let c = s.hidden_size;
    let g = s.grid();
    let hd = s.head_dim();
    t.module(Module::Sam);
    t.conv(
        "segmentor.encoder.patch_embed.projection",
        c,
        3,
        s.patch_size,
        true,
    );
    t.t(
        "segmentor.encoder.pos_embed".into(),
        &[1, g, g, c],
        Init::Embedding,
    );
    let used = cfg.sam_layers_needed();
    for i in 0..s.num_hidden_layers {
        t.needed = i < used;
        let p = format!("segmentor.encoder.layers.{i}");
        t.norm(&format!("{p}.layer_norm1"), c);
        t.linear(&format!("{p}.attn.qkv"), 3 * c, c, true);
        t.linear(&format!("{p}.attn.proj"), c, c, true);
        let rows = (2 * s.attn_side(i)).saturating_sub(1);
        // Scaled like a weight over the head dim so the rel-pos bias is O(1) in a random model.
        t.t(
            format!("{p}.attn.rel_pos_h"),
            &[rows, hd],
            Init::Weight { fan_in: hd },
        );
        t.t(
            format!("{p}.attn.rel_pos_w"),
            &[rows, hd],
            Init::Weight { fan_in: hd },
        );
        t.norm(&format!("{p}.layer_norm2"), c);
        t.linear(&format!("{p}.mlp.lin1"), s.mlp_dim, c, true);
        t.linear(&format!("{p}.mlp.lin2"), c, s.mlp_dim, true);
    }
    t.needed = false;
    let n = SAM_NECK_CHANNELS;
    t.conv("segmentor.encoder.neck.conv1", n, c, 1, false);
    t.norm("segmentor.encoder.neck.layer_norm1", n);
    t.conv("segmentor.encoder.neck.conv2", n, n, 3, false);
    t.norm("segmentor.encoder.neck.layer_norm2", n);
    t.module(Module::SamPromptEmbedding);
    t.needed = false;
    t.t(
        "segmentor.shared_image_embedding.positional_embedding".into(),
        &[2, SAM_PROMPT_POS_FEATS],
        Init::Embedding,
    );

    // ---------------------------------------------------------------- projectors (§5)
    let d = &cfg.decoder;
    let e = d.hidden_dim;
    t.module(Module::VisualProjector);
    t.linear("visual_projector.model.0", h, v.hidden_size, true);
    t.linear("visual_projector.model.2", h, h, true);
    t.module(Module::SegProjector);
    t.linear("seg_projector.model.0", h, cfg.seg_projector_in(), true);
    t.linear("seg_projector.model.2", h, h, true);
    t.module(Module::LlmProjector);
    t.linear("llm_projector.model.0", e, h, true);
    t.linear("llm_projector.model.2", e, e, true);

    // ---------------------------------------------------------------- connector (§8)
    t.module(Module::Connector);
    let ch = cfg.connector.hidden_size;
    for (lvl, sh) in cfg.connector_shuffles().iter().enumerate() {
        let p = format!("seg_connector.model.{lvl}.model");
        let out = sh.scale(c);
        t.conv(&format!("{p}.0"), ch, c, 1, false);
        t.norm(&format!("{p}.1"), ch);
        t.conv(&format!("{p}.2"), ch, ch, 3, false);
        t.norm(&format!("{p}.3"), ch);
        t.conv(&format!("{p}.4"), out, ch, 1, false);
        t.norm(&format!("{p}.5"), out);
    }

    // ---------------------------------------------------------------- pixel decoder (§9)
    t.module(Module::PixelDecoder);
    let levels = d.num_feature_levels;
    let feat = cfg.connector_out_channels(); // highest resolution first
    t.t(
        "segmentor.pixel_decoder.level_embed".into(),
        &[levels, e],
        Init::Embedding,
    );
    for lvl in 0..levels {
        // Transformer level order is lowest resolution first.
        let inp = feat.get(levels - 1 - lvl).copied().unwrap_or(0);
        let p = format!("segmentor.pixel_decoder.input_projections.{lvl}");
        t.conv(&format!("{p}.0"), e, inp, 1, true);
        t.norm(&format!("{p}.1"), e);
    }
    let heads = d.num_attention_heads;
    let pts = d.encoder_n_points;
    for i in 0..d.encoder_layers {
        let p = format!("segmentor.pixel_decoder.encoder.layers.{i}");
        t.linear(
            &format!("{p}.self_attn.sampling_offsets"),
            heads * levels * pts * 2,
            e,
            true,
        );
        t.linear(
            &format!("{p}.self_attn.attention_weights"),
            heads * levels * pts,
            e,
            true,
        );
        t.linear(&format!("{p}.self_attn.value_proj"), e, e, true);
        t.linear(&format!("{p}.self_attn.output_proj"), e, e, true);
        t.norm(&format!("{p}.self_attn_layer_norm"), e);
        t.linear(&format!("{p}.fc1"), d.encoder_feedforward_dim, e, true);
        t.linear(&format!("{p}.fc2"), e, d.encoder_feedforward_dim, true);
        t.norm(&format!("{p}.final_layer_norm"), e);
    }
    t.conv(
        "segmentor.pixel_decoder.mask_projection",
        d.mask_feature_size,
        e,
        1,
        true,
    );
    // One FPN level; its lateral input is the highest-resolution connector map.
    let lateral = feat.first().copied().unwrap_or(0);
    t.conv("segmentor.pixel_decoder.adapter_1.0", e, lateral, 1, false);
    t.norm("segmentor.pixel_decoder.adapter_1.1", e);
    t.conv("segmentor.pixel_decoder.layer_1.0", e, e, 3, false);
    t.norm("segmentor.pixel_decoder.layer_1.1", e);

    // ---------------------------------------------------------------- decoder (§10)
    t.module(Module::Decoder);
    let q = d.num_queries;
    t.t(
        "segmentor.decoder.queries_embedder.weight".into(),
        &[q, e],
        Init::Embedding,
    );
    t.t(
        "segmentor.decoder.queries_features.weight".into(),
        &[q, e],
        Init::Embedding,
    );
    t.t(
        "segmentor.decoder.level_embed.weight".into(),
        &[levels, e],
        Init::Embedding,
    );
    for i in 0..d.num_layers() {
        let p = format!("segmentor.decoder.decoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.linear(&format!("{p}.self_attn.{proj}"), e, e, true);
        }
        t.norm(&format!("{p}.self_attn_layer_norm"), e);
        t.t(
            format!("{p}.cross_attn.in_proj_weight"),
            &[3 * e, e],
            Init::Weight { fan_in: e },
        );
        t.t(
            format!("{p}.cross_attn.in_proj_bias"),
            &[3 * e],
            Init::Bias { fan_in: e },
        );
        t.linear(&format!("{p}.cross_attn.out_proj"), e, e, true);
        t.norm(&format!("{p}.cross_attn_layer_norm"), e);
        t.linear(&format!("{p}.fc1"), d.dim_feedforward, e, true);
        t.linear(&format!("{p}.fc2"), e, d.dim_feedforward, true);
        t.norm(&format!("{p}.final_layer_norm"), e);
    }
    t.norm("segmentor.decoder.decoder.layernorm", e);
    let mp = "segmentor.decoder.decoder.mask_predictor.mask_embedder";
    t.linear(&format!("{mp}.0.0"), e, e, true);
    t.linear(&format!("{mp}.1.0"), e, e, true);
    t.linear(&format!("{mp}.2.0"), d.mask_feature_size, e, true);

    // ---------------------------------------------------------------- class head (§11)
    t.module(Module::ClassHead);
    t.t(
        "segmentor.logit_scale".into(),
        &[1],
        Init::Constant(LOGIT_SCALE_INIT),
    );
    t.t("bg_embeds.weight".into(), &[1, e], Init::Embedding);

    t.out
}

/// Parameter counts per module: (all tensors, needed tensors).
pub fn param_counts(specs: &[TensorSpec]) -> Vec<(Module, usize, usize)> {
    Module::ALL
        .iter()
        .map(|&m| {
            let all: usize = specs
                .iter()
                .filter(|s| s.module == m)
                .map(|s| s.numel())
                .sum();
            let needed: usize = specs
                .iter()
                .filter(|s| s.module == m && s.needed)
                .map(|s| s.numel())
                .sum();
            (m, all, needed)
        })
        .collect()
}

/// Checks that `weights` holds every needed tensor of `cfg` with the right shape and a
/// supported dtype. Unused tensors may be absent. The error names the first offending tensor in
/// table order (`MissingTensor`, `TensorShape`, or `Weights` for an unsupported dtype).
pub fn check_weights(weights: &Weights, cfg: &Config) -> Result<()> {
    for s in checkpoint_tensors(cfg).iter().filter(|s| s.needed) {
        match weights.info(&s.name) {
            None => {
                return Err(Error::MissingTensor {
                    name: s.name.clone(),
                    location: weights.location().display().to_string(),
                })
            }
            Some(info) if info.shape != s.shape => {
                return Err(Error::TensorShape {
                    name: s.name.clone(),
                    expected: s.shape.clone(),
                    found: info.shape,
                })
            }
            Some(info) if info.dtype.is_none() => {
                return Err(Error::Weights {
                    path: info.file.unwrap_or_default(),
                    msg: format!(
                        "tensor `{}` has dtype {}; only F32, BF16 and F16 are supported",
                        s.name, info.dtype_name
                    ),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_configs_do_not_panic() {
        let mut c = Config::preset("tiny").unwrap();
        c.sam.window_size = 0;
        c.sam.patch_size = 0;
        c.sam.num_attention_heads = 0;
        c.vision.patch_size = 0;
        c.llm.num_attention_heads = 0;
        c.decoder.hidden_dim = 0;
        c.decoder.num_feature_levels = 5;
        c.connector.scale_factors = vec![3.0];
        c.decoder.decoder_layers = 0;
        assert!(!c.problems().is_empty());
        let _ = checkpoint_tensors(&c);
        let _ = c.num_image_tokens();
        let _ = c.connector_out_channels();
    }
}
