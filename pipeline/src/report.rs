//! A job's reports: `report.json` (stable schema, `schema_version`), `report.md` (the human
//! summary) and `loss.svg` (per-layer quantization loss before and after the scale search).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::job::{Job, Source};
use crate::manifest::Manifest;
use crate::provenance::{self, Machine, ToolInfo};
use crate::runner::{IMPORTED, QUANTIZE_REPORT, QUANTIZED, eval_report_name};

/// Version of `report.json`'s layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// One evaluation, as reported.
#[derive(Clone, Debug, Serialize)]
pub struct EvalRow {
    pub model: String,
    pub data: String,
    pub data_sha256: String,
    pub protocol: String,
    pub ctx: u64,
    pub windows: u64,
    pub ppl: f64,
    pub mean_nll: f64,
    pub predictions: u64,
    pub tokens_per_second: f64,
}

/// Original against quantized on the same data and protocol.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub data: String,
    pub protocol: String,
    pub ctx: u64,
    pub windows: u64,
    pub ppl_original: f64,
    pub ppl_quantized: f64,
    pub delta_percent: f64,
}

/// Per layer: summed loss over the scale groups at α = 0 and at the chosen α.
#[derive(Clone, Debug, Serialize)]
pub struct LayerLoss {
    pub layer: u64,
    pub groups: Vec<GroupLoss>,
}

/// One group's losses.
#[derive(Clone, Debug, Serialize)]
pub struct GroupLoss {
    pub group: String,
    pub alpha: f64,
    pub loss_at_zero: f64,
    pub best_loss: f64,
}

/// `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub job: String,
    pub name: String,
    pub canonical_sha256: String,
    pub tool: ToolInfo,
    pub machine: Machine,
    pub source: String,
    pub original_bytes: u64,
    pub quantized_bytes: Option<u64>,
    pub settings: Value,
    pub evals: Vec<EvalRow>,
    pub comparisons: Vec<Comparison>,
    pub quantization: Option<Value>,
    pub layer_losses: Vec<LayerLoss>,
    pub step_seconds: Vec<(String, f64)>,
}

fn read(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

fn weights_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Assembles the report from the step outputs in the job's folder.
pub fn build(job: &Job) -> Result<Report> {
    let out = &job.out_dir;
    let mut evals = Vec::new();
    for i in 0..job.evals.len() {
        let r = read(&out.join(eval_report_name(job, i)))?;
        evals.push(EvalRow {
            model: job.evals[i].model.to_string(),
            data: r["data"]["file"]["path"].as_str().unwrap_or_default().to_string(),
            data_sha256: r["data"]["file"]["sha256"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            protocol: r["protocol"].as_str().unwrap_or_default().to_string(),
            ctx: r["ctx"].as_u64().unwrap_or(0),
            windows: r["windows"].as_u64().unwrap_or(0),
            ppl: r["ppl"].as_f64().unwrap_or(f64::NAN),
            mean_nll: r["mean_nll"].as_f64().unwrap_or(f64::NAN),
            predictions: r["predictions"].as_u64().unwrap_or(0),
            tokens_per_second: r["tokens_per_second"].as_f64().unwrap_or(0.0),
        });
    }
    let mut comparisons = Vec::new();
    for o in evals.iter().filter(|e| e.model == "original") {
        let same = |q: &&EvalRow| {
            q.model == "quantized"
                && q.data_sha256 == o.data_sha256
                && q.protocol == o.protocol
                && q.ctx == o.ctx
                && q.windows == o.windows
        };
        if let Some(q) = evals.iter().find(same) {
            comparisons.push(Comparison {
                data: o.data.clone(),
                protocol: o.protocol.clone(),
                ctx: o.ctx,
                windows: o.windows,
                ppl_original: o.ppl,
                ppl_quantized: q.ppl,
                delta_percent: 100.0 * (q.ppl - o.ppl) / o.ppl,
            });
        }
    }
    let quantization = match job.quant {
        Some(_) => Some(read(&out.join(QUANTIZE_REPORT))?),
        None => None,
    };
    let layer_losses = quantization
        .as_ref()
        .and_then(|q| q["quantization"]["layers"].as_array())
        .map(|layers| {
            layers
                .iter()
                .map(|l| LayerLoss {
                    layer: l["layer"].as_u64().unwrap_or(0),
                    groups: l["scale_groups"]
                        .as_array()
                        .map(|gs| {
                            gs.iter()
                                .map(|g| GroupLoss {
                                    group: g["group"].as_str().unwrap_or_default().to_string(),
                                    alpha: g["alpha"].as_f64().unwrap_or(0.0),
                                    loss_at_zero: g["loss_at_zero"].as_f64().unwrap_or(0.0),
                                    best_loss: g["best_loss"].as_f64().unwrap_or(0.0),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let original = match &job.source {
        Source::Gguf(_) => out.join(IMPORTED),
        Source::HfDir(d) => d.clone(),
    };
    let manifest = Manifest::read(out)?;
    let step_seconds = manifest
        .map(|m| m.steps.iter().map(|(k, v)| (k.clone(), v.seconds)).collect())
        .unwrap_or_default();
    let settings = serde_json::json!({
        "quant": job.quant.as_ref().map(|q| serde_json::json!({
            "method": q.options.method, "group_size": q.options.group_size, "scaling": q.options.scaling,
            "clip": q.options.clip, "modules_to_not_convert": q.options.modules_to_not_convert,
            "calibration": q.options.calib,
        })),
        "runtime": job.runtime,
        "import_dtype": job.import_dtype,
    });
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        job: job.file.display().to_string(),
        name: job.name.clone(),
        canonical_sha256: job.canonical_hash.clone(),
        tool: provenance::tool(),
        machine: provenance::machine(),
        source: match &job.source {
            Source::Gguf(p) | Source::HfDir(p) => p.display().to_string(),
        },
        original_bytes: weights_bytes(&original),
        quantized_bytes: job.quant.as_ref().map(|_| weights_bytes(&out.join(QUANTIZED))),
        settings,
        evals,
        comparisons,
        quantization,
        layer_losses,
        step_seconds,
    })
}

/// The Markdown summary.
pub fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", r.name);
    let _ = writeln!(
        md,
        "Job `{}` (canonical SHA-256 `{}`), awq {} ({}).\n",
        r.job,
        &r.canonical_sha256[..16],
        r.tool.version,
        r.tool.git_commit
    );
    if !r.comparisons.is_empty() {
        let _ = writeln!(
            md,
            "## Perplexity\n\n| data | protocol | ctx | windows | original | quantized | Δ |\n|---|---|---:|---:|---:|---:|---:|"
        );
        for c in &r.comparisons {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.4} | {:.4} | {:+.2} % |",
                file_name(&c.data),
                c.protocol,
                c.ctx,
                c.windows,
                c.ppl_original,
                c.ppl_quantized,
                c.delta_percent
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "## Evaluations\n\n| model | data | protocol | ctx | windows | PPL | tokens/s |\n|---|---|---|---:|---:|---:|---:|"
    );
    for e in &r.evals {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.4} | {:.1} |",
            e.model,
            file_name(&e.data),
            e.protocol,
            e.ctx,
            e.windows,
            e.ppl,
            e.tokens_per_second
        );
    }
    let _ = writeln!(
        md,
        "\n## Sizes\n\n| checkpoint | bytes |\n|---|---:|\n| original | {} |",
        r.original_bytes
    );
    if let Some(q) = r.quantized_bytes {
        let _ = writeln!(
            md,
            "| quantized | {q} ({:.2}× smaller) |",
            r.original_bytes as f64 / q.max(1) as f64
        );
    }
    let _ = writeln!(md, "\n## Times\n\n| step | seconds |\n|---|---:|");
    for (step, s) in &r.step_seconds {
        let _ = writeln!(md, "| {step} | {s:.1} |");
    }
    if let Some(q) = &r.quantization {
        let s = &q["quantization"]["seconds"];
        let _ = writeln!(
            md,
            "\nQuantization: capture {:.1} s, scale search {:.1} s, clip search {:.1} s, quantize and pack {:.1} s; peak RSS {:.0} MB.",
            s["capture"].as_f64().unwrap_or(0.0),
            s["scale_search"].as_f64().unwrap_or(0.0),
            s["clip_search"].as_f64().unwrap_or(0.0),
            s["quantize_pack"].as_f64().unwrap_or(0.0),
            q["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1e6
        );
    }
    let _ = writeln!(
        md,
        "\n## Settings\n\n```json\n{}\n```",
        serde_json::to_string_pretty(&r.settings).unwrap_or_default()
    );
    if !r.layer_losses.is_empty() {
        let _ = writeln!(md, "\n![per-layer loss](loss.svg)");
    }
    md
}

fn file_name(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// The per-layer loss chart: for each scale group, the loss at α = 0 (dashed) and at the
/// chosen α (solid), on a log scale.
pub fn loss_chart(r: &Report) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let values = r
            .layer_losses
            .iter()
            .flat_map(|l| l.groups.iter().flat_map(|g| [g.loss_at_zero, g.best_loss]));
        let positive: Vec<f64> = values.filter(|v| *v > 0.0 && v.is_finite()).collect();
        let lo = positive.iter().copied().fold(f64::INFINITY, f64::min).min(1.0) * 0.8;
        let hi = positive.iter().copied().fold(0.0, f64::max).max(lo * 10.0) * 1.25;
        let layers = r.layer_losses.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{}: scale-search loss per layer", r.name),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0usize..layers, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("layer")
            .y_desc("MSE of the inspected module")
            .draw()?;
        let names: Vec<String> = r
            .layer_losses
            .first()
            .map(|l| l.groups.iter().map(|g| g.group.clone()).collect())
            .unwrap_or_default();
        for (gi, name) in names.iter().enumerate() {
            let color = Palette99::pick(gi).to_rgba();
            let series = |f: fn(&GroupLoss) -> f64| {
                r.layer_losses
                    .iter()
                    .filter_map(move |l| l.groups.get(gi).map(|g| (l.layer as usize, f(g))))
                    .collect::<Vec<_>>()
            };
            chart
                .draw_series(LineSeries::new(series(|g| g.best_loss), color.stroke_width(2)))?
                .label(format!("{name}: chosen α"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart
                .draw_series(DashedLineSeries::new(
                    series(|g| g.loss_at_zero),
                    6,
                    4,
                    color.stroke_width(1),
                ))?
                .label(format!("{name}: α = 0"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(1)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Writes `report.json`, `report.md` and (when there is a search) `loss.svg`.
pub fn write(job: &Job) -> Result<Vec<PathBuf>> {
    let out = &job.out_dir;
    let report = build(job)?;
    let mut written = Vec::new();
    let json_path = out.join("report.json");
    tp_runtime::atomic::write_file(
        &json_path,
        (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
    )?;
    written.push(json_path);
    let md_path = out.join("report.md");
    tp_runtime::atomic::write_file(&md_path, markdown(&report).as_bytes())?;
    written.push(md_path);
    if !report.layer_losses.is_empty() {
        let svg_path = out.join("loss.svg");
        tp_runtime::atomic::write_file(&svg_path, loss_chart(&report)?.as_bytes())?;
        written.push(svg_path);
    }
    Ok(written)
}
