//! `awq merge`: the part folders of `awq quantize --part` joined into one AWQ checkpoint.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::progress::log;

/// Arguments of `awq merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Part folders (any order) that together hold every layer once.
    #[arg(required = true, value_name = "PART")]
    pub parts: Vec<PathBuf>,
    /// Output checkpoint folder (must not exist or be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// The largest weights file, as in `awq quantize` (the parts' own shard sizes do not
    /// matter).
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = crate::cli::parse_bytes)]
    pub max_shard_size: u64,
    /// Write the JSON report (the parts' layer reports and seconds, merged) here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
}

/// Runs `awq merge`.
pub fn run(args: &MergeArgs) -> Result<()> {
    let run =
        crate::quantize_run::merge_part_folders(&args.parts, &args.out, args.max_shard_size, args.force)?;
    let report = &run.quantization;
    println!(
        "merged {} parts ({} layers, {}, group size {}) into {}: {:.1} GB of weights in {:.1}s; the parts' quantization took {:.1}s in all",
        args.parts.len(),
        report.layers.len(),
        report.method,
        report.group_size.get(),
        args.out.display(),
        report.safetensors_bytes as f64 / 1e9,
        run.wall_seconds,
        report.seconds.total
    );
    if let Some(path) = &args.json {
        evaluation::report::write(path, &run)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}
