//! Helpers shared by the tests that start the real `r1-serve` binary (`otlp_e2e.rs`, `kv_pool_e2e.rs`).
// Each test file compiles its own copy and uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Child;

/// The `r1-serve` binary of this build: `target/<profile>/r1-serve`, beside this test's `deps/` folder.
pub fn r1_serve_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("r1-serve");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p r1-serve`, or `cargo test --workspace`, which builds it)",
        bin.display()
    );
    bin
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Kills the server if the test fails before stopping it.
pub struct ServerProcess(pub Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `r1-serve`: the process, a gRPC channel to it once it reports SERVING, its HTTP port and its log.
pub struct Served {
    pub process: ServerProcess,
    pub channel: tonic::transport::Channel,
    pub http_port: u16,
    pub log: PathBuf,
}

impl Served {
    /// The server's log so far (its standard error).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the server wrote to its standard output so far (its tracing events, at `--log`'s level).
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(stdout_path(&self.log)).unwrap_or_default()
    }
}

/// Where [`serve`] puts the server's standard output: beside `log`.
fn stdout_path(log: &Path) -> PathBuf {
    log.with_extension("stdout")
}

/// Starts the real `r1-serve` on `model` with `flags` (plus loopback addresses; `R1_OTLP_ENDPOINT` and `R1_API_KEYS`
/// removed from its environment), logging to `log`, and waits until its health service reports SERVING (failing with
/// the log if it exits or takes more than 120 s).
pub async fn serve(model: &Path, flags: &[&str], log: &Path) -> Served {
    serve_with_env(model, flags, &[], log).await
}

/// [`serve`] with `envs` set in the server's environment.
pub async fn serve_with_env(model: &Path, flags: &[&str], envs: &[(&str, &str)], log: &Path) -> Served {
    use std::time::{Duration, Instant};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let (grpc_port, http_port) = (free_port(), free_port());
    let child = std::process::Command::new(r1_serve_bin())
        .arg("--model")
        .arg(model)
        .args(flags)
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}"), "--http-addr", &format!("127.0.0.1:{http_port}")])
        .env_remove("R1_OTLP_ENDPOINT")
        .env_remove("R1_API_KEYS")
        .envs(envs.iter().copied())
        .stdout(std::fs::File::create(stdout_path(log)).expect("stdout file"))
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("start r1-serve");
    let mut process = ServerProcess(child);
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let grpc_url = format!("http://127.0.0.1:{grpc_port}");
    let started = Instant::now();
    let channel = loop {
        if let Some(status) = process.0.try_wait().expect("try_wait") {
            panic!("r1-serve exited during start ({status}); its log:\n{}", log_text());
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "r1-serve not serving within 120 s; log:\n{}",
            log_text()
        );
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(grpc_url.clone()).expect("url").connect().await {
            let status = HealthClient::new(ch.clone()).check(HealthCheckRequest { service: String::new() }).await;
            if status.is_ok_and(|s| s.into_inner().status == ServingStatus::Serving as i32) {
                break ch;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Served { process, channel, http_port, log: log.to_path_buf() }
}
