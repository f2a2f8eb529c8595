//! Errors of reading and writing model files: every variant names the file, tensor or key at
//! fault.

use std::path::PathBuf;

/// Everything that can go wrong while reading or writing model files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file or folder the command needs is not there.
    #[error("{path}: {what}")]
    NotFound { path: PathBuf, what: String },
    /// A JSON file could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A required key is absent from a configuration file.
    #[error("{path}: missing key `{key}` (expected {expected})")]
    MissingKey {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
    /// A configuration key holds a value we cannot use.
    #[error("{path}: key `{key}`: {message}")]
    BadValue {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// The checkpoint's architecture is not one we implement.
    #[error(
        "{path}: unsupported architecture `{found}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
    )]
    UnsupportedArchitecture { path: PathBuf, found: String },
    /// A safetensors file is malformed (truncated, bad header, bad offsets).
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor's shape disagrees with the configuration.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A tensor's element type is not one we can read here.
    #[error("{path}: tensor `{name}` has dtype {found}, expected {expected}")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        found: String,
        expected: &'static str,
    },
    /// A tensor holds NaN or infinite values.
    #[error("{path}: tensor `{name}` holds a non-finite value at element {index}")]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
    },
    /// A GGUF file is malformed or uses something we do not implement.
    #[error("{path}: {message}")]
    Gguf { path: PathBuf, message: String },
    /// The tokenizer could not be loaded, built or run.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A caller asked for something impossible (a shape the format cannot hold, ...).
    #[error("{0}")]
    Invalid(String),
}

/// Result of reading or writing model files.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
