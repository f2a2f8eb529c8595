//! Errors of calibration: each names the file (and line) or the layer at fault.

use std::path::PathBuf;

/// What can go wrong while building calibration data or capturing activations.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    /// The calibration file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record could not be parsed.
    #[error("{path}:{line}: {message}")]
    Record {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The file does not hold enough usable text for the request.
    #[error("{path}: {message}")]
    TooLittleText { path: PathBuf, message: String },
    /// A request that cannot be satisfied (zero samples, a block of zero tokens, ...).
    #[error("{0}")]
    Invalid(String),
    /// Activations became NaN or infinite.
    #[error("layer {layer}: the input of {what} holds a non-finite value (row {row}, channel {channel})")]
    NonFinite {
        layer: usize,
        what: &'static str,
        row: usize,
        channel: usize,
    },
    /// The model failed to load or run.
    #[error(transparent)]
    Runtime(#[from] tp_runtime::Error),
    /// A CPU kernel refused its operands.
    #[error(transparent)]
    Kernel(#[from] cpu_kernels::Error),
    /// A model file or the tokenizer failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
}

/// The crate's result type.
pub type Result<T, E = CalibError> = std::result::Result<T, E>;
