//! `awq bench eval` and `awq bench quantize`: evaluation throughput and quantization time on
//! each compute path this CPU has (f32, bf16), each against the f32 path and against a
//! roofline (that path's GEMM rate on the model's own shapes) measured in the same run.

use std::time::Instant;

use anyhow::Result;
use awq_pack::QuantizeOptions;
use checkpoint::FloatData;
use checkpoint::ModelConfig;
use clap::Subcommand;
use evaluation::EvalRequest;
use evaluation::provenance;
use evaluation::report::{EvalReport, QuantizeRunReport};
use serde::Serialize;
use tp_runtime::backend::cpu::CpuMatrix;
use tp_runtime::{Compute, ComputeRequest, CpuFeatures, DenseWeight};

use crate::cli::{EvalArgs, QuantizeArgs};
use crate::progress::{self, log};

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

/// FLOPs per token of a forward pass at context `ctx` (multiply-add = 2).
pub fn flops_per_token(c: &ModelConfig, ctx: usize) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let (q, kv) = (c.q_features() as f64, c.kv_features() as f64);
    let layer_params = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
    let linear = 2.0 * (layer_params * c.num_hidden_layers as f64 + c.vocab_size as f64 * h);
    // Scores and weighted values, each 2·head_dim FLOPs per visible key; on average
    // (ctx + 1) / 2 keys are visible.
    let attention = 2.0 * 2.0 * q * (ctx as f64 + 1.0) / 2.0 * c.num_hidden_layers as f64;
    linear + attention
}

/// This machine's rate (GFLOP/s) for `[m, k] × [k, n]` products computed as `compute` says:
/// the best of eight half-second rounds. A shared VM's speed drifts by ±15 % from minute to
/// minute, and a floor must be the fastest the machine showed, never a slow moment of it.
pub(crate) fn gemm_gflops(compute: Compute, m: usize, k: usize, n: usize) -> f64 {
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
    let mut out = vec![0f32; m * n];
    // The weight as the runtime holds it for this path (bf16 weights are rounded once).
    let matrix = CpuMatrix::new(DenseWeight::new(FloatData::F32(w.into()), n, k).expect("shape"));
    matrix.matmul(compute, &x, m, &mut out);
    let mut best = 0f64;
    for _ in 0..8 {
        let start = Instant::now();
        let mut reps = 0u32;
        while start.elapsed().as_secs_f64() < 0.5 {
            matrix.matmul(compute, &x, m, &mut out);
            reps += 1;
        }
        best = best.max(2.0 * (m * k * n) as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
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
        let roofline = gflops * 1e9 / flops;
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let got = awq_pack::layer::search_flops(&mha, tokens, seq)
            - awq_pack::layer::search_flops(&gqa, tokens, seq);
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
        let groups = awq_pack::layer::scaling_groups(&wide);
        let o_group = awq_pack::layer::Inspect::Linear(checkpoint::Projection::O);
        assert_eq!(groups.len(), 3);
        assert!(groups.iter().all(|g| g.inspect != o_group));
    }

    #[test]
    fn smollm2_flops_match_hand_count() {
        let c = ModelConfig::from_json(
            &serde_json::json!({"architectures":["LlamaForCausalLM"],"hidden_size":576,"intermediate_size":1536,
                "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,
                "vocab_size":49152,"tie_word_embeddings":true}),
            std::path::Path::new("config.json"),
        )
        .unwrap();
        // 2 × 134.5 M parameters in linear layers and lm_head (≈ 0.27 GFLOP per token).
        let linear = flops_per_token(&c, 0) - 2.0 * 2.0 * 576.0 * 0.5 * 30.0;
        assert!((linear / 1e9 - 0.269).abs() < 0.002, "{linear}");
    }
}
