//! The GPUs of this machine as a placement needs to know them: name, memory, compute
//! capability, and which pairs can copy to each other directly.

use cudarc::driver::{CudaContext, sys};

use crate::{KernelError, Result, cuda_available};

/// The oldest compute capability our kernels run on: `mma.sync` with f16 operands and
/// `cvt.rn.bf16.f32` need sm_80 (Ampere).
pub const MIN_CAPABILITY: (i32, i32) = (8, 0);

/// One GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_memory: u64,
    pub free_memory: u64,
    /// `(major, minor)`.
    pub capability: (i32, i32),
}

impl DeviceInfo {
    /// Whether our kernels run on it.
    pub fn supported(&self) -> bool {
        self.capability >= MIN_CAPABILITY
    }
}

/// Every GPU of this machine; "no CUDA driver found" where there is none.
pub fn probe() -> Result<Vec<DeviceInfo>> {
    let n = cuda_available()?;
    (0..n)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal)?;
            ctx.bind_to_thread()?;
            let (free, total) = cudarc::driver::result::mem_get_info()?;
            Ok(DeviceInfo {
                ordinal,
                name: ctx.name()?,
                total_memory: total as u64,
                free_memory: free as u64,
                capability: ctx.compute_capability()?,
            })
        })
        .collect()
}

/// Whether GPU `a` can read and write GPU `b`'s memory directly.
pub fn peer_access(a: usize, b: usize) -> Result<bool> {
    if a == b {
        return Ok(true);
    }
    let (da, db) = (
        cudarc::driver::result::device::get(a as i32)?,
        cudarc::driver::result::device::get(b as i32)?,
    );
    let mut can = 0;
    // SAFETY: both handles come from the driver; the call only writes `can`.
    unsafe { sys::cuDeviceCanAccessPeer(&mut can, da, db) }
        .result()
        .map_err(KernelError::from)?;
    Ok(can != 0)
}

/// The driver's CUDA version, as `(major, minor)`.
pub fn driver_version() -> Result<(i32, i32)> {
    let mut version = 0;
    // SAFETY: the driver was loaded by `cuda_available`; the call only writes `version`.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(KernelError::from)?;
    Ok((version / 1000, version % 1000 / 10))
}
