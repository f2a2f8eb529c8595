//! The AWQ "gemm" schema (`docs/awq-format.md` §5), the one definition every reader, writer
//! and kernel of the workspace uses.
//!
//! A linear layer `W [out, in]` quantized with group size `g` is stored transposed:
//! - `qweight` i32 `[in, out/8]`: word `(k, c)` holds `q[k, 8c..8c+8]`, nibble `i`
//!   (bits `4i..4i+3`) holding output column `8c + ORDER[i]`;
//! - `qzeros` i32 `[in/g, out/8]`, packed the same way;
//! - `scales` f16 `[in/g, out]`;
//!
//! and `Wt[k, n] = (q[k, n] − z[k/g, n]) · s[k/g, n]`.

use half::f16;
use safetensors::Dtype;

use crate::mapped::HostData;
use crate::{Error, Result};

/// Values per packed 32-bit word.
pub const PACK: usize = 8;
/// Output column (within its word) held by each nibble.
pub const ORDER: [usize; PACK] = [0, 2, 4, 6, 1, 3, 5, 7];
/// Nibble holding each output column within its word (the inverse of [`ORDER`]).
pub const NIBBLE_OF: [usize; PACK] = [0, 4, 1, 5, 2, 6, 3, 7];
/// The suffixes of a quantized linear's tensors, in the order [`AwqShape::tensors`] lists them.
pub const SUFFIXES: [&str; 3] = ["qweight", "qzeros", "scales"];

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

/// The shape of one quantized linear: what its three tensors must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AwqShape {
    pub in_features: usize,
    pub out_features: usize,
    pub group_size: usize,
}

impl AwqShape {
    /// Checks that the format can hold a `[out_features, in_features]` weight with this group
    /// size: whole groups along the input, whole words along the output.
    pub fn check(&self, what: &str) -> Result<()> {
        let (k, n, g) = (self.in_features, self.out_features, self.group_size);
        if g == 0 || !k.is_multiple_of(g) {
            return Err(Error::Invalid(format!(
                "{what}: group size {g} does not divide its {k} input features"
            )));
        }
        if !n.is_multiple_of(PACK) {
            return Err(Error::Invalid(format!(
                "{what}: {n} output features are not a multiple of 8 (AWQ packs eight per word)"
            )));
        }
        Ok(())
    }

    /// Groups along the input dimension.
    pub fn groups(&self) -> usize {
        self.in_features / self.group_size
    }

    /// `qweight`: `[in_features, out_features / 8]`.
    pub fn qweight_shape(&self) -> [usize; 2] {
        [self.in_features, self.out_features / PACK]
    }

    /// `qzeros`: `[in_features / group_size, out_features / 8]`.
    pub fn qzeros_shape(&self) -> [usize; 2] {
        [self.groups(), self.out_features / PACK]
    }

    /// `scales`: `[in_features / group_size, out_features]`.
    pub fn scales_shape(&self) -> [usize; 2] {
        [self.groups(), self.out_features]
    }

    /// Name, element type and shape of the three tensors of the linear whose tensors start
    /// with `prefix`.
    pub fn tensors(&self, prefix: &str) -> [(String, Dtype, [usize; 2]); 3] {
        [
            (
                format!("{prefix}.{}", SUFFIXES[0]),
                Dtype::I32,
                self.qweight_shape(),
            ),
            (
                format!("{prefix}.{}", SUFFIXES[1]),
                Dtype::I32,
                self.qzeros_shape(),
            ),
            (
                format!("{prefix}.{}", SUFFIXES[2]),
                Dtype::F16,
                self.scales_shape(),
            ),
        ]
    }

    /// Bytes of the three tensors.
    pub fn bytes(&self) -> usize {
        let [k, w] = self.qweight_shape();
        let [gz, wz] = self.qzeros_shape();
        let [gs, n] = self.scales_shape();
        4 * (k * w + gz * wz) + 2 * gs * n
    }
}

/// A 4-bit AWQ weight in the "gemm" layout, in host memory or mapped from a file.
#[derive(Clone, Debug)]
pub struct AwqGemm {
    pub shape: AwqShape,
    /// `[in_features, out_features / 8]`.
    pub qweight: HostData<i32>,
    /// `[in_features / group_size, out_features / 8]`.
    pub qzeros: HostData<i32>,
    /// `[in_features / group_size, out_features]`.
    pub scales: HostData<f16>,
}

impl AwqGemm {
    /// Wraps the three tensors, checking their sizes against `shape`.
    pub fn new(
        shape: AwqShape,
        qweight: HostData<i32>,
        qzeros: HostData<i32>,
        scales: HostData<f16>,
    ) -> Result<Self> {
        shape.check("AWQ weight")?;
        let product = |s: [usize; 2]| s[0] * s[1];
        for (name, found, want) in [
            ("qweight", qweight.len(), product(shape.qweight_shape())),
            ("qzeros", qzeros.len(), product(shape.qzeros_shape())),
            ("scales", scales.len(), product(shape.scales_shape())),
        ] {
            if found != want {
                return Err(Error::Invalid(format!(
                    "AWQ {name} holds {found} values, expected {want} for [{}, {}] with group size {}",
                    shape.out_features, shape.in_features, shape.group_size
                )));
            }
        }
        Ok(AwqGemm {
            shape,
            qweight,
            qzeros,
            scales,
        })
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
        let AwqShape {
            in_features: k_total,
            out_features: n_total,
            group_size: g,
        } = self.shape;
        let zeros = self.unpacked_zeros();
        let mut w = vec![0f32; n_total * k_total];
        for k in 0..k_total {
            for n in 0..n_total {
                let q = nibble(self.qweight[k * n_total / PACK + n / PACK], n % PACK);
                let j = (k / g) * n_total + n;
                w[n * k_total + k] = (q as f32 - zeros[j] as f32) * self.scales[j].to_f32();
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
        for (i, &c) in ORDER.iter().enumerate() {
            assert_eq!(NIBBLE_OF[c], i);
        }
    }

    #[test]
    fn shapes_and_checks() {
        let s = AwqShape {
            in_features: 256,
            out_features: 48,
            group_size: 64,
        };
        assert_eq!(s.qweight_shape(), [256, 6]);
        assert_eq!(s.qzeros_shape(), [4, 6]);
        assert_eq!(s.scales_shape(), [4, 48]);
        assert_eq!(s.bytes(), 4 * (256 * 6 + 4 * 6) + 2 * 4 * 48);
        let names: Vec<String> = s.tensors("p").iter().map(|t| t.0.clone()).collect();
        assert_eq!(names, ["p.qweight", "p.qzeros", "p.scales"]);
        assert!(s.check("x").is_ok());
        let bad_group = AwqShape { group_size: 96, ..s };
        let err = bad_group.check("x").unwrap_err().to_string();
        assert!(
            err.contains("group size 96 does not divide its 256 input features"),
            "{err}"
        );
        let bad_out = AwqShape {
            out_features: 44,
            ..s
        };
        assert!(
            bad_out
                .check("x")
                .unwrap_err()
                .to_string()
                .contains("multiple of 8")
        );
        let err = AwqGemm::new(
            s,
            vec![0; 5].into(),
            vec![0; 24].into(),
            vec![f16::ZERO; 192].into(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("qweight holds 5 values"), "{err}");
    }
}
