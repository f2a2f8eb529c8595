//! # cuda-kernels
//!
//! CUDA kernels and their cudarc bindings. Its code arrives with the CUDA backend; until then
//! the crate is empty.
