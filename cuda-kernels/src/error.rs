//! Errors of the CUDA layer.

/// What can go wrong on (or looking for) a GPU.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// libcuda could not be loaded.
    #[error("no CUDA driver found (libcuda could not be loaded)")]
    NoDriver,
    /// The driver loaded but reports no usable device.
    #[error("no CUDA device {0} (the driver reports {1} devices)")]
    NoDevice(usize, i32),
    /// A CUDA library other than the driver could not be loaded.
    #[error("{0} could not be loaded (put the CUDA {0} library on the library path)")]
    MissingLibrary(&'static str),
    /// A kernel source did not compile.
    #[error("kernel source `{name}` did not compile for {arch}:\n{log}")]
    Compile {
        name: &'static str,
        arch: String,
        log: String,
    },
    /// A driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    /// NVRTC failed (other than a compile error of our source, which is [`KernelError::Compile`]).
    #[error("NVRTC: {0}")]
    Nvrtc(#[from] cudarc::nvrtc::result::NvrtcError),
    /// A captured CUDA graph holds no work.
    #[error("stream capture recorded no work")]
    EmptyCapture,
    /// Buffers whose sizes disagree with the dimensions given.
    #[error("{0}")]
    Shape(String),
}

/// The crate's result type.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
