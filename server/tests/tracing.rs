//! Spans carry the caller's W3C trace id, and batch-step spans link to request spans (in-memory exporter).

mod common;

use common::*;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test]
async fn request_span_continues_the_incoming_traceparent() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber = tracing_subscriber::registry().with(r1_serve::telemetry::otel_layer(&provider));
    tracing::subscriber::set_global_default(subscriber).expect("first subscriber in this test binary");

    let mut srv = start_ready(Setup::default()).await;
    let mut c = srv.client().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(prompt_req("traced", 4));
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().expect("ascii"));
    req.metadata_mut().insert("x-request-id", "req-42".parse().expect("ascii"));
    c.generate(req).await.expect("generate");
    srv.shutdown().await.expect("clean shutdown");
    provider.force_flush().expect("flush");

    let spans = exporter.get_finished_spans().expect("spans");
    let request = spans
        .iter()
        .find(|s| s.name == "Generate" && s.span_context.trace_id().to_string() == trace_id)
        .unwrap_or_else(|| {
            panic!(
                "no Generate span in trace {trace_id}: {:?}",
                spans.iter().map(|s| s.name.to_string()).collect::<Vec<_>>()
            )
        });
    assert_eq!(request.parent_span_id.to_string(), "00f067aa0ba902b7");
    let attr = |k: &str| request.attributes.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.to_string());
    assert_eq!(attr("request_id").as_deref(), Some("req-42"));
    assert_eq!(attr("completion_tokens").as_deref(), Some("4"));
    assert_eq!(attr("finish_reason").as_deref(), Some("length"));
    let linked = spans
        .iter()
        .filter(|s| s.name == "batch_step")
        .filter(|s| s.links.iter().any(|l| l.span_context.span_id() == request.span_context.span_id()))
        .count();
    assert!(linked >= 4, "every step of the request links to it (prefill + 3 decodes), got {linked}");
}
