//! r1-engine: turns an exported artifact directory into tokens.
//!
//! See `ARCHITECTURE.md` at the repository root for the code map. Architecture invariant: this crate
//! never sees protobuf or gRPC types; callers (the server, the CLI tools) translate at their edge.
//!
//! Modules: [`manifest`] (artifact contract), [`backend`] (ort / tract forward pass), [`ort_lib`]
//! (finding ONNX Runtime), [`targets`] (GPU target table, TensorRT options), [`kv`] (KV caches and
//! budget), [`engine`] (batched step over sequences), [`host`] (the ONNX Runtime environment, TensorRT probes),
//! [`speculative`] (self-speculative greedy decoding with the artifact's draft graph).
//! Per-target builds (TensorRT engines, the CPU serving graph) are export-time work and live in `r1-export`.

pub mod backend;
pub mod engine;
pub mod error;
pub mod eval;
pub mod generate;
pub mod host;
pub mod kv;
pub mod manifest;
pub mod ort_lib;
pub mod sampling;
pub mod speculative;
pub mod targets;
pub mod text;

pub use backend::{Backend, BackendKind, BackendOptions, ExecutionProviderKind, KvPair, StepInput, StepOutput};
pub use engine::{
    Engine, EngineOptions, Logits, PoolOptions, PoolStats, PrefixReuse, SequenceId, StepLogits, StepWork,
};
pub use error::{EngineError, Result};
pub use manifest::Manifest;
