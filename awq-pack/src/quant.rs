//! 4-bit group quantization with a zero point (awq-format.md §4), identical in AutoAWQ, llm-awq and
//! LMDeploy:
//!
//! ```text
//! scale = max(max(w) − min(w), 1e-5) / 15      (stored, and used below, as f16)
//! zero  = clamp(−round(min(w) / scale), 0, 15)
//! q     = clamp(round(w / scale) + zero, 0, 15)
//! w'    = (q − zero) · scale
//! ```
//!
//! with round-half-to-even. Groups run along the input dimension of a `[out, in]` weight.

use cpu_kernels::min_max;
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{PackError, Result};

/// Largest 4-bit code.
pub const MAX_Q: u8 = 15;

/// How many consecutive input weights of a row share a scale and a zero point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "usize", try_from = "usize")]
pub struct GroupSize(usize);

impl TryFrom<usize> for GroupSize {
    type Error = PackError;

    fn try_from(size: usize) -> Result<Self> {
        GroupSize::new(size)
    }
}

impl From<GroupSize> for usize {
    fn from(g: GroupSize) -> usize {
        g.0
    }
}

impl GroupSize {
    /// A group size of at least 1.
    pub fn new(size: usize) -> Result<Self> {
        if size == 0 {
            return Err(PackError::Invalid("the group size must be at least 1".into()));
        }
        Ok(GroupSize(size))
    }

    /// The size.
    pub fn get(self) -> usize {
        self.0
    }
}

/// Round half to even, as `f32::round_ties_even`, without its libm call (`rintf`: x86-64's
/// baseline has no rounding instruction), so that the loops below vectorize. Adding and then
/// subtracting 1.5·2²³ leaves the nearest integer, ties to even, for |x| < 2²²; beyond that the
/// result stays within one of `x`, and every caller clamps such values to 0 or 15 anyway.
#[inline(always)]
fn round_ties_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Scale (rounded to f16, as stored) and zero point of one group.
#[inline]
pub fn group_params(w: &[f32]) -> (f16, u8) {
    let (lo, hi) = min_max(w);
    let scale = f16::from_f32((hi - lo).max(1e-5) / MAX_Q as f32);
    let zero = (-round_ties_even(lo / scale.to_f32())).clamp(0.0, MAX_Q as f32) as u8;
    (scale, zero)
}

/// The 4-bit code of `w` under `scale` and `zero`.
#[inline]
pub fn code(w: f32, scale: f32, zero: u8) -> u8 {
    (round_ties_even(w / scale) + zero as f32).clamp(0.0, MAX_Q as f32) as u8
}

/// Quantizes then dequantizes one group in place.
#[inline]
pub fn fake_quantize_group(w: &mut [f32]) {
    let (scale, zero) = group_params(w);
    let (s, zero) = (scale.to_f32(), zero as f32);
    // `code` in f32 throughout (no round trip through u8), so that the loop vectorises; the
    // code is a whole number in [0, MAX_Q] either way.
    for v in w.iter_mut() {
        *v = ((round_ties_even(*v / s) + zero).clamp(0.0, MAX_Q as f32) - zero) * s;
    }
}

/// `W ← Q(W)` for a row-major `[out, in_features]` weight, in place.
pub fn fake_quantize(w: &mut [f32], in_features: usize, group_size: GroupSize) {
    let g = group_size.get();
    w.par_chunks_mut(in_features)
        .for_each(|row| row.chunks_exact_mut(g).for_each(fake_quantize_group));
}

/// A linear layer's weight quantized to 4 bits, in PyTorch orientation.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub group_size: GroupSize,
    /// Codes, `[out, in]`.
    pub q: Vec<u8>,
    /// Zero points, `[out, in / g]`.
    pub zeros: Vec<u8>,
    /// Scales, `[out, in / g]`.
    pub scales: Vec<f16>,
}

impl QuantizedLinear {
    /// Quantizes a row-major `[out_features, in_features]` weight.
    pub fn quantize(w: &[f32], out_features: usize, in_features: usize, group_size: GroupSize) -> Self {
        assert_eq!(
            w.len(),
            out_features * in_features,
            "weight is not [{out_features}, {in_features}]"
        );
        let g = group_size.get();
        let groups = in_features / g;
        let mut q = vec![0u8; w.len()];
        let mut zeros = vec![0u8; out_features * groups];
        let mut scales = vec![f16::ZERO; out_features * groups];
        q.par_chunks_mut(in_features)
            .zip(zeros.par_chunks_mut(groups))
            .zip(scales.par_chunks_mut(groups))
            .zip(w.par_chunks(in_features))
            .for_each(|(((q, zeros), scales), w)| {
                for (j, (q, w)) in q.chunks_exact_mut(g).zip(w.chunks_exact(g)).enumerate() {
                    let (scale, zero) = group_params(w);
                    let s = scale.to_f32();
                    for (q, &w) in q.iter_mut().zip(w) {
                        *q = code(w, s, zero);
                    }
                    zeros[j] = zero;
                    scales[j] = scale;
                }
            });
        QuantizedLinear {
            out_features,
            in_features,
            group_size,
            q,
            zeros,
            scales,
        }
    }

    /// The dequantized `[out, in]` weight.
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.group_size.get();
        let groups = self.in_features / g;
        let mut w = vec![0f32; self.q.len()];
        for (i, (w, &q)) in w.iter_mut().zip(&self.q).enumerate() {
            let (row, col) = (i / self.in_features, i % self.in_features);
            let j = row * groups + col / g;
            *w = (q as f32 - self.zeros[j] as f32) * self.scales[j].to_f32();
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_group() {
        // min -1, max 2: scale = 3/15 = 0.2 (f16 0.19995117), zero = round(5.0012) = 5.
        let w = [-1.0, 0.0, 0.5, 2.0];
        let (scale, zero) = group_params(&w);
        assert_eq!(scale, f16::from_f32(0.2));
        assert_eq!(zero, 5);
        let s = scale.to_f32();
        let codes: Vec<u8> = w.iter().map(|&v| code(v, s, zero)).collect();
        assert_eq!(codes, vec![0, 5, 8, 15]);
        let mut v = w;
        fake_quantize_group(&mut v);
        assert_eq!(v, [-5.0 * s, 0.0, 3.0 * s, 10.0 * s]);
    }

    #[test]
    fn rounds_half_to_even() {
        // scale 1 (range 15), zero 0: 2.5 → 2, 3.5 → 4.
        let w = [0.0, 2.5, 3.5, 15.0];
        let (scale, zero) = group_params(&w);
        assert_eq!((scale.to_f32(), zero), (1.0, 0));
        let codes: Vec<u8> = w.iter().map(|&v| code(v, 1.0, 0)).collect();
        assert_eq!(codes, vec![0, 2, 4, 15]);
    }

    #[test]
    fn rounding_matches_std_below_two_to_the_22() {
        // Every half-integer (the ties) and a dense sweep of other values, both signs.
        let ties = (0..1 << 16).map(|i| i as f32 + 0.5);
        let sweep = (0..1 << 20).map(|i| i as f32 * 3.999_7);
        for x in ties.chain(sweep).filter(|x| x.abs() < 4_194_304.0) {
            for x in [x, -x] {
                assert_eq!(round_ties_even(x), x.round_ties_even(), "{x}");
            }
        }
        // Beyond 2²², still within one of the input (callers clamp these to 0 or 15).
        for x in [4_194_304.5f32, -4.0e6 - 0.5, 1.0e9, -1.0e9, 3.0e38] {
            assert!(
                (round_ties_even(x) - x).abs() <= 1.0 + x.abs() * f32::EPSILON,
                "{x}"
            );
        }
    }

    #[test]
    fn constant_group_uses_minimum_range() {
        let (scale, zero) = group_params(&[0.3; 8]);
        assert_eq!(scale, f16::from_f32(1e-5 / 15.0));
        // -round(0.3 / 6.7e-7) is far below 0: the zero clamps to 0, codes clamp to 15.
        assert_eq!(zero, 0);
    }

    #[test]
    fn quantize_and_fake_quantize_agree() {
        let w: Vec<f32> = (0..4 * 64)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        let g = GroupSize::new(32).unwrap();
        let q = QuantizedLinear::quantize(&w, 4, 64, g);
        let mut fake = w.clone();
        fake_quantize(&mut fake, 64, g);
        assert_eq!(q.dequantize(), fake);
        assert!(q.q.iter().all(|&c| c <= MAX_Q));
    }

    #[test]
    fn group_size_is_positive_in_code_and_in_json() {
        assert!(GroupSize::new(0).is_err());
        assert_eq!(serde_json::to_string(&GroupSize::new(64).unwrap()).unwrap(), "64");
        assert_eq!(serde_json::from_str::<GroupSize>("64").unwrap().get(), 64);
        assert!(serde_json::from_str::<GroupSize>("0").is_err());
    }
}
