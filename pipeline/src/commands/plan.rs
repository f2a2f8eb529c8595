//! `awq plan`: where a model's parts go on a set of devices — the planner's choice of tensor
//! and pipeline parallelism with every device's memory and every alternative's reason, or a
//! forced placement (`--tp`, `--pp`) — from the configuration alone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use checkpoint::{ModelConfig, QuantizationConfig};
use clap::Args;
use tp_runtime::Placement;
use tp_runtime::planner::{self, DeviceMemory, PlanDecision, PlanRequest, Strategy, gib};

use crate::cli::{PlacementArgs, parse, parse_bytes};

/// Arguments of `awq plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// A checkpoint folder, or a `config.json` file.
    pub model: PathBuf,
    /// Devices to place the model on (default: the GPUs of this machine).
    #[arg(long)]
    pub devices: Option<usize>,
    /// Memory of each device, e.g. `24GiB`, `80GB` (default: the smallest GPU's).
    #[arg(long, value_parser = parse_bytes)]
    pub device_memory: Option<u64>,
    /// Nodes the devices are spread over (tensor parallelism stays inside a node).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 4096)]
    pub ctx: usize,
    /// Sequences at once.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Fraction of each device kept free.
    #[arg(long, default_value_t = 0.1)]
    pub headroom: f64,
    /// Memory reserved on each device for the runtime (CUDA context, cuBLAS, NCCL).
    #[arg(long, value_parser = parse_bytes, default_value = "1GiB")]
    pub reserve: u64,
    /// auto, tp, pp or tp+pp.
    #[arg(long, default_value = "auto", value_parser = parse::<Strategy>)]
    pub strategy: Strategy,
    /// Plan the model as it will be once quantized to AWQ with this group size.
    #[arg(long, value_name = "G")]
    pub awq_group_size: Option<usize>,
    /// A placement to show instead of choosing one.
    #[command(flatten)]
    pub place: PlacementArgs,
    /// List every rank's tensors (shape, bytes, padding, split).
    #[arg(long)]
    pub tensors: bool,
    /// Write the decision as JSON here.
    #[arg(long, value_name = "OUT")]
    pub json: Option<PathBuf>,
}

/// The configuration of `model` (a folder or a `config.json`), quantized when asked.
pub fn load_config(model: &Path, awq_group_size: Option<usize>) -> Result<ModelConfig> {
    let path = if model.is_dir() {
        model.join("config.json")
    } else {
        model.to_path_buf()
    };
    let mut config = ModelConfig::from_file(&path)?;
    if let Some(g) = awq_group_size {
        if config.quantization.is_some() {
            bail!("{}: already quantized; drop --awq-group-size", path.display());
        }
        config.quantization = Some(QuantizationConfig {
            group_size: g,
            modules_to_not_convert: Vec::new(),
        });
        // Dense tensors of an AWQ checkpoint are f16.
        config.torch_dtype = Some("float16".into());
    }
    Ok(config)
}

/// The devices a plan is for: as given, else the GPUs of this machine.
pub fn devices(devices: Option<usize>, device_memory: Option<u64>) -> Result<(usize, u64)> {
    match (devices, device_memory) {
        (Some(n), Some(m)) => Ok((n, m)),
        _ => {
            let found = super::devices::gpus().unwrap_or_default();
            let smallest = found.iter().map(|g| g.total_memory).min();
            let names: std::collections::BTreeSet<&str> = found.iter().map(|g| g.name.as_str()).collect();
            if names.len() > 1 {
                crate::progress::log(format!(
                    "warning: mixed GPU models ({}); planning with the smallest memory",
                    names.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            match (
                devices.or((!found.is_empty()).then_some(found.len())),
                device_memory.or(smallest),
            ) {
                (Some(n), Some(m)) => Ok((n, m)),
                _ => bail!("no GPU found on this machine: give --devices and --device-memory"),
            }
        }
    }
}

/// `with_free`: whether a device memory was given (a shown placement may have none).
fn print_devices(devices: &[DeviceMemory], layers: &[usize], with_free: bool) {
    println!("| rank | stage | layers | weights | KV cache | activations | reserve | free |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for d in devices {
        let free = if !with_free {
            "—".to_string()
        } else if d.free >= 0 {
            gib(d.free as u64)
        } else {
            format!("−{}", gib((-d.free) as u64))
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {free} |",
            d.rank,
            d.stage,
            layers.get(d.stage).copied().unwrap_or(0),
            gib(d.weights),
            gib(d.kv_cache),
            gib(d.activations),
            gib(d.reserve)
        );
    }
}

fn print_tensors(config: &ModelConfig, placement: &Placement, dense: checkpoint::Dtype) {
    for rank in placement.ranks() {
        println!(
            "\nrank {} (stage {}, layers {:?}): heads {:?}, kv heads {:?}, intermediate {:?} (real {:?}), vocabulary {:?}",
            rank.rank,
            rank.stage,
            rank.layers,
            rank.shard.heads,
            rank.shard.kv_heads,
            rank.shard.intermediate,
            rank.shard.intermediate_real,
            rank.shard.vocab
        );
        println!(
            "  {:<48} {:>16} {:>12} {:>8} {:>11}",
            "tensor", "shape", "bytes", "padding", "split"
        );
        for t in rank.tensors(config) {
            println!(
                "  {:<48} {:>16} {:>12} {:>8} {:>11}",
                t.name,
                format!("{:?}", t.shape),
                t.bytes(dense),
                t.padding,
                format!("{:?}", t.split).to_lowercase()
            );
        }
        println!("  total: {} bytes as stored", rank.weight_bytes(config, dense));
    }
}

/// Prints a decision as `awq plan` and `awq validate` show it.
pub fn print_decision(decision: &PlanDecision) {
    let r = &decision.request;
    println!(
        "devices: {} × {} ({} usable each, {:.0} % headroom, {} reserve), {} node{}; ctx {} × batch {}; strategy {}",
        r.devices,
        gib(r.device_memory),
        gib(r.usable()),
        r.headroom * 100.0,
        gib(r.reserve),
        r.nodes,
        if r.nodes == 1 { "" } else { "s" },
        r.ctx,
        r.batch,
        r.strategy
    );
    let c = &decision.chosen;
    println!(
        "chosen: tp {} × pp {}, layers per stage {:?}; {} bytes per token between devices; peak {} per device",
        c.tp,
        c.pp,
        c.layers,
        c.communication_per_token,
        gib(c.peak())
    );
    print_devices(&c.devices, &c.layers, true);
    if !decision.rejected.is_empty() {
        println!("rejected:");
        for other in &decision.rejected {
            println!(
                "- tp {} × pp {}: {}",
                other.tp,
                other.pp,
                other.rejected.clone().unwrap_or_default()
            );
        }
    }
    if let Some(n) = decision.fewest_devices.filter(|&n| n < r.devices) {
        println!(
            "note: the model fits on {n} device{} of this size",
            if n == 1 { "" } else { "s" }
        );
    }
}

/// Runs `awq plan`.
pub fn run(args: &PlanArgs) -> Result<()> {
    let config = load_config(&args.model, args.awq_group_size)?;
    let c = &config;
    println!("{}: {}", args.model.display(), super::model_summary(c));
    let dense = planner::DtypeName::of(c).dtype();
    if args.place.given() {
        let placement = args.place.request().resolve(c, None)?;
        let world = placement.world_size();
        let memory = args.device_memory.unwrap_or(u64::MAX / 4);
        let mut request = PlanRequest::new(c, world, memory, args.ctx, args.batch);
        request.headroom = args.headroom;
        request.reserve = args.reserve;
        let devices = planner::device_memory(c, &placement, &request);
        let shards = &placement.shards;
        println!(
            "placement: tp {} × pp {}, layers per stage {:?} ({} ranks); intermediate {} per rank ({} padding in all)",
            placement.tp(),
            placement.pp(),
            placement.stages.counts(),
            world,
            shards.intermediate_per_rank,
            shards.intermediate_padded - shards.intermediate
        );
        print_devices(&devices, &placement.stages.counts(), args.device_memory.is_some());
        if args.tensors {
            print_tensors(c, &placement, dense);
        }
        if let Some(path) = &args.json {
            evaluation::report::write(path, &devices)?;
        }
        return Ok(());
    }
    let (n, memory) = devices(args.devices, args.device_memory)?;
    let mut request = PlanRequest::new(c, n, memory, args.ctx, args.batch);
    request.nodes = args.nodes;
    request.headroom = args.headroom;
    request.reserve = args.reserve;
    request.strategy = args.strategy;
    let decision = planner::plan(c, &request).context("planning")?;
    print_decision(&decision);
    if args.tensors {
        print_tensors(c, &decision.chosen.placement(c)?, dense);
    }
    if let Some(path) = &args.json {
        evaluation::report::write(path, &decision)?;
    }
    Ok(())
}
