//! The model: its configuration, the checkpoint's tensor table, and (in other files) one module
//! per component.

pub mod config;
pub mod names;

pub use config::{
    Config, ConnectorConfig, DecoderConfig, LlmConfig, ProjectorConfig, RegionSamplerConfig,
    Resample, SamConfig, Shuffle, TokenConfig, VisionConfig,
};
pub use names::{check_weights, checkpoint_tensors, param_counts, Init, Module, TensorSpec};
pub mod phi3;
pub mod sam;
pub mod siglip;
pub mod splice;
