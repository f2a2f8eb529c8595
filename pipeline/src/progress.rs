//! Progress display: one indicatif multi-progress view on a terminal (the job's steps, then
//! layers or windows of the current step), timestamped log lines otherwise (CI logs); and
//! the evaluation and quantization runs shown that way.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::OnceLock;
use std::time::SystemTime;

use anyhow::Result;
use awq_pack::{Event, QuantizeOptions};
use evaluation::report::EvalReport;
use evaluation::{EvalEvent, EvalRequest, evaluate_checkpoint};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::quantize_run::{QuantizeRunReport, quantize_checkpoint};

/// Whether stderr is an interactive terminal.
pub fn interactive() -> bool {
    static INTERACTIVE: OnceLock<bool> = OnceLock::new();
    *INTERACTIVE.get_or_init(|| std::io::stderr().is_terminal())
}

/// The one view every bar joins.
fn view() -> &'static MultiProgress {
    static VIEW: OnceLock<MultiProgress> = OnceLock::new();
    VIEW.get_or_init(MultiProgress::new)
}

/// Prints a log line with a UTC timestamp to stderr (above the bars on a terminal).
pub fn log(message: impl AsRef<str>) {
    let line = format!(
        "[{}] {}",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        message.as_ref()
    );
    if interactive() {
        let _ = view().println(line);
    } else {
        eprintln!("{line}");
    }
}

/// Progress over a known number of steps, with a free-form status after the count.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    log_every: u64,
    logs: bool,
}

impl Progress {
    /// A bar on a terminal; about twenty log lines otherwise.
    pub fn new(label: &str, total: u64) -> Self {
        Self::build(label, total, true)
    }

    /// A bar on a terminal and nothing otherwise (for progress the caller logs itself).
    pub fn bar_only(label: &str, total: u64) -> Self {
        Self::build(label, total, false)
    }

    fn build(label: &str, total: u64, logs: bool) -> Self {
        let bar = interactive().then(|| {
            let bar = view().add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        });
        Progress {
            bar,
            label: label.to_string(),
            total,
            log_every: (total / 20).max(1),
            logs,
        }
    }

    /// Marks step `done` (1-based) complete with a status message.
    pub fn update(&self, done: u64, message: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(message);
            }
            None if self.logs && (done.is_multiple_of(self.log_every) || done == self.total || done == 1) => {
                log(format!("{} {done}/{} {message}", self.label, self.total));
            }
            None => {}
        }
    }

    /// Removes the bar from the view.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            view().remove(bar);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Evaluates a checkpoint with a bar over its windows (what `eval`, `bench eval` and the job
/// runner show).
pub fn evaluate(request: &EvalRequest) -> Result<EvalReport> {
    let mut bar: Option<Progress> = None;
    let report = evaluate_checkpoint(request, |event| match event {
        EvalEvent::Planned { tokens, plan } => {
            log(format!(
                "{}: {tokens} tokens, scoring {} of {} windows of {} ({} protocol)",
                request.data.display(),
                plan.windows,
                plan.windows_available,
                plan.ctx,
                plan.protocol
            ));
            bar = Some(Progress::new("windows", plan.windows as u64));
        }
        EvalEvent::Window { tally, .. } => {
            if let Some(bar) = &bar {
                bar.update(
                    tally.windows as u64,
                    format!("ppl {:.4} {:.0} tokens/s", tally.ppl(), tally.tokens_per_second()),
                );
            }
        }
        EvalEvent::Compared {
            windows, mean_kld, ..
        } => {
            if let Some(bar) = &bar {
                bar.update(windows as u64, format!("mean KLD {mean_kld:.6}"));
            }
        }
    })?;
    Ok(report)
}

/// Quantizes a checkpoint with a bar over its layers, logging each layer's α and times (what
/// `quantize`, `bench quantize` and the job runner show).
pub fn quantize(
    model: &Path,
    out: &Path,
    options: &QuantizeOptions,
    calib: Option<&Path>,
) -> Result<QuantizeRunReport> {
    log(format!(
        "quantizing {} -> {} ({}, group size {}, {} threads)",
        model.display(),
        out.display(),
        options.method,
        options.group_size.get(),
        rayon::current_num_threads()
    ));
    let mut bar: Option<Progress> = None;
    let report = quantize_checkpoint(model, out, options, calib, |event| match event {
        Event::Calibrated(c) => log(format!(
            "calibration: {} blocks of {} tokens from {} records ({} sampling, seed {}), {} skipped as too long",
            c.blocks,
            c.spec.seq_len,
            c.records_used,
            c.spec.sampling,
            c.spec.seed,
            c.records_skipped_too_long
        )),
        Event::Forwarded {
            layer,
            first,
            seconds,
        } => log(format!(
            "layer {layer}: run forward unquantized in {seconds:.1}s (the part starts at layer {first})"
        )),
        Event::Layer { done, total, report } => {
            let bar = bar.get_or_insert_with(|| Progress::new("layers", total as u64));
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
    Ok(report)
}
