//! The segmentation connector (`seg_connector`, type "conv"; architecture notes §8): per level,
//! a SAM hidden state `[1, G, G, C]` (channels-last) → channels-first →
//! `Conv1x1(C→h) → LN2d → Conv3x3(h→h, pad 1) → LN2d → Conv1x1(h→C·s) → LN2d` (no bias, no
//! activation; LN2d = SAM's channels-first LayerNorm, eps 1e-6) → X-SAM pixel-shuffle by the
//! level's scale s ∈ {2, 1, 0.5} (channels-first variant: to channels-last, shuffle, back).
//!
//! Outputs `connector.level{i}` `[1, C_i, H_i, W_i]`, highest resolution first (strides 8, 16, 32
//! in the released model: 512@128², 1024@64², 2048@32²).

use crate::graph::{Graph, GraphExecutor, NodeId, Op};
use crate::model::config::{Config, Shuffle};
use crate::model::projector::run_graph;
use crate::weights::VarBuilder;
use crate::{Error, Result, Tensor};

/// SAM's `LayerNorm2d` epsilon (fixed in X-SAM's connector, not taken from the SAM config).
pub const LN2D_EPS: f32 = 1e-6;

#[derive(Clone, Debug)]
struct Level {
    /// `model.{0,2,4}.weight`: `[h, C, 1, 1]`, `[h, h, 3, 3]`, `[C·s, h, 1, 1]`.
    convs: [Tensor; 3],
    /// `model.{1,3,5}.{weight,bias}`.
    norms: [(Tensor, Tensor); 3],
    shuffle: Shuffle,
}

/// The connector's weights.
#[derive(Clone, Debug)]
pub struct Connector {
    levels: Vec<Level>,
    in_channels: usize,
}

impl Connector {
    /// Loads `seg_connector.model.{level}.model.{0..5}` from the checkpoint root.
    pub fn load(root: &VarBuilder, cfg: &Config) -> Result<Self> {
        let c = cfg.sam.hidden_size;
        let h = cfg.connector.hidden_size;
        let levels = cfg
            .connector_shuffles()
            .into_iter()
            .enumerate()
            .map(|(l, sh)| {
                let m = root.pp(format!("seg_connector.model.{l}.model"));
                let out = sh.scale(c);
                let norm = |i: usize, n: usize| -> Result<(Tensor, Tensor)> {
                    Ok((
                        m.get(&format!("{i}.weight"), &[n])?,
                        m.get(&format!("{i}.bias"), &[n])?,
                    ))
                };
                Ok(Level {
                    convs: [
                        m.get("0.weight", &[h, c, 1, 1])?,
                        m.get("2.weight", &[h, h, 3, 3])?,
                        m.get("4.weight", &[out, h, 1, 1])?,
                    ],
                    norms: [norm(1, h)?, norm(3, h)?, norm(5, out)?],
                    shuffle: sh,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Connector {
            levels,
            in_channels: c,
        })
    }

    pub fn num_levels(&self) -> usize {
        self.levels.len()
    }

    /// Appends the connector on `inputs` (one `[1, G, G, C]` SAM hidden state per level, in the
    /// order of `connector.select_layers`) and returns the `connector.level{i}` nodes.
    pub fn build(&self, g: &mut Graph, inputs: &[NodeId]) -> Result<Vec<NodeId>> {
        if inputs.len() != self.levels.len() {
            return Err(Error::Input(format!(
                "connector: {} inputs for {} levels",
                inputs.len(),
                self.levels.len()
            )));
        }
        let mut outs = Vec::with_capacity(inputs.len());
        for (i, (lvl, &x)) in self.levels.iter().zip(inputs).enumerate() {
            let p = |s: &str| format!("connector.level{i}.{s}");
            let d = g.shape(x).dims().to_vec();
            if d.len() != 4 || d[0] != 1 || d[3] != self.in_channels {
                return Err(Error::shape(
                    "connector",
                    format!(
                        "level {i}: input {d:?} is not [1, G, G, {}]",
                        self.in_channels
                    ),
                ));
            }
            // X-SAM pads odd maps before the convolutions (`maybe_pad`); the configs validated
            // here always have an even grid, so that path is refused rather than approximated.
            if !d[1].is_multiple_of(2) || !d[2].is_multiple_of(2) {
                return Err(Error::shape(
                    "connector",
                    format!("level {i}: odd SAM grid {}x{} is not supported", d[1], d[2]),
                ));
            }
            let mut y = g.push(p("nchw"), Op::Permute(vec![0, 3, 1, 2]), &[x])?;
            for (k, (conv, (nw, nb))) in lvl.convs.iter().zip(&lvl.norms).enumerate() {
                let w = g.weight(p(&format!("conv{k}.weight")), conv.clone())?;
                let pad = if k == 1 { 1 } else { 0 };
                y = g.push(
                    p(&format!("conv{k}")),
                    Op::Conv2d { stride: 1, pad },
                    &[y, w],
                )?;
                let nw = g.weight(p(&format!("norm{k}.weight")), nw.clone())?;
                let nb = g.weight(p(&format!("norm{k}.bias")), nb.clone())?;
                y = g.push(
                    p(&format!("norm{k}")),
                    Op::LayerNorm2d { eps: LN2D_EPS },
                    &[y, nw, nb],
                )?;
            }
            let name = format!("connector.level{i}");
            let out = match lvl.shuffle {
                Shuffle::Identity => g.push(name, Op::Reshape(g.shape(y).clone()), &[y])?,
                sh => {
                    let nhwc = g.push(p("nhwc"), Op::Permute(vec![0, 2, 3, 1]), &[y])?;
                    let op = if sh == Shuffle::Up2 {
                        Op::PixelShuffleUp
                    } else {
                        Op::PixelShuffleDown
                    };
                    let s = g.push(p("shuffle"), op, &[nhwc])?;
                    g.push(name, Op::Permute(vec![0, 3, 1, 2]), &[s])?
                }
            };
            outs.push(out);
        }
        Ok(outs)
    }

    /// Runs the connector alone on one hidden state per level.
    pub fn forward(&self, exec: &mut dyn GraphExecutor, hidden: &[&Tensor]) -> Result<Vec<Tensor>> {
        let mut g = Graph::new();
        let ins = hidden
            .iter()
            .enumerate()
            .map(|(i, t)| g.input(format!("connector.input{i}"), t.shape().clone()))
            .collect::<Result<Vec<_>>>()?;
        let outs = self.build(&mut g, &ins)?;
        for &o in &outs {
            g.mark_output(o);
        }
        let feeds: Vec<(NodeId, &Tensor)> =
            ins.iter().copied().zip(hidden.iter().copied()).collect();
        let mut vals = run_graph(exec, &g, &feeds, &[])?;
        outs.iter().map(|&o| vals.take(o)).collect()
    }
}
