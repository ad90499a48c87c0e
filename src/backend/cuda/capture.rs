//! CUDA graph capture and replay of work queued on the backend's stream.
//!
//! A forward pass whose shapes repeat (a decode step, an encoder at a fixed image size) is queued
//! once under stream capture and then replayed with one `cuGraphLaunch`, which removes the launch
//! overhead of hundreds of small kernels. When only kernel arguments change (the decode step's
//! position, a new KV slot), the work is captured again and the executable graph is updated in
//! place with `cuGraphExecUpdate`, which is much cheaper than instantiating it anew; when the
//! update is refused (the topology changed) the new graph is instantiated instead.
//!
//! Memory during a capture. Stream-ordered allocations made inside the capture become graph
//! allocation nodes: the graph owns that memory, and every replay allocates and frees it again
//! (from the device's graph memory pool, which keeps it between replays). Therefore:
//! - buffers read or written by the graph that must outlive it (inputs, outputs, weights, the KV
//!   pool) are allocated *before* the capture; results are written into them (`copy_into`, or
//!   launchers that write in place);
//! - tensors allocated inside the capture must be dropped inside it (their free becomes a graph
//!   node). A capture that leaves an allocation alive is refused (the graph could not be
//!   replayed twice), and dropping a pre-capture tensor inside the capture invalidates it;
//! - nothing inside may wait for the GPU or copy from host memory (`to_host`, `to_device`,
//!   `synchronize`): the capture fails with the driver's error and is ended cleanly.
//!
//! Instantiation uses no flags (not AUTO_FREE_ON_LAUNCH): the rule above means no graph allocation
//! outlives a replay, so there is nothing for the driver to free on relaunch, and a violation is
//! reported rather than freeing memory a tensor may still point at.

use super::context::{backend_err, driver_err, CudaBackend};
use crate::Result;
use cudarc::driver::{result as cu, sys, CudaStream};
use std::sync::Arc;

/// How [`CapturedGraph::update`] applied a newer capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphUpdate {
    /// `cuGraphExecUpdate` changed the parameters of the existing executable graph.
    Updated,
    /// The update was refused; the newer graph was instantiated and replaces the old one.
    Reinstantiated,
}

/// A captured CUDA graph and its executable instance, replayed on the backend's stream.
pub struct CapturedGraph {
    graph: sys::CUgraph,
    /// Null until instantiated (a capture made only to update another graph is never
    /// instantiated when the update succeeds).
    exec: sys::CUgraphExec,
    nodes: usize,
    stream: Arc<CudaStream>,
}

// SAFETY: the graph handles are only used through `&mut self` (update, drop) or by `replay`,
// which launches the executable graph; CUDA allows launching one CUgraphExec from any thread, and
// the launches are ordered on the backend's one stream.
unsafe impl Send for CapturedGraph {}
unsafe impl Sync for CapturedGraph {}

impl std::fmt::Debug for CapturedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CapturedGraph({} nodes)", self.nodes)
    }
}

impl Drop for CapturedGraph {
    fn drop(&mut self) {
        let ctx = self.stream.context();
        // SAFETY: both handles are owned by this value and destroyed once; null ones skipped.
        unsafe {
            if !self.exec.is_null() {
                ctx.record_err(cu::graph::exec_destroy(self.exec));
            }
            if !self.graph.is_null() {
                ctx.record_err(cu::graph::destroy(self.graph));
            }
        }
    }
}

/// Ends a capture that `f` left open by panicking, so the stream is usable afterwards.
struct CaptureGuard<'a> {
    stream: &'a CudaStream,
    open: bool,
}

impl CaptureGuard<'_> {
    /// Ends the capture: the graph when it is valid, the driver's error when not.
    fn end(&mut self) -> std::result::Result<sys::CUgraph, cudarc::driver::DriverError> {
        self.open = false;
        // SAFETY: the stream is capturing (begun by `capture_graph`).
        unsafe { cu::stream::end_capture(self.stream.cu_stream()) }
    }
}

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Ok(g) = self.end() {
                if !g.is_null() {
                    // SAFETY: the graph was just returned to us and is not used elsewhere.
                    let _ = unsafe { cu::graph::destroy(g) };
                }
            }
        }
    }
}

/// Number of nodes of `graph` whose type is `ty`, and the total node count.
fn count_nodes(graph: sys::CUgraph, ty: sys::CUgraphNodeType) -> Result<(usize, usize)> {
    let mut n = 0usize;
    // SAFETY: a null node array asks for the count only.
    unsafe { sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n) }
        .result()
        .map_err(|e| driver_err("cuGraphGetNodes", e))?;
    let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
    let mut got = n;
    // SAFETY: `nodes` has room for `n` handles; `got` returns how many were written.
    unsafe { sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut got) }
        .result()
        .map_err(|e| driver_err("cuGraphGetNodes", e))?;
    let mut count = 0;
    for &node in &nodes[..got.min(n)] {
        // Read the enum as its u32 representation: a newer driver may return a node type this
        // binding does not list.
        let mut t: u32 = u32::MAX;
        // SAFETY: CUgraphNodeType is a repr(u32) enum, so a u32 out-parameter has its layout.
        unsafe { sys::cuGraphNodeGetType(node, (&mut t as *mut u32).cast()) }
            .result()
            .map_err(|e| driver_err("cuGraphNodeGetType", e))?;
        if t == ty as u32 {
            count += 1;
        }
    }
    Ok((count, got.min(n)))
}

impl CudaBackend {
    /// Records everything `f` queues on this backend's stream into a CUDA graph (thread-local
    /// capture mode), instantiates it and returns it with `f`'s result. Nothing `f` queues runs
    /// during the capture: replay the graph to run it.
    ///
    /// Memory rules (see the module docs): buffers that outlive the graph, outputs included, are
    /// allocated before the capture and written by `f` (e.g. with [`copy_into`](Self::copy_into));
    /// whatever `f` allocates it must also drop; `f` must not synchronise or copy from the host;
    /// and no other thread may use this backend while `f` runs (its work would be captured).
    /// If `f` fails, the capture is ended and `f`'s error returned.
    pub fn capture<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(CapturedGraph, T)> {
        let (mut g, v) = self.capture_graph(f)?;
        g.instantiate()?;
        Ok((g, v))
    }

    /// Captures `f` again and applies it to `graph` (exec update, else re-instantiation), without
    /// instantiating the new capture when the update succeeds. The decode step's per-token path.
    pub fn recapture<T>(
        &self,
        graph: &mut CapturedGraph,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<(GraphUpdate, T)> {
        let (newer, v) = self.capture_graph(f)?;
        Ok((graph.update(newer)?, v))
    }

    /// The capture itself: begin, run `f`, end, check allocations; not instantiated.
    fn capture_graph<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(CapturedGraph, T)> {
        // The cuBLASLt workspace must be allocated outside any capture (else it would be a graph
        // allocation); without cuBLASLt the capture still works for everything else.
        let _ = self.lt();
        let stream = self.stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("binding the context", e))?;
        // Errors recorded by earlier drops belong to earlier work: report them now, not as a
        // failure of this capture.
        stream
            .context()
            .check_err()
            .map_err(|e| driver_err("asynchronous CUDA error before the capture", e))?;
        // SAFETY: a valid stream of this context, not capturing (captures are not nested: the
        // driver refuses a second begin with an error).
        unsafe {
            cu::stream::begin_capture(
                stream.cu_stream(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| driver_err("cuStreamBeginCapture", e))?;
        let mut guard = CaptureGuard { stream, open: true };
        let result = f();
        let ended = guard.end();
        // Errors recorded during the capture (a free of pre-capture memory, for one).
        let recorded = stream.context().check_err();
        let graph = match (result, ended) {
            (Err(e), Ok(g)) => {
                if !g.is_null() {
                    // SAFETY: ours, not used elsewhere.
                    let _ = unsafe { cu::graph::destroy(g) };
                }
                return Err(e);
            }
            (Err(e), Err(_)) => return Err(e),
            (Ok(_), Err(e)) => {
                return Err(driver_err(
                    "CUDA graph capture (the captured work did something a graph cannot hold: \
                     a synchronisation, a host copy, or freeing memory allocated before the \
                     capture)",
                    e,
                ))
            }
            (Ok(v), Ok(g)) => (v, g),
        };
        let (value, g) = graph;
        if g.is_null() {
            return Err(backend_err("CUDA graph capture returned no graph"));
        }
        let mut captured = CapturedGraph {
            graph: g,
            exec: std::ptr::null_mut(),
            nodes: 0,
            stream: stream.clone(),
        };
        recorded.map_err(|e| driver_err("CUDA error during the capture", e))?;
        let (allocs, nodes) = count_nodes(g, sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC)?;
        let (frees, _) = count_nodes(g, sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE)?;
        captured.nodes = nodes;
        if allocs > frees {
            return Err(backend_err(format!(
                "CUDA graph capture: {} allocation(s) made inside the capture outlive it; \
                 allocate outputs before the capture and write into them (copy_into)",
                allocs - frees
            )));
        }
        Ok((captured, value))
    }
}

impl CapturedGraph {
    fn instantiate(&mut self) -> Result<()> {
        if self.exec.is_null() {
            // SAFETY: a valid captured graph; flags 0 (see the module docs).
            self.exec =
                unsafe { cu::graph::instantiate(self.graph, sys::CUgraphInstantiate_flags(0)) }
                    .map_err(|e| driver_err("cuGraphInstantiate", e))?;
        }
        Ok(())
    }

    /// Number of nodes (kernels, copies, memsets, allocations) in the graph.
    pub fn node_count(&self) -> usize {
        self.nodes
    }

    /// Queues one run of the graph on the backend's stream (asynchronous, like any launcher).
    pub fn replay(&self) -> Result<()> {
        if self.exec.is_null() {
            return Err(backend_err("replay: the graph is not instantiated"));
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("binding the context", e))?;
        // SAFETY: a valid executable graph of this context, launched on its stream.
        unsafe { cu::graph::launch(self.exec, self.stream.cu_stream()) }
            .map_err(|e| driver_err("cuGraphLaunch", e))
    }

    /// Makes this graph run what `newer` captured: updates the executable graph in place when
    /// the driver accepts it (same topology, only parameters changed), else replaces it with
    /// `newer` instantiated. Queued replays of the old version are unaffected.
    pub fn update(&mut self, mut newer: CapturedGraph) -> Result<GraphUpdate> {
        if !self.exec.is_null() {
            let mut info = sys::CUgraphExecUpdateResultInfo {
                result: sys::CUgraphExecUpdateResult::CU_GRAPH_EXEC_UPDATE_ERROR,
                errorNode: std::ptr::null_mut(),
                errorFromNode: std::ptr::null_mut(),
            };
            // SAFETY: a valid executable graph and a valid graph of the same context.
            let r = unsafe { sys::cuGraphExecUpdate_v2(self.exec, newer.graph, &mut info) };
            if r == sys::CUresult::CUDA_SUCCESS {
                // Keep the newer topology next to the exec it now matches; the old one goes.
                std::mem::swap(&mut self.graph, &mut newer.graph);
                self.nodes = newer.nodes;
                return Ok(GraphUpdate::Updated);
            }
            // Refused (CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE and a reason in `info`): fall back.
        }
        newer.instantiate()?;
        std::mem::swap(self, &mut newer);
        // `newer` now holds the old graph and exec; dropping it destroys them.
        Ok(GraphUpdate::Reinstantiated)
    }
}
