//! `config.json` of a Hugging Face Llama-family checkpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// The model families we run; they share one decoder and differ in biases and defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `LlamaForCausalLM`.
    Llama,
    /// `MistralForCausalLM` (a Llama with an optional sliding window).
    Mistral,
    /// `Qwen2ForCausalLM` (a Llama with q/k/v biases).
    Qwen2,
    /// `Qwen3ForCausalLM` (a Llama with an RMS norm over each query and key head).
    Qwen3,
    /// `Phi3ForCausalLM` (Phi-3, Phi-3.5, Phi-4-mini: q/k/v and gate/up each stored as one
    /// fused projection, rotary embeddings over part of each head).
    Phi3,
    /// `Gemma2ForCausalLM`: (1 + w) norms around both blocks, GELU-tanh, scaled embeddings,
    /// soft-capped attention and logits, sliding-window attention on alternate layers.
    Gemma2,
    /// `Gemma3ForCausalLM` (text): Gemma 2 without soft-capping, with q/k head norms and a
    /// rope base of its own on the sliding-window layers.
    Gemma3,
}

impl Architecture {
    /// The class name transformers writes in `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Phi3 => "Phi3ForCausalLM",
            Architecture::Gemma2 => "Gemma2ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// The `model_type` transformers writes.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Phi3 => "phi3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3_text",
        }
    }

    /// Every architecture we run.
    pub const ALL: [Architecture; 7] = [
        Self::Llama,
        Self::Mistral,
        Self::Qwen2,
        Self::Qwen3,
        Self::Phi3,
        Self::Gemma2,
        Self::Gemma3,
    ];

    /// Gemma 2 or 3: the families whose blocks are normed on both sides.
    pub fn is_gemma(self) -> bool {
        matches!(self, Architecture::Gemma2 | Architecture::Gemma3)
    }

    /// Parses a class name from `architectures`.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }
}

/// The shape and constants of a Llama-family decoder, read from `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    /// How the rotary frequencies are scaled for long contexts.
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    /// q/k/v projections carry a bias (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Each query and key head is RMS-normed (over `head_dim`, weights `q_norm`, `k_norm`)
    /// before the rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// q/k/v are stored as one `qkv_proj` and gate/up as one `gate_up_proj`, their outputs one
    /// after another (Phi-3); the runtime and the search see them as separate projections.
    pub fused_projections: bool,
    /// The leading dimensions of each head that rotate (`head_dim × partial_rotary_factor`);
    /// the rest pass through.
    pub rotary_dim: usize,
    /// RMS norm weights are stored as `w` and scale by `norm_offset + w`: 1 for Gemma, whose
    /// norms multiply by `1 + w`, 0 otherwise. The runtime and the search hold the sum; a
    /// written checkpoint stores `w` again.
    pub norm_offset: f32,
    /// The activation of the MLP's gate.
    pub activation: Activation,
    /// Each block's output is RMS-normed before the residual add (`post_attention_layernorm`
    /// after attention, `post_feedforward_layernorm` after the MLP), and the MLP's input norm
    /// is `pre_feedforward_layernorm` (Gemma).
    pub sandwich_norms: bool,
    /// Multiplies the embeddings entering the first layer (√hidden for Gemma, 1 otherwise).
    pub embedding_multiplier: f32,
    /// Attention scores are `q·k / √query_pre_attn_scalar`: head_dim unless the config sets it
    /// (Gemma).
    pub query_pre_attn_scalar: f64,
    /// Attention scores pass through `cap · tanh(score / cap)` before the softmax (Gemma 2).
    pub attn_logit_softcapping: Option<f32>,
    /// Logits pass through `cap · tanh(logit / cap)` (Gemma 2).
    pub final_logit_softcapping: Option<f32>,
    /// The attention of each layer: over every earlier key, or the last `sliding_window`.
    pub layer_types: Vec<LayerType>,
    /// Keys this many positions back or further are masked on the sliding-window layers.
    pub sliding_window: Option<usize>,
    /// The rope base of the sliding-window layers where it differs from `rope_theta` (Gemma 3's
    /// `rope_local_base_freq`); their rope is unscaled.
    pub local_rope_theta: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Present for AWQ checkpoints.
    pub quantization: Option<QuantizationConfig>,
    /// The element type the checkpoint's dense tensors are saved in (`torch_dtype`, or
    /// `dtype` in transformers 5): "float32", "float16" or "bfloat16".
    pub torch_dtype: Option<String>,
}

/// The activation of a gated MLP's gate: `down(act(gate(x)) · up(x))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x · sigmoid(x)` (`silu`).
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    /// Its name in `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }
}

/// What keys a layer's attention reads (`layer_types` in `config.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    /// Every earlier position (`full_attention`).
    FullAttention,
    /// The last `sliding_window` positions (`sliding_attention`).
    SlidingAttention,
}

/// How rotary frequencies are scaled for contexts longer than pre-training's:
/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5), by `rope_type`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// No scaling.
    #[default]
    Default,
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, those between
    /// interpolated smoothly.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: frequencies between `beta_fast` and `beta_slow` rotations over the original
    /// context ramped from kept to divided by `factor`; cos and sin scaled by
    /// `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// Whether the ramp's ends are rounded to whole dimensions (transformers' default).
        truncate: bool,
        attention_factor: f64,
    },
    /// LongRoPE (Phi-3 and Phi-4 128k): one rescale factor per frequency, the short list up to
    /// the original context and the long list beyond it; cos and sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

/// `quantization_config` of an AWQ checkpoint in the "gemm" layout: 4-bit weights with a zero
/// point, grouped along the input dimension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    pub group_size: usize,
    /// Module names (or name fragments) left unquantized.
    pub modules_to_not_convert: Vec<String>,
}

impl QuantizationConfig {
    /// The `quantization_config` object written into `config.json`; the keys vLLM,
    /// transformers, LMDeploy and TGI read.
    pub fn to_json(&self) -> Value {
        let modules = if self.modules_to_not_convert.is_empty() {
            Value::Null
        } else {
            self.modules_to_not_convert.clone().into()
        };
        serde_json::json!({
            "quant_method": "awq",
            "bits": 4,
            "group_size": self.group_size,
            "zero_point": true,
            "version": "gemm",
            "modules_to_not_convert": modules,
        })
    }

    /// Whether the projection at `module_path` (e.g. `model.layers.3.mlp.up_proj`) is quantized.
    pub fn converts(&self, module_path: &str) -> bool {
        !self
            .modules_to_not_convert
            .iter()
            .any(|m| module_path.contains(m.as_str()))
    }
}

impl ModelConfig {
    /// Parameters in all: embeddings, every layer's projections, biases and norms, the final
    /// norm and an untied lm_head.
    pub fn parameters(&self) -> u64 {
        let (h, i) = (self.hidden_size as u64, self.intermediate_size as u64);
        let (q, kv) = (self.q_features() as u64, self.kv_features() as u64);
        let mut layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias {
            layer += q + 2 * kv;
        }
        if self.o_bias {
            layer += h;
        }
        if self.qk_norm {
            layer += 2 * self.head_dim as u64;
        }
        if self.sandwich_norms {
            layer += 2 * h;
        }
        let embed = self.vocab_size as u64 * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + h + self.num_hidden_layers as u64 * layer
    }

    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&value, path)
    }

    /// Checks a parsed `config.json`; `path` is only used in error messages.
    pub fn from_json(value: &Value, path: &Path) -> Result<Self> {
        let keys = Keys {
            map: value.as_object().ok_or_else(|| Error::BadValue {
                path: path.to_owned(),
                key: "(top level)".into(),
                message: "expected a JSON object".into(),
            })?,
            path: path.to_owned(),
        };
        let architecture = keys.architecture()?;
        let gemma = architecture.is_gemma();
        // Where a key is absent, transformers' default for the family (Gemma2Config,
        // Gemma3TextConfig: head_dim 256, query_pre_attn_scalar 256, window 4096, Gemma 2's caps
        // 50 and 30, Gemma 3's rope base 1,000,000); `null` is absent where transformers
        // allows it (no cap, no window).
        let gemma_default = |key: &str, default: Option<f64>| -> Result<Option<f64>> {
            match keys.map.get(key) {
                None => Ok(default.filter(|_| gemma)),
                Some(Value::Null) => Ok(None),
                Some(_) => keys.opt_f64(key),
            }
        };
        let hidden_size = keys.usize("hidden_size")?;
        let num_attention_heads = keys.usize("num_attention_heads")?;
        let num_key_value_heads = keys
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        let head_dim = match keys.opt_usize("head_dim")? {
            Some(d) => d,
            None if gemma => 256,
            None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(keys.bad(
                        "head_dim",
                        format!("absent, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            return Err(keys.bad("num_attention_heads", "heads must be positive".into()));
        }
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(keys.bad(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(keys.bad(
                "head_dim",
                format!("{head_dim} is odd; rotary embeddings need an even head_dim"),
            ));
        }
        // Gemma reads `hidden_activation` (its configs may carry `hidden_act` too).
        let (act_key, default_act) = match gemma {
            true => ("hidden_activation", Activation::GeluTanh),
            false => ("hidden_act", Activation::Silu),
        };
        let activation = match keys.opt_str(act_key)? {
            None => default_act,
            Some("silu" | "swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(keys.bad(
                    act_key,
                    format!("`{other}` is not supported (silu, gelu_pytorch_tanh)"),
                ));
            }
        };
        if keys.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(keys.bad("mlp_bias", "MLP biases are not supported".into()));
        }
        let attention_bias = keys.opt_bool("attention_bias")?.unwrap_or(false);
        if architecture == Architecture::Phi3 && attention_bias {
            return Err(keys.bad(
                "attention_bias",
                "Phi-3 with attention biases is not supported (its fused qkv_proj has none)".into(),
            ));
        }
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match architecture {
            Architecture::Mistral | Architecture::Phi3 => keys.opt_usize("sliding_window")?,
            Architecture::Gemma2 | Architecture::Gemma3 => match keys.map.get("sliding_window") {
                None => Some(4096),
                Some(_) => keys.opt_usize("sliding_window")?,
            },
            Architecture::Qwen2 | Architecture::Qwen3
                if keys.opt_bool("use_sliding_window")?.unwrap_or(false) =>
            {
                return Err(keys.bad(
                    "use_sliding_window",
                    format!(
                        "{} sliding-window attention (some layers windowed) is not supported",
                        architecture.hf_name()
                    ),
                ));
            }
            _ => None,
        };
        let num_hidden_layers = keys.usize("num_hidden_layers")?;
        let layer_types = keys.layer_types(architecture, num_hidden_layers, sliding_window)?;
        let rope_theta = keys.rope_theta(match architecture {
            Architecture::Gemma3 => 1_000_000.0,
            _ => 10_000.0,
        })?;
        let (factor_key, factor) = match keys.rope_parameters() {
            Some((key, p)) if p.contains_key("partial_rotary_factor") => (
                format!("{key}.partial_rotary_factor"),
                p.get("partial_rotary_factor"),
            ),
            _ => (
                "partial_rotary_factor".to_string(),
                keys.get("partial_rotary_factor"),
            ),
        };
        let rotary_dim = match factor {
            None => head_dim,
            // As transformers: int(head_dim × factor).
            Some(v) => match v.as_f64() {
                Some(f) if f > 0.0 && f <= 1.0 => (head_dim as f64 * f) as usize,
                _ => return Err(keys.bad(&factor_key, format!("expected a number in (0, 1], found {v}"))),
            },
        };
        if rotary_dim < 2 || rotary_dim % 2 != 0 {
            return Err(keys.bad(
                &factor_key,
                format!("rotates {rotary_dim} of {head_dim} dimensions per head; rotary embeddings need an even count"),
            ));
        }
        let rope_scaling = keys.rope_scaling(rotary_dim)?;
        let local_rope_theta = keys.local_rope_theta(architecture)?;
        let softcap = |key: &str, gemma2_default: f64| -> Result<Option<f32>> {
            let default = (architecture == Architecture::Gemma2).then_some(gemma2_default);
            match gemma_default(key, default)? {
                Some(cap) if gemma && cap > 0.0 => Ok(Some(cap as f32)),
                Some(cap) if gemma => Err(keys.bad(key, format!("{cap} is not a positive cap"))),
                _ => Ok(None),
            }
        };
        let query_pre_attn_scalar = match gemma {
            true => gemma_default("query_pre_attn_scalar", Some(256.0))?.unwrap_or(head_dim as f64),
            false => head_dim as f64,
        };
        if query_pre_attn_scalar <= 0.0 {
            return Err(keys.bad(
                "query_pre_attn_scalar",
                format!("{query_pre_attn_scalar} is not positive"),
            ));
        }
        let config = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: keys.usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: keys.f64("rms_norm_eps")? as f32,
            rope_theta,
            rope_scaling,
            // transformers' default: tied for Gemma, untied for the others.
            tie_word_embeddings: keys.opt_bool("tie_word_embeddings")?.unwrap_or(gemma),
            vocab_size: keys.usize("vocab_size")?,
            qkv_bias,
            o_bias,
            qk_norm: matches!(architecture, Architecture::Qwen3 | Architecture::Gemma3),
            fused_projections: architecture == Architecture::Phi3,
            rotary_dim,
            norm_offset: if gemma { 1.0 } else { 0.0 },
            activation,
            sandwich_norms: gemma,
            // As transformers: √hidden rounded to the activations' type (f32 here).
            embedding_multiplier: if gemma {
                (hidden_size as f64).sqrt() as f32
            } else {
                1.0
            },
            query_pre_attn_scalar,
            attn_logit_softcapping: softcap("attn_logit_softcapping", 50.0)?,
            final_logit_softcapping: softcap("final_logit_softcapping", 30.0)?,
            layer_types,
            sliding_window,
            local_rope_theta,
            max_position_embeddings: keys.opt_usize("max_position_embeddings")?,
            bos_token_id: keys.opt_token_id("bos_token_id")?,
            eos_token_id: keys.opt_token_id("eos_token_id")?,
            quantization: keys.quantization()?,
            torch_dtype: match keys.opt_str("torch_dtype")? {
                Some(t) => Some(t.to_string()),
                None => keys.opt_str("dtype")?.map(str::to_string),
            },
        };
        for (key, v) in [
            ("hidden_size", config.hidden_size),
            ("intermediate_size", config.intermediate_size),
            ("num_hidden_layers", config.num_hidden_layers),
            ("vocab_size", config.vocab_size),
        ] {
            if v == 0 {
                return Err(keys.bad(key, "must be positive".into()));
            }
        }
        Ok(config)
    }

    /// Output features of q_proj: `num_attention_heads × head_dim`.
    pub fn q_features(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Output features of k_proj and v_proj: `num_key_value_heads × head_dim`.
    pub fn kv_features(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The attention window of layer `layer`: `Some(sliding_window)` on a sliding-window
    /// layer, `None` where it sees every earlier key.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(LayerType::SlidingAttention) => self.sliding_window,
            _ => None,
        }
    }
}

/// Typed access to a config object, with errors that name the file and key.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    path: PathBuf,
}

impl Keys<'_> {
    fn bad(&self, key: &str, message: String) -> Error {
        Error::BadValue {
            path: self.path.clone(),
            key: key.into(),
            message,
        }
    }

    fn missing(&self, key: &str, expected: &'static str) -> Error {
        Error::MissingKey {
            path: self.path.clone(),
            key: key.into(),
            expected,
        }
    }

    /// The value under `key`, treating JSON `null` as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.missing(key, "a non-negative integer"))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| self.bad(key, format!("expected a non-negative integer, found {v}")))
            })
            .transpose()
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| self.missing(key, "a number"))?;
        v.as_f64()
            .ok_or_else(|| self.bad(key, format!("expected a number, found {v}")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.bad(key, format!("expected a number, found {v}")))
            })
            .transpose()
    }

    /// `layer_types` where the config lists them (one per layer, each `full_attention` or
    /// `sliding_attention`); otherwise as transformers derives them: Gemma 2 alternates from a
    /// sliding layer, Gemma 3 makes every `sliding_window_pattern`-th layer full, a Mistral or
    /// Phi-3 with a window slides on every layer.
    fn layer_types(
        &self,
        architecture: Architecture,
        layers: usize,
        sliding_window: Option<usize>,
    ) -> Result<Vec<LayerType>> {
        use LayerType::*;
        if let Some(list) = self.get("layer_types") {
            let items = list
                .as_array()
                .ok_or_else(|| self.bad("layer_types", format!("expected a list, found {list}")))?;
            if items.len() != layers {
                return Err(self.bad(
                    "layer_types",
                    format!(
                        "{} entries for num_hidden_layers {layers} (expected one per layer)",
                        items.len()
                    ),
                ));
            }
            let types = items
                .iter()
                .enumerate()
                .map(|(i, v)| match v.as_str() {
                    Some("full_attention") => Ok(FullAttention),
                    Some("sliding_attention") => Ok(SlidingAttention),
                    _ => Err(self.bad(
                        "layer_types",
                        format!("entry {i} is {v}; expected \"full_attention\" or \"sliding_attention\""),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            if types.contains(&SlidingAttention) && sliding_window.is_none() {
                return Err(self.missing("sliding_window", "a window for the sliding_attention layers"));
            }
            return Ok(types);
        }
        let slides = |i: usize| -> Result<bool> {
            Ok(match architecture {
                Architecture::Gemma2 => i.is_multiple_of(2),
                Architecture::Gemma3 => {
                    let key = ["sliding_window_pattern", "_sliding_window_pattern"]
                        .into_iter()
                        .find(|k| self.get(k).is_some());
                    let pattern = match key {
                        Some(k) => self.usize(k)?,
                        None => 6,
                    };
                    pattern == 0 || !(i + 1).is_multiple_of(pattern)
                }
                _ => true,
            })
        };
        (0..layers)
            .map(|i| {
                Ok(match sliding_window.is_some() && slides(i)? {
                    true => SlidingAttention,
                    false => FullAttention,
                })
            })
            .collect()
    }

    /// The rope base of Gemma 3's sliding-window layers: `rope_parameters.sliding_attention`
    /// (transformers 5, plain rope only) or `rope_local_base_freq` (transformers 4).
    fn local_rope_theta(&self, architecture: Architecture) -> Result<Option<f64>> {
        let key = "rope_parameters.sliding_attention";
        if let Some(p) = self
            .get("rope_parameters")
            .and_then(|p| p.get("sliding_attention"))
        {
            let kind = p.get("rope_type").and_then(Value::as_str).unwrap_or("default");
            if kind != "default" {
                return Err(self.bad(
                    &format!("{key}.rope_type"),
                    format!("`{kind}` on the sliding-window layers is not supported (only default)"),
                ));
            }
            let theta = p
                .get("rope_theta")
                .ok_or_else(|| self.missing(&format!("{key}.rope_theta"), "a number"))?;
            return theta.as_f64().map(Some).ok_or_else(|| {
                self.bad(
                    &format!("{key}.rope_theta"),
                    format!("expected a number, found {theta}"),
                )
            });
        }
        Ok(match architecture {
            Architecture::Gemma3 => Some(self.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0)),
            _ => None,
        })
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| self.bad(key, format!("expected true or false, found {v}")))
            })
            .transpose()
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.bad(key, format!("expected a string, found {v}")))
            })
            .transpose()
    }

    /// A token id, or the first of a list of ids (transformers allows both for eos).
    fn opt_token_id(&self, key: &str) -> Result<Option<u32>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let first = match v {
            Value::Array(items) => items.first(),
            other => Some(other),
        };
        first
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| self.bad(key, format!("expected a token id, found {v}")))
            })
            .transpose()
    }

    fn architecture(&self) -> Result<Architecture> {
        let list = self
            .get("architectures")
            .ok_or_else(|| self.missing("architectures", "a list holding one architecture name"))?;
        let name = list
            .as_array()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| self.bad("architectures", format!("expected a list of names, found {list}")))?;
        Architecture::from_hf_name(name).ok_or_else(|| Error::UnsupportedArchitecture {
            path: self.path.clone(),
            found: name.into(),
        })
    }

    /// `quantization_config`, accepted only for AWQ 4-bit "gemm" checkpoints.
    fn quantization(&self) -> Result<Option<QuantizationConfig>> {
        let Some(q) = self.get("quantization_config") else {
            return Ok(None);
        };
        let key = "quantization_config";
        let field = |name: &str| q.get(name).filter(|v| !v.is_null());
        let method = field("quant_method").and_then(Value::as_str).unwrap_or("?");
        if !method.eq_ignore_ascii_case("awq") {
            return Err(self.bad(
                key,
                format!("quant_method `{method}` is not supported (only awq)"),
            ));
        }
        let bits = field("bits").or_else(|| field("w_bit")).and_then(Value::as_u64);
        if bits != Some(4) {
            return Err(self.bad(key, format!("bits {bits:?} is not supported (only 4)")));
        }
        if field("zero_point").and_then(Value::as_bool) == Some(false) {
            return Err(self.bad(key, "zero_point = false is not supported".into()));
        }
        let version = field("version").and_then(Value::as_str).unwrap_or("gemm");
        if !version.eq_ignore_ascii_case("gemm") {
            return Err(self.bad(key, format!("version `{version}` is not supported (only gemm)")));
        }
        let group_size = field("group_size")
            .or_else(|| field("q_group_size"))
            .and_then(Value::as_u64)
            .filter(|&g| g > 0)
            .ok_or_else(|| self.bad(key, "group_size must be a positive integer".into()))?;
        let modules_to_not_convert = match field("modules_to_not_convert") {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| self.bad(key, format!("modules_to_not_convert holds {v}, not a name")))
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(self.bad(
                    key,
                    format!("modules_to_not_convert must be a list, found {other}"),
                ));
            }
        };
        Ok(Some(QuantizationConfig {
            group_size: group_size as usize,
            modules_to_not_convert,
        }))
    }

    /// The rope parameters object and the key it sits under: `rope_parameters` (transformers
    /// 5) or `rope_scaling` (transformers 4); `None` for plain rope.
    /// transformers 5 keeps one object per layer type where they differ (Gemma 3): the full
    /// attention layers' is the model's rope, `sliding_attention` the local one.
    fn rope_parameters(&self) -> Option<(&'static str, &Map<String, Value>)> {
        if let Some(p) = self.get("rope_parameters").and_then(Value::as_object) {
            return match p.get("full_attention").and_then(Value::as_object) {
                Some(full) => Some(("rope_parameters.full_attention", full)),
                None => Some(("rope_parameters", p)),
            };
        }
        self.get("rope_scaling")
            .and_then(Value::as_object)
            .map(|p| ("rope_scaling", p))
    }

    /// `rope_theta` (transformers 4) or `rope_parameters.rope_theta` (transformers 5);
    /// `default` (the family's in transformers) where neither is given.
    fn rope_theta(&self, default: f64) -> Result<f64> {
        if let Some((key, p)) = self.rope_parameters()
            && let Some(theta) = p.get("rope_theta").filter(|v| !v.is_null())
        {
            return theta.as_f64().ok_or_else(|| {
                self.bad(
                    &format!("{key}.rope_theta"),
                    format!("expected a number, found {theta}"),
                )
            });
        }
        match self.get("rope_theta") {
            Some(theta) => theta
                .as_f64()
                .ok_or_else(|| self.bad("rope_theta", format!("expected a number, found {theta}"))),
            None => Ok(default),
        }
    }

    /// The rope scaling, its parameters checked as transformers reads them (names and
    /// defaults of `modeling_rope_utils`); a type we do not implement is refused by name.
    fn rope_scaling(&self, head_dim: usize) -> Result<RopeScaling> {
        let Some((key, params)) = self.rope_parameters() else {
            return Ok(RopeScaling::Default);
        };
        let at = |name: &str| format!("{key}.{name}");
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |name: &str| -> Result<Option<f64>> {
            match params.get(name).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| self.bad(&at(name), format!("expected a number, found {v}"))),
            }
        };
        let required =
            |name: &str| -> Result<f64> { number(name)?.ok_or_else(|| self.missing(&at(name), "a number")) };
        let factor = || -> Result<f64> {
            let f = required("factor")?;
            if f < 1.0 {
                return Err(self.bad(&at("factor"), format!("{f} is below 1")));
            }
            Ok(f)
        };
        let original = || -> Result<usize> {
            match params
                .get("original_max_position_embeddings")
                .filter(|v| !v.is_null())
            {
                Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    self.bad(
                        &at("original_max_position_embeddings"),
                        format!("expected a positive integer, found {v}"),
                    )
                }),
                None => self.opt_usize("max_position_embeddings")?.ok_or_else(|| {
                    self.missing(&at("original_max_position_embeddings"), "a positive integer")
                }),
            }
        };
        Ok(match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: required("low_freq_factor")?,
                high_freq_factor: required("high_freq_factor")?,
                original_max_position_embeddings: original()?,
            },
            "yarn" => {
                let original_max_position_embeddings = original()?;
                let mut factor = factor()?;
                // As transformers: where the original context is given, the factor is the
                // ratio of the extended context to it.
                if params.contains_key("original_max_position_embeddings")
                    && let Some(max) = self.opt_usize("max_position_embeddings")?
                {
                    factor = max as f64 / original_max_position_embeddings as f64;
                }
                let mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention_factor = match (
                    number("attention_factor")?,
                    number("mscale")?,
                    number("mscale_all_dim")?,
                ) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        mscale(factor, m) / mscale(factor, all)
                    }
                    _ => mscale(factor, 1.0),
                };
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings,
                    beta_fast: number("beta_fast")?.unwrap_or(32.0),
                    beta_slow: number("beta_slow")?.unwrap_or(1.0),
                    truncate: params.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                    attention_factor,
                }
            }
            "longrope" => {
                let list = |name: &str| -> Result<Vec<f64>> {
                    let v = params.get(name).ok_or_else(|| {
                        self.missing(&at(name), "a list of numbers, one per rotary frequency")
                    })?;
                    let values: Option<Vec<f64>> =
                        v.as_array().and_then(|a| a.iter().map(Value::as_f64).collect());
                    let values = values.ok_or_else(|| {
                        self.bad(&at(name), format!("expected a list of numbers, found {v}"))
                    })?;
                    if values.len() != head_dim / 2 {
                        return Err(self.bad(
                            &at(name),
                            format!(
                                "{} factors for head_dim {head_dim} (expected {})",
                                values.len(),
                                head_dim / 2
                            ),
                        ));
                    }
                    Ok(values)
                };
                let original_max_position_embeddings =
                    match self.opt_usize("original_max_position_embeddings")? {
                        Some(n) => n,
                        None => original()?,
                    };
                let max = self
                    .opt_usize("max_position_embeddings")?
                    .unwrap_or(original_max_position_embeddings);
                let factor = max as f64 / original_max_position_embeddings as f64;
                let attention_factor = match number("attention_factor")? {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original_max_position_embeddings as f64).ln()).sqrt(),
                };
                RopeScaling::LongRope {
                    short_factor: list("short_factor")?,
                    long_factor: list("long_factor")?,
                    original_max_position_embeddings,
                    attention_factor,
                }
            }
            "dynamic" => {
                return Err(self.bad(
                    &at("rope_type"),
                    "`dynamic` (NTK scaling recomputed from each sequence's length) is not supported: \
                     a window's frequencies would depend on its length; the same model with \
                     `linear`, `yarn` or `llama3` scaling runs"
                        .into(),
                ));
            }
            other => {
                return Err(self.bad(
                    &at("rope_type"),
                    format!("`{other}` is not supported (default, linear, llama3, yarn, longrope)"),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_json(&serde_json::from_str(json).unwrap(), Path::new("config.json"))
    }

    const BASE: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,
        "vocab_size":100,"rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}}"#;

    #[test]
    fn parameters_match_the_published_counts() {
        // SmolLM2-135M: 134,515,008 (tied); Llama-2-7B: 6,738,415,616 (untied).
        let smollm2 = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":576,"intermediate_size":1536,
            "num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,"rms_norm_eps":1e-5,
            "vocab_size":49152,"tie_word_embeddings":true}"#;
        assert_eq!(parse(smollm2).unwrap().parameters(), 134_515_008);
        let llama = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4096,"intermediate_size":11008,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":32,"rms_norm_eps":1e-5,
            "vocab_size":32000}"#;
        assert_eq!(parse(llama).unwrap().parameters(), 6_738_415_616);
        // Four norms a layer, q/k norms, tied: Gemma-2-9B 9,241,705,984, Gemma-3-1B 999,885,952.
        let gemma2 = include_str!("../../fixtures/configs/gemma-2-9b.json");
        assert_eq!(parse(gemma2).unwrap().parameters(), 9_241_705_984);
        let gemma3 = include_str!("../../fixtures/configs/gemma-3-1b.json");
        assert_eq!(parse(gemma3).unwrap().parameters(), 999_885_952);
    }

    #[test]
    fn reads_defaults_and_rope_parameters() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 500000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.q_features(), 64);
        assert_eq!(c.kv_features(), 32);
    }

    #[test]
    fn reads_legacy_rope_theta() {
        let c = parse(&BASE.replace(
            r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}"#,
            r#""rope_theta":1234.0"#,
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 1234.0);
    }

    #[test]
    fn missing_key_names_file_and_key() {
        let err = parse(&BASE.replace(r#""vocab_size":100,"#, "")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("config.json") && msg.contains("vocab_size"), "{msg}");
    }

    #[test]
    fn unknown_architecture_is_refused() {
        let err = parse(&BASE.replace("LlamaForCausalLM", "GPT2LMHeadModel")).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedArchitecture { ref found, .. } if found == "GPT2LMHeadModel")
        );
        assert!(err.to_string().contains("GPT2LMHeadModel"));
    }

    /// `BASE` with its `rope_parameters` replaced by `params`, under `key`.
    fn with_rope(key: &str, params: &str) -> String {
        BASE.replace(
            r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}"#,
            &format!(r#""max_position_embeddings":256,"{key}":{params}"#),
        )
    }

    #[test]
    fn rope_scaling_in_both_layouts() {
        let llama3 = r#"{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}"#;
        for key in ["rope_parameters", "rope_scaling"] {
            let c = parse(&with_rope(key, llama3)).unwrap();
            assert_eq!(
                c.rope_scaling,
                RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 64
                }
            );
        }
        // transformers 4 spelled the type `type`.
        let c = parse(&with_rope("rope_scaling", r#"{"type":"linear","factor":2.0}"#)).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        // YaRN: the factor is the extended over the original context, the attention factor
        // 0.1 ln(factor) + 1 unless given.
        let c = parse(&with_rope(
            "rope_parameters",
            r#"{"rope_type":"yarn","factor":2.0,"original_max_position_embeddings":64,"rope_theta":1e4}"#,
        ))
        .unwrap();
        let RopeScaling::Yarn {
            factor,
            attention_factor,
            truncate,
            beta_fast,
            ..
        } = c.rope_scaling
        else {
            panic!("{:?}", c.rope_scaling)
        };
        assert_eq!((factor, truncate, beta_fast), (4.0, true, 32.0));
        assert!((attention_factor - (0.1 * 4f64.ln() + 1.0)).abs() < 1e-15);
    }

    #[test]
    fn unsupported_rope_is_refused_by_name() {
        for (key, params, says) in [
            (
                "rope_scaling",
                r#"{"rope_type":"dynamic","factor":2.0}"#,
                "`rope_scaling.rope_type`: `dynamic`",
            ),
            (
                "rope_parameters",
                r#"{"rope_type":"ntk-by-parts"}"#,
                "`ntk-by-parts` is not supported",
            ),
            (
                "rope_parameters",
                r#"{"rope_type":"llama3","factor":8.0}"#,
                "rope_parameters.low_freq_factor",
            ),
            (
                "rope_parameters",
                r#"{"rope_type":"default","partial_rotary_factor":0.5625}"#,
                "rope_parameters.partial_rotary_factor",
            ),
            (
                "rope_parameters",
                r#"{"rope_type":"default","partial_rotary_factor":1.5}"#,
                "expected a number in (0, 1]",
            ),
        ] {
            let err = parse(&with_rope(key, params)).unwrap_err().to_string();
            assert!(err.contains(says), "{params}: {err}");
        }
    }

    /// Gemma 3 as transformers 4 writes it (`sliding_window_pattern`, `rope_local_base_freq`)
    /// and as transformers 5 does (`layer_types`, `rope_parameters` per layer type).
    #[test]
    fn gemma3_in_both_layouts() {
        let t4 = r#"{"architectures":["Gemma3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":7,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":32,
            "rms_norm_eps":1e-6,"vocab_size":100,"sliding_window":16,"sliding_window_pattern":3,
            "rope_theta":1000000.0,"rope_local_base_freq":10000.0,"query_pre_attn_scalar":32,
            "rope_scaling":{"rope_type":"linear","factor":8.0}}"#;
        let c = parse(t4).unwrap();
        use LayerType::*;
        let types = vec![
            SlidingAttention,
            SlidingAttention,
            FullAttention,
            SlidingAttention,
            SlidingAttention,
            FullAttention,
            SlidingAttention,
        ];
        assert_eq!(c.layer_types, types);
        assert_eq!((c.window(0), c.window(2)), (Some(16), None));
        assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
        assert!(c.tie_word_embeddings && c.qk_norm && c.sandwich_norms);
        assert_eq!((c.norm_offset, c.activation), (1.0, Activation::GeluTanh));
        assert_eq!(c.embedding_multiplier, 8.0);
        let t5 = r#"{"architectures":["Gemma3ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":7,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":32,
            "rms_norm_eps":1e-6,"vocab_size":100,"sliding_window":16,"query_pre_attn_scalar":32,
            "layer_types":["sliding_attention","sliding_attention","full_attention","sliding_attention",
                "sliding_attention","full_attention","sliding_attention"],
            "rope_parameters":{"full_attention":{"rope_type":"linear","factor":8.0,"rope_theta":1000000.0},
                "sliding_attention":{"rope_type":"default","rope_theta":10000.0}}}"#;
        assert_eq!(parse(t5).unwrap(), c);
    }

    #[test]
    fn gemma_layer_types_of_the_wrong_length_are_refused() {
        let gemma2 = r#"{"architectures":["Gemma2ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":3,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":16,
            "rms_norm_eps":1e-6,"vocab_size":100,"sliding_window":16,
            "layer_types":["sliding_attention","full_attention"]}"#;
        let err = parse(gemma2).unwrap_err().to_string();
        assert!(
            err.contains("config.json")
                && err.contains("`layer_types`")
                && err.contains("2 entries for num_hidden_layers 3"),
            "{err}"
        );
        let unknown = gemma2.replace(r#""full_attention"]"#, r#""full_attention","chunked_attention"]"#);
        let err = parse(&unknown).unwrap_err().to_string();
        assert!(err.contains("entry 2 is \"chunked_attention\""), "{err}");
        // Without `layer_types`, Gemma 2 alternates from a sliding layer.
        let c = parse(&gemma2.replace(
            r#""layer_types":["sliding_attention","full_attention"]"#,
            r#""attn_logit_softcapping":50.0"#,
        ))
        .unwrap();
        assert_eq!(c.window(0), Some(16));
        assert_eq!(c.window(1), None);
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let c = parse(&BASE.replace("LlamaForCausalLM", "Qwen2ForCausalLM")).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn awq_quantization_config_round_trips() {
        let q = QuantizationConfig {
            group_size: 64,
            modules_to_not_convert: vec![],
        };
        let mut value: Value = serde_json::from_str(BASE).unwrap();
        value["quantization_config"] = q.to_json();
        let c = ModelConfig::from_json(&value, Path::new("config.json")).unwrap();
        assert_eq!(c.quantization, Some(q));
        value["quantization_config"]["version"] = "gemv".into();
        let err = ModelConfig::from_json(&value, Path::new("config.json")).unwrap_err();
        assert!(err.to_string().contains("gemv"), "{err}");
        value["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4});
        let err = ModelConfig::from_json(&value, Path::new("config.json")).unwrap_err();
        assert!(err.to_string().contains("gptq"), "{err}");
    }

    #[test]
    fn kv_heads_must_divide_heads() {
        let err =
            parse(&BASE.replace(r#""num_key_value_heads":2"#, r#""num_key_value_heads":3"#)).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }
}
