//! What the kernels refuse.

/// An error of a CPU kernel or of choosing one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Operands, a layout or a tensor whose shapes do not fit the operation.
    #[error("{0}")]
    Shape(String),
    /// A compute path this CPU (or its operating system) cannot run.
    #[error("{0}")]
    Unavailable(String),
}

/// The kernels' result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
