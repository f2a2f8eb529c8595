//! Where a model's tensors live and its operations run. The decoder in [`crate::model`] is
//! written once against [`Backend`]; each device implements it.

pub mod cpu;

use std::ops::Range;

use crate::Result;
use crate::checkpoint::F32Data;

pub use cpu::CpuBackend;

/// How the rows of an activation matrix split into independent sequences.
///
/// Row `r` of sequence `s` sits at position `r - start(s)`; attention never crosses a
/// sequence boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    /// Cumulative row offsets: `[0, len0, len0 + len1, ...]`.
    bounds: Vec<usize>,
}

impl SeqLayout {
    /// A batch of sequences of the given lengths, each at least one token long.
    pub fn new(lengths: &[usize]) -> Result<Self> {
        if lengths.is_empty() || lengths.contains(&0) {
            return Err(crate::Error::Invalid(format!(
                "a batch needs at least one sequence and no empty ones (lengths {lengths:?})"
            )));
        }
        let mut bounds = vec![0];
        for len in lengths {
            bounds.push(bounds.last().unwrap() + len);
        }
        Ok(SeqLayout { bounds })
    }

    /// One sequence of `len` tokens.
    pub fn single(len: usize) -> Result<Self> {
        Self::new(&[len])
    }

    /// Total rows.
    pub fn rows(&self) -> usize {
        *self.bounds.last().unwrap()
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Always false: a layout holds at least one sequence.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Row ranges of the sequences.
    pub fn sequences(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.bounds.windows(2).map(|w| w[0]..w[1])
    }

    /// The position of every row within its sequence.
    pub fn positions(&self) -> Vec<u32> {
        self.sequences().flat_map(|r| 0..r.len() as u32).collect()
    }
}

/// Head layout of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    /// Query heads (on this rank).
    pub heads: usize,
    /// Key/value heads (on this rank); each serves `heads / kv_heads` query heads.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Keys at least this many positions back are masked.
    pub sliding_window: Option<usize>,
    /// Multiplier of q·k, normally `1 / sqrt(head_dim)`.
    pub scale: f32,
}

/// Rotary embedding frequencies (`1 / theta^(2i/d)`), as transformers computes them.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeFrequencies {
    pub head_dim: usize,
    pub inv_freq: Vec<f32>,
}

impl RopeFrequencies {
    /// Frequencies for `head_dim` and base `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        RopeFrequencies { head_dim, inv_freq }
    }

    /// `[positions.len(), head_dim]`: cos of each angle in the first half of a row, sin in
    /// the second. Angles are rounded to f32 before cos/sin, as transformers does.
    pub fn table(&self, positions: &[u32]) -> Vec<f32> {
        let half = self.head_dim / 2;
        let mut table = vec![0f32; positions.len() * self.head_dim];
        for (row, &p) in table.chunks_exact_mut(self.head_dim).zip(positions) {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let angle = (p as f32 * f) as f64;
                row[i] = angle.cos() as f32;
                row[half + i] = angle.sin() as f32;
            }
        }
        table
    }
}

/// A linear layer's weight as read from a checkpoint, before the backend lays it out.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// `[out_features, in_features]`, row-major (PyTorch layout).
    Dense {
        data: F32Data,
        out_features: usize,
        in_features: usize,
    },
}

impl LinearWeight {
    /// Output features.
    pub fn out_features(&self) -> usize {
        match self {
            LinearWeight::Dense { out_features, .. } => *out_features,
        }
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        match self {
            LinearWeight::Dense { in_features, .. } => *in_features,
        }
    }
}

/// One next-token prediction to score: the hidden state at `row` predicts `target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prediction {
    pub row: usize,
    pub target: u32,
}

/// The operations a decoder needs, on one device. Activations are row-major
/// `[rows, features]` f32 matrices.
pub trait Backend: Send + Sync {
    /// Activations in the backend's memory.
    type Tensor: Send + Sync;
    /// A dense `[rows, cols]` weight (embedding table, lm_head).
    type Matrix: Send + Sync;
    /// A linear layer's weight in the backend's preferred layout.
    type Linear: Send + Sync;
    /// A 1-D weight (norm weight, bias).
    type Vector: Send + Sync;

    /// A short name for reports ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// Places a dense `[rows, cols]` matrix.
    fn matrix(&self, data: F32Data, rows: usize, cols: usize) -> Result<Self::Matrix>;
    /// Places a linear layer's weight.
    fn linear(&self, weight: LinearWeight) -> Result<Self::Linear>;
    /// Places a vector.
    fn vector(&self, data: F32Data) -> Result<Self::Vector>;
    /// Copies host values into a `[rows, cols]` activation tensor.
    fn tensor(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Copies an activation tensor back to the host.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// `(rows, cols)` of an activation tensor.
    fn dims(&self, x: &Self::Tensor) -> (usize, usize);

    /// Rows `ids` of an embedding table.
    fn embed(&self, table: &Self::Matrix, ids: &[u32]) -> Result<Self::Tensor>;
    /// `x / rms(x) * weight`, row by row.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Vector, eps: f32) -> Result<Self::Tensor>;
    /// `x · Wᵀ (+ bias)`.
    fn linear_forward(
        &self,
        x: &Self::Tensor,
        weight: &Self::Linear,
        bias: Option<&Self::Vector>,
    ) -> Result<Self::Tensor>;
    /// The `[rows, head_dim]` cos/sin table of [`RopeFrequencies::table`], on the device.
    fn rope_table(&self, rope: &RopeFrequencies, positions: &[u32]) -> Result<Self::Tensor>;
    /// Rotates every head of `x` in place (rotate-half convention).
    fn rotary(&self, x: &mut Self::Tensor, table: &Self::Tensor, head_dim: usize) -> Result<()>;
    /// Causal grouped-query attention within each sequence of `layout`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: &AttentionSpec,
        layout: &SeqLayout,
    ) -> Result<Self::Tensor>;
    /// `silu(gate) * up`.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `-log softmax(hidden[row] · lm_headᵀ)[target]` for each prediction, without keeping
    /// the logits of more than a few rows at a time.
    fn token_nll(
        &self,
        hidden: &Self::Tensor,
        lm_head: &Self::Matrix,
        predictions: &[Prediction],
    ) -> Result<Vec<f32>>;
    /// Full logits of the given rows, on the host.
    fn logits(&self, hidden: &Self::Tensor, lm_head: &Self::Matrix, rows: &[usize]) -> Result<Vec<Vec<f32>>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_positions_restart_per_sequence() {
        let l = SeqLayout::new(&[3, 2]).unwrap();
        assert_eq!(l.rows(), 5);
        assert_eq!(l.positions(), vec![0, 1, 2, 0, 1]);
        assert_eq!(l.sequences().collect::<Vec<_>>(), vec![0..3, 3..5]);
        assert!(SeqLayout::new(&[2, 0]).is_err());
        assert!(SeqLayout::new(&[]).is_err());
    }

    #[test]
    fn rope_table_matches_closed_form() {
        let rope = RopeFrequencies::new(4, 10_000.0);
        assert_eq!(rope.inv_freq, vec![1.0, 0.01]);
        let t = rope.table(&[0, 3]);
        assert_eq!(&t[0..4], &[1.0, 1.0, 0.0, 0.0]);
        assert!((t[4] - 3f32.cos()).abs() < 1e-7 && (t[6] - 3f32.sin()).abs() < 1e-7);
        assert!((t[5] - 0.03f32.cos()).abs() < 1e-7 && (t[7] - 0.03f32.sin()).abs() < 1e-7);
    }
}
