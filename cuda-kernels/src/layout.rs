//! The "mma" layout of a 4-bit AWQ weight: the checkpoint's "gemm" layout repacked once at
//! load time so that each thread of the W4A16 kernels loads, with one 16-byte read, exactly
//! the nibbles of its tensor-core fragments (as Marlin and TurboMind repack). The checkpoint
//! on disk stays "gemm"; [`MmaLayout::dequantize`] is the layout's CPU twin.
//!
//! Output features are cut into strips of 64 (the last padded with zero weights and scales)
//! and input features into steps of 16. For strip `s`, step `t`, lane `l` of a warp
//! (`gid = l / 4`, `tig = l % 4`), word `w` (0..4), nibble pair `p` (0..4) and half `h`:
//!
//! - n8 tile `j = 2w + p % 2` and output feature `n = 64 s + 8 j + gid`;
//! - input feature `k = 16 t + 2 tig + 8 (p / 2) + h` (B fragment register `p / 2`);
//! - the nibble sits at bits `4 (p + 4 h)` of word `((s T + t) 32 + l) 4 + w`.
//!
//! So `word & 0x000F000F` and `word & 0x00F000F0` (and the same of `word >> 8`) each hold
//! one `k, k + 1` pair of a fragment, in place: OR-ed into the mantissa of 1024.0 they make
//! 1024 + q (even tiles) or 1024 + 16 q (odd tiles, whose sums the kernels divide by 16) in
//! one instruction.
//!
//! Zeros: one word per (group, strip, gid), nibble `j` for feature `64 s + 8 j + gid`.
//! Scales: eight f16 per (group, strip, gid), the `j`-th for the same feature.

use checkpoint::awq::ORDER as GEMM_ORDER;

use crate::{KernelError, Result};

/// Output features per strip (one warp's share).
pub const STRIP: usize = 64;
/// Input features per step (one tensor-core k step).
pub const STEP: usize = 16;

/// An AWQ weight in the "mma" layout, on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmaLayout {
    /// `strips × steps × 32 lanes × 4` words.
    pub qweight: Vec<u32>,
    /// `groups × strips × 8` words.
    pub zeros: Vec<u32>,
    /// `groups × strips × 8 × 8` f16 bits.
    pub scales: Vec<u16>,
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
}

/// Where the nibble of (input `k`, output `n`) goes: (word index, bit shift).
fn slot(k: usize, n: usize, steps: usize) -> (usize, usize) {
    let (s, j, gid) = (n / STRIP, n % STRIP / 8, n % 8);
    let (t, kk) = (k / STEP, k % STEP);
    let w = j / 2;
    let h = kk % 2;
    let r = kk / 8;
    let tig = (kk % 8) / 2;
    let lane = gid * 4 + tig;
    let p = j % 2 + 2 * r;
    (((s * steps + t) * 32 + lane) * 4 + w, 4 * (p + 4 * h))
}

impl MmaLayout {
    /// Strips of output features (the last one padded).
    pub fn strips(&self) -> usize {
        self.out_features.div_ceil(STRIP)
    }

    /// Repacks a "gemm" weight: `qweight [k, n/8]`, `qzeros [k/g, n/8]` (words as stored),
    /// `scales [k/g, n]` as f16 bits.
    pub fn from_gemm(
        qweight: &[u32],
        qzeros: &[u32],
        scales: &[u16],
        k: usize,
        n: usize,
        g: usize,
    ) -> Result<Self> {
        if g == 0 || !g.is_multiple_of(STEP) || !k.is_multiple_of(g) || !n.is_multiple_of(8) {
            return Err(KernelError::Shape(format!(
                "AWQ weight [{n}, {k}] with group size {g}: the GPU kernels need the group size a multiple of {STEP}, in_features a multiple of the group size and out_features of 8"
            )));
        }
        let groups = k / g;
        for (what, found, want) in [
            ("qweight", qweight.len(), k * n / 8),
            ("qzeros", qzeros.len(), groups * n / 8),
            ("scales", scales.len(), groups * n),
        ] {
            if found != want {
                return Err(KernelError::Shape(format!(
                    "AWQ {what}: {found} values, [{n}, {k}] group {g} needs {want}"
                )));
            }
        }
        let strips = n.div_ceil(STRIP);
        let steps = k / STEP;
        let mut packed = vec![0u32; strips * steps * 32 * 4];
        for kk in 0..k {
            for (c, &word) in qweight[kk * n / 8..(kk + 1) * n / 8].iter().enumerate() {
                for (i, &col) in GEMM_ORDER.iter().enumerate() {
                    let (at, shift) = slot(kk, 8 * c + col, steps);
                    packed[at] |= ((word >> (4 * i)) & 0xF) << shift;
                }
            }
        }
        let mut zeros = vec![0u32; groups * strips * 8];
        let mut scale_out = vec![0u16; groups * strips * 64];
        for gi in 0..groups {
            for (c, &word) in qzeros[gi * n / 8..(gi + 1) * n / 8].iter().enumerate() {
                for (i, &col) in GEMM_ORDER.iter().enumerate() {
                    let nn = 8 * c + col;
                    let (s, j, gid) = (nn / STRIP, nn % STRIP / 8, nn % 8);
                    zeros[(gi * strips + s) * 8 + gid] |= ((word >> (4 * i)) & 0xF) << (4 * j);
                    scale_out[((gi * strips + s) * 8 + gid) * 8 + j] = scales[gi * n + nn];
                }
            }
        }
        Ok(MmaLayout {
            qweight: packed,
            zeros,
            scales: scale_out,
            in_features: k,
            out_features: n,
            group_size: g,
        })
    }

    /// The weight `Wt [k, n]` (row-major), `(q − z) · s`: the CPU twin of the layout's
    /// decoding (the kernels round each product to f16).
    pub fn dequantize(&self) -> Vec<f32> {
        let (k, n, g) = (self.in_features, self.out_features, self.group_size);
        let (strips, steps) = (self.strips(), k / STEP);
        let mut out = vec![0f32; k * n];
        for kk in 0..k {
            let gi = kk / g;
            for nn in 0..n {
                let (word, shift) = slot(kk, nn, steps);
                let q = (self.qweight[word] >> shift) & 0xF;
                let (s, j, gid) = (nn / STRIP, nn % STRIP / 8, nn % 8);
                let z = (self.zeros[(gi * strips + s) * 8 + gid] >> (4 * j)) & 0xF;
                let scale = half::f16::from_bits(self.scales[((gi * strips + s) * 8 + gid) * 8 + j]);
                out[kk * n + nn] = (q as f32 - z as f32) * scale.to_f32();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random stream (the layout test needs no statistics).
    fn words(count: usize, mut state: u64) -> Vec<u32> {
        (0..count)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 32) as u32
            })
            .collect()
    }

    /// The "gemm" layout read directly: `(q − z) · s`.
    fn gemm_dequantize(
        qweight: &[u32],
        qzeros: &[u32],
        scales: &[u16],
        k: usize,
        n: usize,
        g: usize,
    ) -> Vec<f32> {
        let nibble = |words: &[u32], row: usize, col: usize| {
            let i = GEMM_ORDER.iter().position(|&c| c == col % 8).unwrap();
            ((words[row * (n / 8) + col / 8] >> (4 * i)) & 0xF) as f32
        };
        let mut out = vec![0f32; k * n];
        for kk in 0..k {
            for nn in 0..n {
                let s = half::f16::from_bits(scales[kk / g * n + nn]).to_f32();
                out[kk * n + nn] = (nibble(qweight, kk, nn) - nibble(qzeros, kk / g, nn)) * s;
            }
        }
        out
    }

    #[test]
    fn repacked_weight_decodes_to_the_gemm_weight() {
        for (k, n, g) in [(64, 64, 32), (96, 136, 32), (256, 200, 64), (128, 1024, 128)] {
            let qweight = words(k * n / 8, 1);
            let qzeros = words(k / g * n / 8, 2);
            let scales: Vec<u16> = words(k / g * n, 3)
                .into_iter()
                .map(|w| half::f16::from_f32(0.001 + (w % 1000) as f32 * 1e-5).to_bits())
                .collect();
            let layout = MmaLayout::from_gemm(&qweight, &qzeros, &scales, k, n, g).unwrap();
            assert_eq!(layout.qweight.len(), n.div_ceil(STRIP) * k / STEP * 128);
            let want = gemm_dequantize(&qweight, &qzeros, &scales, k, n, g);
            assert_eq!(layout.dequantize(), want, "k {k} n {n} g {g}");
        }
    }

    #[test]
    fn every_slot_is_used_once() {
        let (k, n) = (32, 128);
        let steps = k / STEP;
        let mut seen = std::collections::HashSet::new();
        for kk in 0..k {
            for nn in 0..n {
                assert!(seen.insert(slot(kk, nn, steps)), "k {kk} n {nn} collides");
            }
        }
        assert_eq!(seen.len(), k * n);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(MmaLayout::from_gemm(&[0; 8], &[0; 1], &[0; 8], 8, 8, 8).is_err());
        assert!(MmaLayout::from_gemm(&[0; 3], &[0; 1], &[0; 8], 32, 8, 32).is_err());
    }
}
