//! Optional time per op kind inside the executor, to see where a stage's time goes
//! (`xsam bench --stages ... --profile-ops`, or `XSAM_PROFILE_OPS=1` for any program).
//!
//! Off by default and cheap when off: the executor asks [`start`] once per node, which is one
//! relaxed atomic load. When on, each node is timed with a host clock around its (synchronous,
//! CPU) op and summed per kind together with the FLOPs of the matrix products, so the report can
//! show an achieved rate next to each kind.

use super::op::{Op, Unary};
use super::{Graph, Node};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// 0: not decided yet (read the environment once), 1: off, 2: on.
static STATE: AtomicU8 = AtomicU8::new(0);
static TOTALS: Mutex<BTreeMap<&'static str, OpTotal>> = Mutex::new(BTreeMap::new());

/// Sums for one op kind since the last [`take`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTotal {
    pub calls: u64,
    pub seconds: f64,
    /// Multiply-adds × 2 of the calls, where the kind has a clear count (products, attention,
    /// convolutions); 0 otherwise.
    pub flops: f64,
}

/// Turns the per-op timing on or off for the whole process.
pub fn set_enabled(on: bool) {
    STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        2 => true,
        1 => false,
        _ => {
            let on =
                std::env::var_os("XSAM_PROFILE_OPS").is_some_and(|v| !v.is_empty() && v != "0");
            set_enabled(on);
            on
        }
    }
}

/// A clock for one node, or `None` when profiling is off.
#[inline]
pub(crate) fn start() -> Option<Instant> {
    if enabled() {
        Some(Instant::now())
    } else {
        None
    }
}

/// Adds the node's elapsed time (no-op for `None`).
pub(crate) fn record(graph: &Graph, node: &Node, t0: Option<Instant>) {
    let Some(t0) = t0 else { return };
    let secs = t0.elapsed().as_secs_f64();
    let flops = node_flops(graph, node);
    // A poisoned lock only means another thread panicked mid-update: the sums are still usable.
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = totals.entry(kind(&node.op)).or_default();
    e.calls += 1;
    e.seconds += secs;
    e.flops += flops;
}

/// The sums since the last call, most time first, and resets them.
pub fn take() -> Vec<(&'static str, OpTotal)> {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = std::mem::take(&mut *totals).into_iter().collect();
    v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    v
}

/// The op kind, with the activation named (GELU variants cost very differently from ReLU).
fn kind(op: &Op) -> &'static str {
    match op {
        Op::Unary(Unary::GeluErf) => "unary/gelu_erf",
        Op::Unary(Unary::GeluTanh) => "unary/gelu_tanh",
        Op::Unary(Unary::Relu) => "unary/relu",
        Op::Unary(Unary::Silu) => "unary/silu",
        other => other.kind(),
    }
}

/// FLOPs of one node from its shapes (2 per multiply-add), 0 where there is no clear count.
fn node_flops(graph: &Graph, node: &Node) -> f64 {
    let dims = |i: usize| -> &[usize] {
        node.inputs
            .get(i)
            .map(|&n| graph.node(n).shape.dims())
            .unwrap_or(&[])
    };
    let out = node.shape.numel() as f64;
    let last = |d: &[usize]| d.last().copied().unwrap_or(0) as f64;
    match &node.op {
        // out [.., n] = x [.., k] · w [n, k]ᵀ
        Op::Linear => 2.0 * out * dims(1).get(1).copied().unwrap_or(0) as f64,
        // out [m, n] (or [b, m, n]) = a [.., m, k] · b: k is a's last dim
        Op::MatMul { .. } | Op::BatchedMatMul { .. } => 2.0 * out * last(dims(0)),
        // q·kᵀ and p·v over all (query, key) pairs (masks not subtracted)
        Op::Attention { .. } => {
            let (q, k, v) = (dims(0), dims(1), dims(2));
            let (tq, tk) = (
                q.first().copied().unwrap_or(0) as f64,
                k.first().copied().unwrap_or(0) as f64,
            );
            2.0 * tq * tk * (last(q) + last(v))
        }
        // weight [cout, cin, kh, kw]: cin·kh·kw multiply-adds per output element
        Op::Conv2d { .. } => {
            let w = dims(1);
            let per_out: usize = w.iter().skip(1).product();
            2.0 * out * per_out as f64
        }
        _ => 0.0,
    }
}

/// The sums as a text table: kind, calls, ms per run, share of the total, GFLOP/s where known.
pub fn format_table(totals: &[(&'static str, OpTotal)], runs: usize) -> String {
    let runs = runs.max(1) as f64;
    let all: f64 = totals.iter().map(|(_, t)| t.seconds).sum();
    let mut s = format!(
        "| {:<20} | {:>7} | {:>10} | {:>6} | {:>8} |\n|---|---|---|---|---|\n",
        "op kind", "calls", "ms / run", "share", "GFLOP/s"
    );
    for (k, t) in totals {
        let rate = if t.flops > 0.0 && t.seconds > 0.0 {
            format!("{:.1}", t.flops / t.seconds / 1e9)
        } else {
            "-".into()
        };
        s += &format!(
            "| {:<20} | {:>7} | {:>10.1} | {:>5.1}% | {:>8} |\n",
            k,
            (t.calls as f64 / runs).round(),
            t.seconds * 1e3 / runs,
            if all > 0.0 {
                100.0 * t.seconds / all
            } else {
                0.0
            },
            rate
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Executor, Plan};
    use crate::Tensor;

    #[test]
    fn counts_flops_from_shapes_and_sums_runs() {
        // x [5, 3] · w [4, 3]ᵀ: 5·4 outputs of 3 multiply-adds = 120 FLOPs;
        // then a [5, 4] · b [4, 2] (b_transposed false): 5·2 outputs of 4 = 80 FLOPs.
        let mut g = Graph::new();
        let x = g.input("x", [5, 3]).unwrap();
        let w = g
            .weight("w", Tensor::from_f32(vec![0.5; 12], [4, 3]).unwrap())
            .unwrap();
        let y = g.push("lin", Op::Linear, &[x, w]).unwrap();
        let b = g
            .weight("b", Tensor::from_f32(vec![1.0; 8], [4, 2]).unwrap())
            .unwrap();
        let z = g
            .push(
                "mm",
                Op::MatMul {
                    b_transposed: false,
                },
                &[y, b],
            )
            .unwrap();
        let gelu = g.push("act", Op::Unary(Unary::GeluTanh), &[z]).unwrap();
        g.mark_output(gelu);
        assert_eq!(node_flops(&g, g.node(y)), 120.0);
        assert_eq!(node_flops(&g, g.node(z)), 80.0);
        assert_eq!(node_flops(&g, g.node(gelu)), 0.0);
        assert_eq!(kind(&g.node(gelu).op), "unary/gelu_tanh");

        // Enabled, two runs record (at least: other tests may run graphs meanwhile) two calls
        // of each kind; the table names them.
        let plan = Plan::new(&g, &[gelu]).unwrap();
        let xt = Tensor::from_f32(vec![1.0; 15], [5, 3]).unwrap();
        set_enabled(true);
        let mut ex = Executor::new();
        for _ in 0..2 {
            ex.run(&g, &plan, &[(x, &xt)]).unwrap();
        }
        set_enabled(false);
        let t = take();
        let get = |k: &str| t.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        let mm = get("matmul").expect("matmul recorded");
        assert!(mm.calls >= 2 && mm.flops >= 160.0, "{mm:?}");
        assert!(get("unary/gelu_tanh").is_some_and(|a| a.calls >= 2));
        let table = format_table(&t, 2);
        assert!(table.contains("| matmul"), "{table}");
    }
}
