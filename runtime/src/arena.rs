//! One block of memory for all of a model's packed int8 weights, in huge pages where Linux
//! gives them.
//!
//! Decoding streams every weight once per token: 135 MB of the int8 teacher through 4 kB
//! pages is 33,000 page-table walks per token, most of them misses in the TLB. Linux's
//! transparent huge pages are often set to `madvise` (Debian's default): a mapping gets 2 MB
//! pages only if the program asks. [`Arena`] is an anonymous mapping, 2 MB-aligned, advised
//! `MADV_HUGEPAGE`; every [`crate::kernels::Int8Linear`] of a load packs its weights into its own
//! range of one arena. Measured on the int8 teacher (this machine, 1 thread): decode 82 →
//! 90 tok/s with huge pages for the weights. Where the advice is refused (or on other systems)
//! the pages are ordinary ones and nothing else changes.
//!
//! The mapping is zero-filled by the kernel, so every byte is initialized from the start;
//! ranges are handed out once each ([`Arena::take`]), which is what makes writing to one while
//! others are read sound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Alignment of the arena: one huge page.
const HUGE_PAGE: usize = 2 << 20;

/// A zero-filled block of bytes, see the module docs.
#[derive(Debug)]
pub struct Arena {
    base: *mut i8,
    len: usize,
    /// Bytes handed out so far by [`Arena::take`].
    taken: AtomicUsize,
    /// What to unmap or free on drop.
    #[cfg(unix)]
    map: (*mut libc::c_void, usize),
    #[cfg(not(unix))]
    vec: Vec<i8>,
}

// SAFETY: the arena only hands out disjoint ranges (`take`, `Weights::split_at`), each owned by one `Weights`; the
// raw pointers are never used to alias them.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    /// `len` zeroed bytes, in huge pages where the system agrees.
    pub fn new(len: usize) -> std::io::Result<Arena> {
        #[cfg(unix)]
        {
            let map_len = len.max(1) + HUGE_PAGE;
            // SAFETY: an anonymous private mapping; the result is checked.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    map_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if map == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            let offset = (HUGE_PAGE - map as usize % HUGE_PAGE) % HUGE_PAGE;
            // SAFETY: offset < HUGE_PAGE, inside the mapping.
            let base = unsafe { (map as *mut i8).add(offset) };
            #[cfg(target_os = "linux")]
            // SAFETY: advice on our own mapping; refusal (EINVAL where THP is off) is harmless.
            unsafe {
                libc::madvise(base.cast(), len.max(1), libc::MADV_HUGEPAGE);
            }
            Ok(Arena {
                base,
                len,
                taken: AtomicUsize::new(0),
                map: (map, map_len),
            })
        }
        #[cfg(not(unix))]
        {
            let mut vec = vec![0i8; len];
            Ok(Arena {
                base: vec.as_mut_ptr(),
                len,
                taken: AtomicUsize::new(0),
                vec,
            })
        }
    }

    /// The next `len` bytes, for one owner; `None` when the arena has no room left.
    pub fn take(self: &Arc<Self>, len: usize) -> Option<Weights> {
        let start = self
            .taken
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_add(len).filter(|&e| e <= self.len)
            })
            .ok()?;
        Some(Weights {
            arena: self.clone(),
            start,
            len,
        })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        #[cfg(unix)]
        // SAFETY: the mapping made in `new`, unmapped once; no `Weights` outlives the arena
        // (each holds an `Arc` of it).
        unsafe {
            libc::munmap(self.map.0, self.map.1);
        }
    }
}

/// One owner's range of an [`Arena`].
#[derive(Debug)]
pub struct Weights {
    arena: Arc<Arena>,
    start: usize,
    len: usize,
}

impl Weights {
    /// A range of a new arena of its own (tests, single products).
    pub fn alone(len: usize) -> std::io::Result<Weights> {
        let arena = Arc::new(Arena::new(len)?);
        Ok(arena.take(len).expect("the arena is this size"))
    }

    /// The bytes as f32 (the bench's bandwidth test); `None` unless the range is 4-aligned
    /// and a whole number of floats.
    pub fn as_f32_mut(&mut self) -> Option<&mut [f32]> {
        let bytes = self.as_mut_slice();
        if !(bytes.as_ptr() as usize).is_multiple_of(4) || !bytes.len().is_multiple_of(4) {
            return None;
        }
        // SAFETY: aligned (checked), a whole number of f32s, every bit pattern a valid f32,
        // and the borrow of `self` covers the view's lifetime.
        Some(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len() / 4) })
    }

    /// Where the range starts in its arena (the load cache's weights file keeps the same
    /// offsets).
    pub fn start(&self) -> usize {
        self.start
    }

    /// The first `mid` bytes and the rest, as two owners of disjoint ranges of the same arena;
    /// `None` if `mid` is past the end.
    pub fn split_at(self, mid: usize) -> Option<(Weights, Weights)> {
        (mid <= self.len).then(|| {
            let tail = Weights {
                arena: self.arena.clone(),
                start: self.start + mid,
                len: self.len - mid,
            };
            let head = Weights { len: mid, ..self };
            (head, tail)
        })
    }

    /// The bytes as `u8`, for reading a file into them (the load cache).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        let bytes = self.as_mut_slice();
        // SAFETY: i8 and u8 have the same size, alignment and valid bit patterns; the borrow
        // of `self` covers the view's lifetime.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len()) }
    }

    /// The bytes, for writing (packing).
    pub fn as_mut_slice(&mut self) -> &mut [i8] {
        // SAFETY: the range is inside the arena (checked by `take`), zero-initialized, and
        // handed out to this owner only; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.arena.base.add(self.start), self.len) }
    }
}

impl std::ops::Deref for Weights {
    type Target = [i8];

    fn deref(&self) -> &[i8] {
        // SAFETY: as `as_mut_slice`; shared views only while no `&mut` exists.
        unsafe { std::slice::from_raw_parts(self.arena.base.add(self.start), self.len) }
    }
}
