//! The Llama-family decoder, written once against [`Backend`].

use std::path::Path;

use serde::Serialize;

use crate::backend::{AttentionSpec, Backend, LinearWeight, Prediction, RopeFrequencies, SeqLayout};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::{Error, Result};

/// A linear projection of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
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

    /// `model.layers.{layer}.{module}`: the prefix of its tensors.
    pub fn prefix(self, layer: usize) -> String {
        layer_tensor_name(layer, self.module())
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
}

/// `model.layers.{layer}.{suffix}`.
pub fn layer_tensor_name(layer: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{suffix}")
}

/// Every tensor a dense checkpoint of this configuration must hold.
pub fn required_tensor_names(config: &ModelConfig) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    if !config.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for layer in 0..config.num_hidden_layers {
        names.push(layer_tensor_name(layer, "input_layernorm.weight"));
        names.push(layer_tensor_name(layer, "post_attention_layernorm.weight"));
        for p in Projection::ALL {
            names.push(format!("{}.weight", p.prefix(layer)));
            if p.has_bias(config) {
                names.push(format!("{}.bias", p.prefix(layer)));
            }
        }
    }
    names
}

/// A projection: weight and optional bias.
pub struct Linear<B: Backend> {
    pub weight: B::Linear,
    pub bias: Option<B::Vector>,
    pub out_features: usize,
    pub in_features: usize,
}

impl<B: Backend> Linear<B> {
    /// Reads `{prefix}.weight` (and `{prefix}.bias` when `bias`) with the given shape.
    pub fn load(
        backend: &B,
        checkpoint: &Checkpoint,
        prefix: &str,
        (out_features, in_features): (usize, usize),
        bias: bool,
    ) -> Result<Self> {
        let w = checkpoint.tensor_with_shape(&format!("{prefix}.weight"), &[out_features, in_features])?;
        let weight = backend.linear(LinearWeight::Dense {
            data: w.to_f32()?,
            out_features,
            in_features,
        })?;
        let bias = if bias {
            let b = checkpoint.tensor_with_shape(&format!("{prefix}.bias"), &[out_features])?;
            Some(backend.vector(b.to_f32()?)?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            out_features,
            in_features,
        })
    }

    /// `x · Wᵀ (+ bias)`.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        backend.linear_forward(x, &self.weight, self.bias.as_ref())
    }
}

/// Per-forward state shared by all layers.
pub struct ForwardContext<B: Backend> {
    pub layout: SeqLayout,
    pub rope_table: B::Tensor,
    pub attention: AttentionSpec,
    pub rms_norm_eps: f32,
}

/// One decoder layer: attention block and MLP block, each with a pre-norm and a residual.
pub struct DecoderLayer<B: Backend> {
    pub index: usize,
    pub input_layernorm: B::Vector,
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub post_attention_layernorm: B::Vector,
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// Reads layer `index` from the checkpoint.
    pub fn load(backend: &B, checkpoint: &Checkpoint, config: &ModelConfig, index: usize) -> Result<Self> {
        let norm = |suffix: &str| -> Result<B::Vector> {
            let t = checkpoint.tensor_with_shape(&layer_tensor_name(index, suffix), &[config.hidden_size])?;
            backend.vector(t.to_f32()?)
        };
        let linear = |p: Projection| {
            Linear::load(
                backend,
                checkpoint,
                &p.prefix(index),
                p.shape(config),
                p.has_bias(config),
            )
        };
        Ok(DecoderLayer {
            index,
            input_layernorm: norm("input_layernorm.weight")?,
            q_proj: linear(Projection::Q)?,
            k_proj: linear(Projection::K)?,
            v_proj: linear(Projection::V)?,
            o_proj: linear(Projection::O)?,
            post_attention_layernorm: norm("post_attention_layernorm.weight")?,
            gate_proj: linear(Projection::Gate)?,
            up_proj: linear(Projection::Up)?,
            down_proj: linear(Projection::Down)?,
        })
    }

    /// The projection `p` of this layer.
    pub fn projection(&self, p: Projection) -> &Linear<B> {
        match p {
            Projection::Q => &self.q_proj,
            Projection::K => &self.k_proj,
            Projection::V => &self.v_proj,
            Projection::O => &self.o_proj,
            Projection::Gate => &self.gate_proj,
            Projection::Up => &self.up_proj,
            Projection::Down => &self.down_proj,
        }
    }

    /// The attention block's output (before the residual add) for normed input `h`.
    pub fn attention(&self, backend: &B, h: &B::Tensor, ctx: &ForwardContext<B>) -> Result<B::Tensor> {
        let mut q = self.q_proj.forward(backend, h)?;
        let mut k = self.k_proj.forward(backend, h)?;
        let v = self.v_proj.forward(backend, h)?;
        backend.rotary(&mut q, &ctx.rope_table, ctx.attention.head_dim)?;
        backend.rotary(&mut k, &ctx.rope_table, ctx.attention.head_dim)?;
        let a = backend.attention(&q, &k, &v, &ctx.attention, &ctx.layout)?;
        self.o_proj.forward(backend, &a)
    }

    /// The MLP block's output (before the residual add) for normed input `h`.
    pub fn mlp(&self, backend: &B, h: &B::Tensor) -> Result<B::Tensor> {
        let gate = self.gate_proj.forward(backend, h)?;
        let up = self.up_proj.forward(backend, h)?;
        let act = backend.silu_mul(&gate, &up)?;
        self.down_proj.forward(backend, &act)
    }

    /// Runs the layer on the residual stream `x` in place.
    pub fn forward(&self, backend: &B, x: &mut B::Tensor, ctx: &ForwardContext<B>) -> Result<()> {
        let h = backend.rms_norm(x, &self.input_layernorm, ctx.rms_norm_eps)?;
        let attn = self.attention(backend, &h, ctx)?;
        backend.add_assign(x, &attn)?;
        let h = backend.rms_norm(x, &self.post_attention_layernorm, ctx.rms_norm_eps)?;
        let mlp = self.mlp(backend, &h)?;
        backend.add_assign(x, &mlp)
    }
}

/// A whole causal language model on one backend.
pub struct Model<B: Backend> {
    backend: B,
    config: ModelConfig,
    embed_tokens: B::Matrix,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<B::Matrix>,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Vector,
    rope: RopeFrequencies,
}

impl<B: Backend> Model<B> {
    /// Loads `dir/config.json` and the checkpoint beside it.
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &checkpoint, backend)
    }

    /// Builds the model from an opened checkpoint.
    pub fn from_checkpoint(config: ModelConfig, checkpoint: &Checkpoint, backend: B) -> Result<Self> {
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let matrix = |name: &str| -> Result<B::Matrix> {
            let t = checkpoint.tensor_with_shape(name, &[vocab, hidden])?;
            backend.matrix(t.to_f32()?, vocab, hidden)
        };
        let embed_tokens = matrix("model.embed_tokens.weight")?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(matrix("lm_head.weight")?)
        };
        let norm_t = checkpoint.tensor_with_shape("model.norm.weight", &[hidden])?;
        let norm = backend.vector(norm_t.to_f32()?)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&backend, checkpoint, &config, i))
            .collect::<Result<Vec<_>>>()?;
        let rope = RopeFrequencies::new(config.head_dim, config.rope_theta);
        Ok(Model {
            backend,
            config,
            embed_tokens,
            lm_head,
            layers,
            norm,
            rope,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[DecoderLayer<B>] {
        &self.layers
    }

    /// The output projection (the embedding table when tied).
    pub fn lm_head(&self) -> &B::Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// The per-forward context for a batch laid out as `layout`.
    pub fn context(&self, layout: &SeqLayout) -> Result<ForwardContext<B>> {
        let c = &self.config;
        Ok(ForwardContext {
            rope_table: self.backend.rope_table(&self.rope, &layout.positions())?,
            layout: layout.clone(),
            attention: AttentionSpec {
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                sliding_window: c.sliding_window,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
            },
            rms_norm_eps: c.rms_norm_eps,
        })
    }

    /// Embeddings of `ids`: the residual stream entering layer 0.
    pub fn embed(&self, ids: &[u32]) -> Result<B::Tensor> {
        self.backend.embed(&self.embed_tokens, ids)
    }

    /// Final hidden states (after the last norm) of a batch of token sequences.
    pub fn forward(&self, ids: &[u32], layout: &SeqLayout) -> Result<B::Tensor> {
        if ids.len() != layout.rows() {
            return Err(Error::Invalid(format!(
                "{} token ids for a layout of {} rows",
                ids.len(),
                layout.rows()
            )));
        }
        let ctx = self.context(layout)?;
        let mut x = self.embed(ids)?;
        for layer in &self.layers {
            layer.forward(&self.backend, &mut x, &ctx)?;
        }
        self.backend.rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// Negative log-likelihood of each prediction, from final hidden states.
    pub fn token_nll(&self, hidden: &B::Tensor, predictions: &[Prediction]) -> Result<Vec<f32>> {
        self.backend.token_nll(hidden, self.lm_head(), predictions)
    }

    /// Logits of the given rows, from final hidden states.
    pub fn logits(&self, hidden: &B::Tensor, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.backend.logits(hidden, self.lm_head(), rows)
    }
}
