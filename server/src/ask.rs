//! `r1-serve ask`: a minimal gRPC client. Sends one chat message to a running server with `GenerateStream`, and
//! reports the reasoning, the answer and client-side timings (time to first token, decode tokens/s).

use std::time::Instant;

use r1_proto::r1::v1 as pb;
use r1_proto::r1::v1::generation_client::GenerationClient;

/// Errors of [`ask`].
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The server address could not be parsed or reached.
    #[error(
        "cannot connect to the r1-serve gRPC address {addr}: {source}; is the server running (r1-serve --grpc-addr …)?"
    )]
    Connect {
        /// Address given.
        addr: String,
        /// Transport error.
        source: tonic::transport::Error,
    },
    /// The TLS files given to `ask` are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// `R1_API_KEY` cannot travel in a header.
    #[error("R1_API_KEY must be printable ASCII without spaces")]
    BadKey,
    /// The server answered with an error status.
    #[error("GenerateStream failed: {0}")]
    Status(#[from] tonic::Status),
}

/// What one [`ask`] call produced.
#[derive(Debug, Clone, PartialEq)]
pub struct AskReport {
    /// The `<think>` content.
    pub reasoning: String,
    /// The answer.
    pub text: String,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens the server counted.
    pub prompt_tokens: u32,
    /// Why generation ended.
    pub finish_reason: pb::FinishReason,
    /// Seconds from sending the request to the first token.
    pub ttft_s: f64,
    /// Seconds from sending the request to the last message.
    pub total_s: f64,
}

impl AskReport {
    /// Tokens per second after the first token (decode speed), 0 when fewer than two tokens came.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.completion_tokens < 2 {
            return 0.0;
        }
        (self.completion_tokens - 1) as f64 / (self.total_s - self.ttft_s).max(1e-9)
    }
}

/// Sends `question` as one user message (greedy, at most `max_tokens`) to the server at `addr` (`http://host:port`).
pub async fn ask(addr: &str, question: &str, max_tokens: u32) -> Result<AskReport, AskError> {
    ask_with(addr, question, max_tokens, None, None).await
}

/// [`ask`] over TLS when `tls` is set (`addr` is then `https://host:port`) and with `authorization: Bearer
/// <api_key>` when a key is given.
pub async fn ask_with(
    addr: &str,
    question: &str,
    max_tokens: u32,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    api_key: Option<&str>,
) -> Result<AskReport, AskError> {
    let connect_err = |source| AskError::Connect { addr: addr.to_string(), source };
    let channel = match tls {
        Some(cfg) => crate::tls::tls_channel(addr, cfg).await.map_err(connect_err)?,
        None => tonic::transport::Endpoint::from_shared(addr.to_string())
            .map_err(connect_err)?
            .connect()
            .await
            .map_err(connect_err)?,
    };
    let req = pb::GenerateRequest {
        messages: vec![pb::ChatMessage { role: "user".into(), content: question.into(), ..Default::default() }],
        max_tokens: Some(max_tokens),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    };
    let mut req = tonic::Request::new(req);
    if let Some(key) = api_key {
        let v = format!("Bearer {key}").parse().map_err(|_| AskError::BadKey)?;
        req.metadata_mut().insert("authorization", v);
    }
    let t0 = Instant::now();
    let mut stream = GenerationClient::new(channel).generate_stream(req).await?.into_inner();
    let mut r = AskReport {
        reasoning: String::new(),
        text: String::new(),
        completion_tokens: 0,
        prompt_tokens: 0,
        finish_reason: pb::FinishReason::Unspecified,
        ttft_s: 0.0,
        total_s: 0.0,
    };
    while let Some(m) = stream.message().await? {
        if r.completion_tokens == 0 && !m.token_ids.is_empty() {
            r.ttft_s = t0.elapsed().as_secs_f64();
        }
        r.completion_tokens += m.token_ids.len();
        r.reasoning.push_str(&m.reasoning);
        r.text.push_str(&m.text);
        if let Some(u) = m.usage {
            r.prompt_tokens = u.prompt_tokens;
        }
        if m.finish_reason != 0 {
            r.finish_reason = pb::FinishReason::try_from(m.finish_reason).unwrap_or(pb::FinishReason::Unspecified);
        }
    }
    r.total_s = t0.elapsed().as_secs_f64();
    Ok(r)
}
