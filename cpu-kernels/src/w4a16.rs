//! W4A16 products on the CPU. AWQ "gemm" weights stay packed in memory. Many rows (prefill,
//! perplexity): each task unpacks one `K_TILE × N_TILE` tile at a time into a small f32
//! buffer and multiplies it with the `gemm` crate. Few rows (decoding): each nibble is
//! unpacked once and multiplied into every row at once, groups factored out —
//! `y = Σ_g s_g · (Σ_{k∈g} x_k q_k − z_g Σ_{k∈g} x_k)` — so that no tile is ever written.
//! Either way no dequantized copy of a whole matrix exists.

use rayon::prelude::*;

use checkpoint::AwqGemm;
use checkpoint::HostData;
use checkpoint::awq::{NIBBLE_OF, ORDER, PACK};

use half::bf16;

use crate::amx::TILE_ROW_WORDS;
use crate::bf16::{panel_matmul_bf16, row_pairs_gated_matmul_amx, row_pairs_matmul_amx};
use crate::compute::{Bf16Kernel, Compute};
use crate::convert::{pair, round_to_bf16};
use crate::dense::{FEW_ROWS, tiled_matmul};
use crate::layout::TileLayout;

/// One row of `Wt` from its packed words, zero points and scales (`unpack_row` and its bf16
/// twin).
type UnpackRow<T> = fn(&[i32], &[u8], &[f32], &mut [T]);

/// An AWQ weight ready for the CPU kernel.
#[derive(Clone, Debug)]
pub struct CpuAwq {
    /// Packed `[in, out/8]`, exactly as in the checkpoint.
    qweight: HostData<i32>,
    /// Zero points, one byte each, `[in/g, out]`.
    zeros: Vec<u8>,
    /// `[in/g, out]`, widened from the checkpoint's f16.
    scales: Vec<f32>,
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
}

impl CpuAwq {
    /// Unpacks the (small) zero points and scales; `qweight` stays packed.
    pub fn new(weight: AwqGemm) -> Self {
        CpuAwq {
            zeros: weight.unpacked_zeros(),
            scales: weight.scales.iter().map(|s| s.to_f32()).collect(),
            qweight: weight.qweight,
            in_features: weight.shape.in_features,
            out_features: weight.shape.out_features,
            group_size: weight.shape.group_size,
        }
    }

    /// Bytes this weight occupies (packed weight, zeros and scales).
    pub fn bytes(&self) -> usize {
        self.qweight.len() * 4 + self.zeros.len() + self.scales.len() * 4
    }

    /// Writes `Wt[ks, ns]` into `tile` (row-major, `ns.len()` columns; `ns` starts and ends
    /// on whole words), one row at a time by `unpack` (`unpack_row` or its bf16 twin).
    fn unpack_tile<T>(
        &self,
        ks: std::ops::Range<usize>,
        ns: std::ops::Range<usize>,
        tile: &mut [T],
        unpack: UnpackRow<T>,
    ) {
        for (k, row) in ks.zip(tile.chunks_exact_mut(ns.len())) {
            let packed = self.packed_row(k, ns.clone());
            unpack(packed.words, packed.zeros, packed.scales, row);
        }
    }

    /// Rows `k` of `Wt` for columns `ns` (whole words), as packed in the checkpoint.
    #[inline(always)]
    fn packed_row(&self, k: usize, ns: std::ops::Range<usize>) -> PackedRow<'_> {
        let n_total = self.out_features;
        let group_row = (k / self.group_size) * n_total;
        PackedRow {
            words: &self.qweight[(k * n_total + ns.start) / PACK..(k * n_total + ns.end) / PACK],
            zeros: &self.zeros[group_row + ns.start..group_row + ns.end],
            scales: &self.scales[group_row + ns.start..group_row + ns.end],
        }
    }

    /// `out[m, out_features] = x[m, in_features] · Wt`, computed as `compute` says (a few
    /// rows, which are bound by reading the weight, always in f32).
    pub fn matmul(&self, compute: Compute, x: &[f32], m: usize, out: &mut [f32]) {
        if m <= FEW_ROWS {
            return self.matmul_few_rows(x, m, out);
        }
        if let Some(kernel) = compute.bf16_kernel() {
            let (k, n) = (self.in_features, self.out_features);
            if kernel == Bf16Kernel::Amx && k.is_multiple_of(2) {
                // Unpacked straight into the tile unit's order: the same bf16 values as the
                // panel path's, written once instead of twice.
                return row_pairs_matmul_amx(x, m, k, n, out, |p0, n0, width, tile| {
                    unpack_row_pairs(self, p0, n0..n0 + width, tile)
                });
            }
            return panel_matmul_bf16(kernel, x, m, k, n, out, TileLayout::KMajor, |ks, ns, tile| {
                self.unpack_tile(ks, ns, tile, unpack_row_bf16)
            });
        }
        tiled_matmul(
            x,
            m,
            self.in_features,
            self.out_features,
            out,
            TileLayout::KMajor,
            |ks, ns, tile| self.unpack_tile(ks, ns, tile, unpack_row),
        );
    }
}

impl CpuAwq {
    /// The decoding path. The packed weight is read in storage order (whole rows of `Wt`, so
    /// that memory streams rather than waits): each task takes a range of groups of input
    /// rows across every output column and returns its partial outputs, which are added in
    /// task order (the same sum on every run).
    fn matmul_few_rows(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let groups = self.in_features / self.group_size;
        let tasks = (2 * rayon::current_num_threads()).clamp(1, groups);
        let partials: Vec<Vec<f32>> = (0..tasks)
            .into_par_iter()
            .map(|t| {
                let range = groups * t / tasks..groups * (t + 1) / tasks;
                let mut y = vec![0f32; m * self.out_features];
                few_rows_groups(self, x, m, range, &mut y);
                y
            })
            .collect();
        out.copy_from_slice(&partials[0]);
        for partial in &partials[1..] {
            for (o, p) in out.iter_mut().zip(partial) {
                *o += p;
            }
        }
    }
}

/// Nibble shift of each output column within its word.
const SHIFT_OF: [u32; PACK] = {
    let mut shift = [0u32; PACK];
    let mut column = 0;
    while column < PACK {
        shift[column] = 4 * NIBBLE_OF[column] as u32;
        column += 1;
    }
    shift
};

/// One row of `Wt`: `row[n] = (q[n] − zeros[n]) · scales[n]` for the columns of `words`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2"))]
fn unpack_row(words: &[i32], zeros: &[u8], scales: &[f32], row: &mut [f32]) {
    unpack_words(words, zeros, scales, row, |v| v);
}

/// [`unpack_row`] rounded to bf16 as it is written: bit for bit the f32 row [`narrow`]ed,
/// without writing and reading it back.
///
/// [`narrow`]: super::bf16::narrow
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2"))]
fn unpack_row_bf16(words: &[i32], zeros: &[u8], scales: &[f32], row: &mut [bf16]) {
    unpack_words(words, zeros, scales, row, round_to_bf16);
}

/// One row of `Wt` over a range of whole packed words: the words and their columns' zero
/// points and scales.
#[derive(Clone, Copy)]
struct PackedRow<'a> {
    words: &'a [i32],
    zeros: &'a [u8],
    scales: &'a [f32],
}

/// Rows `p0, p0 + 1, …` of `Wt` for columns `ns` (whole words) into a tile of VNNI words, a
/// row of [`TILE_ROW_WORDS`] per pair of rows (see
/// [`PackedRhs::from_row_pairs_into`](super::amx::PackedRhs::from_row_pairs_into)): one call
/// per tile, since one per pair of rows cost as much as the unpacking.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2"))]
fn unpack_row_pairs(w: &CpuAwq, p0: usize, ns: std::ops::Range<usize>, tile: &mut [u32]) {
    let rows = 2 * (tile.len() / TILE_ROW_WORDS);
    if ns.len() == TILE_ROW_WORDS && rows > 0 && p0 / w.group_size == (p0 + rows - 1) / w.group_size {
        return unpack_block_in_one_group(w, p0, ns.start, tile);
    }
    for (pair, row) in tile.chunks_exact_mut(TILE_ROW_WORDS).enumerate() {
        let p = p0 + 2 * pair;
        unpack_pair_bf16(
            w.packed_row(p, ns.clone()),
            w.packed_row(p + 1, ns.clone()),
            &mut row[..ns.len()],
        );
    }
}

/// [`unpack_row_pairs`] for a whole tile row of columns `n0..n0 + 16` whose rows share one
/// quantization group: the zero points and scales are widened once for the tile, and each
/// pair of rows is one 16-lane pass (the same values as [`unpack_pair_bf16`]'s, which reads
/// them again for every pair).
#[inline(always)]
fn unpack_block_in_one_group(w: &CpuAwq, p0: usize, n0: usize, tile: &mut [u32]) {
    const COLS: usize = TILE_ROW_WORDS;
    let n_total = w.out_features;
    let group_row = (p0 / w.group_size) * n_total + n0;
    let zeros: [f32; COLS] = std::array::from_fn(|c| w.zeros[group_row + c] as f32);
    let scales: [f32; COLS] = w.scales[group_row..][..COLS].try_into().expect("16 scales");
    let qweight: &[i32] = &w.qweight;
    let column_shift: [u32; COLS] = std::array::from_fn(|c| SHIFT_OF[c % PACK]);
    for (pair, row) in tile.chunks_exact_mut(COLS).enumerate() {
        let k = p0 + 2 * pair;
        let low: [i32; 2] = qweight[(k * n_total + n0) / PACK..][..2]
            .try_into()
            .expect("2 words");
        let high: [i32; 2] = qweight[((k + 1) * n_total + n0) / PACK..][..2]
            .try_into()
            .expect("2 words");
        // Each lane's word, as two broadcasts blended (an index `c / 8` compiles to gathers).
        let low: [u32; COLS] = std::array::from_fn(|c| if c < PACK { low[0] } else { low[1] } as u32);
        let high: [u32; COLS] = std::array::from_fn(|c| if c < PACK { high[0] } else { high[1] } as u32);
        let row: &mut [u32; COLS] = row.try_into().expect("a tile row");
        for c in 0..COLS {
            let l = (((low[c] >> column_shift[c]) & 0xF) as f32 - zeros[c]) * scales[c];
            let h = (((high[c] >> column_shift[c]) & 0xF) as f32 - zeros[c]) * scales[c];
            row[c] = pair_of(l, h);
        }
    }
}

/// [`pair`], named apart from the loop variable above.
#[inline(always)]
fn pair_of(low: f32, high: f32) -> u32 {
    pair(low, high)
}

/// Two consecutive rows of `Wt` unpacked, each value rounded to bf16 as [`unpack_row_bf16`]
/// rounds it, into VNNI words (`low`'s value in the low half): the AMX kernel's order.
#[inline(always)]
fn unpack_pair_bf16(low: PackedRow<'_>, high: PackedRow<'_>, out: &mut [u32]) {
    for (w, out) in out.chunks_exact_mut(PACK).enumerate() {
        let (lw, hw) = (low.words[w] as u32, high.words[w] as u32);
        let (lz, hz) = (&low.zeros[w * PACK..][..PACK], &high.zeros[w * PACK..][..PACK]);
        let (ls, hs) = (&low.scales[w * PACK..][..PACK], &high.scales[w * PACK..][..PACK]);
        for j in 0..PACK {
            let l = (((lw >> SHIFT_OF[j]) & 0xF) as f32 - lz[j] as f32) * ls[j];
            let h = (((hw >> SHIFT_OF[j]) & 0xF) as f32 - hz[j] as f32) * hs[j];
            out[j] = pair(l, h);
        }
    }
}

/// The loop of [`unpack_row`] and its bf16 twin, `store` making each output value. Each
/// word's eight columns are shifted out in column order (one variable shift per lane), so the
/// loop vectorises; inlined into each target version of its callers.
#[inline(always)]
fn unpack_words<T>(words: &[i32], zeros: &[u8], scales: &[f32], row: &mut [T], store: impl Fn(f32) -> T) {
    for (((&word, z), s), out) in words
        .iter()
        .zip(zeros.chunks_exact(PACK))
        .zip(scales.chunks_exact(PACK))
        .zip(row.chunks_exact_mut(PACK))
    {
        for j in 0..PACK {
            let q = ((word as u32) >> SHIFT_OF[j]) & 0xF;
            out[j] = store((q as f32 - z[j] as f32) * s[j]);
        }
    }
}

/// One task of [`CpuAwq::matmul_few_rows`]: the contribution of the input rows of `groups` to
/// `y` (`[m, out_features]`). Per input row `k`, its packed words are unpacked once into
/// `q[nibble][word]` (consecutive words vectorise) and added into `acc[row][nibble][word]`
/// for every activation row; at each group's end the accumulators are folded into `y` with
/// the group's scales and zeros. Compiled for AVX-512 and AVX2 too, without fused
/// multiply-add, so every version rounds alike.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx512bw", "x86_64+avx2"))]
fn few_rows_groups(w: &CpuAwq, x: &[f32], m: usize, groups: std::ops::Range<usize>, y: &mut [f32]) {
    let (k_total, n_total, g) = (w.in_features, w.out_features, w.group_size);
    let width = n_total / PACK;
    let mut acc = vec![0f32; m * n_total];
    let mut q = vec![0f32; n_total];
    for group in groups {
        let mut x_sum = vec![0f32; m];
        for k in group * g..(group + 1) * g {
            let packed = &w.qweight[k * width..(k + 1) * width];
            for (i, lane) in q.chunks_exact_mut(width).enumerate() {
                let shift = 4 * i as u32;
                for (v, &word) in lane.iter_mut().zip(packed) {
                    *v = ((word as u32 >> shift) & 0xF) as f32;
                }
            }
            for row in 0..m {
                let xk = x[row * k_total + k];
                x_sum[row] += xk;
                for (a, &v) in acc[row * n_total..(row + 1) * n_total].iter_mut().zip(&q) {
                    *a += xk * v;
                }
            }
        }
        let zeros = &w.zeros[group * n_total..(group + 1) * n_total];
        let scales = &w.scales[group * n_total..(group + 1) * n_total];
        for row in 0..m {
            let (acc, y) = (
                &mut acc[row * n_total..(row + 1) * n_total],
                &mut y[row * n_total..(row + 1) * n_total],
            );
            for (i, &column) in ORDER.iter().enumerate() {
                for c in 0..width {
                    let n = c * PACK + column;
                    let a = &mut acc[i * width + c];
                    y[n] += scales[n] * (*a - zeros[n] as f32 * x_sum[row]);
                    *a = 0.0;
                }
            }
        }
    }
}

impl CpuAwq {
    /// `out = silu(x · selfᵀ) * (x · upᵀ)` on the AMX tiles, the two weights unpacked into
    /// one operand of alternating 16-column blocks so that each 32 × 32 result block holds
    /// matching gate and up columns (then combined in cache): `false` (nothing written) off
    /// that path — another compute, a few rows (decoding), an odd `k` or outputs not in
    /// whole blocks of 16.
    pub fn gated_matmul(&self, up: &CpuAwq, compute: Compute, x: &[f32], m: usize, out: &mut [f32]) -> bool {
        let (k, n) = (self.in_features, self.out_features);
        if m <= FEW_ROWS
            || compute.bf16_kernel() != Some(Bf16Kernel::Amx)
            || !k.is_multiple_of(2)
            || !n.is_multiple_of(16)
        {
            return false;
        }
        row_pairs_gated_matmul_amx(
            x,
            m,
            k,
            n,
            out,
            |p0, n0, width, tile| unpack_row_pairs(self, p0, n0..n0 + width, tile),
            |p0, n0, width, tile| unpack_row_pairs(up, p0, n0..n0 + width, tile),
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint::AwqShape;
    use checkpoint::awq::pack_word;
    use half::f16;
    use rand::{RngExt, SeedableRng};

    /// A random AWQ weight and its dense `[out, in]` equivalent computed directly from the
    /// unpacked values.
    fn random_weight(k: usize, n: usize, g: usize, seed: u64) -> (AwqGemm, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let q: Vec<u8> = (0..k * n).map(|_| rng.random_range(0..16u8)).collect(); // [k, n]
        let z: Vec<u8> = (0..k / g * n).map(|_| rng.random_range(0..16u8)).collect();
        let s: Vec<f16> = (0..k / g * n)
            .map(|_| f16::from_f32(rng.random_range(0.001..0.1f32)))
            .collect();
        let pack = |v: &[u8]| -> Vec<i32> {
            v.chunks_exact(8)
                .map(|c| pack_word(c.try_into().unwrap()))
                .collect()
        };
        let mut dense = vec![0f32; n * k];
        for kk in 0..k {
            for nn in 0..n {
                let j = kk / g * n + nn;
                dense[nn * k + kk] = (q[kk * n + nn] as f32 - z[j] as f32) * s[j].to_f32();
            }
        }
        let shape = AwqShape {
            in_features: k,
            out_features: n,
            group_size: g,
        };
        let w = AwqGemm::new(shape, pack(&q).into(), pack(&z).into(), s.into()).unwrap();
        (w, dense)
    }

    #[test]
    fn bf16_unpacking_is_the_f32_row_rounded() {
        let (k, n, g) = (64, 136, 32);
        let (w, _) = random_weight(k, n, g, 5);
        let awq = CpuAwq::new(w);
        let mut wide = vec![0f32; k * n];
        awq.unpack_tile(0..k, 0..n, &mut wide, unpack_row);
        let mut want = vec![bf16::ZERO; k * n];
        crate::convert::narrow(&wide, &mut want);
        let mut got = vec![bf16::ONE; k * n];
        awq.unpack_tile(0..k, 0..n, &mut got, unpack_row_bf16);
        assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()));
    }

    #[test]
    fn amx_row_pairs_are_the_bf16_rows_interleaved() {
        let (k, n, g) = (64, 136, 32);
        let awq = CpuAwq::new(random_weight(k, n, g, 6).0);
        let mut rows = vec![bf16::ZERO; k * n];
        awq.unpack_tile(0..k, 0..n, &mut rows, unpack_row_bf16);
        for p in (0..k).step_by(2) {
            for ns in [0..n, 8..24, 128..136] {
                let mut got = vec![0u32; ns.len()];
                unpack_pair_bf16(
                    awq.packed_row(p, ns.clone()),
                    awq.packed_row(p + 1, ns.clone()),
                    &mut got,
                );
                let want: Vec<u32> = ns
                    .clone()
                    .map(|j| crate::convert::word(rows[p * n + j], rows[(p + 1) * n + j]))
                    .collect();
                assert_eq!(got, want, "rows {p}, {} columns {ns:?}", p + 1);
            }
        }
    }

    #[test]
    fn row_pair_tiles_unpack_as_their_pairs() {
        // Tiles within one group (the hoisted path) and, with groups of 16 rows, across two.
        for (k, n, g) in [(128, 48, 32), (128, 48, 64), (64, 48, 16)] {
            let awq = CpuAwq::new(random_weight(k, n, g, 21).0);
            for p0 in (0..k).step_by(32) {
                for ns in [0..16, 16..32, 32..48, 8..16, 0..48] {
                    let rows = 32.min(k - p0);
                    let mut got = vec![0u32; rows / 2 * TILE_ROW_WORDS];
                    let mut want = got.clone();
                    if ns.len() > TILE_ROW_WORDS {
                        continue;
                    }
                    unpack_row_pairs(&awq, p0, ns.clone(), &mut got);
                    for (pair, row) in want.chunks_exact_mut(TILE_ROW_WORDS).enumerate() {
                        let p = p0 + 2 * pair;
                        unpack_pair_bf16(
                            awq.packed_row(p, ns.clone()),
                            awq.packed_row(p + 1, ns.clone()),
                            &mut row[..ns.len()],
                        );
                    }
                    assert_eq!(got, want, "g {g}, rows {p0}.., columns {ns:?}");
                }
            }
        }
    }

    #[test]
    fn gated_products_equal_the_two_products_and_silu() {
        // 48 outputs: three gate/up block pairs; 70 rows: a ragged last row pair.
        for (m, k, n, g) in [(70, 64, 48, 32), (40, 128, 160, 64)] {
            let (gate, up) = (
                CpuAwq::new(random_weight(k, n, g, 11).0),
                CpuAwq::new(random_weight(k, n, g, 12).0),
            );
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0f32)).collect();
            let mut got = vec![f32::NAN; m * n];
            assert!(gate.gated_matmul(&up, Compute::Amx, &x, m, &mut got));
            let (mut g_out, mut u_out, mut want) = (vec![0f32; m * n], vec![0f32; m * n], vec![0f32; m * n]);
            gate.matmul(Compute::Amx, &x, m, &mut g_out);
            up.matmul(Compute::Amx, &x, m, &mut u_out);
            crate::math::silu_mul_into(&mut want, &g_out, &u_out);
            assert!(
                got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "[{m}, {k}] x [{k}, {n}]"
            );
        }
        // Off the fused path nothing is written and the caller multiplies as before.
        let (gate, up) = (
            CpuAwq::new(random_weight(64, 40, 32, 1).0),
            CpuAwq::new(random_weight(64, 40, 32, 2).0),
        );
        let x = vec![0.5f32; 40 * 64];
        let mut out = vec![f32::NAN; 40 * 40];
        assert!(
            !gate.gated_matmul(&up, Compute::Amx, &x, 40, &mut out),
            "40 is not whole blocks"
        );
        assert!(
            !gate.gated_matmul(&up, Compute::F32, &x, 40, &mut out),
            "f32 compute"
        );
        assert!(
            !gate.gated_matmul(&up, Compute::Amx, &x, FEW_ROWS, &mut out),
            "decoding"
        );
        assert!(out.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn matches_dense_product_on_ragged_tiles() {
        // Few rows (the decoding path, blocks of 64 words and a ragged last one) and many.
        for (m, k, n, g) in [
            (1, 64, 8, 32),
            (3, 128, 1040, 64),
            (16, 96, 136, 32),
            (37, 320, 200, 64),
            (600, 96, 136, 32),
        ] {
            let (w, dense) = random_weight(k, n, g, (m * k * n) as u64);
            assert_eq!(w.dequantize(), dense);
            let awq = CpuAwq::new(w);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let mut out = vec![f32::NAN; m * n];
            awq.matmul(Compute::F32, &x, m, &mut out);
            let mut want = vec![0f32; m * n];
            crate::matmul::matmul_transposed(&x, &dense, &mut want, m, k, n);
            let rel = |a: &[f32], b: &[f32]| {
                let num: f64 = a.iter().zip(b).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                let den: f64 = b.iter().map(|b| (*b as f64).powi(2)).sum();
                (num / den).sqrt()
            };
            assert!(
                rel(&out, &want) < 1e-6,
                "({m},{k},{n},{g}): rel err {}",
                rel(&out, &want)
            );
            // The 16-bit path equals the dense bf16 product of the dequantized weight up to
            // the output's bf16 rounding, and f32 within bf16's precision.
            // Both kernels (AMX on its scalar twin where the CPU has no tile unit).
            let sixteen_bit = if m > FEW_ROWS {
                [Compute::Bf16, Compute::Amx].as_slice()
            } else {
                &[]
            };
            for &compute in sixteen_bit {
                let kernel = compute.bf16_kernel().expect("a 16-bit path");
                awq.matmul(compute, &x, m, &mut out);
                let mut twin = vec![0f32; m * n];
                crate::bf16::matmul_transposed_bf16(kernel, &x, &dense, &mut twin, m, k, n);
                assert!(
                    rel(&out, &twin) < 1e-3,
                    "({m},{k},{n},{g}) bf16 vs twin: {}",
                    rel(&out, &twin)
                );
                if compute == Compute::Amx {
                    // Unpacked straight into tile order, the weight is the dense bf16 one.
                    assert!(
                        out.iter().zip(&twin).all(|(o, t)| o.to_bits() == t.to_bits()),
                        "({m},{k},{n},{g}) AMX: not the dense bf16 product"
                    );
                }
                assert!(
                    rel(&out, &want) < 1e-2,
                    "({m},{k},{n},{g}) bf16 vs f32: {}",
                    rel(&out, &want)
                );
            }
        }
    }
}
