//! `awq bench eval` and `awq bench quantize`: evaluation throughput and quantization time on
//! each compute path this CPU has (f32, bf16), each against the f32 path and against a
//! roofline (that path's GEMM rate on the model's own shapes) measured in the same run.

use anyhow::Result;
use awq_pack::QuantizeOptions;
use checkpoint::ModelConfig;
use clap::Subcommand;
use cpu_kernels::bench::gemm_gflops;
use evaluation::EvalRequest;
use evaluation::bench::{flops_per_token, roofline_tokens_per_second};
use evaluation::provenance;
use evaluation::report::EvalReport;
use serde::Serialize;
use tp_runtime::{Compute, ComputeRequest, CpuFeatures};

use crate::cli::{EvalArgs, QuantizeArgs};
use crate::progress::{self, log};
use crate::quantize_run::QuantizeRunReport;

/// `awq bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Perplexity-evaluation tokens/s against this machine's measured GEMM roofline.
    Eval(EvalArgs),
    /// Quantization time against the arithmetic floor of the search, from this machine's
    /// GEMM rate measured in the same run.
    Quantize(QuantizeArgs),
    /// Decoding tokens/s at batch 1 and 8 against the memory roofline measured in the same run.
    Generate(super::bench_generate::BenchGenerateArgs),
    /// A real-size model from synthetic checkpoints at its shapes: AWQ seconds per layer
    /// against the search's floor, peak memory, the whole model's projected time and disk,
    /// and (--eval) whole-model evaluation against the GEMM roofline.
    Scale(super::bench_scale::BenchScaleArgs),
    /// The W4A16 kernels against cuBLAS f16 on Llama-2-7B shapes (needs a GPU).
    #[cfg(feature = "cuda")]
    Kernels(super::bench_kernels::KernelBenchArgs),
}

/// The same-run baseline: how fast this machine multiplies f32 matrices of the model's shape.
#[derive(Debug, Serialize)]
pub struct GemmBaseline {
    pub name: String,
    /// `[m, k] × [k, n]`.
    pub shape: [usize; 3],
    pub gflops: f64,
    /// Model FLOPs per evaluated token (linear layers, lm_head, attention at this ctx).
    pub flops_per_token: f64,
    /// Tokens/s if every FLOP ran at the measured GEMM rate.
    pub roofline_tokens_per_second: f64,
}

/// One compute path of `awq bench eval`.
#[derive(Debug, Serialize)]
pub struct EvalPath {
    pub compute: Compute,
    pub kernel: &'static str,
    pub eval: EvalReport,
    pub baseline: GemmBaseline,
    /// Measured tokens/s over this path's roofline.
    pub fraction_of_roofline: f64,
    /// Tokens/s over the f32 path's, measured in the same run.
    pub speedup_over_f32: Option<f64>,
    /// (PPL − PPL with f32) / PPL with f32.
    pub ppl_relative_to_f32: Option<f64>,
}

/// The report of `awq bench eval` (paths: [`EvalPath`]) or `awq bench quantize`
/// ([`QuantizePath`]): the CPU every path was measured on, and the paths.
#[derive(Debug, Serialize)]
pub struct BenchReport<P> {
    pub cpu: Option<String>,
    pub cpu_features: String,
    pub paths: Vec<P>,
}

/// The compute paths a bench measures: the one asked for, or with `auto` every path this CPU
/// has, f32 first (the baseline of the others).
fn bench_paths(request: ComputeRequest) -> Result<Vec<Compute>> {
    let features = CpuFeatures::detect();
    Ok(match request {
        ComputeRequest::Auto => ComputeRequest::available(&features),
        forced => vec![forced.resolve(&features, true)?],
    })
}

fn request_of(compute: Compute) -> ComputeRequest {
    match compute {
        Compute::F32 => ComputeRequest::F32,
        Compute::Bf16 => ComputeRequest::Bf16,
        Compute::Amx => ComputeRequest::Amx,
    }
}

/// Prints the CPU every figure of a bench was measured on.
fn print_machine() -> (Option<String>, String) {
    let machine = provenance::machine();
    println!(
        "CPU: {} ({} logical CPUs, {} threads); features: {}",
        machine.cpu.as_deref().unwrap_or("unknown"),
        machine.logical_cpus,
        rayon::current_num_threads(),
        machine.cpu_features
    );
    (machine.cpu, machine.cpu_features)
}

/// Prints the header of a table with one column per compute path and returns the printer of
/// its rows: `row(name, value of a path)`.
fn table_printer<'a, P>(
    first: &str,
    paths: &'a [P],
    compute: impl Fn(&P) -> Compute,
) -> impl Fn(&str, &dyn Fn(&P) -> String) + 'a {
    let names: Vec<String> = paths.iter().map(|p| compute(p).to_string()).collect();
    println!("| {first} | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(paths.len()));
    move |name, value| {
        let cells: Vec<String> = paths.iter().map(value).collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
}

/// Runs a bench subcommand.
pub fn run(command: &BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Eval(args) => bench_eval(args),
        BenchCommand::Quantize(args) => bench_quantize(args),
        BenchCommand::Generate(args) => super::bench_generate::run(args),
        BenchCommand::Scale(args) => super::bench_scale::run(args),
        #[cfg(feature = "cuda")]
        BenchCommand::Kernels(args) => super::bench_kernels::run(args),
    }
}

/// The same-run baseline of a quantization: its arithmetic at the measured GEMM rate.
#[derive(Debug, Serialize)]
pub struct QuantizeFloor {
    pub name: String,
    pub gemm_gflops: f64,
    pub search_flops: f64,
    pub floor_seconds: f64,
}

/// One compute path of `awq bench quantize`.
#[derive(Debug, Serialize)]
pub struct QuantizePath {
    pub compute: Compute,
    pub kernel: &'static str,
    pub run: QuantizeRunReport,
    pub baseline: QuantizeFloor,
    /// Floor over measured search time (capture + scale search).
    pub fraction_of_floor: f64,
    /// f32's total seconds over this path's, measured in the same run.
    pub speedup_over_f32: Option<f64>,
}

fn bench_quantize(args: &QuantizeArgs) -> Result<()> {
    provenance::set_threads(args.threads)?;
    let (cpu, cpu_features) = print_machine();
    let computes = bench_paths(args.compute)?;
    let config = ModelConfig::from_file(&args.model.join("config.json"))?;
    let mut paths: Vec<QuantizePath> = Vec::new();
    for &compute in &computes {
        // Several paths write side by side: OUT-f32, OUT-bf16.
        let out = if computes.len() > 1 {
            let mut name = args.out.file_name().unwrap_or_default().to_os_string();
            name.push(format!("-{compute}"));
            args.out.with_file_name(name)
        } else {
            args.out.clone()
        };
        let options = QuantizeOptions {
            compute,
            ..args.options()?
        };
        let run = progress::quantize(&args.model, &out, &options, args.calib.as_deref())?;
        let q = &run.quantization;
        let tokens = q.calibration.as_ref().map_or(0, |c| c.tokens) as f64;
        let shape = [
            awq_pack::layer::TRIAL_TOKENS,
            config.hidden_size,
            config.intermediate_size,
        ];
        log(format!("measuring the {compute} GEMM rate on {shape:?}"));
        let gflops = gemm_gflops(compute, shape[0], shape[1], shape[2]);
        let flops =
            awq_pack::layer::search_flops(&config, tokens, args.seq_len) * config.num_hidden_layers as f64;
        let floor = flops / (gflops * 1e9);
        let s = &q.seconds;
        let searched = s.capture + s.scale_search;
        let speedup = paths
            .first()
            .filter(|p| p.compute == Compute::F32 && compute != Compute::F32)
            .map(|f32_path| f32_path.run.quantization.seconds.total / s.total);
        paths.push(QuantizePath {
            compute,
            kernel: compute.kernel(),
            fraction_of_floor: floor / searched,
            baseline: QuantizeFloor {
                name: format!("AWQ search FLOPs at the {compute} GEMM rate (same run)"),
                gemm_gflops: gflops,
                search_flops: flops,
                floor_seconds: floor,
            },
            speedup_over_f32: speedup,
            run,
        });
    }
    println!();
    let row = table_printer("measure (seconds)", &paths, |p| p.compute);
    let secs = |p: &QuantizePath| p.run.quantization.seconds.clone();
    row("total", &|p| format!("{:.1}", secs(p).total));
    row("calibration data", &|p| {
        format!("{:.1}", secs(p).calibration_data)
    });
    row("capture", &|p| format!("{:.1}", secs(p).capture));
    row("scale search", &|p| format!("{:.1}", secs(p).scale_search));
    row("clip search", &|p| format!("{:.1}", secs(p).clip_search));
    row("quantize + pack", &|p| format!("{:.1}", secs(p).quantize_pack));
    row("write", &|p| format!("{:.1}", secs(p).write));
    row("speed-up of the total over f32 (same run)", &|p| {
        p.speedup_over_f32
            .map_or("1 (baseline)".into(), |r| format!("{r:.2}x"))
    });
    row("GEMM rate on [4096, h] × [h, i], GFLOP/s", &|p| {
        format!("{:.0}", p.baseline.gemm_gflops)
    });
    row("search FLOPs at that rate (floor)", &|p| {
        format!(
            "{:.1} ({:.1} TFLOP)",
            p.baseline.floor_seconds,
            p.baseline.search_flops / 1e12
        )
    });
    row("capture + scale search over the floor", &|p| {
        format!("{:.2}x", 1.0 / p.fraction_of_floor)
    });
    row("peak RSS, MB", &|p| {
        format!("{:.0}", p.run.peak_rss_bytes.unwrap_or(0) as f64 / 1e6)
    });
    row("kernel", &|p| p.kernel.to_string());
    drop(row);
    let report = BenchReport {
        cpu,
        cpu_features,
        paths,
    };
    if let Some(path) = &args.json {
        evaluation::report::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}

fn bench_eval(args: &EvalArgs) -> Result<()> {
    let threads = provenance::set_threads(args.threads)?;
    let (cpu, cpu_features) = print_machine();
    let mut paths: Vec<EvalPath> = Vec::new();
    for compute in bench_paths(args.compute)? {
        let request = EvalRequest {
            compute: request_of(compute),
            ..args.request()
        };
        let eval = progress::evaluate(&request)?;
        let c = &eval.model.config;
        let shape = [args.ctx, c.hidden_size, c.intermediate_size];
        log(format!("measuring the {compute} GEMM rate on {shape:?}"));
        let gflops = gemm_gflops(compute, shape[0], shape[1], shape[2]);
        let flops = flops_per_token(c, args.ctx);
        let roofline = roofline_tokens_per_second(gflops, flops);
        let f32_path = paths
            .first()
            .filter(|p| p.compute == Compute::F32 && compute != Compute::F32);
        paths.push(EvalPath {
            compute,
            kernel: compute.kernel(),
            fraction_of_roofline: eval.tokens_per_second / roofline,
            baseline: GemmBaseline {
                name: format!("{compute} GEMM roofline (same run)"),
                shape,
                gflops,
                flops_per_token: flops,
                roofline_tokens_per_second: roofline,
            },
            speedup_over_f32: f32_path.map(|p| eval.tokens_per_second / p.eval.tokens_per_second),
            ppl_relative_to_f32: f32_path.map(|p| (eval.ppl - p.eval.ppl) / p.eval.ppl),
            eval,
        });
    }
    let first = &paths[0].eval;
    println!();
    println!(
        "{} windows of {} ({} protocol), {threads} threads",
        first.windows, first.ctx, first.protocol
    );
    let row = table_printer("measure", &paths, |p| p.compute);
    row("perplexity", &|p| format!("{:.4}", p.eval.ppl));
    row("PPL relative to f32", &|p| {
        p.ppl_relative_to_f32
            .map_or("0 (baseline)".into(), |r| format!("{:+.3} %", 100.0 * r))
    });
    row("evaluation tokens/s", &|p| {
        format!("{:.1}", p.eval.tokens_per_second)
    });
    row("speed-up over f32 (same run)", &|p| {
        p.speedup_over_f32
            .map_or("1 (baseline)".into(), |r| format!("{r:.2}x"))
    });
    row("GEMM rate on the model's MLP shape, GFLOP/s", &|p| {
        format!("{:.1}", p.baseline.gflops)
    });
    row("roofline tokens/s (that rate)", &|p| {
        format!("{:.1}", p.baseline.roofline_tokens_per_second)
    });
    row("fraction of roofline", &|p| {
        format!("{:.3}", p.fraction_of_roofline)
    });
    row("kernel", &|p| p.kernel.to_string());
    drop(row);
    let report = BenchReport {
        cpu,
        cpu_features,
        paths,
    };
    if let Some(path) = &args.json {
        evaluation::report::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}
