//! Dense matrices on the CPU, in the element type they are stored in: f32 weights go to the
//! `gemm` crate as they are (borrowed from the mapped file); f16 and bf16 weights are widened
//! one tile at a time inside the product, so that no f32 copy of a whole matrix exists. For a
//! few rows (decoding), every weight row is read once and dotted with each input row
//! ([`few_rows`]): `gemm` would first pack the whole weight, doubling the traffic that bounds
//! a decode step.

use checkpoint::FloatData;
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

use crate::amx::{self, PackedRhs, TileBuffer};
use crate::bf16::{matmul_bf16_weight, matmul_packed_amx, with_packed_lhs};
use crate::compute::{Bf16Kernel, Compute};
use crate::convert::to_bf16;
use crate::layout::TileLayout;
use crate::math::dot;
use crate::matmul::matmul_transposed;
use crate::parallel::SharedOut;
use crate::{Error, Result};

/// Output columns per task of a tiled product (a multiple of 8).
const N_TILE: usize = 128;
/// Input rows widened per product.
const K_TILE: usize = 256;
/// Activation rows per task.
const M_CHUNK: usize = 512;

/// `out[m, n] = x[m, k] · Wt[k, n]` where `fill(k0..k1, n0..n1, tile)` writes a tile of `Wt`
/// in `layout`: each rayon task owns a block of output columns and widens or unpacks the
/// tiles it needs into a small buffer of its own.
pub(crate) fn tiled_matmul(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    layout: TileLayout,
    fill: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, &mut [f32]) + Sync,
) {
    assert_eq!(x.len(), m * k, "lhs is not [{m}, {k}]");
    assert_eq!(out.len(), m * n, "output is not [{m}, {n}]");
    let shared = SharedOut(out.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..m)
        .step_by(M_CHUNK)
        .flat_map(|m0| (0..n).step_by(N_TILE).map(move |n0| (m0, n0)))
        .collect();
    tasks
        .par_iter()
        .for_each_init(Vec::new, |tile: &mut Vec<f32>, &(m0, n0)| {
            let rows = (m - m0).min(M_CHUNK);
            let n1 = (n0 + N_TILE).min(n);
            let width = n1 - n0;
            for k0 in (0..k).step_by(K_TILE) {
                let k1 = (k0 + K_TILE).min(k);
                let depth = k1 - k0;
                tile.resize(depth * width, 0.0);
                fill(k0..k1, n0..n1, tile);
                let (rhs_cs, rhs_rs) = match layout {
                    TileLayout::KMajor => (1, width as isize),
                    TileLayout::NMajor => (depth as isize, 1),
                };
                // SAFETY: this task alone writes rows m0..m0+rows, columns n0..n1 of the
                // [m, n] output; x rows m0.. hold k values; the tile holds depth × width values
                // at the strides its layout gives.
                unsafe {
                    gemm(
                        rows,
                        width,
                        depth,
                        shared.ptr().add(m0 * n + n0),
                        1,
                        n as isize,
                        k0 > 0,
                        x.as_ptr().add(m0 * k + k0),
                        1,
                        k as isize,
                        tile.as_ptr(),
                        rhs_cs,
                        rhs_rs,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });
}

/// A dense `[rows, cols]` matrix in its stored element type, possibly borrowed from a
/// mapped checkpoint: a linear layer's weight, an embedding table or an lm_head.
#[derive(Clone, Debug)]
pub struct CpuMatrix {
    pub data: FloatData,
    pub rows: usize,
    pub cols: usize,
    /// f32 or f16 data rounded to bf16, made on the first 16-bit product and kept.
    bf16_copy: OnceLock<Vec<bf16>>,
    /// f32 or f16 data rounded to bf16 in the AMX kernel's tile order, made on the first AMX
    /// product and kept: the size of `bf16_copy`, which that path then does not make, and
    /// no packing per product (an lm_head's was a third of its product's time).
    amx_tiles: OnceLock<PackedRhs>,
}

impl CpuMatrix {
    /// `data` as a `[rows, cols]` matrix (no copy).
    pub fn new(data: FloatData, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::Shape(format!(
                "{} values do not make a [{rows}, {cols}] matrix",
                data.len()
            )));
        }
        Ok(CpuMatrix {
            data,
            rows,
            cols,
            bf16_copy: OnceLock::new(),
            amx_tiles: OnceLock::new(),
        })
    }

    /// The weight in bf16: the stored values when stored so, else a copy rounded once.
    fn bf16_weight(&self) -> &[bf16] {
        match &self.data {
            FloatData::BF16(w) => w,
            _ => self.bf16_copy.get_or_init(|| self.rounded_to_bf16()),
        }
    }

    /// A copy of the weight rounded to bf16.
    fn rounded_to_bf16(&self) -> Vec<bf16> {
        match &self.data {
            FloatData::F32(w) => to_bf16(w),
            _ => {
                let mut copy = vec![bf16::ZERO; self.data.len()];
                self.data.narrow_into_bf16(0..copy.len(), &mut copy);
                copy
            }
        }
    }

    /// The weight in the AMX kernel's tile order, where it is kept so (f32 or f16 data; bf16
    /// data, often a mapped file, is packed panel by panel per product instead, so that
    /// evaluation adds no copy of the model).
    fn amx_tiles(&self) -> Option<&PackedRhs> {
        if matches!(self.data, FloatData::BF16(_)) {
            return None;
        }
        Some(self.amx_tiles.get_or_init(|| {
            PackedRhs::from_n_major_into(TileBuffer::EMPTY, self.cols, self.rows, |range, out| {
                self.data.narrow_into_bf16(range, out)
            })
        }))
    }

    /// Row `r` widened to f32 into `out`.
    pub fn widen_row(&self, r: usize, out: &mut [f32]) {
        self.data.widen_into(r * self.cols..(r + 1) * self.cols, out);
    }

    /// `out[m, rows] = x[m, cols] · selfᵀ`, computed as `compute` says (a few rows, which
    /// are bound by reading the weight, always in f32).
    pub fn matmul(&self, compute: Compute, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_rows(compute, x, m, 0..self.rows, out);
    }

    /// `out[m, rows.len()] = x[m, cols] · self[rows]ᵀ`: [`CpuMatrix::matmul`] against a range of
    /// this matrix's rows (a slice of the vocabulary, for an lm_head).
    pub fn matmul_rows(&self, compute: Compute, x: &[f32], m: usize, rows: Range<usize>, out: &mut [f32]) {
        assert!(
            rows.end <= self.rows,
            "rows {rows:?} of a [{}, {}] matrix",
            self.rows,
            self.cols
        );
        let (n, k, first) = (rows.len(), self.cols, rows.start);
        let elements = first * k..rows.end * k;
        if m <= FEW_ROWS {
            return few_rows(x, m, k, n, out, |r, row| self.widen_row(first + r, row));
        }
        if compute.bf16_kernel() == Some(Bf16Kernel::Amx)
            && let Some(columns) = self.amx_tiles().and_then(|tiles| tiles.columns(rows.clone()))
        {
            return matmul_packed_amx(x, m, k, columns, out, n);
        }
        match (compute.bf16_kernel(), &self.data) {
            (Some(kernel), _) => matmul_bf16_weight(kernel, x, &self.bf16_weight()[elements], out, m, k, n),
            (None, FloatData::F32(w)) => matmul_transposed(x, &w[elements], out, m, k, n),
            (None, half) => tiled_matmul(x, m, k, n, out, TileLayout::NMajor, |ks, ns, tile| {
                let depth = ks.len();
                for (nn, row) in ns.zip(tile.chunks_exact_mut(depth)) {
                    let nn = first + nn;
                    half.widen_into(nn * k + ks.start..nn * k + ks.end, row);
                }
            }),
        }
    }
}

impl CpuMatrix {
    /// Whether [`CpuMatrix::matmul_row_slices`] multiplies slices of this matrix in place on
    /// the AMX tiles (the weight kept in tile order, `x` packed once for every slice).
    pub fn slices_in_place(&self, compute: Compute, m: usize) -> bool {
        m > FEW_ROWS && compute.bf16_kernel() == Some(Bf16Kernel::Amx) && self.amx_tiles().is_some()
    }

    /// `x[m, cols] · self[v0..v1]ᵀ` for consecutive slices of `width` rows (the last one
    /// shorter), each handed to `each(v0..v1, product)`: a vocabulary scored slice by slice
    /// without its whole `[m, vocab]` logits. Where [`CpuMatrix::slices_in_place`], `width`
    /// must be a multiple of 32 (the kernel's column pair).
    pub fn matmul_row_slices(
        &self,
        compute: Compute,
        x: &[f32],
        m: usize,
        width: usize,
        mut each: impl FnMut(Range<usize>, &mut [f32]),
    ) {
        let width = width.min(self.rows).max(1);
        let mut product = vec![0f32; m * width];
        let slices = (0..self.rows)
            .step_by(width)
            .map(|v0| v0..(v0 + width).min(self.rows));
        if self.slices_in_place(compute, m) {
            let tiles = self.amx_tiles().expect("checked by slices_in_place");
            return with_packed_lhs(x, m, self.cols, |a| {
                for slice in slices {
                    let out = &mut product[..m * slice.len()];
                    let columns = tiles
                        .columns(slice.clone())
                        .expect("slices start on whole column pairs");
                    amx::matmul(a, columns, out, slice.len(), 0);
                    each(slice, out);
                }
            });
        }
        for slice in slices {
            let out = &mut product[..m * slice.len()];
            self.matmul_rows(compute, x, m, slice.clone(), out);
            each(slice, out);
        }
    }
}

/// Input rows up to which products take the decoding paths (dense here, AWQ in `w4a16`).
pub const FEW_ROWS: usize = 16;
/// Weight rows (outputs) per task of [`few_rows`].
const ROWS_PER_TASK: usize = 64;

/// `out[m, n] = x[m, k] · Wᵀ` for small `m`, `weight_row(r, buf)` writing row `r` of `W` in
/// f32: each task reads its weight rows once and dots each with every input row.
pub(crate) fn few_rows(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    weight_row: impl Fn(usize, &mut [f32]) + Sync,
) {
    assert_eq!(x.len(), m * k, "lhs is not [{m}, {k}]");
    assert_eq!(out.len(), m * n, "output is not [{m}, {n}]");
    let blocks: Vec<Vec<f32>> = (0..n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|b| {
            let rows = b * ROWS_PER_TASK..((b + 1) * ROWS_PER_TASK).min(n);
            let mut w = vec![0f32; k];
            let mut y = vec![0f32; m * rows.len()];
            for (j, r) in rows.clone().enumerate() {
                weight_row(r, &mut w);
                for i in 0..m {
                    y[i * rows.len() + j] = dot(&x[i * k..(i + 1) * k], &w);
                }
            }
            y
        })
        .collect();
    for (b, y) in blocks.iter().enumerate() {
        let n0 = b * ROWS_PER_TASK;
        let width = y.len() / m;
        for i in 0..m {
            out[i * n + n0..i * n + n0 + width].copy_from_slice(&y[i * width..(i + 1) * width]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use rand::{RngExt, SeedableRng};

    #[test]
    fn weights_multiply_as_their_f32_widening() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (m, k, n) in [(1, 70, 9), (3, 70, 130), (16, 40, 65), (600, 300, 260)] {
            let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let halves = [
                FloatData::F32(w.clone().into()),
                FloatData::F16(w.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>().into()),
                FloatData::BF16(w.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>().into()),
            ];
            for data in halves {
                let widened = data.clone().into_f32().to_vec();
                let matrix = CpuMatrix::new(data, n, k).unwrap();
                let mut got = vec![f32::NAN; m * n];
                matrix.matmul(Compute::F32, &x, m, &mut got);
                let mut want = vec![0f32; m * n];
                matmul_transposed(&x, &widened, &mut want, m, k, n);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < 1e-4,
                    "({m},{k},{n}) {:?}: max error {err}",
                    matrix.data.dtype()
                );
            }
        }
    }
    /// An f32 or f16 weight kept in tile order multiplies, slice of rows by slice, exactly
    /// as its bf16 copy packed per product does (the same values through the same kernel —
    /// its scalar twin where the CPU has no tile unit); a slice that does not start on the
    /// kernel's unit takes the per-product path.
    #[test]
    fn a_weight_kept_in_tile_order_multiplies_as_one_packed_per_product() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let (m, k, n) = (40, 70, 200);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
        for data in [
            FloatData::F32(w.clone().into()),
            FloatData::F16(w.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>().into()),
        ] {
            let matrix = CpuMatrix::new(data, n, k).unwrap();
            let rounded = matrix.rounded_to_bf16();
            for rows in [0..n, 64..n, 32..100, 5..n] {
                let packed = matrix.amx_tiles().and_then(|tiles| tiles.columns(rows.clone()));
                assert_eq!(packed.is_some(), rows.start % 32 == 0, "{rows:?}");
                let mut got = vec![f32::NAN; m * rows.len()];
                matrix.matmul_rows(Compute::Amx, &x, m, rows.clone(), &mut got);
                let mut want = vec![0f32; m * rows.len()];
                let weight = &rounded[rows.start * k..rows.end * k];
                matmul_bf16_weight(Bf16Kernel::Amx, &x, weight, &mut want, m, k, rows.len());
                assert!(
                    got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{:?} rows {rows:?}",
                    matrix.data.dtype()
                );
            }
        }
    }

    #[test]
    fn row_slices_multiply_as_each_slice_alone() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (m, k, n) = (40, 70, 200);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
        let matrix = CpuMatrix::new(FloatData::F32(w.into()), n, k).unwrap();
        for (compute, in_place) in [(Compute::Amx, true), (Compute::F32, false)] {
            assert_eq!(matrix.slices_in_place(compute, m), in_place);
            assert!(!matrix.slices_in_place(compute, FEW_ROWS));
            for width in [32, 64, 96, 256] {
                let mut seen = Vec::new();
                matrix.matmul_row_slices(compute, &x, m, width, |slice, got| {
                    let mut want = vec![0f32; m * slice.len()];
                    matrix.matmul_rows(compute, &x, m, slice.clone(), &mut want);
                    assert!(
                        got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{compute} width {width}, rows {slice:?}"
                    );
                    seen.push(slice);
                });
                let want: Vec<_> = (0..n).step_by(width).map(|v| v..(v + width).min(n)).collect();
                assert_eq!(seen, want, "{compute} width {width}");
            }
        }
    }
}
