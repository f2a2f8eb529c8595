//! # tp-runtime
//!
//! Running a Llama-family model, on one device or split over several:
//! - [`backend`]: where tensors live and operations run — the [`Backend`] trait, the
//!   [`CpuBackend`] and (feature `cuda`) the CUDA backend, the [`LinearKernel`]s they run
//!   linear layers with, and the weight formats ([`DenseWeight`], AWQ) with how each is
//!   placed on each backend (`backend::weights`);
//! - [`model`]: the decoder, written once against [`Backend`]; [`Scorer`];
//! - [`decode`]: the KV cache and [`Decoder`], what generation drives;
//! - [`shard`]: the tensor-parallel plan and [`placement`]: pipeline stages and the ranks of
//!   both, from the configuration alone; [`load`]: reading one rank's share of a checkpoint
//!   (or its pre-sharded file), and writing it;
//! - [`comm`]: collectives between ranks (in-process; NCCL with feature `cuda`) and the abort
//!   flag that ends a group when one rank fails;
//! - [`group`]: a model split over ranks, one thread each, stages pipelined;
//! - [`loaded`]: opening a checkpoint on a device as one model or a group ([`LoadedModel`]);
//! - [`planner`]: choosing tp, pp and the layer split from the model's size and the devices.
//!
//! Model files (configuration, safetensors, tokenizer) are the `checkpoint` crate's; the
//! kernels are the `cpu-kernels` and `cuda-kernels` crates'.

pub mod backend;
pub mod comm;
pub mod decode;
mod error;
pub mod group;
pub mod load;
pub mod loaded;
pub mod model;
pub mod placement;
pub mod planner;
pub mod shard;

#[cfg(feature = "cuda")]
pub use backend::CudaBackend;
pub use backend::{Backend, CpuBackend, LinearKernel, SeqLayout};
pub use backend::{DenseWeight, WeightFormat};
/// The arithmetic of CPU matrix products, requested and resolved against the CPU's features
/// (the `cpu-kernels` crate's).
pub use cpu_kernels::compute;
pub use cpu_kernels::{Compute, ComputeRequest, CpuFeatures, HostTensor};
pub use decode::{Decoder, KvCache};
pub use error::{Error, Result};
pub use group::RankGroup;
pub use loaded::{Device, LoadedModel};
pub use model::{Batch, Model, Scorer};
pub use placement::{Placement, PlacementRequest, RankPlacement, StagePlan};
pub use shard::ShardPlan;
