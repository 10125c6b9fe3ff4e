//! Prefix cache: finished sequences' caches kept in their pool slots, and the longest-prefix lookup that lets a new
//! sequence start from positions already computed (by a finished sequence or a running one).
//!
//! **Granularity and sharing.** A slot is one sequence's (the in-place kernels need each row's positions contiguous,
//! see `docs/kv-cache-pool.md`), so a hit is *copied* into the new sequence's slot: one memory copy of the prefix's
//! positions (e.g. 1,024 positions of the 1.5B shape's float32 cache, 57 MB: milliseconds) instead of a prefill
//! (seconds on a CPU). Nothing is shared by reference, so there is no copy-on-write and no reference count to get
//! wrong; the price is that a prefix used by many running sequences is held once per sequence.
//!
//! **Lookup.** A scan over the retained entries and the running sequences, comparing token ids: exact (no hash
//! collisions to guard against) and cheap at the sizes a pool holds (slots × prompt length comparisons, e.g. 64 ×
//! 4,096 = 262,144 compares per admission, well under a millisecond), so no index is kept in step with the slots.
//! Matches are whole positions (no block rounding is needed to copy), and at least one prompt token is always left
//! to feed, so the step that completes the prompt returns its logits.
//!
//! **Eviction.** Retained entries hold their slot and their blocks of the budget; admission and [`crate::Engine`]'s
//! `make_room` evict them least-recently-used before they preempt any running sequence.

/// A finished sequence's cache, kept for reuse.
#[derive(Debug, Clone)]
pub struct Retained {
    /// The token ids of its cached positions.
    pub tokens: Vec<u32>,
    /// The pool slot holding them (positions `0 .. tokens.len()`).
    pub slot: usize,
    /// Budget blocks it holds.
    pub blocks: usize,
    /// Logical time of its last use (admission that copied from it, or its retention).
    pub last_used: u64,
}

/// The retained entries, least recently used first out.
#[derive(Debug, Default)]
pub struct PrefixCache {
    entries: Vec<Retained>,
    clock: u64,
}

/// Tokens `a` and `b` share from the start.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// Keeps `tokens` (cached in `slot`, holding `blocks`) for reuse.
    pub fn retain(&mut self, tokens: Vec<u32>, slot: usize, blocks: usize) {
        self.clock += 1;
        self.entries.push(Retained { tokens, slot, blocks, last_used: self.clock });
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Blocks held by retained entries (reclaimable).
    pub fn blocks(&self) -> usize {
        self.entries.iter().map(|e| e.blocks).sum()
    }

    /// The entry with the longest prefix of `prompt` (at most `prompt.len() - 1` positions): its index and length.
    pub fn best(&self, prompt: &[u32]) -> Option<(usize, usize)> {
        let limit = prompt.len().saturating_sub(1);
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit)))
            .filter(|&(_, n)| n > 0)
            .max_by_key(|&(i, n)| (n, self.entries[i].last_used))
    }

    /// Marks entry `i` used now.
    pub fn touch(&mut self, i: usize) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(i) {
            e.last_used = self.clock;
        }
    }

    /// The entry at `i`.
    pub fn get(&self, i: usize) -> Option<&Retained> {
        self.entries.get(i)
    }

    /// Removes and returns the least recently used entry.
    pub fn evict_lru(&mut self) -> Option<Retained> {
        let i = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i)?;
        Some(self.entries.swap_remove(i))
    }

    /// Removes and returns the entry in `slot`, if one is there.
    pub fn take_slot(&mut self, slot: usize) -> Option<Retained> {
        let i = self.entries.iter().position(|e| e.slot == slot)?;
        Some(self.entries.swap_remove(i))
    }

    /// Moves the entry in slot `from` to slot `to` (after the pool moved its positions).
    pub fn moved(&mut self, from: usize, to: usize) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.slot == from) {
            e.slot = to;
        }
    }

    /// Slots held by retained entries.
    pub fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        self.entries.iter().map(|e| e.slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_match_is_the_longest_then_the_most_recent_and_leaves_one_token() {
        let mut c = PrefixCache::default();
        c.retain(vec![1, 2, 3, 4, 5], 3, 1);
        c.retain(vec![1, 2, 9], 5, 1);
        c.retain(vec![1, 2, 3, 7], 6, 1);
        assert_eq!(c.best(&[1, 2, 3, 4, 5, 6]), Some((0, 5)));
        // The whole prompt is cached: one token is left to feed.
        assert_eq!(c.best(&[1, 2, 3, 4, 5]), Some((0, 4)));
        // A tie on length goes to the most recently used.
        assert_eq!(c.best(&[1, 2, 3, 8]), Some((2, 3)));
        c.touch(0);
        assert_eq!(c.best(&[1, 2, 3, 8]), Some((0, 3)));
        assert_eq!(c.best(&[9, 9]), None);
        assert_eq!(c.best(&[1]), None, "a one-token prompt has nothing to skip");
        // LRU: entry 1 (slot 5) is the oldest untouched.
        assert_eq!(c.evict_lru().map(|e| e.slot), Some(5));
        assert_eq!(c.blocks(), 2);
        c.moved(6, 2);
        assert_eq!(c.take_slot(2).map(|e| e.tokens), Some(vec![1, 2, 3, 7]));
        assert_eq!(c.len(), 1);
    }
}
