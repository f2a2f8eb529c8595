//! The generation error type.

use std::path::PathBuf;

/// What can go wrong while generating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file is missing or malformed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// The model failed to run.
    #[error(transparent)]
    Runtime(#[from] tp_runtime::Error),
    /// The chat template is missing, does not parse, or fails to render.
    #[error("{path}: chat template: {message}")]
    Template { path: PathBuf, message: String },
    /// A request that cannot be served (empty prompt, bad sampling values, too long).
    #[error("{0}")]
    Invalid(String),
}

/// The generation result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
