//! Prometheus metrics, all named `r1_*`, served as text on `GET /metrics` of the HTTP port.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Label set of `r1_requests`: `outcome` (`ok` or a [`crate::error::ServeError::kind`]) and `api` (`grpc`, `http`).
pub type OutcomeLabels = Vec<(&'static str, &'static str)>;

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by outcome (`r1_requests_total`).
    pub requests: Family<OutcomeLabels, Counter>,
    /// Requests waiting for a batch slot.
    pub queue_depth: Gauge,
    /// Sequences held by the model.
    pub running: Gauge,
    /// Rows per step.
    pub batch_size: Histogram,
    /// Tokens fed per step.
    pub batch_tokens: Histogram,
    /// Seconds from arrival to admission.
    pub queue_seconds: Histogram,
    /// Seconds from arrival to the first generated token.
    pub time_to_first_token: Histogram,
    /// Seconds between consecutive tokens of a sequence.
    pub inter_token_latency: Histogram,
    /// Seconds per model step.
    pub step_seconds: Histogram,
    /// Tokens generated.
    pub generated_tokens: Counter,
    /// Prompt tokens admitted.
    pub prompt_tokens: Counter,
    /// Steps that failed in the engine.
    pub step_errors: Counter,
    /// KV cache positions reserved.
    pub kv_cache_used_tokens: Gauge,
    /// KV cache capacity in positions.
    pub kv_cache_capacity_tokens: Gauge,
    /// Reserved / capacity.
    pub kv_cache_usage_ratio: Gauge<f64, AtomicU64>,
    /// Sequences whose KV cache was freed to make room (recomputed later).
    pub kv_preemptions: Counter,
    /// Positions recomputed after preemptions.
    pub kv_recomputed_tokens: Counter,
    /// Pool slots (sequences holding a cache) in use.
    pub kv_slots_used: Gauge,
    /// Prompt tokens served from the prefix cache.
    pub prefix_cached_tokens: Counter,
    /// Prompt tokens prefilled (not in the prefix cache).
    pub prefix_missed_tokens: Counter,
    /// Retained prefixes evicted to make room.
    pub prefix_evictions: Counter,
    /// Finished sequences' caches retained for reuse.
    pub prefix_retained: Gauge,
    /// KV budget blocks by state: `running`, `retained` (prefix cache), `free`.
    pub kv_blocks: Family<Vec<(&'static str, &'static str)>, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered under the `r1` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("r1");
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Metrics {
            requests: Family::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            batch_tokens: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            queue_seconds: latency(),
            time_to_first_token: latency(),
            inter_token_latency: latency(),
            step_seconds: latency(),
            generated_tokens: Counter::default(),
            prompt_tokens: Counter::default(),
            step_errors: Counter::default(),
            kv_cache_used_tokens: Gauge::default(),
            kv_cache_capacity_tokens: Gauge::default(),
            kv_cache_usage_ratio: Gauge::default(),
            kv_preemptions: Counter::default(),
            kv_recomputed_tokens: Counter::default(),
            kv_slots_used: Gauge::default(),
            prefix_cached_tokens: Counter::default(),
            prefix_missed_tokens: Counter::default(),
            prefix_evictions: Counter::default(),
            prefix_retained: Gauge::default(),
            kv_blocks: Family::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by outcome", m.requests.clone());
        registry.register("queue_depth", "Requests waiting for a batch slot", m.queue_depth.clone());
        registry.register("running_sequences", "Sequences held by the model", m.running.clone());
        registry.register("batch_size", "Sequences per model step", m.batch_size.clone());
        registry.register("batch_tokens", "Tokens fed per model step", m.batch_tokens.clone());
        registry.register("queue_time_seconds", "Seconds from arrival to admission", m.queue_seconds.clone());
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from arrival to the first token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "inter_token_latency_seconds",
            "Seconds between tokens of a sequence",
            m.inter_token_latency.clone(),
        );
        registry.register("step_duration_seconds", "Seconds per model step", m.step_seconds.clone());
        registry.register("generated_tokens", "Tokens generated", m.generated_tokens.clone());
        registry.register("prompt_tokens", "Prompt tokens admitted", m.prompt_tokens.clone());
        registry.register("step_errors", "Model steps that failed", m.step_errors.clone());
        registry.register(
            "kv_cache_used_tokens",
            "KV cache positions held (whole blocks)",
            m.kv_cache_used_tokens.clone(),
        );
        registry.register(
            "kv_cache_capacity_tokens",
            "KV cache capacity in positions",
            m.kv_cache_capacity_tokens.clone(),
        );
        registry.register(
            "kv_cache_usage_ratio",
            "KV cache positions reserved / capacity",
            m.kv_cache_usage_ratio.clone(),
        );
        registry.register(
            "kv_preemptions",
            "Sequences whose KV cache was freed to make room for others (recomputed later, never failed)",
            m.kv_preemptions.clone(),
        );
        registry.register(
            "kv_recomputed_tokens",
            "KV positions recomputed after preemptions",
            m.kv_recomputed_tokens.clone(),
        );
        registry.register("kv_pool_slots_used", "KV pool slots holding a sequence's cache", m.kv_slots_used.clone());
        registry.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache (hit rate = hit / (hit + miss))",
            m.prefix_cached_tokens.clone(),
        );
        registry.register(
            "prefix_cache_miss_tokens",
            "Prompt tokens prefilled because no cached prefix covered them",
            m.prefix_missed_tokens.clone(),
        );
        registry.register(
            "prefix_cache_evictions",
            "Retained prefixes evicted (least recently used) to make room",
            m.prefix_evictions.clone(),
        );
        registry.register(
            "kv_blocks",
            "KV budget blocks (--kv-block-tokens positions each) by state: running, retained, free",
            m.kv_blocks.clone(),
        );
        registry.register(
            "prefix_cache_retained_sequences",
            "Finished sequences whose KV cache is kept for reuse",
            m.prefix_retained.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts a finished request.
    pub fn request_done(&self, api: &'static str, outcome: &'static str) {
        self.requests.get_or_create(&vec![("api", api), ("outcome", outcome)]).inc();
    }

    /// Count of requests with this api and outcome so far.
    pub fn requests_with(&self, api: &'static str, outcome: &'static str) -> u64 {
        self.requests.get_or_create(&vec![("api", api), ("outcome", outcome)]).get()
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
