//! OpenAI-compatible HTTP API: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as
//! server-sent events, ending with `data: [DONE]`) and `GET /v1/models`. The reasoning is returned as
//! `reasoning_content` beside `content`, as DeepSeek's API does. Errors use OpenAI's `{"error": {...}}` shape.
//! This file reads requests (every field is honoured or refused by name); `respond.rs` writes the responses.

mod respond;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::AppState;
use crate::error::ServeError;
use crate::model::{ChatTurn, ResponseFormat, ToolCall};
use crate::telemetry::{request_id, request_span, Carrier};
use crate::validate::{self, RawRequest, RawSampling, ToolChoice, ToolsAsked};
use respond::Head;

/// `stop` as OpenAI accepts it: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// A chat message in a request.
#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    /// Role.
    pub role: String,
    /// Text: a string, or a list of content parts (`{"type": "text", "text": ...}`, joined in order); may be null
    /// on an assistant turn with `tool_calls`.
    #[serde(default)]
    pub content: Option<Content>,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(default)]
    pub tool_calls: Vec<Value>,
    /// The call a `tool` message answers.
    pub tool_call_id: Option<String>,
}

/// `content` as OpenAI accepts it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts are supported.
    Parts(Vec<serde_json::Map<String, Value>>),
}

impl Default for Content {
    fn default() -> Self {
        Content::Text(String::new())
    }
}

/// An assistant turn's `tool_calls[i]` read into a [`ToolCall`]; a malformed one is refused naming it.
fn tool_call(v: &Value, message: usize, i: usize) -> Result<ToolCall, ServeError> {
    let f = v.get("function");
    let text = |o: Option<&Value>, k: &str| o.and_then(|o| o.get(k)).and_then(Value::as_str).map(str::to_string);
    match (text(f, "name"), text(f, "arguments")) {
        (Some(name), Some(arguments)) => {
            Ok(ToolCall { id: text(Some(v), "id").unwrap_or_default(), name, arguments })
        }
        _ => Err(ServeError::invalid(
            format!("messages[{message}].tool_calls[{i}]"),
            format!("must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}} with strings, got {v}"),
        )),
    }
}

/// `tools` and `tool_choice` as OpenAI spells them (chat only), checked by [`validate::tools_asked`].
fn tools_asked(body: &CompletionBody, chat: bool) -> Result<ToolsAsked, ServeError> {
    let tools = body.tools.as_deref().unwrap_or_default();
    if !tools.is_empty() && !chat {
        return Err(ServeError::invalid("tools", "is a chat field; use /v1/chat/completions"));
    }
    let choice = match body.tool_choice.as_ref() {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(v) => match v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => ToolChoice::Named(name),
            _ => {
                return Err(ServeError::invalid(
                    "tool_choice",
                    format!("must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\"}}}}, got {v}"),
                ))
            }
        },
    };
    let constrained = body
        .response_format
        .as_ref()
        .is_some_and(|f| !f.is_null() && f.get("type").and_then(Value::as_str) != Some("text"));
    validate::tools_asked(tools, choice, "tools", constrained)
}

impl Content {
    /// The message text; a part that is not text is refused, naming the message, the part and its type.
    fn text(&self, message: usize) -> Result<String, ServeError> {
        match self {
            Content::Text(t) => Ok(t.clone()),
            Content::Parts(parts) => {
                let mut out = String::new();
                for (i, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => out.push_str(t),
                        (kind, _) => {
                            return Err(ServeError::invalid(
                                format!("messages[{message}].content[{i}]"),
                                format!(
                                    "must be a text part {{\"type\": \"text\", \"text\": ...}}; this model reads text only, got type {}",
                                    kind.map_or("(none)".to_string(), |k| format!("{k:?}"))
                                ),
                            ));
                        }
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Body of `/v1/chat/completions` and `/v1/completions` (fields of both). Every other field lands in `other` and is
/// checked by [`refuse_unhonoured`]: no field is silently ignored.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct CompletionBody {
    /// Model id; must match the served one when given.
    pub model: Option<String>,
    /// Chat messages (chat endpoint).
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Prompt (completions endpoint).
    pub prompt: Option<String>,
    /// Output length.
    pub max_tokens: Option<u32>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    /// Temperature.
    pub temperature: Option<f32>,
    /// Nucleus threshold.
    pub top_p: Option<f32>,
    /// Top-k (extension, as vLLM).
    pub top_k: Option<u32>,
    /// Min-p (extension).
    pub min_p: Option<f32>,
    /// Repetition penalty (extension).
    pub repetition_penalty: Option<f32>,
    /// Seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Stream as SSE.
    #[serde(default)]
    pub stream: bool,
    /// Generate past EOS (extension).
    #[serde(default)]
    pub ignore_eos: bool,
    /// Prefill the whole prompt whatever the server's prefix cache holds (extension, for benchmarks).
    #[serde(default)]
    pub skip_prefix_cache: bool,
    /// Number of choices (1 to 16).
    pub n: Option<u32>,
    /// Chat: `true` for per-token log-probabilities. Completions: the number of alternatives (0 to 5) per token.
    pub logprobs: Option<Value>,
    /// Chat: alternatives per token with `logprobs: true` (0 to 20).
    pub top_logprobs: Option<u32>,
    /// OpenAI presence penalty, [-2, 2].
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty, [-2, 2].
    pub frequency_penalty: Option<f32>,
    /// `{"include_usage": true}`: a last chunk with no choices carries the usage (streaming only).
    pub stream_options: Option<StreamOptions>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    pub response_format: Option<Value>,
    /// Function tools offered to the model (chat; the model's chat template must render them).
    pub tools: Option<Vec<Value>>,
    /// `auto` (default) or `none`.
    pub tool_choice: Option<Value>,
    /// Every other field of the request.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// `stream_options`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the usage (and `usage: null` in the others).
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields that do not change the output (bookkeeping for the caller), accepted as they are.
const NO_EFFECT_FIELDS: [&str; 4] = ["user", "metadata", "store", "service_tier"];

/// Refuses, naming it, any field this server would otherwise ignore: OpenAI fields it does not implement yet are
/// accepted only at the value that asks for nothing (`logit_bias: {}`, `tools: []`, `response_format: {"type":
/// "text"}`, ...); unknown fields are refused.
fn refuse_unhonoured(other: &serde_json::Map<String, Value>) -> Result<(), ServeError> {
    for (field, v) in other {
        let neutral = match field.as_str() {
            f if NO_EFFECT_FIELDS.contains(&f) => true,
            "logit_bias" => v.is_null() || v.as_object().is_some_and(|m| m.is_empty()),
            "functions" => v.is_null() || v.as_array().is_some_and(|a| a.is_empty()),
            "function_call" => v.is_null() || v.as_str() == Some("none"),
            "parallel_tool_calls" => true,
            _ => {
                return Err(ServeError::invalid(field.clone(), "is not a field this server knows; remove it"));
            }
        };
        if !neutral {
            return Err(ServeError::invalid(
                field.clone(),
                format!("is not supported by this server yet (it would be ignored), got {v}"),
            ));
        }
    }
    Ok(())
}

fn error_response(e: &ServeError) -> Response {
    let (code, kind) = e.class().http();
    let param = match e {
        ServeError::InvalidArgument { field, .. } => Value::String(field.clone()),
        _ => Value::Null,
    };
    (code, Json(json!({"error": {"message": e.to_string(), "type": kind, "param": param, "code": e.kind()}})))
        .into_response()
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `response_format` as OpenAI spells it: `text` (None), `json_object`, or `json_schema` with its `schema`.
fn response_format(v: Option<&Value>) -> Result<Option<ResponseFormat>, ServeError> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    let bad = |field: &str, msg: String| Err(ServeError::invalid(field, msg));
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => match v.get("json_schema").and_then(|j| j.get("schema")) {
            Some(schema) => Ok(Some(ResponseFormat::JsonSchema(schema.clone()))),
            None => bad(
                "response_format.json_schema.schema",
                "is required with `type: json_schema` (the JSON schema the answer must follow)".into(),
            ),
        },
        _ => bad("response_format", format!("`type` must be text, json_object or json_schema, got {v}")),
    }
}

/// Most alternatives per token the legacy completions API's integer `logprobs` allows.
const MAX_COMPLETIONS_LOGPROBS: u64 = 5;

/// The alternatives per token asked for, or None: chat takes `logprobs: true` (+ `top_logprobs`), completions an
/// integer `logprobs` (0 to 5). Anything else is refused naming the field.
fn logprobs_asked(body: &CompletionBody, chat: bool) -> Result<Option<u32>, ServeError> {
    let lp = body.logprobs.as_ref().filter(|v| !v.is_null());
    if chat {
        let on = match lp {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(v) => return Err(ServeError::invalid("logprobs", format!("must be true or false, got {v}"))),
        };
        return match (on, body.top_logprobs) {
            (true, top) => Ok(Some(top.unwrap_or(0))),
            (false, None | Some(0)) => Ok(None),
            (false, Some(k)) => Err(ServeError::invalid(
                "top_logprobs",
                format!("needs `logprobs: true` (it adds alternatives to them), got {k} without"),
            )),
        };
    }
    if let Some(k) = body.top_logprobs {
        return Err(ServeError::invalid(
            "top_logprobs",
            format!("is a chat field; /v1/completions takes the alternatives as `logprobs` (0 to {MAX_COMPLETIONS_LOGPROBS}), got {k}"),
        ));
    }
    match lp {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(k) if k <= MAX_COMPLETIONS_LOGPROBS => Ok(Some(k as u32)),
            _ => Err(ServeError::invalid(
                "logprobs",
                format!("must be an integer from 0 to {MAX_COMPLETIONS_LOGPROBS} (alternatives per token), got {v}"),
            )),
        },
    }
}

/// The body as a protocol-neutral [`RawRequest`], and whether calls in the answer are read into `tool_calls`.
fn raw_request(body: &CompletionBody, chat: bool) -> Result<(RawRequest, bool), ServeError> {
    refuse_unhonoured(&body.other)?;
    if body.stream_options.is_some() && !body.stream {
        return Err(ServeError::invalid("stream_options", "is only allowed with `stream: true`"));
    }
    let logprobs = logprobs_asked(body, chat)?;
    let tools = tools_asked(body, chat)?;
    let (prompt, messages) = if chat {
        if body.prompt.is_some() {
            return Err(ServeError::invalid("prompt", "is not accepted by /v1/chat/completions; use `messages`"));
        }
        let turns = body
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok(ChatTurn {
                    role: m.role.clone(),
                    content: m.content.as_ref().map(|c| c.text(i)).transpose()?.unwrap_or_default(),
                    tool_calls: m
                        .tool_calls
                        .iter()
                        .enumerate()
                        .map(|(k, c)| tool_call(c, i, k))
                        .collect::<Result<_, _>>()?,
                    tool_call_id: m.tool_call_id.clone(),
                })
            })
            .collect::<Result<Vec<_>, ServeError>>()?;
        (None, turns)
    } else {
        if !body.messages.is_empty() {
            return Err(ServeError::invalid("messages", "is not accepted by /v1/completions; use `prompt`"));
        }
        (Some(body.prompt.clone().unwrap_or_default()), Vec::new())
    };
    let raw = RawRequest {
        prompt,
        messages,
        prompt_token_ids: Vec::new(),
        tools: tools.json,
        logprobs,
        n: body.n,
        response_format: match tools.forced {
            Some(forced) => Some(ResponseFormat::ToolCall(forced)),
            None => response_format(body.response_format.as_ref())?,
        },
        max_tokens: body.max_completion_tokens.or(body.max_tokens),
        sampling: RawSampling {
            temperature: body.temperature,
            top_p: body.top_p,
            top_k: body.top_k,
            min_p: body.min_p,
            repetition_penalty: body.repetition_penalty,
            seed: body.seed,
            presence_penalty: body.presence_penalty,
            frequency_penalty: body.frequency_penalty,
        },
        stop: match &body.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        },
        ignore_eos: body.ignore_eos,
        skip_prefix_cache: body.skip_prefix_cache,
        sampling_prefix: "",
    };
    Ok((raw, tools.read_calls))
}

/// `GET /v1/models`: the served model, with (once loaded) the defaults a request that sets no sampling field gets
/// (the checkpoint's `generation_config.json` over the server's) and the ids that end generation.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut model = json!({"id": state.model_id, "object": "model", "created": 0, "owned_by": "r1"});
    if let Ok((scheduler, limits)) = state.ready() {
        let d = &limits.sampling_defaults;
        model["default_sampling"] = json!({"temperature": d.temperature, "top_p": d.top_p, "top_k": d.top_k,
            "min_p": d.min_p, "repetition_penalty": d.repetition_penalty, "presence_penalty": 0.0,
            "frequency_penalty": 0.0});
        model["eos_token_ids"] = json!(scheduler.description().eos_token_ids);
        model["max_context_tokens"] = json!(limits.max_context_tokens);
    }
    Json(json!({"object": "list", "data": [model]}))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CompletionBody>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(body)) => complete(state, headers, body, true).await,
        Err(r) => rejected(&state, r),
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<CompletionBody>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(body)) => complete(state, headers, body, false).await,
        Err(r) => rejected(&state, r),
    }
}

/// A body the JSON extractor could not take, in OpenAI's error shape: over `--max-request-bytes` is 413 naming the
/// limit; anything else (not JSON, a wrong type, a number out of its type's range) is 400 with serde's message,
/// which names the field (axum's own answer would be a plain-text 413, 415 or 422).
fn rejected(state: &AppState, r: JsonRejection) -> Response {
    let too_large = r.status() == StatusCode::PAYLOAD_TOO_LARGE;
    let (status, code, message) = if too_large {
        let limit = state.max_request_bytes;
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            format!("the request body is larger than {limit} bytes (--max-request-bytes)"),
        )
    } else {
        (StatusCode::BAD_REQUEST, "invalid_argument", r.body_text())
    };
    state.metrics.request_done("http", code);
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}});
    (status, Json(body)).into_response()
}

async fn complete(state: Arc<AppState>, headers: HeaderMap, body: CompletionBody, chat: bool) -> Response {
    let carrier = Carrier::Http(&headers);
    let rid = request_id(&carrier);
    let span = request_span(if chat { "chat.completions" } else { "completions" }, &rid, &carrier);
    if let Some(m) = &body.model {
        if m != &state.model_id {
            let msg = format!("model {m:?} not found; this server serves {:?}", state.model_id);
            return (StatusCode::NOT_FOUND, Json(json!({"error": {"message": msg, "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}))).into_response();
        }
    }
    let (raw, tool_calls) = match raw_request(&body, chat) {
        Ok(r) => r,
        Err(e) => {
            state.metrics.request_done("http", e.kind());
            return error_response(&e);
        }
    };
    let logprobs = raw.logprobs.is_some();
    let rxs = match state.start(raw, "http", rid.clone(), http_deadline(&headers, body.stream), span.clone()).await {
        Ok(rxs) => rxs,
        Err(e) => return error_response(&e),
    };
    let frontend = match state.ready() {
        Ok((s, _)) => s.frontend(),
        Err(e) => return error_response(&e),
    };
    let head = Head {
        id: if chat { format!("chatcmpl-{rid}") } else { format!("cmpl-{rid}") },
        created: now_secs(),
        model: state.model_id.clone(),
        chat,
        logprobs,
        include_usage: body.stream_options.as_ref().is_some_and(|o| o.include_usage),
        tool_calls,
        frontend,
    };
    if body.stream {
        respond::stream(rxs, span, head)
    } else {
        respond::whole(rxs, &span, head).await
    }
}

/// The request's deadline, with the same margin as `grpc-timeout` (a fifth, at most 50 ms) so the server's 504 arrives
/// before the client gives up: from `x-request-timeout` (seconds), else, for a non-streaming request, from
/// `x-stainless-read-timeout`, the read timeout the official OpenAI SDKs send (a non-streaming response is one read;
/// a stream's read timeout bounds the gap between chunks, not the whole request). No header: no deadline.
fn http_deadline(headers: &HeaderMap, stream: bool) -> Option<std::time::Instant> {
    let seconds = |h: &str| headers.get(h)?.to_str().ok()?.trim().parse::<f64>().ok();
    let secs =
        seconds("x-request-timeout").or_else(|| if stream { None } else { seconds("x-stainless-read-timeout") })?;
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return None;
    }
    let d = std::time::Duration::from_secs_f64(secs);
    Some(std::time::Instant::now() + d - (d / 5).min(std::time::Duration::from_millis(50)))
}
