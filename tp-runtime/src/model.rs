//! The Llama-family decoder, written once against [`Backend`].

use std::path::Path;
use std::sync::{Arc, Mutex};

use checkpoint::names::{self, Projection};
use checkpoint::{Activation, Checkpoint, FloatData, LayerType, ModelConfig};

use crate::backend::WeightFormat;
use crate::backend::{
    AttentionLayout, AttentionSpec, Backend, ByteSize, LinearKernel, Prediction, RopeFrequencies, SeqLayout,
    combine_nll_parts, reuse,
};
use crate::comm::Communicator;
use crate::decode::{Decoder, KvCache, LayerCache, last_rows, per_sequence};
use crate::load::{WeightSource, applied_norm, read_linear, read_norm, read_vocab_rows};
use crate::placement::RankPlacement;
use crate::shard::RankShard;
use crate::{Error, Result};

/// A linear projection on a backend: its kernel and optional bias.
pub struct Linear<B: Backend> {
    kernel: Box<dyn LinearKernel<B>>,
    bias: Option<B::Vector>,
}

impl<B: Backend> Linear<B> {
    /// Places `weight` (any format) and `bias` on `backend`.
    pub fn new(backend: &B, weight: Box<dyn WeightFormat>, bias: Option<FloatData>) -> Result<Self> {
        Ok(Linear {
            kernel: backend.linear(weight)?,
            bias: bias.map(|b| backend.vector(b)).transpose()?,
        })
    }

    /// Reads `shard`'s part of projection `p` of layer `layer`: dense `{prefix}.weight` or,
    /// for AWQ checkpoints, `{prefix}.qweight/qzeros/scales`; and its bias. Returns the bytes
    /// read too.
    pub fn load(
        backend: &B,
        source: WeightSource<'_>,
        config: &ModelConfig,
        layer: usize,
        p: Projection,
        shard: &RankShard,
    ) -> Result<(Self, usize)> {
        let part = read_linear(source, config, layer, p, shard)?;
        let bytes = part.stored_bytes();
        Ok((Self::new(backend, part.weight, part.bias)?, bytes))
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.kernel.out_features()
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.kernel.in_features()
    }

    /// `out = x · Wᵀ (+ bias)`.
    pub fn forward_into(&self, backend: &B, x: &B::Tensor, out: &mut B::Tensor) -> Result<()> {
        self.kernel.forward_into(backend, x, out)?;
        match &self.bias {
            Some(bias) => backend.add_bias(out, bias),
            None => Ok(()),
        }
    }

    /// `x · Wᵀ (+ bias)` into a new tensor.
    pub fn forward(&self, backend: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let mut out = backend.alloc(backend.dims(x).0, self.out_features())?;
        self.forward_into(backend, x, &mut out)?;
        Ok(out)
    }

    /// Bytes held by the weight and bias.
    pub fn byte_size(&self) -> usize {
        self.kernel.byte_size() + self.bias.as_ref().map_or(0, ByteSize::byte_size)
    }
}

/// Collectives of a tensor-parallel rank, on its backend's buffers.
pub type Comm<B> = Arc<dyn Communicator<<B as Backend>::Buffer>>;

/// Per-forward state shared by all layers.
pub struct ForwardContext<B: Backend> {
    /// The queries of this pass and where their keys are (the same rows, or a KV cache).
    pub layout: AttentionLayout,
    /// Where the keys are in the sliding-window layers' stores of a KV cache, where those
    /// keep fewer positions than the others ([`KvCache::sliding_layout`]).
    pub sliding_layout: Option<AttentionLayout>,
    pub rope_table: B::Tensor,
    /// The sliding-window layers' table where their rope base differs (Gemma 3).
    pub local_rope_table: Option<B::Tensor>,
    /// The attention of a full-attention layer; a sliding-window layer's adds the window.
    pub attention: AttentionSpec,
    /// The window of the sliding-window layers.
    pub sliding_window: Option<usize>,
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
        Self::attending(backend, config, AttentionLayout::within(layout), shard, comm)
    }

    /// The context of a pass whose keys are laid out as `layout` says (a KV cache).
    pub fn attending(
        backend: &B,
        config: &ModelConfig,
        layout: AttentionLayout,
        shard: &RankShard,
        comm: Option<Comm<B>>,
    ) -> Result<Self> {
        let rope = RopeFrequencies::for_config(config);
        let positions = layout.positions();
        let local_rope_table = match config.local_rope_theta {
            Some(theta) => {
                let local = RopeFrequencies::new(config.rotary_dim, theta);
                Some(backend.rope_table(&local, &positions)?)
            }
            None => None,
        };
        Ok(ForwardContext {
            rope_table: backend.rope_table(&rope, &positions)?,
            local_rope_table,
            layout,
            sliding_layout: None,
            attention: AttentionSpec {
                heads: shard.heads.len(),
                kv_heads: shard.kv_heads.len(),
                head_dim: config.head_dim,
                sliding_window: None,
                // As transformers: the scale in f64, rounded once.
                scale: (1.0 / config.query_pre_attn_scalar.sqrt()) as f32,
                softcap: config.attn_logit_softcapping,
            },
            sliding_window: config.sliding_window,
            rms_norm_eps: config.rms_norm_eps,
            comm,
        })
    }

    /// The attention of a layer of type `layer_type`, its rotary table and where its keys are.
    pub fn for_layer(&self, layer_type: LayerType) -> (AttentionSpec, &B::Tensor, &AttentionLayout) {
        match layer_type {
            LayerType::FullAttention => (self.attention, &self.rope_table, &self.layout),
            LayerType::SlidingAttention => (
                AttentionSpec {
                    sliding_window: self.sliding_window,
                    ..self.attention
                },
                self.local_rope_table.as_ref().unwrap_or(&self.rope_table),
                self.sliding_layout.as_ref().unwrap_or(&self.layout),
            ),
        }
    }

    /// Completes a row-parallel projection's output: the sum over ranks.
    fn reduce(&self, backend: &B, x: &mut B::Tensor) -> Result<()> {
        match &self.comm {
            Some(comm) => comm.all_reduce_sum(backend.buffer_mut(x)),
            None => Ok(()),
        }
    }
}

/// The intermediate tensors of a layer's forward pass, kept from one layer to the next so
/// that a forward pass allocates them once.
pub struct Workspace<B: Backend> {
    normed: Option<B::Tensor>,
    q: Option<B::Tensor>,
    k: Option<B::Tensor>,
    v: Option<B::Tensor>,
    attended: Option<B::Tensor>,
    projected: Option<B::Tensor>,
    gate: Option<B::Tensor>,
    up: Option<B::Tensor>,
    activated: Option<B::Tensor>,
}

impl<B: Backend> Default for Workspace<B> {
    fn default() -> Self {
        Workspace {
            normed: None,
            q: None,
            k: None,
            v: None,
            attended: None,
            projected: None,
            gate: None,
            up: None,
            activated: None,
        }
    }
}

/// Multi-head attention before o_proj: q/k/v projections of `h`, the per-head q/k norms where
/// the model has them (`qk_norms`), rotary embeddings, causal attention within each sequence
/// (within the window on a sliding-window layer), into `ws`'s attention output (returned).
/// With `cache`, the new keys and values are stored in it first and the queries attend to
/// every cached position of their sequence (the layer's layout in `ctx` says where:
/// [`ForwardContext::for_layer`]).
#[allow(clippy::too_many_arguments)]
pub fn self_attention<'w, B: Backend>(
    backend: &B,
    [q_proj, k_proj, v_proj]: [&Linear<B>; 3],
    qk_norms: Option<&[B::Vector; 2]>,
    layer_type: LayerType,
    h: &B::Tensor,
    ctx: &ForwardContext<B>,
    ws: &'w mut Workspace<B>,
    cache: Option<&mut LayerCache<B>>,
) -> Result<&'w B::Tensor> {
    let (spec, rope_table, layout) = ctx.for_layer(layer_type);
    let rows = backend.dims(h).0;
    let q = reuse(backend, &mut ws.q, rows, q_proj.out_features())?;
    let k = reuse(backend, &mut ws.k, rows, k_proj.out_features())?;
    let v = reuse(backend, &mut ws.v, rows, v_proj.out_features())?;
    q_proj.forward_into(backend, h, q)?;
    k_proj.forward_into(backend, h, k)?;
    v_proj.forward_into(backend, h, v)?;
    if let Some([q_norm, k_norm]) = qk_norms {
        backend.head_rms_norm(q, q_norm, ctx.rms_norm_eps, ctx.attention.head_dim)?;
        backend.head_rms_norm(k, k_norm, ctx.rms_norm_eps, ctx.attention.head_dim)?;
    }
    backend.rotary(q, rope_table, spec.head_dim)?;
    backend.rotary(k, rope_table, spec.head_dim)?;
    let attended = reuse(backend, &mut ws.attended, rows, q_proj.out_features())?;
    match cache {
        None => backend.attention_into(q, k, v, &spec, layout, attended)?,
        Some(cache) => {
            for s in layout.sequences() {
                let (from, to, n) = (s.queries.start, s.keys + s.past, s.queries.len());
                backend.copy_rows(k, from, &mut cache.keys, to, n)?;
                backend.copy_rows(v, from, &mut cache.values, to, n)?;
            }
            backend.attention_into(q, &cache.keys, &cache.values, &spec, layout, attended)?
        }
    }
    Ok(attended)
}

/// `activation(h · gateᵀ) * (h · upᵀ)`, the input of down_proj, into `ws` (returned).
pub fn gated_activation<'w, B: Backend>(
    backend: &B,
    activation: Activation,
    gate: &Linear<B>,
    up: &Linear<B>,
    h: &B::Tensor,
    ws: &'w mut Workspace<B>,
) -> Result<&'w B::Tensor> {
    let rows = backend.dims(h).0;
    // The fused kernels compute silu only.
    if activation == Activation::Silu && gate.bias.is_none() && up.bias.is_none() {
        let activated = reuse(backend, &mut ws.activated, rows, gate.out_features())?;
        if gate
            .kernel
            .gated_into(up.kernel.as_ref(), backend, h, activated)?
        {
            return Ok(ws.activated.as_ref().expect("set above"));
        }
    }
    let g = reuse(backend, &mut ws.gate, rows, gate.out_features())?;
    let u = reuse(backend, &mut ws.up, rows, up.out_features())?;
    gate.forward_into(backend, h, g)?;
    up.forward_into(backend, h, u)?;
    let activated = reuse(backend, &mut ws.activated, rows, gate.out_features())?;
    backend.gate_mul_into(activation, g, u, activated)?;
    Ok(activated)
}

/// `linear(x)` into `ws`'s projection buffer (returned).
pub fn project<'w, B: Backend>(
    backend: &B,
    linear: &Linear<B>,
    x: &B::Tensor,
    ws: &'w mut Option<B::Tensor>,
) -> Result<&'w mut B::Tensor> {
    let out = reuse(backend, ws, backend.dims(x).0, linear.out_features())?;
    linear.forward_into(backend, x, out)?;
    Ok(out)
}

/// The embeddings of `ids` as the first layer sees them: rows of `table` (which holds the ids
/// from `first_id` on; others get zero rows) times the family's embedding multiplier (Gemma's
/// √hidden).
pub fn embed_scaled<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    table: &B::Matrix,
    ids: &[u32],
    first_id: usize,
) -> Result<B::Tensor> {
    let mut x = backend.embed(table, ids, first_id, config.hidden_size)?;
    if config.embedding_multiplier != 1.0 {
        backend.scale(&mut x, config.embedding_multiplier)?;
    }
    Ok(x)
}

/// One decoder layer: attention block and MLP block, each with a pre-norm and a residual, and
/// with sandwich norms (Gemma) a norm of its output before the residual add.
pub struct DecoderLayer<B: Backend> {
    pub index: usize,
    /// Full or sliding-window attention.
    pub layer_type: LayerType,
    /// The MLP gate's activation.
    pub activation: Activation,
    pub input_layernorm: B::Vector,
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    /// The per-head norms of queries and keys (Qwen3, Gemma 3), `[head_dim]` each.
    pub qk_norms: Option<[B::Vector; 2]>,
    pub o_proj: Linear<B>,
    /// The norm of the MLP's input ([`names::mlp_input_norm`]).
    pub mlp_norm: B::Vector,
    /// The norms of the attention and MLP outputs ([`names::block_output_norms`]).
    pub output_norms: Option<[B::Vector; 2]>,
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// Reads layer `index` (all of it) from the checkpoint.
    pub fn load(backend: &B, checkpoint: &Checkpoint, config: &ModelConfig, index: usize) -> Result<Self> {
        let source = WeightSource::Full(checkpoint);
        Ok(Self::load_shard(backend, source, config, index, &RankShard::whole(config))?.0)
    }

    /// Reads `shard`'s part of layer `index`; returns it with the bytes read.
    pub fn load_shard(
        backend: &B,
        source: WeightSource<'_>,
        config: &ModelConfig,
        index: usize,
        shard: &RankShard,
    ) -> Result<(Self, usize)> {
        let mut bytes = 0;
        let mut norm = |suffix: &str| -> Result<B::Vector> {
            let data = read_norm(source, config, Some(index), suffix)?;
            bytes += data.byte_size();
            backend.vector(applied_norm(config, data))
        };
        let input_layernorm = norm(names::INPUT_LAYERNORM)?;
        let mlp_norm = norm(names::mlp_input_norm(config))?;
        let output_norms = match names::block_output_norms(config) {
            Some([attention, mlp]) => Some([norm(attention)?, norm(mlp)?]),
            None => None,
        };
        let qk_norms = match config.qk_norm {
            true => Some([norm(names::Q_NORM)?, norm(names::K_NORM)?]),
            false => None,
        };
        let mut linear = |p: Projection| -> Result<Linear<B>> {
            let (linear, read) = Linear::load(backend, source, config, index, p, shard)?;
            bytes += read;
            Ok(linear)
        };
        let layer = DecoderLayer {
            index,
            layer_type: config.layer_types[index],
            activation: config.activation,
            input_layernorm,
            q_proj: linear(Projection::Q)?,
            k_proj: linear(Projection::K)?,
            v_proj: linear(Projection::V)?,
            qk_norms,
            o_proj: linear(Projection::O)?,
            mlp_norm,
            output_norms,
            gate_proj: linear(Projection::Gate)?,
            up_proj: linear(Projection::Up)?,
            down_proj: linear(Projection::Down)?,
        };
        Ok((layer, bytes))
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
            + self.mlp_norm.byte_size()
            + [&self.qk_norms, &self.output_norms]
                .into_iter()
                .flatten()
                .flatten()
                .map(ByteSize::byte_size)
                .sum::<usize>()
            + Projection::ALL
                .iter()
                .map(|&p| self.projection(p).byte_size())
                .sum::<usize>()
    }

    /// Runs the layer on the residual stream `x` in place; with `cache`, keys and values are
    /// stored in it and attention reads every cached position.
    pub fn forward(
        &self,
        backend: &B,
        x: &mut B::Tensor,
        ctx: &ForwardContext<B>,
        ws: &mut Workspace<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Result<()> {
        self.run(backend, x, ctx, ws, cache, &mut |_, _| Ok(()))
    }

    /// Like [`DecoderLayer::forward`] without a cache, showing `tap` the input of every
    /// projection group: `Q` (the normed input of q/k/v), `O`, `Gate` (the normed input of
    /// gate/up) and `Down`.
    pub fn forward_tapped(
        &self,
        backend: &B,
        x: &mut B::Tensor,
        ctx: &ForwardContext<B>,
        ws: &mut Workspace<B>,
        tap: &mut dyn FnMut(Projection, &B::Tensor) -> Result<()>,
    ) -> Result<()> {
        self.run(backend, x, ctx, ws, None, tap)
    }

    /// `x += block_out`, the output of block `block` (0 attention, 1 MLP) normed first where
    /// the layer has output norms (into `scratch`).
    fn add_residual(
        &self,
        backend: &B,
        x: &mut B::Tensor,
        block_out: &B::Tensor,
        block: usize,
        ctx: &ForwardContext<B>,
        scratch: &mut B::Tensor,
    ) -> Result<()> {
        match &self.output_norms {
            Some(norms) => {
                backend.rms_norm_into(block_out, &norms[block], ctx.rms_norm_eps, scratch)?;
                backend.add_assign(x, scratch)
            }
            None => backend.add_assign(x, block_out),
        }
    }

    fn run(
        &self,
        backend: &B,
        x: &mut B::Tensor,
        ctx: &ForwardContext<B>,
        ws: &mut Workspace<B>,
        cache: Option<&mut LayerCache<B>>,
        tap: &mut dyn FnMut(Projection, &B::Tensor) -> Result<()>,
    ) -> Result<()> {
        let (rows, cols) = backend.dims(x);
        let mut normed = ws.normed.take();
        let h = reuse(backend, &mut normed, rows, cols)?;
        backend.rms_norm_into(x, &self.input_layernorm, ctx.rms_norm_eps, h)?;
        tap(Projection::Q, h)?;
        let projections = [&self.q_proj, &self.k_proj, &self.v_proj];
        let attended = self_attention(
            backend,
            projections,
            self.qk_norms.as_ref(),
            self.layer_type,
            h,
            ctx,
            ws,
            cache,
        )?;
        tap(Projection::O, attended)?;
        let mut projected = ws.projected.take();
        let out = project(
            backend,
            &self.o_proj,
            ws.attended.as_ref().expect("set above"),
            &mut projected,
        )?;
        ctx.reduce(backend, out)?;
        self.add_residual(backend, x, out, 0, ctx, h)?;
        backend.rms_norm_into(x, &self.mlp_norm, ctx.rms_norm_eps, h)?;
        tap(Projection::Gate, h)?;
        let activated = gated_activation(backend, self.activation, &self.gate_proj, &self.up_proj, h, ws)?;
        tap(Projection::Down, activated)?;
        let out = project(
            backend,
            &self.down_proj,
            ws.activated.as_ref().expect("set above"),
            &mut projected,
        )?;
        ctx.reduce(backend, out)?;
        self.add_residual(backend, x, out, 1, ctx, h)?;
        ws.normed = normed;
        ws.projected = projected;
        Ok(())
    }
}

/// A causal language model on one backend: the whole model, or one rank's share of it (a
/// tensor-parallel slice of one pipeline stage's layers).
pub struct Model<B: Backend> {
    backend: B,
    config: ModelConfig,
    placement: RankPlacement,
    comm: Option<Comm<B>>,
    /// Rows `shard.vocab` of the embedding table: on the first stage, and on the last as the
    /// tied lm_head.
    embed_tokens: Option<B::Matrix>,
    /// The untied lm_head, on the last stage.
    lm_head: Option<B::Matrix>,
    /// The stage's layers.
    layers: Vec<DecoderLayer<B>>,
    /// The final norm, on the last stage.
    norm: Option<B::Vector>,
    /// Bytes read from the checkpoint, as stored.
    loaded_bytes: u64,
    /// The keys and values of the sequences being decoded ([`Decoder`]).
    kv: Mutex<Option<KvCache<B>>>,
}

impl<B: Backend> Model<B> {
    /// `f` through [`Backend::run`] where this model is the whole of it (one rank, one
    /// stage, so nothing in `f` waits on another rank); directly otherwise.
    fn alone<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match self.comm.is_none() && self.placement.is_first() && self.placement.is_last() {
            true => self.backend.run(f),
            false => f(),
        }
    }

    /// Loads `dir/config.json` and the checkpoint beside it.
    pub fn load(dir: &Path, backend: B) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let checkpoint = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &checkpoint, backend)
    }

    /// Builds the whole model from an opened checkpoint.
    pub fn from_checkpoint(config: ModelConfig, checkpoint: &Checkpoint, backend: B) -> Result<Self> {
        let placement = RankPlacement::whole(&config);
        Self::load_rank(config, WeightSource::Full(checkpoint), backend, placement, None)
    }

    /// Builds one rank's share of the model; `comm` joins it to the other ranks of its stage
    /// (`None` for one rank per stage).
    pub fn load_rank(
        config: ModelConfig,
        source: WeightSource<'_>,
        backend: B,
        placement: RankPlacement,
        comm: Option<Comm<B>>,
    ) -> Result<Self> {
        let shard = &placement.shard;
        if shard.tp > 1 && comm.as_ref().is_none_or(|c| c.world_size() != shard.tp) {
            return Err(Error::Invalid(format!(
                "rank {} of {} needs a communicator of that size",
                shard.rank, shard.tp
            )));
        }
        let mut loaded_bytes = 0u64;
        let mut table = |name: &str| -> Result<B::Matrix> {
            let weight = read_vocab_rows(source, name, &config, shard)?;
            loaded_bytes += weight.data.byte_size() as u64;
            backend.matrix(weight)
        };
        let embed_tokens = match placement.holds_embeddings(&config) {
            true => Some(table(names::EMBED_TOKENS)?),
            false => None,
        };
        let lm_head = match placement.is_last() && !config.tie_word_embeddings {
            true => Some(table(names::LM_HEAD)?),
            false => None,
        };
        let norm = match placement.is_last() {
            true => {
                let data = read_norm(source, &config, None, names::FINAL_NORM)?;
                loaded_bytes += data.byte_size() as u64;
                Some(backend.vector(applied_norm(&config, data))?)
            }
            false => None,
        };
        let mut layers = Vec::with_capacity(placement.layers.len());
        for i in placement.layers.clone() {
            let (layer, bytes) = DecoderLayer::load_shard(&backend, source, &config, i, shard)?;
            loaded_bytes += bytes as u64;
            layers.push(layer);
        }
        Ok(Model {
            backend,
            config,
            placement,
            comm,
            embed_tokens,
            lm_head,
            layers,
            norm,
            loaded_bytes,
            kv: Mutex::new(None),
        })
    }

    /// The configuration (of the whole model).
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The share of the model this instance holds.
    pub fn placement(&self) -> &RankPlacement {
        &self.placement
    }

    /// Its tensor-parallel slice.
    pub fn shard(&self) -> &RankShard {
        &self.placement.shard
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The decoder layers this instance holds.
    pub fn layers(&self) -> &[DecoderLayer<B>] {
        &self.layers
    }

    /// The output projection (the embedding table when tied), on the last stage.
    pub fn lm_head(&self) -> Result<&B::Matrix> {
        self.lm_head
            .as_ref()
            .or(self.embed_tokens.as_ref().filter(|_| self.placement.is_last()))
            .ok_or_else(|| self.not_here("the lm_head"))
    }

    fn not_here(&self, what: &str) -> Error {
        Error::Invalid(format!(
            "rank {} (stage {} of {}, layers {:?}) does not hold {what}",
            self.placement.rank, self.placement.stage, self.placement.stages, self.placement.layers
        ))
    }

    /// Bytes held by this instance's weights in the backend's memory.
    pub fn weight_bytes(&self) -> usize {
        self.embed_tokens.as_ref().map_or(0, ByteSize::byte_size)
            + self.lm_head.as_ref().map_or(0, ByteSize::byte_size)
            + self.norm.as_ref().map_or(0, ByteSize::byte_size)
            + self.layers.iter().map(DecoderLayer::byte_size).sum::<usize>()
    }

    /// Bytes this instance read from the checkpoint, as stored (padding included): what
    /// the placement planner predicts, and what a pre-sharded rank file holds.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded_bytes
    }

    fn vocab_parallel(&self) -> bool {
        self.shard().vocab.len() < self.config.vocab_size
    }

    /// The per-forward context for a batch laid out as `layout`.
    pub fn context(&self, layout: &SeqLayout) -> Result<ForwardContext<B>> {
        ForwardContext::for_shard(
            &self.backend,
            &self.config,
            layout,
            self.shard(),
            self.comm.clone(),
        )
    }

    /// Embeddings of `ids`: the residual stream entering the first layer (first stage).
    pub fn embed(&self, ids: &[u32]) -> Result<B::Tensor> {
        let table = self
            .embed_tokens
            .as_ref()
            .filter(|_| self.placement.is_first())
            .ok_or_else(|| self.not_here("the embeddings"))?;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {id} is outside the vocabulary of {} entries",
                self.config.vocab_size
            )));
        }
        // Each rank's rows are its table's scaled values or zeros: their sum is exact, so the
        // multiplier may come before the all-reduce.
        let mut x = embed_scaled(&self.backend, &self.config, table, ids, self.shard().vocab.start)?;
        if self.vocab_parallel()
            && let Some(comm) = &self.comm
        {
            comm.all_reduce_sum(self.backend.buffer_mut(&mut x))?;
        }
        Ok(x)
    }

    /// Runs this instance's layers on the residual stream `x` in place.
    pub fn run_layers(
        &self,
        x: &mut B::Tensor,
        ctx: &ForwardContext<B>,
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        for layer in &self.layers {
            layer.forward(&self.backend, x, ctx, ws, None)?;
        }
        Ok(())
    }

    /// Starts a KV cache for `sequences` sequences of at most `capacity` positions on this
    /// rank (its layers, its kv heads), replacing any earlier one.
    pub fn start_cache(&self, sequences: usize, capacity: usize) -> Result<()> {
        let kv_width = self.shard().kv_heads.len() * self.config.head_dim;
        let windows: Vec<Option<usize>> = self.layers.iter().map(|l| self.config.window(l.index)).collect();
        let cache = KvCache::new(&self.backend, &windows, kv_width, sequences, capacity)?;
        *self.kv.lock().unwrap_or_else(|e| e.into_inner()) = Some(cache);
        Ok(())
    }

    /// Bytes of this rank's KV cache (0 before [`Model::start_cache`]).
    pub fn cache_bytes(&self) -> usize {
        self.kv
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, KvCache::byte_size)
    }

    /// Runs this instance's layers on `x`, the residual stream of `new[s]` tokens appended to
    /// each cached sequence `s` (in sequence order), storing their keys and values. Where the
    /// sliding-window layers' stores take fewer new positions at a time, the tokens pass
    /// through the layers in several passes (each sequence's first tokens first).
    ///
    /// A pass that fails after storing anything leaves the cache inconsistent: it is dropped,
    /// and decoding needs [`Model::start_cache`] again.
    pub fn run_layers_cached(&self, x: &mut B::Tensor, new: &[usize], ws: &mut Workspace<B>) -> Result<()> {
        let mut guard = self.kv.lock().unwrap_or_else(|e| e.into_inner());
        let cache = guard
            .as_mut()
            .ok_or_else(|| Error::Invalid("decoding needs a KV cache: call start first".into()))?;
        // Refused before anything is stored (the cache stays as it was): hidden states that
        // are not the new tokens', more tokens than the cache holds.
        let rows: usize = new.iter().sum();
        if rows != self.backend.dims(x).0 {
            return Err(Error::Invalid(format!(
                "{} rows of hidden states for {rows} new tokens",
                self.backend.dims(x).0,
            )));
        }
        cache.layout(new)?;
        let result = self.extend_cache(cache, x, new, ws);
        if result.is_err() {
            *guard = None;
        }
        result
    }

    fn extend_cache(
        &self,
        cache: &mut KvCache<B>,
        x: &mut B::Tensor,
        new: &[usize],
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        let per_pass = cache.max_new_per_pass();
        if new.iter().all(|&n| n <= per_pass) {
            return self.pass_cached(cache, x, new, ws);
        }
        let cols = self.backend.dims(x).1;
        let starts: Vec<usize> = new
            .iter()
            .scan(0, |row, &n| {
                *row += n;
                Some(*row - n)
            })
            .collect();
        for from in (0..).step_by(per_pass) {
            let part: Vec<usize> = new
                .iter()
                .map(|&n| n.saturating_sub(from).min(per_pass))
                .collect();
            let part_rows: usize = part.iter().sum();
            if part_rows == 0 {
                break;
            }
            // Each sequence's share of this pass (none for one whose tokens ended, or that
            // sits the call out), gathered into one tensor and scattered back after it.
            let shares = || starts.iter().zip(&part).filter(|(_, n)| **n > 0);
            let mut chunk = self.backend.alloc(part_rows, cols)?;
            let mut row = 0;
            for (&start, &n) in shares() {
                self.backend.copy_rows(x, start + from, &mut chunk, row, n)?;
                row += n;
            }
            self.pass_cached(cache, &mut chunk, &part, ws)?;
            let mut row = 0;
            for (&start, &n) in shares() {
                self.backend.copy_rows(&chunk, row, x, start + from, n)?;
                row += n;
            }
        }
        Ok(())
    }

    /// One pass of [`Model::run_layers_cached`], its tokens fitting every store.
    fn pass_cached(
        &self,
        cache: &mut KvCache<B>,
        x: &mut B::Tensor,
        new: &[usize],
        ws: &mut Workspace<B>,
    ) -> Result<()> {
        cache.make_room(&self.backend, new)?;
        let mut ctx = ForwardContext::attending(
            &self.backend,
            &self.config,
            cache.layout(new)?,
            self.shard(),
            self.comm.clone(),
        )?;
        ctx.sliding_layout = cache.sliding_layout(new)?;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers_mut()) {
            layer.forward(&self.backend, x, &ctx, ws, Some(layer_cache))?;
        }
        cache.advance(new);
        Ok(())
    }

    /// The final norm of the residual stream: the hidden states the logits come from (last
    /// stage).
    pub fn finish(&self, x: &B::Tensor) -> Result<B::Tensor> {
        let norm = self
            .norm
            .as_ref()
            .ok_or_else(|| self.not_here("the final norm"))?;
        self.backend.rms_norm(x, norm, self.config.rms_norm_eps)
    }

    /// Final hidden states (after the last norm) of a batch of token sequences; the whole
    /// model on this rank's stage (one stage, any tensor parallelism).
    pub fn forward(&self, ids: &[u32], layout: &SeqLayout) -> Result<B::Tensor> {
        if ids.len() != layout.rows() {
            return Err(Error::Invalid(format!(
                "{} token ids for a layout of {} rows",
                ids.len(),
                layout.rows()
            )));
        }
        let ctx = self.context(layout)?;
        let mut ws = Workspace::default();
        let mut x = self.embed(ids)?;
        self.run_layers(&mut x, &ctx, &mut ws)?;
        self.finish(&x)
    }

    /// Gathers a `[rows, cols]` tensor from every rank into `[ranks, rows, cols]` on the host.
    fn gather(&self, local: &B::Tensor) -> Result<Vec<f32>> {
        match (&self.comm, self.vocab_parallel()) {
            (Some(comm), true) => {
                let (rows, cols) = self.backend.dims(local);
                let ranks = comm.world_size();
                let mut all = self.backend.alloc(ranks * rows, cols)?;
                comm.all_gather(self.backend.buffer(local), self.backend.buffer_mut(&mut all))?;
                self.backend.download(&all)
            }
            _ => self.backend.download(local),
        }
    }

    /// Negative log-likelihood of each prediction, from final hidden states (last stage).
    /// With a split vocabulary, each rank reduces its own logits and only three numbers per
    /// prediction cross ranks.
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
        let parts = self.backend.nll_parts(
            hidden,
            self.lm_head()?,
            predictions,
            self.shard().vocab.start,
            self.config.final_logit_softcapping,
        )?;
        let slices = if self.vocab_parallel() { self.shard().tp } else { 1 };
        Ok(combine_nll_parts(&self.gather(&parts)?, slices))
    }

    /// Full logits of the given rows, from final hidden states, on the host (last stage).
    pub fn logits(&self, hidden: &B::Tensor, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        let local =
            self.backend
                .logits(hidden, self.lm_head()?, rows, self.config.final_logit_softcapping)?;
        let all = self.gather(&local)?;
        let per = self.shard().vocab.len();
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

impl<B: Backend> Decoder for Model<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn start(&self, sequences: usize, capacity: usize) -> Result<()> {
        self.start_cache(sequences, capacity)
    }

    fn extend(&self, tokens: &[Vec<u32>]) -> Result<Vec<Option<Vec<f32>>>> {
        self.alone(|| {
            let new: Vec<usize> = tokens.iter().map(Vec::len).collect();
            let (rows, slots) = last_rows(&new);
            let mut x = self.embed(&tokens.concat())?;
            self.run_layers_cached(&mut x, &new, &mut Workspace::default())?;
            let hidden = self.finish(&x)?;
            Ok(per_sequence(self.logits(&hidden, &rows)?, &slots))
        })
    }
}

/// Anything that scores next-token predictions: a model, or a tensor-parallel group.
pub trait Scorer {
    /// The configuration of the whole model.
    fn config(&self) -> &ModelConfig;
    /// NLL of each prediction after a forward pass over `ids` laid out as `layout`.
    fn score(&self, ids: &[u32], layout: &SeqLayout, predictions: &[Prediction]) -> Result<Vec<f32>>;
    /// Full logits of the given rows after a forward pass over `ids` laid out as `layout`.
    fn logits_at(&self, ids: &[u32], layout: &SeqLayout, rows: &[usize]) -> Result<Vec<Vec<f32>>>;
    /// NLLs of several batches, in order. A pipeline keeps several of them in flight at once
    /// (stage 2 works on one while stage 1 works on the next).
    fn score_batches(&self, batches: &[Batch]) -> Result<Vec<Vec<f32>>> {
        batches
            .iter()
            .map(|b| self.score(&b.ids, &b.layout, &b.predictions))
            .collect()
    }
}

/// One forward pass's worth of scoring: token ids laid out as `layout`, and the predictions
/// to score (rows of that layout).
#[derive(Clone, Debug)]
pub struct Batch {
    pub ids: Vec<u32>,
    pub layout: SeqLayout,
    pub predictions: Vec<Prediction>,
}

impl<B: Backend> Scorer for Model<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn score(&self, ids: &[u32], layout: &SeqLayout, predictions: &[Prediction]) -> Result<Vec<f32>> {
        self.alone(|| {
            let hidden = self.forward(ids, layout)?;
            self.token_nll(&hidden, predictions)
        })
    }

    fn logits_at(&self, ids: &[u32], layout: &SeqLayout, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.alone(|| {
            let hidden = self.forward(ids, layout)?;
            self.logits(&hidden, rows)
        })
    }
}
