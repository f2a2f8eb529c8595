//! Calibration text → token blocks.
//!
//! Records come from a text file (one record per non-empty line, stripped) or a JSONL file
//! (one object per non-empty line, its `text` field). Two samplings, both deterministic for a
//! seed:
//! - `records` (AutoAWQ): shuffle the records, tokenize each with the tokenizer's special
//!   tokens, skip those longer than a block, keep the first `samples` records, concatenate
//!   them and cut the stream into blocks of `seq_len` (the tail is dropped);
//! - `windows` (LMDeploy): tokenize the records joined by blank lines as one stream and draw
//!   `samples` windows of `seq_len` tokens at uniformly random starts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use checkpoint::Tokenizer;
use checkpoint::digest::sha256_file;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{CalibError, Result};

/// How records are stored in the calibration file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CalibFormat {
    /// One record per non-empty line.
    Text,
    /// One JSON object per non-empty line, with a string field `text`.
    Jsonl,
}

/// How blocks are drawn from the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// AutoAWQ: `samples` whole records, concatenated and cut into blocks.
    Records,
    /// LMDeploy: `samples` random windows of one token stream.
    Windows,
}

macro_rules! name_enum {
    ($ty:ty, $($variant:ident => $name:literal),+) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(Self::$variant => $name),+ })
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($name => Ok(Self::$variant),)+
                    other => Err(format!(
                        "unknown value `{other}` (expected {})",
                        [$($name),+].join(" or ")
                    )),
                }
            }
        }
    };
}
name_enum!(CalibFormat, Text => "text", Jsonl => "jsonl");
name_enum!(Sampling, Records => "records", Windows => "windows");

/// What calibration data to build.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibSpec {
    pub path: PathBuf,
    pub format: CalibFormat,
    pub sampling: Sampling,
    /// Records (`records` sampling) or windows (`windows` sampling) to draw.
    pub samples: usize,
    /// Tokens per block.
    pub seq_len: usize,
    pub seed: u64,
}

impl CalibSpec {
    /// AutoAWQ's defaults: 128 records, blocks of 512 tokens, seed 42.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        CalibSpec {
            path: path.into(),
            format: CalibFormat::Text,
            sampling: Sampling::Records,
            samples: 128,
            seq_len: 512,
            seed: 42,
        }
    }
}

/// Everything a report needs to say about the calibration data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibSummary {
    pub spec: CalibSpec,
    pub sha256: String,
    pub records_total: usize,
    pub records_used: usize,
    pub records_skipped_too_long: usize,
    pub records_skipped_empty: usize,
    /// Tokens in the blocks.
    pub tokens: usize,
    pub blocks: usize,
    /// Tokens tokenized but not in any block (the tail, in `records` sampling).
    pub tail_tokens_dropped: usize,
}

/// Calibration blocks, each `seq_len` token ids.
#[derive(Clone, Debug)]
pub struct CalibSet {
    pub blocks: Vec<Vec<u32>>,
    pub summary: CalibSummary,
}

/// Reads the records of a calibration file.
pub fn read_records(path: &Path, format: CalibFormat) -> Result<Vec<String>> {
    let text = std::fs::read(path).map_err(|source| CalibError::Io {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8(text).map_err(|e| CalibError::Record {
        path: path.to_owned(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        message: "not UTF-8 text".into(),
    })?;
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let record = match format {
            CalibFormat::Text => line.to_owned(),
            CalibFormat::Jsonl => {
                let err = |message: String| CalibError::Record {
                    path: path.to_owned(),
                    line: i + 1,
                    message,
                };
                let value: serde_json::Value =
                    serde_json::from_str(line).map_err(|e| err(format!("invalid JSON: {e}")))?;
                value
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| err("expected an object with a string field `text`".into()))?
                    .trim()
                    .to_owned()
            }
        };
        records.push(record);
    }
    Ok(records)
}

/// Builds the calibration blocks described by `spec`.
pub fn build(spec: &CalibSpec, tokenizer: &Tokenizer) -> Result<CalibSet> {
    if spec.samples == 0 || spec.seq_len < 2 {
        return Err(CalibError::Invalid(format!(
            "calibration needs at least one sample of at least 2 tokens (samples {}, seq_len {})",
            spec.samples, spec.seq_len
        )));
    }
    let records = read_records(&spec.path, spec.format)?;
    let too_little = |message: String| CalibError::TooLittleText {
        path: spec.path.clone(),
        message,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut summary = CalibSummary {
        spec: spec.clone(),
        sha256: sha256_file(&spec.path)?,
        records_total: records.len(),
        records_used: 0,
        records_skipped_too_long: 0,
        records_skipped_empty: 0,
        tokens: 0,
        blocks: 0,
        tail_tokens_dropped: 0,
    };
    let blocks = match spec.sampling {
        Sampling::Records => {
            let mut order: Vec<usize> = (0..records.len()).collect();
            order.shuffle(&mut rng);
            let mut stream = Vec::new();
            for i in order {
                if summary.records_used == spec.samples {
                    break;
                }
                let ids = tokenizer.encode(&records[i], true)?;
                if ids.is_empty() || records[i].is_empty() {
                    summary.records_skipped_empty += 1;
                } else if ids.len() > spec.seq_len {
                    summary.records_skipped_too_long += 1;
                } else {
                    stream.extend(ids);
                    summary.records_used += 1;
                }
            }
            if summary.records_used < spec.samples {
                return Err(too_little(format!(
                    "only {} of {} records are usable ({} empty, {} longer than {} tokens); {} requested",
                    summary.records_used,
                    records.len(),
                    summary.records_skipped_empty,
                    summary.records_skipped_too_long,
                    spec.seq_len,
                    spec.samples
                )));
            }
            let blocks: Vec<Vec<u32>> = stream.chunks_exact(spec.seq_len).map(<[u32]>::to_vec).collect();
            if blocks.is_empty() {
                return Err(too_little(format!(
                    "{} records give {} tokens, less than one block of {}",
                    spec.samples,
                    stream.len(),
                    spec.seq_len
                )));
            }
            summary.tail_tokens_dropped = stream.len() % spec.seq_len;
            blocks
        }
        Sampling::Windows => {
            let joined = records.join("\n\n");
            let stream = tokenizer.encode(&joined, false)?;
            summary.records_used = records.len();
            if stream.len() < spec.seq_len {
                return Err(too_little(format!(
                    "{} tokens, fewer than one window of {}",
                    stream.len(),
                    spec.seq_len
                )));
            }
            let last_start = stream.len() - spec.seq_len;
            let blocks: Vec<Vec<u32>> = (0..spec.samples)
                .map(|_| {
                    let start = rng.random_range(0..=last_start);
                    stream[start..start + spec.seq_len].to_vec()
                })
                .collect();
            summary.tail_tokens_dropped = stream.len().saturating_sub(blocks.len() * spec.seq_len);
            blocks
        }
    };
    summary.blocks = blocks.len();
    summary.tokens = blocks.len() * spec.seq_len;
    Ok(CalibSet { blocks, summary })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's tokenizer, for real token counts.
    fn tokenizer() -> Tokenizer {
        Tokenizer::from_dir(&testkit::smollm2_f32()).unwrap()
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calib.txt");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn text_records_are_non_empty_stripped_lines() {
        let (_d, path) = write("  first line \n\n\nsecond\n   \nthird\n");
        assert_eq!(
            read_records(&path, CalibFormat::Text).unwrap(),
            vec!["first line", "second", "third"]
        );
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let (_d, path) = write("{\"text\": \"a\"}\n\n{\"txt\": \"b\"}\n");
        let err = read_records(&path, CalibFormat::Jsonl).unwrap_err().to_string();
        assert!(err.contains("calib.txt:3") && err.contains("`text`"), "{err}");
    }

    #[test]
    fn records_sampling_is_deterministic_and_skips_long_records() {
        let tok = tokenizer();
        let long = "word ".repeat(100);
        let text: String = (0..50)
            .map(|i| format!("record number {i} with some text\n{long}\n"))
            .collect();
        let (_d, path) = write(&text);
        let spec = CalibSpec {
            samples: 40,
            seq_len: 64,
            ..CalibSpec::new(&path)
        };
        let a = build(&spec, &tok).unwrap();
        let b = build(&spec, &tok).unwrap();
        assert_eq!(a.blocks, b.blocks);
        assert_eq!(a.summary.records_used, 40);
        assert!(a.summary.records_skipped_too_long > 0);
        assert!(a.blocks.iter().all(|b| b.len() == 64));
        assert_eq!(a.summary.blocks, a.blocks.len());
        assert_eq!(a.summary.tokens, a.blocks.len() * 64);
        assert!(a.summary.tail_tokens_dropped < 64);
        let other_seed = build(
            &CalibSpec {
                seed: 7,
                ..spec.clone()
            },
            &tok,
        )
        .unwrap();
        assert_ne!(a.blocks, other_seed.blocks);
    }

    #[test]
    fn too_little_text_is_a_clear_error() {
        let tok = tokenizer();
        let (_d, path) = write("one short record\nanother\n");
        let err = build(&CalibSpec::new(&path), &tok).unwrap_err().to_string();
        assert!(
            err.contains("calib.txt") && err.contains("only 2 of 2 records") && err.contains("128 requested"),
            "{err}"
        );
        let spec = CalibSpec {
            samples: 2,
            ..CalibSpec::new(&path)
        };
        let err = build(&spec, &tok).unwrap_err().to_string();
        assert!(err.contains("less than one block of 512"), "{err}");
    }

    #[test]
    fn windows_sampling_draws_full_windows() {
        let tok = tokenizer();
        let text: String = (0..200)
            .map(|i| format!("line {i} of the calibration text\n"))
            .collect();
        let (_d, path) = write(&text);
        let spec = CalibSpec {
            sampling: Sampling::Windows,
            samples: 5,
            seq_len: 32,
            ..CalibSpec::new(&path)
        };
        let set = build(&spec, &tok).unwrap();
        assert_eq!(set.blocks.len(), 5);
        assert!(set.blocks.iter().all(|b| b.len() == 32));
        assert_eq!(set.blocks, build(&spec, &tok).unwrap().blocks);
    }
}
