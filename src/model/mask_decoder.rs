//! The Mask2Former masked-attention transformer decoder in X-SAM's variant (architecture notes
//! §10) with the LLM-conditioned cosine class head (§11).
//!
//! * Queries: content `queries_features` **plus the `<SEG>` embedding** (every query), positional
//!   `queries_embedder`.
//! * Memory of level l (`pixel_decoder.multi_scale.{l}`, lowest resolution first): tokens
//!   `+ level_embed[l]`; keys add the sine position embedding, values do not.
//! * `decoder_layers − 1` layers; layer i attends level `i mod 3` and is post-norm in the order
//!   masked cross-attention (torch `nn.MultiheadAttention`, packed `[q; k; v]`) → self-attention
//!   → FFN (ReLU).
//! * A shared prediction head after the initial queries and after every layer:
//!   `q̂ = decoder.layernorm(x)`, mask logits = `MLP₃(q̂) · mask_features`, class logits
//!   = `clamp(exp(logit_scale) · cos(q̂, class table), ±500)`.
//! * Layer i's attention mask comes from prediction i: mask logits bilinearly resized
//!   (align_corners=False) to level `i mod 3`, blocked where `sigmoid < 0.5`; a query blocked
//!   everywhere is unblocked (the attention op's rule for rows without a kept key).
//!
//! Node names: `mask_decoder.layer{i}.{cross_attn,self_attn}`, `mask_decoder.layer{i}` (raw
//! layer output), `mask_decoder.layer{i}.attn_keep`, `mask_decoder.pred{i}.{query,mask_logits,
//! class_logits}`, and the last prediction as `final.class_logits` `[Q, K+1]` and
//! `final.mask_logits` `[Q, H, W]`.

use crate::graph::op::{SegOp, Unary};
use crate::graph::{Graph, GraphExecutor, NodeId, Op};
use crate::model::config::{Config, DecoderConfig};
use crate::model::pixel_decoder::{sine_position_embedding, transpose, Linear, Norm, PosCache};
use crate::model::projector::run_graph;
use crate::weights::VarBuilder;
use crate::{Error, Result, Tensor};

const LN_EPS: f32 = 1e-5;
/// Class logits are clamped to ±this (X-SAM `get_class_prediction`).
pub const CLASS_LOGIT_CLAMP: f32 = 500.0;
/// `F.normalize` epsilon.
const NORMALIZE_EPS: f32 = 1e-12;

#[derive(Clone, Debug)]
struct Layer {
    /// `cross_attn.in_proj_{weight,bias}` split into its q, k, v rows.
    cross_q: Linear,
    cross_k: Linear,
    cross_v: Linear,
    cross_out: Linear,
    cross_norm: Norm,
    self_q: Linear,
    self_k: Linear,
    self_v: Linear,
    self_out: Linear,
    self_norm: Norm,
    fc1: Linear,
    fc2: Linear,
    final_norm: Norm,
}

/// The transformer decoder's and class head's weights.
#[derive(Clone, Debug)]
pub struct MaskDecoder {
    cfg: DecoderConfig,
    queries_features: Tensor,
    queries_embedder: Tensor,
    /// `[levels, hidden]` rows as tensors `[hidden]`.
    level_embed: Vec<Tensor>,
    layers: Vec<Layer>,
    layernorm: Norm,
    mask_mlp: [Linear; 3],
    /// `exp(segmentor.logit_scale)`.
    logit_scale_exp: f32,
    pos_cache: PosCache,
}

/// The nodes a built decoder returns.
#[derive(Clone, Debug)]
pub struct MaskDecoderNodes {
    /// `final.class_logits` `[Q, K+1]`.
    pub class_logits: NodeId,
    /// `final.mask_logits` `[Q, H, W]`.
    pub mask_logits: NodeId,
    /// Every prediction `(class_logits [Q, K+1], mask_logits [Q, H, W])`, the initial one first.
    pub predictions: Vec<(NodeId, NodeId)>,
}

/// The last prediction.
#[derive(Clone, Debug)]
pub struct MaskDecoderOutput {
    /// `[Q, K+1]` (the class table's rows: phrases then background).
    pub class_logits: Tensor,
    /// `[Q, H, W]` at the mask-feature resolution (stride 8), before any upsampling.
    pub mask_logits: Tensor,
}

fn split_rows(t: &Tensor, part: usize, e: usize) -> Result<Tensor> {
    let rows = t.dims()[0];
    let n = rows / 3;
    let s = t.narrow(0, part * n, n)?.contiguous()?;
    if t.rank() == 2 {
        s.reshape([n, e])
    } else {
        s.reshape([n])
    }
}

impl MaskDecoder {
    /// Loads `segmentor.decoder.*` and `segmentor.logit_scale` from the checkpoint root.
    pub fn load(root: &VarBuilder, cfg: &Config) -> Result<Self> {
        let d = cfg.decoder.clone();
        let (e, q, nl) = (d.hidden_dim, d.num_queries, d.num_feature_levels);
        let vb = root.pp("segmentor.decoder");
        let le = vb.get_f32("level_embed.weight", &[nl, e])?;
        let level_embed = (0..nl)
            .map(|l| le.narrow(0, l, 1)?.contiguous()?.reshape([e]))
            .collect::<Result<Vec<_>>>()?;
        let dec = vb.pp("decoder");
        let layers = (0..d.num_layers())
            .map(|i| {
                let p = dec.pp(format!("layers.{i}"));
                let ca = p.pp("cross_attn");
                let w = ca.get("in_proj_weight", &[3 * e, e])?;
                let b = ca.get("in_proj_bias", &[3 * e])?;
                let part = |k: usize| -> Result<Linear> {
                    Ok(Linear {
                        w: split_rows(&w, k, e)?,
                        b: split_rows(&b, k, e)?,
                    })
                };
                Ok(Layer {
                    cross_q: part(0)?,
                    cross_k: part(1)?,
                    cross_v: part(2)?,
                    cross_out: Linear::load(&ca.pp("out_proj"), e, e)?,
                    cross_norm: Norm::load(&p.pp("cross_attn_layer_norm"), e)?,
                    self_q: Linear::load(&p.pp("self_attn.q_proj"), e, e)?,
                    self_k: Linear::load(&p.pp("self_attn.k_proj"), e, e)?,
                    self_v: Linear::load(&p.pp("self_attn.v_proj"), e, e)?,
                    self_out: Linear::load(&p.pp("self_attn.out_proj"), e, e)?,
                    self_norm: Norm::load(&p.pp("self_attn_layer_norm"), e)?,
                    fc1: Linear::load(&p.pp("fc1"), d.dim_feedforward, e)?,
                    fc2: Linear::load(&p.pp("fc2"), e, d.dim_feedforward)?,
                    final_norm: Norm::load(&p.pp("final_layer_norm"), e)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mp = dec.pp("mask_predictor.mask_embedder");
        let logit_scale = root.get_f32("segmentor.logit_scale", &[1])?.to_vec_f32()?[0];
        Ok(MaskDecoder {
            queries_features: vb.get("queries_features.weight", &[q, e])?,
            queries_embedder: vb.get("queries_embedder.weight", &[q, e])?,
            level_embed,
            layers,
            layernorm: Norm::load(&dec.pp("layernorm"), e)?,
            mask_mlp: [
                Linear::load(&mp.pp("0.0"), e, e)?,
                Linear::load(&mp.pp("1.0"), e, e)?,
                Linear::load(&mp.pp("2.0"), d.mask_feature_size, e)?,
            ],
            logit_scale_exp: logit_scale.exp(),
            pos_cache: PosCache::default(),
            cfg: d,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Appends the decoder. `multi_scale`: `[1, hidden, h_l, w_l]` lowest resolution first;
    /// `mask_features`: `[1, mask_dim, H, W]`; `seg_embed`: `[hidden]`; `class_table`:
    /// `[K+1, hidden]` (phrase embeddings then the background embedding).
    pub fn build(
        &self,
        g: &mut Graph,
        multi_scale: &[NodeId],
        mask_features: NodeId,
        seg_embed: NodeId,
        class_table: NodeId,
    ) -> Result<MaskDecoderNodes> {
        let d = &self.cfg;
        let (e, nq, nl, m) = (
            d.hidden_dim,
            d.num_queries,
            d.num_feature_levels,
            d.mask_feature_size,
        );
        let heads = d.num_attention_heads;
        let bad = |what: &str, s: &crate::Shape, want: String| {
            Error::shape("mask_decoder", format!("{what} is {s}, expected {want}"))
        };
        if multi_scale.len() != nl {
            return Err(Error::Input(format!(
                "mask decoder: {} feature levels, expected {nl}",
                multi_scale.len()
            )));
        }
        let mf = g.shape(mask_features).clone();
        if mf.rank() != 4 || mf.dims()[0] != 1 || mf.dims()[1] != m {
            return Err(bad("mask_features", &mf, format!("[1, {m}, H, W]")));
        }
        let (mh, mw) = (mf.dims()[2], mf.dims()[3]);
        if g.shape(seg_embed).dims() != [e] {
            return Err(bad("seg_embed", g.shape(seg_embed), format!("[{e}]")));
        }
        let ct = g.shape(class_table).clone();
        if ct.rank() != 2 || ct.dims()[1] != e || ct.dims()[0] == 0 {
            return Err(bad("class_table", &ct, format!("[K+1, {e}]")));
        }

        // memory and key positions per level
        let mut mem = Vec::with_capacity(nl);
        let mut keys = Vec::with_capacity(nl);
        let mut sizes = Vec::with_capacity(nl);
        for (l, &f) in multi_scale.iter().enumerate() {
            let s = g.shape(f).clone();
            if s.rank() != 4 || s.dims()[0] != 1 || s.dims()[1] != e {
                return Err(bad(&format!("level {l}"), &s, format!("[1, {e}, h, w]")));
            }
            let (h, w) = (s.dims()[2], s.dims()[3]);
            sizes.push((h, w));
            let p = format!("mask_decoder.memory.{l}");
            let flat = g.push(format!("{p}.flat"), Op::Reshape([e, h * w].into()), &[f])?;
            let tok = g.push(format!("{p}.tokens"), Op::Permute(vec![1, 0]), &[flat])?;
            let le = g.weight(format!("{p}.level_embed"), self.level_embed[l].clone())?;
            let x = g.push(p.clone(), Op::AddRow, &[tok, le])?;
            let pos = self.pos_cache.get(vec![h, w], || {
                let pos = transpose(&sine_position_embedding(h, w, e / 2), e, h * w);
                Tensor::from_f32(pos, [h * w, e])
            })?;
            let pos = g.weight(format!("{p}.pos"), pos)?;
            keys.push(g.push(format!("{p}.keys"), Op::Add, &[x, pos])?);
            mem.push(x);
        }
        let mf_flat = g.push(
            "mask_decoder.mask_features",
            Op::Reshape([m, mh * mw].into()),
            &[mask_features],
        )?;
        let table_n = g.push(
            "mask_decoder.class_table_normalized",
            Op::Seg(SegOp::L2Normalize { eps: NORMALIZE_EPS }),
            &[class_table],
        )?;

        // queries
        let qf = g.weight(
            "mask_decoder.queries_features",
            self.queries_features.clone(),
        )?;
        let mut x = g.push("mask_decoder.queries", Op::AddRow, &[qf, seg_embed])?;
        let qpos = g.weight(
            "mask_decoder.queries_embedder",
            self.queries_embedder.clone(),
        )?;

        let scale = 1.0 / ((e / heads) as f32).sqrt();
        let attn = Op::Attention {
            heads,
            scale,
            causal: false,
            window: None,
            q_offset: 0,
        };
        let ln = Op::LayerNorm { eps: LN_EPS };
        let nlayers = self.layers.len();
        let mut predictions = Vec::with_capacity(nlayers + 1);
        // prediction i, and the attention mask it sets for layer i (when there is one)
        let mut predict = |g: &mut Graph, x: NodeId, i: usize| -> Result<Option<NodeId>> {
            let p = |s: &str| format!("mask_decoder.pred{i}.{s}");
            let q = self.layernorm.push(g, p("query"), ln.clone(), x)?;
            let h = self.mask_mlp[0].push(g, p("mask_mlp0"), q)?;
            let h = g.push(p("mask_mlp0.relu"), Op::Unary(Unary::Relu), &[h])?;
            let h = self.mask_mlp[1].push(g, p("mask_mlp1"), h)?;
            let h = g.push(p("mask_mlp1.relu"), Op::Unary(Unary::Relu), &[h])?;
            let emb = self.mask_mlp[2].push(g, p("mask_embed"), h)?;
            let ml = g.push(
                p("mask_logits_flat"),
                Op::MatMul {
                    b_transposed: false,
                },
                &[emb, mf_flat],
            )?;
            let ml = g.push(p("mask_logits"), Op::Reshape([nq, mh, mw].into()), &[ml])?;
            let qn = g.push(
                p("query_normalized"),
                Op::Seg(SegOp::L2Normalize { eps: NORMALIZE_EPS }),
                &[q],
            )?;
            let cos = g.push(
                p("cosine"),
                Op::MatMul { b_transposed: true },
                &[qn, table_n],
            )?;
            let sc = g.push(p("scaled"), Op::Scale(self.logit_scale_exp), &[cos])?;
            let cl = g.push(
                p("class_logits"),
                Op::Seg(SegOp::Clamp {
                    min: -CLASS_LOGIT_CLAMP,
                    max: CLASS_LOGIT_CLAMP,
                }),
                &[sc],
            )?;
            predictions.push((cl, ml));
            if i >= nlayers {
                return Ok(None);
            }
            let (h, w) = sizes[i % nl];
            let r = g.push(
                format!("mask_decoder.layer{i}.attn_logits"),
                Op::ResizeBilinear {
                    out_h: h,
                    out_w: w,
                    align_corners: false,
                },
                &[ml],
            )?;
            let k = g.push(
                format!("mask_decoder.layer{i}.attn_keep_map"),
                Op::Seg(SegOp::MaskKeep),
                &[r],
            )?;
            Ok(Some(g.push(
                format!("mask_decoder.layer{i}.attn_keep"),
                Op::Reshape([nq, h * w].into()),
                &[k],
            )?))
        };

        let mut keep = predict(g, x, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let l = i % nl;
            let p = |s: &str| format!("mask_decoder.layer{i}.{s}");
            let keep_i = keep.ok_or_else(|| Error::Graph("missing attention mask".into()))?;
            // masked cross-attention
            let qin = g.push(p("cross_attn.query_in"), Op::Add, &[x, qpos])?;
            let q = layer.cross_q.push(g, p("cross_attn.q"), qin)?;
            let k = layer.cross_k.push(g, p("cross_attn.k"), keys[l])?;
            let v = layer.cross_v.push(g, p("cross_attn.v"), mem[l])?;
            let a = g.push(p("cross_attn.attn"), attn.clone(), &[q, k, v, keep_i])?;
            let o = layer.cross_out.push(g, p("cross_attn.out"), a)?;
            let r = g.push(p("cross_attn.residual"), Op::Add, &[x, o])?;
            x = layer.cross_norm.push(g, p("cross_attn"), ln.clone(), r)?;
            // self-attention
            let qin = g.push(p("self_attn.query_in"), Op::Add, &[x, qpos])?;
            let q = layer.self_q.push(g, p("self_attn.q"), qin)?;
            let k = layer.self_k.push(g, p("self_attn.k"), qin)?;
            let v = layer.self_v.push(g, p("self_attn.v"), x)?;
            let a = g.push(p("self_attn.attn"), attn.clone(), &[q, k, v])?;
            let o = layer.self_out.push(g, p("self_attn.out"), a)?;
            let r = g.push(p("self_attn.residual"), Op::Add, &[x, o])?;
            x = layer.self_norm.push(g, p("self_attn"), ln.clone(), r)?;
            // FFN
            let h = layer.fc1.push(g, p("fc1"), x)?;
            let h = g.push(p("relu"), Op::Unary(Unary::Relu), &[h])?;
            let h = layer.fc2.push(g, p("fc2"), h)?;
            let r = g.push(p("ffn_residual"), Op::Add, &[x, h])?;
            x = layer
                .final_norm
                .push(g, format!("mask_decoder.layer{i}"), ln.clone(), r)?;
            keep = predict(g, x, i + 1)?;
        }
        let (cl, ml) = *predictions
            .last()
            .ok_or_else(|| Error::Graph("no prediction".into()))?;
        let class_logits = g.push(
            "final.class_logits",
            Op::Reshape(g.shape(cl).clone()),
            &[cl],
        )?;
        let mask_logits = g.push("final.mask_logits", Op::Reshape(g.shape(ml).clone()), &[ml])?;
        Ok(MaskDecoderNodes {
            class_logits,
            mask_logits,
            predictions,
        })
    }

    /// Runs the decoder alone: `multi_scale` `[1, hidden, h, w]` (lowest resolution first),
    /// `mask_features` `[1, mask_dim, H, W]`, `seg_embed` `[hidden]`, `class_table`
    /// `[K+1, hidden]`.
    pub fn forward(
        &self,
        exec: &mut dyn GraphExecutor,
        multi_scale: &[&Tensor],
        mask_features: &Tensor,
        seg_embed: &Tensor,
        class_table: &Tensor,
    ) -> Result<MaskDecoderOutput> {
        let (out, _) = self.forward_keep(
            exec,
            multi_scale,
            mask_features,
            seg_embed,
            class_table,
            &[],
        )?;
        Ok(out)
    }

    /// [`forward`](Self::forward), also returning the named intermediate nodes `keep`
    /// (e.g. `mask_decoder.pred0.mask_logits`, `mask_decoder.layer1.attn_keep`).
    pub fn forward_keep(
        &self,
        exec: &mut dyn GraphExecutor,
        multi_scale: &[&Tensor],
        mask_features: &Tensor,
        seg_embed: &Tensor,
        class_table: &Tensor,
        keep: &[&str],
    ) -> Result<(MaskDecoderOutput, Vec<Tensor>)> {
        let mut g = Graph::new();
        let mut feeds: Vec<(NodeId, &Tensor)> = Vec::new();
        let mut ms = Vec::new();
        for (l, t) in multi_scale.iter().enumerate() {
            let id = g.input(format!("pixel_decoder.multi_scale.{l}"), t.shape().clone())?;
            feeds.push((id, t));
            ms.push(id);
        }
        let mf = g.input("pixel_decoder.mask_features", mask_features.shape().clone())?;
        let seg = g.input("proj.seg_embed", seg_embed.shape().clone())?;
        let table = g.input("class_table", class_table.shape().clone())?;
        feeds.extend([(mf, mask_features), (seg, seg_embed), (table, class_table)]);
        let nodes = self.build(&mut g, &ms, mf, seg, table)?;
        g.mark_output(nodes.class_logits);
        g.mark_output(nodes.mask_logits);
        let keep_ids = keep
            .iter()
            .map(|k| {
                g.find(k)
                    .ok_or_else(|| Error::Graph(format!("no node named `{k}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut vals = run_graph(exec, &g, &feeds, &keep_ids)?;
        let kept = keep_ids
            .iter()
            .map(|&k| vals.take(k))
            .collect::<Result<Vec<_>>>()?;
        Ok((
            MaskDecoderOutput {
                class_logits: vals.take(nodes.class_logits)?,
                mask_logits: vals.take(nodes.mask_logits)?,
            },
            kept,
        ))
    }
}
