//! Errors of measuring a model or a run: each names the file or setting at fault, or passes
//! on the error of the crate that failed.

use std::path::PathBuf;

/// What can go wrong while evaluating a checkpoint or recording a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request that cannot be satisfied (context too short, no windows, ...).
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// A model file or the tokenizer failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// Loading or running the model failed.
    #[error(transparent)]
    Runtime(#[from] tp_runtime::Error),
    /// Generation failed (chat template, sampling settings, the model).
    #[error(transparent)]
    Generate(#[from] generation::Error),
}

impl Error {
    /// An unreadable file, with why.
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
