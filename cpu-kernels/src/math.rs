//! `exp` over slices, vectorised. libm's `expf` is a scalar call (≈ 3 ns); softmax, SiLU and
//! the vocabulary log-sum-exp need tens of millions per window. The same polynomial is
//! compiled for AVX-512F, for AVX2+FMA and for plain x86-64, and picked at run time.
//!
//! Method: `exp(x) = 2ⁿ · exp(r)` with `n = round(x·log₂e)` and `r = x − n·ln 2` (Cody–Waite
//! split of ln 2), `|r| ≤ ln 2 / 2`; `exp(r)` by its degree-7 Taylor polynomial (truncation
//! error below 2⁻²⁶ relative); `2ⁿ` built in the exponent bits. Inputs are clamped to
//! [−87.3, 88.37] (so that 2ⁿ stays a normal number), so results stay finite and normal; NaN stays NaN.

use std::sync::OnceLock;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const MIN_X: f32 = -87.3;
const MAX_X: f32 = 88.37;
/// 1.5·2²³: adding and subtracting it rounds to the nearest integer (ties to even) using
/// plain additions, which vectorise on every x86-64 level.
const ROUND_MAGIC: f32 = 12_582_912.0;

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[inline(always)]
fn exp_one<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(MIN_X, MAX_X);
    // `shifted` holds n in its low mantissa bits; `n` is the same integer as a float.
    let shifted = x * LOG2E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, x));
    let mut p = 1.0 / 5040.0;
    p = madd::<FMA>(p, r, 1.0 / 720.0);
    p = madd::<FMA>(p, r, 1.0 / 120.0);
    p = madd::<FMA>(p, r, 1.0 / 24.0);
    p = madd::<FMA>(p, r, 1.0 / 6.0);
    p = madd::<FMA>(p, r, 0.5);
    p = madd::<FMA>(p, r, 1.0);
    p = madd::<FMA>(p, r, 1.0);
    // 2ⁿ from the integer bits, without a float-to-int conversion (which does not vectorise).
    let n_bits = shifted.to_bits().wrapping_sub(ROUND_MAGIC.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `exp(v · scale − shift)` over a whole lane group, in vector registers (the product and
/// the difference each rounded, as two passes would).
#[inline(always)]
fn exp_group<const FMA: bool>(group: &mut [f32; F32_LANES], scale: f32, shift: f32) {
    for v in group {
        *v = exp_one::<FMA>(*v * scale - shift);
    }
}

/// `x ← exp(x · scale − shift)`, returning `Σ x` in [`sum`]'s order when `SUM`. The tail (under one
/// lane group) goes through a padded group too: as scalar code each of its exponentials cost
/// as much as a whole group's, and attention's causal rows mostly end in one.
#[inline(always)]
fn exp_shifted_slice<const FMA: bool, const SUM: bool>(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    let mut acc = [0f32; F32_LANES];
    let mut chunks = x.chunks_exact_mut(F32_LANES);
    for chunk in &mut chunks {
        let group: &mut [f32; F32_LANES] = chunk.try_into().expect("a whole lane group");
        exp_group::<FMA>(group, scale, shift);
        if SUM {
            for l in 0..F32_LANES {
                acc[l] += group[l];
            }
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut group = [0f32; F32_LANES];
        group[..tail.len()].copy_from_slice(tail);
        exp_group::<FMA>(&mut group, scale, shift);
        tail.copy_from_slice(&group[..tail.len()]);
        if SUM {
            for &v in tail.iter() {
                acc[0] += v;
            }
        }
    }
    acc.into_iter().sum()
}

#[inline(always)]
fn exp_slice<const FMA: bool>(x: &mut [f32]) {
    exp_shifted_slice::<FMA, false>(x, 1.0, 0.0);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn exp_avx512(x: &mut [f32]) {
    exp_slice::<true>(x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_avx2(x: &mut [f32]) {
    exp_slice::<true>(x);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn exp_sum_avx512(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    exp_shifted_slice::<true, true>(x, scale, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_sum_avx2(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    exp_shifted_slice::<true, true>(x, scale, shift)
}

#[derive(Clone, Copy)]
enum Level {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                return Level::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::Portable
    })
}

/// `x ← exp(x)` element-wise.
pub fn exp_in_place(x: &mut [f32]) {
    match level() {
        // SAFETY: the features these functions were compiled for were detected at run time.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { exp_avx512(x) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { exp_avx2(x) },
        Level::Portable => exp_slice::<false>(x),
    }
}

/// `x ← exp(x · scale − shift)` element-wise, returning `Σ x` afterwards: one pass where
/// scaling, subtracting, [`exp_in_place`] and [`sum`] make four, with the same result bit
/// for bit.
pub fn exp_scaled_and_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    match level() {
        // SAFETY: the features these functions were compiled for were detected at run time.
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { exp_sum_avx512(x, scale, shift) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { exp_sum_avx2(x, scale, shift) },
        Level::Portable => exp_shifted_slice::<false, true>(x, scale, shift),
    }
}

/// `y = silu(g) · u = g / (1 + exp(−g)) · u`, element-wise. Compiled for AVX-512 and AVX2
/// too, so that its passes vectorise (no fused multiply-add: every version rounds alike).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2"))]
pub fn silu_mul_into(y: &mut [f32], g: &[f32], u: &[f32]) {
    for (y, &g) in y.iter_mut().zip(g) {
        *y = -g;
    }
    exp_in_place(y);
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        *y = g / (1.0 + *y) * u;
    }
}

/// `y = gelu_tanh(g) · u`, element-wise, with GELU's tanh approximation
/// `0.5 · g · (1 + tanh(√(2/π) · (g + 0.044715 · g³)))` evaluated in f32 as PyTorch's
/// `gelu(approximate="tanh")` does (Gemma's `gelu_pytorch_tanh`).
pub fn gelu_tanh_mul_into(y: &mut [f32], g: &[f32], u: &[f32]) {
    // As PyTorch: the constant in f64, rounded once.
    const BETA: f32 = (std::f64::consts::SQRT_2 * std::f64::consts::FRAC_2_SQRT_PI * 0.5) as f32;
    const KAPPA: f32 = 0.044715;
    for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
        let inner = BETA * (g + KAPPA * (g * g * g));
        *y = 0.5 * g * (1.0 + inner.tanh()) * u;
    }
}

/// Partial sums kept by the reductions below. `iter().sum()` over floats is one chain of
/// dependent additions (the compiler may not reorder them), bound by the adder's latency; 16
/// or 32 independent partial sums fill the vector units instead. Element `i` always goes to
/// partial `i mod LANES` and the partials are added in one fixed order, so a result does not
/// depend on the machine or the thread count.
const F32_LANES: usize = 32;
/// As [`F32_LANES`], for f64 partial sums.
const F64_LANES: usize = 16;

/// Σ `term(aᵢ, bᵢ)` over equal-length slices in `L` partial sums of `T`; the tail (under one
/// lane group) goes to partial 0 in order.
#[inline(always)]
fn lane_sum<T, const L: usize>(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> T) -> T
where
    T: Copy + Default + std::ops::AddAssign + std::iter::Sum,
{
    assert_eq!(a.len(), b.len(), "reduction over slices of different lengths");
    let mut acc = [T::default(); L];
    let (a_chunks, b_chunks) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail = a_chunks.remainder().iter().zip(b_chunks.remainder());
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..L {
            acc[l] += term(x[l], y[l]);
        }
    }
    for (x, y) in tail {
        acc[0] += term(*x, *y);
    }
    acc.into_iter().sum()
}

/// [`lane_sum`] in f64 partial sums ([`F64_LANES`]).
#[inline(always)]
fn sum_f64_by(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f64) -> f64 {
    lane_sum::<f64, F64_LANES>(a, b, term)
}

/// [`lane_sum`] in f32 partial sums ([`F32_LANES`]).
#[inline(always)]
fn sum_f32_by(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    lane_sum::<f32, F32_LANES>(a, b, term)
}

/// Σ x in f32 (vectorised; see [`F32_LANES`] for the order).
#[multiversion::multiversion(targets("x86_64+avx512f", "x86_64+avx2"))]
pub fn sum(x: &[f32]) -> f32 {
    sum_f32_by(x, x, |v, _| v)
}

/// Σ aᵢ·bᵢ in f32 (vectorised; see [`F32_LANES`] for the order).
#[multiversion::multiversion(targets("x86_64+avx512f+fma", "x86_64+avx2+fma"))]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_f32_by(a, b, |a, b| a * b)
}

/// Σ x, each value widened to f64 (vectorised; see [`F64_LANES`] for the order).
#[multiversion::multiversion(targets("x86_64+avx512f", "x86_64+avx2"))]
pub fn sum_f64(x: &[f32]) -> f64 {
    sum_f64_by(x, x, |v, _| v as f64)
}

/// Σ x² in f64 (vectorised; see [`F64_LANES`] for the order).
#[multiversion::multiversion(targets("x86_64+avx512f+fma", "x86_64+avx2+fma"))]
pub fn sum_of_squares_f64(x: &[f32]) -> f64 {
    sum_f64_by(x, x, |v, _| (v as f64) * (v as f64))
}

/// Σ aᵢ·bᵢ in f64 (vectorised; see [`F64_LANES`] for the order).
#[multiversion::multiversion(targets("x86_64+avx512f+fma", "x86_64+avx2+fma"))]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    sum_f64_by(a, b, |a, b| (a as f64) * (b as f64))
}

/// Σ (aᵢ − bᵢ)², the difference taken in f32 and squared and summed in f64 (vectorised; see
/// [`F64_LANES`] for the order).
#[multiversion::multiversion(targets("x86_64+avx512f+fma", "x86_64+avx2+fma"))]
pub fn squared_distance_f64(a: &[f32], b: &[f32]) -> f64 {
    sum_f64_by(a, b, |a, b| {
        let d = (a - b) as f64;
        d * d
    })
}

/// `(smallest, largest)` value of `x`: `(∞, −∞)` for an empty slice; NaNs are passed over
/// as `f32::min` and `f32::max` do (vectorised; the result does not depend on the order).
#[multiversion::multiversion(targets("x86_64+avx512f", "x86_64+avx2"))]
pub fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([f32::INFINITY; F32_LANES], [f32::NEG_INFINITY; F32_LANES]);
    let chunks = x.chunks_exact(F32_LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..F32_LANES {
            lo[l] = lo[l].min(c[l]);
            hi[l] = hi[l].max(c[l]);
        }
    }
    for v in tail {
        lo[0] = lo[0].min(*v);
        hi[0] = hi[0].max(*v);
    }
    // Halving the lanes rather than a serial fold: the reduction stays in vector registers,
    // which matters for the 64-value groups of quantization (a fold cost more than the loop).
    let mut width = F32_LANES / 2;
    while width > 0 {
        for l in 0..width {
            lo[l] = lo[l].min(lo[l + width]);
            hi[l] = hi[l].max(hi[l + width]);
        }
        width /= 2;
    }
    (lo[0], hi[0])
}

/// The largest value of `x`: −∞ for an empty slice; a NaN is passed over as `f32::max` does
/// (vectorised: [`F32_LANES`] running maxima).
#[multiversion::multiversion(targets("x86_64+avx512f", "x86_64+avx2"))]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; F32_LANES];
    let chunks = x.chunks_exact(F32_LANES);
    let tail = chunks.remainder();
    // The tail as one more group padded with −∞ (the maximum does not depend on the order).
    let mut last = [f32::NEG_INFINITY; F32_LANES];
    last[..tail.len()].copy_from_slice(tail);
    for c in chunks.chain([&last[..]]) {
        for l in 0..F32_LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    halve(&mut acc, f32::max)
}

/// Folds `acc` into `acc[0]` by halving: lane `l` takes lane `l + width` for widths `L/2, L/4,
/// …, 1`. The folds of one width are independent, so they stay in vector registers, where a
/// serial fold is a chain of `L` dependent operations (as long as a 300-value softmax row's
/// vector work).
#[inline(always)]
fn halve<T: Copy, const L: usize>(acc: &mut [T; L], op: impl Fn(T, T) -> T) -> T {
    let mut width = L / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] = op(acc[l], acc[l + width]);
        }
        width /= 2;
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_exp_within_two_ulp() {
        let xs: Vec<f32> = (-8700..=8830)
            .map(|i| i as f32 / 100.0)
            .chain([0.0, -0.0, 1e-8, -1e-8])
            .collect();
        let mut got = xs.clone();
        exp_in_place(&mut got);
        let mut portable = xs.clone();
        exp_slice::<false>(&mut portable);
        for ((&x, &a), &b) in xs.iter().zip(&got).zip(&portable) {
            let want = (x as f64).exp();
            for v in [a, b] {
                let rel = ((v as f64 - want) / want).abs();
                assert!(rel < 2.5e-7, "exp({x}) = {v}, want {want} (rel {rel:.2e})");
            }
        }
    }

    #[test]
    fn extremes_stay_finite_and_nan_stays_nan() {
        let mut x = [-1e30, 1e30, f32::NEG_INFINITY, f32::NAN];
        exp_in_place(&mut x);
        assert!(x[0] >= 0.0 && x[0] < 1e-37);
        assert!(x[1].is_finite() && x[1] > 1e38);
        assert!(x[2] >= 0.0 && x[2] < 1e-37);
        assert!(x[3].is_nan());
    }

    /// Lengths around the lane groups (empty, a tail alone, whole groups, groups and a tail).
    fn lengths() -> [usize; 8] {
        [0, 1, 15, 16, 32, 33, 100, 4099]
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A cheap deterministic mix of signs and magnitudes (no RNG dependency needed here).
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                (h >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// `got` against the f64 sum of `terms`, within `rel` of the sum of their magnitudes.
    fn close(name: &str, got: f64, terms: impl Iterator<Item = f64>, rel: f64) {
        let (want, magnitude) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
        assert!(
            (got - want).abs() <= rel * magnitude + 1e-30,
            "{name}: {got} vs {want} (magnitude {magnitude})"
        );
    }

    #[test]
    fn reductions_match_their_f64_definitions() {
        for n in lengths() {
            let (a, b) = (values(n, 1), values(n, 7));
            let pairs = || a.iter().zip(&b).map(|(x, y)| (*x as f64, *y as f64));
            // f64 partial sums of exact f64 terms: a few units of 2⁻⁵³ per addition level;
            // f32 partial sums: up to n·2⁻²⁴ in the worst case.
            let (rel64, rel32) = (1e-13, (n as f64 + 1.0) * 6e-8);
            close("sum_f64", sum_f64(&a), pairs().map(|(x, _)| x), rel64);
            close("dot_f64", dot_f64(&a, &b), pairs().map(|(x, y)| x * y), rel64);
            close(
                "sum_of_squares_f64",
                sum_of_squares_f64(&a),
                pairs().map(|(x, _)| x * x),
                rel64,
            );
            let dist = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2));
            close("squared_distance_f64", squared_distance_f64(&a, &b), dist, rel64);
            close("sum", sum(&a) as f64, pairs().map(|(x, _)| x), rel32);
            close("dot", dot(&a, &b) as f64, pairs().map(|(x, y)| x * y), rel32);
            let want_max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a).to_bits(), want_max.to_bits(), "max n={n}");
            let want_min = a.iter().copied().fold(f32::INFINITY, f32::min);
            assert_eq!(min_max(&a), (want_min, want_max), "min_max n={n}");
        }
        for n in lengths() {
            let (x, scale) = (values(n, 5), 0.125);
            let shift = max(&x) * scale;
            let mut fused = x.clone();
            let total = exp_scaled_and_sum(&mut fused, scale, shift);
            let mut apart: Vec<f32> = x.iter().map(|v| v * scale).collect();
            assert_eq!(
                max(&apart).to_bits(),
                shift.to_bits(),
                "scaling keeps the maximum"
            );
            apart.iter_mut().for_each(|v| *v -= shift);
            exp_in_place(&mut apart);
            assert_eq!(total.to_bits(), sum(&apart).to_bits(), "exp_scaled_and_sum n={n}");
            assert!(fused.iter().zip(&apart).all(|(a, b)| a.to_bits() == b.to_bits()));
            // Every element as the scalar code computes it, tails included.
            let one: Vec<f32> = x.iter().map(|&v| exp_one::<false>(v * scale - shift)).collect();
            let mut portable = x.clone();
            let portable_total = exp_shifted_slice::<false, true>(&mut portable, scale, shift);
            assert_eq!(portable, one, "portable exp n={n}");
            assert_eq!(portable_total.to_bits(), sum(&portable).to_bits());
        }
        let mut with_nan = values(70, 3);
        with_nan[40] = f32::NAN;
        with_nan[5] = 9.0;
        assert_eq!(max(&with_nan), 9.0);
        assert_eq!(max(&[f32::NEG_INFINITY]), f32::NEG_INFINITY);
    }
}
