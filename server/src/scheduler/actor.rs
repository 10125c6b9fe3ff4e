//! The actor loop: owns the [`Batcher`] and the model on one OS thread. Each iteration: take commands, drop requests
//! whose client left or whose deadline passed, admit from the queue, run one step, hand out tokens.

use std::sync::Arc;
use std::time::Instant;

use opentelemetry::trace::TraceContextExt;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::batcher::{Batcher, Gone, Plan};
use super::{Command, Delta, Entry, Event, FinishReason, Finished, SchedulerConfig};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::model::{Model, ModelError, PrefixReuse};

pub(super) struct Actor {
    model: Box<dyn Model>,
    batcher: Batcher,
    metrics: Arc<Metrics>,
    kv_capacity: usize,
    /// Set by [`Command::Stop`]: the loop ends after this iteration's commands.
    stopping: bool,
}

impl Actor {
    pub(super) fn new(
        model: Box<dyn Model>,
        cfg: SchedulerConfig,
        profiles: Vec<usize>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let kv_capacity = model.describe().kv_capacity_tokens.max(1);
        Actor { model, batcher: Batcher::new(cfg, profiles), metrics, kv_capacity, stopping: false }
    }

    pub(super) fn run(mut self, mut rx: UnboundedReceiver<Command>) {
        loop {
            if self.batcher.is_idle() {
                match rx.blocking_recv() {
                    Some(c) => self.command(c),
                    None => break,
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.command(c);
            }
            if self.stopping {
                break;
            }
            self.iteration();
        }
        tracing::debug!("scheduler stopped");
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Submit(e) => {
                if let Err(rejected) = self.batcher.push(*e) {
                    let (e, err) = *rejected;
                    self.fail(e, err);
                }
            }
            Command::Stop => {
                self.cancel_all("the scheduler is stopping");
                self.stopping = true;
            }
            Command::CancelAll(reason) => self.cancel_all(&reason),
        }
        self.gauges();
    }

    fn cancel_all(&mut self, reason: &str) {
        if self.batcher.is_idle() {
            return;
        }
        tracing::warn!(%reason, queued = self.batcher.queue.len(), running = self.batcher.running.len(), "cancelling all requests");
        while let Some(e) = self.batcher.queue.pop_front() {
            self.finish(e, FinishReason::Cancelled, 0, 0);
        }
        for a in std::mem::take(&mut self.batcher.running) {
            self.finish(a.entry, FinishReason::Cancelled, a.generated, a.cached_prompt_tokens);
        }
        self.release();
    }

    /// Frees in the model every sequence whose lease was dropped (see `batcher::SeqLease`).
    fn release(&mut self) {
        for seq in self.batcher.take_released() {
            self.model.remove_sequence(seq);
        }
    }

    fn gauges(&self) {
        let m = &self.metrics;
        m.queue_depth.set(self.batcher.queue.len() as i64);
        m.running.set(self.batcher.running.len() as i64);
        let used = self.model.kv_used_tokens();
        m.kv_cache_used_tokens.set(used as i64);
        m.kv_cache_usage_ratio.set(used as f64 / self.kv_capacity as f64);
        let pool = self.model.kv_pool_status();
        m.kv_slots_used.set(pool.slots_used as i64);
        // Counters: add what is new since the last look.
        for (counter, total) in [
            (&m.kv_preemptions, pool.preemptions),
            (&m.kv_recomputed_tokens, pool.recomputed_tokens),
            (&m.prefix_cached_tokens, pool.prefix_cached_tokens),
            (&m.prefix_missed_tokens, pool.prefix_missed_tokens),
            (&m.prefix_evictions, pool.prefix_evictions),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        m.prefix_retained.set(pool.prefix_retained as i64);
        for (state, n) in
            [("running", pool.blocks_running), ("retained", pool.blocks_retained), ("free", pool.blocks_free)]
        {
            m.kv_blocks.get_or_create(&vec![("state", state)]).set(n as i64);
        }
    }

    fn fail(&self, e: Entry, err: ServeError) {
        tracing::info!(parent: &e.span, request_id = %e.request_id, error = %err, "request failed");
        self.metrics.request_done(e.api, err.kind());
        last_event(e, Event::Failed(err));
    }

    fn finish(&self, e: Entry, reason: FinishReason, generated: usize, cached: usize) {
        let outcome = if reason == FinishReason::Cancelled { "cancelled" } else { "ok" };
        self.metrics.request_done(e.api, outcome);
        let done = Finished {
            reason,
            prompt_tokens: e.prompt.len(),
            completion_tokens: generated,
            cached_prompt_tokens: cached,
        };
        last_event(e, Event::Finished(done));
    }

    fn iteration(&mut self) {
        let now = Instant::now();
        for r in self.batcher.prune(now) {
            match r.why {
                Gone::ClientLeft => {
                    tracing::info!(parent: &r.entry.span, request_id = %r.entry.request_id, generated = r.generated, "client left; sequence freed");
                    self.metrics.request_done(r.entry.api, "cancelled");
                }
                Gone::Deadline => {
                    let elapsed_ms = now.duration_since(r.entry.enqueued).as_millis() as u64;
                    self.fail(r.entry, ServeError::DeadlineExceeded { elapsed_ms, generated: r.generated });
                }
            }
        }
        self.release();
        // Admit one request at a time, so that `can_admit` sees the KV reserved by the ones admitted just before
        // (asking for a whole batch at once let two requests that only fit one after the other both in, and the
        // second then failed in add_sequence instead of waiting).
        loop {
            let model = &self.model;
            let mut took = false;
            let admitted = self.batcher.take_admissible(|prompt, max_tokens| {
                !took && model.can_admit(prompt, max_tokens) && {
                    took = true;
                    true
                }
            });
            let Some(mut e) = admitted.into_iter().next() else { break };
            let cfg = self.batcher.config();
            if cfg.exact_prefix && e.params.prefix == PrefixReuse::Longest {
                e.params.prefix = PrefixReuse::ChunkAligned(cfg.prefill_chunk);
            }
            match self.model.add_sequence(&e.prompt, &e.params) {
                Ok(seq) => {
                    let queue_time = now.duration_since(e.enqueued);
                    self.metrics.queue_seconds.observe(queue_time.as_secs_f64());
                    self.metrics.prompt_tokens.inc_by(e.prompt.len() as u64);
                    let _ = e.tx.send(Event::Admitted { queue_time });
                    let cached = self.model.cached_prompt_tokens(seq);
                    if cached > 0 {
                        e.span.record("cached_prompt_tokens", cached);
                    }
                    self.batcher.start(e, seq, now, cached);
                }
                Err(err) => self.fail(e, err.into()),
            }
        }
        let plan = self.batcher.plan();
        if plan.work.is_empty() {
            // Nothing runs and the head of the queue cannot be admitted: it never will be, since nothing will free.
            if self.batcher.running.is_empty() {
                if let Some(e) = self.batcher.queue.pop_front() {
                    let needed = e.prompt.len() + e.params.max_tokens;
                    self.fail(e, ServeError::TooLarge { needed, capacity: self.kv_capacity });
                }
            }
            self.gauges();
            return;
        }
        self.gauges();
        self.step(plan);
        self.gauges();
    }

    fn step(&mut self, plan: Plan) {
        let span = tracing::info_span!(parent: None, "batch_step", batch_size = plan.work.len(), pad_to = plan.pad_to, tokens = plan.tokens);
        for &row in &plan.rows {
            if let Some(a) = self.batcher.running.get(row) {
                span.add_link(a.entry.span.context().span().span_context().clone());
            }
        }
        let _enter = span.enter();
        self.metrics.batch_size.observe(plan.work.len() as f64);
        self.metrics.batch_tokens.observe(plan.tokens as f64);
        let t0 = Instant::now();
        let result = self.model.step(&plan.work, plan.pad_to);
        let now = Instant::now();
        self.metrics.step_seconds.observe(now.duration_since(t0).as_secs_f64());
        let emitted = match result {
            Ok(emitted) => emitted,
            Err(err) => {
                tracing::error!(error = %err, batch_size = plan.work.len(), "model step failed; failing its requests");
                self.metrics.step_errors.inc();
                for w in &plan.work {
                    if let Some(a) = self.batcher.finish(w.seq) {
                        self.fail(a.entry, err.clone().into());
                    }
                }
                self.release();
                return;
            }
        };
        self.batcher.advance(&plan);
        for em in emitted {
            let Some(a) = self.batcher.running.iter_mut().find(|a| a.seq() == em.seq) else { continue };
            a.generated += 1;
            match a.last_token {
                None => self.metrics.time_to_first_token.observe(now.duration_since(a.entry.enqueued).as_secs_f64()),
                Some(t) => self.metrics.inter_token_latency.observe(now.duration_since(t).as_secs_f64()),
            }
            a.first_token.get_or_insert(now);
            a.last_token = Some(now);
            self.metrics.generated_tokens.inc();
            let delta = Delta {
                token_ids: vec![em.token],
                text: em.text,
                reasoning: em.reasoning,
                logprobs: em.logprobs.into_iter().collect(),
            };
            let _ = a.entry.tx.send(Event::Delta(delta));
            if em.finish.is_none() && a.generated >= a.entry.params.max_tokens {
                // The model owns `max_tokens` (see `SeqParams::max_tokens`); one that goes past it is broken, and the
                // request fails saying so rather than being cut silently.
                let message = format!(
                    "the model emitted token {} of a request with max_tokens {}",
                    a.generated, a.entry.params.max_tokens
                );
                if let Some(a) = self.batcher.finish(em.seq) {
                    self.fail(a.entry, ModelError::internal("protocol", message).into());
                }
                continue;
            }
            if let Some(reason) = em.finish {
                if let Some(a) = self.batcher.finish(em.seq) {
                    let e = &a.entry;
                    let prefill_ms =
                        a.first_token.map(|t| t.duration_since(a.admitted).as_millis() as u64).unwrap_or(0);
                    tracing::info!(parent: &e.span, request_id = %e.request_id, reason = reason.as_str(), prompt_tokens = e.prompt.len(),
                        completion_tokens = a.generated, prefill_ms, "request finished");
                    self.finish(a.entry, reason, a.generated, a.cached_prompt_tokens);
                }
            }
        }
        self.release();
    }
}

/// Sends a request's last event after releasing the entry (its in-flight slot and its span): a client that sends its
/// next request at once must find the slot free, and one that shuts the server down at once must find the span closed.
fn last_event(e: Entry, event: Event) {
    let tx = e.tx.clone();
    drop(e);
    let _ = tx.send(event);
}
