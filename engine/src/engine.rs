//! The engine: an artifact's backend plus the KV pool (`crate::kv`) that holds every sequence's cache, stepped as a
//! batch.
//!
//! The server's scheduler drives it:
//! 1. [`Engine::can_admit`] / [`Engine::add_sequence`] — admission against the pool (a slot, the prompt's budget
//!    blocks); the prompt becomes the sequence's *pending* tokens, minus the longest prefix already cached (copied
//!    into its slot, [`Engine::prefix_tokens`]).
//! 2. [`Engine::step`] — one forward pass over a batch. Each [`StepWork`] feeds up to `max_tokens`
//!    of its sequence's pending tokens (a prefill chunk, or the one sampled token when decoding).
//!    Sequences whose pending tokens are all fed get the logits of their last position back. The step first takes the
//!    blocks its rows grow into, preempting the youngest sequences when they are short (recomputed later).
//! 3. The caller samples (`r1_engine::sampling`) and appends the token with [`Engine::push_token`];
//!    it is pending until the next step feeds it.
//! 4. [`Engine::remove_sequence`] frees the sequence; with the prefix cache on its slot and blocks are retained for
//!    reuse until evicted.
//!
//! Batch layout of one step (B rows, P = longest past, S = longest chunk): the attention mask is `[B, P + S]`, each
//! row's cached positions right-aligned in the first P columns (left padding), its new chunk from column P, right
//! padded. The host path gathers the past in that layout; the in-place path (`Backend::run_in_place`) feeds only the
//! mask, whose row sums give each row's length. Padded columns have `attention_mask = 0`. Right padding of the chunk
//! means every padded query still sees at least one real key, so no softmax row is fully masked. Position ids of
//! padded slots repeat the last real position.
//!
//! **Invariant:** a failed step changes no sequence: inputs are validated first, the backend runs (writing only
//! beyond each slot's valid positions), outputs are validated, and only then do the slots' lengths advance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array2, Array4, ArrayViewD};

use crate::backend::{self, Backend, BackendKind, BackendOptions, KeptPresent, KvPair, StepInput};
use crate::error::{EngineError, Result};
use crate::kv::prefix::{common_prefix, PrefixCache};
use crate::kv::{KvBudget, KvGeometry, KvPool};
use crate::manifest::Manifest;

/// Default KV budget when [`EngineOptions::kv_budget_bytes`] is `None`: 2 GiB.
pub const DEFAULT_KV_BUDGET_BYTES: u64 = 2 << 30;

/// Logits of one position: `vocab_size` float32 values.
pub type Logits = Vec<f32>;

/// How to open an engine.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// `auto`, `ort` or `tract`.
    pub backend: BackendKind,
    /// Execution provider, threads, GPU target.
    pub backend_options: BackendOptions,
    /// KV cache budget in bytes; `None` means [`DEFAULT_KV_BUDGET_BYTES`].
    pub kv_budget_bytes: Option<u64>,
    /// Slots and budget blocks of the KV pool.
    pub pool: PoolOptions,
}

/// Handle of a sequence held by an [`Engine`]. Never reused within one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

impl std::fmt::Display for SequenceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepWork {
    /// Which sequence.
    pub seq: SequenceId,
    /// Feed at most this many of its pending tokens (>= 1). A decode step has exactly one pending
    /// token; a prefill chunk of `n` tokens uses `max_tokens = n`.
    pub max_tokens: usize,
}

impl StepWork {
    /// Feed everything pending (whole prompt, or the one decode token).
    pub fn all(seq: SequenceId) -> Self {
        StepWork { seq, max_tokens: usize::MAX }
    }
    /// Feed at most `n` pending tokens (a prefill chunk).
    pub fn chunk(seq: SequenceId, n: usize) -> Self {
        StepWork { seq, max_tokens: n }
    }
}

/// Logits for a sequence whose pending tokens were all fed by a step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLogits {
    /// Which sequence.
    pub seq: SequenceId,
    /// Logits of its last fed position.
    pub logits: Logits,
}

#[derive(Debug)]
struct Sequence {
    /// Every token of the sequence: fed ones first, then pending ones.
    tokens: Vec<u32>,
    /// Its slot in the pool; `None` before its first step and while preempted.
    slot: Option<usize>,
    /// Positions held in its slot.
    cached: usize,
    /// Budget blocks held (prompt blocks from admission on, then what its positions occupy).
    blocks: usize,
    /// Positions it had cached when it was preempted: the next step that feeds it recomputes them first.
    recompute: usize,
    /// Prompt positions copied from the prefix cache at admission.
    prefix: usize,
}

impl Sequence {
    fn pending(&self) -> usize {
        self.tokens.len() - self.cached
    }
}

/// How many sequences the pool holds and how the budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    /// Slots: sequences that can hold a cache at once (`r1-serve --max-batch-size`).
    pub slots: usize,
    /// Positions per budget block (`r1-serve --kv-block-tokens`).
    pub block_tokens: usize,
    /// Keep finished sequences' caches and start new sequences from the longest cached prefix of their prompt
    /// (`r1-serve --prefix-cache on|off`).
    pub prefix_cache: bool,
    /// Positions a slot holds: the longest sequence served (prompt + generated), at most the model's
    /// `max_position_embeddings` (`r1-serve --max-context-tokens`; `None`: the model's). It is also the capacity the
    /// in-place attention kernel sizes its per-step scratch by, so it should not be larger than what is served.
    pub max_context: Option<usize>,
}

/// Slots unless told otherwise.
pub const DEFAULT_SLOTS: usize = 64;

/// Largest attention-probability scratch an in-place pass may ask ONNX Runtime's kernel for (its allocation is
/// reserved, not touched, beyond each row's length; this bounds what the allocator must grant).
pub const IN_PLACE_SCRATCH_BYTES: usize = 1 << 31;

/// Context length a slot holds unless told otherwise (capped at the model's `max_position_embeddings`).
pub const DEFAULT_MAX_CONTEXT: usize = 32_768;

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            slots: DEFAULT_SLOTS,
            block_tokens: crate::kv::DEFAULT_BLOCK_TOKENS,
            prefix_cache: true,
            max_context: Some(DEFAULT_MAX_CONTEXT),
        }
    }
}

/// What the pool has done so far (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Sequences whose cache was freed to make room (recomputed later).
    pub preemptions: u64,
    /// Positions recomputed after a preemption.
    pub recomputed_tokens: u64,
    /// Sequences that started from a cached prefix.
    pub prefix_hits: u64,
    /// Prompt positions copied from the prefix cache instead of prefilled.
    pub prefix_cached_tokens: u64,
    /// Prompt positions added without a prefix hit, or after one (to be prefilled).
    pub prefix_missed_tokens: u64,
    /// Retained caches evicted to make room.
    pub prefix_evictions: u64,
}

/// An opened artifact that steps batches of sequences. See the module docs for the protocol.
pub struct Engine {
    dir: PathBuf,
    manifest: Manifest,
    backend: Box<dyn Backend>,
    budget: KvBudget,
    pool: KvPool,
    /// The backend appends new positions into the pool itself ([`Backend::steps_in_place`]).
    in_place: bool,
    seqs: BTreeMap<SequenceId, Sequence>,
    /// Finished sequences' caches kept for reuse (`PoolOptions::prefix_cache`).
    prefix: PrefixCache,
    prefix_enabled: bool,
    next_id: u64,
    stats: PoolStats,
    /// The last step's present, kept in the backend's memory, and the rows it holds (in order). The next step feeds it
    /// back as its past when it runs the same rows in the same order, instead of gathering the host caches.
    kept: Option<Kept>,
}

/// See [`Engine::kept`]: held only when the step that made it fed every row the same number of tokens (no right
/// padding), so its layout is exactly what [`Engine::assemble`] would build from the host caches.
#[derive(Debug)]
struct Kept {
    rows: Vec<SequenceId>,
    present: KeptPresent,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("dir", &self.dir)
            .field("backend", &self.backend.name())
            .field("sequences", &self.seqs.len())
            .field("budget", &self.budget)
            .finish()
    }
}

impl Engine {
    /// Reads `DIR/manifest.json` and opens the backend the options ask for.
    pub fn load(dir: &Path, opts: &EngineOptions) -> Result<Engine> {
        let manifest = Manifest::load(dir)?;
        let backend = backend::load(dir, &manifest, opts.backend, &opts.backend_options)?;
        Engine::with_pool(dir, manifest, backend, opts.kv_budget_bytes, opts.pool)
    }

    /// Wraps an already opened backend (tests, benches, custom backends) with the default pool.
    pub fn from_backend(
        dir: &Path,
        manifest: Manifest,
        backend: Box<dyn Backend>,
        kv_budget_bytes: Option<u64>,
    ) -> Result<Engine> {
        Engine::with_pool(dir, manifest, backend, kv_budget_bytes, PoolOptions::default())
    }

    /// Wraps an already opened backend with a pool of `pool.slots` sequences at full context length each (address
    /// space only: memory is committed as sequences write) and a budget of `kv_budget_bytes`.
    pub fn with_pool(
        dir: &Path,
        manifest: Manifest,
        backend: Box<dyn Backend>,
        kv_budget_bytes: Option<u64>,
        pool: PoolOptions,
    ) -> Result<Engine> {
        let geometry = KvGeometry::from(&manifest.kv_cache);
        let model_max = manifest.model.max_position_embeddings;
        let context = pool.max_context.map_or(model_max, |c| c.min(model_max)).max(1);
        // The pool stores the graph's KV dtype: what a position really takes.
        let pool_bytes_per_token = manifest.kv_cache.computed_bytes_per_token();
        let in_place = backend.steps_in_place();
        // A backend that takes its own present back as the next step's past keeps the running batch's cache a
        // second time (the runtime's present, float32 like the pool: `can_feed_kept` needs a float32 cache) next to the
        // pool: the budget counts both copies.
        let copies = if !in_place && backend.can_feed_kept() { 2 } else { 1 };
        let bytes_per_token = pool_bytes_per_token.saturating_mul(copies) as u64;
        let budget =
            KvBudget::new(kv_budget_bytes.unwrap_or(DEFAULT_KV_BUDGET_BYTES), bytes_per_token, pool.block_tokens);
        let kv_pool = KvPool::new(geometry, pool.slots.max(1), context, manifest.kv_cache.dtype)?;
        Ok(Engine {
            dir: dir.to_path_buf(),
            manifest,
            backend,
            budget,
            pool: kv_pool,
            in_place,
            seqs: BTreeMap::new(),
            prefix: PrefixCache::default(),
            prefix_enabled: pool.prefix_cache,
            next_id: 0,
            stats: PoolStats::default(),
            kept: None,
        })
    }

    /// The artifact's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The artifact directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Backend name for logs and metrics (`ort-cpu`, `tract`, ...).
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// The KV budget (bytes per token, blocks used and free).
    pub fn kv_budget(&self) -> &KvBudget {
        &self.budget
    }

    /// The pool (slots, bytes copied).
    pub fn kv_pool(&self) -> &KvPool {
        &self.pool
    }

    /// The longest sequence (prompt + generated) this engine serves: its pool's slot capacity.
    pub fn context_tokens(&self) -> usize {
        self.pool.capacity()
    }

    /// Preemptions and recomputed positions so far.
    pub fn pool_stats(&self) -> PoolStats {
        self.stats
    }

    /// Whether a new sequence of `prompt_tokens` that may generate `max_new_tokens` should be admitted now: it fits
    /// the context, a slot is free, no preempted sequence is waiting for room, and its prompt's blocks are free with
    /// one block of headroom per running sequence (so that admitting it does not preempt them at once). Its
    /// `max_new_tokens` reserve nothing: sequences take blocks as they grow.
    pub fn can_admit(&self, prompt_tokens: usize, max_new_tokens: usize) -> bool {
        let total = prompt_tokens.saturating_add(max_new_tokens);
        let running = self.seqs.len();
        // Retained prefixes give their slot and blocks back on demand.
        let free_blocks = self.budget.free_blocks() + self.prefix.blocks();
        total <= self.pool.capacity()
            && self.budget.blocks_for(total) <= self.budget.total_blocks()
            && running < self.pool.slots()
            && !self.seqs.values().any(|s| s.recompute > 0)
            && self.budget.blocks_for(prompt_tokens).saturating_add(running) <= free_blocks
    }

    /// Number of sequences held.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Adds a sequence with `prompt` pending and takes its prompt's blocks of the budget. `max_new_tokens` is only
    /// checked against the context length (and the whole budget): generated positions take blocks as they come.
    /// With the prefix cache on, the longest prefix of `prompt` already computed (by a finished or a running
    /// sequence) is copied into its slot and only the rest is pending ([`Engine::prefix_tokens`]).
    pub fn add_sequence(&mut self, prompt: &[u32], max_new_tokens: usize) -> Result<SequenceId> {
        self.add_sequence_with(prompt, max_new_tokens, true)
    }

    /// [`Engine::add_sequence`], with `use_prefix_cache = false` to prefill the whole prompt whatever is cached (for
    /// benchmarks; the sequence's cache is still retained for others when it finishes).
    pub fn add_sequence_with(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        use_prefix_cache: bool,
    ) -> Result<SequenceId> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidArgument {
                name: "prompt".into(),
                message: "must hold at least 1 token, got 0".into(),
            });
        }
        let vocab = self.manifest.model.vocab_size;
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::InvalidArgument {
                name: "prompt".into(),
                message: format!("token ids must be below vocab_size {vocab}, got {t}"),
            });
        }
        let total = prompt.len().saturating_add(max_new_tokens);
        let limit = self.pool.capacity();
        if total > limit {
            return Err(EngineError::InvalidArgument {
                name: "prompt + max_new_tokens".into(),
                message: format!("must be at most the context length {limit} (the model's max_position_embeddings or the served --max-context-tokens, the smaller), got {total}"),
            });
        }
        if self.budget.blocks_for(total) > self.budget.total_blocks() {
            // It could never run to the end, even alone.
            return Err(EngineError::KvBudget {
                requested_bytes: self.budget.bytes_per_token().saturating_mul(total as u64),
                free_bytes: self.budget.free_bytes(),
                budget_bytes: self.budget.budget_bytes(),
            });
        }
        let blocks = self.budget.blocks_for(prompt.len());
        while !self.budget.has_free(blocks) && self.evict_retained() {}
        self.budget.take(blocks)?;
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        let seq = Sequence { tokens: prompt.to_vec(), slot: None, cached: 0, blocks, recompute: 0, prefix: 0 };
        self.seqs.insert(id, seq);
        let reused = if self.prefix_enabled && use_prefix_cache { self.reuse_prefix(id, prompt) } else { 0 };
        self.stats.prefix_missed_tokens += (prompt.len() - reused) as u64;
        Ok(id)
    }

    /// Copies the longest cached prefix of `prompt` into the new sequence `id`'s slot (taking a slot for it);
    /// returns the positions copied (0 when nothing matches or no slot is free).
    fn reuse_prefix(&mut self, id: SequenceId, prompt: &[u32]) -> usize {
        let limit = prompt.len().saturating_sub(1);
        let running_best = |seqs: &BTreeMap<SequenceId, Sequence>| {
            seqs.iter()
                .filter(|(sid, _)| **sid != id)
                .filter_map(|(_, s)| Some((s.slot?, common_prefix(&s.tokens[..s.cached], prompt).min(limit))))
                .max_by_key(|&(_, n)| n)
        };
        // Only take a slot now when there is something to copy into it.
        let best_before =
            running_best(&self.seqs).map_or(0, |(_, n)| n).max(self.prefix.best(prompt).map_or(0, |b| b.1));
        if best_before == 0 {
            return 0;
        }
        let Some(slot) = self.alloc_running_slot() else { return 0 };
        if let Some(s) = self.seqs.get_mut(&id) {
            s.slot = Some(slot);
        }
        // Taking the slot may have moved or evicted a retained entry: look again.
        let from_running = running_best(&self.seqs).filter(|&(_, n)| n > 0);
        let from_retained = self.prefix.best(prompt);
        let (src, n) = match (from_running, from_retained) {
            (Some((s, n)), Some((i, m))) if m > n => {
                self.prefix.touch(i);
                (self.prefix.get(i).map_or(s, |e| e.slot), m)
            }
            (Some(r), _) => r,
            (None, Some((i, m))) => {
                self.prefix.touch(i);
                match self.prefix.get(i) {
                    Some(e) => (e.slot, m),
                    None => return 0,
                }
            }
            (None, None) => return 0,
        };
        if self.pool.copy_prefix(src, slot, n).is_err() {
            return 0;
        }
        if let Some(s) = self.seqs.get_mut(&id) {
            s.cached = n;
            s.prefix = n;
        }
        self.stats.prefix_hits += 1;
        self.stats.prefix_cached_tokens += n as u64;
        n
    }

    /// A free slot for a running sequence, evicting a retained prefix when none is free. A backend that steps in
    /// place keeps running slots at `0 .. n`: the new one is slot `n` (a retained entry there moves up or goes).
    fn alloc_running_slot(&mut self) -> Option<usize> {
        if !self.in_place {
            if let Some(s) = self.pool.alloc() {
                return Some(s);
            }
            self.evict_retained();
            return self.pool.alloc();
        }
        let n = self.seqs.values().filter(|s| s.slot.is_some()).count();
        if n >= self.pool.slots() {
            return None;
        }
        self.vacate(n);
        self.pool.alloc_at(n).then_some(n)
    }

    /// Makes slot `slot` free: a retained entry there moves to a free slot, or is evicted when none is free.
    fn vacate(&mut self, slot: usize) {
        if !self.prefix.slots().any(|s| s == slot) {
            return;
        }
        if let Some(f) = self.pool.first_free() {
            if self.pool.move_slot(slot, f).is_ok() {
                self.prefix.moved(slot, f);
                return;
            }
        }
        if let Some(e) = self.prefix.take_slot(slot) {
            self.pool.free(e.slot);
            self.budget.give_back(e.blocks);
            self.stats.prefix_evictions += 1;
        }
    }

    /// Evicts the least recently used retained prefix; false when none is left.
    fn evict_retained(&mut self) -> bool {
        match self.prefix.evict_lru() {
            Some(e) => {
                self.pool.free(e.slot);
                self.budget.give_back(e.blocks);
                self.stats.prefix_evictions += 1;
                true
            }
            None => false,
        }
    }

    /// Positions of a sequence's prompt that came from the prefix cache.
    pub fn prefix_tokens(&self, id: SequenceId) -> Result<usize> {
        self.seqs.get(&id).map(|s| s.prefix).ok_or(EngineError::UnknownSequence { id: id.0 })
    }

    /// Finished sequences whose caches are kept for reuse.
    pub fn retained_sequences(&self) -> usize {
        self.prefix.len()
    }

    /// Budget blocks held by retained prefixes (given back on demand).
    pub fn retained_blocks(&self) -> usize {
        self.prefix.blocks()
    }

    /// Appends a sampled token; it is fed by the next step that includes this sequence (which takes a block for it
    /// when it needs one).
    pub fn push_token(&mut self, id: SequenceId, token: u32) -> Result<()> {
        let vocab = self.manifest.model.vocab_size;
        let limit = self.pool.capacity();
        let seq = self.seqs.get_mut(&id).ok_or(EngineError::UnknownSequence { id: id.0 })?;
        if token as usize >= vocab {
            return Err(EngineError::InvalidArgument {
                name: "token".into(),
                message: format!("must be below vocab_size {vocab}, got {token}"),
            });
        }
        let new_len = seq.tokens.len() + 1;
        if new_len > limit {
            return Err(EngineError::InvalidArgument {
                name: "sequence length".into(),
                message: format!("must be at most the context length {limit}, got {new_len}"),
            });
        }
        seq.tokens.push(token);
        Ok(())
    }

    /// All tokens of a sequence (prompt and generated, fed or pending).
    pub fn tokens(&self, id: SequenceId) -> Result<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice()).ok_or(EngineError::UnknownSequence { id: id.0 })
    }

    /// Tokens of a sequence not yet fed to the model (after a preemption: all of them).
    pub fn pending_tokens(&self, id: SequenceId) -> Result<usize> {
        self.seqs.get(&id).map(Sequence::pending).ok_or(EngineError::UnknownSequence { id: id.0 })
    }

    /// Positions held in a sequence's KV cache.
    pub fn cached_tokens(&self, id: SequenceId) -> Result<usize> {
        self.seqs.get(&id).map(|s| s.cached).ok_or(EngineError::UnknownSequence { id: id.0 })
    }

    /// Frees a sequence's cache and its blocks. Returns false if it was not held.
    pub fn remove_sequence(&mut self, id: SequenceId) -> bool {
        if !self.seqs.contains_key(&id) {
            return false;
        }
        self.release_cache(id, true);
        if let Some(seq) = self.seqs.remove(&id) {
            self.budget.give_back(seq.blocks);
        }
        true
    }

    /// Takes `id`'s slot away (compacting the pool when the backend steps in place, so that running slots stay
    /// `0 .. n`) and forgets a kept present that holds it. With `retain` and the prefix cache on, the slot and the
    /// sequence's blocks become a retained prefix; otherwise the slot is freed and the blocks stay with the sequence.
    fn release_cache(&mut self, id: SequenceId, retain: bool) {
        if self.kept.as_ref().is_some_and(|k| k.rows.contains(&id)) {
            self.kept = None;
        }
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        let Some(slot) = seq.slot.take() else { return };
        if retain && self.prefix_enabled && seq.cached > 0 {
            let tokens = seq.tokens[..seq.cached].to_vec();
            let blocks = std::mem::take(&mut seq.blocks);
            self.prefix.retain(tokens, slot, blocks);
        } else {
            self.pool.free(slot);
        }
        if !self.in_place {
            return;
        }
        // Move the running sequence in the highest slot down into the hole (one copy of its cache).
        let last = self.seqs.iter().filter_map(|(sid, s)| s.slot.map(|sl| (sl, *sid))).max();
        if let Some((from, sid)) = last.filter(|(from, _)| *from > slot) {
            self.vacate(slot);
            if self.pool.move_slot(from, slot).is_ok() {
                if let Some(s) = self.seqs.get_mut(&sid) {
                    s.slot = Some(slot);
                }
            }
        }
    }

    /// Frees a sequence's cache and blocks to make room; its tokens stay, and the next step that feeds it recomputes
    /// the positions it had before feeding anything new.
    fn preempt(&mut self, id: SequenceId) {
        let holds = self.seqs.get(&id).is_some_and(|s| s.blocks > 0 || s.slot.is_some());
        self.release_cache(id, false);
        if let Some(seq) = self.seqs.get_mut(&id).filter(|_| holds) {
            self.budget.give_back(seq.blocks);
            seq.recompute += seq.cached;
            seq.cached = 0;
            seq.blocks = 0;
            self.stats.preemptions += 1;
            tracing::info!(
                sequence = id.0,
                positions = seq.recompute,
                "KV pool full: sequence preempted (recomputed later)"
            );
        }
    }

    /// One forward pass over `work` (distinct sequences, each with pending tokens). Returns the
    /// last-position logits of every sequence whose pending tokens were all fed, in `work` order.
    /// On error no sequence changes.
    ///
    /// Before running, the step takes the budget blocks and pool slots its rows grow into; when they are short it
    /// preempts the youngest sequences (the step's own rows included: such a row returns nothing this step) until
    /// the rest fits. A preempted sequence named in a later step first recomputes what it had cached, in that step.
    ///
    /// When the backend cannot batch prefill chunks that have a past ([`Backend::batches_chunks_with_past`]), the
    /// step runs as several passes: the decode rows together, the first chunks (no past) together, and each later
    /// chunk alone; a backend that steps in place also splits a pass where its rows' slots are not consecutive.
    /// Every pass runs and is checked before any sequence changes.
    pub fn step(&mut self, work: &[StepWork]) -> Result<Vec<StepLogits>> {
        let plan = self.plan(work)?;
        let Some(plan) = self.make_room(plan)? else { return Ok(Vec::new()) };
        let mut passes =
            if self.backend.batches_chunks_with_past() { vec![plan] } else { split_chunks_with_past(plan) };
        if self.in_place {
            // In place, the kernel's scratch is rows × heads × chunk × slot capacity floats: prompt chunks are batched
            // only while that stays under `IN_PLACE_SCRATCH_BYTES` (else one row a pass), and every pass's rows must
            // hold consecutive slots.
            let per_row = self.scratch_bytes_per_row_token();
            passes = passes.into_iter().flat_map(|p| self.split_in_place(p, per_row)).collect();
        }
        let split = passes.len() > 1;
        let mut outputs = Vec::with_capacity(passes.len());
        for pass in passes {
            let out = if self.in_place {
                self.run_pass_in_place(&pass).map(|l| (l, None))
            } else {
                self.run_pass(&pass).map(|(l, p)| (l, Some(p)))
            };
            // On error nothing has changed: passes write only beyond each slot's valid positions, which advance
            // in `apply_pass` (blocks and slots taken for the step stay with their sequences).
            outputs.push((pass, out?));
        }
        let mut results = Vec::new();
        for (pass, (logits, present)) in outputs {
            results.extend(self.apply_pass(&pass, &logits, present)?);
        }
        if split {
            // Back to `work` order (a split step returns pass by pass).
            results.sort_by_key(|r| work.iter().position(|w| w.seq == r.seq));
        }
        Ok(results)
    }

    /// Blocks and slots for the plan's rows; preempts the youngest sequences while they are short. Returns the plan
    /// without its preempted rows (`None` when none is left). Gives every row a slot.
    fn make_room(&mut self, mut plan: Plan) -> Result<Option<Plan>> {
        loop {
            let need: usize = plan
                .rows
                .iter()
                .map(|r| self.budget.blocks_for(r.past + r.feed).saturating_sub(self.seqs[&r.id].blocks))
                .sum();
            let slots_needed = plan.rows.iter().filter(|r| self.seqs[&r.id].slot.is_none()).count();
            let slots_free = self.pool.slots() - self.pool.used_slots();
            if self.budget.has_free(need) && slots_needed <= slots_free {
                break;
            }
            // Retained prefixes go first, least recently used first.
            if self.evict_retained() {
                continue;
            }
            // The youngest sequence that holds anything, or is in the plan.
            let victim = self
                .seqs
                .iter()
                .rev()
                .find(|(id, s)| s.blocks > 0 || s.slot.is_some() || plan.rows.iter().any(|r| r.id == **id))
                .map(|(id, _)| *id);
            let Some(victim) = victim else {
                return Err(EngineError::KvBudget {
                    requested_bytes: self.budget.block_bytes().saturating_mul(need as u64),
                    free_bytes: self.budget.free_bytes(),
                    budget_bytes: self.budget.budget_bytes(),
                });
            };
            self.preempt(victim);
            plan.rows.retain(|r| r.id != victim);
            if plan.rows.is_empty() {
                return Ok(None);
            }
            plan = Plan::new(plan.rows);
        }
        for r in &plan.rows {
            let need = self.budget.blocks_for(r.past + r.feed).saturating_sub(self.seqs[&r.id].blocks);
            self.budget.take(need)?;
            let seq = self.seqs.get_mut(&r.id).ok_or(EngineError::UnknownSequence { id: r.id.0 })?;
            seq.blocks += need;
        }
        for r in &plan.rows {
            if self.seqs[&r.id].slot.is_none() {
                let slot = self.alloc_running_slot();
                if let Some(s) = self.seqs.get_mut(&r.id) {
                    s.slot = slot;
                }
            }
        }
        Ok(Some(plan))
    }

    /// Bytes of the in-place attention kernel's probability scratch per row and per new token: query heads × slot
    /// capacity × 4 (ONNX Runtime's CPU `GroupQueryAttention` sizes it by the present buffer).
    fn scratch_bytes_per_row_token(&self) -> usize {
        let heads = self.manifest.config.get("num_attention_heads").and_then(serde_json::Value::as_u64).unwrap_or(128);
        (heads as usize).saturating_mul(self.pool.capacity()).saturating_mul(4)
    }

    /// An in-place pass: runs of consecutive slots, each cut so that rows × chunk × `per_row` stays under
    /// [`IN_PLACE_SCRATCH_BYTES`] (a single row always runs).
    fn split_in_place(&self, plan: Plan, per_row: usize) -> Vec<Plan> {
        let mut out = Vec::new();
        for run in self.split_by_slot(plan) {
            let per_row_pass = per_row.saturating_mul(run.seq_len).max(1);
            let rows_per_pass = (IN_PLACE_SCRATCH_BYTES / per_row_pass).max(1);
            let mut rows = run.rows.into_iter().peekable();
            while rows.peek().is_some() {
                out.push(Plan::new(rows.by_ref().take(rows_per_pass).collect()));
            }
        }
        out
    }

    /// Splits a pass into runs of rows whose slots are consecutive (ordered by slot), for in-place stepping.
    fn split_by_slot(&self, plan: Plan) -> Vec<Plan> {
        let mut rows = plan.rows;
        rows.sort_by_key(|r| self.seqs[&r.id].slot);
        let mut out: Vec<Vec<PlanRow>> = Vec::new();
        let mut prev: Option<usize> = None;
        for r in rows {
            let slot = self.seqs[&r.id].slot;
            match (out.last_mut(), prev, slot) {
                (Some(run), Some(p), Some(s)) if s == p + 1 => run.push(r),
                _ => out.push(vec![r]),
            }
            prev = slot;
        }
        out.into_iter().map(Plan::new).collect()
    }

    /// Runs one in-place pass (its rows' slots are consecutive) and checks the logits; the pool's valid lengths do
    /// not change until [`Engine::apply_pass`].
    fn run_pass_in_place(&mut self, plan: &Plan) -> Result<ndarray::Array3<f32>> {
        let first = plan.rows.first().and_then(|r| self.seqs[&r.id].slot).ok_or_else(|| EngineError::Shape {
            name: "pass".into(),
            expected: "rows that hold slots".into(),
            got: "a row without one".into(),
        })?;
        let input = self.assemble(plan, false);
        let logits = self.backend.run_in_place(&input, &mut self.pool, first, plan.rows.len())?;
        self.check_logits(plan, &logits)?;
        Ok(logits)
    }

    /// Runs one pass and checks its outputs' shapes; changes no sequence. Feeds the kept present back as the past
    /// when it holds the same rows in the same order, else gathers the pool's slots into a padded batch.
    fn run_pass(&mut self, plan: &Plan) -> Result<(ndarray::Array3<f32>, KeptPresent)> {
        // Any pass makes an older kept present stale (its rows move on), so it is taken out whether it is used or not.
        let kept = self.kept.take().filter(|k| {
            self.backend.can_feed_kept()
                && k.rows.len() == plan.rows.len()
                && k.rows.iter().zip(&plan.rows).all(|(id, r)| *id == r.id)
        });
        let input = self.assemble(plan, kept.is_none());
        let (logits, present) = self.backend.run_keep(&input, kept.as_ref().map(|k| &k.present))?;
        drop(kept);
        self.check_logits(plan, &logits)?;
        let (keys, values) = present.views()?;
        self.check_present(&keys, &values, plan.rows.len(), plan.past_len + plan.seq_len)?;
        drop((keys, values));
        Ok((logits, present))
    }

    fn check_logits(&self, plan: &Plan, logits: &ndarray::Array3<f32>) -> Result<()> {
        let (b, s) = (plan.rows.len(), plan.seq_len);
        let vocab = self.manifest.model.vocab_size;
        // A serving graph may return each row's last fed position only (`Backend::last_position_logits`).
        let positions = if self.backend.last_position_logits() { 1 } else { s };
        if logits.dim() != (b, positions, vocab) {
            return Err(EngineError::Shape {
                name: "logits".into(),
                expected: format!("[{b}, {positions}, {vocab}]"),
                got: format!("{:?}", logits.shape()),
            });
        }
        Ok(())
    }

    /// Records a checked pass: its new positions join each slot (appended from the present, or already written in
    /// place), and returns the logits of the rows it completed.
    fn apply_pass(
        &mut self,
        plan: &Plan,
        logits: &ndarray::Array3<f32>,
        present: Option<KeptPresent>,
    ) -> Result<Vec<StepLogits>> {
        let last_only = self.backend.last_position_logits();
        let past = plan.past_len;
        let views = present.as_ref().map(KeptPresent::views).transpose()?;
        let mut results = Vec::new();
        for (row, r) in plan.rows.iter().enumerate() {
            let seq = self.seqs.get_mut(&r.id).ok_or(EngineError::UnknownSequence { id: r.id.0 })?;
            let slot = seq.slot.ok_or(EngineError::UnknownSequence { id: r.id.0 })?;
            match &views {
                // Only this step's new positions are copied into the pool.
                Some((keys, values)) => self.pool.append_from(slot, keys, values, row, past, r.feed)?,
                None => self.pool.grow(slot, r.feed)?,
            }
            seq.cached += r.feed;
            if seq.recompute > 0 {
                let redone = seq.recompute.min(r.feed);
                self.stats.recomputed_tokens += redone as u64;
                seq.recompute -= redone;
            }
            if r.completes {
                let logits = logits.slice(ndarray::s![row, if last_only { 0 } else { r.feed - 1 }, ..]).to_vec();
                results.push(StepLogits { seq: r.id, logits });
            }
        }
        drop(views);
        if let Some(present) = present {
            if self.backend.can_feed_kept() && plan.rows.iter().all(|r| r.feed == plan.seq_len) {
                self.kept = Some(Kept { rows: plan.rows.iter().map(|r| r.id).collect(), present });
            }
        }
        Ok(results)
    }

    fn plan(&self, work: &[StepWork]) -> Result<Plan> {
        if work.is_empty() {
            return Err(EngineError::InvalidArgument {
                name: "work".into(),
                message: "must name at least 1 sequence, got 0".into(),
            });
        }
        let mut rows = Vec::with_capacity(work.len());
        for (i, w) in work.iter().enumerate() {
            if work[..i].iter().any(|o| o.seq == w.seq) {
                return Err(EngineError::InvalidArgument {
                    name: "work".into(),
                    message: format!("sequence {} appears more than once", w.seq),
                });
            }
            let seq = self.seqs.get(&w.seq).ok_or(EngineError::UnknownSequence { id: w.seq.0 })?;
            let pending = seq.pending();
            if pending == 0 || w.max_tokens == 0 {
                return Err(EngineError::InvalidArgument {
                    name: "work".into(),
                    message: format!(
                        "sequence {} must feed at least 1 token (pending {pending}, max_tokens {}); push_token first",
                        w.seq, w.max_tokens
                    ),
                });
            }
            // A preempted sequence first recomputes what it had, then feeds what the caller asked for.
            let feed = pending.min(w.max_tokens.saturating_add(seq.recompute));
            rows.push(PlanRow { id: w.seq, past: seq.cached, feed, completes: feed == pending });
        }
        Ok(Plan::new(rows))
    }

    /// The step's inputs; the past is gathered from the pool only when `with_past` (else it is left empty: the
    /// backend takes it from the kept present, or from the pool in place).
    fn assemble(&mut self, plan: &Plan, with_past: bool) -> StepInput {
        let (b, s, p) = (plan.rows.len(), plan.seq_len, plan.past_len);
        let g = self.pool.geometry();
        let p_kv = if with_past { p } else { 0 };
        let mut input_ids = Array2::<i64>::zeros((b, s));
        let mut position_ids = Array2::<i64>::zeros((b, s));
        let mut attention_mask = Array2::<i64>::zeros((b, p + s));
        let layers = if with_past { g.num_layers } else { 0 };
        let mut keys: Vec<Array4<f32>> =
            (0..layers).map(|_| Array4::zeros((b, g.key_heads, p_kv, g.key_dim))).collect();
        let mut values: Vec<Array4<f32>> =
            (0..layers).map(|_| Array4::zeros((b, g.value_heads, p_kv, g.value_dim))).collect();
        {
            let mut kv: Vec<_> = keys.iter_mut().map(|a| a.view_mut()).collect();
            let mut vv: Vec<_> = values.iter_mut().map(|a| a.view_mut()).collect();
            for (row, r) in plan.rows.iter().enumerate() {
                let seq = &self.seqs[&r.id];
                if with_past && r.past > 0 {
                    if let Some(slot) = seq.slot {
                        self.pool.gather_into(slot, row, &mut kv, &mut vv);
                    }
                }
                for c in p - r.past..p + r.feed {
                    attention_mask[[row, c]] = 1;
                }
                let new = &seq.tokens[r.past..r.past + r.feed];
                for (k, &t) in new.iter().enumerate() {
                    input_ids[[row, k]] = i64::from(t);
                    position_ids[[row, k]] = (r.past + k) as i64;
                }
                for k in r.feed..s {
                    position_ids[[row, k]] = (r.past + r.feed - 1) as i64;
                }
            }
        }
        let past =
            keys.into_iter().zip(values).map(|(k, v)| KvPair { key: k.into_dyn(), value: v.into_dyn() }).collect();
        StepInput { input_ids, attention_mask, position_ids, past }
    }

    fn check_present(
        &self,
        keys: &[ArrayViewD<f32>],
        values: &[ArrayViewD<f32>],
        batch: usize,
        total: usize,
    ) -> Result<()> {
        let g = self.pool.geometry();
        if keys.len() != g.num_layers || values.len() != g.num_layers {
            return Err(EngineError::Shape {
                name: "present".into(),
                expected: format!("{} layers", g.num_layers),
                got: format!("{} key and {} value layers", keys.len(), values.len()),
            });
        }
        for (i, (k, v)) in keys.iter().zip(values).enumerate() {
            for (what, t, heads, dim) in [("key", k, g.key_heads, g.key_dim), ("value", v, g.value_heads, g.value_dim)]
            {
                if t.shape() != [batch, heads, total, dim] {
                    return Err(EngineError::Shape {
                        name: crate::manifest::names::present(i, what == "key"),
                        expected: format!("[{batch}, {heads}, {total}, {dim}]"),
                        got: format!("{:?}", t.shape()),
                    });
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct PlanRow {
    id: SequenceId,
    past: usize,
    feed: usize,
    completes: bool,
}

#[derive(Debug)]
struct Plan {
    rows: Vec<PlanRow>,
    past_len: usize,
    seq_len: usize,
}

impl Plan {
    fn new(rows: Vec<PlanRow>) -> Plan {
        let past_len = rows.iter().map(|r| r.past).max().unwrap_or(0);
        let seq_len = rows.iter().map(|r| r.feed).max().unwrap_or(0);
        Plan { rows, past_len, seq_len }
    }
}

/// Splits a step for a backend that cannot batch prefill chunks with a past: one pass for the rows that feed one
/// token, one for the chunks without a past, and one per chunk with a past, in that order (rows keep their order
/// within a pass). A plan that needs no split comes back as it is.
fn split_chunks_with_past(plan: Plan) -> Vec<Plan> {
    // The kernel's limit: several rows, more than one new token, and a past.
    if plan.rows.len() == 1 || plan.seq_len == 1 || plan.past_len == 0 {
        return vec![plan];
    }
    let (decode, chunks): (Vec<PlanRow>, Vec<PlanRow>) = plan.rows.into_iter().partition(|r| r.feed == 1);
    let (first, later): (Vec<PlanRow>, Vec<PlanRow>) = chunks.into_iter().partition(|r| r.past == 0);
    let mut passes = Vec::new();
    for rows in [decode, first] {
        if !rows.is_empty() {
            passes.push(Plan::new(rows));
        }
    }
    passes.extend(later.into_iter().map(|r| Plan::new(vec![r])));
    passes
}
