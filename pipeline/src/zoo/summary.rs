//! What a batch reports: one row per entry, the summary file each shard writes into the zoo's
//! root (`batch-summary-K-of-N.json`), and the merge of the summaries that shards wrote on
//! different machines into one zoo report (`awq batch merge`), checked for completeness.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use evaluation::provenance::{self, Machine, ToolInfo};
use evaluation::report::SCHEMA_VERSION;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::split::{Balance, Shard};
use crate::job::Job;
use crate::report::JobReport;

/// One entry's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SummaryRow {
    pub name: String,
    /// "ok", "failed" or "invalid".
    pub status: String,
    /// The job's model name.
    pub model: Option<String>,
    /// "awq" or "rtn" (none without quantization).
    pub method: Option<String>,
    pub group_size: Option<usize>,
    pub ppl_original: Option<f64>,
    pub ppl_quantized: Option<f64>,
    pub delta_percent: Option<f64>,
    /// Mean KL divergence of the quantized model from the original (a `kl` evaluation).
    pub mean_kld: Option<f64>,
    /// Share of predictions whose most likely token is the original's.
    pub same_top: Option<f64>,
    pub seconds: f64,
    /// Peak RSS of the quantization step.
    pub peak_rss_bytes: Option<u64>,
    pub quantized_bytes: Option<u64>,
    /// SHA-256 of the quantized checkpoint's weights file(s), in order.
    pub checkpoint_sha256: Vec<String>,
    pub error: Option<String>,
}

impl SummaryRow {
    /// An entry that could not run, with why.
    pub fn failed(name: &str, status: &str, error: String) -> Self {
        SummaryRow {
            name: name.to_string(),
            status: status.into(),
            model: None,
            method: None,
            group_size: None,
            ppl_original: None,
            ppl_quantized: None,
            delta_percent: None,
            mean_kld: None,
            same_top: None,
            seconds: 0.0,
            peak_rss_bytes: None,
            quantized_bytes: None,
            checkpoint_sha256: Vec::new(),
            error: Some(error),
        }
    }

    /// The row of an entry that ran (`result`), from the job report it wrote.
    pub fn of(name: &str, job: &Job, seconds: f64, result: &Result<()>) -> Self {
        // A failed entry may have left no report, or one of an earlier run: only a success's
        // report is read, and then it must parse.
        let read = result
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e:#}"))
            .and_then(|()| evaluation::report::read::<JobReport>(&job.report()).map_err(Into::into));
        let report = match read {
            Ok(report) => report,
            Err(e) => {
                let mut row = Self::failed(name, "failed", format!("{e:#}"));
                row.seconds = seconds;
                return row;
            }
        };
        let comparison = report.comparisons.first();
        let kl = report.evals.iter().find(|e| e.mean_kld.is_some());
        let quantization = report.quantization.as_ref();
        SummaryRow {
            name: name.to_string(),
            status: "ok".into(),
            model: Some(job.name.clone()),
            method: job.quant.as_ref().map(|q| q.options.method.to_string()),
            group_size: job.quant.as_ref().map(|q| q.options.group_size.get()),
            ppl_original: comparison.map(|c| c.ppl_original),
            ppl_quantized: comparison.map(|c| c.ppl_quantized),
            delta_percent: comparison.map(|c| c.delta_percent),
            mean_kld: kl.and_then(|e| e.mean_kld),
            same_top: kl.and_then(|e| e.same_top),
            seconds,
            peak_rss_bytes: quantization.and_then(|q| q.peak_rss_bytes),
            quantized_bytes: report.quantized_bytes,
            checkpoint_sha256: quantization
                .map(|q| {
                    q.output
                        .iter()
                        .filter(|f| f.path.ends_with(".safetensors"))
                        .map(|f| f.sha256.clone())
                        .collect()
                })
                .unwrap_or_default(),
            error: None,
        }
    }
}

/// What one `awq batch` run (one shard) writes beside its entries' folders.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardSummary {
    pub schema_version: u32,
    pub kind: String,
    pub tool: ToolInfo,
    pub machine: Machine,
    pub zoo: String,
    /// SHA-256 of the zoo file: the shards of one zoo agree on it.
    pub zoo_sha256: String,
    /// Every entry of the zoo, in file order (not only this shard's).
    pub entries: Vec<String>,
    pub shard: Shard,
    pub balance: Balance,
    pub rows: Vec<SummaryRow>,
}

impl ShardSummary {
    /// Where a shard's summary goes: `<zoo root>/batch-summary-K-of-N.json`.
    pub fn path(root: &Path, shard: Shard) -> PathBuf {
        root.join(format!("batch-summary-{}-of-{}.json", shard.index, shard.count))
    }

    /// A shard's summary.
    pub fn new(zoo: &super::Zoo, shard: Shard, balance: Balance, rows: Vec<SummaryRow>) -> Self {
        ShardSummary {
            schema_version: SCHEMA_VERSION,
            kind: "batch-summary".into(),
            tool: provenance::tool(),
            machine: provenance::machine(),
            zoo: zoo.file.display().to_string(),
            zoo_sha256: zoo.sha256.clone(),
            entries: zoo.entries.iter().map(|e| e.name.clone()).collect(),
            shard,
            balance,
            rows,
        }
    }
}

/// The zoo report of `awq batch merge`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MergedReport {
    pub schema_version: u32,
    pub kind: String,
    pub zoo: String,
    pub zoo_sha256: String,
    /// The summary files merged.
    pub sources: Vec<String>,
    /// One row per entry that ran, in the zoo's order.
    pub rows: Vec<SummaryRow>,
    /// Entries no summary holds.
    pub missing: Vec<String>,
    /// Entries that failed or were invalid.
    pub failed: Vec<String>,
    /// Entries more than one summary holds.
    pub duplicated: Vec<String>,
}

impl MergedReport {
    /// Whether every entry appears once and succeeded.
    pub fn complete(&self) -> bool {
        self.missing.is_empty() && self.failed.is_empty() && self.duplicated.is_empty()
    }
}

/// Every `batch-summary-*.json` under `dirs` (searched recursively), sorted.
pub fn find_summaries(dirs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("batch-summary-") && n.ends_with(".json"))
            {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for dir in dirs {
        walk(dir, &mut out)?;
    }
    out.sort();
    Ok(out)
}

/// Merges shard summaries of one zoo, checking that every entry appears exactly once.
pub fn merge(files: &[PathBuf]) -> Result<MergedReport> {
    if files.is_empty() {
        bail!("no batch-summary-*.json found (each `awq batch` run writes one into the zoo's output folder)");
    }
    let summaries: Vec<ShardSummary> = files
        .iter()
        .map(|f| evaluation::report::read(f).map_err(anyhow::Error::from))
        .collect::<Result<_>>()?;
    let first = &summaries[0];
    for (file, s) in files.iter().zip(&summaries) {
        if s.zoo_sha256 != first.zoo_sha256 {
            bail!(
                "{} is a summary of another zoo file (SHA-256 {} vs {} in {})",
                file.display(),
                &s.zoo_sha256[..12.min(s.zoo_sha256.len())],
                &first.zoo_sha256[..12.min(first.zoo_sha256.len())],
                files[0].display()
            );
        }
    }
    let mut by_name: BTreeMap<&str, Vec<&SummaryRow>> = BTreeMap::new();
    for row in summaries.iter().flat_map(|s| &s.rows) {
        by_name.entry(row.name.as_str()).or_default().push(row);
    }
    let mut report = MergedReport {
        schema_version: SCHEMA_VERSION,
        kind: "zoo-report".into(),
        zoo: first.zoo.clone(),
        zoo_sha256: first.zoo_sha256.clone(),
        sources: files.iter().map(|f| f.display().to_string()).collect(),
        rows: Vec::new(),
        missing: Vec::new(),
        failed: Vec::new(),
        duplicated: Vec::new(),
    };
    for name in &first.entries {
        match by_name.get(name.as_str()).map(Vec::as_slice) {
            None | Some([]) => report.missing.push(name.clone()),
            Some(rows) => {
                if rows.len() > 1 {
                    report.duplicated.push(name.clone());
                }
                if rows[0].status != "ok" {
                    report.failed.push(name.clone());
                }
                report.rows.push(rows[0].clone());
            }
        }
    }
    Ok(report)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("–".into(), f)
}

/// The rows as a Markdown table.
pub fn table(rows: &[SummaryRow]) -> String {
    let mut t = String::from(
        "| entry | status | method | g | PPL original → quantized | Δ | mean KLD | same top | time | peak RSS | size | checkpoint SHA-256 |\n\
         |---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let ppl = match (r.ppl_original, r.ppl_quantized) {
            (Some(o), Some(q)) => format!("{o:.4} → {q:.4}"),
            _ => "–".into(),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {ppl} | {} | {} | {} | {:.1} s | {} | {} | {} |",
            r.name,
            r.status,
            r.method.as_deref().unwrap_or("–"),
            r.group_size.map_or("–".into(), |g| g.to_string()),
            opt(r.delta_percent, |d| format!("{d:+.2} %")),
            opt(r.mean_kld, |k| format!("{k:.5}")),
            opt(r.same_top, |p| format!("{:.2} %", 100.0 * p)),
            r.seconds,
            r.peak_rss_bytes
                .map_or("–".into(), |b| format!("{:.0} MB", b as f64 / 1e6)),
            r.quantized_bytes
                .map_or("–".into(), |b| format!("{:.1} MB", b as f64 / 1e6)),
            r.checkpoint_sha256
                .first()
                .map_or("–".into(), |h| format!("`{}`", &h[..12.min(h.len())])),
        );
    }
    t
}

/// The merged report in Markdown: the table and what is missing, failed or duplicated.
pub fn markdown(report: &MergedReport) -> String {
    let mut md = format!(
        "# Zoo {}\n\nZoo file SHA-256 `{}`; {} summaries merged.\n\n",
        report.zoo,
        &report.zoo_sha256[..16.min(report.zoo_sha256.len())],
        report.sources.len()
    );
    md.push_str(&table(&report.rows));
    for (what, names) in [
        ("Missing", &report.missing),
        ("Failed", &report.failed),
        ("Duplicated", &report.duplicated),
    ] {
        if !names.is_empty() {
            let _ = writeln!(md, "\n{what}: {}", names.join(", "));
        }
    }
    if report.complete() {
        md.push_str("\nEvery entry of the zoo ran once and succeeded.\n");
    }
    md
}

/// Two bar charts side by side: PPL (original and quantized) and mean KLD of each entry.
pub fn chart(rows: &[SummaryRow], path: &Path) -> Result<()> {
    let rows: Vec<&SummaryRow> = rows.iter().filter(|r| r.status == "ok").collect();
    let width = 360 + 120 * rows.len() as u32;
    let svg = path.with_extension("svg.tmp");
    {
        let root = SVGBackend::new(&svg, (width, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(width / 2);
        let n = rows.len().max(1);
        let ppl_max = rows
            .iter()
            .flat_map(|r| [r.ppl_original, r.ppl_quantized])
            .flatten()
            .fold(1.0f64, f64::max);
        let mut ppl = ChartBuilder::on(&left)
            .caption("PPL: original (grey), quantized (blue)", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..n as f64, 0f64..ppl_max * 1.1)?;
        ppl.configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| rows.get(*x as usize).map_or(String::new(), |r| r.name.clone()))
            .draw()?;
        for (i, r) in rows.iter().enumerate() {
            let x = i as f64;
            if let Some(o) = r.ppl_original {
                ppl.draw_series([Rectangle::new(
                    [(x + 0.1, 0.0), (x + 0.45, o)],
                    RGBColor(170, 170, 170).filled(),
                )])?;
            }
            if let Some(q) = r.ppl_quantized {
                ppl.draw_series([Rectangle::new(
                    [(x + 0.5, 0.0), (x + 0.85, q)],
                    RGBColor(50, 100, 200).filled(),
                )])?;
            }
        }
        let kld_max = rows.iter().filter_map(|r| r.mean_kld).fold(1e-6f64, f64::max);
        let mut kld = ChartBuilder::on(&right)
            .caption("mean KLD from the original", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(60)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n as f64, 0f64..kld_max * 1.1)?;
        kld.configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| rows.get(*x as usize).map_or(String::new(), |r| r.name.clone()))
            .draw()?;
        for (i, r) in rows.iter().enumerate() {
            if let Some(k) = r.mean_kld {
                let x = i as f64;
                kld.draw_series([Rectangle::new(
                    [(x + 0.2, 0.0), (x + 0.8, k)],
                    RGBColor(200, 90, 50).filled(),
                )])?;
            }
        }
        root.present()?;
    }
    std::fs::rename(&svg, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
