//! `awq quantize`: a checkpoint folder to an AWQ "gemm" checkpoint folder, with a JSON report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use awq_calib::{CalibFormat, CalibSpec, Sampling};
use awq_pack::{Event, GroupSize, Method, QuantizeOptions, QuantizeReport, Scaling, quantize};
use clap::Args;
use serde::Serialize;

use super::eval::write_json;
use crate::progress::{Progress, log};
use crate::provenance::{self, FileDigest, Machine, ToolInfo};

/// Arguments of `awq quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Hugging Face checkpoint folder to quantize.
    pub model: PathBuf,
    /// Output folder (must not exist or be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Calibration text (required for --mode awq).
    #[arg(long, required_if_eq("mode", "awq"))]
    pub calib: Option<PathBuf>,
    /// text: one record per non-empty line; jsonl: one object with a `text` field per line.
    #[arg(long, default_value = "text", value_parser = parse::<CalibFormat>)]
    pub calib_format: CalibFormat,
    /// records: AutoAWQ (whole records, concatenated); windows: LMDeploy (random windows).
    #[arg(long, default_value = "records", value_parser = parse::<Sampling>)]
    pub sampling: Sampling,
    /// Records (records sampling) or windows (windows sampling) to draw.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration block.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Seed of the record shuffle or window draw.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Input weights per quantization group; must divide every quantized layer's inputs.
    #[arg(long, default_value_t = 128)]
    pub group_size: usize,
    /// awq: scale and clip search; rtn: round to nearest (the baseline).
    #[arg(long, default_value = "awq", value_parser = parse::<Method>)]
    pub mode: Method,
    /// duo: AutoAWQ's default; x-only: the paper's activation-only scales.
    #[arg(long, default_value = "duo", value_parser = parse::<Scaling>)]
    pub scaling: Scaling,
    /// Skip the clip search.
    #[arg(long)]
    pub no_clip: bool,
    /// Modules (or name fragments) to leave unquantized; repeatable.
    #[arg(long = "not-convert", value_name = "MODULE")]
    pub modules_to_not_convert: Vec<String>,
    /// Write the JSON report here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: all logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

/// `awq quantize`'s JSON report.
#[derive(Debug, Serialize)]
pub struct QuantizeRunReport {
    pub schema_version: u32,
    pub kind: &'static str,
    pub tool: ToolInfo,
    pub machine: Machine,
    pub threads: usize,
    pub input: Vec<FileDigest>,
    pub output: Vec<FileDigest>,
    pub quantization: QuantizeReport,
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl QuantizeArgs {
    /// The library options these arguments describe.
    pub fn options(&self) -> Result<QuantizeOptions> {
        let calib = CalibSpec {
            format: self.calib_format,
            sampling: self.sampling,
            samples: self.samples,
            seq_len: self.seq_len,
            seed: self.seed,
            ..CalibSpec::new(self.calib.clone().unwrap_or_default())
        };
        Ok(QuantizeOptions {
            method: self.mode,
            group_size: GroupSize::new(self.group_size)?,
            scaling: self.scaling,
            clip: !self.no_clip,
            calib,
            modules_to_not_convert: self.modules_to_not_convert.clone(),
            replace: self.force,
        })
    }

    /// Sets the thread count and quantizes as these arguments say: what `awq quantize` and
    /// `awq bench quantize` share.
    pub fn execute(&self) -> Result<QuantizeRunReport> {
        let threads = provenance::set_threads(self.threads)?;
        quantize_checkpoint(
            &self.model,
            &self.out,
            &self.options()?,
            self.calib.as_deref(),
            threads,
        )
    }
}

/// Quantizes `model` into `out` and builds the run report; shared by `awq quantize`,
/// `awq bench quantize` and the job runner. `calib` is the calibration file, for the report.
pub fn quantize_checkpoint(
    model: &Path,
    out: &Path,
    options: &QuantizeOptions,
    calib: Option<&Path>,
    threads: usize,
) -> Result<QuantizeRunReport> {
    let wall = Instant::now();
    log(format!(
        "quantizing {} -> {} ({}, group size {}, {} threads)",
        model.display(),
        out.display(),
        options.method,
        options.group_size.get(),
        threads
    ));
    let mut progress: Option<Progress> = None;
    let report = quantize(model, out, options, |event| match event {
        Event::Calibrated(c) => log(format!(
            "calibration: {} blocks of {} tokens from {} records ({} sampling, seed {}), {} skipped as too long",
            c.blocks,
            c.spec.seq_len,
            c.records_used,
            c.spec.sampling,
            c.spec.seed,
            c.records_skipped_too_long
        )),
        Event::Layer { done, total, report } => {
            let bar = progress.get_or_insert_with(|| Progress::new("layers", total as u64));
            let alphas: Vec<String> = report
                .scale_groups
                .iter()
                .map(|g| format!("{:.2}", g.choice.alpha))
                .collect();
            let s = &report.seconds;
            bar.update(
                done as u64,
                format!(
                    "layer {}: alpha {} ({:.1}s: capture {:.1}, scales {:.1}, clip {:.1}, pack {:.1})",
                    report.layer,
                    if alphas.is_empty() {
                        "-".into()
                    } else {
                        alphas.join("/")
                    },
                    s.capture + s.scale_search + s.clip_search + s.quantize_pack,
                    s.capture,
                    s.scale_search,
                    s.clip_search,
                    s.quantize_pack
                ),
            );
        }
    })?;
    if let Some(bar) = &progress {
        bar.finish();
    }
    let peak_rss_bytes = provenance::peak_rss_bytes();
    let mut input = provenance::digest_dir(model)?;
    if let Some(calib) = calib
        && options.method == Method::Awq
    {
        input.push(provenance::digest(calib)?);
    }
    Ok(QuantizeRunReport {
        schema_version: 1,
        kind: "quantize",
        tool: provenance::tool(),
        machine: provenance::machine(),
        threads,
        input,
        output: provenance::digest_dir(out)?,
        quantization: report,
        wall_seconds: wall.elapsed().as_secs_f64(),
        peak_rss_bytes,
    })
}

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
        write_json(path, &run)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}
