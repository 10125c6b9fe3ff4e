//! The engine: an artifact's backend plus per-sequence KV caches, stepped as a batch.
//!
//! The server's scheduler drives it:
//! 1. [`Engine::can_admit`] / [`Engine::add_sequence`] — admission against the KV budget; the
//!    prompt becomes the sequence's *pending* tokens.
//! 2. [`Engine::step`] — one forward pass over a batch. Each [`StepWork`] feeds up to `max_tokens`
//!    of its sequence's pending tokens (a prefill chunk, or the one sampled token when decoding).
//!    Sequences whose pending tokens are all fed get the logits of their last position back.
//! 3. The caller samples (`r1_engine::sampling`) and appends the token with [`Engine::push_token`];
//!    it is pending until the next step feeds it.
//! 4. [`Engine::remove_sequence`] frees the cache and the budget.
//!
//! Batch layout of one step (B rows, P = longest past, S = longest chunk):
//! `past` is right-aligned (left padding), the new chunk starts at column P and is right padded.
//! Padded columns have `attention_mask = 0`. Right padding of the chunk means every padded query
//! still sees at least one real key, so no softmax row is fully masked (no NaN can leak into real
//! rows through padded keys). Position ids of padded slots repeat the last real position.
//!
//! **Invariant:** a failed step changes no sequence: inputs are validated first, the backend runs,
//! outputs are validated, and only then are caches appended.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{Array2, Array4, ArrayViewD};

use crate::backend::{self, Backend, BackendKind, BackendOptions, KeptPresent, KvPair, StepInput};
use crate::error::{EngineError, Result};
use crate::kv::{KvBudget, KvGeometry, SequenceCache};
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
    cache: SequenceCache,
    /// Positions reserved in the budget for this sequence.
    reserved: usize,
}

impl Sequence {
    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }
}

/// An opened artifact that steps batches of sequences. See the module docs for the protocol.
pub struct Engine {
    dir: PathBuf,
    manifest: Manifest,
    backend: Box<dyn Backend>,
    geometry: KvGeometry,
    budget: KvBudget,
    seqs: HashMap<SequenceId, Sequence>,
    next_id: u64,
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
        Ok(Engine::from_backend(dir, manifest, backend, opts.kv_budget_bytes))
    }

    /// Wraps an already opened backend (tests, benches, custom backends).
    pub fn from_backend(
        dir: &Path,
        manifest: Manifest,
        backend: Box<dyn Backend>,
        kv_budget_bytes: Option<u64>,
    ) -> Engine {
        let geometry = KvGeometry::from(&manifest.kv_cache);
        // The host cache is float32 whatever the graph dtype; account for what is actually held.
        let host_bytes_per_token =
            (manifest.kv_cache.computed_bytes_per_token() / manifest.kv_cache.dtype.size()).saturating_mul(4);
        // A backend that takes its own present back as the next step's past keeps the running batch's cache a
        // second time (the runtime's present, float32) next to the host caches: the budget counts both copies.
        let copies = if backend.can_feed_kept() { 2 } else { 1 };
        let bytes_per_token = host_bytes_per_token.saturating_mul(copies) as u64;
        let budget = KvBudget::new(kv_budget_bytes.unwrap_or(DEFAULT_KV_BUDGET_BYTES), bytes_per_token);
        Engine {
            dir: dir.to_path_buf(),
            manifest,
            backend,
            geometry,
            budget,
            seqs: HashMap::new(),
            next_id: 0,
            kept: None,
        }
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

    /// The KV budget (bytes per token, reserved, free).
    pub fn kv_budget(&self) -> &KvBudget {
        &self.budget
    }

    /// Whether a sequence of `tokens` positions (prompt + max new tokens) fits the KV budget now.
    pub fn can_admit(&self, tokens: usize) -> bool {
        tokens <= self.manifest.model.max_position_embeddings && self.budget.can_admit(tokens)
    }

    /// Number of sequences held.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Adds a sequence with `prompt` pending and reserves `prompt.len() + max_new_tokens` positions
    /// of KV budget (its cache is preallocated to that size).
    pub fn add_sequence(&mut self, prompt: &[u32], max_new_tokens: usize) -> Result<SequenceId> {
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
        let limit = self.manifest.model.max_position_embeddings;
        if total > limit {
            return Err(EngineError::InvalidArgument {
                name: "prompt + max_new_tokens".into(),
                message: format!("must be at most max_position_embeddings {limit}, got {total}"),
            });
        }
        self.budget.reserve(total)?;
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        let cache = SequenceCache::with_capacity(self.geometry, total);
        self.seqs.insert(id, Sequence { tokens: prompt.to_vec(), cache, reserved: total });
        Ok(id)
    }

    /// Appends a sampled token; it is fed by the next step that includes this sequence.
    /// Grows the reservation by one position when the sequence outgrows it (if the budget allows).
    pub fn push_token(&mut self, id: SequenceId, token: u32) -> Result<()> {
        let vocab = self.manifest.model.vocab_size;
        let limit = self.manifest.model.max_position_embeddings;
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
                message: format!("must be at most max_position_embeddings {limit}, got {new_len}"),
            });
        }
        if new_len > seq.reserved {
            self.budget.reserve(1)?;
            seq.reserved += 1;
        }
        seq.tokens.push(token);
        Ok(())
    }

    /// All tokens of a sequence (prompt and generated, fed or pending).
    pub fn tokens(&self, id: SequenceId) -> Result<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice()).ok_or(EngineError::UnknownSequence { id: id.0 })
    }

    /// Tokens of a sequence not yet fed to the model.
    pub fn pending_tokens(&self, id: SequenceId) -> Result<usize> {
        self.seqs.get(&id).map(Sequence::pending).ok_or(EngineError::UnknownSequence { id: id.0 })
    }

    /// Positions held in a sequence's KV cache.
    pub fn cached_tokens(&self, id: SequenceId) -> Result<usize> {
        self.seqs.get(&id).map(|s| s.cache.len()).ok_or(EngineError::UnknownSequence { id: id.0 })
    }

    /// Frees a sequence's cache and its budget reservation. Returns false if it was not held.
    pub fn remove_sequence(&mut self, id: SequenceId) -> bool {
        if self.kept.as_ref().is_some_and(|k| k.rows.contains(&id)) {
            self.kept = None;
        }
        match self.seqs.remove(&id) {
            Some(seq) => {
                self.budget.release(seq.reserved);
                true
            }
            None => false,
        }
    }

    /// One forward pass over `work` (distinct sequences, each with pending tokens). Returns the
    /// last-position logits of every sequence whose pending tokens were all fed, in `work` order.
    /// On error no sequence changes.
    ///
    /// When the backend cannot batch prefill chunks that have a past ([`Backend::batches_chunks_with_past`]), the
    /// step runs as several passes: the decode rows together, the first chunks (no past) together, and each later
    /// chunk alone. Every pass runs and is checked before any cache changes.
    pub fn step(&mut self, work: &[StepWork]) -> Result<Vec<StepLogits>> {
        let plan = self.plan(work)?;
        let passes = if self.backend.batches_chunks_with_past() { vec![plan] } else { split_chunks_with_past(plan) };
        let split = passes.len() > 1;
        let mut outputs = Vec::with_capacity(passes.len());
        for pass in passes {
            let out = self.run_pass(&pass)?;
            outputs.push((pass, out));
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

    /// Runs one pass and checks its outputs' shapes; changes no sequence. Feeds the kept present back as the past
    /// when it holds the same rows in the same order, else gathers the host caches into a padded batch.
    fn run_pass(&mut self, plan: &Plan) -> Result<(ndarray::Array3<f32>, KeptPresent)> {
        let kept = self.kept.take_if(|k| {
            self.backend.can_feed_kept()
                && k.rows.len() == plan.rows.len()
                && k.rows.iter().zip(&plan.rows).all(|(id, r)| *id == r.id)
        });
        let input = self.assemble(plan, kept.is_none());
        let (logits, present) = self.backend.run_keep(&input, kept.as_ref().map(|k| &k.present))?;
        drop(kept);
        let (b, s, past) = (plan.rows.len(), plan.seq_len, plan.past_len);
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
        let (keys, values) = present.views()?;
        self.check_present(&keys, &values, b, past + s)?;
        drop((keys, values));
        Ok((logits, present))
    }

    /// Appends a checked pass's new positions to the host caches and returns the logits of the rows it completed.
    fn apply_pass(
        &mut self,
        plan: &Plan,
        logits: &ndarray::Array3<f32>,
        present: KeptPresent,
    ) -> Result<Vec<StepLogits>> {
        let last_only = self.backend.last_position_logits();
        let past = plan.past_len;
        let (keys, values) = present.views()?;
        let mut results = Vec::new();
        for (row, r) in plan.rows.iter().enumerate() {
            let seq = self.seqs.get_mut(&r.id).ok_or(EngineError::UnknownSequence { id: r.id.0 })?;
            // Only this step's new positions are copied to the host cache.
            seq.cache.append_from(&keys, &values, row, past, r.feed)?;
            if r.completes {
                let logits = logits.slice(ndarray::s![row, if last_only { 0 } else { r.feed - 1 }, ..]).to_vec();
                results.push(StepLogits { seq: r.id, logits });
            }
        }
        drop((keys, values));
        if self.backend.can_feed_kept() && plan.rows.iter().all(|r| r.feed == plan.seq_len) {
            self.kept = Some(Kept { rows: plan.rows.iter().map(|r| r.id).collect(), present });
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
            let feed = pending.min(w.max_tokens);
            rows.push(PlanRow { id: w.seq, past: seq.cache.len(), feed, completes: feed == pending });
        }
        Ok(Plan::new(rows))
    }

    /// The step's inputs; the past is gathered from the host caches only when `with_past` (else it is left empty:
    /// the backend takes it from the kept present).
    fn assemble(&self, plan: &Plan, with_past: bool) -> StepInput {
        let (b, s, p) = (plan.rows.len(), plan.seq_len, plan.past_len);
        let g = self.geometry;
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
                    seq.cache.gather_into(row, &mut kv, &mut vv);
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
        let g = self.geometry;
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
