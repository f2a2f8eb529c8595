//! Synthetic checkpoints at real shapes: a Hugging Face folder (the configuration, weights in
//! shards with their index, a byte-level tokenizer) whose weights are a pure function of the
//! seed, the tensor's name and the element's index. Tests, benchmarks and dry runs of a zoo
//! (memory, time, disk) use them before anything is downloaded.
//!
//! Scales are those of a trained model's: a matrix with `in_features` inputs is uniform with
//! standard deviation `1/√in_features` (so activations keep their size through the layers),
//! norm weights apply as `1 ± 0.1` (stored as `± 0.1` where the family adds 1, as Gemma's),
//! biases `± 0.02`; the embedding is uniform in `[-1, 1]` as the first layer sees it (divided
//! by the family's embedding multiplier), or where it is also the lm_head, a matrix of
//! `hidden` inputs (otherwise each hidden state, which holds its token's embedding, would give
//! that token a logit near `hidden / 3` and perplexities past f64's range).

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::names::{EMBED_TOKENS, required_tensors};
use crate::writer::{CheckpointStream, TensorSpec};
use crate::{Error, Result, atomic};

/// How a synthetic checkpoint is made.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Element type of every tensor: bf16, f16 or f32.
    pub dtype: Dtype,
    /// Keep only the first this many layers (fast runs at real widths).
    pub layers: Option<usize>,
    pub seed: u64,
    /// The largest weights file; more is written as shards with an index.
    pub max_shard_bytes: u64,
}

/// What [`synthesize`] wrote.
#[derive(Clone, Debug)]
pub struct SynthSummary {
    pub config: ModelConfig,
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Weights files written.
    pub files: usize,
}

/// FNV-1a (64-bit) of the seed and the tensor's name: each tensor's own stream.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    seed.to_le_bytes()
        .iter()
        .chain(name.as_bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// splitmix64's output for state `x`: element `i` of a tensor is `mix(seed + i)`, so any part
/// of any tensor is computed on its own, in parallel, the same on every machine.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform in [-1, 1) from the top 24 bits.
fn uniform(x: u64) -> f32 {
    (x >> 40) as f32 * (2.0 / (1u64 << 24) as f32) - 1.0
}

/// `offset + scale · u` for a tensor of `config`'s: its distribution by its role.
fn distribution(config: &ModelConfig, name: &str, shape: &[usize]) -> (f32, f32) {
    if name.ends_with("norm.weight") {
        (1.0 - config.norm_offset, 0.1)
    } else if name.ends_with(".bias") {
        (0.0, 0.02)
    } else if name == EMBED_TOKENS && !config.tie_word_embeddings {
        (0.0, 1.0 / config.embedding_multiplier)
    } else {
        // Uniform on [-a, a] has standard deviation a/√3.
        let in_features = *shape.last().unwrap_or(&1) as f32;
        (0.0, 3f32.sqrt() / in_features.sqrt())
    }
}

/// The bytes of one synthetic tensor of `config`'s.
pub fn tensor_bytes(config: &ModelConfig, seed: u64, spec: &TensorSpec) -> Result<Vec<u8>> {
    let width = match spec.dtype {
        Dtype::BF16 | Dtype::F16 => 2,
        Dtype::F32 => 4,
        other => {
            return Err(Error::Invalid(format!(
                "synthetic tensors are bf16, f16 or f32, not {other:?}"
            )));
        }
    };
    let base = tensor_seed(seed, &spec.name);
    let (offset, scale) = distribution(config, &spec.name, &spec.shape);
    let numel: usize = spec.shape.iter().product();
    let mut bytes = vec![0u8; numel * width];
    const CHUNK: usize = 1 << 16;
    bytes
        .par_chunks_mut(CHUNK * width)
        .enumerate()
        .for_each(|(c, out)| {
            for (k, element) in out.chunks_exact_mut(width).enumerate() {
                let i = (c * CHUNK + k) as u64;
                let v = offset + scale * uniform(mix(base.wrapping_add(i)));
                match spec.dtype {
                    Dtype::BF16 => element.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
                    Dtype::F16 => element.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
                    _ => element.copy_from_slice(&v.to_le_bytes()),
                }
            }
        });
    Ok(bytes)
}

/// The configuration at `path` (a `config.json` or a folder holding one), truncated and
/// typed as `options` say.
fn synthetic_config(path: &Path, options: &SynthOptions) -> Result<(Value, ModelConfig)> {
    let file: PathBuf = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_owned()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let mut value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: file.clone(),
        source,
    })?;
    let object = value
        .as_object_mut()
        .ok_or_else(|| Error::Invalid(format!("{}: not a JSON object", file.display())))?;
    if object.contains_key("quantization_config") {
        return Err(Error::Invalid(format!(
            "{}: a quantized model's configuration; synthetic checkpoints are dense (remove quantization_config)",
            file.display()
        )));
    }
    if let Some(layers) = options.layers {
        let total = object
            .get("num_hidden_layers")
            .and_then(Value::as_u64)
            .unwrap_or(0) as usize;
        if layers == 0 || layers > total {
            return Err(Error::Invalid(format!(
                "--layers {layers}: the model has {total} layers (need 1 to {total})"
            )));
        }
        object.insert("num_hidden_layers".into(), layers.into());
        // The first layers' types (Gemma's windows; transformers 5 lists them for every family).
        if let Some(Value::Array(types)) = object.get_mut("layer_types") {
            types.truncate(layers);
        }
    }
    let torch_dtype = match options.dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F32 => "float32",
        other => {
            return Err(Error::Invalid(format!(
                "synthetic tensors are bf16, f16 or f32, not {other:?}"
            )));
        }
    };
    object.insert("torch_dtype".into(), torch_dtype.into());
    let config = ModelConfig::from_json(&value, &file)?;
    if config.vocab_size < 256 {
        return Err(Error::Invalid(format!(
            "{}: vocab_size {} is below the 256 tokens of the byte-level tokenizer",
            file.display(),
            config.vocab_size
        )));
    }
    Ok((value, config))
}

/// Writes a synthetic checkpoint of the configuration at `config_path` into `out` (built under
/// a temporary name, renamed when complete; an existing non-empty `out` only with `replace`).
/// Tensors are generated and written one at a time: peak memory is the largest tensor.
pub fn synthesize(
    config_path: &Path,
    out: &Path,
    options: &SynthOptions,
    replace: bool,
) -> Result<SynthSummary> {
    if atomic::is_occupied(out) && !replace {
        return Err(Error::Invalid(format!(
            "{}: already exists and is not empty (choose another output folder or pass --force)",
            out.display()
        )));
    }
    let (value, config) = synthetic_config(config_path, options)?;
    let specs: Vec<TensorSpec> = required_tensors(&config)
        .into_iter()
        .map(|info| TensorSpec::from_info(info, options.dtype))
        .collect();
    let bytes = specs.iter().map(TensorSpec::bytes).sum();
    let tensors = specs.len();
    let files = atomic::write_dir::<_, Error>(out, replace, |dir| {
        let metadata = [("format".to_string(), "pt".to_string())].into_iter().collect();
        let mut stream = CheckpointStream::create(dir, specs.clone(), options.max_shard_bytes, metadata)?;
        let files = stream.files().count();
        for spec in &specs {
            stream.write(&spec.name, &tensor_bytes(&config, options.seed, spec)?)?;
        }
        stream.finish()?;
        let config_text = serde_json::to_string_pretty(&value).expect("JSON values serialize");
        atomic::write_file(&dir.join("config.json"), config_text.as_bytes())?;
        write_byte_tokenizer(dir, config.vocab_size)?;
        Ok(files)
    })?;
    Ok(SynthSummary {
        config,
        tensors,
        bytes,
        files,
    })
}

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others are
/// shifted past 255. Token `b` of a byte-level vocabulary is `byte_level_alphabet()[b]`.
pub fn byte_level_alphabet() -> Vec<String> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut shifted = 0;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                shifted += 1;
                255 + shifted
            };
            char::from_u32(c).expect("valid char").to_string()
        })
        .collect()
}

/// Writes `dir/tokenizer.json`: a byte-level BPE without merges whose ids 0..256 are the
/// bytes, padded with `<extra_i>` special tokens up to `vocab` entries (which text never
/// produces).
pub fn write_byte_tokenizer(dir: &Path, vocab: usize) -> Result<()> {
    use tokenizers::models::bpe::{BPE, Vocab};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let path = dir.join("tokenizer.json");
    let failed = |message: String| Error::Tokenizer {
        path: path.clone(),
        message,
    };
    let mut map = Vocab::default();
    for (i, t) in byte_level_alphabet().into_iter().enumerate() {
        map.insert(t, i as u32);
    }
    let extra: Vec<String> = (256..vocab).map(|i| format!("<extra_{i}>")).collect();
    for (i, t) in extra.iter().enumerate() {
        map.insert(t.clone(), (256 + i) as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(map, Vec::new())
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::new(
        true, true, true,
    )));
    tok.add_special_tokens(extra.into_iter().map(|t| tokenizers::AddedToken::from(t, true)))
        .map_err(|e| failed(e.to_string()))?;
    tok.save(&path, false).map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Checkpoint;

    fn options(layers: usize, max_shard_bytes: u64) -> SynthOptions {
        SynthOptions {
            dtype: Dtype::BF16,
            layers: Some(layers),
            seed: 7,
            max_shard_bytes,
        }
    }

    fn small_config(dir: &Path) -> PathBuf {
        let path = dir.join("config.json");
        let config = serde_json::json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 300, "tie_word_embeddings": false});
        std::fs::write(&path, config.to_string()).unwrap();
        path
    }

    #[test]
    fn weights_are_a_function_of_seed_and_name_at_the_asked_scale() {
        let tmp = tempfile::tempdir().unwrap();
        let config = small_config(tmp.path());
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let summary = synthesize(&config, &a, &options(2, 40_000), false).unwrap();
        synthesize(&config, &b, &options(2, u64::MAX), false).unwrap();
        assert_eq!(summary.config.num_hidden_layers, 2);
        assert!(summary.files > 1 && a.join("model.safetensors.index.json").is_file());
        assert!(b.join("model.safetensors").is_file(), "one file when it fits");
        let (a, b) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
        assert_eq!(a.names(), b.names());
        for name in a.names() {
            assert_eq!(
                a.tensor(name).unwrap().bytes(),
                b.tensor(name).unwrap().bytes(),
                "{name}"
            );
        }
        let q = a
            .tensor("model.layers.1.self_attn.q_proj.weight")
            .unwrap()
            .to_f32()
            .unwrap();
        let std = (q.iter().map(|v| v * v).sum::<f32>() / q.len() as f32).sqrt();
        assert!((std * 8.0 - 1.0).abs() < 0.05, "std {std} vs 1/√64");
        let norm = a.tensor("model.norm.weight").unwrap().to_f32().unwrap();
        assert!(norm.iter().all(|v| (0.89..=1.11).contains(v)));
        // Another seed, other weights; two tensors of one shape differ too.
        let k = a
            .tensor("model.layers.1.self_attn.k_proj.weight")
            .unwrap()
            .to_f32()
            .unwrap();
        let v = a
            .tensor("model.layers.1.self_attn.v_proj.weight")
            .unwrap()
            .to_f32()
            .unwrap();
        assert_ne!(&*k, &*v);
    }

    /// A Gemma 2 configuration listing its layers' types, cut to its first layer: the list is
    /// cut too, and the norms are stored as Gemma stores them (`w`, applied as `1 + w`).
    #[test]
    fn fewer_layers_keep_their_types_and_gemma_norms_their_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.json");
        let config = serde_json::json!({"architectures": ["Gemma2ForCausalLM"], "hidden_size": 64,
            "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6, "vocab_size": 300,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]});
        std::fs::write(&path, config.to_string()).unwrap();
        let out = tmp.path().join("one");
        let summary = synthesize(&path, &out, &options(1, u64::MAX), false).unwrap();
        assert_eq!(
            summary.config.layer_types,
            vec![crate::LayerType::SlidingAttention]
        );
        let norm = Checkpoint::open(&out)
            .unwrap()
            .tensor("model.layers.0.pre_feedforward_layernorm.weight")
            .unwrap()
            .to_f32()
            .unwrap();
        assert!(
            norm.iter().all(|w| (-0.11..=0.11).contains(w)),
            "{:?}",
            &norm[..4]
        );
    }

    #[test]
    fn bad_requests_are_refused_naming_them() {
        let tmp = tempfile::tempdir().unwrap();
        let config = small_config(tmp.path());
        let err = synthesize(&config, &tmp.path().join("x"), &options(5, u64::MAX), false).unwrap_err();
        assert!(
            err.to_string().contains("--layers 5: the model has 4 layers"),
            "{err}"
        );
        assert!(!tmp.path().join("x").exists());
        let bad = SynthOptions {
            dtype: Dtype::I32,
            ..options(1, u64::MAX)
        };
        assert!(synthesize(&config, &tmp.path().join("y"), &bad, false).is_err());
    }
}
