//! The engine's side of the KV pool: which sequence holds which slot and how many budget blocks, the prefix cache
//! (retaining finished sequences, one entry per prefix, copying a cached prefix into a new one, evicting
//! least-recently-used), and making room for a step (evicting retained prefixes, then preempting the youngest
//! sequences).

use std::collections::BTreeMap;

use super::{Engine, Plan, PrefixReuse, Sequence, SequenceId};
use crate::error::{EngineError, Result};
use crate::kv::prefix::{common_prefix, Retained};

impl Engine {
    /// Copies the longest cached prefix of `prompt` into the new sequence `id`'s slot (taking a slot for it);
    /// returns the positions copied (0 when nothing matches or no slot is free). `reuse` rounds the match down.
    pub(super) fn reuse_prefix(&mut self, id: SequenceId, prompt: &[u32], reuse: PrefixReuse) -> usize {
        let limit = reuse.usable(prompt.len().saturating_sub(1));
        let running_best = |seqs: &BTreeMap<SequenceId, Sequence>| {
            seqs.iter()
                .filter(|(sid, _)| **sid != id)
                .filter_map(|(_, s)| {
                    Some((s.slot?, reuse.usable(common_prefix(&s.tokens[..s.cached], prompt).min(limit))))
                })
                .max_by_key(|&(_, n)| n)
        };
        // Only take a slot now when there is something to copy into it.
        let retained = self.prefix.best(prompt);
        let best_before = running_best(&self.seqs).map_or(0, |(_, n)| n).max(retained.map_or(0, |b| reuse.usable(b.1)));
        if best_before == 0 {
            return 0;
        }
        // The entry about to be copied counts as used now, so that taking a slot evicts another.
        if let Some((i, _)) = retained {
            self.prefix.touch(i);
        }
        let Some(slot) = self.alloc_running_slot() else { return 0 };
        if let Some(s) = self.seqs.get_mut(&id) {
            s.slot = Some(slot);
        }
        // Taking the slot may have moved or evicted a retained entry: look again, and take the longer match.
        let from_running = running_best(&self.seqs).unwrap_or((0, 0));
        let (src, n) = match self.prefix.best(prompt) {
            Some((i, m)) if reuse.usable(m) > from_running.1 => {
                self.prefix.touch(i);
                match self.prefix.get(i) {
                    Some(e) => (e.slot, reuse.usable(m)),
                    None => return 0,
                }
            }
            _ => from_running,
        };
        if n == 0 {
            return 0;
        }
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
    pub(super) fn alloc_running_slot(&mut self) -> Option<usize> {
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

    /// Makes slot `slot` free: a retained entry there moves to a free slot. When none is free, the least recently
    /// used entry is evicted first (which may be the one in `slot`): the entry that happens to sit in the slot a
    /// running sequence needs is not for that reason the one to lose.
    fn vacate(&mut self, slot: usize) {
        if !self.prefix.slots().any(|s| s == slot) {
            return;
        }
        if self.pool.first_free().is_none() {
            self.evict_retained();
            if !self.prefix.slots().any(|s| s == slot) {
                return;
            }
        }
        if let Some(f) = self.pool.first_free() {
            if self.pool.move_slot(slot, f).is_ok() {
                self.prefix.moved(slot, f);
                return;
            }
        }
        if let Some(e) = self.prefix.take_slot(slot) {
            self.drop_retained(e);
        }
    }

    /// Evicts the least recently used retained prefix; false when none is left.
    pub(super) fn evict_retained(&mut self) -> bool {
        match self.prefix.evict_lru() {
            Some(e) => {
                self.drop_retained(e);
                true
            }
            None => false,
        }
    }

    /// Frees an evicted retained prefix's slot and blocks.
    fn drop_retained(&mut self, e: Retained) {
        self.free_retained(e);
        self.stats.prefix_evictions += 1;
    }

    /// Gives a retained entry's slot and blocks back (evicted, or covered by another entry).
    fn free_retained(&mut self, e: Retained) {
        self.pool.free(e.slot);
        self.budget.give_back(e.blocks);
    }

    /// Takes `id`'s slot away (compacting the pool when the backend steps in place, so that running slots stay
    /// `0 .. n`) and forgets a kept present that holds it. With `retain` and the prefix cache on, the slot and the
    /// sequence's blocks become a retained prefix; otherwise the slot is freed and the blocks stay with the sequence.
    pub(super) fn release_cache(&mut self, id: SequenceId, retain: bool) {
        if self.kept.as_ref().is_some_and(|k| k.rows.contains(&id)) {
            self.kept = None;
        }
        let Some(seq) = self.seqs.get_mut(&id) else { return };
        let Some(slot) = seq.slot.take() else { return };
        if retain && self.prefix_enabled && seq.cached > 0 {
            let tokens = seq.tokens[..seq.cached].to_vec();
            let blocks = std::mem::take(&mut seq.blocks);
            // An entry the new one covers (or the new one, when covered) holds nothing another does not.
            for e in self.prefix.retain(tokens, slot, blocks) {
                self.free_retained(e);
            }
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
    pub(super) fn preempt(&mut self, id: SequenceId) {
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

    /// Blocks and slots for the plan's rows; preempts the youngest sequences while they are short. Returns the plan
    /// without its preempted rows (`None` when none is left). Gives every row a slot.
    pub(super) fn make_room(&mut self, mut plan: Plan) -> Result<Option<Plan>> {
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
            let slot = if self.seqs[&r.id].slot.is_none() { self.alloc_running_slot() } else { None };
            let seq = self.seqs.get_mut(&r.id).ok_or(EngineError::UnknownSequence { id: r.id.0 })?;
            seq.blocks += need;
            seq.slot = seq.slot.or(slot);
        }
        Ok(Some(plan))
    }
}
