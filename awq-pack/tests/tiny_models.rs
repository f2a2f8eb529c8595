//! AWQ end to end on the tiny reference models: the checkpoint format (read back with an
//! unpacker written from awq-format.md alone), the exact `quantization_config`, bit-identical
//! reruns, and the W4A16 runtime against the checkpoint's own dequantization.

use std::path::{Path, PathBuf};

use awq_calib::CalibSpec;
use awq_pack::quant::QuantizedLinear;
use awq_pack::{GroupSize, Method, QuantizeOptions, Scaling, quantize};
use rand::{RngExt, SeedableRng};
use testkit::awq::{dequantize_checkpoint, folder_digest, unpack_gemm};
use tp_runtime::{Checkpoint, CpuBackend, Model, SeqLayout};

fn options(method: Method, calib: &Path, group_size: usize) -> QuantizeOptions {
    QuantizeOptions {
        method,
        group_size: GroupSize::new(group_size).unwrap(),
        scaling: Scaling::Duo,
        clip: true,
        calib: CalibSpec {
            samples: 24,
            seq_len: 64,
            ..CalibSpec::new(calib)
        },
        modules_to_not_convert: Vec::new(),
        replace: false,
    }
}

/// A tiny model with a tokenizer, and calibration text beside it.
fn setup(name: &str) -> (testkit::TinyModel, PathBuf, PathBuf) {
    let tmp = testkit::tiny_with_tokenizer(name);
    let model = tmp.dir.clone();
    let calib = tmp.root().join("calib.txt");
    std::fs::write(&calib, testkit::synthetic_text(200)).unwrap();
    (tmp, model, calib)
}

#[test]
fn packer_round_trips_through_an_independent_unpacker() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (out_f, in_f, g) in [(24, 128, 32), (8, 64, 64), (40, 96, 16)] {
        let w: Vec<f32> = (0..out_f * in_f)
            .map(|_| rng.random_range(-0.5f32..0.5).powi(3))
            .collect();
        let q = QuantizedLinear::quantize(&w, out_f, in_f, GroupSize::new(g).unwrap());
        let packed = awq_pack::pack::pack_gemm(&q).unwrap();
        let scales: Vec<f32> = packed.scales.iter().map(|s| s.to_f32()).collect();
        let unpacked = unpack_gemm(&packed.qweight, &packed.qzeros, &scales, in_f, out_f, g);
        assert_eq!(unpacked, q.dequantize(), "[{out_f}, {in_f}] g{g}");
    }
}

#[test]
fn checkpoint_layout_and_config_are_exact() {
    let (tmp, model, calib) = setup("tiny-qwen2");
    let out = tmp.root().join("awq");
    quantize(&model, &out, &options(Method::Rtn, &calib, 16), |_| {}).unwrap();
    let config = testkit::read_json(&out.join("config.json"));
    assert_eq!(
        config["quantization_config"],
        serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": true,
            "version": "gemm", "modules_to_not_convert": null})
    );
    let ck = Checkpoint::open(&out).unwrap();
    let (h, i, kv) = (256, 688, 64);
    for (name, dtype, shape) in [
        ("model.layers.0.self_attn.q_proj.qweight", "I32", vec![h, h / 8]),
        (
            "model.layers.0.self_attn.q_proj.qzeros",
            "I32",
            vec![h / 16, h / 8],
        ),
        ("model.layers.0.self_attn.q_proj.scales", "F16", vec![h / 16, h]),
        ("model.layers.0.self_attn.q_proj.bias", "F16", vec![h]),
        ("model.layers.2.self_attn.k_proj.qweight", "I32", vec![h, kv / 8]),
        ("model.layers.2.mlp.down_proj.qweight", "I32", vec![i, h / 8]),
        ("model.layers.2.mlp.down_proj.scales", "F16", vec![i / 16, h]),
        ("model.embed_tokens.weight", "F16", vec![512, h]),
        ("lm_head.weight", "F16", vec![512, h]),
        ("model.norm.weight", "F16", vec![h]),
    ] {
        let t = ck.tensor(name).unwrap();
        assert_eq!(format!("{:?}", t.dtype()), dtype, "{name}");
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
    }
    assert!(!ck.contains("model.layers.0.self_attn.q_proj.weight"));
    assert!(out.join("tokenizer.json").exists());
}

#[test]
fn reruns_are_bit_identical() {
    let (tmp, model, calib) = setup("tiny-llama");
    let (a, b) = (tmp.root().join("a"), tmp.root().join("b"));
    let first = quantize(&model, &a, &options(Method::Awq, &calib, 16), |_| {}).unwrap();
    quantize(&model, &b, &options(Method::Awq, &calib, 16), |_| {}).unwrap();
    assert_eq!(folder_digest(&a), folder_digest(&b));
    // The search did something: at least one group picked a non-zero α.
    assert!(
        first
            .layers
            .iter()
            .flat_map(|l| &l.scale_groups)
            .any(|g| g.choice.alpha > 0.0)
    );
    assert_eq!(
        first.calibration.as_ref().unwrap().blocks * 64,
        first.calibration.unwrap().tokens
    );
}

/// The W4A16 runtime computes what the checkpoint's dense dequantization computes.
fn runtime_matches_dequantized(name: &str, group_size: usize, not_convert: &[&str]) {
    let (tmp, model, calib) = setup(name);
    let out = tmp.root().join("awq");
    let opts = QuantizeOptions {
        modules_to_not_convert: not_convert.iter().map(|s| s.to_string()).collect(),
        ..options(Method::Awq, &calib, group_size)
    };
    quantize(&model, &out, &opts, |_| {}).unwrap();
    let dense = tmp.root().join("dense");
    dequantize_checkpoint(&out, &dense);
    let ids: Vec<u32> = (0..80).map(|i| (i * 37 % 512) as u32).collect();
    let layout = SeqLayout::single(ids.len()).unwrap();
    let logits = |dir: &Path| {
        let m = Model::load(dir, CpuBackend::new()).unwrap();
        let h = m.forward(&ids, &layout).unwrap();
        m.logits(&h, &[0, 40, 79]).unwrap().concat()
    };
    let (q, d) = (logits(&out), logits(&dense));
    let err = q.iter().zip(&d).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 1e-4, "{name}: W4A16 vs dequantized differ by {err}");
    assert_ne!(q, logits(&model), "{name}: quantization changed nothing");
}

#[test]
fn tiny_llama_runtime_matches_dequantized() {
    runtime_matches_dequantized("tiny-llama", 16, &[]);
}

#[test]
fn tiny_llama_tied_runtime_matches_dequantized() {
    // Eight kv heads: v_proj and o_proj have the same shape, so the v → o group is searched.
    // down_proj (688 inputs, not a multiple of 64) stays dense, as `modules_to_not_convert`
    // allows, while up_proj still absorbs its scales.
    runtime_matches_dequantized("tiny-llama-tied", 64, &["mlp.down_proj"]);
}

#[test]
fn tiny_qwen2_runtime_matches_dequantized() {
    runtime_matches_dequantized("tiny-qwen2", 16, &[]);
}
