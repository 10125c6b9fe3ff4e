//! Every `r1_*` metric that `deploy/` references — each `expr` of the Grafana dashboard and the Pods metric of each
//! HorizontalPodAutoscaler (`deploy/k8s/hpa-*.yaml`) — must be exported on the server's `GET /metrics`. The server is
//! started in-process on 127.0.0.1:0 (fake model: the metric set does not depend on the model) and serves one gRPC
//! request first. Renaming a metric in the server without updating `deploy/` makes this test fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use r1_proto::r1::v1 as pb;
use r1_proto::r1::v1::generation_client::GenerationClient;
use r1_serve::fake::{FakeConfig, FakeModel};
use r1_serve::metrics::Metrics;
use r1_serve::model::Model;
use r1_serve::scheduler::SchedulerConfig;
use r1_serve::server::{run, Listeners, Loader, ServeOptions};
use r1_serve::validate::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// `r1_…` identifiers in a string (PromQL expression or YAML value).
fn r1_names(text: &str, from: &str, out: &mut BTreeMap<String, String>) {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(pos) = text[i..].find("r1_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        if start == 0 || !ident(bytes[start - 1]) {
            out.entry(text[start..end].to_string()).or_insert_with(|| from.to_string());
        }
        i = end.max(start + 3);
    }
}

/// Every `expr` string anywhere in the dashboard JSON.
fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// Metric name → where it is referenced.
fn referenced_metrics() -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    let dash_path = deploy_dir().join("observability/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&dash_path).unwrap_or_else(|e| panic!("{}: {e}", dash_path.display())),
    )
    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", dash_path.display()));
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 5, "the dashboard has {} exprs; the parser lost them", exprs.len());
    for e in &exprs {
        r1_names(e, "grafana-dashboard.json", &mut names);
    }
    let mut hpas = 0;
    let k8s = deploy_dir().join("k8s");
    for entry in std::fs::read_dir(&k8s).unwrap_or_else(|e| panic!("{}: {e}", k8s.display())) {
        let path = entry.expect("dir entry").path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_string();
        if !(file.starts_with("hpa-") && file.ends_with(".yaml")) {
            continue;
        }
        hpas += 1;
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut found = 0;
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            if let Some(v) = line.trim().strip_prefix("name:") {
                let v = v.trim().trim_matches('"').trim_matches('\'');
                if v.starts_with("r1_") {
                    names.entry(v.to_string()).or_insert_with(|| file.clone());
                    found += 1;
                }
            }
        }
        assert!(found > 0, "{file}: no `name: r1_…` metric found; the HPA must scale on a metric the server exports");
    }
    assert!(hpas > 0, "no deploy/k8s/hpa-*.yaml found");
    names
}

/// Exported series names and `# TYPE` families of a Prometheus/OpenMetrics text exposition.
fn exported(text: &str) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut series = BTreeSet::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (it.next(), it.next()) {
                types.insert(name.to_string(), kind.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            series.insert(line[..end].to_string());
        }
    }
    (series, types)
}

/// Why `name` is not properly exported, or `None` when it is. Histograms need `_bucket`, `_sum` and `_count`.
fn missing(name: &str, series: &BTreeSet<String>, types: &BTreeMap<String, String>) -> Option<String> {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|b| types.get(*b).is_some_and(|t| t == "histogram"));
    let base = base.or_else(|| types.get(name).filter(|t| *t == "histogram").map(|_| name));
    if let Some(base) = base {
        let absent: Vec<String> = ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{base}{s}"))
            .filter(|s| !series.contains(s))
            .collect();
        return (!absent.is_empty()).then(|| format!("histogram {base} lacks {absent:?}"));
    }
    (!series.contains(name)).then(|| "no such series".to_string())
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect http");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8(raw).expect("utf8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("end of headers");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    if !chunked {
        return (status, body.to_string());
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    (status, out)
}

#[test]
fn the_name_scanner_finds_whole_identifiers() {
    let mut names = BTreeMap::new();
    r1_names("sum(rate(r1_requests_total{pod=~\"x\"}[5m])) / foo_r1_bar + r1_queue_depth", "t", &mut names);
    assert_eq!(names.keys().collect::<Vec<_>>(), ["r1_queue_depth", "r1_requests_total"]);
    let text = "# TYPE r1_x histogram\nr1_x_bucket{le=\"1\"} 0\nr1_x_sum 0\n# TYPE r1_y gauge\nr1_y 1\n";
    let (series, types) = exported(text);
    assert_eq!(missing("r1_y", &series, &types), None);
    assert!(missing("r1_x_bucket", &series, &types).is_some_and(|m| m.contains("r1_x_count")));
    assert!(missing("r1_z", &series, &types).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_hpas_reference_is_exported() {
    let referenced = referenced_metrics();
    assert!(referenced.contains_key("r1_queue_depth"), "HPA metric missing from {referenced:?}");

    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let grpc_url = format!("http://{}", grpc.local_addr().expect("addr"));
    let http_addr = http.local_addr().expect("addr");
    let model = FakeModel::new(FakeConfig::default());
    let load: Loader = Box::new(move || Ok(Box::new(model) as Box<dyn Model>));
    let opts = ServeOptions {
        model_id: "fake-r1".into(),
        limits: Limits {
            max_new_tokens: 64,
            default_max_tokens: 8,
            max_context_tokens: u32::MAX,
            sampling_defaults: Default::default(),
        },
        scheduler: SchedulerConfig::default(),
        drain_timeout: Duration::from_secs(5),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(Listeners { grpc, http }, opts, Arc::new(Metrics::new()), load, async {
        let _ = rx.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(grpc_url).expect("url").connect().await.expect("connect");
    let mut health = HealthClient::new(channel.clone());
    let mut serving = false;
    for _ in 0..500 {
        let s = health.check(HealthCheckRequest { service: String::new() }).await.expect("health").into_inner().status;
        if s == ServingStatus::Serving as i32 {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(serving, "server never reported SERVING");

    let req = pb::GenerateRequest {
        prompt: Some("What is 38+47?".into()),
        max_tokens: Some(8),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    };
    let r = GenerationClient::new(channel).generate(req).await.expect("generate").into_inner();
    assert_eq!(r.usage.map(|u| u.completion_tokens), Some(8));

    let (status, body) = get(http_addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    let (series, types) = exported(&body);
    let problems: Vec<String> = referenced
        .iter()
        .filter_map(|(name, from)| {
            missing(name, &series, &types).map(|why| format!("{name} (referenced in {from}): {why}"))
        })
        .collect();
    assert!(
        problems.is_empty(),
        "metrics referenced in deploy/ but not exported:\n{}\n\n/metrics was:\n{body}",
        problems.join("\n")
    );
    println!("{} referenced r1_* metrics all exported: {:?}", referenced.len(), referenced.keys().collect::<Vec<_>>());

    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("shutdown in time")
        .expect("no panic")
        .expect("clean shutdown");
}
