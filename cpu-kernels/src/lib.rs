//! # cpu-kernels
//!
//! The CPU's kernels, beside `cuda-kernels`: what `tp_runtime::CpuBackend` runs, and the
//! reference twin of every GPU kernel. Modules, from the leaves up (each imports only those
//! above it in this list; `testkit/tests/module_graph.rs` checks there is no circle):
//! - [`compute`]: the arithmetic of products (f32, bf16 by AVX512-BF16, bf16 on AMX tiles),
//!   requested and resolved against the CPU's features;
//! - [`math`]: vectorised reductions, `exp`, SiLU·mul — the same bits on every instruction
//!   set and thread count;
//! - [`convert`]: f32 → bf16 rounding and bf16 pairs in one word;
//! - [`layout`]: how a weight tile lies in its buffer; [`parallel`]: one output shared by
//!   rayon tasks, and whether a product may use the whole pool; [`memory`]: the allocator's
//!   handling of large buffers;
//! - [`tensor`]: [`HostTensor`], an f32 matrix in host memory; [`sequences`]: sequences of
//!   rows and where attention finds each sequence's keys;
//! - [`matmul`]: f32 products and Gram matrices by the `gemm` crate;
//! - [`pairs`]: small bf16-pair products by `vdpbf16ps` (or its scalar twin);
//! - [`amx`]: the AMX-BF16 tile kernel (or its scalar twin);
//! - [`bf16`]: products with bf16 operands and f32 sums, on `gemmkit` or the tiles;
//! - [`dense`]: [`CpuMatrix`], a weight in its stored element type (f32, f16, bf16);
//! - [`w4a16`]: [`CpuAwq`], products straight from packed AWQ "gemm" weights;
//! - [`attention`]: causal grouped-query attention over a key store;
//! - [`bench`]: this machine's GEMM rate on a compute path and its host read bandwidth, the
//!   yardsticks `awq bench` measures in the same run.

pub mod amx;
pub mod attention;
pub mod bench;
pub mod bf16;
pub mod compute;
pub mod convert;
pub mod dense;
mod error;
pub mod layout;
pub mod math;
pub mod matmul;
pub mod memory;
pub mod pairs;
pub mod parallel;
pub mod sequences;
pub mod tensor;
pub mod w4a16;

pub use attention::AttentionSpec;
pub use bf16::{gram_rows_bf16, matmul_bf16_weight, matmul_transposed_bf16, matmul_transposed_in};
pub use compute::{Bf16Kernel, Compute, ComputeRequest, CpuFeatures};
pub use convert::{narrow, to_bf16, to_bf16_slice};
pub use dense::CpuMatrix;
pub use error::{Error, Result};
pub use math::{
    dot, dot_f64, exp_in_place, gelu_tanh_mul_into, max, min_max, silu_mul_into, squared_distance_f64, sum,
    sum_f64, sum_of_squares_f64,
};
pub use matmul::{gram, gram_into, gram_rows_into, matmul_transposed};
pub use memory::{release_freed_memory, retain_freed_memory};
pub use parallel::PoolRoot;
pub use sequences::{AttendedSequence, AttentionLayout, SeqLayout};
pub use tensor::HostTensor;
pub use w4a16::CpuAwq;
