//! `awq quantize`: a checkpoint folder to an AWQ "gemm" checkpoint folder, with a JSON report.

use anyhow::Result;

use crate::cli::QuantizeArgs;
use crate::progress::log;

/// Runs `awq quantize`.
pub fn run(args: &QuantizeArgs) -> Result<()> {
    let run = args.execute()?;
    let report = &run.quantization;
    let s = &report.seconds;
    println!(
        "quantized {} layers ({}, group size {}) into {} in {:.1}s: calibration data {:.1}s, capture {:.1}s, scale search {:.1}s, clip search {:.1}s, quantize+pack+write {:.1}s; peak RSS {:.0} MB",
        report.layers.len(),
        report.method,
        report.group_size.get(),
        args.out.display(),
        s.total,
        s.calibration_data,
        s.capture,
        s.scale_search,
        s.clip_search,
        s.quantize_pack + s.write,
        run.peak_rss_bytes.unwrap_or(0) as f64 / 1e6
    );
    if let Some(path) = &args.json {
        evaluation::report::write(path, &run)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}
