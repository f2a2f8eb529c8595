//! The Llama-family decoder, written once against [`Backend`].

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::backend::{
    AttentionSpec, Backend, ByteSize, Prediction, RopeFrequencies, SeqLayout, combine_nll_parts,
};
use crate::checkpoint::Checkpoint;
use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::shard::{RankShard, read_linear, read_vocab_rows};
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

/// Every tensor a checkpoint of this configuration must hold.
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
            match &config.quantization {
                Some(q) if q.converts(&p.prefix(layer)) => {
                    for suffix in ["qweight", "qzeros", "scales"] {
                        names.push(format!("{}.{suffix}", p.prefix(layer)));
                    }
                }
                _ => names.push(format!("{}.weight", p.prefix(layer))),
            }
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
    /// Reads `shard`'s part of projection `p` of layer `layer`: dense `{prefix}.weight` or,
    /// for AWQ checkpoints, `{prefix}.qweight/qzeros/scales`; and its bias.
    pub fn load(
        backend: &B,
        checkpoint: &Checkpoint,
        config: &ModelConfig,
        layer: usize,
        p: Projection,
        shard: &RankShard,
    ) -> Result<Self> {
        let part = read_linear(checkpoint, config, layer, p, shard)?;
        let (out_features, in_features) = (part.weight.out_features(), part.weight.in_features());
        Ok(Linear {
            weight: backend.linear(part.weight)?,
            bias: part.bias.map(|b| backend.vector(b)).transpose()?,
            out_features,
            in_features,
        })
    }

    /// `x · Wᵀ (+ bias)`.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        backend.linear_forward(x, &self.weight, self.bias.as_ref())
    }

    /// Bytes held by the weight and bias.
    pub fn byte_size(&self) -> usize {
        self.weight.byte_size() + self.bias.as_ref().map_or(0, ByteSize::byte_size)
    }
}

/// Collectives of a tensor-parallel rank, on its backend's buffers.
pub type Comm<B> = Arc<dyn Communicator<<B as Backend>::Buffer>>;

/// Per-forward state shared by all layers.
pub struct ForwardContext<B: Backend> {
    pub layout: SeqLayout,
    pub rope_table: B::Tensor,
    pub attention: AttentionSpec,
    pub rms_norm_eps: f32,
    /// Sums the partial outputs of row-parallel projections across ranks (`None`: one rank).
    pub comm: Option<Comm<B>>,
}

impl<B: Backend> ForwardContext<B> {
    /// The context for the whole model on one rank.
    pub fn new(backend: &B, config: &ModelConfig, layout: &SeqLayout) -> Result<Self> {
        Self::for_shard(backend, config, layout, &RankShard::whole(config), None)
    }

    /// The context for one rank of a tensor-parallel group.
    pub fn for_shard(
        backend: &B,
        config: &ModelConfig,
        layout: &SeqLayout,
        shard: &RankShard,
        comm: Option<Comm<B>>,
    ) -> Result<Self> {
        let rope = RopeFrequencies::new(config.head_dim, config.rope_theta);
        Ok(ForwardContext {
            rope_table: backend.rope_table(&rope, &layout.positions())?,
            layout: layout.clone(),
            attention: AttentionSpec {
                heads: shard.heads.len(),
                kv_heads: shard.kv_heads.len(),
                head_dim: config.head_dim,
                sliding_window: config.sliding_window,
                scale: 1.0 / (config.head_dim as f32).sqrt(),
            },
            rms_norm_eps: config.rms_norm_eps,
            comm,
        })
    }

    /// Completes a row-parallel projection's output: the sum over ranks.
    fn reduce(&self, backend: &B, x: &mut B::Tensor) -> Result<()> {
        match &self.comm {
            Some(comm) => comm.all_reduce_sum(backend.buffer_mut(x)),
            None => Ok(()),
        }
    }
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
    /// Reads layer `index` (all of it) from the checkpoint.
    pub fn load(backend: &B, checkpoint: &Checkpoint, config: &ModelConfig, index: usize) -> Result<Self> {
        Self::load_shard(backend, checkpoint, config, index, &RankShard::whole(config))
    }

    /// Reads `shard`'s part of layer `index`.
    pub fn load_shard(
        backend: &B,
        checkpoint: &Checkpoint,
        config: &ModelConfig,
        index: usize,
        shard: &RankShard,
    ) -> Result<Self> {
        let norm = |suffix: &str| -> Result<B::Vector> {
            let t = checkpoint.tensor_with_shape(&layer_tensor_name(index, suffix), &[config.hidden_size])?;
            backend.vector(t.to_f32()?)
        };
        let linear = |p: Projection| Linear::load(backend, checkpoint, config, index, p, shard);
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

    /// Bytes held by the layer's weights.
    pub fn byte_size(&self) -> usize {
        self.input_layernorm.byte_size()
            + self.post_attention_layernorm.byte_size()
            + Projection::ALL
                .iter()
                .map(|&p| self.projection(p).byte_size())
                .sum::<usize>()
    }

    /// The attention block's output (before the residual add) for normed input `h`.
    pub fn attention(&self, backend: &B, h: &B::Tensor, ctx: &ForwardContext<B>) -> Result<B::Tensor> {
        let a = self_attention(backend, [&self.q_proj, &self.k_proj, &self.v_proj], h, ctx)?;
        let mut out = self.o_proj.forward(backend, &a)?;
        ctx.reduce(backend, &mut out)?;
        Ok(out)
    }

    /// The MLP block's output (before the residual add) for normed input `h`.
    pub fn mlp(&self, backend: &B, h: &B::Tensor, ctx: &ForwardContext<B>) -> Result<B::Tensor> {
        let act = gated_activation(backend, &self.gate_proj, &self.up_proj, h)?;
        let mut out = self.down_proj.forward(backend, &act)?;
        ctx.reduce(backend, &mut out)?;
        Ok(out)
    }

    /// Runs the layer on the residual stream `x` in place.
    pub fn forward(&self, backend: &B, x: &mut B::Tensor, ctx: &ForwardContext<B>) -> Result<()> {
        self.forward_tapped(backend, x, ctx, &mut |_, _| Ok(()))
    }

    /// Like [`DecoderLayer::forward`], showing `tap` the input of every projection group:
    /// `Q` (the normed input of q/k/v), `O`, `Gate` (the normed input of gate/up) and `Down`.
    pub fn forward_tapped(
        &self,
        backend: &B,
        x: &mut B::Tensor,
        ctx: &ForwardContext<B>,
        tap: &mut dyn FnMut(Projection, &B::Tensor) -> Result<()>,
    ) -> Result<()> {
        let h = backend.rms_norm(x, &self.input_layernorm, ctx.rms_norm_eps)?;
        tap(Projection::Q, &h)?;
        let a = self_attention(backend, [&self.q_proj, &self.k_proj, &self.v_proj], &h, ctx)?;
        tap(Projection::O, &a)?;
        let mut attn = self.o_proj.forward(backend, &a)?;
        ctx.reduce(backend, &mut attn)?;
        backend.add_assign(x, &attn)?;
        let h = backend.rms_norm(x, &self.post_attention_layernorm, ctx.rms_norm_eps)?;
        tap(Projection::Gate, &h)?;
        let act = gated_activation(backend, &self.gate_proj, &self.up_proj, &h)?;
        tap(Projection::Down, &act)?;
        let mut mlp = self.down_proj.forward(backend, &act)?;
        ctx.reduce(backend, &mut mlp)?;
        backend.add_assign(x, &mlp)
    }
}

/// Multi-head attention before o_proj: q/k/v projections of `h`, rotary embeddings, causal
/// attention within each sequence.
pub fn self_attention<B: Backend>(
    backend: &B,
    [q_proj, k_proj, v_proj]: [&Linear<B>; 3],
    h: &B::Tensor,
    ctx: &ForwardContext<B>,
) -> Result<B::Tensor> {
    let mut q = q_proj.forward(backend, h)?;
    let mut k = k_proj.forward(backend, h)?;
    let v = v_proj.forward(backend, h)?;
    backend.rotary(&mut q, &ctx.rope_table, ctx.attention.head_dim)?;
    backend.rotary(&mut k, &ctx.rope_table, ctx.attention.head_dim)?;
    backend.attention(&q, &k, &v, &ctx.attention, &ctx.layout)
}

/// `silu(h · gateᵀ) * (h · upᵀ)`: the input of down_proj.
pub fn gated_activation<B: Backend>(
    backend: &B,
    gate: &Linear<B>,
    up: &Linear<B>,
    h: &B::Tensor,
) -> Result<B::Tensor> {
    let g = gate.forward(backend, h)?;
    let u = up.forward(backend, h)?;
    backend.silu_mul(&g, &u)
}

/// A causal language model on one backend: the whole model, or one rank's share of it.
pub struct Model<B: Backend> {
    backend: B,
    config: ModelConfig,
    shard: RankShard,
    comm: Option<Comm<B>>,
    /// Rows `shard.vocab` of the embedding table.
    embed_tokens: B::Matrix,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<B::Matrix>,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Vector,
}

impl<B: Backend> Model<B> {
    /// Loads `dir/config.json` and the checkpoint beside it.
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &checkpoint, backend)
    }

    /// Builds the whole model from an opened checkpoint.
    pub fn from_checkpoint(config: ModelConfig, checkpoint: &Checkpoint, backend: B) -> Result<Self> {
        let shard = RankShard::whole(&config);
        Self::load_rank(config, checkpoint, backend, shard, None)
    }

    /// Builds one rank's share of the model; `comm` joins it to the other ranks (`None` for
    /// the whole model on one rank).
    pub fn load_rank(
        config: ModelConfig,
        checkpoint: &Checkpoint,
        backend: B,
        shard: RankShard,
        comm: Option<Comm<B>>,
    ) -> Result<Self> {
        if shard.tp > 1 && comm.as_ref().is_none_or(|c| c.world_size() != shard.tp) {
            return Err(Error::Invalid(format!(
                "rank {} of {} needs a communicator of that size",
                shard.rank, shard.tp
            )));
        }
        let rows = shard.vocab.len();
        let hidden = config.hidden_size;
        let embed_tokens = backend.matrix(
            read_vocab_rows(checkpoint, "model.embed_tokens.weight", &config, &shard)?,
            rows,
            hidden,
        )?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(backend.matrix(
                read_vocab_rows(checkpoint, "lm_head.weight", &config, &shard)?,
                rows,
                hidden,
            )?)
        };
        let norm_t = checkpoint.tensor_with_shape("model.norm.weight", &[hidden])?;
        let norm = backend.vector(norm_t.to_f32()?)?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load_shard(&backend, checkpoint, &config, i, &shard))
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            backend,
            config,
            shard,
            comm,
            embed_tokens,
            lm_head,
            layers,
            norm,
        })
    }

    /// The configuration (of the whole model).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The share of the model this instance holds.
    pub fn shard(&self) -> &RankShard {
        &self.shard
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

    /// Bytes held by this instance's weights.
    pub fn weight_bytes(&self) -> usize {
        self.embed_tokens.byte_size()
            + self.lm_head.as_ref().map_or(0, ByteSize::byte_size)
            + self.norm.byte_size()
            + self.layers.iter().map(DecoderLayer::byte_size).sum::<usize>()
    }

    fn vocab_parallel(&self) -> bool {
        self.shard.vocab.len() < self.config.vocab_size
    }

    /// The per-forward context for a batch laid out as `layout`.
    pub fn context(&self, layout: &SeqLayout) -> Result<ForwardContext<B>> {
        ForwardContext::for_shard(
            &self.backend,
            &self.config,
            layout,
            &self.shard,
            self.comm.clone(),
        )
    }

    /// Embeddings of `ids`: the residual stream entering layer 0.
    pub fn embed(&self, ids: &[u32]) -> Result<B::Tensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {id} is outside the vocabulary of {} entries",
                self.config.vocab_size
            )));
        }
        let mut x = self
            .backend
            .embed(&self.embed_tokens, ids, self.shard.vocab.start)?;
        if self.vocab_parallel()
            && let Some(comm) = &self.comm
        {
            comm.all_reduce_sum(self.backend.buffer_mut(&mut x))?;
        }
        Ok(x)
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

    /// Gathers a `[rows, cols]` tensor from every rank into `[ranks, rows, cols]` on the host.
    fn gather(&self, local: &B::Tensor) -> Result<Vec<f32>> {
        match (&self.comm, self.vocab_parallel()) {
            (Some(comm), true) => {
                let (rows, cols) = self.backend.dims(local);
                let ranks = comm.world_size();
                let mut all = self
                    .backend
                    .tensor(&vec![0.0; ranks * rows * cols], ranks * rows, cols)?;
                comm.all_gather(self.backend.buffer(local), self.backend.buffer_mut(&mut all))?;
                self.backend.to_host(&all)
            }
            _ => self.backend.to_host(local),
        }
    }

    /// Negative log-likelihood of each prediction, from final hidden states. With a split
    /// vocabulary, each rank reduces its own logits and only three numbers per prediction
    /// cross ranks.
    pub fn token_nll(&self, hidden: &B::Tensor, predictions: &[Prediction]) -> Result<Vec<f32>> {
        let rows = self.backend.dims(hidden).0;
        if let Some(p) = predictions
            .iter()
            .find(|p| p.row >= rows || p.target as usize >= self.config.vocab_size)
        {
            return Err(Error::Invalid(format!(
                "prediction of token {} at row {} is out of range ({rows} rows, vocabulary {})",
                p.target, p.row, self.config.vocab_size
            )));
        }
        let parts = self
            .backend
            .nll_parts(hidden, self.lm_head(), predictions, self.shard.vocab.start)?;
        let slices = if self.vocab_parallel() { self.shard.tp } else { 1 };
        Ok(combine_nll_parts(&self.gather(&parts)?, slices))
    }

    /// Full logits of the given rows, from final hidden states, on the host.
    pub fn logits(&self, hidden: &B::Tensor, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        let local = self.backend.logits(hidden, self.lm_head(), rows)?;
        let all = self.gather(&local)?;
        let per = self.shard.vocab.len();
        let slices = all.len() / (rows.len() * per).max(1);
        Ok((0..rows.len())
            .map(|r| {
                (0..slices)
                    .flat_map(|s| {
                        all[(s * rows.len() + r) * per..(s * rows.len() + r + 1) * per]
                            .iter()
                            .copied()
                    })
                    .collect()
            })
            .collect())
    }
}

/// Anything that scores next-token predictions: a model, or a tensor-parallel group.
pub trait Scorer {
    /// The configuration of the whole model.
    fn config(&self) -> &ModelConfig;
    /// NLL of each prediction after a forward pass over `ids` laid out as `layout`.
    fn score(&self, ids: &[u32], layout: &SeqLayout, predictions: &[Prediction]) -> Result<Vec<f32>>;
}

impl<B: Backend> Scorer for Model<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn score(&self, ids: &[u32], layout: &SeqLayout, predictions: &[Prediction]) -> Result<Vec<f32>> {
        let hidden = self.forward(ids, layout)?;
        self.token_nll(&hidden, predictions)
    }
}
