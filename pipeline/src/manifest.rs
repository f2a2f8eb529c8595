//! `manifest.json`: what a job's output folder holds, and how it was made. Each completed
//! step records a fingerprint of its settings and inputs and the SHA-256 of its outputs; a
//! step whose fingerprint and outputs still match is not run again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use evaluation::provenance::{self, FileDigest, Machine};

/// File name of the manifest inside an output folder.
pub const MANIFEST: &str = "manifest.json";

/// The job an output folder belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub file: String,
    pub name: String,
    /// SHA-256 of the job's canonical form.
    pub canonical_sha256: String,
}

/// One completed step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// SHA-256 of the step's settings and of its inputs' digests.
    pub fingerprint: String,
    pub inputs: Vec<FileDigest>,
    /// Paths relative to the output folder.
    pub outputs: Vec<FileDigest>,
    pub seconds: f64,
    pub finished_at: String,
}

/// The manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub job: JobRecord,
    pub tool_version: String,
    pub git_commit: String,
    pub machine: Machine,
    /// Calibration seed, when the job quantizes with AWQ.
    pub seed: Option<u64>,
    pub steps: BTreeMap<String, StepRecord>,
}

impl Manifest {
    /// A fresh manifest for `job`.
    pub fn new(job: JobRecord, seed: Option<u64>) -> Self {
        let tool = provenance::tool();
        Manifest {
            schema_version: evaluation::report::SCHEMA_VERSION,
            job,
            tool_version: tool.version,
            git_commit: tool.git_commit,
            machine: provenance::machine(),
            seed,
            steps: BTreeMap::new(),
        }
    }

    /// Reads `dir/manifest.json`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        if !path.exists() {
            return Ok(None);
        }
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let manifest =
            serde_json::from_str(&text).with_context(|| format!("{}: not a manifest", path.display()))?;
        Ok(Some(manifest))
    }

    /// Writes `dir/manifest.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        checkpoint::atomic::write_file(&dir.join(MANIFEST), text.as_bytes())?;
        Ok(())
    }
}

/// Digests of files, computed once per process per (path, size, modification time).
#[derive(Default)]
pub struct DigestCache {
    known: HashMap<(PathBuf, u64, std::time::SystemTime), FileDigest>,
}

impl DigestCache {
    /// The digest of one file.
    pub fn file(&mut self, path: &Path) -> Result<FileDigest> {
        let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let key = (path.to_owned(), meta.len(), meta.modified()?);
        if let Some(d) = self.known.get(&key) {
            return Ok(d.clone());
        }
        let d = provenance::digest(path)?;
        self.known.insert(key, d.clone());
        Ok(d)
    }

    /// Digests of every file directly in `dir`, sorted by name.
    pub fn dir(&mut self, dir: &Path) -> Result<Vec<FileDigest>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        paths.iter().map(|p| self.file(p)).collect()
    }
}

/// `digests` with paths made relative to `base`.
pub fn relative(digests: Vec<FileDigest>, base: &Path) -> Vec<FileDigest> {
    digests
        .into_iter()
        .map(|d| FileDigest {
            path: Path::new(&d.path)
                .strip_prefix(base)
                .map(|p| p.display().to_string())
                .unwrap_or(d.path),
            ..d
        })
        .collect()
}

/// Whether every recorded output still exists under `base` with its recorded digest.
pub fn outputs_intact(record: &StepRecord, base: &Path, cache: &mut DigestCache) -> bool {
    record.outputs.iter().all(|d| {
        let path = base.join(&d.path);
        path.is_file()
            && cache
                .file(&path)
                .is_ok_and(|now| now.sha256 == d.sha256 && now.bytes == d.bytes)
    })
}
