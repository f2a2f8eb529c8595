//! `awq eval`: perplexity of a checkpoint on a text file, with a reproducible JSON report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tp_runtime::perplexity::{PerplexityResult, Protocol, Tally, WindowPlan, WindowScore, evaluate};
use tp_runtime::{
    Backend, CpuBackend, CudaBackend, Model, ModelConfig, Scorer, ShardPlan, TensorParallel, Tokenizer,
};

use crate::progress::{Progress, log};
use crate::provenance::{self, FileDigest, Machine, ToolInfo};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendArg {
    /// The CPU backend (rayon threads).
    Cpu,
    /// The CUDA backend (our kernels, cuBLAS, NCCL between GPUs).
    Cuda,
}

/// Arguments of `awq eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    pub model: PathBuf,
    /// UTF-8 text to score, tokenized whole without special tokens.
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens per window.
    #[arg(long)]
    pub ctx: usize,
    /// Score only the first K windows (default: all).
    #[arg(long, value_name = "K")]
    pub windows: Option<usize>,
    /// full: every prediction (AutoAWQ/GPTQ); llamacpp: second half, BOS first (llama-perplexity).
    #[arg(long, default_value = "full", value_parser = parse_protocol)]
    pub protocol: Protocol,
    /// Write the JSON report here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// Worker threads (default: all logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Where the model runs: cpu, or cuda (GPU 0; GPUs 0..tp with --tp).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendArg,
    /// Tensor-parallel ranks (CPU: in-process ranks, one thread each; CUDA: one GPU each).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    s.parse()
}

/// The model's files and shape, as reported.
#[derive(Debug, Serialize)]
pub struct ModelInfo {
    pub dir: String,
    pub config: ModelConfig,
    pub files: Vec<FileDigest>,
}

/// The evaluated text, as reported.
#[derive(Debug, Serialize)]
pub struct DataInfo {
    pub file: FileDigest,
    pub tokens: usize,
}

/// `awq eval`'s JSON report.
#[derive(Debug, Serialize)]
pub struct EvalReport {
    pub schema_version: u32,
    pub kind: &'static str,
    pub tool: ToolInfo,
    pub machine: Machine,
    pub backend: String,
    pub threads: usize,
    /// Tensor-parallel ranks.
    pub tp: usize,
    /// The shard plan, when tp > 1.
    pub shard_plan: Option<ShardPlan>,
    /// Weight bytes held by each rank.
    pub rank_weight_bytes: Vec<usize>,
    pub model: ModelInfo,
    pub tokenizer: FileDigest,
    pub data: DataInfo,
    pub protocol: Protocol,
    pub ctx: usize,
    pub windows: usize,
    pub windows_available: usize,
    /// BOS written over each window's first token (llamacpp protocol), if any.
    pub bos: Option<u32>,
    pub ppl: f64,
    pub mean_nll: f64,
    pub predictions: usize,
    pub per_window_mean_nll: Vec<f64>,
    pub tokens_processed: usize,
    pub eval_seconds: f64,
    pub tokens_per_second: f64,
    pub load_seconds: f64,
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// A loaded model (one rank or a group) that can name its backend and its ranks' bytes.
trait Loaded: Scorer {
    fn backend_name(&self) -> String;
    fn rank_bytes(&self) -> Vec<usize>;
}

impl<B: Backend> Loaded for Model<B> {
    fn backend_name(&self) -> String {
        self.backend().name()
    }
    fn rank_bytes(&self) -> Vec<usize> {
        vec![self.weight_bytes()]
    }
}

impl<B: Backend> Loaded for TensorParallel<B> {
    fn backend_name(&self) -> String {
        format!(
            "{} × {} ranks",
            self.ranks()[0].backend().name(),
            self.ranks().len()
        )
    }
    fn rank_bytes(&self) -> Vec<usize> {
        self.rank_weight_bytes()
    }
}

/// Scores with a loaded model: the result, the backend's name, bytes per rank, load seconds.
fn score(
    model: impl Loaded,
    load: Instant,
    tokens: &[u32],
    plan: &WindowPlan,
    batch: usize,
    on_window: impl FnMut(&WindowScore, &Tally),
) -> Result<(PerplexityResult, String, Vec<usize>, f64)> {
    let load_seconds = load.elapsed().as_secs_f64();
    let result = evaluate(&model, tokens, plan, batch, on_window)?;
    Ok((result, model.backend_name(), model.rank_bytes(), load_seconds))
}

/// Loads, tokenizes and scores; shared by `awq eval` and `awq bench eval`.
pub fn evaluate_checkpoint(args: &EvalArgs, threads: usize) -> Result<EvalReport> {
    let wall = Instant::now();
    if args.backend == BackendArg::Cuda {
        // Fail before minutes of tokenizing and loading, not after.
        let gpus = cuda_kernels::cuda_available().context("--backend cuda")?;
        if args.tp > gpus {
            anyhow::bail!(
                "--backend cuda --tp {}: needs {} GPUs; this machine has {gpus}",
                args.tp,
                args.tp
            );
        }
    }
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let text = read_text(&args.data)?;
    let tokens = tokenizer.encode(&text, false)?;
    let plan = WindowPlan::new(
        tokens.len(),
        args.ctx,
        args.windows,
        args.protocol,
        tokenizer.added_bos()?,
    )
    .with_context(|| format!("{}: {} tokens", args.data.display(), tokens.len()))?;
    log(format!(
        "{}: {} tokens, scoring {} of {} windows of {} ({} protocol)",
        args.data.display(),
        tokens.len(),
        plan.windows,
        plan.windows_available,
        plan.ctx,
        plan.protocol
    ));
    let config = ModelConfig::from_file(&args.model.join("config.json"))?;
    // Checked before any weight is read.
    let shard_plan = (args.tp != 1)
        .then(|| ShardPlan::new(&config, args.tp))
        .transpose()?;
    let progress = Progress::new("windows", plan.windows as u64);
    let on_window = |_: &WindowScore, tally: &Tally| {
        progress.update(
            tally.windows as u64,
            format!("ppl {:.4} {:.0} tokens/s", tally.ppl(), tally.tokens_per_second()),
        );
    };
    let load = Instant::now();
    let (result, backend, rank_weight_bytes, load_seconds) = match (args.backend, args.tp) {
        (BackendArg::Cpu, 1) => score(
            Model::load(&args.model, CpuBackend::new())?,
            load,
            &tokens,
            &plan,
            args.batch,
            on_window,
        )?,
        (BackendArg::Cuda, 1) => score(
            Model::load(&args.model, CudaBackend::new(0)?)?,
            load,
            &tokens,
            &plan,
            args.batch,
            on_window,
        )?,
        (BackendArg::Cpu, tp) => score(
            TensorParallel::load_cpu(&args.model, tp)?,
            load,
            &tokens,
            &plan,
            args.batch,
            on_window,
        )?,
        (BackendArg::Cuda, tp) => score(
            TensorParallel::load_cuda(&args.model, tp)?,
            load,
            &tokens,
            &plan,
            args.batch,
            on_window,
        )?,
    };
    progress.finish();
    Ok(EvalReport {
        schema_version: 1,
        kind: "perplexity",
        tool: provenance::tool(),
        machine: provenance::machine(),
        backend,
        threads,
        tp: args.tp,
        shard_plan,
        rank_weight_bytes,
        model: ModelInfo {
            dir: args.model.display().to_string(),
            config,
            files: provenance::digest_dir(&args.model)?,
        },
        tokenizer: provenance::digest(tokenizer.path())?,
        data: DataInfo {
            file: provenance::digest(&args.data)?,
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
        load_seconds,
        wall_seconds: wall.elapsed().as_secs_f64(),
        peak_rss_bytes: provenance::peak_rss_bytes(),
    })
}

/// Writes a report as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, report: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(report)? + "\n";
    tp_runtime::atomic::write_file(path, text.as_bytes())?;
    Ok(())
}

/// Runs `awq eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    let threads = provenance::set_threads(args.threads)?;
    let report = evaluate_checkpoint(args, threads)?;
    println!(
        "PPL {:.4}  (mean NLL {:.6}, {} predictions, {} windows of {}, protocol {}) {:.1} tokens/s on {}",
        report.ppl,
        report.mean_nll,
        report.predictions,
        report.windows,
        report.ctx,
        report.protocol,
        report.tokens_per_second,
        report.backend
    );
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}
