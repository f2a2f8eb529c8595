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

#[inline(always)]
fn exp_slice<const FMA: bool>(x: &mut [f32]) {
    for v in x {
        *v = exp_one::<FMA>(*v);
    }
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
}
