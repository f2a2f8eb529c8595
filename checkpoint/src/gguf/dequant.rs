//! ggml tensor types and their dequantization to f32.
//!
//! The arithmetic follows ggml's reference `dequantize_row_*` (and gguf-py's `quants.py`)
//! operation for operation, so that results are bit-identical to theirs: products are
//! rounded to f32 in the same order, and no fused multiply-add is used.

use half::{bf16, f16};
use rayon::prelude::*;

/// A ggml element or block type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
    Q6K,
    /// A type we recognise but do not dequantize, or do not know at all.
    Unsupported(u32),
}

/// Elements per Q4_0/Q4_1/Q8_0 block.
const QK: usize = 32;
/// Elements per k-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// The type for a ggml type id.
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => Self::Unsupported(other),
        }
    }

    /// ggml's name for the type.
    pub fn name(self) -> String {
        match self {
            Self::F32 => "F32".into(),
            Self::F16 => "F16".into(),
            Self::BF16 => "BF16".into(),
            Self::Q4_0 => "Q4_0".into(),
            Self::Q4_1 => "Q4_1".into(),
            Self::Q8_0 => "Q8_0".into(),
            Self::Q6K => "Q6_K".into(),
            Self::Unsupported(id) => {
                let known = match id {
                    6 => "Q5_0",
                    7 => "Q5_1",
                    9 => "Q8_1",
                    10 => "Q2_K",
                    11 => "Q3_K",
                    12 => "Q4_K",
                    13 => "Q5_K",
                    15 => "Q8_K",
                    _ => "unknown",
                };
                format!("{known} (ggml type {id})")
            }
        }
    }

    /// (elements per block, bytes per block).
    fn block(self) -> Result<(usize, usize), String> {
        Ok(match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (QK, 2 + QK / 2),
            Self::Q4_1 => (QK, 4 + QK / 2),
            Self::Q8_0 => (QK, 2 + QK),
            Self::Q6K => (QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2),
            Self::Unsupported(_) => {
                return Err(format!("ggml type {} cannot be dequantized here", self.name()));
            }
        })
    }

    /// Bytes taken by `numel` elements; an error if they do not fill whole blocks.
    pub fn byte_size(self, numel: u64) -> Result<u64, String> {
        let (elems, bytes) = self.block()?;
        if !numel.is_multiple_of(elems as u64) {
            return Err(format!(
                "{numel} elements do not fill whole {} blocks of {elems}",
                self.name()
            ));
        }
        (numel / elems as u64)
            .checked_mul(bytes as u64)
            .ok_or_else(|| "byte size overflows".to_string())
    }
}

/// Dequantizes `numel` elements of type `ty` from `bytes`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], numel: usize) -> Result<Vec<f32>, String> {
    let (elems, block_bytes) = ty.block()?;
    let expected = ty.byte_size(numel as u64)? as usize;
    if bytes.len() != expected {
        return Err(format!(
            "{} bytes for {numel} {} elements, expected {expected}",
            bytes.len(),
            ty.name()
        ));
    }
    let mut out = vec![0f32; numel];
    // Blocks are independent: dequantize runs of them in parallel.
    let per_task = 4096 * elems.max(QK);
    out.par_chunks_mut(per_task)
        .zip(bytes.par_chunks(per_task / elems * block_bytes))
        .for_each(|(out, bytes)| {
            for (y, b) in out.chunks_exact_mut(elems).zip(bytes.chunks_exact(block_bytes)) {
                dequantize_block(ty, b, y);
            }
        });
    Ok(out)
}

fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

fn dequantize_block(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    match ty {
        GgmlType::F32 => y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => y[0] = half(b),
        GgmlType::BF16 => y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => {
            let d = half(&b[0..2]);
            let qs = &b[2..];
            for j in 0..QK / 2 {
                y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                y[j + QK / 2] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let d = half(&b[0..2]);
            let m = half(&b[2..4]);
            let qs = &b[4..];
            for j in 0..QK / 2 {
                y[j] = (qs[j] & 0x0F) as f32 * d + m;
                y[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        GgmlType::Q8_0 => {
            let d = half(&b[0..2]);
            for (y, &q) in y.iter_mut().zip(&b[2..]) {
                *y = (q as i8) as f32 * d;
            }
        }
        GgmlType::Q6K => {
            let (ql, rest) = b.split_at(QK_K / 2);
            let (qh, rest) = rest.split_at(QK_K / 4);
            let (scales, d) = rest.split_at(QK_K / 16);
            let d = half(d);
            for half_block in 0..2 {
                let ql = &ql[64 * half_block..];
                let qh = &qh[32 * half_block..];
                let sc = &scales[8 * half_block..];
                let y = &mut y[128 * half_block..];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    let s = |k: usize| d * (sc[k] as i8) as f32;
                    y[l] = s(is) * q1 as f32;
                    y[l + 32] = s(is + 2) * q2 as f32;
                    y[l + 64] = s(is + 4) * q3 as f32;
                    y[l + 96] = s(is + 6) * q4 as f32;
                }
            }
        }
        GgmlType::Unsupported(_) => unreachable!("block() refused the type"),
    }
}

#[cfg(test)]
mod tests {
    //! Each expected value below is worked out by hand from the block layout, not by the
    //! code under test.
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q8_0_block() {
        let mut b = f16_bytes(0.5).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(y[0], -8.0);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[31], 7.5);
    }

    #[test]
    fn q4_0_block() {
        // Low nibbles hold elements 0..16, high nibbles 16..32; values are q - 8.
        let mut b = f16_bytes(2.0).to_vec();
        b.extend((0..16).map(|j| (j as u8) | (((15 - j) as u8) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], -16.0); // (0 - 8) * 2
        assert_eq!(y[15], 14.0); // (15 - 8) * 2
        assert_eq!(y[16], 14.0); // high nibble of byte 0 = 15
        assert_eq!(y[31], -16.0); // high nibble of byte 15 = 0
    }

    #[test]
    fn q4_1_block() {
        let mut b = f16_bytes(0.25).to_vec();
        b.extend(f16_bytes(-1.0));
        b.extend((0..16).map(|j| (j as u8) | (3u8 << 4)));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[0], -1.0); // 0 * 0.25 - 1
        assert_eq!(y[8], 1.0); // 8 * 0.25 - 1
        assert_eq!(y[15], 2.75); // 15 * 0.25 - 1
        assert_eq!(y[20], -0.25); // 3 * 0.25 - 1
    }

    #[test]
    fn q6_k_block() {
        // ql, qh and scales chosen so that a handful of elements have known values.
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        let mut scales = [1i8; 16];
        ql[0] = 0x21; // element 0 low nibble 1, element 64 high nibble 2
        qh[0] = 0b1110_0111; // element 0: +3<<4; element 32: +1<<4; element 64: +2<<4; element 96: +3<<4
        ql[32] = 0x5A; // element 32 low nibble 10, element 96 high nibble 5
        scales[0] = -3; // elements 0..16
        scales[2] = 2; // elements 32..48
        scales[4] = 5; // elements 64..80
        scales[6] = -1; // elements 96..112
        ql[64 + 5] = 0x0F; // second half: element 128+5 low nibble 15
        qh[32 + 5] = 0x02; // element 128+5: +2<<4
        scales[8] = 4; // elements 128..144
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.map(|s| s as u8));
        b.extend(f16_bytes(0.5));
        assert_eq!(b.len(), 210);
        let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        assert_eq!(y[0], 0.5 * -3.0 * ((1 + 48) - 32) as f32);
        assert_eq!(y[32], 0.5 * 2.0 * ((10 + 16) - 32) as f32);
        assert_eq!(y[64], 0.5 * 5.0 * ((2 + 32) - 32) as f32);
        assert_eq!(y[96], -0.5 * ((5 + 48) - 32) as f32);
        assert_eq!(y[1], 0.5 * -3.0 * -32.0);
        assert_eq!(y[133], 0.5 * 4.0 * ((15 + 32) - 32) as f32);
    }

    #[test]
    fn plain_types() {
        let f: Vec<u8> = [1.5f32, -2.25].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &f, 2).unwrap(), vec![1.5, -2.25]);
        let h: Vec<u8> = [f16_bytes(0.125), f16_bytes(-3.0)].concat();
        assert_eq!(dequantize(GgmlType::F16, &h, 2).unwrap(), vec![0.125, -3.0]);
        let bf: Vec<u8> = [
            bf16::from_f32(6.5).to_le_bytes(),
            bf16::from_f32(-0.5).to_le_bytes(),
        ]
        .concat();
        assert_eq!(dequantize(GgmlType::BF16, &bf, 2).unwrap(), vec![6.5, -0.5]);
    }

    #[test]
    fn wrong_sizes_and_types_are_errors() {
        assert!(
            dequantize(GgmlType::Q8_0, &[0; 33], 32)
                .unwrap_err()
                .contains("expected 34")
        );
        assert!(
            dequantize(GgmlType::Q4_0, &[0; 18], 31)
                .unwrap_err()
                .contains("whole")
        );
        let err = dequantize(GgmlType::from_id(12), &[0; 144], 256).unwrap_err();
        assert!(err.contains("Q4_K"), "{err}");
    }

    #[test]
    fn many_blocks_in_parallel_keep_their_order() {
        let n_blocks = 10_000;
        let mut b = Vec::new();
        for i in 0..n_blocks {
            b.extend(f16_bytes(1.0));
            b.extend(std::iter::repeat_n((i % 100) as u8, 32));
        }
        let y = dequantize(GgmlType::Q8_0, &b, n_blocks * 32).unwrap();
        for i in [0, 4095, 4096, 9999] {
            assert_eq!(y[i * 32 + 7], (i % 100) as f32);
        }
    }
}
