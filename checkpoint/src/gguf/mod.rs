//! GGUF files (llama.cpp's format): reading, dequantizing, and importing into a Hugging Face
//! checkpoint folder with a matching `tokenizer.json`.

mod dequant;
mod import;
mod reader;
mod vocab;

pub use dequant::{GgmlType, dequantize};
pub use import::{ImportSummary, OutputDtype, gguf_model_config, import_gguf};
pub use reader::{GgufFile, GgufTensor, MetaValue};
pub use vocab::{GgufTokenizer, SpecialTokens, build_tokenizer, special_tokens};
