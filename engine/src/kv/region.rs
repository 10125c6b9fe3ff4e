//! One anonymous memory mapping: the storage of a KV pool tensor, read and written as float32 or float16 values.
//!
//! The mapping is reserved, not committed (`MAP_NORESERVE`): the kernel gives a page physical memory the first time
//! it is written, and [`Region::release`] hands a range's pages back (`MADV_DONTNEED`; they read as zero again).
//! So a pool can span every slot at full context length while the memory it holds is what its sequences wrote,
//! page by page. Reading a page never written maps the shared zero page and commits nothing.

use std::ptr::NonNull;

use crate::error::{EngineError, Result};

/// An element type a pool stores: the graph's KV dtype.
pub trait PoolElem: Copy + Default + Send + Sync + 'static {
    /// As float32.
    fn to_f32(self) -> f32;
    /// From float32 (rounded to nearest).
    fn from_f32(v: f32) -> Self;
}

impl PoolElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl PoolElem for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// An anonymous private mapping of `bytes` bytes, zero-filled (zero bytes are 0.0 in both element types).
pub struct Region {
    ptr: NonNull<u8>,
    bytes: usize,
}

// The mapping is plain memory owned by this value; access goes through `&self` / `&mut self`.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region({} bytes at {:p})", self.bytes, self.ptr)
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

impl Region {
    /// Reserves `bytes` bytes (`what` names the tensor in errors).
    pub fn new(bytes: usize, what: &str) -> Result<Region> {
        if bytes == 0 {
            return Ok(Region { ptr: NonNull::dangling(), bytes: 0 });
        }
        // SAFETY: a fresh private anonymous mapping; no file, no fixed address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(EngineError::Unavailable {
                what: format!("KV pool memory for {what}"),
                message: format!(
                    "cannot reserve {bytes} bytes of address space ({}); lower --max-batch-size (slots) or use a \
                     model with a shorter max_position_embeddings",
                    std::io::Error::last_os_error()
                ),
            });
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| too_large(what, bytes))?;
        Ok(Region { ptr, bytes })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The whole region as `T` values.
    pub fn as_slice<T: PoolElem>(&self) -> &[T] {
        // SAFETY: the mapping is page-aligned (so aligned for T), holds `bytes` initialised bytes (zero or written)
        // for as long as `self` lives, and every bit pattern is a valid f32 / f16.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<T>(), self.bytes / size_of::<T>()) }
    }

    /// The whole region as `T` values, writable.
    pub fn as_mut_slice<T: PoolElem>(&mut self) -> &mut [T] {
        // SAFETY: as above, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<T>(), self.bytes / size_of::<T>()) }
    }

    /// The address of byte `offset` (for binding a range to a runtime). `offset <= bytes`.
    pub fn ptr_at(&mut self, offset: usize) -> *mut u8 {
        assert!(offset <= self.bytes, "offset {offset} beyond region of {}", self.bytes);
        // SAFETY: within (or one past) the mapping.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// Gives the whole pages inside bytes `start .. start + n` back to the system; they read as zero afterwards.
    /// Bytes on partly covered pages at either end are zeroed instead, so the range always reads zero after.
    pub fn release(&mut self, start: usize, n: usize) {
        let end = (start + n).min(self.bytes);
        if start >= end {
            return;
        }
        let page = page_size();
        let first_page = start.div_ceil(page) * page;
        let last_page = end / page * page;
        // SAFETY: every access below stays within `start .. end`, inside the mapping.
        let zero = |from: usize, to: usize| unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(from), 0, to - from) };
        if first_page < last_page {
            // SAFETY: a page-aligned range inside our private anonymous mapping.
            let rc = unsafe {
                libc::madvise(self.ptr.as_ptr().add(first_page).cast(), last_page - first_page, libc::MADV_DONTNEED)
            };
            if rc == 0 {
                zero(start, first_page);
                zero(last_page, end);
                return;
            }
        }
        zero(start, end);
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.bytes > 0 {
            // SAFETY: unmapping exactly what `new` mapped.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
        }
    }
}

fn too_large(what: &str, bytes: usize) -> EngineError {
    EngineError::Unavailable { what: format!("KV pool memory for {what}"), message: format!("{bytes} bytes overflow") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_far_more_than_it_commits_and_releases_to_zero() {
        // 64 GiB of address space on a machine with less memory: only written pages are committed.
        let mut r = Region::new(64 << 30, "test").unwrap();
        let s = r.as_mut_slice::<f32>();
        s[0] = 1.0;
        s[(8 << 30) + 5] = 2.0;
        assert_eq!(r.as_slice::<f32>()[(8 << 30) + 5], 2.0);
        assert_eq!(r.as_slice::<f32>()[12 << 30], 0.0);
        r.release(0, 16 << 30);
        assert_eq!(r.as_slice::<f32>()[0], 0.0);
        // A release that starts and ends inside pages zeroes exactly its range.
        let s = r.as_mut_slice::<f32>();
        s[100..5000].fill(3.0);
        r.release(101 * 4, 4000 * 4);
        let s = r.as_slice::<f32>();
        assert_eq!(s[100], 3.0);
        assert!(s[101..4101].iter().all(|&v| v == 0.0));
        assert_eq!(s[4101], 3.0);
        assert_eq!(r.as_slice::<half::f16>().len(), 32 << 30);
    }
}
