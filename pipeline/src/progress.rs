//! Progress display: an indicatif bar on a terminal, timestamped log lines otherwise (CI).

use std::io::IsTerminal;
use std::time::SystemTime;

use indicatif::{ProgressBar, ProgressStyle};

/// Prints a log line with a UTC timestamp to stderr.
pub fn log(message: impl AsRef<str>) {
    eprintln!(
        "[{}] {}",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        message.as_ref()
    );
}

/// Whether stderr is an interactive terminal.
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}

/// Progress over a known number of steps, with a free-form status after the count.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    log_every: u64,
}

impl Progress {
    /// `total` steps of `label` (e.g. "windows").
    pub fn new(label: &str, total: u64) -> Self {
        let bar = interactive().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
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
        }
    }

    /// Marks step `done` (1-based) complete with a status message.
    pub fn update(&self, done: u64, message: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(message);
            }
            None if done.is_multiple_of(self.log_every) || done == self.total || done == 1 => {
                log(format!("{} {done}/{} {message}", self.label, self.total));
            }
            None => {}
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
