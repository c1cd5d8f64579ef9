//! The registered buffer arena: one region of memory per process that every io_uring disk ring
//! registers as fixed buffer 0 (`IORING_REGISTER_BUFFERS`), and from which the hot buffer pools
//! ([`super::BufPool::registered`]) carve their buffers.
//!
//! Why: an O_DIRECT read or write from ordinary memory makes the kernel pin the buffer's pages
//! for every request (`gup_fast_fallback`, ~4% of the appliance pair's CPU in initial
//! replication, benches/RESULTS.md). Pages of a registered buffer were pinned once, when the ring
//! registered them, so a request on memory inside the arena is issued as `READ_FIXED` /
//! `WRITE_FIXED` and skips that work. Memory outside the arena still works, unregistered.
//!
//! The arena is mapped when a registered pool first asks for a buffer, not at start-up, so a
//! process that never runs the hot paths (the CLI, most tests) maps and pins nothing. A ring
//! registers it the next time the ring has nothing in flight after it appeared. Registering
//! pins the whole arena and counts it against `RLIMIT_MEMLOCK` unless the process has
//! `CAP_IPC_LOCK` (root has); when that fails the ring goes on with unregistered buffers
//! (logged once per process). The arena is never unmapped: rings may have it registered until
//! the process exits.

use std::io;
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use super::buf::IO_ALIGN_BYTES;
use crate::limits;

/// The process's registered arena: `None` until a registered pool first asks (or if mapping it
/// failed, which leaves every buffer on the heap).
static ARENA: OnceLock<Option<Arena>> = OnceLock::new();

/// The size and alignment of a transparent huge page on x86-64 and (with 4 KiB pages) arm64.
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// The kernel refuses a single registered buffer larger than 1 GiB.
const _: () = assert!(limits::REGISTERED_ARENA_BYTES <= 1 << 30);
const _: () = assert!(limits::REGISTERED_ARENA_BYTES % IO_ALIGN_BYTES == 0);

pub(crate) struct Arena {
    base: NonNull<u8>,
    len: usize,
    free: Mutex<FreeRanges>,
}

// SAFETY: the arena hands out disjoint ranges of its mapping (bookkeeping behind a mutex); it
// never reads or writes the memory itself, so sharing the handle across threads is fine.
unsafe impl Send for Arena {}
// SAFETY: as above; `&Arena` only allows allocating, releasing and asking where it lies.
unsafe impl Sync for Arena {}

/// The arena, mapping it on first use. `None` if the mapping failed (logged once).
pub(crate) fn get_or_map() -> Option<&'static Arena> {
    ARENA
        .get_or_init(|| match Arena::map(limits::REGISTERED_ARENA_BYTES) {
            Ok(arena) => Some(arena),
            Err(error) => {
                tracing::warn!(%error, bytes = limits::REGISTERED_ARENA_BYTES,
                    "mapping the registered I/O buffer arena failed; buffers come from the heap");
                None
            }
        })
        .as_ref()
}

/// The arena if some pool has mapped it already; never maps it.
pub(crate) fn existing() -> Option<&'static Arena> {
    ARENA.get().and_then(Option::as_ref)
}

impl Arena {
    fn map(len: usize) -> io::Result<Arena> {
        // 2 MiB more than needed, so that a 2 MiB-aligned run of `len` bytes lies inside; the
        // ends outside it are unmapped again.
        let mapped = len + HUGE_PAGE_BYTES;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; it
        // aliases nothing, and the result is checked before use. Its pages read as zeroes until
        // written, so every byte an `IoBuf` exposes is initialised.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE_BYTES);
        let (head, tail) = (aligned - start, HUGE_PAGE_BYTES - (aligned - start));
        // SAFETY: both ranges lie inside the mapping just made and outside `aligned..+len`, and
        // nothing refers to them; a zero-length range is skipped.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let base =
            NonNull::new(aligned as *mut u8).ok_or_else(|| io::Error::other("mmap gave 0"))?;
        // Transparent huge pages where the system allows them (`transparent_hugepage/enabled`
        // of `madvise` or `always`): a 1 MiB buffer then lies in one physically contiguous
        // page, which an O_DIRECT request carries as one segment. From 4 KiB pages it needs 256
        // segments, and a virtio disk that takes 254 per request splits every 1 MiB write in
        // two (kernel-notes/io_uring.md). Without THP the arena works as before.
        // SAFETY: advice on the range just mapped; it changes no contents.
        if unsafe { libc::madvise(base.as_ptr().cast(), len, libc::MADV_HUGEPAGE) } != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "no transparent huge pages for the registered arena");
        }
        Ok(Arena {
            base,
            len,
            free: Mutex::new(FreeRanges::new(len)),
        })
    }

    /// `capacity` bytes (a multiple of [`IO_ALIGN_BYTES`]) from the arena, or `None` when it
    /// has no free run that long (the caller allocates on the heap instead).
    pub fn alloc(&self, capacity: usize) -> Option<NonNull<u8>> {
        let offset = self.lock().alloc(capacity)?;
        // SAFETY: `offset + capacity <= len`, so the pointer stays inside the mapping.
        Some(unsafe { self.base.add(offset) })
    }

    /// Returns `ptr..ptr + capacity` to the arena.
    ///
    /// # Safety
    /// The range came from [`Arena::alloc`] with this `capacity` and nothing uses it any more.
    pub unsafe fn release(&self, ptr: NonNull<u8>, capacity: usize) {
        let offset = (ptr.as_ptr() as usize)
            .checked_sub(self.base.as_ptr() as usize)
            .filter(|offset| offset + capacity <= self.len);
        // Internal invariant: only arena allocations are released here.
        let offset = offset.expect("released memory outside the registered arena");
        self.lock().release(offset, capacity);
    }

    /// Whether `ptr..ptr + len` lies inside the arena.
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.base.as_ptr() as usize;
        let at = ptr as usize;
        at >= start && at.saturating_add(len) <= start + self.len
    }

    /// Start of the arena, for registering it and for `READ_FIXED`/`WRITE_FIXED`.
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.base.as_ptr().cast(),
            iov_len: self.len,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FreeRanges> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Free byte ranges of an arena, first fit. Allocations are rare (pools keep their buffers), so
/// a sorted list beats anything cleverer.
#[derive(Debug)]
struct FreeRanges {
    /// `(offset, len)`, sorted by offset, none empty, none touching the next (coalesced).
    ranges: Vec<(usize, usize)>,
}

impl FreeRanges {
    fn new(len: usize) -> FreeRanges {
        FreeRanges {
            ranges: vec![(0, len)],
        }
    }

    fn alloc(&mut self, len: usize) -> Option<usize> {
        let index = self.ranges.iter().position(|&(_, free)| free >= len)?;
        let (offset, free) = self.ranges[index];
        if free == len {
            self.ranges.remove(index);
        } else {
            self.ranges[index] = (offset + len, free - len);
        }
        Some(offset)
    }

    fn release(&mut self, offset: usize, len: usize) {
        let index = self.ranges.partition_point(|&(start, _)| start < offset);
        // Internal invariant: a released range overlaps no free one (no double release).
        if let Some(&(before, before_len)) = index.checked_sub(1).map(|i| &self.ranges[i]) {
            assert!(before + before_len <= offset, "arena range released twice");
        }
        if let Some(&(after, _)) = self.ranges.get(index) {
            assert!(offset + len <= after, "arena range released twice");
        }
        let joins_before = index > 0 && {
            let (before, before_len) = self.ranges[index - 1];
            before + before_len == offset
        };
        let joins_after = self
            .ranges
            .get(index)
            .is_some_and(|&(after, _)| offset + len == after);
        match (joins_before, joins_after) {
            (true, true) => {
                let (_, after_len) = self.ranges.remove(index);
                self.ranges[index - 1].1 += len + after_len;
            }
            (true, false) => self.ranges[index - 1].1 += len,
            (false, true) => self.ranges[index] = (offset, len + self.ranges[index].1),
            (false, false) => self.ranges.insert(index, (offset, len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ranges_allocate_first_fit_and_coalesce() {
        let mut free = FreeRanges::new(10);
        assert_eq!(free.alloc(3), Some(0));
        assert_eq!(free.alloc(3), Some(3));
        assert_eq!(free.alloc(3), Some(6));
        assert_eq!(free.alloc(2), None);
        assert_eq!(free.alloc(1), Some(9));
        assert!(free.ranges.is_empty());
        free.release(3, 3);
        assert_eq!(free.ranges, [(3, 3)]);
        // Too long for the hole: nothing is carved.
        assert_eq!(free.alloc(4), None);
        free.release(0, 3);
        assert_eq!(free.ranges, [(0, 6)]);
        free.release(9, 1);
        assert_eq!(free.ranges, [(0, 6), (9, 1)]);
        free.release(6, 3);
        assert_eq!(free.ranges, [(0, 10)]);
        assert_eq!(free.alloc(10), Some(0));
    }

    #[test]
    fn the_arena_hands_out_disjoint_ranges_inside_itself() {
        let arena = Arena::map(4 * IO_ALIGN_BYTES).expect("mmap");
        let first = arena.alloc(2 * IO_ALIGN_BYTES).expect("room");
        let second = arena.alloc(2 * IO_ALIGN_BYTES).expect("room");
        assert!(arena.alloc(IO_ALIGN_BYTES).is_none());
        assert!(arena.contains(first.as_ptr(), 2 * IO_ALIGN_BYTES));
        assert!(arena.contains(second.as_ptr(), 2 * IO_ALIGN_BYTES));
        assert!(!arena.contains(second.as_ptr(), 2 * IO_ALIGN_BYTES + 1));
        assert_eq!(
            second.as_ptr() as usize - first.as_ptr() as usize,
            2 * IO_ALIGN_BYTES
        );
        // SAFETY: `first` came from this arena with this capacity and is not used any more.
        unsafe { arena.release(first, 2 * IO_ALIGN_BYTES) };
        assert_eq!(arena.alloc(2 * IO_ALIGN_BYTES), Some(first));
        let heap = Box::new([0u8; 16]);
        assert!(!arena.contains(heap.as_ptr(), 1));
        // The test's arena stays mapped (16 KiB) like the process's one: nothing unmaps.
    }

    /// The arena starts on a 2 MiB boundary, and where the system offers transparent huge
    /// pages for advised mappings its range is eligible for them (`smaps`' `THPeligible`), so
    /// a 1 MiB buffer can be one physically contiguous run (one segment of an O_DIRECT request).
    #[test]
    fn the_arena_is_huge_page_aligned_and_advised() {
        let len = 3 * HUGE_PAGE_BYTES;
        let arena = Arena::map(len).expect("mmap");
        let start = arena.base.as_ptr() as usize;
        assert_eq!(start % HUGE_PAGE_BYTES, 0, "arena at {start:#x}");
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        let offered = thp.contains("[madvise]") || thp.contains("[always]");
        println!("transparent_hugepage/enabled: {}", thp.trim());
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        // The arena's own mapping: its header line starts with `start-end`.
        let header = format!("{start:x}-{:x} ", start + len);
        let entry = smaps
            .split_once(&header)
            .map(|(_, rest)| rest)
            .unwrap_or_else(|| panic!("no mapping {header} in smaps"));
        let eligible = entry
            .lines()
            .find_map(|line| line.strip_prefix("THPeligible:"))
            .map(str::trim)
            .expect("THPeligible line");
        if offered {
            assert_eq!(eligible, "1", "arena not eligible for huge pages");
        }
    }
}
