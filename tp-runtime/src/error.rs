//! The runtime's error type: what the model files say is wrong (named by the checkpoint
//! crate), what a device says, and requests that cannot run.

/// Everything that can go wrong while loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file is missing, malformed, or disagrees with the configuration.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// A CPU kernel refused its operands, or the CPU lacks the requested compute path.
    #[error(transparent)]
    Kernel(#[from] cpu_kernels::Error),
    /// The GPU, its driver or one of its libraries failed or is missing.
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Gpu(#[from] cuda_kernels::KernelError),
    /// NCCL failed in a collective or its setup.
    #[cfg(feature = "cuda")]
    #[error("NCCL {what}: {code:?}")]
    Nccl {
        what: &'static str,
        code: cudarc::nccl::result::NcclError,
    },
    /// The GPUs asked for are not there (too few, too old, no NCCL for several).
    #[error("{0}")]
    Device(String),
    /// A caller asked for something impossible (bad context length, empty batch, ...).
    #[error("{0}")]
    Invalid(String),
    /// A rank of a group failed; the group ended.
    #[error("rank {failed} failed: {cause}")]
    RankFailed { failed: usize, cause: String },
    /// A rank stopped because another rank of its group failed.
    #[error("rank {rank} stopped because rank {failed} failed: {cause}")]
    Aborted {
        rank: usize,
        failed: usize,
        cause: String,
    },
}

/// The runtime's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
