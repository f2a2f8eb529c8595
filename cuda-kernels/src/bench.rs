//! Timing the W4A16 kernels against cuBLAS f16 on the same shapes, in the same run (what
//! `awq bench kernels` prints): random AWQ weights and their f16 twins, each uploaded in
//! enough copies that cycling through them never reads a weight from L2, and median times per
//! call, launched back to back or replayed from a CUDA graph.

use half::f16;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use crate::Result;
use crate::cudarc::driver::CudaSlice;
use crate::gpu::{AwqDeviceWeight, Gpu, W4a16Out};
use crate::launch::{DEQUANT_MIN_ROWS, GEMV_MAX_ROWS, W4a16Path};
use crate::layout::MmaLayout;

/// Back-to-back calls per timed sample.
pub const CALLS: usize = 20;

/// Enough copies of a buffer of `bytes` that cycling through them never hits the L2 cache
/// (512 MiB in all, at most 64 copies).
pub fn copies_for(bytes: usize) -> usize {
    (512usize << 20).div_ceil(bytes.max(1)).clamp(1, 64)
}

/// Bytes of a `[k, n]` AWQ weight of group size `g`: packed int4 values, f16 scales and packed
/// int4 zeros.
pub fn awq_weight_bytes(k: usize, n: usize, g: usize) -> usize {
    k * n / 2 + k / g * n * 2 + k / g * n / 8 * 4
}

/// Bytes a W4A16 call on `m` rows must move: the weight, its scales and zeros, the f16
/// activations in and out.
pub fn w4a16_call_bytes(k: usize, n: usize, m: usize, g: usize) -> usize {
    awq_weight_bytes(k, n, g) + m * k * 2 + m * n * 2
}

/// TFLOP/s of an `[m, k] × [k, n]` product taking `ms` milliseconds.
pub fn tflops(m: usize, k: usize, n: usize, ms: f32) -> f64 {
    2.0 * (m * k * n) as f64 / (ms as f64 / 1e3) / 1e12
}

/// `bytes` moved in `ms` milliseconds, as a fraction of `bandwidth` bytes/s.
pub fn bandwidth_fraction(bytes: usize, ms: f32, bandwidth: f64) -> f64 {
    bytes as f64 / (ms as f64 / 1e3) / bandwidth
}

/// Median milliseconds per call of `f`: [`CALLS`] calls launched back to back, or replayed
/// from a CUDA graph.
pub fn per_call_ms(gpu: &Gpu, reps: usize, graph: bool, f: impl FnMut() -> Result<()>) -> Result<f32> {
    if graph {
        gpu.time_graph_ms(reps, CALLS, f)
    } else {
        gpu.time_ms(reps, CALLS, f)
    }
}

/// A random `[k, n]` AWQ weight of group size `g`, repacked once and uploaded `copies` times.
pub fn awq_weights(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    k: usize,
    n: usize,
    g: usize,
    copies: usize,
) -> Result<Vec<AwqDeviceWeight>> {
    let words: Vec<u32> = (0..k * n / 8).map(|_| rng.random()).collect();
    let zeros: Vec<u32> = (0..k / g * n / 8).map(|_| rng.random()).collect();
    let scales: Vec<u16> = (0..k / g * n)
        .map(|_| f16::from_f32(rng.random_range(0.001..0.01f32)).to_bits())
        .collect();
    let layout = MmaLayout::from_gemm(&words, &zeros, &scales, k, n, g)?;
    (0..copies)
        .map(|_| AwqDeviceWeight::upload(gpu, &layout))
        .collect()
}

/// The weights of one `[k, n]` shape: random AWQ ones of group size `g` and random f16 ones
/// for cuBLAS, each in [`copies_for`] its size.
pub struct ShapeWeights {
    pub k: usize,
    pub n: usize,
    pub group_size: usize,
    awq: Vec<AwqDeviceWeight>,
    dense: Vec<CudaSlice<f16>>,
}

impl ShapeWeights {
    /// Draws and uploads the weights (the AWQ ones first).
    pub fn new(gpu: &Gpu, rng: &mut ChaCha8Rng, k: usize, n: usize, g: usize) -> Result<Self> {
        let awq = awq_weights(gpu, rng, k, n, g, copies_for(awq_weight_bytes(k, n, g)))?;
        let w16: Vec<f16> = (0..k * n)
            .map(|_| f16::from_f32(rng.random_range(-0.05..0.05f32)))
            .collect();
        let dense = (0..copies_for(k * n * 2))
            .map(|_| gpu.upload(&w16))
            .collect::<Result<_>>()?;
        Ok(ShapeWeights {
            k,
            n,
            group_size: g,
            awq,
            dense,
        })
    }
}

/// Medians per call of one shape at one M, launched back to back.
#[derive(Debug)]
pub struct W4a16Times {
    /// The path `awq` takes at this M ([`W4a16Path::Fused`] or [`W4a16Path::Dequant`]).
    pub path: W4a16Path,
    /// W4A16 on that path: f16 activations in, f16 out.
    pub w4a16_ms: f32,
    /// The fused tensor-core kernel alone.
    pub fused_ms: f32,
    /// The GEMV kernel alone, where it applies (M ≤ [`GEMV_MAX_ROWS`]).
    pub gemv_ms: Option<f32>,
    /// Dequantize to f16 + cuBLAS, where measured (M ≥ 16).
    pub dequant_ms: Option<f32>,
    pub cublas_f16_ms: f32,
    /// The same calls replayed from CUDA graphs, or why the capture failed.
    pub graph: Result<GraphTimes>,
}

/// Medians per call with the [`CALLS`] calls of a sample captured once into a CUDA graph and
/// replayed, so that the host's per-launch cost is paid once per sample.
#[derive(Debug)]
pub struct GraphTimes {
    /// W4A16 on the path `awq` takes at this M.
    pub w4a16_ms: f32,
    /// The GEMV kernel, where it applies.
    pub gemv_ms: Option<f32>,
    pub cublas_f16_ms: f32,
}

/// Times W4A16 on every path and cuBLAS f16 on `m` random rows of `weights`, `reps` samples
/// each.
pub fn time_w4a16(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    weights: &ShapeWeights,
    m: usize,
    reps: usize,
) -> Result<W4a16Times> {
    let (k, n) = (weights.k, weights.n);
    let (awq, dense) = (&weights.awq, &weights.dense);
    let x: Vec<f16> = (0..m * k)
        .map(|_| f16::from_f32(rng.random_range(-1.0..1.0f32)))
        .collect();
    let x = gpu.upload(&x)?;
    let mut y = gpu.zeros::<f16>(m * n)?;
    let mut time = |path: W4a16Path, graph: bool| {
        let mut i = 0usize;
        per_call_ms(gpu, reps, graph, || {
            i += 1;
            gpu.w4a16_with(path, &x, &awq[i % awq.len()], W4a16Out::F16(&mut y), m)
        })
    };
    let fused_ms = time(W4a16Path::Fused, false)?;
    let gemv = m <= GEMV_MAX_ROWS;
    let gemv_ms = if gemv {
        Some(time(W4a16Path::Gemv, false)?)
    } else {
        None
    };
    let gemv_graph_ms = if gemv {
        time(W4a16Path::Gemv, true).map(Some)
    } else {
        Ok(None)
    };
    let dequant_ms = if m >= 16 {
        Some(time(W4a16Path::Dequant, false)?)
    } else {
        None
    };
    let path = if m >= DEQUANT_MIN_ROWS {
        W4a16Path::Dequant
    } else {
        W4a16Path::Fused
    };
    let w4a16_graph_ms = time(path, true);
    let w4a16_ms = match path {
        W4a16Path::Dequant => dequant_ms.expect("measured from 16 rows"),
        _ => fused_ms,
    };
    let mut cublas = |graph: bool| {
        let mut j = 0usize;
        per_call_ms(gpu, reps, graph, || {
            j += 1;
            gpu.hgemm_nt(&x, &dense[j % dense.len()], &mut y, m, k, n)
        })
    };
    let cublas_f16_ms = cublas(false)?;
    let graph = match (w4a16_graph_ms, gemv_graph_ms, cublas(true)) {
        (Ok(w4a16_ms), Ok(gemv_ms), Ok(cublas_f16_ms)) => Ok(GraphTimes {
            w4a16_ms,
            gemv_ms,
            cublas_f16_ms,
        }),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e),
    };
    Ok(W4a16Times {
        path,
        w4a16_ms,
        fused_ms,
        gemv_ms,
        dequant_ms,
        cublas_f16_ms,
        graph,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_rotate_through_half_a_gibibyte_of_copies() {
        // Llama-2-7B's [4096, 4096] at group 128: 8 MiB of int4 values, 32 groups of 4096 f16
        // scales (256 KiB) and of 4096 int4 zeros (64 KiB).
        let bytes = awq_weight_bytes(4096, 4096, 128);
        assert_eq!(bytes, 8 * 1024 * 1024 + 256 * 1024 + 64 * 1024);
        assert_eq!(copies_for(bytes), (512usize << 20).div_ceil(bytes));
        assert_eq!(copies_for(1), 64);
        assert_eq!(copies_for(1 << 30), 1);
        assert_eq!(copies_for(0), 64);
        assert_eq!(
            w4a16_call_bytes(4096, 4096, 2, 128),
            bytes + 2 * 4096 * 2 + 2 * 4096 * 2
        );
    }

    #[test]
    fn rates_follow_their_units() {
        // 2·1000·1000·1000 FLOPs in 2 ms: 1 TFLOP/s; 1 GB in 1 ms against 2 TB/s: half.
        assert!((tflops(1000, 1000, 1000, 2.0) - 1.0).abs() < 1e-12);
        assert!((bandwidth_fraction(1_000_000_000, 1.0, 2e12) - 0.5).abs() < 1e-12);
    }
}
