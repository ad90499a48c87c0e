//! The three MLP projectors (architecture notes §5): `Linear → GELU (exact erf) → Linear`, both
//! with bias (`<name>.model.0`, `<name>.model.2`).
//!
//! * `visual_projector`: SigLIP tokens `[1, Nv, Cv]` → LLM tokens `[1, Nv, D]` (`proj.visual`);
//! * `seg_projector`: a SAM hidden state `[1, G, G, C]` (channels-last) → X-SAM pixel-shuffle by
//!   `projector.seg_downsample_ratio` (0.5: 2×2 tokens merged, channel blocks ordered
//!   (row offset, column offset, c)) → flattened row-major → MLP → `[1, (G/2)², D]` (`proj.seg`);
//! * `llm_projector`: LLM hidden states `[.., D]` → decoder space `[.., E]` (`proj.llm`).

use crate::graph::{Graph, GraphExecutor, NodeId, Op, Plan};
use crate::model::config::{Config, Shuffle};
use crate::weights::VarBuilder;
use crate::{Error, Result, Tensor};

/// One projector's weights and geometry.
#[derive(Clone, Debug)]
pub struct Projector {
    fc1_w: Tensor,
    fc1_b: Tensor,
    fc2_w: Tensor,
    fc2_b: Tensor,
    /// Applied to a 4-D channels-last input before the MLP.
    shuffle: Shuffle,
    /// Channels of the input (before the shuffle).
    in_channels: usize,
    out_dim: usize,
}

impl Projector {
    /// Loads `<vb>.model.{0,2}` for inputs of `in_channels` channels (before `shuffle`).
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_dim: usize,
        shuffle: Shuffle,
    ) -> Result<Self> {
        let k = shuffle.channels(in_channels);
        let m = vb.pp("model");
        Ok(Projector {
            fc1_w: m.get("0.weight", &[out_dim, k])?,
            fc1_b: m.get("0.bias", &[out_dim])?,
            fc2_w: m.get("2.weight", &[out_dim, out_dim])?,
            fc2_b: m.get("2.bias", &[out_dim])?,
            shuffle,
            in_channels,
            out_dim,
        })
    }

    /// `visual_projector` (SigLIP width → LLM width).
    pub fn visual(root: &VarBuilder, cfg: &Config) -> Result<Self> {
        Self::load(
            &root.pp("visual_projector"),
            cfg.vision.hidden_size,
            cfg.llm.hidden_size,
            Shuffle::Identity,
        )
    }

    /// `seg_projector` (SAM width, pixel-shuffled → LLM width).
    pub fn seg(root: &VarBuilder, cfg: &Config) -> Result<Self> {
        Self::load(
            &root.pp("seg_projector"),
            cfg.sam.hidden_size,
            cfg.llm.hidden_size,
            cfg.seg_shuffle(),
        )
    }

    /// `llm_projector` (LLM width → decoder width).
    pub fn llm(root: &VarBuilder, cfg: &Config) -> Result<Self> {
        Self::load(
            &root.pp("llm_projector"),
            cfg.llm.hidden_size,
            cfg.decoder.hidden_dim,
            Shuffle::Identity,
        )
    }

    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn shuffle(&self) -> Shuffle {
        self.shuffle
    }

    /// Appends the projector to `g` on `x` and returns the output node, named `name`.
    ///
    /// `x` is either tokens `[.., in_channels]`, or a channels-last map `[B, H, W, in_channels]`
    /// that is pixel-shuffled (when the projector has a shuffle) and flattened to
    /// `[B, H'·W', C']` row-major, as X-SAM's `DynamicProjector` does with 4-D inputs.
    pub fn build(&self, g: &mut Graph, name: &str, x: NodeId) -> Result<NodeId> {
        let dims = g.shape(x).dims().to_vec();
        if dims.last() != Some(&self.in_channels) {
            return Err(Error::shape(
                "projector",
                format!(
                    "{name}: input {dims:?} does not end in {} channels",
                    self.in_channels
                ),
            ));
        }
        let mut x = x;
        if dims.len() == 4 {
            x = match self.shuffle {
                Shuffle::Identity => x,
                Shuffle::Down2 => {
                    let (h, w) = (dims[1], dims[2]);
                    if h % 2 != 0 || w % 2 != 0 {
                        return Err(Error::shape(
                            "projector",
                            format!("{name}: pixel-shuffle 0.5 needs an even map, got {h}x{w}"),
                        ));
                    }
                    g.push(format!("{name}.shuffle"), Op::PixelShuffleDown, &[x])?
                }
                Shuffle::Up2 => g.push(format!("{name}.shuffle"), Op::PixelShuffleUp, &[x])?,
            };
            let d = g.shape(x).dims().to_vec();
            x = g.push(
                format!("{name}.tokens"),
                Op::Reshape([d[0], d[1] * d[2], d[3]].into()),
                &[x],
            )?;
        }
        let w1 = g.weight(format!("{name}.fc1.weight"), self.fc1_w.clone())?;
        let b1 = g.weight(format!("{name}.fc1.bias"), self.fc1_b.clone())?;
        let h = g.push(format!("{name}.fc1"), Op::Linear, &[x, w1, b1])?;
        let h = g.push(
            format!("{name}.act"),
            Op::Unary(crate::graph::op::Unary::GeluErf),
            &[h],
        )?;
        let w2 = g.weight(format!("{name}.fc2.weight"), self.fc2_w.clone())?;
        let b2 = g.weight(format!("{name}.fc2.bias"), self.fc2_b.clone())?;
        g.push(name, Op::Linear, &[h, w2, b2])
    }

    /// Runs the projector alone on `x` (see [`build`](Self::build) for the accepted shapes).
    pub fn forward(&self, exec: &mut dyn GraphExecutor, name: &str, x: &Tensor) -> Result<Tensor> {
        let mut g = Graph::new();
        let input = g.input(format!("{name}.input"), x.shape().clone())?;
        let out = self.build(&mut g, name, input)?;
        g.mark_output(out);
        let mut outs = run_graph(exec, &g, &[(input, x)], &[])?;
        outs.take(out)
    }
}

/// Results of [`run_graph`], by node id.
pub struct GraphValues(std::collections::HashMap<NodeId, Tensor>);

impl GraphValues {
    /// Takes the value of `id` out (an error, not a panic, when it was not kept).
    pub fn take(&mut self, id: NodeId) -> Result<Tensor> {
        self.0
            .remove(&id)
            .ok_or_else(|| Error::Graph(format!("node {id} was not kept")))
    }
}

/// Plans and runs `g` (its outputs plus `keep`) with the given feeds.
pub(crate) fn run_graph(
    exec: &mut dyn GraphExecutor,
    g: &Graph,
    feeds: &[(NodeId, &Tensor)],
    keep: &[NodeId],
) -> Result<GraphValues> {
    let plan = Plan::new(g, keep)?;
    Ok(GraphValues(exec.run(g, &plan, feeds)?.into_map()))
}
