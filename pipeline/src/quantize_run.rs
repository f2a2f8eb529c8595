//! Quantization as a measured run: `awq_pack`'s quantizer (or its merge of part folders)
//! with the provenance evaluation records for every run (tool, machine, threads, digests of
//! every input and output, peak memory). The job runner composes quantization and
//! evaluation; this is its quantization half, as `evaluation::run` is the other.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use awq_pack::{Event, Method, QuantizeOptions, QuantizeReport};
use evaluation::provenance::{self, FileDigest, Machine, ToolInfo};
use evaluation::report::SCHEMA_VERSION;
use serde::{Deserialize, Serialize};

/// `awq quantize`'s (and `awq merge`'s) report: the quantizer's own report with the run's
/// provenance, at evaluation's [`SCHEMA_VERSION`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantizeRunReport {
    pub schema_version: u32,
    pub kind: String,
    pub tool: ToolInfo,
    pub machine: Machine,
    pub threads: usize,
    pub input: Vec<FileDigest>,
    pub output: Vec<FileDigest>,
    pub quantization: QuantizeReport,
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// Quantizes `model` into `out` and records the run; `calib` is the calibration file, whose
/// digest joins the inputs.
pub fn quantize_checkpoint(
    model: &Path,
    out: &Path,
    options: &QuantizeOptions,
    calib: Option<&Path>,
    on_event: impl FnMut(Event<'_>),
) -> Result<QuantizeRunReport> {
    let wall = Instant::now();
    let report = awq_pack::quantize(model, out, options, on_event)?;
    let mut input = provenance::digest_dir(model)?;
    if let Some(calib) = calib
        && options.method == Method::Awq
    {
        input.push(provenance::digest(calib)?);
    }
    QuantizeRunReport::of("quantize", input, out, report, wall)
}

/// [`awq_pack::merge_parts`] with its provenance: the parts' files as inputs, the merged
/// checkpoint's files as outputs.
pub fn merge_part_folders(
    parts: &[PathBuf],
    out: &Path,
    max_shard_bytes: u64,
    replace: bool,
) -> Result<QuantizeRunReport> {
    let wall = Instant::now();
    let report = awq_pack::merge_parts(parts, out, max_shard_bytes, replace)?;
    let mut input = Vec::new();
    for part in parts {
        input.extend(provenance::digest_dir(part)?);
    }
    QuantizeRunReport::of("merge", input, out, report, wall)
}

impl QuantizeRunReport {
    /// The report of a run of `kind` that read `input`, wrote `out` and began at `wall`; the
    /// peak RSS is read first, before digesting the output adds to it.
    fn of(
        kind: &str,
        input: Vec<FileDigest>,
        out: &Path,
        report: QuantizeReport,
        wall: Instant,
    ) -> Result<Self> {
        let peak_rss_bytes = provenance::peak_rss_bytes();
        Ok(QuantizeRunReport {
            schema_version: SCHEMA_VERSION,
            kind: kind.into(),
            tool: provenance::tool(),
            machine: provenance::machine(),
            threads: rayon::current_num_threads(),
            input,
            output: provenance::digest_dir(out)?,
            quantization: report,
            wall_seconds: wall.elapsed().as_secs_f64(),
            peak_rss_bytes,
        })
    }
}
