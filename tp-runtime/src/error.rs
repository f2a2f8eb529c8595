//! The runtime's error type: what the model files say is wrong (named by the checkpoint
//! crate), what a device says, and requests that cannot run.

/// Everything that can go wrong while loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file is missing, malformed, or disagrees with the configuration.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::Error),
    /// The GPU, its driver or one of its libraries failed or is missing.
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
