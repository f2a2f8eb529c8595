//! # awq-pack
//!
//! Activation-aware weight quantization of a Llama-family checkpoint into the AWQ "gemm"
//! format that vLLM, transformers, LMDeploy and TGI load:
//! - [`quant`]: 4-bit group quantization with a zero point (RTN), [`GroupSize`];
//! - [`search`]: the per-group scale search; [`clip`]: the clip search;
//! - [`layer`]: both applied to one decoder layer;
//! - [`pack`]: the "gemm" packing;
//! - [`quantize`](mod@quantize): a whole model, streamed layer by layer into a safetensors
//!   file (`checkpoint::writer`) in an output folder;
//! - [`part`] (inside `quantize`): a model quantized in layer ranges on separate runs, merged into the checkpoint a
//!   whole run writes, byte for byte.
//!
//! The calibration forward passes and the search's trials run on any `tp_runtime::Backend`;
//! the statistics, the losses' Gram forms and the packing run on the host.

pub mod clip;
mod error;
pub mod layer;
pub mod pack;
pub mod quant;
pub mod quantize;
pub mod search;

pub use error::{PackError, Result};
pub use quant::GroupSize;
pub use quantize::part::{self, LayerRange, merge_parts};
pub use quantize::{Event, Method, QuantizeOptions, QuantizeReport, quantize, quantize_on};
pub use search::Scaling;
