//! One anonymous memory mapping of float32 values: the storage of a KV pool tensor.
//!
//! The mapping is reserved, not committed (`MAP_NORESERVE`): the kernel gives a page physical memory the first time
//! it is written, and [`Region::release`] hands a range's pages back (`MADV_DONTNEED`; they read as zero again).
//! So a pool can span every slot at full context length while the memory it holds is what its sequences wrote,
//! page by page. Reading a page never written maps the shared zero page and commits nothing.

use std::ptr::NonNull;

use crate::error::{EngineError, Result};

/// An anonymous private mapping of `len` float32 values, zero-filled.
pub struct Region {
    ptr: NonNull<f32>,
    len: usize,
}

// The mapping is plain memory owned by this value; access goes through `&self` / `&mut self`.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region({} floats at {:p})", self.len, self.ptr)
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

impl Region {
    /// Reserves `len` float32 values (`what` names the tensor in errors).
    pub fn new(len: usize, what: &str) -> Result<Region> {
        let bytes = len.checked_mul(4).ok_or_else(|| too_large(what, usize::MAX))?;
        if len == 0 {
            return Ok(Region { ptr: NonNull::dangling(), len: 0 });
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
        let ptr = NonNull::new(p.cast::<f32>()).ok_or_else(|| too_large(what, bytes))?;
        Ok(Region { ptr, len })
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the region holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole region.
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `ptr` maps `len` initialised (zero or written) floats for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole region, writable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The address of value `offset` (for binding a range to a runtime). `offset <= len`.
    pub fn ptr_at(&mut self, offset: usize) -> *mut f32 {
        assert!(offset <= self.len, "offset {offset} beyond region of {}", self.len);
        // SAFETY: within (or one past) the mapping.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// Gives the whole pages inside values `start .. start + n` back to the system; they read as zero afterwards.
    /// Values on partly covered pages at either end are zeroed instead, so the range always reads zero after.
    pub fn release(&mut self, start: usize, n: usize) {
        let end = (start + n).min(self.len);
        if start >= end {
            return;
        }
        let page = page_size() / 4;
        let first_page = start.div_ceil(page) * page;
        let last_page = end / page * page;
        if first_page < last_page {
            // SAFETY: a page-aligned range inside our private anonymous mapping.
            let rc = unsafe {
                libc::madvise(
                    self.ptr.as_ptr().add(first_page).cast(),
                    (last_page - first_page) * 4,
                    libc::MADV_DONTNEED,
                )
            };
            if rc == 0 {
                let s = self.as_mut_slice();
                s[start..first_page].fill(0.0);
                s[last_page..end].fill(0.0);
                return;
            }
        }
        self.as_mut_slice()[start..end].fill(0.0);
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmapping exactly what `new` mapped.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * 4) };
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
        let mut r = Region::new(16 << 30, "test").unwrap();
        let s = r.as_mut_slice();
        s[0] = 1.0;
        s[(8 << 30) + 5] = 2.0;
        assert_eq!(r.as_slice()[(8 << 30) + 5], 2.0);
        assert_eq!(r.as_slice()[12 << 30], 0.0);
        r.release(0, 4 << 30);
        assert_eq!(r.as_slice()[0], 0.0);
        // A release that starts and ends inside pages zeroes exactly its range.
        let s = r.as_mut_slice();
        s[100..5000].fill(3.0);
        r.release(101, 4000);
        assert_eq!(r.as_slice()[100], 3.0);
        assert!(r.as_slice()[101..4101].iter().all(|&v| v == 0.0));
        assert_eq!(r.as_slice()[4101], 3.0);
    }
}
