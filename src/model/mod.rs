//! The model: its configuration, the checkpoint's tensor table, and (in other files) one module
//! per component.

pub mod class_head;
pub mod config;
pub mod connector;
pub mod mask_decoder;
pub mod names;
pub mod pixel_decoder;
pub mod projector;
pub mod region;

pub use config::{
    Config, ConnectorConfig, DecoderConfig, LlmConfig, ProjectorConfig, RegionSamplerConfig,
    Resample, SamConfig, Shuffle, TokenConfig, VisionConfig,
};
pub use names::{check_weights, checkpoint_tensors, param_counts, Init, Module, TensorSpec};
pub mod phi3;
pub mod sam;
pub mod siglip;
pub mod splice;
