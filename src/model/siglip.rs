//! SigLIP vision encoder, the image encoder (xsam-architecture.md §4): the SigLIP-v1
//! architecture of the FixRes SigLIP2 so400m checkpoint, built as a graph.
//!
//! ```text
//! pixel_values [1,3,V,V] ─ conv k=s=patch (+bias), row-major tokens [N, C] + position_embedding
//!                                                                      = hidden_states[0]
//! layer k (1-based): x += out_proj(attn(q, k, v of LN1 x))   scale head_dim^-0.5, no mask
//!                    x += fc2(gelu_tanh(fc1(LN2 x)))         = hidden_states[k]
//! ```
//! X-SAM reads `hidden_states[select_layer]` (-2: the output of layer L-1) without
//! `post_layernorm`; layers after the deepest requested state are not built.

use crate::graph::{op::Unary, Graph, GraphExecutor, NodeId, Op, Plan};
use crate::model::config::VisionConfig;
use crate::model::sam::{check_indexes, EncoderGraph};
use crate::weights::VarBuilder;
use crate::{Error, Result, Tensor};

/// Builds the encoder over `vb` (the `visual_encoder.vision_model` scope) keeping
/// `hidden_states[k]` (`[1, N, C]`, named `siglip.hidden_states.{k}`) for each k in `keep`.
pub fn build(cfg: &VisionConfig, vb: &VarBuilder, keep: &[usize]) -> Result<EncoderGraph> {
    let (c, p, v) = (cfg.hidden_size, cfg.patch_size, cfg.image_size);
    let heads = cfg.num_attention_heads;
    if heads == 0 || c % heads != 0 || p == 0 || v < p {
        return Err(Error::Graph(format!(
            "siglip: invalid geometry (hidden {c}, heads {heads}, image {v}, patch {p})"
        )));
    }
    let last = check_indexes("siglip", keep, cfg.num_hidden_layers)?;
    let (g, n, mlp) = (cfg.grid(), cfg.num_patches(), cfg.intermediate_size);
    let eps = cfg.layer_norm_eps as f32;
    let scale = 1.0 / ((c / heads) as f32).sqrt();

    let mut gr = Graph::new();
    let input = gr.input("input.siglip_pixel_values", [1, 3, v, v])?;
    let e = vb.pp("embeddings");
    let w = gr.weight(
        "siglip.patch_embed.w",
        e.get("patch_embedding.weight", &[c, 3, p, p])?,
    )?;
    let b = gr.weight("siglip.patch_embed.b", e.get("patch_embedding.bias", &[c])?)?;
    // "valid" convolution: 384 / 14 -> 27 patches per side, the last 6 pixels unused.
    let x = gr.push(
        "siglip.patch_embed",
        Op::Conv2d { stride: p, pad: 0 },
        &[input, w, b],
    )?;
    let x = gr.push(
        "siglip.patch_embed.nhwc",
        Op::Permute(vec![0, 2, 3, 1]),
        &[x],
    )?;
    debug_assert_eq!(gr.shape(x).dims(), [1, g, g, c]);
    let x = gr.push(
        "siglip.patch_embed.tokens",
        Op::Reshape([n, c].into()),
        &[x],
    )?;
    let pos = gr.weight(
        "siglip.position_embedding",
        e.get("position_embedding.weight", &[n, c])?,
    )?;
    let mut x = gr.push("siglip.embeddings", Op::Add, &[x, pos])?;

    let mut hidden = Vec::new();
    let mut keep_node = |gr: &mut Graph, k: usize, x: NodeId| -> Result<()> {
        if keep.contains(&k) {
            let id = gr.push(
                format!("siglip.hidden_states.{k}"),
                Op::Reshape([1, n, c].into()),
                &[x],
            )?;
            gr.mark_output(id);
            hidden.push((k, id));
        }
        Ok(())
    };
    keep_node(&mut gr, 0, x)?;
    let layers = vb.pp("encoder.layers");
    for i in 0..last {
        let l = layers.pp(i);
        let nm = |s: &str| format!("siglip.layer{i}.{s}");
        let wt = |gr: &mut Graph, name: &str, key: &str, dims: &[usize]| -> Result<NodeId> {
            gr.weight(nm(name), l.get(key, dims)?)
        };
        let linear =
            |gr: &mut Graph, name: &str, key: &str, x: NodeId, n_out: usize, n_in: usize| {
                let w = wt(
                    gr,
                    &format!("{name}.w"),
                    &format!("{key}.weight"),
                    &[n_out, n_in],
                )?;
                let b = wt(gr, &format!("{name}.b"), &format!("{key}.bias"), &[n_out])?;
                gr.push(nm(name), Op::Linear, &[x, w, b])
            };

        let ln_w = wt(&mut gr, "ln1.w", "layer_norm1.weight", &[c])?;
        let ln_b = wt(&mut gr, "ln1.b", "layer_norm1.bias", &[c])?;
        let h = gr.push(nm("ln1"), Op::LayerNorm { eps }, &[x, ln_w, ln_b])?;
        let q = linear(&mut gr, "q", "self_attn.q_proj", h, c, c)?;
        let k = linear(&mut gr, "k", "self_attn.k_proj", h, c, c)?;
        let vv = linear(&mut gr, "v", "self_attn.v_proj", h, c, c)?;
        let attn = Op::Attention {
            heads,
            scale,
            causal: false,
            window: None,
            q_offset: 0,
        };
        let a = gr.push(nm("attn"), attn, &[q, k, vv])?;
        let a = linear(&mut gr, "attn.out", "self_attn.out_proj", a, c, c)?;
        x = gr.push(nm("attn.residual"), Op::Add, &[x, a])?;

        let ln_w = wt(&mut gr, "ln2.w", "layer_norm2.weight", &[c])?;
        let ln_b = wt(&mut gr, "ln2.b", "layer_norm2.bias", &[c])?;
        let h = gr.push(nm("ln2"), Op::LayerNorm { eps }, &[x, ln_w, ln_b])?;
        let h = linear(&mut gr, "mlp.fc1", "mlp.fc1", h, mlp, c)?;
        let h = gr.push(nm("mlp.gelu"), Op::Unary(Unary::GeluTanh), &[h])?;
        let h = linear(&mut gr, "mlp.fc2", "mlp.fc2", h, c, mlp)?;
        x = gr.push(nm("out"), Op::Add, &[x, h])?;
        keep_node(&mut gr, i + 1, x)?;
    }
    Ok(EncoderGraph {
        graph: gr,
        input,
        hidden_states: hidden,
    })
}

/// A planned SigLIP encoder ready to run.
pub struct SiglipEncoder {
    pub cfg: VisionConfig,
    pub built: EncoderGraph,
    pub plan: Plan,
}

impl SiglipEncoder {
    /// Keeps `hidden_states[k]` for k in `keep`.
    pub fn new(cfg: &VisionConfig, vb: &VarBuilder, keep: &[usize]) -> Result<Self> {
        let built = build(cfg, vb, keep)?;
        let plan = Plan::new(&built.graph, &[])?;
        Ok(Self {
            cfg: cfg.clone(),
            built,
            plan,
        })
    }

    /// Keeps only the state X-SAM uses (`vision.select_layer`).
    pub fn for_xsam(cfg: &VisionConfig, vb: &VarBuilder) -> Result<Self> {
        let k = cfg.select_index().ok_or_else(|| {
            Error::Graph(format!(
                "vision.select_layer {} is out of range for {} layers",
                cfg.select_layer, cfg.num_hidden_layers
            ))
        })?;
        Self::new(cfg, vb, &[k])
    }

    pub fn peak_bytes(&self) -> usize {
        self.plan.peak_bytes
    }

    /// Runs on `pixel_values [1, 3, V, V]`; returns `(k, hidden_states[k] [1, N, C])`.
    pub fn forward(
        &self,
        exec: &mut dyn GraphExecutor,
        pixel_values: &Tensor,
    ) -> Result<Vec<(usize, Tensor)>> {
        let v = self.cfg.image_size;
        if pixel_values.dims() != [1, 3, v, v] {
            return Err(Error::Input(format!(
                "SigLIP pixel values are {}, expected [1, 3, {v}, {v}]",
                pixel_values.shape()
            )));
        }
        self.built.run(exec, &self.plan, pixel_values)
    }
}
