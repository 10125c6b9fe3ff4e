//! The KV pool: every running sequence's cache, in one place, allocated once at load.
//!
//! Per layer, one key and one value tensor `[slots, heads, capacity, dim]` in the graph's KV dtype (float32 or
//! float16: no float32 mirror of a float16 cache), each an anonymous mapping
//! ([`super::region::Region`]): a sequence owns a *slot* (a batch row of the pool) and its positions `0 .. len`.
//! Memory is committed page by page as positions are written and given back when a slot is freed, so the pool spans
//! every slot at full context length while holding only what sequences wrote; the budget ([`super::KvBudget`])
//! counts that in blocks.
//!
//! Two ways to step over it:
//! - **in place**: a backend whose graph appends the new positions into its past buffer (ONNX Runtime's
//!   `GroupQueryAttention` with past and present bound to the same memory) binds the slots `a .. b` of every layer
//!   directly ([`KvPool::layer_range`]); nothing is copied. Slots of one pass must be consecutive, which the engine
//!   keeps true by compacting ([`KvPool::move_slot`]) when a sequence leaves.
//! - **on the host**: other backends take a gathered `[batch, heads, past, dim]` past ([`KvPool::gather_into`]) and
//!   return a present whose new positions are appended to the slot ([`KvPool::append_from`]).
//!
//! [`KvPool::copied_bytes`] counts every byte the pool copies (gather, append, move), so tests can assert that a
//! steady in-place decode step copies none.

use ndarray::{ArrayViewD, ArrayViewMut4, Axis};

use half::f16;

use super::device::{host_path_on_device, DeviceBuffer, PoolDevice, Storage};
use super::region::{PoolElem, Region};
use super::KvGeometry;
use crate::error::{EngineError, Result};
use crate::manifest::DType;

/// See the module docs.
#[derive(Debug)]
pub struct KvPool {
    geometry: KvGeometry,
    slots: usize,
    capacity: usize,
    dtype: DType,
    device: PoolDevice,
    keys: Vec<Storage>,
    values: Vec<Storage>,
    /// Valid positions per slot (`None`: free).
    lens: Vec<Option<usize>>,
    copied_bytes: u64,
}

/// One layer's key and value tensors over a range of slots, for binding to a runtime.
#[derive(Debug, Clone, Copy)]
pub struct LayerRange {
    /// Start of the key tensor `[n, key_heads, capacity, key_dim]`.
    pub key: *mut u8,
    /// Start of the value tensor `[n, value_heads, capacity, value_dim]`.
    pub value: *mut u8,
}

/// Calls `$body` with `$t` the Rust element type of `$dtype`.
macro_rules! with_elem {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::Float16 => {
                type $t = f16;
                $body
            }
            _ => {
                type $t = f32;
                $body
            }
        }
    };
}

impl KvPool {
    /// A pool of `slots` sequences of up to `capacity` positions each, stored as `dtype` (float32 or float16), in
    /// host memory. Reserves address space only.
    pub fn new(geometry: KvGeometry, slots: usize, capacity: usize, dtype: DType) -> Result<KvPool> {
        Self::new_on(geometry, slots, capacity, dtype, PoolDevice::Host)
    }

    /// [`KvPool::new`] on `device`: host memory is reserved and committed as it is written; a CUDA device's is
    /// allocated in full now ([`super::device`]).
    pub fn new_on(
        geometry: KvGeometry,
        slots: usize,
        capacity: usize,
        dtype: DType,
        device: PoolDevice,
    ) -> Result<KvPool> {
        if !matches!(dtype, DType::Float32 | DType::Float16) {
            return Err(EngineError::InvalidArgument {
                name: "KV pool dtype".into(),
                message: format!("must be float32 or float16, got {dtype:?}"),
            });
        }
        let g = geometry;
        let size = |heads: usize, dim: usize| {
            slots
                .checked_mul(heads)
                .and_then(|x| x.checked_mul(capacity))
                .and_then(|x| x.checked_mul(dim))
                .and_then(|x| x.checked_mul(dtype.size()))
                .ok_or_else(|| EngineError::InvalidArgument {
                    name: "KV pool".into(),
                    message: format!("{slots} slots × {capacity} positions × {heads} heads × {dim} overflows"),
                })
        };
        let (ks, vs) = (size(g.key_heads, g.key_dim)?, size(g.value_heads, g.value_dim)?);
        let mut keys = Vec::with_capacity(g.num_layers);
        let mut values = Vec::with_capacity(g.num_layers);
        let storage = |bytes: usize, what: String| -> Result<Storage> {
            Ok(match device {
                PoolDevice::Host => Storage::Host(Region::new(bytes, &what)?),
                PoolDevice::Cuda { id } => Storage::Cuda(DeviceBuffer::new(id, bytes, &what)?),
            })
        };
        for layer in 0..g.num_layers {
            keys.push(storage(ks, format!("layer {layer} keys"))?);
            values.push(storage(vs, format!("layer {layer} values"))?);
        }
        Ok(KvPool { geometry, slots, capacity, dtype, device, keys, values, lens: vec![None; slots], copied_bytes: 0 })
    }

    /// Slots in the pool.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions a slot holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The pool's layout.
    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    /// The element type it stores.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where its memory is.
    pub fn device(&self) -> PoolDevice {
        self.device
    }

    /// Slots in use.
    pub fn used_slots(&self) -> usize {
        self.lens.iter().filter(|l| l.is_some()).count()
    }

    /// The lowest free slot, now taken (0 positions), or `None` when every slot is in use.
    pub fn alloc(&mut self) -> Option<usize> {
        let slot = self.lens.iter().position(Option::is_none)?;
        self.lens[slot] = Some(0);
        Some(slot)
    }

    /// Takes the free slot `slot` (0 positions); false when it is in use or out of range.
    pub fn alloc_at(&mut self, slot: usize) -> bool {
        match self.lens.get_mut(slot) {
            Some(l @ None) => {
                *l = Some(0);
                true
            }
            _ => false,
        }
    }

    /// The lowest free slot, left free.
    pub fn first_free(&self) -> Option<usize> {
        self.lens.iter().position(Option::is_none)
    }

    /// Valid positions of `slot` (0 for a free slot).
    pub fn len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().flatten().unwrap_or(0)
    }

    /// Marks `n` more positions of `slot` valid after a backend wrote them in place.
    pub fn grow(&mut self, slot: usize, n: usize) -> Result<()> {
        let len = self.len(slot);
        if len + n > self.capacity || self.lens.get(slot).copied().flatten().is_none() {
            return Err(EngineError::Shape {
                name: format!("KV pool slot {slot}"),
                expected: format!("an allocated slot with room for {n} more of {} positions", self.capacity),
                got: format!("{len} positions held"),
            });
        }
        self.lens[slot] = Some(len + n);
        Ok(())
    }

    /// Frees `slot` and gives its memory back to the system.
    pub fn free(&mut self, slot: usize) {
        self.release_slot(slot);
        if let Some(l) = self.lens.get_mut(slot) {
            *l = None;
        }
    }

    /// Gives back the whole slot, not only its valid positions: an in-place pass may have written beyond them (the
    /// padded columns of a batched prompt).
    fn release_slot(&mut self, slot: usize) {
        let (g, cap, e) = (self.geometry, self.capacity, self.dtype.size());
        for (regions, heads, dim) in
            [(&mut self.keys, g.key_heads, g.key_dim), (&mut self.values, g.value_heads, g.value_dim)]
        {
            // Device memory stays allocated: nothing reads a slot's positions beyond its length.
            for r in regions.iter_mut().filter_map(|r| r.host_mut().ok()) {
                for h in 0..heads {
                    r.release(((slot * heads + h) * cap) * dim * e, cap * dim * e);
                }
            }
        }
    }

    /// Copies the first `n` positions of slot `from` into the taken, empty slot `to` (a prefix-cache hit); `to` then
    /// holds `n` positions.
    pub fn copy_prefix(&mut self, from: usize, to: usize, n: usize) -> Result<()> {
        let ok = from != to
            && self.lens.get(from).copied().flatten().is_some_and(|l| l >= n)
            && self.lens.get(to).copied().flatten() == Some(0);
        if !ok {
            return Err(EngineError::InvalidArgument {
                name: "KV pool prefix copy".into(),
                message: format!("needs slot {from} holding at least {n} positions and an empty taken slot {to}"),
            });
        }
        self.copy_positions(from, to, n)?;
        self.lens[to] = Some(n);
        Ok(())
    }

    fn copy_positions(&mut self, from: usize, to: usize, len: usize) -> Result<()> {
        let (g, cap, e) = (self.geometry, self.capacity, self.dtype.size());
        for (regions, heads, dim) in
            [(&mut self.keys, g.key_heads, g.key_dim), (&mut self.values, g.value_heads, g.value_dim)]
        {
            for r in regions.iter_mut() {
                let ranges = (0..heads).map(|h| (((from * heads + h) * cap) * dim, ((to * heads + h) * cap) * dim));
                match r {
                    Storage::Host(r) => with_elem!(self.dtype, T => {
                        let s = r.as_mut_slice::<T>();
                        for (src, dst) in ranges {
                            s.copy_within(src..src + len * dim, dst);
                        }
                    }),
                    Storage::Cuda(b) => {
                        let copies: Vec<_> = ranges.map(|(src, dst)| (src * e, dst * e, len * dim * e)).collect();
                        b.copy_many(&copies)?;
                    }
                }
            }
        }
        self.copied_bytes += (len * self.bytes_per_position()) as u64;
        Ok(())
    }

    /// Moves the sequence in slot `from` to the free slot `to` (compaction) and frees `from`.
    pub fn move_slot(&mut self, from: usize, to: usize) -> Result<()> {
        let len = match (self.lens.get(from).copied().flatten(), self.lens.get(to).copied()) {
            (Some(len), Some(None)) => len,
            _ => {
                return Err(EngineError::InvalidArgument {
                    name: "KV pool move".into(),
                    message: format!("needs a used slot {from} and a free slot {to}"),
                })
            }
        };
        self.copy_positions(from, to, len)?;
        self.lens[to] = Some(len);
        self.free(from);
        Ok(())
    }

    /// Bytes one position takes (every layer's key and value).
    pub fn bytes_per_position(&self) -> usize {
        let g = self.geometry;
        g.num_layers * (g.key_heads * g.key_dim + g.value_heads * g.value_dim) * self.dtype.size()
    }

    /// Bytes copied by gathers, appends and moves since the pool was made.
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes
    }

    /// Layer `layer`'s tensors over slots `start .. start + n` (`[n, heads, capacity, dim]` each, row-major).
    /// The pointers stay valid while the pool lives; the caller must not use them past a [`KvPool::free`] or
    /// [`KvPool::move_slot`] of those slots.
    pub fn layer_range(&mut self, layer: usize, start: usize, n: usize) -> Result<LayerRange> {
        let g = self.geometry;
        if layer >= g.num_layers || start + n > self.slots {
            return Err(EngineError::InvalidArgument {
                name: "KV pool range".into(),
                message: format!("layer {layer} of {}, slots {start}..{} of {}", g.num_layers, start + n, self.slots),
            });
        }
        let (cap, e) = (self.capacity, self.dtype.size());
        Ok(LayerRange {
            key: self.keys[layer].ptr_at(start * g.key_heads * cap * g.key_dim * e)?,
            value: self.values[layer].ptr_at(start * g.value_heads * cap * g.value_dim * e)?,
        })
    }

    /// Copies slot `slot`'s positions into row `row` of the batch tensors `keys[layer]` / `values[layer]`
    /// (`[batch, heads, past, dim]`), right-aligned: positions `past - len .. past`.
    pub fn gather_into<'a>(
        &mut self,
        slot: usize,
        row: usize,
        keys: &mut [ArrayViewMut4<'a, f32>],
        values: &mut [ArrayViewMut4<'a, f32>],
    ) -> Result<()> {
        let (g, cap, len) = (self.geometry, self.capacity, self.len(slot));
        for (regions, dst, heads, dim) in
            [(&self.keys, keys, g.key_heads, g.key_dim), (&self.values, values, g.value_heads, g.value_dim)]
        {
            for (r, t) in regions.iter().zip(dst.iter_mut()) {
                let r = r.host()?;
                let past = t.shape()[2];
                let mut row_view = t.index_axis_mut(Axis(0), row);
                for h in 0..heads {
                    let head = row_view.index_axis_mut(Axis(0), h);
                    with_elem!(self.dtype, T => {
                        let src = &r.as_slice::<T>()[((slot * heads + h) * cap) * dim..][..len * dim];
                        write_positions(head, past - len, src, dim);
                    });
                }
            }
        }
        self.copied_bytes += (len * self.bytes_per_position()) as u64;
        Ok(())
    }

    /// Appends `n` positions taken from row `row` of `present` tensors (`[batch, heads, T, dim]`, positions
    /// `from .. from + n`) to `slot`. Checks every shape before writing anything, so an error leaves the slot as it
    /// was.
    pub fn append_from(
        &mut self,
        slot: usize,
        present_keys: &[ArrayViewD<f32>],
        present_values: &[ArrayViewD<f32>],
        row: usize,
        from: usize,
        n: usize,
    ) -> Result<()> {
        let (g, cap, len) = (self.geometry, self.capacity, self.len(slot));
        check_present("present key", present_keys, g.num_layers, g.key_heads, g.key_dim, row, from + n)?;
        check_present("present value", present_values, g.num_layers, g.value_heads, g.value_dim, row, from + n)?;
        if self.lens.get(slot).copied().flatten().is_none() || len + n > cap {
            return Err(EngineError::Shape {
                name: format!("KV pool slot {slot}"),
                expected: format!("an allocated slot with room for {n} more of {cap} positions"),
                got: format!("{len} positions held"),
            });
        }
        if let Some(Storage::Cuda(b)) = self.keys.first() {
            return Err(host_path_on_device(b.device()));
        }
        for (regions, present, heads, dim) in [
            (&mut self.keys, present_keys, g.key_heads, g.key_dim),
            (&mut self.values, present_values, g.value_heads, g.value_dim),
        ] {
            for (r, p) in regions.iter_mut().zip(present) {
                let r = r.host_mut()?;
                for h in 0..heads {
                    let head = p.index_axis(Axis(0), row);
                    let head = head.index_axis(Axis(0), h);
                    with_elem!(self.dtype, T => {
                        let dst = &mut r.as_mut_slice::<T>()[((slot * heads + h) * cap + len) * dim..][..n * dim];
                        read_positions(head, from, dst, dim);
                    });
                }
            }
        }
        self.copied_bytes += (n * self.bytes_per_position()) as u64;
        self.lens[slot] = Some(len + n);
        Ok(())
    }
}

/// Writes `src` (positions × `dim`) into `head` (`[positions, dim]`) from position `at`.
fn write_positions<T: PoolElem>(mut head: ndarray::ArrayViewMut2<f32>, at: usize, src: &[T], dim: usize) {
    let n = src.len() / dim.max(1);
    match head.as_slice_mut() {
        Some(d) => {
            for (o, &v) in d[at * dim..][..n * dim].iter_mut().zip(src) {
                *o = v.to_f32();
            }
        }
        None => {
            for p in 0..n {
                for d in 0..dim {
                    head[[at + p, d]] = src[p * dim + d].to_f32();
                }
            }
        }
    }
}

/// Reads positions `from .. from + dst.len() / dim` of `head` (`[positions, dim]`, any layout) into `dst`.
fn read_positions<T: PoolElem>(head: ndarray::ArrayViewD<f32>, from: usize, dst: &mut [T], dim: usize) {
    let n = dst.len();
    match head.as_slice() {
        Some(src) => {
            for (o, &v) in dst.iter_mut().zip(&src[from * dim..][..n]) {
                *o = T::from_f32(v);
            }
        }
        // `iter` walks the logical (row-major) order whatever the memory layout.
        None => {
            for (o, &v) in dst.iter_mut().zip(head.iter().skip(from * dim).take(n)) {
                *o = T::from_f32(v);
            }
        }
    }
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
        return Err(EngineError::Shape {
            name: what.into(),
            expected: format!("{layers} layers"),
            got: format!("{} layers", tensors.len()),
        });
    }
    for (i, t) in tensors.iter().enumerate() {
        let s = t.shape();
        if s.len() != 4 || s[0] <= row || s[1] != heads || s[2] < min_len || s[3] != dim {
            return Err(EngineError::Shape {
                name: format!("{what} of layer {i}"),
                expected: format!("[>{row}, {heads}, >={min_len}, {dim}]"),
                got: format!("{s:?}"),
            });
        }
    }
    Ok(())
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
    fn append_then_gather_right_aligned() {
        let mut pool = KvPool::new(geom(), 3, 8, DType::Float32).unwrap();
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        assert_eq!((a, b), (0, 1));
        let pk: Vec<_> = (0..2).map(|l| present(2, 2, 3, 3, l as f32 * 0.5)).collect();
        let pv: Vec<_> = (0..2).map(|l| present(2, 1, 3, 4, 7.0 + l as f32)).collect();
        let kv: Vec<_> = pk.iter().map(|a| a.view()).collect();
        let vv: Vec<_> = pv.iter().map(|a| a.view()).collect();
        pool.append_from(b, &kv, &vv, 1, 1, 2).unwrap();
        let pk2: Vec<_> = (0..2).map(|_| present(1, 2, 1, 3, 50_000.0)).collect();
        let pv2: Vec<_> = (0..2).map(|_| present(1, 1, 1, 4, 60_000.0)).collect();
        let kv2: Vec<_> = pk2.iter().map(|a| a.view()).collect();
        let vv2: Vec<_> = pv2.iter().map(|a| a.view()).collect();
        pool.append_from(b, &kv2, &vv2, 0, 0, 1).unwrap();
        assert_eq!(pool.len(b), 3);
        assert_eq!(pool.len(a), 0);

        let mut keys: Vec<Array4<f32>> = (0..2).map(|_| Array4::zeros((1, 2, 5, 3))).collect();
        let mut vals: Vec<Array4<f32>> = (0..2).map(|_| Array4::zeros((1, 1, 5, 4))).collect();
        {
            let mut kviews: Vec<_> = keys.iter_mut().map(|a| a.view_mut()).collect();
            let mut vviews: Vec<_> = vals.iter_mut().map(|a| a.view_mut()).collect();
            pool.gather_into(b, 0, &mut kviews, &mut vviews).unwrap();
        }
        for l in 0..2 {
            for h in 0..2 {
                for d in 0..3 {
                    assert_eq!(keys[l][[0, h, 1, d]], 0.0);
                    for p in 0..2 {
                        assert_eq!(keys[l][[0, h, 2 + p, d]], pk[l][[1, h, 1 + p, d]]);
                    }
                    assert_eq!(keys[l][[0, h, 4, d]], pk2[l][[0, h, 0, d]]);
                }
            }
            for d in 0..4 {
                assert_eq!(vals[l][[0, 0, 3, d]], pv[l][[1, 0, 2, d]]);
            }
        }
        // Compaction: slot 1 moves to the freed slot 0, and gathers the same.
        pool.free(a);
        pool.move_slot(b, a).unwrap();
        assert_eq!((pool.len(0), pool.len(1), pool.used_slots()), (3, 0, 1));
        let mut keys2: Vec<Array4<f32>> = (0..2).map(|_| Array4::zeros((1, 2, 5, 3))).collect();
        let mut vals2: Vec<Array4<f32>> = (0..2).map(|_| Array4::zeros((1, 1, 5, 4))).collect();
        {
            let mut kviews: Vec<_> = keys2.iter_mut().map(|a| a.view_mut()).collect();
            let mut vviews: Vec<_> = vals2.iter_mut().map(|a| a.view_mut()).collect();
            pool.gather_into(0, 0, &mut kviews, &mut vviews).unwrap();
        }
        assert_eq!(keys, keys2);
        assert_eq!(vals, vals2);
        // The freed slot reads zero again.
        let r = pool.layer_range(0, 1, 1).unwrap();
        // SAFETY: slot 1 of layer 0 holds 2 × 8 × 3 floats.
        let s = unsafe { std::slice::from_raw_parts(r.key.cast::<f32>(), 2 * 8 * 3) };
        assert!(s.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_float16_pool_stores_half_the_bytes_and_rounds_like_the_graph() {
        let mut pool = KvPool::new(geom(), 2, 4, DType::Float16).unwrap();
        assert_eq!(pool.bytes_per_position(), 2 * (2 * 3 + 4) * 2);
        let s = pool.alloc().unwrap();
        let pk: Vec<_> = (0..2).map(|_| present(1, 2, 1, 3, 0.1)).collect();
        let pv: Vec<_> = (0..2).map(|_| present(1, 1, 1, 4, 0.2)).collect();
        let kv: Vec<_> = pk.iter().map(|a| a.view()).collect();
        let vv: Vec<_> = pv.iter().map(|a| a.view()).collect();
        pool.append_from(s, &kv, &vv, 0, 0, 1).unwrap();
        let mut keys: Vec<Array4<f32>> = (0..2).map(|_| Array4::zeros((1, 2, 1, 3))).collect();
        let mut vals: Vec<Array4<f32>> = (0..2).map(|_| Array4::zeros((1, 1, 1, 4))).collect();
        {
            let mut kviews: Vec<_> = keys.iter_mut().map(|a| a.view_mut()).collect();
            let mut vviews: Vec<_> = vals.iter_mut().map(|a| a.view_mut()).collect();
            pool.gather_into(s, 0, &mut kviews, &mut vviews).unwrap();
        }
        let want = pk[1].mapv(|v| f16::from_f32(v).to_f32());
        assert_eq!(keys[1].clone().into_dyn(), want);
        assert_ne!(keys[1].clone().into_dyn(), pk[1], "0.1 is not a float16 value");
    }

    #[test]
    fn append_with_wrong_shape_or_no_room_changes_nothing() {
        let mut pool = KvPool::new(geom(), 1, 2, DType::Float32).unwrap();
        let s = pool.alloc().unwrap();
        let pk: Vec<_> = (0..2).map(|_| present(1, 2, 2, 3, 0.0)).collect();
        let bad_v: Vec<_> = (0..2).map(|_| present(1, 1, 2, 5, 0.0)).collect();
        let kv: Vec<_> = pk.iter().map(|a| a.view()).collect();
        let vv: Vec<_> = bad_v.iter().map(|a| a.view()).collect();
        assert_eq!(pool.append_from(s, &kv, &vv, 0, 0, 2).unwrap_err().kind(), "shape");
        assert_eq!(pool.len(s), 0);
        let pk3: Vec<_> = (0..2).map(|_| present(1, 2, 3, 3, 0.0)).collect();
        let pv3: Vec<_> = (0..2).map(|_| present(1, 1, 3, 4, 0.0)).collect();
        let kv: Vec<_> = pk3.iter().map(|a| a.view()).collect();
        let vv: Vec<_> = pv3.iter().map(|a| a.view()).collect();
        let err = pool.append_from(s, &kv, &vv, 0, 0, 3).unwrap_err();
        assert!(err.to_string().contains("room for 3 more of 2 positions"), "{err}");
        assert_eq!(pool.len(s), 0);
        assert!(pool.alloc().is_none());
    }

    #[test]
    fn a_gpu_pool_without_the_cuda_runtime_is_an_error_naming_it() {
        if super::super::device::cuda_runtime_available().is_ok() {
            return; // a GPU host: scripts/gpu_check.sh runs the device pool there
        }
        let e = KvPool::new_on(geom(), 2, 4, DType::Float16, PoolDevice::Cuda { id: 0 }).unwrap_err().to_string();
        assert!(e.contains("CUDA runtime") && e.contains("libcudart"), "{e}");
        let host = KvPool::new_on(geom(), 2, 4, DType::Float16, PoolDevice::Host).unwrap();
        assert_eq!(host.device(), PoolDevice::Host);
    }
}
