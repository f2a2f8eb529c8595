//! # generation
//!
//! Text from a model that decodes ([`tp_runtime::Decoder`]: one model, or ranks split by
//! tensor and pipeline parallelism):
//! - [`chat`]: the checkpoint's chat template (`tokenizer_config.json`), rendered by a Jinja
//!   engine as transformers renders it;
//! - [`sampler`]: greedy or seeded sampling (temperature, top-k, top-p), reproducible;
//! - [`stop`]: the tokens that end a reply, from the configuration files;
//! - [`stream`]: token ids to text, piece by piece, never splitting a character;
//! - [`generate`]: the loop — prefill, then one token per sequence per step, several
//!   sequences together, each stopping on its own.

pub mod chat;
mod error;
pub mod generate;
pub mod sampler;
pub mod stop;
pub mod stream;

pub use chat::{ChatTemplate, Message};
pub use error::{Error, Result};
pub use generate::{GenerateOptions, Generation, Sequence, StopReason, generate, generate_batch};
pub use sampler::{Sampler, Sampling};
pub use stop::stop_tokens;
pub use stream::TextStream;
