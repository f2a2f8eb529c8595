//! Where every part of a model goes: pipeline stages (contiguous ranges of decoder layers,
//! the first stage also holding the embeddings, the last the final norm and lm_head) and,
//! inside each stage, tensor-parallel ranks ([`ShardPlan`]). Ranks are numbered with the
//! tensor-parallel rank innermost, `rank = stage × tp + tp_rank`, as TensorRT-LLM numbers
//! them. Everything here follows from the configuration alone.

use std::ops::Range;

use checkpoint::names;
use checkpoint::presharded::Mapping;
use checkpoint::{Dtype, ModelConfig};
use serde::{Deserialize, Serialize};

/// One tensor of a rank's share (defined with the tensor-parallel plan, which lists each
/// layer's).
pub use crate::shard::TensorShard;
use crate::shard::{RankShard, ShardPlan};
use crate::{Error, Result};

/// The decoder layers of each pipeline stage: contiguous, in order, every layer once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    stages: Vec<Range<usize>>,
}

impl StagePlan {
    /// `pp` stages of nearly equal size: the layers left over go to the earliest stages,
    /// never to the last (which also holds the final norm and lm_head).
    pub fn even(layers: usize, pp: usize) -> Result<Self> {
        if pp == 0 || pp > layers {
            return Err(Error::Invalid(format!(
                "pipeline parallelism pp = {pp}: needs 1 ≤ pp ≤ {layers} (the model's layers)"
            )));
        }
        let (base, extra) = (layers / pp, layers % pp);
        let counts: Vec<usize> = (0..pp).map(|s| base + usize::from(s < extra)).collect();
        Self::from_counts(layers, &counts)
    }

    /// Stages of the given sizes (`--layers 8,8,7,7`).
    pub fn from_counts(layers: usize, counts: &[usize]) -> Result<Self> {
        if counts.is_empty() || counts.contains(&0) {
            return Err(Error::Invalid(format!(
                "layer split {counts:?}: every stage needs at least one layer"
            )));
        }
        let total: usize = counts.iter().sum();
        if total != layers {
            return Err(Error::Invalid(format!(
                "layer split {counts:?} covers {total} layers; the model has {layers}"
            )));
        }
        let mut start = 0;
        let stages = counts
            .iter()
            .map(|&n| {
                start += n;
                start - n..start
            })
            .collect();
        Ok(StagePlan { stages })
    }

    /// One stage holding every layer.
    pub fn single(layers: usize) -> Self {
        StagePlan {
            stages: std::iter::once(0..layers).collect(),
        }
    }

    /// Number of stages.
    pub fn pp(&self) -> usize {
        self.stages.len()
    }

    /// The layers of each stage.
    pub fn stages(&self) -> &[Range<usize>] {
        &self.stages
    }

    /// Layers per stage.
    pub fn counts(&self) -> Vec<usize> {
        self.stages.iter().map(|s| s.len()).collect()
    }

    /// The stage that holds `layer`.
    pub fn stage_of(&self, layer: usize) -> Option<usize> {
        self.stages.iter().position(|s| s.contains(&layer))
    }
}

/// Tensor parallelism inside pipeline stages: `tp × pp` ranks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub shards: ShardPlan,
    pub stages: StagePlan,
}

impl Placement {
    /// `tp` ranks in each of `stages`, checked against the configuration.
    pub fn new(config: &ModelConfig, tp: usize, stages: StagePlan) -> Result<Self> {
        let covered = stages.stages.last().map_or(0, |s| s.end);
        if covered != config.num_hidden_layers {
            return Err(Error::Invalid(format!(
                "the stages cover {covered} layers; the model has {}",
                config.num_hidden_layers
            )));
        }
        Ok(Placement {
            shards: ShardPlan::new(config, tp)?,
            stages,
        })
    }

    /// The whole model on one rank.
    pub fn single(config: &ModelConfig) -> Self {
        Self::new(config, 1, StagePlan::single(config.num_hidden_layers)).expect("one rank always places")
    }

    /// Tensor-parallel ranks per stage.
    pub fn tp(&self) -> usize {
        self.shards.tp
    }

    /// Pipeline stages.
    pub fn pp(&self) -> usize {
        self.stages.pp()
    }

    /// All ranks.
    pub fn world_size(&self) -> usize {
        self.tp() * self.pp()
    }

    /// Rank `rank`'s share.
    pub fn rank(&self, rank: usize) -> RankPlacement {
        assert!(rank < self.world_size(), "rank {rank} of {}", self.world_size());
        let (stage, tp_rank) = (rank / self.tp(), rank % self.tp());
        RankPlacement {
            rank,
            stage,
            stages: self.pp(),
            layers: self.stages.stages[stage].clone(),
            shard: self.shards.rank(tp_rank),
        }
    }

    /// Every rank's share, in rank order.
    pub fn ranks(&self) -> Vec<RankPlacement> {
        (0..self.world_size()).map(|r| self.rank(r)).collect()
    }
}

/// What a user asks for (`--tp`, `--pp`, `--layers`); what is not asked for comes from a
/// pre-sharded folder's mapping, else is 1 (and an even layer split).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlacementRequest {
    pub tp: Option<usize>,
    pub pp: Option<usize>,
    /// Layers per stage.
    pub layers: Option<Vec<usize>>,
}

impl PlacementRequest {
    /// Tensor parallelism alone.
    pub fn tp(tp: usize) -> Self {
        PlacementRequest {
            tp: Some(tp),
            ..Self::default()
        }
    }

    /// The placement for `config`; a pre-sharded folder's `mapping` fixes it, and asking for
    /// another is an error naming both.
    pub fn resolve(&self, config: &ModelConfig, mapping: Option<&Mapping>) -> Result<Placement> {
        let layers = config.num_hidden_layers;
        if let Some(m) = mapping {
            let counts: Vec<usize> = m.stage_layers.iter().map(|[a, b]| b - a).collect();
            let conflicts = self.tp.is_some_and(|tp| tp != m.tp)
                || self.pp.is_some_and(|pp| pp != m.pp)
                || self.layers.as_ref().is_some_and(|l| *l != counts);
            if conflicts {
                return Err(Error::Invalid(format!(
                    "the checkpoint is pre-sharded for tp = {}, pp = {} (layers {counts:?}); asked for tp = {}, pp = {}{}",
                    m.tp,
                    m.pp,
                    self.tp.map_or("-".into(), |t| t.to_string()),
                    self.pp.map_or("-".into(), |p| p.to_string()),
                    self.layers
                        .as_ref()
                        .map_or(String::new(), |l| format!(" (layers {l:?})"))
                )));
            }
            return Placement::new(config, m.tp, StagePlan::from_counts(layers, &counts)?);
        }
        let stages = match (&self.layers, self.pp) {
            (Some(counts), pp) => {
                if pp.is_some_and(|pp| pp != counts.len()) {
                    return Err(Error::Invalid(format!(
                        "--pp {} with a split of {} stages ({counts:?})",
                        pp.unwrap_or(0),
                        counts.len()
                    )));
                }
                StagePlan::from_counts(layers, counts)?
            }
            (None, pp) => StagePlan::even(layers, pp.unwrap_or(1))?,
        };
        Placement::new(config, self.tp.unwrap_or(1), stages)
    }
}

/// One rank's share: a tensor-parallel slice of one stage's layers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankPlacement {
    pub rank: usize,
    pub stage: usize,
    /// Stages in all.
    pub stages: usize,
    pub layers: Range<usize>,
    pub shard: RankShard,
}

impl RankPlacement {
    /// The whole model on one rank.
    pub fn whole(config: &ModelConfig) -> Self {
        Placement::single(config).rank(0)
    }

    /// Whether this rank embeds the tokens (first stage).
    pub fn is_first(&self) -> bool {
        self.stage == 0
    }

    /// Whether this rank computes the logits (last stage).
    pub fn is_last(&self) -> bool {
        self.stage + 1 == self.stages
    }

    /// Whether it holds `model.embed_tokens.weight`: to embed, or as the tied lm_head.
    pub fn holds_embeddings(&self, config: &ModelConfig) -> bool {
        self.is_first() || (self.is_last() && config.tie_word_embeddings)
    }

    /// Every tensor this rank holds, in checkpoint terms and in the order a rank file stores
    /// them: name, the rank's shape, zero padding and how the tensor is split. The embeddings
    /// first where it holds them, then each layer's ([`RankShard::layer_tensors`]), then the
    /// final norm and the lm_head on the last stage.
    pub fn tensors(&self, config: &ModelConfig) -> Vec<TensorShard> {
        let shard = &self.shard;
        let mut out = Vec::new();
        if self.holds_embeddings(config) {
            out.push(shard.vocab_tensor(config, names::EMBED_TOKENS));
        }
        for layer in self.layers.clone() {
            out.extend(shard.layer_tensors(config, layer));
        }
        if self.is_last() {
            out.push(RankShard::norm_tensor(
                names::FINAL_NORM.into(),
                config.hidden_size,
            ));
            if !config.tie_word_embeddings {
                out.push(shard.vocab_tensor(config, names::LM_HEAD));
            }
        }
        out
    }

    /// Bytes of every tensor this rank holds, as stored: AWQ tensors in their format's types,
    /// dense ones in `dense`.
    pub fn weight_bytes(&self, config: &ModelConfig, dense: Dtype) -> u64 {
        self.tensors(config).iter().map(|t| t.bytes(dense)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize, tied: bool) -> ModelConfig {
        let value = serde_json::json!({"architectures":["LlamaForCausalLM"],"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":layers,"num_attention_heads":4,
            "num_key_value_heads":2,"rms_norm_eps":1e-5,"vocab_size":100,"tie_word_embeddings":tied});
        ModelConfig::from_json(&value, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn even_splits_give_leftovers_to_the_earliest_stages() {
        assert_eq!(StagePlan::even(30, 4).unwrap().counts(), vec![8, 8, 7, 7]);
        assert_eq!(StagePlan::even(31, 4).unwrap().counts(), vec![8, 8, 8, 7]);
        assert_eq!(StagePlan::even(30, 30).unwrap().counts(), vec![1; 30]);
        let plan = StagePlan::even(30, 3).unwrap();
        assert_eq!(plan.stages(), &[0..10, 10..20, 20..30]);
        assert_eq!(plan.stage_of(19), Some(1));
        assert!(
            StagePlan::even(30, 31)
                .unwrap_err()
                .to_string()
                .contains("1 ≤ pp ≤ 30")
        );
        assert!(
            StagePlan::from_counts(30, &[10, 10])
                .unwrap_err()
                .to_string()
                .contains("covers 20")
        );
        assert!(StagePlan::from_counts(3, &[3, 0]).is_err());
    }

    #[test]
    fn ranks_are_numbered_tp_innermost_and_own_their_stage_tensors() {
        let c = config(4, true);
        let placement = Placement::new(&c, 2, StagePlan::even(4, 2).unwrap()).unwrap();
        assert_eq!(placement.world_size(), 4);
        let r3 = placement.rank(3);
        assert_eq!((r3.stage, r3.shard.rank, r3.layers.clone()), (1, 1, 2..4));
        // Tied embeddings: the first stage embeds, the last holds the table as lm_head.
        let names =
            |r: &RankPlacement| -> Vec<String> { r.tensors(&c).into_iter().map(|t| t.name).collect() };
        let first = names(&placement.rank(0));
        let last = names(&r3);
        assert!(
            first.contains(&names::EMBED_TOKENS.to_string())
                && !first.contains(&names::FINAL_NORM.to_string())
        );
        assert!(
            last.contains(&names::EMBED_TOKENS.to_string()) && last.contains(&names::FINAL_NORM.to_string())
        );
        assert!(first.iter().all(|n| !n.starts_with("model.layers.2.")));
        assert!(last.iter().all(|n| !n.starts_with("model.layers.1.")));
        // Untied: only the first stage holds the embeddings.
        let untied = config(4, false);
        let p = Placement::new(&untied, 1, StagePlan::even(4, 2).unwrap()).unwrap();
        let last: Vec<String> = p.rank(1).tensors(&untied).into_iter().map(|t| t.name).collect();
        assert!(
            !last.contains(&names::EMBED_TOKENS.to_string()) && last.contains(&names::LM_HEAD.to_string())
        );
        // Bytes: the whole model's tensors, once.
        let whole = RankPlacement::whole(&untied).weight_bytes(&untied, Dtype::F32);
        let split: u64 = p
            .ranks()
            .iter()
            .map(|r| r.weight_bytes(&untied, Dtype::F32))
            .sum();
        assert_eq!(whole, split);
        let per_layer = 4 * (2 * 64 + 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 128) as u64;
        assert_eq!(whole, 4 * per_layer + 4 * (100 * 64 * 2 + 64));
    }
}
