//! The Mask2Former pixel decoder in X-SAM's configuration (architecture notes §9): three levels,
//! a multi-scale deformable-attention encoder, one FPN level whose lateral input is the
//! stride-8 connector map, mask features at stride 8.
//!
//! Levels in transformer order are the connector outputs reversed (lowest resolution first):
//! `input_projections.{l}` (conv1x1 + GroupNorm) → flattened and concatenated tokens
//! `[Σ h·w, hidden]`; positions = sine embedding (y half first, interleaved sin/cos, normalised)
//! plus `level_embed[l]`, added to the queries of the deformable attention, not to its values.
//! Encoder layers are post-norm: `x = LN(x + MSDeformAttn(x + pos))`,
//! `x = LN(x + fc2(ReLU(fc1 x)))`. The output is split back per level
//! (`pixel_decoder.multi_scale.{0,1,2}`); the FPN adds the lateral `GN(conv1x1(connector level
//! 0))` to the (bilinearly resized) highest-resolution level, then `ReLU(GN(conv3x3))`; the mask
//! projection (conv1x1 with bias) gives `pixel_decoder.mask_features`.

use crate::graph::op::{SegOp, Unary};
use crate::graph::{Graph, GraphExecutor, NodeId, Op};
use crate::model::config::{Config, DecoderConfig};
use crate::model::projector::run_graph;
use crate::weights::VarBuilder;
use crate::{Error, Result, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// `nn.GroupNorm` / `nn.LayerNorm` default epsilon.
const NORM_EPS: f32 = 1e-5;

/// Mask2Former's sine position embedding (`normalize=True`, scale 2π, temperature 10000) of an
/// `h × w` map: `[2·feats, h, w]` channels-first, y-embedding in channels `0..feats`, x in
/// `feats..2·feats`; channel `2k` is the sine and `2k + 1` the cosine of the same frequency.
/// Computed in f32 with the reference's sequence of operations.
pub fn sine_position_embedding(h: usize, w: usize, feats: usize) -> Vec<f32> {
    const EPS: f32 = 1e-6;
    let scale = 2.0 * std::f32::consts::PI;
    let dim_t: Vec<f32> = (0..feats)
        .map(|i| 10000f32.powf(2.0 * (i / 2) as f32 / feats as f32))
        .collect();
    let y: Vec<f32> = (0..h)
        .map(|i| (i + 1) as f32 / (h as f32 + EPS) * scale)
        .collect();
    let x: Vec<f32> = (0..w)
        .map(|j| (j + 1) as f32 / (w as f32 + EPS) * scale)
        .collect();
    let mut out = vec![0f32; 2 * feats * h * w];
    let hw = h * w;
    for (k, &d) in dim_t.iter().enumerate() {
        let f = |p: f32| {
            if k % 2 == 0 {
                (p / d).sin()
            } else {
                (p / d).cos()
            }
        };
        let (ych, xch) = (k * hw, (feats + k) * hw);
        for i in 0..h {
            let vy = f(y[i]);
            for j in 0..w {
                out[ych + i * w + j] = vy;
                out[xch + i * w + j] = f(x[j]);
            }
        }
    }
    out
}

/// Position tables by geometry (they depend on the map sizes only, and cost millions of
/// sin/cos at the released sizes): computed on the first forward, shared by clones.
#[derive(Clone, Debug, Default)]
pub(crate) struct PosCache(Arc<Mutex<HashMap<Vec<usize>, Tensor>>>);

impl PosCache {
    pub(crate) fn get(
        &self,
        key: Vec<usize>,
        make: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = m.get(&key) {
            return Ok(t.clone());
        }
        let t = make()?;
        m.insert(key, t.clone());
        Ok(t)
    }
}

/// `[c, n]` → `[n, c]`.
pub(crate) fn transpose(x: &[f32], c: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for ci in 0..c {
        for t in 0..n {
            out[t * c + ci] = x[ci * n + t];
        }
    }
    out
}

/// A `Linear` with bias, as graph weights (shared with the mask decoder).
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    pub(crate) w: Tensor,
    pub(crate) b: Tensor,
}

impl Linear {
    pub(crate) fn load(vb: &VarBuilder, out: usize, inp: usize) -> Result<Self> {
        Ok(Linear {
            w: vb.get("weight", &[out, inp])?,
            b: vb.get("bias", &[out])?,
        })
    }

    pub(crate) fn push(&self, g: &mut Graph, name: String, x: NodeId) -> Result<NodeId> {
        let w = g.weight(format!("{name}.weight"), self.w.clone())?;
        let b = g.weight(format!("{name}.bias"), self.b.clone())?;
        g.push(name, Op::Linear, &[x, w, b])
    }
}

/// A norm's affine parameters (LayerNorm, GroupNorm, LayerNorm2d).
#[derive(Clone, Debug)]
pub(crate) struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    pub(crate) fn load(vb: &VarBuilder, n: usize) -> Result<Self> {
        Ok(Norm {
            w: vb.get("weight", &[n])?,
            b: vb.get("bias", &[n])?,
        })
    }

    pub(crate) fn push(&self, g: &mut Graph, name: String, op: Op, x: NodeId) -> Result<NodeId> {
        let w = g.weight(format!("{name}.weight"), self.w.clone())?;
        let b = g.weight(format!("{name}.bias"), self.b.clone())?;
        g.push(name, op, &[x, w, b])
    }
}

#[derive(Clone, Debug)]
struct EncoderLayer {
    sampling_offsets: Linear,
    attention_weights: Linear,
    value_proj: Linear,
    output_proj: Linear,
    self_attn_layer_norm: Norm,
    fc1: Linear,
    fc2: Linear,
    final_layer_norm: Norm,
}

/// The pixel decoder's weights.
#[derive(Clone, Debug)]
pub struct PixelDecoder {
    cfg: DecoderConfig,
    /// `[levels, hidden]` as f32.
    level_embed: Vec<f32>,
    /// Transformer order (lowest resolution first): conv1x1 (with bias) + GroupNorm.
    input_proj: Vec<(Tensor, Tensor, Norm)>,
    layers: Vec<EncoderLayer>,
    /// `adapter_1`: conv1x1 (no bias) + GroupNorm on the highest-resolution connector map.
    lateral: (Tensor, Norm),
    /// `layer_1`: conv3x3 (no bias) + GroupNorm + ReLU.
    output: (Tensor, Norm),
    mask_projection: (Tensor, Tensor),
    /// Connector output channels, highest resolution first.
    feature_channels: Vec<usize>,
    pos_cache: PosCache,
}

/// The nodes a built pixel decoder returns.
#[derive(Clone, Debug)]
pub struct PixelDecoderNodes {
    /// `pixel_decoder.multi_scale.{l}` `[1, hidden, h, w]`, lowest resolution first.
    pub multi_scale: Vec<NodeId>,
    /// `pixel_decoder.mask_features` `[1, mask_dim, H, W]`.
    pub mask_features: NodeId,
}

/// Values of a pixel-decoder run.
#[derive(Clone, Debug)]
pub struct PixelDecoderOutput {
    pub multi_scale: Vec<Tensor>,
    pub mask_features: Tensor,
}

impl PixelDecoder {
    /// Loads `segmentor.pixel_decoder.*` from the checkpoint root.
    pub fn load(root: &VarBuilder, cfg: &Config) -> Result<Self> {
        let d = cfg.decoder.clone();
        let vb = root.pp("segmentor.pixel_decoder");
        let e = d.hidden_dim;
        let levels = d.num_feature_levels;
        let feature_channels = cfg.connector_out_channels();
        if feature_channels.len() != levels {
            return Err(Error::Input(format!(
                "pixel decoder: {} connector levels for {levels} feature levels",
                feature_channels.len()
            )));
        }
        let level_embed = vb.get_f32("level_embed", &[levels, e])?.to_vec_f32()?;
        let input_proj = (0..levels)
            .map(|l| {
                let p = vb.pp(format!("input_projections.{l}"));
                let cin = feature_channels[levels - 1 - l];
                Ok((
                    p.get("0.weight", &[e, cin, 1, 1])?,
                    p.get("0.bias", &[e])?,
                    Norm::load(&p.pp("1"), e)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let (heads, pts) = (d.num_attention_heads, d.encoder_n_points);
        let layers = (0..d.encoder_layers)
            .map(|i| {
                let p = vb.pp(format!("encoder.layers.{i}"));
                let a = p.pp("self_attn");
                Ok(EncoderLayer {
                    sampling_offsets: Linear::load(
                        &a.pp("sampling_offsets"),
                        heads * levels * pts * 2,
                        e,
                    )?,
                    attention_weights: Linear::load(
                        &a.pp("attention_weights"),
                        heads * levels * pts,
                        e,
                    )?,
                    value_proj: Linear::load(&a.pp("value_proj"), e, e)?,
                    output_proj: Linear::load(&a.pp("output_proj"), e, e)?,
                    self_attn_layer_norm: Norm::load(&p.pp("self_attn_layer_norm"), e)?,
                    fc1: Linear::load(&p.pp("fc1"), d.encoder_feedforward_dim, e)?,
                    fc2: Linear::load(&p.pp("fc2"), e, d.encoder_feedforward_dim)?,
                    final_layer_norm: Norm::load(&p.pp("final_layer_norm"), e)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lat_in = feature_channels[0];
        Ok(PixelDecoder {
            level_embed,
            input_proj,
            layers,
            lateral: (
                vb.get("adapter_1.0.weight", &[e, lat_in, 1, 1])?,
                Norm::load(&vb.pp("adapter_1.1"), e)?,
            ),
            output: (
                vb.get("layer_1.0.weight", &[e, e, 3, 3])?,
                Norm::load(&vb.pp("layer_1.1"), e)?,
            ),
            mask_projection: (
                vb.get("mask_projection.weight", &[d.mask_feature_size, e, 1, 1])?,
                vb.get("mask_projection.bias", &[d.mask_feature_size])?,
            ),
            feature_channels,
            pos_cache: PosCache::default(),
            cfg: d,
        })
    }

    /// Appends the pixel decoder on the connector outputs (`[1, C_i, H_i, W_i]`, highest
    /// resolution first).
    pub fn build(&self, g: &mut Graph, features: &[NodeId]) -> Result<PixelDecoderNodes> {
        let d = &self.cfg;
        let (e, nl) = (d.hidden_dim, d.num_feature_levels);
        let gn = Op::GroupNorm {
            groups: d.group_norm_groups,
            eps: NORM_EPS,
        };
        let ln = Op::LayerNorm { eps: NORM_EPS };
        if features.len() != nl {
            return Err(Error::Input(format!(
                "pixel decoder: {} feature maps for {nl} levels",
                features.len()
            )));
        }
        for (i, &f) in features.iter().enumerate() {
            let s = g.shape(f).dims();
            if s.len() != 4 || s[0] != 1 || s[1] != self.feature_channels[i] {
                return Err(Error::shape(
                    "pixel_decoder",
                    format!(
                        "feature {i} is {s:?}, expected [1, {}, h, w]",
                        self.feature_channels[i]
                    ),
                ));
            }
        }

        // input projections, flattened tokens and positions, transformer level order
        let mut sizes = Vec::with_capacity(nl);
        let mut tokens = Vec::with_capacity(nl);
        for l in 0..nl {
            let f = features[nl - 1 - l];
            let (h, w) = (g.shape(f).dims()[2], g.shape(f).dims()[3]);
            sizes.push((h, w));
            let (cw, cb, norm) = &self.input_proj[l];
            let p = format!("pixel_decoder.input_proj.{l}");
            let wn = g.weight(format!("{p}.conv.weight"), cw.clone())?;
            let bn = g.weight(format!("{p}.conv.bias"), cb.clone())?;
            let x = g.push(
                format!("{p}.conv"),
                Op::Conv2d { stride: 1, pad: 0 },
                &[f, wn, bn],
            )?;
            let x = norm.push(g, p.clone(), gn.clone(), x)?;
            let x = g.push(format!("{p}.flat"), Op::Reshape([e, h * w].into()), &[x])?;
            tokens.push(g.push(format!("{p}.tokens"), Op::Permute(vec![1, 0]), &[x])?);
        }
        let n: usize = sizes.iter().map(|&(h, w)| h * w).sum();
        let mut x = g.push("pixel_decoder.tokens", Op::Concat { axis: 0 }, &tokens)?;
        let key = sizes.iter().flat_map(|&(h, w)| [h, w]).collect();
        let pos = self.pos_cache.get(key, || {
            let mut pos = Vec::with_capacity(n * e);
            for (l, &(h, w)) in sizes.iter().enumerate() {
                let sine = transpose(&sine_position_embedding(h, w, e / 2), e, h * w);
                let le = &self.level_embed[l * e..(l + 1) * e];
                pos.extend(
                    sine.chunks(e)
                        .flat_map(|row| row.iter().zip(le).map(|(a, b)| a + b)),
                );
            }
            Tensor::from_f32(pos, [n, e])
        })?;
        let pos = g.weight("pixel_decoder.pos", pos)?;

        // deformable encoder
        let deform = Op::Seg(SegOp::MsDeformAttn {
            heads: d.num_attention_heads,
            points: d.encoder_n_points,
            levels: sizes.clone(),
        });
        for (i, layer) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("pixel_decoder.enc{i}.{s}");
            let q = g.push(p("query"), Op::Add, &[x, pos])?;
            let v = layer.value_proj.push(g, p("value"), x)?;
            let off = layer.sampling_offsets.push(g, p("offsets"), q)?;
            let aw = layer.attention_weights.push(g, p("attn_logits"), q)?;
            let a = g.push(p("deform"), deform.clone(), &[v, off, aw])?;
            let o = layer.output_proj.push(g, p("attn_out"), a)?;
            let r = g.push(p("attn_residual"), Op::Add, &[x, o])?;
            x = layer
                .self_attn_layer_norm
                .push(g, p("attn_norm"), ln.clone(), r)?;
            let h = layer.fc1.push(g, p("fc1"), x)?;
            let h = g.push(p("relu"), Op::Unary(Unary::Relu), &[h])?;
            let h = layer.fc2.push(g, p("fc2"), h)?;
            let r = g.push(p("ffn_residual"), Op::Add, &[x, h])?;
            x = layer
                .final_layer_norm
                .push(g, format!("pixel_decoder.enc{i}"), ln.clone(), r)?;
        }

        // back to maps
        let mut multi_scale = Vec::with_capacity(nl);
        let mut start = 0;
        for (l, &(h, w)) in sizes.iter().enumerate() {
            let p = format!("pixel_decoder.multi_scale.{l}");
            let t = g.push(
                format!("{p}.tokens"),
                Op::Narrow {
                    axis: 0,
                    start,
                    len: h * w,
                },
                &[x],
            )?;
            let t = g.push(format!("{p}.flat"), Op::Permute(vec![1, 0]), &[t])?;
            multi_scale.push(g.push(p, Op::Reshape([1, e, h, w].into()), &[t])?);
            start += h * w;
        }

        // FPN (one level) and mask projection
        let lat_in = features[0];
        let (hh, ww) = (g.shape(lat_in).dims()[2], g.shape(lat_in).dims()[3]);
        let lw = g.weight(
            "pixel_decoder.fpn.lateral.conv.weight",
            self.lateral.0.clone(),
        )?;
        let lat = g.push(
            "pixel_decoder.fpn.lateral.conv",
            Op::Conv2d { stride: 1, pad: 0 },
            &[lat_in, lw],
        )?;
        let lat = self
            .lateral
            .1
            .push(g, "pixel_decoder.fpn.lateral".into(), gn.clone(), lat)?;
        let mut top = multi_scale[nl - 1];
        let top_dims = g.shape(top).dims().to_vec();
        if (top_dims[2], top_dims[3]) != (hh, ww) {
            top = g.push(
                "pixel_decoder.fpn.upsample",
                Op::ResizeBilinear {
                    out_h: hh,
                    out_w: ww,
                    align_corners: false,
                },
                &[top],
            )?;
        }
        let y = g.push("pixel_decoder.fpn.sum", Op::Add, &[lat, top])?;
        let ow = g.weight("pixel_decoder.fpn.conv.weight", self.output.0.clone())?;
        let y = g.push(
            "pixel_decoder.fpn.conv",
            Op::Conv2d { stride: 1, pad: 1 },
            &[y, ow],
        )?;
        let y = self
            .output
            .1
            .push(g, "pixel_decoder.fpn.norm".into(), gn, y)?;
        let y = g.push("pixel_decoder.fpn", Op::Unary(Unary::Relu), &[y])?;
        let mw = g.weight(
            "pixel_decoder.mask_projection.weight",
            self.mask_projection.0.clone(),
        )?;
        let mb = g.weight(
            "pixel_decoder.mask_projection.bias",
            self.mask_projection.1.clone(),
        )?;
        let mask_features = g.push(
            "pixel_decoder.mask_features",
            Op::Conv2d { stride: 1, pad: 0 },
            &[y, mw, mb],
        )?;
        Ok(PixelDecoderNodes {
            multi_scale,
            mask_features,
        })
    }

    /// Runs the pixel decoder alone on the connector outputs; `keep` names extra nodes to
    /// return (e.g. `pixel_decoder.enc0`).
    pub fn forward(
        &self,
        exec: &mut dyn GraphExecutor,
        features: &[&Tensor],
    ) -> Result<PixelDecoderOutput> {
        let (out, _) = self.forward_keep(exec, features, &[])?;
        Ok(out)
    }

    /// [`forward`](Self::forward), also returning the named intermediate nodes `keep`.
    pub fn forward_keep(
        &self,
        exec: &mut dyn GraphExecutor,
        features: &[&Tensor],
        keep: &[&str],
    ) -> Result<(PixelDecoderOutput, Vec<Tensor>)> {
        let mut g = Graph::new();
        let ins = features
            .iter()
            .enumerate()
            .map(|(i, t)| g.input(format!("connector.level{i}"), t.shape().clone()))
            .collect::<Result<Vec<_>>>()?;
        let nodes = self.build(&mut g, &ins)?;
        for &m in &nodes.multi_scale {
            g.mark_output(m);
        }
        g.mark_output(nodes.mask_features);
        let keep_ids = keep
            .iter()
            .map(|k| {
                g.find(k)
                    .ok_or_else(|| Error::Graph(format!("no node named `{k}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let feeds: Vec<(NodeId, &Tensor)> =
            ins.iter().copied().zip(features.iter().copied()).collect();
        let mut vals = run_graph(exec, &g, &feeds, &keep_ids)?;
        let kept = keep_ids
            .iter()
            .map(|&k| vals.take(k))
            .collect::<Result<Vec<_>>>()?;
        Ok((
            PixelDecoderOutput {
                multi_scale: nodes
                    .multi_scale
                    .iter()
                    .map(|&m| vals.take(m))
                    .collect::<Result<_>>()?,
                mask_features: vals.take(nodes.mask_features)?,
            },
            kept,
        ))
    }
}
