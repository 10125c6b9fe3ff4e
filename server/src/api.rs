//! Front-end logic shared by the gRPC and HTTP APIs: the application state, and the path from a raw request to a
//! queued one (prompt size → validate → tokenize → context check → submit), plus collecting a whole response for unary calls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::model::{ErrorClass, ModelError, PrefixReuse, ResponseFormat, SeqParams, TokenLogprobs};
use crate::scheduler::{Event, FinishReason, Scheduler, Submission};
use crate::validate::{check_context, check_prompt_bytes, validate, Limits, RawRequest};

/// State shared by every handler.
#[derive(Debug)]
pub struct AppState {
    /// Set once the model is loaded.
    pub scheduler: OnceLock<Scheduler>,
    /// Request limits (`max_context_tokens` set from the model at load).
    pub limits: OnceLock<Limits>,
    /// Limits from the configuration, before the model's context is known.
    pub configured_limits: Limits,
    /// Served model id.
    pub model_id: String,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// True once a shutdown signal arrived.
    pub draining: AtomicBool,
    /// True once the model is loaded and the warm-up request went through (the readiness `GET /health` reports,
    /// in step with gRPC health).
    pub warm: AtomicBool,
    /// Longest prompt in bytes (`--max-prompt-bytes`), checked before tokenization.
    pub max_prompt_bytes: usize,
    /// Largest request body in bytes (`--max-request-bytes`), named in the HTTP 413.
    pub max_request_bytes: usize,
}

/// A whole generated response.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    /// Answer text.
    pub text: String,
    /// Reasoning text.
    pub reasoning: String,
    /// Every token id.
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: usize,
    /// Per generated token, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprobs>,
}

impl AppState {
    /// State before the model is loaded; `max_prompt_bytes` is `--max-prompt-bytes`.
    pub fn new(model_id: String, limits: Limits, metrics: Arc<Metrics>, max_prompt_bytes: usize) -> Self {
        Self::with_body_limit(model_id, limits, metrics, max_prompt_bytes, crate::security::DEFAULT_MAX_REQUEST_BYTES)
    }

    /// [`AppState::new`] with `--max-request-bytes`.
    pub fn with_body_limit(
        model_id: String,
        limits: Limits,
        metrics: Arc<Metrics>,
        max_prompt_bytes: usize,
        max_request_bytes: usize,
    ) -> Self {
        AppState {
            scheduler: OnceLock::new(),
            limits: OnceLock::new(),
            configured_limits: limits,
            model_id,
            metrics,
            draining: AtomicBool::new(false),
            warm: AtomicBool::new(false),
            max_prompt_bytes,
            max_request_bytes,
        }
    }

    /// Readiness: `Ok` once loaded and warmed up, UNAVAILABLE while loading, warming up or draining (what
    /// `GET /health` and gRPC health report; requests are accepted from [`AppState::ready`] on, as warm-up needs).
    pub fn serving(&self) -> Result<(), ServeError> {
        self.ready()?;
        if !self.warm.load(Ordering::Acquire) {
            return Err(ServeError::Unavailable { reason: "the model is warming up".into() });
        }
        Ok(())
    }

    /// The scheduler, or UNAVAILABLE while loading or draining.
    pub fn ready(&self) -> Result<(&Scheduler, &Limits), ServeError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ServeError::Unavailable { reason: "the server is shutting down".into() });
        }
        match (self.scheduler.get(), self.limits.get()) {
            (Some(s), Some(l)) => Ok((s, l)),
            _ => Err(ServeError::Unavailable { reason: "the model is still loading".into() }),
        }
    }

    /// Validates, tokenizes and queues a request: one sequence per choice (`n`), each with its own event channel
    /// (choice `i` samples with `seed + i` when a seed is given). Every rejection is counted in `r1_requests_total`.
    pub async fn start(
        &self,
        raw: RawRequest,
        api: &'static str,
        request_id: String,
        deadline: Option<Instant>,
        span: tracing::Span,
    ) -> Result<Vec<UnboundedReceiver<Event>>, ServeError> {
        let result = self.start_inner(raw, api, request_id, deadline, span.clone()).await;
        if let Err(e) = &result {
            span.record("error", tracing::field::display(e));
            self.metrics.request_done(api, e.kind());
        }
        result
    }

    async fn start_inner(
        &self,
        raw: RawRequest,
        api: &'static str,
        request_id: String,
        deadline: Option<Instant>,
        span: tracing::Span,
    ) -> Result<Vec<UnboundedReceiver<Event>>, ServeError> {
        let (scheduler, limits) = self.ready()?;
        // The server's own bound (`--request-timeout-secs`), unless the client's deadline is sooner. The warm-up
        // request is the server's, not a client's.
        let deadline = match limits.request_timeout.filter(|_| api != "warmup") {
            Some(t) => {
                let own = Instant::now() + t;
                Some(deadline.map_or(own, |d| d.min(own)))
            }
            None => deadline,
        };
        check_prompt_bytes(&raw, self.max_prompt_bytes)?;
        let valid = validate(raw, limits)?;
        let frontend = scheduler.frontend();
        let input = valid.input.clone();
        let format = valid.response_format.clone();
        let prompt = tokio::task::spawn_blocking(move || {
            // A caller's mistake in a field the model checks names that field (`param` in OpenAI's error body).
            let named = |field: &'static str| {
                move |e: ModelError| match e.class {
                    ErrorClass::InvalidArgument => ServeError::invalid(field, e.message),
                    _ => ServeError::from(e),
                }
            };
            if let Some(f) = &format {
                let field = if matches!(f, ResponseFormat::ToolCall(_)) { "tool_choice" } else { "response_format" };
                frontend.check_response_format(f).map_err(named(field))?;
            }
            frontend.encode(&input).map_err(|e| match e.label {
                "tools" | "prompt_token_ids" => named(e.label)(e),
                _ => ServeError::from(e),
            })
        })
        .await
        .map_err(|e| ServeError::from(ModelError::internal("tokenizer", e.to_string())))??;
        check_context(prompt.len(), valid.max_tokens, limits)?;
        span.record("prompt_tokens", prompt.len());
        let params = SeqParams {
            sampling: valid.sampling,
            max_tokens: valid.max_tokens as usize,
            stop: valid.stop,
            ignore_eos: valid.ignore_eos,
            logprobs: valid.logprobs,
            response_format: valid.response_format,
            prefix: if valid.prefix_cache { PrefixReuse::Longest } else { PrefixReuse::Off },
        };
        // Each choice is its own sequence (admitted together, their prompts prefilled in one batch). If one cannot
        // be queued, the ones queued already are cancelled with their dropped channels.
        let mut rxs = Vec::with_capacity(valid.n);
        for i in 0..valid.n {
            let mut params = params.clone();
            params.sampling.seed = params.sampling.seed.map(|s| s.wrapping_add(i as u64));
            let request_id = if i == 0 { request_id.clone() } else { format!("{request_id}.{i}") };
            let prompt = prompt.clone();
            let span = span.clone();
            rxs.push(scheduler.submit(Submission { request_id, api, prompt, params, deadline, span })?);
        }
        Ok(rxs)
    }
}

/// Waits for a request's events and returns the whole response (unary APIs).
pub async fn collect(mut rx: UnboundedReceiver<Event>, span: &tracing::Span) -> Result<Collected, ServeError> {
    let mut out = Collected {
        text: String::new(),
        reasoning: String::new(),
        token_ids: Vec::new(),
        finish_reason: FinishReason::Length,
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_prompt_tokens: 0,
        logprobs: Vec::new(),
    };
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Admitted { queue_time } => {
                span.record("queue_ms", queue_time.as_millis() as u64);
            }
            Event::Delta(d) => {
                out.text.push_str(&d.text);
                out.reasoning.push_str(&d.reasoning);
                out.token_ids.extend(d.token_ids);
                out.logprobs.extend(d.logprobs);
            }
            Event::Finished(f) => {
                record_finish(span, f.reason, f.completion_tokens);
                out.finish_reason = f.reason;
                out.prompt_tokens = f.prompt_tokens;
                out.completion_tokens = f.completion_tokens;
                out.cached_prompt_tokens = f.cached_prompt_tokens;
                return Ok(out);
            }
            Event::Failed(e) => {
                span.record("error", tracing::field::display(&e));
                return Err(e);
            }
        }
    }
    Err(ServeError::Unavailable { reason: "the scheduler dropped the request".into() })
}

/// Waits for every choice of a request ([`collect`] each, together); the first failure fails the request.
pub async fn collect_all(
    rxs: Vec<UnboundedReceiver<Event>>,
    span: &tracing::Span,
) -> Result<Vec<Collected>, ServeError> {
    futures::future::try_join_all(rxs.into_iter().map(|rx| collect(rx, span))).await
}

/// The events of a request's choices as one stream, each tagged with its choice's index.
pub fn merged(rxs: Vec<UnboundedReceiver<Event>>) -> impl futures::Stream<Item = (usize, Event)> + Send + Unpin {
    use futures::StreamExt;
    futures::stream::select_all(
        rxs.into_iter().enumerate().map(|(i, rx)| UnboundedReceiverStream::new(rx).map(move |e| (i, e))),
    )
}

/// Records the end of a request on its span.
pub fn record_finish(span: &tracing::Span, reason: FinishReason, completion_tokens: usize) {
    span.record("finish_reason", reason.as_str());
    span.record("completion_tokens", completion_tokens);
}
