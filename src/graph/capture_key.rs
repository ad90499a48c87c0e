//! Keys of the CUDA executor's captured-graph cache (pure host logic, unit-tested).
//!
//! - `structure`: what a captured graph's topology depends on: every node's op with its
//!   parameters, inputs, shape and dtype, every weight's identity (address, view, dtype) and the
//!   kept nodes, but *not* the run-time scalars that change from one decode step to the next
//!   (RoPE `pos_offset`, paged attention `pos0`, causal `q_offset`). Consecutive decode steps,
//!   rebuilt each token, share it: they find the same cache entry.
//! - `args`: `structure` plus those scalars. Equal args mean every kernel argument is the same,
//!   so the graph is replayed as is; different args mean it is captured again and the executable
//!   graph updated in place.

use super::{Graph, NodeId, Op};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// The two cache keys of a graph (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CaptureKeys {
    pub structure: u64,
    pub args: u64,
}

/// The op with its run-time scalars zeroed, and those scalars.
fn split_op(op: &Op) -> (Op, [usize; 1]) {
    match op {
        Op::Rope {
            heads,
            head_dim,
            theta,
            pos_offset,
        } => (
            Op::Rope {
                heads: *heads,
                head_dim: *head_dim,
                theta: *theta,
                pos_offset: 0,
            },
            [*pos_offset],
        ),
        Op::PagedAttention {
            layer,
            pos0,
            heads,
            head_dim,
            scale,
            window,
        } => (
            Op::PagedAttention {
                layer: *layer,
                pos0: 0,
                heads: *heads,
                head_dim: *head_dim,
                scale: *scale,
                window: *window,
            },
            [*pos0],
        ),
        Op::Attention {
            heads,
            scale,
            causal,
            window,
            q_offset,
        } => (
            Op::Attention {
                heads: *heads,
                scale: *scale,
                causal: *causal,
                window: *window,
                q_offset: 0,
            },
            [*q_offset],
        ),
        other => (other.clone(), [0]),
    }
}

/// Hashes a weight by identity (where its bytes are and how they are viewed), not contents: a
/// captured graph reads the device copy made from exactly that host tensor.
fn hash_weight(t: &crate::Tensor, h: &mut impl Hasher) {
    if let crate::tensor::Storage::Host(b) = t.storage() {
        (b.bytes().as_ptr() as usize).hash(h);
        b.bytes().len().hash(h);
    }
    t.dtype().hash(h);
    t.offset().hash(h);
    t.dims().hash(h);
    t.strides().hash(h);
}

/// The cache keys of running `graph` keeping `keep`.
pub fn capture_keys(graph: &Graph, keep: &[NodeId]) -> CaptureKeys {
    let mut s = DefaultHasher::new();
    let mut scalars = Vec::new();
    graph.len().hash(&mut s);
    for node in graph.nodes() {
        match &node.op {
            Op::Weight(t) => {
                "weight".hash(&mut s);
                hash_weight(t, &mut s);
            }
            op => {
                let (fixed, run) = split_op(op);
                // Debug prints every parameter (floats round-trip exactly).
                format!("{fixed:?}").hash(&mut s);
                scalars.extend_from_slice(&run);
            }
        }
        node.inputs.hash(&mut s);
        node.shape.dims().hash(&mut s);
        node.dtype.hash(&mut s);
    }
    keep.hash(&mut s);
    let structure = s.finish();
    let mut a = DefaultHasher::new();
    structure.hash(&mut a);
    scalars.hash(&mut a);
    CaptureKeys {
        structure,
        args: a.finish(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    /// A decode-step-shaped graph: RoPE and paged attention at `pos`, one weight.
    fn step(pos: usize, w: &Tensor, heads: usize, scale: f32) -> (Graph, NodeId) {
        let mut g = Graph::new();
        let x = g.input("x", [1, 128]).unwrap();
        let wn = g.weight("w", w.clone()).unwrap();
        let q = g.push("q", Op::Linear, &[x, wn]).unwrap();
        let rope = Op::Rope {
            heads,
            head_dim: 128 / heads,
            theta: 10000.0,
            pos_offset: pos,
        };
        let r = g.push("r", rope, &[q]).unwrap();
        let attn = Op::PagedAttention {
            layer: 0,
            pos0: pos,
            heads,
            head_dim: 128 / heads,
            scale,
            window: Some(48),
        };
        let o = g.push("o", attn, &[r, r, r]).unwrap();
        let y = g.push("y", Op::Scale(scale), &[o]).unwrap();
        g.mark_output(y);
        (g, y)
    }

    #[test]
    fn decode_steps_share_the_structure_not_the_args() {
        let w = Tensor::zeros([128, 128], crate::DType::BF16);
        let (a, ya) = step(5, &w, 2, 0.125);
        let (a2, ya2) = step(5, &w, 2, 0.125);
        let (b, yb) = step(6, &w, 2, 0.125);
        let (ka, ka2, kb) = (
            capture_keys(&a, &[ya]),
            capture_keys(&a2, &[ya2]),
            capture_keys(&b, &[yb]),
        );
        assert_eq!(ka, ka2, "the same graph built twice");
        assert_eq!(ka.structure, kb.structure, "only the position differs");
        assert_ne!(ka.args, kb.args, "the position is a kernel argument");
    }

    #[test]
    fn shapes_parameters_weights_and_kept_nodes_change_the_structure() {
        let w = Tensor::zeros([128, 128], crate::DType::BF16);
        let (a, ya) = step(5, &w, 2, 0.125);
        let base = capture_keys(&a, &[ya]).structure;
        // Another head count (a different kernel), another scale (a non-run-time scalar).
        let (h, yh) = step(5, &w, 1, 0.125);
        assert_ne!(capture_keys(&h, &[yh]).structure, base);
        let (s, ys) = step(5, &w, 2, 0.25);
        assert_ne!(capture_keys(&s, &[ys]).structure, base);
        // Same values in another tensor: another device copy, so another graph.
        let w2 = Tensor::zeros([128, 128], crate::DType::BF16);
        let (o, yo) = step(5, &w2, 2, 0.125);
        assert_ne!(capture_keys(&o, &[yo]).structure, base);
        // Keeping another node.
        assert_ne!(capture_keys(&a, &[ya, 0]).structure, base);
        // Another input shape.
        let mut g = Graph::new();
        let x = g.input("x", [2, 128]).unwrap();
        let wn = g.weight("w", w.clone()).unwrap();
        let q = g.push("q", Op::Linear, &[x, wn]).unwrap();
        let mut g1 = Graph::new();
        let x1 = g1.input("x", [1, 128]).unwrap();
        let wn1 = g1.weight("w", w.clone()).unwrap();
        let q1 = g1.push("q", Op::Linear, &[x1, wn1]).unwrap();
        assert_ne!(
            capture_keys(&g, &[q]).structure,
            capture_keys(&g1, &[q1]).structure
        );
    }
}
