//! The Hugging Face tensor names of a Llama-family decoder, and the shape each tensor has
//! under a configuration.

use serde::{Deserialize, Serialize};

use crate::awq::AwqShape;
use crate::config::ModelConfig;

/// The token embedding table, `[vocab, hidden]`.
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// The final norm, `[hidden]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The output projection, `[vocab, hidden]` (absent when tied to the embeddings).
pub const LM_HEAD: &str = "lm_head.weight";
/// A layer's norm before attention, `[hidden]`.
pub const INPUT_LAYERNORM: &str = "input_layernorm.weight";
/// A layer's norm before the MLP, `[hidden]`; with sandwich norms (Gemma), the norm of the
/// attention block's output instead.
pub const POST_ATTENTION_LAYERNORM: &str = "post_attention_layernorm.weight";
/// A layer's norm before the MLP where the blocks have sandwich norms (Gemma), `[hidden]`.
pub const PRE_FEEDFORWARD_LAYERNORM: &str = "pre_feedforward_layernorm.weight";
/// A layer's norm of the MLP's output (Gemma), `[hidden]`.
pub const POST_FEEDFORWARD_LAYERNORM: &str = "post_feedforward_layernorm.weight";
/// A layer's norm of each query head, `[head_dim]` (Qwen3, Gemma 3).
pub const Q_NORM: &str = "self_attn.q_norm.weight";
/// A layer's norm of each key head, `[head_dim]` (Qwen3, Gemma 3).
pub const K_NORM: &str = "self_attn.k_norm.weight";

/// The norms of a decoder layer under `config`, as `(suffix, length)`: the block norms (two,
/// or four with sandwich norms), then q/k head norms where it has them. Every rank holds
/// them whole.
pub fn layer_norms(config: &ModelConfig) -> Vec<(&'static str, usize)> {
    let mut norms = vec![
        (INPUT_LAYERNORM, config.hidden_size),
        (POST_ATTENTION_LAYERNORM, config.hidden_size),
    ];
    if config.sandwich_norms {
        norms.extend([
            (PRE_FEEDFORWARD_LAYERNORM, config.hidden_size),
            (POST_FEEDFORWARD_LAYERNORM, config.hidden_size),
        ]);
    }
    if config.qk_norm {
        norms.extend([(Q_NORM, config.head_dim), (K_NORM, config.head_dim)]);
    }
    norms
}

/// The norm of a layer's MLP input under `config`: `post_attention_layernorm`, or
/// `pre_feedforward_layernorm` where the blocks have sandwich norms.
pub fn mlp_input_norm(config: &ModelConfig) -> &'static str {
    match config.sandwich_norms {
        true => PRE_FEEDFORWARD_LAYERNORM,
        false => POST_ATTENTION_LAYERNORM,
    }
}

/// The norms of a layer's attention and MLP outputs, before each residual add, where the
/// blocks have sandwich norms (Gemma).
pub fn block_output_norms(config: &ModelConfig) -> Option<[&'static str; 2]> {
    config
        .sandwich_norms
        .then_some([POST_ATTENTION_LAYERNORM, POST_FEEDFORWARD_LAYERNORM])
}

/// Phi-3's fused q/k/v projection: q, k and v outputs one after another.
pub const QKV_PROJ: &str = "self_attn.qkv_proj";
/// Phi-3's fused gate/up projection: gate outputs, then up outputs.
pub const GATE_UP_PROJ: &str = "mlp.gate_up_proj";

/// A linear projection of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// All seven, in execution order.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// Its position in [`Projection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module path inside a layer (`self_attn.q_proj`, `mlp.down_proj`, ...).
    pub fn module(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }

    /// `model.layers.{layer}.{module}`: the prefix of its tensors where it is stored alone
    /// (and in a rank file, which stores every projection alone).
    pub fn prefix(self, layer: usize) -> String {
        layer_tensor_name(layer, self.module())
    }

    /// Where `config`'s checkpoints store it: the stored linear and its output rows there.
    pub fn stored(self, config: &ModelConfig) -> (StoredLinear, std::ops::Range<usize>) {
        let stored = StoredLinear::of(config)
            .into_iter()
            .find(|s| s.parts.contains(&self))
            .expect("every projection is stored");
        let start: usize = stored
            .parts
            .iter()
            .take_while(|&&p| p != self)
            .map(|p| p.shape(config).0)
            .sum();
        (stored, start..start + self.shape(config).0)
    }

    /// The prefix of the tensors that hold it in `config`'s checkpoints (`…qkv_proj` for
    /// Phi-3's q): what `modules_to_not_convert` names.
    pub fn stored_prefix(self, config: &ModelConfig, layer: usize) -> String {
        self.stored(config).0.prefix(layer)
    }

    /// `(out_features, in_features)` under `config`.
    pub fn shape(self, config: &ModelConfig) -> (usize, usize) {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        match self {
            Projection::Q => (config.q_features(), h),
            Projection::K | Projection::V => (config.kv_features(), h),
            Projection::O => (h, config.q_features()),
            Projection::Gate | Projection::Up => (i, h),
            Projection::Down => (h, i),
        }
    }

    /// Whether it carries a bias under `config`.
    pub fn has_bias(self, config: &ModelConfig) -> bool {
        match self {
            Projection::Q | Projection::K | Projection::V => config.qkv_bias,
            Projection::O => config.o_bias,
            _ => false,
        }
    }

    /// Whether layer `layer`'s projection is stored as AWQ under `config`.
    pub fn is_quantized(self, config: &ModelConfig, layer: usize) -> bool {
        config
            .quantization
            .as_ref()
            .is_some_and(|q| q.converts(&self.stored_prefix(config, layer)))
    }
}

/// Each projection alone, as the parts of an unfused [`StoredLinear`].
static ALONE: [Projection; 7] = Projection::ALL;

/// A linear layer as a checkpoint stores it: one projection, or several fused into one tensor
/// whose outputs are theirs one after another (Phi-3's `qkv_proj` and `gate_up_proj`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredLinear {
    /// The module path inside a layer.
    pub module: &'static str,
    /// The projections it holds, in output order.
    pub parts: &'static [Projection],
}

impl StoredLinear {
    /// The stored linears of a layer under `config`, in execution order.
    pub fn of(config: &ModelConfig) -> Vec<StoredLinear> {
        const QKV: [Projection; 3] = [Projection::Q, Projection::K, Projection::V];
        const GATE_UP: [Projection; 2] = [Projection::Gate, Projection::Up];
        let alone = |p: Projection| StoredLinear {
            module: p.module(),
            parts: std::slice::from_ref(&ALONE[p.index()]),
        };
        match config.fused_projections {
            true => vec![
                StoredLinear {
                    module: QKV_PROJ,
                    parts: &QKV,
                },
                alone(Projection::O),
                StoredLinear {
                    module: GATE_UP_PROJ,
                    parts: &GATE_UP,
                },
                alone(Projection::Down),
            ],
            false => Projection::ALL.map(alone).to_vec(),
        }
    }

    /// `model.layers.{layer}.{module}`.
    pub fn prefix(&self, layer: usize) -> String {
        layer_tensor_name(layer, self.module)
    }

    /// `(out_features, in_features)` under `config`: the parts' outputs together.
    pub fn shape(&self, config: &ModelConfig) -> (usize, usize) {
        let out = self.parts.iter().map(|p| p.shape(config).0).sum();
        (out, self.parts[0].shape(config).1)
    }
}

/// `model.layers.{layer}.{suffix}`.
pub fn layer_tensor_name(layer: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{suffix}")
}

/// A tensor a checkpoint of some configuration holds: name, element type and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// `None` for dense tensors, whose element type is the checkpoint's choice.
    pub dtype: Option<safetensors::Dtype>,
    pub shape: Vec<usize>,
}

/// The tensors of one stored linear under `config`: `weight` (dense) or the three AWQ
/// tensors, then the bias if it has one.
pub fn stored_tensors(config: &ModelConfig, layer: usize, stored: &StoredLinear) -> Vec<TensorInfo> {
    let prefix = stored.prefix(layer);
    let (out_features, in_features) = stored.shape(config);
    let mut out = match &config.quantization {
        Some(q) if q.converts(&prefix) => AwqShape {
            in_features,
            out_features,
            group_size: q.group_size,
        }
        .tensors(&prefix)
        .into_iter()
        .map(|(name, dtype, shape)| TensorInfo {
            name,
            dtype: Some(dtype),
            shape: shape.to_vec(),
        })
        .collect(),
        _ => vec![TensorInfo {
            name: format!("{prefix}.weight"),
            dtype: None,
            shape: vec![out_features, in_features],
        }],
    };
    if stored.parts[0].has_bias(config) {
        out.push(TensorInfo {
            name: format!("{prefix}.bias"),
            dtype: None,
            shape: vec![out_features],
        });
    }
    out
}

/// Every tensor a checkpoint of this configuration must hold, with its shape.
pub fn required_tensors(config: &ModelConfig) -> Vec<TensorInfo> {
    let (v, h) = (config.vocab_size, config.hidden_size);
    let dense = |name: String, shape: Vec<usize>| TensorInfo {
        name,
        dtype: None,
        shape,
    };
    let mut out = vec![
        dense(EMBED_TOKENS.into(), vec![v, h]),
        dense(FINAL_NORM.into(), vec![h]),
    ];
    if !config.tie_word_embeddings {
        out.push(dense(LM_HEAD.into(), vec![v, h]));
    }
    for layer in 0..config.num_hidden_layers {
        for (norm, len) in layer_norms(config) {
            out.push(dense(layer_tensor_name(layer, norm), vec![len]));
        }
        for stored in StoredLinear::of(config) {
            out.extend(stored_tensors(config, layer, &stored));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projections_index_in_execution_order() {
        for (i, p) in Projection::ALL.into_iter().enumerate() {
            assert_eq!(p.index(), i);
        }
        assert_eq!(Projection::Down.prefix(3), "model.layers.3.mlp.down_proj");
    }

    #[test]
    fn required_tensors_follow_quantization_and_tying() {
        let value = serde_json::json!({"architectures":["Qwen2ForCausalLM"],"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"rms_norm_eps":1e-5,"vocab_size":100,
            "tie_word_embeddings":true,
            "quantization_config":{"quant_method":"awq","bits":4,"group_size":32,
                "zero_point":true,"version":"gemm","modules_to_not_convert":["layers.1.mlp.down_proj"]}});
        let config = ModelConfig::from_json(&value, std::path::Path::new("config.json")).unwrap();
        let all = required_tensors(&config);
        let names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
        assert!(!names.contains(&LM_HEAD));
        assert!(names.contains(&"model.layers.0.mlp.down_proj.qweight"));
        assert!(names.contains(&"model.layers.1.mlp.down_proj.weight"));
        assert!(names.contains(&"model.layers.1.self_attn.k_proj.bias"));
        let k = all
            .iter()
            .find(|t| t.name == "model.layers.0.self_attn.k_proj.scales")
            .unwrap();
        assert_eq!(k.shape, vec![64 / 32, 32]);
    }
}
