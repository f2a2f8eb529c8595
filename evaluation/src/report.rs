//! The JSON reports every command writes, typed both ways: written with `Serialize`, read
//! back (by the job report, `awq batch`, tests) with `Deserialize`, so that a renamed or
//! missing field is an error naming it rather than a silent zero. Reports of runs this crate
//! does not make (`awq quantize`'s, built by `pipeline` on [`provenance`](crate::provenance))
//! carry the same [`SCHEMA_VERSION`] and are read by the same [`read`].

use std::path::Path;

use checkpoint::ModelConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tp_runtime::Placement;

use generation::{Sampling, StopReason};

use crate::kl::KlStats;
use crate::perplexity::Protocol;
use crate::provenance::{FileDigest, Machine, ToolInfo};
use crate::{Error, Result};

/// Version of every report's layout, those of this crate and those other crates build on its
/// types (the quantization run's, the job's); bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 2;

/// The model's files and shape, as reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    pub dir: String,
    pub config: ModelConfig,
    pub files: Vec<FileDigest>,
}

/// The evaluated text, as reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataInfo {
    pub file: FileDigest,
    pub tokens: usize,
}

/// `awq eval`'s report: one perplexity and everything needed to reproduce it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub schema_version: u32,
    pub kind: String,
    pub tool: ToolInfo,
    pub machine: Machine,
    pub backend: String,
    /// Threads of the pool the evaluation ran on.
    pub threads: usize,
    /// Tensor-parallel ranks per stage, pipeline stages, each stage's layers, the shard plan.
    pub placement: Placement,
    /// The pipeline stage of every layer.
    pub layer_stages: Vec<usize>,
    /// Weight bytes each rank holds in its backend's memory.
    pub rank_weight_bytes: Vec<usize>,
    /// Bytes each rank read from the checkpoint, as stored.
    pub rank_loaded_bytes: Vec<u64>,
    /// Seconds each stage computed (the busiest of its ranks; split placements only).
    pub stage_seconds: Option<Vec<f64>>,
    pub model: ModelInfo,
    pub tokenizer: FileDigest,
    pub data: DataInfo,
    pub protocol: Protocol,
    pub ctx: usize,
    pub windows: usize,
    pub windows_available: usize,
    /// BOS written over each window's first token (llamacpp protocol), if any.
    pub bos: Option<u32>,
    pub ppl: f64,
    pub mean_nll: f64,
    pub predictions: usize,
    pub per_window_mean_nll: Vec<f64>,
    pub tokens_processed: usize,
    pub eval_seconds: f64,
    pub tokens_per_second: f64,
    pub load_seconds: f64,
    pub wall_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
    /// With `--kl-base`: the base model and how far this model's distributions are from its.
    #[serde(default)]
    pub kl: Option<KlSection>,
}

/// The comparison with a base model of a `kl` evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KlSection {
    pub base: ModelInfo,
    pub stats: KlStats,
}

/// `awq generate`'s report: the prompt, the tokens and text produced, and the speed of
/// prefill and decoding.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateReport {
    pub schema_version: u32,
    pub kind: String,
    pub tool: ToolInfo,
    pub machine: Machine,
    pub backend: String,
    pub threads: usize,
    pub placement: Placement,
    pub model: ModelInfo,
    /// The prompt as given, and as the model read it (after the chat template).
    pub prompt: String,
    pub chat: bool,
    pub rendered_prompt: String,
    pub prompt_ids: Vec<u32>,
    pub new_ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    pub stop_tokens: Vec<u32>,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    pub prefill_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens: usize,
    pub decode_seconds: f64,
    pub decode_tokens_per_second: f64,
    pub load_seconds: f64,
    pub peak_rss_bytes: Option<u64>,
}

/// One evaluation of a job, as its report lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalRow {
    pub model: String,
    pub data: String,
    pub data_sha256: String,
    pub protocol: Protocol,
    pub ctx: usize,
    pub windows: usize,
    pub ppl: f64,
    pub mean_nll: f64,
    pub predictions: usize,
    pub tokens_per_second: f64,
    /// "perplexity" or "kl".
    #[serde(default)]
    pub kind: String,
    /// Mean KL divergence from the original (kind "kl").
    #[serde(default)]
    pub mean_kld: Option<f64>,
    /// Share of predictions with the original's most likely token (kind "kl").
    #[serde(default)]
    pub same_top: Option<f64>,
}

/// Original against quantized on the same data and protocol.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub data: String,
    pub protocol: Protocol,
    pub ctx: usize,
    pub windows: usize,
    pub ppl_original: f64,
    pub ppl_quantized: f64,
    pub delta_percent: f64,
}

/// Per layer: each scale group's loss at α = 0 and at the chosen α.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerLoss {
    pub layer: usize,
    pub groups: Vec<GroupLoss>,
}

/// One group's losses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupLoss {
    pub group: String,
    pub alpha: f32,
    pub loss_at_zero: f64,
    pub best_loss: f64,
}

/// A job's `report.json`. `Q` is the quantization run's report, which the crate that runs
/// quantizations defines (`pipeline`); read without it, the section stays untyped JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobReport<Q = serde_json::Value> {
    pub schema_version: u32,
    pub job: String,
    pub name: String,
    pub canonical_sha256: String,
    pub tool: ToolInfo,
    pub machine: Machine,
    pub source: String,
    pub original_bytes: u64,
    pub quantized_bytes: Option<u64>,
    pub settings: serde_json::Value,
    pub evals: Vec<EvalRow>,
    pub comparisons: Vec<Comparison>,
    pub quantization: Option<Q>,
    pub layer_losses: Vec<LayerLoss>,
    pub step_seconds: Vec<(String, f64)>,
}

/// Reads a report written by this version of the tool, naming the file and the field when
/// it does not parse.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let version: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(path, e))?;
    match version.get("schema_version").and_then(serde_json::Value::as_u64) {
        Some(v) if v == SCHEMA_VERSION as u64 => {}
        found => {
            return Err(Error::file(
                path,
                format!("report schema_version {found:?}, this tool reads {SCHEMA_VERSION} (rerun the step)"),
            ));
        }
    }
    serde_json::from_value(version).map_err(|e| Error::file(path, format!("not a report of this kind: {e}")))
}

/// Writes a report as pretty JSON, atomically.
pub fn write<T: Serialize>(path: &Path, report: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(report).map_err(|e| Error::file(path, e))? + "\n";
    checkpoint::atomic::write_file(path, text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_refuse_other_versions_and_missing_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let loss = LayerLoss {
            layer: 3,
            groups: vec![GroupLoss {
                group: "g".into(),
                alpha: 0.25,
                loss_at_zero: 2.0,
                best_loss: 1.0,
            }],
        };
        #[derive(Serialize, Deserialize, Debug)]
        struct Versioned {
            schema_version: u32,
            loss: LayerLoss,
        }
        write(
            &path,
            &Versioned {
                schema_version: SCHEMA_VERSION,
                loss,
            },
        )
        .unwrap();
        let back: Versioned = read(&path).unwrap();
        assert_eq!(back.loss.groups[0].alpha, 0.25);

        std::fs::write(&path, r#"{"schema_version": 1, "loss": {}}"#).unwrap();
        let err = read::<Versioned>(&path).unwrap_err().to_string();
        assert!(
            err.contains("r.json") && err.contains("schema_version Some(1)"),
            "{err}"
        );

        let renamed =
            format!(r#"{{"schema_version": {SCHEMA_VERSION}, "loss": {{"layer": 1, "group": []}}}}"#);
        std::fs::write(&path, renamed).unwrap();
        let err = read::<Versioned>(&path).unwrap_err().to_string();
        assert!(
            err.contains("r.json") && err.contains("missing field `groups`"),
            "{err}"
        );
    }
}
