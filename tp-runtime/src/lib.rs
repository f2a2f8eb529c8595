//! # tp-runtime
//!
//! Everything needed to run a Llama-family model and measure it: configuration, memory-mapped
//! checkpoints, GGUF import, tokenizer, the decoder written against a [`Backend`], and
//! perplexity under the AutoAWQ and llama.cpp protocols.

pub mod atomic;
pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod digest;
mod error;
pub mod gguf;
pub mod model;
pub mod perplexity;
pub mod tokenizer;

pub use backend::{Backend, CpuBackend, SeqLayout};
pub use checkpoint::Checkpoint;
pub use config::{Architecture, ModelConfig};
pub use error::{Error, Result};
pub use model::Model;
pub use tokenizer::Tokenizer;
