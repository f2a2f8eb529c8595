//! A model quantized in parts: each run quantizes a contiguous range of layers into a part
//! folder, and [`merge_parts`] joins the parts into the checkpoint a single run would have
//! written, byte for byte.
//!
//! This works because a layer's search reads only the inputs of the *unquantized* model
//! (AutoAWQ's rule, which the calibration stream follows): a part that starts at layer `a`
//! runs layers `0..a` forward without searching them, and finds exactly the inputs a whole
//! run would have found. A 70B conversion that takes days on one CPU runner becomes parts
//! that fit a CI job's time limit, run one after another or side by side.
//!
//! A part folder holds the range's tensors (sharded like a checkpoint), the tokenizer files
//! and [`PART_MANIFEST`]: the range, the settings, the calibration's identity, the digests of
//! the source model's files, the `config.json` the checkpoint will have and the part's
//! report. It is not a loadable checkpoint (it has no `config.json`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use awq_calib::{CalibFormat, CalibSummary, Sampling};
use checkpoint::writer::{CheckpointStream, TensorSpec};
use checkpoint::{Checkpoint, ModelConfig, atomic};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tp_runtime::Compute;

use super::{COPIED_FILES, Method, QuantizeReport, RunSeconds, tensor_specs};
use crate::search::Scaling;
use crate::{GroupSize, PackError, Result};

/// The manifest of a part folder.
pub const PART_MANIFEST: &str = "awq-part.json";

/// What [`PART_MANIFEST`] files say they are, and the version this code writes and reads.
const FORMAT: &str = "awq-pipeline part";
const VERSION: u32 = 1;

/// A non-empty, contiguous range of decoder layers, `start..end` (end exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RangeFields")]
pub struct LayerRange {
    start: usize,
    end: usize,
}

#[derive(Deserialize)]
struct RangeFields {
    start: usize,
    end: usize,
}

impl TryFrom<RangeFields> for LayerRange {
    type Error = String;

    fn try_from(r: RangeFields) -> std::result::Result<Self, String> {
        LayerRange::new(r.start, r.end)
    }
}

impl LayerRange {
    /// `start..end`; an error unless `start < end`.
    pub fn new(start: usize, end: usize) -> std::result::Result<Self, String> {
        if start >= end {
            return Err(format!(
                "layer range {start}..{end} is empty (expected START..END with START < END, end exclusive)"
            ));
        }
        Ok(LayerRange { start, end })
    }

    /// The first layer.
    pub fn start(self) -> usize {
        self.start
    }

    /// One past the last layer.
    pub fn end(self) -> usize {
        self.end
    }

    /// The range, checked against a model of `layers` decoder layers.
    pub fn within(self, layers: usize) -> Result<Range<usize>> {
        if self.end > layers {
            return Err(PackError::Invalid(format!(
                "layer range {self} ends past the model's {layers} layers (num_hidden_layers)"
            )));
        }
        Ok(self.start..self.end)
    }
}

impl fmt::Display for LayerRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for LayerRange {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let expected = || format!("`{s}`: expected START..END, e.g. 0..16 (end exclusive)");
        let (start, end) = s.split_once("..").ok_or_else(expected)?;
        let start = start.trim().parse().map_err(|_| expected())?;
        let end = end.trim().parse().map_err(|_| expected())?;
        LayerRange::new(start, end)
    }
}

/// The calibration a part searched on, without the file's path (parts may run on machines
/// that keep the same text in different places).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibIdentity {
    pub format: CalibFormat,
    pub sampling: Sampling,
    pub samples: usize,
    pub seq_len: usize,
    pub seed: u64,
    /// SHA-256 of the calibration file.
    pub sha256: String,
    /// Tokens in the blocks.
    pub tokens: usize,
}

impl CalibIdentity {
    fn of(summary: &CalibSummary) -> Self {
        CalibIdentity {
            format: summary.spec.format,
            sampling: summary.spec.sampling,
            samples: summary.spec.samples,
            seq_len: summary.spec.seq_len,
            seed: summary.spec.seed,
            sha256: summary.sha256.clone(),
            tokens: summary.tokens,
        }
    }
}

/// Everything that must agree between the parts of one checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartSettings {
    pub method: Method,
    pub group_size: GroupSize,
    pub scaling: Scaling,
    pub clip: bool,
    pub modules_to_not_convert: Vec<String>,
    /// The arithmetic of the search: parts searched in different arithmetic would not make
    /// the checkpoint a single run makes.
    pub compute: Compute,
    pub calibration: Option<CalibIdentity>,
    /// Decoder layers of the whole model.
    pub num_hidden_layers: usize,
}

impl PartSettings {
    /// The settings a run's `report` records, for a model of `layers` layers.
    pub fn of(report: &QuantizeReport, layers: usize) -> Self {
        PartSettings {
            method: report.method,
            group_size: report.group_size,
            scaling: report.scaling,
            clip: report.clip,
            modules_to_not_convert: report.modules_to_not_convert.clone(),
            compute: report.compute,
            calibration: report.calibration.as_ref().map(CalibIdentity::of),
            num_hidden_layers: layers,
        }
    }
}

/// One file of the source model and its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Name inside the model folder.
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Digests of what a quantization reads from `model_dir`: `config.json`, the weights files
/// (and their index), and the tokenizer files the checkpoint copies. Parts of different
/// models (two fine-tunes of one base share every shape) are told apart by these.
pub fn source_digest(model_dir: &Path, checkpoint: &Checkpoint) -> Result<Vec<SourceFile>> {
    let mut paths: Vec<PathBuf> = checkpoint.files().map(Path::to_path_buf).collect();
    for name in ["config.json", checkpoint::mapped::INDEX_FILE]
        .into_iter()
        .chain(COPIED_FILES)
    {
        let path = model_dir.join(name);
        if path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    paths.dedup();
    paths
        .par_iter()
        .map(|path| {
            let bytes = std::fs::metadata(path).map_err(|e| PackError::io(path, e))?.len();
            Ok(SourceFile {
                name: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes,
                sha256: checkpoint::digest::sha256_file(path)?,
            })
        })
        .collect()
}

/// The manifest of one part folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartManifest {
    /// Always "awq-pipeline part".
    pub format: String,
    pub version: u32,
    /// The layers this part holds.
    pub layers: LayerRange,
    pub settings: PartSettings,
    /// The source model's files.
    pub source: Vec<SourceFile>,
    /// The merged checkpoint's `config.json`, as a single run writes it.
    pub config_json: String,
    /// This part's run.
    pub report: QuantizeReport,
}

impl PartManifest {
    /// A manifest for a part just written.
    pub fn new(
        layers: LayerRange,
        settings: PartSettings,
        source: Vec<SourceFile>,
        config_json: String,
        report: QuantizeReport,
    ) -> Self {
        PartManifest {
            format: FORMAT.into(),
            version: VERSION,
            layers,
            settings,
            source,
            config_json,
            report,
        }
    }

    /// Writes the manifest into the (temporary) part folder `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(PART_MANIFEST);
        let text = serde_json::to_string_pretty(self).expect("manifests serialize") + "\n";
        std::fs::write(&path, text).map_err(|e| PackError::io(&path, e))
    }

    /// Reads the manifest of the part folder `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(PART_MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            part_error(
                dir,
                format!(
                    "cannot read {PART_MANIFEST} ({e}): not a part folder written by `awq quantize --part`"
                ),
            )
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| part_error(&path, format!("not JSON: {e}")))?;
        let format = value.get("format").and_then(|f| f.as_str());
        let version = value.get("version").and_then(|v| v.as_u64());
        if format != Some(FORMAT) || version != Some(VERSION as u64) {
            return Err(part_error(
                &path,
                format!(
                    "format {format:?} version {version:?}; this tool reads \"{FORMAT}\" version {VERSION} (requantize the part with this version)"
                ),
            ));
        }
        serde_json::from_value(value).map_err(|e| part_error(&path, format!("{e}")))
    }
}

fn part_error(path: &Path, message: String) -> PackError {
    PackError::Part {
        path: path.to_owned(),
        message,
    }
}

/// The keys of two JSON objects whose values differ, as `key: here vs there`.
fn differences(a: &impl Serialize, b: &impl Serialize) -> Vec<String> {
    let (a, b) = (
        serde_json::to_value(a).expect("serializes"),
        serde_json::to_value(b).expect("serializes"),
    );
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}: {v} vs {}", b.get(k).unwrap_or(&serde_json::Value::Null)))
            .collect(),
        _ if a != b => vec![format!("{a} vs {b}")],
        _ => Vec::new(),
    }
}

/// Joins the part folders `parts` (any order) into the checkpoint folder `out_dir`, sharded at
/// `max_shard_bytes`: the same files, byte for byte, as one run of the same settings over
/// every layer. The parts must come from the same model (file digests), settings and
/// calibration, and cover every layer exactly once. Written under a temporary name and
/// renamed when complete.
pub fn merge_parts(
    parts: &[PathBuf],
    out_dir: &Path,
    max_shard_bytes: u64,
    replace: bool,
) -> Result<QuantizeReport> {
    let start = Instant::now();
    if parts.is_empty() {
        return Err(PackError::Invalid("no part folders to merge".into()));
    }
    let mut manifests: Vec<(PathBuf, PartManifest)> = parts
        .iter()
        .map(|dir| Ok((dir.clone(), PartManifest::read(dir)?)))
        .collect::<Result<_>>()?;
    manifests.sort_by_key(|(_, m)| m.layers.start);

    let (first_dir, first) = &manifests[0];
    for (dir, m) in &manifests[1..] {
        let mut differ = differences(&m.settings, &first.settings);
        if m.source != first.source {
            differ.push(format!(
                "source model files differ from {}'s (another model or another version of it)",
                first_dir.display()
            ));
        }
        if m.config_json != first.config_json {
            differ.push("config.json differs".into());
        }
        if !differ.is_empty() {
            return Err(part_error(
                dir,
                format!(
                    "not a part of the same quantization as {} (here vs there: {})",
                    first_dir.display(),
                    differ.join("; ")
                ),
            ));
        }
    }
    let layers = first.settings.num_hidden_layers;
    let mut covered = 0;
    for (i, (dir, m)) in manifests.iter().enumerate() {
        let r = m.layers;
        if r.start > covered {
            return Err(PackError::Invalid(format!(
                "layers {covered}..{} are in none of the parts (quantize them with --part {covered}..{})",
                r.start, r.start
            )));
        }
        if r.start < covered {
            return Err(part_error(
                dir,
                format!(
                    "layers {r} overlap layers {}..{covered} of {}",
                    r.start,
                    manifests[i - 1].0.display()
                ),
            ));
        }
        r.within(layers).map_err(|e| part_error(dir, e.to_string()))?;
        covered = r.end;
    }
    if covered != layers {
        return Err(PackError::Invalid(format!(
            "layers {covered}..{layers} are in none of the parts (quantize them with --part {covered}..{layers})"
        )));
    }

    let config_value: serde_json::Value = serde_json::from_str(&first.config_json)
        .map_err(|e| part_error(&first_dir.join(PART_MANIFEST), format!("config_json: {e}")))?;
    let config = ModelConfig::from_json(&config_value, &first_dir.join(PART_MANIFEST))?;
    let q = config.quantization.clone().ok_or_else(|| {
        part_error(
            &first_dir.join(PART_MANIFEST),
            "config_json has no quantization_config".into(),
        )
    })?;

    // Each part must hold exactly the tensors of its range.
    let mut owner: HashMap<String, usize> = HashMap::new();
    let mut opened = Vec::with_capacity(manifests.len());
    for (i, (dir, m)) in manifests.iter().enumerate() {
        let ck = Checkpoint::open(dir)?;
        let expected = tensor_specs(&config, &q, m.layers.start..m.layers.end);
        for spec in &expected {
            if !ck.contains(&spec.name) {
                return Err(part_error(
                    dir,
                    format!("tensor `{}` of layers {} is missing", spec.name, m.layers),
                ));
            }
            owner.insert(spec.name.clone(), i);
        }
        let expected: HashSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
        if let Some(extra) = ck.names().into_iter().find(|n| !expected.contains(n)) {
            return Err(part_error(
                dir,
                format!("holds tensor `{extra}`, which is not part of layers {}", m.layers),
            ));
        }
        opened.push(ck);
    }

    let specs = tensor_specs(&config, &q, 0..layers);
    let safetensors_bytes = specs.iter().map(TensorSpec::bytes).sum();
    atomic::write_dir::<_, PackError>(out_dir, replace, |dir| {
        let metadata = crate::quantize::file_metadata();
        let mut out = CheckpointStream::create(dir, specs.clone(), max_shard_bytes, metadata)?;
        for spec in &specs {
            let ck = &opened[owner[&spec.name]];
            let t = ck.tensor(&spec.name)?;
            if t.dtype() != spec.dtype || t.shape() != spec.shape.as_slice() {
                return Err(part_error(
                    ck.dir(),
                    format!(
                        "tensor `{}` is {:?} {:?}; the checkpoint needs {:?} {:?}",
                        spec.name,
                        t.dtype(),
                        t.shape(),
                        spec.dtype,
                        spec.shape
                    ),
                ));
            }
            out.write(&spec.name, t.bytes())?;
            t.release_pages();
        }
        out.finish()?;
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, &first.config_json).map_err(|e| PackError::io(&config_path, e))?;
        for name in COPIED_FILES {
            let from = first_dir.join(name);
            if from.is_file() {
                std::fs::copy(&from, dir.join(name)).map_err(|e| PackError::io(&from, e))?;
            }
        }
        Ok(())
    })?;

    let mut seconds = RunSeconds::default();
    for (_, m) in &manifests {
        let s = &m.report.seconds;
        seconds.calibration_data += s.calibration_data;
        seconds.capture += s.capture;
        seconds.scale_search += s.scale_search;
        seconds.clip_search += s.clip_search;
        seconds.quantize_pack += s.quantize_pack;
        seconds.write += s.write;
        seconds.total += s.total;
    }
    let merge = start.elapsed().as_secs_f64();
    seconds.write += merge;
    seconds.total += merge;
    Ok(QuantizeReport {
        layers: manifests
            .iter()
            .flat_map(|(_, m)| m.report.layers.iter().cloned())
            .collect(),
        seconds,
        safetensors_bytes,
        part: None,
        ..first.report.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges_parse_and_check() {
        let r: LayerRange = "2..5".parse().unwrap();
        assert_eq!((r.start(), r.end()), (2, 5));
        assert_eq!(r.to_string(), "2..5");
        assert_eq!(r.within(5).unwrap(), 2..5);
        let past = r.within(4).unwrap_err().to_string();
        assert!(past.contains("2..5") && past.contains("4 layers"), "{past}");
        for bad in ["3..3", "4..2", "2-5", "..5", "a..b", ""] {
            assert!(bad.parse::<LayerRange>().is_err(), "{bad}");
        }
        let empty = "3..3".parse::<LayerRange>().unwrap_err();
        assert!(empty.contains("empty"), "{empty}");
        // The manifest cannot smuggle in an empty range either.
        assert!(serde_json::from_str::<LayerRange>(r#"{"start": 4, "end": 4}"#).is_err());
        assert_eq!(
            serde_json::from_str::<LayerRange>(r#"{"start": 0, "end": 4}"#).unwrap(),
            LayerRange::new(0, 4).unwrap()
        );
    }

    #[test]
    fn differences_name_the_keys() {
        #[derive(Serialize)]
        struct S {
            a: u32,
            b: &'static str,
        }
        let d = differences(&S { a: 1, b: "x" }, &S { a: 2, b: "x" });
        assert_eq!(d, vec!["a: 1 vs 2".to_string()]);
        assert!(differences(&S { a: 1, b: "x" }, &S { a: 1, b: "x" }).is_empty());
    }
}
