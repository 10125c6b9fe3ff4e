//! OpenAI-compatible HTTP API: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as
//! server-sent events, ending with `data: [DONE]`) and `GET /v1/models`. The reasoning is returned as
//! `reasoning_content` beside `content`, as DeepSeek's API does. Errors use OpenAI's `{"error": {...}}` shape.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::{collect, record_finish, AppState};
use crate::error::ServeError;
use crate::model::ChatTurn;
use crate::scheduler::{Event, FinishReason};
use crate::telemetry::{request_id, request_span, Carrier};
use crate::validate::{RawRequest, RawSampling};

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
    /// Text: a string, or a list of content parts (`{"type": "text", "text": ...}`, joined in order).
    #[serde(default)]
    pub content: Content,
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
    /// Number of choices; only 1 is supported.
    pub n: Option<u32>,
    /// Every other field of the request.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Fields that do not change the output (bookkeeping for the caller), accepted as they are.
const NO_EFFECT_FIELDS: [&str; 5] = ["user", "metadata", "store", "service_tier", "stream_options"];

/// Refuses, naming it, any field this server would otherwise ignore: OpenAI fields it does not implement yet are
/// accepted only at the value that asks for nothing (`logprobs: false`, `presence_penalty: 0`, `tools: []`,
/// `response_format: {"type": "text"}`, ...); unknown fields are refused. (`stream_options.include_usage` is honoured:
/// the last streamed chunk always carries `usage`.)
fn refuse_unhonoured(other: &serde_json::Map<String, Value>) -> Result<(), ServeError> {
    for (field, v) in other {
        let neutral = match field.as_str() {
            f if NO_EFFECT_FIELDS.contains(&f) => true,
            "logprobs" => v.is_null() || v == &Value::Bool(false),
            "top_logprobs" => v.is_null() || v.as_u64() == Some(0),
            "presence_penalty" | "frequency_penalty" => v.is_null() || v.as_f64() == Some(0.0),
            "logit_bias" => v.is_null() || v.as_object().is_some_and(|m| m.is_empty()),
            "tools" | "functions" => v.is_null() || v.as_array().is_some_and(|a| a.is_empty()),
            "tool_choice" | "function_call" => v.is_null() || v.as_str() == Some("none"),
            "parallel_tool_calls" => true,
            "response_format" => v.is_null() || v.get("type").and_then(Value::as_str) == Some("text"),
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

fn finish_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::StopSequence => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn raw_request(body: &CompletionBody, chat: bool) -> Result<RawRequest, ServeError> {
    refuse_unhonoured(&body.other)?;
    if body.n.is_some_and(|n| n != 1) {
        return Err(ServeError::invalid(
            "n",
            format!("must be 1 (one choice per request), got {}", body.n.unwrap_or(0)),
        ));
    }
    let (prompt, messages) = if chat {
        if body.prompt.is_some() {
            return Err(ServeError::invalid("prompt", "is not accepted by /v1/chat/completions; use `messages`"));
        }
        let turns = body
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| Ok(ChatTurn { role: m.role.clone(), content: m.content.text(i)? }))
            .collect::<Result<Vec<_>, ServeError>>()?;
        (None, turns)
    } else {
        if !body.messages.is_empty() {
            return Err(ServeError::invalid("messages", "is not accepted by /v1/completions; use `prompt`"));
        }
        (Some(body.prompt.clone().unwrap_or_default()), Vec::new())
    };
    Ok(RawRequest {
        prompt,
        messages,
        max_tokens: body.max_completion_tokens.or(body.max_tokens),
        sampling: RawSampling {
            temperature: body.temperature,
            top_p: body.top_p,
            top_k: body.top_k,
            min_p: body.min_p,
            repetition_penalty: body.repetition_penalty,
            seed: body.seed,
        },
        stop: match &body.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        },
        ignore_eos: body.ignore_eos,
        skip_prefix_cache: body.skip_prefix_cache,
        sampling_prefix: "",
    })
}

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0, "owned_by": "r1"}]}))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(body): Json<CompletionBody>,
) -> Response {
    complete(state, headers, body, true).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(body): Json<CompletionBody>,
) -> Response {
    complete(state, headers, body, false).await
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
    let raw = match raw_request(&body, chat) {
        Ok(r) => r,
        Err(e) => {
            state.metrics.request_done("http", e.kind());
            return error_response(&e);
        }
    };
    let rx = match state.start(raw, "http", rid.clone(), http_deadline(&headers, body.stream), span.clone()).await {
        Ok(rx) => rx,
        Err(e) => return error_response(&e),
    };
    let head = Head {
        id: if chat { format!("chatcmpl-{rid}") } else { format!("cmpl-{rid}") },
        created: now_secs(),
        model: state.model_id.clone(),
        chat,
    };
    if body.stream {
        stream_response(rx, span, head)
    } else {
        whole_response(rx, &span, head).await
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

/// What every response object of one request repeats.
struct Head {
    id: String,
    created: u64,
    model: String,
    chat: bool,
}

/// The non-streaming response: one JSON object with the whole message and the usage.
async fn whole_response(rx: UnboundedReceiver<Event>, span: &tracing::Span, head: Head) -> Response {
    let c = match collect(rx, span).await {
        Err(e) => return error_response(&e),
        Ok(c) => c,
    };
    let choice = if head.chat {
        json!({"index": 0, "message": {"role": "assistant", "content": c.text, "reasoning_content": c.reasoning},
               "finish_reason": finish_str(c.finish_reason)})
    } else {
        json!({"index": 0, "text": c.text, "reasoning_content": c.reasoning, "finish_reason": finish_str(c.finish_reason)})
    };
    let usage = json!({"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                       "total_tokens": c.prompt_tokens + c.completion_tokens,
                       "prompt_tokens_details": {"cached_tokens": c.cached_prompt_tokens}});
    let object = if head.chat { "chat.completion" } else { "text_completion" };
    Json(json!({"id": head.id, "object": object, "created": head.created, "model": head.model, "choices": [choice], "usage": usage}))
        .into_response()
}

/// The streaming response: server-sent events, one chunk per token, the finish reason and usage last, then `[DONE]`.
fn stream_response(rx: UnboundedReceiver<Event>, span: tracing::Span, head: Head) -> Response {
    let chat = head.chat;
    let chunk_object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let (id, created, model) = (head.id, head.created, head.model);
    let chunk = move |choice: Value, usage: Value| {
        let v = json!({"id": id, "object": chunk_object, "created": created, "model": model, "choices": [choice], "usage": usage});
        SseEvent::default().data(v.to_string())
    };
    let events = UnboundedReceiverStream::new(rx)
        .filter_map(move |ev| {
            let out = match ev {
                Event::Admitted { .. } => None,
                Event::Delta(d) => {
                    let choice = if chat {
                        json!({"index": 0, "delta": {"role": "assistant", "content": d.text, "reasoning_content": d.reasoning}, "finish_reason": null})
                    } else {
                        json!({"index": 0, "text": d.text, "reasoning_content": d.reasoning, "finish_reason": null})
                    };
                    Some(vec![chunk(choice, Value::Null)])
                }
                Event::Finished(f) => {
                    record_finish(&span, f.reason, f.completion_tokens);
                    let choice = if chat {
                        json!({"index": 0, "delta": {}, "finish_reason": finish_str(f.reason)})
                    } else {
                        json!({"index": 0, "text": "", "finish_reason": finish_str(f.reason)})
                    };
                    let usage = json!({"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
                                       "total_tokens": f.prompt_tokens + f.completion_tokens,
                                       "prompt_tokens_details": {"cached_tokens": f.cached_prompt_tokens}});
                    Some(vec![chunk(choice, usage), SseEvent::default().data("[DONE]")])
                }
                Event::Failed(e) => {
                    let v = json!({"error": {"message": e.to_string(), "code": e.kind()}});
                    Some(vec![SseEvent::default().data(v.to_string()), SseEvent::default().data("[DONE]")])
                }
            };
            futures::future::ready(out)
        })
        .flat_map(|v| futures::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}
