//! Reading one rank's share of a checkpoint, as the shard plan lays it out: only the rank's
//! rows or columns are read, padded features are zeros (zero weights, or zero scales for AWQ),
//! and tensors that stay whole are borrowed from the mapping in their stored type. A
//! pre-sharded rank file already holds exactly that share and is read as it is.

use std::collections::BTreeMap;

use checkpoint::awq::PACK;
use checkpoint::names::{self, Projection, layer_tensor_name};
use checkpoint::writer::{SafetensorsStream, TensorSpec};
use checkpoint::{AwqGemm, AwqShape, Checkpoint, FloatData, HostData, ModelConfig};
use half::f16;

use crate::Result;
use crate::backend::{DenseWeight, WeightFormat};
use crate::placement::RankPlacement;
use crate::shard::{RankShard, Split, split_of};

/// Where a rank's weights are read from.
#[derive(Clone, Copy, Debug)]
pub enum WeightSource<'a> {
    /// The model's checkpoint: the rank reads its rows or columns of the full tensors.
    Full(&'a Checkpoint),
    /// The rank's own file of a pre-sharded checkpoint: the tensors are the rank's share.
    Rank(&'a Checkpoint),
}

impl WeightSource<'_> {
    /// The checkpoint read.
    pub fn checkpoint(&self) -> &Checkpoint {
        match self {
            WeightSource::Full(c) | WeightSource::Rank(c) => c,
        }
    }
}

/// One rank's share of a projection, as read from the checkpoint.
#[derive(Debug)]
pub struct LinearShard {
    pub weight: Box<dyn WeightFormat>,
    pub bias: Option<FloatData>,
}

impl LinearShard {
    /// Bytes read, as stored.
    pub fn stored_bytes(&self) -> usize {
        self.weight.stored_bytes() + self.bias.as_ref().map_or(0, FloatData::byte_size)
    }
}

/// Rows of `width` values followed by `pad` zero rows.
fn pad_rows<T: checkpoint::Element>(data: HostData<T>, width: usize, pad: usize) -> HostData<T> {
    if pad == 0 {
        return data;
    }
    let mut v = data.into_vec();
    v.resize(v.len() + pad * width, T::default());
    v.into()
}

/// Reads rank `shard`'s part of projection `p` of layer `layer`.
pub fn read_linear(
    source: WeightSource<'_>,
    config: &ModelConfig,
    layer: usize,
    p: Projection,
    shard: &RankShard,
) -> Result<LinearShard> {
    let checkpoint = source.checkpoint();
    let (stored, rows) = p.stored(config);
    let (range, real) = shard.range(p);
    let (local_out, local_in) = shard.shape(config, p);
    let converted = config
        .quantization
        .as_ref()
        .filter(|q| q.converts(&stored.prefix(layer)));
    // A fused projection (Phi-3's qkv_proj, gate_up_proj) is read as this projection's rows
    // of the stored tensor: its outputs shifted by where they start there.
    let (prefix, out_features, in_features, pad, real, fused) = match source {
        WeightSource::Full(_) => {
            let (out_features, in_features) = stored.shape(config);
            let shifted = real.start + rows.start..real.end + rows.start;
            let fused = stored.parts.len() > 1;
            (
                stored.prefix(layer),
                out_features,
                in_features,
                range.len() - real.len(),
                shifted,
                fused,
            )
        }
        // The rank file holds the rank's (padded) share as whole tensors, each alone.
        WeightSource::Rank(_) => (p.prefix(layer), local_out, local_in, 0, real, false),
    };
    let tensor =
        |suffix: &str, shape: &[usize]| checkpoint.tensor_with_shape(&format!("{prefix}.{suffix}"), shape);
    // The whole dimension, unpadded: the tensors are borrowed from the mapping as they are.
    let whole = !fused
        && pad == 0
        && real.len()
            == match split_of(p) {
                Split::Rows => in_features,
                _ => out_features,
            };
    let split = match source {
        WeightSource::Rank(_) => Split::Replicated,
        WeightSource::Full(_) if whole => Split::Replicated,
        WeightSource::Full(_) => split_of(p),
    };
    let weight: Box<dyn WeightFormat> = match converted {
        Some(q) => {
            let full = AwqShape {
                in_features,
                out_features,
                group_size: q.group_size,
            };
            full.check(&format!("{}: `{prefix}`", checkpoint.dir().display()))?;
            let g = q.group_size;
            let qweight = tensor("qweight", &full.qweight_shape())?;
            let qzeros = tensor("qzeros", &full.qzeros_shape())?;
            let scales = tensor("scales", &full.scales_shape())?;
            let (qw, qz, sc): (HostData<i32>, HostData<i32>, HostData<f16>) = match split {
                Split::Columns => {
                    let words = real.start / PACK..real.end / PACK;
                    let parts = (
                        qweight.columns::<i32>(words.clone(), pad / PACK)?.into(),
                        qzeros.columns::<i32>(words, pad / PACK)?.into(),
                        scales.columns::<f16>(real.clone(), pad)?.into(),
                    );
                    // Only a column block was copied out; the mapped pages are not needed again.
                    [&qweight, &qzeros, &scales]
                        .iter()
                        .for_each(|t| t.release_pages());
                    parts
                }
                Split::Rows => {
                    let groups = real.start / g..real.end / g;
                    let out_words = out_features / PACK;
                    (
                        pad_rows(qweight.rows(real.clone())?.host()?, out_words, pad),
                        pad_rows(qzeros.rows(groups.clone())?.host()?, out_words, pad / g),
                        pad_rows(scales.rows(groups)?.host()?, out_features, pad / g),
                    )
                }
                Split::Replicated => (qweight.host()?, qzeros.host()?, scales.host()?),
            };
            let local = AwqShape {
                in_features: local_in,
                out_features: local_out,
                group_size: g,
            };
            Box::new(AwqGemm::new(local, qw, qz, sc)?)
        }
        _ => {
            let w = tensor("weight", &[out_features, in_features])?;
            let data = match split {
                Split::Columns => w
                    .rows(real.clone())?
                    .float_data()?
                    .with_zero_rows(in_features, pad),
                Split::Rows => {
                    let block = w.float_columns(real.clone(), pad)?;
                    w.release_pages();
                    block
                }
                Split::Replicated => w.float_data()?,
            };
            Box::new(DenseWeight::new(data, local_out, local_in)?)
        }
    };
    // Partial outputs of a row-parallel projection are summed across ranks: its bias joins
    // once, on rank 0, and no other rank holds it.
    let bias = if !shard.holds_bias(config, p) {
        None
    } else {
        let b = tensor("bias", &[out_features])?;
        match split {
            Split::Columns => Some(b.rows(real)?.float_data()?.with_zero_rows(1, pad)),
            Split::Rows | Split::Replicated => Some(b.float_data()?),
        }
    };
    Ok(LinearShard { weight, bias })
}

/// Rank `shard`'s rows of a `[vocab, hidden]` table (embeddings or lm_head), in its stored
/// element type.
pub fn read_vocab_rows(
    source: WeightSource<'_>,
    name: &str,
    config: &ModelConfig,
    shard: &RankShard,
) -> Result<DenseWeight> {
    let (rows, hidden) = (shard.vocab.len(), config.hidden_size);
    let data = match source {
        WeightSource::Full(c) => c
            .tensor_with_shape(name, &[config.vocab_size, hidden])?
            .rows(shard.vocab.clone())?
            .float_data()?,
        WeightSource::Rank(c) => c.tensor_with_shape(name, &[rows, hidden])?.float_data()?,
    };
    DenseWeight::new(data, rows, hidden)
}

/// The final norm (`layer` `None`, `[hidden]`), or the norm of a layer named by `suffix`
/// (one of [`names::layer_norms`], whose length it checks).
pub fn read_norm(
    source: WeightSource<'_>,
    config: &ModelConfig,
    layer: Option<usize>,
    suffix: &str,
) -> Result<FloatData> {
    let (name, len) = match layer {
        Some(l) => {
            let len = names::layer_norms(config)
                .into_iter()
                .find(|(s, _)| *s == suffix)
                .map_or(config.hidden_size, |(_, len)| len);
            (layer_tensor_name(l, suffix), len)
        }
        None => (names::FINAL_NORM.to_string(), config.hidden_size),
    };
    Ok(source
        .checkpoint()
        .tensor_with_shape(&name, &[len])?
        .float_data()?)
}

/// A norm's weight as the model applies it: `norm_offset + w`, in f32 as transformers adds
/// Gemma's 1; the stored values unchanged where the offset is 0.
pub fn applied_norm(config: &ModelConfig, data: FloatData) -> FloatData {
    if config.norm_offset == 0.0 {
        return data;
    }
    let mut values = data.into_f32().into_vec();
    values.iter_mut().for_each(|w| *w += config.norm_offset);
    FloatData::from(values)
}

/// Writes `rank`'s share of the checkpoint to `path` as one safetensors file: the tensors it
/// would read, sliced and padded as it would read them, in the order
/// [`RankPlacement::tensors`] lists them. Returns the bytes of tensor data written.
pub fn write_rank_file(
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    rank: &RankPlacement,
    path: &std::path::Path,
) -> Result<u64> {
    let source = WeightSource::Full(checkpoint);
    let specs = rank
        .tensors(config)
        .into_iter()
        .map(|t| {
            let dtype = match t.dtype {
                Some(d) => d,
                None => checkpoint.tensor(&t.name)?.dtype(),
            };
            Ok(TensorSpec::new(t.name, dtype, &t.shape))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = specs.iter().map(TensorSpec::bytes).sum();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut out = SafetensorsStream::create(path, specs, metadata)?;
    let shard = &rank.shard;
    if rank.holds_embeddings(config) {
        out.write(
            names::EMBED_TOKENS,
            read_vocab_rows(source, names::EMBED_TOKENS, config, shard)?
                .data
                .bytes(),
        )?;
    }
    for layer in rank.layers.clone() {
        for (norm, _) in names::layer_norms(config) {
            let data = read_norm(source, config, Some(layer), norm)?;
            out.write(&layer_tensor_name(layer, norm), data.bytes())?;
        }
        for p in Projection::ALL {
            let prefix = p.prefix(layer);
            let part = read_linear(source, config, layer, p, shard)?;
            part.weight
                .stored_tensors(&prefix, &mut |name, bytes| Ok(out.write(name, bytes)?))?;
            if let Some(bias) = &part.bias {
                out.write(&format!("{prefix}.bias"), bias.bytes())?;
            }
        }
        checkpoint.release_prefix(&layer_tensor_name(layer, ""));
    }
    if rank.is_last() {
        out.write(
            names::FINAL_NORM,
            read_norm(source, config, None, names::FINAL_NORM)?.bytes(),
        )?;
        if !config.tie_word_embeddings {
            out.write(
                names::LM_HEAD,
                read_vocab_rows(source, names::LM_HEAD, config, shard)?
                    .data
                    .bytes(),
            )?;
        }
    }
    out.finish()?;
    Ok(bytes)
}
