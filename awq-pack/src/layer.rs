//! AWQ for one decoder layer (awq-format.md §1–§4): search every group's scales on the unmodified
//! layer, fuse them into the norms and previous linears, search clipping on the scaled
//! weights and inputs, quantize and pack.

use std::borrow::Cow;
use std::time::Instant;

use awq_calib::{Activations, LayerInputs};
use checkpoint::FloatData;
use checkpoint::names::{self, Projection, layer_tensor_name};
use checkpoint::{Checkpoint, LayerType, ModelConfig};
use cpu_kernels::{
    dot_f64, matmul_bf16_weight, matmul_transposed, matmul_transposed_in, squared_distance_f64,
    sum_of_squares_f64, to_bf16,
};
use half::{bf16, f16};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tp_runtime::Compute;
use tp_runtime::compute::Bf16Kernel;
use tp_runtime::load::applied_norm;
use tp_runtime::model::{ForwardContext, Linear, Workspace, gated_activation, project, self_attention};
use tp_runtime::{Backend, DenseWeight, SeqLayout};

use crate::clip::{ClipStats, apply_clip, sample_tokens, search_clip};
use crate::pack::{PackedGemm, pack_gemm};
use crate::quant::{GroupSize, QuantizedLinear};
use crate::search::{
    GRID, ScaleChoice, Scaling, scaled_fake_quantize, scaled_fake_quantize_bf16, search_scales, weight_mean,
};
use crate::{PackError, Result};

/// Calibration tokens per forward pass in a trial: bounds transient memory (at the 7B shape
/// the MLP's activations take 130 KB per token). Benchmarks measure the GEMM rate of the
/// search's floor at this many rows.
pub const TRIAL_TOKENS: usize = 2048;

/// Settings of the per-layer search.
#[derive(Clone, Debug)]
pub struct LayerSettings {
    pub group_size: GroupSize,
    pub scaling: Scaling,
    pub clip: bool,
    /// Tokens per calibration block (sequences never cross blocks).
    pub seq_len: usize,
    /// Which projections are quantized (the others stay dense).
    pub converted: [bool; 7],
    /// The arithmetic of the linear-inspected groups' loss products.
    pub compute: Compute,
}

/// Owned, modifiable f32 weights of one decoder layer, indexed by [`Projection`]. Norms hold
/// the weights as applied (`norm_offset + w`), so that a scale divides what multiplies the
/// activations (Gemma's `1 + w`).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// Full or sliding-window attention.
    pub layer_type: LayerType,
    pub input_layernorm: Vec<f32>,
    /// The norm of the MLP's input ([`names::mlp_input_norm`]).
    pub mlp_norm: Vec<f32>,
    /// The norms of the attention and MLP outputs (Gemma): after the blocks, so no scale
    /// crosses them.
    pub output_norms: Option<[Vec<f32>; 2]>,
    /// The per-head q/k norms (Qwen3, Gemma 3): after the projections, so no scale crosses
    /// them.
    pub qk_norms: Option<[Vec<f32>; 2]>,
    pub weights: [Vec<f32>; 7],
    pub biases: [Option<Vec<f32>>; 7],
}

impl LayerWeights {
    /// Copies layer `layer`'s weights out of a dense checkpoint, widened to f32.
    pub fn read(checkpoint: &Checkpoint, config: &ModelConfig, layer: usize) -> Result<Self> {
        let h = config.hidden_size;
        let dense = |name: String, shape: &[usize]| -> Result<Vec<f32>> {
            Ok(checkpoint.tensor_with_shape(&name, shape)?.to_f32()?.into_vec())
        };
        let mut weights = Vec::with_capacity(7);
        let mut biases = Vec::with_capacity(7);
        for p in Projection::ALL {
            // A fused projection (Phi-3) is its rows of the stored tensor.
            let (stored, rows) = p.stored(config);
            let prefix = stored.prefix(layer);
            if !checkpoint.contains(&format!("{prefix}.weight"))
                && checkpoint.contains(&format!("{prefix}.qweight"))
            {
                return Err(PackError::Invalid(format!(
                    "layer {layer}: {} is already quantized",
                    stored.module
                )));
            }
            let (out_features, _) = p.shape(config);
            let (stored_out, in_features) = stored.shape(config);
            let weight =
                checkpoint.tensor_with_shape(&format!("{prefix}.weight"), &[stored_out, in_features])?;
            weights.push(weight.rows(rows)?.to_f32()?.into_vec());
            let prefix = p.prefix(layer);
            biases.push(match p.has_bias(config) {
                true => Some(dense(format!("{prefix}.bias"), &[out_features])?),
                false => None,
            });
        }
        let norm = |suffix: &str, len: usize| -> Result<Vec<f32>> {
            let stored = checkpoint.tensor_with_shape(&layer_tensor_name(layer, suffix), &[len])?;
            Ok(applied_norm(config, stored.float_data()?).into_f32().into_vec())
        };
        Ok(LayerWeights {
            layer_type: config.layer_types[layer],
            input_layernorm: norm(names::INPUT_LAYERNORM, h)?,
            mlp_norm: norm(names::mlp_input_norm(config), h)?,
            output_norms: match names::block_output_norms(config) {
                Some([attention, mlp]) => Some([norm(attention, h)?, norm(mlp, h)?]),
                None => None,
            },
            qk_norms: match config.qk_norm {
                true => Some([
                    norm(names::Q_NORM, config.head_dim)?,
                    norm(names::K_NORM, config.head_dim)?,
                ]),
                false => None,
            },
            weights: weights.try_into().expect("seven projections"),
            biases: biases.try_into().expect("seven projections"),
        })
    }

    /// The weight of `p`.
    pub fn weight(&self, p: Projection) -> &[f32] {
        &self.weights[p.index()]
    }

    /// `p` on `backend`, holding `weight` (and `p`'s bias).
    fn linear<B: Backend>(
        &self,
        backend: &B,
        config: &ModelConfig,
        p: Projection,
        weight: FloatData,
    ) -> Result<Linear<B>> {
        let (out_features, in_features) = p.shape(config);
        let weight = DenseWeight::new(weight, out_features, in_features)?;
        let bias = self.biases[p.index()].clone().map(Into::into);
        Ok(Linear::new(backend, Box::new(weight), bias)?)
    }
}

/// What absorbs `1/s` in a scaling group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Absorber {
    /// `input_layernorm`.
    InputNorm,
    /// The MLP's input norm ([`names::mlp_input_norm`]).
    MlpNorm,
    Linear(Projection),
}

/// Where a group's loss is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inspect {
    /// The whole attention block (o_proj included, unquantized).
    SelfAttention,
    /// The whole MLP (down_proj included, unquantized).
    Mlp,
    /// The scaled linear alone (its loss in the Gram form `tr(ΔW XᵀX ΔWᵀ)`, or directly when
    /// there are fewer tokens than input features).
    Linear(Projection),
}

/// A scaling group: linears sharing one input, and what absorbs the inverse scale
/// (`docs/awq-format.md` §2).
#[derive(Clone, Debug)]
pub struct ScalingGroup {
    pub absorber: Absorber,
    pub linears: Vec<Projection>,
    pub inspect: Inspect,
}

/// The scaling groups of a decoder layer under `config`, in search order: the one place
/// that decides, among other things, when the v → o group exists.
pub fn scaling_groups(config: &ModelConfig) -> Vec<ScalingGroup> {
    use Projection::*;
    let mut groups = vec![ScalingGroup {
        absorber: Absorber::InputNorm,
        linears: vec![Q, K, V],
        inspect: Inspect::SelfAttention,
    }];
    // v → o only when v_proj and o_proj have the same shape, as AutoAWQ decides: without
    // grouped-query attention and with heads × head_dim = hidden.
    if V.shape(config) == O.shape(config) {
        groups.push(ScalingGroup {
            absorber: Absorber::Linear(V),
            linears: vec![O],
            inspect: Inspect::Linear(O),
        });
    }
    groups.push(ScalingGroup {
        absorber: Absorber::MlpNorm,
        linears: vec![Gate, Up],
        inspect: Inspect::Mlp,
    });
    groups.push(ScalingGroup {
        absorber: Absorber::Linear(Up),
        linears: vec![Down],
        inspect: Inspect::Linear(Down),
    });
    groups
}

impl ScalingGroup {
    /// "absorber -> linears", as reports name the group.
    pub fn name(&self, config: &ModelConfig) -> String {
        let absorber = match self.absorber {
            Absorber::InputNorm => names::INPUT_LAYERNORM.trim_end_matches(".weight").to_string(),
            Absorber::MlpNorm => names::mlp_input_norm(config)
                .trim_end_matches(".weight")
                .to_string(),
            Absorber::Linear(p) => p.module().to_string(),
        };
        let linears: Vec<&str> = self.linears.iter().map(|p| p.module()).collect();
        format!("{absorber} -> {}", linears.join(", "))
    }

    fn inspected(&self) -> &'static str {
        match self.inspect {
            Inspect::SelfAttention => "self_attn",
            Inspect::Mlp => "mlp",
            Inspect::Linear(p) => p.module(),
        }
    }
}

/// Floating-point operations of the AWQ search on one layer with `tokens` calibration tokens
/// in blocks of `seq_len`: the capture forward, a reference and [`GRID`] trials of each
/// block-inspected group, and the linear-inspected groups' trials (Gram or direct form). The clip search
/// is left out (under 1 %). `awq bench quantize` divides by this.
pub fn search_flops(config: &ModelConfig, tokens: f64, seq_len: usize) -> f64 {
    let product = |p: Projection| {
        let (out_features, in_features) = p.shape(config);
        2.0 * tokens * (out_features * in_features) as f64
    };
    let q = config.q_features() as f64;
    let scores = tokens * 4.0 * q * (seq_len as f64 + 1.0) / 2.0;
    let attention: f64 = [Projection::Q, Projection::K, Projection::V, Projection::O]
        .into_iter()
        .map(product)
        .sum::<f64>()
        + scores;
    let mlp: f64 = [Projection::Gate, Projection::Up, Projection::Down]
        .into_iter()
        .map(product)
        .sum();
    let trials = GRID as f64;
    let mut flops = attention + mlp; // capture
    for group in scaling_groups(config) {
        flops += match group.inspect {
            Inspect::SelfAttention => (trials + 1.0) * attention,
            Inspect::Mlp => (trials + 1.0) * mlp,
            Inspect::Linear(p) => {
                let (out_features, in_features) = p.shape(config);
                let (k, out) = (in_features as f64, out_features as f64);
                match tokens < k {
                    true => trials * 2.0 * tokens * k * out,
                    false => 2.0 * tokens * k * k + trials * 2.0 * out * k * k,
                }
            }
        };
    }
    flops
}

/// The search of one group, as reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupReport {
    pub group: String,
    pub inspected: String,
    pub seconds: f64,
    #[serde(flatten)]
    pub choice: ScaleChoice,
}

/// The clip search of one linear, as reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClipReport {
    pub linear: String,
    #[serde(flatten)]
    pub stats: ClipStats,
}

/// Seconds spent per step on one layer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepSeconds {
    pub capture: f64,
    pub scale_search: f64,
    pub clip_search: f64,
    pub quantize_pack: f64,
}

/// One layer's report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    pub scale_groups: Vec<GroupReport>,
    pub clip: Vec<ClipReport>,
    pub seconds: StepSeconds,
}

/// A projection as written: packed AWQ or (when not converted) a dense f16 weight.
#[derive(Clone, Debug)]
pub enum OutLinear {
    Awq(PackedGemm),
    Dense(Vec<f16>),
}

/// A quantized layer, ready to write; norms as applied (see [`LayerWeights`]).
#[derive(Clone, Debug)]
pub struct QuantizedLayer {
    pub input_layernorm: Vec<f32>,
    pub mlp_norm: Vec<f32>,
    pub output_norms: Option<[Vec<f32>; 2]>,
    pub qk_norms: Option<[Vec<f32>; 2]>,
    pub linears: [OutLinear; 7],
    pub biases: [Option<Vec<f32>>; 7],
}

/// What the forward passes of one group's trials share: the forward context of each chunk
/// size (its rotary table) and the workspace, made once per group rather than per trial.
struct TrialState<B: Backend> {
    contexts: Vec<(usize, ForwardContext<B>)>,
    ws: Workspace<B>,
    out: Option<B::Tensor>,
}

impl<B: Backend> TrialState<B> {
    fn new() -> Self {
        TrialState {
            contexts: Vec::new(),
            ws: Workspace::default(),
            out: None,
        }
    }

    /// Runs `f` over the calibration tokens in chunks of whole blocks, with the forward
    /// context of each chunk's layout, this state's workspace and its output buffer.
    fn for_each_chunk(
        &mut self,
        backend: &B,
        tokens: usize,
        seq_len: usize,
        config: &ModelConfig,
        mut f: impl FnMut(
            std::ops::Range<usize>,
            &ForwardContext<B>,
            &mut Workspace<B>,
            &mut Option<B::Tensor>,
        ) -> Result<()>,
    ) -> Result<()> {
        let chunk = (TRIAL_TOKENS / seq_len).max(1) * seq_len;
        for start in (0..tokens).step_by(chunk) {
            let rows = chunk.min(tokens - start);
            let i = match self.contexts.iter().position(|(r, _)| *r == rows) {
                Some(i) => i,
                None => {
                    let layout = SeqLayout::new(&vec![seq_len; rows / seq_len])?;
                    self.contexts
                        .push((rows, ForwardContext::new(backend, config, &layout)?));
                    self.contexts.len() - 1
                }
            };
            f(
                start..start + rows,
                &self.contexts[i].1,
                &mut self.ws,
                &mut self.out,
            )?;
        }
        Ok(())
    }
}

/// Σ (a − b)², in f64, in a fixed order.
/// Σ x², accumulated in f64 over the same chunks as [`squared_error`].
fn sum_of_squares(a: &[f32]) -> f64 {
    a.par_chunks(16_384)
        .map(sum_of_squares_f64)
        .collect::<Vec<f64>>()
        .into_iter()
        .sum()
}

fn squared_error(a: &[f32], b: &[f32]) -> f64 {
    a.par_chunks(16_384)
        .zip(b.par_chunks(16_384))
        .map(|(a, b)| squared_distance_f64(a, b))
        .collect::<Vec<f64>>()
        .into_iter()
        .sum()
}

/// Output of a block over all calibration tokens with the given weights (`trial` replaces
/// some), computed on `backend` and shown to `sink` on the host, chunk by chunk.
#[allow(clippy::too_many_arguments)]
fn block_output<B: Backend>(
    backend: &B,
    inspect: Inspect,
    w: &LayerWeights,
    trial: &mut Vec<(Projection, FloatData)>,
    x: &Activations,
    config: &ModelConfig,
    settings: &LayerSettings,
    state: &mut TrialState<B>,
    mut sink: impl FnMut(std::ops::Range<usize>, &[f32]) -> Result<()>,
) -> Result<()> {
    let mut linear = |p: Projection| {
        let weight = match trial.iter().position(|(q, _)| *q == p) {
            Some(i) => trial.swap_remove(i).1,
            None => stored(Cow::Borrowed(w.weight(p)), settings.compute),
        };
        w.linear(backend, config, p, weight)
    };
    let input =
        |rows: std::ops::Range<usize>| backend.upload(&x.rows_f32(rows.clone()), rows.len(), x.cols());
    match inspect {
        Inspect::SelfAttention => {
            let (q, k, v, o) = (
                linear(Projection::Q)?,
                linear(Projection::K)?,
                linear(Projection::V)?,
                linear(Projection::O)?,
            );
            let qk_norms = match &w.qk_norms {
                Some([q_norm, k_norm]) => Some([
                    backend.vector(q_norm.clone().into())?,
                    backend.vector(k_norm.clone().into())?,
                ]),
                None => None,
            };
            state.for_each_chunk(
                backend,
                x.rows(),
                settings.seq_len,
                config,
                |rows, ctx, ws, out| {
                    let h = input(rows.clone())?;
                    let attended = self_attention(
                        backend,
                        [&q, &k, &v],
                        qk_norms.as_ref(),
                        w.layer_type,
                        &h,
                        ctx,
                        ws,
                        None,
                    )?;
                    let y = project(backend, &o, attended, out)?;
                    backend.read(y, |values| sink(rows, values))?
                },
            )
        }
        Inspect::Mlp => {
            let (gate, up, down) = (
                linear(Projection::Gate)?,
                linear(Projection::Up)?,
                linear(Projection::Down)?,
            );
            state.for_each_chunk(backend, x.rows(), settings.seq_len, config, |rows, _, ws, out| {
                let h = input(rows.clone())?;
                let activated = gated_activation(backend, config.activation, &gate, &up, &h, ws)?;
                let y = project(backend, &down, activated, out)?;
                backend.read(y, |values| sink(rows, values))?
            })
        }
        Inspect::Linear(_) => unreachable!("linear groups are scored on the linear alone"),
    }
}

/// `weight` as the products of `compute` read it: rounded to bf16 once for a bf16 search,
/// so that no f32 copy stays beside the bf16 one.
fn stored(weight: Cow<'_, [f32]>, compute: Compute) -> FloatData {
    match compute {
        Compute::F32 => FloatData::from(weight.into_owned()),
        Compute::Bf16 | Compute::Amx => FloatData::BF16(to_bf16(&weight).into()),
    }
}

/// A trial's weight `Q(W·diag(s)) / s`, made in the element type the products of `compute`
/// read (as [`stored`] would hold it, without the f32 copy in between).
fn trial_weight(w: &[f32], in_features: usize, scales: &[f32], g: GroupSize, compute: Compute) -> FloatData {
    match compute {
        Compute::F32 => FloatData::from(scaled_fake_quantize(w, in_features, scales, g)),
        Compute::Bf16 | Compute::Amx => {
            FloatData::BF16(scaled_fake_quantize_bf16(w, in_features, scales, g).into())
        }
    }
}

/// Output rows of a trial's weight delta projected through a Gram matrix at once (64 MB).
const GRAM_BLOCK_VALUES: usize = 1 << 24;

/// A `[n, n]` Gram matrix `XᵀX`, held as the products of the search read it: rounded to bf16
/// once for a bf16 search rather than in every trial.
enum GramMatrix {
    F32 {
        gram: Vec<f32>,
        n: usize,
    },
    Bf16 {
        gram: Vec<bf16>,
        n: usize,
        kernel: Bf16Kernel,
    },
}

impl GramMatrix {
    /// The Gram matrix of `x`'s columns, for products in `compute`.
    fn of(x: &Activations, compute: Compute) -> Self {
        let n = x.cols();
        match compute.bf16_kernel() {
            None => GramMatrix::F32 { gram: x.gram(), n },
            Some(kernel) => GramMatrix::Bf16 {
                gram: x.gram_bf16(),
                n,
                kernel,
            },
        }
    }

    /// The matrix's side, `n`.
    fn n(&self) -> usize {
        match self {
            GramMatrix::F32 { n, .. } | GramMatrix::Bf16 { n, .. } => *n,
        }
    }

    /// `out[rows, n] = delta[rows, n] · G` (G is symmetric).
    fn project(&self, delta: &[f32], rows: usize, out: &mut [f32]) {
        match self {
            GramMatrix::F32 { gram, n } => matmul_transposed(delta, gram, out, rows, *n, *n),
            GramMatrix::Bf16 { gram, n, kernel } => {
                matmul_bf16_weight(*kernel, delta, gram, out, rows, *n, *n)
            }
        }
    }
}

/// `Σ_n Δw_nᵀ G Δw_n` over the rows of `weight` (`[out, n]`), `Δw = Q(W · diag(s)) / s − W`:
/// computed `rows_per_block` output rows at a time, so that no whole-matrix delta or product
/// exists (at the 70B shape each would take 0.9 GB per trial). Row sums are added in row
/// order, whatever the blocks.
fn gram_loss(gram: &GramMatrix, weight: &[f32], scales: &[f32], g: GroupSize, rows_per_block: usize) -> f64 {
    let n = gram.n();
    let mut row_sums = Vec::with_capacity(weight.len() / n);
    for original in weight.chunks(rows_per_block * n) {
        let mut delta = scaled_fake_quantize(original, n, scales, g);
        delta.par_iter_mut().zip(original).for_each(|(q, w)| *q -= w);
        let mut projected = vec![0f32; delta.len()];
        gram.project(&delta, delta.len() / n, &mut projected);
        row_sums.par_extend(
            delta
                .par_chunks(n)
                .zip(projected.par_chunks(n))
                .map(|(d, p)| dot_f64(d, p)),
        );
    }
    row_sums.into_iter().sum()
}

/// The loss evaluator of one group.
enum Evaluator {
    /// Reference output of the block over all tokens.
    Block { reference: Vec<f32>, cols: usize },
    /// Gram matrix of the linear's input: loss = Σ_n Δw_nᵀ G Δw_n / (tokens · out), which
    /// costs out·in² per trial whatever the number of tokens.
    Gram { gram: GramMatrix },
    /// The linear's output error over the captured inputs, ‖X ΔWᵀ‖² / (tokens · out): tokens·in·out
    /// per trial, cheaper than the Gram form when there are fewer tokens than input features
    /// (a short calibration of a wide model).
    Direct,
}

/// Searches, fuses, clips and quantizes one layer: `w` are its weights, `inputs` its captured
/// projection inputs (scaled in place as the scales are applied); the trials' forward passes
/// run on `backend`.
pub fn quantize_layer<B: Backend>(
    backend: &B,
    mut w: LayerWeights,
    index: usize,
    inputs: &mut LayerInputs,
    config: &ModelConfig,
    settings: &LayerSettings,
) -> Result<(QuantizedLayer, LayerReport)> {
    let g = settings.group_size;
    let converted = |p: Projection| settings.converted[p.index()];
    let mut report = LayerReport {
        layer: index,
        scale_groups: Vec::new(),
        clip: Vec::new(),
        seconds: StepSeconds::default(),
    };

    // 1. Every group's search, on the unmodified layer.
    let start = Instant::now();
    let mut choices = Vec::new();
    for group in scaling_groups(config) {
        let group_start = Instant::now();
        let quantized: Vec<Projection> = group.linears.iter().copied().filter(|&p| converted(p)).collect();
        if quantized.is_empty() {
            continue;
        }
        let input_tap = group.linears[0];
        let x = inputs.of(input_tap);
        let tokens = x.rows();
        let in_features = x.cols();
        let x_mean = x.mean_abs();
        let weights: Vec<&[f32]> = group.linears.iter().map(|&p| w.weight(p)).collect();
        let w_mean = weight_mean(&weights, in_features, g);
        let mut state = TrialState::new();
        let evaluator = match group.inspect {
            Inspect::Linear(_) if tokens < in_features => Evaluator::Direct,
            Inspect::Linear(_) => Evaluator::Gram {
                gram: GramMatrix::of(x, settings.compute),
            },
            inspect => {
                let cols = config.hidden_size;
                let mut reference = vec![0f32; tokens * cols];
                block_output(
                    backend,
                    inspect,
                    &w,
                    &mut Vec::new(),
                    x,
                    config,
                    settings,
                    &mut state,
                    |rows, out| {
                        reference[rows.start * cols..rows.end * cols].copy_from_slice(out);
                        Ok(())
                    },
                )?;
                Evaluator::Block { reference, cols }
            }
        };
        let choice = search_scales(&x_mean, &w_mean, settings.scaling, |scales| {
            let fake_quantized = |p: Projection| scaled_fake_quantize(w.weight(p), in_features, scales, g);
            match &evaluator {
                Evaluator::Gram { gram } => {
                    let p = quantized[0];
                    let (out_features, _) = p.shape(config);
                    let rows_per_block = (GRAM_BLOCK_VALUES / in_features).max(1);
                    let sum = gram_loss(gram, w.weight(p), scales, g, rows_per_block);
                    Ok(sum / (tokens * out_features) as f64)
                }
                Evaluator::Direct => {
                    let p = quantized[0];
                    let (out_features, _) = p.shape(config);
                    let wq = fake_quantized(p);
                    let delta: Vec<f32> = wq.par_iter().zip(w.weight(p)).map(|(a, b)| a - b).collect();
                    drop(wq);
                    let mut sum = 0f64;
                    let mut error = Vec::new();
                    x.for_each_block(|rows, x| {
                        error.resize(rows.len() * out_features, 0f32);
                        matmul_transposed_in(
                            settings.compute,
                            x,
                            &delta,
                            &mut error,
                            rows.len(),
                            in_features,
                            out_features,
                        );
                        sum += sum_of_squares(&error);
                        Ok::<(), PackError>(())
                    })?;
                    Ok(sum / (tokens * out_features) as f64)
                }
                Evaluator::Block { reference, cols } => {
                    // Each one rounded as soon as it is made: one f32 copy at a time.
                    let mut trial: Vec<(Projection, FloatData)> = quantized
                        .iter()
                        .map(|&p| {
                            (
                                p,
                                trial_weight(w.weight(p), in_features, scales, g, settings.compute),
                            )
                        })
                        .collect();
                    let mut sum = 0f64;
                    block_output(
                        backend,
                        group.inspect,
                        &w,
                        &mut trial,
                        x,
                        config,
                        settings,
                        &mut state,
                        |rows, out| {
                            sum += squared_error(out, &reference[rows.start * cols..rows.end * cols]);
                            Ok(())
                        },
                    )?;
                    Ok(sum / (tokens * cols) as f64)
                }
            }
        })?;
        report.scale_groups.push(GroupReport {
            group: group.name(config),
            inspected: group.inspected().to_string(),
            seconds: group_start.elapsed().as_secs_f64(),
            choice: choice.clone(),
        });
        choices.push((group, choice));
    }

    // 2. Fuse the scales: the absorber takes 1/s, the group's linears (and their captured
    //    inputs) are multiplied by s along the input dimension.
    for (group, choice) in &choices {
        let s = &choice.scales;
        match group.absorber {
            Absorber::InputNorm => w.input_layernorm.iter_mut().zip(s).for_each(|(v, s)| *v /= s),
            Absorber::MlpNorm => w.mlp_norm.iter_mut().zip(s).for_each(|(v, s)| *v /= s),
            Absorber::Linear(p) => {
                let in_features = p.shape(config).1;
                for (row, s) in w.weights[p.index()].chunks_exact_mut(in_features).zip(s) {
                    row.iter_mut().for_each(|v| *v /= s);
                }
                if let Some(b) = &mut w.biases[p.index()] {
                    b.iter_mut().zip(s).for_each(|(v, s)| *v /= s);
                }
            }
        }
        for &p in &group.linears {
            let in_features = p.shape(config).1;
            w.weights[p.index()].par_chunks_mut(in_features).for_each(|row| {
                row.iter_mut().zip(s).for_each(|(v, s)| *v *= s);
            });
        }
        inputs.of_mut(group.linears[0]).divide_columns(s);
    }
    report.seconds.scale_search = start.elapsed().as_secs_f64();

    // 3. Clip search on the scaled weights and inputs (never q/k: their product meets softmax).
    let start = Instant::now();
    if settings.clip {
        for p in Projection::ALL {
            if matches!(p, Projection::Q | Projection::K) || !converted(p) {
                continue;
            }
            let sampled = sample_tokens(inputs.of(p));
            let out_features = p.shape(config).0;
            let (max_val, stats) = search_clip(w.weight(p), out_features, &sampled, g);
            apply_clip(&mut w.weights[p.index()], sampled.cols, g, &max_val);
            report.clip.push(ClipReport {
                linear: p.module().to_string(),
                stats,
            });
        }
    }
    report.seconds.clip_search = start.elapsed().as_secs_f64();

    // 4. Quantize and pack.
    let start = Instant::now();
    let layer_out = finish_layer(w, config, settings)?;
    report.seconds.quantize_pack = start.elapsed().as_secs_f64();
    Ok((layer_out, report))
}

/// Round-to-nearest: quantizes the layer's weights as they are.
pub fn rtn_layer(
    w: LayerWeights,
    index: usize,
    config: &ModelConfig,
    settings: &LayerSettings,
) -> Result<(QuantizedLayer, LayerReport)> {
    let start = Instant::now();
    let out = finish_layer(w, config, settings)?;
    let report = LayerReport {
        layer: index,
        scale_groups: Vec::new(),
        clip: Vec::new(),
        seconds: StepSeconds {
            quantize_pack: start.elapsed().as_secs_f64(),
            ..StepSeconds::default()
        },
    };
    Ok((out, report))
}

fn finish_layer(w: LayerWeights, config: &ModelConfig, settings: &LayerSettings) -> Result<QuantizedLayer> {
    let mut linears = Vec::with_capacity(7);
    for (i, p) in Projection::ALL.into_iter().enumerate() {
        let (out_features, in_features) = p.shape(config);
        linears.push(if settings.converted[i] {
            let q = QuantizedLinear::quantize(&w.weights[i], out_features, in_features, settings.group_size);
            OutLinear::Awq(pack_gemm(&q)?)
        } else {
            OutLinear::Dense(w.weights[i].iter().map(|&v| f16::from_f32(v)).collect())
        });
    }
    let linears: [OutLinear; 7] = linears.try_into().expect("seven projections");
    Ok(QuantizedLayer {
        input_layernorm: w.input_layernorm,
        mlp_norm: w.mlp_norm,
        output_norms: w.output_norms,
        qk_norms: w.qk_norms,
        linears,
        biases: w.biases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// The Gram form in row blocks is the output error ‖X ΔWᵀ‖² of its definition.
    #[test]
    fn gram_loss_in_blocks_is_the_output_error() {
        let (tokens, n, out) = (96, 64, 40);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let x: Vec<f32> = (0..tokens * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..out * n).map(|_| rng.random_range(-0.2..0.2)).collect();
        let scales: Vec<f32> = (0..n).map(|_| rng.random_range(0.5..2.0)).collect();
        let g = GroupSize::new(16).unwrap();
        let delta: Vec<f64> = scaled_fake_quantize(&w, n, &scales, g)
            .iter()
            .zip(&w)
            .map(|(q, w)| (q - w) as f64)
            .collect();
        let direct: f64 = (0..tokens)
            .flat_map(|t| (0..out).map(move |o| (t, o)))
            .map(|(t, o)| {
                let e: f64 = (0..n).map(|j| x[t * n + j] as f64 * delta[o * n + j]).sum();
                e * e
            })
            .sum();
        let activations = Activations::from_f32(tp_runtime::HostTensor::new(x, tokens, n).unwrap());
        let gram = GramMatrix::of(&activations, Compute::F32);
        for rows_per_block in [1, 7, out, 1000] {
            let loss = gram_loss(&gram, &w, &scales, g, rows_per_block);
            assert!(
                (loss - direct).abs() < 1e-4 * direct,
                "{rows_per_block} rows per block: {loss} vs {direct}"
            );
        }
        if tp_runtime::CpuFeatures::detect().has_bf16() {
            let gram = GramMatrix::of(&activations, Compute::Bf16);
            let loss = gram_loss(&gram, &w, &scales, g, 7);
            assert!((loss - direct).abs() < 1e-2 * direct, "bf16: {loss} vs {direct}");
        }
    }

    #[test]
    fn search_flops_follow_the_scaling_groups() {
        // No GQA and q_features = hidden: v → o is searched (its Gram form adds FLOPs).
        let base = serde_json::json!({"architectures":["LlamaForCausalLM"],"hidden_size":512,
            "intermediate_size":1024,"num_hidden_layers":2,"num_attention_heads":8,
            "num_key_value_heads":8,"rms_norm_eps":1e-5,"vocab_size":1000});
        let config =
            |v: serde_json::Value| ModelConfig::from_json(&v, std::path::Path::new("config.json")).unwrap();
        let mha = config(base.clone());
        let mut gqa_json = base.clone();
        gqa_json["num_key_value_heads"] = 2.into();
        let gqa = config(gqa_json);
        let (tokens, seq) = (4096.0, 512);
        let vo = 2.0 * tokens * 512f64.powi(2) + 20.0 * 2.0 * 512.0 * 512f64.powi(2);
        let kv_delta = 2.0 * 2.0 * tokens * 512.0 * (512.0 - 128.0) * 22.0;
        let got = search_flops(&mha, tokens, seq) - search_flops(&gqa, tokens, seq);
        assert!(
            (got - (vo + kv_delta)).abs() / got < 1e-12,
            "{got} vs {}",
            vo + kv_delta
        );
        // 16 heads over 8 kv heads of 64: v_proj is [512, 512] but o_proj [512, 1024], so
        // AutoAWQ's shape test leaves v → o out, although kv_features = hidden.
        let mut wide = base;
        wide["num_attention_heads"] = 16.into();
        wide["head_dim"] = 64.into();
        let wide = config(wide);
        assert_eq!(wide.kv_features(), wide.hidden_size);
        let groups = scaling_groups(&wide);
        assert_eq!(groups.len(), 3);
        assert!(groups.iter().all(|g| g.inspect != Inspect::Linear(Projection::O)));
    }
}
