//! Captured activations `[tokens, features]`, held in the precision the search computes in.
//!
//! A layer's captured inputs are the quantizer's largest allocation after its weights: at
//! the Llama-2-7B shape they take 93 KB per calibration token in f32, 1.9 GB at AutoAWQ's
//! default 20,480 tokens. When the search's products run in bf16 they round every
//! activation to bf16 anyway, so the inputs are kept in bf16 (half the bytes) and widened
//! block by block where f32 is needed; the f32 search keeps them in f32, exactly.

use std::borrow::Cow;
use std::ops::Range;

use cpu_kernels::{gram_into, gram_rows_bf16, gram_rows_into, to_bf16_slice};
use half::bf16;
use rayon::prelude::*;
use tp_runtime::{Compute, HostTensor};

/// Rows widened to f32 at once by the block-wise readers of bf16 activations.
pub const ROWS_PER_BLOCK: usize = 2048;

/// The stored values.
#[derive(Clone, Debug)]
enum Values {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A `[rows, cols]` matrix of activations, stored in f32 or bf16.
#[derive(Clone, Debug)]
pub struct Activations {
    values: Values,
    rows: usize,
    cols: usize,
}

impl Activations {
    /// Zeros, stored as the products of `compute` read them: bf16 for the 16-bit paths.
    pub fn zeros(rows: usize, cols: usize, compute: Compute) -> Self {
        let values = match compute {
            Compute::F32 => Values::F32(vec![0.0; rows * cols]),
            Compute::Bf16 | Compute::Amx => Values::Bf16(vec![bf16::ZERO; rows * cols]),
        };
        Activations { values, rows, cols }
    }

    /// f32 values, kept as they are.
    pub fn from_f32(x: HostTensor) -> Self {
        Activations {
            rows: x.rows,
            cols: x.cols,
            values: Values::F32(x.data),
        }
    }

    /// Number of rows (calibration tokens).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the values are stored in bf16.
    pub fn is_bf16(&self) -> bool {
        matches!(self.values, Values::Bf16(_))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.values {
            Values::F32(v) => v.len() * 4,
            Values::Bf16(v) => v.len() * 2,
        }
    }

    /// Overwrites rows `start..` with `values` (whole rows), rounding them when stored in bf16.
    pub fn write_rows(&mut self, start: usize, values: &[f32]) {
        let range = start * self.cols..start * self.cols + values.len();
        match &mut self.values {
            Values::F32(v) => v[range].copy_from_slice(values),
            Values::Bf16(v) => to_bf16_slice(values, &mut v[range]),
        }
    }

    /// Rows `range` in f32: borrowed when stored so, else widened.
    pub fn rows_f32(&self, range: Range<usize>) -> Cow<'_, [f32]> {
        let values = range.start * self.cols..range.end * self.cols;
        match &self.values {
            Values::F32(v) => Cow::Borrowed(&v[values]),
            Values::Bf16(v) => Cow::Owned(widen(&v[values])),
        }
    }

    /// Calls `f(rows, values)` over consecutive blocks of rows in f32: one block holding
    /// everything when stored in f32 (no copy), blocks of [`ROWS_PER_BLOCK`] widened in turn
    /// when stored in bf16 (so that no f32 copy of the whole exists).
    pub fn for_each_block<E>(
        &self,
        mut f: impl FnMut(Range<usize>, &[f32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let block = match &self.values {
            Values::F32(_) => self.rows.max(1),
            Values::Bf16(_) => ROWS_PER_BLOCK,
        };
        for start in (0..self.rows).step_by(block) {
            let rows = start..(start + block).min(self.rows);
            f(rows.clone(), &self.rows_f32(rows))?;
        }
        Ok(())
    }

    /// Row `r` in f32.
    pub fn row_f32(&self, r: usize) -> Cow<'_, [f32]> {
        self.rows_f32(r..r + 1)
    }

    /// Every `step`-th row, in f32.
    pub fn every_nth_row(&self, step: usize) -> HostTensor {
        let data: Vec<f32> = (0..self.rows)
            .step_by(step.max(1))
            .flat_map(|r| self.row_f32(r).into_owned())
            .collect();
        HostTensor {
            rows: data.len() / self.cols.max(1),
            cols: self.cols,
            data,
        }
    }

    /// Per-channel mean |x| over the rows, accumulated in f64 in a fixed order (so that the
    /// result does not depend on thread scheduling) and returned as f32.
    pub fn mean_abs(&self) -> Vec<f32> {
        let cols = self.cols;
        match &self.values {
            Values::F32(v) => mean_abs_of(v, cols, self.rows, |x| x.abs() as f64),
            Values::Bf16(v) => mean_abs_of(v, cols, self.rows, |x| x.to_f32().abs() as f64),
        }
    }

    /// Divides column `c` of every row by `s[c]` (a scale fused into the previous operator),
    /// rounding again when stored in bf16.
    pub fn divide_columns(&mut self, s: &[f32]) {
        assert_eq!(s.len(), self.cols, "one scale per column");
        match &mut self.values {
            Values::F32(v) => v
                .par_chunks_mut(self.cols)
                .for_each(|row| row.iter_mut().zip(s).for_each(|(v, s)| *v /= s)),
            Values::Bf16(v) => v.par_chunks_mut(self.cols).for_each(|row| {
                row.iter_mut()
                    .zip(s)
                    .for_each(|(v, s)| *v = bf16::from_f32(v.to_f32() / s))
            }),
        }
    }

    /// `xᵀ x`, `[cols, cols]`, in f32 (summed block by block when stored in bf16).
    pub fn gram(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.cols * self.cols];
        let mut first = true;
        self.for_each_block(|rows, x| {
            gram_into(x, rows.len(), self.cols, 1.0, &mut out, !first);
            first = false;
            Ok::<(), std::convert::Infallible>(())
        })
        .expect("infallible");
        out
    }

    /// `xᵀ x` rounded to bf16, `[cols, cols]`: each element summed in f32 over every row and
    /// rounded once, computed [`ROWS_PER_BLOCK`] rows of the result at a time, so that no f32
    /// copy of the whole exists beside it (at the 70B shape's down_proj the f32 matrix takes
    /// 3.3 GB, the bf16 one 1.6 GB). Rows stored in bf16 are multiplied as they are, by the
    /// bf16 kernel (2× the f32 rate, no widened copies).
    pub fn gram_bf16(&self) -> Vec<bf16> {
        let cols = self.cols;
        let mut out = vec![bf16::ZERO; cols * cols];
        let mut block = Vec::new();
        for (b, out) in out.chunks_mut(ROWS_PER_BLOCK * cols).enumerate() {
            let first = b * ROWS_PER_BLOCK;
            let width = out.len() / cols;
            if let Values::Bf16(x) = &self.values {
                gram_rows_bf16(x, self.rows, cols, first..first + width, out);
                continue;
            }
            block.clear();
            block.resize(width * cols, 0f32);
            let mut accumulate = false;
            self.for_each_block(|rows, x| {
                // Result rows first..first + width: columns first.. of x, transposed, times x.
                gram_rows_into(x, rows.len(), cols, first..first + width, &mut block, accumulate);
                accumulate = true;
                Ok::<(), std::convert::Infallible>(())
            })
            .expect("infallible");
            to_bf16_slice(&block, out);
        }
        out
    }

    /// Index of the first value that is not finite.
    pub fn first_non_finite(&self) -> Option<usize> {
        match &self.values {
            Values::F32(v) => v.iter().position(|x| !x.is_finite()),
            Values::Bf16(v) => v.iter().position(|x| !x.is_finite()),
        }
    }
}

/// `values` widened to f32.
fn widen(values: &[bf16]) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    out.par_chunks_mut(1 << 14)
        .zip(values.par_chunks(1 << 14))
        .for_each(|(o, v)| half::slice::HalfFloatSliceExt::convert_to_f32_slice(v, o));
    out
}

fn mean_abs_of<T: Sync>(values: &[T], cols: usize, rows: usize, abs: impl Fn(&T) -> f64 + Sync) -> Vec<f32> {
    const ROWS: usize = 256;
    let partial: Vec<Vec<f64>> = values
        .par_chunks(ROWS * cols.max(1))
        .map(|block| {
            let mut acc = vec![0f64; cols];
            for row in block.chunks_exact(cols) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += abs(v);
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; cols];
    for p in partial {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total.into_iter().map(|v| (v / rows as f64) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpu_kernels::to_bf16;

    fn sample(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect()
    }

    fn filled(rows: usize, cols: usize, compute: Compute) -> (Activations, Vec<f32>) {
        let x = sample(rows, cols);
        let mut a = Activations::zeros(rows, cols, compute);
        a.write_rows(0, &x[..3 * cols]);
        a.write_rows(3, &x[3 * cols..]);
        (a, x)
    }

    #[test]
    fn mean_abs_is_per_channel() {
        let x = Activations::from_f32(HostTensor::new(vec![1.0, -2.0, -3.0, 4.0], 2, 2).unwrap());
        assert_eq!(x.mean_abs(), vec![2.0, 3.0]);
    }

    #[test]
    fn f32_storage_is_exact_and_bf16_storage_rounds_once() {
        let (rows, cols) = (5000, 7);
        let (f, x) = filled(rows, cols, Compute::F32);
        assert!(!f.is_bf16());
        assert_eq!(f.rows_f32(0..rows).as_ref(), &x[..]);
        let (b, _) = filled(rows, cols, Compute::Bf16);
        assert!(b.is_bf16());
        assert_eq!(b.bytes() * 2, f.bytes());
        let rounded: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        assert_eq!(b.rows_f32(0..rows).as_ref(), &rounded[..]);
        assert_eq!(b.row_f32(4321).as_ref(), &rounded[4321 * cols..4322 * cols]);
        // Blocks cover every row once, in order, with the stored values.
        let mut seen = Vec::new();
        b.for_each_block(|r, v| {
            assert_eq!(v, &rounded[r.start * cols..r.end * cols]);
            seen.push(r);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(seen, vec![0..2048, 2048..4096, 4096..5000]);
        // Statistics of the bf16 store are those of its rounded values.
        let twin = Activations::from_f32(HostTensor::new(rounded.clone(), rows, cols).unwrap());
        assert_eq!(b.mean_abs(), twin.mean_abs());
        let (g, want) = (b.gram(), twin.gram());
        for (g, w) in g.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} vs {w}");
        }
        assert_eq!(b.every_nth_row(1000).data, twin.every_nth_row(1000).data);
        // The bf16 Gram matrix, made block by block, is the f32 one rounded (up to the f32
        // summation order, one bf16 step at most).
        let rounded_gram = to_bf16(&twin.gram());
        for (g, w) in b.gram_bf16().iter().zip(&rounded_gram) {
            let (g, w) = (g.to_f32(), w.to_f32());
            assert!((g - w).abs() <= w.abs() / 128.0 + 1e-6, "{g} vs {w}");
        }
        let square = |cols| {
            let (a, _) = filled(300, cols, Compute::Bf16);
            let whole =
                Activations::from_f32(HostTensor::new(a.rows_f32(0..300).into_owned(), 300, cols).unwrap());
            (a.gram_bf16(), to_bf16(&whole.gram()))
        };
        // More result rows than one block: every block lands in its place.
        let (blocked, whole) = square(2100);
        let worst = blocked
            .iter()
            .zip(&whole)
            .map(|(g, w)| (g.to_f32() - w.to_f32()).abs() / w.to_f32().abs().max(1.0))
            .fold(0f32, f32::max);
        assert!(worst <= 1.0 / 128.0, "worst relative difference {worst}");
    }

    #[test]
    fn divide_columns_rounds_in_the_stored_type() {
        let (mut b, x) = filled(6, 3, Compute::Bf16);
        let s = [2.0, 0.5, 3.0];
        b.divide_columns(&s);
        for (i, v) in b.rows_f32(0..6).iter().enumerate() {
            let want = bf16::from_f32(bf16::from_f32(x[i]).to_f32() / s[i % 3]).to_f32();
            assert_eq!(*v, want);
        }
        let (mut f, x) = filled(6, 3, Compute::F32);
        f.divide_columns(&s);
        for (i, v) in f.rows_f32(0..6).iter().enumerate() {
            assert_eq!(*v, x[i] / s[i % 3]);
        }
    }

    #[test]
    fn non_finite_values_are_found_in_either_store() {
        for compute in [Compute::F32, Compute::Bf16] {
            let mut a = Activations::zeros(4, 2, compute);
            assert_eq!(a.first_non_finite(), None);
            a.write_rows(2, &[0.0, f32::NAN]);
            assert_eq!(a.first_non_finite(), Some(5));
        }
    }
}
