//! Arena planning: every buffer-owning node gets a byte offset in one arena such that buffers
//! alive at the same time never overlap. Greedy by size (largest first, lowest fitting offset),
//! which packs the encoder graphs close to the live-set lower bound.

use super::{Graph, NodeId};
use crate::{Error, Result};

/// Offsets are aligned for vector loads and the GPU's coalesced accesses.
pub const ALIGN: usize = 256;

#[derive(Debug, Clone)]
pub struct Plan {
    /// Byte offset of each node's data in the arena (views share their root's); `None` for
    /// weights, which are read in place.
    pub offsets: Vec<Option<usize>>,
    /// Bytes owned by each node (0 for weights and views).
    pub sizes: Vec<usize>,
    /// `[first, last]` step during which each buffer-owning node's buffer must survive.
    pub lifetimes: Vec<Option<(usize, usize)>>,
    /// Arena size needed.
    pub peak_bytes: usize,
    /// Nodes whose values are returned (graph outputs plus requested dumps).
    pub keep: Vec<NodeId>,
}

impl Plan {
    /// Plans `graph`, keeping its outputs and `extra` (e.g. nodes to dump) alive to the end.
    pub fn new(graph: &Graph, extra: &[NodeId]) -> Result<Plan> {
        let n = graph.len();
        let mut keep: Vec<NodeId> = graph.outputs().to_vec();
        for &e in extra {
            if e >= n {
                return Err(Error::Graph(format!(
                    "cannot keep node {e}: graph has {n} nodes"
                )));
            }
            if !keep.contains(&e) {
                keep.push(e);
            }
        }

        let mut sizes = vec![0usize; n];
        let mut lifetimes: Vec<Option<(usize, usize)>> = vec![None; n];
        for (i, node) in graph.nodes().iter().enumerate() {
            if node.op.needs_buffer() {
                // Activations are f32 in the arena whatever the backend stores weights as.
                sizes[i] = node.shape.numel() * 4;
                lifetimes[i] = Some((i, i));
            }
        }
        let mut extend = |root: NodeId, t: usize| {
            if let Some((_, end)) = &mut lifetimes[root] {
                *end = (*end).max(t);
            }
        };
        for (i, node) in graph.nodes().iter().enumerate() {
            for &inp in &node.inputs {
                extend(graph.buffer_root(inp), i);
            }
        }
        for &k in &keep {
            extend(graph.buffer_root(k), n);
        }

        // Largest first; ties in definition order so plans are deterministic.
        let mut order: Vec<NodeId> = (0..n).filter(|&i| lifetimes[i].is_some()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
        let mut placed: Vec<(usize, usize, (usize, usize))> = Vec::new(); // offset, size, life
        let mut offsets = vec![None; n];
        let mut peak = 0usize;
        for &i in &order {
            let life = lifetimes[i].unwrap_or((i, i));
            let size = sizes[i].div_ceil(ALIGN) * ALIGN;
            let mut busy: Vec<(usize, usize)> = placed
                .iter()
                .filter(|(_, _, l)| l.0 <= life.1 && life.0 <= l.1)
                .map(|&(o, s, _)| (o, o + s))
                .collect();
            busy.sort_unstable();
            let mut off = 0usize;
            for (s, e) in busy {
                if off + size <= s {
                    break;
                }
                off = off.max(e);
            }
            placed.push((off, size, life));
            offsets[i] = Some(off);
            peak = peak.max(off + size);
        }
        for i in 0..n {
            if graph.node(i).op.is_view() {
                offsets[i] = offsets[graph.buffer_root(i)];
            }
        }
        Ok(Plan {
            offsets,
            sizes,
            lifetimes,
            peak_bytes: peak,
            keep,
        })
    }

    /// Byte range of node `id`'s data in the arena.
    pub fn range(&self, graph: &Graph, id: NodeId) -> Option<std::ops::Range<usize>> {
        let off = self.offsets[id]?;
        Some(off..off + graph.node(id).shape.numel() * 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{op::Unary, Op};
    use crate::Shape;

    /// Random DAG of elementwise/concat/reshape nodes from a seeded generator.
    fn random_graph(seed: u64, n: usize) -> Graph {
        let mut s = seed;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as usize
        };
        let mut g = Graph::new();
        let mut ids = vec![];
        for i in 0..3 {
            let len = 1 + next() % 300;
            ids.push(g.input(format!("in{i}"), [len]).unwrap());
        }
        for i in 0..n {
            let a = ids[next() % ids.len()];
            let id = match next() % 4 {
                0 => g
                    .push(format!("n{i}"), Op::Unary(Unary::Relu), &[a])
                    .unwrap(),
                1 => {
                    let b = ids[next() % ids.len()];
                    g.push(format!("n{i}"), Op::Concat { axis: 0 }, &[a, b])
                        .unwrap()
                }
                2 => {
                    let len = g.shape(a).numel();
                    // A view of a view: same rank so every value can be concatenated on axis 0.
                    g.push(format!("n{i}"), Op::Reshape(Shape::new(vec![len])), &[a])
                        .unwrap()
                }
                _ => {
                    let len = g.shape(a).numel();
                    let a = g
                        .push(format!("r{i}"), Op::Reshape(Shape::new(vec![len])), &[a])
                        .unwrap();
                    g.push(format!("n{i}"), Op::Scale(2.0), &[a]).unwrap()
                }
            };
            ids.push(id);
        }
        let last = *ids.last().unwrap();
        g.mark_output(last);
        g
    }

    /// Brute force: at every step, the buffers that a naive interpreter still needs (not yet
    /// consumed by a later node, or kept) must be pairwise disjoint in the plan.
    fn brute_force_check(g: &Graph, plan: &Plan) {
        let n = g.len();
        for t in 0..=n {
            let live: Vec<NodeId> = (0..n.min(t + 1))
                .filter(|&i| g.node(i).op.needs_buffer())
                .filter(|&i| {
                    let used_later =
                        (t..n).any(|j| g.node(j).inputs.iter().any(|&x| g.buffer_root(x) == i));
                    let kept = plan.keep.iter().any(|&k| g.buffer_root(k) == i);
                    i == t || used_later || kept
                })
                .collect();
            for (ai, &a) in live.iter().enumerate() {
                let (oa, sa) = (plan.offsets[a].unwrap(), plan.sizes[a]);
                assert!(oa + sa <= plan.peak_bytes);
                for &b in &live[ai + 1..] {
                    let (ob, sb) = (plan.offsets[b].unwrap(), plan.sizes[b]);
                    let disjoint = oa + sa <= ob || ob + sb <= oa || sa == 0 || sb == 0;
                    assert!(disjoint, "step {t}: nodes {a} and {b} overlap");
                }
            }
        }
    }

    #[test]
    fn planner_matches_brute_force_liveness() {
        for seed in 0..40 {
            let g = random_graph(seed, 60);
            let plan = Plan::new(&g, &[5, 17]).unwrap();
            brute_force_check(&g, &plan);
            // The arena never needs more than everything at once, nor less than the live maximum.
            let total: usize = plan.sizes.iter().map(|s| s.div_ceil(ALIGN) * ALIGN).sum();
            assert!(plan.peak_bytes <= total);
        }
    }

    #[test]
    fn chain_reuses_memory() {
        // A long chain of same-size ops needs only two buffers at a time.
        let mut g = Graph::new();
        let mut x = g.input("x", [1024]).unwrap();
        for i in 0..50 {
            x = g
                .push(format!("relu{i}"), Op::Unary(Unary::Relu), &[x])
                .unwrap();
        }
        g.mark_output(x);
        let plan = Plan::new(&g, &[]).unwrap();
        assert_eq!(plan.peak_bytes, 2 * 4096);
    }
}
