//! Clip search (awq-format.md §3): for every (output row, group), the clipping range among
//! `max|w|·(1 − i/20)`, i = 0..10, whose quantized group best preserves the group's partial
//! products on sampled calibration tokens.
//!
//! The error of a candidate is `mean_t (x_t · (Q(clamp(w)) − w))²` over the sampled tokens,
//! which equals `dᵀ G d` with `d = Q(clamp(w)) − w` and `G = Xᵀ X / T` the group's Gram
//! matrix: one small product per group instead of one per token.

use awq_calib::Activations;
use cpu_kernels::{dot, gram, matmul_transposed};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tp_runtime::HostTensor;

use crate::quant::{GroupSize, fake_quantize_group};

/// Grid resolution of the shrink factor.
pub const CLIP_GRID: usize = 20;
/// Shrinks tried: `1 − i / CLIP_GRID` for `i < CLIP_STEPS` (down to 0.55).
pub const CLIP_STEPS: usize = 10;
/// About this many calibration tokens are sampled.
pub const CLIP_TOKENS: usize = 512;

/// Every `max(1, rows / 512)`-th row of the calibration input, `[T, cols]`, in f32.
pub fn sample_tokens(x: &Activations) -> HostTensor {
    x.every_nth_row((x.rows() / CLIP_TOKENS).max(1))
}

/// What the clip search did to one linear.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClipStats {
    /// (row, group) pairs searched.
    pub groups: usize,
    /// Pairs whose range was shrunk.
    pub clipped: usize,
    /// Mean of chosen/original max |w| over all pairs.
    pub mean_ratio: f64,
    /// Smallest chosen/original ratio.
    pub min_ratio: f32,
}

/// Searches the clipping range of every (row, group) of a `[out, in]` weight given sampled
/// inputs `x` (`[T, in]`); returns the chosen max |w|, `[out, in / g]`, and statistics.
pub fn search_clip(
    w: &[f32],
    out_features: usize,
    x: &HostTensor,
    group_size: GroupSize,
) -> (Vec<f32>, ClipStats) {
    let in_features = x.cols;
    let g = group_size.get();
    let groups = in_features / g;
    let tokens = x.rows;
    // One task per input group: its Gram matrix, then every row's candidates at once.
    let per_group: Vec<(Vec<f32>, Vec<f32>)> = (0..groups)
        .into_par_iter()
        .map(|j| {
            let xj: Vec<f32> = (0..tokens)
                .flat_map(|t| x.row(t)[j * g..(j + 1) * g].iter().copied())
                .collect();
            let gram = gram(&xj, tokens, g, 1.0 / tokens as f32);
            // deltas[(n·STEPS + i)·g ..]: Q(clamp(w)) − w of row n at shrink step i.
            let mut deltas = vec![0f32; out_features * CLIP_STEPS * g];
            let mut org_max = vec![0f32; out_features];
            for n in 0..out_features {
                let w = &w[n * in_features + j * g..n * in_features + (j + 1) * g];
                let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                org_max[n] = max;
                for i in 0..CLIP_STEPS {
                    let limit = max * (1.0 - i as f32 / CLIP_GRID as f32);
                    let d = &mut deltas[(n * CLIP_STEPS + i) * g..(n * CLIP_STEPS + i + 1) * g];
                    for (d, &v) in d.iter_mut().zip(w) {
                        *d = v.clamp(-limit, limit);
                    }
                    fake_quantize_group(d);
                    for (d, &v) in d.iter_mut().zip(w) {
                        *d -= v;
                    }
                }
            }
            let rows = out_features * CLIP_STEPS;
            let mut projected = vec![0f32; rows * g];
            // The Gram matrix is symmetric: deltas · gramᵀ = deltas · gram.
            matmul_transposed(&deltas, &gram, &mut projected, rows, g, g);
            let mut best_max = org_max.clone();
            for n in 0..out_features {
                let mut best_err = f32::INFINITY;
                for i in 0..CLIP_STEPS {
                    let r = n * CLIP_STEPS + i;
                    let err = dot(&deltas[r * g..(r + 1) * g], &projected[r * g..(r + 1) * g]);
                    if err < best_err {
                        best_err = err;
                        best_max[n] = org_max[n] * (1.0 - i as f32 / CLIP_GRID as f32);
                    }
                }
            }
            (best_max, org_max)
        })
        .collect();

    let mut max_val = vec![0f32; out_features * groups];
    let mut stats = ClipStats {
        groups: out_features * groups,
        min_ratio: 1.0,
        ..ClipStats::default()
    };
    let mut ratio_sum = 0f64;
    for (j, (best, org)) in per_group.iter().enumerate() {
        for n in 0..out_features {
            max_val[n * groups + j] = best[n];
            let ratio = if org[n] > 0.0 { best[n] / org[n] } else { 1.0 };
            ratio_sum += ratio as f64;
            if ratio < 1.0 {
                stats.clipped += 1;
            }
            stats.min_ratio = stats.min_ratio.min(ratio);
        }
    }
    stats.mean_ratio = ratio_sum / stats.groups.max(1) as f64;
    (max_val, stats)
}

/// Clamps every (row, group) of a `[out, in]` weight to `±max_val[row, group]`.
pub fn apply_clip(w: &mut [f32], in_features: usize, group_size: GroupSize, max_val: &[f32]) {
    let g = group_size.get();
    let groups = in_features / g;
    w.par_chunks_mut(in_features)
        .zip(max_val.par_chunks(groups))
        .for_each(|(row, limits)| {
            for (w, &m) in row.chunks_exact_mut(g).zip(limits) {
                w.iter_mut().for_each(|v| *v = v.clamp(-m, m));
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// The direct definition of the loss of clipping row `n`, group `j` at `limit`: the mean
    /// over tokens of the squared change of the group's partial product, in f64.
    fn direct_loss(w: &[f32], x: &HostTensor, g: usize, n: usize, j: usize, limit: f32) -> f64 {
        let wg = &w[n * x.cols + j * g..n * x.cols + (j + 1) * g];
        let mut q: Vec<f32> = wg.iter().map(|v| v.clamp(-limit, limit)).collect();
        fake_quantize_group(&mut q);
        (0..x.rows)
            .map(|t| {
                let xt = &x.row(t)[j * g..(j + 1) * g];
                let d: f64 = xt
                    .iter()
                    .zip(q.iter().zip(wg))
                    .map(|(x, (q, w))| (*x as f64) * (*q as f64 - *w as f64))
                    .sum();
                d * d
            })
            .sum::<f64>()
            / x.rows as f64
    }

    /// Every (row, group)'s choice in the Gram form is as good as the best candidate under the
    /// direct definition: its direct loss equals the minimum over the grid (up to f32 rounding
    /// of the Gram form), so a near-tie may pick either candidate but never a worse one.
    #[test]
    fn gram_form_matches_direct_definition() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (out, inf, g, t) = (16, 64, 32, 200);
        // Heavy-tailed weights so that clipping pays off somewhere.
        let w: Vec<f32> = (0..out * inf)
            .map(|_| rng.random_range(-1.0f32..1.0).powi(3))
            .collect();
        let x = HostTensor::new(
            (0..t * inf).map(|_| rng.random_range(-1.0..1.0)).collect(),
            t,
            inf,
        )
        .unwrap();
        let (max_val, stats) = search_clip(&w, out, &x, GroupSize::new(g).unwrap());
        let groups = inf / g;
        for n in 0..out {
            for j in 0..groups {
                let max = w[n * inf + j * g..n * inf + (j + 1) * g]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                let best = (0..CLIP_STEPS)
                    .map(|i| direct_loss(&w, &x, g, n, j, max * (1.0 - i as f32 / CLIP_GRID as f32)))
                    .fold(f64::INFINITY, f64::min);
                let chosen = direct_loss(&w, &x, g, n, j, max_val[n * groups + j]);
                assert!(
                    chosen <= best * (1.0 + 1e-5) + 1e-12,
                    "row {n} group {j}: chosen loss {chosen:e}, best {best:e}"
                );
            }
        }
        assert!(stats.clipped > 0 && stats.min_ratio >= 0.55 - 1e-6);
    }

    #[test]
    fn apply_clip_clamps_each_group() {
        let mut w = vec![3.0, -3.0, 1.0, -1.0];
        apply_clip(&mut w, 4, GroupSize::new(2).unwrap(), &[2.0, 0.5]);
        assert_eq!(w, vec![2.0, -2.0, 0.5, -0.5]);
    }

    #[test]
    fn sampling_takes_every_step_th_row() {
        let x = HostTensor::new((0..2048).map(|v| v as f32).collect(), 1024, 2).unwrap();
        let s = sample_tokens(&Activations::from_f32(x));
        assert_eq!(s.rows, 512);
        assert_eq!(s.row(1), &[4.0, 5.0]);
    }
}
