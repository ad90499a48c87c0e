//! Runs planned graphs on the CUDA backend, with the same surface as the CPU [`Executor`]: host
//! input tensors in, host `Outputs` of the plan's kept nodes back.
//!
//! - Every node's value is an f32 device tensor, dropped right after its last consumer (liveness
//!   from the graph); the backend allocates from the device's stream-ordered pool, so freed
//!   buffers are reused by later nodes of the same pass: the pool is the device "arena".
//! - Activations stay f32 (closest to the CPU backend); bf16 only at the boundaries of the
//!   bf16-only kernels: GEMM operands (cuBLASLt casts f32 operands itself), flash / SAM / masked /
//!   paged attention (the executor casts q, k, v in and the result back).
//! - Weights (`Op::Weight`) are uploaded once per [`DeviceWeights`] (shared by every executor of a
//!   model): bf16 for matrix operands (linear, matmul, conv, embedding tables), f32 for the rest
//!   (norm parameters, biases, relative positions, added embeddings).
//! - Inputs are uploaded once per run; kept nodes are copied back at the end, which is the only
//!   synchronisation of a pass unless a node falls back to the CPU.
//! - Fallback: a node whose shape no kernel supports (e.g. attention head dim 16 of the tiny
//!   preset) runs alone on the CPU backend (inputs copied to the host, CPU op, output copied
//!   back) and is counted per op kind ([`CudaExecutor::fallbacks`]), with one stderr note per op
//!   kind and process.
//! - Paged attention: the host [`PagedKvCache`] must be metadata-only (it keeps the block tables
//!   and ref-counts); K/V live in a [`DevicePagedKv`] owned by this executor, created to the
//!   cache's geometry, and every copy-on-write copy the cache recorded is replayed on the device
//!   before the run writes anything.
//! - CUDA graphs (on unless `XSAM_CUDA_GRAPHS=0`; [`CudaExecutor::set_cuda_graphs`]): a graph
//!   [`not_capturable`] accepts runs as a captured graph, cached by structure
//!   ([`capture_key`](super::capture_key)) with persistent input / output / block-table / slot
//!   buffers written before the launch: replayed as is when every kernel argument repeats,
//!   captured again and applied with `cuGraphExecUpdate` when only run-time scalars changed
//!   (each decode step). See `run_captured`; [`CudaExecutor::graph_stats`] counts the paths.

use super::capture_key::{capture_keys, CaptureKeys};
use super::executor::{run_node_on_host, HostInput};
use super::op::{SegOp, Unary};
use super::{Executor, Graph, NodeId, Op, Outputs, Plan};
use crate::backend::cpu::{self, AttnMask};
use crate::backend::cuda::{
    block_table_i32, CapturedGraph, CudaBackend, DeviceIndex, DevicePagedKv, Epilogue, FlashMask,
    Gelu, GraphUpdate, MapLayout, RopePositions, Shuffle, DEFORM_LEVELS, DEFORM_POINTS,
    MAX_COPY_RANK, MAX_ROW,
};
use crate::kv::{PagedKvCache, SeqId};
use crate::{DType, Error, Result, Tensor, Weights};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Runs a graph on the CPU or the CUDA backend: what model code takes, so a session can hold
/// either executor.
pub trait GraphExecutor {
    /// Runs `graph` with `inputs` (one f32 tensor per `Op::Input` node, by id) and the KV cache
    /// and sequence that `PagedAttention` nodes use; returns the kept nodes of `plan` (host).
    fn run_with_kv(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        inputs: &[(NodeId, &Tensor)],
        kv: Option<(&mut PagedKvCache, SeqId)>,
    ) -> Result<Outputs>;

    fn run(&mut self, graph: &Graph, plan: &Plan, inputs: &[(NodeId, &Tensor)]) -> Result<Outputs> {
        self.run_with_kv(graph, plan, inputs, None)
    }
}

impl GraphExecutor for Executor {
    fn run_with_kv(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        inputs: &[(NodeId, &Tensor)],
        kv: Option<(&mut PagedKvCache, SeqId)>,
    ) -> Result<Outputs> {
        Executor::run_with_kv(self, graph, plan, inputs, kv)
    }
}

/// The step after which each node's value is no longer needed: the last node reading it, the
/// node itself when nothing reads it, `usize::MAX` for kept nodes (returned at the end).
pub fn last_uses(graph: &Graph, keep: &[NodeId]) -> Vec<usize> {
    let mut last: Vec<usize> = (0..graph.len()).collect();
    for (i, node) in graph.nodes().iter().enumerate() {
        for &inp in &node.inputs {
            last[inp] = last[inp].max(i);
        }
    }
    for &k in keep {
        if let Some(l) = last.get_mut(k) {
            *l = usize::MAX;
        }
    }
    last
}

/// How a weight is wanted on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Form {
    /// bf16: a GEMM operand or an embedding table.
    Matrix,
    /// f32: everything else.
    Param,
}

impl Form {
    fn dtype(self) -> DType {
        match self {
            Form::Matrix => DType::BF16,
            Form::Param => DType::F32,
        }
    }
}

/// Identity of a host weight: the address and length of its bytes (stable for memory-mapped and
/// owned tensors while the tensor lives; the cache keeps a clone alive so it cannot be reused),
/// its dtype and view, and the wanted device dtype.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct WeightKey {
    addr: usize,
    bytes: usize,
    dtype: DType,
    offset: usize,
    dims: Vec<usize>,
    strides: Vec<usize>,
    form: DType,
}

fn weight_key(t: &Tensor, form: DType) -> Result<WeightKey> {
    let bytes = match t.storage() {
        crate::tensor::Storage::Host(h) => h.bytes(),
        crate::tensor::Storage::Device(_) => {
            return Err(Error::Graph(
                "graph weights must be host tensors (the executor uploads them)".into(),
            ))
        }
    };
    Ok(WeightKey {
        addr: bytes.as_ptr() as usize,
        bytes: bytes.len(),
        dtype: t.dtype(),
        offset: t.offset(),
        dims: t.dims().to_vec(),
        strides: t.strides().to_vec(),
        form,
    })
}

/// Weights uploaded to one device, once: shared by every executor of a model.
pub struct DeviceWeights {
    backend: Arc<CudaBackend>,
    /// key -> (host tensor kept alive, device copy).
    cache: Mutex<HashMap<WeightKey, (Tensor, Tensor)>>,
}

impl DeviceWeights {
    pub fn new(backend: Arc<CudaBackend>) -> Self {
        DeviceWeights {
            backend,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn backend(&self) -> &Arc<CudaBackend> {
        &self.backend
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.cache.lock().map_or(0, |c| {
            c.values()
                .map(|(_, d)| d.numel() * d.dtype().size_in_bytes())
                .sum()
        })
    }

    /// The device copy of host weight `t` in `dtype` (f32 or bf16), uploading it the first time.
    pub fn get(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let key = weight_key(t, dtype)?;
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::Graph("device weight cache poisoned".into()))?;
        if let Some((_, d)) = cache.get(&key) {
            return Ok(d.clone());
        }
        let host = if t.is_contiguous() {
            t.clone()
        } else {
            t.contiguous()?
        };
        let dev = match dtype {
            // From the (mapped) host bytes in chunks, converted on the host: no f32 staging copy
            // of a matrix on the device.
            DType::BF16 => self.backend.upload_bf16(&host, &mut |_| {})?,
            _ => {
                let d = self.backend.to_device(&host)?;
                self.backend.cast(&d, dtype)?
            }
        };
        cache.insert(key, (t.clone(), dev.clone()));
        Ok(dev)
    }

    /// Bytes of every tensor of `weights` in bf16: what [`preload`](Self::preload) uploads.
    pub fn bf16_bytes(weights: &Weights) -> usize {
        weights
            .names()
            .filter_map(|n| weights.info(n))
            .map(|i| i.shape.iter().product::<usize>() * 2)
            .sum()
    }

    /// Uploads every tensor of `weights` in bf16 (the matrix form, which is what nearly all of a
    /// model's bytes are), calling `progress(done_bytes, total_bytes)` after each.
    pub fn preload(&self, weights: &Weights, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
        let mut names: Vec<&str> = weights.names().collect();
        names.sort_unstable();
        let total = Self::bf16_bytes(weights);
        let mut done = 0;
        for name in names {
            let t = weights.get_any(name)?;
            self.get(&t, DType::BF16)?;
            done += t.numel() * 2;
            progress(done, total);
        }
        Ok(())
    }
}

/// The device K/V pool and the host cache it mirrors.
struct DeviceKv {
    cache_instance: u64,
    pool: DevicePagedKv,
}

/// Op kinds already noted on stderr as falling back (once per process).
fn note_fallback(kind: &'static str, why: &str) {
    static NOTED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    if let Ok(mut g) = NOTED.lock() {
        if g.get_or_insert_with(HashSet::new).insert(kind) {
            eprintln!("note: cuda: `{kind}` runs on the CPU for this model ({why})");
        }
    }
}

/// Executes graphs on one CUDA device.
pub struct CudaExecutor {
    backend: Arc<CudaBackend>,
    weights: Arc<DeviceWeights>,
    fallbacks: BTreeMap<&'static str, usize>,
    kv: Option<DeviceKv>,
    /// RoPE frequency tables by (head_dim, theta bits).
    rope: HashMap<(usize, u32), Tensor>,
    /// Highest sum of live activation bytes seen in one pass.
    peak_activation_bytes: usize,
    /// CUDA graph mode (see [`CudaExecutor::set_cuda_graphs`]).
    graphs: bool,
    /// Captured graphs by structure key (at most `MAX_CAPTURED`, the least recently run one
    /// is dropped first).
    captured: HashMap<u64, Captured>,
    /// Run counter, for the cache's eviction order.
    tick: u64,
    /// Structure keys whose capture failed: they run eagerly from then on.
    rejected: HashSet<u64>,
    stats: GraphStats,
    /// Bumped each time the device KV pool is (re)allocated: graphs captured against an older
    /// pool must be captured again.
    kv_generation: u64,
}

/// Which path the runs of a [`CudaExecutor`] took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Node walks run eagerly (graphs off, a CPU-fallback or host-upload node, or a capture
    /// the driver refused).
    pub eager: usize,
    /// Fresh captures (instantiated).
    pub captured: usize,
    /// Recaptures applied with `cuGraphExecUpdate`.
    pub updated: usize,
    /// Recaptures whose update was refused and that were instantiated anew.
    pub reinstantiated: usize,
    /// Graph launches (every captured run ends with one).
    pub replayed: usize,
    /// Captures that failed (the run then went eagerly).
    pub rejected: usize,
}

/// A captured graph and the persistent device buffers it reads and writes.
struct Captured {
    /// When it last ran (`CudaExecutor::tick`).
    last_run: u64,
    /// `None` until the first capture succeeds.
    graph: Option<CapturedGraph>,
    /// Args key of the capture the executable graph holds now.
    args: u64,
    kv_generation: u64,
    /// f32 input buffers by input node, written before each replay.
    inputs: Vec<(NodeId, Tensor)>,
    /// f32 buffers the graph copies the kept nodes into.
    outputs: Vec<(NodeId, Tensor)>,
    /// Block table (capacity at least the sequence's table; padded with -1) and KV slots, written
    /// before each replay: their addresses never change.
    table: Option<DeviceIndex>,
    slots: Option<((usize, usize), DeviceIndex)>,
}

/// Captured graphs one executor keeps (the decode step, prefills of recent prompt lengths, the
/// encoders, the heads).
pub const MAX_CAPTURED: usize = 16;

/// Whether CUDA graphs are on by default: unless `XSAM_CUDA_GRAPHS=0`.
pub fn cuda_graphs_from_env() -> bool {
    std::env::var("XSAM_CUDA_GRAPHS").map_or(true, |v| v.trim() != "0")
}

/// Why `graph` cannot be captured (`None`: it can): a node falls back to the CPU, or its device
/// path copies host data inside the pass (a capture cannot hold that). Pure host logic.
pub fn not_capturable(graph: &Graph) -> Option<String> {
    for (id, node) in graph.nodes().iter().enumerate() {
        if let Some(why) = unsupported(graph, id) {
            return Some(format!("`{}` falls back to the CPU ({why})", node.name));
        }
        let host_data = match &node.op {
            Op::Gather { .. } => true,
            Op::SamAttention { .. } => node.inputs.len() != 4,
            Op::Attention { heads, causal, .. } => {
                let width = graph.shape(node.inputs[0]).dims().get(1).copied();
                let hd = width.unwrap_or(0) / heads.max(&1);
                node.inputs.len() == 3 && hd == 32 && !causal
            }
            Op::PagedAttention { pos0, head_dim, .. } => {
                let t = node.shape.dims().first().copied().unwrap_or(0);
                let kernel = (*pos0 == 0 && matches!(head_dim, 64 | 72 | 96))
                    || (*head_dim == 96 && t > 1)
                    || matches!(head_dim, 64 | 96 | 128);
                !kernel
            }
            _ => false,
        };
        if host_data {
            return Some(format!(
                "`{}` ({}) uses host data or the CPU inside the pass",
                node.name,
                node.op.kind()
            ));
        }
    }
    None
}

/// Per-run state of the paged KV: block table and slot lists on the device.
#[derive(Default)]
struct KvRun {
    /// The sequence's block table (host), uploaded into `table` by the run's path.
    table_host: Option<Vec<i32>>,
    table: Option<DeviceIndex>,
    slots: HashMap<(usize, usize), DeviceIndex>,
    /// The pool was (re)created in this run: it holds nothing written before.
    fresh: bool,
}

fn numel_bytes(t: &Tensor) -> usize {
    t.numel() * t.dtype().size_in_bytes()
}

impl CudaExecutor {
    /// An executor on `weights`' backend (so weights are shared by all executors of a model).
    pub fn new(weights: Arc<DeviceWeights>) -> Self {
        CudaExecutor {
            backend: weights.backend().clone(),
            weights,
            fallbacks: BTreeMap::new(),
            kv: None,
            rope: HashMap::new(),
            peak_activation_bytes: 0,
            graphs: cuda_graphs_from_env(),
            captured: HashMap::new(),
            tick: 0,
            rejected: HashSet::new(),
            stats: GraphStats::default(),
            kv_generation: 0,
        }
    }

    /// Turns CUDA graph mode on or off (default: on unless `XSAM_CUDA_GRAPHS=0`). On, a run of
    /// a graph that [`not_capturable`] accepts is captured once per structure and replayed; off,
    /// every run walks the nodes eagerly. Turning it off drops the captured graphs.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.captured.clear();
        }
    }

    pub fn cuda_graphs(&self) -> bool {
        self.graphs
    }

    /// Which path the runs so far took.
    pub fn graph_stats(&self) -> GraphStats {
        self.stats
    }

    pub fn backend(&self) -> &Arc<CudaBackend> {
        &self.backend
    }

    pub fn weights(&self) -> &Arc<DeviceWeights> {
        &self.weights
    }

    /// Nodes run on the CPU because no kernel supports their shape, by op kind.
    pub fn fallbacks(&self) -> &BTreeMap<&'static str, usize> {
        &self.fallbacks
    }

    /// Bytes of the device KV pool (0 before the first paged attention).
    pub fn kv_bytes(&self) -> usize {
        self.kv.as_ref().map_or(0, |k| {
            2 * k.pool.config().num_blocks * k.pool.block_stride() * 2
        })
    }

    /// The largest total of live activation bytes in one pass so far (the arena's high mark,
    /// not counting temporaries inside kernels' launchers).
    pub fn peak_activation_bytes(&self) -> usize {
        self.peak_activation_bytes
    }

    /// As the CPU executor's `run`.
    pub fn run(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        inputs: &[(NodeId, &Tensor)],
    ) -> Result<Outputs> {
        self.run_with_kv(graph, plan, inputs, None)
    }

    /// As the CPU executor's `run_with_kv`; the cache must be metadata-only. With CUDA graphs on
    /// (the default) a capturable graph runs as a captured graph: see `run_captured`.
    pub fn run_with_kv(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        inputs: &[(NodeId, &Tensor)],
        mut kv: Option<(&mut PagedKvCache, SeqId)>,
    ) -> Result<Outputs> {
        let kv_run = self.prepare_kv(graph, &mut kv)?;
        if self.graphs {
            let keys = capture_keys(graph, &plan.keep);
            if !self.rejected.contains(&keys.structure) && not_capturable(graph).is_none() {
                return self.run_captured(graph, plan, inputs, kv, kv_run, keys);
            }
        }
        self.run_eager(graph, plan, inputs, kv, kv_run)
    }

    /// Walks the nodes one launch at a time.
    fn run_eager(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        inputs: &[(NodeId, &Tensor)],
        mut kv: Option<(&mut PagedKvCache, SeqId)>,
        mut kv_run: KvRun,
    ) -> Result<Outputs> {
        self.stats.eager += 1;
        if kv_run.table.is_none() {
            if let Some(t) = &kv_run.table_host {
                kv_run.table = Some(self.backend.upload_index(t)?);
            }
        }
        let feeds: HashMap<NodeId, &Tensor> = inputs.iter().copied().collect();
        let values = self.walk(graph, &plan.keep, Feeds::Host(&feeds), &mut kv, &mut kv_run)?;
        self.collect(graph, plan, |k| values.get(k).and_then(|v| v.as_ref()))
    }

    /// Runs `graph` as a CUDA graph. In stream order: the inputs are copied into the cache
    /// entry's persistent buffers, the block table and KV slots into its persistent index
    /// buffers (copy-on-write block copies were queued before, by `prepare_kv`); then the graph
    /// is launched. The first run of a structure captures the node walk (kept nodes copied into
    /// persistent output buffers, every intermediate allocated and freed inside); a later run
    /// replays it when every kernel argument is the same, else captures again and updates the
    /// executable graph (the decode step: another position). A failed capture runs eagerly and
    /// the structure is not captured again.
    fn run_captured(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        inputs: &[(NodeId, &Tensor)],
        mut kv: Option<(&mut PagedKvCache, SeqId)>,
        mut kv_run: KvRun,
        keys: CaptureKeys,
    ) -> Result<Outputs> {
        let b = self.backend.clone();
        let feeds: HashMap<NodeId, &Tensor> = inputs.iter().copied().collect();
        // Inputs are checked before the cache entry is taken out, so a bad feed keeps it.
        for (id, node) in graph.nodes().iter().enumerate() {
            if let Op::Input(s) = &node.op {
                let t = feeds.get(&id).ok_or_else(|| {
                    Error::Input(format!("no value fed for input `{}`", node.name))
                })?;
                if t.shape() != s {
                    return Err(Error::Input(format!(
                        "input `{}` expects shape {s}, got {}",
                        node.name,
                        t.shape()
                    )));
                }
            }
        }
        let mut entry = match self.captured.remove(&keys.structure) {
            Some(e) => e,
            None => Captured::new(&b, graph, &plan.keep, |id| {
                self.weight_root(graph, id).is_some()
            })?,
        };
        for (id, buf) in &entry.inputs {
            let t = feeds
                .get(id)
                .ok_or_else(|| Error::Graph(format!("input {id} vanished")))?;
            let d = b.cast(&b.to_device(t)?, DType::F32)?;
            b.copy_into(&d, buf)?;
        }
        // Index buffers: (re)allocated only when too small, which moves them (recapture).
        let mut moved = false;
        if let (Some(table), Some((cache, seq))) = (&kv_run.table_host, kv.as_ref()) {
            let need = table.len().max(cache.config().num_blocks);
            if entry.table.as_ref().is_none_or(|t| t.len() < table.len()) {
                entry.table = Some(b.upload_index(&vec![-1; need])?);
                moved = true;
            }
            if let Some(t) = entry.table.as_mut() {
                b.write_index(t, table)?;
            }
            if let Some((pos0, n)) = paged_span(graph) {
                let slots = kv_slots(cache, *seq, pos0, n)?;
                match &mut entry.slots {
                    Some((span, idx)) if idx.len() == n => {
                        *span = (pos0, n);
                        b.write_index(idx, &slots)?;
                    }
                    _ => {
                        entry.slots = Some(((pos0, n), b.upload_index(&slots)?));
                        moved = true;
                    }
                }
            }
        }
        kv_run.table = entry.table.take();
        if let Some((span, idx)) = entry.slots.take() {
            kv_run.slots.insert(span, idx);
        }
        let same_args = entry.graph.is_some()
            && entry.args == keys.args
            && entry.kv_generation == self.kv_generation
            && !moved;
        if !same_args {
            // Nothing inside the capture may upload: make every weight form and RoPE table
            // the walk will fetch resident first (a no-op once they are).
            if let Err(e) = self.make_resident(graph) {
                self.captured.insert(keys.structure, entry);
                return Err(e);
            }
        }
        let keep = plan.keep.clone();
        let result = {
            let inputs_dev = &entry.inputs;
            let outputs_dev = &entry.outputs;
            let kv_ref = &mut kv;
            let run_ref = &mut kv_run;
            let bb = b.clone();
            let mut walk = |this: &mut Self| -> Result<()> {
                let values = this.walk(graph, &keep, Feeds::Device(inputs_dev), kv_ref, run_ref)?;
                for (k, out) in outputs_dev {
                    let v = values
                        .get(*k)
                        .and_then(|v| v.as_ref())
                        .ok_or_else(|| Error::Graph(format!("kept node {k} has no value")))?;
                    bb.copy_into(v, out)?;
                }
                // Every intermediate is freed inside the capture.
                drop(values);
                Ok(())
            };
            if same_args {
                Ok(None)
            } else if let Some(g) = entry.graph.as_mut() {
                b.recapture(g, || walk(self)).map(|(u, ())| Some(u))
            } else {
                match b.capture(|| walk(self)) {
                    Ok((g, ())) => {
                        entry.graph = Some(g);
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(update) => {
                match (update, same_args) {
                    (Some(GraphUpdate::Updated), _) => self.stats.updated += 1,
                    (Some(GraphUpdate::Reinstantiated), _) => self.stats.reinstantiated += 1,
                    (None, false) => self.stats.captured += 1,
                    (None, true) => {}
                }
                let g = entry
                    .graph
                    .as_ref()
                    .ok_or_else(|| Error::Graph("captured graph missing".into()))?;
                g.replay()?;
                self.stats.replayed += 1;
                entry.args = keys.args;
                entry.kv_generation = self.kv_generation;
            }
            Err(e) => {
                // Nothing of the failed capture ran; the persistent buffers hold this run's
                // inputs, so the eager walk reads those.
                self.stats.rejected += 1;
                self.rejected.insert(keys.structure);
                static NOTED: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !NOTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    eprintln!(
                        "note: cuda: a CUDA graph capture failed; that graph runs eagerly: {e}"
                    );
                }
                let ins = std::mem::take(&mut entry.inputs);
                let dev_feeds: HashMap<NodeId, Tensor> = ins.into_iter().collect();
                let host: Vec<(NodeId, &Tensor)> = dev_feeds.iter().map(|(k, v)| (*k, v)).collect();
                return self.run_eager(graph, plan, &host, kv, kv_run);
            }
        }
        // The index buffers go back to the entry (same device memory, moved not copied).
        entry.table = kv_run.table.take();
        entry.slots = kv_run.slots.drain().next();
        let outs: HashMap<NodeId, Tensor> =
            entry.outputs.iter().map(|(k, t)| (*k, t.clone())).collect();
        let result = self.collect(graph, plan, |k| outs.get(&k));
        self.tick += 1;
        entry.last_run = self.tick;
        self.captured.insert(keys.structure, entry);
        // Bound what the cache holds (graphs, their graph memory, persistent buffers): prompts of
        // many lengths would otherwise each keep a prefill graph.
        while self.captured.len() > MAX_CAPTURED {
            let oldest = self
                .captured
                .iter()
                .min_by_key(|(_, e)| e.last_run)
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => self.captured.remove(&k),
                None => break,
            };
        }
        result
    }

    /// Uploads what the walk of `graph` fetches lazily (each weight in the form its consumer
    /// takes, RoPE frequency tables), so that a capture of the walk allocates nothing that
    /// outlives it.
    fn make_resident(&mut self, graph: &Graph) -> Result<()> {
        for node in graph.nodes() {
            if let Op::Rope {
                head_dim, theta, ..
            } = node.op
            {
                self.rope_freqs(head_dim, theta)?;
            }
            if matches!(node.op, Op::Reshape(_)) {
                // A reshaped weight is fetched by the reshape's consumers, in their form.
                continue;
            }
            for (i, &inp) in node.inputs.iter().enumerate() {
                if let Some(w) = self.weight_root(graph, inp) {
                    self.weights.get(w, weight_form(&node.op, i).dtype())?;
                }
            }
        }
        Ok(())
    }

    /// The walk over the nodes shared by the eager and captured paths: returns the values of
    /// the kept nodes (all others are dropped after their last reader).
    fn walk(
        &mut self,
        graph: &Graph,
        keep: &[NodeId],
        feeds: Feeds,
        kv: &mut Option<(&mut PagedKvCache, SeqId)>,
        kv_run: &mut KvRun,
    ) -> Result<Vec<Option<Tensor>>> {
        let last = last_uses(graph, keep);
        let mut values: Vec<Option<Tensor>> = vec![None; graph.len()];
        let mut live_bytes = 0usize;
        for (id, node) in graph.nodes().iter().enumerate() {
            let value = match &node.op {
                Op::Weight(_) => None,
                Op::Input(s) => Some(match &feeds {
                    Feeds::Host(map) => {
                        let t = map.get(&id).ok_or_else(|| {
                            Error::Input(format!("no value fed for input `{}`", node.name))
                        })?;
                        if t.shape() != s {
                            return Err(Error::Input(format!(
                                "input `{}` expects shape {s}, got {}",
                                node.name,
                                t.shape()
                            )));
                        }
                        let d = self.backend.to_device(t)?;
                        self.backend.cast(&d, DType::F32)?
                    }
                    Feeds::Device(list) => list
                        .iter()
                        .find(|(k, _)| *k == id)
                        .map(|(_, t)| t.clone())
                        .ok_or_else(|| {
                            Error::Graph(format!("no device buffer for input `{}`", node.name))
                        })?,
                }),
                Op::Reshape(s) => match self.weight_root(graph, node.inputs[0]) {
                    // A reshaped weight is fetched (and reshaped) by its consumers.
                    Some(_) => None,
                    None => Some(
                        self.value(graph, &values, node.inputs[0])?
                            .reshape(s.clone())?,
                    ),
                },
                _ => Some(self.node(graph, id, &values, kv, kv_run).map_err(|e| {
                    Error::Graph(format!("node `{}` ({}): {e}", node.name, node.op.kind()))
                })?),
            };
            if let Some(v) = &value {
                if !matches!(node.op, Op::Reshape(_)) {
                    live_bytes += numel_bytes(v);
                }
            }
            values[id] = value;
            self.peak_activation_bytes = self.peak_activation_bytes.max(live_bytes);
            // Free what no later node reads (its memory returns to the pool in stream order).
            for &j in node.inputs.iter().chain(std::iter::once(&id)) {
                if last[j] == id {
                    if let Some(v) = values[j].take() {
                        if !matches!(graph.node(j).op, Op::Reshape(_)) {
                            live_bytes = live_bytes.saturating_sub(numel_bytes(&v));
                        }
                    }
                }
            }
        }
        Ok(values)
    }

    /// The host `Outputs` of `plan`'s kept nodes, reading device values through `value`.
    fn collect<'v>(
        &self,
        graph: &Graph,
        plan: &Plan,
        value: impl Fn(NodeId) -> Option<&'v Tensor>,
    ) -> Result<Outputs> {
        let mut out_values = HashMap::new();
        let mut names = HashMap::new();
        for &k in &plan.keep {
            let node = graph.node(k);
            let t = match self.weight_root(graph, k) {
                Some(w) => w.reshape(node.shape.clone())?,
                None => {
                    let v = value(k)
                        .ok_or_else(|| Error::Graph(format!("kept node {k} has no value")))?;
                    self.backend.to_host(v)?.reshape(node.shape.clone())?
                }
            };
            out_values.insert(k, t);
            names.insert(node.name.clone(), k);
        }
        Ok(Outputs::from_parts(out_values, names))
    }

    /// The host tensor of the weight that node `id` reads (through reshapes), if it is one.
    fn weight_root<'g>(&self, graph: &'g Graph, id: NodeId) -> Option<&'g Tensor> {
        match &graph.node(graph.buffer_root(id)).op {
            Op::Weight(t) => Some(t),
            _ => None,
        }
    }

    /// The device value of node `id` (f32), or its weight in `form`.
    fn fetch(
        &self,
        graph: &Graph,
        values: &[Option<Tensor>],
        id: NodeId,
        form: Form,
    ) -> Result<Tensor> {
        match self.weight_root(graph, id) {
            Some(w) => {
                let d = self.weights.get(w, form.dtype())?;
                if d.dims() == graph.shape(id).dims() {
                    Ok(d)
                } else {
                    d.reshape(graph.shape(id).clone())
                }
            }
            None => self.value(graph, values, id),
        }
    }

    fn value(&self, graph: &Graph, values: &[Option<Tensor>], id: NodeId) -> Result<Tensor> {
        values[id].clone().ok_or_else(|| {
            Error::Graph(format!(
                "value of `{}` is not available (freed or never computed)",
                graph.node(id).name
            ))
        })
    }

    /// Replays recorded copy-on-write copies and uploads the block table, when the graph has
    /// paged attention.
    fn prepare_kv(
        &mut self,
        graph: &Graph,
        kv: &mut Option<(&mut PagedKvCache, SeqId)>,
    ) -> Result<KvRun> {
        let hd = graph.nodes().iter().find_map(|n| match n.op {
            Op::PagedAttention { head_dim, .. } => Some(head_dim),
            _ => None,
        });
        let (Some(hd), Some((cache, seq))) = (hd, kv.as_mut()) else {
            return Ok(KvRun::default());
        };
        if !cache.is_metadata_only() {
            return Err(Error::Graph(
                "the CUDA executor needs a metadata-only KV cache \
                 (PagedKvCache::metadata_only): its K/V live on the device"
                    .into(),
            ));
        }
        let copies = cache.take_block_copies();
        let reuse = self.kv.as_ref().is_some_and(|k| {
            k.cache_instance == cache.instance_id()
                && k.pool.config() == cache.config()
                && k.pool.head_dim() == hd
        });
        let mut run = KvRun::default();
        if reuse {
            if let Some(k) = &mut self.kv {
                for (src, dst) in copies {
                    self.backend
                        .kv_copy_block(&mut k.pool, src as usize, dst as usize)?;
                }
            }
        } else {
            // Free the old pool before allocating the new one.
            self.kv = None;
            self.kv_generation += 1;
            let pool = self.backend.alloc_paged_kv(*cache.config(), hd)?;
            self.kv = Some(DeviceKv {
                cache_instance: cache.instance_id(),
                pool,
            });
            run.fresh = true;
        }
        run.table_host = Some(block_table_i32(cache.block_table(*seq)?));
        Ok(run)
    }

    fn count_fallback(&mut self, kind: &'static str, why: &str) {
        *self.fallbacks.entry(kind).or_insert(0) += 1;
        note_fallback(kind, why);
    }

    /// Node `id` on the device, or on the host when no kernel takes its shape.
    fn node(
        &mut self,
        graph: &Graph,
        id: NodeId,
        values: &[Option<Tensor>],
        kv: &mut Option<(&mut PagedKvCache, SeqId)>,
        kv_run: &mut KvRun,
    ) -> Result<Tensor> {
        let node = graph.node(id);
        if let Op::PagedAttention { .. } = node.op {
            return self.paged_attention(graph, id, values, kv, kv_run);
        }
        match unsupported(graph, id) {
            None => self.device_node(graph, id, values),
            Some(why) => {
                self.count_fallback(node.op.kind(), &why);
                self.host_node(graph, id, values)
            }
        }
    }

    /// Copies the inputs to the host, runs the CPU op, uploads the result.
    fn host_node(&self, graph: &Graph, id: NodeId, values: &[Option<Tensor>]) -> Result<Tensor> {
        let node = graph.node(id);
        let mut host: Vec<Option<Vec<f32>>> = Vec::with_capacity(node.inputs.len());
        for &i in &node.inputs {
            host.push(match self.weight_root(graph, i) {
                Some(_) => None,
                None => Some(
                    self.backend
                        .to_host(&self.value(graph, values, i)?)?
                        .to_vec_f32()?,
                ),
            });
        }
        let ins: Vec<HostInput> = node
            .inputs
            .iter()
            .zip(&host)
            .map(|(&i, h)| match (h, self.weight_root(graph, i)) {
                (Some(d), _) => Ok(HostInput::Data(d)),
                (None, Some(w)) => Ok(HostInput::Weight(w)),
                (None, None) => Err(Error::Graph(format!("input {i} has no value"))),
            })
            .collect::<Result<_>>()?;
        let out = run_node_on_host(graph, id, &ins)?;
        self.backend
            .to_device(&Tensor::from_f32(out, node.shape.clone())?)
    }

    fn rope_freqs(&mut self, head_dim: usize, theta: f32) -> Result<Tensor> {
        let key = (head_dim, theta.to_bits());
        if let Some(t) = self.rope.get(&key) {
            return Ok(t.clone());
        }
        let t = self.backend.rope_inv_freq(head_dim, theta)?;
        self.rope.insert(key, t.clone());
        Ok(t)
    }

    /// The device path of every op `unsupported` accepts.
    fn device_node(
        &mut self,
        graph: &Graph,
        id: NodeId,
        values: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let node = graph.node(id);
        let b = self.backend.clone();
        let inp = |i: usize, form: Form| self.fetch(graph, values, node.inputs[i], form);
        let x = || inp(0, Form::Param);
        let shape = node.shape.clone();
        let bf = |t: Tensor| b.cast(&t, DType::BF16);
        let y = match &node.op {
            Op::Linear => {
                let bias = match node.inputs.len() {
                    3 => Some(inp(2, Form::Param)?),
                    _ => None,
                };
                b.gemm(
                    &x()?,
                    &inp(1, Form::Matrix)?,
                    true,
                    bias.as_ref(),
                    Epilogue::None,
                    DType::F32,
                )?
            }
            Op::MatMul { b_transposed } => b.gemm(
                &inp(0, Form::Matrix)?,
                &inp(1, Form::Matrix)?,
                *b_transposed,
                None,
                Epilogue::None,
                DType::F32,
            )?,
            Op::BatchedMatMul { b_transposed } => b.gemm_batched(
                &inp(0, Form::Matrix)?,
                &inp(1, Form::Matrix)?,
                *b_transposed,
                DType::F32,
            )?,
            Op::LayerNorm { eps } => {
                let (w, bb) = match node.inputs.len() {
                    3 => (Some(inp(1, Form::Param)?), Some(inp(2, Form::Param)?)),
                    _ => (None, None),
                };
                b.layer_norm(&x()?, w.as_ref(), bb.as_ref(), *eps)?
            }
            Op::LayerNorm2d { eps } => {
                b.layer_norm_2d(&x()?, &inp(1, Form::Param)?, &inp(2, Form::Param)?, *eps)?
            }
            Op::GroupNorm { groups, eps } => b.group_norm(
                &x()?,
                &inp(1, Form::Param)?,
                &inp(2, Form::Param)?,
                *groups,
                *eps,
                false,
            )?,
            Op::RmsNorm { eps } => b.rms_norm(&x()?, Some(&inp(1, Form::Param)?), *eps)?,
            Op::Unary(u) => match u {
                Unary::GeluErf => b.gelu(&x()?, Gelu::Erf)?,
                Unary::GeluTanh => b.gelu(&x()?, Gelu::Tanh)?,
                Unary::Relu => b.relu(&x()?)?,
                Unary::Silu => b.silu(&x()?)?,
            },
            Op::SiluGate => b.silu_gate(&x()?)?,
            Op::Softmax => b.softmax_rows(&x()?)?,
            Op::Rope {
                heads,
                head_dim,
                theta,
                pos_offset,
            } => {
                let xv = x()?;
                let f = self.rope_freqs(*head_dim, *theta)?;
                b.rope(
                    &xv,
                    *heads,
                    *head_dim,
                    &f,
                    RopePositions::Offset(*pos_offset),
                )?
            }
            Op::Conv2d { stride, pad } => {
                let bias = match node.inputs.len() {
                    3 => Some(inp(2, Form::Param)?),
                    _ => None,
                };
                b.conv2d(&x()?, &inp(1, Form::Matrix)?, bias.as_ref(), *stride, *pad)?
            }
            Op::ResizeBilinear {
                out_h,
                out_w,
                align_corners,
            } => b.resize_bilinear(&x()?, *out_h, *out_w, *align_corners)?,
            Op::PixelShuffleDown => {
                b.pixel_shuffle(&x()?, Shuffle::Down, MapLayout::ChannelsLast)?
            }
            Op::PixelShuffleUp => b.pixel_shuffle(&x()?, Shuffle::Up, MapLayout::ChannelsLast)?,
            Op::Attention {
                heads,
                scale,
                causal,
                window,
                q_offset,
            } => {
                let (q, k, v) = (
                    bf(x()?)?,
                    bf(inp(1, Form::Param)?)?,
                    bf(inp(2, Form::Param)?)?,
                );
                let hd = q.dims()[1] / heads;
                let o = if node.inputs.len() == 4 {
                    let bits = b.keep_bits(&inp(3, Form::Param)?)?;
                    b.masked_attention(&q, &k, &v, &bits, *heads, *scale, None)?
                } else if hd == 32 {
                    // Unmasked 8x32 heads (Mask2Former self-attention): the masked kernel with
                    // every key kept.
                    let (tq, tk) = (q.dims()[0], k.dims()[0]);
                    let ones = b.to_device(&Tensor::from_f32(vec![1.0; tq * tk], [tq, tk])?)?;
                    let bits = b.keep_bits(&ones)?;
                    b.masked_attention(&q, &k, &v, &bits, *heads, *scale, None)?
                } else {
                    let mask = if *causal {
                        FlashMask::Causal {
                            window: *window,
                            q_offset: *q_offset,
                        }
                    } else {
                        FlashMask::None
                    };
                    b.flash_attention(&q, &k, &v, *heads, *heads, *scale, mask, None)?
                };
                b.cast(&o, DType::F32)?
            }
            Op::Add => b.add(&x()?, &inp(1, Form::Param)?)?,
            Op::Mul => b.mul(&x()?, &inp(1, Form::Param)?)?,
            Op::AddRow => b.add_row(&x()?, &inp(1, Form::Param)?)?,
            Op::Scale(s) => b.scale(&x()?, *s)?,
            Op::Concat { axis } => {
                let parts = (0..node.inputs.len())
                    .map(|i| inp(i, Form::Param))
                    .collect::<Result<Vec<_>>>()?;
                let refs: Vec<&Tensor> = parts.iter().collect();
                b.concat(&refs, *axis)?
            }
            Op::Permute(p) => b.permute(&x()?, p)?,
            Op::Narrow { axis, start, len } => b.narrow_copy(&x()?, *axis, *start, *len)?,
            Op::Gather { ids } => {
                // Tables that are weights are bf16 on the device; activations f32.
                b.gather_rows(&inp(0, Form::Matrix)?, ids, DType::F32)?
            }
            Op::SamAttention {
                heads,
                window,
                grid_h,
                grid_w,
            } => {
                let c = shape.last();
                let qkv = bf(x()?)?;
                let bias = match node.inputs.len() {
                    4 => bf(inp(3, Form::Param)?)?,
                    _ => b.to_device(&Tensor::zeros([3 * c], DType::BF16))?,
                };
                let (rh, rw) = (bf(inp(1, Form::Param)?)?, bf(inp(2, Form::Param)?)?);
                let win = window.unwrap_or(*grid_h);
                let hd = c / heads;
                let scale = 1.0 / (hd as f32).sqrt();
                let o = b.sam_attention(
                    &qkv,
                    &bias,
                    &rh,
                    &rw,
                    (*grid_h, *grid_w),
                    *heads,
                    win,
                    scale,
                )?;
                b.cast(&o, DType::F32)?
            }
            Op::Seg(s) => match s {
                SegOp::MsDeformAttn {
                    heads,
                    points: _,
                    levels,
                } => {
                    let lv: [(usize, usize); DEFORM_LEVELS] = levels
                        .as_slice()
                        .try_into()
                        .map_err(|_| Error::Graph("deformable attention levels".into()))?;
                    let reference = match node.inputs.len() {
                        4 => Some(inp(3, Form::Param)?),
                        _ => None,
                    };
                    b.ms_deform_attn(
                        &x()?,
                        lv,
                        *heads,
                        &inp(1, Form::Param)?,
                        &inp(2, Form::Param)?,
                        reference.as_ref(),
                    )?
                }
                SegOp::MaskKeep => b.mask_keep(&x()?)?,
                SegOp::L2Normalize { eps } => b.l2_normalize(&x()?, *eps)?,
                SegOp::Clamp { min, max } => b.clamp(&x()?, *min, *max)?,
            },
            Op::Input(_) | Op::Weight(_) | Op::Reshape(_) | Op::PagedAttention { .. } => {
                return Err(Error::Graph(format!(
                    "{} is not run by device_node",
                    node.op.kind()
                )))
            }
        };
        if y.dims() != shape.dims() {
            if y.numel() != shape.numel() {
                return Err(Error::Graph(format!(
                    "device result {} for a node of shape {shape}",
                    y.shape()
                )));
            }
            return y.reshape(shape);
        }
        Ok(y)
    }

    /// Phi-3 attention through the device KV pool: append this step's K/V, then flash attention
    /// (a fresh prefill, keys right here), paged prefill (hd 96) or paged decode (hd 64/96/128);
    /// other head dims read the pool back and attend on the host.
    fn paged_attention(
        &mut self,
        graph: &Graph,
        id: NodeId,
        values: &[Option<Tensor>],
        kv: &mut Option<(&mut PagedKvCache, SeqId)>,
        kv_run: &mut KvRun,
    ) -> Result<Tensor> {
        let node = graph.node(id);
        let Op::PagedAttention {
            layer,
            pos0,
            heads,
            head_dim,
            scale,
            window,
        } = node.op
        else {
            return Err(Error::Graph("not a paged attention node".into()));
        };
        let (cache, seq) = kv
            .as_mut()
            .ok_or_else(|| Error::Graph("paged attention needs a KV cache".into()))?;
        if pos0 > 0 && kv_run.fresh {
            return Err(Error::Graph(
                "the device KV pool was created in this run but the sequence already holds \
                 positions written elsewhere"
                    .into(),
            ));
        }
        let b = self.backend.clone();
        let q = b.cast(&self.value(graph, values, node.inputs[0])?, DType::BF16)?;
        let k = b.cast(&self.value(graph, values, node.inputs[1])?, DType::BF16)?;
        let v = b.cast(&self.value(graph, values, node.inputs[2])?, DType::BF16)?;
        let t = q.dims()[0];
        let table_host = cache.block_table(*seq)?.to_vec();
        let slots = match kv_run.slots.entry((pos0, t)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(b.upload_index(&kv_slots(cache, *seq, pos0, t)?)?)
            }
        };
        let table = kv_run
            .table
            .as_ref()
            .ok_or_else(|| Error::Graph("KV block table missing".into()))?;
        let dkv = self
            .kv
            .as_mut()
            .ok_or_else(|| Error::Graph("device KV pool missing".into()))?;
        b.kv_append(&mut dkv.pool, layer, &k, &v, slots)?;
        let kv_heads = dkv.pool.kv_heads();
        let o = if pos0 == 0 && matches!(head_dim, 64 | 72 | 96) {
            let mask = FlashMask::Causal {
                window,
                q_offset: 0,
            };
            b.flash_attention(&q, &k, &v, heads, kv_heads, scale, mask, None)?
        } else if head_dim == 96 && t > 1 {
            b.paged_prefill(&dkv.pool, layer, &q, table, pos0, heads, scale, window)?
        } else if matches!(head_dim, 64 | 96 | 128) {
            b.paged_decode(
                &dkv.pool, layer, &q, table, pos0, heads, scale, window, None,
            )?
        } else {
            self.count_fallback(
                "paged_attention",
                &format!("head dim {head_dim}: kernels take 64, 72, 96 (prefill) and 64, 96, 128 (decode)"),
            );
            let q32 = b
                .to_host(&self.value(graph, values, node.inputs[0])?)?
                .to_vec_f32()?;
            let dkv = self
                .kv
                .as_ref()
                .ok_or_else(|| Error::Graph("device KV pool missing".into()))?;
            let out = host_paged_attention(
                &b,
                &dkv.pool,
                layer,
                &table_host,
                &q32,
                pos0,
                heads,
                head_dim,
                scale,
                window,
            )?;
            return b.to_device(&Tensor::from_f32(out, node.shape.clone())?);
        };
        b.cast(&o, DType::F32)
    }
}

/// The form in which `device_node` fetches input `i` of `op` when it is a weight: GEMM operands
/// and embedding tables as bf16 matrices, everything else as f32 parameters.
fn weight_form(op: &Op, i: usize) -> Form {
    match op {
        Op::MatMul { .. } | Op::BatchedMatMul { .. } => Form::Matrix,
        Op::Linear | Op::Conv2d { .. } if i == 1 => Form::Matrix,
        Op::Gather { .. } if i == 0 => Form::Matrix,
        _ => Form::Param,
    }
}

/// What the node walk reads for `Op::Input` nodes.
enum Feeds<'a> {
    /// Host tensors, uploaded by the walk (eager).
    Host(&'a HashMap<NodeId, &'a Tensor>),
    /// Persistent device buffers already written (captured).
    Device(&'a [(NodeId, Tensor)]),
}

impl Captured {
    /// The persistent buffers of a graph's first capture: one f32 buffer per input and per
    /// kept node that is not a weight (`is_weight`), allocated before any capture.
    fn new(
        b: &CudaBackend,
        graph: &Graph,
        keep: &[NodeId],
        is_weight: impl Fn(NodeId) -> bool,
    ) -> Result<Self> {
        let mut inputs = Vec::new();
        for (id, node) in graph.nodes().iter().enumerate() {
            if let Op::Input(s) = &node.op {
                inputs.push((id, b.alloc_tensor(s.clone(), DType::F32)?));
            }
        }
        let mut outputs = Vec::new();
        for &k in keep {
            if !is_weight(k) && !outputs.iter().any(|(o, _)| *o == k) {
                outputs.push((k, b.alloc_tensor(graph.shape(k).clone(), DType::F32)?));
            }
        }
        Ok(Captured {
            last_run: 0,
            graph: None,
            args: 0,
            kv_generation: 0,
            inputs,
            outputs,
            table: None,
            slots: None,
        })
    }
}

/// The positions `(pos0, tokens)` the graph's paged attention writes (all layers of one forward
/// share them), if it has any.
fn paged_span(graph: &Graph) -> Option<(usize, usize)> {
    graph.nodes().iter().find_map(|n| match n.op {
        Op::PagedAttention { pos0, .. } => Some((pos0, n.shape.dims().first().copied()?)),
        _ => None,
    })
}

/// The pool slots of positions `pos0..pos0 + t` of `seq` (block * block_size + offset).
fn kv_slots(cache: &PagedKvCache, seq: SeqId, pos0: usize, t: usize) -> Result<Vec<i32>> {
    let bs = cache.config().block_size;
    let table = cache.block_table(seq)?;
    (pos0..pos0 + t)
        .map(|p| match table.get(p / bs).copied().flatten() {
            Some(blk) => i32::try_from(blk as usize * bs + p % bs)
                .map_err(|_| Error::Graph("KV slot exceeds i32".into())),
            None => Err(Error::Graph(format!("KV position {p} has no block"))),
        })
        .collect()
}

impl GraphExecutor for CudaExecutor {
    fn run_with_kv(
        &mut self,
        graph: &Graph,
        plan: &Plan,
        inputs: &[(NodeId, &Tensor)],
        kv: Option<(&mut PagedKvCache, SeqId)>,
    ) -> Result<Outputs> {
        CudaExecutor::run_with_kv(self, graph, plan, inputs, kv)
    }
}

/// Why node `id` has no device path for its shape (`None`: it has one). Pure host logic.
pub fn unsupported(graph: &Graph, id: NodeId) -> Option<String> {
    let node = graph.node(id);
    let sh = |i: usize| graph.shape(node.inputs[i]).dims();
    let row_ok = |cols: usize| (1..=MAX_ROW).contains(&cols);
    match &node.op {
        Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::Softmax => {
            let cols = node.shape.last();
            (!row_ok(cols)).then(|| format!("rows of {cols} (kernel: 1..={MAX_ROW})"))
        }
        Op::Concat { .. } | Op::Permute(_) | Op::Narrow { .. } => {
            (node.shape.rank() > MAX_COPY_RANK).then(|| {
                format!(
                    "rank {} (strided copy: at most {MAX_COPY_RANK})",
                    node.shape.rank()
                )
            })
        }
        Op::Attention { heads, causal, .. } => {
            let (qd, vd) = (sh(0)[1], sh(2)[1]);
            let (hd, vhd) = (qd / heads, vd / heads);
            if node.inputs.len() == 4 || (hd == 32 && !causal) {
                (hd != 32 || vhd != 32)
                    .then(|| format!("masked attention head dim {hd} (kernel: 32)"))
            } else if !matches!(hd, 64 | 72 | 96) || vhd != hd {
                Some(format!(
                    "attention head dims {hd}/{vhd} (kernels: 64, 72, 96)"
                ))
            } else {
                None
            }
        }
        Op::SamAttention {
            heads,
            window,
            grid_h,
            grid_w,
        } => {
            let hd = node.shape.last() / heads;
            if hd != 64 {
                Some(format!("SAM attention head dim {hd} (kernel: 64)"))
            } else {
                match window {
                    Some(w) if *w <= 16 => None,
                    Some(w) => Some(format!("SAM window {w} (kernel: at most 16)")),
                    None if grid_h == grid_w && *grid_h <= 64 => None,
                    None => Some(format!(
                        "SAM global grid {grid_h}x{grid_w} (kernel: square, at most 64)"
                    )),
                }
            }
        }
        Op::Seg(SegOp::MsDeformAttn { points, levels, .. }) => {
            (levels.len() != DEFORM_LEVELS || *points != DEFORM_POINTS).then(|| {
                format!(
                    "{} levels x {points} points (kernel: {DEFORM_LEVELS} x {DEFORM_POINTS})",
                    levels.len()
                )
            })
        }
        _ => None,
    }
}

/// Host attention over the device pool (head dims without a kernel): copies the pool back,
/// gathers the visible keys of the sequence and runs the CPU backend's causal attention.
#[allow(clippy::too_many_arguments)]
fn host_paged_attention(
    b: &CudaBackend,
    pool: &DevicePagedKv,
    layer: usize,
    table: &[Option<crate::kv::BlockId>],
    q: &[f32],
    pos0: usize,
    heads: usize,
    hd: usize,
    scale: f32,
    window: Option<usize>,
) -> Result<Vec<f32>> {
    let (kp, vp) = b.paged_kv_to_host(pool)?;
    let cfg = *pool.config();
    let bs = cfg.block_size;
    let kv_heads = pool.kv_heads();
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !q.len().is_multiple_of(heads * hd) {
        return Err(Error::Graph(format!(
            "{heads} heads over {kv_heads} KV heads"
        )));
    }
    let group = heads / kv_heads;
    let t = q.len() / (heads * hd);
    let len = pos0 + t;
    // Keys before the first block any query can see may already be released.
    let first = window.map_or(0, |w| (pos0 + 1).saturating_sub(w)) / bs * bs;
    let tk = len - first;
    let width = heads * hd;
    let (mut k, mut v) = (vec![0f32; tk * width], vec![0f32; tk * width]);
    for p in first..len {
        let blk = table
            .get(p / bs)
            .copied()
            .flatten()
            .ok_or_else(|| Error::Graph(format!("KV position {p} has no block")))?;
        for h in 0..heads {
            let src = pool.block_offset(blk as usize, layer) + ((h / group) * bs + p % bs) * hd;
            let dst = (p - first) * width + h * hd;
            let (ks, vs) = (kp.get(src..src + hd), vp.get(src..src + hd));
            let (Some(ks), Some(vs)) = (ks, vs) else {
                return Err(Error::Graph("KV block outside the pool".into()));
            };
            for i in 0..hd {
                k[dst + i] = ks[i].to_f32();
                v[dst + i] = vs[i].to_f32();
            }
        }
    }
    let mut out = vec![0f32; t * width];
    let mask = AttnMask::Causal {
        window,
        q_offset: pos0 - first,
    };
    cpu::attention(q, &k, &v, t, tk, heads, hd, hd, scale, mask, None, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::op::Unary;

    #[test]
    fn values_die_after_their_last_reader() {
        let mut g = Graph::new();
        let x = g.input("x", [4]).unwrap();
        let a = g.push("a", Op::Unary(Unary::Relu), &[x]).unwrap();
        let b = g.push("b", Op::Scale(2.0), &[a]).unwrap();
        let dead = g.push("dead", Op::Scale(3.0), &[x]).unwrap();
        let c = g.push("c", Op::Add, &[a, b]).unwrap();
        g.mark_output(c);
        let last = last_uses(&g, &[c]);
        assert_eq!(last[x], dead, "x is read last by `dead`");
        assert_eq!(last[a], c);
        assert_eq!(last[b], c);
        assert_eq!(last[dead], dead, "an unread node dies at once");
        assert_eq!(last[c], usize::MAX, "kept nodes live to the end");
    }

    #[test]
    fn graphs_with_fallbacks_or_host_uploads_are_not_captured() {
        let attn = |heads| Op::Attention {
            heads,
            scale: 0.1,
            causal: false,
            window: None,
            q_offset: 0,
        };
        // Kernel shapes only: capturable.
        let mut g = Graph::new();
        let q = g.input("q", [3, 128]).unwrap();
        let a = g.push("a", attn(2), &[q, q, q]).unwrap();
        g.push("s", Op::Scale(2.0), &[a]).unwrap();
        assert_eq!(not_capturable(&g), None);
        // Head dim 16 falls back to the CPU.
        let mut g = Graph::new();
        let q = g.input("q", [3, 32]).unwrap();
        g.push("a", attn(2), &[q, q, q]).unwrap();
        assert!(not_capturable(&g).is_some_and(|w| w.contains("falls back")));
        // An embedding gather uploads its ids inside the pass.
        let mut g = Graph::new();
        let t = g.input("t", [10, 4]).unwrap();
        g.push("e", Op::Gather { ids: vec![1, 2] }, &[t]).unwrap();
        assert!(not_capturable(&g).is_some_and(|w| w.contains("host data")));
        // Paged attention: decode head dims have kernels, 16 does not.
        for (hd, ok) in [(64, true), (96, true), (128, true), (16, false)] {
            let mut g = Graph::new();
            let q = g.input("q", [1, 2 * hd]).unwrap();
            let op = Op::PagedAttention {
                layer: 0,
                pos0: 7,
                heads: 2,
                head_dim: hd,
                scale: 0.1,
                window: None,
            };
            g.push("o", op, &[q, q, q]).unwrap();
            assert_eq!(not_capturable(&g).is_none(), ok, "hd {hd}");
        }
    }

    #[test]
    fn tiny_head_dims_fall_back_kernel_shapes_do_not() {
        let mut g = Graph::new();
        let attn = |heads| Op::Attention {
            heads,
            scale: 0.1,
            causal: false,
            window: None,
            q_offset: 0,
        };
        let q16 = g.input("q16", [3, 32]).unwrap();
        let a16 = g.push("a16", attn(2), &[q16, q16, q16]).unwrap();
        let q64 = g.input("q64", [3, 128]).unwrap();
        let a64 = g.push("a64", attn(2), &[q64, q64, q64]).unwrap();
        let q32 = g.input("q32", [3, 256]).unwrap();
        let keep = g.input("keep", [3, 3]).unwrap();
        let m32 = g.push("m32", attn(8), &[q32, q32, q32, keep]).unwrap();
        let m64 = g.push("m64", attn(4), &[q32, q32, q32, keep]).unwrap();
        assert!(unsupported(&g, a16).is_some());
        assert!(unsupported(&g, a64).is_none());
        assert!(unsupported(&g, m32).is_none());
        assert!(unsupported(&g, m64).is_some());
        // Unmasked 8x32 runs on the masked kernel with every key kept; causal 8x32 does not.
        let s32 = g.push("s32", attn(8), &[q32, q32, q32]).unwrap();
        let causal = Op::Attention {
            heads: 8,
            scale: 0.1,
            causal: true,
            window: None,
            q_offset: 0,
        };
        let c32 = g.push("c32", causal, &[q32, q32, q32]).unwrap();
        assert!(unsupported(&g, s32).is_none());
        assert!(unsupported(&g, c32).is_some());
        let wide = g.input("wide", [2, MAX_ROW + 1]).unwrap();
        let sm = g.push("sm", Op::Softmax, &[wide]).unwrap();
        assert!(unsupported(&g, sm).is_some());
    }
}
