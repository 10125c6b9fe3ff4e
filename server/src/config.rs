//! Server configuration: every flag is `--flag`, `R1_FLAG` in the environment, or `flag` in an optional TOML file
//! (`--config FILE.toml`). Precedence: command line, then environment, then file, then default. Everything is
//! validated once at start ([`ServeArgs::validate`]) and split into the small config structs the parts use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use r1_engine::ExecutionProviderKind;
use serde::{Deserialize, Serialize};

use crate::auth::ApiKeys;
use crate::error::ConfigError;
use crate::scheduler::{SchedulerConfig, StepBudget};
use crate::security::Security;
pub use crate::telemetry::TelemetryConfig;
use crate::tls::TlsFiles;
use crate::validate::Limits;

pub use crate::scheduler::MAX_BATCH_SIZE_LIMIT;

/// Environment switches for diagnosing a deployment (`r1-serve --help`); the defaults are the production choice.
const DIAGNOSTIC_HELP: &str = "\
Diagnostic switches (environment; the defaults are right for production):
  R1_DECODE_STEPS=auto|shaped|fixed     in-place decode steps on the CUDA provider captured as CUDA graphs
                                        (auto); shaped never captures them
  R1_BIND_PRESENT=auto|always|never     the portable graph's KV cache kept on the GPU between decode steps
                                        (auto: under TensorRT, or CUDA without a serving graph); never copies
                                        each step's cache back to the host
  R1_ATTENTION_ISA=avx512|avx2|portable r1's CPU attention loops (default: the best the CPU has)";

/// `r1-serve`: serve an exported artifact over gRPC and OpenAI-compatible HTTP.
#[derive(Debug, Parser)]
#[command(
    name = "r1-serve",
    version,
    about,
    args_conflicts_with_subcommands = true,
    after_help = format!("{DIAGNOSTIC_HELP}\n\n{}", r1_engine::ort_lib::LIBRARY_HELP)
)]
pub struct Cli {
    /// `generate`: run the engine in-process on one prompt; no subcommand: serve.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Server flags (when no subcommand is given).
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands of `r1-serve`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a completion in-process (no server), printing reasoning and answer.
    Generate(GenerateArgs),
    /// Ask a running server one question over gRPC (GenerateStream, greedy) and print the reasoning, the answer
    /// and client-side timings.
    Ask(AskArgs),
}

/// Flags of `r1-serve ask`.
#[derive(Debug, Clone, Args)]
pub struct AskArgs {
    /// gRPC address of a running r1-serve.
    #[arg(long, env = "R1_ASK_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// CA certificate (PEM) to verify a TLS server with (use an https:// --addr). The API key, if the server needs
    /// one, is read from the environment variable R1_API_KEY.
    #[arg(long, env = "R1_ASK_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require one (with --tls-client-key).
    #[arg(long, env = "R1_ASK_TLS_CLIENT_CERT", value_name = "PEM", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert.
    #[arg(long, env = "R1_ASK_TLS_CLIENT_KEY", value_name = "PEM", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// The question, sent as one user chat message (rendered with the model's chat template by the server).
    pub question: String,
}

/// Flags of `r1-serve generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Artifact directory written by r1-export.
    #[arg(long, env = "R1_MODEL")]
    pub model: PathBuf,
    /// Backend: auto, ort or tract.
    #[arg(long, env = "R1_BACKEND", default_value = "auto")]
    pub backend: String,
    /// ONNX Runtime execution provider (ort backend): auto (TensorRT when a GPU and TensorRT are present, else CUDA
    /// on a GPU, else CPU), cpu, cuda or tensorrt (cuda and tensorrt fail at start, naming what is missing).
    #[arg(long, env = "R1_EXECUTION_PROVIDER", default_value = "auto")]
    pub execution_provider: String,
    /// Treat the prompt as raw text instead of a user chat message.
    #[arg(long)]
    pub raw: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Do not verify the artifact's sha256 sums before loading.
    #[arg(long, env = "R1_SKIP_INTEGRITY_CHECK")]
    pub skip_integrity_check: bool,
    /// The prompt.
    pub prompt: String,
}

/// Flags of the server. Field names are the TOML keys (kebab-case, as the flags).
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of these settings (keys as the long flags, e.g. `max-batch-size = 8`).
    #[arg(long, env = "R1_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Artifact directory written by r1-export (required to serve).
    #[arg(long, env = "R1_MODEL")]
    pub model: Option<PathBuf>,
    /// Model id reported by ModelInfo and /v1/models (default: the artifact directory name).
    #[arg(long, env = "R1_MODEL_ID")]
    pub model_id: Option<String>,
    /// Backend: auto, ort or tract.
    #[arg(long, env = "R1_BACKEND", default_value = "auto")]
    pub backend: String,
    /// ONNX Runtime execution provider (ort backend): auto (TensorRT when a GPU and TensorRT are present, else CUDA
    /// on a GPU, else CPU), cpu, cuda or tensorrt (cuda and tensorrt fail at start, naming what is missing).
    #[arg(long, env = "R1_EXECUTION_PROVIDER", default_value = "auto")]
    pub execution_provider: String,
    /// gRPC listen address.
    #[arg(long, env = "R1_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// HTTP listen address (/metrics and the OpenAI-compatible API).
    #[arg(long, env = "R1_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Requests queued plus running above which new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "R1_MAX_CONCURRENT_REQUESTS", default_value_t = SchedulerConfig::DEFAULT.max_concurrent_requests)]
    pub max_concurrent_requests: usize,
    /// Requests waiting for a batch slot above which new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "R1_MAX_QUEUE", default_value_t = SchedulerConfig::DEFAULT.max_queue)]
    pub max_queue: usize,
    /// Sequences stepped together at most.
    #[arg(long, env = "R1_MAX_BATCH_SIZE", default_value_t = SchedulerConfig::DEFAULT.max_batch_size)]
    pub max_batch_size: usize,
    /// Tokens fed to the model in one step at most (decode tokens plus prefill chunks). A step runs to completion,
    /// so this bounds how long a newly arrived request waits for its first step. Default: 256 on a CPU backend
    /// (ort-cpu, tract; at least --max-batch-size), 2048 on a GPU.
    #[arg(long, env = "R1_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Longest prefill chunk of one sequence in one step; longer prompts are prefilled over several steps.
    /// Default: 256 on a CPU backend, 512 on a GPU.
    #[arg(long, env = "R1_PREFILL_CHUNK")]
    pub prefill_chunk: Option<usize>,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, env = "R1_MAX_NEW_TOKENS", default_value_t = 4096)]
    pub max_new_tokens: u32,
    /// `max_tokens` of requests that do not set it.
    #[arg(long, env = "R1_DEFAULT_MAX_TOKENS", default_value_t = 512)]
    pub default_max_tokens: u32,
    /// KV cache budget in MiB (default: the engine's, 2048), counted in blocks of --kv-block-tokens positions as
    /// sequences grow (a request's max_tokens reserves nothing up front; when the pool is full the youngest
    /// sequences are preempted and recomputed later, never failed). Each position counts the pool's real bytes, in its
    /// element type (the serving graph's cache type: float16 for a quantized or fp16 `--target cpu` export of a
    /// dense family, else float32); backends that also keep the running batch's cache in the runtime (tract, ort on the portable graph)
    /// count each position twice.
    #[arg(long, env = "R1_KV_CACHE_MIB")]
    pub kv_cache_mib: Option<u64>,
    /// Positions per KV budget block: the unit a sequence grows by.
    #[arg(long, env = "R1_KV_BLOCK_TOKENS", default_value_t = r1_engine::kv::DEFAULT_BLOCK_TOKENS)]
    pub kv_block_tokens: usize,
    /// Prefix caching: keep finished requests' KV caches (evicted least-recently-used when room is needed) and start a
    /// new request from the longest cached prefix of its prompt (a shared system prompt, the earlier turns of a
    /// conversation), prefilling only the rest. `off` prefills every prompt in full. `exact` rounds each hit down to
    /// a multiple of --prefill-chunk, so every position is computed in the same chunk as with the cache off: a
    /// request run alone gives bit-identical output either way (greedy tokens equal even on near-flat distributions),
    /// at the cost of recomputing up to --prefill-chunk - 1 cached positions.
    #[arg(long, env = "R1_PREFIX_CACHE", default_value = "on", value_parser = ["on", "off", "exact"])]
    pub prefix_cache: String,
    /// Longest sequence served (prompt + generated tokens), capped at the model's max_position_embeddings: each KV
    /// pool slot holds this many positions (reserved address space; memory is committed as they are written), and
    /// requests beyond it are refused by name. The in-place attention kernel sizes its per-step scratch by it, so
    /// raise it only as far as you serve.
    #[arg(long, env = "R1_MAX_CONTEXT_TOKENS", default_value_t = r1_engine::engine::DEFAULT_MAX_CONTEXT)]
    pub max_context_tokens: usize,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT before cancelling them.
    #[arg(long, env = "R1_DRAIN_TIMEOUT_SECS", default_value_t = 30.0)]
    pub drain_timeout_secs: f64,
    /// Longest a request may run, from arrival to its last token, in seconds (gRPC DEADLINE_EXCEEDED, HTTP 504);
    /// a shorter deadline from the client (`grpc-timeout`, `x-request-timeout`) still wins. Default: none (only the
    /// client's deadline).
    #[arg(long, env = "R1_REQUEST_TIMEOUT_SECS", value_name = "SECONDS")]
    pub request_timeout_secs: Option<f64>,
    /// OTLP/gRPC endpoint for traces (e.g. http://127.0.0.1:4317); unset disables export.
    #[arg(long, env = "R1_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "R1_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "R1_LOG", default_value = "info")]
    pub log: String,
    /// TLS certificate chain (PEM, leaf first). With --tls-key, both the gRPC and the HTTP port speak TLS only.
    #[arg(long, env = "R1_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "R1_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to. Set: both ports require and verify a client
    /// certificate (mutual TLS). Needs --tls-cert and --tls-key.
    #[arg(long, env = "R1_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// File of API keys, one per line (`#` starts a comment line; keys are 16+ printable ASCII characters). Keys
    /// may also be given comma-separated in the environment variable R1_API_KEYS (there is no flag that takes keys
    /// on the command line). With any key, gRPC Generation and reflection need `authorization: Bearer <key>`
    /// (else UNAUTHENTICATED) and the OpenAI routes /v1/* need it too (else 401); grpc.health.v1, /health and
    /// /metrics stay open.
    #[arg(long, env = "R1_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Largest gRPC request message (decoded) and HTTP request body, in bytes; larger ones are refused
    /// (gRPC OUT_OF_RANGE, HTTP 413).
    #[arg(long, env = "R1_MAX_REQUEST_BYTES", default_value_t = crate::security::DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// Longest prompt in bytes (for chat: the sum of the messages' roles and contents), checked before
    /// tokenization; longer ones get INVALID_ARGUMENT / 400.
    #[arg(long, env = "R1_MAX_PROMPT_BYTES", default_value_t = crate::security::DEFAULT_MAX_PROMPT_BYTES)]
    pub max_prompt_bytes: usize,
    /// Do not verify the artifact's files against the sha256 sums in manifest.json before loading (verification is
    /// on by default; skipping it is logged as a warning).
    #[arg(long, env = "R1_SKIP_INTEGRITY_CHECK")]
    #[serde(default)]
    pub skip_integrity_check: bool,
}

impl ServeArgs {
    /// Parses the command line, then fills settings left at their defaults from `--config FILE.toml`.
    pub fn parse_cli() -> Result<Cli, ConfigError> {
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        if cli.command.is_none() {
            if let Some(path) = cli.serve.config.clone() {
                cli.serve = cli.serve.merge_file(&path, &matches)?;
            }
        }
        Ok(cli)
    }

    /// Returns these settings with every one that `matches` left at its default replaced by the file's value.
    pub fn merge_file(&self, path: &Path, matches: &ArgMatches) -> Result<ServeArgs, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        self.merge_toml(&text, path, |id| matches.value_source(id))
    }

    /// [`ServeArgs::merge_file`] on text; `source_of` tells where a setting (clap id, snake_case) came from.
    pub fn merge_toml(
        &self,
        text: &str,
        path: &Path,
        source_of: impl Fn(&str) -> Option<ValueSource>,
    ) -> Result<ServeArgs, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse { path: path.into(), message };
        let file: toml::Table = toml::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let mut current = toml::Table::try_from(self).map_err(|e| parse_err(e.to_string()))?;
        let cmd = Cli::command();
        for (key, value) in file {
            let id = key.replace('-', "_");
            if id == "config" || !cmd.get_arguments().any(|a| a.get_id().as_str() == id) {
                return Err(parse_err(format!(
                    "unknown setting `{key}` (keys are the long flag names, e.g. `max-batch-size`)"
                )));
            }
            let from_default = matches!(source_of(&id), None | Some(ValueSource::DefaultValue));
            if from_default {
                current.insert(key, value);
            }
        }
        let mut merged: ServeArgs = current.try_into().map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        merged.config = self.config.clone();
        Ok(merged)
    }

    /// Checks ranges and consistency; returns the validated configuration.
    pub fn validate(&self) -> Result<ServerConfig, ConfigError> {
        let bad = |name: &'static str, message: String| Err(ConfigError::Invalid { name, message });
        let model = match &self.model {
            Some(m) if m.join("manifest.json").is_file() => m.clone(),
            Some(m) => {
                return bad(
                    "--model",
                    format!("must be an artifact directory holding manifest.json, got {}", m.display()),
                )
            }
            None => return bad("--model", "is required (or R1_MODEL, or `model` in the config file)".into()),
        };
        if !matches!(self.backend.as_str(), "auto" | "ort" | "tract") {
            return bad("--backend", format!("must be auto, ort or tract, got {:?}", self.backend));
        }
        let execution_provider = parse_execution_provider(&self.backend, &self.execution_provider)?;
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad("--log-format", format!("must be text or json, got {:?}", self.log_format));
        }
        if self.grpc_addr == self.http_addr && self.grpc_addr.port() != 0 {
            return bad("--http-addr", format!("must differ from --grpc-addr, both are {}", self.grpc_addr));
        }
        if let Some(t) = self.request_timeout_secs.filter(|t| !(t.is_finite() && *t > 0.0 && *t <= 86_400.0)) {
            return bad("--request-timeout-secs", format!("must be more than 0 and at most 86400, got {t}"));
        }
        if !(self.drain_timeout_secs.is_finite() && (0.0..=3600.0).contains(&self.drain_timeout_secs)) {
            return bad("--drain-timeout-secs", format!("must be between 0 and 3600, got {}", self.drain_timeout_secs));
        }
        if let Some(e) = &self.otlp_endpoint {
            let scheme_ok = e.starts_with("http://") || e.starts_with("https://");
            if !scheme_ok || e.parse::<axum::http::Uri>().map_or(true, |u| u.host().is_none()) {
                return bad("--otlp-endpoint", format!("must be an http:// or https:// URL of an OTLP/gRPC receiver, e.g. http://127.0.0.1:4317, got {e:?}"));
            }
        }
        if let Some(0) = self.kv_cache_mib {
            return bad("--kv-cache-mib", "must be at least 1, got 0".into());
        }
        if self.max_context_tokens == 0 {
            return bad("--max-context-tokens", "must be at least 1, got 0".into());
        }
        if !(1..=4096).contains(&self.kv_block_tokens) {
            return bad("--kv-block-tokens", format!("must be within 1..=4096, got {}", self.kv_block_tokens));
        }
        let scheduler = SchedulerConfig {
            max_batch_size: self.max_batch_size,
            max_batch_tokens: SchedulerConfig::DEFAULT.max_batch_tokens,
            max_queue: self.max_queue,
            max_concurrent_requests: self.max_concurrent_requests,
            prefill_chunk: SchedulerConfig::DEFAULT.prefill_chunk,
            exact_prefix: self.prefix_cache == "exact",
        };
        let step_budget = StepBudget { max_batch_tokens: self.max_batch_tokens, prefill_chunk: self.prefill_chunk };
        for backend in ["ort-cpu", "ort-cuda"] {
            scheduler.for_backend(step_budget, backend).validate()?;
        }
        let limits = Limits {
            max_new_tokens: self.max_new_tokens,
            default_max_tokens: self.default_max_tokens,
            max_context_tokens: u32::MAX,
            sampling_defaults: Default::default(),
            request_timeout: self.request_timeout_secs.map(Duration::from_secs_f64),
        };
        limits.validate()?;
        let security = self.security(std::env::var("R1_API_KEYS").ok().as_deref())?;
        let model_id = self.model_id.clone().unwrap_or_else(|| {
            model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "r1".into())
        });
        Ok(ServerConfig {
            model,
            model_id,
            backend: self.backend.clone(),
            execution_provider,
            grpc_addr: self.grpc_addr,
            http_addr: self.http_addr,
            kv_cache_bytes: self.kv_cache_mib.map(|m| m << 20),
            kv_block_tokens: self.kv_block_tokens,
            prefix_cache: self.prefix_cache != "off",
            step_budget,
            max_context_tokens: self.max_context_tokens,
            drain_timeout: Duration::from_secs_f64(self.drain_timeout_secs),
            scheduler,
            limits,
            security,
            skip_integrity_check: self.skip_integrity_check,
            telemetry: TelemetryConfig {
                otlp_endpoint: self.otlp_endpoint.clone(),
                json: self.log_format == "json",
                filter: self.log.clone(),
            },
        })
    }
}

/// Checks `--execution-provider` against `--backend` (tract has no execution providers).
pub fn parse_execution_provider(backend: &str, value: &str) -> Result<ExecutionProviderKind, ConfigError> {
    let kind: ExecutionProviderKind = value.parse().map_err(|_| ConfigError::Invalid {
        name: "--execution-provider",
        message: format!("must be auto, cpu, cuda or tensorrt, got {value:?}"),
    })?;
    if backend == "tract" && matches!(kind, ExecutionProviderKind::Cuda | ExecutionProviderKind::TensorRt) {
        return Err(ConfigError::Invalid {
            name: "--execution-provider",
            message: format!("{value} needs --backend ort or auto (tract runs on the CPU only), got --backend tract"),
        });
    }
    Ok(kind)
}

impl ServeArgs {
    /// Loads and checks the TLS files and API keys, and checks the size limits. `env_keys` is the value of
    /// `R1_API_KEYS`, if set.
    pub fn security(&self, env_keys: Option<&str>) -> Result<Security, ConfigError> {
        let bad = |name: &'static str, message: String| Err(ConfigError::Invalid { name, message });
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: self.tls_client_ca.clone() };
                Some(crate::tls::server_config(&files)?)
            }
            (None, None) if self.tls_client_ca.is_some() => {
                return bad(
                    "--tls-client-ca",
                    "needs --tls-cert and --tls-key (client certificates are checked during the TLS handshake)".into(),
                )
            }
            (None, None) => None,
            (Some(_), None) => return bad("--tls-key", "is required with --tls-cert".into()),
            (None, Some(_)) => return bad("--tls-cert", "is required with --tls-key".into()),
        };
        let mut keys = ApiKeys::default();
        if let Some(path) = &self.api_key_file {
            keys.add_file(path)?;
        }
        if let Some(v) = env_keys {
            keys.add_env_list(v)?;
        }
        if !(1024..=1 << 30).contains(&self.max_request_bytes) {
            return bad(
                "--max-request-bytes",
                format!("must be between 1024 and {}, got {}", 1u64 << 30, self.max_request_bytes),
            );
        }
        if self.max_prompt_bytes == 0 || self.max_prompt_bytes > self.max_request_bytes {
            return bad(
                "--max-prompt-bytes",
                format!(
                    "must be between 1 and --max-request-bytes {}, got {}",
                    self.max_request_bytes, self.max_prompt_bytes
                ),
            );
        }
        Ok(Security {
            tls,
            api_keys: Arc::new(keys),
            max_request_bytes: self.max_request_bytes,
            max_prompt_bytes: self.max_prompt_bytes,
        })
    }
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Artifact directory.
    pub model: PathBuf,
    /// Served model id.
    pub model_id: String,
    /// `auto`, `ort` or `tract`.
    pub backend: String,
    /// ONNX Runtime execution provider.
    pub execution_provider: ExecutionProviderKind,
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address.
    pub http_addr: SocketAddr,
    /// KV cache budget, if set.
    pub kv_cache_bytes: Option<u64>,
    /// Positions per KV budget block.
    pub kv_block_tokens: usize,
    /// `--prefix-cache on`.
    pub prefix_cache: bool,
    /// `--max-batch-tokens` / `--prefill-chunk` as given (`scheduler` holds the GPU defaults until the backend is known).
    pub step_budget: StepBudget,
    /// `--max-context-tokens`.
    pub max_context_tokens: usize,
    /// How long in-flight requests may run after a shutdown signal.
    pub drain_timeout: Duration,
    /// Batching and admission.
    pub scheduler: SchedulerConfig,
    /// Request limits (`max_context_tokens` is filled in from the model).
    pub limits: Limits,
    /// TLS, API keys and size limits.
    pub security: Security,
    /// Skip the artifact's sha256 verification before loading.
    pub skip_integrity_check: bool,
    /// Logging and tracing.
    pub telemetry: TelemetryConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> (ServeArgs, ArgMatches) {
        let mut argv = vec!["r1-serve"];
        argv.extend_from_slice(extra);
        let matches = Cli::command().try_get_matches_from(argv).expect("parse");
        let cli = Cli::from_arg_matches(&matches).expect("from matches");
        (cli.serve, matches)
    }

    #[test]
    fn file_fills_defaults_but_cli_wins() {
        let (a, m) = args(&["--max-batch-size", "4"]);
        let toml = "max-batch-size = 8\nmax-queue = 7\nbackend = \"tract\"\n";
        let merged = a.merge_toml(toml, Path::new("x.toml"), |id| m.value_source(id)).expect("merge");
        assert_eq!(merged.max_batch_size, 4, "command line beats file");
        assert_eq!(merged.max_queue, 7, "file beats default");
        assert_eq!(merged.backend, "tract");
        assert_eq!(merged.max_batch_tokens, None, "untouched: the backend's default");
    }

    #[test]
    fn unknown_file_key_is_an_error_naming_it() {
        let (a, m) = args(&[]);
        let err = a.merge_toml("max-batch = 8\n", Path::new("x.toml"), |id| m.value_source(id)).unwrap_err();
        assert!(err.to_string().contains("max-batch"), "{err}");
    }

    #[test]
    fn validation_names_flag_limit_and_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("manifest.json"), "{}").expect("write");
        let model = dir.path().to_str().expect("utf8");
        let (a, _) = args(&["--model", model, "--max-batch-size", "0"]);
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("--max-batch-size") && err.contains("got 0"), "{err}");
        let (a, _) = args(&["--model", model, "--default-max-tokens", "9000"]);
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("--default-max-tokens") && err.contains("4096") && err.contains("9000"), "{err}");
        let (a, _) = args(&["--model", "/nonexistent"]);
        assert!(a.validate().unwrap_err().to_string().contains("--model"));
        let (a, _) = args(&["--model", model, "--backend", "gpu"]);
        assert!(a.validate().unwrap_err().to_string().contains("\"gpu\""));
        let (a, _) = args(&["--model", model, "--execution-provider", "gpu"]);
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("--execution-provider") && err.contains("cuda") && err.contains("\"gpu\""), "{err}");
        let (a, _) = args(&["--model", model, "--backend", "tract", "--execution-provider", "tensorrt"]);
        let err = a.validate().unwrap_err().to_string();
        assert!(err.contains("--execution-provider") && err.contains("--backend tract"), "{err}");
        for endpoint in ["127.0.0.1:4317", "grpc://collector:4317", "http://"] {
            let (a, _) = args(&["--model", model, "--otlp-endpoint", endpoint]);
            let err = a.validate().unwrap_err().to_string();
            assert!(err.contains("--otlp-endpoint") && err.contains(&format!("{endpoint:?}")), "{err}");
        }
        let (a, _) = args(&["--model", model, "--otlp-endpoint", "http://otel-collector.observability:4317"]);
        assert!(a.validate().expect("a valid endpoint").telemetry.otlp_endpoint.is_some());
        let (a, _) = args(&["--model", model, "--execution-provider", "cuda"]);
        assert_eq!(a.validate().expect("cuda is a valid provider").execution_provider, ExecutionProviderKind::Cuda);
        let (a, _) = args(&["--model", model]);
        let cfg = a.validate().expect("defaults are valid");
        assert_eq!(cfg.execution_provider, ExecutionProviderKind::Auto);
        assert_eq!(cfg.scheduler.max_batch_size, 16);
        assert!(cfg.security.tls.is_none() && cfg.security.api_keys.is_empty() && !cfg.skip_integrity_check);
        assert_eq!((cfg.security.max_request_bytes, cfg.security.max_prompt_bytes), (1 << 20, 512 << 10));
    }

    #[test]
    fn security_flags_are_checked_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "# ops\nabcdefghijklmnop-1\n").expect("write");
        let k = keys.to_str().expect("utf8");
        let sec = |extra: &[&str], env: Option<&str>| {
            let (a, _) = args(extra);
            a.security(env).map_err(|e| e.to_string())
        };
        assert!(sec(&["--tls-cert", "c.pem"], None).unwrap_err().contains("`--tls-key`: is required with --tls-cert"));
        assert!(sec(&["--tls-key", "k.pem"], None).unwrap_err().contains("`--tls-cert`: is required with --tls-key"));
        assert!(sec(&["--tls-client-ca", "ca.pem"], None).unwrap_err().contains("needs --tls-cert and --tls-key"));
        let e = sec(&["--tls-cert", "/nonexistent/c.pem", "--tls-key", "k.pem"], None).unwrap_err();
        assert!(e.starts_with("--tls-cert /nonexistent/c.pem: cannot read the file"), "{e}");
        let e = sec(&["--max-prompt-bytes", "2000", "--max-request-bytes", "1024"], None).unwrap_err();
        assert!(e.contains("--max-prompt-bytes") && e.contains("1024, got 2000"), "{e}");
        let e = sec(&["--max-request-bytes", "10"], None).unwrap_err();
        assert!(e.contains("--max-request-bytes") && e.contains("got 10"), "{e}");
        let s = sec(&["--api-key-file", k], Some("qrstuvwxyz012345-2")).expect("file and env keys");
        assert_eq!(s.api_keys.len(), 2);
        assert!(s.api_keys.matches(b"abcdefghijklmnop-1") && s.api_keys.matches(b"qrstuvwxyz012345-2"));
        let (a, m) = args(&[]);
        let merged = a
            .merge_toml("skip-integrity-check = true\nmax-prompt-bytes = 4096\n", Path::new("x.toml"), |id| {
                m.value_source(id)
            })
            .expect("toml");
        assert!(merged.skip_integrity_check);
        assert_eq!(merged.max_prompt_bytes, 4096);
    }
}
