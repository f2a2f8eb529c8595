//! Causal grouped-query attention on the CPU, one (sequence, head, block of queries) task at
//! a time so that the score matrix never exceeds `QUERY_BLOCK × keys`. The keys come from a
//! key store: the same rows as the queries in a plain forward pass, a KV cache when decoding.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;
use std::ops::Range;

use half::bf16;

use crate::amx::{PackedLhs, PackedRhs, TILE_ROW_WORDS, TileBuffer, matmul_on_this_thread};
use crate::compute::{Bf16Kernel, Compute};
use crate::convert::{narrow, pair};
use crate::math;
use crate::pairs::{PairUnit, matmul_pairs};
use crate::parallel::SharedOut;
use crate::sequences::AttentionLayout;
use crate::tensor::HostTensor;
use crate::{Error, Result};

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
    /// Multiplier of q·k: `1 / sqrt(head_dim)`, or Gemma's `1 / sqrt(query_pre_attn_scalar)`.
    pub scale: f32,
    /// Scaled scores pass through `cap · tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

/// Query rows per task.
const QUERY_BLOCK: usize = 64;

/// One task: query rows `q_start..q_end` of head `head`, at positions `position..`; it reads
/// key-store rows `k_start..k_end`, the first of which sits at position `k_position`.
struct Task {
    head: usize,
    q_start: usize,
    q_end: usize,
    position: usize,
    k_start: usize,
    k_end: usize,
    k_position: usize,
}

/// What computes attention's two products (`q kᵀ` and `p v`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// f32, by the `gemm` crate.
    F32,
    /// bf16 operands, f32 sums, on `vdpbf16ps` (or its twin).
    Pairs(PairUnit),
    /// bf16 operands, f32 sums, on the AMX tiles (or their twin in tests on CPUs without
    /// them), for every block of queries whose keys start on a tile step (32 rows: every
    /// block of a sequence that starts there without a sliding window); the others in f32.
    Tiles,
}

/// Query rows from which attention in a 16-bit compute path runs on bf16 operands: a
/// decoding step's few rows would not repay laying out the key store.
const SIXTEEN_BIT_ROWS: usize = 64;

impl Products {
    /// What computes attention's products for `rows` query rows under `compute`.
    pub fn choose(compute: Compute, rows: usize) -> Self {
        match compute.bf16_kernel() {
            _ if rows < SIXTEEN_BIT_ROWS => Products::F32,
            Some(Bf16Kernel::Vdpbf16ps) => Products::Pairs(PairUnit::here()),
            Some(Bf16Kernel::Amx) => Products::Tiles,
            None => Products::F32,
        }
    }
}

/// `out = softmax(scale · q kᵀ + causal mask) v` for each sequence of `layout`, for q
/// `[rows, heads·d]` and a key store k, v `[key rows, kv_heads·d]`: in f32, or with 16-bit
/// `products` in bf16 (q, k, v and the probabilities rounded to bf16, as GPU attention
/// kernels do; scores and outputs f32 sums).
pub fn attention(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    spec: &AttentionSpec,
    layout: &AttentionLayout,
    out: &mut HostTensor,
    products: Products,
) -> Result<()> {
    let d = spec.head_dim;
    let q_stride = spec.heads * d;
    let kv_stride = spec.kv_heads * d;
    let rows = layout.rows();
    if spec.kv_heads == 0 || !spec.heads.is_multiple_of(spec.kv_heads) {
        return Err(Error::Shape(format!(
            "attention: {} query heads do not group over {} kv heads",
            spec.heads, spec.kv_heads
        )));
    }
    for (name, t, expected_rows, cols) in [
        ("q", q, rows, q_stride),
        ("output", &*out, rows, q_stride),
        ("k", k, k.rows.max(layout.key_rows()), kv_stride),
        ("v", v, k.rows.max(layout.key_rows()), kv_stride),
    ] {
        if t.rows != expected_rows || t.cols != cols {
            return Err(Error::Shape(format!(
                "attention: {name} is [{}, {}], expected [{expected_rows}, {cols}]",
                t.rows, t.cols
            )));
        }
    }
    let group = spec.heads / spec.kv_heads;
    let window = spec.sliding_window.unwrap_or(usize::MAX).max(1);

    let mut tasks = Vec::new();
    for seq in layout.sequences() {
        for q_start in (seq.queries.start..seq.queries.end).step_by(QUERY_BLOCK) {
            let q_end = (q_start + QUERY_BLOCK).min(seq.queries.end);
            let position = seq.past + (q_start - seq.queries.start);
            let last = position + (q_end - q_start) - 1;
            let k_position = (position + 1).saturating_sub(window);
            for head in 0..spec.heads {
                tasks.push(Task {
                    head,
                    q_start,
                    q_end,
                    position,
                    k_start: seq.keys + k_position,
                    k_end: seq.keys + last + 1,
                    k_position,
                });
            }
        }
    }

    let shared = SharedOut(out.data.as_mut_ptr());
    let sixteen_bit: Option<Box<dyn SixteenBitKeys>> = match products {
        _ if !d.is_multiple_of(2) => None,
        Products::F32 => None,
        Products::Pairs(unit) => Some(Box::new(PairedKeys::new(k, v, spec, unit))),
        Products::Tiles => Some(Box::new(TiledKeys::new(k, v, spec))),
    };
    tasks.par_iter().for_each_init(
        || (Vec::new(), Scratch::default()),
        |(scores, scratch): &mut (Vec<f32>, Scratch), t| {
            let kv_head = t.head / group;
            let n_q = t.q_end - t.q_start;
            let n_k = t.k_end - t.k_start;
            // Every product below writes all of its scores: the buffer need not be zeroed.
            if scores.len() < n_q * n_k {
                scores.resize(n_q * n_k, 0.0);
            }
            let scores = &mut scores[..n_q * n_k];
            let q_rows = &q.data[t.q_start * q_stride + t.head * d..];
            let queries = QueryRows {
                rows: q_rows,
                stride: q_stride,
                count: n_q,
            };
            let keys = t.k_start..t.k_end;
            let sixteen_bit = sixteen_bit.as_deref().filter(|store| store.takes(&keys));
            match sixteen_bit {
                Some(store) => store.scores(queries, kv_head, keys.clone(), scratch, scores),
                // SAFETY: scores is n_q×n_k; q rows t.q_start.. with stride q_stride hold d
                // values of this head; k rows t.k_start..t.k_end likewise (read as a d×n_k
                // matrix).
                None => unsafe {
                    gemm(
                        n_q,
                        n_k,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        n_k as isize,
                        false,
                        q_rows.as_ptr(),
                        1,
                        q_stride as isize,
                        k.data[t.k_start * kv_stride + kv_head * d..].as_ptr(),
                        kv_stride as isize,
                        1,
                        0.0,
                        spec.scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                },
            }
            for (i, row) in scores.chunks_exact_mut(n_k).enumerate() {
                let position = t.position + i;
                // Keys k_start + j for j in lo..=hi are visible to this query.
                let hi = position - t.k_position;
                let lo = (position + 1).saturating_sub(window).max(t.k_position) - t.k_position;
                // The f32 product applied the scale; the 16-bit ones leave it to here.
                let mut scale = sixteen_bit.map(|_| spec.scale);
                if let Some(cap) = spec.softcap {
                    let pre = scale.take().unwrap_or(1.0);
                    row[lo..=hi]
                        .iter_mut()
                        .for_each(|s| *s = cap * (*s * pre / cap).tanh());
                }
                softmax_in_place(&mut row[lo..=hi], scale);
                row[..lo].fill(0.0);
                row[hi + 1..].fill(0.0);
            }
            let out = shared.ptr().wrapping_add(t.q_start * q_stride + t.head * d);
            match sixteen_bit {
                // SAFETY: this task alone writes rows t.q_start..t.q_end, columns of its head,
                // of the [rows, q_stride] output.
                Some(store) => unsafe {
                    store.mix_values(scores, n_q, kv_head, keys, scratch, out, q_stride)
                },
                // SAFETY: as above; v rows t.k_start..t.k_end hold d values of kv_head.
                None => unsafe {
                    gemm(
                        n_q,
                        d,
                        n_k,
                        out,
                        1,
                        q_stride as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        n_k as isize,
                        v.data[t.k_start * kv_stride + kv_head * d..].as_ptr(),
                        1,
                        kv_stride as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                },
            }
        },
    );
    Ok(())
}

/// `row = softmax(scale · row)` (`scale` where the product did not apply it). Compiled for
/// AVX-512 and AVX2 too, so that its passes vectorise; each value is rounded as the scalar
/// code rounds it.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2"))]
fn softmax_in_place(row: &mut [f32], scale: Option<f32>) {
    // For a positive scale, the largest scaled score is the largest score scaled (rounding
    // is monotonic), so scaling folds into the exponentials' pass.
    let scale = scale.unwrap_or(1.0);
    assert!(scale > 0.0, "attention scale {scale} is not positive");
    let shift = math::max(row) * scale;
    let inv = 1.0 / math::exp_scaled_and_sum(row, scale, shift);
    row.iter_mut().for_each(|s| *s *= inv);
}

/// A block of query rows of one head: `count` rows of the head's values, `stride` apart.
#[derive(Clone, Copy)]
struct QueryRows<'a> {
    rows: &'a [f32],
    stride: usize,
    count: usize,
}

/// Per-task scratch of the 16-bit products.
#[derive(Default)]
struct Scratch {
    /// Operands in pairs ([`PairedKeys`]).
    words: Vec<u32>,
    /// Operands in tile order ([`TiledKeys`]).
    tiles: TileBuffer,
}

/// The key store laid out once per call for 16-bit products (bf16 q, k, v and
/// probabilities; f32 sums).
trait SixteenBitKeys: Sync {
    /// Whether this store multiplies a block of queries over key rows `keys`.
    fn takes(&self, keys: &Range<usize>) -> bool;

    /// `scores[queries.count, keys.len()] = q · kᵀ` (unscaled) against key rows `keys` of
    /// `kv_head`.
    fn scores(
        &self,
        queries: QueryRows<'_>,
        kv_head: usize,
        keys: Range<usize>,
        scratch: &mut Scratch,
        scores: &mut [f32],
    );

    /// `out[n_q, d] = probabilities[n_q, keys.len()] · v` over key rows `keys` of `kv_head`,
    /// written a row every `out_stride`.
    ///
    /// # Safety
    ///
    /// `out` must be writable at `i · out_stride + c` for `i < n_q`, `c < d`, by this caller
    /// alone.
    #[allow(clippy::too_many_arguments)]
    unsafe fn mix_values(
        &self,
        probabilities: &[f32],
        n_q: usize,
        kv_head: usize,
        keys: Range<usize>,
        scratch: &mut Scratch,
        out: *mut f32,
        out_stride: usize,
    );
}

/// Key rows per AMX tile step: where a block's keys must start for [`TiledKeys`].
const TILE_STEP: usize = 32;

/// The key store in the AMX kernel's tile order, made once per call: per kv head, the keys
/// as the right operand of `q kᵀ` (`k` = the head dimension, a column per key row) and the
/// values as the right operand of `p v` (`k` = the key rows, a column per dimension).
struct TiledKeys {
    keys: Vec<PackedRhs>,
    values: Vec<PackedRhs>,
}

impl TiledKeys {
    /// Needs an even head dimension.
    fn new(k: &HostTensor, v: &HostTensor, spec: &AttentionSpec) -> Self {
        let (d, key_rows, stride) = (spec.head_dim, k.rows, spec.kv_heads * spec.head_dim);
        let keys = (0..spec.kv_heads)
            .map(|h| {
                PackedRhs::from_row_pairs_into(TileBuffer::EMPTY, d, key_rows, |p0, j0, width, tile| {
                    for (w, row) in tile.chunks_exact_mut(TILE_ROW_WORDS).enumerate() {
                        for (c, word) in row[..width].iter_mut().enumerate() {
                            let at = (j0 + c) * stride + h * d + p0 + 2 * w;
                            *word = pair(k.data[at], k.data[at + 1]);
                        }
                    }
                })
            })
            .collect();
        // Rows in pairs: an odd last row is paired with zeros.
        let values = (0..spec.kv_heads)
            .map(|h| {
                PackedRhs::from_row_pairs_into(
                    TileBuffer::EMPTY,
                    key_rows.next_multiple_of(2),
                    d,
                    |p0, j0, width, tile| {
                        for (w, row) in tile.chunks_exact_mut(TILE_ROW_WORDS).enumerate() {
                            let p = p0 + 2 * w;
                            let low = &v.data[p * stride + h * d + j0..][..width];
                            let high =
                                (p + 1 < key_rows).then(|| &v.data[(p + 1) * stride + h * d + j0..][..width]);
                            for (c, word) in row[..width].iter_mut().enumerate() {
                                *word = pair(low[c], high.map_or(0.0, |high| high[c]));
                            }
                        }
                    },
                )
            })
            .collect();
        TiledKeys { keys, values }
    }
}

impl SixteenBitKeys for TiledKeys {
    /// Blocks whose keys start on a tile step.
    fn takes(&self, keys: &Range<usize>) -> bool {
        keys.start.is_multiple_of(TILE_STEP)
    }

    fn scores(
        &self,
        queries: QueryRows<'_>,
        kv_head: usize,
        keys: Range<usize>,
        scratch: &mut Scratch,
        scores: &mut [f32],
    ) {
        let (n_q, n_k) = (queries.count, keys.len());
        assert_eq!(scores.len(), n_q * n_k);
        let b = self.keys[kv_head]
            .columns(keys)
            .expect("keys start on a tile step");
        let d = self.values[kv_head].cols();
        let tiles = std::mem::take(&mut scratch.tiles);
        let a = PackedLhs::from_rows_into(tiles, queries.rows, n_q, d, queries.stride);
        // SAFETY: scores is this task's, n_q × n_k.
        unsafe { matmul_on_this_thread(&a, b, scores.as_mut_ptr(), n_k, 0) };
        scratch.tiles = a.into_buffer();
    }

    unsafe fn mix_values(
        &self,
        probabilities: &[f32],
        n_q: usize,
        kv_head: usize,
        keys: Range<usize>,
        scratch: &mut Scratch,
        out: *mut f32,
        out_stride: usize,
    ) {
        let n_k = keys.len();
        assert_eq!(probabilities.len(), n_q * n_k);
        // The probabilities' padding past n_k is zero, so the values' rows past `keys` in
        // the last step add nothing.
        let b = self.values[kv_head]
            .rows(keys)
            .expect("keys start on a tile step");
        let tiles = std::mem::take(&mut scratch.tiles);
        let a = PackedLhs::from_rows_into(tiles, probabilities, n_q, n_k, n_k);
        // SAFETY: per the caller.
        unsafe { matmul_on_this_thread(&a, b, out, out_stride, 0) };
        scratch.tiles = a.into_buffer();
    }
}

/// Words of bf16 pairs seen as their bf16 values: word `t` holds values `2t` (low half) and
/// `2t + 1` on a little-endian CPU, which is how [`pair`] builds a word, so that rows are
/// rounded by the vectorised [`narrow`] straight into pair order.
fn as_bf16(words: &mut [u32]) -> &mut [bf16] {
    const { assert!(cfg!(target_endian = "little"), "pairs assume little-endian words") };
    // SAFETY: two bf16 (align 2) per u32 (align 4) of the same bytes; every bit pattern is a
    // valid value of both types.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<bf16>(), words.len() * 2) }
}

/// The key store in bf16 pairs for [`matmul_pairs`], made once per call: keys as
/// `[kv head][d/2][key row]` (a head's pair `p` of every key in a row, so that scores are
/// `q` pairs · a row of keys) and values as `[kv head][key row/2][d]` (each word two
/// consecutive key rows of one column, zero past the last row).
struct PairedKeys {
    unit: PairUnit,
    keys: Vec<u32>,
    values: Vec<u32>,
    key_rows: usize,
    head_dim: usize,
}

impl PairedKeys {
    fn new(k: &HostTensor, v: &HostTensor, spec: &AttentionSpec, unit: PairUnit) -> Self {
        let (d, key_rows) = (spec.head_dim, k.rows);
        let (half, stride) = (d / 2, spec.kv_heads * d);
        let mut keys = vec![0u32; spec.kv_heads * half * key_rows];
        keys.par_chunks_mut(key_rows).enumerate().for_each(|(hp, dst)| {
            let column = (hp / half) * d + 2 * (hp % half);
            for (j, w) in dst.iter_mut().enumerate() {
                let at = j * stride + column;
                *w = pair(k.data[at], k.data[at + 1]);
            }
        });
        let value_pairs = key_rows.div_ceil(2);
        let mut values = vec![0u32; spec.kv_heads * value_pairs * d];
        values.par_chunks_mut(d).enumerate().for_each(|(hj, dst)| {
            let (h, j) = (hj / value_pairs, 2 * (hj % value_pairs));
            let lo = &v.data[j * stride + h * d..][..d];
            match v
                .data
                .get((j + 1) * stride + h * d..)
                .filter(|_| j + 1 < key_rows)
            {
                Some(hi) => dst
                    .iter_mut()
                    .zip(lo.iter().zip(hi))
                    .for_each(|(w, (a, b))| *w = pair(*a, *b)),
                None => dst.iter_mut().zip(lo).for_each(|(w, a)| *w = pair(*a, 0.0)),
            }
        });
        PairedKeys {
            unit,
            keys,
            values,
            key_rows,
            head_dim: d,
        }
    }
}

impl SixteenBitKeys for PairedKeys {
    /// Every block.
    fn takes(&self, _: &Range<usize>) -> bool {
        true
    }

    fn scores(
        &self,
        queries: QueryRows<'_>,
        kv_head: usize,
        keys: Range<usize>,
        scratch: &mut Scratch,
        scores: &mut [f32],
    ) {
        let (q_rows, q_stride, n_q) = (queries.rows, queries.stride, queries.count);
        let (k_start, n_k, words) = (keys.start, keys.len(), &mut scratch.words);
        let (d, half) = (self.head_dim, self.head_dim / 2);
        assert!(k_start + n_k <= self.key_rows && scores.len() == n_q * n_k);
        assert!(
            q_rows.len() >= (n_q - 1) * q_stride + d,
            "query rows out of range"
        );
        words.resize(n_q * half, 0);
        let values = as_bf16(words);
        for i in 0..n_q {
            narrow(&q_rows[i * q_stride..][..d], &mut values[i * d..(i + 1) * d]);
        }
        let keys = &self.keys[(kv_head * half) * self.key_rows + k_start..];
        // SAFETY: words holds n_q rows of half words; keys rows p < half hold key_rows words
        // from column k_start, of which n_k are read (k_start + n_k ≤ key_rows, asserted);
        // scores is n_q × n_k.
        unsafe {
            matmul_pairs(
                self.unit,
                words.as_ptr(),
                half,
                keys.as_ptr(),
                self.key_rows,
                n_q,
                n_k,
                half,
                scores.as_mut_ptr(),
                n_k,
            )
        };
    }

    unsafe fn mix_values(
        &self,
        probabilities: &[f32],
        n_q: usize,
        kv_head: usize,
        keys: Range<usize>,
        scratch: &mut Scratch,
        out: *mut f32,
        out_stride: usize,
    ) {
        let (k_start, n_k, words) = (keys.start, keys.len(), &mut scratch.words);
        assert!(k_start + n_k <= self.key_rows && probabilities.len() == n_q * n_k);
        // Value words pair even and odd key rows: start at the even row at or before k_start
        // and give the probabilities a leading zero when k_start is odd.
        let offset = k_start % 2;
        let n_pairs = (offset + n_k).div_ceil(2);
        words.resize(n_q * n_pairs, 0);
        let values = as_bf16(words);
        for (row, dst) in probabilities
            .chunks_exact(n_k)
            .zip(values.chunks_exact_mut(2 * n_pairs))
        {
            dst[..offset].fill(bf16::ZERO);
            narrow(row, &mut dst[offset..offset + n_k]);
            dst[offset + n_k..].fill(bf16::ZERO);
        }
        let d = self.head_dim;
        let value_pairs = self.key_rows.div_ceil(2);
        let values = &self.values[(kv_head * value_pairs + k_start / 2) * d..];
        assert!(values.len() >= n_pairs * d, "value rows out of range");
        // SAFETY: words holds n_q rows of n_pairs words; values n_pairs rows of d words
        // (asserted); out as the caller promises.
        unsafe {
            matmul_pairs(
                self.unit,
                words.as_ptr(),
                n_pairs,
                values.as_ptr(),
                d,
                n_q,
                d,
                n_pairs,
                out,
                out_stride,
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequences::{AttendedSequence, SeqLayout};

    fn reference(
        q: &HostTensor,
        k: &HostTensor,
        v: &HostTensor,
        spec: &AttentionSpec,
        layout: &AttentionLayout,
    ) -> Vec<f64> {
        let heads = testkit::reference::Heads {
            heads: spec.heads,
            kv_heads: spec.kv_heads,
            head_dim: spec.head_dim,
            window: spec.sliding_window,
            scale: spec.scale,
            softcap: spec.softcap,
        };
        let (key_base, positions) = layout.per_row();
        testkit::reference::attention(&q.data, &k.data, &v.data, heads, &key_base, &positions)
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn check(
        layout: &AttentionLayout,
        key_rows: usize,
        heads: usize,
        kv_heads: usize,
        window: Option<usize>,
        softcap: Option<f32>,
    ) {
        let d = 8;
        let rows = layout.rows();
        let spec = AttentionSpec {
            heads,
            kv_heads,
            head_dim: d,
            sliding_window: window,
            scale: 0.7,
            softcap,
        };
        let q = HostTensor::new(random(rows * heads * d, 1), rows, heads * d).unwrap();
        let k = HostTensor::new(random(key_rows * kv_heads * d, 2), key_rows, kv_heads * d).unwrap();
        let v = HostTensor::new(random(key_rows * kv_heads * d, 3), key_rows, kv_heads * d).unwrap();
        let want = reference(&q, &k, &v, &spec, layout);
        let mut paired_outputs = Vec::new();
        let (mut tiled, mut f32_output) = (None, None);
        for products in units() {
            let mut got = HostTensor::zeros(rows, heads * d);
            attention(&q, &k, &v, &spec, layout, &mut got, products).unwrap();
            let err = got
                .data
                .iter()
                .zip(&want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            // bf16 q, k, v and probabilities: scores off by ~2⁻⁸ of |q||k|, outputs (averages
            // of values in [−1, 1]) by a few 2⁻⁹.
            let bound = if products == Products::F32 { 1e-5 } else { 2e-2 };
            assert!(
                err < bound,
                "{products:?}: max error {err} for {layout:?} {heads}/{kv_heads} {window:?}"
            );
            match products {
                Products::Pairs(_) => paired_outputs.push(got.data),
                Products::Tiles => tiled = Some(got.data),
                Products::F32 => f32_output = Some(got.data),
            }
        }
        let max_diff =
            |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        // Where every block's keys start on a tile step, the tiles compute what the pairs do
        // (the same bf16 operands, f32 sums in another order), not the f32 products.
        let (tiled, f32_output) = (tiled.expect("tiles ran"), f32_output.expect("f32 ran"));
        if window.is_none() && layout.sequences().iter().all(|s| s.keys % TILE_STEP == 0) {
            let twin = &paired_outputs[0];
            // Measured: 3e-8 (a flipped bf16 rounding of a probability would be ~1e-4); the
            // f32 products differ from the pairs by 3e-3.
            let (diff, f32_diff) = (max_diff(&tiled, twin), max_diff(&f32_output, twin));
            assert!(
                diff < 1e-5 && f32_diff > 1e-4,
                "tiles vs pairs {diff}, f32 vs pairs {f32_diff}"
            );
        }
        // The hardware and its twin add the same products in different orders.
        if let [a, b] = &paired_outputs[..] {
            let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "vdpbf16ps vs its twin: {diff}");
        }
    }

    /// f32, the pair twin, `vdpbf16ps` where this CPU has it, and the AMX tiles (on their
    /// twin where this CPU has none).
    fn units() -> Vec<Products> {
        let mut units = vec![
            Products::F32,
            Products::Pairs(PairUnit::Emulated),
            Products::Tiles,
        ];
        if crate::pairs::hardware_here() {
            units.push(Products::Pairs(PairUnit::Hardware));
        } else {
            eprintln!("attention: no AVX512-BF16 here; paired attention runs on the twin only");
        }
        units
    }

    fn within(lengths: &[usize]) -> (AttentionLayout, usize) {
        let layout = SeqLayout::new(lengths).unwrap();
        (AttentionLayout::within(&layout), layout.rows())
    }

    #[test]
    fn matches_direct_attention_across_blocks_and_sequences() {
        // Blocks whose keys start on a tile step (the first sequence, the second from row 32
        // of [32, 100]) take the AMX tiles; the others fall back to f32.
        // Random scores reach ±5: a cap of 1.5 changes most of them (Gemma 2's soft-capping).
        for (lengths, heads, kv_heads, window, softcap) in [
            (&[150][..], 4, 2, None, None),
            (&[32, 100], 4, 2, None, Some(1.5)),
            (&[3, 70, 1], 4, 4, None, None),
            (&[130, 65], 6, 2, Some(40), None),
            (&[130, 65], 6, 2, Some(40), Some(1.5)),
            (&[5], 2, 1, Some(1), None),
        ] {
            let (layout, rows) = within(lengths);
            check(&layout, rows, heads, kv_heads, window, softcap);
        }
    }

    #[test]
    fn queries_after_a_cached_past_see_the_store() {
        // Two sequences in a cache of capacity 200: one decoding its 91st token, one
        // prefilling 70 tokens after 30 cached ones (crossing a query block), plus a
        // sliding window shorter than the past.
        let seqs = vec![
            AttendedSequence {
                queries: 0..1,
                keys: 0,
                past: 90,
            },
            AttendedSequence {
                queries: 1..71,
                keys: 200,
                past: 30,
            },
        ];
        let layout = AttentionLayout::new(seqs).unwrap();
        assert_eq!(layout.key_rows(), 300);
        check(&layout, 400, 4, 2, None, None);
        check(&layout, 400, 4, 2, Some(25), Some(1.5));
        // A store too short for the positions is refused.
        let spec = AttentionSpec {
            heads: 1,
            kv_heads: 1,
            head_dim: 8,
            sliding_window: None,
            scale: 1.0,
            softcap: None,
        };
        let (q, kv) = (HostTensor::zeros(71, 8), HostTensor::zeros(299, 8));
        let mut out = HostTensor::zeros(71, 8);
        assert!(attention(&q, &kv, &kv, &spec, &layout, &mut out, Products::F32).is_err());
    }
}
