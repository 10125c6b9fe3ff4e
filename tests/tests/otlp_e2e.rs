//! The real `r1-serve` binary exports its spans over OTLP/gRPC: a small OTLP receiver (the collector's `TraceService`
//! from `opentelemetry-proto`, served by tonic on 127.0.0.1) stands in for an OpenTelemetry Collector. The server is
//! started from the command line with `--otlp-endpoint` (the path that panicked before the runtime existed), serves
//! the exported arith-r1 fixture, gets one `Generate` call carrying a W3C `traceparent`, and is stopped with SIGTERM;
//! the spans it exported must belong to the caller's trace, with the request span parented to the caller's span.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use r1_export::{export, ExportOptions};
use r1_proto::r1::v1 as pb;
use r1_proto::r1::v1::generation_client::GenerationClient;

/// Every export request the receiver got.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().expect("receiver lock").push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r1_serve_exports_spans_of_the_callers_trace_to_an_otlp_receiver() {
    let receiver = Receiver::default();
    let otlp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind OTLP receiver");
    let otlp_url = format!("http://{}", otlp.local_addr().expect("addr"));
    let incoming = tonic::transport::server::TcpIncoming::from(otlp);
    let service = TraceServiceServer::new(receiver.clone());
    tokio::spawn(tonic::transport::Server::builder().add_service(service).serve_with_incoming(incoming));

    let tmp = tempfile::tempdir().expect("tempdir");
    let art = tmp.path().join("arith-fp32");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/arith-r1");
    export(&ExportOptions::new(fixture, &art), &mut |_| {}).expect("export arith-r1");

    let log = tmp.path().join("serve.log");
    // The binary must not die at start, as it did when the exporter was built too early.
    let flags =
        ["--backend", "tract", "--model-id", "arith-r1", "--otlp-endpoint", &otlp_url, "--drain-timeout-secs", "10"];
    let served = common::serve(&art, &flags, &log).await;
    let (mut server, channel) = (served.process, served.channel);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(pb::GenerateRequest {
        prompt: Some("What is 2+2?".into()),
        max_tokens: Some(4),
        ignore_eos: true,
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    });
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-{caller_span}-01").parse().expect("ascii"));
    let reply = GenerationClient::new(channel).generate(req).await.expect("Generate").into_inner();
    assert_eq!(reply.usage.expect("usage").completion_tokens, 4);

    // SIGTERM: the server drains, then flushes its span exporter before exiting.
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "r1-serve did not exit within 30 s of SIGTERM; log:\n{}", log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "r1-serve exit {status}; log:\n{}", log_text());

    let requests = receiver.0.lock().expect("lock").clone();
    let mut services = Vec::new();
    let mut spans = Vec::new();
    for rs in requests.iter().flat_map(|r| &r.resource_spans) {
        for kv in rs.resource.iter().flat_map(|r| &r.attributes) {
            if let (true, Some(Value::StringValue(v))) =
                (kv.key == "service.name", kv.value.as_ref().and_then(|v| v.value.as_ref()))
            {
                services.push(v.clone());
            }
        }
        spans.extend(rs.scope_spans.iter().flat_map(|s| s.spans.iter().cloned()));
    }
    assert!(!spans.is_empty(), "the receiver got no spans; r1-serve log:\n{}", log_text());
    assert!(services.iter().all(|s| s == "r1-serve") && !services.is_empty(), "service.name: {services:?}");
    let in_trace: Vec<_> = spans.iter().filter(|s| hex(&s.trace_id) == trace_id).collect();
    let generate = in_trace.iter().find(|s| s.name == "Generate").unwrap_or_else(|| {
        panic!(
            "no Generate span in trace {trace_id}; got {:?}",
            spans.iter().map(|s| (&s.name, hex(&s.trace_id))).collect::<Vec<_>>()
        )
    });
    assert_eq!(hex(&generate.parent_span_id), caller_span, "the request span is a child of the caller's span");
    // The batch steps that served it link to the request span.
    let linked = spans
        .iter()
        .filter(|s| {
            s.name == "batch_step"
                && s.links.iter().any(|l| l.span_id == generate.span_id && hex(&l.trace_id) == trace_id)
        })
        .count();
    assert!(linked >= 4, "prefill + 3 decodes link to the request span, got {linked}");
}
