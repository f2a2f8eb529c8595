//! GGUF import end to end: the tiny reference models are written as GGUF files the way
//! llama.cpp's converter (`convert_hf_to_gguf.py`) writes them — q/k rows permuted for
//! "llama", Gemma's norms stored as the `1 + w` they apply, Phi-3's fused projections kept
//! fused and its LongRoPE factors as tensors of their own — imported back, and must still
//! reproduce transformers' logits. Malformed GGUF files are clear errors.

use std::path::Path;

use checkpoint::gguf::{OutputDtype, import_gguf};
use checkpoint::writer::DEFAULT_MAX_SHARD_BYTES;
use checkpoint::{Checkpoint, ModelConfig};
use tp_runtime::{CpuBackend, Model, SeqLayout};

/// A minimal GGUF v3 writer for f32 tensors.
#[derive(Default)]
struct GgufWriter {
    kv: Vec<u8>,
    kv_count: u64,
    tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufWriter {
    fn key(&mut self, key: &str, ty: u32) {
        put_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv_count += 1;
    }
    fn u32(&mut self, key: &str, v: u32) {
        self.key(key, 4);
        self.kv.extend(v.to_le_bytes());
    }
    fn f32(&mut self, key: &str, v: f32) {
        self.key(key, 6);
        self.kv.extend(v.to_le_bytes());
    }
    fn string(&mut self, key: &str, v: &str) {
        self.key(key, 8);
        put_str(&mut self.kv, v);
    }
    fn strings(&mut self, key: &str, items: &[String]) {
        self.key(key, 9);
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((items.len() as u64).to_le_bytes());
        for s in items {
            put_str(&mut self.kv, s);
        }
    }
    fn i32s(&mut self, key: &str, items: &[i32]) {
        self.key(key, 9);
        self.kv.extend(5u32.to_le_bytes());
        self.kv.extend((items.len() as u64).to_le_bytes());
        for v in items {
            self.kv.extend(v.to_le_bytes());
        }
    }
    /// `shape` in PyTorch order; stored reversed, as ggml does.
    fn tensor(&mut self, name: &str, shape: &[usize], values: Vec<f32>) {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.into(), dims, values));
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        for (name, dims, values) in &self.tensors {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes()); // F32
            out.extend(offset.to_le_bytes());
            offset = (offset + 4 * values.len() as u64).next_multiple_of(32);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        for (_, _, values) in &self.tensors {
            out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            out.resize(out.len().next_multiple_of(32), 0);
        }
        out
    }
}

/// llama.cpp's rotary permutation: within each head, HF row `p·d/2 + j` goes to row `2j + p`.
fn permute_rows(values: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let d = values.len() / row_len / heads;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for p in 0..2 {
            for j in 0..d / 2 {
                let src = h * d + p * (d / 2) + j;
                let dst = h * d + 2 * j + p;
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&values[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

/// Writes the HF checkpoint at `dir` as a GGUF file the way llama.cpp's converter would.
fn write_gguf(dir: &Path, path: &Path) {
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let ck = Checkpoint::open(dir).unwrap();
    use checkpoint::Architecture;
    let (arch, permute) = match config.architecture {
        Architecture::Qwen2 => ("qwen2", false),
        Architecture::Qwen3 => ("qwen3", false),
        Architecture::Phi3 => ("phi3", false),
        Architecture::Gemma2 => ("gemma2", false),
        Architecture::Gemma3 => ("gemma3", false),
        _ => ("llama", true),
    };
    let gemma = config.architecture.is_gemma();
    let mut w = GgufWriter::default();
    w.string("general.architecture", arch);
    w.u32(&format!("{arch}.block_count"), config.num_hidden_layers as u32);
    w.u32(&format!("{arch}.embedding_length"), config.hidden_size as u32);
    w.u32(
        &format!("{arch}.feed_forward_length"),
        config.intermediate_size as u32,
    );
    w.u32(
        &format!("{arch}.attention.head_count"),
        config.num_attention_heads as u32,
    );
    w.u32(
        &format!("{arch}.attention.head_count_kv"),
        config.num_key_value_heads as u32,
    );
    w.u32(&format!("{arch}.rope.dimension_count"), config.rotary_dim as u32);
    w.u32(&format!("{arch}.attention.key_length"), config.head_dim as u32);
    w.u32(&format!("{arch}.attention.value_length"), config.head_dim as u32);
    w.u32(&format!("{arch}.context_length"), 1024);
    w.f32(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        config.rms_norm_eps,
    );
    w.f32(&format!("{arch}.rope.freq_base"), config.rope_theta as f32);
    if let Some(window) = config.sliding_window {
        w.u32(&format!("{arch}.attention.sliding_window"), window as u32);
    }
    for (key, cap) in [
        ("attn_logit_softcapping", config.attn_logit_softcapping),
        ("final_logit_softcapping", config.final_logit_softcapping),
    ] {
        if let Some(cap) = cap {
            w.f32(&format!("{arch}.{key}"), cap);
        }
    }
    if let Some(theta) = config.local_rope_theta {
        w.f32(&format!("{arch}.rope.freq_base_swa"), theta as f32);
    }
    if config.architecture == Architecture::Gemma3 {
        // Every third layer full, as the tiny model's [sliding, sliding, full].
        w.u32(&format!("{arch}.attention.sliding_window_pattern"), 3);
    }
    let mut rope_factors = None;
    if let checkpoint::RopeScaling::LongRope {
        short_factor,
        long_factor,
        original_max_position_embeddings,
        attention_factor,
    } = &config.rope_scaling
    {
        w.u32(
            &format!("{arch}.rope.scaling.original_context_length"),
            *original_max_position_embeddings as u32,
        );
        w.f32(
            &format!("{arch}.rope.scaling.attn_factor"),
            *attention_factor as f32,
        );
        rope_factors = Some([long_factor.clone(), short_factor.clone()]);
    }
    let mut tokens = testkit::byte_level_alphabet();
    let mut types = vec![1; 256];
    for i in 256..config.vocab_size {
        tokens.push(format!("<extra_{i}>"));
        types.push(3);
    }
    w.string("tokenizer.ggml.model", "gpt2");
    w.string("tokenizer.ggml.pre", "smollm");
    w.strings("tokenizer.ggml.tokens", &tokens);
    w.i32s("tokenizer.ggml.token_type", &types);
    w.strings("tokenizer.ggml.merges", &[]);

    // Gemma's norms are stored as the 1 + w they apply.
    let f32s = |name: &str| {
        let mut v = ck.tensor(name).unwrap().to_f32().unwrap().to_vec();
        if gemma && name.ends_with("norm.weight") {
            v.iter_mut().for_each(|w| *w += 1.0);
        }
        v
    };
    if let Some([long, short]) = rope_factors {
        for (name, factors) in [
            ("rope_factors_long.weight", long),
            ("rope_factors_short.weight", short),
        ] {
            let values: Vec<f32> = factors.iter().map(|&f| f as f32).collect();
            w.tensor(name, &[values.len()], values);
        }
    }
    let h = config.hidden_size;
    w.tensor(
        "token_embd.weight",
        &[config.vocab_size, h],
        f32s("model.embed_tokens.weight"),
    );
    w.tensor("output_norm.weight", &[h], f32s("model.norm.weight"));
    if !config.tie_word_embeddings {
        w.tensor("output.weight", &[config.vocab_size, h], f32s("lm_head.weight"));
    }
    for l in 0..config.num_hidden_layers {
        let hf = |s: &str| format!("model.layers.{l}.{s}");
        let shape = |s: &str| ck.tensor(&hf(s)).unwrap().shape().to_vec();
        let mut put = |gguf: &str, name: &str, heads: Option<usize>| {
            let s = shape(name);
            let mut v = f32s(&hf(name));
            if let (Some(heads), true) = (heads, permute) {
                let row_len = if s.len() == 2 { s[1] } else { 1 };
                v = permute_rows(&v, heads, row_len);
            }
            w.tensor(&format!("blk.{l}.{gguf}"), &s, v);
        };
        put("attn_norm.weight", "input_layernorm.weight", None);
        if gemma {
            put(
                "post_attention_norm.weight",
                "post_attention_layernorm.weight",
                None,
            );
            put("ffn_norm.weight", "pre_feedforward_layernorm.weight", None);
            put("post_ffw_norm.weight", "post_feedforward_layernorm.weight", None);
        } else {
            put("ffn_norm.weight", "post_attention_layernorm.weight", None);
        }
        if config.fused_projections {
            put("attn_qkv.weight", "self_attn.qkv_proj.weight", None);
            put("ffn_up.weight", "mlp.gate_up_proj.weight", None);
        } else {
            put(
                "attn_q.weight",
                "self_attn.q_proj.weight",
                Some(config.num_attention_heads),
            );
            put(
                "attn_k.weight",
                "self_attn.k_proj.weight",
                Some(config.num_key_value_heads),
            );
            put("attn_v.weight", "self_attn.v_proj.weight", None);
            put("ffn_gate.weight", "mlp.gate_proj.weight", None);
            put("ffn_up.weight", "mlp.up_proj.weight", None);
        }
        put("attn_output.weight", "self_attn.o_proj.weight", None);
        put("ffn_down.weight", "mlp.down_proj.weight", None);
        if config.qk_norm {
            put("attn_q_norm.weight", "self_attn.q_norm.weight", None);
            put("attn_k_norm.weight", "self_attn.k_norm.weight", None);
        }
        if config.qkv_bias {
            put(
                "attn_q.bias",
                "self_attn.q_proj.bias",
                Some(config.num_attention_heads),
            );
            put(
                "attn_k.bias",
                "self_attn.k_proj.bias",
                Some(config.num_key_value_heads),
            );
            put("attn_v.bias", "self_attn.v_proj.bias", None);
        }
    }
    std::fs::write(path, w.bytes()).unwrap();
}

/// Imports the tiny model through GGUF and compares the last-position logits of both
/// reference sequences with transformers'.
fn roundtrip(name: &str) {
    roundtrip_with(name, |_| {});
}

/// [`roundtrip`], with `edit` applied to the imported `config.json` before it loads; returns
/// the loaded configuration.
fn roundtrip_with(name: &str, edit: impl Fn(&mut serde_json::Value)) -> ModelConfig {
    let tiny = testkit::tiny(name);
    let dir = tiny.dir.clone();
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("model.gguf");
    write_gguf(&dir, &gguf);
    let out = tmp.path().join("imported");
    let summary = import_gguf(&gguf, &out, OutputDtype::F32, false, DEFAULT_MAX_SHARD_BYTES).unwrap();
    assert_eq!(summary.config.num_hidden_layers, 3);
    let mut config = testkit::read_json(&out.join("config.json"));
    edit(&mut config);
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();

    let reference = testkit::read_json(&dir.join("reference.json"));
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let want: Vec<Vec<Vec<f32>>> = serde_json::from_value(reference["last4_logits"].clone()).unwrap();
    let model = Model::load(&out, CpuBackend::new()).unwrap();
    for (seq, want) in ids.iter().zip(&want) {
        let hidden = model
            .forward(seq, &SeqLayout::single(seq.len()).unwrap())
            .unwrap();
        let got = model.logits(&hidden, &[seq.len() - 1]).unwrap().remove(0);
        let err = got
            .iter()
            .zip(&want[3])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "{name}: logits after GGUF import differ by {err}");
    }
    // Streamed into shards of at most 64 KiB: the same tensors, an index naming every one.
    let sharded = tmp.path().join("sharded");
    import_gguf(&gguf, &sharded, OutputDtype::F32, false, 64 << 10).unwrap();
    let index = testkit::read_json(&sharded.join("model.safetensors.index.json"));
    let weight_map = index["weight_map"].as_object().unwrap();
    let (single, split) = (
        Checkpoint::open(&out).unwrap(),
        Checkpoint::open(&sharded).unwrap(),
    );
    assert!(split.files().count() > 2 && !sharded.join("model.safetensors").exists());
    assert_eq!(weight_map.len(), single.names().len());
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap(),
        summary.safetensors_bytes
    );
    for name in single.names() {
        let (a, b) = (single.tensor(name).unwrap(), split.tensor(name).unwrap());
        assert_eq!(a.bytes(), b.bytes(), "{name}");
        let file = b.path().file_name().unwrap().to_str().unwrap();
        assert_eq!(weight_map[name], file, "{name}");
    }
    // A shard holds at most 64 KiB of data, unless it is one tensor larger than that.
    let mut per_file = std::collections::BTreeMap::<&str, Vec<usize>>::new();
    for (name, file) in weight_map {
        per_file
            .entry(file.as_str().unwrap())
            .or_default()
            .push(split.tensor(name).unwrap().bytes().len());
    }
    for (file, sizes) in per_file {
        assert!(
            sizes.len() == 1 || sizes.iter().sum::<usize>() <= 64 << 10,
            "{file}: {sizes:?}"
        );
    }
    // The tokenizer written beside the weights loads; with no merges every byte is a token.
    let tok = checkpoint::Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.encode("a1", false).unwrap(), vec![b'a' as u32, b'1' as u32]);
    model.config().clone()
}

#[test]
fn tiny_llama_through_gguf() {
    roundtrip("tiny-llama");
}

#[test]
fn tiny_llama_tied_through_gguf() {
    roundtrip("tiny-llama-tied");
}

#[test]
fn tiny_qwen2_through_gguf() {
    roundtrip("tiny-qwen2");
}

#[test]
fn tiny_qwen3_through_gguf() {
    // llama.cpp's "qwen3": q/k norms, head size from `attention.key_length` (64 ≠ 256 / 8).
    roundtrip("tiny-qwen3");
}

#[test]
fn tiny_phi3_through_gguf() {
    // llama.cpp's "phi3": `attn_qkv` and `ffn_up` (gate then up) fused, partial rotary from
    // `rope.dimension_count`.
    roundtrip("tiny-phi3");
}

#[test]
fn tiny_phi3_longrope_through_gguf() {
    // LongRoPE's factors as the tensors `rope_factors_long` / `rope_factors_short`.
    roundtrip("tiny-phi3-longrope");
}

#[test]
fn tiny_gemma3_through_gguf() {
    // Norms stored as 1 + w, q/k norms, the local rope base in `rope.freq_base_swa`, the
    // layers' pattern (sliding, sliding, full) in `attention.sliding_window_pattern`.
    roundtrip("tiny-gemma3");
}

#[test]
fn tiny_gemma2_through_gguf() {
    // GGUF has no key for `query_pre_attn_scalar`: llama.cpp scales by head_dim's root but for
    // the 27B (46 layers; hidden / heads), and so does the import. The tiny model's 48 ≠
    // head_dim 32: with the config's own scale put back, the logits are transformers'.
    let config = roundtrip_with("tiny-gemma2", |config| {
        assert_eq!(config["query_pre_attn_scalar"], 32);
        assert_eq!(config["attn_logit_softcapping"], 50.0);
        assert_eq!(config["final_logit_softcapping"], 30.0);
        config["query_pre_attn_scalar"] = 48.into();
    });
    assert_eq!(config.window(0), Some(32));
    assert_eq!(config.window(1), None);
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let tiny = testkit::tiny("tiny-llama");
    let dir = tiny.dir.clone();
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("model.gguf");
    write_gguf(&dir, &gguf);
    let bytes = std::fs::read(&gguf).unwrap();
    for cut in [100, bytes.len() - 1000] {
        std::fs::write(&gguf, &bytes[..cut]).unwrap();
        let out = tmp.path().join("out");
        let err = import_gguf(&gguf, &out, OutputDtype::F32, false, DEFAULT_MAX_SHARD_BYTES)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.gguf") && err.contains("truncated"), "{err}");
        assert!(!out.exists(), "nothing may be written for a bad input");
    }
    std::fs::write(&gguf, b"not a gguf file at all").unwrap();
    let err = import_gguf(
        &gguf,
        &tmp.path().join("out"),
        OutputDtype::F32,
        false,
        DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("bad magic"), "{err}");
}

#[test]
fn existing_output_is_not_overwritten() {
    let tiny = testkit::tiny("tiny-llama");
    let dir = tiny.dir.clone();
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("model.gguf");
    write_gguf(&dir, &gguf);
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"mine").unwrap();
    let err = import_gguf(&gguf, &out, OutputDtype::F32, false, DEFAULT_MAX_SHARD_BYTES)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"mine");
    import_gguf(&gguf, &out, OutputDtype::F16, true, DEFAULT_MAX_SHARD_BYTES).unwrap();
    assert!(!out.join("keep.txt").exists());
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(
        ck.tensor("model.norm.weight").unwrap().dtype(),
        safetensors::Dtype::F16
    );
}
