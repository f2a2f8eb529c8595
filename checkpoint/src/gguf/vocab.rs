//! A Hugging Face `tokenizer.json` built from a GGUF file's BPE vocabulary, merges and
//! pre-tokenizer type, splitting text the way llama.cpp does for that type.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::reader::{GgufFile, MetaValue};
use crate::Result;

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Special-token ids named by the GGUF metadata.
#[derive(Clone, Debug, Default)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

/// The vocabulary, as strings, together with the tokenizer built from it.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub tokens: Vec<String>,
    pub special: SpecialTokens,
}

impl GgufTokenizer {
    /// The text of a token id, if it exists.
    pub fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize)).map(String::as_str)
    }
}

fn string_array(gguf: &GgufFile, key: &str) -> Result<Vec<String>> {
    let items = gguf
        .get(key)?
        .as_array()
        .ok_or_else(|| gguf.error(format!("metadata key `{key}`: expected an array of strings")))?;
    items
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| gguf.error(format!("metadata key `{key}`: expected strings, found {v:?}")))
        })
        .collect()
}

fn optional_id(gguf: &GgufFile, key: &str) -> Option<u32> {
    gguf.metadata
        .get(key)
        .and_then(MetaValue::as_u64)
        .and_then(|v| u32::try_from(v).ok())
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value.
fn pre_tokenizer(gguf: &GgufFile, pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match pre {
        // llama.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2 — the GPT-2 regex, which ByteLevel applies.
        "gpt2" => byte_level.into(),
        // llama.cpp: LLAMA_VOCAB_PRE_TYPE_SMOLLM — each digit on its own, then the GPT-2 regex.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        other => {
            return Err(gguf.error(format!(
                "tokenizer.ggml.pre = `{other}` is not supported (supported: smollm, gpt2)"
            )));
        }
    })
}

/// The special-token ids and flags of the GGUF metadata.
pub fn special_tokens(gguf: &GgufFile) -> SpecialTokens {
    let flag = |key: &str| {
        gguf.metadata
            .get(key)
            .and_then(MetaValue::as_bool)
            .unwrap_or(false)
    };
    SpecialTokens {
        bos: optional_id(gguf, "tokenizer.ggml.bos_token_id"),
        eos: optional_id(gguf, "tokenizer.ggml.eos_token_id"),
        unk: optional_id(gguf, "tokenizer.ggml.unknown_token_id"),
        pad: optional_id(gguf, "tokenizer.ggml.padding_token_id"),
        add_bos: flag("tokenizer.ggml.add_bos_token"),
        add_eos: flag("tokenizer.ggml.add_eos_token"),
    }
}

/// Builds the tokenizer described by the GGUF metadata (`tokenizer.ggml.*`).
pub fn build_tokenizer(gguf: &GgufFile) -> Result<GgufTokenizer> {
    let model = gguf.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(gguf.error(format!(
            "tokenizer.ggml.model = `{model}` is not supported (only gpt2 byte-level BPE)"
        )));
    }
    let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
    let merges = string_array(gguf, "tokenizer.ggml.merges")?;
    let pre = gguf
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(MetaValue::as_str)
        .unwrap_or("gpt2");
    let token_types: Vec<u64> = match gguf.metadata.get("tokenizer.ggml.token_type") {
        Some(MetaValue::Array(items)) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    if token_types.len() != tokens.len() {
        return Err(gguf.error(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            token_types.len(),
            tokens.len()
        )));
    }

    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token.clone(), id as u32).is_some() {
            return Err(gguf.error(format!("tokenizer.ggml.tokens: `{token}` appears twice")));
        }
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| gguf.error(format!("tokenizer.ggml.merges: `{m}` is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| gguf.error(format!("building the BPE model: {e}")))?;

    let special = special_tokens(gguf);

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(gguf, pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::new(true, true, true)));
    tokenizer.with_post_processor(Some(post_processor(gguf, &tokens, &special)?));
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&token_types)
        .filter(|(_, ty)| matches!(**ty, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(t, &ty)| AddedToken::from(t.clone(), ty == TOKEN_TYPE_CONTROL))
        .collect();
    tokenizer
        .add_special_tokens(added)
        .map_err(|e| gguf.error(format!("adding special tokens: {e}")))?;
    Ok(GgufTokenizer {
        tokenizer,
        tokens,
        special,
    })
}

/// `$A`, with BOS before and EOS after when the GGUF says the tokenizer adds them.
fn post_processor(gguf: &GgufFile, tokens: &[String], special: &SpecialTokens) -> Result<TemplateProcessing> {
    let named = |id: Option<u32>, what: &str| {
        id.and_then(|i| tokens.get(i as usize).map(|t| (t.clone(), i)))
            .ok_or_else(|| {
                gguf.error(format!(
                    "the tokenizer adds {what}, but its id is missing or out of range"
                ))
            })
    };
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if special.add_bos {
        let (bos, id) = named(special.bos, "BOS")?;
        single.push(bos.clone());
        pair.push(bos.clone());
        specials.push((bos, id));
    }
    single.push("$A".to_string());
    pair.push("$A".to_string());
    if special.add_eos {
        let (eos, id) = named(special.eos, "EOS")?;
        single.push(eos.clone());
        pair.push(eos.clone());
        specials.push((eos, id));
    }
    pair.push("$B:1".to_string());
    TemplateProcessing::builder()
        .try_single(single.join(" "))
        .and_then(|b| b.try_pair(pair.join(" ")))
        .map_err(|e| gguf.error(format!("tokenizer template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| gguf.error(format!("tokenizer template: {e}")))
}
