//! The CPU backend: f32 arithmetic, matrix products by the `gemm` crate, rayon across rows
//! and heads. It is also the reference twin of every GPU kernel.

use checkpoint::{Activation, FloatData, HostData};
use cpu_kernels::attention::{self, Products};
use cpu_kernels::math::{self, exp_in_place};
use cpu_kernels::{Compute, CpuAwq, CpuMatrix, HostTensor, PoolRoot, release_freed_memory};
use rayon::prelude::*;

use super::{
    AttentionLayout, AttentionSpec, Backend, ByteSize, LinearKernel, Prediction, RopeFrequencies,
    check_copy_rows,
};
use crate::backend::{DenseWeight, WeightFormat};
use crate::{Error, Result};

impl ByteSize for HostData<f32> {
    fn byte_size(&self) -> usize {
        self.len() * 4
    }
}

/// Runs everything on the host's cores; matrix products in the arithmetic it was made with.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    compute: Compute,
}

impl CpuBackend {
    /// A CPU backend on the current rayon pool, computing in f32.
    pub fn new() -> Self {
        CpuBackend {
            compute: Compute::F32,
        }
    }

    /// A CPU backend whose linear layers compute as `compute` says (resolved against this
    /// CPU by [`ComputeRequest::resolve`](crate::ComputeRequest::resolve)).
    pub fn with_compute(compute: Compute) -> Self {
        CpuBackend { compute }
    }

    /// The arithmetic of this backend's matrix products.
    pub fn compute(&self) -> Compute {
        self.compute
    }
}

fn same_dims(what: &str, a: &HostTensor, b: &HostTensor) -> Result<()> {
    if (a.rows, a.cols) != (b.rows, b.cols) {
        return Err(Error::Invalid(format!(
            "{what}: shapes [{}, {}] and [{}, {}] differ",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    Ok(())
}

/// `1 / sqrt(mean(x²) + eps)`, the mean accumulated in f64: the scale of an RMS norm (whole
/// rows and Qwen3's heads alike).
fn inverse_rms(x: &[f32], eps: f32) -> f32 {
    let mean_sq = math::sum_of_squares_f64(x) / x.len() as f64;
    1.0 / ((mean_sq as f32) + eps).sqrt()
}

/// `(max, Σ exp(l − max))` of a row of logits, overwriting it with `exp(l − max)`; the sum
/// is accumulated in f64 for a stable total over large vocabularies.
fn max_and_sum_exp_in_place(logits: &mut [f32]) -> (f32, f64) {
    let max = math::max(logits);
    logits.iter_mut().for_each(|l| *l -= max);
    exp_in_place(logits);
    (max, math::sum_f64(logits))
}

/// Logits kept at once when scoring (rows × a slice of the vocabulary): 25 MB of f32.
const NLL_LOGITS: usize = 128 * 49_152;
/// The same where slices are multiplied in place ([`CpuMatrix::slices_in_place`]): 4 MiB,
/// about a core's L2, where the log-sum-exp reads it back.
const NLL_LOGITS_IN_CACHE: usize = 1 << 20;
/// The narrowest slice of the vocabulary scored at once.
const NLL_MIN_COLUMNS: usize = 256;

/// A row's log-sum-exp so far, over the vocabulary slices seen: `(max, Σ exp(l − max))`.
#[derive(Clone, Copy)]
struct RunningLogSumExp {
    max: f32,
    sum: f64,
}

impl RunningLogSumExp {
    const EMPTY: Self = RunningLogSumExp {
        max: f32::NEG_INFINITY,
        sum: 0.0,
    };

    /// Adds a slice's `(max, Σ exp(l − max))`, rescaling whichever sum has the smaller max.
    fn merge(&mut self, max: f32, sum: f64) {
        if max > self.max {
            self.sum = self.sum * ((self.max - max) as f64).exp() + sum;
            self.max = max;
        } else {
            self.sum += sum * ((max - self.max) as f64).exp();
        }
    }
}

impl Backend for CpuBackend {
    type Tensor = HostTensor;
    type Buffer = [f32];
    type Matrix = CpuMatrix;
    type Vector = HostData<f32>;

    fn name(&self) -> String {
        format!(
            "cpu ({} threads, {} compute)",
            rayon::current_num_threads(),
            self.compute
        )
    }

    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        // +7-11 % on an AMX evaluation at 512 tokens per pass (~25 parallel loops per layer).
        // Quantization does not come here: SmolLM2's gained 8-10 %, but a 7B-shaped search,
        // whose loops nest around its products, lost 15-25 %.
        // Memory freed on the calling thread (a tokenizer, a model's loading) sits in its
        // malloc arena, which the worker's allocations do not reuse: hand it back, once (the
        // peak RSS of an f32 SmolLM2 evaluation: 797 MB without, 707 MB with; trimming before
        // every pass cost 2.5 % in page faults).
        static FIRST: std::sync::Once = std::sync::Once::new();
        FIRST.call_once(release_freed_memory);
        rayon::scope(|_| {
            let _root = PoolRoot::enter();
            f()
        })
    }

    fn matrix(&self, weight: DenseWeight) -> Result<CpuMatrix> {
        Ok(CpuMatrix::new(weight.data, weight.rows, weight.cols)?)
    }

    fn vector(&self, data: FloatData) -> Result<HostData<f32>> {
        Ok(data.into_f32())
    }

    fn linear(&self, weight: Box<dyn WeightFormat>) -> Result<Box<dyn LinearKernel<Self>>> {
        weight.place_cpu(self)
    }

    fn alloc(&self, rows: usize, cols: usize) -> Result<HostTensor> {
        Ok(HostTensor::zeros(rows, cols))
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<HostTensor> {
        Ok(HostTensor::zeros(rows, cols))
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<HostTensor> {
        Ok(HostTensor::new(data.to_vec(), rows, cols)?)
    }

    fn download(&self, x: &HostTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn read<R>(&self, x: &HostTensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        Ok(f(&x.data))
    }

    fn dims(&self, x: &HostTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn buffer<'a>(&self, x: &'a HostTensor) -> &'a [f32] {
        &x.data
    }

    fn buffer_mut<'a>(&self, x: &'a mut HostTensor) -> &'a mut [f32] {
        &mut x.data
    }

    fn embed_into(
        &self,
        table: &CpuMatrix,
        ids: &[u32],
        first_id: usize,
        out: &mut HostTensor,
    ) -> Result<()> {
        let cols = table.cols;
        if (out.rows, out.cols) != (ids.len(), cols) {
            return Err(Error::Invalid(format!(
                "embed: {} ids of {cols} features into [{}, {}]",
                ids.len(),
                out.rows,
                out.cols
            )));
        }
        for (row, &id) in out.data.chunks_exact_mut(cols).zip(ids) {
            match (id as usize).checked_sub(first_id).filter(|&l| l < table.rows) {
                Some(local) => table.widen_row(local, row),
                None => row.fill(0.0),
            }
        }
        Ok(())
    }

    fn rms_norm_into(
        &self,
        x: &HostTensor,
        weight: &HostData<f32>,
        eps: f32,
        out: &mut HostTensor,
    ) -> Result<()> {
        if weight.len() != x.cols {
            return Err(Error::Invalid(format!(
                "rms_norm: weight of {} for {} features",
                weight.len(),
                x.cols
            )));
        }
        same_dims("rms_norm", x, out)?;
        out.data
            .par_chunks_mut(x.cols)
            .zip(x.data.par_chunks(x.cols))
            .for_each(|(y, x)| {
                let inv = inverse_rms(x, eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight.iter()) {
                    *y = w * (x * inv);
                }
            });
        Ok(())
    }

    fn head_rms_norm(
        &self,
        x: &mut HostTensor,
        weight: &HostData<f32>,
        eps: f32,
        head_dim: usize,
    ) -> Result<()> {
        if weight.len() != head_dim || head_dim == 0 || !x.cols.is_multiple_of(head_dim) {
            return Err(Error::Invalid(format!(
                "head_rms_norm: weight of {} for heads of {head_dim} in rows of {}",
                weight.len(),
                x.cols
            )));
        }
        x.data.par_chunks_mut(head_dim).for_each(|head| {
            let inv = inverse_rms(head, eps);
            for (y, &w) in head.iter_mut().zip(weight.iter()) {
                *y = w * (*y * inv);
            }
        });
        Ok(())
    }

    fn add_bias(&self, x: &mut HostTensor, bias: &HostData<f32>) -> Result<()> {
        if bias.len() != x.cols {
            return Err(Error::Invalid(format!(
                "linear: bias of {} for {} outputs",
                bias.len(),
                x.cols
            )));
        }
        x.data.par_chunks_mut(x.cols).for_each(|row| {
            for (y, &b) in row.iter_mut().zip(bias.iter()) {
                *y += b;
            }
        });
        Ok(())
    }

    fn rope_table(&self, rope: &RopeFrequencies, positions: &[u32]) -> Result<HostTensor> {
        Ok(HostTensor::new(
            rope.table(positions),
            positions.len(),
            rope.head_dim,
        )?)
    }

    fn rotary(&self, x: &mut HostTensor, table: &HostTensor, head_dim: usize) -> Result<()> {
        if table.rows != x.rows
            || table.cols > head_dim
            || !table.cols.is_multiple_of(2)
            || !x.cols.is_multiple_of(head_dim)
        {
            return Err(Error::Invalid(format!(
                "rotary: table [{}, {}] for activations [{}, {}] with head_dim {head_dim}",
                table.rows, table.cols, x.rows, x.cols
            )));
        }
        // The table covers the rotating leading dimensions of a head; the rest pass through.
        let half = table.cols / 2;
        x.data
            .par_chunks_mut(x.cols)
            .zip(table.data.par_chunks(table.cols))
            .for_each(|(row, cs)| {
                let (cos, sin) = cs.split_at(half);
                for head in row.chunks_exact_mut(head_dim) {
                    let (a, b) = head[..2 * half].split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (a[i], b[i]);
                        a[i] = x1 * cos[i] - x2 * sin[i];
                        b[i] = x2 * cos[i] + x1 * sin[i];
                    }
                }
            });
        Ok(())
    }

    fn attention_into(
        &self,
        q: &HostTensor,
        k: &HostTensor,
        v: &HostTensor,
        spec: &AttentionSpec,
        layout: &AttentionLayout,
        out: &mut HostTensor,
    ) -> Result<()> {
        let products = Products::choose(self.compute, layout.rows());
        Ok(attention::attention(q, k, v, spec, layout, out, products)?)
    }

    fn copy_rows(
        &self,
        src: &HostTensor,
        src_row: usize,
        dst: &mut HostTensor,
        dst_row: usize,
        rows: usize,
    ) -> Result<()> {
        check_copy_rows((src.rows, src.cols), src_row, (dst.rows, dst.cols), dst_row, rows)?;
        let cols = src.cols;
        dst.data[dst_row * cols..(dst_row + rows) * cols]
            .copy_from_slice(&src.data[src_row * cols..(src_row + rows) * cols]);
        Ok(())
    }

    fn gate_mul_into(
        &self,
        activation: Activation,
        gate: &HostTensor,
        up: &HostTensor,
        out: &mut HostTensor,
    ) -> Result<()> {
        same_dims("gate_mul", gate, up)?;
        same_dims("gate_mul", gate, out)?;
        let kernel = match activation {
            Activation::Silu => math::silu_mul_into,
            Activation::GeluTanh => math::gelu_tanh_mul_into,
        };
        out.data
            .par_chunks_mut(4096)
            .zip(gate.data.par_chunks(4096).zip(up.data.par_chunks(4096)))
            .for_each(|(y, (g, u))| kernel(y, g, u));
        Ok(())
    }

    fn scale(&self, x: &mut HostTensor, factor: f32) -> Result<()> {
        x.data
            .par_chunks_mut(4096)
            .for_each(|x| x.iter_mut().for_each(|v| *v *= factor));
        Ok(())
    }

    fn add_assign(&self, x: &mut HostTensor, y: &HostTensor) -> Result<()> {
        same_dims("add", x, y)?;
        x.data
            .par_chunks_mut(4096)
            .zip(y.data.par_chunks(4096))
            .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, &y)| *x += y));
        Ok(())
    }

    fn nll_parts(
        &self,
        hidden: &HostTensor,
        lm_head: &CpuMatrix,
        predictions: &[Prediction],
        first_id: usize,
        softcap: Option<f32>,
    ) -> Result<HostTensor> {
        let m = predictions.len().max(1);
        // Whole pairs of the AMX kernel's column blocks, so that a kept lm_head is
        // multiplied slice by slice in place; there the input is packed once for all slices,
        // and a narrower slice is still in cache when its log-sum-exp reads it.
        let width = match lm_head.slices_in_place(self.compute, m) {
            true => (NLL_LOGITS_IN_CACHE / m / 32 * 32).max(32),
            false => (NLL_LOGITS / m / 32 * 32).max(NLL_MIN_COLUMNS),
        };
        self.nll_parts_in_slices(hidden, lm_head, predictions, first_id, width, softcap)
    }

    fn logits(
        &self,
        hidden: &HostTensor,
        lm_head: &CpuMatrix,
        rows: &[usize],
        softcap: Option<f32>,
    ) -> Result<HostTensor> {
        let mut logits = self.logits_flat(hidden, lm_head, rows)?;
        if let Some(cap) = softcap {
            logits.par_chunks_mut(4096).for_each(|l| soft_cap(l, cap));
        }
        Ok(HostTensor::new(logits, rows.len(), lm_head.rows)?)
    }
}

impl CpuBackend {
    /// [`Backend::nll_parts`] over slices of `width` vocabulary ids, all rows at once: the
    /// lm_head is read (and packed for the product) once per call, where slices of rows
    /// would read it once per slice of rows.
    fn nll_parts_in_slices(
        &self,
        hidden: &HostTensor,
        lm_head: &CpuMatrix,
        predictions: &[Prediction],
        first_id: usize,
        width: usize,
        softcap: Option<f32>,
    ) -> Result<HostTensor> {
        let rows: Vec<usize> = predictions.iter().map(|p| p.row).collect();
        let x = gather_rows(hidden, lm_head, &rows)?;
        let m = rows.len();
        if m == 0 {
            return Ok(HostTensor::new(Vec::new(), 0, 3)?);
        }
        let mut running = vec![RunningLogSumExp::EMPTY; m];
        let mut targets = vec![0f32; m];
        lm_head.matmul_row_slices(self.compute, &x, m, width, |slice, logits| {
            let (v0, v1) = (slice.start, slice.end);
            logits
                .par_chunks_mut(v1 - v0)
                .zip(predictions.par_iter())
                .zip(running.par_iter_mut().zip(targets.par_iter_mut()))
                .for_each(|((l, p), (running, target))| {
                    if let Some(cap) = softcap {
                        soft_cap(l, cap);
                    }
                    let id = p.target as usize;
                    if (first_id + v0..first_id + v1).contains(&id) {
                        *target = l[id - first_id - v0];
                    }
                    let (max, sum) = max_and_sum_exp_in_place(l);
                    running.merge(max, sum);
                });
        });
        let parts = running
            .iter()
            .zip(&targets)
            .flat_map(|(r, &t)| [r.max, r.sum as f32, t])
            .collect();
        Ok(HostTensor::new(parts, m, 3)?)
    }

    /// `[rows.len(), vocab]` logits of the selected rows.
    fn logits_flat(&self, hidden: &HostTensor, lm_head: &CpuMatrix, rows: &[usize]) -> Result<Vec<f32>> {
        let x = gather_rows(hidden, lm_head, rows)?;
        let mut out = vec![0f32; rows.len() * lm_head.rows];
        lm_head.matmul(self.compute, &x, rows.len(), &mut out);
        Ok(out)
    }
}

/// `l = cap · tanh(l / cap)`, as transformers soft-caps Gemma 2's logits (three f32 steps).
fn soft_cap(logits: &mut [f32], cap: f32) {
    logits.iter_mut().for_each(|l| *l = (*l / cap).tanh() * cap);
}

/// The selected rows of `hidden`, checked against the lm_head's features, as one `[rows, cols]`
/// block.
fn gather_rows(hidden: &HostTensor, lm_head: &CpuMatrix, rows: &[usize]) -> Result<Vec<f32>> {
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
    Ok(x)
}

impl ByteSize for CpuMatrix {
    fn byte_size(&self) -> usize {
        self.data.byte_size()
    }
}

impl LinearKernel<CpuBackend> for CpuMatrix {
    fn out_features(&self) -> usize {
        self.rows
    }

    fn in_features(&self) -> usize {
        self.cols
    }

    fn byte_size(&self) -> usize {
        self.data.byte_size()
    }

    fn forward_into(&self, backend: &CpuBackend, x: &HostTensor, out: &mut HostTensor) -> Result<()> {
        check_linear_dims(x, out, self.rows, self.cols)?;
        self.matmul(backend.compute(), &x.data, x.rows, &mut out.data);
        Ok(())
    }
}

impl LinearKernel<CpuBackend> for CpuAwq {
    fn out_features(&self) -> usize {
        self.out_features
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn byte_size(&self) -> usize {
        self.bytes()
    }

    fn forward_into(&self, backend: &CpuBackend, x: &HostTensor, out: &mut HostTensor) -> Result<()> {
        check_linear_dims(x, out, self.out_features, self.in_features)?;
        self.matmul(backend.compute(), &x.data, x.rows, &mut out.data);
        Ok(())
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn gated_into(
        &self,
        up: &dyn LinearKernel<CpuBackend>,
        backend: &CpuBackend,
        x: &HostTensor,
        out: &mut HostTensor,
    ) -> Result<bool> {
        let Some(up) = up.as_any().and_then(|up| up.downcast_ref::<CpuAwq>()) else {
            return Ok(false);
        };
        if (up.in_features, up.out_features) != (self.in_features, self.out_features) {
            return Ok(false);
        }
        check_linear_dims(x, out, self.out_features, self.in_features)?;
        Ok(self.gated_matmul(up, backend.compute(), &x.data, x.rows, &mut out.data))
    }
}

/// An error unless `x` is `[rows, in_features]` and `out` `[rows, out_features]`.
fn check_linear_dims(
    x: &HostTensor,
    out: &HostTensor,
    out_features: usize,
    in_features: usize,
) -> Result<()> {
    if x.cols != in_features || (out.rows, out.cols) != (x.rows, out_features) {
        return Err(Error::Invalid(format!(
            "linear [{out_features}, {in_features}]: input [{}, {}], output [{}, {}]",
            x.rows, x.cols, out.rows, out.cols
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_and_sum_are_stable() {
        let mut l = [1000.0f32, 1000.0];
        assert_eq!(max_and_sum_exp_in_place(&mut l), (1000.0, 2.0));
    }

    #[test]
    fn rotary_rotates_pairs_half_apart() {
        let b = CpuBackend::new();
        let rope = RopeFrequencies::new(4, 10_000.0);
        let table = b.rope_table(&rope, &[2]).unwrap();
        let mut x = HostTensor::new(vec![1.0, 0.0, 0.0, 1.0], 1, 4).unwrap();
        b.rotary(&mut x, &table, 4).unwrap();
        // Pair (x0, x2) = (1, 0) rotates by 2 rad; pair (x1, x3) = (0, 1) by 0.02 rad.
        let want = [2f32.cos(), -(0.02f32.sin()), 2f32.sin(), 0.02f32.cos()];
        for (a, b) in x.data.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?} vs {want:?}", x.data);
        }
    }

    #[test]
    fn nll_parts_match_direct_softmax() {
        let b = CpuBackend::new();
        let lm = b
            .matrix(DenseWeight::f32(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], 3, 2).unwrap())
            .unwrap();
        let h = b.upload(&[0.5, -1.0], 1, 2).unwrap();
        let parts = b
            .nll_parts(&h, &lm, &[Prediction { row: 0, target: 2 }], 0, None)
            .unwrap();
        let nll = crate::backend::combine_nll_parts(&parts.data, 1);
        let logits = [0.5f64, -1.0, -0.5];
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        assert!((nll[0] as f64 - (lse - logits[2])).abs() < 1e-6);
        // A target another rank holds contributes no logit here.
        let parts = b
            .nll_parts(&h, &lm, &[Prediction { row: 0, target: 7 }], 0, None)
            .unwrap();
        assert_eq!(parts.data[2], 0.0);
    }

    #[test]
    fn nll_parts_over_vocabulary_slices_match_the_whole_softmax() {
        let (vocab, cols, rows) = (7, 3, 5);
        let b = CpuBackend::new();
        let weight: Vec<f32> = (0..vocab * cols)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 2.0)
            .collect();
        let lm = b
            .matrix(DenseWeight::f32(weight.clone(), vocab, cols).unwrap())
            .unwrap();
        let hidden: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) / 3.0)
            .collect();
        let h = b.upload(&hidden, rows, cols).unwrap();
        // Targets in the first, a middle and the last slice, and one another rank holds.
        let predictions: Vec<Prediction> = [(0, 0), (1, 6), (2, 3), (3, 9), (4, 4)]
            .map(|(row, target)| Prediction { row, target })
            .to_vec();
        // Soft-capped at 1.5 (Gemma 2 caps at 30), most of these logits change.
        for (width, softcap) in [1, 2, 3, 6, 7, 100]
            .into_iter()
            .flat_map(|w| [(w, None), (w, Some(1.5f32))])
        {
            let parts = b
                .nll_parts_in_slices(&h, &lm, &predictions, 0, width, softcap)
                .unwrap();
            let nll = crate::backend::combine_nll_parts(&parts.data, 1);
            for (p, got) in predictions.iter().zip(&nll) {
                let logits: Vec<f64> = (0..vocab)
                    .map(|v| {
                        (0..cols)
                            .map(|c| (hidden[p.row * cols + c] * weight[v * cols + c]) as f64)
                            .sum()
                    })
                    .map(|l: f64| softcap.map_or(l, |cap| cap as f64 * (l / cap as f64).tanh()))
                    .collect();
                let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
                let target = logits.get(p.target as usize).copied().unwrap_or(0.0);
                assert!(
                    (*got as f64 - (lse - target)).abs() < 1e-5,
                    "width {width}, row {}: {got} vs {}",
                    p.row,
                    lse - target
                );
            }
        }
    }

    #[test]
    fn head_rms_norm_is_rms_norm_over_each_head() {
        let b = CpuBackend::new();
        let values: Vec<f32> = (0..16).map(|i| (i as f32 - 6.5) / 3.0).collect();
        let weight: HostData<f32> = vec![0.5, 1.0, 1.5, 2.0].into();
        let mut heads = HostTensor::new(values.clone(), 2, 8).unwrap();
        b.head_rms_norm(&mut heads, &weight, 1e-6, 4).unwrap();
        let rows = HostTensor::new(values, 4, 4).unwrap();
        assert_eq!(heads.data, b.rms_norm(&rows, &weight, 1e-6).unwrap().data);
        assert!(b.head_rms_norm(&mut heads, &weight, 1e-6, 3).is_err());
    }

    #[test]
    fn embed_zeroes_ids_of_other_shards() {
        let b = CpuBackend::new();
        let table = b
            .matrix(DenseWeight::f32(vec![1.0, 2.0, 3.0, 4.0], 2, 2).unwrap())
            .unwrap();
        let x = b.embed(&table, &[4, 5, 1], 4, 2).unwrap();
        assert_eq!(x.data, vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0]);
    }
}
