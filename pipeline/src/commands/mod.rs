//! One module per `awq` subcommand.

pub mod batch;
pub mod bench;
pub mod bench_generate;
#[cfg(feature = "cuda")]
pub mod bench_kernels;
pub mod bench_scale;
pub mod devices;
pub mod eval;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod merge;
pub mod plan;
pub mod quantize;
pub mod run;
pub mod shard;
pub mod synth;

use checkpoint::ModelConfig;
use tp_runtime::planner::DtypeName;

/// A model's configuration in one line, as `awq inspect` and `awq plan` print it:
/// architecture, sizes, rope theta, whether the lm_head is tied, AWQ or dense, and the type of
/// the dense tensors (f16 where `config.json` names none, as the planner assumes).
pub fn model_summary(c: &ModelConfig) -> String {
    let dense = format!("{:?}", DtypeName::of(c)).to_lowercase();
    format!(
        "{} with {} layers, hidden {}, intermediate {}, {} heads ({} kv) of {}, vocab {}, rope theta {}, {} lm_head; {}",
        c.architecture.hf_name(),
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.vocab_size,
        c.rope_theta,
        if c.tie_word_embeddings { "tied" } else { "untied" },
        match &c.quantization {
            Some(q) => format!("AWQ g{}, {dense} dense tensors", q.group_size),
            None => format!("dense {dense}"),
        }
    )
}
