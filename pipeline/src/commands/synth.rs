//! `awq synth`: a synthetic checkpoint at a real model's shapes (`checkpoint::synth`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use checkpoint::Dtype;
use checkpoint::synth::{SynthOptions, synthesize};
use clap::{Args, ValueEnum};

use crate::cli::parse_bytes;
use crate::progress::log;

/// Element type of the synthetic weights.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SynthDtype {
    Bf16,
    F16,
    F32,
}

/// Arguments of `awq synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// A model's config.json (or a folder holding one), e.g. fixtures/configs/llama-2-7b.json.
    pub config: PathBuf,
    /// Output folder (created; must not exist or be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Element type of every tensor.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: SynthDtype,
    /// Keep only the first N layers (the real widths, a fraction of the depth).
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
    /// The weights are a function of this seed, each tensor's name and each element's index.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The largest weights file; a larger checkpoint is written as shards with an index.
    #[arg(long, value_name = "SIZE", default_value = "5GB", value_parser = parse_bytes)]
    pub max_shard_size: u64,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
}

/// Runs `awq synth`.
pub fn run(args: &SynthArgs) -> Result<()> {
    let options = SynthOptions {
        dtype: match args.dtype {
            SynthDtype::Bf16 => Dtype::BF16,
            SynthDtype::F16 => Dtype::F16,
            SynthDtype::F32 => Dtype::F32,
        },
        layers: args.layers,
        seed: args.seed,
        max_shard_bytes: args.max_shard_size,
    };
    let start = Instant::now();
    log(format!(
        "synthesizing {} -> {}",
        args.config.display(),
        args.out.display()
    ));
    let summary = synthesize(&args.config, &args.out, &options, args.force)?;
    let c = &summary.config;
    println!(
        "wrote {} tensors ({:.2} GB {:?}, {} file{}) of a {} with {} layers, hidden {}, intermediate {}, vocab {} into {} in {:.1}s",
        summary.tensors,
        summary.bytes as f64 / 1e9,
        options.dtype,
        summary.files,
        if summary.files == 1 { "" } else { "s" },
        c.architecture.hf_name(),
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
