//! The queue and batching policy: plain synchronous code, no model, no async. The actor in [`super`] owns one
//! [`Batcher`] and asks it, every iteration, what to drop, whom to admit and what to step.
//!
//! Policy (continuous, iteration-level batching):
//! - every running sequence that is decoding steps every iteration (one token each);
//! - the rest of `max_batch_tokens` goes to prefill chunks (at most `prefill_chunk` per sequence), so a long prompt is
//!   prefilled over several steps and never stalls running decodes. Chunks go **shortest remaining prompt first**,
//!   and a step that has short prompts to prefill (at most `prefill_chunk` left: done in this one chunk) gives chunks
//!   to those only, so a short request's first token does not wait for a step swollen by long prompts' chunks. A
//!   request left without a chunk for [`STARVATION_STEPS`] steps in a row goes first in the next step whatever its
//!   length: a long prompt progresses at least every `STARVATION_STEPS + 1` steps however many short ones arrive;
//! - queued requests join at the next step while there are batch slots and the model says it has room
//!   (`Model::can_admit`: KV blocks for the prompt, not for `max_tokens`). The queue is FIFO, but a request that does
//!   not fit yet is passed by later ones that do, at most [`MAX_PASSED_OVER`] times; after that nothing passes it
//!   until it fits (so a large request waits for room at most that many admissions behind smaller ones);
//! - requests whose client left (response channel closed) or whose deadline passed are dropped first;
//! - the step's batch size is aligned up to the engine's nearest optimization profile (`pad_to`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::{Entry, Event, SchedulerConfig};

/// Steps a prefilling request may be left without a chunk before it goes ahead of shorter prompts.
pub const STARVATION_STEPS: usize = 4;
/// Admissions that may pass a queued request that does not fit yet.
pub const MAX_PASSED_OVER: usize = 16;
use crate::error::ServeError;
use crate::model::{SeqId, Work};

/// A running request's hold on its model sequence (and so on its KV cache). Dropping it, however the request
/// ends (finished, failed, cancelled, client gone, deadline), queues the sequence for release; the actor frees every
/// queued sequence in the model ([`Batcher::take_released`]) before it admits or steps again. No path that ends a
/// request can keep its cache.
#[derive(Debug)]
pub struct SeqLease {
    seq: SeqId,
    released: Arc<Mutex<Vec<SeqId>>>,
}

impl SeqLease {
    /// The model sequence.
    pub fn seq(&self) -> SeqId {
        self.seq
    }
}

impl Drop for SeqLease {
    fn drop(&mut self) {
        // A poisoned lock only means another holder panicked; the list itself is still valid.
        let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        released.push(self.seq);
    }
}

/// Where a running request is. (Before: queued, an [`Entry`] in [`Batcher::queue`]; after: finished with a
/// [`super::FinishReason`] or failed, removed from [`Batcher::running`] and its lease dropped.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Feeding its prompt, `fed` tokens of it so far.
    Prefilling {
        /// Prompt tokens fed.
        fed: usize,
    },
    /// Generating, one token a step.
    Decoding,
}

/// A request that holds a sequence in the model.
#[derive(Debug)]
pub struct Active {
    /// The request.
    pub entry: Entry,
    /// Its sequence in the model, released when this is dropped.
    pub lease: SeqLease,
    /// Prefilling or decoding.
    pub phase: Phase,
    /// Tokens generated so far.
    pub generated: usize,
    /// When it left the queue.
    pub admitted: Instant,
    /// When its first token came out.
    pub first_token: Option<Instant>,
    /// When its latest token came out.
    pub last_token: Option<Instant>,
    /// Steps in a row it was prefilling and got no chunk.
    pub starved_steps: usize,
    /// Prompt tokens the model took from its prefix cache.
    pub cached_prompt_tokens: usize,
}

impl Active {
    /// Its model sequence.
    pub fn seq(&self) -> SeqId {
        self.lease.seq
    }

    /// Still feeding its prompt.
    pub fn prefilling(&self) -> bool {
        matches!(self.phase, Phase::Prefilling { .. })
    }

    /// Prompt tokens still to feed.
    pub fn prompt_left(&self) -> usize {
        match self.phase {
            Phase::Prefilling { fed } => self.entry.prompt.len() - fed,
            Phase::Decoding => 0,
        }
    }
}

/// Why a request was removed before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// Its client went away (response channel closed).
    ClientLeft,
    /// Its deadline passed.
    Deadline,
}

/// A request removed by [`Batcher::prune`]: `seq` is set when it held a model sequence (released with its lease).
#[derive(Debug)]
pub struct Removed {
    /// The request.
    pub entry: Entry,
    /// Its model sequence, if it had been admitted.
    pub seq: Option<SeqId>,
    /// Why.
    pub why: Gone,
    /// Tokens generated before removal.
    pub generated: usize,
}

/// One planned step: which running requests (by index into [`Batcher::running`]) feed how many tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Work items, decodes first.
    pub work: Vec<Work>,
    /// Indices into `running`, parallel to `work`.
    pub rows: Vec<usize>,
    /// Batch size after aligning to the engine's profiles.
    pub pad_to: usize,
    /// Tokens fed in total.
    pub tokens: usize,
}

/// Smallest profile that holds `n` rows (or `n` itself when there are no profiles or none is large enough).
pub fn align_to_profile(n: usize, profiles: &[usize]) -> usize {
    profiles.iter().copied().filter(|&p| p >= n).min().unwrap_or(n)
}

/// Queue and running set.
#[derive(Debug)]
pub struct Batcher {
    cfg: SchedulerConfig,
    profiles: Vec<usize>,
    /// Waiting requests, oldest first.
    pub queue: VecDeque<Entry>,
    /// Requests holding a sequence, in admission order.
    pub running: Vec<Active>,
    /// Sequences whose lease was dropped and that the model has not freed yet.
    released: Arc<Mutex<Vec<SeqId>>>,
}

impl Batcher {
    /// An empty batcher. `max_batch_size` is capped at the largest profile when profiles are given.
    pub fn new(mut cfg: SchedulerConfig, profiles: Vec<usize>) -> Self {
        if let Some(&largest) = profiles.iter().max() {
            cfg.max_batch_size = cfg.max_batch_size.min(largest);
        }
        Batcher { cfg, profiles, queue: VecDeque::new(), running: Vec::new(), released: Arc::default() }
    }

    /// The effective configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request, or hands it back with the error when the queue is full.
    pub fn push(&mut self, entry: Entry) -> Result<(), Box<(Entry, ServeError)>> {
        if self.queue.len() >= self.cfg.max_queue {
            let err = ServeError::QueueFull { limit: self.cfg.max_queue, queued: self.queue.len() };
            return Err(Box::new((entry, err)));
        }
        self.queue.push_back(entry);
        Ok(())
    }

    /// Nothing queued or running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running.is_empty()
    }

    /// Removes requests whose client left or whose deadline passed (queued and running).
    pub fn prune(&mut self, now: Instant) -> Vec<Removed> {
        let why = |tx: &UnboundedSender<Event>, deadline: Option<Instant>| {
            if tx.is_closed() {
                Some(Gone::ClientLeft)
            } else if deadline.is_some_and(|d| d <= now) {
                Some(Gone::Deadline)
            } else {
                None
            }
        };
        let mut removed = Vec::new();
        let mut keep = VecDeque::with_capacity(self.queue.len());
        for e in self.queue.drain(..) {
            match why(&e.tx, e.deadline) {
                Some(w) => removed.push(Removed { entry: e, seq: None, why: w, generated: 0 }),
                None => keep.push_back(e),
            }
        }
        self.queue = keep;
        let mut i = 0;
        while i < self.running.len() {
            let a = &self.running[i];
            match why(&a.entry.tx, a.entry.deadline) {
                Some(w) => {
                    let a = self.running.remove(i);
                    removed.push(Removed { seq: Some(a.seq()), why: w, generated: a.generated, entry: a.entry });
                }
                None => i += 1,
            }
        }
        removed
    }

    /// Takes the queued requests that can start now: while there are batch slots and `fits(prompt, max_tokens)` says
    /// the model has room, oldest first, passing a request that does not fit at most [`MAX_PASSED_OVER`] times (see
    /// the module docs). Prefill budget does not gate admission: each step shares it out ([`Batcher::plan`]).
    pub fn take_admissible(&mut self, mut fits: impl FnMut(usize, usize) -> bool) -> Vec<Entry> {
        let mut slots = self.cfg.max_batch_size.saturating_sub(self.running.len());
        let mut out = Vec::new();
        let mut i = 0;
        while slots > 0 && i < self.queue.len() {
            let e = &self.queue[i];
            if fits(e.prompt.len(), e.params.max_tokens) {
                if let Some(e) = self.queue.remove(i) {
                    out.push(e);
                }
                slots -= 1;
                // Everything it passed was passed once more; one passed often enough stops the passing.
                let mut bound_reached = false;
                for skipped in self.queue.iter_mut().take(i) {
                    skipped.passed_over += 1;
                    bound_reached |= skipped.passed_over >= MAX_PASSED_OVER;
                }
                if bound_reached {
                    break;
                }
                continue;
            }
            if e.passed_over >= MAX_PASSED_OVER {
                break;
            }
            i += 1;
        }
        out
    }

    /// Starts a request that the model accepted as `seq`, `cached` of whose prompt tokens the model already holds
    /// (a prefix-cache hit: only the rest is prefilled).
    pub fn start(&mut self, entry: Entry, seq: SeqId, now: Instant, cached: usize) {
        let lease = SeqLease { seq, released: self.released.clone() };
        let cached = cached.min(entry.prompt.len().saturating_sub(1));
        self.running.push(Active {
            entry,
            lease,
            phase: Phase::Prefilling { fed: cached },
            generated: 0,
            admitted: now,
            first_token: None,
            last_token: None,
            starved_steps: 0,
            cached_prompt_tokens: cached,
        });
    }

    /// The next step: every decoding sequence, then prefill chunks within the token budget, starved requests first,
    /// then shortest remaining prompt first (ties: admission order).
    pub fn plan(&self) -> Plan {
        let mut plan = Plan { work: Vec::new(), rows: Vec::new(), pad_to: 0, tokens: 0 };
        for (i, a) in self.running.iter().enumerate() {
            if !a.prefilling() {
                plan.work.push(Work { seq: a.seq(), tokens: 1 });
                plan.rows.push(i);
                plan.tokens += 1;
            }
        }
        let mut budget = self.cfg.max_batch_tokens.saturating_sub(plan.tokens);
        let mut prefilling: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].prefilling()).collect();
        prefilling.sort_by_key(|&i| {
            let a = &self.running[i];
            (a.starved_steps < STARVATION_STEPS, a.prompt_left(), i)
        });
        let starved = |a: &Active| a.starved_steps >= STARVATION_STEPS;
        let short = |a: &Active| a.prompt_left() <= self.cfg.prefill_chunk;
        let shorts_waiting = prefilling.iter().any(|&i| short(&self.running[i]) && !starved(&self.running[i]));
        for i in prefilling {
            let a = &self.running[i];
            if budget == 0 {
                break;
            }
            if shorts_waiting && !short(a) && !starved(a) {
                continue;
            }
            let chunk = a.prompt_left().min(self.cfg.prefill_chunk).min(budget);
            budget -= chunk;
            plan.work.push(Work { seq: a.seq(), tokens: chunk });
            plan.rows.push(i);
            plan.tokens += chunk;
        }
        plan.pad_to = align_to_profile(plan.work.len(), &self.profiles);
        plan
    }

    /// Records that a planned step ran: prompt chunks count as fed; prefilling requests left out count a starved step.
    pub fn advance(&mut self, plan: &Plan) {
        for (i, a) in self.running.iter_mut().enumerate() {
            if a.prefilling() {
                a.starved_steps = if plan.rows.contains(&i) { 0 } else { a.starved_steps + 1 };
            }
        }
        for (w, &row) in plan.work.iter().zip(&plan.rows) {
            if let Some(a) = self.running.get_mut(row) {
                if let Phase::Prefilling { fed } = a.phase {
                    let fed = fed + w.tokens;
                    a.phase = if fed >= a.entry.prompt.len() { Phase::Decoding } else { Phase::Prefilling { fed } };
                }
            }
        }
    }

    /// Sequences released since the last call (their leases were dropped): the actor frees them in the model.
    pub fn take_released(&self) -> Vec<SeqId> {
        std::mem::take(&mut *self.released.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Removes and returns the running request holding `seq`.
    pub fn finish(&mut self, seq: SeqId) -> Option<Active> {
        let i = self.running.iter().position(|a| a.seq() == seq)?;
        Some(self.running.remove(i))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    use super::*;
    use crate::model::{PrefixReuse, Sampling, SeqParams};
    use crate::scheduler::Permit;

    fn cfg(max_batch_size: usize, max_batch_tokens: usize, prefill_chunk: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_batch_size,
            max_batch_tokens,
            max_queue: 100,
            max_concurrent_requests: 100,
            prefill_chunk,
            exact_prefix: false,
        }
    }

    fn entry(prompt_len: usize, max_tokens: usize, counter: &Arc<AtomicUsize>) -> (Entry, UnboundedReceiver<Event>) {
        let (tx, rx) = unbounded_channel();
        counter.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let sampling = Sampling::greedy();
        let e = Entry {
            request_id: format!("r{prompt_len}"),
            api: "grpc",
            prompt: vec![7; prompt_len],
            params: SeqParams {
                sampling,
                max_tokens,
                stop: vec![],
                ignore_eos: false,
                logprobs: None,
                response_format: None,
                prefix: PrefixReuse::Longest,
            },
            tx,
            deadline: None,
            enqueued: Instant::now(),
            span: tracing::Span::none(),
            permit: Permit(counter.clone()),
            passed_over: 0,
        };
        (e, rx)
    }

    /// Admits everything admissible, giving sequence ids in order.
    fn admit_all(b: &mut Batcher, next: &mut u64) -> usize {
        let taken = b.take_admissible(|_, _| true);
        let n = taken.len();
        for e in taken {
            b.start(e, SeqId(*next), Instant::now(), 0);
            *next += 1;
        }
        n
    }

    #[test]
    fn batch_size_limit_caps_admission() {
        let c = Arc::new(AtomicUsize::new(0));
        let mut b = Batcher::new(cfg(4, 1000, 100), vec![]);
        let mut rxs = Vec::new();
        for _ in 0..10 {
            let (e, rx) = entry(5, 3, &c);
            rxs.push(rx);
            b.push(e).expect("room");
        }
        let mut next = 0;
        assert_eq!(admit_all(&mut b, &mut next), 4);
        assert_eq!(b.queue.len(), 6);
        assert_eq!(admit_all(&mut b, &mut next), 0, "no free slot");
        let p = b.plan();
        assert_eq!(p.work.len(), 4);
        assert_eq!(p.tokens, 20);
    }

    #[test]
    fn queue_limit_rejects_with_limit_and_depth() {
        let c = Arc::new(AtomicUsize::new(0));
        let mut b = Batcher::new(SchedulerConfig { max_queue: 2, ..cfg(4, 100, 10) }, vec![]);
        let (e1, _r1) = entry(1, 1, &c);
        let (e2, _r2) = entry(1, 1, &c);
        let (e3, _r3) = entry(1, 1, &c);
        b.push(e1).expect("room");
        b.push(e2).expect("room");
        let rejected = b.push(e3).expect_err("full");
        assert_eq!(rejected.1, ServeError::QueueFull { limit: 2, queued: 2 });
        drop(rejected);
        assert_eq!(c.load(std::sync::atomic::Ordering::Acquire), 2, "the rejected entry's permit was released");
    }

    #[test]
    fn long_prompt_is_chunked_and_decodes_keep_running() {
        let c = Arc::new(AtomicUsize::new(0));
        let mut b = Batcher::new(cfg(8, 64, 32), vec![]);
        let (short, _r1) = entry(4, 10, &c);
        b.push(short).expect("room");
        let mut next = 0;
        admit_all(&mut b, &mut next);
        let p = b.plan();
        assert_eq!(p.work, vec![Work { seq: SeqId(0), tokens: 4 }]);
        b.advance(&p);
        // The short one now decodes; a 100-token prompt arrives.
        let (long, _r2) = entry(100, 10, &c);
        b.push(long).expect("room");
        admit_all(&mut b, &mut next);
        let mut fed = 0;
        let mut steps = 0;
        while b.running[1].prefilling() {
            let p = b.plan();
            assert_eq!(p.work[0], Work { seq: SeqId(0), tokens: 1 }, "decode runs every step");
            assert!(p.tokens <= 64, "token budget respected: {}", p.tokens);
            assert!(p.work[1].tokens <= 32, "chunk limit respected");
            fed += p.work[1].tokens;
            b.advance(&p);
            steps += 1;
        }
        assert_eq!(fed, 100);
        assert_eq!(steps, 4, "32 + 32 + 32 + 4");
    }

    #[test]
    fn token_budget_is_shared_out_per_step_not_at_admission() {
        let c = Arc::new(AtomicUsize::new(0));
        // Budget 10 tokens, chunk 8: all three are admitted; the step gives 8 to one and 2 to the next.
        let mut b = Batcher::new(cfg(8, 10, 8), vec![]);
        let mut rx = Vec::new();
        for _ in 0..3 {
            let (e, r) = entry(20, 5, &c);
            rx.push(r);
            b.push(e).expect("room");
        }
        let mut next = 0;
        assert_eq!(admit_all(&mut b, &mut next), 3);
        let p = b.plan();
        assert_eq!(p.work.iter().map(|w| w.tokens).collect::<Vec<_>>(), vec![8, 2]);
    }

    #[test]
    fn short_prompts_go_first_and_a_long_one_still_progresses() {
        let c = Arc::new(AtomicUsize::new(0));
        // Budget 40, chunk 32: a 1,000-token prompt is admitted first, then a stream of 16-token prompts keeps coming.
        let mut b = Batcher::new(cfg(64, 40, 32), vec![]);
        let mut rx = Vec::new();
        let (long, r) = entry(1000, 5, &c);
        rx.push(r);
        b.push(long).expect("room");
        let mut next = 0;
        admit_all(&mut b, &mut next);
        let mut long_fed_steps = Vec::new();
        for step in 0..20 {
            for _ in 0..2 {
                let (e, r) = entry(16, 5, &c);
                rx.push(r);
                b.push(e).expect("room");
            }
            admit_all(&mut b, &mut next);
            let p = b.plan();
            let long_chunk = p.work.iter().find(|w| w.seq == SeqId(0)).map_or(0, |w| w.tokens);
            if long_chunk > 0 {
                long_fed_steps.push(step);
            } else {
                // Shorter prompts took the budget, shortest first.
                let chunks: Vec<_> = p.work.iter().filter(|w| w.tokens > 1).map(|w| w.tokens).collect();
                assert!(chunks.iter().all(|&t| t <= 16), "step {step}: {chunks:?}");
            }
            b.advance(&p);
        }
        // Short prompts wait in every step here, so the long one is fed exactly when starved: after STARVATION_STEPS
        // steps without a chunk, every STARVATION_STEPS + 1 steps.
        let gaps: Vec<_> = long_fed_steps.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(long_fed_steps.first(), Some(&STARVATION_STEPS), "{long_fed_steps:?}");
        assert!(gaps.iter().all(|&g| g == STARVATION_STEPS + 1), "long prompt fed at steps {long_fed_steps:?}");
    }

    #[test]
    fn a_request_that_does_not_fit_is_passed_a_bounded_number_of_times() {
        let c = Arc::new(AtomicUsize::new(0));
        let mut b = Batcher::new(cfg(100, 100, 10), vec![]);
        let mut rx = Vec::new();
        let (big, r) = entry(50, 50, &c);
        rx.push(r);
        b.push(big).expect("room");
        for _ in 0..(MAX_PASSED_OVER + 4) {
            let (small, r) = entry(1, 1, &c);
            rx.push(r);
            b.push(small).expect("room");
        }
        let fits = |prompt: usize, max_tokens: usize| prompt + max_tokens < 100;
        let taken = b.take_admissible(fits);
        assert_eq!(taken.len(), MAX_PASSED_OVER, "small requests pass the big one, up to the bound");
        assert_eq!(b.queue.front().map(|e| e.passed_over), Some(MAX_PASSED_OVER));
        assert!(b.take_admissible(fits).is_empty(), "then nothing passes it until it fits");
        assert_eq!(b.take_admissible(|_, _| true).len(), 5, "it goes first once it fits");
    }

    #[test]
    fn closed_and_expired_requests_are_pruned() {
        let c = Arc::new(AtomicUsize::new(0));
        let mut b = Batcher::new(cfg(8, 100, 10), vec![]);
        let (a, ra) = entry(3, 3, &c);
        let (mut d, _rd) = entry(4, 3, &c);
        d.deadline = Some(Instant::now() + Duration::from_millis(5));
        let (q, rq) = entry(5, 3, &c);
        b.push(a).expect("room");
        b.push(d).expect("room");
        let mut next = 0;
        admit_all(&mut b, &mut next);
        b.push(q).expect("room");
        drop(ra); // client of the running request leaves
        drop(rq); // client of the queued request leaves
        let removed = b.prune(Instant::now());
        let mut got: Vec<_> = removed.iter().map(|r| (r.entry.prompt.len(), r.seq, r.why)).collect();
        got.sort_by_key(|g| g.0);
        assert_eq!(got, vec![(3, Some(SeqId(0)), Gone::ClientLeft), (5, None, Gone::ClientLeft)]);
        drop(removed);
        assert_eq!(c.load(std::sync::atomic::Ordering::Acquire), 1, "permits released");
        let removed = b.prune(Instant::now() + Duration::from_millis(10));
        assert_eq!(removed.len(), 1);
        assert_eq!((removed[0].seq, removed[0].why), (Some(SeqId(1)), Gone::Deadline));
        assert!(b.is_idle());
    }

    #[test]
    fn batches_align_to_profiles() {
        assert_eq!(align_to_profile(5, &[1, 2, 4, 8]), 8);
        assert_eq!(align_to_profile(4, &[1, 2, 4, 8]), 4);
        assert_eq!(align_to_profile(9, &[1, 2, 4, 8]), 9);
        assert_eq!(align_to_profile(3, &[]), 3);
        let c = Arc::new(AtomicUsize::new(0));
        let mut b = Batcher::new(cfg(16, 1000, 10), vec![1, 2, 4, 8]);
        assert_eq!(b.config().max_batch_size, 8, "capped at the largest profile");
        let mut rx = Vec::new();
        for _ in 0..5 {
            let (e, r) = entry(2, 2, &c);
            rx.push(r);
            b.push(e).expect("room");
        }
        let mut next = 0;
        admit_all(&mut b, &mut next);
        assert_eq!(b.plan().pad_to, 8);
    }
}
