//! What every report records so that a number can be traced and rerun: tool version and
//! commit, machine, threads, peak memory, and fingerprints of inputs.

use std::path::Path;

use checkpoint::digest::sha256_file;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The tool that produced a report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolInfo {
    pub name: String,
    pub version: String,
    pub git_commit: String,
}

/// This build of `awq`.
pub fn tool() -> ToolInfo {
    ToolInfo {
        name: "awq".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        git_commit: env!("AWQ_GIT_COMMIT").into(),
    }
}

/// A short description of the machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub os: String,
    pub arch: String,
    pub cpu: Option<String>,
    /// The instruction-set features that choose the compute kernels (`+avx512_bf16 …`).
    #[serde(default)]
    pub cpu_features: String,
    pub logical_cpus: usize,
    pub memory_bytes: Option<u64>,
}

fn proc_field(file: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|rest| rest.trim_start_matches([':', ' ', '\t']).trim().to_string())
}

/// The machine we run on.
pub fn machine() -> Machine {
    Machine {
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        cpu: proc_field("/proc/cpuinfo", "model name"),
        cpu_features: tp_runtime::CpuFeatures::detect().to_string(),
        logical_cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_bytes: proc_field("/proc/meminfo", "MemTotal")
            .and_then(|v| v.trim_end_matches(" kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024),
    }
}

/// Peak resident set size of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_field("/proc/self/status", "VmHWM")
        .and_then(|v| v.trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Starts a new peak-RSS measurement (Linux: writing 5 to `/proc/self/clear_refs` resets
/// `VmHWM`), so that one step of a job reports its own peak rather than the process's.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peaks of this process's resident memory, split by kind, as sampled by [`RssSampler`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RssPeaks {
    /// File-backed pages (memory-mapped weights, the binary).
    pub mapped_bytes: u64,
    /// Anonymous pages: everything the process allocated.
    pub other_bytes: u64,
    /// The largest sum of the two seen at one sample.
    pub total_bytes: u64,
}

/// Samples `RssFile` and `RssAnon` of `/proc/self/status` every 20 ms on a thread of its own
/// (Linux keeps only the total's peak), until [`finish`](Self::finish).
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<RssPeaks>,
}

impl RssSampler {
    /// Starts sampling.
    pub fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peaks = RssPeaks::default();
            loop {
                let kb = |key| {
                    proc_field("/proc/self/status", key)
                        .and_then(|v| v.trim_end_matches(" kB").trim().parse::<u64>().ok())
                        .map_or(0, |kb| kb * 1024)
                };
                let (mapped, other) = (kb("RssFile"), kb("RssAnon"));
                peaks.mapped_bytes = peaks.mapped_bytes.max(mapped);
                peaks.other_bytes = peaks.other_bytes.max(other);
                peaks.total_bytes = peaks.total_bytes.max(mapped + other);
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return peaks;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        RssSampler { stop, thread }
    }

    /// Stops sampling and returns the peaks.
    pub fn finish(self) -> RssPeaks {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// A file's identity in a report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Size and SHA-256 of one file.
pub fn digest(path: &Path) -> Result<FileDigest> {
    let bytes = std::fs::metadata(path).map_err(|e| Error::file(path, e))?.len();
    Ok(FileDigest {
        path: path.display().to_string(),
        bytes,
        sha256: sha256_file(path)?,
    })
}

/// Digests of every regular file directly inside `dir`, sorted by name.
pub fn digest_dir(dir: &Path) -> Result<Vec<FileDigest>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths.iter().map(|p| digest(p)).collect()
}

/// Sets the size of rayon's global pool, which every parallel loop and product of this
/// process uses; it can be set once per process.
pub fn set_threads(threads: Option<usize>) -> Result<usize> {
    let n = threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if n == 0 {
        return Err(Error::Invalid("--threads must be at least 1".into()));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::Invalid(format!("starting the thread pool of {n} threads: {e}")))?;
    Ok(n)
}
