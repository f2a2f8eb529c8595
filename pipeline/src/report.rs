//! A job's reports: `report.json` (stable schema, `schema_version`), `report.md` (the human
//! summary) and `loss.svg` (per-layer quantization loss before and after the scale search).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use evaluation::provenance;
use evaluation::report::{Comparison, EvalReport, EvalRow, GroupLoss, LayerLoss, SCHEMA_VERSION};
use plotters::prelude::*;

use crate::job::{Job, Source};
use crate::manifest::Manifest;
use crate::quantize_run::QuantizeRunReport;

/// A job's `report.json`, its quantization section typed.
pub type JobReport = evaluation::report::JobReport<QuantizeRunReport>;

/// Bytes of the safetensors files in a checkpoint folder (0 when it cannot be read).
pub(crate) fn weights_bytes(dir: &Path) -> u64 {
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

/// Assembles the report from the step outputs in the job's folder, read as the typed reports
/// they are.
pub fn build(job: &Job) -> Result<JobReport> {
    let mut evals = Vec::new();
    for i in 0..job.evals.len() {
        let r: EvalReport = evaluation::report::read(&job.eval_report(i))?;
        evals.push(EvalRow {
            model: job.evals[i].model.to_string(),
            data: r.data.file.path,
            data_sha256: r.data.file.sha256,
            protocol: r.protocol,
            ctx: r.ctx,
            windows: r.windows,
            ppl: r.ppl,
            mean_nll: r.mean_nll,
            predictions: r.predictions,
            tokens_per_second: r.tokens_per_second,
            kind: r.kind.clone(),
            mean_kld: r.kl.as_ref().map(|k| k.stats.kld.mean),
            same_top: r.kl.as_ref().map(|k| k.stats.same_top.mean),
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
                protocol: o.protocol,
                ctx: o.ctx,
                windows: o.windows,
                ppl_original: o.ppl,
                ppl_quantized: q.ppl,
                delta_percent: 100.0 * (q.ppl - o.ppl) / o.ppl,
            });
        }
    }
    let quantization: Option<QuantizeRunReport> = match job.quant {
        Some(_) => Some(evaluation::report::read(&job.quantize_report())?),
        None => None,
    };
    let layer_losses = quantization
        .iter()
        .flat_map(|q| &q.quantization.layers)
        .map(|l| LayerLoss {
            layer: l.layer,
            groups: l
                .scale_groups
                .iter()
                .map(|g| GroupLoss {
                    group: g.group.clone(),
                    alpha: g.choice.alpha,
                    loss_at_zero: g.choice.loss_at_zero,
                    best_loss: g.choice.best_loss,
                })
                .collect(),
        })
        .collect();
    let step_seconds = Manifest::read(&job.out_dir)?
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
    Ok(JobReport {
        schema_version: SCHEMA_VERSION,
        job: job.file.display().to_string(),
        name: job.name.clone(),
        canonical_sha256: job.canonical_hash.clone(),
        tool: provenance::tool(),
        machine: provenance::machine(),
        source: match &job.source {
            Source::Gguf(p) | Source::HfDir(p) => p.display().to_string(),
        },
        original_bytes: weights_bytes(&job.original_dir()),
        quantized_bytes: job.quant.as_ref().map(|_| weights_bytes(&job.quantized_dir())),
        settings,
        evals,
        comparisons,
        quantization,
        layer_losses,
        step_seconds,
    })
}

/// The Markdown summary.
pub fn markdown(r: &JobReport) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", r.name);
    let _ = writeln!(
        md,
        "Job `{}` (canonical SHA-256 `{}`), awq {} ({}).\n",
        r.job,
        r.canonical_sha256.get(..16).unwrap_or(&r.canonical_sha256),
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
        "## Evaluations\n\n| model | data | protocol | ctx | windows | PPL | mean KLD | same top | tokens/s |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for e in &r.evals {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.4} | {} | {} | {:.1} |",
            e.model,
            file_name(&e.data),
            e.protocol,
            e.ctx,
            e.windows,
            e.ppl,
            e.mean_kld.map_or("—".into(), |k| format!("{k:.6}")),
            e.same_top.map_or("—".into(), |p| format!("{:.2} %", 100.0 * p)),
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
        let s = &q.quantization.seconds;
        let _ = writeln!(
            md,
            "\nQuantization: capture {:.1} s, scale search {:.1} s, clip search {:.1} s, quantize and pack {:.1} s; peak RSS {:.0} MB.",
            s.capture,
            s.scale_search,
            s.clip_search,
            s.quantize_pack,
            q.peak_rss_bytes.unwrap_or(0) as f64 / 1e6
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
pub fn loss_chart(r: &JobReport) -> Result<String> {
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
                    .filter_map(move |l| l.groups.get(gi).map(|g| (l.layer, f(g))))
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
    let json_path = job.report();
    evaluation::report::write(&json_path, &report)?;
    written.push(json_path);
    let md_path = out.join("report.md");
    checkpoint::atomic::write_file(&md_path, markdown(&report).as_bytes())?;
    written.push(md_path);
    if !report.layer_losses.is_empty() {
        let svg_path = out.join("loss.svg");
        checkpoint::atomic::write_file(&svg_path, loss_chart(&report)?.as_bytes())?;
        written.push(svg_path);
    }
    Ok(written)
}
