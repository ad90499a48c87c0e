//! Tasks: prompt building and post-processing.

pub mod masks;
pub mod postprocess;
pub mod prompt;
pub mod result;
pub mod rle;
pub mod templates;
