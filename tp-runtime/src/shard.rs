//! The tensor-parallel shard plan, computed from the configuration alone (awq-format.md §6).
//!
//! - q/k/v and gate/up are column-parallel: each rank holds a range of output features
//!   (for AWQ, whole int32 columns: eight outputs at a time).
//! - o_proj and down_proj are row-parallel: each rank holds a range of input features (for
//!   AWQ, whole groups); the partial outputs are summed across ranks and the bias is added
//!   once.
//! - Heads split evenly; key/value heads split when `kv_heads % tp == 0` and are replicated
//!   when `tp % kv_heads == 0`.
//! - The intermediate dimension is zero-padded to `tp` equal shares of whole units (one
//!   feature for dense models, `lcm(group, 8)` for AWQ) wherever it does not split evenly:
//!   padded gate/up outputs are 0 and padded down inputs meet zero weights, which is exact
//!   because SiLU(0)·0 = 0.
//! - The vocabulary (embeddings and lm_head) is split when `vocab % tp == 0`, else replicated.

use std::ops::Range;

use checkpoint::awq::PACK;
use checkpoint::names::{self, Projection, layer_tensor_name};
use checkpoint::{AwqShape, Dtype, ModelConfig};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How a tensor is divided among ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Output features (rows of a `[out, in]` weight).
    Columns,
    /// Input features (columns of a `[out, in]` weight).
    Rows,
    /// Every rank holds all of it.
    Replicated,
}

/// How projection `p` is divided under tensor parallelism: o_proj and down_proj by their
/// inputs (row-parallel), the others by their outputs (column-parallel).
pub fn split_of(p: Projection) -> Split {
    match p {
        Projection::O | Projection::Down => Split::Rows,
        _ => Split::Columns,
    }
}

/// The plan for all ranks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardPlan {
    pub tp: usize,
    pub heads_per_rank: usize,
    pub kv_heads_per_rank: usize,
    /// Ranks that share each key/value head (1 when they are split).
    pub kv_replicas: usize,
    pub intermediate: usize,
    pub intermediate_per_rank: usize,
    /// `intermediate_per_rank · tp`; the difference with `intermediate` is zero padding.
    pub intermediate_padded: usize,
    pub vocab: usize,
    /// Embeddings and lm_head are split over the ranks.
    pub vocab_parallel: bool,
    pub group_size: Option<usize>,
    pub head_dim: usize,
}

/// One rank's share.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankShard {
    pub rank: usize,
    pub tp: usize,
    /// Query heads held.
    pub heads: Range<usize>,
    /// Key/value heads held.
    pub kv_heads: Range<usize>,
    /// Intermediate features held, in the padded index space.
    pub intermediate: Range<usize>,
    /// Of which the real (unpadded) ones.
    pub intermediate_real: Range<usize>,
    /// Token ids whose embeddings and logits the rank holds.
    pub vocab: Range<usize>,
    pub head_dim: usize,
}

impl RankShard {
    /// The whole model on one rank.
    pub fn whole(config: &ModelConfig) -> Self {
        ShardPlan::new(config, 1).expect("tp = 1 always plans").rank(0)
    }

    /// Whether this is the whole model (tp = 1).
    pub fn is_whole(&self) -> bool {
        self.tp == 1
    }

    /// The range of projection `p`'s output (column-parallel) or input (row-parallel)
    /// features this rank holds, in the padded space, and the real part of it.
    pub fn range(&self, p: Projection) -> (Range<usize>, Range<usize>) {
        let d = self.head_dim;
        match p {
            Projection::Q | Projection::O => {
                let r = self.heads.start * d..self.heads.end * d;
                (r.clone(), r)
            }
            Projection::K | Projection::V => {
                let r = self.kv_heads.start * d..self.kv_heads.end * d;
                (r.clone(), r)
            }
            Projection::Gate | Projection::Up | Projection::Down => {
                (self.intermediate.clone(), self.intermediate_real.clone())
            }
        }
    }

    /// `(out_features, in_features)` of this rank's share of `p`.
    pub fn shape(&self, config: &ModelConfig, p: Projection) -> (usize, usize) {
        let (out_features, in_features) = p.shape(config);
        let n = self.range(p).0.len();
        match split_of(p) {
            Split::Columns => (n, in_features),
            Split::Rows => (out_features, n),
            Split::Replicated => (out_features, in_features),
        }
    }

    /// Whether this rank holds projection `p`'s bias: column-parallel biases are split with
    /// the outputs; a row-parallel projection's partial outputs are summed across ranks, so
    /// its bias joins once, on rank 0, and no other rank holds it.
    pub fn holds_bias(&self, config: &ModelConfig, p: Projection) -> bool {
        p.has_bias(config) && (split_of(p) == Split::Columns || self.rank == 0)
    }

    /// How this rank holds the `[vocab, hidden]` tables (embeddings, lm_head): a slice of the
    /// rows when the vocabulary is split, else all of it.
    pub fn vocab_split(&self, config: &ModelConfig) -> Split {
        if self.vocab.len() < config.vocab_size {
            Split::Rows
        } else {
            Split::Replicated
        }
    }

    /// This rank's share of the `[vocab, hidden]` table `name` (embeddings or lm_head).
    pub fn vocab_tensor(&self, config: &ModelConfig, name: &str) -> TensorShard {
        TensorShard::new(
            name.into(),
            None,
            vec![self.vocab.len(), config.hidden_size],
            0,
            self.vocab_split(config),
        )
    }

    /// A norm weight `name` of `len` values, which every rank holds whole.
    pub fn norm_tensor(name: String, len: usize) -> TensorShard {
        TensorShard::new(name, None, vec![len], 0, Split::Replicated)
    }

    /// The tensors this rank holds of decoder layer `layer`, in checkpoint terms and in the
    /// order a rank file stores them: the two norms, then each projection (q, k, v, o, gate,
    /// up, down) as its weight (AWQ: `qweight`, `qzeros`, `scales`) and its bias where this
    /// rank holds one ([`RankShard::holds_bias`]).
    pub fn layer_tensors(&self, config: &ModelConfig, layer: usize) -> Vec<TensorShard> {
        let mut out = Vec::new();
        for (norm, len) in names::layer_norms(config) {
            out.push(Self::norm_tensor(layer_tensor_name(layer, norm), len));
        }
        for p in Projection::ALL {
            let prefix = p.prefix(layer);
            let (n, k) = self.shape(config, p);
            let (range, real) = self.range(p);
            let padding = range.len() - real.len();
            let split = if self.tp == 1 {
                Split::Replicated
            } else {
                split_of(p)
            };
            match &config.quantization {
                Some(q) if q.converts(&p.stored_prefix(config, layer)) => {
                    let local = AwqShape {
                        in_features: k,
                        out_features: n,
                        group_size: q.group_size,
                    };
                    for (name, dtype, shape) in local.tensors(&prefix) {
                        out.push(TensorShard::new(
                            name,
                            Some(dtype),
                            shape.to_vec(),
                            padding,
                            split,
                        ));
                    }
                }
                _ => out.push(TensorShard::new(
                    format!("{prefix}.weight"),
                    None,
                    vec![n, k],
                    padding,
                    split,
                )),
            }
            if self.holds_bias(config, p) {
                let columns = split_of(p) == Split::Columns;
                out.push(TensorShard::new(
                    format!("{prefix}.bias"),
                    None,
                    vec![n],
                    if columns { padding } else { 0 },
                    split,
                ));
            }
        }
        out
    }
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    a / gcd(a, b) * b
}

impl ShardPlan {
    /// Plans `tp` ranks for `config`, or explains why it cannot (naming the sizes and the tp
    /// values that would work).
    pub fn new(config: &ModelConfig, tp: usize) -> Result<Self> {
        Self::plan(config, tp).map_err(|reason| {
            let valid: Vec<String> = (1..=config.num_attention_heads)
                .filter(|&t| Self::plan(config, t).is_ok())
                .map(|t| t.to_string())
                .collect();
            Error::Invalid(format!(
                "tensor parallelism tp = {tp}: {reason}; tp values that work for this model: {}",
                valid.join(", ")
            ))
        })
    }

    fn plan(config: &ModelConfig, tp: usize) -> std::result::Result<Self, String> {
        let (heads, kv) = (config.num_attention_heads, config.num_key_value_heads);
        if tp == 0 {
            return Err("tp must be at least 1".into());
        }
        if tp > heads {
            return Err(format!("tp exceeds the {heads} attention heads"));
        }
        if heads % tp != 0 {
            return Err(format!("{heads} attention heads are not divisible by {tp}"));
        }
        let (kv_heads_per_rank, kv_replicas) = if kv % tp == 0 {
            (kv / tp, 1)
        } else if tp.is_multiple_of(kv) {
            (1, tp / kv)
        } else {
            return Err(format!(
                "{kv} key/value heads can be neither split over nor replicated to {tp} ranks"
            ));
        };
        let d = config.head_dim;
        let group_size = config.quantization.as_ref().map(|q| q.group_size);
        if let Some(g) = group_size {
            let layer0 = |p: Projection| p.prefix(0);
            if !(heads / tp * d).is_multiple_of(PACK) || !(kv_heads_per_rank * d).is_multiple_of(PACK) {
                return Err(format!(
                    "{} would hold {} and {} output features per rank, not whole packs of 8",
                    layer0(Projection::Q).replace(".q_proj", ".q/k/v_proj"),
                    heads / tp * d,
                    kv_heads_per_rank * d
                ));
            }
            if !(heads / tp * d).is_multiple_of(g) {
                return Err(format!(
                    "{} would hold {} input features per rank, not a whole number of groups of {g}",
                    layer0(Projection::O),
                    heads / tp * d
                ));
            }
        }
        let unit = group_size.map_or(1, |g| lcm(g, PACK));
        let intermediate = config.intermediate_size;
        let intermediate_per_rank = intermediate.div_ceil(tp * unit) * unit;
        let vocab = config.vocab_size;
        Ok(ShardPlan {
            tp,
            heads_per_rank: heads / tp,
            kv_heads_per_rank,
            kv_replicas,
            intermediate,
            intermediate_per_rank,
            intermediate_padded: intermediate_per_rank * tp,
            vocab,
            vocab_parallel: tp > 1 && vocab.is_multiple_of(tp),
            group_size,
            head_dim: d,
        })
    }

    /// Rank `r`'s share.
    pub fn rank(&self, r: usize) -> RankShard {
        assert!(r < self.tp, "rank {r} of {}", self.tp);
        let heads = r * self.heads_per_rank..(r + 1) * self.heads_per_rank;
        let kv_start = if self.kv_replicas > 1 {
            r / self.kv_replicas
        } else {
            r * self.kv_heads_per_rank
        };
        let inter = r * self.intermediate_per_rank..(r + 1) * self.intermediate_per_rank;
        let real = inter.start.min(self.intermediate)..inter.end.min(self.intermediate);
        let vocab = if self.vocab_parallel {
            let per = self.vocab / self.tp;
            r * per..(r + 1) * per
        } else {
            0..self.vocab
        };
        RankShard {
            rank: r,
            tp: self.tp,
            heads,
            kv_heads: kv_start..kv_start + self.kv_heads_per_rank,
            intermediate: inter,
            intermediate_real: real,
            vocab,
            head_dim: self.head_dim,
        }
    }

    /// Every rank's share.
    pub fn ranks(&self) -> Vec<RankShard> {
        (0..self.tp).map(|r| self.rank(r)).collect()
    }

    /// Zero padding added to the intermediate dimension in total.
    pub fn intermediate_padding(&self) -> usize {
        self.intermediate_padded - self.intermediate
    }
}

/// One tensor of a rank's share, as the plan lays it out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorShard {
    /// The checkpoint tensor it comes from.
    pub name: String,
    /// Its element type when the format fixes it (AWQ); `None` for dense tensors, which keep
    /// the checkpoint's.
    #[serde(skip)]
    pub dtype: Option<Dtype>,
    /// The rank's shape.
    pub shape: Vec<usize>,
    /// Zero features the rank adds (padding of the intermediate dimension).
    pub padding: usize,
    pub split: Split,
}

impl TensorShard {
    fn new(name: String, dtype: Option<Dtype>, shape: Vec<usize>, padding: usize, split: Split) -> Self {
        TensorShard {
            name,
            dtype,
            shape,
            padding,
            split,
        }
    }

    /// Bytes of the rank's tensor, dense tensors being of type `dense`.
    pub fn bytes(&self, dense: Dtype) -> u64 {
        let element = self.dtype.unwrap_or(dense).bitsize() / 8;
        self.shape.iter().product::<usize>() as u64 * element as u64
    }
}

/// The tensors rank `shard` holds for layer `layer` (and, with `globals`, the embeddings,
/// lm_head and final norm first), in checkpoint terms.
pub fn rank_tensors(
    config: &ModelConfig,
    shard: &RankShard,
    layer: usize,
    globals: bool,
) -> Vec<TensorShard> {
    let mut out = Vec::new();
    if globals {
        out.push(shard.vocab_tensor(config, names::EMBED_TOKENS));
        if !config.tie_word_embeddings {
            out.push(shard.vocab_tensor(config, names::LM_HEAD));
        }
        out.push(RankShard::norm_tensor(
            names::FINAL_NORM.into(),
            config.hidden_size,
        ));
    }
    out.extend(shard.layer_tensors(config, layer));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint::QuantizationConfig;

    fn config(heads: usize, kv: usize, hidden: usize, inter: usize, group: Option<usize>) -> ModelConfig {
        let mut value = serde_json::json!({"architectures":["LlamaForCausalLM"],"hidden_size":hidden,
            "intermediate_size":inter,"num_hidden_layers":2,"num_attention_heads":heads,
            "num_key_value_heads":kv,"rms_norm_eps":1e-5,"vocab_size":49152});
        if let Some(g) = group {
            value["quantization_config"] = QuantizationConfig {
                group_size: g,
                modules_to_not_convert: vec![],
            }
            .to_json();
        }
        ModelConfig::from_json(&value, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn smollm2_splits_three_ways_and_refuses_two() {
        let c = config(9, 3, 576, 1536, Some(64));
        let plan = ShardPlan::new(&c, 3).unwrap();
        assert_eq!(
            (plan.heads_per_rank, plan.kv_heads_per_rank, plan.kv_replicas),
            (3, 1, 1)
        );
        assert_eq!(
            (plan.intermediate_per_rank, plan.intermediate_padding()),
            (512, 0)
        );
        assert!(plan.vocab_parallel);
        let r2 = &plan.ranks()[2];
        assert_eq!(r2.range(Projection::Q).0, 384..576);
        assert_eq!(r2.range(Projection::K).0, 128..192);
        assert_eq!(r2.vocab, 32768..49152);
        let err = ShardPlan::new(&c, 2).unwrap_err().to_string();
        assert!(err.contains("9 attention heads are not divisible by 2"), "{err}");
        assert!(
            err.ends_with("tp values that work for this model: 1, 3, 9"),
            "{err}"
        );
        // tp = 9: one head per rank, each of the 3 kv heads replicated on 3 ranks.
        let plan = ShardPlan::new(&config(9, 3, 576, 1536, None), 9).unwrap();
        assert_eq!((plan.kv_heads_per_rank, plan.kv_replicas), (1, 3));
        assert_eq!(plan.rank(4).kv_heads, 1..2);
        assert!(
            ShardPlan::new(&c, 0)
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
        assert!(
            ShardPlan::new(&c, 12)
                .unwrap_err()
                .to_string()
                .contains("exceeds the 9 attention heads")
        );
    }

    #[test]
    fn llama2_7b_like_intermediate_is_padded() {
        // 11008 = 86 groups of 128: tp = 4 pads to 88 groups, 2816 features per rank.
        let c = config(32, 32, 4096, 11008, Some(128));
        let plan = ShardPlan::new(&c, 4).unwrap();
        assert_eq!(plan.intermediate_per_rank, 2816);
        assert_eq!(plan.intermediate_padding(), 256);
        let last = plan.rank(3);
        assert_eq!(last.intermediate, 8448..11264);
        assert_eq!(last.intermediate_real, 8448..11008);
        // Dense models pad only to whole features.
        let dense = ShardPlan::new(&config(32, 32, 4096, 11009, None), 4).unwrap();
        assert_eq!(
            (dense.intermediate_per_rank, dense.intermediate_padding()),
            (2753, 3)
        );
    }

    #[test]
    fn rank_tensors_list_shapes_and_padding() {
        let c = config(32, 32, 4096, 11008, Some(128));
        let plan = ShardPlan::new(&c, 4).unwrap();
        let last = rank_tensors(&c, &plan.rank(3), 0, true);
        let find = |name: &str| last.iter().find(|t| t.name == name).unwrap().clone();
        let gate = find("model.layers.0.mlp.gate_proj.qweight");
        assert_eq!(
            (gate.shape, gate.padding, gate.split),
            (vec![4096, 2816 / 8], 256, Split::Columns)
        );
        let down = find("model.layers.0.mlp.down_proj.scales");
        assert_eq!(
            (down.shape, down.padding, down.split),
            (vec![2816 / 128, 4096], 256, Split::Rows)
        );
        assert_eq!(find("model.embed_tokens.weight").shape, vec![49152 / 4, 4096]);
        assert_eq!(
            rank_tensors(&c, &plan.rank(0), 0, false)
                .iter()
                .map(|t| t.padding)
                .max(),
            Some(0)
        );
    }

    #[test]
    fn misaligned_attention_is_refused() {
        // 8 heads of 48 → tp = 4 gives o_proj 96 inputs per rank: not whole groups of 64.
        let c = config(8, 8, 384, 1024, Some(64));
        let err = ShardPlan::new(&c, 4).unwrap_err().to_string();
        assert!(
            err.contains("self_attn.o_proj") && err.contains("96 input features"),
            "{err}"
        );
        assert!(ShardPlan::new(&c, 2).is_ok());
    }
}
