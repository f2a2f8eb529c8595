//! `awq`: quantize Llama-family models to 4-bit AWQ, run them, and measure them.

mod commands;
mod progress;
mod provenance;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{bench, eval, import};

#[derive(Debug, Parser)]
#[command(name = "awq", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert a GGUF file into a Hugging Face checkpoint folder.
    ImportGguf(import::ImportArgs),
    /// Perplexity of a checkpoint on a text file.
    Eval(eval::EvalArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::ImportGguf(args) => import::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(command) => bench::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
