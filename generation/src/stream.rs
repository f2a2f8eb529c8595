//! Token ids to text as they arrive. A token may hold part of a character (byte-level
//! vocabularies) or change how the previous ones read (leading spaces), so each new piece is
//! the difference between decoding a short window of recent ids with and without the new
//! ones, emitted only once it ends on a whole character — the scheme of TGI and transformers'
//! `TextStreamer`, linear in the length of the text.

use checkpoint::Tokenizer;

use crate::{Error, Result};

/// Text of a growing list of token ids, piece by piece.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix: usize,
    /// Ids before this one have been emitted.
    read: usize,
}

impl<'t> TextStream<'t> {
    /// An empty stream; special tokens are left out of the text.
    pub fn new(tokenizer: &'t Tokenizer) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .inner()
            .decode(ids, true)
            .map_err(|e| Error::Invalid(format!("{}: decoding: {e}", self.tokenizer.path().display())))
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let after = self.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len())
        {
            let piece = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// The text not yet emitted (at the end: a piece held back for an incomplete character).
    pub fn flush(&mut self) -> Result<String> {
        let before = self.decode(&self.ids[self.prefix..self.read])?;
        let after = self.decode(&self.ids[self.prefix..])?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
    }

    /// The whole text so far.
    pub fn text(&self) -> Result<String> {
        self.decode(&self.ids)
    }
}
