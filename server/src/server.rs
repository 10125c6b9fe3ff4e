//! Wiring: listeners, model loading, warm-up, health, reflection, and graceful shutdown.
//!
//! [`run`] serves gRPC (Generation + `grpc.health.v1` + reflection) and HTTP on the given listeners. Health is
//! NOT_SERVING until the model is loaded and one warm-up request went through, and again from the moment `shutdown`
//! resolves. Then both servers stop accepting, in-flight requests get `drain_timeout` to finish, whatever is still
//! running is cancelled, and `run` returns `Ok(())`.
//!
//! [`run_with`] adds the [`Security`] settings: TLS on both ports ([`crate::tls`]), API keys ([`crate::auth`]) on
//! Generation, reflection and the OpenAI routes (health and metrics stay open), and the request size limits.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::serve::{Listener, ListenerExt};
use r1_proto::r1::v1::generation_server::GenerationServer;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::api::{collect_all, AppState};
use crate::auth::{GrpcAuth, HttpAuth};
use crate::error::ServeError;
use crate::grpc::GenerationService;
use crate::metrics::Metrics;
use crate::model::{Model, ModelError};
use crate::scheduler::{Scheduler, SchedulerConfig, StepBudget};
pub use crate::security::{Security, DEFAULT_MAX_PROMPT_BYTES, DEFAULT_MAX_REQUEST_BYTES};
use crate::validate::{Limits, RawRequest, RawSampling};

/// gRPC service name used in health checks.
pub const SERVICE_NAME: &str = "r1.v1.Generation";

/// The two listening sockets.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (HTTP/2).
    pub grpc: tokio::net::TcpListener,
    /// HTTP (/metrics, OpenAI API).
    pub http: tokio::net::TcpListener,
}

/// What [`run`] needs besides listeners and the model.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Served model id.
    pub model_id: String,
    /// Request limits (context filled in from the model).
    pub limits: Limits,
    /// Batching and admission (the step budget is chosen for the backend at load: [`SchedulerConfig::for_backend`]).
    pub scheduler: SchedulerConfig,
    /// `--max-batch-tokens` / `--prefill-chunk` as given.
    pub step_budget: StepBudget,
    /// Time in-flight requests get after the shutdown signal.
    pub drain_timeout: Duration,
}

/// Loads the model (runs on a blocking thread while the listeners already answer health checks).
pub type Loader = Box<dyn FnOnce() -> Result<Box<dyn Model>, ModelError> + Send>;

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

async fn warm_up(state: &AppState) -> Result<(), ServeError> {
    let raw = RawRequest {
        prompt: Some("Hello".into()),
        max_tokens: Some(2),
        sampling: RawSampling { temperature: Some(0.0), ..Default::default() },
        ignore_eos: true,
        sampling_prefix: "sampling.",
        ..Default::default()
    };
    let span = tracing::info_span!("warmup");
    let rxs = state.start(raw, "warmup", "warmup".into(), None, span.clone()).await?;
    collect_all(rxs, &span).await.map(|_| ())
}

/// Serves plain-text, without API keys and with the default size limits, until `shutdown` resolves, then drains
/// and returns. See the module docs.
pub async fn run(
    listeners: Listeners,
    opts: ServeOptions,
    metrics: Arc<Metrics>,
    load: Loader,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    run_with(listeners, opts, Security::default(), metrics, load, shutdown).await
}

/// Serves both ports with `TCP_NODELAY`, over TLS when `tls` is set.
fn spawn_serve(
    tcp: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: axum::Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, ServeError> {
    fn spawn<L: Listener>(
        l: L,
        router: axum::Router,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<std::io::Result<()>>
    where
        L::Addr: std::fmt::Debug,
    {
        let serve = axum::serve(l, router).with_graceful_shutdown(stop);
        tokio::spawn(async move { serve.await })
    }
    Ok(match tls {
        Some(cfg) => {
            let l = crate::tls::TlsListener::new(tcp, cfg)
                .map_err(|e| ServeError::Unavailable { reason: format!("TLS listener: {e}") })?;
            spawn(l, router, stop)
        }
        None => {
            // TCP_NODELAY: without it Nagle + delayed ACKs hold streamed tokens back for ~40 ms.
            let nodelay = |tcp: &mut tokio::net::TcpStream| {
                let _ = tcp.set_nodelay(true);
            };
            spawn(tcp.tap_io(nodelay), router, stop)
        }
    })
}

/// [`run`] with TLS, API keys and size limits. See the module docs.
pub async fn run_with(
    listeners: Listeners,
    opts: ServeOptions,
    security: Security,
    metrics: Arc<Metrics>,
    load: Loader,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let state = Arc::new(AppState::with_body_limit(
        opts.model_id.clone(),
        opts.limits,
        metrics.clone(),
        security.max_prompt_bytes,
        security.max_request_bytes,
    ));
    let (reporter, grpc, http) = routers(&state, &security, &metrics).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let grpc_addr = listeners.grpc.local_addr().ok();
    let http_addr = listeners.http.local_addr().ok();
    let grpc_task = spawn_serve(listeners.grpc, security.tls.clone(), grpc, signal(stop_rx.clone()))?;
    let http_task = spawn_serve(listeners.http, security.tls.clone(), http, signal(stop_rx))?;
    tracing::info!(
        ?grpc_addr,
        ?http_addr,
        model_id = %opts.model_id,
        tls = security.tls.is_some(),
        api_keys = security.api_keys.len(),
        max_request_bytes = security.max_request_bytes,
        max_prompt_bytes = security.max_prompt_bytes,
        "listening; loading model"
    );

    tokio::pin!(shutdown);
    let mut actor_thread: Option<std::thread::JoinHandle<()>> = None;
    let loading = async {
        let t0 = Instant::now();
        let model = tokio::task::spawn_blocking(load)
            .await
            .map_err(|e| ServeError::from(ModelError::internal("load", e.to_string())))??;
        let desc = model.describe();
        let sched = opts.scheduler.for_backend(opts.step_budget, &desc.backend);
        sched.validate().map_err(|e| ServeError::Unavailable { reason: e.to_string() })?;
        tracing::info!(max_batch_tokens = sched.max_batch_tokens, prefill_chunk = sched.prefill_chunk, backend = %desc.backend, "step budget");
        let (scheduler, join) = Scheduler::spawn(model, sched, metrics.clone())
            .map_err(|e| ServeError::Unavailable { reason: format!("cannot start the scheduler thread: {e}") })?;
        actor_thread = Some(join);
        let limits =
            Limits { max_context_tokens: desc.max_context_tokens.min(u32::MAX as usize) as u32, ..opts.limits }
                .with_generation_config(&desc.generation);
        let _ = state.limits.set(limits);
        let _ = state.scheduler.set(scheduler);
        warm_up(&state).await?;
        tracing::info!(load_ms = t0.elapsed().as_millis() as u64, backend = %desc.backend, family = %desc.family, "model loaded and warm; serving");
        Ok::<(), ServeError>(())
    };
    let loaded = tokio::select! {
        r = loading => Some(r),
        _ = &mut shutdown => None,
    };
    let mut result = Ok(());
    match loaded {
        Some(Ok(())) => {
            state.warm.store(true, Ordering::Release);
            set_health(&reporter, ServingStatus::Serving).await;
            (&mut shutdown).await;
        }
        Some(Err(e)) => {
            tracing::error!(error = %e, "model failed to load or warm up");
            result = Err(e);
        }
        None => {}
    }

    tracing::info!(in_flight = state.scheduler.get().map(Scheduler::in_flight).unwrap_or(0), "shutting down: draining");
    state.draining.store(true, Ordering::Release);
    set_health(&reporter, ServingStatus::NotServing).await;
    let _ = stop_tx.send(true);
    drain(&state, opts.drain_timeout, grpc_task, http_task).await;
    stop_actor(&state, actor_thread).await;
    tracing::info!("stopped");
    result
}

/// The gRPC router (Generation, health, reflection; API keys checked on all but health) and the HTTP router, with
/// health reporting NOT_SERVING until the model is loaded.
async fn routers(
    state: &Arc<AppState>,
    security: &Security,
    metrics: &Arc<Metrics>,
) -> Result<(HealthReporter, axum::Router, axum::Router), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(r1_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Unavailable { reason: format!("reflection setup failed: {e}") })?;
    let grpc_auth = GrpcAuth::new(security.api_keys.clone(), metrics.clone());
    let generation = GenerationServer::new(GenerationService::new(state.clone()))
        .max_decoding_message_size(security.max_request_bytes);
    // Health stays open (Kubernetes gRPC probes send no headers); Generation and reflection need a key when keys
    // are configured.
    let grpc = tonic::service::Routes::new(tonic::service::interceptor::InterceptedService::new(
        generation,
        grpc_auth.clone(),
    ))
    .add_service(health)
    .add_service(tonic::service::interceptor::InterceptedService::new(reflection, grpc_auth))
    .prepare()
    .into_axum_router();
    let http_auth = HttpAuth { keys: security.api_keys.clone(), metrics: metrics.clone() };
    let http = crate::http::router_with(state.clone(), http_auth, security.max_request_bytes);
    Ok((reporter, grpc, http))
}

/// Waits up to `timeout` for both listeners to finish their in-flight requests; past it, cancels what is left, gives
/// them 2 s more, then aborts them.
async fn drain(
    state: &AppState,
    timeout: Duration,
    mut grpc_task: tokio::task::JoinHandle<std::io::Result<()>>,
    mut http_task: tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let drained = tokio::time::timeout(timeout, async {
        let _ = (&mut grpc_task).await;
        let _ = (&mut http_task).await;
    })
    .await;
    if drained.is_err() {
        if let Some(s) = state.scheduler.get() {
            tracing::warn!(in_flight = s.in_flight(), "drain timeout passed; cancelling what is left");
            s.cancel_all("server shutting down: drain timeout passed");
        }
        let grace = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = (&mut grpc_task).await;
            let _ = (&mut http_task).await;
        })
        .await;
        if grace.is_err() {
            grpc_task.abort();
            http_task.abort();
        }
    }
}

/// Stops the actor thread and waits for it: it owns the model and every request's state, so once it has returned the
/// model's memory is freed and every request span is closed (exported) before `run_with` returns.
async fn stop_actor(state: &AppState, actor_thread: Option<std::thread::JoinHandle<()>>) {
    if let (Some(s), Some(join)) = (state.scheduler.get(), actor_thread) {
        s.stop();
        let joined =
            tokio::time::timeout(Duration::from_secs(10), tokio::task::spawn_blocking(move || join.join())).await;
        match joined {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(_))) => tracing::error!("the scheduler thread panicked"),
            Ok(Err(e)) => tracing::error!(error = %e, "could not wait for the scheduler thread"),
            Err(_) => {
                tracing::warn!("the scheduler thread did not stop within 10 s (a model step still running); leaving it")
            }
        }
    }
}
