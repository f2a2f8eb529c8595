//! Packing quantized linears into the AWQ "gemm" layout (`docs/awq-format.md` §5; the
//! layout itself is `checkpoint::awq`).

use checkpoint::AwqShape;
use checkpoint::awq::{PACK, pack_word};
use half::f16;

use crate::Result;
use crate::quant::QuantizedLinear;

/// The three tensors of a linear layer in the "gemm" layout.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedGemm {
    pub shape: AwqShape,
    /// `[in, out / 8]`.
    pub qweight: Vec<i32>,
    /// `[in / g, out / 8]`.
    pub qzeros: Vec<i32>,
    /// `[in / g, out]`.
    pub scales: Vec<f16>,
}

/// Transposes a `[rows, cols]` matrix of 4-bit values into `[cols, rows / 8]` packed words.
fn pack_transposed(values: &[u8], rows: usize, cols: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(cols * rows / PACK);
    let mut word = [0u8; PACK];
    for c in 0..cols {
        for r0 in (0..rows).step_by(PACK) {
            for (i, w) in word.iter_mut().enumerate() {
                *w = values[(r0 + i) * cols + c];
            }
            out.push(pack_word(&word));
        }
    }
    out
}

/// Packs a quantized `[out, in]` linear; `out` must be a multiple of 8.
pub fn pack_gemm(q: &QuantizedLinear) -> Result<PackedGemm> {
    let (n, k, g) = (q.out_features, q.in_features, q.group_size.get());
    let shape = AwqShape {
        in_features: k,
        out_features: n,
        group_size: g,
    };
    shape.check("packing")?;
    let groups = k / g;
    let mut scales = vec![f16::ZERO; groups * n];
    for row in 0..n {
        for j in 0..groups {
            scales[j * n + row] = q.scales[row * groups + j];
        }
    }
    Ok(PackedGemm {
        shape,
        qweight: pack_transposed(&q.q, n, k),
        qzeros: pack_transposed(&q.zeros, n, groups),
        scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GroupSize;

    #[test]
    fn hand_computed_8x8_pins_the_nibble_order() {
        // W is [out 8, in 8], one group of 8 per row. Row n holds codes q[n][k] = (n + k) % 16
        // with zero point n and scale 1 (set directly, not by quantizing).
        let q: Vec<u8> = (0..8)
            .flat_map(|n| (0..8).map(move |k| ((n + k) % 16) as u8))
            .collect();
        let linear = QuantizedLinear {
            out_features: 8,
            in_features: 8,
            group_size: GroupSize::new(8).unwrap(),
            q,
            zeros: (0..8).collect(),
            scales: vec![f16::ONE; 8],
        };
        let packed = pack_gemm(&linear).unwrap();
        // qweight[k] packs outputs in the order 0, 2, 4, 6, 1, 3, 5, 7, nibble 0 lowest:
        // for input k, output n holds (n + k) % 16.
        // k = 0: nibbles 0,2,4,6,1,3,5,7 → 0x7531_6420.
        assert_eq!(packed.qweight[0] as u32, 0x7531_6420);
        // k = 1: values 1..=8 for outputs 0..=7 → nibbles 1,3,5,7,2,4,6,8.
        assert_eq!(packed.qweight[1] as u32, 0x8642_7531);
        // k = 7: outputs 0..=7 hold 7..=14 → nibbles 7,9,11,13,8,10,12,14.
        assert_eq!(packed.qweight[7] as u32, 0xECA8_DB97);
        // Zero points 0..=7 for outputs 0..=7, packed the same way.
        assert_eq!(packed.qzeros, vec![0x7531_6420u32 as i32]);
        assert_eq!(packed.shape.qweight_shape(), [8, 1]);
        assert_eq!(packed.shape.scales_shape(), [1, 8]);
    }
}
