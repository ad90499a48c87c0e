//! SAM ViT image encoder, the segmentation encoder (xsam-architecture.md §3; HF
//! `SamVisionEncoder` math as vendored by X-SAM), built as a graph.
//!
//! ```text
//! pixel_values [1,3,S,S] ─ conv k=s=patch (+bias) ─ [G·G, C] + pos_embed = hidden_states[0]
//! block k (1-based): x += proj(SamAttention(qkv(LN1 x)))      windowed (zero pad after LN1,
//!                    x += lin2(gelu_erf(lin1(LN2 x)))         no mask, crop) or global
//!                    = hidden_states[k]
//! ```
//! The neck is never computed (X-SAM discards it). Only blocks up to the deepest requested
//! hidden state run. Hidden states are channels-last `[1, G, G, C]` (interfaces.md §3 names
//! `sam.hidden_states.{k}`).

use crate::graph::{op::Unary, Graph, GraphExecutor, NodeId, Op, Plan};
use crate::model::config::{Config, SamConfig};
use crate::weights::VarBuilder;
use crate::{Error, Result, Tensor};

/// A built encoder graph: its input and the kept hidden states.
#[derive(Debug, Clone)]
pub struct EncoderGraph {
    pub graph: Graph,
    /// The pixel-values input node.
    pub input: NodeId,
    /// `(k, node)` for each kept `hidden_states[k]`, in the order requested.
    pub hidden_states: Vec<(usize, NodeId)>,
}

impl EncoderGraph {
    /// The node of `hidden_states[k]`, if it was kept.
    pub fn hidden_state(&self, k: usize) -> Option<NodeId> {
        self.hidden_states
            .iter()
            .find(|(i, _)| *i == k)
            .map(|&(_, n)| n)
    }

    /// Runs the planned graph on `pixel_values` and returns the kept `(k, hidden_states[k])`.
    pub(crate) fn run(
        &self,
        exec: &mut dyn GraphExecutor,
        plan: &Plan,
        pixel_values: &Tensor,
    ) -> Result<Vec<(usize, Tensor)>> {
        let out = exec.run(&self.graph, plan, &[(self.input, pixel_values)])?;
        self.hidden_states
            .iter()
            .map(|&(k, n)| Ok((k, out.get(n)?.clone())))
            .collect()
    }
}

/// Checks the requested hidden-state indexes against `layers` (0 = embeddings, k = block k).
pub(crate) fn check_indexes(what: &str, keep: &[usize], layers: usize) -> Result<usize> {
    if keep.is_empty() {
        return Err(Error::Graph(format!("{what}: no hidden state requested")));
    }
    if let Some(&bad) = keep.iter().find(|&&k| k > layers) {
        return Err(Error::Graph(format!(
            "{what}: hidden state {bad} requested but the encoder has {layers} layers"
        )));
    }
    Ok(keep.iter().copied().max().unwrap_or(0))
}

/// Builds the SAM encoder over `vb` (the `segmentor.encoder` scope) keeping `hidden_states[k]`
/// for each k in `keep`; blocks past `max(keep)` are not built.
pub fn build(cfg: &SamConfig, vb: &VarBuilder, keep: &[usize]) -> Result<EncoderGraph> {
    let (c, p, s) = (cfg.hidden_size, cfg.patch_size, cfg.image_size);
    let heads = cfg.num_attention_heads;
    if heads == 0 || c % heads != 0 || p == 0 || s % p != 0 || cfg.window_size == 0 {
        return Err(Error::Graph(format!(
            "sam: invalid geometry (hidden {c}, heads {heads}, image {s}, patch {p}, window {})",
            cfg.window_size
        )));
    }
    let last = check_indexes("sam", keep, cfg.num_hidden_layers)?;
    let (g, hd, mlp) = (cfg.grid(), c / heads, cfg.mlp_dim);
    let t = g * g;
    let eps = cfg.layer_norm_eps as f32;

    let mut gr = Graph::new();
    let input = gr.input("input.sam_pixel_values", [1, 3, s, s])?;
    let w = gr.weight(
        "sam.patch_embed.w",
        vb.get("patch_embed.projection.weight", &[c, 3, p, p])?,
    )?;
    let b = gr.weight(
        "sam.patch_embed.b",
        vb.get("patch_embed.projection.bias", &[c])?,
    )?;
    let x = gr.push(
        "sam.patch_embed",
        Op::Conv2d { stride: p, pad: 0 },
        &[input, w, b],
    )?;
    // [1, C, G, G] -> [1, G, G, C] -> tokens [G·G, C]
    let x = gr.push("sam.patch_embed.nhwc", Op::Permute(vec![0, 2, 3, 1]), &[x])?;
    let x = gr.push("sam.patch_embed.tokens", Op::Reshape([t, c].into()), &[x])?;
    let pos = vb.get("pos_embed", &[1, g, g, c])?.reshape([t, c])?;
    let pos = gr.weight("sam.pos_embed", pos)?;
    let mut x = gr.push("sam.embeddings", Op::Add, &[x, pos])?;

    let mut hidden = Vec::new();
    let mut keep_node = |gr: &mut Graph, k: usize, x: NodeId| -> Result<()> {
        if keep.contains(&k) {
            let n = gr.push(
                format!("sam.hidden_states.{k}"),
                Op::Reshape([1, g, g, c].into()),
                &[x],
            )?;
            gr.mark_output(n);
            hidden.push((k, n));
        }
        Ok(())
    };
    keep_node(&mut gr, 0, x)?;
    for i in 0..last {
        let l = vb.pp(format!("layers.{i}"));
        let n = |s: &str| format!("sam.blk{i}.{s}");
        let wt = |gr: &mut Graph, name: &str, key: &str, dims: &[usize]| -> Result<NodeId> {
            gr.weight(n(name), l.get(key, dims)?)
        };
        let side = cfg.attn_side(i);
        let window = (!cfg.is_global(i)).then_some(cfg.window_size);

        let ln_w = wt(&mut gr, "ln1.w", "layer_norm1.weight", &[c])?;
        let ln_b = wt(&mut gr, "ln1.b", "layer_norm1.bias", &[c])?;
        let h = gr.push(n("ln1"), Op::LayerNorm { eps }, &[x, ln_w, ln_b])?;
        let qkv_w = wt(&mut gr, "qkv.w", "attn.qkv.weight", &[3 * c, c])?;
        let qkv_b = wt(&mut gr, "qkv.b", "attn.qkv.bias", &[3 * c])?;
        let qkv = gr.push(n("qkv"), Op::Linear, &[h, qkv_w, qkv_b])?;
        let rh = wt(&mut gr, "rel_pos_h", "attn.rel_pos_h", &[2 * side - 1, hd])?;
        let rw = wt(&mut gr, "rel_pos_w", "attn.rel_pos_w", &[2 * side - 1, hd])?;
        let attn = Op::SamAttention {
            heads,
            window,
            grid_h: g,
            grid_w: g,
        };
        let a = gr.push(n("attn"), attn, &[qkv, rh, rw, qkv_b])?;
        let pw = wt(&mut gr, "proj.w", "attn.proj.weight", &[c, c])?;
        let pb = wt(&mut gr, "proj.b", "attn.proj.bias", &[c])?;
        let a = gr.push(n("attn.proj"), Op::Linear, &[a, pw, pb])?;
        x = gr.push(n("attn.residual"), Op::Add, &[x, a])?;

        let ln_w = wt(&mut gr, "ln2.w", "layer_norm2.weight", &[c])?;
        let ln_b = wt(&mut gr, "ln2.b", "layer_norm2.bias", &[c])?;
        let h = gr.push(n("ln2"), Op::LayerNorm { eps }, &[x, ln_w, ln_b])?;
        let w1 = wt(&mut gr, "lin1.w", "mlp.lin1.weight", &[mlp, c])?;
        let b1 = wt(&mut gr, "lin1.b", "mlp.lin1.bias", &[mlp])?;
        let h = gr.push(n("mlp.lin1"), Op::Linear, &[h, w1, b1])?;
        let h = gr.push(n("mlp.gelu"), Op::Unary(Unary::GeluErf), &[h])?;
        let w2 = wt(&mut gr, "lin2.w", "mlp.lin2.weight", &[c, mlp])?;
        let b2 = wt(&mut gr, "lin2.b", "mlp.lin2.bias", &[c])?;
        let h = gr.push(n("mlp.lin2"), Op::Linear, &[h, w2, b2])?;
        x = gr.push(n("out"), Op::Add, &[x, h])?;
        keep_node(&mut gr, i + 1, x)?;
    }
    Ok(EncoderGraph {
        graph: gr,
        input,
        hidden_states: hidden,
    })
}

/// The SAM `hidden_states` indexes X-SAM reads (connector levels and the seg projector),
/// ascending, without duplicates (12, 18, 23, 24 at full size).
pub fn xsam_hidden_states(config: &Config) -> Vec<usize> {
    let mut v: Vec<usize> = config.connector.select_layers.clone();
    v.push(config.seg_select_index());
    v.sort_unstable();
    v.dedup();
    v
}

/// A planned SAM encoder ready to run.
pub struct SamEncoder {
    pub cfg: SamConfig,
    pub built: EncoderGraph,
    pub plan: Plan,
}

impl SamEncoder {
    pub fn new(cfg: &SamConfig, vb: &VarBuilder, keep: &[usize]) -> Result<Self> {
        let built = build(cfg, vb, keep)?;
        let plan = Plan::new(&built.graph, &[])?;
        Ok(Self {
            cfg: cfg.clone(),
            built,
            plan,
        })
    }

    /// Keeps the states X-SAM reads: the connector's `select_layers` and the seg projector's
    /// `seg_select_layer`, deduplicated, ascending.
    pub fn for_xsam(config: &Config, vb: &VarBuilder) -> Result<Self> {
        Self::new(&config.sam, vb, &xsam_hidden_states(config))
    }

    /// Arena bytes one forward needs (the planner's peak).
    pub fn peak_bytes(&self) -> usize {
        self.plan.peak_bytes
    }

    /// Runs on `pixel_values [1, 3, S, S]`; returns `(k, hidden_states[k] [1, G, G, C])` in the
    /// order requested.
    pub fn forward(
        &self,
        exec: &mut dyn GraphExecutor,
        pixel_values: &Tensor,
    ) -> Result<Vec<(usize, Tensor)>> {
        let s = self.cfg.image_size;
        if pixel_values.dims() != [1, 3, s, s] {
            return Err(Error::Input(format!(
                "SAM pixel values are {}, expected [1, 3, {s}, {s}]",
                pixel_values.shape()
            )));
        }
        self.built.run(exec, &self.plan, pixel_values)
    }
}
