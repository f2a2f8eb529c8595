//! `awq bench scale`: what a real-size model costs on this machine, from synthetic
//! checkpoints at its shapes (`awq synth`): AWQ quantization of a few layers (seconds per
//! layer against the search's arithmetic floor, peak memory, the projection to the whole
//! model and the disk it writes) and, with `--eval`, evaluation of the whole model in bf16
//! and of its 4-bit version (tokens/s against the GEMM roofline, memory split into mapped
//! weights and everything else).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use awq_calib::{CalibFormat, CalibSpec, Sampling};
use awq_pack::{GroupSize, Method, QuantizeOptions, Scaling};
use checkpoint::synth::{SynthOptions, synthesize};
use checkpoint::writer::DEFAULT_MAX_SHARD_BYTES;
use checkpoint::{Dtype, ModelConfig};
use clap::Args;
use cpu_kernels::bench::gemm_gflops;
use evaluation::bench::{flops_per_token, roofline_tokens_per_second};
use evaluation::perplexity::Protocol;
use evaluation::provenance::{self, RssPeaks, RssSampler};
use evaluation::{Device, EvalRequest};
use serde::Serialize;
use tp_runtime::{Compute, ComputeRequest, Placement, PlacementRequest};

use crate::cli::parse;
use crate::progress::{self, log};

/// Arguments of `awq bench scale`.
#[derive(Debug, Args)]
pub struct BenchScaleArgs {
    /// A model's config.json, e.g. fixtures/configs/llama-2-7b.json.
    pub config: PathBuf,
    /// Folder for the synthetic and quantized checkpoints; synthetic ones already there are
    /// reused (they are a function of the configuration and the seed).
    #[arg(long)]
    pub work: PathBuf,
    /// Calibration text (records sampling, as AutoAWQ).
    #[arg(long)]
    pub calib: PathBuf,
    /// Layer counts to quantize, e.g. `2,4`.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub layers: Vec<usize>,
    /// Calibration records (AutoAWQ's default: 128).
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration block (AutoAWQ's default: 512).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 128)]
    pub group_size: usize,
    /// Calibration tokens to project the whole-model time to (default: 40 blocks of 512, what
    /// AutoAWQ's default 128 records give with a Llama-family tokenizer on this text), at the
    /// measured ratio to the search's floor: a synthetic checkpoint's byte-level tokenizer
    /// turns the same records into a different number of tokens.
    #[arg(long, default_value_t = 20480)]
    pub project_tokens: usize,
    /// The search's and the evaluations' arithmetic (f32, bf16, auto).
    #[arg(long, default_value = "auto", value_parser = parse::<ComputeRequest>)]
    pub compute: ComputeRequest,
    /// Also evaluate the whole model (every layer, bf16) and its 4-bit AWQ-format version,
    /// made by round to nearest (a whole-model search would take hours; the evaluated format
    /// and kernels are the same).
    #[arg(long, requires = "data")]
    pub eval: bool,
    /// Text to evaluate on.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Windows evaluated.
    #[arg(long, default_value_t = 1)]
    pub windows: usize,
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Write the JSON report here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// Worker threads (default: all logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Quantization of a truncated model.
#[derive(Debug, Serialize)]
pub struct QuantizedLayers {
    pub layers: usize,
    pub calibration_tokens: usize,
    pub synth_seconds: Option<f64>,
    pub total_seconds: f64,
    /// Capture, scale search, clip search and packing, per layer.
    pub seconds_per_layer: f64,
    /// Everything else (calibration data, embeddings, writing).
    pub other_seconds: f64,
    /// One layer's search FLOPs at this machine's GEMM rate (same run).
    pub floor_seconds_per_layer: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Seconds per layer × the model's layers + everything else.
    pub projected_model_seconds: f64,
    /// The floor at `projected_tokens` × the measured ratio to the floor, per layer.
    pub projected_seconds_per_layer_at_tokens: f64,
    /// That × the model's layers + everything else.
    pub projected_model_seconds_at_tokens: f64,
}

/// Evaluation of a whole model.
#[derive(Debug, Serialize)]
pub struct WholeModelEval {
    pub model: String,
    pub compute: Compute,
    pub checkpoint_bytes: u64,
    pub ppl: f64,
    pub tokens_per_second: f64,
    /// FLOPs per token at the GEMM rate of one window's products (same run).
    pub roofline_tokens_per_second: f64,
    pub rss: RssPeaks,
}

/// `awq bench scale`'s report.
#[derive(Debug, Serialize)]
pub struct BenchScaleReport {
    pub config: String,
    pub cpu: Option<String>,
    pub cpu_features: String,
    pub threads: usize,
    pub compute: Compute,
    /// The GEMM rate of the search's floor, at its block shape: the faster of a measurement
    /// before and one after the quantization runs.
    pub gemm_gflops: f64,
    pub quantized: Vec<QuantizedLayers>,
    /// The calibration tokens the `projected_*_at_tokens` figures are for.
    pub projected_tokens: usize,
    /// Bytes of the whole model's AWQ checkpoint (from its shapes).
    pub projected_checkpoint_bytes: u64,
    pub evals: Vec<WholeModelEval>,
}

/// A synthetic checkpoint of `layers` layers (all when `None`) in `dir`: made, or reused.
fn synth(config: &Path, dir: &Path, layers: Option<usize>) -> Result<Option<f64>> {
    if dir.join("config.json").is_file() {
        log(format!("reusing {}", dir.display()));
        return Ok(None);
    }
    let options = SynthOptions {
        dtype: Dtype::BF16,
        layers,
        seed: 0,
        max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
    };
    let start = Instant::now();
    log(format!("synthesizing {} -> {}", config.display(), dir.display()));
    synthesize(config, dir, &options, true)?;
    Ok(Some(start.elapsed().as_secs_f64()))
}

/// Runs `awq bench scale`.
pub fn run(args: &BenchScaleArgs) -> Result<()> {
    let threads = provenance::set_threads(args.threads)?;
    let machine = provenance::machine();
    println!(
        "CPU: {} ({} logical CPUs, {threads} threads); features: {}",
        machine.cpu.as_deref().unwrap_or("unknown"),
        machine.logical_cpus,
        machine.cpu_features
    );
    let config_path = if args.config.is_dir() {
        args.config.join("config.json")
    } else {
        args.config.clone()
    };
    let config = ModelConfig::from_file(&config_path)?;
    if args
        .layers
        .iter()
        .any(|&l| l == 0 || l > config.num_hidden_layers)
    {
        bail!(
            "--layers: each count must be 1..={} (the model's layers)",
            config.num_hidden_layers
        );
    }
    let compute = args.compute.resolve_here(true)?;
    std::fs::create_dir_all(&args.work)?;
    let options = |method: Method| -> Result<QuantizeOptions> {
        Ok(QuantizeOptions {
            method,
            group_size: GroupSize::new(args.group_size)?,
            scaling: Scaling::Duo,
            clip: method == Method::Awq,
            calib: CalibSpec {
                format: CalibFormat::Text,
                sampling: Sampling::Records,
                samples: args.samples,
                seq_len: args.seq_len,
                seed: 42,
                ..CalibSpec::new(&args.calib)
            },
            modules_to_not_convert: Vec::new(),
            replace: true,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            compute,
            part: None,
        })
    };
    // The search's products run on blocks of TRIAL_TOKENS rows: its floor is at that shape.
    let search_rate = || {
        let m = awq_pack::layer::TRIAL_TOKENS;
        log(format!(
            "measuring the {compute} GEMM rate on [{m}, {}] × [{}, {}]",
            config.hidden_size, config.hidden_size, config.intermediate_size
        ));
        gemm_gflops(compute, m, config.hidden_size, config.intermediate_size)
    };
    let mut gflops = match args.layers.is_empty() {
        true => 0.0,
        false => search_rate(),
    };

    let mut runs = Vec::new();
    for &layers in &args.layers {
        let dir = args.work.join(format!("synth-{layers}l"));
        let synth_seconds = synth(&config_path, &dir, Some(layers))?;
        let out = args.work.join(format!("awq-{layers}l"));
        let run = progress::quantize(&dir, &out, &options(Method::Awq)?, Some(&args.calib))?;
        runs.push((layers, synth_seconds, run));
    }
    if !runs.is_empty() {
        // Measured again after the long runs: the floor is the faster of the two.
        gflops = gflops.max(search_rate());
    }
    let mut quantized = Vec::new();
    for (layers, synth_seconds, run) in runs {
        let q = &run.quantization;
        let s = &q.seconds;
        let per_layer = (s.capture + s.scale_search + s.clip_search + s.quantize_pack) / layers as f64;
        let tokens = q.calibration.as_ref().map_or(0, |c| c.tokens);
        let floor = awq_pack::layer::search_flops(&config, tokens as f64, args.seq_len) / (gflops * 1e9);
        let other = s.total - per_layer * layers as f64;
        let floor_at = |tokens: usize| {
            awq_pack::layer::search_flops(&config, tokens as f64, args.seq_len) / (gflops * 1e9)
        };
        let at_tokens = floor_at(args.project_tokens) * per_layer / floor;
        quantized.push(QuantizedLayers {
            layers,
            calibration_tokens: tokens,
            synth_seconds,
            total_seconds: s.total,
            seconds_per_layer: per_layer,
            other_seconds: other,
            floor_seconds_per_layer: floor,
            peak_rss_bytes: run.peak_rss_bytes,
            projected_model_seconds: per_layer * config.num_hidden_layers as f64 + other,
            projected_seconds_per_layer_at_tokens: at_tokens,
            projected_model_seconds_at_tokens: at_tokens * config.num_hidden_layers as f64 + other,
        });
    }
    let quantized_config = awq_pack::quantize::quantized_config(&config, &options(Method::Awq)?);
    let projected_checkpoint_bytes = Placement::single(&quantized_config)
        .rank(0)
        .weight_bytes(&quantized_config, Dtype::F16);

    let mut evals = Vec::new();
    if let (true, Some(data)) = (args.eval, &args.data) {
        let full = args.work.join("synth-full");
        synth(&config_path, &full, None)?;
        let rtn = args.work.join("rtn-full");
        if !rtn.join("config.json").is_file() {
            progress::quantize(&full, &rtn, &options(Method::Rtn)?, None)?;
        }
        for (name, dir) in [("bf16", &full), ("AWQ-format 4-bit (RTN)", &rtn)] {
            let request = EvalRequest {
                model: dir.clone(),
                data: data.clone(),
                ctx: args.ctx,
                windows: Some(args.windows),
                protocol: Protocol::Full,
                batch: 1,
                device: Device::Cpu,
                placement: PlacementRequest::default(),
                kl_base: None,
                compute: args.compute,
            };
            let sampler = RssSampler::start();
            let report = progress::evaluate(&request)?;
            let rss = sampler.finish();
            let used = tp_runtime::loaded::resolve_compute(dir, args.compute)?;
            // Evaluation's products have one window's rows.
            let rate = gemm_gflops(used, args.ctx, config.hidden_size, config.intermediate_size);
            evals.push(WholeModelEval {
                model: name.into(),
                compute: used,
                checkpoint_bytes: crate::report::weights_bytes(dir),
                ppl: report.ppl,
                tokens_per_second: report.tokens_per_second,
                roofline_tokens_per_second: roofline_tokens_per_second(
                    rate,
                    flops_per_token(&config, args.ctx),
                ),
                rss,
            });
        }
    }

    let report = BenchScaleReport {
        config: config_path.display().to_string(),
        cpu: machine.cpu,
        cpu_features: machine.cpu_features,
        threads,
        compute,
        gemm_gflops: gflops,
        quantized,
        projected_tokens: args.project_tokens,
        projected_checkpoint_bytes,
        evals,
    };
    print_report(&report, &config);
    if let Some(path) = &args.json {
        evaluation::report::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}

fn print_report(r: &BenchScaleReport, config: &ModelConfig) {
    let gb = |b: u64| b as f64 / 1e9;
    println!();
    println!(
        "{} ({} layers, hidden {}, intermediate {}, {} heads / {} kv), {} compute, {} GEMM {:.0} GFLOP/s at the search's block shape (same run)",
        r.config,
        config.num_hidden_layers,
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        r.compute,
        r.compute,
        r.gemm_gflops
    );
    println!(
        "| layers | calibration tokens | s/layer | floor s/layer | over floor | peak RSS | {n} layers at these tokens | s/layer at {t} tokens | {n} layers at {t} tokens | AWQ checkpoint |",
        n = config.num_hidden_layers,
        t = r.projected_tokens
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for q in &r.quantized {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2}x | {:.2} GB | {:.1} h | {:.0} | {:.1} h | {:.2} GB |",
            q.layers,
            q.calibration_tokens,
            q.seconds_per_layer,
            q.floor_seconds_per_layer,
            q.seconds_per_layer / q.floor_seconds_per_layer,
            gb(q.peak_rss_bytes.unwrap_or(0)),
            q.projected_model_seconds / 3600.0,
            q.projected_seconds_per_layer_at_tokens,
            q.projected_model_seconds_at_tokens / 3600.0,
            gb(r.projected_checkpoint_bytes)
        );
    }
    if !r.evals.is_empty() {
        println!();
        println!(
            "| whole model | compute | checkpoint | PPL | tokens/s | roofline tokens/s | fraction | mapped RSS | other RSS |"
        );
        println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for e in &r.evals {
            println!(
                "| {} | {} | {:.2} GB | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} GB | {:.2} GB |",
                e.model,
                e.compute,
                gb(e.checkpoint_bytes),
                e.ppl,
                e.tokens_per_second,
                e.roofline_tokens_per_second,
                e.tokens_per_second / e.roofline_tokens_per_second,
                gb(e.rss.mapped_bytes),
                gb(e.rss.other_bytes)
            );
        }
    }
}
