//! Small products on bf16 pairs with f32 results, by AVX512-BF16's `vdpbf16ps`: attention's
//! `q kᵀ` and `p v` in the bf16 compute path.
//!
//! `gemmkit` (the 16-bit path's GEMM) rounds every output to bf16 — a score of 16 would move
//! by up to 1/16 before the softmax — and packs both operands on every call, which costs more
//! than a 64 × 64 × 64 product. Here the operands are laid out once by the caller as 32-bit
//! words, each a pair of bf16 values consecutive along the contraction (low half first), the
//! order `vdpbf16ps` reads:
//!
//! - the left operand `a[m, kp]` row-major: word `p` of a row holds values `2p, 2p + 1`;
//! - the right operand `b[kp, n]`: row `p` holds, for each output column, its values `2p, 2p + 1`.
//!
//! A micro-kernel keeps a block of 4 rows × 64 columns in sixteen vector registers; columns
//! past `n` are masked off, so `n` need not be a multiple of 16. Where the CPU lacks
//! AVX512-BF16 the products run on a scalar twin (tests compare the two).

use crate::convert::unpair;

/// Rows of a micro-tile.
const ROWS: usize = 4;
/// Columns of a micro-tile: four vectors of 16 f32.
const COLS: usize = 64;

/// Whether this CPU multiplies pairs in hardware (AVX512-BF16).
pub(crate) fn hardware_here() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What multiplies the pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairUnit {
    /// `vdpbf16ps` (needs AVX512-BF16).
    Hardware,
    /// The scalar twin: each product of two bf16 values (exact in f32) added in f32, high
    /// value of a pair first, as `vdpbf16ps` is specified.
    Emulated,
}

impl PairUnit {
    /// The hardware where present, else the twin.
    pub fn here() -> Self {
        if hardware_here() {
            PairUnit::Hardware
        } else {
            PairUnit::Emulated
        }
    }
}

/// `c[i · ldc + j] = Σ_p a[i · lda + p] · b[p · ldb + j]` (pair dot products, f32 sums) for
/// `i < m`, `j < n`, `p < kp`, overwriting `c`.
///
/// # Safety
///
/// `a` must be readable at `i · lda + p`, `b` at `p · ldb + j` and `c` writable at
/// `i · ldc + j` for those ranges, and no other thread may access those elements of `c`
/// meanwhile. [`PairUnit::Hardware`] needs AVX512-BF16.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_pairs(
    unit: PairUnit,
    a: *const u32,
    lda: usize,
    b: *const u32,
    ldb: usize,
    m: usize,
    n: usize,
    kp: usize,
    c: *mut f32,
    ldc: usize,
) {
    match unit {
        // SAFETY: the caller's contract; the unit says the CPU has the instructions.
        #[cfg(target_arch = "x86_64")]
        PairUnit::Hardware => unsafe { avx512::matmul(a, lda, b, ldb, m, n, kp, c, ldc) },
        #[cfg(not(target_arch = "x86_64"))]
        PairUnit::Hardware => unreachable!("vdpbf16ps exists only on x86-64"),
        PairUnit::Emulated => {
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0f32;
                    for p in 0..kp {
                        // SAFETY: in the ranges of the caller's contract.
                        let (x, y) = unsafe { (unpair(*a.add(i * lda + p)), unpair(*b.add(p * ldb + j))) };
                        s += x.1 * y.1;
                        s += x.0 * y.0;
                    }
                    // SAFETY: as above.
                    unsafe { *c.add(i * ldc + j) = s };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{COLS, ROWS};

    /// [`super::matmul_pairs`] on the hardware, in micro-tiles of `ROWS × COLS`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn matmul(
        a: *const u32,
        lda: usize,
        b: *const u32,
        ldb: usize,
        m: usize,
        n: usize,
        kp: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        for i0 in (0..m).step_by(ROWS) {
            for j0 in (0..n).step_by(COLS) {
                let cols = (n - j0).min(COLS);
                // One 16-bit mask per vector of 16 columns.
                let masks: [__mmask16; 4] = std::array::from_fn(|v| {
                    let live = cols.saturating_sub(16 * v).min(16);
                    ((1u32 << live) - 1) as __mmask16
                });
                // SAFETY: rows i0.., columns j0..j0 + cols are inside the caller's ranges;
                // masked lanes are neither read nor written.
                unsafe {
                    let (a, b, c) = (a.add(i0 * lda), b.add(j0), c.add(i0 * ldc + j0));
                    match (m - i0).min(ROWS) {
                        4 => tile::<4>(a, lda, b, ldb, kp, c, ldc, masks),
                        3 => tile::<3>(a, lda, b, ldb, kp, c, ldc, masks),
                        2 => tile::<2>(a, lda, b, ldb, kp, c, ldc, masks),
                        _ => tile::<1>(a, lda, b, ldb, kp, c, ldc, masks),
                    }
                }
            }
        }
    }

    /// `R` rows × up to 64 columns (as `masks` says) over all of `kp`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    #[inline]
    unsafe fn tile<const R: usize>(
        a: *const u32,
        lda: usize,
        b: *const u32,
        ldb: usize,
        kp: usize,
        c: *mut f32,
        ldc: usize,
        masks: [__mmask16; 4],
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for p in 0..kp {
            // SAFETY: row p of b, the tile's columns, masked at the edge.
            let row = unsafe { b.add(p * ldb) };
            let bv: [__m512bh; 4] = std::array::from_fn(|v| {
                // SAFETY: as above; masked-off lanes are not read.
                let words = unsafe { _mm512_maskz_loadu_epi32(masks[v], row.add(16 * v) as *const i32) };
                // SAFETY: 32 bf16 in 64 bytes either way.
                unsafe { std::mem::transmute::<__m512i, __m512bh>(words) }
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: word p of row r of a.
                let word = unsafe { *a.add(r * lda + p) } as i32;
                // SAFETY: as above.
                let av = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(word)) };
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_dpbf16_ps(*acc, av, bv[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: row r, the live columns of vector v.
                unsafe { _mm512_mask_storeu_ps(c.add(r * ldc + 16 * v), masks[v], *acc) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::pair;
    use half::bf16;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn pairs_hold_the_rounded_values_low_first() {
        let w = pair(1.0, -2.5);
        assert_eq!(unpair(w), (1.0, -2.5));
        assert_eq!(w & 0xFFFF, bf16::from_f32(1.0).to_bits() as u32);
        // Rounded to nearest even like the rest of the bf16 path.
        let x = f32::from_bits(0x3F80_8000);
        assert_eq!(unpair(pair(x, 0.0)).0, bf16::from_f32(x).to_f32());
    }

    /// Both units against the f64 sum of the same bf16 products, at edge shapes: rows not a
    /// multiple of 4, columns not a multiple of 16 or 64, strides wider than the operands.
    #[test]
    fn units_match_the_f64_sum_of_bf16_products() {
        let units: &[PairUnit] = if hardware_here() {
            &[PairUnit::Hardware, PairUnit::Emulated]
        } else {
            eprintln!("pairs: no AVX512-BF16 here; only the scalar twin runs");
            &[PairUnit::Emulated]
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for (m, n, kp) in [
            (1, 1, 1),
            (4, 64, 32),
            (7, 70, 9),
            (64, 129, 32),
            (3, 16, 300),
            (5, 5, 0),
        ] {
            let (lda, ldb, ldc) = (kp + 3, n + 5, n + 2);
            let words = |len: usize, rng: &mut rand_chacha::ChaCha8Rng| -> Vec<u32> {
                (0..len)
                    .map(|_| pair(rng.random_range(-2.0..2.0), rng.random_range(-2.0..2.0)))
                    .collect()
            };
            let a = words(m * lda, &mut rng);
            let b = words(kp.max(1) * ldb, &mut rng);
            for &unit in units {
                let mut c = vec![f32::NAN; m * ldc];
                // SAFETY: the buffers cover the strides and ranges; the unit is available.
                unsafe {
                    matmul_pairs(
                        unit,
                        a.as_ptr(),
                        lda,
                        b.as_ptr(),
                        ldb,
                        m,
                        n,
                        kp,
                        c.as_mut_ptr(),
                        ldc,
                    )
                };
                for i in 0..m {
                    for j in 0..ldc {
                        let got = c[i * ldc + j];
                        if j >= n {
                            assert!(got.is_nan(), "{unit:?} wrote column {j} past n = {n}");
                            continue;
                        }
                        let (mut want, mut scale) = (0f64, 0f64);
                        for p in 0..kp {
                            let (x, y) = (unpair(a[i * lda + p]), unpair(b[p * ldb + j]));
                            want += x.0 as f64 * y.0 as f64 + x.1 as f64 * y.1 as f64;
                            scale += (x.0 as f64 * y.0 as f64).abs() + (x.1 as f64 * y.1 as f64).abs();
                        }
                        // f32 sums of exact products: a few units of 2⁻²⁴ per addition.
                        let tol = scale * 2f64.powi(-24) * (2 * kp + 1) as f64 + 1e-30;
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "{unit:?} ({m},{n},{kp}) [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
