//! `awq import-gguf`: a GGUF file to a Hugging Face checkpoint folder.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use checkpoint::gguf::{OutputDtype, import_gguf};
use clap::{Args, ValueEnum};

use crate::progress::log;

/// Element type of the imported safetensors.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

/// Arguments of `awq import-gguf`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The .gguf file.
    pub gguf: PathBuf,
    /// Output folder (created; must not exist or be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Element type of the written tensors; f32 keeps dequantized values exactly.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// The largest weights file; a larger checkpoint is written as Hugging Face shards with
    /// model.safetensors.index.json.
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = crate::cli::parse_bytes)]
    pub max_shard_size: u64,
}

/// Runs the import.
pub fn run(args: &ImportArgs) -> Result<()> {
    let dtype = match args.dtype {
        DtypeArg::F32 => OutputDtype::F32,
        DtypeArg::F16 => OutputDtype::F16,
        DtypeArg::Bf16 => OutputDtype::BF16,
    };
    let start = Instant::now();
    log(format!(
        "importing {} -> {}",
        args.gguf.display(),
        args.out.display()
    ));
    let summary = import_gguf(&args.gguf, &args.out, dtype, args.force, args.max_shard_size)?;
    let c = &summary.config;
    println!(
        "imported {} tensors ({:.1} MB {}) of a {} with {} layers, hidden {}, vocab {} into {} in {:.1}s",
        summary.tensors,
        summary.safetensors_bytes as f64 / 1e6,
        dtype.torch_name(),
        c.architecture.hf_name(),
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
