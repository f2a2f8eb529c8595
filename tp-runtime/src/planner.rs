//! Choosing tensor and pipeline parallelism from a model's size and the hardware: a memory
//! model of every device under every feasible placement, a documented rule to pick one, and
//! the reason each other one was not picked (`docs/distributed.md`, "Placement planner").
//!
//! Per device, from `config.json` (and its `quantization_config`) alone:
//! - weights: the bytes of the rank's tensors as stored ([`RankPlacement::weight_bytes`]):
//!   packed int4 with f16 scales and i32 zeros, dense tensors in the model's element type,
//!   intermediate padding, replicated norms, the vocabulary split or replicated, the first
//!   stage's embeddings and the last stage's norm and lm_head (or tied embeddings);
//! - KV cache: `2 × kv_heads_per_rank × head_dim × batch × kv_bytes` times the positions each
//!   layer keeps: `ctx`, or on a sliding-window layer `min(ctx, 2 × window)`
//!   ([`stored_positions`], what the runtime's cache allocates);
//! - activations: one forward pass over `ctx × batch` tokens in f32 — the residual, the
//!   normed input, q/k/v, the attention output, a projection output, gate/up/activation, the
//!   rotary table — and, on the last stage, one chunk of logits:
//!   `4 × T × (3·hidden + 2·q_r + 2·kv_r + 3·intermediate_r + head_dim) + 4 × min(T, 1024) × vocab_r`;
//! - a fixed runtime reserve (CUDA context, cuBLAS workspace, NCCL buffers).
//!
//! The same byte model gives what one decode step reads ([`weight_bytes_per_step`],
//! [`kv_bytes_per_token_step`]), the memory roofline of `awq bench generate`.
//!
//! A plan places the model on the devices given (`tp × pp = devices`, as vLLM and
//! TensorRT-LLM launch a world of that size), its layers split evenly across the stages when
//! that fits, else so as to balance the stages' memory. Among the plans that fit every device with the
//! headroom kept free, the pick is the one with the least communication per token (tensor
//! parallelism all-reduces `hidden` values twice per layer; pipeline parallelism sends them
//! once per stage boundary), then the fewest stages, then the smallest peak memory. Tensor
//! parallelism stays inside a node: with several nodes, `tp` must divide the devices of one.

use checkpoint::{Dtype, ModelConfig, names};
use serde::{Deserialize, Serialize};

use crate::decode::stored_positions;
use crate::placement::{Placement, StagePlan};
use crate::shard::ShardPlan;
use crate::{Error, Result};

/// Rows of logits the last stage keeps at once (the CUDA backend's scoring chunk).
const LOGITS_ROWS: usize = 1024;

/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;

/// Which kinds of parallelism a plan may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Whatever fits best.
    #[default]
    Auto,
    /// Tensor parallelism only.
    Tp,
    /// Pipeline parallelism only.
    Pp,
    /// Both at once (tp > 1 and pp > 1).
    #[serde(rename = "tp+pp")]
    TpPp,
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Strategy::Auto),
            "tp" => Ok(Strategy::Tp),
            "pp" => Ok(Strategy::Pp),
            "tp+pp" => Ok(Strategy::TpPp),
            other => Err(format!(
                "unknown strategy `{other}` (expected auto, tp, pp or tp+pp)"
            )),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Auto => "auto",
            Strategy::Tp => "tp",
            Strategy::Pp => "pp",
            Strategy::TpPp => "tp+pp",
        })
    }
}

/// What a plan is for: the devices and the work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanRequest {
    /// Devices the model is placed on.
    pub devices: usize,
    /// Memory of each device, in bytes (the smallest, where they differ).
    pub device_memory: u64,
    /// Nodes the devices are spread over (tensor parallelism stays inside one).
    pub nodes: usize,
    /// Tokens per sequence.
    pub ctx: usize,
    /// Sequences at once.
    pub batch: usize,
    /// Fraction of each device kept free.
    pub headroom: f64,
    /// Bytes reserved on each device for the runtime itself.
    pub reserve: u64,
    /// Bytes per value of the KV cache.
    pub kv_bytes: u64,
    /// Element type of the model's dense tensors.
    pub dense: DtypeName,
    pub strategy: Strategy,
}

/// An element type by its name, for reports and job files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeName {
    F32,
    F16,
    Bf16,
}

impl DtypeName {
    /// The safetensors type.
    pub fn dtype(self) -> Dtype {
        match self {
            DtypeName::F32 => Dtype::F32,
            DtypeName::F16 => Dtype::F16,
            DtypeName::Bf16 => Dtype::BF16,
        }
    }

    /// The type `config.json` names (`torch_dtype`), f16 when it names none.
    pub fn of(config: &ModelConfig) -> Self {
        match config.torch_dtype.as_deref() {
            Some("float32") => DtypeName::F32,
            Some("bfloat16") => DtypeName::Bf16,
            _ => DtypeName::F16,
        }
    }
}

impl PlanRequest {
    /// `devices` devices of `device_memory` bytes, one node, the defaults of
    /// `docs/distributed.md` (10 % headroom, 1 GiB reserve, f16 KV cache).
    pub fn new(config: &ModelConfig, devices: usize, device_memory: u64, ctx: usize, batch: usize) -> Self {
        PlanRequest {
            devices,
            device_memory,
            nodes: 1,
            ctx,
            batch,
            headroom: 0.1,
            reserve: GIB,
            kv_bytes: 2,
            dense: DtypeName::of(config),
            strategy: Strategy::Auto,
        }
    }

    /// Bytes of a device a plan may fill.
    pub fn usable(&self) -> u64 {
        (self.device_memory as f64 * (1.0 - self.headroom)) as u64
    }
}

/// One device's memory under a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceMemory {
    pub rank: usize,
    pub stage: usize,
    pub weights: u64,
    pub kv_cache: u64,
    pub activations: u64,
    pub reserve: u64,
    /// Usable bytes left (negative: short by that much).
    pub free: i64,
}

impl DeviceMemory {
    /// Everything the device holds.
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.activations + self.reserve
    }
}

/// One placement that was considered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub tp: usize,
    pub pp: usize,
    /// Layers per stage (empty when the placement is impossible).
    pub layers: Vec<usize>,
    pub devices: Vec<DeviceMemory>,
    /// Bytes sent between devices per token.
    pub communication_per_token: u64,
    /// Why it was not picked (`None` for the pick).
    pub rejected: Option<String>,
}

impl Candidate {
    /// The most any device needs.
    pub fn peak(&self) -> u64 {
        self.devices.iter().map(DeviceMemory::total).max().unwrap_or(0)
    }

    /// The placement it describes.
    pub fn placement(&self, config: &ModelConfig) -> Result<Placement> {
        Placement::new(
            config,
            self.tp,
            StagePlan::from_counts(config.num_hidden_layers, &self.layers)?,
        )
    }
}

/// The planner's answer: the pick and every alternative with its reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanDecision {
    pub request: PlanRequest,
    pub chosen: Candidate,
    pub rejected: Vec<Candidate>,
    /// The fewest devices of this memory that would hold the model (with the same rule).
    pub fewest_devices: Option<usize>,
}

/// Memory of every device of `placement` for the work of `request`.
pub fn device_memory(
    config: &ModelConfig,
    placement: &Placement,
    request: &PlanRequest,
) -> Vec<DeviceMemory> {
    let tokens = (request.ctx * request.batch) as u64;
    let plan = &placement.shards;
    let (h, d) = (config.hidden_size as u64, config.head_dim as u64);
    let (q, kv) = (plan.heads_per_rank as u64 * d, plan.kv_heads_per_rank as u64 * d);
    let inter = plan.intermediate_per_rank as u64;
    placement
        .ranks()
        .into_iter()
        .map(|rank| {
            let weights = rank.weight_bytes(config, request.dense.dtype());
            let kv_cache = kv_cache_bytes(
                config,
                rank.layers.clone(),
                kv,
                request.ctx,
                request.batch,
                request.kv_bytes,
            );
            let mut activations = 4 * tokens * (3 * h + 2 * q + 2 * kv + 3 * inter + d);
            if rank.is_last() {
                activations += 4 * tokens.min(LOGITS_ROWS as u64) * rank.shard.vocab.len() as u64;
            }
            let used = weights + kv_cache + activations + request.reserve;
            DeviceMemory {
                rank: rank.rank,
                stage: rank.stage,
                weights,
                kv_cache,
                activations,
                reserve: request.reserve,
                free: request.usable() as i64 - used as i64,
            }
        })
        .collect()
}

/// Bytes of the keys and values of `config`'s `layers` with `kv_features` features each (per
/// rank), for `batch` sequences of `ctx` positions at `kv_bytes` per value: a sliding-window
/// layer keeps what the runtime's cache keeps ([`stored_positions`]).
pub fn kv_cache_bytes(
    config: &ModelConfig,
    layers: std::ops::Range<usize>,
    kv_features: u64,
    ctx: usize,
    batch: usize,
    kv_bytes: u64,
) -> u64 {
    layers
        .map(|l| 2 * kv_features * stored_positions(config.window(l), ctx) as u64 * batch as u64 * kv_bytes)
        .sum()
}

/// Bytes of weights one decode step reads on one device: every tensor of the model as stored
/// (the single placement's [`RankPlacement::weight_bytes`](crate::RankPlacement::weight_bytes),
/// dense tensors in the type `config.json` names) but the embedding table, of which a step
/// reads only its tokens' rows (unless it is the tied lm_head).
pub fn weight_bytes_per_step(config: &ModelConfig) -> u64 {
    let dense = DtypeName::of(config).dtype();
    Placement::single(config)
        .rank(0)
        .tensors(config)
        .iter()
        .filter(|t| config.tie_word_embeddings || t.name != names::EMBED_TOKENS)
        .map(|t| t.bytes(dense))
        .sum()
}

/// Bytes of keys and values one sequence's decode step reads at `context` positions on one
/// device (the cache is f32, as the CPU backend keeps it): a sliding-window layer reads its
/// window's.
pub fn kv_bytes_per_token_step(config: &ModelConfig, context: usize) -> u64 {
    (0..config.num_hidden_layers)
        .map(|l| {
            2 * config.kv_features() as u64 * context.min(config.window(l).unwrap_or(usize::MAX)) as u64 * 4
        })
        .sum()
}

/// Bytes sent between devices per token: two all-reduces of `hidden` f32 values per layer
/// under tensor parallelism (and one after the vocabulary-parallel embedding), `hidden` values
/// per stage boundary under pipeline parallelism.
pub fn communication_per_token(config: &ModelConfig, tp: usize, pp: usize) -> u64 {
    let h = 4 * config.hidden_size as u64;
    let tensor = if tp > 1 {
        (2 * config.num_hidden_layers as u64 + 1) * h
    } else {
        0
    };
    tensor + (pp as u64 - 1) * h
}

/// Layers per stage: the even split (equal work per stage) when every device holds it, else
/// the split that balances the stages' memory.
fn layer_split(config: &ModelConfig, tp: usize, pp: usize, request: &PlanRequest) -> Result<Vec<usize>> {
    let even = StagePlan::even(config.num_hidden_layers, pp)?;
    let placement = Placement::new(config, tp, even.clone())?;
    if device_memory(config, &placement, request)
        .iter()
        .all(|d| d.free >= 0)
    {
        return Ok(even.counts());
    }
    balanced_split(config, tp, pp, request)
}

/// Layers per stage that balance the stages' memory: the first stage carries the embeddings
/// and the last the norm and lm_head, so they get fewer layers when that evens the load.
fn balanced_split(config: &ModelConfig, tp: usize, pp: usize, request: &PlanRequest) -> Result<Vec<usize>> {
    let layers = config.num_hidden_layers;
    let mut counts = StagePlan::even(layers, pp)?.counts();
    let peak = |counts: &[usize]| -> Result<u64> {
        let placement = Placement::new(config, tp, StagePlan::from_counts(layers, counts)?)?;
        Ok(device_memory(config, &placement, request)
            .iter()
            .map(DeviceMemory::total)
            .max()
            .unwrap_or(0))
    };
    let mut best = peak(&counts)?;
    // Move one layer at a time from the fullest stage to the emptiest while that lowers the
    // peak: deterministic, and exact for layers of equal size.
    loop {
        let placement = Placement::new(config, tp, StagePlan::from_counts(layers, &counts)?)?;
        let memory = device_memory(config, &placement, request);
        let stage_total = |s: usize| {
            memory
                .iter()
                .filter(|m| m.stage == s)
                .map(DeviceMemory::total)
                .max()
                .unwrap_or(0)
        };
        let fullest = (0..pp)
            .max_by_key(|&s| (stage_total(s), std::cmp::Reverse(s)))
            .unwrap_or(0);
        let emptiest = (0..pp).min_by_key(|&s| (stage_total(s), s)).unwrap_or(0);
        if fullest == emptiest || counts[fullest] <= 1 {
            return Ok(counts);
        }
        let mut next = counts.clone();
        next[fullest] -= 1;
        next[emptiest] += 1;
        let after = peak(&next)?;
        if after >= best {
            return Ok(counts);
        }
        best = after;
        counts = next;
    }
}

/// Every (tp, pp) with `tp × pp = devices` the strategy allows, each checked and measured.
fn candidates(config: &ModelConfig, request: &PlanRequest) -> Vec<Candidate> {
    let n = request.devices;
    let per_node = n / request.nodes.max(1);
    (1..=n)
        .filter(|tp| n.is_multiple_of(*tp))
        .map(|tp| (tp, n / tp))
        .filter(|&(tp, pp)| match request.strategy {
            Strategy::Auto => true,
            Strategy::Tp => pp == 1,
            Strategy::Pp => tp == 1,
            Strategy::TpPp => tp > 1 && pp > 1,
        })
        .map(|(tp, pp)| {
            let mut candidate = Candidate {
                tp,
                pp,
                layers: Vec::new(),
                devices: Vec::new(),
                communication_per_token: communication_per_token(config, tp, pp),
                rejected: None,
            };
            if request.nodes > 1 && (tp > per_node || !per_node.is_multiple_of(tp)) {
                candidate.rejected = Some(format!(
                    "tp = {tp} would cross nodes ({per_node} devices per node); tensor parallelism stays inside a node"
                ));
                return candidate;
            }
            if let Err(e) = ShardPlan::new(config, tp) {
                candidate.rejected = Some(e.to_string());
                return candidate;
            }
            match layer_split(config, tp, pp, request) {
                Err(e) => candidate.rejected = Some(e.to_string()),
                Ok(layers) => {
                    let placement = Placement::new(
                        config,
                        tp,
                        StagePlan::from_counts(config.num_hidden_layers, &layers).expect("a split of the layers"),
                    )
                    .expect("tp was checked above");
                    candidate.devices = device_memory(config, &placement, request);
                    candidate.layers = layers;
                    let short = candidate.devices.iter().map(|d| -d.free).max().unwrap_or(0);
                    if short > 0 {
                        candidate.rejected = Some(format!(
                            "does not fit: needs {} more per device than the {} usable of {} ({:.0} % headroom)",
                            gib(short as u64),
                            gib(request.usable()),
                            gib(request.device_memory),
                            request.headroom * 100.0
                        ));
                    }
                }
            }
            candidate
        })
        .collect()
}

/// `bytes` as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB as f64)
}

/// Picks a placement of `config` for `request`, or explains why none fits, giving the
/// smallest device memory that would hold it on these devices.
pub fn plan(config: &ModelConfig, request: &PlanRequest) -> Result<PlanDecision> {
    if request.devices == 0 || request.nodes == 0 || !request.devices.is_multiple_of(request.nodes) {
        return Err(Error::Invalid(format!(
            "{} devices over {} nodes: needs at least one device, the same number on every node",
            request.devices, request.nodes
        )));
    }
    let mut all = candidates(config, request);
    let rank_key = |c: &Candidate| (c.communication_per_token, c.pp, c.peak());
    let chosen = all
        .iter()
        .filter(|c| c.rejected.is_none())
        .min_by_key(|c| rank_key(c))
        .cloned();
    let fewest_devices = fewest_devices(config, request);
    let Some(chosen) = chosen else {
        let structural: Vec<&Candidate> = all.iter().filter(|c| !c.devices.is_empty()).collect();
        let reasons: Vec<String> = all
            .iter()
            .map(|c| {
                format!(
                    "tp {} × pp {}: {}",
                    c.tp,
                    c.pp,
                    c.rejected.clone().unwrap_or_default()
                )
            })
            .collect();
        let needed = structural
            .iter()
            .map(|c| c.peak())
            .min()
            .map(|peak| (peak as f64 / (1.0 - request.headroom)).ceil() as u64);
        return Err(Error::Invalid(format!(
            "no placement on {} × {} fits{}{}; considered: {}",
            request.devices,
            gib(request.device_memory),
            match needed {
                Some(b) => format!(": the smallest device memory that would hold it is {}", gib(b)),
                None => String::new(),
            },
            match fewest_devices {
                Some(n) => format!(" (or {n} devices of this size)"),
                None => String::new(),
            },
            reasons.join("; ")
        )));
    };
    for c in &mut all {
        if c.rejected.is_none() && (c.tp, c.pp) != (chosen.tp, chosen.pp) {
            c.rejected = Some(format!(
                "fits, but sends {} bytes per token against {} (tp {} × pp {})",
                c.communication_per_token, chosen.communication_per_token, chosen.tp, chosen.pp
            ));
        }
    }
    let rejected = all
        .into_iter()
        .filter(|c| (c.tp, c.pp) != (chosen.tp, chosen.pp))
        .collect();
    Ok(PlanDecision {
        request: request.clone(),
        chosen,
        rejected,
        fewest_devices,
    })
}

/// The fewest devices of the requested memory (up to 1024) on which some placement fits.
fn fewest_devices(config: &ModelConfig, request: &PlanRequest) -> Option<usize> {
    (1..=1024usize).find(|&n| {
        let probe = PlanRequest {
            devices: n,
            nodes: 1,
            ..request.clone()
        };
        candidates(config, &probe).iter().any(|c| c.rejected.is_none())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize) -> ModelConfig {
        let value = serde_json::json!({"architectures":["LlamaForCausalLM"],"hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":layers,"num_attention_heads":9,
            "num_key_value_heads":3,"rms_norm_eps":1e-5,"vocab_size":49152,"tie_word_embeddings":true,
            "torch_dtype":"float32"});
        ModelConfig::from_json(&value, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn a_decode_step_reads_the_linear_layers_and_the_head() {
        // SmolLM2-135M: 30 layers × (576·576 + 2·576·192 + 576·576 + 3·576·1536) + 61 norms of
        // 576 + the tied head 49152 × 576, in float32.
        let per_layer = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536;
        let elements = 30 * per_layer + 61 * 576 + 49152 * 576;
        let tied = config(30);
        assert_eq!(weight_bytes_per_step(&tied), elements as u64 * 4);
        // Untied, the embedding table is left out and the lm_head of the same size read.
        let mut untied = tied.clone();
        untied.tie_word_embeddings = false;
        assert_eq!(weight_bytes_per_step(&untied), elements as u64 * 4);
        assert_eq!(kv_bytes_per_token_step(&tied, 100), 2 * 30 * 192 * 4 * 100);
    }

    #[test]
    fn kv_cache_and_activations_follow_their_formulas() {
        let c = config(30);
        let request = PlanRequest::new(&c, 1, 80 * GIB, 4096, 8);
        let memory = device_memory(&c, &Placement::single(&c), &request);
        let tokens = 4096u64 * 8;
        assert_eq!(memory[0].kv_cache, 2 * 30 * 3 * 64 * tokens * 2);
        let act = 4 * tokens * (3 * 576 + 2 * 576 + 2 * 192 + 3 * 1536 + 64) + 4 * 1024 * 49152;
        assert_eq!(memory[0].activations, act);
        assert_eq!(memory[0].reserve, GIB);
    }

    #[test]
    fn balanced_splits_lighten_the_stages_with_the_vocabulary() {
        // Tied embeddings: the first and last stages both hold the 113 MB table; the middle
        // ones take more layers.
        let c = config(30);
        let request = PlanRequest::new(&c, 4, 80 * GIB, 16, 1);
        let split = balanced_split(&c, 1, 4, &request).unwrap();
        assert_eq!(split.iter().sum::<usize>(), 30);
        assert!(split[1] > split[0] && split[2] > split[3], "{split:?}");
    }

    #[test]
    fn too_small_devices_are_an_error_with_the_memory_that_would_fit() {
        let c = config(30);
        let err = plan(&c, &PlanRequest::new(&c, 2, GIB, 4096, 8))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no placement on 2 × 1.00 GiB fits"), "{err}");
        assert!(
            err.contains("the smallest device memory that would hold it is"),
            "{err}"
        );
        assert!(
            err.contains("tp 2 × pp 1: tensor parallelism tp = 2: 9 attention heads"),
            "{err}"
        );
    }
}
