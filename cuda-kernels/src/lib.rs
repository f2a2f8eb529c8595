//! # cuda-kernels
//!
//! The project's CUDA kernels and their bindings, on cudarc with run-time loading: nothing
//! CUDA is needed to build, and every entry point probes for the driver, NVRTC and cuBLAS
//! before touching them (cudarc would panic on a missing library; we return an error).
//!
//! - [`source`]: the `.cu` sources, included as strings;
//! - [`compile`]: NVRTC compilation for a device's own architecture, and the compile check
//!   (registers, spills) that CI runs without a GPU;
//! - [`layout`]: the "mma" layout AWQ weights are repacked into at load time, and its CPU
//!   twin;
//! - [`launch`]: which W4A16 kernel a call runs, its grid and K split (plain arithmetic);
//! - [`gpu`]: one device — context, stream, compiled modules cached per device, cuBLAS — with
//!   a safe wrapper per kernel. Every kernel's CPU twin is in tp-runtime's CPU backend;
//! - [`bench`]: timing the W4A16 kernels against cuBLAS f16 (`awq bench kernels`).

pub mod bench;
pub mod compile;
pub mod devices;
mod error;
pub mod gpu;
pub mod launch;
pub mod layout;
pub mod source;

pub use cudarc;
pub use error::{KernelError, Result};
pub use gpu::{Gpu, cuda_available};
