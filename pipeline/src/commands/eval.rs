//! `awq eval`: perplexity of a checkpoint on a text file, with a reproducible JSON report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tp_runtime::perplexity::{Protocol, WindowPlan, evaluate};
use tp_runtime::{CpuBackend, Model, ModelConfig, Tokenizer};

use crate::progress::{Progress, log};
use crate::provenance::{self, FileDigest, Machine, ToolInfo};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendArg {
    Cpu,
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
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendArg,
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

/// Loads, tokenizes and scores; shared by `awq eval` and `awq bench eval`.
pub fn evaluate_checkpoint(args: &EvalArgs, threads: usize) -> Result<EvalReport> {
    let wall = Instant::now();
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
    let load = Instant::now();
    let model = match args.backend {
        BackendArg::Cpu => Model::load(&args.model, CpuBackend::new())?,
    };
    let load_seconds = load.elapsed().as_secs_f64();
    let progress = Progress::new("windows", plan.windows as u64);
    let result = evaluate(&model, &tokens, &plan, args.batch, |_, tally| {
        progress.update(
            tally.windows as u64,
            format!("ppl {:.4} {:.0} tokens/s", tally.ppl(), tally.tokens_per_second()),
        );
    })?;
    progress.finish();
    Ok(EvalReport {
        schema_version: 1,
        kind: "perplexity",
        tool: provenance::tool(),
        machine: provenance::machine(),
        backend: tp_runtime::Backend::name(model.backend()),
        threads,
        model: ModelInfo {
            dir: args.model.display().to_string(),
            config: model.config().clone(),
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
