//! Security over real sockets: TLS on both ports with a CA made in the test (rcgen), plain-text clients refused on
//! a TLS port, mutual TLS, API keys on gRPC and HTTP, size limits, requests that name files, and artifact integrity
//! (in-process and through the `r1-serve` binary).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use r1_proto::r1::v1::generation_client::GenerationClient;
use r1_serve::auth::ApiKeys;
use r1_serve::server::Security;
use r1_serve::tls::{client_config, server_config, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// A CA, a server certificate for 127.0.0.1/localhost and client certificates from it and from a second CA, as
/// PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            p.key_usages =
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("CA")
        };
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write pem");
        let leaf = |issuer: &CertifiedIssuer<'static, KeyPair>,
                    name: &str,
                    sans: Vec<String>,
                    usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(sans).expect("params");
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &**issuer).expect("sign");
            write(&format!("{name}.pem"), &cert.pem());
            write(&format!("{name}.key"), &key.serialize_pem());
        };
        let ca1 = ca("r1 test CA");
        let ca2 = ca("some other CA");
        write("ca.pem", &ca1.pem());
        leaf(&ca1, "server", vec!["localhost".into(), "127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth);
        leaf(&ca1, "client", vec!["client.test".into()], ExtendedKeyUsagePurpose::ClientAuth);
        leaf(&ca2, "stranger", vec!["stranger.test".into()], ExtendedKeyUsagePurpose::ClientAuth);
        Pki { dir }
    }

    fn server_tls(&self, mutual: bool) -> Arc<rustls::ServerConfig> {
        let files = TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: mutual.then(|| self.path("ca.pem")),
        };
        server_config(&files).expect("server TLS config")
    }

    fn client_tls(&self, identity: Option<&str>) -> Arc<rustls::ClientConfig> {
        let id = identity.map(|n| (self.path(&format!("{n}.pem")), self.path(&format!("{n}.key"))));
        client_config(&self.path("ca.pem"), id.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))
            .expect("client TLS config")
    }
}

/// One HTTP/1.1 exchange over TLS: (status, head, body), or the error that ended it.
async fn https(
    addr: std::net::SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String, String)> {
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?;
    http_on(tls, method, path, body, &[]).await
}

const COMPLETION: &str = r#"{"prompt":"abc","max_tokens":4,"temperature":0}"#;

#[tokio::test]
async fn tls_serves_grpc_and_http_and_refuses_plain_text() {
    let pki = Pki::new();
    let security = Security { tls: Some(pki.server_tls(false)), ..Default::default() };
    let mut srv = start_ready(Setup { security, client_tls: Some(pki.client_tls(None)), ..Default::default() }).await;
    assert!(srv.grpc_url.starts_with("https://127.0.0.1:"));

    // gRPC over TLS: same output as the reference.
    let r = srv.client().await.generate(prompt_req("secure", 5)).await.expect("generate over TLS").into_inner();
    assert_eq!(r.token_ids, reference("secure", 5).2);
    // HTTP over TLS.
    let (status, _, body) =
        https(srv.http_addr, pki.client_tls(None), "POST", "/v1/completions", Some(COMPLETION)).await.expect("https");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    // `r1-serve ask` over TLS.
    let r =
        r1_serve::ask::ask_with(&srv.grpc_url, "hi", 4, Some(pki.client_tls(None)), None).await.expect("ask over TLS");
    assert_eq!(r.completion_tokens, 4);

    // Plain-text clients get no service on either port.
    let grpc_plain = srv.grpc_url.replace("https://", "http://");
    let plain = async {
        let mut c = GenerationClient::connect(grpc_plain).await.map_err(|e| e.to_string())?;
        c.generate(prompt_req("x", 2)).await.map_err(|e| e.to_string())
    };
    let err = plain.await.expect_err("plain-text gRPC refused on the TLS port");
    assert!(!err.is_empty());
    let tcp = tokio::net::TcpStream::connect(srv.http_addr).await.expect("tcp");
    let plain = http_on(tcp, "GET", "/health", None, &[]).await;
    assert!(plain.is_err(), "plain-text HTTP got an HTTP response from the TLS port: {plain:?}");
    // A client that does not trust the CA refuses the server.
    let other = tempfile::tempdir().expect("tempdir");
    let stranger_ca = other.path().join("ca.pem");
    std::fs::copy(pki.path("stranger.pem"), &stranger_ca).expect("copy");
    let untrusting = client_config(&stranger_ca, None).expect("config");
    assert!(r1_serve::tls::tls_channel(&srv.grpc_url, untrusting).await.is_err(), "server certificate not trusted");
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn client_certificate_required_when_a_client_ca_is_set() {
    let pki = Pki::new();
    let security = Security { tls: Some(pki.server_tls(true)), ..Default::default() };
    let mut srv =
        start_ready(Setup { security, client_tls: Some(pki.client_tls(Some("client"))), ..Default::default() }).await;
    let r = srv.client().await.generate(prompt_req("mutual", 3)).await.expect("client cert accepted").into_inner();
    assert_eq!(r.token_ids, reference("mutual", 3).2);
    let (status, _, _) =
        https(srv.http_addr, pki.client_tls(Some("client")), "GET", "/health", None).await.expect("https with cert");
    assert_eq!(status, 200);

    for (who, cfg) in
        [("no certificate", pki.client_tls(None)), ("certificate from another CA", pki.client_tls(Some("stranger")))]
    {
        // With TLS 1.3 the client may finish its side of the handshake before the server refuses: the refusal shows
        // at connect or at the first call, never as a response.
        let grpc = async {
            let ch = r1_serve::tls::tls_channel(&srv.grpc_url, cfg.clone()).await.map_err(|e| e.to_string())?;
            GenerationClient::new(ch).generate(prompt_req("x", 2)).await.map_err(|e| e.to_string())
        };
        assert!(grpc.await.is_err(), "gRPC with {who} refused");
        assert!(https(srv.http_addr, cfg, "GET", "/health", None).await.is_err(), "HTTP with {who} refused");
    }
    srv.shutdown().await.expect("clean shutdown");
}

fn keys(list: &[&str]) -> Arc<ApiKeys> {
    let mut k = ApiKeys::default();
    k.add_env_list(&list.join(",")).expect("keys");
    Arc::new(k)
}

#[tokio::test]
async fn api_keys_on_grpc_and_http_with_health_and_metrics_open() {
    const KEY: &str = "test-key-0123456789abcdef";
    let security = Security { api_keys: keys(&["other-key-0123456789abcdef", KEY]), ..Default::default() };
    let mut srv = start_ready(Setup { security, ..Default::default() }).await;
    let mut c = srv.client().await;
    let with = |auth: Option<&str>| {
        let mut r = tonic::Request::new(prompt_req("keyed", 3));
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().expect("ascii"));
        }
        r
    };
    for (auth, want) in [
        (None, "missing `authorization: Bearer <api key>`"),
        (Some("Bearer wrong-key-0123456789abcdef"), "invalid API key"),
        (Some(KEY), "the `authorization` value must be `Bearer <api key>`"),
    ] {
        let err = c.generate(with(auth)).await.expect_err("unauthenticated");
        assert_eq!((err.code(), err.message()), (Code::Unauthenticated, want));
        assert!(!err.message().contains("wrong-key"), "the key is never echoed");
    }
    let r = c.generate(with(Some(&format!("Bearer {KEY}")))).await.expect("valid key").into_inner();
    assert_eq!(r.token_ids, reference("keyed", 3).2);
    assert_eq!(srv.health("").await, ServingStatus::Serving, "health needs no key (Kubernetes gRPC probes)");
    let r = r1_serve::ask::ask_with(&srv.grpc_url, "hi", 3, None, Some(KEY)).await.expect("ask with the key");
    assert_eq!(r.completion_tokens, 3);
    match r1_serve::ask::ask_with(&srv.grpc_url, "hi", 3, None, None).await {
        Err(r1_serve::ask::AskError::Status(s)) => assert_eq!(s.code(), Code::Unauthenticated),
        other => panic!("ask without a key must be refused: {other:?}"),
    }
    // Reflection needs the key too.
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::ServerReflectionRequest;
        let mut r = ServerReflectionClient::new(srv.channel().await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let err = r.server_reflection_info(futures::stream::iter(vec![req])).await.expect_err("reflection needs a key");
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    // HTTP: 401 with an OpenAI-shaped JSON error and WWW-Authenticate on /v1/*, open /health and /metrics.
    for path in ["/v1/completions", "/v1/models"] {
        let method = if path == "/v1/models" { "GET" } else { "POST" };
        let tcp = tokio::net::TcpStream::connect(srv.http_addr).await.expect("tcp");
        let (status, head, body) =
            http_on(tcp, method, path, Some(COMPLETION), &[("Authorization", "Bearer nope-0123456789abcdef")])
                .await
                .expect("http");
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(header_of(&head, "www-authenticate"), "Bearer");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            (v["error"]["code"].as_str(), v["error"]["message"].as_str()),
            (Some("unauthenticated"), Some("invalid API key"))
        );
    }
    let (status, _, body) =
        http(srv.http_addr, "POST", "/v1/chat/completions", Some(r#"{"messages":[{"role":"user","content":"x"}]}"#))
            .await;
    assert_eq!(status, 401, "{body}");
    let auth = format!("Bearer {KEY}");
    let (status, _, body) =
        http_with(srv.http_addr, "POST", "/v1/completions", Some(COMPLETION), &[("Authorization", &auth)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(http(srv.http_addr, "GET", "/health", None).await.0, 200);
    let (status, _, metrics) = http(srv.http_addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&metrics, "r1_requests_total{api=\"grpc\",outcome=\"unauthenticated\"}"),
        Some(5.0),
        "3 Generate + 1 ask + 1 reflection"
    );
    assert_eq!(metric(&metrics, "r1_requests_total{api=\"http\",outcome=\"unauthenticated\"}"), Some(3.0));
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn oversized_messages_and_prompts_are_refused_with_the_limits() {
    let security = Security { max_request_bytes: 64 << 10, max_prompt_bytes: 1000, ..Default::default() };
    let mut srv = start_ready(Setup { security, ..Default::default() }).await;
    let mut c = srv.client().await;
    // Message over --max-request-bytes: refused by the gRPC decoder before any handler runs.
    let err = c.generate(prompt_req(&"x".repeat(100 << 10), 2)).await.expect_err("message too large");
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains(&(64 << 10).to_string()), "names the limit: {}", err.message());
    let big = format!(r#"{{"prompt":"{}","max_tokens":2}}"#, "x".repeat(100 << 10));
    let (status, _, body) = http(srv.http_addr, "POST", "/v1/completions", Some(&big)).await;
    assert_eq!(status, 413, "HTTP body over the limit");
    assert!(body.contains("--max-request-bytes") && body.contains(&(64 << 10).to_string()), "names the limit: {body}");
    assert!(body.contains("\"error\""), "OpenAI's error shape: {body}");
    // Prompt over --max-prompt-bytes (but message under the limit): INVALID_ARGUMENT / 400 naming limit and value.
    let err = c.generate(prompt_req(&"y".repeat(1001), 2)).await.expect_err("prompt too long");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "`prompt` must be at most 1000 bytes (--max-prompt-bytes), got 1001 bytes");
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "z".repeat(1000));
    let (status, _, body) = http(srv.http_addr, "POST", "/v1/chat/completions", Some(&body)).await;
    assert_eq!(status, 400);
    assert!(body.contains("`messages` must be at most 1000 bytes (--max-prompt-bytes), got 1004 bytes"), "{body}");
    // At the limit it runs.
    let r = c.generate(prompt_req(&"y".repeat(1000), 2)).await.expect("at the limit").into_inner();
    assert_eq!(r.token_ids.len(), 2);
    srv.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn request_fields_never_name_files() {
    let mut srv = start_ready(Setup::default()).await;
    // `model` is only compared with the served id.
    for model in ["/etc/passwd", "../../etc/passwd", "file:///etc/passwd"] {
        let body = format!(r#"{{"model":"{model}","prompt":"abc","max_tokens":2}}"#);
        let (status, _, body) = http(srv.http_addr, "POST", "/v1/completions", Some(&body)).await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("model_not_found") && !body.contains("root:"), "{body}");
    }
    // A prompt that looks like a path is just text: the output is the fake's function of its bytes.
    let r = srv.client().await.generate(prompt_req("/etc/passwd", 6)).await.expect("text").into_inner();
    assert_eq!(r.token_ids, reference("/etc/passwd", 6).2);
    // Paths outside the routes are 404, not files.
    for path in ["/../../etc/passwd", "/v1/../../../etc/passwd", "/metrics/../../etc/passwd"] {
        let (status, _, body) = http(srv.http_addr, "GET", path, None).await;
        assert!(status == 404 || status == 400, "{path}: {status} {body}");
        assert!(!body.contains("root:"));
    }
    srv.shutdown().await.expect("clean shutdown");
}

/// An artifact directory with a valid manifest listing its (fake) files with their true sha256 sums.
fn fake_artifact() -> tempfile::TempDir {
    use sha2::Digest;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = serde_json::Map::new();
    for (name, body) in
        [("model.onnx", vec![1u8; 4096]), ("model.onnx.data", vec![2u8; 100_000]), ("tokenizer.json", b"{}".to_vec())]
    {
        std::fs::write(dir.path().join(name), &body).expect("write");
        files.insert(
            name.into(),
            serde_json::json!({"sha256": hex::encode(sha2::Sha256::digest(&body)), "bytes": body.len()}),
        );
    }
    let io = |n: &str, d: &str| serde_json::json!({"name": n, "dtype": d, "shape": ["batch", "sequence"]});
    let manifest = serde_json::json!({
        "format_version": 1, "exporter": {"name": "test", "version": "0"}, "family": "qwen2", "architecture": "Qwen2ForCausalLM",
        "precision": "fp32", "opset": 17, "source": {"dtype": "f32"},
        "model": {"num_layers": 1, "vocab_size": 10, "hidden_size": 4, "max_position_embeddings": 64}, "config": {},
        "inputs": [io("input_ids", "int64"), io("attention_mask", "int64"), io("position_ids", "int64")],
        "outputs": [io("logits", "float32")],
        "kv_cache": {"layout": "per_head", "num_layers": 1, "key_heads": 1, "key_dim": 2, "value_heads": 1, "value_dim": 2,
                     "dtype": "float32", "bytes_per_token": 16, "description": "test"},
        "files": files,
    });
    std::fs::write(dir.path().join("manifest.json"), serde_json::to_string_pretty(&manifest).expect("json"))
        .expect("write");
    dir
}

fn tamper(path: &Path, at: usize) {
    let mut b = std::fs::read(path).expect("read");
    b[at] ^= 0x40;
    std::fs::write(path, b).expect("write");
}

async fn serve_artifact(dir: &Path, skip: bool) -> TestServer {
    let dir = dir.to_path_buf();
    let pre_load: Box<dyn FnOnce() -> Result<(), r1_serve::model::ModelError> + Send> =
        Box::new(move || r1_serve::engine_model::verify_artifact(&dir, skip));
    start(Setup { pre_load: Some(pre_load), ..Default::default() }).await
}

#[tokio::test]
async fn tampered_artifact_is_refused_before_loading_unless_skipped() {
    let art = fake_artifact();
    let mut srv = serve_artifact(art.path(), false).await;
    srv.wait_status(ServingStatus::Serving).await;
    srv.shutdown().await.expect("intact artifact serves");

    tamper(&art.path().join("model.onnx.data"), 77_777);
    let mut srv = serve_artifact(art.path(), false).await;
    // No shutdown signal: run() ends by itself with the loading error.
    let task = srv.task.take().expect("task");
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), task)
        .await
        .expect("run returned")
        .expect("no panic")
        .expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("integrity") && msg.contains("`model.onnx.data` has sha256"), "{msg}");
    assert!(msg.contains("manifest.json says"), "{msg}");

    let mut srv = serve_artifact(art.path(), true).await;
    srv.wait_status(ServingStatus::Serving).await;
    srv.shutdown().await.expect("--skip-integrity-check loads the tampered artifact");
}

fn r1_serve_bin(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_r1-serve"));
    cmd.args(args).env_remove("R1_API_KEYS").env_remove("R1_SKIP_INTEGRITY_CHECK");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run r1-serve")
}

#[test]
fn binary_refuses_tampered_artifacts_and_bad_security_files() {
    let art = fake_artifact();
    tamper(&art.path().join("model.onnx"), 10);
    let model = art.path().to_str().expect("utf8");
    let out = r1_serve_bin(&["generate", "--model", model, "hi"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("`model.onnx` has sha256") && stderr.contains("manifest.json says"), "{stderr}");

    // Serving: refused at start with the flag and the path named.
    let pki = tempfile::tempdir().expect("tempdir");
    let garbage = pki.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let g = garbage.to_str().expect("utf8");
    let base = ["--model", model, "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"];
    let run = |extra: &[&str], envs: &[(&str, &str)]| {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let out = r1_serve_bin(&args, envs);
        assert!(!out.status.success(), "{extra:?} must fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--tls-cert", g, "--tls-key", g], &[]);
    assert!(e.contains("--tls-cert") && e.contains(g) && e.contains("CERTIFICATE"), "{e}");
    let e = run(&["--tls-cert", "/nonexistent/cert.pem", "--tls-key", g], &[]);
    assert!(e.contains("--tls-cert /nonexistent/cert.pem: cannot read the file"), "{e}");
    let e = run(&["--tls-cert", g], &[]);
    assert!(e.contains("--tls-key") && e.contains("required"), "{e}");
    let e = run(&["--api-key-file", "/nonexistent/keys"], &[]);
    assert!(e.contains("--api-key-file /nonexistent/keys: cannot read the file"), "{e}");
    let e = run(&[], &[("R1_API_KEYS", "short")]);
    assert!(
        e.contains("R1_API_KEYS, key 1: must be at least 16 bytes long, got 5 bytes") && !e.contains("short\""),
        "{e}"
    );
    let e = run(&["--max-prompt-bytes", "2000000"], &[]);
    assert!(e.contains("--max-prompt-bytes") && e.contains("2000000"), "{e}");
    // With valid flags the tampered artifact is refused after the listeners start, before loading.
    let e = run(&[], &[]);
    assert!(e.contains("integrity") && e.contains("`model.onnx` has sha256"), "{e}");
}

#[test]
fn help_documents_every_security_flag_with_its_env_var() {
    let out = r1_serve_bin(&["--help"], &[]);
    // Wrapped lines joined, so `[env: NAME=]` is found wherever clap breaks the line.
    let help = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for (flag, env) in [
        ("--tls-cert", "R1_TLS_CERT"),
        ("--tls-key", "R1_TLS_KEY"),
        ("--tls-client-ca", "R1_TLS_CLIENT_CA"),
        ("--api-key-file", "R1_API_KEY_FILE"),
        ("--max-request-bytes", "R1_MAX_REQUEST_BYTES"),
        ("--max-prompt-bytes", "R1_MAX_PROMPT_BYTES"),
        ("--skip-integrity-check", "R1_SKIP_INTEGRITY_CHECK"),
    ] {
        assert!(help.contains(flag) && help.contains(&format!("env: {env}")), "{flag} / {env} missing from --help");
    }
    assert!(help.contains("R1_API_KEYS"), "the key variable is documented");
}
