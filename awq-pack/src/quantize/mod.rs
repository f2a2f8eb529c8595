//! A whole model: calibration, layer-by-layer AWQ (or RTN), and the AWQ checkpoint folder,
//! written under a temporary name and renamed when complete.

pub mod part;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use awq_calib::{CalibSpec, CalibSummary, LayerStream, dataset};
use checkpoint::Dtype;
use checkpoint::names::{self, Projection, StoredLinear, layer_tensor_name, stored_tensors};
use checkpoint::writer::{
    Blocks, CheckpointStream, DEFAULT_MAX_SHARD_BYTES, TensorSpec, f16_bytes, f32_as_f16_bytes, i32_bytes,
};
use checkpoint::{AwqShape, Checkpoint, ModelConfig, QuantizationConfig, Tokenizer, atomic};
use serde::{Deserialize, Serialize};
use tp_runtime::{Backend, Compute, CpuBackend};

use crate::layer::{
    LayerReport, LayerSettings, LayerWeights, OutLinear, QuantizedLayer, quantize_layer, rtn_layer,
};
use crate::quant::GroupSize;
use crate::search::Scaling;
use crate::{PackError, Result};
use part::{LayerRange, PartManifest, PartSettings, source_digest};

/// Files copied unchanged from the input folder when present.
pub const COPIED_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

/// How weights are chosen before rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Activation-aware scales and clipping, then rounding.
    Awq,
    /// Round to nearest: the baseline every report compares against.
    Rtn,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Awq => "awq",
            Method::Rtn => "rtn",
        })
    }
}

impl FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "awq" => Ok(Method::Awq),
            "rtn" => Ok(Method::Rtn),
            other => Err(format!("unknown method `{other}` (expected awq or rtn)")),
        }
    }
}

/// Everything `quantize` needs to know.
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub method: Method,
    pub group_size: GroupSize,
    pub scaling: Scaling,
    pub clip: bool,
    /// Calibration data (used by `awq`; ignored by `rtn`).
    pub calib: CalibSpec,
    /// Module names (or fragments) left unquantized, as in `quantization_config`.
    pub modules_to_not_convert: Vec<String>,
    /// Replace a non-empty output folder.
    pub replace: bool,
    /// The largest weights file of the output; a larger checkpoint is written as Hugging Face
    /// shards with an index, each finished as its last layer is.
    pub max_shard_bytes: u64,
    /// The arithmetic of the calibration passes and the search's trials (resolved against
    /// this CPU by the caller).
    pub compute: Compute,
    /// Only these layers, into a part folder that [`part::merge_parts`] joins with the
    /// others into the checkpoint a whole run writes; `None`: the whole model.
    pub part: Option<LayerRange>,
}

impl QuantizeOptions {
    /// Round-to-nearest at `group_size`, every linear layer, no calibration: the baseline
    /// AWQ is measured against, and a quantized checkpoint made in seconds.
    pub fn rtn(group_size: GroupSize) -> Self {
        QuantizeOptions {
            method: Method::Rtn,
            group_size,
            scaling: Scaling::Duo,
            clip: false,
            calib: CalibSpec::new(""),
            modules_to_not_convert: Vec::new(),
            replace: false,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            compute: Compute::F32,
            part: None,
        }
    }
}

/// Progress of a run.
pub enum Event<'a> {
    /// Calibration blocks are ready.
    Calibrated(&'a CalibSummary),
    /// A layer before a part's range ran forward (unquantized) to reach the part's first
    /// layer.
    Forwarded {
        layer: usize,
        first: usize,
        seconds: f64,
    },
    /// A layer is quantized and written.
    Layer {
        done: usize,
        total: usize,
        report: &'a LayerReport,
    },
}

/// Seconds per step over the whole run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunSeconds {
    pub calibration_data: f64,
    pub capture: f64,
    pub scale_search: f64,
    pub clip_search: f64,
    pub quantize_pack: f64,
    pub write: f64,
    pub total: f64,
}

/// What a run did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantizeReport {
    pub method: Method,
    pub group_size: GroupSize,
    pub scaling: Scaling,
    pub clip: bool,
    pub modules_to_not_convert: Vec<String>,
    pub calibration: Option<CalibSummary>,
    pub quantization_config: serde_json::Value,
    pub layers: Vec<LayerReport>,
    /// The arithmetic the search ran in.
    #[serde(default)]
    pub compute: Compute,
    pub seconds: RunSeconds,
    pub safetensors_bytes: u64,
    /// The layers of a part run (`None`: the whole model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<LayerRange>,
}

/// The projections of layer `layer` that are quantized under `q`.
fn converted(config: &ModelConfig, q: &QuantizationConfig, layer: usize) -> [bool; 7] {
    Projection::ALL.map(|p| q.converts(&p.stored_prefix(config, layer)))
}

/// Checks `options` against a model's configuration without reading any weight: the model
/// is not already quantized, the group size divides every quantized projection's inputs and
/// their outputs pack eight to a word.
pub fn check(config: &ModelConfig, options: &QuantizeOptions) -> Result<()> {
    if config.quantization.is_some() {
        return Err(PackError::Invalid(
            "the model is already quantized (its config has a quantization_config)".into(),
        ));
    }
    validate(config, &quantization_config(options))
}

/// The `quantization_config` a run with `options` writes.
pub fn quantization_config(options: &QuantizeOptions) -> QuantizationConfig {
    QuantizationConfig {
        group_size: options.group_size.get(),
        modules_to_not_convert: options.modules_to_not_convert.clone(),
    }
}

/// The configuration of the checkpoint a run with `options` writes for `config`: what the
/// tensor-parallel plan of the quantized model is checked against before any compute.
pub fn quantized_config(config: &ModelConfig, options: &QuantizeOptions) -> ModelConfig {
    ModelConfig {
        quantization: Some(quantization_config(options)),
        ..config.clone()
    }
}

fn validate(config: &ModelConfig, q: &QuantizationConfig) -> Result<()> {
    for layer in 0..config.num_hidden_layers {
        for stored in StoredLinear::of(config) {
            if !q.converts(&stored.prefix(layer)) {
                continue;
            }
            // Each part packs alone (a fused tensor is its parts side by side).
            for &p in stored.parts {
                let (out_features, in_features) = p.shape(config);
                let shape = AwqShape {
                    in_features,
                    out_features,
                    group_size: q.group_size,
                };
                shape.check(&stored.prefix(layer))?;
            }
        }
    }
    Ok(())
}

/// Tensors of the output file for `layers`, in write order: the embeddings (with layer 0),
/// each layer's norms and projections as the quantized configuration names them, the final
/// norm and lm_head (with the last layer).
pub(crate) fn tensor_specs(
    config: &ModelConfig,
    q: &QuantizationConfig,
    layers: Range<usize>,
) -> Vec<TensorSpec> {
    let out_config = ModelConfig {
        quantization: Some(q.clone()),
        ..config.clone()
    };
    let (v, h) = (config.vocab_size, config.hidden_size);
    let mut specs = Vec::new();
    if layers.start == 0 {
        specs.push(TensorSpec::new(names::EMBED_TOKENS, Dtype::F16, &[v, h]));
    }
    let last = layers.end == config.num_hidden_layers;
    for layer in layers {
        for (norm, len) in names::layer_norms(config) {
            specs.push(TensorSpec::new(
                layer_tensor_name(layer, norm),
                Dtype::F16,
                &[len],
            ));
        }
        for stored in StoredLinear::of(config) {
            specs.extend(
                stored_tensors(&out_config, layer, &stored)
                    .into_iter()
                    .map(|t| TensorSpec::from_info(t, Dtype::F16)),
            );
        }
    }
    if last {
        specs.push(TensorSpec::new(names::FINAL_NORM, Dtype::F16, &[h]));
        if !config.tie_word_embeddings {
            specs.push(TensorSpec::new(names::LM_HEAD, Dtype::F16, &[v, h]));
        }
    }
    specs
}

/// The safetensors metadata of every weights file written.
pub(crate) fn file_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

fn write_layer(
    out: &mut CheckpointStream,
    layer: usize,
    q: &QuantizedLayer,
    config: &ModelConfig,
) -> Result<()> {
    // Norms as the checkpoint stores them (`w`, the applied weight less the family's offset),
    // in the order the tensor specs list them.
    let mut norms: Vec<(&str, &[f32])> = vec![
        (names::INPUT_LAYERNORM, &q.input_layernorm),
        (names::mlp_input_norm(config), &q.mlp_norm),
    ];
    if let (Some(suffixes), Some(values)) = (names::block_output_norms(config), &q.output_norms) {
        norms.extend(suffixes.into_iter().zip(values.iter().map(Vec::as_slice)));
    }
    if let Some(values) = &q.qk_norms {
        norms.extend(
            [names::Q_NORM, names::K_NORM]
                .into_iter()
                .zip(values.iter().map(Vec::as_slice)),
        );
    }
    for (suffix, _) in names::layer_norms(config) {
        let (_, values) = norms
            .iter()
            .find(|(s, _)| *s == suffix)
            .expect("every norm of the layer is held");
        let stored: Vec<f32> = values.iter().map(|w| w - config.norm_offset).collect();
        out.write(&layer_tensor_name(layer, suffix), &f32_as_f16_bytes(&stored))?;
    }
    for stored in StoredLinear::of(config) {
        let prefix = stored.prefix(layer);
        let parts: Vec<&OutLinear> = stored.parts.iter().map(|p| &q.linears[p.index()]).collect();
        match parts[..] {
            [OutLinear::Awq(packed)] => {
                let [qweight, qzeros, scales] = packed.shape.tensors(&prefix).map(|t| t.0);
                out.write(&qweight, &i32_bytes(&packed.qweight))?;
                out.write(&qzeros, &i32_bytes(&packed.qzeros))?;
                out.write(&scales, &f16_bytes(&packed.scales))?;
            }
            [OutLinear::Dense(w)] => out.write(&format!("{prefix}.weight"), &f16_bytes(w))?,
            _ => write_fused(out, &prefix, &parts)?,
        }
        let p = stored.parts[0];
        if p.has_bias(config) {
            let bias = q.biases[p.index()]
                .as_ref()
                .expect("config says the projection has a bias");
            out.write(&format!("{prefix}.bias"), &f32_as_f16_bytes(bias))?;
        }
    }
    Ok(())
}

/// Writes projections stored as one fused tensor (Phi-3's `qkv_proj`, `gate_up_proj`): their
/// outputs side by side. An AWQ part's tensors are `[rows, outputs]` (`qweight` and `qzeros`
/// eight outputs to a word), so each row of the fused tensor is the parts' rows one after
/// another; dense weights `[outputs, inputs]` stack.
fn write_fused(out: &mut CheckpointStream, prefix: &str, parts: &[&OutLinear]) -> Result<()> {
    /// `[rows, Σ widths]` from row-major parts of `rows` rows each.
    fn side_by_side<T: Copy>(parts: &[&[T]], rows: usize) -> Vec<T> {
        let total = parts.iter().map(|p| p.len()).sum();
        let mut fused = Vec::with_capacity(total);
        for r in 0..rows {
            for part in parts {
                let width = part.len() / rows;
                fused.extend_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        fused
    }
    if let Some(packed) = parts
        .iter()
        .map(|p| match p {
            OutLinear::Awq(packed) => Some(packed),
            OutLinear::Dense(_) => None,
        })
        .collect::<Option<Vec<_>>>()
    {
        let (k, g) = (packed[0].shape.in_features, packed[0].shape.group_size);
        let shape = AwqShape {
            in_features: k,
            out_features: packed.iter().map(|p| p.shape.out_features).sum(),
            group_size: g,
        };
        let [qweight, qzeros, scales] = shape.tensors(prefix).map(|t| t.0);
        let qw: Vec<&[i32]> = packed.iter().map(|p| &p.qweight[..]).collect();
        let qz: Vec<&[i32]> = packed.iter().map(|p| &p.qzeros[..]).collect();
        let sc: Vec<&[half::f16]> = packed.iter().map(|p| &p.scales[..]).collect();
        out.write(&qweight, &i32_bytes(&side_by_side(&qw, k)))?;
        out.write(&qzeros, &i32_bytes(&side_by_side(&qz, k / g)))?;
        out.write(&scales, &f16_bytes(&side_by_side(&sc, k / g)))?;
        return Ok(());
    }
    let mut weight = Vec::new();
    for part in parts {
        match part {
            OutLinear::Dense(w) => weight.extend_from_slice(w),
            OutLinear::Awq(_) => {
                return Err(PackError::Invalid(format!(
                    "{prefix}: the parts of a fused projection are quantized alike or not at all"
                )));
            }
        }
    }
    out.write(&format!("{prefix}.weight"), &f16_bytes(&weight))?;
    Ok(())
}

/// Bytes of f32 values converted at once when a large tensor is copied as f16.
const COPY_BLOCK_BYTES: usize = 64 << 20;

/// Copies a dense tensor to the output as f16, a block of rows at a time, each block's mapped
/// pages released once converted: an embedding table or lm_head of 128k × 8k values would
/// otherwise be held in f32 and in f16 at once (4 GB on top of the mapped 1 GB).
fn copy_as_f16(
    out: &mut CheckpointStream,
    checkpoint: &Checkpoint,
    name: &str,
    shape: &[usize],
) -> Result<()> {
    let t = checkpoint.tensor_with_shape(name, shape)?;
    let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>().max(1));
    let block = (COPY_BLOCK_BYTES / (4 * cols)).max(1);
    let mut next = 0;
    let mut blocks = Blocks::new(|| -> std::io::Result<Option<Vec<u8>>> {
        if next >= rows {
            return Ok(None);
        }
        let range = next..(next + block).min(rows);
        next = range.end;
        let part = t.rows(range).map_err(std::io::Error::other)?;
        let bytes = f32_as_f16_bytes(&part.to_f32().map_err(std::io::Error::other)?);
        part.release_pages();
        Ok(Some(bytes))
    });
    out.write_from(name, &mut blocks)?;
    Ok(())
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map_err(|e| PackError::io(from, e))?;
    Ok(())
}

/// Quantizes the checkpoint in `model_dir` into an AWQ "gemm" checkpoint folder at `out_dir`,
/// on the CPU.
pub fn quantize(
    model_dir: &Path,
    out_dir: &Path,
    options: &QuantizeOptions,
    on_event: impl FnMut(Event<'_>),
) -> Result<QuantizeReport> {
    quantize_on(
        &CpuBackend::with_compute(options.compute),
        model_dir,
        out_dir,
        options,
        on_event,
    )
}

/// [`quantize`] with the calibration forward passes and the search's trials on `backend`.
pub fn quantize_on<B: Backend>(
    backend: &B,
    model_dir: &Path,
    out_dir: &Path,
    options: &QuantizeOptions,
    mut on_event: impl FnMut(Event<'_>),
) -> Result<QuantizeReport> {
    let total = Instant::now();
    let config_path = model_dir.join("config.json");
    let config = ModelConfig::from_file(&config_path)?;
    let qconfig = quantization_config(options);
    if config.quantization.is_some() {
        return Err(PackError::AlreadyQuantized {
            path: model_dir.join("config.json"),
        });
    }
    validate(&config, &qconfig)?;
    let num_layers = config.num_hidden_layers;
    let layers = match options.part {
        Some(part) => part.within(num_layers)?,
        None => 0..num_layers,
    };
    if atomic::is_occupied(out_dir) && !options.replace {
        return Err(PackError::Invalid(format!(
            "{}: already exists and is not empty (choose another output folder or pass --force)",
            out_dir.display()
        )));
    }
    let checkpoint = Checkpoint::open(model_dir)?;
    let mut seconds = RunSeconds::default();

    let calib = match options.method {
        Method::Awq => {
            let start = Instant::now();
            let tokenizer = Tokenizer::from_dir(model_dir)?;
            let set = dataset::build(&options.calib, &tokenizer)?;
            seconds.calibration_data = start.elapsed().as_secs_f64();
            on_event(Event::Calibrated(&set.summary));
            Some(set)
        }
        Method::Rtn => None,
    };

    let original_config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path).map_err(|e| PackError::io(&config_path, e))?,
    )
    .map_err(|e| PackError::Invalid(format!("{}: {e}", config_path.display())))?;
    let config_json = quantized_config_json(original_config, &qconfig, &config_path)?;
    // A part records what it was made from, so that parts of different models or settings
    // are refused when merged.
    let source = match options.part {
        Some(_) => source_digest(model_dir, &checkpoint)?,
        None => Vec::new(),
    };
    let specs = tensor_specs(&config, &qconfig, layers.clone());
    let safetensors_bytes = specs.iter().map(TensorSpec::bytes).sum();

    let report = atomic::write_dir::<_, PackError>(out_dir, options.replace, |dir| {
        let mut out = CheckpointStream::create(dir, specs, options.max_shard_bytes, file_metadata())?;
        let (v, h) = (config.vocab_size, config.hidden_size);
        let mut layer_reports = Vec::with_capacity(layers.len());
        if layers.start == 0 {
            copy_as_f16(&mut out, &checkpoint, names::EMBED_TOKENS, &[v, h])?;
        }

        let mut stream = match &calib {
            Some(set) => Some(LayerStream::new(
                backend,
                &checkpoint,
                &config,
                &set.blocks,
                options.compute,
            )?),
            None => None,
        };
        // Layers before a part's range only carry the calibration stream forward.
        if let Some(stream) = &mut stream {
            for index in 0..layers.start {
                let start = Instant::now();
                stream.skip_layer()?;
                stream.release(index);
                let forward = start.elapsed().as_secs_f64();
                seconds.capture += forward;
                on_event(Event::Forwarded {
                    layer: index,
                    first: layers.start,
                    seconds: forward,
                });
                cpu_kernels::release_freed_memory();
            }
        }
        for index in layers.clone() {
            let settings = LayerSettings {
                group_size: options.group_size,
                scaling: options.scaling,
                clip: options.clip,
                seq_len: options.calib.seq_len,
                converted: converted(&config, &qconfig, index),
                compute: options.compute,
            };
            let (quantized, mut report) = match &mut stream {
                Some(stream) => {
                    let start = Instant::now();
                    let mut capture = stream.next_layer()?.expect("one capture per layer");
                    drop(capture.layer);
                    let capture_seconds = start.elapsed().as_secs_f64();
                    let weights = LayerWeights::read(&checkpoint, &config, index)?;
                    // The search works on its own f32 copy: the mapped pages can go now.
                    stream.release(index);
                    let result =
                        quantize_layer(backend, weights, index, &mut capture.inputs, &config, &settings)?;
                    drop(capture.inputs);
                    let (q, mut r) = result;
                    r.seconds.capture = capture_seconds;
                    (q, r)
                }
                None => {
                    let weights = LayerWeights::read(&checkpoint, &config, index)?;
                    let result = rtn_layer(weights, index, &config, &settings)?;
                    checkpoint.release_prefix(&layer_tensor_name(index, ""));
                    result
                }
            };
            let start = Instant::now();
            write_layer(&mut out, index, &quantized, &config)?;
            report.seconds.quantize_pack += start.elapsed().as_secs_f64();
            seconds.capture += report.seconds.capture;
            seconds.scale_search += report.seconds.scale_search;
            seconds.clip_search += report.seconds.clip_search;
            seconds.quantize_pack += report.seconds.quantize_pack;
            on_event(Event::Layer {
                done: index - layers.start + 1,
                total: layers.len(),
                report: &report,
            });
            layer_reports.push(report);
            cpu_kernels::release_freed_memory();
        }

        let start = Instant::now();
        if layers.end == num_layers {
            copy_as_f16(&mut out, &checkpoint, names::FINAL_NORM, &[h])?;
            if !config.tie_word_embeddings {
                copy_as_f16(&mut out, &checkpoint, names::LM_HEAD, &[v, h])?;
            }
        }
        out.finish()?;
        if options.part.is_none() {
            let path = dir.join("config.json");
            std::fs::write(&path, &config_json).map_err(|e| PackError::io(&path, e))?;
        }
        for name in COPIED_FILES {
            let from = model_dir.join(name);
            if from.is_file() {
                copy_file(&from, &dir.join(name))?;
            }
        }
        seconds.write = start.elapsed().as_secs_f64();
        seconds.total = total.elapsed().as_secs_f64();
        let report = QuantizeReport {
            method: options.method,
            group_size: options.group_size,
            scaling: options.scaling,
            clip: options.clip && options.method == Method::Awq,
            modules_to_not_convert: options.modules_to_not_convert.clone(),
            calibration: calib.as_ref().map(|c| c.summary.clone()),
            quantization_config: qconfig.to_json(),
            layers: layer_reports,
            compute: options.compute,
            seconds: seconds.clone(),
            safetensors_bytes,
            part: options.part,
        };
        if let Some(part) = options.part {
            let settings = PartSettings::of(&report, num_layers);
            PartManifest::new(part, settings, source, config_json.clone(), report.clone()).write(dir)?;
        }
        Ok(report)
    })?;
    Ok(report)
}

/// The `config.json` of the quantized checkpoint: the original with its
/// `quantization_config`, and f16 as its element type.
fn quantized_config_json(
    mut config: serde_json::Value,
    qconfig: &QuantizationConfig,
    path: &Path,
) -> Result<String> {
    let obj = config
        .as_object_mut()
        .ok_or_else(|| PackError::Invalid(format!("{}: not a JSON object", path.display())))?;
    obj.insert("quantization_config".into(), qconfig.to_json());
    obj.insert("torch_dtype".into(), "float16".into());
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), "float16".into());
    }
    Ok(serde_json::to_string_pretty(&config).expect("JSON values serialize") + "\n")
}
