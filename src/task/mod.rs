//! Tasks: prompt building and post-processing.

pub mod prompt;
pub mod templates;
