//! # awq-pack
//!
//! Activation-aware weight quantization of a Llama-family checkpoint into the AWQ "gemm"
//! format that vLLM, transformers, LMDeploy and TGI load:
//! - [`quant`]: 4-bit group quantization with a zero point (RTN), [`GroupSize`];
//! - [`search`]: the per-group scale search; [`clip`]: the clip search;
//! - [`layer`]: both applied to one decoder layer;
//! - [`pack`]: the "gemm" packing; [`writer`]: a safetensors file written layer by layer;
//! - [`quantize`](mod@quantize): a whole model, streamed layer by layer, into an output folder.

pub mod clip;
mod error;
pub mod layer;
pub mod pack;
pub mod quant;
pub mod quantize;
pub mod search;
pub mod writer;

pub use error::{PackError, Result};
pub use quant::GroupSize;
pub use quantize::{Event, Method, QuantizeOptions, QuantizeReport, quantize};
pub use search::Scaling;
