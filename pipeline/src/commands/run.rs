//! `awq run` and `awq validate`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use evaluation::provenance;

use crate::job::{Job, validate_all};
use crate::progress::log;
use crate::runner::run_job;

/// Arguments of `awq run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file.
    pub job: PathBuf,
    /// Start over: remove the output folder first, whatever it holds.
    #[arg(long)]
    pub force: bool,
}

/// Arguments of `awq validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Job files to check.
    #[arg(required = true)]
    pub jobs: Vec<PathBuf>,
}

/// Runs `awq run`.
pub fn run(args: &RunArgs) -> Result<()> {
    let job = Job::load(&args.job)?;
    let threads = provenance::set_threads(job.runtime.threads)?;
    log(format!(
        "job {} ({}): output in {} ({threads} threads)",
        job.name,
        args.job.display(),
        job.out_dir.display()
    ));
    let outcome = run_job(&job, args.force)?;
    println!(
        "{}: {} steps run, {} up to date, {:.1}s; report in {}",
        job.name,
        outcome.ran.len(),
        outcome.skipped.len(),
        outcome.seconds,
        job.out_dir.join("report.md").display()
    );
    Ok(())
}

/// Runs `awq validate`.
pub fn validate(args: &ValidateArgs) -> Result<()> {
    validate_all(&args.jobs)
}
