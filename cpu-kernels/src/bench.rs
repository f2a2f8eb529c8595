//! This machine's yardsticks, measured in the run that uses them (`awq bench`): the rate of
//! the products a compute path runs ([`gemm_gflops`]) and the read bandwidth of host memory
//! ([`host_read_bandwidth`]).

use std::time::Instant;

use checkpoint::FloatData;
use rayon::prelude::*;

use crate::{Compute, CpuMatrix};

/// FLOPs of an `[m, k] × [k, n]` product (multiply-add = 2).
pub fn gemm_flops(m: usize, k: usize, n: usize) -> f64 {
    2.0 * (m * k * n) as f64
}

/// This machine's rate (GFLOP/s) for `[m, k] × [k, n]` products computed as `compute` says,
/// on a weight held as the runtime holds it for that path: the best of eight half-second
/// rounds. A shared VM's speed drifts by ±15 % from minute to minute, and a floor must be the
/// fastest the machine showed, never a slow moment of it.
pub fn gemm_gflops(compute: Compute, m: usize, k: usize, n: usize) -> f64 {
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
    let mut out = vec![0f32; m * n];
    // The weight as the runtime holds it for this path (bf16 weights are rounded once).
    let matrix = CpuMatrix::new(FloatData::F32(w.into()), n, k).expect("shape");
    matrix.matmul(compute, &x, m, &mut out);
    let mut best = 0f64;
    for _ in 0..8 {
        let start = Instant::now();
        let mut reps = 0u32;
        while start.elapsed().as_secs_f64() < 0.5 {
            matrix.matmul(compute, &x, m, &mut out);
            reps += 1;
        }
        best = best.max(gemm_flops(m, k, n) * reps as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Elements of the buffer [`host_read_bandwidth`] reads: 512 MiB of f32, far larger than the
/// caches.
const READ_ELEMENTS: usize = 128 << 20;

/// The sum of `values` in 16 independent lanes, so that it vectorises and memory, not the
/// adder, is the limit.
fn lane_sum(values: &[f32]) -> f32 {
    values
        .chunks_exact(16)
        .fold([0f32; 16], |mut acc, x| {
            for (a, v) in acc.iter_mut().zip(x) {
                *a += v;
            }
            acc
        })
        .iter()
        .sum()
}

/// Read bandwidth of host memory in bytes/s: every thread of rayon's pool summing its part of
/// a 512 MiB buffer, best of three passes.
pub fn host_read_bandwidth() -> f64 {
    let buffer: Vec<f32> = (0..READ_ELEMENTS).map(|i| (i % 7) as f32).collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let sum: f32 = buffer.par_chunks(1 << 16).map(lane_sum).sum();
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((buffer.len() * 4) as f64 / seconds);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_product_counts_a_multiply_add_as_two_flops() {
        assert_eq!(gemm_flops(2, 3, 4), 48.0);
        assert_eq!(gemm_flops(4096, 4096, 11008), 2.0 * 4096.0 * 4096.0 * 11008.0);
    }

    #[test]
    fn the_lanes_sum_every_whole_chunk_of_sixteen() {
        let values: Vec<f32> = (0..40).map(|i| i as f32).collect();
        // Chunks of 16 only: the last 8 values (32..40) are left out.
        assert_eq!(lane_sum(&values), (0..32).sum::<i32>() as f32);
    }
}
