//! One module per `awq` subcommand.

pub mod batch;
pub mod bench;
#[cfg(feature = "cuda")]
pub mod bench_kernels;
pub mod devices;
pub mod eval;
pub mod import;
pub mod inspect;
pub mod plan;
pub mod quantize;
pub mod run;
pub mod shard;
