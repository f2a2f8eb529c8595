//! How far a model's next-token distributions are from a base model's, position by position:
//! the statistics of `llama-perplexity --kl-divergence` (llama.cpp `tools/perplexity`),
//! computed in one run with both models loaded, so that no logits file is ever written.
//!
//! Per scored prediction, with `p` the base model's softmax and `q` the other's:
//! - KLD = Σᵢ pᵢ (ln pᵢ − ln qᵢ), over the whole vocabulary, in f64 (llama.cpp stores the
//!   base log-probabilities in 16 bits and skips those below −16);
//! - Δp = q(correct token) − p(correct token);
//! - same top: whether both argmaxes agree.
//!
//! Aggregates follow llama.cpp: a mean's uncertainty is `√((Σx²/n − mean²)/(n − 1))`
//! (reported when n > 10); percentiles interpolate linearly between sorted values
//! (`fraction · (n − 1)`), the median is the middle value (or the mean of the two middle
//! ones); the correlation of ln PPL is that of the per-token NLLs (llama.cpp's
//! "Cor(ln(PPL(Q)), ln(PPL(base)))"), and ln(PPL(Q)/PPL(base)) = mean NLL(Q) − mean NLL(base)
//! with uncertainty `√(σ_Q² + σ_base² − 2 cov)`. Also reported: the Pearson correlation of
//! the per-window ln PPL.

use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tp_runtime::Scorer;
use tp_runtime::backend::SeqLayout;

use crate::perplexity::WindowPlan;
use crate::{Error, Result};

/// One prediction compared.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Compared {
    pub kld: f64,
    /// NLL of the correct token under the base model and under the other.
    pub nll_base: f64,
    pub nll: f64,
    pub same_top: bool,
}

impl Compared {
    /// q(correct) − p(correct).
    pub fn delta_p(&self) -> f64 {
        (-self.nll).exp() - (-self.nll_base).exp()
    }
}

/// `ln softmax(logits)` in f64, and the argmax (lowest id on ties).
fn log_softmax(logits: &[f32]) -> (Vec<f64>, usize) {
    let mut top = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[top] {
            top = i;
        }
    }
    let max = logits[top] as f64;
    let log_sum = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    (logits.iter().map(|&l| l as f64 - max - log_sum).collect(), top)
}

/// Compares one prediction of `target` from both models' logits.
pub fn compare(base: &[f32], other: &[f32], target: u32) -> Compared {
    let (lp, top_base) = log_softmax(base);
    let (lq, top) = log_softmax(other);
    let kld = lp.iter().zip(&lq).map(|(&p, &q)| p.exp() * (p - q)).sum();
    let t = target as usize;
    Compared {
        kld,
        nll_base: -lp[t],
        nll: -lq[t],
        same_top: top == top_base,
    }
}

/// A mean and its uncertainty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub mean: f64,
    pub uncertainty: f64,
}

/// The mean of values with these sums, and its standard error (llama.cpp's rule).
fn estimate(sum: f64, sum2: f64, n: usize) -> Estimate {
    if n == 0 {
        return Estimate::default();
    }
    let mean = sum / n as f64;
    let var = sum2 / n as f64 - mean * mean;
    let uncertainty = if var > 0.0 && n > 10 {
        (var / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    Estimate { mean, uncertainty }
}

/// Distribution of a per-token quantity: extremes, median and percentiles.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub min: f64,
    pub max: f64,
    pub median: f64,
    /// `(fraction, value)` for each percentile reported.
    pub percentiles: Vec<(f64, f64)>,
}

/// Percentile `fraction` of sorted `values`, interpolated linearly.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1];
    }
    let at = fraction * (sorted.len() - 1) as f64;
    let (i, frac) = (at as usize, at.fract());
    (1.0 - frac) * sorted[i] + frac * sorted[(i + 1).min(sorted.len() - 1)]
}

fn spread(mut values: Vec<f64>, fractions: &[f64]) -> Spread {
    if values.is_empty() {
        return Spread::default();
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n.is_multiple_of(2) {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    } else {
        values[n / 2]
    };
    Spread {
        min: values[0],
        max: values[n - 1],
        median,
        percentiles: fractions.iter().map(|&f| (f, percentile(&values, f))).collect(),
    }
}

/// Pearson correlation of paired values.
fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// What `awq eval --kl-base` reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KlStats {
    pub predictions: usize,
    pub ppl: f64,
    pub ppl_base: f64,
    /// ln(PPL(Q)/PPL(base)).
    pub ln_ppl_ratio: Estimate,
    /// Correlation of the per-token NLLs (llama.cpp's "Cor(ln(PPL(Q)), ln(PPL(base)))").
    pub token_nll_correlation: f64,
    /// Correlation of the per-window ln PPL.
    pub window_ln_ppl_correlation: f64,
    pub kld: Estimate,
    /// Percentiles 99.9, 99, 95, 90, 10, 5, 1, 0.1 %.
    pub kld_spread: Spread,
    pub delta_p: Estimate,
    pub delta_p_rms: Estimate,
    /// Percentiles 99.9, 99, 95, 90, 75, 25, 10, 5, 1, 0.1 %.
    pub delta_p_spread: Spread,
    /// Share of predictions whose most likely token is the same.
    pub same_top: Estimate,
    /// Mean KLD of each window.
    pub window_kld: Vec<f64>,
    /// Mean NLL of each window, under the model and under the base model.
    pub window_mean_nll: Vec<f64>,
    pub window_mean_nll_base: Vec<f64>,
    pub seconds: f64,
}

/// Accumulates comparisons.
#[derive(Default)]
struct Tally {
    all: Vec<Compared>,
    window_nll: Vec<(f64, f64)>,
    window_kld: Vec<f64>,
}

impl Tally {
    fn add_window(&mut self, compared: Vec<Compared>) {
        let n = compared.len() as f64;
        self.window_nll.push((
            compared.iter().map(|c| c.nll).sum::<f64>() / n,
            compared.iter().map(|c| c.nll_base).sum::<f64>() / n,
        ));
        self.window_kld
            .push(compared.iter().map(|c| c.kld).sum::<f64>() / n);
        self.all.extend(compared);
    }

    fn stats(self, seconds: f64) -> KlStats {
        let n = self.all.len();
        let sum = |f: &dyn Fn(&Compared) -> f64| self.all.iter().map(f).sum::<f64>();
        let nll = estimate(sum(&|c| c.nll), sum(&|c| c.nll * c.nll), n);
        let nll_base = estimate(sum(&|c| c.nll_base), sum(&|c| c.nll_base * c.nll_base), n);
        let cov = if n < 10 {
            0.0
        } else {
            (sum(&|c| c.nll * c.nll_base) / n as f64 - nll.mean * nll_base.mean) / (n - 1) as f64
        };
        let dp: Vec<f64> = self.all.iter().map(Compared::delta_p).collect();
        let dp2: Vec<f64> = dp.iter().map(|d| d * d).collect();
        let mse = estimate(dp2.iter().sum(), dp2.iter().map(|d| d * d).sum(), n);
        let rms = mse.mean.sqrt();
        let same = self.all.iter().filter(|c| c.same_top).count() as f64 / n as f64;
        let (window_q, window_base): (Vec<f64>, Vec<f64>) = self.window_nll.iter().copied().unzip();
        KlStats {
            predictions: n,
            ppl: nll.mean.exp(),
            ppl_base: nll_base.mean.exp(),
            ln_ppl_ratio: Estimate {
                mean: nll.mean - nll_base.mean,
                uncertainty: (nll.uncertainty.powi(2) + nll_base.uncertainty.powi(2) - 2.0 * cov)
                    .max(0.0)
                    .sqrt(),
            },
            token_nll_correlation: cov / (nll.uncertainty * nll_base.uncertainty),
            window_ln_ppl_correlation: correlation(&window_q, &window_base),
            kld: estimate(sum(&|c| c.kld), sum(&|c| c.kld * c.kld), n),
            kld_spread: spread(
                self.all.iter().map(|c| c.kld).collect(),
                &[0.999, 0.99, 0.95, 0.9, 0.1, 0.05, 0.01, 0.001],
            ),
            delta_p: estimate(dp.iter().sum(), dp2.iter().sum(), n),
            delta_p_rms: Estimate {
                mean: rms,
                uncertainty: if rms > 0.0 {
                    0.5 / rms * mse.uncertainty
                } else {
                    0.0
                },
            },
            delta_p_spread: spread(dp, &[0.999, 0.99, 0.95, 0.9, 0.75, 0.25, 0.1, 0.05, 0.01, 0.001]),
            same_top: Estimate {
                mean: same,
                uncertainty: (same * (1.0 - same) / (n.max(2) - 1) as f64).sqrt(),
            },
            window_kld: self.window_kld,
            window_mean_nll: window_q,
            window_mean_nll_base: window_base,
            seconds,
        }
    }
}

/// Compares `model` with `base` on the windows of `plan`: both score the same windows, one
/// at a time, and only the statistics are kept. `on_window(done, mean KLD so far)`.
pub fn kl_divergence<B: Scorer + ?Sized, Q: Scorer + ?Sized>(
    base: &B,
    model: &Q,
    tokens: &[u32],
    plan: &WindowPlan,
    mut on_window: impl FnMut(usize, f64),
) -> Result<KlStats> {
    if base.config().vocab_size != model.config().vocab_size {
        return Err(Error::Invalid(format!(
            "the base model has a vocabulary of {} tokens, the model {}: their distributions cannot be compared",
            base.config().vocab_size,
            model.config().vocab_size
        )));
    }
    if plan.windows * plan.ctx > tokens.len() {
        return Err(Error::Invalid(
            "the window plan does not fit the token stream".into(),
        ));
    }
    let start = Instant::now();
    let layout = SeqLayout::single(plan.ctx).map_err(tp_runtime::Error::from)?;
    let mut tally = Tally::default();
    for index in 0..plan.windows {
        let (ids, predictions) = plan.window(tokens, index);
        let rows: Vec<usize> = predictions.iter().map(|p| p.row).collect();
        let p = base.logits_at(&ids, &layout, &rows)?;
        let q = model.logits_at(&ids, &layout, &rows)?;
        let compared: Vec<Compared> = predictions
            .par_iter()
            .enumerate()
            .map(|(i, prediction)| compare(&p[i], &q[i], prediction.target))
            .collect();
        tally.add_window(compared);
        let so_far = tally.all.iter().map(|c| c.kld).sum::<f64>() / tally.all.len() as f64;
        on_window(index + 1, so_far);
    }
    Ok(tally.stats(start.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_distributions_diverge_nowhere() {
        let logits = [0.5f32, -1.0, 2.0, 0.0];
        let c = compare(&logits, &logits, 1);
        assert!(c.kld.abs() < 1e-15 && c.same_top && c.delta_p() == 0.0);
    }

    #[test]
    fn kld_matches_the_closed_form() {
        // p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4): KLD = ½ ln 2 − ¼ ln 2 = ¼ ln 2.
        let p = [2f32.ln(), 0.0, 0.0];
        let q = [0.0f32, 2f32.ln(), 0.0];
        let c = compare(&p, &q, 1);
        assert!((c.kld - 0.25 * 2f64.ln()).abs() < 1e-7, "{}", c.kld);
        assert!(!c.same_top);
        assert!((c.delta_p() - 0.25).abs() < 1e-7);
        assert!((c.nll_base - 4f64.ln()).abs() < 1e-7 && (c.nll - 2f64.ln()).abs() < 1e-7);
    }

    #[test]
    fn percentiles_interpolate_and_the_median_averages() {
        let v: Vec<f64> = (0..11).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 5.0);
        assert!((percentile(&v, 0.95) - 9.5).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.0), 0.0);
        let s = spread(vec![4.0, 1.0, 3.0, 2.0], &[0.5]);
        assert_eq!((s.min, s.max, s.median), (1.0, 4.0, 2.5));
    }

    #[test]
    fn estimates_follow_llama_cpp() {
        // n ≤ 10: no uncertainty; beyond, the standard error of the mean.
        assert_eq!(estimate(3.0, 5.0, 2).uncertainty, 0.0);
        let x: Vec<f64> = (1..=20).map(f64::from).collect();
        let e = estimate(x.iter().sum(), x.iter().map(|v| v * v).sum(), 20);
        let var = x.iter().map(|v| (v - 10.5).powi(2)).sum::<f64>() / 20.0;
        assert!((e.mean - 10.5).abs() < 1e-12 && (e.uncertainty - (var / 19.0).sqrt()).abs() < 1e-12);
        assert!((correlation(&x, &x.iter().map(|v| 2.0 * v + 1.0).collect::<Vec<_>>()) - 1.0).abs() < 1e-12);
    }
}
