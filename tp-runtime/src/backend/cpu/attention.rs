//! Causal grouped-query attention on the CPU, one (sequence, head, block of queries) task at
//! a time so that the score matrix never exceeds `QUERY_BLOCK × keys`. The keys come from a
//! key store: the same rows as the queries in a plain forward pass, a KV cache when decoding.

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::{SharedOut, exp_in_place, math};
use crate::backend::{AttentionLayout, AttentionSpec};
use crate::tensor::HostTensor;
use crate::{Error, Result};

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

/// `out = softmax(scale · q kᵀ + causal mask) v` for each sequence of `layout`, for q
/// `[rows, heads·d]` and a key store k, v `[key rows, kv_heads·d]`.
pub fn attention(
    q: &HostTensor,
    k: &HostTensor,
    v: &HostTensor,
    spec: &AttentionSpec,
    layout: &AttentionLayout,
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
    for (name, t, expected_rows, cols) in [
        ("q", q, rows, q_stride),
        ("output", &*out, rows, q_stride),
        ("k", k, k.rows.max(layout.key_rows()), kv_stride),
        ("v", v, k.rows.max(layout.key_rows()), kv_stride),
    ] {
        if t.rows != expected_rows || t.cols != cols {
            return Err(Error::Invalid(format!(
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
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, t| {
            let kv_head = t.head / group;
            let n_q = t.q_end - t.q_start;
            let n_k = t.k_end - t.k_start;
            scores.clear();
            scores.resize(n_q * n_k, 0.0);
            let q_ptr = q.data[t.q_start * q_stride + t.head * d..].as_ptr();
            let k_ptr = k.data[t.k_start * kv_stride + kv_head * d..].as_ptr();
            let v_ptr = v.data[t.k_start * kv_stride + kv_head * d..].as_ptr();
            // SAFETY: scores is n_q×n_k; q rows t.q_start.. with stride q_stride hold d values
            // of this head; k rows t.k_start..t.k_end likewise (read as a d×n_k matrix).
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
                let position = t.position + i;
                // Keys k_start + j for j in lo..=hi are visible to this query.
                let hi = position - t.k_position;
                let lo = (position + 1).saturating_sub(window).max(t.k_position) - t.k_position;
                let visible = &mut row[lo..=hi];
                let max = math::max(visible);
                visible.iter_mut().for_each(|s| *s -= max);
                exp_in_place(visible);
                let inv = 1.0 / math::sum(visible);
                visible.iter_mut().for_each(|s| *s *= inv);
                row[..lo].fill(0.0);
                row[hi + 1..].fill(0.0);
            }
            // SAFETY: this task alone writes rows t.q_start..t.q_end, columns of its head, of the
            // [rows, q_stride] output; v rows t.k_start..t.k_end hold d values of kv_head.
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
    use crate::backend::{AttendedSequence, SeqLayout};

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
    ) {
        let d = 8;
        let rows = layout.rows();
        let spec = AttentionSpec {
            heads,
            kv_heads,
            head_dim: d,
            sliding_window: window,
            scale: 0.7,
        };
        let q = HostTensor::new(random(rows * heads * d, 1), rows, heads * d).unwrap();
        let k = HostTensor::new(random(key_rows * kv_heads * d, 2), key_rows, kv_heads * d).unwrap();
        let v = HostTensor::new(random(key_rows * kv_heads * d, 3), key_rows, kv_heads * d).unwrap();
        let mut got = HostTensor::zeros(rows, heads * d);
        attention(&q, &k, &v, &spec, layout, &mut got).unwrap();
        let want = reference(&q, &k, &v, &spec, layout);
        let err = got
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err < 1e-5,
            "max error {err} for {layout:?} {heads}/{kv_heads} {window:?}"
        );
    }

    fn within(lengths: &[usize]) -> (AttentionLayout, usize) {
        let layout = SeqLayout::new(lengths).unwrap();
        (AttentionLayout::within(&layout), layout.rows())
    }

    #[test]
    fn matches_direct_attention_across_blocks_and_sequences() {
        for (lengths, heads, kv_heads, window) in [
            (&[150][..], 4, 2, None),
            (&[3, 70, 1], 4, 4, None),
            (&[130, 65], 6, 2, Some(40)),
            (&[5], 2, 1, Some(1)),
        ] {
            let (layout, rows) = within(lengths);
            check(&layout, rows, heads, kv_heads, window);
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
        check(&layout, 400, 4, 2, None);
        check(&layout, 400, 4, 2, Some(25));
        // A store too short for the positions is refused.
        let spec = AttentionSpec {
            heads: 1,
            kv_heads: 1,
            head_dim: 8,
            sliding_window: None,
            scale: 1.0,
        };
        let (q, kv) = (HostTensor::zeros(71, 8), HostTensor::zeros(299, 8));
        let mut out = HostTensor::zeros(71, 8);
        assert!(attention(&q, &kv, &kv, &spec, &layout, &mut out).is_err());
    }
}
