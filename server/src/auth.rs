//! Optional API keys (`--api-key-file`, `R1_API_KEYS`): requests must carry `authorization: Bearer <key>`.
//!
//! Keys are kept only as sha256 digests and a presented key is compared against every one of them with
//! [`subtle::ConstantTimeEq`], without stopping at the first match, so neither the content nor the length of a key
//! leaks through response timing. Keys are never logged, and `Debug` prints only how many there are.
//!
//! What is protected (see `docs/security.md`): `r1.v1.Generation` and gRPC reflection; the OpenAI routes
//! (`/v1/...`). Open: `grpc.health.v1` (Kubernetes gRPC probes cannot send headers), `GET /health` and
//! `GET /metrics` (Prometheus scrapes; put the HTTP port behind a network policy if metrics are sensitive).

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::metrics::Metrics;

/// Shortest key accepted, in bytes (a key is a secret; short ones are guessable).
pub const MIN_KEY_BYTES: usize = 16;

/// Why the API keys could not be loaded. Never includes a key.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The key file could not be read.
    #[error("--api-key-file {path}: cannot read the file: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A key is too short or holds characters that cannot travel in an HTTP header.
    #[error("{source_name}, key {index}: {message}")]
    BadKey {
        /// `--api-key-file PATH line N` or `R1_API_KEYS`.
        source_name: String,
        /// Position of the key (line number in a file, 1-based index in the variable).
        index: usize,
        /// What is wrong (length or character class; never the key).
        message: String,
    },
    /// The file or variable was given but holds no key.
    #[error("{source_name} holds no API key (one key per line; `#` starts a comment)")]
    Empty {
        /// `--api-key-file PATH` or `R1_API_KEYS`.
        source_name: String,
    },
}

/// A set of accepted API keys (as sha256 digests).
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

fn check_key(key: &str, source_name: &str, index: usize) -> Result<(), ApiKeyError> {
    let bad = |message: String| ApiKeyError::BadKey { source_name: source_name.to_string(), index, message };
    if key.len() < MIN_KEY_BYTES {
        return Err(bad(format!("must be at least {MIN_KEY_BYTES} bytes long, got {} bytes", key.len())));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("must be printable ASCII without spaces (it travels in an HTTP header)".into()));
    }
    Ok(())
}

impl ApiKeys {
    /// Number of keys.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// True when no key is configured (authentication off).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Adds the keys of a key file's text: one per line, surrounding whitespace trimmed, empty lines and lines
    /// starting with `#` skipped. `source_name` names the file in errors.
    pub fn add_file_text(&mut self, text: &str, source_name: &str) -> Result<(), ApiKeyError> {
        let before = self.digests.len();
        for (i, line) in text.lines().enumerate() {
            let key = line.trim();
            if key.is_empty() || key.starts_with('#') {
                continue;
            }
            check_key(key, source_name, i + 1)?;
            self.digests.push(digest(key.as_bytes()));
        }
        if self.digests.len() == before {
            return Err(ApiKeyError::Empty { source_name: source_name.to_string() });
        }
        Ok(())
    }

    /// Adds the keys of `--api-key-file PATH`.
    pub fn add_file(&mut self, path: &Path) -> Result<(), ApiKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| ApiKeyError::Read { path: path.into(), source })?;
        self.add_file_text(&text, &format!("--api-key-file {}", path.display()))
    }

    /// Adds the comma-separated keys of `R1_API_KEYS`.
    pub fn add_env_list(&mut self, value: &str) -> Result<(), ApiKeyError> {
        let before = self.digests.len();
        for (i, key) in value.split(',').map(str::trim).filter(|k| !k.is_empty()).enumerate() {
            check_key(key, "R1_API_KEYS", i + 1)?;
            self.digests.push(digest(key.as_bytes()));
        }
        if self.digests.len() == before {
            return Err(ApiKeyError::Empty { source_name: "R1_API_KEYS".into() });
        }
        Ok(())
    }

    /// True when `presented` is one of the keys. Compares against every key, in constant time per key.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let d = digest(presented);
        let mut any = subtle::Choice::from(0u8);
        for k in &self.digests {
            any |= k[..].ct_eq(&d[..]);
        }
        any.into()
    }

    /// Checks an `authorization` header value (`Bearer <key>`, scheme case-insensitive). The error is the message
    /// for the client; it never repeats what was sent.
    pub fn check_authorization(&self, value: Option<&[u8]>) -> Result<(), &'static str> {
        let Some(v) = value else {
            return Err("missing `authorization: Bearer <api key>`");
        };
        let token = match v.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => v[7..].trim_ascii(),
            _ => return Err("the `authorization` value must be `Bearer <api key>`"),
        };
        if self.matches(token) {
            Ok(())
        } else {
            Err("invalid API key")
        }
    }
}

/// The gRPC interceptor: UNAUTHENTICATED unless the metadata carries a valid key (no-op without keys).
#[derive(Debug, Clone)]
pub struct GrpcAuth {
    keys: Arc<ApiKeys>,
    metrics: Arc<Metrics>,
}

impl GrpcAuth {
    /// An interceptor over `keys`; rejections are counted in `r1_requests_total{api="grpc",outcome="unauthenticated"}`.
    pub fn new(keys: Arc<ApiKeys>, metrics: Arc<Metrics>) -> Self {
        GrpcAuth { keys, metrics }
    }
}

impl tonic::service::Interceptor for GrpcAuth {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.keys.is_empty() {
            return Ok(req);
        }
        let value = req.metadata().get("authorization").map(|v| v.as_bytes());
        match self.keys.check_authorization(value) {
            Ok(()) => Ok(req),
            Err(msg) => {
                self.metrics.request_done("grpc", "unauthenticated");
                Err(tonic::Status::unauthenticated(msg))
            }
        }
    }
}

/// State of the HTTP middleware.
#[derive(Debug, Clone)]
pub struct HttpAuth {
    /// Accepted keys (empty: every request passes).
    pub keys: Arc<ApiKeys>,
    /// Where rejections are counted.
    pub metrics: Arc<Metrics>,
}

/// axum middleware for the OpenAI routes: 401 with an OpenAI-shaped JSON error and `WWW-Authenticate: Bearer`
/// unless the request carries a valid key.
pub async fn require_api_key(State(auth): State<HttpAuth>, req: Request, next: Next) -> Response {
    if auth.keys.is_empty() {
        return next.run(req).await;
    }
    let value = req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match auth.keys.check_authorization(value) {
        Ok(()) => next.run(req).await,
        Err(msg) => {
            auth.metrics.request_done("http", "unauthenticated");
            let body = serde_json::json!({"error": {"message": msg, "type": "authentication_error", "param": null, "code": "unauthenticated"}});
            (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], Json(body)).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1-0123456789abcdef";
    const K2: &str = "k2-fedcba9876543210";

    #[test]
    fn file_format_comments_and_errors() {
        let mut keys = ApiKeys::default();
        keys.add_file_text(&format!("# team a\n\n  {K1}  \n#{K2}\n"), "f").expect("parse");
        assert_eq!(keys.len(), 1, "commented key skipped");
        assert!(keys.matches(K1.as_bytes()));
        assert!(!keys.matches(K2.as_bytes()));
        let err = ApiKeys::default().add_file_text("# none\n\n", "--api-key-file x").unwrap_err().to_string();
        assert!(err.contains("--api-key-file x holds no API key"), "{err}");
        let err = ApiKeys::default().add_file_text("ok-but-too-short\nshort\n", "f").unwrap_err().to_string();
        assert_eq!(err, "f, key 2: must be at least 16 bytes long, got 5 bytes");
        let err = ApiKeys::default().add_file_text("with a space inside it", "f").unwrap_err().to_string();
        assert!(err.contains("printable ASCII") && !err.contains("space inside"), "never echoes the key: {err}");
    }

    #[test]
    fn env_list_and_bearer_parsing() {
        let mut keys = ApiKeys::default();
        keys.add_env_list(&format!(" {K1} , {K2},")).expect("parse");
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.check_authorization(Some(format!("Bearer {K2}").as_bytes())), Ok(()));
        assert_eq!(keys.check_authorization(Some(format!("bearer {K1}").as_bytes())), Ok(()));
        assert_eq!(keys.check_authorization(None), Err("missing `authorization: Bearer <api key>`"));
        assert_eq!(
            keys.check_authorization(Some(K1.as_bytes())),
            Err("the `authorization` value must be `Bearer <api key>`")
        );
        assert_eq!(keys.check_authorization(Some(format!("Bearer {K1}x").as_bytes())), Err("invalid API key"));
        assert_eq!(keys.check_authorization(Some(b"Bearer ")), Err("invalid API key"));
        assert!(ApiKeys::default().add_env_list(" , ").is_err());
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)", "Debug never prints keys");
    }
}
