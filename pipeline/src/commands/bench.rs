//! `awq bench eval`: perplexity-evaluation throughput, reported against a roofline measured
//! in the same run (the f32 GEMM rate of this machine on the model's own shapes).

use std::time::Instant;

use anyhow::Result;
use checkpoint::ModelConfig;
use clap::Subcommand;
use evaluation::provenance;
use evaluation::report::{EvalReport, QuantizeRunReport};
use serde::Serialize;
use tp_runtime::backend::cpu::matmul_transposed;

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
    /// The W4A16 kernels against cuBLAS f16 on Llama-2-7B shapes (needs a GPU).
    #[cfg(feature = "cuda")]
    Kernels(super::bench_kernels::KernelBenchArgs),
}

/// The same-run baseline: how fast this machine multiplies f32 matrices of the model's shape.
#[derive(Debug, Serialize)]
pub struct GemmBaseline {
    pub name: &'static str,
    /// `[m, k] × [k, n]`.
    pub shape: [usize; 3],
    pub gflops: f64,
    /// Model FLOPs per evaluated token (linear layers, lm_head, attention at this ctx).
    pub flops_per_token: f64,
    /// Tokens/s if every FLOP ran at the measured GEMM rate.
    pub roofline_tokens_per_second: f64,
}

/// `awq bench eval`'s report.
#[derive(Debug, Serialize)]
pub struct BenchEvalReport {
    pub eval: EvalReport,
    pub baseline: GemmBaseline,
    /// Measured tokens/s over the roofline.
    pub fraction_of_roofline: f64,
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

fn gemm_gflops(m: usize, k: usize, n: usize) -> f64 {
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
    let mut out = vec![0f32; m * n];
    matmul_transposed(&x, &w, &mut out, m, k, n);
    let start = Instant::now();
    let mut reps = 0u32;
    while start.elapsed().as_secs_f64() < 2.0 {
        matmul_transposed(&x, &w, &mut out, m, k, n);
        reps += 1;
    }
    2.0 * (m * k * n) as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Runs a bench subcommand.
pub fn run(command: &BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Eval(args) => bench_eval(args),
        BenchCommand::Quantize(args) => bench_quantize(args),
        BenchCommand::Generate(args) => super::bench_generate::run(args),
        #[cfg(feature = "cuda")]
        BenchCommand::Kernels(args) => super::bench_kernels::run(args),
    }
}

/// The same-run baseline of a quantization: its arithmetic at the measured GEMM rate.
#[derive(Debug, Serialize)]
pub struct QuantizeFloor {
    pub name: &'static str,
    pub gemm_gflops: f64,
    pub search_flops: f64,
    pub floor_seconds: f64,
}

/// `awq bench quantize`'s report.
#[derive(Debug, Serialize)]
pub struct BenchQuantizeReport {
    pub run: QuantizeRunReport,
    pub baseline: QuantizeFloor,
    /// Floor over measured search time (capture + scale search).
    pub fraction_of_floor: f64,
}

fn bench_quantize(args: &QuantizeArgs) -> Result<()> {
    let run = args.execute()?;
    let config = ModelConfig::from_file(&args.model.join("config.json"))?;
    let q = &run.quantization;
    let tokens = q.calibration.as_ref().map_or(0, |c| c.tokens) as f64;
    let shape = [4096, config.hidden_size, config.intermediate_size];
    log(format!("measuring the f32 GEMM rate on {shape:?}"));
    let gflops = gemm_gflops(shape[0], shape[1], shape[2]);
    let flops =
        awq_pack::layer::search_flops(&config, tokens, args.seq_len) * config.num_hidden_layers as f64;
    let floor = flops / (gflops * 1e9);
    let s = &q.seconds;
    let searched = s.capture + s.scale_search;
    let report = BenchQuantizeReport {
        fraction_of_floor: floor / searched,
        baseline: QuantizeFloor {
            name: "AWQ search FLOPs at the f32 GEMM rate (gemm crate, same run)",
            gemm_gflops: gflops,
            search_flops: flops,
            floor_seconds: floor,
        },
        run,
    };
    let s = &report.run.quantization.seconds;
    println!("| measure | seconds |");
    println!("|---|---|");
    for (name, v) in [
        ("total", s.total),
        ("calibration data", s.calibration_data),
        ("capture", s.capture),
        ("scale search", s.scale_search),
        ("clip search", s.clip_search),
        ("quantize + pack", s.quantize_pack),
        ("write", s.write),
    ] {
        println!("| {name} | {v:.1} |");
    }
    println!(
        "| baseline: search FLOPs ({:.1} TFLOP) at {:.0} GFLOP/s | {:.1} |",
        flops / 1e12,
        gflops,
        floor
    );
    println!(
        "| capture + scale search over that floor | {:.2}x |",
        1.0 / report.fraction_of_floor
    );
    println!(
        "| peak RSS | {:.0} MB |",
        report.run.peak_rss_bytes.unwrap_or(0) as f64 / 1e6
    );
    if let Some(path) = &args.json {
        evaluation::report::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}

fn bench_eval(args: &EvalArgs) -> Result<()> {
    let threads = provenance::set_threads(args.threads)?;
    let eval = progress::evaluate(&args.request())?;
    let c = &eval.model.config;
    let shape = [args.ctx, c.hidden_size, c.intermediate_size];
    log(format!("measuring the f32 GEMM rate on {shape:?}"));
    let gflops = gemm_gflops(shape[0], shape[1], shape[2]);
    let flops = flops_per_token(c, args.ctx);
    let roofline = gflops * 1e9 / flops;
    let report = BenchEvalReport {
        fraction_of_roofline: eval.tokens_per_second / roofline,
        baseline: GemmBaseline {
            name: "f32 GEMM roofline (gemm crate, same run)",
            shape,
            gflops,
            flops_per_token: flops,
            roofline_tokens_per_second: roofline,
        },
        eval,
    };
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| perplexity ({}, ctx {}, {} windows) | {:.4} |",
        report.eval.protocol, report.eval.ctx, report.eval.windows, report.eval.ppl
    );
    println!(
        "| evaluation tokens/s ({} threads) | {:.1} |",
        threads, report.eval.tokens_per_second
    );
    println!("| baseline: f32 GEMM {:?} | {:.1} GFLOP/s |", shape, gflops);
    println!(
        "| roofline tokens/s ({:.3} GFLOP/token) | {:.1} |",
        flops / 1e9,
        roofline
    );
    println!("| fraction of roofline | {:.3} |", report.fraction_of_roofline);
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
