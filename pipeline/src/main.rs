//! `awq`: quantize Llama-family models to 4-bit AWQ, run them, and measure them.

mod cli;
mod commands;
mod job;
mod lock;
mod manifest;
mod progress;
mod quantize_run;
mod report;
mod runner;
mod zoo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{
    batch, bench, devices, eval, generate, import, inspect, merge, plan, quantize, run, shard, synth,
};

#[derive(Debug, Parser)]
#[command(name = "awq", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job file: import → evaluate the original → quantize → evaluate → report.
    Run(run::RunArgs),
    /// Check job files without computing anything.
    Validate(run::ValidateArgs),
    /// Run the entries of a zoo file, each as a job in its own folder.
    Batch(batch::BatchArgs),
    /// Describe a checkpoint folder and check an AWQ checkpoint's format.
    Inspect(inspect::InspectArgs),
    /// Choose tensor and pipeline parallelism for a set of devices, with each device's memory
    /// and why every other placement was not chosen (or show a given one: --tp, --pp, --layers).
    Plan(plan::PlanArgs),
    /// The GPUs of this machine: memory, compute capability, driver, NCCL, peer access.
    Devices(devices::DevicesArgs),
    /// Write a checkpoint as one file per rank (tensor and pipeline parallelism), with its
    /// mapping.
    Shard(shard::ShardArgs),
    /// Convert a GGUF file into a Hugging Face checkpoint folder.
    ImportGguf(import::ImportArgs),
    /// Write a synthetic checkpoint at a real model's shapes (deterministic weights, sharded,
    /// streamed tensor by tensor): for tests, benchmarks and dry runs before any download.
    Synth(synth::SynthArgs),
    /// Quantize a checkpoint to 4-bit AWQ ("gemm" format).
    Quantize(cli::QuantizeArgs),
    /// Join the part folders of `awq quantize --part` into one AWQ checkpoint (byte for byte
    /// what one run over every layer writes).
    Merge(merge::MergeArgs),
    /// Perplexity of a checkpoint on a text file (with --kl-base, its KL divergence from the
    /// original too).
    Eval(cli::EvalArgs),
    /// Generate text from a prompt (greedy or seeded sampling; --chat uses the chat template).
    Generate(generate::GenerateArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print the folder fetched models are cached in ($AWQ_CACHE_DIR, else
    /// $XDG_CACHE_HOME/awq-pipeline, else ~/.cache/awq-pipeline).
    CacheDir,
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`awq plan … | head`) instead of failing on the broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    cpu_kernels::retain_freed_memory();
    let result = match &cli.command {
        Command::Run(args) => run::run(args),
        Command::Validate(args) => run::validate(args),
        Command::Batch(args) => batch::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Devices(args) => devices::run(args),
        Command::Shard(args) => shard::run(args),
        Command::ImportGguf(args) => import::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(command) => bench::run(command),
        Command::CacheDir => {
            println!("{}", checkpoint::cache::cache_dir().display());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// `err` and its causes, joined by ": ", each cause left out whose text the message already
/// holds (a library error that names its cause in its own message, `path: No space left on
/// device`, and also hands it on as its source).
fn error_chain(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_is_said_once() {
        let io = std::io::Error::from_raw_os_error(28);
        let err = anyhow::Error::new(checkpoint::Error::io("/out/model.safetensors", io))
            .context("writing the checkpoint");
        assert_eq!(
            error_chain(&err),
            "writing the checkpoint: /out/model.safetensors: No space left on device (os error 28)"
        );
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&err), "outer: inner");
    }
}
