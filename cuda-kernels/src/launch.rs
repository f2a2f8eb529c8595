//! Launch shapes of the fused W4A16 kernels (which kernel a call runs, its grid and how K is
//! split over blocks) and of the attention kernel. Plain arithmetic on the call's sizes and
//! the device's multiprocessor count, so that the host emulation tests
//! (`tests/emulated_w4a16.rs`, `tests/emulated_attention.rs`) launch exactly what a device
//! would.

use crate::layout::{STEP, STRIP};
use crate::{KernelError, Result};

/// How a W4A16 product is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum W4a16Path {
    /// The GEMV kernels up to [`GEMV_MAX_ROWS`] rows, the fused tensor-core kernel below
    /// [`DEQUANT_MIN_ROWS`], dequantize + cuBLAS from there: the fastest of the three at
    /// each size on the Llama-7B shapes in `awq bench kernels` (H200, `docs/gpu.md`).
    Auto,
    /// The fused tensor-core kernel: weights dequantized in registers.
    Fused,
    /// The weight dequantized to f16 in a workspace, then a cuBLAS product (as vLLM does
    /// for large batches).
    Dequant,
    /// The GEMV-style kernel for at most [`GEMV_MAX_ROWS`] rows: weights streamed from
    /// global memory straight into registers, as the tensor cores' A operand.
    Gemv,
}

/// Rows from which [`W4a16Path::Auto`] dequantizes and calls cuBLAS: where that overtook the
/// fused kernel on the Llama-7B shapes in `awq bench kernels` (H200).
pub const DEQUANT_MIN_ROWS: usize = 128;

/// Most rows the GEMV kernels ([`FusedKernel::Gemv`]) take.
pub const GEMV_MAX_ROWS: usize = 16;

/// Warps per block of every W4A16 kernel (MMA_WARPS in w4a16.cu).
pub const WARPS: usize = 4;

/// The fused W4A16 kernels: weights dequantized in registers, no f16 copy of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedKernel {
    /// `w4a16_mma_m{1,2,4}`: 16, 32 or 64 rows per block, any M.
    Mma,
    /// `w4a16_gemv_m{8,16}`: at most [`GEMV_MAX_ROWS`] rows.
    Gemv,
}

/// One launch of a fused W4A16 kernel (`w4a16_mma_*` or `w4a16_gemv_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusedLaunch {
    pub entry: &'static str,
    /// Blocks: strips of 64 outputs × splits of K × chunks of `block_rows` rows.
    pub grid: (u32, u32, u32),
    /// Input features per split: a multiple of 64 (16 per warp).
    pub k_split: usize,
    pub block_rows: usize,
    /// Dynamic shared memory per block.
    pub shared_bytes: usize,
}

impl FusedLaunch {
    /// Strips of 64 output features.
    pub fn strips(&self) -> usize {
        self.grid.0 as usize
    }

    /// Blocks that each K split has: one per strip and row chunk (the split-K counters).
    pub fn tiles(&self) -> usize {
        self.grid.0 as usize * self.grid.2 as usize
    }

    /// Splits of K.
    pub fn splits(&self) -> usize {
        self.grid.1 as usize
    }
}

/// Dynamic shared memory of `w4a16_mma_m{mt}`: four warps' pipelines (`Stage<MT>` and the
/// stage counts in w4a16.cu).
fn mma_shared_bytes(mt: usize) -> usize {
    let stages = match mt {
        1 => 8,
        2 => 6,
        _ => 4,
    };
    let stage = 512 + mt * 16 * 24 * 2 + 512 + 128;
    WARPS * stages * stage
}

/// The launch of `y[m, n] = x[m, k] · Wt` with `kernel` on a device with `multiprocessors`;
/// `f32_out` picks the kernel that writes f32 (else f16).
pub fn fused_launch(
    kernel: FusedKernel,
    m: usize,
    k: usize,
    n: usize,
    f32_out: bool,
    multiprocessors: usize,
) -> Result<FusedLaunch> {
    // Rows per block, blocks per multiprocessor (as shared memory or registers allow), the
    // kernel and its dynamic shared memory.
    let (block_rows, per_sm, entry, shared_bytes) = match kernel {
        FusedKernel::Gemv => {
            if m > GEMV_MAX_ROWS {
                return Err(KernelError::Shape(format!(
                    "w4a16: the GEMV kernels take at most {GEMV_MAX_ROWS} rows, not {m}"
                )));
            }
            let entry = match (m <= 8, f32_out) {
                (true, true) => "w4a16_gemv_m8_f32",
                (false, true) => "w4a16_gemv_m16_f32",
                (true, false) => "w4a16_gemv_m8_f16",
                (false, false) => "w4a16_gemv_m16_f16",
            };
            (if m <= 8 { 8 } else { 16 }, 4, entry, 0)
        }
        FusedKernel::Mma => {
            let mt = match m {
                0..=16 => 1,
                17..=32 => 2,
                _ => 4,
            };
            let entry = match (mt, f32_out) {
                (1, true) => "w4a16_mma_m1_f32",
                (2, true) => "w4a16_mma_m2_f32",
                (_, true) => "w4a16_mma_m4_f32",
                (1, false) => "w4a16_mma_m1_f16",
                (2, false) => "w4a16_mma_m2_f16",
                (_, false) => "w4a16_mma_m4_f16",
            };
            (16 * mt, 3, entry, mma_shared_bytes(mt))
        }
    };
    let strips = n.div_ceil(STRIP);
    let chunks = m.div_ceil(block_rows).max(1);
    let tiles = strips * chunks;
    // Split K over blocks while they still fit in one wave; each split is a multiple of
    // 64 (16 per warp).
    let wanted = (per_sm * multiprocessors / tiles).clamp(1, (k / STEP).div_ceil(WARPS).max(1));
    let k_split = k.div_ceil(wanted).next_multiple_of(WARPS * STEP);
    let splits = k.div_ceil(k_split).max(1);
    let dim =
        |v: usize| u32::try_from(v).map_err(|_| KernelError::Shape(format!("w4a16: grid {v} too large")));
    Ok(FusedLaunch {
        entry,
        grid: (dim(strips)?, dim(splits)?, dim(chunks)?),
        k_split,
        block_rows,
        shared_bytes,
    })
}

/// Blocks of `w4a16_dequant` for a `[n, k]` weight: a warp per four k steps of a strip,
/// [`WARPS`] warps a block.
pub fn dequant_blocks(k: usize, n: usize) -> Result<u32> {
    let warps = n.div_ceil(STRIP) * (k / STEP).div_ceil(4);
    u32::try_from(warps.div_ceil(WARPS))
        .map_err(|_| KernelError::Shape(format!("w4a16: dequantization grid for [{n}, {k}] too large")))
}

/// Query rows per block of the attention kernel (`BQ` in attention.cu).
pub const ATTENTION_QUERIES: usize = 32;
/// Threads per block of the attention kernel (`ATT_THREADS`).
pub const ATTENTION_THREADS: u32 = 128;

/// The launch of the attention kernel for `rows` queries of `heads` heads of `head_dim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionLaunch {
    /// (query blocks, heads, 1).
    pub grid: (u32, u32, u32),
    /// Key rows per shared-memory tile.
    pub key_tile: usize,
    /// Dynamic shared memory, laid out as the kernel expects.
    pub shared_bytes: usize,
}

/// [`AttentionLaunch`] of a call; the key tile shrinks for wide heads to fit shared memory.
pub fn attention_launch(rows: usize, heads: usize, head_dim: usize) -> AttentionLaunch {
    let (q, d) = (ATTENTION_QUERIES, head_dim);
    let bk = if d <= 64 { 32 } else { 16 };
    AttentionLaunch {
        grid: ((rows.div_ceil(q) as u32).max(1), heads as u32, 1),
        key_tile: bk,
        shared_bytes: (q * d + bk * (d + 1) + bk * d + q * (bk + 1) + 3 * q) * 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_cover_k_in_multiples_of_64() {
        for (m, k, n) in [(1, 4096, 4096), (16, 11008, 4096), (70, 576, 192), (1, 96, 136)] {
            for kernel in [FusedKernel::Gemv, FusedKernel::Mma] {
                if kernel == FusedKernel::Gemv && m > GEMV_MAX_ROWS {
                    continue;
                }
                let l = fused_launch(kernel, m, k, n, true, 132).unwrap();
                assert_eq!(l.k_split % 64, 0, "{kernel:?} {m} {k} {n}");
                // Every split holds some of K, and together they hold all of it.
                assert!(l.k_split * (l.splits() - 1) < k && l.k_split * l.splits() >= k);
                assert_eq!(l.strips(), n.div_ceil(64));
                assert!(l.grid.2 as usize * l.block_rows >= m);
            }
        }
        let l = fused_launch(FusedKernel::Gemv, 1, 4096, 4096, false, 132).unwrap();
        assert_eq!((l.entry, l.grid), ("w4a16_gemv_m8_f16", (64, 8, 1)));
    }

    #[test]
    fn gemv_refuses_more_than_16_rows() {
        let e = fused_launch(FusedKernel::Gemv, 17, 576, 192, true, 132).unwrap_err();
        assert!(e.to_string().contains("at most 16 rows"), "{e}");
        assert!(fused_launch(FusedKernel::Mma, 17, 576, 192, true, 132).is_ok());
    }
}
