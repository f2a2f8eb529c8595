//! Products with bf16 operands and f32 accumulation, by one of two kernels
//! ([`Bf16Kernel`]): the `gemmkit` crate (AVX512-BF16's `vdpbf16ps`), whose outputs are
//! each a single f32 sum over all of `k` rounded once to bf16 and widened back, or our AMX
//! tile kernel (`super::amx`), whose outputs are f32 sums. Activations are rounded to bf16
//! once per product; weights one column panel at a time (at most [`PANEL_BYTES`] of bf16),
//! so that no bf16 copy of a whole large matrix exists.

use std::ops::Range;

use gemmkit::{MatMut, MatRef, Parallelism};
use half::bf16;
use rayon::prelude::*;

use crate::amx::{self, PackedLhs, PackedRhs, RhsColumns, TileBuffer};
use crate::compute::{Bf16Kernel, Compute};
use crate::convert::{narrow, to_bf16_into};
use crate::layout::TileLayout;
use crate::matmul::{check_gram_rows, empty_product, matmul_transposed};

/// The largest weight panel rounded to bf16 at once.
const PANEL_BYTES: usize = 32 << 20;
/// Rows (`KMajor`) or columns (`NMajor`) of a panel filled per rayon task.
const FILL_CHUNK: usize = 64;

thread_local! {
    /// Buffers of the last product on this thread (activations in bf16 — in tile order for
    /// AMX —, the bf16 output, a weight panel), reused so that each product does not zero
    /// fresh pages. Taken out while in use, so a product nested inside another (work
    /// stealing) just allocates its own.
    static SCRATCH: std::cell::Cell<[Vec<bf16>; 3]> = const {
        std::cell::Cell::new([Vec::new(), Vec::new(), Vec::new()])
    };
}

/// Runs `f` with this thread's scratch buffers.
fn with_scratch<R>(f: impl FnOnce(&mut [Vec<bf16>; 3]) -> R) -> R {
    let mut buffers = SCRATCH.take();
    let result = f(&mut buffers);
    SCRATCH.set(buffers);
    result
}

thread_local! {
    /// The AMX kernel's packed left operand of the last product on this thread, reused as
    /// [`SCRATCH`] is.
    static LHS_TILES: std::cell::Cell<TileBuffer> = const { std::cell::Cell::new(TileBuffer::EMPTY) };
    /// The same for the right operand (a weight panel).
    static RHS_TILES: std::cell::Cell<TileBuffer> = const { std::cell::Cell::new(TileBuffer::EMPTY) };
}

/// Runs `f` with `x[m, k]` packed as the AMX kernel's left operand, in this thread's reused
/// storage.
pub(crate) fn with_packed_lhs<R>(x: &[f32], m: usize, k: usize, f: impl FnOnce(&PackedLhs) -> R) -> R {
    let a = PackedLhs::from_f32_into(LHS_TILES.take(), x, m, k);
    let result = f(&a);
    LHS_TILES.set(a.into_buffer());
    result
}

/// Multiplies the packed `a` by `panel` (`Wt[.., n0..]` in `layout`, `k` deep) on the AMX
/// tiles into columns `n0..` of `out` (`n` wide), packing the panel into this thread's
/// reused buffer.
fn amx_panel(
    a: &PackedLhs,
    panel: &[bf16],
    k: usize,
    layout: TileLayout,
    out: &mut [f32],
    n: usize,
    n0: usize,
) {
    let b = PackedRhs::pack_into(RHS_TILES.take(), panel, k, panel.len() / k, layout);
    amx::matmul(a, b.all(), out, n, n0);
    RHS_TILES.set(b.into_buffer());
}

/// `out[m, n] = x[m, k] · b` on the AMX tiles, for a weight kept in tile order (`b`: `n`
/// columns, `k` deep).
pub(crate) fn matmul_packed_amx(x: &[f32], m: usize, k: usize, b: RhsColumns<'_>, out: &mut [f32], n: usize) {
    if empty_product(x, None, out, m, k, n) {
        return;
    }
    with_packed_lhs(x, m, k, |a| amx::matmul(a, b, out, n, 0));
}

/// `out[m, n] = x[m, k] · Wt[k, n]` on the AMX tiles for a weight made on the fly a tile at a
/// time from pairs of its rows (`k` even): `row_pairs(p0, j0, width, tile)` as
/// [`PackedRhs::from_row_pairs_into`] says, `j0` counted in the whole of `Wt`. Column panels
/// of at most [`PANEL_BYTES`] are packed by parallel tasks, then multiplied on every thread.
pub(crate) fn row_pairs_matmul_amx(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    row_pairs: impl Fn(usize, usize, usize, &mut [u32]) + Sync,
) {
    if empty_product(x, None, out, m, k, n) {
        return;
    }
    let panel = panel_columns(k, n);
    with_packed_lhs(x, m, k, |a| {
        for n0 in (0..n).step_by(panel) {
            let w = panel.min(n - n0);
            let b = PackedRhs::from_row_pairs_into(RHS_TILES.take(), k, w, |p0, j0, width, tile| {
                row_pairs(p0, n0 + j0, width, tile)
            });
            amx::matmul(a, b.all(), out, n, n0);
            RHS_TILES.set(b.into_buffer());
        }
    });
}

/// `out[m, n] = silu(x · Gt) * (x · Ut)` on the AMX tiles for two `[k, n]` weights made as
/// [`row_pairs_matmul_amx`]'s is (`gate_pairs`, `up_pairs`; `n` a multiple of 16): each panel
/// packs their columns as alternating 16-column blocks, and the kernel's epilogue combines
/// each block pair ([`amx::matmul_gated`](amx::matmul_gated)).
pub(crate) fn row_pairs_gated_matmul_amx(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    gate_pairs: impl Fn(usize, usize, usize, &mut [u32]) + Sync,
    up_pairs: impl Fn(usize, usize, usize, &mut [u32]) + Sync,
) {
    assert!(
        n.is_multiple_of(BLOCK),
        "gated outputs come in blocks of {BLOCK}, not {n}"
    );
    if empty_product(x, None, out, m, k, n) {
        return;
    }
    // Half a single product's panel of each weight, in whole blocks.
    let panel = (panel_columns(k, n) / 2 / BLOCK * BLOCK).max(BLOCK);
    with_packed_lhs(x, m, k, |a| {
        for n0 in (0..n).step_by(panel) {
            let w = panel.min(n - n0);
            let b = PackedRhs::from_row_pairs_into(RHS_TILES.take(), k, 2 * w, |p0, j0, width, tile| {
                // Block 2i is the gate's columns 16i.., block 2i + 1 the up's.
                let column = n0 + j0 / (2 * BLOCK) * BLOCK;
                match (j0 / BLOCK) % 2 {
                    0 => gate_pairs(p0, column, width, tile),
                    _ => up_pairs(p0, column, width, tile),
                }
            });
            amx::matmul_gated(a, b.all(), out, n, n0);
            RHS_TILES.set(b.into_buffer());
        }
    });
}

/// Columns of one tile block of the AMX kernel.
const BLOCK: usize = 16;

/// Columns of `Wt` per panel: at most [`PANEL_BYTES`] of bf16, whole fill chunks.
fn panel_columns(k: usize, n: usize) -> usize {
    (PANEL_BYTES / 2 / k / FILL_CHUNK * FILL_CHUNK)
        .max(FILL_CHUNK)
        .min(n)
}

/// `y[m, w]` widened into columns `n0..n0 + w` of `out[m, n]`.
fn widen_columns(y: &[bf16], w: usize, out: &mut [f32], n: usize, n0: usize) {
    out.par_chunks_mut(n).zip(y.par_chunks(w)).for_each(|(o, y)| {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(y, &mut o[n0..n0 + w]);
    });
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` for a weight already in bf16: one product by `kernel` on
/// every thread.
pub fn matmul_bf16_weight(
    kernel: Bf16Kernel,
    x: &[f32],
    w: &[bf16],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    if empty_product(x, Some(w.len()), out, m, k, n) {
        return;
    }
    if kernel == Bf16Kernel::Amx {
        return with_packed_lhs(x, m, k, |a| {
            let panel = panel_columns(k, n);
            for n0 in (0..n).step_by(panel) {
                let n1 = (n0 + panel).min(n);
                amx_panel(a, &w[n0 * k..n1 * k], k, TileLayout::NMajor, out, n, n0);
            }
        });
    }
    with_scratch(|[xb, y, _]| {
        to_bf16_into(x, xb);
        y.resize(m * n, bf16::ZERO);
        gemmkit::gemm(
            bf16::ONE,
            MatRef::from_row_major(xb, m, k),
            MatRef::from_col_major(w, k, n),
            bf16::ZERO,
            MatMut::from_row_major(&mut y[..m * n], m, n),
            Parallelism::Rayon(0),
        );
        widen_columns(&y[..m * n], n, out, n, 0);
    })
}

/// `out[m, n] = x[m, k] · Wt[k, n]` with bf16 operands, where `fill(ks, ns, chunk)` writes
/// `Wt[ks, ns]` as bf16 in `layout` (`KMajor`: `chunk[(k − k0) · w + j]`, called with
/// whole panel rows; `NMajor`: `chunk[j · k + k']`, called with every `k`; `w = ns.len()`).
/// Panels are filled by parallel tasks, then multiplied by `kernel` on every thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn panel_matmul_bf16(
    kernel: Bf16Kernel,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    layout: TileLayout,
    fill: impl Fn(Range<usize>, Range<usize>, &mut [bf16]) + Sync,
) {
    if empty_product(x, None, out, m, k, n) {
        return;
    }
    let panel = panel_columns(k, n);
    with_scratch(|[xb, y, tile]| {
        tile.resize(k * panel, bf16::ZERO);
        let tile = &mut tile[..k * panel];
        if kernel == Bf16Kernel::Amx {
            return with_packed_lhs(x, m, k, |a| {
                for_each_panel(k, n, layout, &fill, tile, |n0, panel| {
                    amx_panel(a, panel, k, layout, out, n, n0)
                })
            });
        }
        to_bf16_into(x, xb);
        y.resize(m * panel, bf16::ZERO);
        let (y, lhs) = (&mut y[..m * panel], MatRef::from_row_major(&xb[..], m, k));
        for_each_panel(k, n, layout, &fill, tile, |n0, panel| {
            let w = panel.len() / k;
            let rhs = match layout {
                TileLayout::KMajor => MatRef::from_row_major(panel, k, w),
                TileLayout::NMajor => MatRef::from_col_major(panel, k, w),
            };
            let y = &mut y[..m * w];
            gemmkit::gemm(
                bf16::ONE,
                lhs,
                rhs,
                bf16::ZERO,
                MatMut::from_row_major(y, m, w),
                Parallelism::Rayon(0),
            );
            widen_columns(y, w, out, n, n0);
        })
    })
}

/// The panels of [`panel_matmul_bf16`]: each `Wt[.., n0..n0 + w]` filled into `tile` (at
/// most `tile.len() / k` columns at once) by parallel tasks, then handed to `multiply(n0,
/// panel)`.
fn for_each_panel(
    k: usize,
    n: usize,
    layout: TileLayout,
    fill: &(impl Fn(Range<usize>, Range<usize>, &mut [bf16]) + Sync),
    tile: &mut [bf16],
    mut multiply: impl FnMut(usize, &[bf16]),
) {
    let panel = tile.len() / k;
    for n0 in (0..n).step_by(panel) {
        let n1 = (n0 + panel).min(n);
        let w = n1 - n0;
        let tile = &mut tile[..k * w];
        match layout {
            TileLayout::KMajor => tile
                .par_chunks_mut(FILL_CHUNK * w)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let k0 = c * FILL_CHUNK;
                    fill(k0..k0 + chunk.len() / w, n0..n1, chunk)
                }),
            TileLayout::NMajor => tile
                .par_chunks_mut(FILL_CHUNK * k)
                .enumerate()
                .for_each(|(c, chunk)| {
                    let c0 = n0 + c * FILL_CHUNK;
                    fill(0..k, c0..c0 + chunk.len() / k, chunk)
                }),
        }
        multiply(n0, tile);
    }
}

/// Rows `result_rows` of `xᵀ x` for `x[rows, cols]` in bf16, into `out`
/// (`[result_rows.len(), cols]`): each element summed in f32 over every row of `x` and rounded
/// once to bf16 (`gemmkit` accumulates a contraction this deep in an f32 scratch of the
/// output's size and rounds at the end), read in place — no f32 copy of `x`.
pub fn gram_rows_bf16(x: &[bf16], rows: usize, cols: usize, result_rows: Range<usize>, out: &mut [bf16]) {
    let m = check_gram_rows(x.len(), rows, cols, &result_rows, out.len());
    if m == 0 {
        return;
    }
    if rows == 0 {
        out.fill(bf16::ZERO);
        return;
    }
    // lhs(r, t) = x[t·cols + first + r]: columns first.. of x, transposed.
    let lhs = MatRef::new(&x[result_rows.start..], m, rows, 1, cols as isize);
    gemmkit::gemm(
        bf16::ONE,
        lhs,
        MatRef::from_row_major(x, rows, cols),
        bf16::ZERO,
        MatMut::from_row_major(out, m, cols),
        Parallelism::Rayon(0),
    );
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` with bf16 operands: [`matmul_transposed`]'s 16-bit twin.
///
/// [`matmul_transposed`]: super::matmul_transposed
pub fn matmul_transposed_bf16(
    kernel: Bf16Kernel,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(w.len(), n * k, "weight is not [{n}, {k}]");
    panel_matmul_bf16(kernel, x, m, k, n, out, TileLayout::NMajor, |_, ns, chunk| {
        narrow(&w[ns.start * k..ns.end * k], chunk)
    });
}

/// [`matmul_transposed`](crate::matmul_transposed) computed as `compute` says.
pub fn matmul_transposed_in(
    compute: Compute,
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) {
    match compute.bf16_kernel() {
        None => matmul_transposed(x, w, out, m, k, n),
        Some(kernel) => matmul_transposed_bf16(kernel, x, w, out, m, k, n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::to_bf16;
    use rand::{RngExt, SeedableRng};

    /// The scalar twin: bf16-rounded operands, products summed in f64, the sum rounded to
    /// bf16 — what the kernel computes up to f32 accumulation order.
    fn twin(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| r(x[i * k + p]) * r(w[j * k + p])).sum();
                out[i * n + j] = bf16::from_f64(s).to_f32();
            }
        }
        out
    }

    /// Both kernels: `gemmkit` falls back to plain code where the CPU lacks AVX512-BF16, and
    /// the AMX products run on the tile kernel's scalar twin where the CPU has no tile unit
    /// (`super::amx::matmul` in tests).
    fn kernels_here() -> [Bf16Kernel; 2] {
        if !amx::hardware_here() {
            eprintln!("bf16 tests: no AMX tile unit here; AMX products run on its scalar twin");
        }
        [Bf16Kernel::Vdpbf16ps, Bf16Kernel::Amx]
    }

    #[test]
    fn matches_its_scalar_twin() {
        for kernel in kernels_here() {
            matches_its_scalar_twin_with(kernel);
        }
    }

    fn matches_its_scalar_twin_with(kernel: Bf16Kernel) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for (m, k, n) in [
            (1, 1, 1),
            (3, 70, 9),
            (17, 64, 130),
            (600, 300, 260),
            (513, 33, 600),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0f32)).collect();
            let mut got = vec![f32::NAN; m * n];
            matmul_transposed_bf16(kernel, &x, &w, &mut got, m, k, n);
            let want = twin(&x, &w, m, k, n);
            for (i, (g, t)) in got.iter().zip(&want).enumerate() {
                // The f32 and f64 sums may round to neighbouring bf16 values: one unit in
                // the last place (2⁻⁷ relative) apart at most (AMX does not round to bf16).
                let tol = t.abs() / 128.0 + 1e-5 * (k as f32).sqrt();
                assert!(
                    (g - t).abs() <= tol,
                    "{kernel:?} ({m},{k},{n}) element {i}: {g} vs twin {t}"
                );
            }
        }
    }

    #[test]
    fn narrowing_is_halfs_conversion() {
        let mut values: Vec<f32> = [0.0, -0.0, 1.0, f32::MAX, f32::MIN_POSITIVE, 1e-40, f32::INFINITY]
            .into_iter()
            .chain([f32::NEG_INFINITY, f32::NAN, -f32::NAN])
            .collect();
        // Exact ties (lower half 0x8000) with even and odd upper halves, and their neighbours.
        for upper in [0x3F80u32, 0x3F81, 0x7F7F, 0xBF80] {
            for lower in [0x7FFFu32, 0x8000, 0x8001, 0xFFFF] {
                values.push(f32::from_bits(upper << 16 | lower));
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        values.extend((0..10_000).map(|_| f32::from_bits(rng.random::<u32>())));
        let mut got = vec![bf16::ZERO; values.len()];
        narrow(&values, &mut got);
        for (v, g) in values.iter().zip(&got) {
            assert_eq!(
                g.to_bits(),
                bf16::from_f32(*v).to_bits(),
                "{v:e} ({:#010x})",
                v.to_bits()
            );
        }
    }

    #[test]
    fn a_bf16_weight_multiplies_as_its_panels() {
        let (m, k, n) = (300, 130, 90);
        let (x, w) = crate::matmul::tests::operands(m, k, n);
        let twin = twin(&x, &w, m, k, n);
        for kernel in kernels_here() {
            let mut panels = vec![0f32; m * n];
            matmul_transposed_bf16(kernel, &x, &w, &mut panels, m, k, n);
            let mut whole = vec![1f32; m * n];
            matmul_bf16_weight(kernel, &x, &to_bf16(&w), &mut whole, m, k, n);
            for ((a, b), t) in panels.iter().zip(&whole).zip(&twin) {
                let tol = t.abs() / 128.0 + 1e-4;
                assert!(
                    (a - t).abs() <= tol && (b - t).abs() <= tol,
                    "{kernel:?}: {a} {b} vs twin {t}"
                );
            }
        }
    }

    #[test]
    fn gram_rows_match_the_f32_gram_rounded() {
        // Deep enough (rows) for gemmkit's split-contraction path, and a shallow case.
        for (rows, cols, first, m) in [(20_000, 40, 8, 24), (7, 33, 0, 33)] {
            let (x, _) = crate::matmul::tests::operands(rows, cols, 1);
            let xb = to_bf16(&x);
            let wide: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let mut want = vec![0f32; m * cols];
            crate::matmul::gram_rows_into(&wide, rows, cols, first..first + m, &mut want, false);
            let mut got = vec![bf16::ONE; m * cols];
            gram_rows_bf16(&xb, rows, cols, first..first + m, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // Both sum exact products in f32, in different orders; one bf16 rounding.
                let tol = w.abs() / 128.0 + 1e-4 * rows as f32;
                assert!(
                    (g.to_f32() - w).abs() <= tol,
                    "({rows},{cols}) element {i}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn is_deterministic() {
        let (m, k, n) = (700, 96, 200);
        let (x, w) = crate::matmul::tests::operands(m, k, n);
        for kernel in kernels_here() {
            let mut a = vec![0f32; m * n];
            let mut b = vec![1f32; m * n];
            matmul_transposed_bf16(kernel, &x, &w, &mut a, m, k, n);
            matmul_transposed_bf16(kernel, &x, &w, &mut b, m, k, n);
            assert!(
                a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{kernel:?}"
            );
        }
    }
}
