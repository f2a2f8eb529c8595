//! Measured runs: a checkpoint's perplexity and a quantization, each with the provenance
//! that makes its numbers reproducible (tool, machine, threads, digests of every input and
//! output, peak memory).

use std::path::{Path, PathBuf};
use std::time::Instant;

use awq_pack::{Event, Method, QuantizeOptions};
use checkpoint::presharded::Mapping;
use checkpoint::{ModelConfig, Tokenizer};
use serde::{Deserialize, Serialize};
use tp_runtime::{Backend, CpuBackend, Model, Placement, PlacementRequest, RankGroup};

use crate::perplexity::{PerplexityResult, Protocol, Tally, WindowPlan, WindowScore, evaluate};
use crate::provenance;
use crate::report::{DataInfo, EvalReport, ModelInfo, QuantizeRunReport, SCHEMA_VERSION};
use crate::{Error, Result};

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The CPU backend (rayon threads); tensor-parallel ranks are threads of this process.
    #[default]
    Cpu,
    /// The CUDA backend on GPU 0, or GPUs `0..tp` joined by NCCL.
    Cuda,
}

/// What to evaluate, and how.
#[derive(Clone, Debug)]
pub struct EvalRequest {
    /// Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    pub model: PathBuf,
    /// UTF-8 text, tokenized whole without special tokens.
    pub data: PathBuf,
    pub ctx: usize,
    /// Score only the first windows (default: all).
    pub windows: Option<usize>,
    pub protocol: Protocol,
    /// Windows per forward pass.
    pub batch: usize,
    pub device: Device,
    /// Tensor and pipeline parallelism (a pre-sharded folder brings its own).
    pub placement: PlacementRequest,
}

/// Progress of an evaluation.
pub enum EvalEvent<'a> {
    /// The text is tokenized and the windows are planned.
    Planned { tokens: usize, plan: &'a WindowPlan },
    /// A window was scored.
    Window {
        score: &'a WindowScore,
        tally: &'a Tally,
    },
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::file(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// A loaded model (one rank or a group) that can describe itself for the report.
trait Loaded: tp_runtime::Scorer {
    fn backend_name(&self) -> String;
    fn placement(&self) -> Placement;
    fn rank_weight_bytes(&self) -> Vec<usize>;
    fn rank_loaded_bytes(&self) -> Vec<u64>;
    fn stage_seconds(&self) -> Option<Vec<f64>>;
}

impl<B: Backend> Loaded for Model<B> {
    fn backend_name(&self) -> String {
        self.backend().name()
    }
    fn placement(&self) -> Placement {
        Placement::single(self.config())
    }
    fn rank_weight_bytes(&self) -> Vec<usize> {
        vec![self.weight_bytes()]
    }
    fn rank_loaded_bytes(&self) -> Vec<u64> {
        vec![self.loaded_bytes()]
    }
    fn stage_seconds(&self) -> Option<Vec<f64>> {
        None
    }
}

impl<B: Backend> Loaded for RankGroup<B> {
    fn backend_name(&self) -> String {
        format!(
            "{} × {} ranks",
            self.ranks()[0].backend().name(),
            self.ranks().len()
        )
    }
    fn placement(&self) -> Placement {
        RankGroup::placement(self).clone()
    }
    fn rank_weight_bytes(&self) -> Vec<usize> {
        RankGroup::rank_weight_bytes(self)
    }
    fn rank_loaded_bytes(&self) -> Vec<u64> {
        RankGroup::rank_loaded_bytes(self)
    }
    fn stage_seconds(&self) -> Option<Vec<f64>> {
        Some(RankGroup::stage_seconds(self))
    }
}

/// What scoring with a loaded model produced.
struct Scored {
    result: PerplexityResult,
    backend: String,
    placement: Placement,
    rank_weight_bytes: Vec<usize>,
    rank_loaded_bytes: Vec<u64>,
    stage_seconds: Option<Vec<f64>>,
    load_seconds: f64,
}

fn score(
    model: impl Loaded,
    load: Instant,
    tokens: &[u32],
    plan: &WindowPlan,
    batch: usize,
    on_window: impl FnMut(&WindowScore, &Tally),
) -> Result<Scored> {
    let load_seconds = load.elapsed().as_secs_f64();
    let result = evaluate(&model, tokens, plan, batch, on_window)?;
    Ok(Scored {
        result,
        backend: model.backend_name(),
        placement: model.placement(),
        rank_weight_bytes: model.rank_weight_bytes(),
        rank_loaded_bytes: model.rank_loaded_bytes(),
        stage_seconds: model.stage_seconds(),
        load_seconds,
    })
}

/// Fails at once, before minutes of tokenizing and loading, where the GPUs a placement needs
/// are not there or our kernels cannot run on them.
fn check_device(device: Device, world_size: usize) -> Result<()> {
    if device != Device::Cuda {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    {
        use cuda_kernels::devices::{MIN_CAPABILITY, probe};
        let gpus = probe().map_err(|e| Error::Invalid(format!("--backend cuda: {e}")))?;
        if world_size > gpus.len() {
            return Err(Error::Invalid(format!(
                "--backend cuda: the placement has {world_size} ranks, one GPU each; this machine has {}",
                gpus.len()
            )));
        }
        if let Some(bad) = gpus[..world_size].iter().find(|d| !d.supported()) {
            return Err(Error::Invalid(format!(
                "--backend cuda: GPU {} ({}) has compute capability {}.{}; the kernels need {}.{} or newer",
                bad.ordinal, bad.name, bad.capability.0, bad.capability.1, MIN_CAPABILITY.0, MIN_CAPABILITY.1
            )));
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = world_size;
        Err(Error::Invalid(
            "--backend cuda: this build has no CUDA support (build with the `cuda` feature)".into(),
        ))
    }
}

fn load_and_score(
    request: &EvalRequest,
    split: bool,
    tokens: &[u32],
    plan: &WindowPlan,
    on_window: impl FnMut(&WindowScore, &Tally),
) -> Result<Scored> {
    let load = Instant::now();
    let (model, batch, placement) = (&request.model, request.batch, &request.placement);
    match (request.device, split) {
        (Device::Cpu, false) => score(
            Model::load(model, CpuBackend::new())?,
            load,
            tokens,
            plan,
            batch,
            on_window,
        ),
        (Device::Cpu, true) => score(
            RankGroup::load_cpu(model, placement)?,
            load,
            tokens,
            plan,
            batch,
            on_window,
        ),
        #[cfg(feature = "cuda")]
        (Device::Cuda, false) => score(
            Model::load(model, tp_runtime::CudaBackend::new(0)?)?,
            load,
            tokens,
            plan,
            batch,
            on_window,
        ),
        #[cfg(feature = "cuda")]
        (Device::Cuda, true) => score(
            RankGroup::load_cuda(model, placement)?,
            load,
            tokens,
            plan,
            batch,
            on_window,
        ),
        #[cfg(not(feature = "cuda"))]
        (Device::Cuda, _) => unreachable!("check_device refuses cuda without the feature"),
    }
}

/// Loads, tokenizes and scores a checkpoint; the report holds the perplexity and its
/// provenance.
pub fn evaluate_checkpoint(
    request: &EvalRequest,
    mut on_event: impl FnMut(EvalEvent<'_>),
) -> Result<EvalReport> {
    let wall = Instant::now();
    let config = ModelConfig::from_file(&request.model.join("config.json"))?;
    // Checked before any weight is read or any text tokenized.
    let mapping = Mapping::read(&request.model)?;
    let placement = request.placement.resolve(&config, mapping.as_ref())?;
    check_device(request.device, placement.world_size())?;
    let tokenizer = Tokenizer::from_dir(&request.model)?;
    let text = read_text(&request.data)?;
    let tokens = tokenizer.encode(&text, false)?;
    let plan = WindowPlan::new(
        tokens.len(),
        request.ctx,
        request.windows,
        request.protocol,
        tokenizer.added_bos()?,
    )
    .map_err(|e| Error::file(&request.data, format!("{} tokens: {e}", tokens.len())))?;
    on_event(EvalEvent::Planned {
        tokens: tokens.len(),
        plan: &plan,
    });
    let split = mapping.is_some() || placement.world_size() > 1;
    let scored = load_and_score(request, split, &tokens, &plan, |score, tally| {
        on_event(EvalEvent::Window { score, tally })
    })?;
    let result = scored.result;
    Ok(EvalReport {
        schema_version: SCHEMA_VERSION,
        kind: "perplexity".into(),
        tool: provenance::tool(),
        machine: provenance::machine(),
        backend: scored.backend,
        threads: rayon::current_num_threads(),
        layer_stages: (0..config.num_hidden_layers)
            .map(|l| scored.placement.stages.stage_of(l).unwrap_or(0))
            .collect(),
        placement: scored.placement,
        rank_weight_bytes: scored.rank_weight_bytes,
        rank_loaded_bytes: scored.rank_loaded_bytes,
        stage_seconds: scored.stage_seconds,
        model: ModelInfo {
            dir: request.model.display().to_string(),
            config,
            files: provenance::digest_dir(&request.model)?,
        },
        tokenizer: provenance::digest(tokenizer.path())?,
        data: DataInfo {
            file: provenance::digest(&request.data)?,
            tokens: tokens.len(),
        },
        protocol: plan.protocol,
        ctx: plan.ctx,
        windows: plan.windows,
        windows_available: plan.windows_available,
        bos: plan.bos,
        ppl: result.ppl,
        mean_nll: result.mean_nll,
        predictions: result.predictions,
        per_window_mean_nll: result.windows.iter().map(|w| w.mean_nll()).collect(),
        tokens_processed: result.tokens_processed,
        eval_seconds: result.seconds,
        tokens_per_second: result.tokens_per_second,
        load_seconds: scored.load_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        peak_rss_bytes: provenance::peak_rss_bytes(),
    })
}

/// Quantizes `model` into `out` and records the run; `calib` is the calibration file, whose
/// digest joins the inputs.
pub fn quantize_checkpoint(
    model: &Path,
    out: &Path,
    options: &QuantizeOptions,
    calib: Option<&Path>,
    on_event: impl FnMut(Event<'_>),
) -> Result<QuantizeRunReport> {
    let wall = Instant::now();
    let report = awq_pack::quantize(model, out, options, on_event)?;
    let peak_rss_bytes = provenance::peak_rss_bytes();
    let mut input = provenance::digest_dir(model)?;
    if let Some(calib) = calib
        && options.method == Method::Awq
    {
        input.push(provenance::digest(calib)?);
    }
    Ok(QuantizeRunReport {
        schema_version: SCHEMA_VERSION,
        kind: "quantize".into(),
        tool: provenance::tool(),
        machine: provenance::machine(),
        threads: rayon::current_num_threads(),
        input,
        output: provenance::digest_dir(out)?,
        quantization: report,
        wall_seconds: wall.elapsed().as_secs_f64(),
        peak_rss_bytes,
    })
}
