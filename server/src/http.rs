//! The HTTP port: `GET /metrics` (Prometheus text), `GET /health` (200 once serving, 503 while loading or draining),
//! and the OpenAI-compatible API ([`crate::openai`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use crate::api::AppState;
use crate::openai;

/// Content type of the Prometheus/OpenMetrics text exposition written by `prometheus-client`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The HTTP router over shared state.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], state.metrics.encode())
}

async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    match state.ready() {
        Ok(_) => (StatusCode::OK, "SERVING\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("NOT_SERVING: {e}\n")),
    }
}
