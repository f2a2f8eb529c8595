//! Where a model's tensors live and its operations run. The decoder in [`crate::model`] is
//! written once against [`Backend`]; each device implements it. Linear layers run through
//! [`LinearKernel`]s, one per weight format and backend, so that a new format adds kernels
//! without editing the backends ([`weights`]).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod weights;

use std::fmt;

use checkpoint::{Activation, FloatData, ModelConfig, RopeScaling};

use crate::{Error, Result};

pub use cpu::CpuBackend;
pub use cpu_kernels::{AttendedSequence, AttentionLayout, AttentionSpec, SeqLayout};
#[cfg(feature = "cuda")]
pub use cuda::CudaBackend;

/// A dense `[rows, cols]` weight (PyTorch layout: `[out_features, in_features]` for a linear)
/// in the element type it is stored in.
#[derive(Clone, Debug)]
pub struct DenseWeight {
    pub data: FloatData,
    pub rows: usize,
    pub cols: usize,
}

impl DenseWeight {
    /// Wraps `data` as `[rows, cols]`.
    pub fn new(data: FloatData, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::Invalid(format!(
                "{} values do not make a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        Ok(DenseWeight { data, rows, cols })
    }

    /// An f32 `[rows, cols]` weight from owned values.
    pub fn f32(values: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        Self::new(FloatData::from(values), rows, cols)
    }
}

/// A linear layer's weight in one storage format, before a backend lays it out.
pub trait WeightFormat: Send + fmt::Debug {
    /// The format's name in messages ("dense f16", "awq gemm").
    fn format(&self) -> String;
    /// Output features.
    fn out_features(&self) -> usize;
    /// Input features.
    fn in_features(&self) -> usize;
    /// Bytes of the weight as stored (what was read from the checkpoint).
    fn stored_bytes(&self) -> usize;
    /// Shows `f` each stored tensor of the weight, named from `prefix` (`…q_proj`), with its
    /// little-endian bytes: what a checkpoint of this share holds.
    fn stored_tensors(&self, prefix: &str, f: &mut dyn FnMut(&str, &[u8]) -> Result<()>) -> Result<()>;
    /// The CPU kernel for this weight.
    fn place_cpu(self: Box<Self>, cpu: &CpuBackend) -> Result<Box<dyn LinearKernel<CpuBackend>>>;
    /// The CUDA kernel for this weight.
    #[cfg(feature = "cuda")]
    fn place_cuda(self: Box<Self>, gpu: &CudaBackend) -> Result<Box<dyn LinearKernel<CudaBackend>>>;
}

/// Rotary embedding frequencies (`1 / theta^(2i/d)`, scaled as the configuration says), as
/// transformers computes them, and the factor its cos and sin are multiplied by.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeFrequencies {
    /// The dimensions of a head that rotate (the whole head, or Phi-3's leading part).
    pub head_dim: usize,
    pub inv_freq: Vec<f32>,
    /// LongRoPE's frequencies for sequences longer than the original context, and that
    /// context: positions from it on use these.
    pub long: Option<(Vec<f32>, usize)>,
    /// Multiplies cos and sin (YaRN's and LongRoPE's attention factor; 1 otherwise).
    pub attention_factor: f32,
}

impl RopeFrequencies {
    /// Plain frequencies for `head_dim` and base `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        RopeFrequencies {
            head_dim,
            inv_freq: base_frequencies(head_dim, theta).map(|f| f as f32).collect(),
            long: None,
            attention_factor: 1.0,
        }
    }

    /// The frequencies a configuration asks for (`rope_theta` with its `RopeScaling`),
    /// following transformers' `modeling_rope_utils`.
    pub fn for_config(config: &ModelConfig) -> Self {
        let (d, theta) = (config.rotary_dim, config.rope_theta);
        let base = || base_frequencies(d, theta);
        let f32s = |v: Vec<f64>| v.into_iter().map(|f| f as f32).collect::<Vec<f32>>();
        let plain = |inv_freq| RopeFrequencies {
            head_dim: d,
            inv_freq,
            long: None,
            attention_factor: 1.0,
        };
        match &config.rope_scaling {
            RopeScaling::Default => Self::new(d, theta),
            RopeScaling::Linear { factor } => plain(f32s(base().map(|f| f / factor).collect())),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let original = original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (original / low_freq_factor, original / high_freq_factor);
                let scaled = base().map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth =
                            (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                });
                plain(f32s(scaled.collect()))
            }
            &RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => {
                // The dimension at which a frequency turns `rotations` times over the original
                // context.
                let dim_of = |rotations: f64| {
                    d as f64
                        * (original_max_position_embeddings as f64 / (rotations * 2.0 * std::f64::consts::PI))
                            .ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (dim_of(beta_fast), dim_of(beta_slow));
                if truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(d as f64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                let scaled = base().enumerate().map(|(i, f)| {
                    // 1 keeps the frequency (extrapolation), 0 divides it by the factor.
                    let keep = 1.0 - ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    f / factor * (1.0 - keep) + f * keep
                });
                RopeFrequencies {
                    attention_factor: attention_factor as f32,
                    ..plain(f32s(scaled.collect()))
                }
            }
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let rescaled = |factors: &[f64]| f32s(base().zip(factors).map(|(f, r)| f / r).collect());
                RopeFrequencies {
                    head_dim: d,
                    inv_freq: rescaled(short_factor),
                    long: Some((rescaled(long_factor), *original_max_position_embeddings)),
                    attention_factor: *attention_factor as f32,
                }
            }
        }
    }

    /// `[positions.len(), head_dim]`: cos of each angle in the first half of a row, sin in
    /// the second, times the attention factor. Angles are rounded to f32 before cos/sin, as
    /// transformers does. LongRoPE takes its long frequencies for every position of a call
    /// that reaches past the original context (transformers: the sequence's length).
    pub fn table(&self, positions: &[u32]) -> Vec<f32> {
        let half = self.head_dim / 2;
        let inv_freq = match &self.long {
            Some((long, original)) if positions.iter().any(|&p| p as usize >= *original) => long,
            _ => &self.inv_freq,
        };
        let mut table = vec![0f32; positions.len() * self.head_dim];
        for (row, &p) in table.chunks_exact_mut(self.head_dim).zip(positions) {
            for (i, &f) in inv_freq.iter().enumerate() {
                let angle = (p as f32 * f) as f64;
                row[i] = angle.cos() as f32 * self.attention_factor;
                row[half + i] = angle.sin() as f32 * self.attention_factor;
            }
        }
        table
    }
}

/// `1 / theta^(2i/d)` for `i < d/2`: rope's unscaled frequencies.
fn base_frequencies(head_dim: usize, theta: f64) -> impl Iterator<Item = f64> {
    (0..head_dim / 2).map(move |i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64))
}

/// One next-token prediction to score: the hidden state at `row` predicts `target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prediction {
    pub row: usize,
    pub target: u32,
}

/// Bytes a weight occupies in its backend's memory.
pub trait ByteSize {
    /// Bytes held.
    fn byte_size(&self) -> usize;
}

/// A linear layer's weight placed on a backend, in whatever layout its kernel wants.
pub trait LinearKernel<B: Backend>: Send + Sync {
    /// Output features.
    fn out_features(&self) -> usize;
    /// Input features.
    fn in_features(&self) -> usize;
    /// Bytes the weight occupies in the backend's memory.
    fn byte_size(&self) -> usize;
    /// `out = x · Wᵀ`, for `x` `[rows, in_features]` and `out` `[rows, out_features]`.
    fn forward_into(&self, backend: &B, x: &B::Tensor, out: &mut B::Tensor) -> Result<()>;
    /// The kernel as [`Any`](std::any::Any), for a kernel that fuses work with another of
    /// its own type ([`LinearKernel::gated_into`]); `None` where no kernel does.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// `out = silu(x · Wᵀ) * (x · Upᵀ)` with this kernel as the gate projection, in one pass
    /// that never writes the two products out: `Ok(false)` (nothing written) where this
    /// backend has no such kernel for the pair, and the caller runs the two products and
    /// [`Backend::gate_mul_into`] instead — with the same result.
    fn gated_into(
        &self,
        up: &dyn LinearKernel<B>,
        backend: &B,
        x: &B::Tensor,
        out: &mut B::Tensor,
    ) -> Result<bool> {
        let _ = (up, backend, x, out);
        Ok(false)
    }
}

/// The operations a decoder needs, on one device. Activations are row-major `[rows,
/// features]` f32 matrices; weights keep the element type they are stored in (the backend
/// widens per tile or computes in half precision).
///
/// Operations named `…_into` write a caller's tensor of the right shape, so that a forward
/// pass can reuse its buffers; the provided methods without the suffix allocate.
pub trait Backend: Send + Sync + Sized + 'static {
    /// Activations in the backend's memory.
    type Tensor: Send + Sync;
    /// The flat storage behind a tensor, as collectives see it (`[f32]` on the host).
    type Buffer: ?Sized;
    /// A dense `[rows, cols]` weight (embedding table, lm_head) in its stored element type.
    type Matrix: Send + Sync + ByteSize;
    /// A 1-D f32 weight (norm weight, bias).
    type Vector: Send + Sync + ByteSize;

    /// A short name for reports ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// Runs `f` where this backend's parallel loops start cheapest: on the CPU, on a worker
    /// of rayon's pool, whose loops then wake only the other workers (from any other thread
    /// each loop wakes them and then the caller back). Only for work that never waits on
    /// another rank or thread, which could then be waiting for this worker.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Places a dense matrix.
    fn matrix(&self, weight: DenseWeight) -> Result<Self::Matrix>;
    /// Places a vector (widened to f32).
    fn vector(&self, data: FloatData) -> Result<Self::Vector>;
    /// Places a linear layer's weight, of any format that has a kernel on this backend.
    fn linear(&self, weight: Box<dyn WeightFormat>) -> Result<Box<dyn LinearKernel<Self>>>;

    /// A `[rows, cols]` activation tensor whose contents the next `…_into` overwrites.
    fn alloc(&self, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// A `[rows, cols]` tensor of zeros (a KV cache: rows never written are still read as
    /// masked keys by some kernels, and must not be NaN).
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.upload(&vec![0.0; rows * cols], rows, cols)
    }
    /// Copies host values into a `[rows, cols]` activation tensor.
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Copies an activation tensor back to the host.
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// Runs `f` on the tensor's values in host memory (no copy where they live there).
    fn read<R>(&self, x: &Self::Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        Ok(f(&self.download(x)?))
    }
    /// `(rows, cols)` of an activation tensor.
    fn dims(&self, x: &Self::Tensor) -> (usize, usize);
    /// The storage of a tensor, for collectives.
    fn buffer<'a>(&self, x: &'a Self::Tensor) -> &'a Self::Buffer;
    /// The mutable storage of a tensor, for collectives.
    fn buffer_mut<'a>(&self, x: &'a mut Self::Tensor) -> &'a mut Self::Buffer;

    /// Embeddings of `ids` from a table holding the ids `first_id..first_id + rows`; ids
    /// outside that range (held by another rank) get zero rows.
    fn embed_into(
        &self,
        table: &Self::Matrix,
        ids: &[u32],
        first_id: usize,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `x / rms(x) * weight` over each `head_dim`-wide slice of every row, in place: the
    /// per-head q/k norms (Qwen3); `weight` holds `head_dim` values.
    fn head_rms_norm(
        &self,
        x: &mut Self::Tensor,
        weight: &Self::Vector,
        eps: f32,
        head_dim: usize,
    ) -> Result<()>;
    /// `x / rms(x) * weight`, row by row.
    fn rms_norm_into(
        &self,
        x: &Self::Tensor,
        weight: &Self::Vector,
        eps: f32,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `x += bias`, row by row.
    fn add_bias(&self, x: &mut Self::Tensor, bias: &Self::Vector) -> Result<()>;
    /// The `[rows, head_dim]` cos/sin table of [`RopeFrequencies::table`], on the device.
    fn rope_table(&self, rope: &RopeFrequencies, positions: &[u32]) -> Result<Self::Tensor>;
    /// Rotates every head of `x` in place (rotate-half convention).
    fn rotary(&self, x: &mut Self::Tensor, table: &Self::Tensor, head_dim: usize) -> Result<()>;
    /// Causal grouped-query attention: each query of `layout` over its sequence's keys in the
    /// key store `k`, `v` (`[key rows, kv_heads·head_dim]`).
    fn attention_into(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: &AttentionSpec,
        layout: &AttentionLayout,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// Copies rows `src_row..src_row + rows` of `src` to rows `dst_row..` of `dst` (same
    /// columns): new keys and values into a KV cache.
    fn copy_rows(
        &self,
        src: &Self::Tensor,
        src_row: usize,
        dst: &mut Self::Tensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()>;
    /// `activation(gate) * up`.
    fn gate_mul_into(
        &self,
        activation: Activation,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `x *= factor` (Gemma's embedding multiplier).
    fn scale(&self, x: &mut Self::Tensor, factor: f32) -> Result<()>;
    /// For each prediction, over the vocabulary slice `lm_head` holds (ids `first_id..`):
    /// `[max logit, Σ exp(logit − max), logit of the target or 0 when another rank holds
    /// it]`, as a `[predictions, 3]` tensor. Logits are computed a slice at a time (of rows
    /// or of the vocabulary) and never all kept; with `softcap`, each is `cap · tanh(l / cap)`.
    fn nll_parts(
        &self,
        hidden: &Self::Tensor,
        lm_head: &Self::Matrix,
        predictions: &[Prediction],
        first_id: usize,
        softcap: Option<f32>,
    ) -> Result<Self::Tensor>;
    /// `[rows.len(), lm_head rows]` logits of the selected rows (soft-capped with `softcap`).
    fn logits(
        &self,
        hidden: &Self::Tensor,
        lm_head: &Self::Matrix,
        rows: &[usize],
        softcap: Option<f32>,
    ) -> Result<Self::Tensor>;

    /// [`Backend::embed_into`] into a new tensor.
    fn embed(&self, table: &Self::Matrix, ids: &[u32], first_id: usize, cols: usize) -> Result<Self::Tensor> {
        let mut out = self.alloc(ids.len(), cols)?;
        self.embed_into(table, ids, first_id, &mut out)?;
        Ok(out)
    }
    /// [`Backend::rms_norm_into`] into a new tensor.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Vector, eps: f32) -> Result<Self::Tensor> {
        let (rows, cols) = self.dims(x);
        let mut out = self.alloc(rows, cols)?;
        self.rms_norm_into(x, weight, eps, &mut out)?;
        Ok(out)
    }
    /// [`Backend::attention_into`] into a new tensor.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: &AttentionSpec,
        layout: &AttentionLayout,
    ) -> Result<Self::Tensor> {
        let mut out = self.alloc(layout.rows(), spec.heads * spec.head_dim)?;
        self.attention_into(q, k, v, spec, layout, &mut out)?;
        Ok(out)
    }
    /// [`Backend::gate_mul_into`] into a new tensor.
    fn gate_mul(
        &self,
        activation: Activation,
        gate: &Self::Tensor,
        up: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (rows, cols) = self.dims(gate);
        let mut out = self.alloc(rows, cols)?;
        self.gate_mul_into(activation, gate, up, &mut out)?;
        Ok(out)
    }
}

/// `out` if it already is a `[rows, cols]` tensor, else a new one in its place: buffers that
/// a forward pass reuses from one layer to the next.
pub fn reuse<'a, B: Backend>(
    backend: &B,
    out: &'a mut Option<B::Tensor>,
    rows: usize,
    cols: usize,
) -> Result<&'a mut B::Tensor> {
    if out.as_ref().is_none_or(|t| backend.dims(t) != (rows, cols)) {
        *out = Some(backend.alloc(rows, cols)?);
    }
    Ok(out.as_mut().expect("set above"))
}

/// Checks a [`Backend::copy_rows`] against both tensors' `(rows, cols)`.
pub fn check_copy_rows(
    src: (usize, usize),
    src_row: usize,
    dst: (usize, usize),
    dst_row: usize,
    rows: usize,
) -> Result<()> {
    if src.1 != dst.1 || src_row + rows > src.0 || dst_row + rows > dst.0 {
        return Err(crate::Error::Invalid(format!(
            "copy of rows {src_row}..{} of a {src:?} tensor to rows {dst_row}..{} of a {dst:?} one",
            src_row + rows,
            dst_row + rows
        )));
    }
    Ok(())
}

/// Negative log-likelihoods from the `[max, Σ exp(l − max), target logit]` parts of every
/// vocabulary slice (`parts[slice][prediction][3]`, flattened).
pub fn combine_nll_parts(parts: &[f32], slices: usize) -> Vec<f32> {
    let n = parts.len() / (3 * slices);
    (0..n)
        .map(|i| {
            let part = |s: usize, k: usize| parts[(s * n + i) * 3 + k] as f64;
            let max = (0..slices).map(|s| part(s, 0)).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..slices).map(|s| part(s, 1) * (part(s, 0) - max).exp()).sum();
            let target: f64 = (0..slices).map(|s| part(s, 2)).sum();
            (max + sum.ln() - target) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LongRoPE by hand: head_dim 4, base 10000 (frequencies 1 and 0.01), short factors 1 and
    /// 2 below the original context of 8 positions, long factors 4 and 8 from it on, cos and
    /// sin times the attention factor.
    #[test]
    fn longrope_switches_to_its_long_factors_past_the_original_context() {
        let value = serde_json::json!({"architectures":["LlamaForCausalLM"],"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"rms_norm_eps":1e-5,
            "vocab_size":10,"max_position_embeddings":32,"original_max_position_embeddings":8,
            "rope_scaling":{"rope_type":"longrope","short_factor":[1.0,2.0],"long_factor":[4.0,8.0],
                "attention_factor":1.5}});
        let config = ModelConfig::from_json(&value, std::path::Path::new("config.json")).unwrap();
        let rope = RopeFrequencies::for_config(&config);
        let row = |p: u32, f: [f64; 2]| {
            let a = f.map(|f| (p as f32 * f as f32) as f64);
            [a[0].cos(), a[1].cos(), a[0].sin(), a[1].sin()].map(|v| v as f32 * 1.5)
        };
        assert_eq!(rope.table(&[3]), row(3, [1.0, 0.01 / 2.0]));
        assert_eq!(rope.table(&[10]), row(10, [1.0 / 4.0, 0.01 / 8.0]));
        // A call reaching past the original context takes the long factors for every position.
        assert_eq!(rope.table(&[3, 10])[..4], row(3, [1.0 / 4.0, 0.01 / 8.0]));
    }

    #[test]
    fn layout_positions_restart_per_sequence() {
        let l = SeqLayout::new(&[3, 2]).unwrap();
        assert_eq!(l.rows(), 5);
        assert_eq!(l.positions(), vec![0, 1, 2, 0, 1]);
        assert_eq!(l.sequences().collect::<Vec<_>>(), vec![0..3, 3..5]);
        assert!(SeqLayout::new(&[2, 0]).is_err());
        assert!(SeqLayout::new(&[]).is_err());
    }

    #[test]
    fn nll_parts_combine_like_one_softmax() {
        let logits = [1.0f64, 3.0, -2.0, 0.5, 2.5, 1.5];
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        // Two slices of three ids; the target (id 4) is in the second.
        let part = |s: &[f64], target: Option<usize>| {
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            [
                max as f32,
                s.iter().map(|l| (l - max).exp()).sum::<f64>() as f32,
                target.map_or(0.0, |t| s[t] as f32),
            ]
        };
        let parts: Vec<f32> = [part(&logits[..3], None), part(&logits[3..], Some(1))].concat();
        let nll = combine_nll_parts(&parts, 2);
        assert!((nll[0] as f64 - (lse - 2.5)).abs() < 1e-6);
    }

    #[test]
    fn rope_table_matches_closed_form() {
        let rope = RopeFrequencies::new(4, 10_000.0);
        assert_eq!(rope.inv_freq, vec![1.0, 0.01]);
        let t = rope.table(&[0, 3]);
        assert_eq!(&t[0..4], &[1.0, 1.0, 0.0, 0.0]);
        assert!((t[4] - 3f32.cos()).abs() < 1e-7 && (t[6] - 3f32.sin()).abs() < 1e-7);
        assert!((t[5] - 0.03f32.cos()).abs() < 1e-7 && (t[7] - 0.03f32.sin()).abs() < 1e-7);
    }
}
