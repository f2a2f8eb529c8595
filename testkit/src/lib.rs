//! Test fixtures shared by the workspace's tests: the repository's own reference data
//! (`fixtures/`, `data/`), the tiny generated models, and the SmolLM2 model that
//! `scripts/fetch-model.sh` fetches and imports.
//!
//! Everything a test reads lives inside the repository, except SmolLM2 (≈ 100 MB, fetched by
//! the test command): a missing file is a failed test with the fix in its message, never a skip.

use std::path::{Path, PathBuf};

pub mod awq;
pub mod machine;
pub mod reference;
pub mod skip;
pub mod tiny;

pub use tiny::{TINY_MODELS, TinyModel, tiny, tiny_with_tokenizer};

/// The workspace root: where this crate was built, or `AWQ_WORKSPACE_DIR` for test binaries
/// copied to another machine with the repository's `data/` and `fixtures/`
/// (`scripts/gpu-bundle.sh`).
pub fn workspace_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("AWQ_WORKSPACE_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives inside the workspace")
        .to_path_buf()
}

pub use checkpoint::cache::cache_dir;

fn existing(path: PathBuf, hint: &str) -> PathBuf {
    assert!(path.exists(), "{} not found ({hint})", path.display());
    path
}

/// A file of the repository's `data/` folder (evaluation and calibration text).
pub fn data(name: &str) -> PathBuf {
    existing(
        workspace_root().join("data").join(name),
        "it is part of the repository",
    )
}

/// `data/wiki.test.raw`: the wikitext-2 raw test split.
pub fn wiki_test() -> PathBuf {
    data("wiki.test.raw")
}

/// `data/wikitext2-valid.txt`: the calibration text.
pub fn calib_text() -> PathBuf {
    data("wikitext2-valid.txt")
}

/// A file or folder of the repository's `fixtures/` folder.
pub fn fixture(relative: &str) -> PathBuf {
    existing(
        workspace_root().join("fixtures").join(relative),
        "it is part of the repository",
    )
}

const FETCH_HINT: &str = "run scripts/fetch-model.sh, which the test command scripts/test.sh runs first";

/// The SmolLM2-135M-Instruct Q4_1 GGUF file (fetched by `scripts/fetch-model.sh`).
pub fn smollm2_gguf() -> PathBuf {
    existing(cache_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"), FETCH_HINT)
}

/// The SmolLM2 checkpoint imported in f32 (by `scripts/fetch-model.sh`).
pub fn smollm2_f32() -> PathBuf {
    let dir = cache_dir().join("smollm2-135m-f32");
    existing(dir.join("config.json"), FETCH_HINT);
    dir
}

/// SHA-256 (hex) of token ids as u32 little-endian, the form the fixtures record.
pub fn sha256_u32_le(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
    checkpoint::digest::sha256_bytes(&bytes)
}

/// Reads and parses a JSON file, panicking with its path on failure.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub use checkpoint::synth::byte_level_alphabet;

/// Writes `dir/tokenizer.json`: a byte-level BPE without merges whose ids 0..256 are the
/// bytes, padded with `<extra_i>` special tokens up to `vocab` entries.
pub fn write_byte_tokenizer(dir: &Path, vocab: usize) {
    checkpoint::synth::write_byte_tokenizer(dir, vocab).expect("write tokenizer.json");
}

/// Shape of a synthetic Llama model.
#[derive(Clone, Debug)]
pub struct SyntheticLlama {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub seed: u64,
}

impl SyntheticLlama {
    /// Writes `config.json`, `model.safetensors` (f32, weights N(0, 1/in_features)-like
    /// uniform, norms around 1) and a byte-level `tokenizer.json` into `dir`.
    pub fn write(&self, dir: &Path) {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        std::fs::create_dir_all(dir).expect("create model folder");
        let head_dim = self.hidden / self.heads;
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": head_dim, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": false, "vocab_size": self.vocab,
            "bos_token_id": null, "eos_token_id": null, "torch_dtype": "float32"
        });
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n: usize = shape.iter().product();
            let bytes = (0..n)
                .flat_map(|_| (offset + scale * rng.random_range(-1.0f32..1.0)).to_le_bytes())
                .collect();
            tensors.push((name, shape, bytes));
        };
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let (q, kv) = (self.heads * head_dim, self.kv_heads * head_dim);
        let w = |fan_in: usize| 1.7 / (fan_in as f32).sqrt();
        put("model.embed_tokens.weight".into(), vec![v, h], 1.0, 0.0);
        put("lm_head.weight".into(), vec![v, h], w(h), 0.0);
        put("model.norm.weight".into(), vec![h], 0.2, 1.0);
        for l in 0..self.layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            put(p("input_layernorm.weight"), vec![h], 0.2, 1.0);
            put(p("post_attention_layernorm.weight"), vec![h], 0.2, 1.0);
            put(p("self_attn.q_proj.weight"), vec![q, h], w(h), 0.0);
            put(p("self_attn.k_proj.weight"), vec![kv, h], w(h), 0.0);
            put(p("self_attn.v_proj.weight"), vec![kv, h], w(h), 0.0);
            put(p("self_attn.o_proj.weight"), vec![h, q], w(q), 0.0);
            put(p("mlp.gate_proj.weight"), vec![i, h], w(h), 0.0);
            put(p("mlp.up_proj.weight"), vec![i, h], w(h), 0.0);
            put(p("mlp.down_proj.weight"), vec![h, i], w(i), 0.0);
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write weights");
        write_byte_tokenizer(dir, self.vocab);
    }
}

/// Calibration-like text: `lines` lines of varied words, deterministic.
pub fn synthetic_text(lines: usize) -> String {
    let words = [
        "the",
        "model",
        "weights",
        "are",
        "quantized",
        "to",
        "four",
        "bits",
        "with",
        "groups",
        "of",
        "scales",
        "and",
        "zero",
        "points",
        "while",
        "activations",
        "stay",
        "in",
        "float",
        "precision",
        "for",
        "every",
        "layer",
        "river",
        "mountain",
        "1234",
        "city",
        "music",
        "history",
        "is",
        "long",
    ];
    (0..lines)
        .map(|l| {
            let n = 8 + (l * 7) % 23;
            let line: Vec<&str> = (0..n)
                .map(|k| words[(l * 31 + k * 17 + k * k) % words.len()])
                .collect();
            line.join(" ") + ".\n"
        })
        .collect()
}

#[cfg(test)]
mod tests {
    /// The data files are the published bytes (`data/README.md`): a line-ending conversion or
    /// an edit would silently change every perplexity.
    #[test]
    fn data_files_have_their_published_hashes() {
        for (file, sha256) in [
            (
                "wiki.test.raw",
                "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
            ),
            (
                "wikitext2-valid.txt",
                "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            ),
        ] {
            let bytes = std::fs::read(super::data(file)).unwrap();
            assert_eq!(checkpoint::digest::sha256_bytes(&bytes), sha256, "data/{file}");
        }
    }
}
