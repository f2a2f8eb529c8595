//! AWQ end to end on the tiny reference models: the checkpoint format (read back with an
//! unpacker written from awq-format.md alone), the exact `quantization_config`, bit-identical
//! reruns, and the W4A16 runtime against the checkpoint's own dequantization.

use std::path::{Path, PathBuf};

use awq_calib::CalibSpec;
use awq_pack::quant::QuantizedLinear;
use awq_pack::{GroupSize, Method, QuantizeOptions, Scaling, quantize};
use checkpoint::{Checkpoint, Tokenizer};
use rand::{RngExt, SeedableRng};
use testkit::awq::{dequantize_checkpoint, folder_digest, unpack_gemm};
use tp_runtime::{Compute, CpuBackend, Model, SeqLayout};

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
        max_shard_bytes: checkpoint::writer::DEFAULT_MAX_SHARD_BYTES,
        compute: Compute::F32,
        part: None,
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
    // Every group's report is a grid search: the chosen α is the first strict minimum of the
    // recorded losses, and its loss is what is reported as the best.
    let groups: Vec<_> = first.layers.iter().flat_map(|l| &l.scale_groups).collect();
    assert_eq!(
        groups.len(),
        3 * 3,
        "three layers of three groups (GQA: no v → o)"
    );
    for g in groups {
        let c = &g.choice;
        assert_eq!(c.losses.len(), awq_pack::search::GRID, "{}", g.group);
        let argmin =
            (0..c.losses.len()).fold(0, |best, i| if c.losses[i] < c.losses[best] { i } else { best });
        assert_eq!(
            c.alpha,
            argmin as f32 / awq_pack::search::GRID as f32,
            "{}: α",
            g.group
        );
        assert_eq!(c.best_loss, c.losses[argmin], "{}", g.group);
        assert_eq!(c.loss_at_zero, c.losses[0], "{}", g.group);
        assert!(c.losses.iter().all(|l| l.is_finite() && *l >= 0.0), "{}", g.group);
    }
    assert_eq!(
        first.calibration.as_ref().unwrap().blocks * 64,
        first.calibration.unwrap().tokens
    );
}

/// A search computed in bf16 is as reproducible as one in f32, and so is the bf16 forward pass
/// of its checkpoint; both stay close to f32.
#[test]
fn bf16_reruns_are_bit_identical() {
    if !tp_runtime::CpuFeatures::detect().has_bf16() {
        testkit::skip::unavailable(
            "bf16_reruns_are_bit_identical",
            testkit::skip::Condition::Avx512Bf16,
            "this CPU has no avx512_bf16 (the bf16 path is refused there)",
        );
        return;
    }
    let (tmp, model, calib) = setup("tiny-llama");
    let bf16 = QuantizeOptions {
        compute: Compute::Bf16,
        ..options(Method::Awq, &calib, 16)
    };
    let (a, b, f) = (tmp.root().join("a"), tmp.root().join("b"), tmp.root().join("f32"));
    let report = quantize(&model, &a, &bf16, |_| {}).unwrap();
    assert_eq!(report.compute, Compute::Bf16);
    quantize(&model, &b, &bf16, |_| {}).unwrap();
    assert_eq!(folder_digest(&a), folder_digest(&b));
    quantize(&model, &f, &options(Method::Awq, &calib, 16), |_| {}).unwrap();

    let ids: Vec<u32> = (0..96).map(|i| (i * 37 % 512) as u32).collect();
    let layout = SeqLayout::single(ids.len()).unwrap();
    let rows: Vec<usize> = (0..ids.len()).collect();
    let logits = |dir: &Path, compute| {
        let m = Model::load(dir, CpuBackend::with_compute(compute)).unwrap();
        let h = m.forward(&ids, &layout).unwrap();
        m.logits(&h, &rows).unwrap().concat()
    };
    let (first, second) = (logits(&a, Compute::Bf16), logits(&a, Compute::Bf16));
    assert!(first.iter().zip(&second).all(|(x, y)| x.to_bits() == y.to_bits()));
    // bf16 compute against f32 on the same checkpoint: within bf16's rounding.
    let rms = |v: &[f32]| (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
    let relative = |x: &[f32], y: &[f32]| {
        let d: Vec<f32> = x.iter().zip(y).map(|(a, b)| a - b).collect();
        rms(&d) / rms(y)
    };
    let f32_logits = logits(&f, Compute::F32);
    let compute_error = relative(&logits(&f, Compute::Bf16), &f32_logits);
    // The two searches may choose different scales (a tiny random model's losses are flat),
    // but the bf16-searched checkpoint is as close to the original as the f32-searched one.
    let original = logits(&model, Compute::F32);
    let (bf16_search, f32_search) = (
        relative(&logits(&a, Compute::F32), &original),
        relative(&f32_logits, &original),
    );
    eprintln!(
        "bf16 vs f32 compute: relative RMS {compute_error:.2e}; distance from the original: \
         bf16 search {bf16_search:.4}, f32 search {f32_search:.4}"
    );
    assert!(compute_error < 0.02, "bf16 compute differs by {compute_error}");
    assert!(
        (bf16_search - f32_search).abs() / f32_search < 0.05,
        "bf16 search {bf16_search} vs f32 search {f32_search}"
    );
}

/// The W4A16 runtime computes what the checkpoint's dense dequantization computes, and the
/// AWQ checkpoint is closer to the original than round-to-nearest at the same settings, on
/// text of the calibration's kind that the calibration did not see.
fn runtime_matches_dequantized(name: &str, group_size: usize, not_convert: &[&str]) {
    let (tmp, model, calib) = setup(name);
    let quantized = |method: Method, dir: &str| {
        let out = tmp.root().join(dir);
        let opts = QuantizeOptions {
            modules_to_not_convert: not_convert.iter().map(|s| s.to_string()).collect(),
            ..options(method, &calib, group_size)
        };
        quantize(&model, &out, &opts, |_| {}).unwrap();
        out
    };
    let (awq, rtn) = (quantized(Method::Awq, "awq"), quantized(Method::Rtn, "rtn"));
    let dense = tmp.root().join("dense");
    dequantize_checkpoint(&awq, &dense);
    // Lines 200.. of the synthetic text: the calibration file holds lines 0..200.
    let held_out: String = testkit::synthetic_text(260)
        .lines()
        .skip(200)
        .collect::<Vec<_>>()
        .join("\n");
    let mut ids = Tokenizer::from_dir(&model)
        .unwrap()
        .encode(&held_out, false)
        .unwrap();
    ids.truncate(96);
    let layout = SeqLayout::single(ids.len()).unwrap();
    let rows: Vec<usize> = (0..ids.len()).collect();
    let logits = |dir: &Path| {
        let m = Model::load(dir, CpuBackend::new()).unwrap();
        let h = m.forward(&ids, &layout).unwrap();
        m.logits(&h, &rows).unwrap().concat()
    };
    let (q, d) = (logits(&awq), logits(&dense));
    let err = q.iter().zip(&d).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 1e-4, "{name}: W4A16 vs dequantized differ by {err}");
    let original = logits(&model);
    let mse = |x: &[f32]| {
        x.iter()
            .zip(&original)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / x.len() as f64
    };
    let (awq_err, rtn_err) = (mse(&q), mse(&logits(&rtn)));
    eprintln!("{name}: logit MSE against the original: AWQ {awq_err:.3e}, RTN {rtn_err:.3e}");
    assert!(
        awq_err < rtn_err,
        "{name}: AWQ {awq_err:e} is not closer than RTN {rtn_err:e}"
    );
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

/// Quantizes `model` with `opts` restricted to the layers `range` into `dir`.
fn quantize_part(model: &Path, dir: &Path, opts: &QuantizeOptions, range: &str) -> awq_pack::Result<PathBuf> {
    let part = QuantizeOptions {
        part: Some(range.parse().unwrap()),
        ..opts.clone()
    };
    let report = quantize(model, dir, &part, |_| {})?;
    assert_eq!(report.part, part.part);
    Ok(dir.to_owned())
}

/// A model quantized in parts and merged is the whole run, byte for byte: for AWQ (whose
/// later parts run the earlier layers forward to find their inputs) and RTN, with shards that
/// straddle the parts' boundaries, whatever order the parts are named in.
#[test]
fn parts_merge_into_the_whole_run_byte_for_byte() {
    let (tmp, model, calib) = setup("tiny-llama");
    let shard = 200_000;
    for method in [Method::Awq, Method::Rtn] {
        let opts = QuantizeOptions {
            max_shard_bytes: shard,
            ..options(method, &calib, 16)
        };
        let whole = tmp.root().join(format!("{method}-whole"));
        let whole_report = quantize(&model, &whole, &opts, |_| {}).unwrap();
        let parts: Vec<PathBuf> = ["1..3", "0..1"]
            .into_iter()
            .map(|r| quantize_part(&model, &tmp.root().join(format!("{method}-{r}")), &opts, r).unwrap())
            .collect();
        assert!(
            !parts[0].join("config.json").exists(),
            "a part is not a loadable checkpoint"
        );
        let merged = tmp.root().join(format!("{method}-merged"));
        let report = awq_pack::merge_parts(&parts, &merged, shard, false).unwrap();
        let files = folder_digest(&whole);
        assert!(
            files.iter().filter(|(n, _)| n.ends_with(".safetensors")).count() > 2,
            "{method}: the test needs several shards: {files:?}"
        );
        assert_eq!(folder_digest(&merged), files, "{method}");
        let choices = |r: &awq_pack::QuantizeReport| -> Vec<serde_json::Value> {
            r.layers
                .iter()
                .flat_map(|l| &l.scale_groups)
                .map(|g| serde_json::to_value(&g.choice).unwrap())
                .collect()
        };
        assert_eq!(choices(&report), choices(&whole_report), "{method}");
        assert_eq!(report.layers.len(), 3);
        assert_eq!(report.safetensors_bytes, whole_report.safetensors_bytes);
    }
}

/// Parts that would not make one checkpoint are refused with the reason, and nothing is
/// written: a gap, an overlap, other settings, another model's weights, a folder that is not a
/// part, a range past the model's layers.
#[test]
fn merging_refuses_parts_that_do_not_make_one_checkpoint() {
    let (tmp, model, calib) = setup("tiny-llama");
    let rtn = options(Method::Rtn, &calib, 16);
    let root = tmp.root();
    let part = |name: &str, range: &str, opts: &QuantizeOptions| {
        quantize_part(&model, &root.join(name), opts, range).unwrap()
    };
    let a = part("a", "0..1", &rtn);
    let c = part("c", "2..3", &rtn);
    let b = part("b", "1..2", &rtn);
    let wide = part("wide", "1..3", &rtn);
    let dense_down = part(
        "dense-down",
        "1..3",
        &QuantizeOptions {
            modules_to_not_convert: vec!["mlp.down_proj".into()],
            ..rtn.clone()
        },
    );
    // The same shapes, one weight changed: a fine-tune of the same base, as far as shapes go.
    let other_model = root.join("other-model");
    std::fs::create_dir(&other_model).unwrap();
    for entry in std::fs::read_dir(&model).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, other_model.join(path.file_name().unwrap())).unwrap();
    }
    let weights = other_model.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let other = quantize_part(&other_model, &root.join("other"), &rtn, "1..3").unwrap();

    let out = root.join("merged");
    let refused = |parts: &[&PathBuf], expected: &str| {
        let parts: Vec<PathBuf> = parts.iter().map(|p| p.to_path_buf()).collect();
        let e = awq_pack::merge_parts(&parts, &out, 1 << 30, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(expected), "expected `{expected}` in: {e}");
        assert!(!out.exists(), "nothing is written when the merge is refused");
    };
    refused(&[&a, &c], "layers 1..2 are in none of the parts");
    refused(
        &[&a, &b],
        "layers 2..3 are in none of the parts (quantize them with --part 2..3)",
    );
    refused(&[&b, &c], "layers 0..1 are in none of the parts");
    refused(&[&a, &b, &wide], "overlap");
    refused(
        &[&a, &dense_down],
        r#"modules_to_not_convert: ["mlp.down_proj"] vs []"#,
    );
    refused(&[&a, &other], "source model files differ");
    refused(&[&a, &model], "awq-part.json");
    awq_pack::merge_parts(&[a.clone(), b.clone(), c.clone()], &out, 1 << 30, false).unwrap();

    let past = quantize_part(&model, &root.join("past"), &rtn, "2..4")
        .unwrap_err()
        .to_string();
    assert!(past.contains("2..4") && past.contains("3 layers"), "{past}");
    assert!(!root.join("past").exists());
}

#[test]
fn tiny_qwen3_runtime_matches_dequantized() {
    // Per-head q/k norms after the projections (no scale crosses them), head_dim 64 ≠
    // hidden / heads, a tied lm_head.
    runtime_matches_dequantized("tiny-qwen3", 16, &[]);
}

#[test]
fn tiny_llama3_runtime_matches_dequantized() {
    runtime_matches_dequantized("tiny-llama3", 16, &[]);
}

#[test]
fn tiny_phi3_runtime_matches_dequantized() {
    // q/k/v and gate/up searched as separate projections, written back fused (qkv_proj,
    // gate_up_proj) and read again as their rows.
    runtime_matches_dequantized("tiny-phi3", 16, &[]);
}

#[test]
fn tiny_gemma2_runtime_matches_dequantized() {
    // Scales folded into (1 + w) norms — input_layernorm for q/k/v, pre_feedforward_layernorm
    // for gate/up — and written back as w; the attention and MLP outputs' own norms untouched.
    runtime_matches_dequantized("tiny-gemma2", 16, &[]);
}

#[test]
fn tiny_gemma3_runtime_matches_dequantized() {
    runtime_matches_dequantized("tiny-gemma3", 16, &[]);
}
