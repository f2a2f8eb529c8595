//! `awq batch`: a zoo file's entries (`crate::zoo`) as jobs, each in its own folder and its
//! own process (its own threads, memory and peak-RSS measurement), optionally one shard of
//! the zoo on each of several machines, surviving the failure of any one entry; and
//! `awq batch merge`, the one report of a zoo whose shards ran on different machines.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use evaluation::provenance;

use crate::progress::log;
use crate::runner::{RunOptions, run_job};
use crate::zoo::split::{Balance, SHARD_VARIABLES, Shard, ShardArg, assign, cost, from_env, parse_shard_arg};
use crate::zoo::summary::{ShardSummary, SummaryRow, chart, find_summaries, markdown, merge, table};
use crate::zoo::{self, Zoo};

/// Arguments of `awq batch`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BatchArgs {
    #[command(subcommand)]
    pub command: Option<BatchCommand>,
    #[command(flatten)]
    pub run: BatchRunArgs,
}

/// `awq batch` subcommands.
#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Merge the summaries that the shards of one zoo wrote (searched for under each DIR,
    /// e.g. downloaded CI artifacts) into one report; fails, listing them, when an entry is
    /// missing, failed or ran twice.
    Merge(MergeArgs),
}

/// Arguments of `awq batch ZOO`.
#[derive(Debug, Args)]
pub struct BatchRunArgs {
    /// The zoo file.
    #[arg(required = true)]
    pub zoo: Option<PathBuf>,
    /// Run one shard: `K/N` (0-based), or `auto` to take it from the scheduler's environment
    /// (AWQ_SHARD=K/N; Slurm job arrays; Kubernetes Indexed Jobs with AWQ_SHARD_COUNT).
    #[arg(long, value_name = "K/N|auto", value_parser = parse_shard_arg)]
    pub shard: Option<ShardArg>,
    /// How entries are spread over shards: round-robin (needs only the zoo file), or size
    /// (longest first by estimated cost, from each model's configuration).
    #[arg(long, value_enum, default_value = "round-robin")]
    pub balance: Balance,
    /// Go on with the other entries when one fails (invalid or failed at run time).
    #[arg(long)]
    pub keep_going: bool,
    /// Print each shard's entries (this shard's, with their folders and estimated costs),
    /// and stop.
    #[arg(long)]
    pub list: bool,
    /// Write the summary as JSON here too (it is always written into the zoo's folder).
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// The zoo's output folder, instead of its `defaults.output.dir` (each entry writes into
    /// DIR/<name>, the shard's summary into DIR).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Remove each entry's output folder first.
    #[arg(long)]
    pub force: bool,
    /// When another run holds an entry's folder, wait for it instead of failing.
    #[arg(long)]
    pub wait: bool,
    /// Worker threads of every entry (default: each entry's runtime.threads, else all
    /// logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run only the entry of this name, in this process (what `awq batch` starts for each
    /// entry; also how to rerun one entry by hand).
    #[arg(long, value_name = "NAME")]
    pub entry: Option<String>,
}

/// Arguments of `awq batch merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Folders holding the shards' `batch-summary-*.json` (searched recursively).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Write the merged report as JSON here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// Write the merged report as Markdown here (and its chart beside it, as .svg).
    #[arg(long, value_name = "OUT")]
    pub md: Option<PathBuf>,
}

/// Runs one entry in a process of its own: `awq batch ZOO --entry NAME`.
fn run_in_child(args: &BatchRunArgs, zoo: &Zoo, name: &str) -> Result<()> {
    let exe = std::env::current_exe().context("finding the awq executable")?;
    let mut command = Command::new(exe);
    command
        .arg("batch")
        .arg(&zoo.file)
        .args(["--entry", name])
        .arg("--out")
        .arg(&zoo.root);
    if args.force {
        command.arg("--force");
    }
    if args.wait {
        command.arg("--wait");
    }
    if let Some(t) = args.threads {
        command.args(["--threads", &t.to_string()]);
    }
    let status = command.status().context("starting the entry's process")?;
    match status.success() {
        true => Ok(()),
        false => bail!("its process ended with {status} (its error is printed above)"),
    }
}

/// Runs the one entry `name` in this process, with its own thread count.
fn run_entry(args: &BatchRunArgs, zoo: Zoo, name: &str) -> Result<()> {
    let entry = zoo
        .entries
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| anyhow!("{}: no entry named `{name}`", zoo.file.display()))?;
    let job = entry.job?;
    let threads = provenance::set_threads(args.threads.or(job.runtime.threads))?;
    log(format!(
        "entry {name}: running into {} ({threads} threads)",
        job.out_dir.display()
    ));
    run_job(
        &job,
        RunOptions {
            force: args.force,
            wait: args.wait,
        },
    )?;
    Ok(())
}

/// The shard this run is, from `--shard` or the environment.
fn shard(args: &BatchRunArgs) -> Result<Shard> {
    Ok(match &args.shard {
        None => Shard::ALL,
        Some(ShardArg::Given(shard)) => *shard,
        Some(ShardArg::Auto) => from_env(|v| std::env::var(v).ok()).map_err(|e| anyhow!(e))?,
    })
}

/// Each entry's shard under `balance`, and its estimated cost (known for valid entries).
fn assignment(zoo: &Zoo, count: usize, balance: Balance) -> Result<(Vec<usize>, Vec<Option<f64>>)> {
    let costs: Vec<Option<f64>> = zoo
        .entries
        .iter()
        .map(|e| e.job.as_ref().ok().map(cost))
        .collect();
    let shards = assign(&costs, count, balance).map_err(|i| {
        let entry = &zoo.entries[i];
        let why = entry.job.as_ref().err().map_or(String::new(), |e| format!("{e:#}"));
        anyhow!(
            "--balance size: the cost of entry `{}` cannot be estimated ({why}); every machine must see every \
             entry's model to agree on the split, or use --balance round-robin",
            entry.name
        )
    })?;
    Ok((shards, costs))
}

/// Runs `awq batch`.
pub fn run(args: &BatchArgs) -> Result<()> {
    if let Some(BatchCommand::Merge(merge_args)) = &args.command {
        return run_merge(merge_args);
    }
    let args = &args.run;
    let zoo_file = args
        .zoo
        .as_ref()
        .expect("clap requires the zoo without a subcommand");
    let zoo = zoo::load_into(zoo_file, args.out.as_deref())?;
    if let Some(name) = &args.entry {
        return run_entry(args, zoo, name);
    }
    let shard = shard(args).with_context(|| format!("looked for {SHARD_VARIABLES}"))?;
    let (shards, costs) = assignment(&zoo, shard.count, args.balance)?;
    if args.list {
        for s in 0..shard.count {
            let total: f64 = (0..zoo.entries.len())
                .filter(|&i| shards[i] == s)
                .filter_map(|i| costs[i])
                .sum();
            println!(
                "shard {s}/{}: estimated cost {:.3e} parameter·tokens{}",
                shard.count,
                total,
                if s == shard.index { " (this one)" } else { "" }
            );
            for (e, _) in zoo.entries.iter().zip(&shards).filter(|(_, k)| **k == s) {
                let cost = costs[e.index].map_or("–".into(), |c| format!("{c:.3e}"));
                match &e.job {
                    Ok(job) => println!("  {}\t{}\t{cost}\t{}", e.index, e.name, job.out_dir.display()),
                    Err(err) => println!("  {}\t{}\t{cost}\tinvalid: {err:#}", e.index, e.name),
                }
            }
        }
        return Ok(());
    }
    let entries: Vec<&zoo::Entry> = zoo
        .entries
        .iter()
        .filter(|e| shards[e.index] == shard.index)
        .collect();
    if !args.keep_going
        && let Some(bad) = entries.iter().find(|e| e.job.is_err())
    {
        let err = bad.job.as_ref().expect_err("found an error");
        bail!(
            "entry `{}` is invalid (nothing was run; --keep-going runs the others): {err:#}",
            bad.name
        );
    }
    log(format!(
        "batch {}: {} entries in shard {}/{} ({:?} balance)",
        zoo.file.display(),
        entries.len(),
        shard.index,
        shard.count,
        args.balance
    ));
    let mut rows = Vec::new();
    for e in &entries {
        let start = Instant::now();
        let row = match &e.job {
            Err(err) => {
                log(format!("entry {}: invalid: {err:#}", e.name));
                SummaryRow::failed(&e.name, "invalid", format!("{err:#}"))
            }
            Ok(job) => {
                let result = run_in_child(args, &zoo, &e.name);
                if let Err(err) = &result {
                    log(format!("entry {}: failed: {err:#}", e.name));
                }
                SummaryRow::of(&e.name, job, start.elapsed().as_secs_f64(), &result)
            }
        };
        let failed = row.status != "ok";
        rows.push(row);
        if failed && !args.keep_going {
            break;
        }
    }
    print!("{}", table(&rows));
    let summary = ShardSummary::new(&zoo, shard, args.balance, rows);
    std::fs::create_dir_all(&zoo.root).with_context(|| format!("creating {}", zoo.root.display()))?;
    let path = ShardSummary::path(&zoo.root, shard);
    evaluation::report::write(&path, &summary)?;
    log(format!("summary written to {}", path.display()));
    if let Some(path) = &args.json {
        evaluation::report::write(path, &summary)?;
    }
    let failed = summary.rows.iter().filter(|r| r.status != "ok").count();
    if failed > 0 {
        bail!("{failed} of {} entries failed", entries.len());
    }
    Ok(())
}

/// Runs `awq batch merge`.
fn run_merge(args: &MergeArgs) -> Result<()> {
    let files = find_summaries(&args.dirs)?;
    let report = merge(&files)?;
    let md = markdown(&report);
    print!("{md}");
    if let Some(path) = &args.json {
        evaluation::report::write(path, &report)?;
    }
    if let Some(path) = &args.md {
        checkpoint::atomic::write_file(path, md.as_bytes())?;
        chart(&report.rows, &path.with_extension("svg"))?;
    }
    if !report.complete() {
        bail!(
            "the zoo is incomplete: {} missing ({}), {} failed ({}), {} duplicated ({})",
            report.missing.len(),
            report.missing.join(", "),
            report.failed.len(),
            report.failed.join(", "),
            report.duplicated.len(),
            report.duplicated.join(", ")
        );
    }
    Ok(())
}
