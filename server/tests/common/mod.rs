//! Test harness: a real server on 127.0.0.1:0 over the deterministic fake model, plus small clients.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use r1_proto::r1::v1 as pb;
use r1_proto::r1::v1::generation_client::GenerationClient;
use r1_serve::fake::{FakeConfig, FakeModel, Faults, StepRecord};
use r1_serve::metrics::Metrics;
use r1_serve::model::Model;
use r1_serve::scheduler::SchedulerConfig;
use r1_serve::server::{run_with, Listeners, Loader, Security, ServeOptions};
use r1_serve::validate::Limits;
use r1_serve::ServeError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub struct TestServer {
    pub grpc_url: String,
    pub http_addr: std::net::SocketAddr,
    pub metrics: Arc<Metrics>,
    pub steps: Arc<Mutex<Vec<StepRecord>>>,
    pub faults: Arc<Faults>,
    /// TLS settings the harness's own clients use (health checks, `client()`).
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

pub struct Setup {
    pub fake: FakeConfig,
    pub scheduler: SchedulerConfig,
    pub limits: Limits,
    pub drain: Duration,
    /// When set, loading blocks until this receiver gets a message.
    pub gate: Option<std::sync::mpsc::Receiver<()>>,
    /// TLS, API keys and size limits.
    pub security: Security,
    /// Runs on the loading thread before the model is handed over (e.g. an artifact integrity check).
    pub pre_load: Option<Box<dyn FnOnce() -> Result<(), r1_serve::model::ModelError> + Send>>,
    /// TLS settings for the harness's own clients (needed when `security.tls` is set).
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            fake: FakeConfig::default(),
            scheduler: SchedulerConfig::default(),
            limits: Limits {
                max_new_tokens: 2048,
                default_max_tokens: 16,
                max_context_tokens: u32::MAX,
                sampling_defaults: Default::default(),
                request_timeout: None,
            },
            drain: Duration::from_secs(5),
            gate: None,
            security: Security::default(),
            pre_load: None,
            client_tls: None,
        }
    }
}

pub async fn start(setup: Setup) -> TestServer {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let scheme = if setup.security.tls.is_some() { "https" } else { "http" };
    let grpc_url = format!("{scheme}://{}", grpc.local_addr().expect("addr"));
    let http_addr = http.local_addr().expect("addr");
    let model = FakeModel::new(setup.fake);
    let steps = model.step_log();
    let faults = model.faults();
    let gate = setup.gate;
    let pre_load = setup.pre_load;
    let client_tls = setup.client_tls;
    let load: Loader = Box::new(move || {
        if let Some(g) = gate {
            let _ = g.recv();
        }
        if let Some(f) = pre_load {
            f()?;
        }
        Ok(Box::new(model) as Box<dyn Model>)
    });
    let metrics = Arc::new(Metrics::new());
    let (tx, rx) = oneshot::channel::<()>();
    let opts = ServeOptions {
        model_id: "fake-r1".into(),
        limits: setup.limits,
        scheduler: setup.scheduler,
        step_budget: Default::default(),
        drain_timeout: setup.drain,
    };
    let task = tokio::spawn(run_with(Listeners { grpc, http }, opts, setup.security, metrics.clone(), load, async {
        let _ = rx.await;
    }));
    TestServer { grpc_url, http_addr, metrics, steps, faults, client_tls, shutdown: Some(tx), task: Some(task) }
}

/// Starts a server and waits until it reports SERVING.
pub async fn start_ready(setup: Setup) -> TestServer {
    let s = start(setup).await;
    s.wait_status(ServingStatus::Serving).await;
    s
}

impl TestServer {
    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(self.channel().await)
    }

    /// A channel to the gRPC port (over TLS when the setup gave client TLS settings).
    pub async fn channel(&self) -> Channel {
        match &self.client_tls {
            Some(cfg) => r1_serve::tls::tls_channel(&self.grpc_url, cfg.clone()).await.expect("TLS connect"),
            None => channel(&self.grpc_url).await,
        }
    }

    pub async fn health(&self, service: &str) -> ServingStatus {
        let mut h = HealthClient::new(self.channel().await);
        let r = h.check(HealthCheckRequest { service: service.into() }).await.expect("health check");
        ServingStatus::try_from(r.into_inner().status).expect("known status")
    }

    pub async fn wait_status(&self, want: ServingStatus) {
        for _ in 0..500 {
            if self.health("").await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("health never became {want:?}");
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn shutdown(&mut self) -> Result<(), ServeError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(20), task).await.expect("run returned in time").expect("no panic")
    }

    pub fn trigger_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Polls until `f(metrics text)` holds.
    pub async fn wait_metrics(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        for _ in 0..300 {
            let text = self.metrics.encode();
            if f(&text) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("metrics never showed {what}:\n{}", self.metrics.encode());
    }
}

/// Value of a metric line `name{labels} value` (exact prefix before the value).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
    })
}

pub fn prompt_req(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(prompt.into()),
        max_tokens: Some(max_tokens),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        ..Default::default()
    }
}

/// What the fake generates greedily for a raw prompt: (reasoning, text, token ids).
pub fn reference(prompt: &str, max_tokens: usize) -> (String, String, Vec<u32>) {
    let mut history: Vec<u32> = prompt.bytes().map(|b| b as u32 + 3).collect();
    let (mut reasoning, mut text, mut ids) = (String::new(), String::new(), Vec::new());
    for i in 0..max_tokens {
        let t = FakeModel::next_token(&history, 0);
        history.push(t);
        ids.push(t);
        let c = (t - 3) as u8 as char;
        if i < r1_serve::fake::FAKE_THINK_TOKENS {
            reasoning.push(c);
        } else {
            text.push(c);
        }
    }
    (reasoning, text, ids)
}

/// Minimal HTTP/1.1 client: returns (status, content-type, body) with chunked bodies decoded.
pub async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String, String) {
    http_with(addr, method, path, body, &[]).await
}

/// [`http`] with extra request headers.
pub async fn http_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect http");
    let (status, head, body) = http_on(s, method, path, body, headers).await.expect("HTTP exchange");
    let ctype = header_of(&head, "content-type");
    (status, ctype, body)
}

/// Value of a header in a response head ("" when absent).
pub fn header_of(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// One HTTP/1.1 exchange on any stream (plain TCP or TLS): (status, response head, body with chunks decoded).
/// An error when the peer closes without sending an HTTP response.
pub async fn http_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String, String)> {
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what}: {:?}", String::from_utf8_lossy(&raw[..raw.len().min(64)])),
        )
    };
    if !raw.starts_with(b"HTTP/1.1 ") {
        return Err(bad("not an HTTP response"));
    }
    let raw = String::from_utf8(raw)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "response is not UTF-8"))?;
    let (head, rest) = raw.split_once("\r\n\r\n").expect("header end");
    let status: u16 = head.split_whitespace().nth(1).expect("status").parse().expect("number");
    let body = if header_of(head, "transfer-encoding").eq_ignore_ascii_case("chunked") {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (size, after) = rest.split_once("\r\n").expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex size");
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    Ok((status, head.to_string(), body))
}

/// A connected channel to `url`.
pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string()).expect("url").connect().await.expect("connect")
}
