//! `awq generate`: text from a checkpoint (original or AWQ) on the CPU or GPUs, split or
//! not, streamed to standard output as it is produced.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use evaluation::{GenerateRequest, generate_text, provenance};
use generation::Sampling;

use crate::cli::{BackendArg, PlacementArgs};
use crate::progress::log;

/// Arguments of `awq generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A Hugging Face or AWQ checkpoint folder (or a pre-sharded one).
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Send the prompt as a user message through the checkpoint's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message before the prompt (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// New tokens at most.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy; above, sampling at this temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sample among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the model runs.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendArg,
    #[command(flatten)]
    pub place: PlacementArgs,
    /// Worker threads (default: all logical CPUs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write the JSON report (prompt and new token ids, text, speeds) here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
}

/// Runs `awq generate`.
pub fn run(args: &GenerateArgs) -> Result<()> {
    provenance::set_threads(args.threads)?;
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(p), None) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        _ => bail!("give the prompt with --prompt TEXT or --prompt-file FILE"),
    };
    let request = GenerateRequest {
        model: args.model.clone(),
        prompt,
        chat: args.chat,
        system: args.system.clone(),
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        device: args.backend.into(),
        placement: args.place.request(),
    };
    let mut out = std::io::stdout().lock();
    let report = generate_text(&request, |piece| {
        // A closed pipe ends the output, not the run (SIGPIPE is the default in main).
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    let _ = writeln!(out);
    log(format!(
        "{} prompt tokens at {:.1} tokens/s, {} new tokens ({:?}) at {:.1} tokens/s decoding, on {}",
        report.prompt_ids.len(),
        report.prefill_tokens_per_second,
        report.new_ids.len(),
        report.stop,
        report.decode_tokens_per_second,
        report.backend
    ));
    if let Some(path) = &args.json {
        evaluation::report::write(path, &report)?;
        log(format!("report written to {}", path.display()));
    }
    Ok(())
}
