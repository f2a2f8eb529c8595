//! A checkpoint's `tokenizer.json`, run by the Hugging Face `tokenizers` crate.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// File name of a checkpoint's tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A loaded tokenizer that remembers where it came from.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("path", &self.path).finish()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound {
                path: path.to_owned(),
                what: "not found".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Tokenizer {
            inner,
            path: path.to_owned(),
        })
    }

    /// Loads `dir/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join(TOKENIZER_FILE))
    }

    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`, with or without the special tokens the tokenizer's template adds.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The BOS id the tokenizer puts first when it adds special tokens, if it does.
    pub fn added_bos(&self) -> Result<Option<u32>> {
        let plain = self.encode("a", false)?;
        let special = self.encode("a", true)?;
        Ok(match special.split_first() {
            Some((&first, rest)) if rest.starts_with(&plain) => Some(first),
            _ => None,
        })
    }

    /// The number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
