//! `awq shard`: a checkpoint written as one file per rank, each holding exactly what that
//! rank loads (its tensor-parallel slice of its stage's layers, padded as the runtime pads),
//! with a `mapping` record in `config.json`. `awq eval` on the folder takes its placement from
//! the mapping, and each rank opens only its own file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use checkpoint::presharded::{MAPPING_KEY, Mapping, rank_file};
use checkpoint::{Checkpoint, ModelConfig};
use clap::Args;
use tp_runtime::load::write_rank_file;

use crate::cli::PlacementArgs;
use crate::progress::{Progress, log};

/// Arguments of `awq shard`.
#[derive(Debug, Args)]
pub struct ShardArgs {
    /// A Hugging Face or AWQ checkpoint folder.
    pub model: PathBuf,
    /// The placement to write files for (the source is never pre-sharded, so what is not
    /// given is 1).
    #[command(flatten)]
    pub place: PlacementArgs,
    /// Output folder (must not exist or be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
}

/// Runs `awq shard`.
pub fn run(args: &ShardArgs) -> Result<()> {
    let config_path = args.model.join("config.json");
    let config = ModelConfig::from_file(&config_path)?;
    if Mapping::read(&args.model)?.is_some() {
        anyhow::bail!("{}: already pre-sharded", args.model.display());
    }
    let placement = args.place.request().resolve(&config, None)?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let world = placement.world_size();
    let mapping = Mapping {
        world_size: world,
        tp: placement.tp(),
        pp: placement.pp(),
        stage_layers: placement
            .stages
            .stages()
            .iter()
            .map(|s| [s.start, s.end])
            .collect(),
        intermediate_padding: placement.shards.intermediate_padding(),
        files: (0..world).map(rank_file).collect(),
    };
    let mut original: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("{}: cannot read", config_path.display()))?,
    )?;
    original
        .as_object_mut()
        .with_context(|| format!("{}: not a JSON object", config_path.display()))?
        .insert(MAPPING_KEY.into(), serde_json::to_value(&mapping)?);
    log(format!(
        "sharding {} into {} ranks (tp {}, pp {}, layers {:?}) -> {}",
        args.model.display(),
        world,
        placement.tp(),
        placement.pp(),
        placement.stages.counts(),
        args.out.display()
    ));
    let bar = Progress::new("ranks", world as u64);
    let sizes = checkpoint::atomic::write_dir::<_, anyhow::Error>(&args.out, args.force, |dir| {
        let mut sizes = Vec::with_capacity(world);
        for rank in placement.ranks() {
            let bytes = write_rank_file(&checkpoint, &config, &rank, &dir.join(rank_file(rank.rank)))?;
            sizes.push(bytes);
            bar.update(rank.rank as u64 + 1, format!("rank {}: {bytes} bytes", rank.rank));
        }
        checkpoint::atomic::write_file(
            &dir.join("config.json"),
            (serde_json::to_string_pretty(&original)? + "\n").as_bytes(),
        )?;
        // The tokenizer and companion files a quantized checkpoint carries, beside the ranks.
        for name in awq_pack::quantize::COPIED_FILES {
            let from = args.model.join(name);
            if from.is_file() {
                std::fs::copy(&from, dir.join(name))
                    .with_context(|| format!("{}: cannot copy", from.display()))?;
            }
        }
        Ok(sizes)
    })?;
    bar.finish();
    println!("| rank | stage | layers | file | tensor bytes |");
    println!("|---:|---:|---|---|---:|");
    for (rank, bytes) in placement.ranks().iter().zip(&sizes) {
        println!(
            "| {} | {} | {:?} | {} | {bytes} |",
            rank.rank,
            rank.stage,
            rank.layers,
            rank_file(rank.rank)
        );
    }
    Ok(())
}
