//! # checkpoint
//!
//! Everything about model files, and nothing about running them:
//! - [`config`]: `config.json` → [`ModelConfig`] (Llama, Mistral, Qwen2, Qwen3, Phi-3) and the AWQ
//!   `quantization_config`;
//! - [`names`]: the Hugging Face tensor names of a Llama-family decoder ([`Projection`]);
//! - [`awq`]: the AWQ "gemm" schema — tensor shapes, nibble order, packing of one word;
//! - [`mapped`]: memory-mapped checkpoints (one file or an index of shards), typed views
//!   of their tensors ([`HostData`], [`FloatData`]);
//! - [`synth`]: synthetic checkpoints at real shapes, generated tensor by tensor;
//! - [`writer`]: checkpoints streamed tensor by tensor, one file or Hugging Face shards;
//! - [`presharded`]: checkpoints stored as one file per rank, with their `mapping`;
//! - [`gguf`]: llama.cpp's GGUF files and their import into a Hugging Face folder;
//! - [`tokenizer`]: `tokenizer.json` through the Hugging Face `tokenizers` crate;
//! - [`atomic`]: outputs that appear whole or not at all; [`digest`]: SHA-256 of files;
//!   [`cache`]: where fetched models live.

pub mod atomic;
pub mod awq;
pub mod cache;
pub mod config;
pub mod digest;
mod error;
pub mod gguf;
pub mod mapped;
pub mod names;
pub mod presharded;
pub mod synth;
pub mod tokenizer;
pub mod writer;

pub use awq::{AwqGemm, AwqShape};
pub use config::{Activation, Architecture, LayerType, ModelConfig, QuantizationConfig, RopeScaling};
pub use error::{Error, Result};
pub use mapped::{Checkpoint, Element, FloatData, HostData, TensorRef};
pub use names::Projection;
pub use safetensors::Dtype;
pub use tokenizer::Tokenizer;
