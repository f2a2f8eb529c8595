//! # tp-runtime
//!
//! Running a Llama-family model, on one device or split over several:
//! - [`backend`]: where tensors live and operations run — the [`Backend`] trait, the
//!   [`CpuBackend`] and (feature `cuda`) the CUDA backend, the [`LinearKernel`]s they run
//!   linear layers with, and the weight formats ([`DenseWeight`], AWQ) with how each is
//!   placed on each backend (`backend::weights`);
//! - [`model`]: the decoder, written once against [`Backend`]; [`Scorer`];
//! - [`shard`]: the tensor-parallel plan, from the configuration alone; [`load`]: reading one
//!   rank's share of a checkpoint;
//! - [`comm`]: collectives between ranks (in-process; NCCL with feature `cuda`);
//! - [`tp`]: a model split over ranks, one thread each.
//!
//! Model files (configuration, safetensors, tokenizer) are the `checkpoint` crate's.

pub mod backend;
pub mod comm;
mod error;
pub mod load;
pub mod model;
pub mod shard;
pub mod tensor;
pub mod tp;

#[cfg(feature = "cuda")]
pub use backend::CudaBackend;
pub use backend::weights::{DenseWeight, WeightFormat};
pub use backend::{Backend, CpuBackend, LinearKernel, SeqLayout};
pub use error::{Error, Result};
pub use model::{Model, Scorer};
pub use shard::ShardPlan;
pub use tensor::HostTensor;
pub use tp::TensorParallel;
