//! Zoo files: a table of `[defaults]` and `[[entry]]`s, each entry a job in its own folder.
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
//!
//! - [`split`]: which entries a shard runs (round-robin, or balanced by estimated cost), and
//!   the shard from a scheduler's environment;
//! - [`summary`]: the rows a batch reports, the summary file each shard writes, and the merge
//!   of all shards' summaries into one zoo report.

pub mod split;
pub mod summary;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use toml::{Table, Value};

use crate::job::{Document, Job, JobError, JobFile, locate, resolve_path, suggest};

/// A loaded zoo: its root folder, and its entries in file order.
pub struct Zoo {
    pub file: PathBuf,
    /// `defaults.output.dir` (the entries' folders are under it), resolved.
    pub root: PathBuf,
    /// SHA-256 of the zoo file's bytes: shards of one zoo agree on it.
    pub sha256: String,
    pub entries: Vec<Entry>,
}

/// Whether a TOML file is a zoo (it has `[defaults]` or `[[entry]]`) rather than a job.
pub fn is_zoo(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<Table>(&text).ok())
        .is_some_and(|t| t.contains_key("entry") || t.contains_key("defaults"))
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
pub fn load(path: &Path) -> Result<Zoo> {
    load_into(path, None)
}

/// [`load`], with the zoo's root folder `out` (relative to the working directory) instead
/// of `defaults.output.dir`: where a scheduler wants the outputs (scratch space, a mounted
/// volume). Entries with an `output.dir` of their own keep it.
pub fn load_into(path: &Path, out: Option<&Path>) -> Result<Zoo> {
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
    let zoo_root = match out {
        Some(out) => std::path::absolute(out)
            .with_context(|| format!("--out {}", out.display()))?
            .display()
            .to_string(),
        None => defaults
            .get("output")
            .and_then(|o| o.get("dir"))
            .and_then(Value::as_str)
            .unwrap_or("out")
            .to_string(),
    };
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
    Ok(Zoo {
        file: path.to_path_buf(),
        root: resolve_path(&zoo_root, base).map_err(|m| located(&doc, "defaults.output.dir", m))?,
        sha256: checkpoint::digest::sha256_bytes(doc.text.as_bytes()),
        entries,
    })
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
