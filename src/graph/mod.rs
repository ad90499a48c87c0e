//! The thin graph layer. Model code does not execute, it builds: each stage appends named nodes
//! over the closed [`Op`] enum. The [`planner`] packs intermediates into one arena by liveness
//! and reports peak bytes; the [`executor`] walks the nodes in order on the CPU backend, the
//! [`cuda_executor`] on the CUDA backend (both behind [`GraphExecutor`]). Any named node
//! can be kept and dumped for comparison with a reference.

pub mod capture_key;
pub mod cuda_executor;
pub mod executor;
pub mod op;
pub mod planner;
pub mod profile;

pub use cuda_executor::{CudaExecutor, DeviceWeights, GraphExecutor};
pub use executor::{Executor, Outputs};
pub use op::{Op, SegOp};
pub use planner::Plan;

use crate::{DType, Error, Result, Shape, Tensor};
use std::collections::HashMap;

pub type NodeId = usize;

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<NodeId>,
    pub shape: Shape,
    pub dtype: DType,
}

/// A computation: nodes in execution order (inputs always precede their users).
#[derive(Debug, Default, Clone)]
pub struct Graph {
    nodes: Vec<Node>,
    by_name: HashMap<String, NodeId>,
    outputs: Vec<NodeId>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn outputs(&self) -> &[NodeId] {
        &self.outputs
    }

    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).copied()
    }

    pub fn shape(&self, id: NodeId) -> &Shape {
        &self.nodes[id].shape
    }

    /// Appends a node after checking its inputs exist and inferring its output shape.
    pub fn push(&mut self, name: impl Into<String>, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let name = name.into();
        if self.by_name.contains_key(&name) {
            return Err(Error::Graph(format!("duplicate node name `{name}`")));
        }
        if let Some(&bad) = inputs.iter().find(|&&i| i >= self.nodes.len()) {
            return Err(Error::Graph(format!(
                "node `{name}`: input {bad} does not exist yet"
            )));
        }
        let in_shapes: Vec<&Shape> = inputs.iter().map(|&i| &self.nodes[i].shape).collect();
        let shape = op
            .infer_shape(&in_shapes)
            .map_err(|e| Error::Graph(format!("node `{name}` ({}): {e}", op.kind())))?;
        let dtype = match &op {
            Op::Weight(t) => t.dtype(),
            _ => DType::F32,
        };
        let id = self.nodes.len();
        self.nodes.push(Node {
            name: name.clone(),
            op,
            inputs: inputs.to_vec(),
            shape,
            dtype,
        });
        self.by_name.insert(name, id);
        Ok(id)
    }

    /// A run-time input of the given shape (f32).
    pub fn input(&mut self, name: impl Into<String>, shape: impl Into<Shape>) -> Result<NodeId> {
        self.push(name, Op::Input(shape.into()), &[])
    }

    /// A constant (weights): read in place, never copied into the arena.
    pub fn weight(&mut self, name: impl Into<String>, t: Tensor) -> Result<NodeId> {
        self.push(name, Op::Weight(t), &[])
    }

    /// Marks a node as a result of the graph (kept alive to the end and returned).
    pub fn mark_output(&mut self, id: NodeId) {
        if !self.outputs.contains(&id) {
            self.outputs.push(id);
        }
    }

    /// The node whose buffer `id` reads: views (reshape) share their input's buffer.
    pub fn buffer_root(&self, mut id: NodeId) -> NodeId {
        while self.nodes[id].op.is_view() {
            id = self.nodes[id].inputs[0];
        }
        id
    }
}
