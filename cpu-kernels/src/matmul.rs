//! Dense f32 products through the `gemm` crate.

use gemm::{Parallelism, gemm};

use crate::parallel::top_level;

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_THRESHOLD: usize = 1 << 18;

fn parallelism(m: usize, k: usize, n: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * k * n >= PARALLEL_THRESHOLD && top_level() {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Checks the extents of `out[m, n] = x[m, k] · w` (`w` of `w_len` values, `None` when a
/// product does not hold its weight whole) and does the product's work when it is empty;
/// `true` when nothing is left to compute.
pub(crate) fn empty_product(
    x: &[f32],
    w_len: Option<usize>,
    out: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
) -> bool {
    assert_eq!(x.len(), m * k, "lhs is not [{m}, {k}]");
    if let Some(len) = w_len {
        assert_eq!(len, n * k, "weight is not [{n}, {k}]");
    }
    assert_eq!(out.len(), m * n, "output is not [{m}, {n}]");
    if k == 0 {
        out.fill(0.0);
    }
    m == 0 || n == 0 || k == 0
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`, where `w` is a PyTorch-layout weight (`[out, in]`).
///
/// Runs on the rayon pool when called from outside it (or from a `Backend::run` body) and the
/// product is large enough; inside a rayon task it stays on that task's thread.
pub fn matmul_transposed(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    if empty_product(x, Some(w.len()), out, m, k, n) {
        return;
    }
    // SAFETY: the three slices have exactly the extents the strides below describe:
    // out is m×n row-major, x is m×k row-major, and rhs(r, c) = w[c·k + r] is k×n.
    unsafe {
        gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, k, n),
        );
    }
}

/// `scale · xᵀ x` for a row-major `[rows, cols]` matrix: the `[cols, cols]` Gram matrix.
pub fn gram(x: &[f32], rows: usize, cols: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0f32; cols * cols];
    gram_into(x, rows, cols, scale, &mut out, false);
    out
}

/// [`gram`] written into `out` (`[cols, cols]`), or added to it when `accumulate`: the Gram
/// matrix of a matrix too large to hold in f32 at once, summed block of rows by block.
pub fn gram_into(x: &[f32], rows: usize, cols: usize, scale: f32, out: &mut [f32], accumulate: bool) {
    gram_rows_scaled(x, rows, cols, 0..cols, scale, out, accumulate);
}

/// Rows `result_rows` of `xᵀ x` (`[result_rows.len(), cols]`) written into `out`, or added to
/// it when `accumulate`: part of a Gram matrix, for one that is built block by block.
pub fn gram_rows_into(
    x: &[f32],
    rows: usize,
    cols: usize,
    result_rows: std::ops::Range<usize>,
    out: &mut [f32],
    accumulate: bool,
) {
    gram_rows_scaled(x, rows, cols, result_rows, 1.0, out, accumulate);
}

/// Checks the lengths of a partial Gram product (input `x_len` values for `[rows, cols]`,
/// output `out_len` for `result_rows` rows) and returns the number of result rows.
pub(crate) fn check_gram_rows(
    x_len: usize,
    rows: usize,
    cols: usize,
    result_rows: &std::ops::Range<usize>,
    out_len: usize,
) -> usize {
    assert_eq!(x_len, rows * cols, "input is not [{rows}, {cols}]");
    assert!(
        result_rows.end <= cols,
        "result rows {result_rows:?} beyond {cols}"
    );
    let m = result_rows.len();
    assert_eq!(out_len, m * cols, "output is not [{m}, {cols}]");
    m
}

/// `scale ·` rows `result_rows` of `xᵀ x`: [`gram_into`] and [`gram_rows_into`].
fn gram_rows_scaled(
    x: &[f32],
    rows: usize,
    cols: usize,
    result_rows: std::ops::Range<usize>,
    scale: f32,
    out: &mut [f32],
    accumulate: bool,
) {
    let m = check_gram_rows(x.len(), rows, cols, &result_rows, out.len());
    if rows == 0 || m == 0 {
        return;
    }
    // SAFETY: lhs(r, t) = x[t·cols + first + r] is columns first.. of x, transposed (m×rows);
    // rhs(t, c) = x[t·cols + c] is x (rows×cols); out is m×cols row-major.
    unsafe {
        gemm(
            m,
            cols,
            rows,
            out.as_mut_ptr(),
            1,
            cols as isize,
            accumulate,
            x.as_ptr().add(result_rows.start),
            cols as isize,
            1,
            x.as_ptr(),
            1,
            cols as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism(m, rows, cols),
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic operands in [−1, 1]: `x[m, k]` and `w[n, k]`.
    pub(crate) fn operands(m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..m * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let w = (0..n * k)
            .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        (x, w)
    }

    #[test]
    fn matches_naive_product() {
        let (m, k, n) = (37, 53, 29);
        let (x, w) = operands(m, k, n);
        let mut out = vec![f32::NAN; m * n];
        matmul_transposed(&x, &w, &mut out, m, k, n);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
                assert!((out[i * n + j] as f64 - want).abs() < 1e-4, "({i},{j})");
            }
        }
    }

    #[test]
    fn gram_is_xt_x() {
        let (rows, cols) = (7, 3);
        let x: Vec<f32> = (0..rows * cols).map(|i| (i % 5) as f32 - 2.0).collect();
        let g = gram(&x, rows, cols, 0.5);
        for a in 0..cols {
            for b in 0..cols {
                let want: f32 = (0..rows).map(|t| x[t * cols + a] * x[t * cols + b]).sum::<f32>() * 0.5;
                assert_eq!(g[a * cols + b], want);
            }
        }
    }

    #[test]
    fn gram_accumulated_over_row_blocks_is_the_whole_gram() {
        let (rows, cols) = (96, 40);
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 37) % 17) as f32 - 8.0).collect();
        let whole = gram(&x, rows, cols, 1.0);
        let mut summed = vec![f32::NAN; cols * cols];
        for (i, block) in x.chunks(32 * cols).enumerate() {
            gram_into(block, block.len() / cols, cols, 1.0, &mut summed, i > 0);
        }
        // Small integers: every partial sum is exact, so the order of the sums cannot matter.
        assert_eq!(summed, whole);
        // Rows 10..25 of it, from two blocks of input rows.
        let mut part = vec![f32::NAN; 15 * cols];
        gram_rows_into(&x[..50 * cols], 50, cols, 10..25, &mut part, false);
        gram_rows_into(&x[50 * cols..], rows - 50, cols, 10..25, &mut part, true);
        assert_eq!(part, whole[10 * cols..25 * cols]);
    }
}
