//! Tasks: prompt building and post-processing.

pub mod masks;
pub mod prompt;
