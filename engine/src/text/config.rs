//! `tokenizer_config.json` and `generation_config.json`: the fields the engine reads, parsed leniently the way
//! transformers does (a special token may be a string or an `AddedToken` object, `eos_token_id` an int or a list).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{read_to_string, TextError};

/// Name given to a chat template stored as a single string.
pub const DEFAULT_TEMPLATE_NAME: &str = "default";

/// What the engine needs from `tokenizer_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerConfig {
    /// BOS token text (`bos_token`), if any.
    pub bos_token: Option<String>,
    /// EOS token text (`eos_token`), if any.
    pub eos_token: Option<String>,
    /// Padding token text, if any.
    pub pad_token: Option<String>,
    /// Unknown token text, if any.
    pub unk_token: Option<String>,
    /// Whether encoding with special tokens prepends BOS (`add_bos_token`, default false).
    pub add_bos_token: bool,
    /// Whether encoding with special tokens appends EOS (`add_eos_token`, default false).
    pub add_eos_token: bool,
    /// Chat templates by name, in file order. A single-string `chat_template` is named `default`.
    pub chat_templates: Vec<(String, String)>,
    /// `model_max_length`, when it is a sane integer.
    pub model_max_length: Option<u64>,
}

impl TokenizerConfig {
    /// Reads and parses a `tokenizer_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        Self::from_json_str(&read_to_string(path)?, path)
    }

    /// Parses the text of a `tokenizer_config.json`; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, TextError> {
        let root: Value = serde_json::from_str(text).map_err(|e| config_err(path, e.to_string()))?;
        let obj = root.as_object().ok_or_else(|| config_err(path, "top level is not a JSON object".into()))?;
        let token = |key: &str| special_token_text(obj.get(key), key, path);
        let flag = |key: &str| match obj.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(config_err(path, format!("`{key}` must be a boolean, got {other}"))),
        };
        let chat_templates = match obj.get("chat_template") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![(DEFAULT_TEMPLATE_NAME.to_string(), s.clone())],
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let name = item.get("name").and_then(Value::as_str);
                    let template = item.get("template").and_then(Value::as_str);
                    match (name, template) {
                        (Some(n), Some(t)) => Ok((n.to_string(), t.to_string())),
                        _ => Err(config_err(
                            path,
                            format!("`chat_template[{i}]` must be an object with string `name` and `template`"),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(config_err(
                    path,
                    format!("`chat_template` must be a string or a list of {{name, template}}, got {}", kind(other)),
                ))
            }
        };
        Ok(TokenizerConfig {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            pad_token: token("pad_token")?,
            unk_token: token("unk_token")?,
            add_bos_token: flag("add_bos_token")?,
            add_eos_token: flag("add_eos_token")?,
            chat_templates,
            model_max_length: obj.get("model_max_length").and_then(Value::as_u64),
        })
    }
}

/// What the engine needs from `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`, which HF allows to be one id or a list.
    pub eos_token_ids: Vec<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
    /// `do_sample`; `Some(false)` means the checkpoint's authors want greedy decoding by default.
    pub do_sample: Option<bool>,
    /// Default `temperature`.
    pub temperature: Option<f32>,
    /// Default `top_p`.
    pub top_p: Option<f32>,
    /// Default `top_k`.
    pub top_k: Option<u32>,
    /// Default `min_p`.
    pub min_p: Option<f32>,
    /// Default `repetition_penalty`.
    pub repetition_penalty: Option<f32>,
    /// Default `max_new_tokens`.
    pub max_new_tokens: Option<u32>,
}

impl GenerationConfig {
    /// Reads and parses a `generation_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, TextError> {
        Self::from_json_str(&read_to_string(path)?, path)
    }

    /// Parses the text of a `generation_config.json`; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self, TextError> {
        let root: Value = serde_json::from_str(text).map_err(|e| config_err(path, e.to_string()))?;
        let obj = root.as_object().ok_or_else(|| config_err(path, "top level is not a JSON object".into()))?;
        let id = |key: &str| -> Result<Option<u32>, TextError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => token_id(v, key, path).map(Some),
            }
        };
        let float = |key: &str| -> Result<Option<f32>, TextError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(|f| Some(f as f32))
                    .ok_or_else(|| config_err(path, format!("`{key}` must be a number, got {v}"))),
            }
        };
        let uint =
            |key: &str| -> Result<Option<u32>, TextError> {
                match obj.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => v.as_u64().and_then(|u| u32::try_from(u).ok()).map(Some).ok_or_else(|| {
                        config_err(path, format!("`{key}` must be an integer in 0..=4294967295, got {v}"))
                    }),
                }
            };
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                items.iter().map(|v| token_id(v, "eos_token_id[]", path)).collect::<Result<_, _>>()?
            }
            Some(v) => vec![token_id(v, "eos_token_id", path)?],
        };
        Ok(GenerationConfig {
            bos_token_id: id("bos_token_id")?,
            eos_token_ids,
            pad_token_id: id("pad_token_id")?,
            do_sample: obj.get("do_sample").and_then(Value::as_bool),
            temperature: float("temperature")?,
            top_p: float("top_p")?,
            top_k: uint("top_k")?,
            min_p: float("min_p")?,
            repetition_penalty: float("repetition_penalty")?,
            max_new_tokens: uint("max_new_tokens")?,
        })
    }
}

fn token_id(v: &Value, key: &str, path: &Path) -> Result<u32, TextError> {
    v.as_u64()
        .and_then(|u| u32::try_from(u).ok())
        .ok_or_else(|| config_err(path, format!("`{key}` must be a token id in 0..=4294967295, got {v}")))
}

/// A special token is `null`, a string, or an object with `content` (transformers' serialized `AddedToken`).
fn special_token_text(v: Option<&Value>, key: &str, path: &Path) -> Result<Option<String>, TextError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(config_err(path, format!("`{key}` is an object without a string `content`"))),
        },
        Some(other) => Err(config_err(path, format!("`{key}` must be a string or an AddedToken, got {}", kind(other)))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn config_err(path: &Path, message: String) -> TextError {
    TextError::Config { path: PathBuf::from(path), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("cfg.json")
    }

    #[test]
    fn special_tokens_as_strings_or_added_tokens() {
        let cfg = TokenizerConfig::from_json_str(
            r#"{"bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>", "unk_token": null,
                "add_bos_token": true, "chat_template": "{{ bos_token }}"}"#,
            p(),
        )
        .unwrap();
        assert_eq!(cfg.bos_token.as_deref(), Some("<s>"));
        assert_eq!(cfg.eos_token.as_deref(), Some("</s>"));
        assert_eq!(cfg.unk_token, None);
        assert!(cfg.add_bos_token && !cfg.add_eos_token);
        assert_eq!(cfg.chat_templates, vec![("default".to_string(), "{{ bos_token }}".to_string())]);
    }

    #[test]
    fn named_template_list() {
        let cfg = TokenizerConfig::from_json_str(
            r#"{"chat_template": [{"name": "default", "template": "a"}, {"name": "tool_use", "template": "b"}]}"#,
            p(),
        )
        .unwrap();
        assert_eq!(cfg.chat_templates.len(), 2);
        assert_eq!(cfg.chat_templates[1], ("tool_use".to_string(), "b".to_string()));
        let err = TokenizerConfig::from_json_str(r#"{"chat_template": [{"name": "x"}]}"#, p()).unwrap_err();
        assert!(err.to_string().contains("chat_template[0]"), "{err}");
        let err = TokenizerConfig::from_json_str(r#"{"chat_template": 3}"#, p()).unwrap_err();
        assert!(err.to_string().contains("got a number"), "{err}");
    }

    #[test]
    fn eos_token_id_int_or_list() {
        let one = GenerationConfig::from_json_str(r#"{"eos_token_id": 1, "temperature": 0.6}"#, p()).unwrap();
        assert_eq!(one.eos_token_ids, vec![1]);
        assert_eq!(one.temperature, Some(0.6));
        let many = GenerationConfig::from_json_str(r#"{"eos_token_id": [1, 128001], "top_k": 20}"#, p()).unwrap();
        assert_eq!(many.eos_token_ids, vec![1, 128001]);
        assert_eq!(many.top_k, Some(20));
        let bad = GenerationConfig::from_json_str(r#"{"eos_token_id": [-1]}"#, p()).unwrap_err();
        assert!(bad.to_string().contains("eos_token_id[]") && bad.to_string().contains("-1"), "{bad}");
    }
}
