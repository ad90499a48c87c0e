//! What a loaded model and one open session hold in memory, for the C API's `memory_budget`:
//! the weights, the session's KV pool and its executor arena.
//!
//! * weights: the bytes of the mapped `*.safetensors` files (all of it is read while running).
//! * KV pool: the blocks [`Model::session`] allocates (shared prefix + one request under the
//!   sliding window, plus copy-on-write slack), computed exactly as the session computes them.
//! * executor arena: a session's one f32 buffer grows to the planner's peak over every graph it
//!   runs. Each graph is planned here at its largest: the SAM and SigLIP encoders (fixed
//!   sizes), the visual and seg projectors, connector and pixel decoder (shapes fixed by the
//!   config), the LLM over the shared prefix, over the longest suffix the context leaves and
//!   one decode step at the end of the context, `llm_projector` over a whole context, and the
//!   mask decoder with one class per context position (a class needs at least one).
//!
//! Not counted: the tensors a session keeps between requests (the encoders' hidden states,
//! pixel-decoder maps and prefix states), per-request result buffers, and allocations of the
//! libraries underneath (thread pools, the tokenizer). A second session adds its own KV pool and
//! arena.

use crate::graph::{Graph, NodeId, Plan};
use crate::{Error, Model, Result, Shape};

/// Bytes held by a model and one open session (see the module docs for what each covers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub weights: u64,
    pub kv_pool: u64,
    pub arena: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.kv_pool)
            .saturating_add(self.arena)
    }

    /// `Error::OutOfMemory` naming every part and the first one that does not fit when the total
    /// exceeds `budget` bytes (0 = no limit).
    pub fn check(&self, budget: u64) -> Result<()> {
        if budget == 0 || self.total() <= budget {
            return Ok(());
        }
        let short = if self.weights > budget {
            "the weights alone exceed it"
        } else if self.weights + self.kv_pool > budget {
            "the weights fit, the KV pool does not"
        } else {
            "the weights and KV pool fit, the executor arena does not"
        };
        Err(Error::OutOfMemory(format!(
            "the model and one session need {} bytes (weights {} + KV pool {} + executor arena {}), more than the memory budget of {budget} bytes: {short}",
            self.total(),
            self.weights,
            self.kv_pool,
            self.arena
        )))
    }
}

fn peak(g: &Graph) -> Result<usize> {
    Ok(Plan::new(g, &[])?.peak_bytes)
}

fn inputs(g: &mut Graph, what: &str, shapes: &[Shape]) -> Result<Vec<NodeId>> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| g.input(format!("{what}{i}"), s.clone()))
        .collect()
}

/// The largest arena (bytes) a session on `model` grows, for a shared prefix of `prefix_len`
/// positions.
pub(crate) fn arena_bytes(model: &Model, prefix_len: usize) -> Result<usize> {
    let cfg = &model.cfg;
    let state = |enc: &crate::model::sam::EncoderGraph, k: usize, what: &str| {
        enc.hidden_state(k)
            .map(|n| enc.graph.shape(n).clone())
            .ok_or_else(|| Error::Graph(format!("{what} hidden state {k} is not kept")))
    };
    let sam = &model.sam.built;
    let siglip = &model.siglip.built;
    let mut peaks = vec![model.sam.peak_bytes(), model.siglip.peak_bytes()];

    // Projectors on the encoder states.
    let seg_in = state(sam, cfg.seg_select_index(), "sam")?;
    let vis_in = state(siglip, cfg.vision.select_index().unwrap_or(0), "siglip")?;
    for (p, name, s) in [
        (&model.seg_proj, "proj.seg", seg_in),
        (&model.visual_proj, "proj.visual", vis_in),
    ] {
        let mut g = Graph::new();
        let x = g.input(format!("{name}.input"), s)?;
        let out = p.build(&mut g, name, x)?;
        g.mark_output(out);
        peaks.push(peak(&g)?);
    }

    // Connector, then the pixel decoder on its outputs, then the mask decoder on those.
    let levels = cfg
        .connector
        .select_layers
        .iter()
        .map(|&k| state(sam, k, "sam"))
        .collect::<Result<Vec<_>>>()?;
    let mut g = Graph::new();
    let ins = inputs(&mut g, "connector.input", &levels)?;
    let outs = model.connector.build(&mut g, &ins)?;
    for &o in &outs {
        g.mark_output(o);
    }
    peaks.push(peak(&g)?);
    let features: Vec<Shape> = outs.iter().map(|&o| g.shape(o).clone()).collect();

    let mut g = Graph::new();
    let ins = inputs(&mut g, "connector.level", &features)?;
    let px = model.pixel_decoder.build(&mut g, &ins)?;
    for &m in &px.multi_scale {
        g.mark_output(m);
    }
    g.mark_output(px.mask_features);
    peaks.push(peak(&g)?);
    let ms: Vec<Shape> = px.multi_scale.iter().map(|&m| g.shape(m).clone()).collect();
    let mf = g.shape(px.mask_features).clone();

    let ctx = cfg.llm.max_position_embeddings;
    let e = model.class_head.dim();
    let mut g = Graph::new();
    let ms_ids = inputs(&mut g, "pixel_decoder.multi_scale.", &ms)?;
    let mf_id = g.input("pixel_decoder.mask_features", mf)?;
    let seg = g.input("proj.seg_embed", [e])?;
    let table = g.input("class_table", [ctx + 1, e])?;
    let md = model
        .mask_decoder
        .build(&mut g, &ms_ids, mf_id, seg, table)?;
    g.mark_output(md.class_logits);
    g.mark_output(md.mask_logits);
    peaks.push(peak(&g)?);

    // llm_projector over every position of a request.
    let d = cfg.llm.hidden_size;
    let mut g = Graph::new();
    let x = g.input("proj.llm.input", [ctx, d])?;
    let out = model.class_head.projector().build(&mut g, "proj.llm", x)?;
    g.mark_output(out);
    peaks.push(peak(&g)?);

    // The LLM: the shared prefix, the longest suffix after it, a decode step at the end.
    let llm = &model.llm;
    peaks.push(llm.forward_peak_bytes(prefix_len.max(1), 0)?);
    if ctx > prefix_len {
        peaks.push(llm.forward_peak_bytes(ctx - prefix_len, prefix_len)?);
        peaks.push(llm.forward_peak_bytes(1, ctx - 1)?);
    }
    Ok(peaks.into_iter().max().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_part_that_does_not_fit() {
        let p = MemoryPlan {
            weights: 100,
            kv_pool: 50,
            arena: 20,
        };
        assert!(p.check(0).is_ok());
        assert!(p.check(170).is_ok());
        let msg = |b| p.check(b).unwrap_err().to_string();
        assert!(msg(99).contains("the weights alone exceed it"));
        assert!(msg(120).contains("the weights fit, the KV pool does not"));
        assert!(msg(169).contains("the executor arena does not"));
        assert!(msg(169).contains("weights 100 + KV pool 50 + executor arena 20"));
    }
}
