//! Runs a planned graph on the CPU backend: one f32 arena, nodes in order, each op writing its
//! output range while reading its inputs' ranges (the plan guarantees they are disjoint).

use super::op::Unary;
use super::{profile, Graph, NodeId, Op, Plan};
use crate::backend::cpu::{self, AttnMask, WeightRef};
use crate::kv::{attention::paged_attention, PagedKvCache, SeqId};
use crate::{Error, Result, Tensor};
use std::borrow::Cow;
use std::collections::HashMap;

/// Values of the kept nodes after a run, by node id and by name.
pub struct Outputs {
    values: HashMap<NodeId, Tensor>,
    names: HashMap<String, NodeId>,
}

impl Outputs {
    pub fn get(&self, id: NodeId) -> Result<&Tensor> {
        self.values
            .get(&id)
            .ok_or_else(|| Error::Graph(format!("node {id} was not kept")))
    }

    pub fn by_name(&self, name: &str) -> Result<&Tensor> {
        let id = self
            .names
            .get(name)
            .ok_or_else(|| Error::Graph(format!("no kept node named `{name}`")))?;
        self.get(*id)
    }

    pub fn into_map(self) -> HashMap<NodeId, Tensor> {
        self.values
    }

    /// For other executors (the CUDA one) that gather the same results.
    pub(crate) fn from_parts(
        values: HashMap<NodeId, Tensor>,
        names: HashMap<String, NodeId>,
    ) -> Self {
        Outputs { values, names }
    }
}

/// An input of one node run alone on the host (the CUDA executor's per-node fallback).
pub(crate) enum HostInput<'a> {
    Data(&'a [f32]),
    Weight(&'a Tensor),
}

/// Runs node `id` of `graph` alone on the CPU backend with the given input values (weights read
/// in place) and returns its f32 output. Not for `Input` nor `PagedAttention` nodes, which need
/// the executor's feeds and KV cache.
pub(crate) fn run_node_on_host(
    graph: &Graph,
    id: NodeId,
    inputs: &[HostInput],
) -> Result<Vec<f32>> {
    let node = graph.node(id);
    let vals: Vec<Val> = inputs
        .iter()
        .map(|i| match i {
            HostInput::Data(s) => Val::Arena(s),
            HostInput::Weight(t) => Val::Weight(t),
        })
        .collect();
    let mut out = vec![0f32; node.shape.numel()];
    run_node(graph, id, &vals, &mut out, &HashMap::new(), &mut None)
        .map_err(|e| Error::Graph(format!("node `{}` ({}): {e}", node.name, node.op.kind())))?;
    Ok(out)
}

/// Executes graphs on the CPU, reusing its arena across runs.
#[derive(Default)]
pub struct Executor {
    arena: Vec<f32>,
}

/// An input of a node: an arena slice or a weight read in place.
enum Val<'a> {
    Arena(&'a [f32]),
    Weight(&'a Tensor),
}

impl<'a> Val<'a> {
    /// As f32 elements; weights in other dtypes are widened (small params only: norms, biases).
    fn f32s(&self) -> Result<Cow<'a, [f32]>> {
        match self {
            Val::Arena(s) => Ok(Cow::Borrowed(s)),
            Val::Weight(t) => match t.f32s() {
                Ok(s) => Ok(Cow::Borrowed(s)),
                Err(_) => Ok(Cow::Owned(t.to_vec_f32()?)),
            },
        }
    }

    /// As a matrix operand: weights keep their dtype (widened per panel by the matmul).
    fn weight_ref(&self) -> Result<WeightRef<'a>> {
        match self {
            Val::Arena(s) => Ok(WeightRef::F32(s)),
            Val::Weight(t) => WeightRef::from_tensor(t),
        }
    }
}

impl Executor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Arena bytes currently held.
    pub fn arena_bytes(&self) -> usize {
        self.arena.len() * 4
    }

    /// Runs `graph` with `inputs` (one f32 tensor per `Op::Input` node, by id) and returns the
    /// kept nodes of `plan`.
    pub fn run(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        inputs: &[(NodeId, &Tensor)],
    ) -> Result<Outputs> {
        self.run_with_kv(graph, plan, inputs, None)
    }

    /// As [`run`](Self::run), with the KV cache and sequence that `PagedAttention` nodes use.
    pub fn run_with_kv(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        inputs: &[(NodeId, &Tensor)],
        mut kv: Option<(&mut PagedKvCache, SeqId)>,
    ) -> Result<Outputs> {
        let need = plan.peak_bytes / 4;
        if self.arena.len() < need {
            self.arena = vec![0.0; need];
        }
        let feeds: HashMap<NodeId, &Tensor> = inputs.iter().copied().collect();
        for (id, node) in graph.nodes().iter().enumerate() {
            if node.op.is_view() || matches!(node.op, Op::Weight(_)) {
                continue;
            }
            let out_range = plan
                .range(graph, id)
                .ok_or_else(|| Error::Graph(format!("node `{}` has no buffer", node.name)))?;
            let in_ranges: Vec<Option<std::ops::Range<usize>>> =
                node.inputs.iter().map(|&i| plan.range(graph, i)).collect();
            let (ins, out) = split_arena(&mut self.arena, &in_ranges, out_range)?;
            let vals: Vec<Val> = ins
                .into_iter()
                .zip(&node.inputs)
                .map(|(s, &i)| match (s, &graph.node(graph.buffer_root(i)).op) {
                    (Some(s), _) => Ok(Val::Arena(s)),
                    (None, Op::Weight(t)) => Ok(Val::Weight(t)),
                    _ => Err(Error::Graph(format!(
                        "input {i} of `{}` has no data",
                        node.name
                    ))),
                })
                .collect::<Result<_>>()?;
            let t0 = profile::start();
            run_node(graph, id, &vals, out, &feeds, &mut kv).map_err(|e| {
                Error::Graph(format!("node `{}` ({}): {e}", node.name, node.op.kind()))
            })?;
            profile::record(graph, node, t0);
        }
        let mut values = HashMap::new();
        let mut names = HashMap::new();
        for &k in &plan.keep {
            let node = graph.node(k);
            let t = match &node.op {
                Op::Weight(t) => t.clone(),
                _ => {
                    let r = plan
                        .range(graph, k)
                        .ok_or_else(|| Error::Graph(format!("kept node {k} has no buffer")))?;
                    Tensor::from_f32(
                        self.arena[r.start / 4..r.end / 4].to_vec(),
                        node.shape.clone(),
                    )?
                }
            };
            values.insert(k, t);
            names.insert(node.name.clone(), k);
        }
        Ok(Outputs { values, names })
    }
}

/// Splits the arena into the (shared) input slices and the (exclusive) output slice, checking
/// that the output does not overlap any input.
/// Input slices (None for weights) and the output slice of one node.
type NodeSlices<'a> = (Vec<Option<&'a [f32]>>, &'a mut [f32]);

fn split_arena<'a>(
    arena: &'a mut [f32],
    ins: &[Option<std::ops::Range<usize>>],
    out: std::ops::Range<usize>,
) -> Result<NodeSlices<'a>> {
    let (os, oe) = (out.start / 4, out.end / 4);
    if oe > arena.len() {
        return Err(Error::Graph("output outside the arena".into()));
    }
    for r in ins.iter().flatten() {
        let (s, e) = (r.start / 4, r.end / 4);
        if e > arena.len() || (s < oe && os < e && s != e && os != oe) {
            return Err(Error::Graph("planner bug: output overlaps an input".into()));
        }
    }
    let base = arena.as_mut_ptr();
    // SAFETY: all ranges were checked to lie inside `arena`, and the output range was checked to
    // be disjoint from every input range, so the one `&mut` slice never aliases a `&` slice.
    // Input slices may alias each other, which is fine for shared references.
    let out_slice = unsafe { std::slice::from_raw_parts_mut(base.add(os), oe - os) };
    let in_slices = ins
        .iter()
        .map(|r| {
            r.as_ref().map(|r| unsafe {
                std::slice::from_raw_parts(
                    base.add(r.start / 4) as *const f32,
                    (r.end - r.start) / 4,
                )
            })
        })
        .collect();
    Ok((in_slices, out_slice))
}

/// Copies a strided view of `src` (dims, strides in elements) into `out` in row-major order.
fn strided_copy(src: &[f32], dims: &[usize], strides: &[usize], offset: usize, out: &mut [f32]) {
    let mut o = out.iter_mut();
    crate::tensor::for_each_index(dims, strides, offset, |i| {
        if let Some(slot) = o.next() {
            *slot = src[i];
        }
    });
}

fn run_node(
    graph: &Graph,
    id: NodeId,
    v: &[Val],
    out: &mut [f32],
    feeds: &HashMap<NodeId, &Tensor>,
    kv: &mut Option<(&mut PagedKvCache, SeqId)>,
) -> Result<()> {
    let node = graph.node(id);
    let shape = |i: usize| graph.node(node.inputs[i]).shape.dims();
    match &node.op {
        Op::Input(s) => {
            let t = feeds
                .get(&id)
                .ok_or_else(|| Error::Input(format!("no value fed for input `{}`", node.name)))?;
            if t.shape() != s {
                return Err(Error::Input(format!(
                    "input `{}` expects shape {s}, got {}",
                    node.name,
                    t.shape()
                )));
            }
            out.copy_from_slice(&t.to_vec_f32()?);
        }
        Op::Weight(_) | Op::Reshape(_) => {}
        Op::Linear => {
            let (n, k) = (shape(1)[0], shape(1)[1]);
            let m = node.shape.numel() / n.max(1);
            let x = v[0].f32s()?;
            let bias = v.get(2).map(|b| b.f32s()).transpose()?;
            cpu::linear(&x, m, k, v[1].weight_ref()?, n, bias.as_deref(), out)?;
        }
        Op::MatMul { b_transposed } => {
            let (m, k) = (shape(0)[0], shape(0)[1]);
            let n = node.shape.dims()[1];
            cpu::matmul(&v[0].f32s()?, &v[1].f32s()?, out, m, k, n, *b_transposed)?;
        }
        Op::BatchedMatMul { b_transposed } => {
            let (b, m, k) = (shape(0)[0], shape(0)[1], shape(0)[2]);
            let n = node.shape.dims()[2];
            cpu::batched_matmul(&v[0].f32s()?, &v[1].f32s()?, out, b, m, k, n, *b_transposed)?;
        }
        Op::LayerNorm { eps } => {
            let (w, b) = if v.len() == 3 {
                (Some(v[1].f32s()?), Some(v[2].f32s()?))
            } else {
                (None, None)
            };
            cpu::layer_norm(
                &v[0].f32s()?,
                w.as_deref(),
                b.as_deref(),
                node.shape.last(),
                *eps,
                out,
            )?;
        }
        Op::LayerNorm2d { eps } | Op::GroupNorm { eps, .. } => {
            let d = node.shape.dims();
            let (c, hw) = (d[d.len() - 3], d[d.len() - 2] * d[d.len() - 1]);
            let x = v[0].f32s()?;
            let (w, b) = (v[1].f32s()?, v[2].f32s()?);
            for (xs, os) in x.chunks(c * hw).zip(out.chunks_mut(c * hw)) {
                match &node.op {
                    Op::GroupNorm { groups, .. } => {
                        cpu::group_norm(xs, &w, &b, c, hw, *groups, *eps, os)?
                    }
                    _ => cpu::layer_norm_channels_first(xs, &w, &b, c, hw, *eps, os)?,
                }
            }
        }
        Op::RmsNorm { eps } => {
            cpu::rms_norm(&v[0].f32s()?, &v[1].f32s()?, node.shape.last(), *eps, out)?;
        }
        Op::Unary(u) => {
            out.copy_from_slice(&v[0].f32s()?);
            match u {
                Unary::GeluErf => cpu::gelu_erf(out),
                Unary::GeluTanh => cpu::gelu_tanh(out),
                Unary::Relu => cpu::relu(out),
                Unary::Silu => cpu::silu(out),
            }
        }
        Op::SiluGate => {
            let inter = node.shape.last();
            cpu::silu_gate(&v[0].f32s()?, node.shape.rows(), inter, out)?;
        }
        Op::Softmax => {
            out.copy_from_slice(&v[0].f32s()?);
            cpu::softmax_rows(out, node.shape.last())?;
        }
        Op::Rope {
            heads,
            head_dim,
            theta,
            pos_offset,
        } => {
            out.copy_from_slice(&v[0].f32s()?);
            let t = node.shape.dims()[0];
            let pos: Vec<usize> = (0..t).map(|i| pos_offset + i).collect();
            cpu::rope(out, t, *heads, *head_dim, &pos, *theta)?;
        }
        Op::Conv2d { stride, pad } => {
            let x = shape(0);
            let r = x.len();
            let (cin, h, w) = (x[r - 3], x[r - 2], x[r - 1]);
            let wd = shape(1);
            let (cout, kh, kw) = (wd[0], wd[2], wd[3]);
            let xs = v[0].f32s()?;
            let wr = v[1].weight_ref()?;
            let bias = v.get(2).map(|b| b.f32s()).transpose()?;
            let per_out =
                node.shape.numel() / node.shape.dims()[..r - 3].iter().product::<usize>().max(1);
            for (xi, oi) in xs.chunks(cin * h * w).zip(out.chunks_mut(per_out)) {
                cpu::conv2d(
                    xi,
                    cin,
                    h,
                    w,
                    wr,
                    bias.as_deref(),
                    cout,
                    kh,
                    kw,
                    *stride,
                    *pad,
                    oi,
                )?;
            }
        }
        Op::ResizeBilinear {
            out_h,
            out_w,
            align_corners,
        } => {
            let x = shape(0);
            let r = x.len();
            let (h, w) = (x[r - 2], x[r - 1]);
            let c = x[..r - 2].iter().product();
            cpu::resize_bilinear(&v[0].f32s()?, c, h, w, *out_h, *out_w, *align_corners, out)?;
        }
        Op::PixelShuffleDown | Op::PixelShuffleUp => {
            let x = shape(0);
            let r = x.len();
            let (h, w, c) = (x[r - 3], x[r - 2], x[r - 1]);
            let xs = v[0].f32s()?;
            let per_out = out.len() / x[..r - 3].iter().product::<usize>().max(1);
            for (xi, oi) in xs.chunks(h * w * c).zip(out.chunks_mut(per_out)) {
                if matches!(node.op, Op::PixelShuffleDown) {
                    cpu::pixel_shuffle_down(xi, h, w, c, oi)?;
                } else {
                    cpu::pixel_shuffle_up(xi, h, w, c, oi)?;
                }
            }
        }
        Op::Attention {
            heads,
            scale,
            causal,
            window,
            q_offset,
        } => {
            let (tq, qd) = (shape(0)[0], shape(0)[1]);
            let (tk, vd) = (shape(1)[0], shape(2)[1]);
            let keep: Vec<bool>;
            let mask = if v.len() == 4 {
                keep = v[3].f32s()?.iter().map(|&x| x != 0.0).collect();
                AttnMask::Keep(&keep)
            } else if *causal {
                AttnMask::Causal {
                    window: *window,
                    q_offset: *q_offset,
                }
            } else {
                AttnMask::None
            };
            let (q, k, vv) = (v[0].f32s()?, v[1].f32s()?, v[2].f32s()?);
            cpu::attention(
                &q,
                &k,
                &vv,
                tq,
                tk,
                *heads,
                qd / heads,
                vd / heads,
                *scale,
                mask,
                None,
                out,
            )?;
        }
        Op::PagedAttention {
            layer,
            pos0,
            heads,
            head_dim,
            scale,
            window,
        } => {
            let (cache, seq) = kv
                .as_mut()
                .ok_or_else(|| Error::Graph("paged attention needs a KV cache".into()))?;
            let (q, k, vv) = (v[0].f32s()?, v[1].f32s()?, v[2].f32s()?);
            cache.write_rows(*seq, *layer, *pos0, &k, &vv)?;
            let t = shape(0)[0];
            if *pos0 == 0 {
                // A fresh prefill has all its keys right here, contiguous: use the blocked
                // (gemm-backed) attention instead of walking the block table.
                let kv_heads = shape(1)[1] / head_dim;
                if kv_heads != *heads {
                    return Err(Error::Graph(
                        "grouped KV heads are not supported by the CPU prefill".into(),
                    ));
                }
                let mask = AttnMask::Causal {
                    window: *window,
                    q_offset: 0,
                };
                cpu::attention(
                    &q, &k, &vv, t, t, *heads, *head_dim, *head_dim, *scale, mask, None, out,
                )?;
            } else {
                paged_attention(
                    cache, *seq, *layer, &q, *pos0, *heads, *head_dim, *scale, *window, out,
                )?;
            }
        }
        Op::Add => cpu::add(&v[0].f32s()?, &v[1].f32s()?, out)?,
        Op::Mul => cpu::mul(&v[0].f32s()?, &v[1].f32s()?, out)?,
        Op::AddRow => cpu::add_broadcast_rows(&v[0].f32s()?, &v[1].f32s()?, out)?,
        Op::Scale(s) => {
            out.copy_from_slice(&v[0].f32s()?);
            cpu::scale(out, *s);
        }
        Op::Concat { axis } => {
            let outer: usize = node.shape.dims()[..*axis].iter().product();
            let owned: Vec<Cow<[f32]>> = v.iter().map(|x| x.f32s()).collect::<Result<_>>()?;
            let parts: Vec<(&[f32], usize)> = owned
                .iter()
                .map(|p| (p.as_ref(), p.len() / outer.max(1)))
                .collect();
            cpu::concat(&parts, outer, out)?;
        }
        Op::Permute(perm) => {
            let d = shape(0);
            let st = crate::Shape::new(d.to_vec()).contiguous_strides();
            let dims: Vec<usize> = perm.iter().map(|&p| d[p]).collect();
            let strides: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
            strided_copy(&v[0].f32s()?, &dims, &strides, 0, out);
        }
        Op::Narrow { axis, start, .. } => {
            let d = shape(0);
            let st = crate::Shape::new(d.to_vec()).contiguous_strides();
            strided_copy(
                &v[0].f32s()?,
                node.shape.dims(),
                &st,
                start * st[*axis],
                out,
            );
        }
        Op::Gather { ids } => {
            let cols = shape(0)[1];
            cpu::gather_rows(v[0].weight_ref()?, cols, ids, out)?;
        }
        // ---- image encoders (feat/enc) ----
        Op::SamAttention {
            heads,
            window,
            grid_h,
            grid_w,
        } => {
            let geom = cpu::SamAttnGeom {
                grid_h: *grid_h,
                grid_w: *grid_w,
                heads: *heads,
                dim: node.shape.last(),
                window: *window,
            };
            let bias = v.get(3).map(|b| b.f32s()).transpose()?;
            let (rh, rw) = (v[1].f32s()?, v[2].f32s()?);
            cpu::sam_attention(&v[0].f32s()?, bias.as_deref(), &rh, &rw, geom, out)?;
        } // ---- end image encoders ----
        Op::Seg(op) => run_seg_op(op, graph, node, v, out)?,
    }
    Ok(())
}

// ==================================================================================================
// Segmentation ops (feat/seg)
// ==================================================================================================

fn run_seg_op(
    op: &super::op::SegOp,
    graph: &Graph,
    node: &super::Node,
    v: &[Val],
    out: &mut [f32],
) -> Result<()> {
    use super::op::SegOp;
    match op {
        SegOp::MsDeformAttn {
            heads,
            points,
            levels,
        } => {
            let vd = graph.node(node.inputs[0]).shape.dims()[1];
            let nq = node.shape.dims()[0];
            let refs: Cow<[f32]> = match v.get(3) {
                Some(r) => r.f32s()?,
                None => Cow::Owned(cpu::deform_reference_points(levels)),
            };
            cpu::ms_deform_attn(
                &v[0].f32s()?,
                levels,
                &refs,
                &v[1].f32s()?,
                &v[2].f32s()?,
                nq,
                *heads,
                vd / heads,
                *points,
                out,
            )?;
        }
        SegOp::MaskKeep => {
            for (o, &x) in out.iter_mut().zip(v[0].f32s()?.iter()) {
                // torch: sigmoid(x) < 0.5 blocks
                let p = 1.0 / (1.0 + (-x).exp());
                *o = if p < 0.5 { 0.0 } else { 1.0 };
            }
        }
        SegOp::L2Normalize { eps } => {
            let cols = node.shape.last().max(1);
            let x = v[0].f32s()?;
            for (o, r) in out.chunks_mut(cols).zip(x.chunks(cols)) {
                let n = r.iter().map(|a| a * a).sum::<f32>().sqrt().max(*eps);
                for (o, &a) in o.iter_mut().zip(r) {
                    *o = a / n;
                }
            }
        }
        SegOp::Clamp { min, max } => {
            for (o, &x) in out.iter_mut().zip(v[0].f32s()?.iter()) {
                *o = x.clamp(*min, *max);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Graph;

    #[test]
    fn runs_a_small_graph_and_dumps_named_nodes() {
        let mut g = Graph::new();
        let x = g.input("x", [2, 3]).unwrap();
        let w = g
            .weight(
                "w",
                Tensor::from_f32(vec![1., 0., 0., 0., 1., 0.], [2, 3]).unwrap(),
            )
            .unwrap();
        let b = g
            .weight("b", Tensor::from_f32(vec![10., 20.], [2]).unwrap())
            .unwrap();
        let y = g.push("lin", Op::Linear, &[x, w, b]).unwrap();
        let r = g.push("flat", Op::Reshape([4].into()), &[y]).unwrap();
        let s = g.push("twice", Op::Scale(2.0), &[r]).unwrap();
        g.mark_output(s);
        let plan = Plan::new(&g, &[y]).unwrap();
        let xt = Tensor::from_f32(vec![1., 2., 3., 4., 5., 6.], [2, 3]).unwrap();
        let out = Executor::new().run(&g, &plan, &[(x, &xt)]).unwrap();
        assert_eq!(
            out.by_name("lin").unwrap().to_vec_f32().unwrap(),
            vec![11., 22., 14., 25.]
        );
        assert_eq!(
            out.get(s).unwrap().to_vec_f32().unwrap(),
            vec![22., 44., 28., 50.]
        );
        // A wrongly shaped feed is an error, not a panic.
        let bad = Tensor::from_f32(vec![0.; 4], [4]).unwrap();
        assert!(Executor::new().run(&g, &plan, &[(x, &bad)]).is_err());
        assert!(Executor::new().run(&g, &plan, &[]).is_err());
    }
}
