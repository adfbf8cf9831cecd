//! One error type for the model crate. Variants carry what a caller needs to decide what to do
//! (fix the input, fix the checkpoint, or report a bug) and name the offending tensor or key.

use std::path::PathBuf;

/// Errors raised by the model crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // === Files ===
    // The I/O error is shown in the message and not chained as a source, so that reports that
    // print the chain do not repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    SafeTensors { path: PathBuf, reason: String },
    #[error("{path}: invalid JSON: {reason}")]
    Json { path: PathBuf, reason: String },

    // === Checkpoints ===
    #[error("{path}: config key `{key}`: {reason}")]
    Config {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("checkpoint {dir}: missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        dir: PathBuf,
        name: String,
        expected: Vec<usize>,
    },
    #[error("checkpoint {dir}: unexpected tensor(s) the model does not use: {names}")]
    UnexpectedTensors { dir: PathBuf, names: String },
    #[error("checkpoint {dir}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        dir: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("checkpoint {dir}: tensor `{name}` has dtype {found}, expected one of F32, BF16, F16")]
    TensorDtype {
        dir: PathBuf,
        name: String,
        found: String,
    },

    // === Inputs ===
    #[error("input `{name}`: {reason}")]
    Input { name: String, reason: String },

    // === Parallelism ===
    #[error("tensor parallelism: {0}")]
    Parallel(String),

    // === Devices ===
    /// A compute device that is missing, unusable, or failed (named: `cuda`, `cuda:1`).
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },

    // === Control ===
    /// The caller asked to stop (named by what was stopped).
    #[error("{0}: cancelled")]
    Cancelled(String),

    // === Internal ===
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
}

/// Result alias for the model crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error raised by a caller's code inside a model callback (a frame sink), named by
    /// what it was handling.
    pub fn external(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::input(name, reason)
    }

    pub(crate) fn input(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Input {
            name: name.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn device(device: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Device {
            device: device.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape {
            op,
            detail: detail.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}
