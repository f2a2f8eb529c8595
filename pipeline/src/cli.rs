//! Arguments that several subcommands share (`eval` and `bench eval`; `quantize` and
//! `bench quantize`), and how they become the libraries' requests.

use std::path::PathBuf;

use anyhow::Result;
use awq_calib::{CalibFormat, CalibSpec, Sampling};
use awq_pack::{GroupSize, LayerRange, Method, QuantizeOptions, Scaling};
use clap::{Args, ValueEnum};
use evaluation::perplexity::Protocol;
use evaluation::{Device, EvalRequest};
use tp_runtime::{ComputeRequest, PlacementRequest};

use crate::quantize_run::QuantizeRunReport;

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// The CPU backend (rayon threads).
    Cpu,
    /// The CUDA backend (our kernels, cuBLAS, NCCL between GPUs).
    Cuda,
}

impl From<BackendArg> for Device {
    fn from(b: BackendArg) -> Device {
        match b {
            BackendArg::Cpu => Device::Cpu,
            BackendArg::Cuda => Device::Cuda,
        }
    }
}

/// Arguments of `awq eval` and `awq bench eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    pub model: PathBuf,
    /// UTF-8 text to score, tokenized whole without special tokens.
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens per window.
    #[arg(long)]
    pub ctx: usize,
    /// Score only the first K windows (default: all).
    #[arg(long, value_name = "K")]
    pub windows: Option<usize>,
    /// full: every prediction (AutoAWQ/GPTQ); llamacpp: second half, BOS first (llama-perplexity).
    #[arg(long, default_value = "full", value_parser = parse::<Protocol>)]
    pub protocol: Protocol,
    /// Write the JSON report here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// Worker threads (default: all logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Where the model runs: cpu, or cuda (GPU 0; GPUs 0..tp with --tp).
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendArg,
    #[command(flatten)]
    pub place: PlacementArgs,
    /// Also run this base model (the original) on the same windows and report how far the
    /// model's token distributions are from its: KL divergence, Δp, same top token
    /// (llama.cpp's statistics).
    #[arg(long, value_name = "ORIGINAL")]
    pub kl_base: Option<PathBuf>,
    /// CPU matrix products: f32 (exact); bf16 (bf16 operands, f32 accumulation by
    /// AVX512-BF16 vdpbf16ps); amx (the same by Intel's AMX-BF16 tiles); auto (for AWQ and
    /// 16-bit checkpoints: amx where present, bf16 on AMD Zen 4/5, else f32; f32 for f32
    /// checkpoints). In `awq bench`, auto measures every path this CPU has against f32.
    #[arg(long, default_value = "auto", value_parser = parse::<ComputeRequest>)]
    pub compute: ComputeRequest,
}

impl EvalArgs {
    /// The evaluation these arguments ask for.
    pub fn request(&self) -> EvalRequest {
        EvalRequest {
            model: self.model.clone(),
            data: self.data.clone(),
            ctx: self.ctx,
            windows: self.windows,
            protocol: self.protocol,
            batch: self.batch,
            device: self.backend.into(),
            placement: self.place.request(),
            kl_base: self.kl_base.clone(),
            compute: self.compute,
        }
    }
}

/// Arguments of `awq quantize` and `awq bench quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Hugging Face checkpoint folder to quantize.
    pub model: PathBuf,
    /// Output folder (must not exist or be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Calibration text (required for --mode awq).
    #[arg(long, required_if_eq("mode", "awq"))]
    pub calib: Option<PathBuf>,
    /// text: one record per non-empty line; jsonl: one object with a `text` field per line.
    #[arg(long, default_value = "text", value_parser = parse::<CalibFormat>)]
    pub calib_format: CalibFormat,
    /// records: AutoAWQ (whole records, concatenated); windows: LMDeploy (random windows).
    #[arg(long, default_value = "records", value_parser = parse::<Sampling>)]
    pub sampling: Sampling,
    /// Records (records sampling) or windows (windows sampling) to draw.
    #[arg(long, default_value_t = 128)]
    pub samples: usize,
    /// Tokens per calibration block.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Seed of the record shuffle or window draw.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Input weights per quantization group; must divide every quantized layer's inputs.
    #[arg(long, default_value_t = 128)]
    pub group_size: usize,
    /// awq: scale and clip search; rtn: round to nearest (the baseline).
    #[arg(long, default_value = "awq", value_parser = parse::<Method>)]
    pub mode: Method,
    /// duo: AutoAWQ's default; x-only: the paper's activation-only scales.
    #[arg(long, default_value = "duo", value_parser = parse::<Scaling>)]
    pub scaling: Scaling,
    /// Skip the clip search.
    #[arg(long)]
    pub no_clip: bool,
    /// Modules (or name fragments) to leave unquantized; repeatable.
    #[arg(long = "not-convert", value_name = "MODULE")]
    pub modules_to_not_convert: Vec<String>,
    /// Write the JSON report here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// The largest weights file; a larger checkpoint is written as Hugging Face shards
    /// (model-00001-of-0000N.safetensors) with model.safetensors.index.json.
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_bytes)]
    pub max_shard_size: u64,
    /// Worker threads (default: all logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// CPU matrix products: f32 (exact); bf16 (bf16 operands, f32 accumulation by
    /// AVX512-BF16 vdpbf16ps); amx (the same by Intel's AMX-BF16 tiles); auto (amx where
    /// present, bf16 on AMD Zen 4/5, else f32). In `awq bench`, auto measures every path this
    /// CPU has against f32.
    #[arg(long, default_value = "auto", value_parser = parse::<ComputeRequest>)]
    pub compute: ComputeRequest,
    /// Quantize only layers START..END (end exclusive) into a part folder; `awq merge` joins
    /// the parts into the checkpoint one run would write, byte for byte. Parts may run on
    /// different machines (each within a CI job's time limit) with the same model, settings
    /// and calibration text.
    #[arg(long, value_name = "START..END", value_parser = parse::<LayerRange>)]
    pub part: Option<LayerRange>,
}

impl QuantizeArgs {
    /// Sets the thread count and quantizes as these arguments say: what `awq quantize` and
    /// `awq bench quantize` share.
    pub fn execute(&self) -> Result<QuantizeRunReport> {
        evaluation::provenance::set_threads(self.threads)?;
        crate::progress::quantize(&self.model, &self.out, &self.options()?, self.calib.as_deref())
    }

    /// The library options these arguments describe (the search's arithmetic resolved
    /// against this CPU).
    pub fn options(&self) -> Result<QuantizeOptions> {
        let calib = CalibSpec {
            format: self.calib_format,
            sampling: self.sampling,
            samples: self.samples,
            seq_len: self.seq_len,
            seed: self.seed,
            ..CalibSpec::new(self.calib.clone().unwrap_or_default())
        };
        Ok(QuantizeOptions {
            method: self.mode,
            group_size: GroupSize::new(self.group_size)?,
            scaling: self.scaling,
            clip: !self.no_clip,
            calib,
            modules_to_not_convert: self.modules_to_not_convert.clone(),
            replace: self.force,
            max_shard_bytes: self.max_shard_size,
            compute: self.compute.resolve_here(true)?,
            part: self.part,
        })
    }
}

/// Where a model runs across ranks (`--tp`, `--pp`, `--layers`): the one declaration of these
/// flags, flattened into every command that takes a placement (`awq eval`, `awq generate`,
/// `awq plan`, `awq shard`). What is not given comes from a pre-sharded folder's mapping, else
/// is 1 ([`PlacementRequest::resolve`]).
#[derive(Clone, Debug, Default, Args)]
pub struct PlacementArgs {
    /// Tensor-parallel ranks per stage (CPU: in-process ranks, one thread each; CUDA: one GPU
    /// each). Default: 1, or what a pre-sharded folder was sharded for.
    #[arg(long)]
    pub tp: Option<usize>,
    /// Pipeline stages: contiguous ranges of layers, the leftover layers going to the earliest
    /// stages. Default: 1, or what a pre-sharded folder was sharded for.
    #[arg(long)]
    pub pp: Option<usize>,
    /// Layers per stage, e.g. `8,8,7,7` (sets pp).
    #[arg(long, value_delimiter = ',', value_name = "N,N,…")]
    pub layers: Option<Vec<usize>>,
}

impl PlacementArgs {
    /// Whether any of `--tp`, `--pp`, `--layers` was given.
    pub fn given(&self) -> bool {
        self.tp.is_some() || self.pp.is_some() || self.layers.is_some()
    }

    /// The placement these arguments ask for.
    pub fn request(&self) -> PlacementRequest {
        PlacementRequest {
            tp: self.tp,
            pp: self.pp,
            layers: self.layers.clone(),
        }
    }
}

/// Parses a value with its `FromStr` (the libraries' enums name their values).
pub fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> Result<T, String> {
    s.parse()
}

/// `24GiB`, `80GB`, `512MiB`, `1e9`: a number of bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{text}`: expected a size such as 24GiB or 80GB"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    if value < 0.0 {
        return Err(format!("`{text}`: a size cannot be negative"));
    }
    Ok((value * scale) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_bytes("80GB").unwrap(), 80_000_000_000);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("24 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_bytes("lots").is_err());
    }
}
