//! `awq plan`: the tensor-parallel shard plan of a checkpoint, from its configuration and
//! tensor headers only.

use std::path::PathBuf;

use anyhow::Result;
use checkpoint::{Checkpoint, ModelConfig};
use clap::Args;
use tp_runtime::ShardPlan;
use tp_runtime::shard::rank_tensors;

/// Arguments of `awq plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// A Hugging Face or AWQ checkpoint folder.
    pub model: PathBuf,
    /// Tensor-parallel ranks.
    #[arg(long)]
    pub tp: usize,
    /// List every layer (all layers share one layout, so by default only layer 0 is shown).
    #[arg(long)]
    pub all_layers: bool,
}

/// Runs `awq plan`.
pub fn run(args: &PlanArgs) -> Result<()> {
    let config = ModelConfig::from_file(&args.model.join("config.json"))?;
    let plan = ShardPlan::new(&config, args.tp)?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let element_bytes =
        |name: &str| -> usize { checkpoint.tensor(name).map_or(4, |t| t.dtype().bitsize() / 8) };
    println!(
        "{} at tp = {}: {} heads and {} kv heads per rank{}; intermediate {} per rank ({} padding in all); vocabulary {}",
        args.model.display(),
        plan.tp,
        plan.heads_per_rank,
        plan.kv_heads_per_rank,
        if plan.kv_replicas > 1 {
            format!(" (each kv head on {} ranks)", plan.kv_replicas)
        } else {
            String::new()
        },
        plan.intermediate_per_rank,
        plan.intermediate_padding(),
        if plan.vocab_parallel {
            format!("split, {} ids per rank", plan.vocab / plan.tp)
        } else {
            "replicated".into()
        }
    );
    let layers: Vec<usize> = if args.all_layers {
        (0..config.num_hidden_layers).collect()
    } else {
        vec![0]
    };
    for shard in plan.ranks() {
        println!(
            "\nrank {}: heads {:?}, kv heads {:?}, intermediate {:?} (real {:?}), vocabulary {:?}",
            shard.rank, shard.heads, shard.kv_heads, shard.intermediate, shard.intermediate_real, shard.vocab
        );
        println!(
            "  {:<48} {:>16} {:>12} {:>8} {:>11}",
            "tensor", "shape", "bytes", "padding", "split"
        );
        let mut total = 0usize;
        for layer in 0..config.num_hidden_layers {
            for t in rank_tensors(&config, &shard, layer, layer == 0) {
                let bytes = t.shape.iter().product::<usize>() * element_bytes(&t.name);
                total += bytes;
                if layers.contains(&layer) || !t.name.starts_with("model.layers.") {
                    println!(
                        "  {:<48} {:>16} {:>12} {:>8} {:>11}",
                        t.name,
                        format!("{:?}", t.shape),
                        bytes,
                        t.padding,
                        format!("{:?}", t.split).to_lowercase()
                    );
                }
            }
        }
        if !args.all_layers && config.num_hidden_layers > 1 {
            println!(
                "  (layers 1..{} are laid out like layer 0)",
                config.num_hidden_layers - 1
            );
        }
        println!("  total: {total} bytes ({:.1} MB) as stored", total as f64 / 1e6);
    }
    Ok(())
}
