//! W4A16 products on the CPU. AWQ "gemm" weights stay packed in memory; each task unpacks
//! one `K_TILE × N_TILE` tile at a time into a small f32 buffer and multiplies it with the
//! `gemm` crate, so no dequantized copy of a whole matrix ever exists.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::SharedOut;
use crate::Result;
use crate::awq::{AwqGemm, ORDER, PACK};
use crate::checkpoint::{F32Data, HostData};

/// Output columns per task (a multiple of 8).
const N_TILE: usize = 128;
/// Input rows unpacked per product.
const K_TILE: usize = 256;
/// Activation rows per task.
const M_CHUNK: usize = 512;

/// An AWQ weight ready for the CPU kernel.
#[derive(Clone, Debug)]
pub struct CpuAwq {
    /// Packed `[in, out/8]`, exactly as in the checkpoint.
    qweight: HostData<i32>,
    /// Zero points, one byte each, `[in/g, out]`.
    zeros: Vec<u8>,
    /// `[in/g, out]`.
    scales: F32Data,
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
}

impl CpuAwq {
    /// Checks the weight and unpacks its (small) zero points.
    pub fn new(weight: AwqGemm) -> Result<Self> {
        weight.validate()?;
        Ok(CpuAwq {
            zeros: weight.unpacked_zeros(),
            qweight: weight.qweight,
            scales: weight.scales,
            in_features: weight.in_features,
            out_features: weight.out_features,
            group_size: weight.group_size,
        })
    }

    /// Bytes this weight occupies (packed weight, zeros and scales).
    pub fn bytes(&self) -> usize {
        self.qweight.len() * 4 + self.zeros.len() + self.scales.len() * 4
    }

    /// Writes `Wt[k0..k1, n0..n1]` into `tile` (row-major, `n1 - n0` columns).
    fn unpack_tile(&self, k0: usize, k1: usize, n0: usize, n1: usize, tile: &mut [f32]) {
        let n_total = self.out_features;
        let width = n1 - n0;
        for (k, row) in (k0..k1).zip(tile.chunks_exact_mut(width)) {
            let group_row = (k / self.group_size) * n_total;
            let words = &self.qweight[(k * n_total + n0) / PACK..(k * n_total + n1) / PACK];
            let zeros = &self.zeros[group_row + n0..group_row + n1];
            let scales = &self.scales[group_row + n0..group_row + n1];
            for (c, &word) in words.iter().enumerate() {
                let word = word as u32;
                let base = c * PACK;
                for (i, &column) in ORDER.iter().enumerate() {
                    let q = ((word >> (4 * i)) & 0xF) as f32;
                    let n = base + column;
                    row[n] = (q - zeros[n] as f32) * scales[n];
                }
            }
        }
    }

    /// `out[m, out_features] = x[m, in_features] · Wt`.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (k_total, n_total) = (self.in_features, self.out_features);
        assert_eq!(x.len(), m * k_total, "lhs is not [{m}, {k_total}]");
        assert_eq!(out.len(), m * n_total, "output is not [{m}, {n_total}]");
        let shared = SharedOut(out.as_mut_ptr());
        let tasks: Vec<(usize, usize)> = (0..m)
            .step_by(M_CHUNK)
            .flat_map(|m0| (0..n_total).step_by(N_TILE).map(move |n0| (m0, n0)))
            .collect();
        tasks
            .par_iter()
            .for_each_init(Vec::new, |tile: &mut Vec<f32>, &(m0, n0)| {
                let rows = (m - m0).min(M_CHUNK);
                let n1 = (n0 + N_TILE).min(n_total);
                let width = n1 - n0;
                for k0 in (0..k_total).step_by(K_TILE) {
                    let k1 = (k0 + K_TILE).min(k_total);
                    tile.resize((k1 - k0) * width, 0.0);
                    self.unpack_tile(k0, k1, n0, n1, tile);
                    // SAFETY: this task alone writes rows m0..m0+rows, columns n0..n1 of the
                    // [m, n_total] output; x rows m0.. hold k_total values; tile is
                    // (k1-k0)×width row-major.
                    unsafe {
                        gemm(
                            rows,
                            width,
                            k1 - k0,
                            shared.ptr().add(m0 * n_total + n0),
                            1,
                            n_total as isize,
                            k0 > 0,
                            x.as_ptr().add(m0 * k_total + k0),
                            1,
                            k_total as isize,
                            tile.as_ptr(),
                            1,
                            width as isize,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::awq::pack_word;
    use rand::{RngExt, SeedableRng};

    /// A random AWQ weight and its dense `[out, in]` equivalent computed directly from the
    /// unpacked values.
    fn random_weight(k: usize, n: usize, g: usize, seed: u64) -> (AwqGemm, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let q: Vec<u8> = (0..k * n).map(|_| rng.random_range(0..16u8)).collect(); // [k, n]
        let z: Vec<u8> = (0..k / g * n).map(|_| rng.random_range(0..16u8)).collect();
        let s: Vec<f32> = (0..k / g * n).map(|_| rng.random_range(0.001..0.1f32)).collect();
        let pack = |v: &[u8]| -> Vec<i32> {
            v.chunks_exact(8)
                .map(|c| pack_word(c.try_into().unwrap()))
                .collect()
        };
        let mut dense = vec![0f32; n * k];
        for kk in 0..k {
            for nn in 0..n {
                let j = kk / g * n + nn;
                dense[nn * k + kk] = (q[kk * n + nn] as f32 - z[j] as f32) * s[j];
            }
        }
        let w = AwqGemm {
            qweight: pack(&q).into(),
            qzeros: pack(&z).into(),
            scales: s.into(),
            in_features: k,
            out_features: n,
            group_size: g,
        };
        (w, dense)
    }

    #[test]
    fn matches_dense_product_on_ragged_tiles() {
        for (m, k, n, g) in [(3, 64, 8, 32), (37, 320, 200, 64), (600, 96, 136, 32)] {
            let (w, dense) = random_weight(k, n, g, (m * k * n) as u64);
            assert_eq!(w.dequantize(), dense);
            let awq = CpuAwq::new(w).unwrap();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let mut out = vec![f32::NAN; m * n];
            awq.matmul(&x, m, &mut out);
            let mut want = vec![0f32; m * n];
            crate::backend::cpu::matmul_transposed(&x, &dense, &mut want, m, k, n);
            let num: f64 = out.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
            assert!(
                (num / den).sqrt() < 1e-6,
                "({m},{k},{n},{g}): rel err {}",
                (num / den).sqrt()
            );
        }
    }
}
