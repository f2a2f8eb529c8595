//! AWQ for one decoder layer (awq-format.md §1–§4): search every group's scales on the unmodified
//! layer, fuse them into the norms and previous linears, search clipping on the scaled
//! weights and inputs, quantize and pack.

use std::time::Instant;

use awq_calib::LayerInputs;
use awq_calib::capture::mean_abs;
use half::f16;
use rayon::prelude::*;
use serde::Serialize;
use tp_runtime::backend::cpu::{CpuLinear, CpuMatrix, CpuTensor, gram, matmul_transposed};
use tp_runtime::model::{DecoderLayer, ForwardContext, Linear, Projection, gated_activation, self_attention};
use tp_runtime::{CpuBackend, ModelConfig, SeqLayout};

use crate::clip::{ClipStats, apply_clip, sample_tokens, search_clip};
use crate::pack::{PackedGemm, pack_gemm};
use crate::quant::{GroupSize, QuantizedLinear};
use crate::search::{ScaleChoice, Scaling, scaled_fake_quantize, search_scales, weight_mean};
use crate::{PackError, Result};

/// Calibration tokens per forward pass in a trial: bounds transient memory.
const TRIAL_TOKENS: usize = 4096;

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
}

/// Owned, modifiable f32 weights of one decoder layer, indexed by [`Projection`].
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub input_layernorm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub weights: [Vec<f32>; 7],
    pub biases: [Option<Vec<f32>>; 7],
}

fn slot(p: Projection) -> usize {
    Projection::ALL
        .iter()
        .position(|&q| q == p)
        .expect("ALL lists every projection")
}

impl LayerWeights {
    /// Copies a dense layer's weights.
    pub fn from_layer(layer: &DecoderLayer<CpuBackend>) -> Result<Self> {
        let weights = Projection::ALL.map(|p| match &layer.projection(p).weight {
            CpuLinear::Dense(m) => Ok(m.data.to_vec()),
            CpuLinear::Awq(_) => Err(PackError::Invalid(format!(
                "layer {}: {} is already quantized",
                layer.index,
                p.module()
            ))),
        });
        let [q, k, v, o, gate, up, down] = weights;
        Ok(LayerWeights {
            input_layernorm: layer.input_layernorm.to_vec(),
            post_attention_layernorm: layer.post_attention_layernorm.to_vec(),
            weights: [q?, k?, v?, o?, gate?, up?, down?],
            biases: Projection::ALL.map(|p| layer.projection(p).bias.as_ref().map(|b| b.to_vec())),
        })
    }

    /// The weight of `p`.
    pub fn weight(&self, p: Projection) -> &[f32] {
        &self.weights[slot(p)]
    }

    /// A CPU linear for `p` holding `weight` (and `p`'s bias).
    fn linear(&self, config: &ModelConfig, p: Projection, weight: Vec<f32>) -> Linear<CpuBackend> {
        let (out_features, in_features) = p.shape(config);
        Linear {
            weight: CpuLinear::Dense(CpuMatrix {
                data: weight.into(),
                rows: out_features,
                cols: in_features,
            }),
            bias: self.biases[slot(p)].clone().map(Into::into),
            out_features,
            in_features,
        }
    }
}

/// What absorbs `1/s` in a scaling group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prev {
    InputNorm,
    PostNorm,
    Linear(Projection),
}

/// Where a group's loss is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inspect {
    /// The whole attention block (o_proj included, unquantized).
    SelfAttention,
    /// The whole MLP (down_proj included, unquantized).
    Mlp,
    /// The scaled linear alone.
    Linear(Projection),
}

/// A scaling group: linears sharing one input (awq-format.md §2's table).
#[derive(Clone, Debug)]
struct Group {
    prev: Prev,
    linears: Vec<Projection>,
    inspect: Inspect,
}

fn groups(config: &ModelConfig) -> Vec<Group> {
    use Projection::*;
    let mut groups = vec![Group {
        prev: Prev::InputNorm,
        linears: vec![Q, K, V],
        inspect: Inspect::SelfAttention,
    }];
    // v → o only when the shapes agree, i.e. without grouped-query attention.
    if V.shape(config) == O.shape(config) {
        groups.push(Group {
            prev: Prev::Linear(V),
            linears: vec![O],
            inspect: Inspect::Linear(O),
        });
    }
    groups.push(Group {
        prev: Prev::PostNorm,
        linears: vec![Gate, Up],
        inspect: Inspect::Mlp,
    });
    groups.push(Group {
        prev: Prev::Linear(Up),
        linears: vec![Down],
        inspect: Inspect::Linear(Down),
    });
    groups
}

impl Group {
    fn name(&self) -> String {
        let prev = match self.prev {
            Prev::InputNorm => "input_layernorm".to_string(),
            Prev::PostNorm => "post_attention_layernorm".to_string(),
            Prev::Linear(p) => p.module().to_string(),
        };
        let linears: Vec<&str> = self.linears.iter().map(|p| p.module()).collect();
        format!("{prev} -> {}", linears.join(", "))
    }

    fn inspected(&self) -> &'static str {
        match self.inspect {
            Inspect::SelfAttention => "self_attn",
            Inspect::Mlp => "mlp",
            Inspect::Linear(p) => p.module(),
        }
    }
}

/// The search of one group, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    pub group: String,
    pub inspected: &'static str,
    pub seconds: f64,
    #[serde(flatten)]
    pub choice: ScaleChoice,
}

/// The clip search of one linear, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct ClipReport {
    pub linear: &'static str,
    #[serde(flatten)]
    pub stats: ClipStats,
}

/// Seconds spent per step on one layer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepSeconds {
    pub capture: f64,
    pub scale_search: f64,
    pub clip_search: f64,
    pub quantize_pack: f64,
}

/// One layer's report.
#[derive(Clone, Debug, Serialize)]
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

/// A quantized layer, ready to write.
#[derive(Clone, Debug)]
pub struct QuantizedLayer {
    pub input_layernorm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub linears: [OutLinear; 7],
    pub biases: [Option<Vec<f32>>; 7],
}

/// Runs the inspected block over all calibration tokens, chunk by chunk, calling `f` with
/// the chunk's row range and output.
fn for_each_chunk(
    tokens: usize,
    seq_len: usize,
    config: &ModelConfig,
    mut f: impl FnMut(std::ops::Range<usize>, &ForwardContext<CpuBackend>) -> Result<()>,
) -> Result<()> {
    let backend = CpuBackend::new();
    let chunk = (TRIAL_TOKENS / seq_len).max(1) * seq_len;
    let mut ctx: Option<(usize, ForwardContext<CpuBackend>)> = None;
    for start in (0..tokens).step_by(chunk) {
        let rows = chunk.min(tokens - start);
        if ctx.as_ref().is_none_or(|(r, _)| *r != rows) {
            let layout = SeqLayout::new(&vec![seq_len; rows / seq_len])?;
            ctx = Some((rows, ForwardContext::new(&backend, config, &layout)?));
        }
        f(start..start + rows, &ctx.as_ref().expect("set above").1)?;
    }
    Ok(())
}

fn rows_of(x: &CpuTensor, rows: std::ops::Range<usize>) -> CpuTensor {
    CpuTensor {
        data: x.data[rows.start * x.cols..rows.end * x.cols].to_vec(),
        rows: rows.len(),
        cols: x.cols,
    }
}

/// Σ (a − b)², in f64, in a fixed order.
fn squared_error(a: &[f32], b: &[f32]) -> f64 {
    a.par_chunks(16_384)
        .zip(b.par_chunks(16_384))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum::<f64>()
        })
        .collect::<Vec<f64>>()
        .into_iter()
        .sum()
}

/// Output of a block over all calibration tokens with the given weights.
fn block_output(
    inspect: Inspect,
    w: &LayerWeights,
    trial: &[(Projection, Vec<f32>)],
    x: &CpuTensor,
    config: &ModelConfig,
    seq_len: usize,
    mut sink: impl FnMut(std::ops::Range<usize>, &CpuTensor) -> Result<()>,
) -> Result<()> {
    let backend = CpuBackend::new();
    let linear = |p: Projection| {
        let weight = trial
            .iter()
            .find(|(q, _)| *q == p)
            .map_or_else(|| w.weight(p).to_vec(), |(_, t)| t.clone());
        w.linear(config, p, weight)
    };
    match inspect {
        Inspect::SelfAttention => {
            let (q, k, v, o) = (
                linear(Projection::Q),
                linear(Projection::K),
                linear(Projection::V),
                linear(Projection::O),
            );
            for_each_chunk(x.rows, seq_len, config, |rows, ctx| {
                let h = rows_of(x, rows.clone());
                let a = self_attention(&backend, [&q, &k, &v], &h, ctx)?;
                sink(rows, &o.forward(&backend, &a)?)
            })
        }
        Inspect::Mlp => {
            let (gate, up, down) = (
                linear(Projection::Gate),
                linear(Projection::Up),
                linear(Projection::Down),
            );
            for_each_chunk(x.rows, seq_len, config, |rows, _| {
                let h = rows_of(x, rows.clone());
                let act = gated_activation(&backend, &gate, &up, &h)?;
                sink(rows, &down.forward(&backend, &act)?)
            })
        }
        Inspect::Linear(_) => unreachable!("linear groups use the Gram form"),
    }
}

/// The loss evaluator of one group.
enum Evaluator {
    /// Reference output of the block over all tokens.
    Block { reference: Vec<f32>, cols: usize },
    /// Gram matrix of the linear's input: loss = Σ_n Δw_nᵀ G Δw_n / (tokens · out).
    Gram { gram: Vec<f32> },
}

/// Searches, fuses, clips and quantizes one layer. `inputs` are the layer's captured
/// projection inputs (they are scaled in place as the scales are applied).
pub fn quantize_layer(
    layer: &DecoderLayer<CpuBackend>,
    inputs: &mut LayerInputs,
    config: &ModelConfig,
    settings: &LayerSettings,
) -> Result<(QuantizedLayer, LayerReport)> {
    let mut w = LayerWeights::from_layer(layer)?;
    let g = settings.group_size;
    let converted = |p: Projection| settings.converted[slot(p)];
    let mut report = LayerReport {
        layer: layer.index,
        scale_groups: Vec::new(),
        clip: Vec::new(),
        seconds: StepSeconds::default(),
    };

    // 1. Every group's search, on the unmodified layer.
    let start = Instant::now();
    let mut choices = Vec::new();
    for group in groups(config) {
        let group_start = Instant::now();
        let quantized: Vec<Projection> = group.linears.iter().copied().filter(|&p| converted(p)).collect();
        if quantized.is_empty() {
            continue;
        }
        let input_tap = group.linears[0];
        let x = inputs.of(input_tap);
        let tokens = x.rows;
        let in_features = x.cols;
        let x_mean = mean_abs(x);
        let weights: Vec<&[f32]> = group.linears.iter().map(|&p| w.weight(p)).collect();
        let w_mean = weight_mean(&weights, in_features, g);
        let evaluator = match group.inspect {
            Inspect::Linear(_) => Evaluator::Gram {
                gram: gram(&x.data, x.rows, x.cols, 1.0),
            },
            inspect => {
                let cols = config.hidden_size;
                let mut reference = vec![0f32; tokens * cols];
                block_output(inspect, &w, &[], x, config, settings.seq_len, |rows, out| {
                    reference[rows.start * cols..rows.end * cols].copy_from_slice(&out.data);
                    Ok(())
                })?;
                Evaluator::Block { reference, cols }
            }
        };
        let choice = search_scales(&x_mean, &w_mean, settings.scaling, |scales| {
            let trial: Vec<(Projection, Vec<f32>)> = quantized
                .iter()
                .map(|&p| (p, scaled_fake_quantize(w.weight(p), in_features, scales, g)))
                .collect();
            match &evaluator {
                Evaluator::Gram { gram } => {
                    let (p, wq) = &trial[0];
                    let (out_features, _) = p.shape(config);
                    let delta: Vec<f32> = wq.iter().zip(w.weight(*p)).map(|(a, b)| a - b).collect();
                    let mut projected = vec![0f32; delta.len()];
                    matmul_transposed(
                        &delta,
                        gram,
                        &mut projected,
                        out_features,
                        in_features,
                        in_features,
                    );
                    let sum: f64 = delta
                        .par_chunks(in_features)
                        .zip(projected.par_chunks(in_features))
                        .map(|(d, p)| d.iter().zip(p).map(|(a, b)| (a * b) as f64).sum::<f64>())
                        .collect::<Vec<f64>>()
                        .into_iter()
                        .sum();
                    Ok(sum / (tokens * out_features) as f64)
                }
                Evaluator::Block { reference, cols } => {
                    let mut sum = 0f64;
                    block_output(
                        group.inspect,
                        &w,
                        &trial,
                        x,
                        config,
                        settings.seq_len,
                        |rows, out| {
                            sum += squared_error(&out.data, &reference[rows.start * cols..rows.end * cols]);
                            Ok(())
                        },
                    )?;
                    Ok(sum / (tokens * cols) as f64)
                }
            }
        })?;
        report.scale_groups.push(GroupReport {
            group: group.name(),
            inspected: group.inspected(),
            seconds: group_start.elapsed().as_secs_f64(),
            choice: choice.clone(),
        });
        choices.push((group, choice));
    }

    // 2. Fuse the scales: the previous op absorbs 1/s, the group's linears (and their
    //    captured inputs) are multiplied by s along the input dimension.
    for (group, choice) in &choices {
        let s = &choice.scales;
        match group.prev {
            Prev::InputNorm => w.input_layernorm.iter_mut().zip(s).for_each(|(v, s)| *v /= s),
            Prev::PostNorm => w
                .post_attention_layernorm
                .iter_mut()
                .zip(s)
                .for_each(|(v, s)| *v /= s),
            Prev::Linear(p) => {
                let in_features = p.shape(config).1;
                for (row, s) in w.weights[slot(p)].chunks_exact_mut(in_features).zip(s) {
                    row.iter_mut().for_each(|v| *v /= s);
                }
                if let Some(b) = &mut w.biases[slot(p)] {
                    b.iter_mut().zip(s).for_each(|(v, s)| *v /= s);
                }
            }
        }
        for &p in &group.linears {
            let in_features = p.shape(config).1;
            w.weights[slot(p)].par_chunks_mut(in_features).for_each(|row| {
                row.iter_mut().zip(s).for_each(|(v, s)| *v *= s);
            });
        }
        let x = inputs.of_mut(group.linears[0]);
        x.data
            .par_chunks_mut(x.cols)
            .for_each(|row| row.iter_mut().zip(s).for_each(|(v, s)| *v /= s));
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
            apply_clip(&mut w.weights[slot(p)], sampled.cols, g, &max_val);
            report.clip.push(ClipReport {
                linear: p.module(),
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
    layer: &DecoderLayer<CpuBackend>,
    config: &ModelConfig,
    settings: &LayerSettings,
) -> Result<(QuantizedLayer, LayerReport)> {
    let start = Instant::now();
    let w = LayerWeights::from_layer(layer)?;
    let out = finish_layer(w, config, settings)?;
    let report = LayerReport {
        layer: layer.index,
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
        post_attention_layernorm: w.post_attention_layernorm,
        linears,
        biases: w.biases,
    })
}
