//! Activation-aware scale search (awq-format.md §2): for a group of linears that share an input,
//! find per-input-channel scales `s` that minimise the error of the inspected module when
//! every linear of the group becomes `Q(W·diag(s)) / s`.

use std::fmt;
use std::str::FromStr;

use cpu_kernels::narrow as to_bf16_row;
use half::bf16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::Result;
use crate::quant::{GroupSize, fake_quantize_group};

/// Grid points: α = i / GRID for i in 0..GRID (α = 1 is never tried).
pub const GRID: usize = 20;

/// How candidate scales are formed from the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scaling {
    /// AutoAWQ's default: `x_mean^α / (w_mean^(1−α) + 1e-4)`.
    Duo,
    /// llm-awq and the paper: `x_mean^α`.
    XOnly,
}

impl fmt::Display for Scaling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scaling::Duo => "duo",
            Scaling::XOnly => "x-only",
        })
    }
}

impl FromStr for Scaling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "duo" => Ok(Scaling::Duo),
            "x-only" => Ok(Scaling::XOnly),
            other => Err(format!("unknown scaling `{other}` (expected duo or x-only)")),
        }
    }
}

/// Per input channel: the mean over all output rows of the group's weights of `|w|`
/// divided by (its quantization group's max `|w|` + 1e-6).
pub fn weight_mean(weights: &[&[f32]], in_features: usize, group_size: GroupSize) -> Vec<f32> {
    let g = group_size.get();
    let rows: Vec<&[f32]> = weights.iter().flat_map(|w| w.chunks_exact(in_features)).collect();
    // Fixed-size pieces summed in order: the result does not depend on scheduling.
    let partial: Vec<Vec<f64>> = rows
        .par_chunks(64)
        .map(|rows| {
            let mut acc = vec![0f64; in_features];
            for row in rows {
                for (acc, w) in acc.chunks_exact_mut(g).zip(row.chunks_exact(g)) {
                    let max = w.iter().fold(0f32, |m, v| m.max(v.abs())) + 1e-6;
                    for (a, v) in acc.iter_mut().zip(w) {
                        *a += (v.abs() / max) as f64;
                    }
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; in_features];
    for p in partial {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
        .into_iter()
        .map(|v| (v / rows.len() as f64) as f32)
        .collect()
}

/// The candidate scales for grid point `alpha`, normalised so that `max·min = 1`;
/// non-finite entries become 1.
pub fn candidate_scales(x_mean: &[f32], w_mean: &[f32], alpha: f32, scaling: Scaling) -> Vec<f32> {
    let mut s: Vec<f32> = match scaling {
        Scaling::Duo => x_mean
            .iter()
            .zip(w_mean)
            .map(|(&x, &w)| (x.powf(alpha) / (w.powf(1.0 - alpha) + 1e-4)).max(1e-4))
            .collect(),
        Scaling::XOnly => x_mean.iter().map(|&x| x.powf(alpha).max(1e-4)).collect(),
    };
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let min = s.iter().copied().fold(f32::INFINITY, f32::min);
    let norm = (max * min).sqrt();
    for v in s.iter_mut() {
        *v /= norm;
        if !v.is_finite() {
            *v = 1.0;
        }
    }
    s
}

/// `Q(W·diag(s)) / s` for a row-major `[out, in]` weight.
pub fn scaled_fake_quantize(
    w: &[f32],
    in_features: usize,
    scales: &[f32],
    group_size: GroupSize,
) -> Vec<f32> {
    scaled_fake_quantize_as(w, in_features, scales, group_size, |row, out| {
        out.copy_from_slice(row)
    })
}

/// [`scaled_fake_quantize`] rounded to bf16 row by row as it is made, the same values as
/// rounding its output: a bf16 search never holds an f32 copy of a trial's weight.
pub fn scaled_fake_quantize_bf16(
    w: &[f32],
    in_features: usize,
    scales: &[f32],
    group_size: GroupSize,
) -> Vec<bf16> {
    scaled_fake_quantize_as(w, in_features, scales, group_size, to_bf16_row)
}

/// `Q(W·diag(s)) / s`, each row computed in f32 and handed to `convert` to be stored as `T`.
/// Row-parallel, one pass per row: at 7B widths each trial scales hundreds of millions of
/// weights. The output is written straight into uninitialised capacity: zeroing it first
/// would be a serial pass on the calling thread.
fn scaled_fake_quantize_as<T: Copy + Default + Send>(
    w: &[f32],
    in_features: usize,
    scales: &[f32],
    group_size: GroupSize,
    convert: impl Fn(&[f32], &mut [T]) + Sync,
) -> Vec<T> {
    let g = group_size.get();
    let mut out = Vec::with_capacity(w.len());
    out.spare_capacity_mut()[..w.len()]
        .par_chunks_mut(in_features)
        .zip(w.par_chunks(in_features))
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(wide, stored): &mut (Vec<f32>, Vec<T>), (out, row)| {
                wide.clear();
                wide.extend(row.iter().zip(scales).map(|(w, s)| w * s));
                quantize_scaled_row(wide, scales, g);
                stored.resize(wide.len(), T::default());
                convert(wide, stored);
                for (o, v) in out.iter_mut().zip(stored.iter()) {
                    o.write(*v);
                }
            },
        );
    // SAFETY: the rows cover all w.len() elements, each written above.
    unsafe { out.set_len(w.len()) };
    out
}

/// A row already multiplied by `scales`: its groups fake-quantized, then divided by `scales`.
fn quantize_scaled_row(row: &mut [f32], scales: &[f32], g: usize) {
    row.chunks_exact_mut(g).for_each(fake_quantize_group);
    row.iter_mut().zip(scales).for_each(|(w, s)| *w /= s);
}

/// The outcome of one group's search.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScaleChoice {
    /// The winning grid point.
    pub alpha: f32,
    pub loss_at_zero: f64,
    pub best_loss: f64,
    /// Loss at every grid point, α = 0 first.
    pub losses: Vec<f64>,
    /// The winning scales, one per input channel.
    #[serde(skip)]
    pub scales: Vec<f32>,
}

/// Tries every grid point; `loss(scales)` must return the inspected module's mean squared
/// error with the group quantized under those scales. The strictly smallest loss wins.
pub fn search_scales(
    x_mean: &[f32],
    w_mean: &[f32],
    scaling: Scaling,
    mut loss: impl FnMut(&[f32]) -> Result<f64>,
) -> Result<ScaleChoice> {
    let mut best: Option<(f32, f64, Vec<f32>)> = None;
    let mut losses = Vec::with_capacity(GRID);
    for i in 0..GRID {
        let alpha = i as f32 / GRID as f32;
        let scales = candidate_scales(x_mean, w_mean, alpha, scaling);
        let l = loss(&scales)?;
        losses.push(l);
        if best.as_ref().is_none_or(|(_, b, _)| l < *b) {
            best = Some((alpha, l, scales));
        }
    }
    let (alpha, best_loss, scales) = best.expect("GRID > 0");
    Ok(ScaleChoice {
        alpha,
        loss_at_zero: losses[0],
        best_loss,
        losses,
        scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_mean_normalises_per_group() {
        // Two rows, in = 4, g = 2: row 0 groups (1, -2), (4, 4); row 1 (0, 1), (2, -1).
        let w = [1.0, -2.0, 4.0, 4.0, 0.0, 1.0, 2.0, -1.0];
        let m = weight_mean(&[&w], 4, GroupSize::new(2).unwrap());
        let e = 1e-6f32;
        let want = [
            (1.0 / (2.0 + e) + 0.0) / 2.0,
            (2.0 / (2.0 + e) + 1.0 / (1.0 + e)) / 2.0,
            (4.0 / (4.0 + e) + 2.0 / (2.0 + e)) / 2.0,
            (4.0 / (4.0 + e) + 1.0 / (2.0 + e)) / 2.0,
        ];
        for (a, b) in m.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{m:?} vs {want:?}");
        }
    }

    #[test]
    fn a_bf16_trial_weight_is_the_f32_one_rounded() {
        let (rows, in_features) = (5, 256);
        let w: Vec<f32> = (0..rows * in_features)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * (1.0 + (i % 17) as f32))
            .collect();
        let scales: Vec<f32> = (0..in_features).map(|i| 0.5 + (i % 9) as f32 / 4.0).collect();
        for g in [64, 128] {
            let g = GroupSize::new(g).unwrap();
            let wide = scaled_fake_quantize(&w, in_features, &scales, g);
            let narrow = scaled_fake_quantize_bf16(&w, in_features, &scales, g);
            assert_eq!(narrow.len(), wide.len());
            for (i, (n, v)) in narrow.iter().zip(&wide).enumerate() {
                assert_eq!(n.to_bits(), bf16::from_f32(*v).to_bits(), "element {i}");
            }
        }
    }

    #[test]
    fn candidates_are_normalised() {
        let x = [0.5, 2.0, 8.0];
        let w = [0.2, 0.4, 0.8];
        for scaling in [Scaling::Duo, Scaling::XOnly] {
            let s = candidate_scales(&x, &w, 0.5, scaling);
            let max = s.iter().copied().fold(f32::MIN, f32::max);
            let min = s.iter().copied().fold(f32::MAX, f32::min);
            assert!((max * min - 1.0).abs() < 1e-5, "{s:?}");
        }
        // α = 0 with x-only scaling: every scale is 1.
        assert_eq!(candidate_scales(&x, &w, 0.0, Scaling::XOnly), vec![1.0; 3]);
        // x-only, α = 0.5: s ∝ sqrt(x) = (0.707, 1.414, 2.828), normalised by sqrt(0.707·2.828) = 1.414.
        let s = candidate_scales(&x, &w, 0.5, Scaling::XOnly);
        assert!(
            (s[0] - 0.5).abs() < 1e-6 && (s[1] - 1.0).abs() < 1e-6 && (s[2] - 2.0).abs() < 1e-6,
            "{s:?}"
        );
    }

    #[test]
    fn strictly_smallest_loss_wins_and_ties_keep_the_first() {
        let x = [1.0, 2.0];
        let w = [1.0, 1.0];
        let mut i = 0;
        let choice = search_scales(&x, &w, Scaling::Duo, |_| {
            i += 1;
            Ok(match i {
                4 | 7 => 0.5,
                _ => 1.0,
            })
        })
        .unwrap();
        assert_eq!(choice.losses.len(), GRID);
        assert_eq!(choice.alpha, 3.0 / 20.0);
        assert_eq!((choice.loss_at_zero, choice.best_loss), (1.0, 0.5));
    }
}
