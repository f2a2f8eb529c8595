//! `awq batch`: a zoo file's entries as jobs, each in its own folder and its own process
//! (its own threads, memory and peak-RSS measurement), optionally sharded across machines,
//! surviving the failure of any one of them.
//!
//! ```toml
//! [defaults]            # any job tables; defaults.output.dir is the zoo's root folder
//! [defaults.quant]
//! group_size = 64
//!
//! [[entry]]
//! name = "smollm2-g32"  # required, unique; the entry's folder is <root>/<name>
//! job = "other.toml"    # optional: a job file to start from (its paths stay its own)
//! [entry.quant]         # optional overrides of any table
//! group_size = 32
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use evaluation::provenance;
use evaluation::report::JobReport;
use serde::Serialize;
use toml::{Table, Value};

use crate::job::{Document, Job, JobError, JobFile, locate, parse_shard, resolve_path, suggest};
use crate::progress::log;
use crate::runner::run_job;

/// Arguments of `awq batch`.
#[derive(Debug, Args)]
pub struct BatchArgs {
    /// The zoo file.
    pub zoo: PathBuf,
    /// Run only entries K, K+N, K+2N, … (0-based), e.g. `--shard 1/4`.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    pub shard: Option<(usize, usize)>,
    /// Go on with the other entries when one fails (invalid or failed at run time).
    #[arg(long)]
    pub keep_going: bool,
    /// Print the entries this shard would run, with their folders, and stop.
    #[arg(long)]
    pub list: bool,
    /// Write the summary as JSON here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// Remove each entry's output folder first.
    #[arg(long)]
    pub force: bool,
    /// Worker threads of every entry (default: each entry's runtime.threads, else all
    /// logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run only the entry of this name, in this process (what `awq batch` starts for each
    /// entry; also how to rerun one entry by hand).
    #[arg(long, value_name = "NAME")]
    pub entry: Option<String>,
}

/// One entry of a zoo, validated or not.
pub struct Entry {
    pub index: usize,
    pub name: String,
    pub job: Result<Job>,
}

/// Merges `over` into `base`: tables recursively, everything else replaced.
fn merge(base: &mut Table, over: &Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Makes a referenced job file's relative paths absolute (against its own folder).
fn absolutize(table: &mut Table, base: &Path) {
    let fix = |v: &mut Value| {
        if let Value::String(s) = v
            && let Ok(p) = resolve_path(s, base)
        {
            *s = p.display().to_string();
        }
    };
    for (section, key) in [("model", "source"), ("calibration", "data"), ("output", "dir")] {
        if let Some(Value::Table(t)) = table.get_mut(section)
            && let Some(v) = t.get_mut(key)
        {
            fix(v);
        }
    }
    if let Some(Value::Array(evals)) = table.get_mut("eval") {
        for e in evals {
            if let Value::Table(t) = e
                && let Some(v) = t.get_mut("data")
            {
                fix(v);
            }
        }
    }
}

fn located(doc: &Document, path: &str, message: String) -> anyhow::Error {
    anyhow!(doc.error_at(path, message))
}

/// Reads a zoo file into entries (each either a validated job or its error).
pub fn load(path: &Path) -> Result<Vec<Entry>> {
    let doc = Document::read(path)?;
    let root: Table = toml::from_str(&doc.text).map_err(|e| anyhow!(doc.parse_error(&e)))?;
    for key in root.keys() {
        if key != "defaults" && key != "entry" {
            let message = suggest(&format!("unknown field `{key}`, expected `defaults` or `entry`"));
            return Err(located(&doc, key, message));
        }
    }
    let defaults = match root.get("defaults") {
        None => Table::new(),
        Some(Value::Table(t)) => t.clone(),
        Some(_) => return Err(located(&doc, "defaults", "defaults: expected a table".into())),
    };
    let zoo_root = defaults
        .get("output")
        .and_then(|o| o.get("dir"))
        .and_then(Value::as_str)
        .unwrap_or("out")
        .to_string();
    let Some(Value::Array(items)) = root.get("entry") else {
        return Err(located(&doc, "entry", "the zoo has no [[entry]]".into()));
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let mut names = std::collections::BTreeSet::new();
    let mut entries = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = |key: &str| format!("entry[{i}].{key}");
        let Value::Table(over) = item else {
            return Err(located(&doc, &format!("entry[{i}]"), "expected a table".into()));
        };
        let name = over
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                located(
                    &doc,
                    &format!("entry[{i}]"),
                    "entry: `name` (a string) is required".into(),
                )
            })?
            .to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(located(
                &doc,
                &at("name"),
                format!("name: `{name}` must be letters, digits, '-', '_' or '.'"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(located(
                &doc,
                &at("name"),
                format!("name: `{name}` appears twice"),
            ));
        }
        let job = build_entry(&doc, base, &defaults, over, i, &name, &zoo_root);
        entries.push(Entry { index: i, name, job });
    }
    Ok(entries)
}

fn build_entry(
    doc: &Document,
    base: &Path,
    defaults: &Table,
    over: &Table,
    i: usize,
    name: &str,
    zoo_root: &str,
) -> Result<Job> {
    let mut merged = defaults.clone();
    let mut own_output = over.get("output").and_then(|o| o.get("dir")).is_some();
    if let Some(job_path) = over.get("job").and_then(Value::as_str) {
        let job_path =
            resolve_path(job_path, base).map_err(|m| located(doc, &format!("entry[{i}].job"), m))?;
        let job_doc = Document::read(&job_path)?;
        let mut table: Table = toml::from_str(&job_doc.text).map_err(|e| anyhow!(job_doc.parse_error(&e)))?;
        absolutize(&mut table, job_path.parent().unwrap_or(Path::new(".")));
        own_output |= table.get("output").and_then(|o| o.get("dir")).is_some();
        merge(&mut merged, &table);
    }
    let mut entry = over.clone();
    entry.remove("name");
    entry.remove("job");
    merge(&mut merged, &entry);
    if !own_output {
        let mut output = Table::new();
        output.insert("dir".into(), Value::String(format!("{zoo_root}/{name}")));
        merged.insert("output".into(), Value::Table(output));
    }
    let file: JobFile = Value::Table(merged).try_into().map_err(|e: toml::de::Error| {
        // Values come from several places; find the offending key in the entry, else in
        // the defaults.
        let message = suggest(e.message());
        let key = message.split('`').nth(1).unwrap_or_default().to_string();
        let prefix = format!("entry[{i}].");
        let span = doc
            .spans
            .keys_named(&key)
            .find(|(p, _)| p.starts_with(&prefix))
            .or_else(|| {
                doc.spans
                    .keys_named(&key)
                    .find(|(p, _)| p.starts_with("defaults."))
            })
            .map(|(_, s)| s.clone());
        anyhow!(JobError {
            file: doc.path.clone(),
            location: span.map(|s| locate(&doc.text, s.start)),
            message: format!("entry `{name}`: {message}"),
        })
    })?;
    Job::from_file(file, doc, &format!("entry[{i}]."))
}

/// One row of the summary.
#[derive(Debug, Serialize)]
pub struct SummaryRow {
    pub name: String,
    pub status: String,
    pub ppl_original: Option<f64>,
    pub ppl_quantized: Option<f64>,
    pub delta_percent: Option<f64>,
    pub seconds: f64,
    pub quantized_bytes: Option<u64>,
    pub error: Option<String>,
}

fn summary_row(name: &str, job: &Job, seconds: f64, result: &Result<()>) -> SummaryRow {
    // A failed entry may have left no report, or one of an earlier run: only a success's
    // report is read, and then it must parse.
    let report: Option<Result<JobReport>> = result
        .is_ok()
        .then(|| evaluation::report::read(&job.report()).map_err(Into::into));
    let (report, error) = match (report, result) {
        (Some(Ok(r)), _) => (Some(r), None),
        (Some(Err(e)), _) => (None, Some(format!("{e:#}"))),
        (None, Err(e)) => (None, Some(format!("{e:#}"))),
        (None, Ok(())) => (None, None),
    };
    let comparison = report.as_ref().and_then(|r| r.comparisons.first());
    SummaryRow {
        name: name.to_string(),
        status: if error.is_none() { "ok" } else { "failed" }.into(),
        ppl_original: comparison.map(|c| c.ppl_original),
        ppl_quantized: comparison.map(|c| c.ppl_quantized),
        delta_percent: comparison.map(|c| c.delta_percent),
        seconds,
        quantized_bytes: report.as_ref().and_then(|r| r.quantized_bytes),
        error,
    }
}

/// Runs one entry in a process of its own: `awq batch ZOO --entry NAME`.
fn run_in_child(args: &BatchArgs, name: &str) -> Result<()> {
    let exe = std::env::current_exe().context("finding the awq executable")?;
    let mut command = Command::new(exe);
    command.arg("batch").arg(&args.zoo).args(["--entry", name]);
    if args.force {
        command.arg("--force");
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
fn run_entry(args: &BatchArgs, name: &str) -> Result<()> {
    let entry = load(&args.zoo)?
        .into_iter()
        .find(|e| e.name == name)
        .ok_or_else(|| anyhow!("{}: no entry named `{name}`", args.zoo.display()))?;
    let job = entry.job?;
    let threads = provenance::set_threads(args.threads.or(job.runtime.threads))?;
    log(format!(
        "entry {name}: running into {} ({threads} threads)",
        job.out_dir.display()
    ));
    run_job(&job, args.force)?;
    Ok(())
}

fn table(rows: &[SummaryRow]) -> String {
    let mut t = String::from(
        "| model | status | PPL original → quantized | Δ | time | size |\n|---|---|---|---:|---:|---:|\n",
    );
    for r in rows {
        let ppl = match (r.ppl_original, r.ppl_quantized) {
            (Some(o), Some(q)) => format!("{o:.4} → {q:.4}"),
            _ => "–".into(),
        };
        let delta = r.delta_percent.map_or("–".into(), |d| format!("{d:+.2} %"));
        let size = r
            .quantized_bytes
            .map_or("–".into(), |b| format!("{:.1} MB", b as f64 / 1e6));
        let _ = writeln!(
            t,
            "| {} | {} | {ppl} | {delta} | {:.1} s | {size} |",
            r.name, r.status, r.seconds
        );
    }
    t
}

/// Runs `awq batch`.
pub fn run(args: &BatchArgs) -> Result<()> {
    if let Some(name) = &args.entry {
        return run_entry(args, name);
    }
    let (k, n) = args.shard.unwrap_or((0, 1));
    let entries: Vec<Entry> = load(&args.zoo)?
        .into_iter()
        .filter(|e| e.index % n == k)
        .collect();
    if args.list {
        for e in &entries {
            match &e.job {
                Ok(job) => println!("{}\t{}\t{}", e.index, e.name, job.out_dir.display()),
                Err(err) => println!("{}\t{}\tinvalid: {err:#}", e.index, e.name),
            }
        }
        return Ok(());
    }
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
        "batch {}: {} entries in shard {k}/{n}",
        args.zoo.display(),
        entries.len()
    ));
    let mut rows = Vec::new();
    for e in &entries {
        let start = Instant::now();
        let (row, failed) = match &e.job {
            Err(err) => {
                log(format!("entry {}: invalid: {err:#}", e.name));
                (
                    SummaryRow {
                        name: e.name.clone(),
                        status: "invalid".into(),
                        ppl_original: None,
                        ppl_quantized: None,
                        delta_percent: None,
                        seconds: 0.0,
                        quantized_bytes: None,
                        error: Some(format!("{err:#}")),
                    },
                    true,
                )
            }
            Ok(job) => {
                let result = run_in_child(args, &e.name);
                if let Err(err) = &result {
                    log(format!("entry {}: failed: {err:#}", e.name));
                }
                let row = summary_row(&e.name, job, start.elapsed().as_secs_f64(), &result);
                let failed = row.status != "ok";
                (row, failed)
            }
        };
        rows.push(row);
        if failed && !args.keep_going {
            break;
        }
    }
    print!("{}", table(&rows));
    if let Some(path) = &args.json {
        evaluation::report::write(path, &rows)?;
    }
    let failed = rows.iter().filter(|r| r.status != "ok").count();
    if failed > 0 {
        bail!("{failed} of {} entries failed", entries.len());
    }
    Ok(())
}
