//! Transport security and request-size limits of both ports, as the server is given them (`config.rs` builds them
//! from the flags; `server.rs`, `api.rs` and `http.rs` read them).

use std::sync::Arc;

use crate::auth::ApiKeys;

/// Default `--max-request-bytes`: largest gRPC message or HTTP body accepted.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;
/// Default `--max-prompt-bytes`: longest prompt (or sum of chat message contents) accepted, checked before
/// tokenization.
pub const DEFAULT_MAX_PROMPT_BYTES: usize = 512 << 10;

/// Transport security and size limits of both ports.
#[derive(Debug, Clone)]
pub struct Security {
    /// TLS for both ports (client certificates required when the config has a client verifier).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// API keys; empty means no authentication.
    pub api_keys: Arc<ApiKeys>,
    /// Largest gRPC message (decoded) and HTTP body, in bytes.
    pub max_request_bytes: usize,
    /// Longest prompt in bytes, checked before tokenization.
    pub max_prompt_bytes: usize,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            tls: None,
            api_keys: Arc::default(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_prompt_bytes: DEFAULT_MAX_PROMPT_BYTES,
        }
    }
}
