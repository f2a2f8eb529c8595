//! GGUF → Hugging Face checkpoint folder: safetensors with HF names and layouts,
//! `config.json`, and the tokenizer files.

use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::{Value, json};

use super::reader::{GgufFile, GgufTensor, MetaValue};
use super::vocab::{GgufTokenizer, SpecialTokens, build_tokenizer, special_tokens};
use crate::config::{Architecture, ModelConfig};
use crate::writer::{CheckpointStream, TensorSpec};
use crate::{Error, Result, atomic};

/// Element type of the written safetensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OutputDtype {
    /// Exact: every dequantized value is representable.
    #[default]
    F32,
    F16,
    BF16,
}

impl OutputDtype {
    /// The name used in `config.json` (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            OutputDtype::F32 => "float32",
            OutputDtype::F16 => "float16",
            OutputDtype::BF16 => "bfloat16",
        }
    }
}

/// What an import produced.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    pub config: ModelConfig,
    pub tensors: usize,
    pub safetensors_bytes: u64,
}

/// Hyper-parameters read from `{arch}.*` keys.
struct Hparams {
    architecture: Architecture,
    /// llama.cpp's converter permutes q/k rows of "llama" models for its rotary layout.
    permuted_qk: bool,
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rms_eps: f64,
    rope_theta: f64,
    context: Option<u64>,
    vocab: usize,
    /// The rope scaling `rope_parameters` holds beside `rope_theta` and `rope_type` (Gemma 3's
    /// linear factor, Phi-3's LongRoPE factors), if any.
    rope_scaling: Option<Value>,
    /// `config.json` keys of the family that llama.cpp stores in its own keys or derives
    /// (soft-capping, windows, partial rotary, the attention scale).
    family: serde_json::Map<String, Value>,
}

/// Phi-3's LongRoPE factors, stored by llama.cpp as tensors of their own (not weights).
const ROPE_FACTORS: [&str; 2] = ["rope_factors_long.weight", "rope_factors_short.weight"];

fn hparams(gguf: &GgufFile, vocab: usize) -> Result<Hparams> {
    let arch = gguf.get_str("general.architecture")?;
    let (architecture, permuted_qk) = match arch {
        "llama" => (Architecture::Llama, true),
        "qwen2" => (Architecture::Qwen2, false),
        "qwen3" => (Architecture::Qwen3, false),
        "phi3" => (Architecture::Phi3, false),
        "gemma2" => (Architecture::Gemma2, false),
        "gemma3" => (Architecture::Gemma3, false),
        other => {
            return Err(gguf.error(format!(
                "general.architecture = `{other}` is not supported (supported: llama, qwen2, qwen3, phi3, gemma2, gemma3)"
            )));
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let usize_key = |k: &str| gguf.get_u64(&key(k)).map(|v| v as usize);
    let hidden = usize_key("embedding_length")?;
    let heads = usize_key("attention.head_count")?;
    let kv_heads = match gguf.metadata.get(&key("attention.head_count_kv")) {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| gguf.error(format!("`{}` is not an integer", key("attention.head_count_kv"))))?
            as usize,
        None => heads,
    };
    let head_dim = match gguf.metadata.get(&key("attention.key_length")) {
        Some(v) => v.as_u64().unwrap_or(0) as usize,
        None if heads > 0 && hidden % heads == 0 => hidden / heads,
        None => 0,
    };
    if heads == 0 || kv_heads == 0 || head_dim == 0 {
        return Err(gguf.error(format!(
            "{hidden} embedding features do not split into {heads} heads (and no `{}` says the head size)",
            key("attention.key_length")
        )));
    }
    let mut family = serde_json::Map::new();
    let f64_key = |k: &str| gguf.metadata.get(&key(k)).and_then(MetaValue::as_f64);
    let u64_key = |k: &str| gguf.metadata.get(&key(k)).and_then(MetaValue::as_u64);
    if let Some(rot) = u64_key("rope.dimension_count")
        && rot as usize != head_dim
    {
        // Phi-3's partial rotary (Phi-4-mini rotates 3/4 of each head).
        if architecture != Architecture::Phi3 {
            return Err(gguf.error(format!(
                "partial rotary embeddings ({rot} of {head_dim} dimensions) are not supported for `{arch}`"
            )));
        }
        family.insert(
            "partial_rotary_factor".into(),
            (rot as f64 / head_dim as f64).into(),
        );
    }
    let mut rope_scaling = None;
    if gguf.metadata.contains_key(&key("rope.scaling.type")) {
        let kind = gguf.get_str(&key("rope.scaling.type")).unwrap_or("?");
        match (kind, f64_key("rope.scaling.factor")) {
            ("none", _) => {}
            // Gemma 3 (4B and up): linear on the full-attention layers only.
            ("linear", Some(factor)) if architecture == Architecture::Gemma3 => {
                rope_scaling = Some(json!({"rope_type": "linear", "factor": factor}));
            }
            ("linear", None) if architecture == Architecture::Gemma3 => {
                return Err(gguf.error(format!(
                    "rope scaling `linear` without `{}`",
                    key("rope.scaling.factor")
                )));
            }
            _ => return Err(gguf.error(format!("rope scaling `{kind}` is not supported for `{arch}`"))),
        }
    }
    let layers = usize_key("block_count")?;
    // The attention scale llama.cpp derives: hidden / heads for the 27B models (46 layers of
    // Gemma 2, 62 of Gemma 3; their query_pre_attn_scalar), head_dim otherwise.
    let query_pre_attn_scalar = |big: usize| match layers == big {
        true => hidden / heads,
        false => head_dim,
    };
    match architecture {
        Architecture::Gemma2 => {
            family.insert(
                "attn_logit_softcapping".into(),
                f64_key("attn_logit_softcapping").unwrap_or(50.0).into(),
            );
            family.insert(
                "final_logit_softcapping".into(),
                f64_key("final_logit_softcapping").unwrap_or(30.0).into(),
            );
            family.insert(
                "sliding_window".into(),
                u64_key("attention.sliding_window").unwrap_or(4096).into(),
            );
            family.insert("query_pre_attn_scalar".into(), query_pre_attn_scalar(46).into());
        }
        Architecture::Gemma3 => {
            if let Some(cap) = f64_key("final_logit_softcapping").filter(|&c| c > 0.0) {
                family.insert("final_logit_softcapping".into(), cap.into());
            }
            if let Some(window) = u64_key("attention.sliding_window").filter(|&w| w > 0) {
                family.insert("sliding_window".into(), window.into());
                // llama.cpp's `attention.sliding_window_pattern`: a period (every n-th layer
                // full; 6 where absent) or one flag per layer (true: sliding).
                match gguf.metadata.get(&key("attention.sliding_window_pattern")) {
                    Some(MetaValue::Array(flags)) => {
                        let types = flags
                            .iter()
                            .map(|f| match f {
                                MetaValue::Bool(true) => Ok("sliding_attention"),
                                MetaValue::Bool(false) => Ok("full_attention"),
                                _ => Err(gguf.error(format!(
                                    "`{}` holds {f:?}, not a flag per layer",
                                    key("attention.sliding_window_pattern")
                                ))),
                            })
                            .collect::<Result<Vec<_>>>()?;
                        family.insert("layer_types".into(), types.into());
                    }
                    Some(period) => {
                        let period = period.as_u64().ok_or_else(|| {
                            gguf.error(format!(
                                "`{}` is neither a period nor a flag per layer",
                                key("attention.sliding_window_pattern")
                            ))
                        })?;
                        family.insert("sliding_window_pattern".into(), period.into());
                    }
                    None => {
                        family.insert("sliding_window_pattern".into(), 6.into());
                    }
                }
            } else {
                // No window in the file: llama.cpp slides nowhere (transformers would default
                // to 4096).
                family.insert("sliding_window".into(), Value::Null);
            }
            family.insert(
                "rope_local_base_freq".into(),
                f64_key("rope.freq_base_swa").unwrap_or(10_000.0).into(),
            );
            family.insert("query_pre_attn_scalar".into(), query_pre_attn_scalar(62).into());
        }
        Architecture::Phi3 => {
            if let Some(window) = u64_key("attention.sliding_window").filter(|&w| w > 0) {
                family.insert("sliding_window".into(), window.into());
            }
            let original = u64_key("rope.scaling.original_context_length");
            if let Some(original) = original {
                family.insert("original_max_position_embeddings".into(), original.into());
            }
            // LongRoPE: the factors are tensors; the original context a key.
            if let [Some(long), Some(short)] = ROPE_FACTORS.map(|n| gguf.tensor(n)) {
                let factors = |t| -> Result<Value> { Ok(gguf.dequantize(t)?.into()) };
                let mut longrope = json!({
                    "rope_type": "longrope",
                    "long_factor": factors(long)?,
                    "short_factor": factors(short)?,
                });
                if let Some(a) = f64_key("rope.scaling.attn_factor") {
                    longrope["attention_factor"] = a.into();
                }
                if original.is_none() {
                    return Err(gguf.error(format!(
                        "LongRoPE factors without `{}`",
                        key("rope.scaling.original_context_length")
                    )));
                }
                rope_scaling = Some(longrope);
            }
        }
        _ => {}
    }
    Ok(Hparams {
        architecture,
        permuted_qk,
        layers,
        hidden,
        intermediate: usize_key("feed_forward_length")?,
        heads,
        kv_heads,
        head_dim,
        rms_eps: gguf.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: match gguf.metadata.get(&key("rope.freq_base")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| gguf.error(format!("`{}` is not a number", key("rope.freq_base"))))?,
            None => 10_000.0,
        },
        context: gguf
            .metadata
            .get(&key("context_length"))
            .and_then(MetaValue::as_u64),
        vocab: match gguf.metadata.get(&key("vocab_size")).and_then(MetaValue::as_u64) {
            Some(v) => v as usize,
            None => vocab,
        },
        rope_scaling,
        family,
    })
}

/// What a GGUF tensor becomes in the HF checkpoint.
struct Mapped {
    hf_name: String,
    /// Number of heads whose rows llama.cpp permuted, if any.
    unpermute_heads: Option<usize>,
    expected_shape: Vec<usize>,
}

fn map_tensor(gguf: &GgufFile, hp: &Hparams, name: &str) -> Result<Mapped> {
    let q = hp.heads * hp.head_dim;
    let kv = hp.kv_heads * hp.head_dim;
    let (h, i) = (hp.hidden, hp.intermediate);
    let unknown = || gguf.error(format!("tensor `{name}` has no Hugging Face counterpart we know"));
    let simple = |hf: &str, shape: Vec<usize>| Mapped {
        hf_name: hf.into(),
        unpermute_heads: None,
        expected_shape: shape,
    };
    match name {
        "token_embd.weight" => return Ok(simple("model.embed_tokens.weight", vec![hp.vocab, h])),
        "output_norm.weight" => return Ok(simple("model.norm.weight", vec![h])),
        "output.weight" => return Ok(simple("lm_head.weight", vec![hp.vocab, h])),
        _ => {}
    }
    let rest = name.strip_prefix("blk.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    if layer >= hp.layers {
        return Err(gguf.error(format!(
            "tensor `{name}` belongs to layer {layer}, but there are {} layers",
            hp.layers
        )));
    }
    let permute = |heads: usize| hp.permuted_qk.then_some(heads);
    let gemma = hp.architecture.is_gemma();
    let phi3 = hp.architecture == Architecture::Phi3;
    let qk_norm = matches!(hp.architecture, Architecture::Qwen3 | Architecture::Gemma3);
    let (hf, unpermute_heads, shape) = match rest {
        "attn_norm.weight" => ("input_layernorm.weight", None, vec![h]),
        // Gemma's MLP input norm; the others' (Gemma's post-attention norm has a name of its own).
        "ffn_norm.weight" if gemma => ("pre_feedforward_layernorm.weight", None, vec![h]),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None, vec![h]),
        "post_attention_norm.weight" if gemma => ("post_attention_layernorm.weight", None, vec![h]),
        "post_ffw_norm.weight" if gemma => ("post_feedforward_layernorm.weight", None, vec![h]),
        // Phi-3's fused projections stay fused, q/k/v rows and gate/up rows in HF's order.
        "attn_qkv.weight" if phi3 => ("self_attn.qkv_proj.weight", None, vec![q + 2 * kv, h]),
        "ffn_up.weight" if phi3 => ("mlp.gate_up_proj.weight", None, vec![2 * i, h]),
        "attn_q.weight" => ("self_attn.q_proj.weight", permute(hp.heads), vec![q, h]),
        "attn_k.weight" => ("self_attn.k_proj.weight", permute(hp.kv_heads), vec![kv, h]),
        "attn_v.weight" => ("self_attn.v_proj.weight", None, vec![kv, h]),
        "attn_output.weight" => ("self_attn.o_proj.weight", None, vec![h, q]),
        "attn_q.bias" => ("self_attn.q_proj.bias", permute(hp.heads), vec![q]),
        "attn_k.bias" => ("self_attn.k_proj.bias", permute(hp.kv_heads), vec![kv]),
        "attn_v.bias" => ("self_attn.v_proj.bias", None, vec![kv]),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None, vec![i, h]),
        "ffn_up.weight" => ("mlp.up_proj.weight", None, vec![i, h]),
        "ffn_down.weight" => ("mlp.down_proj.weight", None, vec![h, i]),
        "attn_q_norm.weight" if qk_norm => ("self_attn.q_norm.weight", None, vec![hp.head_dim]),
        "attn_k_norm.weight" if qk_norm => ("self_attn.k_norm.weight", None, vec![hp.head_dim]),
        _ => return Err(unknown()),
    };
    Ok(Mapped {
        hf_name: format!("model.layers.{layer}.{hf}"),
        unpermute_heads,
        expected_shape: shape,
    })
}

/// Undoes llama.cpp's rotary row permutation. Within each head of `d` rows, llama.cpp
/// stores HF row `p·d/2 + j` at row `2j + p` (interleaved halves).
fn unpermute_rows(values: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let rows = values.len() / row_len;
    let d = rows / heads;
    let mut out = vec![0f32; values.len()];
    for head in 0..heads {
        for j in 0..d / 2 {
            for p in 0..2 {
                let src = head * d + 2 * j + p;
                let dst = head * d + p * (d / 2) + j;
                out[dst * row_len..(dst + 1) * row_len]
                    .copy_from_slice(&values[src * row_len..(src + 1) * row_len]);
            }
        }
    }
    out
}

impl OutputDtype {
    /// The safetensors element type.
    fn dtype(self) -> Dtype {
        match self {
            OutputDtype::F32 => Dtype::F32,
            OutputDtype::F16 => Dtype::F16,
            OutputDtype::BF16 => Dtype::BF16,
        }
    }
}

fn encode(values: &[f32], dtype: OutputDtype) -> Vec<u8> {
    match dtype {
        OutputDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        OutputDtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        OutputDtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// What tensor `t` becomes: its Hugging Face name, shape and element type (checked against
/// the metadata before anything is converted).
fn plan(gguf: &GgufFile, hp: &Hparams, t: &GgufTensor, dtype: OutputDtype) -> Result<TensorSpec> {
    let mapped = map_tensor(gguf, hp, &t.name)?;
    let shape = t.torch_shape();
    if shape != mapped.expected_shape {
        return Err(gguf.error(format!(
            "tensor `{}` has shape {shape:?}, but the metadata implies {:?}",
            t.name, mapped.expected_shape
        )));
    }
    Ok(TensorSpec::new(mapped.hf_name, dtype.dtype(), &shape))
}

/// Tensor `t` dequantized, in Hugging Face's layout, as `dtype` bytes.
fn convert(gguf: &GgufFile, hp: &Hparams, t: &GgufTensor, dtype: OutputDtype) -> Result<Vec<u8>> {
    let mapped = map_tensor(gguf, hp, &t.name)?;
    let mut values = gguf.dequantize(t)?;
    if let Some(heads) = mapped.unpermute_heads {
        let shape = t.torch_shape();
        let row_len = if shape.len() == 2 { shape[1] } else { 1 };
        values = unpermute_rows(&values, heads, row_len);
    }
    // llama.cpp's converter stores Gemma's norm weights as the 1 + w they apply.
    if hp.architecture.is_gemma() && mapped.hf_name.ends_with("norm.weight") {
        values.iter_mut().for_each(|v| *v -= 1.0);
    }
    // Norm weights are kept in f32 like every other tensor unless a smaller dtype is asked for.
    Ok(encode(&values, dtype))
}

fn config_json(
    gguf: &GgufFile,
    hp: &Hparams,
    special: &SpecialTokens,
    tied: bool,
    dtype: OutputDtype,
) -> Value {
    let activation = match hp.architecture.is_gemma() {
        true => "gelu_pytorch_tanh",
        false => "silu",
    };
    let mut rope = json!({"rope_theta": hp.rope_theta, "rope_type": "default"});
    if let Some(Value::Object(scaling)) = &hp.rope_scaling {
        for (k, v) in scaling {
            rope[k] = v.clone();
        }
    }
    let mut config = json!({
        "architectures": [hp.architecture.hf_name()],
        "model_type": hp.architecture.model_type(),
        "hidden_act": activation,
        "hidden_size": hp.hidden,
        "intermediate_size": hp.intermediate,
        "num_hidden_layers": hp.layers,
        "num_attention_heads": hp.heads,
        "num_key_value_heads": hp.kv_heads,
        "head_dim": hp.head_dim,
        "rms_norm_eps": hp.rms_eps,
        "rope_theta": hp.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": tied,
        "vocab_size": hp.vocab,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "use_cache": true,
        "torch_dtype": dtype.torch_name(),
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "unk_token_id": special.unk,
    });
    let obj = config.as_object_mut().expect("json! object");
    if let Some(ctx) = hp.context {
        obj.insert("max_position_embeddings".into(), ctx.into());
    }
    match hp.architecture {
        Architecture::Qwen2 => {
            obj.insert("use_sliding_window".into(), false.into());
        }
        Architecture::Qwen3 => {
            obj.insert("use_sliding_window".into(), false.into());
            obj.insert("attention_bias".into(), false.into());
        }
        _ => {
            obj.insert("attention_bias".into(), false.into());
        }
    }
    if hp.architecture.is_gemma() {
        obj.insert("hidden_activation".into(), activation.into());
    }
    obj.extend(hp.family.clone());
    if let Some(name) = gguf.metadata.get("general.name").and_then(MetaValue::as_str) {
        obj.insert("_name_or_path".into(), name.into());
    }
    config
}

fn tokenizer_config_json(gguf: &GgufFile, tok: &GgufTokenizer) -> Value {
    let mut cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.special.add_bos,
        "add_eos_token": tok.special.add_eos,
        "clean_up_tokenization_spaces": false,
    });
    let obj = cfg.as_object_mut().expect("json! object");
    for (key, id) in [
        ("bos_token", tok.special.bos),
        ("eos_token", tok.special.eos),
        ("unk_token", tok.special.unk),
        ("pad_token", tok.special.pad),
    ] {
        if let Some(t) = tok.token(id) {
            obj.insert(key.into(), t.into());
        }
    }
    if let Some(t) = gguf
        .metadata
        .get("tokenizer.chat_template")
        .and_then(MetaValue::as_str)
    {
        obj.insert("chat_template".into(), t.into());
    }
    cfg
}

fn special_tokens_map_json(tok: &GgufTokenizer) -> Value {
    let mut map = serde_json::Map::new();
    for (key, id) in [
        ("bos_token", tok.special.bos),
        ("eos_token", tok.special.eos),
        ("unk_token", tok.special.unk),
        ("pad_token", tok.special.pad),
    ] {
        if let Some(t) = tok.token(id) {
            map.insert(key.into(), t.into());
        }
    }
    Value::Object(map)
}

fn write_json(dir: &Path, name: &str, value: &Value) -> Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
}

/// The configuration the import of a GGUF file would write, read from its metadata alone
/// (no tensor is dequantized): enough to validate settings before any compute.
pub fn gguf_model_config(path: &Path) -> Result<ModelConfig> {
    let gguf = GgufFile::open(path)?;
    let vocab = gguf
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .map_or(0, <[MetaValue]>::len);
    let hp = hparams(&gguf, vocab)?;
    let tied = gguf.tensor("output.weight").is_none();
    let config = config_json(&gguf, &hp, &special_tokens(&gguf), tied, OutputDtype::F32);
    ModelConfig::from_json(&config, path)
}

/// Converts a GGUF file into a Hugging Face checkpoint folder at `out`.
///
/// The folder is built under a temporary name and renamed when complete; an existing
/// non-empty `out` is refused unless `replace` is set.
/// Tensors are converted a few at a time and streamed into the files; a checkpoint larger
/// than `max_shard_bytes` is written as Hugging Face shards with an index.
pub fn import_gguf(
    path: &Path,
    out: &Path,
    dtype: OutputDtype,
    replace: bool,
    max_shard_bytes: u64,
) -> Result<ImportSummary> {
    if atomic::is_occupied(out) && !replace {
        return Err(Error::Invalid(format!(
            "{}: already exists and is not empty (choose another output folder or pass --force)",
            out.display()
        )));
    }
    let gguf = GgufFile::open(path)?;
    let tok = build_tokenizer(&gguf)?;
    let hp = hparams(&gguf, tok.tokens.len())?;
    let tied = gguf.tensor("output.weight").is_none();
    // Every tensor's name, shape and type first: the files' headers are written before any
    // data, and the tensors are then converted a few at a time (peak memory: a few tensors,
    // not the model), in name order as safetensors' own writer orders them.
    let mut tensors: Vec<(&GgufTensor, TensorSpec)> = gguf
        .tensors
        .iter()
        .filter(|t| !ROPE_FACTORS.contains(&t.name.as_str()))
        .map(|t| plan(&gguf, &hp, t, dtype).map(|spec| (t, spec)))
        .collect::<Result<_>>()?;
    tensors.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let safetensors_bytes = tensors.iter().map(|(_, spec)| spec.bytes()).sum();
    let config = config_json(&gguf, &hp, &tok.special, tied, dtype);
    // Check that what we write is a model we can load.
    let parsed = ModelConfig::from_json(&config, &out.join("config.json"))?;
    for required in crate::names::required_tensors(&parsed) {
        if !tensors.iter().any(|(_, spec)| spec.name == required.name) {
            return Err(gguf.error(format!("the file has no tensor for `{}`", required.name)));
        }
    }
    let count = tensors.len();
    atomic::write_dir::<_, Error>(out, replace, |dir| {
        let metadata = [("format".to_string(), "pt".to_string())].into_iter().collect();
        let specs = tensors.iter().map(|(_, spec)| spec.clone()).collect();
        let mut stream = CheckpointStream::create(dir, specs, max_shard_bytes, metadata)?;
        for batch in tensors.chunks(rayon::current_num_threads().max(1)) {
            let converted: Vec<Vec<u8>> = batch
                .par_iter()
                .map(|(t, _)| convert(&gguf, &hp, t, dtype))
                .collect::<Result<_>>()?;
            for ((t, spec), bytes) in batch.iter().zip(converted) {
                gguf.release_pages(t);
                stream.write(&spec.name, &bytes)?;
            }
        }
        stream.finish()?;
        write_json(dir, "config.json", &config)?;
        let generation = json!({
            "bos_token_id": tok.special.bos,
            "eos_token_id": tok.special.eos,
            "pad_token_id": tok.special.pad,
        });
        write_json(dir, "generation_config.json", &generation)?;
        let tok_path = dir.join("tokenizer.json");
        tok.tokenizer
            .save(&tok_path, true)
            .map_err(|e| Error::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        write_json(dir, "tokenizer_config.json", &tokenizer_config_json(&gguf, &tok))?;
        write_json(dir, "special_tokens_map.json", &special_tokens_map_json(&tok))?;
        Ok(())
    })?;
    Ok(ImportSummary {
        config: parsed,
        tensors: count,
        safetensors_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Two heads of four rows, one column: HF rows 0..8.
        let hf: Vec<f32> = (0..8).map(|v| v as f32).collect();
        // llama.cpp's permute: per head, reshape (2, d/2) -> swap -> (d/2, 2).
        let permuted = [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0];
        assert_eq!(unpermute_rows(&permuted, 2, 1), hf);
    }
}
