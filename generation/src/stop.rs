//! The tokens that end a reply: every `eos_token_id` of `config.json` and
//! `generation_config.json` (an id or a list) and the `eos_token` of `tokenizer_config.json`,
//! as transformers' `generate` collects them.

use std::path::Path;

use checkpoint::Tokenizer;
use serde_json::Value;

use crate::{Error, Result};

fn read_json(path: &Path) -> Result<Option<Value>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Invalid(format!("{}: {e}", path.display()))),
    }
}

fn ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().map(|id| id as u32).into_iter().collect(),
        Some(Value::Array(list)) => list.iter().flat_map(|v| ids(Some(v))).collect(),
        _ => Vec::new(),
    }
}

/// A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`.
pub(crate) fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The stop tokens of the checkpoint in `dir`, sorted.
pub fn stop_tokens(dir: &Path, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
    let mut stop = Vec::new();
    for file in ["config.json", "generation_config.json"] {
        if let Some(json) = read_json(&dir.join(file))? {
            stop.extend(ids(json.get("eos_token_id")));
        }
    }
    if let Some(json) = read_json(&dir.join("tokenizer_config.json"))?
        && let Some(text) = token_text(json.get("eos_token"))
        && let Some(id) = tokenizer.inner().token_to_id(&text)
    {
        stop.push(id);
    }
    stop.sort_unstable();
    stop.dedup();
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_lists_and_token_objects() {
        let v: Value = serde_json::json!({"a": 2, "b": [1, 7], "c": {"content": "</s>"}, "d": "x"});
        assert_eq!(ids(v.get("a")), vec![2]);
        assert_eq!(ids(v.get("b")), vec![1, 7]);
        assert!(ids(v.get("missing")).is_empty());
        assert_eq!(token_text(v.get("c")).as_deref(), Some("</s>"));
        assert_eq!(token_text(v.get("d")).as_deref(), Some("x"));
    }
}
