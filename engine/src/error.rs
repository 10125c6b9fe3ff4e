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
        }
    }
}
