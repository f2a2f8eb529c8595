//! One module per `awq` subcommand.

pub mod batch;
pub mod bench;
pub mod bench_generate;
#[cfg(feature = "cuda")]
pub mod bench_kernels;
pub mod bench_scale;
pub mod devices;
pub mod eval;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod merge;
pub mod plan;
pub mod quantize;
pub mod run;
pub mod shard;
pub mod synth;
