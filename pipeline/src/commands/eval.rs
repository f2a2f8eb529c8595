//! `awq eval`: perplexity of a checkpoint on a text file, with a reproducible JSON report.

use anyhow::Result;
use evaluation::provenance;

use crate::cli::EvalArgs;
use crate::progress::{self, log};

/// Runs `awq eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    provenance::set_threads(args.threads)?;
    let report = progress::evaluate(&args.request())?;
    println!(
        "PPL {:.4}  (mean NLL {:.6}, {} predictions, {} windows of {}, protocol {}) {:.1} tokens/s on {}",
        report.ppl,
        report.mean_nll,
        report.predictions,
        report.windows,
        report.ctx,
        report.protocol,
        report.tokens_per_second,
        report.backend
    );
    if let Some(path) = &args.json {
        evaluation::report::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}
