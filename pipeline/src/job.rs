//! Job files: the TOML schema, strict parsing with file:line:column errors and suggestions,
//! and every check that can run before any compute.
//!
//! Relative paths are resolved against the job file's folder; `${VAR}` expands environment
//! variables (`${AWQ_CACHE_DIR}` defaults to the model cache folder, `awq cache-dir`) and a
//! leading `~/` the home folder.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use awq_calib::{CalibFormat, CalibSpec, Sampling};
use awq_pack::{GroupSize, LayerRange, Method, QuantizeOptions, Scaling};
use checkpoint::ModelConfig;
use checkpoint::cache::{CACHE_DIR_VAR, cache_dir};
use checkpoint::writer::DEFAULT_MAX_SHARD_BYTES;
use evaluation::perplexity::Protocol;
use serde::{Deserialize, Serialize};
use tp_runtime::planner::{PlanDecision, PlanRequest, Strategy};
use tp_runtime::{ComputeRequest, PlacementRequest};

/// A job file as written.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub model: ModelSection,
    pub calibration: Option<CalibrationSection>,
    pub quant: Option<QuantSection>,
    #[serde(default)]
    pub runtime: RuntimeSection,
    #[serde(default)]
    pub eval: Vec<EvalSection>,
    pub output: OutputSection,
}

/// `[model]`: what to start from.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face checkpoint folder, or a `.gguf` file imported first.
    pub source: String,
    /// Name used in reports (default: the source's file name).
    pub name: Option<String>,
    /// Element type of the import of a GGUF source.
    #[serde(default)]
    pub import_dtype: ImportDtype,
}

/// Element type of an imported GGUF.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

/// `[calibration]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationSection {
    pub data: String,
    #[serde(default = "default_format")]
    pub format: CalibFormat,
    #[serde(default = "default_sampling")]
    pub sampling: Sampling,
    #[serde(default = "default_samples")]
    pub samples: usize,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_format() -> CalibFormat {
    CalibFormat::Text
}
fn default_sampling() -> Sampling {
    Sampling::Records
}
fn default_samples() -> usize {
    128
}
fn default_seq_len() -> usize {
    512
}
fn default_seed() -> u64 {
    42
}

/// `[quant]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QuantSection {
    #[serde(default = "default_method")]
    pub method: Method,
    #[serde(default = "default_bits")]
    pub bits: u32,
    #[serde(default = "default_group_size")]
    pub group_size: usize,
    #[serde(default = "yes")]
    pub zero_point: bool,
    #[serde(default = "default_scaling")]
    pub scaling: Scaling,
    #[serde(default = "yes")]
    pub clip: bool,
    #[serde(default = "default_pack_format")]
    pub format: String,
    #[serde(default)]
    pub modules_to_not_convert: Vec<String>,
    /// Only the layers `"a..b"`, into a part folder that `awq merge` joins with the other
    /// parts into the whole checkpoint (a model too slow to search in one CI job). Absent
    /// from the canonical form when unset, so that existing jobs keep their hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
}

fn default_method() -> Method {
    Method::Awq
}
fn default_bits() -> u32 {
    4
}
fn default_group_size() -> usize {
    128
}
fn yes() -> bool {
    true
}
fn default_scaling() -> Scaling {
    Scaling::Duo
}
fn default_pack_format() -> String {
    "gemm".into()
}

/// Where models run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Cpu,
    Cuda,
}

/// `[runtime]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    #[serde(default)]
    pub backend: BackendKind,
    #[serde(default = "one")]
    pub tp: usize,
    #[serde(default = "one")]
    pub pp: usize,
    pub threads: Option<usize>,
    /// Devices to place the model on; the planner chooses tp, pp and the layer split.
    pub devices: Option<usize>,
    /// Memory of each device (`24GiB`), with `devices`.
    pub device_memory: Option<String>,
    /// Which parallelism the planner may use (`auto`, `tp`, `pp`, `tp+pp`).
    pub strategy: Option<Strategy>,
    /// CPU matrix products: `f32`, `bf16` or `auto` (16 bits for the scale search, AWQ
    /// models and 16-bit checkpoints where the CPU multiplies bf16 natively). Left out of
    /// the canonical form when `auto`, so that jobs written before it keep their hash.
    #[serde(default, skip_serializing_if = "ComputeRequest::is_auto")]
    pub compute: ComputeRequest,
}

fn one() -> usize {
    1
}

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            backend: BackendKind::Cpu,
            tp: 1,
            pp: 1,
            threads: None,
            devices: None,
            device_memory: None,
            strategy: None,
            compute: ComputeRequest::Auto,
        }
    }
}

/// Which model an evaluation scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalModel {
    Original,
    Quantized,
}

impl fmt::Display for EvalModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EvalModel::Original => "original",
            EvalModel::Quantized => "quantized",
        })
    }
}

/// Kinds of evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalKind {
    Perplexity,
    /// Perplexity with the KL divergence of the quantized model's token distributions from
    /// the original's, on the same windows.
    Kl,
}

/// One `[[eval]]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    pub kind: EvalKind,
    pub data: String,
    pub ctx: usize,
    pub windows: Option<usize>,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    pub model: EvalModel,
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_protocol() -> Protocol {
    Protocol::Full
}
fn default_batch() -> usize {
    1
}

/// `[output]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub dir: String,
    /// The largest weights file of the quantized checkpoint (`"5GB"`, `"2GiB"`); larger
    /// checkpoints are written as shards with an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shard_size: Option<String>,
}

/// A location in a TOML document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// Line and column (both 1-based) of a byte offset.
pub fn locate(text: &str, offset: usize) -> Location {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.chars().count(), |i| before[i + 1..].chars().count())
        + 1;
    Location { line, column }
}

/// Spans of every key and value of a TOML document, by dotted path (`quant.group_size`,
/// `eval[1].ctx`, `entry[0].quant.group_size`).
#[derive(Clone, Debug, Default)]
pub struct SpanIndex {
    keys: BTreeMap<String, Range<usize>>,
    values: BTreeMap<String, Range<usize>>,
}

impl SpanIndex {
    /// Indexes a document (which must parse).
    pub fn new(text: &str) -> Self {
        let mut index = SpanIndex::default();
        if let Ok(table) = toml::de::DeTable::parse(text) {
            index.walk_table("", table.get_ref());
        }
        index
    }

    fn walk_table(&mut self, prefix: &str, table: &toml::de::DeTable<'_>) {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            self.keys.insert(path.clone(), key.span());
            self.values.insert(path.clone(), value.span());
            self.walk_value(&path, value.get_ref());
        }
    }

    fn walk_value(&mut self, path: &str, value: &toml::de::DeValue<'_>) {
        match value {
            toml::de::DeValue::Table(t) => self.walk_table(path, t),
            toml::de::DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    self.values.insert(p.clone(), item.span());
                    self.walk_value(&p, item.get_ref());
                }
            }
            _ => {}
        }
    }

    /// The span of the value at `path`, else of its key.
    pub fn value(&self, path: &str) -> Option<Range<usize>> {
        self.values.get(path).or_else(|| self.keys.get(path)).cloned()
    }

    /// Paths of keys named `name` (the last component), in document order of their paths.
    pub fn keys_named<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Range<usize>)> + 'a {
        self.keys
            .iter()
            .filter(move |(p, _)| p.rsplit('.').next().is_some_and(|last| last == name))
    }
}

/// An error in a job or zoo file, located.
#[derive(Debug)]
pub struct JobError {
    pub file: PathBuf,
    pub location: Option<Location>,
    pub message: String,
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.location {
            Some(l) => write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                l.line,
                l.column,
                self.message
            ),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for JobError {}

/// Adds "did you mean …?" to serde's unknown-field message when a known key is close.
pub fn suggest(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message.to_string();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let best = candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(unknown, c), *c))
        .min();
    match best {
        Some((distance, candidate)) if distance <= 2.max(unknown.len() / 3) => {
            format!("{unknown}: unknown key, did you mean {candidate}? ({message})")
        }
        _ => message.to_string(),
    }
}

/// A file's text, parsed and indexed.
pub struct Document {
    pub path: PathBuf,
    pub text: String,
    pub spans: SpanIndex,
}

impl Document {
    /// Reads a TOML file.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Ok(Document {
            path: path.to_owned(),
            spans: SpanIndex::new(&text),
            text,
        })
    }

    /// An error at the value of `path` (or the start of the file when unknown).
    pub fn error_at(&self, path: &str, message: impl Into<String>) -> JobError {
        JobError {
            file: self.path.clone(),
            location: self.spans.value(path).map(|s| locate(&self.text, s.start)),
            message: message.into(),
        }
    }

    /// A serde/TOML error, located, with a suggestion for unknown keys.
    pub fn parse_error(&self, err: &toml::de::Error) -> JobError {
        JobError {
            file: self.path.clone(),
            location: err.span().map(|s| locate(&self.text, s.start)),
            message: suggest(err.message()),
        }
    }
}

/// What a job starts from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Source {
    /// A GGUF file, imported first.
    Gguf(PathBuf),
    /// A Hugging Face checkpoint folder.
    HfDir(PathBuf),
}

/// One evaluation, resolved.
#[derive(Clone, Debug, Serialize)]
pub struct EvalSpec {
    pub kind: EvalKind,
    pub data: PathBuf,
    pub ctx: usize,
    pub windows: Option<usize>,
    pub protocol: Protocol,
    pub model: EvalModel,
    pub batch: usize,
}

/// The quantization step, resolved.
#[derive(Clone, Debug)]
pub struct QuantSpec {
    pub options: QuantizeOptions,
    pub calib_path: Option<PathBuf>,
}

/// How a job's evaluations place a model: as the planner chose (with `[runtime] devices`) or
/// as `[runtime] tp` and `pp` say.
#[derive(Clone, Debug, Default)]
pub struct ModelPlacement {
    pub request: PlacementRequest,
    /// The planner's decision, when it made one.
    pub decision: Option<PlanDecision>,
}

/// A validated job: every path resolved, every value checked against the model.
#[derive(Clone, Debug)]
pub struct Job {
    pub file: PathBuf,
    pub name: String,
    pub source: Source,
    pub import_dtype: ImportDtype,
    pub quant: Option<QuantSpec>,
    pub runtime: RuntimeSection,
    pub evals: Vec<EvalSpec>,
    pub out_dir: PathBuf,
    /// SHA-256 of the job's canonical form (resolved, key order and formatting erased).
    pub canonical_hash: String,
    /// Placement of the original model's evaluations.
    pub original_placement: ModelPlacement,
    /// Placement of the quantized model's evaluations.
    pub quantized_placement: ModelPlacement,
    /// The source model's configuration.
    pub model_config: ModelConfig,
}

/// What a job's output folder holds, by name: the one definition the runner, the report and
/// `awq batch` read.
impl Job {
    /// The imported checkpoint (GGUF sources).
    pub fn imported_dir(&self) -> PathBuf {
        self.out_dir.join("model")
    }

    /// The checkpoint the original model's evaluations and the quantization read.
    pub fn original_dir(&self) -> PathBuf {
        match &self.source {
            Source::Gguf(_) => self.imported_dir(),
            Source::HfDir(dir) => dir.clone(),
        }
    }

    /// The quantized checkpoint.
    pub fn quantized_dir(&self) -> PathBuf {
        self.out_dir.join("quantized")
    }

    /// The quantization's report.
    pub fn quantize_report(&self) -> PathBuf {
        self.out_dir.join("quantize.json")
    }

    /// The report of evaluation `i`.
    pub fn eval_report(&self, i: usize) -> PathBuf {
        self.out_dir
            .join(format!("eval-{i}-{}.json", self.evals[i].model))
    }

    /// The job report (`report.json`; `report.md` and `loss.svg` beside it).
    pub fn report(&self) -> PathBuf {
        self.out_dir.join("report.json")
    }

    /// How evaluation `i` places its model.
    pub fn eval_placement(&self, i: usize) -> &ModelPlacement {
        match self.evals[i].model {
            EvalModel::Original => &self.original_placement,
            EvalModel::Quantized => &self.quantized_placement,
        }
    }

    /// The model directory evaluation `i` reads.
    pub fn eval_model_dir(&self, i: usize) -> PathBuf {
        match self.evals[i].model {
            EvalModel::Original => self.original_dir(),
            EvalModel::Quantized => self.quantized_dir(),
        }
    }
}

/// Expands `${VAR}` and a leading `~/`, and resolves a relative path against `base`.
pub fn resolve_path(raw: &str, base: &Path) -> Result<PathBuf, String> {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{raw}`"))?
            + start;
        let var = &rest[start + 2..end];
        let value = match std::env::var(var) {
            Ok(v) => v,
            Err(_) if var == CACHE_DIR_VAR => cache_dir().display().to_string(),
            Err(_) => return Err(format!("environment variable `{var}` is not set")),
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    let path = match out.strip_prefix("~/") {
        Some(tail) => {
            PathBuf::from(std::env::var("HOME").map_err(|_| "HOME is not set".to_string())?).join(tail)
        }
        None => PathBuf::from(out),
    };
    let joined = if path.is_absolute() { path } else { base.join(path) };
    let absolute = std::path::absolute(&joined).unwrap_or(joined);
    Ok(normalize(&absolute))
}

/// Removes `.` and resolves `..` lexically (no file system access, no symlinks followed).
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Reads the configuration of a job's source (GGUF metadata or `config.json`).
fn source_config(source: &Source) -> Result<ModelConfig, String> {
    match source {
        Source::Gguf(p) => checkpoint::gguf::gguf_model_config(p).map_err(|e| e.to_string()),
        Source::HfDir(p) => ModelConfig::from_file(&p.join("config.json")).map_err(|e| e.to_string()),
    }
}

impl Job {
    /// Loads and validates a job file.
    pub fn load(path: &Path) -> Result<Job> {
        let doc = Document::read(path)?;
        let file: JobFile = toml::from_str(&doc.text).map_err(|e| anyhow!(doc.parse_error(&e)))?;
        Job::from_file(file, &doc, "")
    }

    /// Validates a parsed job. `prefix` locates its keys in `doc` (empty for a job file,
    /// `entry[i].` inside a zoo file).
    pub fn from_file(file: JobFile, doc: &Document, prefix: &str) -> Result<Job> {
        let base = doc.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let err = |key: &str, message: String| -> anyhow::Error {
            let path = format!("{prefix}{key}");
            let located = doc.error_at(&path, format!("{key}: {message}"));
            if located.location.is_none() && !prefix.is_empty() {
                // Inherited from the zoo's defaults.
                let fallback = format!("defaults.{key}");
                return anyhow!(doc.error_at(&fallback, format!("{key}: {message}")));
            }
            anyhow!(located)
        };
        let path_of = |key: &str, raw: &str| resolve_path(raw, &base).map_err(|m| err(key, m));
        let existing_file = |key: &str, raw: &str| -> Result<PathBuf> {
            let p = path_of(key, raw)?;
            if !p.is_file() {
                return Err(err(
                    key,
                    format!("{} does not exist or is not a file", p.display()),
                ));
            }
            Ok(p)
        };

        // [model]
        let source_path = path_of("model.source", &file.model.source)?;
        let source = if is_gguf(&source_path) {
            if !source_path.is_file() {
                return Err(err(
                    "model.source",
                    format!("{} does not exist", source_path.display()),
                ));
            }
            Source::Gguf(source_path.clone())
        } else {
            if !source_path.join("config.json").is_file() {
                return Err(err(
                    "model.source",
                    format!(
                        "{} is neither a .gguf file nor a folder with config.json",
                        source_path.display()
                    ),
                ));
            }
            Source::HfDir(source_path.clone())
        };
        let model_config = source_config(&source).map_err(|m| err("model.source", m))?;
        let name = file.model.name.clone().unwrap_or_else(|| {
            source_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });

        // [runtime]
        let runtime = file.runtime.clone();
        // A forced path this CPU lacks fails here, before any step runs.
        let search_compute = runtime
            .compute
            .resolve_here(true)
            .map_err(|e| err("runtime.compute", e.to_string()))?;
        if runtime.tp == 0 {
            return Err(err("runtime.tp", "must be at least 1".into()));
        }
        if runtime.pp == 0 {
            return Err(err("runtime.pp", "must be at least 1".into()));
        }
        let device_memory = match (&runtime.devices, &runtime.device_memory) {
            (Some(0), _) => return Err(err("runtime.devices", "must be at least 1".into())),
            (Some(_), None) => {
                return Err(err(
                    "runtime.devices",
                    "needs runtime.device_memory (the memory of each device, e.g. \"24GiB\")".into(),
                ));
            }
            (Some(_), Some(m)) => {
                Some(crate::cli::parse_bytes(m).map_err(|e| err("runtime.device_memory", e))?)
            }
            (None, Some(_)) => return Err(err("runtime.device_memory", "needs runtime.devices".into())),
            (None, None) => None,
        };
        if runtime.devices.is_some() && (runtime.tp != 1 || runtime.pp != 1) {
            return Err(err(
                "runtime.devices",
                "the planner chooses tp and pp for the devices: remove runtime.tp and runtime.pp, or runtime.devices".into(),
            ));
        }
        if runtime.strategy.is_some() && runtime.devices.is_none() {
            return Err(err("runtime.strategy", "needs runtime.devices".into()));
        }
        if runtime.threads == Some(0) {
            return Err(err("runtime.threads", "must be at least 1".into()));
        }

        // [quant] and [calibration]
        let quant = match &file.quant {
            None => None,
            Some(q) => {
                if model_config.quantization.is_some() {
                    return Err(err(
                        "model.source",
                        "the model is already quantized; remove [quant]".into(),
                    ));
                }
                if q.bits != 4 {
                    return Err(err("quant.bits", format!("{} is not supported (only 4)", q.bits)));
                }
                if !q.zero_point {
                    return Err(err(
                        "quant.zero_point",
                        "false is not supported (only true)".into(),
                    ));
                }
                if q.format != "gemm" {
                    return Err(err(
                        "quant.format",
                        format!("`{}` is not supported (only gemm)", q.format),
                    ));
                }
                let group_size =
                    GroupSize::new(q.group_size).map_err(|e| err("quant.group_size", e.to_string()))?;
                let (calib, calib_path) = match (&file.calibration, q.method) {
                    (Some(c), _) => {
                        let p = existing_file("calibration.data", &c.data)?;
                        if c.samples == 0 {
                            return Err(err("calibration.samples", "must be at least 1".into()));
                        }
                        if c.seq_len < 2 {
                            return Err(err("calibration.seq_len", "must be at least 2".into()));
                        }
                        let spec = CalibSpec {
                            format: c.format,
                            sampling: c.sampling,
                            samples: c.samples,
                            seq_len: c.seq_len,
                            seed: c.seed,
                            ..CalibSpec::new(&p)
                        };
                        (spec, Some(p))
                    }
                    (None, Method::Awq) => {
                        return Err(err("quant.method", "awq needs a [calibration] table".into()));
                    }
                    (None, Method::Rtn) => (CalibSpec::new(PathBuf::new()), None),
                };
                let max_shard_bytes = match &file.output.max_shard_size {
                    None => DEFAULT_MAX_SHARD_BYTES,
                    Some(size) => match crate::cli::parse_bytes(size) {
                        Ok(0) => return Err(err("output.max_shard_size", "must be above 0 bytes".into())),
                        Ok(bytes) => bytes,
                        Err(e) => return Err(err("output.max_shard_size", e)),
                    },
                };
                let part = match &q.part {
                    None => None,
                    Some(text) => {
                        let range: LayerRange = text.parse().map_err(|e: String| err("quant.part", e))?;
                        range
                            .within(model_config.num_hidden_layers)
                            .map_err(|e| err("quant.part", e.to_string()))?;
                        if let Some(i) = file.eval.iter().position(|e| e.model == EvalModel::Quantized) {
                            return Err(err(
                                &format!("eval[{i}].model"),
                                format!(
                                    "`quantized` cannot score a part of a model (quant.part = \"{range}\"): \
                                     join the parts with `awq merge` and evaluate the checkpoint it writes"
                                ),
                            ));
                        }
                        Some(range)
                    }
                };
                let options = QuantizeOptions {
                    method: q.method,
                    group_size,
                    scaling: q.scaling,
                    clip: q.clip,
                    calib,
                    modules_to_not_convert: q.modules_to_not_convert.clone(),
                    replace: true,
                    max_shard_bytes,
                    compute: search_compute,
                    part,
                };
                awq_pack::quantize::check(&model_config, &options)
                    .map_err(|e| err("quant.group_size", e.to_string()))?;
                if file.eval.iter().any(|e| e.model == EvalModel::Quantized) {
                    let quantized = awq_pack::quantize::quantized_config(&model_config, &options);
                    tp_runtime::ShardPlan::new(&quantized, runtime.tp).map_err(|e| {
                        err(
                            "runtime.tp",
                            format!(
                                "the quantized model (group size {}): {e}",
                                options.group_size.get()
                            ),
                        )
                    })?;
                }
                Some(QuantSpec { options, calib_path })
            }
        };

        // [[eval]]
        let mut evals = Vec::new();
        for (i, e) in file.eval.iter().enumerate() {
            let key = |k: &str| format!("eval[{i}].{k}");
            let data = existing_file(&key("data"), &e.data)?;
            if e.ctx < 4 {
                return Err(err(&key("ctx"), format!("{} is too short (at least 4)", e.ctx)));
            }
            if e.windows == Some(0) {
                return Err(err(&key("windows"), "must be at least 1".into()));
            }
            if e.batch == 0 {
                return Err(err(&key("batch"), "must be at least 1".into()));
            }
            if e.model == EvalModel::Quantized && quant.is_none() {
                return Err(err(&key("model"), "`quantized` needs a [quant] table".into()));
            }
            if e.kind == EvalKind::Kl && e.model != EvalModel::Quantized {
                return Err(err(
                    &key("model"),
                    "kind `kl` compares the quantized model with the original: set model = \"quantized\""
                        .into(),
                ));
            }
            evals.push(EvalSpec {
                kind: e.kind,
                data,
                ctx: e.ctx,
                windows: e.windows,
                protocol: e.protocol,
                model: e.model,
                batch: e.batch,
            });
        }

        // The placement needs only the configuration: it is checked (or planned) for the
        // original model its evaluations load, and for the quantized model the job writes.
        let (ctx, batch) = evals
            .iter()
            .map(|e| (e.ctx, e.batch))
            .fold((0, 1), |(c, b), (ec, eb)| (c.max(ec), b.max(eb)));
        let place = |config: &ModelConfig, what: &str| -> Result<ModelPlacement> {
            let located = |key: &str, e: String| {
                err(
                    key,
                    if what.is_empty() {
                        e
                    } else {
                        format!("{what}: {e}")
                    },
                )
            };
            match (runtime.devices, device_memory) {
                (Some(devices), Some(memory)) => {
                    let mut request = PlanRequest::new(config, devices, memory, ctx.max(1), batch);
                    request.strategy = runtime.strategy.unwrap_or_default();
                    let decision = tp_runtime::planner::plan(config, &request)
                        .map_err(|e| located("runtime.devices", e.to_string()))?;
                    Ok(ModelPlacement {
                        request: PlacementRequest {
                            tp: Some(decision.chosen.tp),
                            pp: Some(decision.chosen.pp),
                            layers: Some(decision.chosen.layers.clone()),
                        },
                        decision: Some(decision),
                    })
                }
                _ => {
                    let request = PlacementRequest {
                        tp: Some(runtime.tp),
                        pp: Some(runtime.pp),
                        layers: None,
                    };
                    request.resolve(config, None).map_err(|e| {
                        let key = if e.to_string().contains("pp =") {
                            "runtime.pp"
                        } else {
                            "runtime.tp"
                        };
                        located(key, e.to_string())
                    })?;
                    Ok(ModelPlacement {
                        request,
                        decision: None,
                    })
                }
            }
        };
        let original_placement = if evals.iter().any(|e| e.model == EvalModel::Original) || quant.is_none() {
            place(&model_config, "")?
        } else {
            ModelPlacement::default()
        };
        let quantized_placement = match &quant {
            Some(q) if evals.iter().any(|e| e.model == EvalModel::Quantized) => {
                let quantized = awq_pack::quantize::quantized_config(&model_config, &q.options);
                place(
                    &quantized,
                    &format!("the quantized model (group size {})", q.options.group_size.get()),
                )?
            }
            _ => ModelPlacement::default(),
        };

        // [output]
        if file.output.dir.trim().is_empty() {
            return Err(err("output.dir", "must not be empty".into()));
        }
        let out_dir = path_of("output.dir", &file.output.dir)?;

        // The canonical form: the resolved job, independent of formatting and key order.
        let mut canonical = file.clone();
        canonical.model.source = source_path.display().to_string();
        canonical.output.dir = out_dir.display().to_string();
        if let Some(c) = &mut canonical.calibration {
            c.data = resolve_path(&c.data, &base)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
        }
        for (e, spec) in canonical.eval.iter_mut().zip(&evals) {
            e.data = spec.data.display().to_string();
        }
        let canonical_hash = checkpoint::digest::sha256_bytes(serde_json::to_string(&canonical)?.as_bytes());

        Ok(Job {
            file: doc.path.clone(),
            name,
            source,
            import_dtype: file.model.import_dtype,
            quant,
            runtime,
            evals,
            out_dir,
            canonical_hash,
            original_placement,
            quantized_placement,
            model_config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based() {
        let text = "a = 1\n[quant]\ngroup_size = 4\n";
        assert_eq!(locate(text, 0), Location { line: 1, column: 1 });
        let at = text.find("group_size").unwrap();
        assert_eq!(locate(text, at), Location { line: 3, column: 1 });
        assert_eq!(locate(text, at + 13), Location { line: 3, column: 14 });
    }

    #[test]
    fn unknown_keys_get_suggestions() {
        let msg = "unknown field `group_sise`, expected one of `method`, `bits`, `group_size`, `clip`";
        assert!(
            suggest(msg).starts_with("group_sise: unknown key, did you mean group_size?"),
            "{}",
            suggest(msg)
        );
        let far = "unknown field `zzzzzz`, expected one of `method`, `bits`";
        assert_eq!(suggest(far), far);
    }

    #[test]
    fn span_index_reaches_arrays_of_tables() {
        let text = "[quant]\ngroup_size = 64\n[[eval]]\nctx = 1\n[[eval]]\nctx = 512\n";
        let index = SpanIndex::new(text);
        let span = index.value("eval[1].ctx").unwrap();
        assert_eq!(&text[span], "512");
        assert_eq!(&text[index.value("quant.group_size").unwrap()], "64");
    }

    #[test]
    fn paths_expand_variables_and_resolve_relative() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("AWQ_TEST_DIR", "/data") };
        assert_eq!(
            resolve_path("${AWQ_TEST_DIR}/x.txt", Path::new("/jobs")).unwrap(),
            PathBuf::from("/data/x.txt")
        );
        assert_eq!(
            resolve_path("in/x.txt", Path::new("/jobs")).unwrap(),
            PathBuf::from("/jobs/in/x.txt")
        );
        assert!(
            resolve_path("${AWQ_SURELY_UNSET_VAR}/x", Path::new("/"))
                .unwrap_err()
                .contains("not set")
        );
    }
}
