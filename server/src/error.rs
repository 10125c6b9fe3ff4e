//! The server's error type. Messages name the thing, the limit and the value given; [`ServeError::kind`]
//! is the stable label used for metrics (`outcome`) and, in [`crate::grpc`], for the gRPC status code.

/// What kind of failure an error is, from the caller's side. It decides the status every API answers with: the one
/// table is [`ErrorClass::grpc`] and [`ErrorClass::http`] (used by `grpc.rs` and `openai.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The request is wrong (a field out of range, `messages` to a model without a chat template, ...).
    InvalidArgument,
    /// Not now: a limit of the server is reached (queue, concurrency, KV cache).
    ResourceExhausted,
    /// The request's deadline passed.
    DeadlineExceeded,
    /// The server cancelled the request.
    Cancelled,
    /// The server cannot take work (loading, draining, a missing runtime library).
    Unavailable,
    /// A fault of the server or the model; the caller did nothing wrong.
    Internal,
}

impl ErrorClass {
    /// The gRPC status code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            ErrorClass::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorClass::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorClass::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            ErrorClass::Cancelled => tonic::Code::Cancelled,
            ErrorClass::Unavailable => tonic::Code::Unavailable,
            ErrorClass::Internal => tonic::Code::Internal,
        }
    }

    /// The HTTP status and the OpenAI error `type`.
    pub fn http(self) -> (axum::http::StatusCode, &'static str) {
        use axum::http::StatusCode;
        match self {
            ErrorClass::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ErrorClass::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
            ErrorClass::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            ErrorClass::Cancelled | ErrorClass::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ErrorClass::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        }
    }
}

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
    /// The model refused or failed this request: adding or tokenizing it, or a step that included it.
    #[error("engine error ({label}): {message}")]
    Engine {
        /// Whose fault and what status it gets ([`crate::model::ModelError::class`]).
        class: ErrorClass,
        /// The engine's stable error label (`tokenizer`, `backend`, ...).
        label: String,
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

    /// The class that decides the status code (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            ServeError::InvalidArgument { .. } | ServeError::TooLarge { .. } => ErrorClass::InvalidArgument,
            ServeError::Overloaded { .. } | ServeError::QueueFull { .. } => ErrorClass::ResourceExhausted,
            ServeError::DeadlineExceeded { .. } => ErrorClass::DeadlineExceeded,
            ServeError::Cancelled { .. } => ErrorClass::Cancelled,
            ServeError::Unavailable { .. } => ErrorClass::Unavailable,
            ServeError::Engine { class, .. } => *class,
        }
    }

    /// Stable, low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ServeError::InvalidArgument { .. } => "invalid_argument",
            ServeError::Overloaded { .. } | ServeError::QueueFull { .. } => "resource_exhausted",
            ServeError::TooLarge { .. } => "too_large",
            ServeError::DeadlineExceeded { .. } => "deadline_exceeded",
            ServeError::Cancelled { .. } => "cancelled",
            ServeError::Engine { class: ErrorClass::InvalidArgument, .. } => "invalid_argument",
            ServeError::Engine { class: ErrorClass::ResourceExhausted, .. } => "resource_exhausted",
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn each_class_has_one_grpc_code_and_one_http_status() {
        let table = [
            (ErrorClass::InvalidArgument, tonic::Code::InvalidArgument, StatusCode::BAD_REQUEST),
            (ErrorClass::ResourceExhausted, tonic::Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS),
            (ErrorClass::DeadlineExceeded, tonic::Code::DeadlineExceeded, StatusCode::GATEWAY_TIMEOUT),
            (ErrorClass::Cancelled, tonic::Code::Cancelled, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorClass::Unavailable, tonic::Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorClass::Internal, tonic::Code::Internal, StatusCode::INTERNAL_SERVER_ERROR),
        ];
        for (class, grpc, http) in table {
            assert_eq!(class.grpc(), grpc, "{class:?}");
            assert_eq!(class.http().0, http, "{class:?}");
        }
    }

    #[test]
    fn every_error_maps_to_its_class_and_a_model_error_keeps_the_models_class() {
        let cases = [
            (ServeError::invalid("max_tokens", "must be at least 1, got 0"), ErrorClass::InvalidArgument),
            (ServeError::TooLarge { needed: 10, capacity: 5 }, ErrorClass::InvalidArgument),
            (ServeError::Overloaded { limit: 1, in_flight: 1 }, ErrorClass::ResourceExhausted),
            (ServeError::QueueFull { limit: 1, queued: 1 }, ErrorClass::ResourceExhausted),
            (ServeError::DeadlineExceeded { elapsed_ms: 5, generated: 0 }, ErrorClass::DeadlineExceeded),
            (ServeError::Cancelled { reason: "drain".into() }, ErrorClass::Cancelled),
            (ServeError::Unavailable { reason: "loading".into() }, ErrorClass::Unavailable),
        ];
        for (e, class) in cases {
            assert_eq!(e.class(), class, "{e}");
        }
        // A caller's mistake found by the model is INVALID_ARGUMENT / 400, not INTERNAL / 500.
        let e: ServeError =
            crate::model::ModelError::invalid("no_chat_template", "`messages` needs a chat template").into();
        assert_eq!((e.class(), e.kind()), (ErrorClass::InvalidArgument, "invalid_argument"));
        assert!(e.to_string().contains("no_chat_template") && e.to_string().contains("`messages`"), "{e}");
        let e: ServeError = crate::model::ModelError::internal("backend", "step failed").into();
        assert_eq!((e.class(), e.kind()), (ErrorClass::Internal, "engine_error"));
        let e: ServeError =
            crate::model::ModelError::new(ErrorClass::ResourceExhausted, "resource_exhausted", "KV budget").into();
        assert_eq!((e.class().grpc(), e.kind()), (tonic::Code::ResourceExhausted, "resource_exhausted"));
    }
}
