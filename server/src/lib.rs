//! r1-serve: gRPC (and OpenAI-compatible HTTP) serving of r1 artifacts with continuous batching.
//!
//! Code map: [`config`] (flags, env, TOML, validation) → [`validate`] (wire request → [`validate::ValidRequest`]) →
//! [`scheduler`] (actor owning the queue and the model, continuous batching) → [`model`] (the trait the scheduler
//! drives; [`fake`] for tests, [`engine_model`] over `r1_engine`). Front ends: [`grpc`] (tonic service, health,
//! reflection), [`http`] (`/metrics`, OpenAI-compatible API). [`server`] wires listeners and graceful shutdown;
//! [`telemetry`] sets up logs, traces and W3C trace-context propagation; [`metrics`] holds the Prometheus registry;
//! [`tls`] (rustls on both ports) and [`auth`] (API keys) are the transport-security pieces (`docs/security.md`).
//!
//! **Architecture invariant:** only this crate turns errors into gRPC status codes or HTTP statuses; the engine never
//! sees protobuf types.

pub mod api;
pub mod ask;
pub mod auth;
pub mod bench;
pub mod config;
pub mod engine_model;
pub mod error;
pub mod fake;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod scheduler;
pub mod security;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod validate;

pub use error::ServeError;
