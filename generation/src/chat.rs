//! Chat templates: the Jinja template a checkpoint ships (`chat_template.jinja`, or
//! `chat_template` in `tokenizer_config.json`), rendered by minijinja with the settings and
//! globals transformers' `apply_chat_template` uses — `trim_blocks`, `lstrip_blocks`,
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception` — and
//! Python's string methods (`strip`, `startswith`, …) that templates call.

use std::path::{Path, PathBuf};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, ErrorKind, Value, context};
use serde::Serialize;

use crate::stop::token_text;
use crate::{Error, Result};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A checkpoint's chat template.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    /// The file the template came from.
    pub path: PathBuf,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

impl ChatTemplate {
    /// The template of the checkpoint in `dir`; an error naming the files when it has none.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::Template {
                path: config_path.clone(),
                message: e.to_string(),
            })?,
            Err(_) => serde_json::Value::Null,
        };
        let jinja = dir.join("chat_template.jinja");
        let (path, source) = if let Ok(source) = std::fs::read_to_string(&jinja) {
            (jinja, source)
        } else {
            let source = match config.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // Named templates: [{"name": "default", "template": "..."}, ...].
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            };
            let source = source.ok_or_else(|| Error::Template {
                path: config_path.clone(),
                message: format!(
                    "no `chat_template` here and no {} beside it; run without --chat",
                    jinja.display()
                ),
            })?;
            (config_path, source)
        };
        Ok(ChatTemplate {
            path,
            source,
            bos_token: token_text(config.get("bos_token")).unwrap_or_default(),
            eos_token: token_text(config.get("eos_token")).unwrap_or_default(),
        })
    }

    /// The prompt text of `messages`, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters are valid");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        let failed = |e: minijinja::Error| Error::Template {
            path: self.path.clone(),
            message: format!("{e:#}"),
        };
        env.add_template("chat", &self.source).map_err(failed)?;
        env.get_template("chat")
            .map_err(failed)?
            .render(context! {
                messages => Value::from(Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(dir: &Path, source: &str) -> ChatTemplate {
        std::fs::write(
            dir.join("tokenizer_config.json"),
            serde_json::json!({"chat_template": source, "bos_token": "<s>", "eos_token": {"content": "</s>"}})
                .to_string(),
        )
        .unwrap();
        ChatTemplate::from_dir(dir).unwrap()
    }

    #[test]
    fn renders_like_transformers() {
        let dir = tempfile::tempdir().unwrap();
        // SmolLM2-Instruct's template (fixtures/smollm2-135m/chat_template.jinja); the
        // expected texts are Python jinja2 3.1.6's under transformers' settings.
        let source = std::fs::read_to_string(testkit::fixture("smollm2-135m/chat_template.jinja")).unwrap();
        let t = template(dir.path(), &source);
        let text = t.render(&[Message::new("user", "What is 2+2?")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = t
            .render(
                &[Message::new("system", "Be brief."), Message::new("user", "Hi")],
                false,
            )
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_methods_block_trimming_and_exceptions() {
        let dir = tempfile::tempdir().unwrap();
        // Expected: jinja2 3.1.6's rendering, as above.
        let source = "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role not in ['user', 'assistant'] %}{{ raise_exception('roles alternate') }}{% endif %}\n[{{ m.content.strip() | upper }}]{{ eos_token }}\n{% endfor %}";
        let t = template(dir.path(), source);
        assert_eq!(
            t.render(&[Message::new("user", "  hi ")], false).unwrap(),
            "<s>\n[HI]</s>\n"
        );
        let err = t
            .render(&[Message::new("tool", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("roles alternate") && err.contains("tokenizer_config.json"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_template_names_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
        let err = ChatTemplate::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("chat_template.jinja"),
            "{err}"
        );
    }
}
