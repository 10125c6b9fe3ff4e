//! Chat templates rendered with minijinja the way transformers' `apply_chat_template` renders them.
//!
//! What transformers does, and what this module mirrors:
//! * Jinja2 sandbox with `trim_blocks=True`, `lstrip_blocks=True`, loop controls (`{% break %}`/`{% continue %}`),
//!   no trailing-newline keeping, no autoescaping.
//! * Globals `raise_exception(msg)` (fails rendering with `msg`) and `namespace`/`dict` (minijinja built-ins);
//!   Python string/dict methods (`.split`, `.strip`, `.items()`, …) through minijinja-contrib's pycompat.
//! * A `tojson` filter that is Python's `json.dumps(x, ensure_ascii=False, indent=…, sort_keys=…)`: separators
//!   `", "`/`": "` on one line, `","`/`": "` with `indent`, non-ASCII kept, key order kept.
//! * Messages: keys whose value is `None` are dropped; a message with `reasoning_content`/`thinking`/`reasoning`
//!   gets both `thinking` (first) and `reasoning_content` (last) set to it.
//! * Template variables: `messages`, `tools`, `documents` (`none` unless given), `add_generation_prompt`, and the
//!   special-token strings (`bos_token`, `eos_token`, `pad_token`, `unk_token`) that are set.
//! * An empty conversation is refused.
//!
//! Not mirrored: `strftime_now` (no template this project ships uses it) and `{% generation %}` blocks.

use minijinja::value::Kwargs;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use serde::Serialize;

use super::config::{TokenizerConfig, DEFAULT_TEMPLATE_NAME};
use super::TextError;

/// Name transformers picks when tools are given and the config has a list of named templates.
pub const TOOL_USE_TEMPLATE_NAME: &str = "tool_use";

/// One chat message. Fields left `None` are not passed to the template at all (as in transformers).
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the message.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub content: Option<String>,
    /// Reasoning of an earlier assistant turn (templates that keep it read `reasoning_content`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reasoning_content: Option<String>,
    /// Tool calls of an assistant turn, in the OpenAI shape (`{type, function: {name, arguments}}`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_call_id: Option<String>,
    /// Optional author name.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with a role and a text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: Some(content.into()), ..Default::default() }
    }
}

/// Options of one render call.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Append the assistant header so the model starts a reply.
    pub add_generation_prompt: bool,
    /// Tool schemas (`tools` in the template); `None` renders as `none`.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Documents for RAG templates (`documents`); `None` renders as `none`.
    pub documents: Option<Vec<serde_json::Value>>,
}

/// A compiled chat template plus the special-token strings it is rendered with.
pub struct ChatTemplate {
    name: String,
    env: Environment<'static>,
    special_tokens: Vec<(&'static str, String)>,
    /// The template reads `tools` (found once, at compile).
    renders_tools: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Picks a template from the config: `name` if given; otherwise `tool_use` when `with_tools` and it exists,
    /// else `default`, else the only one there is.
    pub fn from_config(config: &TokenizerConfig, name: Option<&str>, with_tools: bool) -> Result<Self, TextError> {
        let templates = &config.chat_templates;
        if templates.is_empty() {
            return Err(TextError::NoChatTemplate { path: "tokenizer_config.json".into() });
        }
        let find = |n: &str| templates.iter().find(|(k, _)| k == n);
        let chosen = match name {
            Some(n) => find(n),
            None => (if with_tools { find(TOOL_USE_TEMPLATE_NAME) } else { None })
                .or_else(|| find(DEFAULT_TEMPLATE_NAME))
                .or(if templates.len() == 1 { templates.first() } else { None }),
        };
        let (tname, source) = chosen.ok_or_else(|| TextError::UnknownTemplate {
            name: name.unwrap_or(DEFAULT_TEMPLATE_NAME).to_string(),
            available: templates.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", "),
        })?;
        Self::from_source(tname, source, config)
    }

    /// Compiles `source` under `name`, taking the special-token strings from `config`.
    pub fn from_source(name: &str, source: &str, config: &TokenizerConfig) -> Result<Self, TextError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", py_tojson);
        env.add_template_owned(name.to_string(), source.to_string())
            .map_err(|e| TextError::TemplateSyntax { name: name.to_string(), message: describe(&e) })?;
        let special_tokens = [
            ("bos_token", &config.bos_token),
            ("eos_token", &config.eos_token),
            ("unk_token", &config.unk_token),
            ("pad_token", &config.pad_token),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect();
        let renders_tools = env.get_template(name).is_ok_and(|t| t.undeclared_variables(true).contains("tools"));
        Ok(ChatTemplate { name: name.to_string(), env, special_tokens, renders_tools })
    }

    /// Whether the template reads the `tools` variable, i.e. shows the model the tools a request offers
    /// (DeepSeek-R1's released template does not: it renders earlier tool calls and outputs only).
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// The template's name (`default` for a single-string template).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renders typed messages.
    pub fn render(&self, messages: &[ChatMessage], opts: &RenderOptions) -> Result<String, TextError> {
        let values = messages.iter().map(Value::from_serialize).collect();
        self.render_values(values, opts)
    }

    /// Renders messages given as template values (any keys; key order is kept, which `tojson` shows). Keys
    /// whose value is none are dropped first, as transformers does.
    pub fn render_values(&self, messages: Vec<Value>, opts: &RenderOptions) -> Result<String, TextError> {
        if messages.is_empty() {
            return Err(TextError::EmptyConversation);
        }
        let messages: Vec<Value> = messages.iter().map(normalize_message).collect();
        let opt_list =
            |v: &Option<Vec<serde_json::Value>>| v.as_ref().map(Value::from_serialize).unwrap_or(Value::from(()));
        let mut ctx: Vec<(&str, Value)> =
            self.special_tokens.iter().map(|(k, v)| (*k, Value::from(v.as_str()))).collect();
        ctx.push(("messages", Value::from(messages)));
        ctx.push(("tools", opt_list(&opts.tools)));
        ctx.push(("documents", opt_list(&opts.documents)));
        ctx.push(("add_generation_prompt", Value::from(opts.add_generation_prompt)));
        let ctx: Value = ctx.into_iter().collect();
        let tmpl = self
            .env
            .get_template(&self.name)
            .map_err(|e| TextError::Render { name: self.name.clone(), message: describe(&e) })?;
        tmpl.render(ctx).map_err(|e| TextError::Render { name: self.name.clone(), message: describe(&e) })
    }
}

/// True when a rendered prompt leaves the model inside its reasoning: the prompt ends with `<think>` (trailing
/// whitespace ignored), as DeepSeek-R1-0528-style templates do.
pub fn prompt_opens_reasoning(rendered: &str) -> bool {
    rendered.trim_end().ends_with(super::THINK_START)
}

/// transformers' message normalization: drop none-valued keys, alias reasoning fields.
fn normalize_message(msg: &Value) -> Value {
    let Ok(keys) = msg.try_iter() else { return msg.clone() };
    if !matches!(msg.kind(), minijinja::value::ValueKind::Map) {
        return msg.clone();
    }
    let mut entries: Vec<(Value, Value)> = keys
        .filter_map(|k| {
            let v = msg.get_item(&k).ok()?;
            (!v.is_none() && !v.is_undefined()).then_some((k, v))
        })
        .collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|name| entries.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v.clone()));
    if let Some(r) = reasoning {
        // Python: {"thinking": r, **message, "reasoning_content": r}; a key already present keeps its place.
        let mut out = vec![(Value::from("thinking"), r.clone())];
        for (k, v) in entries.drain(..) {
            match k.as_str() {
                Some("thinking") => out[0].1 = v,
                Some("reasoning_content") => out.push((k, r.clone())),
                _ => out.push((k, v)),
            }
        }
        if !out.iter().any(|(k, _)| k.as_str() == Some("reasoning_content")) {
            out.push((Value::from("reasoning_content"), r));
        }
        return out.into_iter().collect();
    }
    entries.into_iter().collect()
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
fn py_tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    // transformers accepts `separators` but every template we know leaves it alone; reject silently-wrong output.
    if kwargs.has("separators") {
        return Err(Error::new(ErrorKind::InvalidOperation, "tojson: `separators` is not supported"));
    }
    kwargs.assert_all_used()?;
    let indent_str = match &indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) if (0..=64).contains(&n) => Some(" ".repeat(n as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: `indent` must be an integer in 0..=64 or a string, got {v}"),
                ))
            }
        },
    };
    let value = if sort_keys { sorted(value) } else { value.clone() };
    let mut out = Vec::new();
    let res = match &indent_str {
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PyCompactFormatter)),
        Some(ind) => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            serde_json::ser::PrettyFormatter::with_indent(ind.as_bytes()),
        )),
    };
    res.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut text = String::from_utf8(out).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if ensure_ascii {
        text = escape_non_ascii(&text);
    }
    Ok(Value::from_safe_string(text))
}

fn sorted(value: &Value) -> Value {
    match value.kind() {
        minijinja::value::ValueKind::Map => {
            let mut entries: Vec<(Value, Value)> = value
                .try_iter()
                .map(|it| it.filter_map(|k| value.get_item(&k).ok().map(|v| (k, sorted(&v)))).collect())
                .unwrap_or_default();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            entries.into_iter().collect()
        }
        minijinja::value::ValueKind::Seq => {
            value.try_iter().map(|it| it.map(|v| sorted(&v)).collect()).unwrap_or_else(|_| value.clone())
        }
        _ => value.clone(),
    }
}

fn escape_non_ascii(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Python's default one-line separators: `", "` between items, `": "` after keys.
struct PyCompactFormatter;

impl serde_json::ser::Formatter for PyCompactFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// minijinja's error with its detail (the `raise_exception` message, the failing expression).
fn describe(e: &Error) -> String {
    match e.detail() {
        Some(d) => format!("{d} ({}{})", e.kind(), e.line().map(|l| format!(", line {l}")).unwrap_or_default()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(src: &str) -> ChatTemplate {
        let cfg = TokenizerConfig { bos_token: Some("<s>".into()), ..Default::default() };
        ChatTemplate::from_source("t", src, &cfg).unwrap()
    }

    #[test]
    fn raise_exception_message_surfaces() {
        let t = template("{{ raise_exception('only user and assistant roles are supported') }}");
        let err = t.render(&[ChatMessage::new("user", "x")], &RenderOptions::default()).unwrap_err();
        assert!(err.to_string().contains("only user and assistant roles are supported"), "{err}");
        assert_eq!(err.kind(), "template_render");
    }

    #[test]
    fn syntax_error_names_template() {
        let cfg = TokenizerConfig::default();
        let err = ChatTemplate::from_source("broken", "{% if %}", &cfg).unwrap_err();
        assert!(err.to_string().contains("`broken`"), "{err}");
    }

    #[test]
    fn tojson_python_style_and_options() {
        let t = template("{{ messages[0] | tojson }}|{{ messages[0] | tojson(sort_keys=true, ensure_ascii=true) }}");
        let m = ChatMessage { name: Some("Zoë".into()), ..ChatMessage::new("user", "a\"b") };
        let out = t.render(&[m], &RenderOptions::default()).unwrap();
        assert_eq!(
            out,
            r#"{"role": "user", "content": "a\"b", "name": "Zoë"}|{"content": "a\"b", "name": "Zo\u00eb", "role": "user"}"#
        );
    }

    #[test]
    fn reasoning_fields_are_aliased_and_none_dropped() {
        let t = template("{% for m in messages %}{{ m | tojson }}{{ 'content' in m }}{% endfor %}");
        let m = ChatMessage { content: None, reasoning_content: Some("r".into()), ..ChatMessage::new("assistant", "") };
        let out = t.render(&[m], &RenderOptions::default()).unwrap();
        assert_eq!(out, r#"{"thinking": "r", "role": "assistant", "reasoning_content": "r"}False"#);
        // Python prints False
    }

    #[test]
    fn templates_that_read_tools_are_told_apart() {
        let with = template(
            "{% if tools %}{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% endif %}{{ messages[0].content }}",
        );
        assert!(with.renders_tools());
        let opts =
            RenderOptions { tools: Some(vec![serde_json::json!({"function": {"name": "add"}})]), ..Default::default() };
        assert_eq!(with.render(&[ChatMessage::new("user", "x")], &opts).unwrap(), "[add]x");
        // R1's released template renders earlier calls (`tool_calls`) but never the `tools` variable.
        let without = template(
            "{% for m in messages %}{% if 'tool_calls' in m %}{{ m.tool_calls | length }}{% endif %}{% endfor %}",
        );
        assert!(!without.renders_tools());
    }

    #[test]
    fn template_selection() {
        let cfg = TokenizerConfig {
            chat_templates: vec![("default".into(), "d".into()), ("tool_use".into(), "t".into())],
            ..Default::default()
        };
        let one = [ChatMessage::new("user", "x")];
        let r = |name, tools| {
            ChatTemplate::from_config(&cfg, name, tools).unwrap().render(&one, &RenderOptions::default()).unwrap()
        };
        assert_eq!(r(None, false), "d");
        assert_eq!(r(None, true), "t");
        assert_eq!(r(Some("default"), true), "d");
        let err = ChatTemplate::from_config(&cfg, Some("rag"), false).unwrap_err();
        assert!(err.to_string().contains("rag") && err.to_string().contains("default, tool_use"), "{err}");
        let empty = TokenizerConfig::default();
        assert_eq!(ChatTemplate::from_config(&empty, None, false).unwrap_err().kind(), "no_chat_template");
    }

    #[test]
    fn empty_conversation_refused() {
        let t = template("x");
        assert!(matches!(t.render(&[], &RenderOptions::default()), Err(TextError::EmptyConversation)));
    }

    #[test]
    fn opens_reasoning() {
        assert!(prompt_opens_reasoning("<｜Assistant｜><think>\n"));
        assert!(!prompt_opens_reasoning("<｜Assistant｜>"));
    }
}
