//! # evaluation
//!
//! Measuring models and runs, and recording the measurements:
//! - [`perplexity`]: the AutoAWQ/GPTQ and llama.cpp protocols over any `tp_runtime::Scorer`;
//! - [`run`]: a checkpoint's perplexity, and a quantization, as measured runs;
//! - [`provenance`]: what makes a number reproducible (tool, commit, machine, digests, peak
//!   memory);
//! - [`report`]: the typed JSON reports every command writes and the job report reads, with
//!   one [`SCHEMA_VERSION`](report::SCHEMA_VERSION).

mod error;
pub mod perplexity;
pub mod provenance;
pub mod report;
pub mod run;

pub use error::{Error, Result};
pub use run::{Device, EvalEvent, EvalRequest, evaluate_checkpoint, quantize_checkpoint};
