//! xsam: an inference runtime for X-SAM ("X-SAM: From Segment Anything to Any Segmentation").
//!
//! Layout follows the model: `tensor` (data), `backend` (CPU and CUDA compute), `graph` (named
//! nodes, arena planner, executor), `weights` (safetensors), `model` (config and one file per
//! component).

pub mod backend;
pub mod capi;
pub mod convert;
pub mod error;
pub mod flops;
pub mod graph;
pub mod hooks;
pub mod image;
pub mod init;
pub mod kv;
pub mod memory;
pub mod model;
pub mod progress;
pub mod render;
pub mod session;
pub mod task;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use backend::Device;
pub use error::{Error, Result};
pub use hooks::RunHooks;
pub use memory::MemoryPlan;
pub use model::Config;
pub use session::{Model, Output, Request, Session};
pub use tensor::{DType, Shape, Tensor};
pub use weights::{VarBuilder, Weights};
