//! Choosing the next token from logits: greedy at temperature 0, else sampling from the
//! softmax at that temperature, restricted to the top-k tokens and then to the smallest set
//! whose probability reaches top-p (the order transformers applies them in). A seed makes it
//! reproducible: each sequence draws from its own ChaCha8 stream.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0: greedy (the most likely token, the lowest id on ties).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Sampling {
    /// Checks the values: a temperature ≥ 0 and a top-p in (0, 1].
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::Invalid(format!(
                "temperature {}: expected a finite value ≥ 0 (0 is greedy)",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "top-p {}: expected a value in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }

    /// Whether every choice is the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Draws tokens for one sequence.
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// The sampler of sequence `sequence` (its own random stream of the seed).
    pub fn new(sampling: Sampling, sequence: u64) -> Result<Self> {
        sampling.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
        rng.set_stream(sequence);
        Ok(Sampler { sampling, rng })
    }

    /// The next token from `logits`.
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        if self.sampling.is_greedy() {
            return argmax(logits);
        }
        let candidates = candidates(logits, self.sampling);
        let draw: f64 = self.rng.random_range(0.0..1.0);
        let mut acc = 0.0;
        for &(id, p) in &candidates {
            acc += p;
            if draw < acc {
                return id;
            }
        }
        candidates.last().map_or(0, |&(id, _)| id)
    }
}

/// The index of the largest logit, the lowest on ties (NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// The tokens sampling may choose with their renormalised probabilities, most likely first
/// (ties by id).
pub fn candidates(logits: &[f32], sampling: Sampling) -> Vec<(u32, f64)> {
    let t = sampling.temperature as f64;
    let mut order: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l as f64 / t))
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if sampling.top_k > 0 {
        order.truncate(sampling.top_k);
    }
    let max = order.first().map_or(0.0, |c| c.1);
    let mut sum = 0.0;
    for c in &mut order {
        c.1 = (c.1 - max).exp();
        sum += c.1;
    }
    for c in &mut order {
        c.1 /= sum;
    }
    if sampling.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = order
            .iter()
            .position(|c| {
                acc += c.1;
                acc >= sampling.top_p as f64
            })
            .map_or(order.len(), |i| i + 1);
        order.truncate(keep);
        let kept: f64 = order.iter().map(|c| c.1).sum();
        for c in &mut order {
            c.1 /= kept;
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, top_k: usize, top_p: f32) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: 7,
        }
    }

    #[test]
    fn greedy_takes_the_first_largest() {
        assert_eq!(argmax(&[0.1, 2.0, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
        let mut s = Sampler::new(Sampling::default(), 0).unwrap();
        assert_eq!(s.next(&[0.0, -1.0, 3.0]), 2);
    }

    #[test]
    fn candidates_follow_top_k_then_top_p() {
        // Probabilities at temperature 1: 0.5, 0.25, 0.125, 0.125.
        let logits = [2f32.ln() * 3.0, 2f32.ln() * 2.0, 2f32.ln(), 2f32.ln()];
        let all = candidates(&logits, sampling(1.0, 0, 1.0));
        let p: Vec<f64> = all.iter().map(|c| c.1).collect();
        assert!((p[0] - 0.5).abs() < 1e-6 && (p[3] - 0.125).abs() < 1e-6, "{p:?}");
        // Ties keep id order.
        assert_eq!(all[2].0, 2);
        // top-k 2: renormalised 2/3, 1/3.
        let k = candidates(&logits, sampling(1.0, 2, 1.0));
        assert_eq!(k.len(), 2);
        assert!((k[0].1 - 2.0 / 3.0).abs() < 1e-6);
        // top-p 0.7 keeps 0.5 + 0.25 (the smallest set reaching 0.7).
        let pp = candidates(&logits, sampling(1.0, 0, 0.7));
        assert_eq!(pp.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1]);
        // A high temperature flattens, a low one sharpens.
        assert!(candidates(&logits, sampling(10.0, 0, 1.0))[0].1 < 0.3);
        assert!(candidates(&logits, sampling(0.1, 0, 1.0))[0].1 > 0.99);
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() {
        let logits = [0.0f32, 1.0, 2.0, 0.5];
        let draw = |seed: u64, stream: u64| {
            let mut s = Sampler::new(
                Sampling {
                    seed,
                    ..sampling(1.0, 0, 1.0)
                },
                stream,
            )
            .unwrap();
            (0..4000).map(|_| s.next(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 0), draw(7, 0));
        assert_ne!(draw(7, 0), draw(8, 0));
        assert_ne!(draw(7, 0), draw(7, 1));
        let want = candidates(&logits, sampling(1.0, 0, 1.0));
        let got = draw(7, 0);
        for (id, p) in want {
            let share = got.iter().filter(|&&t| t == id).count() as f64 / got.len() as f64;
            assert!((share - p).abs() < 0.03, "token {id}: {share} drawn, p = {p}");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Sampler::new(sampling(-1.0, 0, 1.0), 0).is_err());
        assert!(Sampler::new(sampling(1.0, 0, 0.0), 0).is_err());
        assert!(Sampler::new(sampling(1.0, 0, 1.5), 0).is_err());
    }
}
