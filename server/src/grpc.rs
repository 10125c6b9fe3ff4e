//! The gRPC front end: `r1.v1.Generation` (Generate, GenerateStream, ModelInfo), and the one place that turns
//! [`ServeError`] into a gRPC status. Health (`grpc.health.v1`) and reflection are added in [`crate::server`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use r1_proto::r1::v1 as pb;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::{collect, record_finish, AppState};
use crate::error::ServeError;
use crate::model::ChatTurn;
use crate::scheduler::{Event, FinishReason};
use crate::telemetry::{request_id, request_span, Carrier};
use crate::validate::{RawRequest, RawSampling};

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

/// The wire request as a protocol-neutral [`RawRequest`].
pub fn raw_request(r: pb::GenerateRequest) -> RawRequest {
    let s = r.sampling.unwrap_or_default();
    RawRequest {
        prompt: r.prompt,
        messages: r.messages.into_iter().map(|m| ChatTurn { role: m.role, content: m.content }).collect(),
        max_tokens: r.max_tokens,
        sampling: RawSampling {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
        },
        stop: r.stop,
        ignore_eos: r.ignore_eos,
        skip_prefix_cache: r.skip_prefix_cache,
        sampling_prefix: "sampling.",
    }
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

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::generation_server::Generation for GenerationService {
    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<pb::GenerateResponse>, Status> {
        let carrier = Carrier::Grpc(req.metadata());
        let id = request_id(&carrier);
        let span = request_span("Generate", &id, &carrier);
        let deadline = deadline(req.metadata());
        let rx = self
            .state
            .start(raw_request(req.into_inner()), "grpc", id.clone(), deadline, span.clone())
            .await
            .map_err(|e| status(&e))?;
        let c = collect(rx, &span).await.map_err(|e| status(&e))?;
        let mut resp = Response::new(pb::GenerateResponse {
            text: c.text,
            reasoning: c.reasoning,
            token_ids: c.token_ids,
            finish_reason: finish_reason(c.finish_reason) as i32,
            usage: Some(usage(c.prompt_tokens, c.completion_tokens, c.cached_prompt_tokens)),
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
        let carrier = Carrier::Grpc(req.metadata());
        let id = request_id(&carrier);
        let span = request_span("GenerateStream", &id, &carrier);
        let deadline = deadline(req.metadata());
        let rx = self
            .state
            .start(raw_request(req.into_inner()), "grpc", id.clone(), deadline, span.clone())
            .await
            .map_err(|e| status(&e))?;
        // The span lives as long as the stream; dropping the stream (client left) closes the channel, and the
        // scheduler frees the sequence at its next iteration.
        let stream = UnboundedReceiverStream::new(rx).filter_map(move |ev| {
            let out = match ev {
                Event::Admitted { queue_time } => {
                    span.record("queue_ms", queue_time.as_millis() as u64);
                    None
                }
                Event::Delta(d) => Some(Ok(pb::GenerateStreamResponse {
                    text: d.text,
                    reasoning: d.reasoning,
                    token_ids: d.token_ids,
                    finish_reason: pb::FinishReason::Unspecified as i32,
                    usage: None,
                })),
                Event::Finished(f) => {
                    record_finish(&span, f.reason, f.completion_tokens);
                    Some(Ok(pb::GenerateStreamResponse {
                        finish_reason: finish_reason(f.reason) as i32,
                        usage: Some(usage(f.prompt_tokens, f.completion_tokens, f.cached_prompt_tokens)),
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
