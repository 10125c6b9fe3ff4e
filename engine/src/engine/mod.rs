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

mod slots;
mod step;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::backend::{self, Backend, BackendKind, BackendOptions, KeptPresent};
use crate::error::{EngineError, Result};
use crate::kv::prefix::PrefixCache;
use crate::kv::{KvBudget, KvGeometry, KvPool};
use crate::manifest::Manifest;

use step::Plan;
pub use step::IN_PLACE_SCRATCH_BYTES;

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

/// How a new sequence may start from the prefix cache ([`Engine::add_sequence_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixReuse {
    /// Prefill the whole prompt.
    Off,
    /// Copy the longest cached prefix (all but the last prompt token at most).
    Longest,
    /// The longest cached prefix rounded down to a multiple of this many positions: with the caller's prefill
    /// chunk, every position the sequence computes is computed in the same chunk as without the cache, so a
    /// request run alone gives bit-identical logits with the cache on and off (`r1-serve --prefix-cache exact`).
    /// Up to `n - 1` cached positions are recomputed.
    ChunkAligned(usize),
}

impl PrefixReuse {
    /// `n` cached positions usable under this rule.
    pub fn usable(self, n: usize) -> usize {
        match self {
            PrefixReuse::Off => 0,
            PrefixReuse::Longest => n,
            PrefixReuse::ChunkAligned(c) => n / c.max(1) * c.max(1),
        }
    }
}

/// Slots unless told otherwise.
pub const DEFAULT_SLOTS: usize = 64;

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
        // The pool stores the graph's KV dtype (the serving graph's, when it has its own): what a position really
        // takes.
        let dtype = backend.kv_cache_dtype().unwrap_or(manifest.kv_cache.dtype);
        let device = backend.kv_pool_device();
        let kv_pool = KvPool::new_on(geometry, pool.slots.max(1), context, dtype, device)?;
        if device != crate::kv::PoolDevice::Host {
            tracing::info!(
                %device,
                slots = pool.slots.max(1),
                context,
                mib = (kv_pool.bytes_per_position() * pool.slots.max(1) * context) as f64 / f64::from(1 << 20),
                "KV pool allocated on the GPU in full (slots x context x bytes per position)"
            );
        }
        let pool_bytes_per_token = kv_pool.bytes_per_position();
        let in_place = backend.steps_in_place();
        // A backend that takes its own present back as the next step's past keeps the running batch's cache a
        // second time (the runtime's present, float32 like the pool: `can_feed_kept` needs a float32 cache) next to the
        // pool: the budget counts both copies.
        let copies = if !in_place && backend.can_feed_kept() { 2 } else { 1 };
        let bytes_per_token = pool_bytes_per_token.saturating_mul(copies) as u64;
        let budget =
            KvBudget::new(kv_budget_bytes.unwrap_or(DEFAULT_KV_BUDGET_BYTES), bytes_per_token, pool.block_tokens);
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

    /// The row counts whose decode steps the backend ran at fixed shapes (CUDA graphs on the CUDA provider).
    pub fn fixed_decode_shapes(&self) -> Vec<usize> {
        self.backend.fixed_decode_shapes()
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
        self.add_sequence_with(prompt, max_new_tokens, PrefixReuse::Longest)
    }

    /// [`Engine::add_sequence`], choosing how the prompt may start from the prefix cache ([`PrefixReuse`]; `Off`
    /// prefills the whole prompt whatever is cached, for benchmarks: the sequence's cache is still retained for
    /// others when it finishes).
    pub fn add_sequence_with(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        reuse: PrefixReuse,
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
        let reused = if self.prefix_enabled { self.reuse_prefix(id, prompt, reuse) } else { 0 };
        self.stats.prefix_missed_tokens += (prompt.len() - reused) as u64;
        Ok(id)
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
}
