//! `awq bench kernels`: the W4A16 kernels against cuBLAS f16 on the same shapes, in the same
//! run, with the device's measured copy bandwidth as the yardstick at M = 1. Weights rotate
//! through enough copies that none is read from L2.

use anyhow::Result;
use clap::Args;
use cuda_kernels::Gpu;
use cuda_kernels::bench::{CALLS, ShapeWeights, bandwidth_fraction, tflops, time_w4a16, w4a16_call_bytes};
use cuda_kernels::launch::W4a16Path;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::progress::log;
use evaluation::report::write as write_json;

/// Arguments of `awq bench kernels`.
#[derive(Debug, Args)]
pub struct KernelBenchArgs {
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// AWQ group size of the benchmarked weights.
    #[arg(long, default_value_t = 128)]
    pub group_size: usize,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 30)]
    pub reps: usize,
    /// Write the table as JSON here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<std::path::PathBuf>,
}

/// One measurement.
#[derive(Debug, Serialize)]
pub struct KernelRow {
    pub k: usize,
    pub n: usize,
    pub m: usize,
    /// The path `awq` takes at this M (`fused` or `dequant`).
    pub path: &'static str,
    /// W4A16 as `awq` runs it: f16 activations in, f16 out.
    pub w4a16_ms: f32,
    /// The fused tensor-core kernel alone.
    pub fused_ms: f32,
    /// The GEMV kernel alone, where it applies (M ≤ 16).
    pub gemv_ms: Option<f32>,
    /// Dequantize to f16 + cuBLAS, where measured (M ≥ 16).
    pub dequant_ms: Option<f32>,
    pub cublas_f16_ms: f32,
    /// cuBLAS f16 time over W4A16 time.
    pub speedup: f64,
    pub w4a16_tflops: f64,
    /// Bytes a W4A16 call must move: weights, scales, zeros, activations in and out.
    pub w4a16_bytes: usize,
    /// Those bytes over the time, against the measured copy bandwidth.
    pub bandwidth_fraction: f64,
    /// The same calls replayed from a CUDA graph; `None` where the capture failed (the
    /// reason is logged).
    pub graph: Option<GraphRow>,
}

/// Times with the `CALLS` calls of a sample captured once into a CUDA graph and replayed,
/// so that the host's per-launch cost is paid once per sample instead of once per call.
#[derive(Debug, Serialize)]
pub struct GraphRow {
    /// W4A16 on the path `awq` takes at this M.
    pub w4a16_ms: f32,
    /// The GEMV kernel, where it applies (M ≤ 16).
    pub gemv_ms: Option<f32>,
    pub cublas_f16_ms: f32,
    pub speedup: f64,
    pub bandwidth_fraction: f64,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct KernelBench {
    pub device: String,
    pub copy_bandwidth_gb_s: f64,
    pub group_size: usize,
    pub calls_per_sample: usize,
    pub rows: Vec<KernelRow>,
}

/// A time in milliseconds, or a dash where not measured.
fn ms_or_dash(ms: Option<f32>) -> String {
    ms.map_or("–".to_string(), |v| format!("{v:.4}"))
}

/// Runs `awq bench kernels`.
pub fn run(args: &KernelBenchArgs) -> Result<()> {
    let gpu = Gpu::get(args.device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let bandwidth = gpu.copy_bandwidth(2 << 30)?;
    log(format!(
        "{}: device-to-device copy {:.0} GB/s",
        gpu.name(),
        bandwidth / 1e9
    ));
    let g = args.group_size;
    let mut rows = Vec::new();
    for (k, n) in [(4096, 4096), (4096, 11008), (11008, 4096)] {
        let weights = ShapeWeights::new(&gpu, &mut rng, k, n, g)?;
        for m in [1usize, 16, 128, 2048] {
            let t = time_w4a16(&gpu, &mut rng, &weights, m, args.reps)?;
            let bytes = w4a16_call_bytes(k, n, m, g);
            let fraction = |ms: f32| bandwidth_fraction(bytes, ms, bandwidth);
            let graph = match t.graph {
                Ok(graph) => Some(GraphRow {
                    w4a16_ms: graph.w4a16_ms,
                    gemv_ms: graph.gemv_ms,
                    cublas_f16_ms: graph.cublas_f16_ms,
                    speedup: graph.cublas_f16_ms as f64 / graph.w4a16_ms as f64,
                    bandwidth_fraction: fraction(graph.w4a16_ms),
                }),
                Err(e) => {
                    log(format!("K {k} N {n} M {m}: no CUDA-graph timing: {e}"));
                    None
                }
            };
            let row = KernelRow {
                k,
                n,
                m,
                path: if t.path == W4a16Path::Dequant {
                    "dequant"
                } else {
                    "fused"
                },
                w4a16_ms: t.w4a16_ms,
                fused_ms: t.fused_ms,
                gemv_ms: t.gemv_ms,
                dequant_ms: t.dequant_ms,
                cublas_f16_ms: t.cublas_f16_ms,
                speedup: t.cublas_f16_ms as f64 / t.w4a16_ms as f64,
                w4a16_tflops: tflops(m, k, n, t.w4a16_ms),
                w4a16_bytes: bytes,
                bandwidth_fraction: fraction(t.w4a16_ms),
                graph,
            };
            log(format!(
                "K {k} N {n} M {m}: W4A16 {:.4} ms ({}), cuBLAS f16 {:.4} ms ({:.2}x), {:.0}% of copy bandwidth",
                row.w4a16_ms,
                row.path,
                row.cublas_f16_ms,
                row.speedup,
                100.0 * row.bandwidth_fraction
            ));
            rows.push(row);
        }
    }
    println!(
        "\nW4A16 (group {g}, f16 in and out) vs cuBLAS f16 on {}; copy bandwidth {:.0} GB/s; median of {} samples of {CALLS} calls",
        gpu.name(),
        bandwidth / 1e9,
        args.reps
    );
    // The GEMV kernel's time, with its speedup over cuBLAS f16 and its share of bandwidth.
    let gemv_cell = |r: &KernelRow, gemv_ms: Option<f32>, cublas_f16_ms: f32| match gemv_ms {
        Some(ms) => format!(
            "{ms:.4} ({:.2}×, {:.0} %)",
            cublas_f16_ms / ms,
            100.0 * bandwidth_fraction(r.w4a16_bytes, ms, bandwidth)
        ),
        None => "–".to_string(),
    };
    println!(
        "| K × N | M | W4A16 ms | path | fused ms | GEMV ms (speedup, % of bandwidth) | dequant+cuBLAS ms | cuBLAS f16 ms | speedup | TFLOP/s | % of bandwidth |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} × {} | {} | {:.4} | {} | {:.4} | {} | {} | {:.4} | {:.2}× | {:.1} | {:.0} % |",
            r.k,
            r.n,
            r.m,
            r.w4a16_ms,
            r.path,
            r.fused_ms,
            gemv_cell(r, r.gemv_ms, r.cublas_f16_ms),
            ms_or_dash(r.dequant_ms),
            r.cublas_f16_ms,
            r.speedup,
            r.w4a16_tflops,
            100.0 * r.bandwidth_fraction
        );
    }
    println!("\nThe same calls replayed from CUDA graphs ({CALLS} calls per graph launch)");
    println!(
        "| K × N | M | W4A16 ms | GEMV ms (speedup, % of bandwidth) | cuBLAS f16 ms | speedup | % of bandwidth |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        match &r.graph {
            Some(g) => println!(
                "| {} × {} | {} | {:.4} | {} | {:.4} | {:.2}× | {:.0} % |",
                r.k,
                r.n,
                r.m,
                g.w4a16_ms,
                gemv_cell(r, g.gemv_ms, g.cublas_f16_ms),
                g.cublas_f16_ms,
                g.speedup,
                100.0 * g.bandwidth_fraction
            ),
            None => println!("| {} × {} | {} | – | – | – | – | capture failed |", r.k, r.n, r.m),
        }
    }
    if let Some(path) = &args.json {
        write_json(
            path,
            &KernelBench {
                device: gpu.name().to_string(),
                copy_bandwidth_gb_s: bandwidth / 1e9,
                group_size: g,
                calls_per_sample: CALLS,
                rows,
            },
        )?;
    }
    Ok(())
}
