//! The HTTP port: `GET /metrics` (Prometheus text), `GET /health` (200 once loaded and warmed up, 503 while loading,
//! warming up or draining: the same as gRPC health), and the OpenAI-compatible API ([`crate::openai`]), behind the
//! optional API-key check ([`crate::auth`]).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;

use crate::api::AppState;
use crate::auth::{require_api_key, HttpAuth};
use crate::openai;

/// Content type of the Prometheus/OpenMetrics text exposition written by `prometheus-client`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The HTTP router over shared state, without API keys and with the default body limit.
pub fn router(state: Arc<AppState>) -> Router {
    let auth = HttpAuth { keys: Arc::default(), metrics: state.metrics.clone() };
    router_with(state, auth, crate::security::DEFAULT_MAX_REQUEST_BYTES)
}

/// The HTTP router: the OpenAI routes (`/v1/...`) need an API key when `auth` has keys; `/health` and `/metrics`
/// stay open. Bodies above `max_body_bytes` get 413.
pub fn router_with(state: Arc<AppState>, auth: HttpAuth, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route_layer(axum::middleware::from_fn_with_state(auth, require_api_key));
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .merge(api)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], state.metrics.encode())
}

async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    match state.serving() {
        Ok(()) => (StatusCode::OK, "SERVING\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("NOT_SERVING: {e}\n")),
    }
}
