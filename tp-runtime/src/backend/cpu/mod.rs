//! The CPU backend: f32 arithmetic, matrix products by the `gemm` crate, rayon across rows
//! and heads. It is also the reference twin of every GPU kernel.

mod attention;
mod matmul;

use rayon::prelude::*;

use super::{AttentionSpec, Backend, LinearWeight, Prediction, RopeFrequencies, SeqLayout};
use crate::checkpoint::F32Data;
use crate::{Error, Result};

pub use matmul::matmul_transposed;

/// f32 activations `[rows, cols]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    /// Wraps `data` as `[rows, cols]`.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::Invalid(format!(
                "{} values do not make a [{rows}, {cols}] tensor",
                data.len()
            )));
        }
        Ok(CpuTensor { data, rows, cols })
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// A dense `[rows, cols]` f32 matrix, possibly borrowed from a mapped checkpoint.
#[derive(Clone, Debug)]
pub struct CpuMatrix {
    pub data: F32Data,
    pub rows: usize,
    pub cols: usize,
}

/// A linear layer's weight on the CPU.
#[derive(Clone, Debug)]
pub enum CpuLinear {
    /// `[out_features, in_features]` f32.
    Dense(CpuMatrix),
}

/// Runs everything on the host's cores.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    /// A CPU backend on the current rayon pool.
    pub fn new() -> Self {
        CpuBackend
    }
}

fn same_dims(what: &str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    if (a.rows, a.cols) != (b.rows, b.cols) {
        return Err(Error::Invalid(format!(
            "{what}: shapes [{}, {}] and [{}, {}] differ",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    Ok(())
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `log Σ exp(l)`, accumulated in f64 for a stable sum over large vocabularies.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    (max as f64 + sum.ln()) as f32
}

/// Rows per lm_head product when scoring: bounds the logits kept at once.
const NLL_CHUNK_ROWS: usize = 128;

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Matrix = CpuMatrix;
    type Linear = CpuLinear;
    type Vector = F32Data;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn matrix(&self, data: F32Data, rows: usize, cols: usize) -> Result<CpuMatrix> {
        if data.len() != rows * cols {
            return Err(Error::Invalid(format!(
                "{} values do not make a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        Ok(CpuMatrix { data, rows, cols })
    }

    fn linear(&self, weight: LinearWeight) -> Result<CpuLinear> {
        match weight {
            LinearWeight::Dense {
                data,
                out_features,
                in_features,
            } => Ok(CpuLinear::Dense(self.matrix(data, out_features, in_features)?)),
        }
    }

    fn vector(&self, data: F32Data) -> Result<F32Data> {
        Ok(data)
    }

    fn tensor(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        CpuTensor::new(data.to_vec(), rows, cols)
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn dims(&self, x: &CpuTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn embed(&self, table: &CpuMatrix, ids: &[u32]) -> Result<CpuTensor> {
        let cols = table.cols;
        let mut out = vec![0f32; ids.len() * cols];
        for (row, &id) in out.chunks_exact_mut(cols).zip(ids) {
            let id = id as usize;
            if id >= table.rows {
                return Err(Error::Invalid(format!(
                    "token id {id} is outside the vocabulary of {} entries",
                    table.rows
                )));
            }
            row.copy_from_slice(&table.data[id * cols..(id + 1) * cols]);
        }
        CpuTensor::new(out, ids.len(), cols)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &F32Data, eps: f32) -> Result<CpuTensor> {
        if weight.len() != x.cols {
            return Err(Error::Invalid(format!(
                "rms_norm: weight of {} for {} features",
                weight.len(),
                x.cols
            )));
        }
        let mut out = vec![0f32; x.data.len()];
        out.par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .for_each(|(y, x)| {
                let mean_sq = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
                let inv = 1.0 / ((mean_sq as f32) + eps).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight.iter()) {
                    *y = w * (x * inv);
                }
            });
        CpuTensor::new(out, x.rows, x.cols)
    }

    fn linear_forward(&self, x: &CpuTensor, weight: &CpuLinear, bias: Option<&F32Data>) -> Result<CpuTensor> {
        let CpuLinear::Dense(w) = weight;
        if x.cols != w.cols {
            return Err(Error::Invalid(format!(
                "linear: input has {} features, weight expects {}",
                x.cols, w.cols
            )));
        }
        let mut out = vec![0f32; x.rows * w.rows];
        matmul_transposed(&x.data, &w.data, &mut out, x.rows, w.cols, w.rows);
        if let Some(bias) = bias {
            if bias.len() != w.rows {
                return Err(Error::Invalid(format!(
                    "linear: bias of {} for {} outputs",
                    bias.len(),
                    w.rows
                )));
            }
            out.par_chunks_mut(w.rows).for_each(|row| {
                for (y, &b) in row.iter_mut().zip(bias.iter()) {
                    *y += b;
                }
            });
        }
        CpuTensor::new(out, x.rows, w.rows)
    }

    fn rope_table(&self, rope: &RopeFrequencies, positions: &[u32]) -> Result<CpuTensor> {
        CpuTensor::new(rope.table(positions), positions.len(), rope.head_dim)
    }

    fn rotary(&self, x: &mut CpuTensor, table: &CpuTensor, head_dim: usize) -> Result<()> {
        if table.rows != x.rows || table.cols != head_dim || !x.cols.is_multiple_of(head_dim) {
            return Err(Error::Invalid(format!(
                "rotary: table [{}, {}] for activations [{}, {}] with head_dim {head_dim}",
                table.rows, table.cols, x.rows, x.cols
            )));
        }
        let half = head_dim / 2;
        x.data
            .par_chunks_mut(x.cols)
            .zip(table.data.par_chunks(head_dim))
            .for_each(|(row, cs)| {
                let (cos, sin) = cs.split_at(half);
                for head in row.chunks_exact_mut(head_dim) {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (a[i], b[i]);
                        a[i] = x1 * cos[i] - x2 * sin[i];
                        b[i] = x2 * cos[i] + x1 * sin[i];
                    }
                }
            });
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        spec: &AttentionSpec,
        layout: &SeqLayout,
    ) -> Result<CpuTensor> {
        attention::attention(q, k, v, spec, layout)
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        same_dims("silu_mul", gate, up)?;
        let mut out = vec![0f32; gate.data.len()];
        out.par_chunks_mut(4096)
            .zip(gate.data.par_chunks(4096).zip(up.data.par_chunks(4096)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = silu(g) * u;
                }
            });
        CpuTensor::new(out, gate.rows, gate.cols)
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        same_dims("add", x, y)?;
        x.data
            .par_chunks_mut(4096)
            .zip(y.data.par_chunks(4096))
            .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, &y)| *x += y));
        Ok(())
    }

    fn token_nll(
        &self,
        hidden: &CpuTensor,
        lm_head: &CpuMatrix,
        predictions: &[Prediction],
    ) -> Result<Vec<f32>> {
        let mut nll = Vec::with_capacity(predictions.len());
        for chunk in predictions.chunks(NLL_CHUNK_ROWS) {
            if let Some(p) = chunk
                .iter()
                .find(|p| p.row >= hidden.rows || p.target as usize >= lm_head.rows)
            {
                return Err(Error::Invalid(format!(
                    "prediction of token {} at row {} is out of range ({} rows, vocabulary {})",
                    p.target, p.row, hidden.rows, lm_head.rows
                )));
            }
            let rows: Vec<usize> = chunk.iter().map(|p| p.row).collect();
            let logits = self.logits_flat(hidden, lm_head, &rows)?;
            nll.par_extend(
                logits
                    .par_chunks(lm_head.rows)
                    .zip(chunk.par_iter())
                    .map(|(l, p)| log_sum_exp(l) - l[p.target as usize]),
            );
        }
        Ok(nll)
    }

    fn logits(&self, hidden: &CpuTensor, lm_head: &CpuMatrix, rows: &[usize]) -> Result<Vec<Vec<f32>>> {
        let flat = self.logits_flat(hidden, lm_head, rows)?;
        Ok(flat.chunks(lm_head.rows).map(<[f32]>::to_vec).collect())
    }
}

impl CpuBackend {
    /// `[rows.len(), vocab]` logits of the selected rows.
    fn logits_flat(&self, hidden: &CpuTensor, lm_head: &CpuMatrix, rows: &[usize]) -> Result<Vec<f32>> {
        if hidden.cols != lm_head.cols {
            return Err(Error::Invalid(format!(
                "lm_head expects {} features, hidden states have {}",
                lm_head.cols, hidden.cols
            )));
        }
        let mut x = Vec::with_capacity(rows.len() * hidden.cols);
        for &r in rows {
            if r >= hidden.rows {
                return Err(Error::Invalid(format!("row {r} of {} requested", hidden.rows)));
            }
            x.extend_from_slice(hidden.row(r));
        }
        let mut out = vec![0f32; rows.len() * lm_head.rows];
        matmul_transposed(&x, &lm_head.data, &mut out, rows.len(), hidden.cols, lm_head.rows);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_is_stable() {
        let l = [1000.0f32, 1000.0];
        assert!((log_sum_exp(&l) - (1000.0 + 2f32.ln())).abs() < 1e-4);
    }

    #[test]
    fn rotary_rotates_pairs_half_apart() {
        let b = CpuBackend;
        let rope = RopeFrequencies::new(4, 10_000.0);
        let table = b.rope_table(&rope, &[2]).unwrap();
        let mut x = CpuTensor::new(vec![1.0, 0.0, 0.0, 1.0], 1, 4).unwrap();
        b.rotary(&mut x, &table, 4).unwrap();
        // Pair (x0, x2) = (1, 0) rotates by 2 rad; pair (x1, x3) = (0, 1) by 0.02 rad.
        let want = [2f32.cos(), -(0.02f32.sin()), 2f32.sin(), 0.02f32.cos()];
        for (a, b) in x.data.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?} vs {want:?}", x.data);
        }
    }

    #[test]
    fn nll_matches_direct_softmax() {
        let b = CpuBackend;
        let lm = b.matrix(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0].into(), 3, 2).unwrap();
        let h = b.tensor(&[0.5, -1.0], 1, 2).unwrap();
        let nll = b.token_nll(&h, &lm, &[Prediction { row: 0, target: 2 }]).unwrap();
        let logits = [0.5f64, -1.0, -0.5];
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        assert!((nll[0] as f64 - (lse - logits[2])).abs() < 1e-6);
        assert!(b.token_nll(&h, &lm, &[Prediction { row: 0, target: 3 }]).is_err());
    }

    #[test]
    fn embed_refuses_out_of_range_ids() {
        let b = CpuBackend;
        let table = b.matrix(vec![0.0; 6].into(), 3, 2).unwrap();
        assert!(b.embed(&table, &[2]).is_ok());
        let err = b.embed(&table, &[3]).unwrap_err().to_string();
        assert!(err.contains("token id 3"), "{err}");
    }
}
