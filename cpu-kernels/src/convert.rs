//! f32 ↔ bf16: rounding (round to nearest even, as `half` does, written so that it
//! vectorises) and the bf16 pairs in one 32-bit word that `vdpbf16ps` and the AMX tiles read.

use half::bf16;
use rayon::prelude::*;

/// `src` rounded to bf16 into `dst`: round to nearest even, NaN kept quiet — `half`'s
/// `bf16::from_f32` bit for bit, written branch-free so that it vectorises (`half`'s slice
/// conversion is a scalar loop).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2"))]
pub fn narrow(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "narrow: lengths differ");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = round_to_bf16(*s);
    }
}

/// One value of [`narrow`]: inlined into callers' loops so that they vectorise too.
#[inline(always)]
pub(crate) fn round_to_bf16(value: f32) -> bf16 {
    let x = value.to_bits();
    let rounded = x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16;
    let quiet = (x >> 16) | 0x40;
    let bits = if x & 0x7FFF_FFFF > 0x7F80_0000 {
        quiet
    } else {
        rounded
    };
    bf16::from_bits(bits as u16)
}

/// `x` rounded to bf16 (round to nearest even, as `half`'s `bf16::from_f32`), in parallel.
pub fn to_bf16(x: &[f32]) -> Vec<bf16> {
    let mut out = Vec::new();
    to_bf16_into(x, &mut out);
    out
}

/// `x` rounded to bf16 into `out` (resized; its old contents are overwritten).
pub(crate) fn to_bf16_into(x: &[f32], out: &mut Vec<bf16>) {
    out.resize(x.len(), bf16::ZERO);
    to_bf16_slice(x, out);
}

/// `x` rounded to bf16 into `out`, of the same length, in parallel: [`to_bf16`] into a
/// caller's buffer.
pub fn to_bf16_slice(x: &[f32], out: &mut [bf16]) {
    assert_eq!(x.len(), out.len(), "to_bf16_slice: lengths differ");
    out.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(o, x)| narrow(x, o));
}

/// Two bf16 values as one word, `low` in the low half: the "VNNI" pair `vdpbf16ps` and AMX's
/// `tdpbf16ps` read.
#[inline(always)]
pub(crate) fn word(low: bf16, high: bf16) -> u32 {
    low.to_bits() as u32 | (high.to_bits() as u32) << 16
}

/// Two values rounded to bf16 and packed into one [`word`].
#[inline(always)]
pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    word(round_to_bf16(lo), round_to_bf16(hi))
}

/// The two values of a word, widened.
#[inline(always)]
pub(crate) fn unpair(w: u32) -> (f32, f32) {
    (
        bf16::from_bits(w as u16).to_f32(),
        bf16::from_bits((w >> 16) as u16).to_f32(),
    )
}
