//! `awq bench generate`: decoding tokens/s at several batch sizes, for one or more
//! checkpoints, against a memory roofline measured in the same run. A decode step must read
//! every weight once (whatever the batch) and each sequence's keys and values; at the
//! machine's measured read bandwidth that bounds the tokens/s of the step.

use std::path::PathBuf;

use anyhow::{Result, bail};
use checkpoint::{ModelConfig, Tokenizer};
use clap::Args;
use cpu_kernels::bench::host_read_bandwidth;
use evaluation::provenance::{self, Machine, ToolInfo};
use generation::{GenerateOptions, Sampling, generate_batch};
use serde::Serialize;
use tp_runtime::PlacementRequest;
use tp_runtime::loaded::{self, Device};
use tp_runtime::planner::{kv_bytes_per_token_step, weight_bytes_per_step};

use crate::cli::BackendArg;
use crate::progress::log;

/// Arguments of `awq bench generate`.
#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    /// Checkpoint folders to compare (e.g. the f32 original and its AWQ version).
    #[arg(required = true)]
    pub models: Vec<PathBuf>,
    /// Sequences decoded together.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Prompt tokens of each sequence.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens decoded per sequence (stop tokens ignored).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Where the models run.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendArg,
    /// Worker threads (default: all logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write the JSON report here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
}

/// One model at one batch size.
#[derive(Debug, Serialize)]
pub struct GenerateBenchRow {
    pub model: String,
    pub batch: usize,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    /// Bytes a decode step reads: weights, then keys and values at the mean context.
    pub weight_bytes_per_step: u64,
    pub kv_bytes_per_step: u64,
    pub roofline_tokens_per_second: f64,
    pub fraction_of_roofline: f64,
}

/// `awq bench generate`'s report.
#[derive(Debug, Serialize)]
pub struct GenerateBenchReport {
    pub tool: ToolInfo,
    pub machine: Machine,
    pub backend: String,
    pub threads: usize,
    /// The baseline: read bandwidth of this device, measured in the same run.
    pub bandwidth_name: &'static str,
    pub bandwidth_bytes_per_second: f64,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub rows: Vec<GenerateBenchRow>,
}

/// Prompts of `len` tokens cut from a fixed English text, a different start for each.
fn prompts(tokenizer: &Tokenizer, sequences: usize, len: usize) -> Result<Vec<Vec<u32>>> {
    const TEXT: &str = "The history of the printing press begins in the fifteenth century, when \
        movable type made books cheap enough for merchants, students and clergy to own. Within \
        fifty years presses operated in more than two hundred cities, and the number of books in \
        Europe grew from thousands to millions. Scholars argue about how quickly ideas spread as \
        a result, but few doubt that the change was lasting. ";
    let ids = tokenizer.encode(&TEXT.repeat(1 + len / 40), false)?;
    if ids.len() < len + sequences {
        bail!("the prompt text is too short for {len} tokens");
    }
    Ok((0..sequences).map(|s| ids[s..s + len].to_vec()).collect())
}

/// Runs `awq bench generate`.
pub fn run(args: &BenchGenerateArgs) -> Result<()> {
    let threads = provenance::set_threads(args.threads)?;
    let device: Device = args.backend.into();
    let machine = provenance::machine();
    let cpu = machine.cpu.clone().unwrap_or_else(|| "unknown CPU".into());
    let (bandwidth_name, bandwidth) = match device {
        Device::Cpu => {
            log("measuring host read bandwidth (512 MiB, all threads)");
            ("host memory read bandwidth (same run)", host_read_bandwidth())
        }
        Device::Cuda => device_bandwidth()?,
    };
    let mut rows = Vec::new();
    let mut backend = String::new();
    for dir in &args.models {
        let model = loaded::load(
            dir,
            device,
            tp_runtime::ComputeRequest::F32,
            &PlacementRequest::default(),
        )?;
        backend = model.backend_name();
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        for &batch in &args.batch {
            let options = GenerateOptions {
                max_new_tokens: args.new_tokens,
                sampling: Sampling::default(),
                stop: Vec::new(),
            };
            let prompts = prompts(&tokenizer, batch, args.prompt_tokens)?;
            let g = generate_batch(model.as_ref(), &prompts, &options, |_, _| Ok(()))?;
            let weights = weight_bytes_per_step(&config);
            // Decode steps see contexts prompt + 1 … prompt + new − 1.
            let mean_context = args.prompt_tokens + args.new_tokens / 2;
            let kv = kv_bytes_per_token_step(&config, mean_context) * batch as u64;
            let roofline = batch as f64 * bandwidth / (weights + kv) as f64;
            let row = GenerateBenchRow {
                model: dir.display().to_string(),
                batch,
                prefill_tokens_per_second: g.prefill_tokens_per_second(),
                decode_tokens_per_second: g.decode_tokens_per_second(),
                weight_bytes_per_step: weights,
                kv_bytes_per_step: kv,
                roofline_tokens_per_second: roofline,
                fraction_of_roofline: g.decode_tokens_per_second() / roofline,
            };
            log(format!(
                "{} batch {batch}: decode {:.1} tokens/s ({:.0} % of the roofline)",
                dir.display(),
                row.decode_tokens_per_second,
                100.0 * row.fraction_of_roofline
            ));
            rows.push(row);
        }
    }
    println!(
        "{cpu}, {threads} threads, {backend}; baseline: {bandwidth_name} {:.1} GB/s; prompts of {} tokens, {} decoded",
        bandwidth / 1e9,
        args.prompt_tokens,
        args.new_tokens
    );
    println!(
        "| model | batch | prefill tokens/s | decode tokens/s | bytes/step (weights + KV) | roofline tokens/s | fraction |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} + {:.1} MB | {:.1} | {:.2} |",
            r.model,
            r.batch,
            r.prefill_tokens_per_second,
            r.decode_tokens_per_second,
            r.weight_bytes_per_step as f64 / 1e6,
            r.kv_bytes_per_step as f64 / 1e6,
            r.roofline_tokens_per_second,
            r.fraction_of_roofline
        );
    }
    if let Some(path) = &args.json {
        let report = GenerateBenchReport {
            tool: provenance::tool(),
            machine,
            backend,
            threads,
            bandwidth_name,
            bandwidth_bytes_per_second: bandwidth,
            prompt_tokens: args.prompt_tokens,
            new_tokens: args.new_tokens,
            rows,
        };
        evaluation::report::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}

/// GPU 0's copy bandwidth (read + write), measured in the same run.
fn device_bandwidth() -> Result<(&'static str, f64)> {
    #[cfg(feature = "cuda")]
    {
        let gpu = cuda_kernels::Gpu::get(0)?;
        Ok((
            "GPU 0 device-to-device copy bandwidth (same run)",
            gpu.copy_bandwidth(1 << 30)?,
        ))
    }
    #[cfg(not(feature = "cuda"))]
    bail!("--backend cuda: this build has no CUDA support (build with the `cuda` feature)")
}
