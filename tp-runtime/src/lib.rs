//! # tp-runtime
//!
//! Everything needed to run a Llama-family model and measure it: configuration, memory-mapped
//! checkpoints, GGUF import, tokenizer, the decoder written against a [`Backend`], tensor
//! parallelism (shard plan, communicators, in-process ranks), and perplexity under the
//! AutoAWQ and llama.cpp protocols.

pub mod atomic;
pub mod awq;
pub mod backend;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod digest;
mod error;
pub mod gguf;
pub mod model;
pub mod perplexity;
pub mod shard;
pub mod tokenizer;
pub mod tp;

pub use backend::{Backend, CpuBackend, CudaBackend, SeqLayout};
pub use checkpoint::Checkpoint;
pub use config::{Architecture, ModelConfig};
pub use error::{Error, Result};
pub use model::{Model, Scorer};
pub use shard::ShardPlan;
pub use tokenizer::Tokenizer;
pub use tp::TensorParallel;
