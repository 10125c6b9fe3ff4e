//! KV cache: per-sequence buffers and the memory budget that admission control asks.
//!
//! Each sequence owns one [`SequenceCache`]: for every layer a key and a value buffer laid out
//! `[heads, capacity, dim]` (float32 on the host), preallocated to the number of tokens the sequence
//! reserved, so appending a step's new entries never reallocates nor copies the old ones.
//! A batched step gathers the caches into the graph's `[batch, heads, past, dim]` inputs (left
//! padded) and appends only the new positions of `present` back ([`SequenceCache::append_from`]).
//! The gather happens only when the batch composition changes: while the same rows decode step after step, the
//! engine feeds the previous step's present (kept in the backend's memory) back as the past.
//!
//! [`KvBudget`] does the accounting in bytes, using the manifest's `kv_cache.bytes_per_token`
//! (the size of the graph's KV dtype, which is what a device-resident cache occupies).

use ndarray::{ArrayViewD, ArrayViewMut4};

use crate::error::{EngineError, Result};
use crate::manifest::KvCacheInfo;

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

/// One `[heads, capacity, dim]` buffer holding `len` valid positions.
#[derive(Debug, Clone)]
struct HeadBuffer {
    heads: usize,
    dim: usize,
    capacity: usize,
    data: Vec<f32>,
}

impl HeadBuffer {
    fn new(heads: usize, dim: usize, capacity: usize) -> Self {
        HeadBuffer { heads, dim, capacity, data: vec![0.0; heads * capacity * dim] }
    }

    /// Grows to at least `needed` positions, keeping the first `len` of every head.
    fn ensure_capacity(&mut self, needed: usize, len: usize) {
        if needed <= self.capacity {
            return;
        }
        let new_cap = needed.max(self.capacity * 2).max(16);
        let mut data = vec![0.0; self.heads * new_cap * self.dim];
        for h in 0..self.heads {
            let src = &self.data[h * self.capacity * self.dim..][..len * self.dim];
            data[h * new_cap * self.dim..][..len * self.dim].copy_from_slice(src);
        }
        self.data = data;
        self.capacity = new_cap;
    }

    /// Copies the first `len` positions into `dst` (`[heads, >= offset + len, dim]`) at `offset`.
    fn copy_into(&self, len: usize, mut dst: ndarray::ArrayViewMut3<f32>, offset: usize) {
        for h in 0..self.heads {
            let src = &self.data[h * self.capacity * self.dim..][..len * self.dim];
            let mut row = dst.index_axis_mut(ndarray::Axis(0), h);
            match row.as_slice_mut() {
                Some(s) => s[offset * self.dim..][..len * self.dim].copy_from_slice(src),
                None => {
                    for t in 0..len {
                        for d in 0..self.dim {
                            row[[offset + t, d]] = src[t * self.dim + d];
                        }
                    }
                }
            }
        }
    }

    /// Writes `n` positions from `src` (`[heads, T, dim]`, positions `from..from+n`) after `len`.
    fn append(&mut self, len: usize, src: ndarray::ArrayView3<f32>, from: usize, n: usize) {
        for h in 0..self.heads {
            let dst = &mut self.data[h * self.capacity * self.dim..][len * self.dim..][..n * self.dim];
            let head = src.index_axis(ndarray::Axis(0), h);
            match head.as_slice() {
                Some(s) => dst.copy_from_slice(&s[from * self.dim..][..n * self.dim]),
                None => {
                    for t in 0..n {
                        for d in 0..self.dim {
                            dst[t * self.dim + d] = head[[from + t, d]];
                        }
                    }
                }
            }
        }
    }
}

/// The KV cache of one sequence: every layer's keys and values for the positions fed so far.
#[derive(Debug, Clone)]
pub struct SequenceCache {
    geometry: KvGeometry,
    keys: Vec<HeadBuffer>,
    values: Vec<HeadBuffer>,
    len: usize,
}

impl SequenceCache {
    /// An empty cache with room for `capacity` positions before it has to grow.
    pub fn with_capacity(geometry: KvGeometry, capacity: usize) -> Self {
        let keys =
            (0..geometry.num_layers).map(|_| HeadBuffer::new(geometry.key_heads, geometry.key_dim, capacity)).collect();
        let values = (0..geometry.num_layers)
            .map(|_| HeadBuffer::new(geometry.value_heads, geometry.value_dim, capacity))
            .collect();
        SequenceCache { geometry, keys, values, len: 0 }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing has been fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions that fit without reallocating.
    pub fn capacity(&self) -> usize {
        self.keys.first().map_or(usize::MAX, |b| b.capacity)
    }

    /// Copies this cache into row `row` of the batch tensors `keys[layer]` / `values[layer]`
    /// (`[batch, heads, past, dim]`), right-aligned: positions `past - len .. past`.
    pub fn gather_into(&self, row: usize, keys: &mut [ArrayViewMut4<f32>], values: &mut [ArrayViewMut4<f32>]) {
        for (layer, buf) in self.keys.iter().enumerate() {
            let past = keys[layer].shape()[2];
            let dst = keys[layer].index_axis_mut(ndarray::Axis(0), row);
            buf.copy_into(self.len, dst, past - self.len);
        }
        for (layer, buf) in self.values.iter().enumerate() {
            let past = values[layer].shape()[2];
            let dst = values[layer].index_axis_mut(ndarray::Axis(0), row);
            buf.copy_into(self.len, dst, past - self.len);
        }
    }

    /// Appends `n` positions taken from row `row` of `present` tensors (`[batch, heads, T, dim]`,
    /// positions `from .. from + n`). Checks every shape before writing anything, so an error
    /// leaves the cache unchanged.
    pub fn append_from(
        &mut self,
        present_keys: &[ArrayViewD<f32>],
        present_values: &[ArrayViewD<f32>],
        row: usize,
        from: usize,
        n: usize,
    ) -> Result<()> {
        let g = self.geometry;
        check_present("present key", present_keys, g.num_layers, g.key_heads, g.key_dim, row, from + n)?;
        check_present("present value", present_values, g.num_layers, g.value_heads, g.value_dim, row, from + n)?;
        let needed = self.len + n;
        for (bufs, present) in [(&mut self.keys, present_keys), (&mut self.values, present_values)] {
            for (buf, p) in bufs.iter_mut().zip(present) {
                buf.ensure_capacity(needed, self.len);
                let p = p
                    .view()
                    .into_dimensionality::<ndarray::Ix4>()
                    .map_err(|e| shape_err("present", "rank 4", &e.to_string()))?;
                buf.append(self.len, p.index_axis(ndarray::Axis(0), row), from, n);
            }
        }
        self.len = needed;
        Ok(())
    }
}

fn shape_err(name: &str, expected: &str, got: &str) -> EngineError {
    EngineError::Shape { name: name.to_string(), expected: expected.to_string(), got: got.to_string() }
}

fn check_present(
    what: &str,
    tensors: &[ArrayViewD<f32>],
    layers: usize,
    heads: usize,
    dim: usize,
    row: usize,
    min_len: usize,
) -> Result<()> {
    if tensors.len() != layers {
        return Err(shape_err(what, &format!("{layers} layers"), &format!("{} layers", tensors.len())));
    }
    for (i, t) in tensors.iter().enumerate() {
        let s = t.shape();
        if s.len() != 4 || s[0] <= row || s[1] != heads || s[2] < min_len || s[3] != dim {
            return Err(shape_err(
                &format!("{what} of layer {i}"),
                &format!("[>{row}, {heads}, >={min_len}, {dim}]"),
                &format!("{s:?}"),
            ));
        }
    }
    Ok(())
}

/// Memory accounting for the KV cache: a budget in bytes and what is reserved of it.
///
/// The scheduler asks [`KvBudget::can_admit`] before admitting a request; the engine reserves a
/// sequence's tokens when it is added and releases them when it is removed.
#[derive(Debug, Clone)]
pub struct KvBudget {
    budget_bytes: u64,
    bytes_per_token: u64,
    reserved_bytes: u64,
}

impl KvBudget {
    /// A budget of `budget_bytes` for a model whose cache takes `bytes_per_token` per position.
    pub fn new(budget_bytes: u64, bytes_per_token: u64) -> Self {
        KvBudget { budget_bytes, bytes_per_token, reserved_bytes: 0 }
    }

    /// Bytes `tokens` positions take.
    pub fn bytes_for(&self, tokens: usize) -> u64 {
        (tokens as u64).saturating_mul(self.bytes_per_token)
    }

    /// Whether `tokens` more positions fit in what is left of the budget.
    pub fn can_admit(&self, tokens: usize) -> bool {
        self.bytes_for(tokens) <= self.free_bytes()
    }

    /// Reserves `tokens` positions, or says how far over budget that would be.
    pub fn reserve(&mut self, tokens: usize) -> Result<()> {
        let requested_bytes = self.bytes_for(tokens);
        if requested_bytes > self.free_bytes() {
            return Err(EngineError::KvBudget {
                requested_bytes,
                free_bytes: self.free_bytes(),
                budget_bytes: self.budget_bytes,
            });
        }
        self.reserved_bytes += requested_bytes;
        Ok(())
    }

    /// Gives back `tokens` positions reserved earlier.
    pub fn release(&mut self, tokens: usize) {
        self.reserved_bytes = self.reserved_bytes.saturating_sub(self.bytes_for(tokens));
    }

    /// The configured budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Bytes reserved now.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved_bytes
    }

    /// Bytes still free.
    pub fn free_bytes(&self) -> u64 {
        self.budget_bytes.saturating_sub(self.reserved_bytes)
    }

    /// Bytes per cached position (all layers, keys and values).
    pub fn bytes_per_token(&self) -> u64 {
        self.bytes_per_token
    }

    /// How many more positions fit.
    pub fn free_tokens(&self) -> usize {
        if self.bytes_per_token == 0 {
            return usize::MAX;
        }
        usize::try_from(self.free_bytes() / self.bytes_per_token).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array4, ArrayD};

    fn geom() -> KvGeometry {
        KvGeometry { key_heads: 2, key_dim: 3, value_heads: 1, value_dim: 4, num_layers: 2 }
    }

    fn present(batch: usize, heads: usize, t: usize, dim: usize, base: f32) -> ArrayD<f32> {
        Array4::from_shape_fn((batch, heads, t, dim), |(b, h, p, d)| base + (b * 1000 + h * 100 + p * 10 + d) as f32)
            .into_dyn()
    }

    #[test]
    fn budget_reserve_release_and_refusal() {
        let mut b = KvBudget::new(1000, 100);
        assert!(b.can_admit(10));
        assert!(!b.can_admit(11));
        b.reserve(7).unwrap();
        assert_eq!(b.free_bytes(), 300);
        assert_eq!(b.free_tokens(), 3);
        let err = b.reserve(4).unwrap_err();
        assert_eq!(err.kind(), "resource_exhausted");
        assert!(err.to_string().contains("400 bytes requested, 300 of 1000"), "{err}");
        b.release(7);
        assert_eq!(b.reserved_bytes(), 0);
        assert!(b.can_admit(10));
    }

    #[test]
    fn append_then_gather_right_aligned_and_grows() {
        let g = geom();
        let mut c = SequenceCache::with_capacity(g, 2);
        // Step 1: row 1 of a batch-2 present with T = 3; the last 2 positions are ours.
        let pk: Vec<_> = (0..2).map(|l| present(2, 2, 3, 3, l as f32 * 0.5)).collect();
        let pv: Vec<_> = (0..2).map(|l| present(2, 1, 3, 4, 7.0 + l as f32)).collect();
        let kv: Vec<_> = pk.iter().map(|a| a.view()).collect();
        let vv: Vec<_> = pv.iter().map(|a| a.view()).collect();
        c.append_from(&kv, &vv, 1, 1, 2).unwrap();
        // Step 2: one more position, forces growth beyond capacity 2.
        let pk2: Vec<_> = (0..2).map(|_| present(1, 2, 1, 3, 50_000.0)).collect();
        let pv2: Vec<_> = (0..2).map(|_| present(1, 1, 1, 4, 60_000.0)).collect();
        let kv2: Vec<_> = pk2.iter().map(|a| a.view()).collect();
        let vv2: Vec<_> = pv2.iter().map(|a| a.view()).collect();
        c.append_from(&kv2, &vv2, 0, 0, 1).unwrap();
        assert_eq!(c.len(), 3);
        assert!(c.capacity() >= 3);

        // Gather into past length 5, row 0: positions 2..5 hold ours, 0..2 stay zero.
        let mut keys: Vec<Array4<f32>> = (0..2).map(|_| Array4::zeros((1, 2, 5, 3))).collect();
        let mut vals: Vec<Array4<f32>> = (0..2).map(|_| Array4::zeros((1, 1, 5, 4))).collect();
        {
            let mut kviews: Vec<_> = keys.iter_mut().map(|a| a.view_mut()).collect();
            let mut vviews: Vec<_> = vals.iter_mut().map(|a| a.view_mut()).collect();
            c.gather_into(0, &mut kviews, &mut vviews);
        }
        for l in 0..2 {
            for h in 0..2 {
                for d in 0..3 {
                    assert_eq!(keys[l][[0, h, 0, d]], 0.0);
                    assert_eq!(keys[l][[0, h, 1, d]], 0.0);
                    for p in 0..2 {
                        assert_eq!(keys[l][[0, h, 2 + p, d]], pk[l][[1, h, 1 + p, d]]);
                    }
                    assert_eq!(keys[l][[0, h, 4, d]], pk2[l][[0, h, 0, d]]);
                }
            }
            for d in 0..4 {
                assert_eq!(vals[l][[0, 0, 3, d]], pv[l][[1, 0, 2, d]]);
                assert_eq!(vals[l][[0, 0, 4, d]], pv2[l][[0, 0, 0, d]]);
            }
        }
    }

    #[test]
    fn append_with_wrong_shape_changes_nothing() {
        let g = geom();
        let mut c = SequenceCache::with_capacity(g, 4);
        let pk: Vec<_> = (0..2).map(|_| present(1, 2, 2, 3, 0.0)).collect();
        let bad_v: Vec<_> = (0..2).map(|_| present(1, 1, 2, 5, 0.0)).collect();
        let kv: Vec<_> = pk.iter().map(|a| a.view()).collect();
        let vv: Vec<_> = bad_v.iter().map(|a| a.view()).collect();
        let err = c.append_from(&kv, &vv, 0, 0, 2).unwrap_err();
        assert_eq!(err.kind(), "shape");
        assert_eq!(c.len(), 0);
    }
}
