//! `awq run` and `awq validate`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use evaluation::provenance;

use anyhow::bail;

use crate::job::Job;
use crate::progress::log;
use crate::runner::{RunOptions, run_job};
use crate::zoo;

/// Arguments of `awq run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file.
    pub job: PathBuf,
    /// Start over: remove the output folder first, whatever it holds.
    #[arg(long)]
    pub force: bool,
    /// When another run holds the output folder, wait for it to finish (it then finds the
    /// steps done) instead of failing at once.
    #[arg(long)]
    pub wait: bool,
}

/// Arguments of `awq validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Job files or zoo files to check (every entry of a zoo).
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
    let outcome = run_job(
        &job,
        RunOptions {
            force: args.force,
            wait: args.wait,
        },
    )?;
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

/// Runs `awq validate`: every job file checked, stopping at the first problem, with the
/// placement each of its evaluations would get.
pub fn validate(args: &ValidateArgs) -> Result<()> {
    if args.jobs.is_empty() {
        bail!("no job files given");
    }
    let mut invalid = 0;
    for path in &args.jobs {
        if zoo::is_zoo(path) {
            let zoo = zoo::load(path)?;
            for entry in &zoo.entries {
                match &entry.job {
                    Ok(job) => {
                        println!("{} entry {}: ok", path.display(), entry.name);
                        print_placements(job);
                    }
                    Err(err) => {
                        println!("{} entry {}: {err:#}", path.display(), entry.name);
                        invalid += 1;
                    }
                }
            }
            continue;
        }
        let job = Job::load(path)?;
        println!("{}: ok", path.display());
        print_placements(&job);
    }
    if invalid > 0 {
        bail!("{invalid} zoo entries are invalid");
    }
    Ok(())
}

fn print_placements(job: &Job) {
    for (what, placement) in [
        ("original", &job.original_placement),
        ("quantized", &job.quantized_placement),
    ] {
        if let Some(decision) = &placement.decision {
            println!("placement of the {what} model:");
            super::plan::print_decision(decision);
        }
    }
}
