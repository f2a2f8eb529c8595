//! Products on Intel's AMX tile unit (AMX-BF16: Sapphire Rapids and later): bf16 operands,
//! f32 sums held in tile registers over the whole of `k`, each output one f32 sum.
//!
//! No maintained crate exposes an AMX GEMM we could call (`gemmkit` stops at AVX512-BF16,
//! `gemm` at f32/f16 FMA), so this is a small hand-written one, tested against a scalar twin.
//! Both operands are first copied into tile order, zero padded to whole tiles:
//!
//! - the left operand `a[m, k]` as `[row block][k step][16 rows][32 values]`;
//! - the right operand `b[k, n]` as `[column block][k step][16 k pairs][16 columns][2]`, the
//!   "VNNI" order `tdpbf16ps` reads (each 32-bit word a pair of consecutive `k`).
//!
//! A micro-kernel then keeps a 2 × 2 block of 16 × 16 f32 results in four tile registers and
//! streams a pair of left and a pair of right tiles per step of 32 `k`; tasks cover a chunk of
//! rows (small enough to stay in L2) times a group of column pairs.
//!
//! Linux hands the tile state to a process only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`crate::compute::amx_permitted`] asks once, and a refusal leaves the other paths in charge.

use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use crate::compute::amx_permitted;
use crate::convert::{round_to_bf16, word};
use crate::layout::TileLayout;
use crate::parallel::SharedOut;

/// Rows of a left (and result) tile; `k` pairs of a right tile.
const ROWS: usize = 16;
/// `k` values per step: one 64-byte row of a left tile.
const K_STEP: usize = 32;
/// Result columns per tile (16 f32 = 64 bytes).
const COLS: usize = 16;
/// Words in a row of a right tile: one per result column.
pub(crate) const TILE_ROW_WORDS: usize = COLS;
/// bf16 values in one packed tile (1 KiB).
const TILE: usize = ROWS * K_STEP;
/// Left tiles per task, at most: they stay in L2 while the task's column pairs stream past
/// them, so a right operand larger than the caches (an lm_head) is read once per this many
/// rows, not once per 128 (1.5× faster on a 49,152-wide lm_head slice, m = 512, k = 576).
const LHS_BYTES_PER_TASK: usize = 512 << 10;
/// Tasks per thread, at least, where the rows allow: fewer, larger tasks leave threads idle at
/// the end of a product.
const TASKS_PER_THREAD: usize = 8;
/// Bytes of right tiles a task works through for each row pair: its column pairs, read
/// again for every row pair, stay in L2 (at `k` = 4096 a budget of 2 MiB lost 10 %).
const RHS_BYTES_PER_TASK: usize = 1 << 20;
/// Bytes of right tiles that every row pair passes over before the next ones: they stay in
/// L3 meanwhile, so a right operand larger than the caches is read from memory about once
/// rather than once per row chunk ([2048, 8192] × [8192, 28672] kept in tile order, a 70B
/// MLP weight: 887 GFLOP/s in one sweep over all its 470 MB, 1,895 in sweeps of 32 MiB).
#[cfg(not(test))]
const RHS_BYTES_PER_SWEEP: usize = 32 << 20;
/// Small in unit tests, so that their products take several sweeps.
#[cfg(test)]
const RHS_BYTES_PER_SWEEP: usize = 600 << 10;
/// Column pairs per task at most: each output row is then written in runs of 1 KiB (more
/// measured no faster).
const MAX_COLUMN_PAIRS_PER_TASK: usize = 8;
/// Values of a left operand up to which it is packed on the calling thread alone.
const SERIAL_VALUES: usize = 1 << 16;

/// One 64-byte row of a tile. Packed operands are vectors of these so that every tile row
/// starts a cache line: an unaligned row spans two, and the tile loads, which bound the
/// kernel, then ran 2.7× slower (a step's four loads and four products took 76 ns against
/// 28 ns aligned, on a Sapphire-Rapids-class Xeon).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct TileRow([u32; 16]);

// SAFETY: 64 bytes of u32 with no padding (size = alignment = 64); every bit pattern is valid.
unsafe impl bytemuck::Zeroable for TileRow {}
// SAFETY: as above.
unsafe impl bytemuck::Pod for TileRow {}

/// Storage for a packed operand, kept by callers between products so that each product
/// reuses its pages instead of faulting in fresh ones.
#[derive(Clone, Default)]
pub(crate) struct TileBuffer {
    rows: Vec<TileRow>,
    /// Rows in use: the storage only grows, so that an operand smaller than the last one
    /// and a larger one after it do not zero the storage between them again.
    used: usize,
}

impl std::fmt::Debug for TileBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TileBuffer({} of {} tile rows)", self.used, self.rows.len())
    }
}

impl TileBuffer {
    /// No storage yet.
    pub(crate) const EMPTY: TileBuffer = TileBuffer {
        rows: Vec::new(),
        used: 0,
    };

    /// `values` bf16 values (a multiple of 32) of cache-line-aligned storage in use; what it
    /// held before stays.
    fn resize(&mut self, values: usize) {
        self.used = values.div_ceil(32);
        if self.rows.len() < self.used {
            self.rows.resize(self.used, TileRow([0; 16]));
        }
    }

    /// The storage in use as bf16 values.
    fn values(&self) -> &[bf16] {
        bytemuck::cast_slice(&self.rows[..self.used])
    }

    /// The storage in use as bf16 values, to write.
    fn values_mut(&mut self) -> &mut [bf16] {
        bytemuck::cast_slice_mut(&mut self.rows[..self.used])
    }

    /// The storage in use as 32-bit words, to write.
    fn words_mut(&mut self) -> &mut [u32] {
        bytemuck::cast_slice_mut(&mut self.rows[..self.used])
    }
}

/// A left operand in tile order.
pub(crate) struct PackedLhs {
    data: TileBuffer,
    rows: usize,
    /// Row blocks, rounded up to a pair.
    blocks: usize,
    steps: usize,
}

impl PackedLhs {
    /// `x[m, k]` packed into fresh storage.
    #[cfg(test)]
    fn from_f32(x: &[f32], m: usize, k: usize) -> Self {
        Self::from_f32_into(TileBuffer::default(), x, m, k)
    }

    /// `x[m, k]` (row-major f32) rounded to bf16, into `data` (a previous operand's, from
    /// [`into_buffer`](Self::into_buffer)), so that repeated products reuse its pages.
    pub(crate) fn from_f32_into(data: TileBuffer, x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k, "left operand is not [{m}, {k}]");
        Self::from_rows_into(data, x, m, k, k)
    }

    /// `m` rows of `k` values, row `i` at `x[i · stride..]`, as
    /// [`from_f32_into`](Self::from_f32_into) packs them; in parallel only where there are
    /// more than [`SERIAL_VALUES`] (a small operand is packed by a caller that is itself one
    /// of many parallel tasks).
    pub(crate) fn from_rows_into(mut data: TileBuffer, x: &[f32], m: usize, k: usize, stride: usize) -> Self {
        assert!(
            m == 0 || (k <= stride && x.len() >= (m - 1) * stride + k),
            "left operand is not {m} rows of {k} values {stride} apart"
        );
        let blocks = m.div_ceil(2 * ROWS) * 2;
        let steps = k.div_ceil(K_STEP);
        // Every value is written below (the padding as zeros, only where there is some), so
        // a reused buffer keeps its old values rather than being zeroed first.
        data.resize(blocks * steps * TILE);
        let pack_block = |(block, tiles): (usize, &mut [bf16])| {
            let rows = ROWS.min(m.saturating_sub(block * ROWS));
            if rows < ROWS || !k.is_multiple_of(K_STEP) {
                tiles.fill(bf16::ZERO);
            }
            if rows > 0 {
                pack_rows(&x[block * ROWS * stride..], rows, k, stride, tiles);
            }
        };
        if steps == 0 {
            // Nothing to pack: the product is all zeros.
        } else if m * k > SERIAL_VALUES {
            data.values_mut()
                .par_chunks_mut(steps * TILE)
                .enumerate()
                .for_each(pack_block);
        } else {
            data.values_mut()
                .chunks_mut(steps * TILE)
                .enumerate()
                .for_each(pack_block);
        }
        PackedLhs {
            data,
            rows: m,
            blocks,
            steps,
        }
    }

    /// The storage, for the next [`from_f32_into`](Self::from_f32_into).
    pub(crate) fn into_buffer(self) -> TileBuffer {
        self.data
    }

    /// The packed values.
    fn values(&self) -> &[bf16] {
        self.data.values()
    }
}

/// `rows` rows of `k` values (`stride` apart in `x`) rounded to bf16 into one block of left
/// tiles (`[k step][16 rows][32 values]`); compiled for AVX-512 so that the rounding
/// vectorises.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw", "x86_64+avx2"))]
fn pack_rows(x: &[f32], rows: usize, k: usize, stride: usize, tiles: &mut [bf16]) {
    for r in 0..rows {
        let row = &x[r * stride..][..k];
        for (step, values) in row.chunks(K_STEP).enumerate() {
            let dst = &mut tiles[step * TILE + r * K_STEP..][..values.len()];
            for (d, &v) in dst.iter_mut().zip(values) {
                *d = round_to_bf16(v);
            }
        }
    }
}

/// A right operand `b[k, n]` in VNNI tile order: each 32-bit word a pair of bf16 values
/// (the lower `k` in the low half).
#[derive(Clone, Debug)]
pub(crate) struct PackedRhs {
    data: TileBuffer,
    cols: usize,
    /// Column blocks, rounded up to a pair.
    blocks: usize,
    steps: usize,
}

/// Words in one right tile: 16 `k` pairs × 16 columns.
const TILE_WORDS: usize = TILE / 2;

impl PackedRhs {
    /// `b` packed into fresh storage.
    #[cfg(test)]
    fn pack(b: &[bf16], k: usize, cols: usize, layout: TileLayout) -> Self {
        Self::pack_into(TileBuffer::default(), b, k, cols, layout)
    }

    /// `b` of `k` rows and `cols` columns laid out as `layout` says (`KMajor`:
    /// `b[p · cols + j]`; `NMajor`: `b[j · k + p]`), into `data` (a previous operand's, from
    /// [`into_buffer`](Self::into_buffer)), so that repeated products reuse its pages.
    pub(crate) fn pack_into(data: TileBuffer, b: &[bf16], k: usize, cols: usize, layout: TileLayout) -> Self {
        assert_eq!(b.len(), k * cols, "right operand is not [{k}, {cols}]");
        if layout == TileLayout::NMajor {
            return Self::from_n_major_into(data, k, cols, |range, out| out.copy_from_slice(&b[range]));
        }
        Self::pack_tiles(data, k, cols, |tile, p0, depth, j0, width| {
            // Word (w, c) of a tile holds k values 2w and 2w + 1 of column c; the loop runs
            // along the source's rows.
            for w in 0..depth.div_ceil(2) {
                let low = &b[(p0 + 2 * w) * cols + j0..][..width];
                let dst = &mut tile[w * COLS..][..width];
                if 2 * w + 1 < depth {
                    let high = &b[(p0 + 2 * w + 1) * cols + j0..][..width];
                    for ((d, &l), &h) in dst.iter_mut().zip(low).zip(high) {
                        *d = word(l, h);
                    }
                } else {
                    for (d, &l) in dst.iter_mut().zip(low) {
                        *d = word(l, bf16::ZERO);
                    }
                }
            }
        })
    }

    /// `b` of `k` rows and `cols` columns stored column by column (`b[j · k + p]`) in any
    /// element type, `narrow(range, out)` writing the bf16 values of storage `range` into
    /// `out`: a whole weight packed a tile at a time, without a bf16 copy of it beside.
    pub(crate) fn from_n_major_into(
        data: TileBuffer,
        k: usize,
        cols: usize,
        narrow: impl Fn(Range<usize>, &mut [bf16]) + Sync,
    ) -> Self {
        Self::pack_tiles(data, k, cols, |tile, p0, depth, j0, width| {
            let mut column = [bf16::ZERO; K_STEP];
            for c in 0..width {
                let start = (j0 + c) * k + p0;
                narrow(start..start + depth, &mut column[..depth]);
                for w in 0..depth.div_ceil(2) {
                    let high = if 2 * w + 1 < depth {
                        column[2 * w + 1]
                    } else {
                        bf16::ZERO
                    };
                    tile[w * COLS + c] = word(column[2 * w], high);
                }
            }
        })
    }

    /// `b[k, cols]` (`k` even) made a tile at a time from pairs of its rows:
    /// `row_pairs(p0, j0, width, tile)` writes, for each row pair `w < tile.len() /`
    /// [`TILE_ROW_WORDS`] and column `c < width`, the VNNI word of `b[p0 + 2w, j0 + c]` (low
    /// half) and `b[p0 + 2w + 1, j0 + c]` at `tile[w · TILE_ROW_WORDS + c]` — for weights made
    /// on the fly (int4 unpacked), which then need not be written in row order first and read
    /// back. Into `data`, as [`pack_into`](Self::pack_into).
    pub(crate) fn from_row_pairs_into(
        data: TileBuffer,
        k: usize,
        cols: usize,
        row_pairs: impl Fn(usize, usize, usize, &mut [u32]) + Sync,
    ) -> Self {
        assert!(k.is_multiple_of(2), "rows made in pairs need an even k, not {k}");
        Self::pack_tiles(data, k, cols, |tile, p0, depth, j0, width| {
            row_pairs(p0, j0, width, &mut tile[..depth / 2 * COLS])
        })
    }

    /// The tiles of a `[k, cols]` operand in parallel, column block by column block, each
    /// tile written by `fill(tile, p0, depth, j0, width)` (its `k` values `p0..p0 + depth`
    /// of columns `j0..j0 + width`); only the padding around them is zeroed.
    fn pack_tiles(
        mut data: TileBuffer,
        k: usize,
        cols: usize,
        fill: impl Fn(&mut [u32], usize, usize, usize, usize) + Sync,
    ) -> Self {
        let blocks = cols.div_ceil(2 * COLS) * 2;
        let steps = k.div_ceil(K_STEP);
        data.resize(blocks * steps * TILE);
        data.words_mut()
            .par_chunks_mut(steps * TILE_WORDS)
            .enumerate()
            .for_each(|(block, tiles)| {
                let (j0, width) = (block * COLS, COLS.min(cols.saturating_sub(block * COLS)));
                if width < COLS || !k.is_multiple_of(K_STEP) {
                    tiles.fill(0);
                }
                if width == 0 {
                    return; // the zero block that rounds the blocks up to a pair
                }
                for (step, tile) in tiles.chunks_exact_mut(TILE_WORDS).enumerate() {
                    let p0 = step * K_STEP;
                    fill(tile, p0, K_STEP.min(k - p0), j0, width);
                }
            });
        PackedRhs {
            data,
            cols,
            blocks,
            steps,
        }
    }

    /// The storage, for the next [`pack_into`](Self::pack_into).
    pub(crate) fn into_buffer(self) -> TileBuffer {
        self.data
    }

    /// The packed values, two per word.
    fn values(&self) -> &[bf16] {
        self.data.values()
    }

    /// Its columns.
    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Every column, for [`matmul`].
    pub(crate) fn all(&self) -> RhsColumns<'_> {
        RhsColumns {
            values: self.values(),
            cols: self.cols,
            blocks: self.blocks,
            steps: self.steps,
            block: self.steps * TILE,
        }
    }

    /// Columns `range`, where it starts on a pair of column blocks (a multiple of 32) — the
    /// kernel's unit —, else `None`.
    pub(crate) fn columns(&self, range: Range<usize>) -> Option<RhsColumns<'_>> {
        if !range.start.is_multiple_of(2 * COLS) || range.start > range.end || range.end > self.cols {
            return None;
        }
        let (first, cols) = (range.start / COLS, range.len());
        let blocks = cols.div_ceil(2 * COLS) * 2;
        let block = self.steps * TILE;
        Some(RhsColumns {
            values: &self.values()[first * block..(first + blocks) * block],
            cols,
            blocks,
            steps: self.steps,
            block,
        })
    }

    /// Every column over `k` values `range` only, where it starts on a step (a multiple of
    /// 32), else `None`: the product with a left operand `range.len()` deep. Values of the
    /// last step past `range.end` are read too, so the left operand must be zero there (as
    /// [`PackedLhs`] pads).
    pub(crate) fn rows(&self, range: Range<usize>) -> Option<RhsColumns<'_>> {
        if !range.start.is_multiple_of(K_STEP) || range.start > range.end || range.end > self.steps * K_STEP {
            return None;
        }
        let first = range.start / K_STEP;
        let steps = range.end.div_ceil(K_STEP) - first;
        let block = self.steps * TILE;
        Some(RhsColumns {
            values: &self.values()[first * TILE..(self.blocks - 1) * block + (first + steps) * TILE],
            cols: self.cols,
            blocks: self.blocks,
            steps,
            block,
        })
    }
}

/// Columns of a [`PackedRhs`] from a pair of column blocks on, over all of its `k` or a range
/// of whole steps: what [`matmul`] multiplies.
#[derive(Clone, Copy)]
pub(crate) struct RhsColumns<'a> {
    /// From the first step used of the first block used.
    values: &'a [bf16],
    cols: usize,
    /// Column blocks, rounded up to a pair.
    blocks: usize,
    /// Steps used.
    steps: usize,
    /// Values from one column block to the next.
    block: usize,
}

/// `out[i, col0 + j] = Σ_p a[i, p] b[p, j]` for every row of `a` and column of `b`, into an
/// output `ld` values wide, summed in f32 by the tile unit. Runs on the rayon pool.
///
/// # Panics
/// If `k` differs between the operands or the output is too small; where the tile unit is
/// not [`amx_permitted`] (a caller's bug: the compute path is resolved against it).
pub(crate) fn matmul(a: &PackedLhs, b: RhsColumns<'_>, out: &mut [f32], ld: usize, col0: usize) {
    matmul_on(unit_here(), a, b, out, ld, col0, Epilogue::Store);
}

/// The unit this process multiplies tiles on: the tile unit (asserted [`amx_permitted`]), or
/// in unit tests on a CPU without it its scalar twin, so that the callers' panels and
/// buffers are tested everywhere.
fn unit_here() -> TileUnit {
    #[cfg(test)]
    if !hardware_here() {
        return TileUnit::Emulated;
    }
    assert!(amx_permitted(), "AMX tile data is not permitted in this process");
    TileUnit::Hardware
}

/// `out[i, col0 + 16c + j] = silu(p[i, 32c + j]) · p[i, 32c + 16 + j]` for the product `p =
/// a · b`, whose column blocks alternate gate and up columns (`b.cols` a multiple of 32):
/// SwiGLU's two products and their combination, with only the combination written out.
///
/// # Panics
/// As [`matmul`].
pub(crate) fn matmul_gated(a: &PackedLhs, b: RhsColumns<'_>, out: &mut [f32], ld: usize, col0: usize) {
    assert!(
        b.cols.is_multiple_of(2 * COLS),
        "{} columns are not whole gate/up block pairs",
        b.cols
    );
    matmul_on(unit_here(), a, b, out, ld, col0, Epilogue::SiluGate);
}

/// What a task does with each 32 × 32 block of results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Epilogue {
    /// Writes it to the output.
    Store,
    /// Writes `silu(left 16 columns) · right 16 columns` (a gate and an up block).
    SiluGate,
}

/// Whether this CPU has the tile unit and Linux granted it.
#[cfg(test)]
pub(crate) fn hardware_here() -> bool {
    crate::compute::CpuFeatures::detect().amx_permitted
}

/// What multiplies the tiles: the tile unit, or its scalar twin (which lets every CPU test
/// the packing, the tasks and the edges around the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TileUnit {
    Hardware,
    /// Used by the tests, which run on CPUs without AMX too.
    #[cfg_attr(not(test), allow(dead_code))]
    Emulated,
}

/// [`matmul`] on `unit`.
fn matmul_on(
    unit: TileUnit,
    a: &PackedLhs,
    b: RhsColumns<'_>,
    out: &mut [f32],
    ld: usize,
    col0: usize,
    epilogue: Epilogue,
) {
    assert!(
        out.len() >= a.rows * ld,
        "output holds fewer than {} rows",
        a.rows
    );
    // SAFETY: `out` holds every row written (asserted); `product` checks the columns.
    unsafe { product(unit, a, b, SharedOut(out.as_mut_ptr()), ld, col0, true, epilogue) }
}

/// [`matmul`] on the calling thread alone, into an output other threads write elsewhere: for
/// callers that are themselves tasks of a parallel loop (attention's heads), whose small
/// products would not repay splitting again.
///
/// # Safety
/// `out` is writable at `i · ld + col0 + j` for every row `i` of `a` and column `j` of `b`, and
/// no other thread reads or writes those values meanwhile.
pub(crate) unsafe fn matmul_on_this_thread(
    a: &PackedLhs,
    b: RhsColumns<'_>,
    out: *mut f32,
    ld: usize,
    col0: usize,
) {
    // SAFETY: per the caller; `unit_here` asserts the unit is permitted.
    unsafe {
        product(
            unit_here(),
            a,
            b,
            SharedOut(out),
            ld,
            col0,
            false,
            Epilogue::Store,
        )
    }
}

/// The product of [`matmul_on`], into `out`, in parallel tasks or (`parallel` false) on this
/// thread.
///
/// # Safety
/// As for [`matmul_on_this_thread`]; the hardware unit, if `unit` says so, is permitted.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    unit: TileUnit,
    a: &PackedLhs,
    b: RhsColumns<'_>,
    out: SharedOut,
    ld: usize,
    col0: usize,
    parallel: bool,
    epilogue: Epilogue,
) {
    assert_eq!(a.steps, b.steps, "operands differ in k");
    let out_cols = match epilogue {
        Epilogue::Store => b.cols,
        Epilogue::SiluGate => b.cols / 2,
    };
    assert!(col0 + out_cols <= ld, "columns {col0}+{out_cols} beyond {ld}");
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    if a.steps == 0 {
        for i in 0..a.rows {
            // SAFETY: row i, columns col0..col0 + out_cols are the caller's; silu(0) · 0 = 0.
            unsafe { std::slice::from_raw_parts_mut(out.ptr().add(i * ld + col0), out_cols).fill(0.0) };
        }
        return;
    }
    let row_pairs = a.blocks / 2;
    let column_pairs = b.blocks / 2;
    if !parallel {
        // SAFETY: every row and column of the product is the caller's.
        return unsafe { task_tiles(unit, a, b, 0..row_pairs, 0..column_pairs, out, ld, col0, epilogue) };
    }
    let pairs_per_task =
        (RHS_BYTES_PER_TASK / (2 * block_bytes(a.steps))).clamp(1, MAX_COLUMN_PAIRS_PER_TASK);
    let column_groups = column_pairs.div_ceil(pairs_per_task);
    let groups_per_sweep =
        (RHS_BYTES_PER_SWEEP / (pairs_per_task * 2 * block_bytes(a.steps))).clamp(1, column_groups);
    let mut per_task = (LHS_BYTES_PER_TASK / (2 * block_bytes(a.steps))).max(1);
    while per_task > 1
        && row_pairs.div_ceil(per_task) * groups_per_sweep < TASKS_PER_THREAD * rayon::current_num_threads()
    {
        per_task = per_task.div_ceil(2);
    }
    let row_chunks = row_pairs.div_ceil(per_task);
    let shared = out;
    for first in (0..column_groups).step_by(groups_per_sweep) {
        let groups = first..(first + groups_per_sweep).min(column_groups);
        (0..row_chunks * groups.len()).into_par_iter().for_each(|task| {
            let (chunk, group) = (task / groups.len(), groups.start + task % groups.len());
            let rows = chunk * per_task..((chunk + 1) * per_task).min(row_pairs);
            let columns = group * pairs_per_task..((group + 1) * pairs_per_task).min(column_pairs);
            // SAFETY: this task alone writes the rows of `rows` × the columns of `columns`;
            // the hardware unit is permitted (checked by `matmul`).
            unsafe { task_tiles(unit, a, b, rows, columns, shared, ld, col0, epilogue) };
        });
    }
}

/// Bytes of one block (16 rows or 16 columns) of packed tiles, `steps` deep.
const fn block_bytes(steps: usize) -> usize {
    steps * TILE * 2
}

/// The 64-byte tile configuration (palette 1): eight tiles of 16 rows × 64 bytes —
/// `tmm0..3` results, `tmm4..5` left, `tmm6..7` right.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn new() -> Self {
        let mut bytes = [0u8; 64];
        bytes[0] = 1; // palette
        let mut t = 0;
        while t < 8 {
            // colsb[t] (u16 little-endian at 16 + 2t), rows[t] at 48 + t.
            bytes[16 + 2 * t] = 64;
            bytes[48 + t] = ROWS as u8;
            t += 1;
        }
        TileConfig(bytes)
    }
}

static CONFIG: TileConfig = TileConfig::new();

/// One task: row pairs `rows` × column pairs `columns`.
///
/// # Safety
/// The tile unit is permitted (for `TileUnit::Hardware`); no other task writes these output
/// rows and columns.
#[allow(clippy::too_many_arguments)]
unsafe fn task_tiles(
    unit: TileUnit,
    a: &PackedLhs,
    b: RhsColumns<'_>,
    rows: Range<usize>,
    columns: Range<usize>,
    out: SharedOut,
    ld: usize,
    col0: usize,
    epilogue: Epilogue,
) {
    // The 2 × 2 tiles of an edge or a gated block, as [32 rows][32 columns]; other whole ones
    // go to `out` directly.
    let mut c = [0f32; 4 * ROWS * COLS];
    let mut gated = Gated::new();
    let a_block = a.steps * TILE;
    let b_values = b.values;
    if unit == TileUnit::Hardware {
        // SAFETY: CONFIG is a valid palette-1 configuration; the unit is permitted.
        unsafe { load_config() };
    }
    // Row pairs outside: each output row is then written in one run of consecutive lines
    // (the task's column pairs side by side), which the stores' misses handle far better
    // than 32 rows of 128 bytes each (3-18 % on the products of an evaluation).
    for rp in rows {
        let a0 = &a.values()[2 * rp * a_block..(2 * rp + 2) * a_block];
        let i0 = 2 * rp * ROWS;
        let height = (2 * ROWS).min(a.rows.saturating_sub(i0));
        for cp in columns.clone() {
            let b0 = &b_values[2 * cp * b.block..(2 * cp + 1) * b.block + a_block];
            let j0 = 2 * cp * COLS;
            let width = (2 * COLS).min(b.cols - j0);
            let whole = height == 2 * ROWS && width == 2 * COLS && epilogue == Epilogue::Store;
            match unit {
                // SAFETY: a0 and b0 hold two blocks of `steps` tiles each; rows i0..i0 + 32
                // and columns col0 + j0..+32 lie in this task's part of the output.
                TileUnit::Hardware if whole => unsafe {
                    let dst = out.ptr().add(i0 * ld + col0 + j0);
                    kernel_2x2(a0.as_ptr(), b0.as_ptr(), a.steps, a_block, b.block, dst, ld)
                },
                // SAFETY: as above, into `c` (32 × 32).
                TileUnit::Hardware => unsafe {
                    kernel_2x2(
                        a0.as_ptr(),
                        b0.as_ptr(),
                        a.steps,
                        a_block,
                        b.block,
                        c.as_mut_ptr(),
                        2 * COLS,
                    )
                },
                TileUnit::Emulated => kernel_2x2_emulated(a0, b0, a.steps, b.block, &mut c),
            }
            if whole && unit == TileUnit::Hardware {
                continue;
            }
            if epilogue == Epilogue::SiluGate {
                // SAFETY: rows i0..i0 + height, columns col0 + cp·16..+16 lie in this task's
                // part of the output.
                unsafe { gated.write(&c, height, out.ptr().add(i0 * ld + col0 + cp * COLS), ld) };
                continue;
            }
            for r in 0..height {
                let src = &c[r * 2 * COLS..][..width];
                // SAFETY: row i0 + r < a.rows and columns col0 + j0.. + width ≤ col0 +
                // b.cols ≤ ld lie in this task's part of the output.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        out.ptr().add((i0 + r) * ld + col0 + j0),
                        width,
                    );
                }
            }
        }
    }
    if unit == TileUnit::Hardware {
        // SAFETY: releases the tile state this thread configured.
        unsafe { release() };
    }
}

/// A gated block's halves and result, apart: [`super::silu_mul_into`] then runs on whole
/// contiguous blocks, exactly as on the two products written out.
struct Gated {
    gate: [f32; 2 * ROWS * COLS],
    up: [f32; 2 * ROWS * COLS],
    activated: [f32; 2 * ROWS * COLS],
}

impl Gated {
    fn new() -> Self {
        Gated {
            gate: [0.0; 2 * ROWS * COLS],
            up: [0.0; 2 * ROWS * COLS],
            activated: [0.0; 2 * ROWS * COLS],
        }
    }

    /// `silu(c[r, ..16]) · c[r, 16..]` for the first `rows` rows of the 32 × 32 block `c`,
    /// each written at `out + r · ld` (16 values).
    ///
    /// # Safety
    /// Those values are writable, by this caller alone.
    unsafe fn write(&mut self, c: &[f32; 4 * ROWS * COLS], rows: usize, out: *mut f32, ld: usize) {
        let values = rows * COLS;
        for (r, row) in c.chunks_exact(2 * COLS).take(rows).enumerate() {
            self.gate[r * COLS..][..COLS].copy_from_slice(&row[..COLS]);
            self.up[r * COLS..][..COLS].copy_from_slice(&row[COLS..]);
        }
        crate::math::silu_mul_into(
            &mut self.activated[..values],
            &self.gate[..values],
            &self.up[..values],
        );
        for (r, row) in self.activated[..values].chunks_exact(COLS).enumerate() {
            // SAFETY: per the caller.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * ld), COLS) };
        }
    }
}

/// [`kernel_2x2`]'s scalar twin, on the same packed tiles: each step adds, per result, the
/// sixteen sums of a bf16 pair's two products (exact in f32) in pair order, as `tdpbf16ps`
/// does (which also flushes denormals, a difference below any tolerance here).
fn kernel_2x2_emulated(a: &[bf16], b: &[bf16], steps: usize, b_block: usize, c: &mut [f32; 4 * ROWS * COLS]) {
    let used = steps * TILE;
    c.fill(0.0);
    for t in 0..4 {
        let (a, b) = (&a[(t / 2) * used..][..used], &b[(t % 2) * b_block..][..used]);
        for (ta, tb) in a.chunks_exact(TILE).zip(b.chunks_exact(TILE)) {
            for r in 0..ROWS {
                let row = &mut c[((t / 2) * ROWS + r) * 2 * COLS + (t % 2) * COLS..][..COLS];
                for (col, acc) in row.iter_mut().enumerate() {
                    for w in 0..K_STEP / 2 {
                        let x = &ta[r * K_STEP + 2 * w..][..2];
                        let y = &tb[w * 2 * COLS + 2 * col..][..2];
                        *acc += x[0].to_f32() * y[0].to_f32() + x[1].to_f32() * y[1].to_f32();
                    }
                }
            }
        }
    }
}

/// Loads [`CONFIG`] into this thread's tile unit.
///
/// # Safety
/// The tile unit is permitted.
#[cfg(target_arch = "x86_64")]
unsafe fn load_config() {
    // SAFETY: per the caller; CONFIG is 64 valid bytes.
    unsafe {
        std::arch::asm!("ldtilecfg [{cfg}]", cfg = in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
    }
}

/// Returns the tile unit to its initial state, so that context switches need not save it.
///
/// # Safety
/// The tile unit is permitted.
#[cfg(target_arch = "x86_64")]
unsafe fn release() {
    // SAFETY: per the caller.
    unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
}

/// `c[t] = Σ_steps a_(t/2) · b_(t%2)` for the 2 × 2 tiles of a row pair and a column pair:
/// `a` and `b` each point at two blocks of `steps` tiles (`a_block` and `b_block` values apart),
/// `c` at a 32 × 32 block of f32 results in rows `ld` values apart (tile t at rows
/// 16·(t/2).., columns 16·(t%2)..).
///
/// # Safety
/// The tile unit is permitted and configured by [`load_config`]; `steps ≥ 1`; the pointers
/// cover what is described above.
#[cfg(target_arch = "x86_64")]
unsafe fn kernel_2x2(
    a: *const bf16,
    b: *const bf16,
    steps: usize,
    a_block: usize,
    b_block: usize,
    c: *mut f32,
    ld: usize,
) {
    // SAFETY: per the caller; every load and store is one 1 KiB tile with 64-byte rows.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "2:",
            "tileloadd tmm4, [{a0} + {stride}]",
            "tileloadd tmm5, [{a1} + {stride}]",
            "tileloadd tmm6, [{b0} + {stride}]",
            "tileloadd tmm7, [{b1} + {stride}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {steps}",
            "jnz 2b",
            "tilestored [{c} + {row}], tmm0",
            "add {c}, 64",
            "tilestored [{c} + {row}], tmm1",
            "add {c}, {down}",
            "tilestored [{c} + {row}], tmm2",
            "add {c}, 64",
            "tilestored [{c} + {row}], tmm3",
            a0 = inout(reg) a => _,
            a1 = inout(reg) a.add(a_block) => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b.add(b_block) => _,
            steps = inout(reg) steps => _,
            c = inout(reg) c => _,
            stride = in(reg) 64usize,
            row = in(reg) 4 * ld,
            // From the top right tile to the bottom left: 16 rows down, 16 columns back.
            down = in(reg) 4 * (ROWS * ld - COLS),
            options(nostack),
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn load_config() {}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn release() {}
#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_2x2(_: *const bf16, _: *const bf16, _: usize, _: usize, _: usize, _: *mut f32, _: usize) {
    unreachable!("AMX exists on x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// The packed operands read back, to check the tile orders without the tile unit.
    fn unpack_lhs(a: &PackedLhs, k: usize) -> Vec<bf16> {
        let mut x = vec![bf16::ZERO; a.rows * k];
        for i in 0..a.rows {
            for p in 0..k {
                let (block, r, step, q) = (i / ROWS, i % ROWS, p / K_STEP, p % K_STEP);
                x[i * k + p] = a.values()[(block * a.steps + step) * TILE + r * K_STEP + q];
            }
        }
        x
    }

    fn unpack_rhs(b: &PackedRhs, k: usize) -> Vec<bf16> {
        let mut w = vec![bf16::ZERO; k * b.cols];
        for p in 0..k {
            for j in 0..b.cols {
                let (block, c, step, q) = (j / COLS, j % COLS, p / K_STEP, p % K_STEP);
                w[p * b.cols + j] =
                    b.values()[(block * b.steps + step) * TILE + (q / 2) * 2 * COLS + 2 * c + q % 2];
            }
        }
        w
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0f32)).collect()
    }

    #[test]
    fn packing_keeps_every_value_and_pads_with_zeros() {
        for (m, k, n) in [(1, 1, 1), (17, 33, 15), (40, 64, 48), (5, 100, 70)] {
            let x = random(m * k, 1);
            let a = PackedLhs::from_f32(&x, m, k);
            // A reused buffer holding another operand's values packs the same.
            let mut used = TileBuffer::default();
            used.resize(3 * a.values().len());
            used.values_mut().fill(bf16::from_f32(7.0));
            let dirty = PackedLhs::from_f32_into(used, &x, m, k);
            assert_eq!(dirty.values(), a.values(), "lhs ({m},{k}) into a used buffer");
            let rounded: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            assert_eq!(unpack_lhs(&a, k), rounded, "lhs ({m},{k})");
            assert_eq!(a.blocks % 2, 0);
            assert_eq!(
                a.values().as_ptr() as usize % 64,
                0,
                "tile rows start cache lines"
            );
            let nonzero = |v: &[bf16]| v.iter().filter(|v| v.to_f32() != 0.0).count();
            assert_eq!(nonzero(a.values()), nonzero(&rounded), "padding is zero");

            let w: Vec<bf16> = random(k * n, 2).iter().map(|&v| bf16::from_f32(v)).collect();
            let kmajor = PackedRhs::pack(&w, k, n, TileLayout::KMajor);
            for layout in [TileLayout::KMajor, TileLayout::NMajor] {
                let b = match layout {
                    TileLayout::KMajor => w.clone(),
                    TileLayout::NMajor => (0..n * k).map(|i| w[(i % k) * n + i / k]).collect(),
                };
                let mut used = TileBuffer::default();
                used.resize(3 * kmajor.values().len());
                used.words_mut().fill(u32::MAX);
                let dirty = PackedRhs::pack_into(used, &b, k, n, layout);
                assert_eq!(
                    dirty.values(),
                    kmajor.values(),
                    "rhs {layout:?} ({k},{n}) into a used buffer"
                );
            }
            assert_eq!(unpack_rhs(&kmajor, k), w, "rhs k-major ({k},{n})");
            if k % 2 == 0 {
                let pairs =
                    PackedRhs::from_row_pairs_into(TileBuffer::default(), k, n, |p0, j0, width, tile| {
                        for (r, row) in tile.chunks_exact_mut(TILE_ROW_WORDS).enumerate() {
                            let p = p0 + 2 * r;
                            for (c, word) in row[..width].iter_mut().enumerate() {
                                *word = crate::convert::word(w[p * n + j0 + c], w[(p + 1) * n + j0 + c]);
                            }
                        }
                    });
                assert_eq!(pairs.values(), kmajor.values(), "rhs from row pairs ({k},{n})");
            }
            assert_eq!(nonzero(kmajor.values()), nonzero(&w), "padding is zero");
            let nmajor: Vec<bf16> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
            assert_eq!(
                PackedRhs::pack(&nmajor, k, n, TileLayout::NMajor).values(),
                kmajor.values()
            );
            let narrowed = PackedRhs::from_n_major_into(TileBuffer::default(), k, n, |range, out| {
                out.copy_from_slice(&nmajor[range])
            });
            assert_eq!(
                narrowed.values(),
                kmajor.values(),
                "rhs narrowed a tile at a time ({k},{n})"
            );
        }
    }

    #[test]
    fn a_slice_of_columns_multiplies_as_those_columns_packed_alone() {
        let (m, k, n) = (40, 70, 150);
        let x = random(m * k, 5);
        let w: Vec<bf16> = random(n * k, 6).iter().map(|&v| bf16::from_f32(v)).collect();
        let a = PackedLhs::from_f32(&x, m, k);
        let whole = PackedRhs::pack(&w, k, n, TileLayout::NMajor);
        for columns in [0..n, 32..n, 64..100, 96..97] {
            let width = columns.len();
            let alone = PackedRhs::pack(
                &w[columns.start * k..columns.end * k],
                k,
                width,
                TileLayout::NMajor,
            );
            let (mut got, mut want) = (vec![f32::NAN; m * width], vec![0f32; m * width]);
            matmul(
                &a,
                whole.columns(columns.clone()).expect("a pair boundary"),
                &mut got,
                width,
                0,
            );
            matmul(&a, alone.all(), &mut want, width, 0);
            assert!(
                got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
                "columns {columns:?}"
            );
        }
        assert!(whole.columns(16..n).is_none(), "not on a pair of blocks");
        assert!(whole.columns(0..n + 1).is_none(), "past the last column");
    }

    /// Products on `unit` against the scalar reference (bf16 products summed in f64), with
    /// the output wider than the product and offset by two columns; returns the results and,
    /// for each output value, the sum of its products' magnitudes (0 outside the product).
    fn check_against_reference(unit: TileUnit) -> Vec<(Vec<f32>, Vec<f64>)> {
        let mut results = Vec::new();
        for (m, k, n) in [
            (1, 1, 1),
            (17, 33, 15),
            (64, 64, 64),
            (130, 577, 250),
            (300, 576, 1536),
        ] {
            let x = random(m * k, 3);
            let w = random(n * k, 4);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let a = PackedLhs::from_f32(&x, m, k);
            let b = PackedRhs::pack(&wb, k, n, TileLayout::NMajor);
            let ld = n + 3;
            let mut out = vec![f32::NAN; m * ld];
            let mut magnitudes = vec![0f64; m * ld];
            matmul_on(unit, &a, b.all(), &mut out, ld, 2, Epilogue::Store);
            let r = |v: f32| bf16::from_f32(v).to_f32() as f64;
            let mut worst = 0f64;
            for i in 0..m {
                for j in 0..n {
                    let t: f64 = (0..k).map(|p| r(x[i * k + p]) * r(w[j * k + p])).sum();
                    let g = out[i * ld + 2 + j] as f64;
                    let scale: f64 = (0..k).map(|p| (r(x[i * k + p]) * r(w[j * k + p])).abs()).sum();
                    worst = worst.max((g - t).abs() / scale.max(1e-30));
                    magnitudes[i * ld + 2 + j] = scale;
                }
                assert!(
                    out[i * ld..i * ld + 2].iter().all(|v| v.is_nan()) && out[i * ld + 2 + n].is_nan(),
                    "columns outside col0..col0 + n untouched"
                );
            }
            eprintln!("amx {unit:?} ({m},{k},{n}): worst error {worst:.2e} of Σ|products|");
            assert!(worst < 1e-5, "{unit:?} ({m},{k},{n}): {worst}");
            results.push((out, magnitudes));
        }
        results
    }

    /// The packing, the tasks and the edges, on every CPU: the kernel's scalar twin in place
    /// of the tile unit.
    #[test]
    fn emulated_tiles_match_the_reference() {
        check_against_reference(TileUnit::Emulated);
    }

    /// The tile unit itself against the reference and against its twin. Reported as skipped
    /// where the CPU has no AMX or Linux refuses the tile state — unless `AWQ_REQUIRE_AMX=1`
    /// (`scripts/test.sh` sets it where `/proc/cpuinfo` lists AMX), where that fails.
    #[test]
    fn matches_its_scalar_twin() {
        if !hardware_here() {
            testkit::skip::unavailable(
                "amx::matches_its_scalar_twin",
                testkit::skip::Condition::Amx,
                "this CPU has no AMX-BF16, or Linux refused the tile data state",
            );
            return;
        }
        let hardware = check_against_reference(TileUnit::Hardware);
        let twin = check_against_reference(TileUnit::Emulated);
        // Both sum the same exact products in f32, in different orders (the tile unit's order
        // within a step is its own): they may differ by a few rounding errors of the running
        // sum, which scale with the products' magnitudes, not with the result (up to 5e-6
        // relative to the result measured where the sum cancels).
        for ((h, magnitudes), (t, _)) in hardware.iter().zip(&twin) {
            for ((h, t), scale) in h.iter().zip(t).zip(magnitudes) {
                assert!(
                    (h.is_nan() && t.is_nan()) || ((h - t).abs() as f64) <= 1e-6 * scale.max(1.0),
                    "tile unit {h} vs twin {t} (products' magnitudes sum to {scale})"
                );
            }
        }
    }
}
