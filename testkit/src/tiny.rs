//! The tiny reference models of `fixtures/tiny/`, generated bit for bit from their
//! `reference.json` (splitmix64 seeded with FNV-1a of the model and tensor name; the rule is
//! in `fixtures/README.md`), checked against each tensor's SHA-256, and written as an f32
//! `model.safetensors` into a temporary folder.

use std::path::{Path, PathBuf};

use checkpoint::digest::sha256_bytes;
use safetensors::tensor::TensorView;

/// The tiny reference models, by folder name.
pub const TINY_MODELS: [&str; 11] = [
    "tiny-gemma2",
    "tiny-gemma3",
    "tiny-llama",
    "tiny-llama-tied",
    "tiny-llama3",
    "tiny-mistral",
    "tiny-phi3",
    "tiny-phi3-longrope",
    "tiny-qwen2",
    "tiny-qwen2-yarn",
    "tiny-qwen3",
];

/// A generated tiny model: `dir` holds `config.json`, `model.safetensors` and
/// `reference.json`; the folder is removed when this value is dropped.
pub struct TinyModel {
    _tmp: tempfile::TempDir,
    /// The model folder.
    pub dir: PathBuf,
}

impl TinyModel {
    /// The temporary folder holding [`TinyModel::dir`], where a test can put files beside it.
    pub fn root(&self) -> &Path {
        self._tmp.path()
    }
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Value `i` of the splitmix64 stream seeded with `seed`.
pub fn splitmix64(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The integer `k ∈ [−2²², 2²²)` the generator draws at position `i`, as an exact f32.
fn draw(seed: u64, i: u64) -> f32 {
    ((splitmix64(seed, i) >> 41) as i64 - (1 << 22)) as f32
}

/// How a tensor's integers become weights.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// `x · s`.
    Scaled,
    /// `1 + x · s`, the product rounded to f32 first.
    Norm,
}

/// Generates tensor `tensor` of model `model`: `numel` f32 values.
fn generate(model: &str, tensor: &str, numel: usize, scale: f32, kind: Kind) -> Vec<f32> {
    let seed = fnv1a64(&format!("{model}/{tensor}"));
    (0..numel as u64)
        .map(|i| {
            let product = draw(seed, i) * scale;
            match kind {
                Kind::Scaled => product,
                Kind::Norm => 1.0 + product,
            }
        })
        .collect()
}

/// The input ids of `model`'s reference: `rows` rows of `len` ids below `vocab`.
pub fn input_ids(model: &str, rows: usize, len: usize, vocab: u64) -> Vec<Vec<u32>> {
    let seed = fnv1a64(&format!("{model}/input_ids"));
    (0..rows)
        .map(|r| {
            (0..len)
                .map(|c| (splitmix64(seed, (r * len + c) as u64) % vocab) as u32)
                .collect()
        })
        .collect()
}

fn parse_hex_u32(text: &str) -> u32 {
    u32::from_str_radix(text.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("scale_f32_bits {text:?}: {e}"))
}

/// Generates model `name` (one of [`TINY_MODELS`]) into a temporary folder.
///
/// Panics, naming the tensor, if a generated tensor's SHA-256 differs from `reference.json`:
/// that means the generator is wrong, and no test should run on its output.
pub fn tiny(name: &str) -> TinyModel {
    let src = crate::fixture(&format!("tiny/{name}"));
    let tmp = tempfile::tempdir().expect("temporary folder");
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).expect("create model folder");
    for file in ["config.json", "reference.json"] {
        std::fs::copy(src.join(file), dir.join(file)).expect("copy tiny model files");
    }
    write_weights(name, &dir);
    TinyModel { _tmp: tmp, dir }
}

/// [`tiny`] with a byte-level `tokenizer.json` (ids 0..256 are the bytes).
pub fn tiny_with_tokenizer(name: &str) -> TinyModel {
    let model = tiny(name);
    let vocab = crate::read_json(&model.dir.join("config.json"))["vocab_size"]
        .as_u64()
        .expect("vocab_size") as usize;
    crate::write_byte_tokenizer(&model.dir, vocab);
    model
}

fn write_weights(name: &str, dir: &Path) {
    let reference = crate::read_json(&dir.join("reference.json"));
    let entries = reference["tensors"].as_array().expect("reference.json: tensors");
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = entries
        .iter()
        .map(|t| {
            let tensor = t["name"].as_str().expect("tensor name");
            let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).expect("tensor shape");
            let kind = match t["kind"].as_str() {
                Some("matrix" | "bias") => Kind::Scaled,
                Some("norm") => Kind::Norm,
                other => panic!("{tensor}: unknown kind {other:?}"),
            };
            let scale = f32::from_bits(parse_hex_u32(t["scale_f32_bits"].as_str().expect("scale")));
            let values = generate(name, tensor, shape.iter().product(), scale, kind);
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let digest = sha256_bytes(&bytes);
            assert_eq!(
                digest,
                t["sha256_f32_le"].as_str().expect("sha256_f32_le"),
                "{name}/{tensor}: the generated tensor's SHA-256 differs from reference.json"
            );
            (tensor.to_string(), shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, bytes)| {
            let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).expect("tensor view");
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))
        .expect("write model.safetensors");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_vectors() {
        // The FNV reference test vectors (offset basis; "a"; "foobar").
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn splitmix64_matches_reference_stream() {
        // splitmix64 seeded with 0 (Vigna's reference implementation): its first outputs.
        assert_eq!(splitmix64(0, 0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(0, 1), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn every_model_generates_and_its_input_ids_match() {
        for name in TINY_MODELS {
            let model = tiny(name);
            let reference = crate::read_json(&model.dir.join("reference.json"));
            let want: Vec<Vec<u32>> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
            assert_eq!(input_ids(name, 2, 96, 512), want, "{name}");
            assert!(model.dir.join("model.safetensors").is_file());
        }
    }
}
