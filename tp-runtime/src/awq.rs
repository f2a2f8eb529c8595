//! The AWQ "gemm" weight layout (awq-format.md §5), shared by the packer and every backend.
//!
//! A linear layer `W [out, in]` quantized with group size `g` is stored transposed:
//! - `qweight` i32 `[in, out/8]`: word `(k, c)` holds `q[k, 8c..8c+8]`, nibble `i`
//!   (bits `4i..4i+3`) holding output column `8c + ORDER[i]`;
//! - `qzeros` i32 `[in/g, out/8]`, packed the same way;
//! - `scales` f16 `[in/g, out]`;
//!
//! and `Wt[k, n] = (q[k, n] − z[k/g, n]) · s[k/g, n]`.

use crate::checkpoint::{F32Data, HostData};
use crate::{Error, Result};

/// Values per packed 32-bit word.
pub const PACK: usize = 8;
/// Output column (within its word) held by each nibble.
pub const ORDER: [usize; PACK] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Nibble holding each output column within its word (the inverse of [`ORDER`]).
pub const NIBBLE_OF: [usize; PACK] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The 4-bit value of output column `n` (within its word) in a packed word.
#[inline]
pub fn nibble(word: i32, column_in_word: usize) -> u8 {
    ((word as u32 >> (4 * NIBBLE_OF[column_in_word])) & 0xF) as u8
}

/// Packs eight 4-bit values (output columns `8c..8c+8`) into one word.
#[inline]
pub fn pack_word(values: &[u8; PACK]) -> i32 {
    let mut word = 0u32;
    for (i, &column) in ORDER.iter().enumerate() {
        word |= (values[column] as u32 & 0xF) << (4 * i);
    }
    word as i32
}

/// A 4-bit AWQ weight in the "gemm" layout, as read from a checkpoint.
#[derive(Clone, Debug)]
pub struct AwqGemm {
    /// `[in_features, out_features / 8]`.
    pub qweight: HostData<i32>,
    /// `[in_features / group_size, out_features / 8]`.
    pub qzeros: HostData<i32>,
    /// `[in_features / group_size, out_features]`.
    pub scales: F32Data,
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
}

impl AwqGemm {
    /// Checks that the three tensors have the sizes the shape implies.
    pub fn validate(&self) -> Result<()> {
        let (k, n, g) = (self.in_features, self.out_features, self.group_size);
        if g == 0 || k % g != 0 || n % PACK != 0 {
            return Err(Error::Invalid(format!(
                "AWQ weight [{n}, {k}] with group size {g}: need in % group == 0 and out % 8 == 0"
            )));
        }
        let expect = [
            ("qweight", self.qweight.len(), k * n / PACK),
            ("qzeros", self.qzeros.len(), k / g * n / PACK),
            ("scales", self.scales.len(), k / g * n),
        ];
        for (name, found, want) in expect {
            if found != want {
                return Err(Error::Invalid(format!(
                    "AWQ {name} holds {found} values, expected {want}"
                )));
            }
        }
        Ok(())
    }

    /// Zero points unpacked to one byte each, `[in/g, out]`.
    pub fn unpacked_zeros(&self) -> Vec<u8> {
        self.qzeros
            .iter()
            .flat_map(|&w| (0..PACK).map(move |c| nibble(w, c)))
            .collect()
    }

    /// The dense `[out, in]` f32 weight (for tests and tools, never on a hot path).
    pub fn dequantize(&self) -> Vec<f32> {
        let (k_total, n_total, g) = (self.in_features, self.out_features, self.group_size);
        let zeros = self.unpacked_zeros();
        let mut w = vec![0f32; n_total * k_total];
        for k in 0..k_total {
            for n in 0..n_total {
                let q = nibble(self.qweight[k * n_total / PACK + n / PACK], n % PACK);
                let j = (k / g) * n_total + n;
                w[n * k_total + k] = (q as f32 - zeros[j] as f32) * self.scales[j];
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_nibble_are_inverse() {
        let values = [1, 2, 3, 4, 5, 6, 7, 15];
        let word = pack_word(&values);
        // Nibble i holds column ORDER[i]: nibbles 0..8 = columns 0,2,4,6,1,3,5,7.
        assert_eq!(word as u32, 0xF642_7531);
        for (c, &v) in values.iter().enumerate() {
            assert_eq!(nibble(word, c), v);
        }
    }
}
