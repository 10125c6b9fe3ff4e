//! Every `r1_*` metric that `deploy/` references must be exported on the server's `GET /metrics`: each `expr` of the
//! Grafana dashboard, every series the prometheus-adapter rules read (`deploy/prometheus-adapter/values.yaml`,
//! `seriesQuery` and `metricsQuery`), and, for every Pods metric of the HorizontalPodAutoscaler in the chart's golden
//! renders (`deploy/rendered/*.yaml`), the series of the adapter rule that serves it under that name (`name.as`). The
//! server is started in-process on 127.0.0.1:0 (fake model: the metric set does not depend on the model) and serves
//! one gRPC request first. Renaming a metric in the server without updating `deploy/` makes this test fail.
//!
//! It also checks the readiness the chart's probes rely on: `GET /health` is 503 (and gRPC health NOT_SERVING) while
//! the model loads and while it warms up, and 200 / SERVING only after.

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

/// The text of a file under `deploy/`.
fn read_deploy(rel: &str) -> String {
    let path = deploy_dir().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of a `key: value` YAML line (quotes stripped), if `line` is one.
fn yaml_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.trim().trim_start_matches("- ").strip_prefix(key)?.strip_prefix(':')?;
    Some(rest.trim().trim_matches('"').trim_matches('\''))
}

/// One prometheus-adapter rule: the name it serves to the HPA, and every `r1_` series its queries read.
#[derive(Debug)]
struct AdapterRule {
    served_as: String,
    series: BTreeSet<String>,
}

/// The `rules.custom` of `deploy/prometheus-adapter/values.yaml`, read line by line (each rule starts with
/// `- seriesQuery:`; `metricsQuery` may be a folded block over several lines).
fn adapter_rules(text: &str) -> Vec<AdapterRule> {
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        if line.trim_start().starts_with("- seriesQuery:") {
            blocks.push(Vec::new());
        }
        if let Some(b) = blocks.last_mut() {
            b.push(line);
        }
    }
    blocks
        .into_iter()
        .map(|lines| {
            let mut series = BTreeMap::new();
            let mut served_as = None;
            let mut first = None;
            for line in &lines {
                if let Some(v) = yaml_value(line, "as") {
                    served_as = Some(v.to_string());
                } else if yaml_value(line, "matches").is_none() {
                    let mut found = BTreeMap::new();
                    r1_names(line, "", &mut found);
                    if first.is_none() && yaml_value(line, "seriesQuery").is_some() {
                        first = found.keys().next().cloned();
                    }
                    series.extend(found);
                }
            }
            let first = first.unwrap_or_else(|| panic!("adapter rule without an r1_ seriesQuery: {lines:?}"));
            AdapterRule { served_as: served_as.unwrap_or(first), series: series.into_keys().collect() }
        })
        .collect()
}

/// Pods-metric names of every HorizontalPodAutoscaler in a multi-document YAML render.
fn hpa_metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for doc in text.split("\n---") {
        if !doc.lines().any(|l| l.trim() == "kind: HorizontalPodAutoscaler") {
            continue;
        }
        let lines: Vec<&str> = doc.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim() == "metric:" {
                if let Some(v) = lines.get(i + 1).and_then(|l| yaml_value(l, "name")) {
                    names.push(v.to_string());
                }
            }
        }
    }
    names
}

/// Metric name → where it is referenced.
fn referenced_metrics() -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    let dash: serde_json::Value = serde_json::from_str(&read_deploy("observability/grafana-dashboard.json"))
        .unwrap_or_else(|e| panic!("grafana-dashboard.json is not JSON: {e}"));
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 5, "the dashboard has {} exprs; the parser lost them", exprs.len());
    for e in &exprs {
        r1_names(e, "grafana-dashboard.json", &mut names);
    }

    let rules = adapter_rules(&read_deploy("prometheus-adapter/values.yaml"));
    assert!(rules.len() >= 2, "the parser found {} prometheus-adapter rules: {rules:?}", rules.len());
    for rule in &rules {
        for s in &rule.series {
            names.entry(s.clone()).or_insert_with(|| format!("prometheus-adapter rule `{}`", rule.served_as));
        }
    }

    let rendered = deploy_dir().join("rendered");
    let mut renders = 0;
    for entry in std::fs::read_dir(&rendered).unwrap_or_else(|e| panic!("{}: {e}", rendered.display())) {
        let path = entry.expect("dir entry").path();
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_string();
        if !file.ends_with(".yaml") {
            continue;
        }
        renders += 1;
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let hpa = hpa_metric_names(&text);
        assert!(
            !hpa.is_empty(),
            "rendered/{file}: no HPA Pods metric found; the HPA must scale on the server's metrics"
        );
        for name in hpa {
            let rule = rules.iter().find(|r| r.served_as == name).unwrap_or_else(|| {
                panic!(
                    "rendered/{file}: the HPA scales on `{name}`, which no prometheus-adapter rule serves: {rules:?}"
                )
            });
            for s in &rule.series {
                names.entry(s.clone()).or_insert_with(|| format!("rendered/{file} HPA metric `{name}`"));
            }
        }
    }
    assert!(renders > 0, "no deploy/rendered/*.yaml found");
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

#[test]
fn the_adapter_and_hpa_parsers_find_rules_and_names() {
    let adapter = r#"
rules:
  default: false
  custom:
    # a comment naming r1_not_a_series
    - seriesQuery: 'r1_queue_depth{namespace!="",pod!=""}'
      name:
        matches: "^r1_queue_depth$"
      metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)'
    - seriesQuery: 'r1_kv_blocks{namespace!="",pod!=""}'
      name:
        matches: "^r1_kv_blocks$"
        as: "r1_kv_running_ratio"
      metricsQuery: >-
        sum(r1_kv_blocks{state="running",<<.LabelMatchers>>}) by (<<.GroupBy>>)
        / clamp_min(sum(r1_kv_cache_capacity_tokens{<<.LabelMatchers>>}) by (<<.GroupBy>>), 1)
"#;
    let rules = adapter_rules(adapter);
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert_eq!(rules[0].served_as, "r1_queue_depth");
    assert_eq!(rules[0].series.iter().collect::<Vec<_>>(), ["r1_queue_depth"]);
    assert_eq!(rules[1].served_as, "r1_kv_running_ratio");
    assert_eq!(rules[1].series.iter().collect::<Vec<_>>(), ["r1_kv_blocks", "r1_kv_cache_capacity_tokens"]);
    let render =
        "kind: Service\nmetadata:\n  name: r1_not_hpa\n---\n# Source: hpa.yaml\nkind: HorizontalPodAutoscaler\n\
                  spec:\n  metrics:\n    - type: Pods\n      pods:\n        metric:\n          name: r1_queue_depth\n";
    assert_eq!(hpa_metric_names(render), ["r1_queue_depth"]);
}

/// Starts the server in-process on 127.0.0.1:0 with `load`; returns the gRPC channel, the HTTP address, the
/// shutdown trigger and the server task.
async fn start(
    load: Loader,
) -> (
    tonic::transport::Channel,
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), r1_serve::error::ServeError>>,
) {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let grpc_url = format!("http://{}", grpc.local_addr().expect("addr"));
    let http_addr = http.local_addr().expect("addr");
    let opts = ServeOptions {
        model_id: "fake-r1".into(),
        limits: Limits {
            max_new_tokens: 64,
            default_max_tokens: 8,
            max_context_tokens: u32::MAX,
            sampling_defaults: Default::default(),
            request_timeout: None,
        },
        scheduler: SchedulerConfig::default(),
        step_budget: Default::default(),
        drain_timeout: Duration::from_secs(5),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(Listeners { grpc, http }, opts, Arc::new(Metrics::new()), load, async {
        let _ = rx.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(grpc_url).expect("url").connect().await.expect("connect");
    (channel, http_addr, tx, task)
}

/// Triggers the shutdown of a server from [`start`] and waits for a clean stop.
async fn stop(
    tx: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), r1_serve::error::ServeError>>,
) {
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("shutdown in time")
        .expect("no panic")
        .expect("clean shutdown");
}

async fn grpc_status(health: &mut HealthClient<tonic::transport::Channel>) -> i32 {
    health.check(HealthCheckRequest { service: String::new() }).await.expect("health").into_inner().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_deploy_references_is_exported() {
    let referenced = referenced_metrics();
    for want in ["r1_queue_depth", "r1_kv_blocks"] {
        assert!(referenced.contains_key(want), "{want} (an HPA input) missing from {referenced:?}");
    }

    let model = FakeModel::new(FakeConfig::default());
    let load: Loader = Box::new(move || Ok(Box::new(model) as Box<dyn Model>));
    let (channel, http_addr, tx, task) = start(load).await;
    let mut health = HealthClient::new(channel.clone());
    let mut serving = false;
    for _ in 0..500 {
        if grpc_status(&mut health).await == ServingStatus::Serving as i32 {
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

    stop(tx, task).await;
}

/// The chart's startup and readiness probes are `GET /health`: it must say 503 while the model loads and while it
/// warms up (in step with gRPC health), so a pod is not an endpoint before it can serve; and 200 after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_ready_while_the_model_loads_or_warms_up() {
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    // Each step takes 300 ms, so the warm-up request (a prefill and two tokens) keeps the server warming up for
    // several polls.
    let model = FakeModel::new(FakeConfig { step_delay: Duration::from_millis(300), ..FakeConfig::default() });
    let load: Loader = Box::new(move || {
        let _ = release_rx.recv();
        Ok(Box::new(model) as Box<dyn Model>)
    });
    let (channel, http_addr, tx, task) = start(load).await;
    let mut health = HealthClient::new(channel);

    for _ in 0..3 {
        let (status, body) = get(http_addr, "/health").await;
        assert_eq!(status, 503, "GET /health while loading: {body}");
        assert!(body.contains("loading"), "{body}");
        assert_eq!(grpc_status(&mut health).await, ServingStatus::NotServing as i32);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    release_tx.send(()).expect("loader waiting");
    let mut saw_warming = false;
    let mut serving = false;
    for _ in 0..500 {
        // gRPC health is read before HTTP: the state only moves forward (loading -> warming up -> serving), so if
        // HTTP still says `warming up` afterwards, gRPC must have said NOT_SERVING. Read the other way round, the
        // warm-up could end between the two reads and the check would race.
        let grpc_before = grpc_status(&mut health).await;
        let (status, body) = get(http_addr, "/health").await;
        if status == 200 {
            assert_eq!(body.trim(), "SERVING");
            serving = true;
            break;
        }
        assert_eq!(status, 503, "{body}");
        if body.contains("warming up") {
            saw_warming = true;
            assert_eq!(grpc_before, ServingStatus::NotServing as i32, "gRPC health while warming");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(serving, "GET /health never became 200");
    assert!(saw_warming, "GET /health never reported the warm-up (503 `warming up`) between loading and serving");
    assert_eq!(grpc_status(&mut health).await, ServingStatus::Serving as i32);

    stop(tx, task).await;
}
