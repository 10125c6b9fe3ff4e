//! The scheduler actor. A cloneable [`Scheduler`] handle sends commands over a channel to one dedicated OS thread
//! that owns the queue ([`batcher::Batcher`]) and the model, and runs the synchronous, CPU-heavy model steps there,
//! never on the async executor. Each request carries its own response channel; a closed channel means the client
//! left, and the request's sequence is freed at the next iteration.
//!
//! Admission: `--max-concurrent-requests` (queued + running) is checked in the handle with an atomic counter, so an
//! overloaded server answers `RESOURCE_EXHAUSTED` without touching the actor; `--max-queue` is checked by the actor.
//! A failed model step fails only the requests in that step; the loop keeps serving.

mod actor;
pub mod batcher;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use crate::error::{ConfigError, ServeError};
use crate::metrics::Metrics;
use crate::model::{Frontend, Model, ModelDescription, SeqParams};

/// Largest batch any engine profile is built for; larger values are refused at start.
pub const MAX_BATCH_SIZE_LIMIT: usize = 256;

/// Batching and admission settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences per step at most.
    pub max_batch_size: usize,
    /// Tokens fed per step at most.
    pub max_batch_tokens: usize,
    /// Waiting requests at most.
    pub max_queue: usize,
    /// Queued plus running requests at most.
    pub max_concurrent_requests: usize,
    /// Prefill tokens of one sequence per step at most.
    pub prefill_chunk: usize,
    /// `--prefix-cache exact`: prefix-cache hits are rounded down to a multiple of `prefill_chunk`, so that a request
    /// run alone computes every position in the same chunk as with the cache off (bit-identical output).
    pub exact_prefix: bool,
}

/// `--max-batch-tokens` and `--prefill-chunk` as given; what is left unset takes the default of the device the model
/// runs on ([`SchedulerConfig::for_backend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepBudget {
    /// `--max-batch-tokens`, if given.
    pub max_batch_tokens: Option<usize>,
    /// `--prefill-chunk`, if given.
    pub prefill_chunk: Option<usize>,
}

/// Step budget (both `--max-batch-tokens` and `--prefill-chunk`) by default on a CPU backend (`ort-cpu`, `tract`).
/// A step runs to completion, so its prefill work is the longest a newly arrived request can wait before its own
/// first step: 256 tokens of a 1.5B model take ~0.9 s on 2 cores, and CPU matrix products are already efficient at
/// that many rows (`BENCHMARKS.md`, mixed load: short requests' p90 time to first token 0.96x of running alone with 4
/// long prompts beside them, against 5.9x at 2,048, with the long prompts' own first token no later).
pub const CPU_STEP_TOKENS: usize = 256;

impl SchedulerConfig {
    /// The defaults (also the flags' defaults in `config.rs`, which reads them from here).
    pub const DEFAULT: SchedulerConfig = SchedulerConfig {
        max_batch_size: 16,
        max_batch_tokens: 2048,
        max_queue: 128,
        max_concurrent_requests: 256,
        prefill_chunk: 512,
        exact_prefix: false,
    };

    /// This configuration with the step budget left unset in `budget` chosen for `backend` (the model's backend
    /// name): [`CPU_STEP_TOKENS`] on `ort-cpu` and `tract` (at least `max_batch_size`), [`SchedulerConfig::DEFAULT`]'s
    /// on a GPU.
    pub fn for_backend(self, budget: StepBudget, backend: &str) -> SchedulerConfig {
        let on_cpu = backend == "ort-cpu" || backend == "tract";
        let (tokens, chunk) = if on_cpu {
            (CPU_STEP_TOKENS.max(self.max_batch_size), CPU_STEP_TOKENS)
        } else {
            (SchedulerConfig::DEFAULT.max_batch_tokens, SchedulerConfig::DEFAULT.prefill_chunk)
        };
        SchedulerConfig {
            max_batch_tokens: budget.max_batch_tokens.unwrap_or(tokens),
            prefill_chunk: budget.prefill_chunk.unwrap_or(chunk),
            ..self
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig::DEFAULT
    }
}

impl SchedulerConfig {
    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |name, message| Err(ConfigError::Invalid { name, message });
        let max = MAX_BATCH_SIZE_LIMIT;
        if self.max_batch_size == 0 || self.max_batch_size > max {
            return bad("--max-batch-size", format!("must be between 1 and {max}, got {}", self.max_batch_size));
        }
        if self.max_batch_tokens < self.max_batch_size {
            return bad(
                "--max-batch-tokens",
                format!(
                    "must be at least --max-batch-size {} (one decode token per sequence), got {}",
                    self.max_batch_size, self.max_batch_tokens
                ),
            );
        }
        if self.prefill_chunk == 0 {
            return bad("--prefill-chunk", "must be at least 1, got 0".into());
        }
        if self.max_concurrent_requests == 0 {
            return bad("--max-concurrent-requests", "must be at least 1, got 0".into());
        }
        if self.max_queue == 0 {
            return bad("--max-queue", "must be at least 1, got 0".into());
        }
        Ok(())
    }
}

/// Why a request finished normally: the engine's type (stop, length, stop sequence, cancelled), so a reason reads the
/// same in the engine, the scheduler, logs and metrics.
pub use r1_engine::sampling::FinishReason;

/// New output of one request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delta {
    /// New token ids.
    pub token_ids: Vec<u32>,
    /// New answer text.
    pub text: String,
    /// New reasoning text.
    pub reasoning: String,
    /// Log-probabilities of `token_ids`, when the request asked for them (else empty).
    pub logprobs: Vec<crate::model::TokenLogprobs>,
}

/// The end of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prompt tokens served from the model's prefix cache instead of prefilled.
    pub cached_prompt_tokens: usize,
}

/// What the actor sends on a request's response channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request got a sequence after waiting this long.
    Admitted {
        /// Time in the queue.
        queue_time: Duration,
    },
    /// New tokens.
    Delta(Delta),
    /// Last event of a request that finished.
    Finished(Finished),
    /// Last event of a request that failed.
    Failed(ServeError),
}

/// A request ready for the scheduler (validated and tokenized).
#[derive(Debug)]
pub struct Submission {
    /// Request id (logs, spans).
    pub request_id: String,
    /// `grpc` or `http` (metrics label).
    pub api: &'static str,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Generation settings (a missing seed is filled in).
    pub params: SeqParams,
    /// Fail with DEADLINE_EXCEEDED after this instant.
    pub deadline: Option<Instant>,
    /// The request's span; batch-step spans link to it.
    pub span: tracing::Span,
}

/// Decrements the in-flight count when the request leaves the scheduler (dropped with its [`Entry`]).
#[derive(Debug)]
pub struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request inside the scheduler.
#[derive(Debug)]
pub struct Entry {
    /// Request id.
    pub request_id: String,
    /// Metrics label.
    pub api: &'static str,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Generation settings.
    pub params: SeqParams,
    /// Response channel.
    pub tx: UnboundedSender<Event>,
    /// Deadline, if any.
    pub deadline: Option<Instant>,
    /// Arrival time.
    pub enqueued: Instant,
    /// Request span.
    pub span: tracing::Span,
    /// In-flight slot.
    pub permit: Permit,
    /// Admissions that passed it while it did not fit (see `batcher::MAX_PASSED_OVER`).
    pub passed_over: usize,
}

enum Command {
    Submit(Box<Entry>),
    CancelAll(String),
    /// Cancel what is left and end the actor thread (server shutdown, after the drain).
    Stop,
}

/// Handle to the scheduler actor. Cheap to clone; the actor stops when every handle is dropped and it is idle.
#[derive(Clone)]
pub struct Scheduler {
    tx: UnboundedSender<Command>,
    in_flight: Arc<AtomicUsize>,
    cfg: SchedulerConfig,
    description: ModelDescription,
    frontend: Arc<dyn Frontend>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("cfg", &self.cfg).field("in_flight", &self.in_flight()).finish()
    }
}

impl Scheduler {
    /// Starts the actor thread over `model`.
    pub fn spawn(
        model: Box<dyn Model>,
        cfg: SchedulerConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Scheduler, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let description = model.describe();
        let frontend = model.frontend();
        metrics.kv_cache_capacity_tokens.set(description.kv_capacity_tokens as i64);
        let actor = actor::Actor::new(model, cfg, description.batch_profiles.clone(), metrics.clone());
        let join = std::thread::Builder::new().name("r1-scheduler".into()).spawn(move || actor.run(rx))?;
        let in_flight = Arc::new(AtomicUsize::new(0));
        Ok((Scheduler { tx, in_flight, cfg, description, frontend, metrics }, join))
    }

    /// The model's description.
    pub fn description(&self) -> &ModelDescription {
        &self.description
    }

    /// The model's tokenizer side.
    pub fn frontend(&self) -> Arc<dyn Frontend> {
        self.frontend.clone()
    }

    /// The scheduler's settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Metrics shared with the actor.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Requests queued or running now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Queues a request. Errors: `Overloaded` above `--max-concurrent-requests`, `TooLarge` when the KV cache can
    /// never hold it, `Unavailable` when the actor has stopped. Queue-full is reported on the returned channel.
    pub fn submit(&self, mut s: Submission) -> Result<UnboundedReceiver<Event>, ServeError> {
        let needed = s.prompt.len() + s.params.max_tokens;
        if needed > self.description.kv_capacity_tokens {
            return Err(ServeError::TooLarge { needed, capacity: self.description.kv_capacity_tokens });
        }
        let limit = self.cfg.max_concurrent_requests;
        let taken = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1));
        if let Err(in_flight) = taken {
            return Err(ServeError::Overloaded { limit, in_flight });
        }
        let permit = Permit(self.in_flight.clone());
        if s.params.sampling.seed.is_none() {
            s.params.sampling.seed = Some(rand::random());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let entry = Entry {
            request_id: s.request_id,
            api: s.api,
            prompt: s.prompt,
            params: s.params,
            tx,
            deadline: s.deadline,
            enqueued: Instant::now(),
            span: s.span,
            permit,
            passed_over: 0,
        };
        self.tx
            .send(Command::Submit(Box::new(entry)))
            .map_err(|_| ServeError::Unavailable { reason: "the scheduler has stopped".into() })?;
        Ok(rx)
    }

    /// Ends every queued and running request with `FinishReason::Cancelled` (used after the drain timeout).
    pub fn cancel_all(&self, reason: &str) {
        let _ = self.tx.send(Command::CancelAll(reason.to_string()));
    }

    /// Asks the actor thread to cancel what is left and exit; join the handle from [`Scheduler::spawn`] to wait.
    pub fn stop(&self) {
        let _ = self.tx.send(Command::Stop);
    }
}
