//! Errors of quantization: each names the file, layer or tensor at fault.

use std::path::PathBuf;

/// What can go wrong while quantizing and writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A setting that cannot work for this model (group size, out_features, ...).
    #[error("{0}")]
    Invalid(String),
    /// The input is already an AWQ checkpoint.
    #[error("{path}: the model is already quantized (config.json has a quantization_config)")]
    AlreadyQuantized { path: PathBuf },
    /// Writing the output failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A part folder (`awq quantize --part`) that cannot be merged as it is.
    #[error("{path}: {message}")]
    Part { path: PathBuf, message: String },
    /// Calibration failed.
    #[error(transparent)]
    Calib(#[from] awq_calib::CalibError),
    /// Running the model failed.
    #[error(transparent)]
    Runtime(#[from] tp_runtime::Error),
    /// A CPU kernel refused its operands.
    #[error(transparent)]
    Kernel(#[from] cpu_kernels::Error),
    /// Reading or writing a model file failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
}

impl PackError {
    /// Wraps an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PackError::Io {
            path: path.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = PackError> = std::result::Result<T, E>;
