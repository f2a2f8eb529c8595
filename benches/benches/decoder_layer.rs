//! One SmolLM2-shaped decoder layer forward at 512 tokens on the CPU backend, against a
//! same-run baseline: the layer's seven projections alone as plain f32 GEMMs.

use cpu_kernels::matmul_transposed;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tp_runtime::backend::{Backend, CpuBackend, RopeFrequencies};
use tp_runtime::model::{DecoderLayer, ForwardContext, Linear, Workspace};
use tp_runtime::{DenseWeight, SeqLayout};

const TOKENS: usize = 512;
const HIDDEN: usize = 576;
const INTERMEDIATE: usize = 1536;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn linear(rng: &mut ChaCha8Rng, out_features: usize, in_features: usize) -> Linear<CpuBackend> {
    let data = random(rng, out_features * in_features, 1.0 / (in_features as f32).sqrt());
    let weight = DenseWeight::f32(data, out_features, in_features).unwrap();
    Linear::new(&CpuBackend::new(), Box::new(weight), None).unwrap()
}

fn layer(rng: &mut ChaCha8Rng) -> DecoderLayer<CpuBackend> {
    DecoderLayer {
        index: 0,
        layer_type: checkpoint::LayerType::FullAttention,
        activation: checkpoint::Activation::Silu,
        input_layernorm: vec![1.0; HIDDEN].into(),
        q_proj: linear(rng, HEADS * HEAD_DIM, HIDDEN),
        k_proj: linear(rng, KV_HEADS * HEAD_DIM, HIDDEN),
        v_proj: linear(rng, KV_HEADS * HEAD_DIM, HIDDEN),
        qk_norms: None,
        o_proj: linear(rng, HIDDEN, HEADS * HEAD_DIM),
        mlp_norm: vec![1.0; HIDDEN].into(),
        output_norms: None,
        gate_proj: linear(rng, INTERMEDIATE, HIDDEN),
        up_proj: linear(rng, INTERMEDIATE, HIDDEN),
        down_proj: linear(rng, HIDDEN, INTERMEDIATE),
    }
}

fn bench(c: &mut Criterion) {
    cpu_kernels::retain_freed_memory();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let backend = CpuBackend::new();
    let layer = layer(&mut rng);
    let layout = SeqLayout::single(TOKENS).unwrap();
    let rope = RopeFrequencies::new(HEAD_DIM, 100_000.0);
    let ctx = ForwardContext {
        rope_table: backend.rope_table(&rope, &layout.positions()).unwrap(),
        local_rope_table: None,
        sliding_layout: None,
        layout: tp_runtime::backend::AttentionLayout::within(&layout),
        attention: tp_runtime::backend::AttentionSpec {
            heads: HEADS,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            sliding_window: None,
            scale: 1.0 / (HEAD_DIM as f32).sqrt(),
            softcap: None,
        },
        sliding_window: None,
        rms_norm_eps: 1e-5,
        comm: None,
    };
    let input = backend
        .upload(&random(&mut rng, TOKENS * HIDDEN, 1.0), TOKENS, HIDDEN)
        .unwrap();
    let mut ws = Workspace::default();

    let mut group = c.benchmark_group("decoder_layer_512");
    group.throughput(Throughput::Elements(TOKENS as u64));
    group.bench_function("layer_forward", |b| {
        b.iter(|| {
            let mut x = input.clone();
            layer.forward(&backend, &mut x, &ctx, &mut ws, None).unwrap();
            x
        })
    });
    // Baseline: the same seven products with nothing around them.
    let shapes = [
        (HEADS * HEAD_DIM, HIDDEN),
        (KV_HEADS * HEAD_DIM, HIDDEN),
        (KV_HEADS * HEAD_DIM, HIDDEN),
        (HIDDEN, HEADS * HEAD_DIM),
        (INTERMEDIATE, HIDDEN),
        (INTERMEDIATE, HIDDEN),
        (HIDDEN, INTERMEDIATE),
    ];
    let weights: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(o, i)| random(&mut rng, o * i, 0.05))
        .collect();
    let inputs: Vec<Vec<f32>> = shapes
        .iter()
        .map(|&(_, i)| random(&mut rng, TOKENS * i, 1.0))
        .collect();
    group.bench_function("baseline_projections_only", |b| {
        b.iter(|| {
            for ((&(o, i), w), x) in shapes.iter().zip(&weights).zip(&inputs) {
                let mut out = vec![0f32; TOKENS * o];
                matmul_transposed(x, w, &mut out, TOKENS, i, o);
                std::hint::black_box(&out);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
