//! Collective operations among the ranks of a tensor-parallel group. The decoder calls them
//! on its backend's buffers; an in-process group serves CPU ranks (one thread each), NCCL
//! serves GPU ranks (one GPU each).

mod abort;
mod local;
#[cfg(feature = "cuda")]
mod nccl;
pub mod rendezvous;

pub use abort::Abort;
pub use local::LocalCommunicator;
#[cfg(feature = "cuda")]
pub use nccl::{NCCL_ID_BYTES, NcclCommunicator, nccl_available, new_unique_id};

use crate::Result;

/// All-reduce, all-gather and broadcast over buffers of type `Buf` (`[f32]` on the host, a
/// device slice on a GPU). Every rank of the group must make the same calls in the same
/// order.
pub trait Communicator<Buf: ?Sized>: Send + Sync {
    /// This rank's index in `0..world_size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// `buf ← Σ_ranks buf`, elementwise.
    fn all_reduce_sum(&self, buf: &mut Buf) -> Result<()>;
    /// `recv ← concat(send of rank 0, send of rank 1, …)`; `recv` holds `world_size` times
    /// `send`'s length.
    fn all_gather(&self, send: &Buf, recv: &mut Buf) -> Result<()>;
    /// Every rank's `buf ← root`'s `buf`.
    fn broadcast(&self, buf: &mut Buf, root: usize) -> Result<()>;
}
