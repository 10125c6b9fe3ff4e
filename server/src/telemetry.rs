//! Logs and traces in one place: a `tracing` subscriber with text or JSON log lines, an optional OpenTelemetry layer
//! exporting over OTLP/gRPC, and W3C trace-context (`traceparent`) taken from incoming gRPC metadata or HTTP headers.
//!
//! Spans: one `request` span per request (parent: the caller's `traceparent` when given; fields: request id, method,
//! prompt and completion tokens, queue time, finish reason) and one `batch_step` span per model step, linked to the
//! request spans of its batch (see `scheduler::actor`).

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Logging and tracing settings.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint, if traces are exported.
    pub otlp_endpoint: Option<String>,
    /// JSON log lines instead of text.
    pub json: bool,
    /// EnvFilter directives.
    pub filter: String,
}

/// Errors while setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `--log` is not a valid filter.
    #[error("invalid --log filter {filter:?}: {message}")]
    Filter {
        /// The filter given.
        filter: String,
        /// The parser's message.
        message: String,
    },
    /// The OTLP exporter could not be built.
    #[error("cannot set up the OTLP exporter for {endpoint}: {message}")]
    Otlp {
        /// The endpoint given.
        endpoint: String,
        /// The library's message.
        message: String,
    },
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadySet(String),
}

/// Keeps the tracer provider alive; flushes and shuts it down on drop.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// The OpenTelemetry layer over `provider`'s tracer (also used by tests with an in-memory exporter).
pub fn otel_layer<S>(provider: &SdkTracerProvider) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("r1-serve"))
}

/// Installs the global subscriber: filter, fmt (text or JSON), and OTLP export when an endpoint is configured.
///
/// With an endpoint it must run inside a Tokio runtime (`Runtime::enter`): the exporter's gRPC channel spawns its
/// connection task there. Outside one it returns [`TelemetryError::Otlp`] instead of panicking.
pub fn init(cfg: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_new(&cfg.filter)
        .map_err(|e| TelemetryError::Filter { filter: cfg.filter.clone(), message: e.to_string() })?;
    let fmt = if cfg.json {
        tracing_subscriber::fmt::layer().json().with_current_span(true).boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    let provider = match &cfg.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(TelemetryError::Otlp {
                    endpoint: endpoint.clone(),
                    message: "telemetry::init must be called inside a Tokio runtime when exporting over OTLP/gRPC"
                        .into(),
                });
            }
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TelemetryError::Otlp { endpoint: endpoint.clone(), message: e.to_string() })?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name("r1-serve").build();
            Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
        }
        None => None,
    };
    let otel = provider.as_ref().map(otel_layer::<Registry>);
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt)
        .with(filter)
        .try_init()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Where the caller's trace context comes from.
pub enum Carrier<'a> {
    /// gRPC request metadata.
    Grpc(&'a tonic::metadata::MetadataMap),
    /// HTTP request headers.
    Http(&'a axum::http::HeaderMap),
}

impl Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self {
            Carrier::Grpc(m) => m.get(key).and_then(|v| v.to_str().ok()),
            Carrier::Http(h) => h.get(key).and_then(|v| v.to_str().ok()),
        }
    }
}

/// The request id: the caller's `x-request-id` when it is short printable ASCII, otherwise a fresh one.
pub fn request_id(carrier: &Carrier<'_>) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    if let Some(id) = carrier.get("x-request-id") {
        if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
            return id.to_string();
        }
    }
    format!("{:08x}-{:06}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A `request` span for `method`, child of the caller's W3C trace context when `traceparent` is present.
pub fn request_span(method: &'static str, request_id: &str, carrier: &Carrier<'_>) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        otel.name = method,
        request_id = %request_id,
        prompt_tokens = tracing::field::Empty,
        cached_prompt_tokens = tracing::field::Empty,
        completion_tokens = tracing::field::Empty,
        queue_ms = tracing::field::Empty,
        finish_reason = tracing::field::Empty,
        error = tracing::field::Empty,
    );
    let propagator = TraceContextPropagator::new();
    let cx = match carrier {
        Carrier::Grpc(m) => propagator.extract(&MetadataExtractor(m)),
        Carrier::Http(h) => propagator.extract(&HeaderExtractor(h)),
    };
    if opentelemetry::trace::TraceContextExt::has_active_span(&cx) {
        let _ = span.set_parent(cx);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_outside_a_runtime_is_an_error_not_a_panic() {
        let cfg =
            TelemetryConfig { otlp_endpoint: Some("http://127.0.0.1:4317".into()), json: false, filter: "info".into() };
        let err = init(&cfg).expect_err("no runtime here");
        assert!(matches!(err, TelemetryError::Otlp { .. }), "{err}");
        assert!(
            err.to_string().contains("http://127.0.0.1:4317") && err.to_string().contains("Tokio runtime"),
            "{err}"
        );
    }
}
