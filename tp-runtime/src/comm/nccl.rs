//! NCCL through cudarc, for ranks that each drive one GPU. cudarc loads libnccl and the CUDA
//! driver at run time, so this compiles on any machine; [`nccl_available`] says whether it
//! can run on this one, and nothing here is called unless it says yes.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::Communicator;
use crate::{Error, Result};

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

/// Whether the CUDA driver and libnccl can be loaded here.
pub fn nccl_available() -> bool {
    // SAFETY: these only try to load the shared libraries; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

fn nccl_error(what: &'static str, code: cudarc::nccl::result::NcclError) -> Error {
    Error::Nccl { what, code }
}

/// A new NCCL unique id (rank 0 makes it; every rank of the group needs it).
pub fn new_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
    if !nccl_available() {
        return Err(Error::Invalid(
            "NCCL is not available: no CUDA driver or libnccl found".into(),
        ));
    }
    let id = Id::new().map_err(|e| nccl_error("unique id", e))?;
    Ok(id.internal().map(|c| c as u8))
}

/// The wrapped communicator. NCCL communicators may be used from any thread, one call at a
/// time; the mutex provides the one-at-a-time.
struct SendComm(Comm);
// SAFETY: an ncclComm_t is not tied to the thread that created it; every use goes through
// the Mutex below, so calls never overlap.
unsafe impl Send for SendComm {}

/// One rank of an NCCL group, on one GPU.
pub struct NcclCommunicator {
    comm: Mutex<SendComm>,
    rank: usize,
    world_size: usize,
}

impl NcclCommunicator {
    /// Joins the group `id` as `rank` of `world_size`, on the GPU of `stream`. Every rank must
    /// call this (collectively) with the same id.
    pub fn new(
        stream: Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        id: &[u8; NCCL_ID_BYTES],
    ) -> Result<Self> {
        if !nccl_available() {
            return Err(Error::Invalid(
                "NCCL is not available: no CUDA driver or libnccl found".into(),
            ));
        }
        let id = Id::uninit(id.map(|b| b as core::ffi::c_char));
        let comm = Comm::from_rank(stream, rank, world_size, id).map_err(|e| nccl_error("init", e))?;
        Ok(NcclCommunicator {
            comm: Mutex::new(SendComm(comm)),
            rank,
            world_size,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Comm) -> T) -> T {
        f(&self.comm.lock().expect("NCCL communicator lock").0)
    }
}

impl Communicator<CudaSlice<f32>> for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        self.with(|c| c.all_reduce_in_place(buf, &ReduceOp::Sum))
            .map(|_| ())
            .map_err(|e| nccl_error("all-reduce", e))
    }

    fn all_gather(&self, send: &CudaSlice<f32>, recv: &mut CudaSlice<f32>) -> Result<()> {
        if recv.len() != send.len() * self.world_size {
            return Err(Error::Invalid(format!(
                "all-gather: {} values to send but room for {}",
                send.len(),
                recv.len()
            )));
        }
        self.with(|c| c.all_gather(send, recv))
            .map(|_| ())
            .map_err(|e| nccl_error("all-gather", e))
    }

    fn broadcast(&self, buf: &mut CudaSlice<f32>, root: usize) -> Result<()> {
        self.with(|c| c.broadcast_in_place(buf, root as i32))
            .map(|_| ())
            .map_err(|e| nccl_error("broadcast", e))
    }
}
