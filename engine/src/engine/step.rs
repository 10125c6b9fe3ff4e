//! One step: planning the rows, splitting them into passes the backend can run, building each pass's inputs, running
//! it (in place over the pool, or on the host with a gathered past), checking the outputs, and only then advancing
//! every sequence.

use ndarray::{Array2, Array4};

use super::{Engine, Kept, SequenceId, StepLogits, StepWork};
use crate::backend::{KeptPresent, KvPair, StepInput};
use crate::error::{EngineError, Result};

/// Largest attention-probability scratch an in-place pass may ask ONNX Runtime's kernel for (its allocation is
/// reserved, not touched, beyond each row's length; this bounds what the allocator must grant).
pub const IN_PLACE_SCRATCH_BYTES: usize = 1 << 31;

impl Engine {
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

    /// Runs one in-place pass (its rows' slots are consecutive) and checks the logits; the pool's valid lengths do
    /// not change until [`Engine::apply_pass`].
    fn run_pass_in_place(&mut self, plan: &Plan) -> Result<ndarray::Array3<f32>> {
        let first = plan.rows.first().and_then(|r| self.seqs[&r.id].slot).ok_or_else(|| EngineError::Shape {
            name: "pass".into(),
            expected: "rows that hold slots".into(),
            got: "a row without one".into(),
        })?;
        let input = self.assemble(plan, false)?;
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
        let input = self.assemble(plan, kept.is_none())?;
        let (logits, present) = self.backend.run_keep(&input, kept.as_ref().map(|k| &k.present))?;
        drop(kept);
        self.check_logits(plan, &logits)?;
        let (keys, values) = present.shapes()?;
        self.check_present(&keys, &values, plan.rows.len(), plan.past_len + plan.seq_len)?;
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
        // A present bound on the device is not host memory: only this step's new positions are copied out of it
        // (`[batch, heads, seq, dim]`, read from position 0 below), one strided copy per tensor.
        let fresh =
            present.as_ref().and_then(KeptPresent::bound).map(|b| b.positions(past, plan.seq_len)).transpose()?;
        let (views, from) = match (&fresh, &present) {
            (Some(pairs), _) => (
                Some((pairs.iter().map(|p| p.key.view()).collect(), pairs.iter().map(|p| p.value.view()).collect())),
                0,
            ),
            (None, Some(p)) => (Some(p.views()?), past),
            (None, None) => (None, past),
        };
        let mut results = Vec::new();
        for (row, r) in plan.rows.iter().enumerate() {
            let seq = self.seqs.get_mut(&r.id).ok_or(EngineError::UnknownSequence { id: r.id.0 })?;
            let slot = seq.slot.ok_or(EngineError::UnknownSequence { id: r.id.0 })?;
            match &views {
                // Only this step's new positions are copied into the pool.
                Some((keys, values)) => self.pool.append_from(slot, keys, values, row, from, r.feed)?,
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
    fn assemble(&mut self, plan: &Plan, with_past: bool) -> Result<StepInput> {
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
                        self.pool.gather_into(slot, row, &mut kv, &mut vv)?;
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
        Ok(StepInput { input_ids, attention_mask, position_ids, past })
    }

    fn check_present(&self, keys: &[Vec<usize>], values: &[Vec<usize>], batch: usize, total: usize) -> Result<()> {
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
                if t.as_slice() != [batch, heads, total, dim] {
                    return Err(EngineError::Shape {
                        name: crate::manifest::names::present(i, what == "key"),
                        expected: format!("[{batch}, {heads}, {total}, {dim}]"),
                        got: format!("{t:?}"),
                    });
                }
            }
        }
        Ok(())
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
}

#[derive(Debug)]
pub(super) struct PlanRow {
    pub(super) id: SequenceId,
    pub(super) past: usize,
    pub(super) feed: usize,
    pub(super) completes: bool,
}

#[derive(Debug)]
pub(super) struct Plan {
    pub(super) rows: Vec<PlanRow>,
    pub(super) past_len: usize,
    pub(super) seq_len: usize,
}

impl Plan {
    pub(super) fn new(rows: Vec<PlanRow>) -> Plan {
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
