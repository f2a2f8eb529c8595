//! Causal grouped-query attention on the CPU, one (sequence, head, block of queries) task at
//! a time so that the score matrix never exceeds `QUERY_BLOCK × keys`.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::{SharedOut, exp_in_place};
use crate::backend::{AttentionSpec, SeqLayout};
use crate::tensor::HostTensor;
use crate::{Error, Result};

/// Query rows per task.
const QUERY_BLOCK: usize = 64;

/// One task: query rows `q_start..q_end` of head `head`, attending to keys from
/// `k_start` up to `q_end` of the same sequence.
struct Task {
    head: usize,
    q_start: usize,
    q_end: usize,
    k_start: usize,
}

/// `out = softmax(scale · q kᵀ + causal mask) v` per sequence of `layout`, for q
/// `[rows, heads·d]` and k, v `[rows, kv_heads·d]`.
pub fn attention(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    spec: &AttentionSpec,
    layout: &SeqLayout,
    out: &mut HostTensor,
) -> Result<()> {
    let d = spec.head_dim;
    let q_stride = spec.heads * d;
    let kv_stride = spec.kv_heads * d;
    let rows = layout.rows();
    if spec.kv_heads == 0 || !spec.heads.is_multiple_of(spec.kv_heads) {
        return Err(Error::Invalid(format!(
            "attention: {} query heads do not group over {} kv heads",
            spec.heads, spec.kv_heads
        )));
    }
    for (name, t, cols) in [
        ("q", q, q_stride),
        ("k", k, kv_stride),
        ("v", v, kv_stride),
        ("output", &*out, q_stride),
    ] {
        if t.rows != rows || t.cols != cols {
            return Err(Error::Invalid(format!(
                "attention: {name} is [{}, {}], expected [{rows}, {cols}]",
                t.rows, t.cols
            )));
        }
    }
    let group = spec.heads / spec.kv_heads;
    let window = spec.sliding_window.unwrap_or(usize::MAX).max(1);

    let mut tasks = Vec::new();
    for seq in layout.sequences() {
        for q_start in (seq.start..seq.end).step_by(QUERY_BLOCK) {
            let q_end = (q_start + QUERY_BLOCK).min(seq.end);
            let k_start = seq.start.max((q_start + 1).saturating_sub(window));
            for head in 0..spec.heads {
                tasks.push(Task {
                    head,
                    q_start,
                    q_end,
                    k_start,
                });
            }
        }
    }

    let shared = SharedOut(out.data.as_mut_ptr());
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, t| {
            let kv_head = t.head / group;
            let n_q = t.q_end - t.q_start;
            let n_k = t.q_end - t.k_start;
            scores.clear();
            scores.resize(n_q * n_k, 0.0);
            let q_ptr = q.data[t.q_start * q_stride + t.head * d..].as_ptr();
            let k_ptr = k.data[t.k_start * kv_stride + kv_head * d..].as_ptr();
            let v_ptr = v.data[t.k_start * kv_stride + kv_head * d..].as_ptr();
            // SAFETY: scores is n_q×n_k; q rows t.q_start.. with stride q_stride hold d values
            // of this head; k rows t.k_start..t.q_end likewise (read as a d×n_k matrix).
            unsafe {
                gemm(
                    n_q,
                    n_k,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    n_k as isize,
                    false,
                    q_ptr,
                    1,
                    q_stride as isize,
                    k_ptr,
                    kv_stride as isize,
                    1,
                    0.0,
                    spec.scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_exact_mut(n_k).enumerate() {
                let query = t.q_start + i;
                // Keys k_start + j for j in lo..=hi are visible to this query.
                let hi = query - t.k_start;
                let lo = (query + 1).saturating_sub(window).max(t.k_start) - t.k_start;
                let visible = &mut row[lo..=hi];
                let max = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                visible.iter_mut().for_each(|s| *s -= max);
                exp_in_place(visible);
                let inv = 1.0 / visible.iter().sum::<f32>();
                visible.iter_mut().for_each(|s| *s *= inv);
                row[..lo].fill(0.0);
                row[hi + 1..].fill(0.0);
            }
            // SAFETY: this task alone writes rows t.q_start..t.q_end, columns of its head, of the
            // [rows, q_stride] output; v rows t.k_start..t.q_end hold d values of kv_head.
            unsafe {
                gemm(
                    n_q,
                    d,
                    n_k,
                    shared.ptr().add(t.q_start * q_stride + t.head * d),
                    1,
                    q_stride as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    n_k as isize,
                    v_ptr,
                    1,
                    kv_stride as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct f64 attention: every score materialised, softmax over the visible keys.
    fn reference(
        q: &HostTensor,
        k: &HostTensor,
        v: &HostTensor,
        spec: &AttentionSpec,
        layout: &SeqLayout,
    ) -> Vec<f64> {
        let d = spec.head_dim;
        let group = spec.heads / spec.kv_heads;
        let window = spec.sliding_window.unwrap_or(usize::MAX);
        let mut out = vec![0f64; q.data.len()];
        for seq in layout.sequences() {
            for i in seq.clone() {
                for h in 0..spec.heads {
                    let g = h / group;
                    let keys: Vec<usize> = (seq.start..=i).filter(|&j| i - j < window).collect();
                    let scores: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            (0..d)
                                .map(|c| {
                                    q.data[i * q.cols + h * d + c] as f64
                                        * k.data[j * k.cols + g * d + c] as f64
                                })
                                .sum::<f64>()
                                * spec.scale as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..d {
                        out[i * q.cols + h * d + c] = keys
                            .iter()
                            .zip(&e)
                            .map(|(&j, w)| w / sum * v.data[j * v.cols + g * d + c] as f64)
                            .sum();
                    }
                }
            }
        }
        out
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn check(lengths: &[usize], heads: usize, kv_heads: usize, window: Option<usize>) {
        let d = 8;
        let layout = SeqLayout::new(lengths).unwrap();
        let rows = layout.rows();
        let spec = AttentionSpec {
            heads,
            kv_heads,
            head_dim: d,
            sliding_window: window,
            scale: 0.7,
        };
        let q = HostTensor::new(random(rows * heads * d, 1), rows, heads * d).unwrap();
        let k = HostTensor::new(random(rows * kv_heads * d, 2), rows, kv_heads * d).unwrap();
        let v = HostTensor::new(random(rows * kv_heads * d, 3), rows, kv_heads * d).unwrap();
        let mut got = HostTensor::zeros(rows, heads * d);
        attention(&q, &k, &v, &spec, &layout, &mut got).unwrap();
        let want = reference(&q, &k, &v, &spec, &layout);
        let err = got
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err < 1e-5,
            "max error {err} for {lengths:?} {heads}/{kv_heads} {window:?}"
        );
    }

    #[test]
    fn matches_direct_attention_across_blocks_and_sequences() {
        check(&[150], 4, 2, None);
        check(&[3, 70, 1], 4, 4, None);
        check(&[130, 65], 6, 2, Some(40));
        check(&[5], 2, 1, Some(1));
    }
}
