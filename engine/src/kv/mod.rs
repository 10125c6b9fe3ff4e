//! KV cache: the pool that holds every sequence's cache ([`pool::KvPool`]) and the budget that admission and
//! preemption ask ([`KvBudget`]).
//!
//! The budget counts what sequences hold, not what they might need: a sequence holds
//! `ceil(positions / block_tokens)` blocks of `block_tokens × bytes_per_token` bytes and takes a new block when it
//! grows into one, so a request's `max_tokens` reserves nothing up front. When a step needs more blocks than are free,
//! the engine preempts the youngest sequences (frees their cache and recomputes it later); see `crate::engine`.
//! `bytes_per_token` is the pool's real size per position (in the graph's KV dtype, every layer's keys and values,
//! counted once).

pub mod device;
pub mod pool;
pub mod prefix;
pub mod region;

use crate::error::{EngineError, Result};

use crate::manifest::KvCacheInfo;
pub use device::PoolDevice;
pub use pool::KvPool;

/// Shape of one layer's key or value cache for a single sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    /// Heads of the key tensor.
    pub key_heads: usize,
    /// Last-axis size of the key tensor.
    pub key_dim: usize,
    /// Heads of the value tensor.
    pub value_heads: usize,
    /// Last-axis size of the value tensor.
    pub value_dim: usize,
    /// Number of layers.
    pub num_layers: usize,
}

impl From<&KvCacheInfo> for KvGeometry {
    fn from(kv: &KvCacheInfo) -> Self {
        KvGeometry {
            key_heads: kv.key_heads,
            key_dim: kv.key_dim,
            value_heads: kv.value_heads,
            value_dim: kv.value_dim,
            num_layers: kv.num_layers,
        }
    }
}

/// Memory accounting for the KV pool, in blocks of `block_tokens` positions.
#[derive(Debug, Clone)]
pub struct KvBudget {
    budget_bytes: u64,
    bytes_per_token: u64,
    block_tokens: usize,
    total_blocks: usize,
    used_blocks: usize,
}

/// Positions per budget block unless the engine is told otherwise.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

impl KvBudget {
    /// A budget of `budget_bytes` for a pool whose positions take `bytes_per_token` each, counted in blocks of
    /// `block_tokens` (>= 1) positions.
    pub fn new(budget_bytes: u64, bytes_per_token: u64, block_tokens: usize) -> Self {
        let block_tokens = block_tokens.max(1);
        let block_bytes = bytes_per_token.saturating_mul(block_tokens as u64).max(1);
        let total_blocks = usize::try_from(budget_bytes / block_bytes).unwrap_or(usize::MAX);
        KvBudget { budget_bytes, bytes_per_token, block_tokens, total_blocks, used_blocks: 0 }
    }

    /// Blocks that `tokens` positions occupy.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Whether `blocks` more blocks are free.
    pub fn has_free(&self, blocks: usize) -> bool {
        blocks <= self.free_blocks()
    }

    /// Takes `blocks` blocks, or says how far over budget that would be (and takes none).
    pub fn take(&mut self, blocks: usize) -> Result<()> {
        if !self.has_free(blocks) {
            return Err(EngineError::KvBudget {
                requested_bytes: self.block_bytes().saturating_mul(blocks as u64),
                free_bytes: self.free_bytes(),
                budget_bytes: self.budget_bytes,
            });
        }
        self.used_blocks += blocks;
        Ok(())
    }

    /// Gives back `blocks` blocks taken earlier.
    pub fn give_back(&mut self, blocks: usize) {
        self.used_blocks = self.used_blocks.saturating_sub(blocks);
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> u64 {
        self.bytes_per_token.saturating_mul(self.block_tokens as u64)
    }

    /// Positions per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// The configured budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Blocks the budget holds.
    pub fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    /// Blocks held by sequences now.
    pub fn used_blocks(&self) -> usize {
        self.used_blocks
    }

    /// Blocks still free.
    pub fn free_blocks(&self) -> usize {
        self.total_blocks.saturating_sub(self.used_blocks)
    }

    /// Bytes held by sequences now (whole blocks).
    pub fn reserved_bytes(&self) -> u64 {
        self.block_bytes().saturating_mul(self.used_blocks as u64)
    }

    /// Bytes still free (whole blocks).
    pub fn free_bytes(&self) -> u64 {
        self.block_bytes().saturating_mul(self.free_blocks() as u64)
    }

    /// Bytes per cached position (all layers, keys and values).
    pub fn bytes_per_token(&self) -> u64 {
        self.bytes_per_token
    }

    /// How many more positions fit.
    pub fn free_tokens(&self) -> usize {
        self.free_blocks().saturating_mul(self.block_tokens)
    }

    /// Positions the whole budget holds.
    pub fn capacity_tokens(&self) -> usize {
        self.total_blocks.saturating_mul(self.block_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_counts_whole_blocks_and_refuses_beyond() {
        let mut b = KvBudget::new(1000, 10, 16); // blocks of 160 bytes: 6 of them
        assert_eq!((b.total_blocks(), b.blocks_for(0), b.blocks_for(16), b.blocks_for(17)), (6, 0, 1, 2));
        b.take(4).unwrap();
        assert_eq!((b.free_blocks(), b.free_tokens(), b.reserved_bytes()), (2, 32, 640));
        let err = b.take(3).unwrap_err();
        assert_eq!(err.kind(), "resource_exhausted");
        assert!(err.to_string().contains("480 bytes requested, 320 of 1000"), "{err}");
        assert_eq!(b.used_blocks(), 4);
        b.give_back(4);
        assert!(b.has_free(6) && !b.has_free(7));
    }
}
