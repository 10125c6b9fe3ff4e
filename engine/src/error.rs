//! The engine's error type. Messages name the thing, the limit and the value given.

use std::path::PathBuf;

/// Result alias for the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Every error the engine can return. [`EngineError::kind`] is a stable label for metrics and for
/// the server's mapping to gRPC status codes.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A file of the artifact could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `manifest.json` is missing, malformed or inconsistent.
    #[error("invalid manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    /// An input to a step does not have the shape or type the graph expects.
    #[error("invalid input `{name}`: expected {expected}, got {got}")]
    Shape { name: String, expected: String, got: String },
    /// The selected backend failed (load or run).
    #[error("{backend} backend: {message}")]
    Backend { backend: &'static str, message: String },
    /// A backend or library that was asked for is not available on this host.
    #[error("{what} is not available: {message}")]
    Unavailable { what: String, message: String },
    /// A caller-supplied argument is out of range (names the argument, the limit and the value).
    #[error("invalid argument `{name}`: {message}")]
    InvalidArgument { name: String, message: String },
    /// The KV cache budget cannot hold what was asked for.
    #[error("KV cache budget exhausted: {requested_bytes} bytes requested, {free_bytes} of {budget_bytes} bytes free")]
    KvBudget { requested_bytes: u64, free_bytes: u64, budget_bytes: u64 },
    /// A sequence id that the engine does not hold (never added, or already removed).
    #[error("unknown sequence {id}")]
    UnknownSequence { id: u64 },
    /// Tokenizer, chat template or detokenizer error.
    #[error(transparent)]
    Text(#[from] crate::text::TextError),
    /// Invalid sampling parameters or logits.
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
}

impl EngineError {
    /// Stable, low-cardinality label for metrics and status-code mapping.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Io { .. } => "io",
            EngineError::Manifest { .. } => "manifest",
            EngineError::Shape { .. } => "shape",
            EngineError::Backend { .. } => "backend",
            EngineError::Unavailable { .. } => "unavailable",
            EngineError::InvalidArgument { .. } => "invalid_argument",
            EngineError::KvBudget { .. } => "resource_exhausted",
            EngineError::UnknownSequence { .. } => "not_found",
            EngineError::Text(e) => e.kind(),
            EngineError::Sampling(e) => e.kind(),
        }
    }
}
