//! One error type for the whole crate. Every public function returns `Result<T>`; user input
//! (files, images, prompts, configs) must end in one of these variants, never in a panic.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("shape mismatch in {op}: {msg}")]
    Shape { op: &'static str, msg: String },

    #[error("dtype mismatch in {op}: expected {expected}, found {found}")]
    DType {
        op: &'static str,
        expected: String,
        found: String,
    },

    #[error("tensor `{name}` not found in {location}")]
    MissingTensor { name: String, location: String },

    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("weights file {path}: {msg}")]
    Weights { path: PathBuf, msg: String },

    /// Every violation found, one per line, so a bad config is fixed in one round.
    #[error("invalid config {path}:\n  - {}", problems.join("\n  - "))]
    Config { path: String, problems: Vec<String> },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("invalid input: {0}")]
    Input(String),

    #[error("graph: {0}")]
    Graph(String),

    #[error("backend {backend}: {msg}")]
    Backend { backend: &'static str, msg: String },

    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// The caller's abort poll or progress callback asked to stop (not a failure of the input).
    #[error("aborted: {0}")]
    Aborted(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }

    /// True for errors caused by what the user handed in (exit code 2 in the CLI).
    pub fn is_user_input(&self) -> bool {
        matches!(
            self,
            Error::Io { .. }
                | Error::MissingTensor { .. }
                | Error::TensorShape { .. }
                | Error::Weights { .. }
                | Error::Config { .. }
                | Error::Tokenizer(_)
                | Error::Input(_)
        )
    }
}

/// `bail!(Input, "...")`-style shorthand used across the crate.
#[macro_export]
macro_rules! input_err {
    ($($arg:tt)*) => { $crate::Error::Input(format!($($arg)*)) };
}
