//! r1-engine: turns an exported artifact directory into tokens.
//!
//! See `ARCHITECTURE.md` at the repository root for the code map. Architecture invariant: this crate
//! never sees protobuf or gRPC types; callers (the server, the CLI tools) translate at their edge.

pub mod backend;
pub mod error;
pub mod manifest;

pub use backend::{Backend, KvPair, StepInput, StepOutput};
pub use error::{EngineError, Result};
pub use manifest::Manifest;
