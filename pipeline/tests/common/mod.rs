//! What the command-line tests share: running `awq`, and a folder with a synthetic model,
//! calibration and evaluation text.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::SyntheticLlama;

pub mod help;

pub fn awq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_awq"))
        .args(args)
        .output()
        .unwrap()
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A folder with a synthetic model, calibration and evaluation text.
pub struct Workspace {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

impl Workspace {
    pub fn new(layers: usize) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        SyntheticLlama {
            hidden: 256,
            intermediate: 1024,
            layers,
            heads: 4,
            kv_heads: 2,
            vocab: 512,
            seed: 9,
        }
        .write(&root.join("model"));
        std::fs::write(root.join("calib.txt"), testkit::synthetic_text(300)).unwrap();
        std::fs::write(root.join("eval.txt"), testkit::synthetic_text(120)).unwrap();
        Workspace { _tmp: tmp, root }
    }

    /// A job file quantizing the synthetic model, with `extra` appended.
    pub fn job(&self, name: &str, out: &str, extra: &str) -> PathBuf {
        let body = format!(
            r#"[model]
source = "model"
name = "{name}"

[calibration]
data = "calib.txt"
samples = 64
seq_len = 256

[quant]
method = "awq"
group_size = 64

[[eval]]
kind = "perplexity"
data = "eval.txt"
ctx = 128
windows = 4
model = "original"

[[eval]]
kind = "perplexity"
data = "eval.txt"
ctx = 128
windows = 4
model = "quantized"

[output]
dir = "{out}"
{extra}"#
        );
        let path = self.root.join(format!("{name}.toml"));
        std::fs::write(&path, body).unwrap();
        path
    }
}

pub fn digests(dir: &Path) -> Vec<(String, String)> {
    testkit::awq::folder_digest(dir)
}

/// What `awq batch ZOO --list` printed: each shard's entry names, its estimated cost, and
/// which shard is this run's.
pub struct Listing {
    pub shards: Vec<Vec<String>>,
    pub costs: Vec<f64>,
    pub this: usize,
}

impl Listing {
    pub fn parse(stdout: &str) -> Listing {
        let mut listing = Listing {
            shards: Vec::new(),
            costs: Vec::new(),
            this: usize::MAX,
        };
        for line in stdout.lines() {
            if let Some(rest) = line.strip_prefix("shard ") {
                if line.ends_with("(this one)") {
                    listing.this = listing.shards.len();
                }
                let cost = rest
                    .split("estimated cost ")
                    .nth(1)
                    .and_then(|c| c.split_whitespace().next())
                    .unwrap_or_else(|| panic!("no cost in {line:?}"));
                listing.costs.push(cost.parse().unwrap());
                listing.shards.push(Vec::new());
            } else if let Some(entry) = line.strip_prefix("  ") {
                let name = entry.split('\t').nth(1).unwrap_or_else(|| panic!("{line:?}"));
                listing
                    .shards
                    .last_mut()
                    .expect("a shard header first")
                    .push(name.to_string());
            }
        }
        assert!(
            listing.this < listing.shards.len(),
            "no shard marked (this one):\n{stdout}"
        );
        listing
    }

    /// This run's entries.
    pub fn mine(&self) -> &[String] {
        &self.shards[self.this]
    }
}

/// `awq batch ZOO --list` with `args`, parsed.
pub fn list(zoo: &Path, args: &[&str]) -> Listing {
    let o = awq(&[&["batch", s(zoo), "--list"], args].concat());
    assert!(o.status.success(), "{}", text(&o));
    Listing::parse(&String::from_utf8_lossy(&o.stdout))
}
