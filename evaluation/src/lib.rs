//! # evaluation
//!
//! Measuring models and runs, and recording the measurements:
//! - [`perplexity`]: the AutoAWQ/GPTQ and llama.cpp protocols over any `tp_runtime::Scorer`;
//! - [`kl`]: a model's token distributions against a base model's (llama.cpp's KL
//!   divergence statistics), both run on the same windows;
//! - [`run`]: a checkpoint's perplexity and a generation, as measured runs;
//! - [`bench`]: the arithmetic of a forward pass (FLOPs per token), the roofline benchmarks
//!   hold evaluation throughput against;
//! - [`provenance`]: what makes a number reproducible (tool, commit, machine, digests, peak
//!   memory);
//! - [`report`]: the typed JSON reports every command writes and the job report reads, with
//!   one [`SCHEMA_VERSION`](report::SCHEMA_VERSION) (also carried by the quantization run's
//!   report, which `pipeline` builds on [`provenance`]).

pub mod bench;
mod error;
pub mod kl;
pub mod perplexity;
pub mod provenance;
pub mod report;
pub mod run;

pub use error::{Error, Result};
pub use run::{Device, EvalEvent, EvalRequest, GenerateRequest, evaluate_checkpoint, generate_text};
