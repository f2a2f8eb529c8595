//! Every CUDA kernel against its CPU twin (the CPU backend's operation) on fresh random
//! inputs, with every output poisoned with NaN before the kernel runs; relative error
//! ‖gpu − cpu‖ / ‖cpu‖ at most 1e-5 for f32 arithmetic and 1e-2 where operands are rounded
//! to f16 or bf16 (the tensor-core W4A16 path, half-precision dense weights). Reported as
//! skipped (`testkit::skip`) without a GPU — unless `AWQ_REQUIRE_GPU=1` (set by `scripts/gpu-check.sh`). The
//! inputs' seed is printed; `AWQ_TEST_SEED` replays a run.
#![cfg(feature = "cuda")]

use checkpoint::awq::pack_word;
use checkpoint::{Activation, AwqGemm, AwqShape, FloatData};
use cpu_kernels::CpuMatrix;
use half::{bf16, f16};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tp_runtime::backend::cuda::{CudaMatrix, CudaTensor};
use tp_runtime::backend::{
    AttendedSequence, AttentionLayout, AttentionSpec, Backend, Prediction, RopeFrequencies, SeqLayout,
    combine_nll_parts,
};
use tp_runtime::model::Linear;
use tp_runtime::{CpuBackend, CudaBackend, DenseWeight, HostTensor};

fn gpu(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b.with_poisoned_outputs()),
        Err(e) => {
            testkit::skip::unavailable(test, testkit::skip::Condition::Gpu, &e.to_string());
            None
        }
    }
}

/// A missing GPU is a typed error (what callers match on), not a string; on a machine with
/// one the backend opens.
#[test]
fn a_missing_gpu_is_a_typed_error() {
    use cuda_kernels::KernelError;
    match CudaBackend::new(0) {
        Ok(_) => {}
        Err(tp_runtime::Error::Gpu(KernelError::NoDriver | KernelError::NoDevice(..))) => {}
        Err(e) => panic!("expected Error::Gpu(NoDriver | NoDevice), got {e:?}"),
    }
}

/// A generator seeded from `AWQ_TEST_SEED`, else from the clock (fresh inputs every run);
/// the seed is printed so that a failure can be replayed.
fn rng() -> ChaCha8Rng {
    let seed = match std::env::var("AWQ_TEST_SEED") {
        Ok(v) => v.parse().expect("AWQ_TEST_SEED must be an unsigned integer"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("seed {seed} (AWQ_TEST_SEED={seed} replays it)");
    ChaCha8Rng::seed_from_u64(seed)
}

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// ‖a − b‖ / ‖b‖ in f64; NaN anywhere fails.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(
        got.iter().all(|v| v.is_finite()),
        "non-finite output (an element was not written?)"
    );
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

fn check(what: &str, got: &[f32], want: &[f32], bound: f64) {
    let e = rel_err(got, want);
    eprintln!("{what}: relative error {e:.2e} (bound {bound:.0e})");
    assert!(e <= bound, "{what}: relative error {e:.3e} exceeds {bound:.0e}");
}

fn both(cuda: &CudaBackend, data: &[f32], rows: usize, cols: usize) -> (HostTensor, CudaTensor) {
    (
        HostTensor::new(data.to_vec(), rows, cols).unwrap(),
        cuda.upload(data, rows, cols).unwrap(),
    )
}

/// `values` stored as f32, f16 and bf16.
fn stored(values: &[f32]) -> [FloatData; 3] {
    [
        FloatData::from(values.to_vec()),
        FloatData::F16(
            values
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect::<Vec<_>>()
                .into(),
        ),
        FloatData::BF16(
            values
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect::<Vec<_>>()
                .into(),
        ),
    ]
}

#[test]
fn elementwise_kernels_match_cpu() {
    let Some(g) = gpu("elementwise_kernels_match_cpu") else {
        return;
    };
    let c = CpuBackend::new();
    let mut rng = rng();
    let (rows, cols) = (37, 576);
    let x = random(&mut rng, rows * cols, 2.0);
    let (xc, xg) = both(&g, &x, rows, cols);
    let w = random(&mut rng, cols, 1.5);
    let (wc, wg) = (c.vector(w.clone().into()).unwrap(), g.vector(w.into()).unwrap());
    let want = c.rms_norm(&xc, &wc, 1e-5).unwrap();
    let got = g.rms_norm(&xg, &wg, 1e-5).unwrap();
    check("rms_norm", &g.download(&got).unwrap(), &want.data, 1e-5);
    // The per-head norm (Qwen3's q/k norms): 9 heads of 64 per row.
    let hw = random(&mut rng, 64, 1.5);
    let (hwc, hwg) = (c.vector(hw.clone().into()).unwrap(), g.vector(hw.into()).unwrap());
    let (mut hc, mut hg) = (xc.clone(), g.upload(&x, rows, cols).unwrap());
    c.head_rms_norm(&mut hc, &hwc, 1e-6, 64).unwrap();
    g.head_rms_norm(&mut hg, &hwg, 1e-6, 64).unwrap();
    check("head_rms_norm", &g.download(&hg).unwrap(), &hc.data, 1e-5);

    let y = random(&mut rng, rows * cols, 3.0);
    let (yc, yg) = both(&g, &y, rows, cols);
    for activation in [Activation::Silu, Activation::GeluTanh] {
        let want = c.gate_mul(activation, &xc, &yc).unwrap();
        let got = g.gate_mul(activation, &xg, &yg).unwrap();
        check(
            &format!("gate_mul {activation:?}"),
            &g.download(&got).unwrap(),
            &want.data,
            1e-5,
        );
    }
    let (mut sc, mut sg) = (xc.clone(), g.upload(&x, rows, cols).unwrap());
    c.scale(&mut sc, 33.94).unwrap();
    g.scale(&mut sg, 33.94).unwrap();
    check("scale", &g.download(&sg).unwrap(), &sc.data, 0.0);

    let (mut ac, mut ag) = (xc.clone(), g.upload(&x, rows, cols).unwrap());
    c.add_assign(&mut ac, &yc).unwrap();
    g.add_assign(&mut ag, &yg).unwrap();
    check("add_assign", &g.download(&ag).unwrap(), &ac.data, 1e-6);

    let rope = RopeFrequencies::new(64, 100_000.0);
    let positions: Vec<u32> = (0..rows as u32).map(|p| p * 13 % 500).collect();
    let (tc, tg) = (
        c.rope_table(&rope, &positions).unwrap(),
        g.rope_table(&rope, &positions).unwrap(),
    );
    let (mut rc, mut rg) = (xc.clone(), g.upload(&x, rows, cols).unwrap());
    c.rotary(&mut rc, &tc, 64).unwrap();
    g.rotary(&mut rg, &tg, 64).unwrap();
    check("rotary", &g.download(&rg).unwrap(), &rc.data, 1e-6);
    // Phi-3's partial rotary: the leading 48 of each 64 dimensions rotate, the rest pass.
    let partial = RopeFrequencies::new(48, 10_000.0);
    let (tc, tg) = (
        c.rope_table(&partial, &positions).unwrap(),
        g.rope_table(&partial, &positions).unwrap(),
    );
    let (mut rc, mut rg) = (xc.clone(), g.upload(&x, rows, cols).unwrap());
    c.rotary(&mut rc, &tc, 64).unwrap();
    g.rotary(&mut rg, &tg, 64).unwrap();
    check("partial rotary", &g.download(&rg).unwrap(), &rc.data, 1e-6);

    // Embeddings of a shard holding ids 100..400, from tables stored as f32, f16 and bf16:
    // the others are zero rows; widening is exact.
    let table = random(&mut rng, 300 * cols, 1.0);
    let ids: Vec<u32> = (0..rows as u32).map(|i| i * 37 % 500).collect();
    for data in stored(&table) {
        let dtype = data.dtype();
        let weight = DenseWeight::new(data, 300, cols).unwrap();
        let (tcm, tgm) = (c.matrix(weight.clone()).unwrap(), g.matrix(weight).unwrap());
        let want = c.embed(&tcm, &ids, 100, cols).unwrap();
        let got = g.embed(&tgm, &ids, 100, cols).unwrap();
        assert_eq!(g.download(&got).unwrap(), want.data, "embed {dtype:?}");
    }

    // A gather that would read past its source is refused before anything is launched.
    let err = g
        .logits(&xg, &tgm_of(&g, cols), &[0, rows], None)
        .err()
        .expect("row past the source")
        .to_string();
    assert!(err.contains("row index"), "{err}");
}

fn tgm_of(g: &CudaBackend, cols: usize) -> CudaMatrix {
    g.matrix(DenseWeight::f32(vec![0.5; 4 * cols], 4, cols).unwrap())
        .unwrap()
}

#[test]
fn dense_linear_and_scoring_match_cpu() {
    let Some(g) = gpu("dense_linear_and_scoring_match_cpu") else {
        return;
    };
    let c = CpuBackend::new();
    let mut rng = rng();
    let (m, k, n) = (45, 192, 328);
    let x = random(&mut rng, m * k, 1.0);
    let (xc, xg) = both(&g, &x, m, k);
    let w = random(&mut rng, n * k, 0.1);
    let b = random(&mut rng, n, 0.5);
    // Dense weights keep their element type: f32 (SGEMM) and f16/bf16 (gemm_ex with the
    // activations rounded to the weights' type).
    for (data, bound) in stored(&w).into_iter().zip([1e-5, 1e-2, 1e-2]) {
        let dtype = data.dtype();
        let weight = DenseWeight::new(data, n, k).unwrap();
        let lc = Linear::new(&c, Box::new(weight.clone()), Some(b.clone().into())).unwrap();
        let lg = Linear::new(&g, Box::new(weight), Some(b.clone().into())).unwrap();
        let want = lc.forward(&c, &xc).unwrap();
        let got = lg.forward(&g, &xg).unwrap();
        check(
            &format!("linear {dtype:?}"),
            &g.download(&got).unwrap(),
            &want.data,
            bound,
        );
    }

    // Scoring over a vocabulary slice (ids 1000..1328) with targets inside and outside it.
    let (lc, lg): (CpuMatrix, CudaMatrix) = (
        c.matrix(DenseWeight::f32(w.clone(), n, k).unwrap()).unwrap(),
        g.matrix(DenseWeight::f32(w, n, k).unwrap()).unwrap(),
    );
    let preds: Vec<Prediction> = (0..m)
        .map(|r| Prediction {
            row: r,
            target: 1000 + (r * 11 % 400) as u32,
        })
        .collect();
    // Plain, and soft-capped as Gemma 2's logits (at a cap that bites here).
    for softcap in [None, Some(0.5)] {
        let want = c.nll_parts(&xc, &lc, &preds, 1000, softcap).unwrap();
        let got = g.nll_parts(&xg, &lg, &preds, 1000, softcap).unwrap();
        let got = g.download(&got).unwrap();
        check(&format!("nll parts {softcap:?}"), &got, &want.data, 1e-5);
        check(
            &format!("nll {softcap:?}"),
            &combine_nll_parts(&got, 1),
            &combine_nll_parts(&want.data, 1),
            1e-5,
        );
        let rows = [0, 7, 44];
        let want = c.logits(&xc, &lc, &rows, softcap).unwrap();
        let got = g.logits(&xg, &lg, &rows, softcap).unwrap();
        check(
            &format!("logits {softcap:?}"),
            &g.download(&got).unwrap(),
            &want.data,
            1e-5,
        );
    }
}

#[test]
fn attention_matches_cpu() {
    let Some(g) = gpu("attention_matches_cpu") else {
        return;
    };
    let c = CpuBackend::new();
    let mut rng = rng();
    let plain = |lengths: &[usize]| {
        let layout = SeqLayout::new(lengths).unwrap();
        (AttentionLayout::within(&layout), layout.rows())
    };
    // Decoding: sequences in a KV cache of capacity 600, one token each or a prefill chunk
    // after cached positions.
    let cached = |seqs: &[(usize, usize)]| {
        let mut row = 0;
        let seqs = seqs
            .iter()
            .enumerate()
            .map(|(i, &(new, past))| {
                row += new;
                AttendedSequence {
                    queries: row - new..row,
                    keys: i * 600,
                    past,
                }
            })
            .collect();
        (AttentionLayout::new(seqs).unwrap(), 600 * 4)
    };
    for ((layout, key_rows), heads, kv_heads, d, window, softcap) in [
        (plain(&[512]), 9, 3, 64, None, None),
        (plain(&[70, 33, 1, 130]), 8, 2, 32, None, Some(0.3)),
        (plain(&[300, 200]), 4, 4, 128, Some(100), None),
        (
            cached(&[(1, 511), (1, 0), (1, 77), (1, 300)]),
            9,
            3,
            64,
            None,
            None,
        ),
        (
            cached(&[(40, 100), (1, 599), (33, 2)]),
            8,
            2,
            32,
            Some(50),
            Some(0.3),
        ),
    ] {
        let rows = layout.rows();
        let spec = AttentionSpec {
            heads,
            kv_heads,
            head_dim: d,
            sliding_window: window,
            scale: 1.0 / (d as f32).sqrt(),
            softcap,
        };
        let q = random(&mut rng, rows * heads * d, 1.0);
        let k = random(&mut rng, key_rows * kv_heads * d, 1.0);
        let v = random(&mut rng, key_rows * kv_heads * d, 1.0);
        let (qc, qg) = both(&g, &q, rows, heads * d);
        let (kc, kg) = both(&g, &k, key_rows, kv_heads * d);
        let (vc, vg) = both(&g, &v, key_rows, kv_heads * d);
        let want = c.attention(&qc, &kc, &vc, &spec, &layout).unwrap();
        let got = g.attention(&qg, &kg, &vg, &spec, &layout).unwrap();
        check(
            &format!("attention {layout:?} {heads}/{kv_heads} d{d} {window:?} {softcap:?}"),
            &g.download(&got).unwrap(),
            &want.data,
            1e-5,
        );
    }
}

#[test]
fn copy_rows_matches_cpu() {
    let Some(g) = gpu("copy_rows_matches_cpu") else {
        return;
    };
    let c = CpuBackend::new();
    let mut rng = rng();
    let src = random(&mut rng, 7 * 24, 1.0);
    let dst = random(&mut rng, 30 * 24, 1.0);
    let (sc, sg) = both(&g, &src, 7, 24);
    let (mut dc, mut dg) = both(&g, &dst, 30, 24);
    c.copy_rows(&sc, 2, &mut dc, 21, 5).unwrap();
    g.copy_rows(&sg, 2, &mut dg, 21, 5).unwrap();
    check("copy_rows", &g.download(&dg).unwrap(), &dc.data, 0.0);
    assert!(g.copy_rows(&sg, 3, &mut dg, 0, 5).is_err());
    assert!(g.copy_rows(&sg, 0, &mut dg, 26, 5).is_err());
}

/// A random AWQ weight `[n, k]` with group size `gs`.
fn awq_weight(rng: &mut ChaCha8Rng, k: usize, n: usize, gs: usize) -> AwqGemm {
    let q: Vec<u8> = (0..k * n).map(|_| rng.random_range(0..16u8)).collect();
    let z: Vec<u8> = (0..k / gs * n).map(|_| rng.random_range(0..16u8)).collect();
    let s: Vec<f16> = (0..k / gs * n)
        .map(|_| f16::from_f32(rng.random_range(0.001..0.02f32)))
        .collect();
    let pack = |v: &[u8]| -> Vec<i32> {
        v.chunks_exact(8)
            .map(|c| pack_word(c.try_into().unwrap()))
            .collect()
    };
    let shape = AwqShape {
        in_features: k,
        out_features: n,
        group_size: gs,
    };
    AwqGemm::new(shape, pack(&q).into(), pack(&z).into(), s.into()).unwrap()
}

#[test]
fn w4a16_matches_cpu_at_every_size() {
    let Some(g) = gpu("w4a16_matches_cpu_at_every_size") else {
        return;
    };
    let c = CpuBackend::new();
    let mut rng = rng();
    for (k, n, gs) in [
        (576, 192, 64),
        (1536, 576, 64),
        (256, 1024, 32),
        (4096, 1024, 128),
        (96, 136, 32),
    ] {
        let w = awq_weight(&mut rng, k, n, gs);
        let wc = Linear::new(&c, Box::new(w.clone()), None).unwrap();
        let wg = Linear::new(&g, Box::new(w), None).unwrap();
        for m in [1, 2, 3, 8, 11, 16, 17, 33, 64, 130, 300] {
            let x = random(&mut rng, m * k, 1.0);
            let (xc, xg) = both(&g, &x, m, k);
            let want = wc.forward(&c, &xc).unwrap();
            let got = wg.forward(&g, &xg).unwrap();
            // Activations and dequantized weights are f16 operands on the GPU.
            let bound = 1e-2;
            let got = g.download(&got).unwrap();
            check(&format!("w4a16 m{m} k{k} n{n} g{gs}"), &got, &want.data, bound);
            // Split-K partial sums are added in a fixed order: reruns are bit-identical.
            let again = g.download(&wg.forward(&g, &xg).unwrap()).unwrap();
            assert!(
                got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()),
                "w4a16 m{m} k{k} n{n}: reruns differ"
            );
        }
    }
}

/// Each kernel that takes small row counts against the CPU twin, whichever `Auto` picks: the
/// fused tensor-core kernel and the GEMV kernels (weights as the A operand, 8 rows per row
/// tile, rows past M left unwritten), f32 and f16 outputs poisoned with NaN first.
#[test]
fn w4a16_small_row_kernels_match_cpu() {
    use cuda_kernels::gpu::W4a16Out;
    use cuda_kernels::launch::{GEMV_MAX_ROWS, W4a16Path};

    let Some(g) = gpu("w4a16_small_row_kernels_match_cpu") else {
        return;
    };
    let gpu = g.gpu();
    let c = CpuBackend::new();
    let mut rng = rng();
    let every = [1, 2, 3, 7, 8, 9, 11, GEMV_MAX_ROWS];
    // The last shape gives each warp 16 k steps on 132 multiprocessors: the GEMV kernels'
    // register ring is refilled and groups change within a warp's range.
    for (k, n, gs, rows) in [
        (576, 192, 64, &every[..]),
        (256, 1024, 32, &every[..]),
        (4096, 1024, 128, &every[..]),
        (96, 136, 32, &every[..]),
        (8192, 4096, 32, &[1, 9][..]),
    ] {
        let w = awq_weight(&mut rng, k, n, gs);
        let wc = Linear::new(&c, Box::new(w.clone()), None).unwrap();
        let placed = g.awq_linear(w).unwrap();
        let wg = placed.device();
        for &m in rows {
            let x = random(&mut rng, m * k, 1.0);
            let want = wc
                .forward(&c, &HostTensor::new(x.clone(), m, k).unwrap())
                .unwrap();
            let x16: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let x16 = gpu.upload(&x16).unwrap();
            for path in [W4a16Path::Gemv, W4a16Path::Fused] {
                let what = format!("w4a16 {path:?} m{m} k{k} n{n} g{gs}");
                let mut y = gpu.filled(m * n, f32::NAN).unwrap();
                gpu.w4a16_with(path, &x16, wg, W4a16Out::F32(&mut y), m).unwrap();
                let got = gpu.download(&y).unwrap();
                check(&what, &got, &want.data, 1e-2);
                let mut y16 = gpu.upload(&vec![f16::NAN; m * n]).unwrap();
                gpu.w4a16_with(path, &x16, wg, W4a16Out::F16(&mut y16), m)
                    .unwrap();
                let got16: Vec<f32> = gpu.download(&y16).unwrap().iter().map(|v| v.to_f32()).collect();
                check(&format!("{what} (f16 out)"), &got16, &want.data, 1e-2);
                gpu.w4a16_with(path, &x16, wg, W4a16Out::F32(&mut y), m).unwrap();
                let again = gpu.download(&y).unwrap();
                assert!(
                    got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: reruns differ"
                );
            }
        }
    }
    let x = gpu.zeros::<f16>(17 * 576).unwrap();
    let w = awq_weight(&mut rng, 576, 192, 64);
    let placed = g.awq_linear(w).unwrap();
    let mut y = gpu.zeros::<f32>(17 * 192).unwrap();
    let err = gpu
        .w4a16_with(W4a16Path::Gemv, &x, placed.device(), W4a16Out::F32(&mut y), 17)
        .unwrap_err();
    assert!(err.to_string().contains("at most 16 rows"), "{err}");
}

#[test]
fn tiny_models_match_reference_on_gpu() {
    let Some(g) = gpu("tiny_models_match_reference_on_gpu") else {
        return;
    };
    for name in testkit::TINY_MODELS {
        let tiny = testkit::tiny(name);
        let dir = tiny.dir.clone();
        let reference = testkit::read_json(&dir.join("reference.json"));
        let ids: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
        let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(reference["last4_logits"].clone()).unwrap();
        let model = tp_runtime::Model::load(&dir, g.clone()).unwrap();
        for (seq, want) in ids.iter().zip(&want) {
            let hidden = model
                .forward(seq, &SeqLayout::single(seq.len()).unwrap())
                .unwrap();
            let rows: Vec<usize> = (seq.len() - 4..seq.len()).collect();
            let got = model.logits(&hidden, &rows).unwrap();
            let err = got
                .iter()
                .flatten()
                .zip(want.iter().flatten())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                err < 1e-4,
                "{name} on GPU: logits differ from transformers by {err}"
            );
        }
    }
}

/// W4A16 work captured into a CUDA graph (as `awq bench kernels` times it) and replayed twice
/// writes the bits the same work writes when launched directly: the graph holds every launch
/// and the split-K counters are left zero for the next replay.
#[test]
fn graph_replay_matches_direct_launches() {
    use cuda_kernels::gpu::{AwqDeviceWeight, W4a16Out};
    use cuda_kernels::launch::W4a16Path;
    use cuda_kernels::layout::MmaLayout;

    let Some(g) = gpu("graph_replay_matches_direct_launches") else {
        return;
    };
    let gpu = g.gpu();
    let mut rng = rng();
    let (k, n, gs) = (1536, 576, 64);
    let words: Vec<u32> = (0..k * n / 8).map(|_| rng.random()).collect();
    let zeros: Vec<u32> = (0..k / gs * n / 8).map(|_| rng.random()).collect();
    let scales: Vec<u16> = (0..k / gs * n)
        .map(|_| f16::from_f32(rng.random_range(0.001..0.02f32)).to_bits())
        .collect();
    let layout = MmaLayout::from_gemm(&words, &zeros, &scales, k, n, gs).unwrap();
    let w = AwqDeviceWeight::upload(gpu, &layout).unwrap();
    for (path, m) in [
        (W4a16Path::Gemv, 1),
        (W4a16Path::Gemv, 16),
        (W4a16Path::Fused, 1),
        (W4a16Path::Fused, 16),
        (W4a16Path::Fused, 64),
        (W4a16Path::Dequant, 130),
    ] {
        let x: Vec<f16> = (0..m * k)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0f32)))
            .collect();
        let x = gpu.upload(&x).unwrap();
        let poison = vec![f16::NAN; m * n];
        let mut y = gpu.upload(&poison).unwrap();
        gpu.w4a16_with(path, &x, &w, W4a16Out::F16(&mut y), m).unwrap();
        let direct = gpu.download(&y).unwrap();
        assert!(
            direct.iter().all(|v| v.is_finite()),
            "{path:?} m{m}: unwritten output"
        );
        let graph = gpu
            .capture(|| gpu.w4a16_with(path, &x, &w, W4a16Out::F16(&mut y), m))
            .unwrap();
        for replay in 0..2 {
            gpu.stream().memcpy_htod(&poison, &mut y).unwrap();
            graph.launch().unwrap();
            let replayed = gpu.download(&y).unwrap();
            assert!(
                replayed
                    .iter()
                    .zip(&direct)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{path:?} m{m}: replay {replay} differs from the direct launch"
            );
        }
        eprintln!("graph replay {path:?} m{m}: bit-identical to the direct launch");
    }
}
