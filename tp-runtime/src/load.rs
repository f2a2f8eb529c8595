//! Reading one rank's share of a checkpoint, as the shard plan lays it out: only the rank's
//! rows or columns are read, padded features are zeros (zero weights, or zero scales for AWQ),
//! and tensors that stay whole are borrowed from the mapping in their stored type.

use checkpoint::awq::PACK;
use checkpoint::names::{self, Projection, layer_tensor_name};
use checkpoint::{AwqGemm, AwqShape, Checkpoint, FloatData, HostData, ModelConfig};
use half::f16;

use crate::Result;
use crate::backend::weights::{DenseWeight, WeightFormat};
use crate::shard::{RankShard, Split, split_of};

/// One rank's share of a projection, as read from the checkpoint.
#[derive(Debug)]
pub struct LinearShard {
    pub weight: Box<dyn WeightFormat>,
    pub bias: Option<FloatData>,
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
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    layer: usize,
    p: Projection,
    shard: &RankShard,
) -> Result<LinearShard> {
    let prefix = p.prefix(layer);
    let (out_features, in_features) = p.shape(config);
    let (range, real) = shard.range(p);
    let pad = range.len() - real.len();
    let (local_out, local_in) = shard.shape(config, p);
    let tensor =
        |suffix: &str, shape: &[usize]| checkpoint.tensor_with_shape(&format!("{prefix}.{suffix}"), shape);
    // The whole dimension, unpadded: the tensors are borrowed from the mapping as they are.
    let whole = pad == 0
        && real.len()
            == match split_of(p) {
                Split::Rows => in_features,
                _ => out_features,
            };
    let split = if whole { Split::Replicated } else { split_of(p) };
    let weight: Box<dyn WeightFormat> = match &config.quantization {
        Some(q) if q.converts(&prefix) => {
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
    let bias = if !p.has_bias(config) {
        None
    } else {
        let b = tensor("bias", &[out_features])?;
        match split {
            Split::Columns => Some(b.rows(real)?.float_data()?.with_zero_rows(1, pad)),
            // Partial outputs are summed across ranks: the bias joins once, on rank 0.
            Split::Rows if shard.rank == 0 => Some(b.float_data()?),
            Split::Rows => None,
            Split::Replicated => Some(b.float_data()?),
        }
    };
    Ok(LinearShard { weight, bias })
}

/// Rank `shard`'s rows of a `[vocab, hidden]` table (embeddings or lm_head), in its stored
/// element type.
pub fn read_vocab_rows(
    checkpoint: &Checkpoint,
    name: &str,
    config: &ModelConfig,
    shard: &RankShard,
) -> Result<DenseWeight> {
    let t = checkpoint.tensor_with_shape(name, &[config.vocab_size, config.hidden_size])?;
    let rows = t.rows(shard.vocab.clone())?;
    DenseWeight::new(rows.float_data()?, shard.vocab.len(), config.hidden_size)
}

/// A `[hidden]` norm weight: the final norm, or a layer's norm named by `suffix`.
pub fn read_norm(
    checkpoint: &Checkpoint,
    config: &ModelConfig,
    layer: Option<usize>,
    suffix: &str,
) -> Result<FloatData> {
    let name = match layer {
        Some(l) => layer_tensor_name(l, suffix),
        None => names::FINAL_NORM.to_string(),
    };
    Ok(checkpoint
        .tensor_with_shape(&name, &[config.hidden_size])?
        .float_data()?)
}
