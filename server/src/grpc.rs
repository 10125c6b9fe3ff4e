//! The gRPC front end: `r1.v1.Generation` (Generate, GenerateStream, ModelInfo), and the one place that turns
//! [`ServeError`] into a gRPC status. Health (`grpc.health.v1`) and reflection are added in [`crate::server`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use r1_proto::r1::v1 as pb;
use tonic::{Request, Response, Status};

use crate::api::{collect_all, merged, record_finish, AppState};
use crate::error::ServeError;
use crate::model::{ChatTurn, Frontend, ResponseFormat, TokenLogprobs, ToolCall};
use crate::scheduler::{Event, FinishReason};
use crate::telemetry::{request_id, request_span, Carrier};
use crate::validate::{self, RawRequest, RawSampling, ToolChoice, ToolsAsked};
use r1_engine::text::tools::split_tool_calls;

/// The gRPC status for an error.
pub fn status(e: &ServeError) -> Status {
    Status::new(e.class().grpc(), e.to_string())
}

/// Parses a `grpc-timeout` header value (`<digits><unit>`, unit one of H M S m u n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's deadline from `grpc-timeout`, minus a margin (a fifth of the timeout, at most 50 ms) so that the
/// server's DEADLINE_EXCEEDED reaches the client before the client's own timer gives up on the call.
fn deadline(meta: &tonic::metadata::MetadataMap) -> Option<Instant> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let d = parse_grpc_timeout(v)?;
    Some(Instant::now() + d - (d / 5).min(Duration::from_millis(50)))
}

fn finish_reason(r: FinishReason) -> pb::FinishReason {
    match r {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::StopSequence => pb::FinishReason::StopSequence,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// The wire request as a protocol-neutral [`RawRequest`]; `top_logprobs` without `logprobs` is refused by name.
pub fn raw_request(r: pb::GenerateRequest) -> Result<RawRequest, ServeError> {
    let s = r.sampling.unwrap_or_default();
    if r.top_logprobs > 0 && !r.logprobs {
        return Err(ServeError::invalid(
            "top_logprobs",
            format!("needs `logprobs: true` (it adds alternatives to them), got {} without", r.top_logprobs),
        ));
    }
    let response_format = match r.response_format {
        None => None,
        Some(f) => match pb::response_format::Type::try_from(f.r#type) {
            Ok(pb::response_format::Type::Text) => None,
            Ok(pb::response_format::Type::JsonObject) => Some(ResponseFormat::JsonObject),
            Ok(pb::response_format::Type::JsonSchema) => {
                Some(ResponseFormat::JsonSchema(serde_json::from_str(&f.json_schema).map_err(|e| {
                    ServeError::invalid(
                        "response_format.json_schema",
                        format!("must be a JSON schema as JSON text: {e}"),
                    )
                })?))
            }
            Err(_) => {
                return Err(ServeError::invalid(
                    "response_format.type",
                    format!("must be TYPE_TEXT, TYPE_JSON_OBJECT or TYPE_JSON_SCHEMA, got {}", f.r#type),
                ))
            }
        },
    };
    let ToolsAsked { json: tools, forced, .. } = tools_asked(&r.tools_json, &r.tool_choice, response_format.is_some())?;
    let response_format = match forced {
        Some(forced) => Some(ResponseFormat::ToolCall(forced)),
        None => response_format,
    };
    Ok(RawRequest {
        response_format,
        prompt: r.prompt,
        messages: r
            .messages
            .into_iter()
            .map(|m| ChatTurn {
                role: m.role,
                content: m.content,
                tool_calls: m
                    .tool_calls
                    .into_iter()
                    .map(|c| ToolCall { id: c.id, name: c.name, arguments: c.arguments })
                    .collect(),
                tool_call_id: (!m.tool_call_id.is_empty()).then_some(m.tool_call_id),
            })
            .collect(),
        tools,
        prompt_token_ids: r.prompt_token_ids,
        logprobs: r.logprobs.then_some(r.top_logprobs),
        n: (r.n > 0).then_some(r.n),
        max_tokens: r.max_tokens,
        sampling: RawSampling {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
        },
        stop: r.stop,
        ignore_eos: r.ignore_eos,
        skip_prefix_cache: r.skip_prefix_cache,
        sampling_prefix: "sampling.",
    })
}

/// `tools_json` (a JSON array of function tools, as OpenAI's `tools`) and `tool_choice` (`auto`, `none`, `required`
/// or a tool's name), checked by [`validate::tools_asked`].
fn tools_asked(text: &str, choice: &str, answer_constrained: bool) -> Result<ToolsAsked, ServeError> {
    let tools: Vec<serde_json::Value> = if text.trim().is_empty() {
        Vec::new()
    } else {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ServeError::invalid("tools_json", format!("must be a JSON array of function tools: {e}")))?;
        match v {
            serde_json::Value::Array(a) => a,
            v => return Err(ServeError::invalid("tools_json", format!("must be a JSON array, got {v}"))),
        }
    };
    let choice = match choice {
        "" | "auto" => ToolChoice::Auto,
        "none" => ToolChoice::None,
        "required" => ToolChoice::Required,
        name => ToolChoice::Named(name),
    };
    validate::tools_asked(&tools, choice, "tools_json", answer_constrained)
}

/// The calls in an answer (R1's format) and the text before them; the answer itself when it holds none.
fn calls_in(answer: &str, tools: bool) -> (String, Vec<pb::ToolCall>) {
    match split_tool_calls(answer).filter(|_| tools) {
        None => (answer.to_string(), Vec::new()),
        Some((text, calls)) => (
            text,
            calls
                .into_iter()
                .enumerate()
                .map(|(k, c)| pb::ToolCall { id: format!("call_{k}"), name: c.name, arguments: c.arguments })
                .collect(),
        ),
    }
}

/// Log-probabilities as the wire carries them: token texts and bytes from the tokenizer; `-inf` (a token the model
/// rules out) as -9999, which JSON-bound clients can hold, as OpenAI does.
pub fn token_logprobs(frontend: &dyn Frontend, ids: &[u32], lps: &[TokenLogprobs]) -> Vec<pb::TokenLogprob> {
    let finite = |l: f32| if l.is_finite() { l } else { -9999.0 };
    ids.iter()
        .zip(lps)
        .map(|(&id, lp)| {
            let t = frontend.token_text(id);
            pb::TokenLogprob {
                token_id: id,
                token: t.text,
                bytes: t.bytes,
                logprob: finite(lp.logprob),
                top_logprobs: lp
                    .top
                    .iter()
                    .map(|&(id, l)| {
                        let t = frontend.token_text(id);
                        pb::TopLogprob { token_id: id, token: t.text, bytes: t.bytes, logprob: finite(l) }
                    })
                    .collect(),
            }
        })
        .collect()
}

fn usage(prompt: usize, completion: usize, cached: usize) -> pb::Usage {
    pb::Usage {
        prompt_tokens: prompt as u32,
        completion_tokens: completion as u32,
        cached_prompt_tokens: cached as u32,
    }
}

/// The `r1.v1.Generation` service.
#[derive(Debug, Clone)]
pub struct GenerationService {
    state: Arc<AppState>,
}

impl GenerationService {
    /// A service over shared state.
    pub fn new(state: Arc<AppState>) -> Self {
        GenerationService { state }
    }
}

/// A request queued by [`GenerationService::begin`].
struct Begun {
    id: String,
    span: tracing::Span,
    /// One event channel per choice.
    rxs: Vec<tokio::sync::mpsc::UnboundedReceiver<Event>>,
    /// Tools were offered: calls in the answers are read into `tool_calls`.
    tools: bool,
    frontend: Arc<dyn Frontend>,
}

impl GenerationService {
    /// What both generation calls do first: the request id and span from the metadata, the request checked (a
    /// refusal is counted) and queued, one sequence per choice.
    async fn begin(&self, req: Request<pb::GenerateRequest>, call: &'static str) -> Result<Begun, Status> {
        let carrier = Carrier::Grpc(req.metadata());
        let id = request_id(&carrier);
        let span = request_span(call, &id, &carrier);
        let deadline = deadline(req.metadata());
        let shown_only = req.get_ref().tool_choice == "none";
        let raw = raw_request(req.into_inner()).map_err(|e| {
            self.state.metrics.request_done("grpc", e.kind());
            status(&e)
        })?;
        let tools = raw.tools.is_some() && !shown_only;
        let rxs = self.state.start(raw, "grpc", id.clone(), deadline, span.clone()).await.map_err(|e| status(&e))?;
        let frontend = self.state.ready().map_err(|e| status(&e))?.0.frontend();
        Ok(Begun { id, span, rxs, tools, frontend })
    }
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::generation_server::Generation for GenerationService {
    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let Begun { id, span, rxs, tools, frontend } = self.begin(req, "Generate").await?;
        let all = collect_all(rxs, &span).await.map_err(|e| status(&e))?;
        let choices: Vec<pb::Choice> = all
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (text, tool_calls) = calls_in(&c.text, tools);
                pb::Choice {
                    index: i as u32,
                    text,
                    reasoning: c.reasoning.clone(),
                    token_ids: c.token_ids.clone(),
                    finish_reason: finish_reason(c.finish_reason) as i32,
                    logprobs: token_logprobs(frontend.as_ref(), &c.token_ids, &c.logprobs),
                    tool_calls,
                }
            })
            .collect();
        let Some(first) = all.first() else {
            return Err(status(&ServeError::Unavailable { reason: "the request produced no choice".into() }));
        };
        let completion: usize = all.iter().map(|c| c.completion_tokens).sum();
        let mut resp = Response::new(pb::GenerateResponse {
            text: choices[0].text.clone(),
            tool_calls: choices[0].tool_calls.clone(),
            reasoning: first.reasoning.clone(),
            token_ids: first.token_ids.clone(),
            finish_reason: finish_reason(first.finish_reason) as i32,
            usage: Some(usage(first.prompt_tokens, completion, first.cached_prompt_tokens)),
            logprobs: choices[0].logprobs.clone(),
            choices,
        });
        if let Ok(v) = id.parse() {
            resp.metadata_mut().insert("x-request-id", v);
        }
        Ok(resp)
    }

    type GenerateStreamStream = StreamOf<pb::GenerateStreamResponse>;

    async fn generate_stream(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let Begun { id, span, rxs, tools, frontend } = self.begin(req, "GenerateStream").await?;
        // Per choice, with tools: the answer so far, read for calls when the choice ends.
        let mut answers: Vec<String> = Vec::new();
        // The span lives as long as the stream; dropping the stream (client left) closes the channels, and the
        // scheduler frees the sequences at its next iteration.
        let stream = merged(rxs).filter_map(move |(index, ev)| {
            let index = index as u32;
            let out = match ev {
                Event::Admitted { queue_time } => {
                    span.record("queue_ms", queue_time.as_millis() as u64);
                    None
                }
                Event::Delta(d) => Some(Ok(pb::GenerateStreamResponse {
                    logprobs: token_logprobs(frontend.as_ref(), &d.token_ids, &d.logprobs),
                    text: {
                        if tools {
                            answers.resize(answers.len().max(index as usize + 1), String::new());
                            answers[index as usize].push_str(&d.text);
                        }
                        d.text
                    },
                    reasoning: d.reasoning,
                    token_ids: d.token_ids,
                    finish_reason: pb::FinishReason::Unspecified as i32,
                    usage: None,
                    index,
                    tool_calls: Vec::new(),
                })),
                Event::Finished(f) => {
                    record_finish(&span, f.reason, f.completion_tokens);
                    let answer = answers.get_mut(index as usize).map(std::mem::take).unwrap_or_default();
                    Some(Ok(pb::GenerateStreamResponse {
                        finish_reason: finish_reason(f.reason) as i32,
                        usage: Some(usage(f.prompt_tokens, f.completion_tokens, f.cached_prompt_tokens)),
                        index,
                        tool_calls: calls_in(&answer, tools).1,
                        ..Default::default()
                    }))
                }
                Event::Failed(e) => {
                    span.record("error", tracing::field::display(&e));
                    Some(Err(status(&e)))
                }
            };
            futures::future::ready(out)
        });
        let mut resp = Response::new(Box::pin(stream) as Self::GenerateStreamStream);
        if let Ok(v) = id.parse() {
            resp.metadata_mut().insert("x-request-id", v);
        }
        Ok(resp)
    }

    async fn model_info(&self, _req: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let (scheduler, limits) = self.state.ready().map_err(|e| status(&e))?;
        let d = scheduler.description();
        let cfg = scheduler.config();
        Ok(Response::new(pb::ModelInfoResponse {
            model_id: self.state.model_id.clone(),
            family: d.family.clone(),
            precision: d.precision.clone(),
            backend: d.backend.clone(),
            max_context_tokens: d.max_context_tokens as u32,
            max_new_tokens: limits.max_new_tokens,
            max_batch_size: cfg.max_batch_size.min(d.batch_profiles.iter().copied().max().unwrap_or(usize::MAX)) as u32,
            max_concurrent_requests: cfg.max_concurrent_requests as u32,
            vocab_size: d.vocab_size as u32,
            default_sampling: Some(pb::SamplingParams {
                temperature: Some(limits.sampling_defaults.temperature),
                top_p: Some(limits.sampling_defaults.top_p),
                top_k: Some(limits.sampling_defaults.top_k),
                min_p: Some(limits.sampling_defaults.min_p),
                repetition_penalty: Some(limits.sampling_defaults.repetition_penalty),
                seed: None,
                presence_penalty: Some(0.0),
                frequency_penalty: Some(0.0),
            }),
            eos_token_ids: d.eos_token_ids.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None, "at most 8 digits");
    }
}
