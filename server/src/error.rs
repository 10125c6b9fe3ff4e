//! The server's error type. Messages name the thing, the limit and the value given; [`ServeError::kind`]
//! is the stable label used for metrics (`outcome`) and, in [`crate::grpc`], for the gRPC status code.

/// Every error a request (or the server's start) can meet.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ServeError {
    /// A request field is missing or out of range.
    #[error("`{field}` {message}")]
    InvalidArgument {
        /// The field, as named in the API (`max_tokens`, `sampling.top_p`, ...).
        field: String,
        /// What is wrong, with the limit and the value given.
        message: String,
    },
    /// More requests are queued plus running than `--max-concurrent-requests` allows.
    #[error("server overloaded: {in_flight} requests queued or running, limit --max-concurrent-requests={limit}")]
    Overloaded {
        /// The configured limit.
        limit: usize,
        /// Requests held when this one arrived.
        in_flight: usize,
    },
    /// The waiting queue is full (`--max-queue`).
    #[error("queue full: {queued} requests waiting, limit --max-queue={limit}")]
    QueueFull {
        /// The configured limit.
        limit: usize,
        /// Requests waiting when this one arrived.
        queued: usize,
    },
    /// The request's deadline passed before it finished.
    #[error("deadline exceeded after {elapsed_ms} ms ({generated} tokens generated)")]
    DeadlineExceeded {
        /// Time since the request was queued.
        elapsed_ms: u64,
        /// Tokens generated before the deadline.
        generated: usize,
    },
    /// The request was cancelled by the server (shutdown past the drain timeout).
    #[error("cancelled: {reason}")]
    Cancelled {
        /// Why.
        reason: String,
    },
    /// The KV cache can never hold this request, even with nothing else running.
    #[error("request needs {needed} KV cache positions, the cache holds {capacity} in total")]
    TooLarge {
        /// Prompt plus `max_tokens` positions.
        needed: usize,
        /// Total capacity of the cache in positions.
        capacity: usize,
    },
    /// The engine failed a step that included this request (or failed to add or tokenize it).
    #[error("engine error ({kind}): {message}")]
    Engine {
        /// The engine's stable error kind.
        kind: String,
        /// The engine's message.
        message: String,
    },
    /// The server is not accepting work (loading, draining, or the scheduler stopped).
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
}

impl ServeError {
    /// Shorthand for [`ServeError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ServeError::InvalidArgument { field: field.into(), message: message.into() }
    }

    /// Stable, low-cardinality label for metrics and status mapping.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::InvalidArgument { .. } => "invalid_argument",
            ServeError::Overloaded { .. } | ServeError::QueueFull { .. } => "resource_exhausted",
            ServeError::TooLarge { .. } => "too_large",
            ServeError::DeadlineExceeded { .. } => "deadline_exceeded",
            ServeError::Cancelled { .. } => "cancelled",
            ServeError::Engine { .. } => "engine_error",
            ServeError::Unavailable { .. } => "unavailable",
        }
    }
}

/// Errors from reading and validating the server configuration (CLI edge).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for the server's options.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A TLS file named by `--tls-cert`, `--tls-key` or `--tls-client-ca` is unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The API keys could not be loaded.
    #[error(transparent)]
    ApiKeys(#[from] crate::auth::ApiKeyError),
    /// A setting is out of range or inconsistent with another.
    #[error("invalid setting `{name}`: {message}")]
    Invalid {
        /// The flag name (`--max-batch-size`).
        name: &'static str,
        /// What is wrong, with the limit and the value.
        message: String,
    },
}
