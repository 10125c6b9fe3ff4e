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
//! `make_room` evict them least-recently-used before they preempt any running sequence. An entry whose tokens are a
//! prefix of another's is never kept beside it ([`PrefixCache::retain`]): a conversation's turns, or a prompt and
//! the request that continued it, hold one slot, so the cache's slots hold as many distinct prefixes as they can.

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
    /// Keeps `tokens` (cached in `slot`, holding `blocks`) for reuse, and returns the entries the caller must free
    /// (their slots and blocks): those `tokens` covers (a prefix of it: an earlier turn of the same conversation, the
    /// prompt a continued request was copied from), since any prompt they match, the new entry matches as far; or
    /// the new entry itself when an entry already covers it (that one counts as used now). One slot per prefix, not
    /// one per turn: a cache of N slots keeps N conversations, not N turns of one.
    pub fn retain(&mut self, tokens: Vec<u32>, slot: usize, blocks: usize) -> Vec<Retained> {
        self.clock += 1;
        let covers = |longer: &[u32], shorter: &[u32]| longer.len() >= shorter.len() && longer.starts_with(shorter);
        if let Some(e) = self.entries.iter_mut().find(|e| covers(&e.tokens, &tokens)) {
            e.last_used = self.clock;
            return vec![Retained { tokens, slot, blocks, last_used: self.clock }];
        }
        let (covered, kept) = std::mem::take(&mut self.entries).into_iter().partition(|e| covers(&tokens, &e.tokens));
        self.entries = kept;
        self.entries.push(Retained { tokens, slot, blocks, last_used: self.clock });
        covered
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
        assert!(c.retain(vec![1, 2, 3, 4, 5], 3, 1).is_empty());
        assert!(c.retain(vec![1, 2, 9], 5, 1).is_empty());
        assert!(c.retain(vec![1, 2, 3, 7], 6, 1).is_empty());
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

    #[test]
    fn an_entry_another_covers_gives_its_slot_back() {
        let mut c = PrefixCache::default();
        assert!(c.retain(vec![1, 2, 3], 0, 1).is_empty());
        assert!(c.retain(vec![7, 8], 1, 1).is_empty());
        // A later turn of the first conversation covers it: the first turn's slot comes back.
        let freed = c.retain(vec![1, 2, 3, 4, 5], 2, 2);
        assert_eq!(freed.iter().map(|e| (e.slot, e.blocks)).collect::<Vec<_>>(), vec![(0, 1)]);
        assert_eq!((c.len(), c.blocks()), (2, 3));
        assert_eq!(c.best(&[1, 2, 3, 9]), Some((1, 3)), "the covering entry serves the old prompt as far");
        // A sequence an entry already covers is not kept (its own slot comes back) and the cover counts as used.
        let freed = c.retain(vec![1, 2], 3, 1);
        assert_eq!(freed.iter().map(|e| e.slot).collect::<Vec<_>>(), vec![3]);
        assert_eq!(c.evict_lru().map(|e| e.slot), Some(1), "[7, 8] is now the least recently used");
        // Diverging sequences cover nothing.
        assert!(c.retain(vec![1, 2, 3, 4, 6], 4, 2).is_empty());
        assert_eq!(c.len(), 2);
        // An equal sequence is covered by the entry already there.
        assert_eq!(c.retain(vec![1, 2, 3, 4, 6], 5, 2).iter().map(|e| e.slot).collect::<Vec<_>>(), vec![5]);
    }
}
