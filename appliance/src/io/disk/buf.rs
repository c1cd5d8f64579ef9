//! `IoBuf`: a 4096-aligned, owned I/O buffer that an in-flight disk operation can hold, and a
//! small pool that recycles them so the capture and apply paths do not allocate per request.
//! A registered pool carves its buffers from the process's registered arena (`arena.rs`), so
//! io_uring issues their I/O as fixed-buffer requests that skip pinning pages per request.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use super::arena;

/// Alignment of every `IoBuf` allocation: the largest logical block size O_DIRECT asks for here,
/// and the page size, so a buffer is usable for direct I/O on any device we open.
pub const IO_ALIGN_BYTES: usize = 4096;

/// An owned byte buffer whose allocation is aligned to [`IO_ALIGN_BYTES`] and whose capacity is
/// a multiple of it. `len() <= capacity()`; the bytes in `[0, len)` are what an operation reads
/// into or writes from. The whole allocation is always initialised (zeroed at allocation, and
/// later whatever was last written), so growing `len` with [`IoBuf::set_len`] is safe.
///
/// A buffer is moved into a disk operation and handed back by its completion, so the kernel
/// never touches memory that the caller can also see.
///
/// A *shared* buffer ([`IoBuf::from_shared`]) wraps aligned bytes someone else owns (a received
/// frame assembled into a pooled buffer, `transport::FrameReceiver::align_frames`), so a write
/// is issued from them without a copy. It is read-only: only writes take it, and `DerefMut`
/// refuses it.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    pool: Option<Arc<PoolShared>>,
    /// What keeps a shared buffer's bytes alive; `None` for an owned allocation.
    owner: Option<bytes::Bytes>,
    /// An owned allocation carved from the registered arena (returned there, not to the heap).
    in_arena: bool,
}

// SAFETY: `IoBuf` uniquely owns its allocation (like `Vec<u8>`); nothing else aliases `ptr` —
// except for a shared buffer, whose bytes are read-only and kept alive by a `Bytes` (Send).
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give `&[u8]` access, which is fine to share across threads.
unsafe impl Sync for IoBuf {}

fn layout_for(capacity: usize) -> Layout {
    // Internal invariant: capacities are rounded to IO_ALIGN_BYTES and far below isize::MAX.
    Layout::from_size_align(capacity, IO_ALIGN_BYTES).expect("IoBuf layout")
}

fn round_capacity(capacity: usize) -> usize {
    capacity.max(1).div_ceil(IO_ALIGN_BYTES) * IO_ALIGN_BYTES
}

impl IoBuf {
    /// An empty buffer (`len() == 0`) with room for at least `capacity` bytes, zero-filled.
    pub fn with_capacity(capacity: usize) -> IoBuf {
        let capacity = round_capacity(capacity);
        let layout = layout_for(capacity);
        // SAFETY: the layout has a non-zero size (capacity >= IO_ALIGN_BYTES).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf {
            ptr,
            len: 0,
            capacity,
            pool: None,
            owner: None,
            in_arena: false,
        }
    }

    /// A read-only buffer over `bytes` without copying them, when they can be one: they start
    /// at an [`IO_ALIGN_BYTES`]-aligned address and their length is a non-zero multiple of it.
    /// Otherwise `bytes` come back. The buffer keeps `bytes` alive until it is dropped.
    pub fn from_shared(bytes: bytes::Bytes) -> Result<IoBuf, bytes::Bytes> {
        let aligned = bytes.as_ptr() as usize % IO_ALIGN_BYTES == 0
            && !bytes.is_empty()
            && bytes.len() % IO_ALIGN_BYTES == 0;
        if !aligned {
            return Err(bytes);
        }
        // `Bytes` never hands out a null pointer for non-empty contents.
        let Some(ptr) = NonNull::new(bytes.as_ptr().cast_mut()) else {
            return Err(bytes);
        };
        Ok(IoBuf {
            ptr,
            len: bytes.len(),
            capacity: bytes.len(),
            pool: None,
            owner: Some(bytes),
            in_arena: false,
        })
    }

    /// Whether this buffer wraps bytes it does not own ([`IoBuf::from_shared`]).
    pub fn is_shared(&self) -> bool {
        self.owner.is_some()
    }

    /// Whether this buffer's bytes lie in the registered arena (a registered pool's buffer, or
    /// a shared buffer over one), so io_uring can issue its I/O as a fixed-buffer request.
    pub fn is_in_registered_arena(&self) -> bool {
        arena::existing().is_some_and(|arena| arena.contains(self.as_ptr(), self.capacity))
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut buf = IoBuf::with_capacity(len);
        buf.len = len;
        buf
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> IoBuf {
        let mut buf = IoBuf::with_capacity(bytes.len());
        buf.extend_from_slice(bytes);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the length. The bytes newly exposed hold whatever the buffer held before (zeroes
    /// for a fresh buffer, old data for a recycled one), never uninitialised memory.
    ///
    /// Panics if `len > capacity()` (a caller bug, not an input condition).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "IoBuf::set_len {len} > capacity {}",
            self.capacity
        );
        self.len = len;
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `bytes`. Panics if they do not fit in `capacity()` (buffers are sized up front).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        assert!(
            end <= self.capacity,
            "IoBuf overflow: {end} > capacity {}",
            self.capacity
        );
        let start = self.len;
        self.len = end;
        self[start..end].copy_from_slice(bytes);
    }

    /// Sets `len` and zero-fills `[0, len)`.
    pub fn fill_zero(&mut self, len: usize) {
        self.set_len(len);
        self.fill(0);
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The start of the buffer for an operation that fills it (a read), or for an FFI call that
    /// takes a `*mut` for a write (librbd). A shared buffer is never read into: only writes are
    /// given one.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// For `bytes::Bytes::from_owner`: a read buffer shared by the records that keep slices of it.
impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `capacity` initialised bytes and `len <= capacity`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // Internal invariant: a shared buffer's bytes are someone else's (`from_shared`).
        assert!(self.owner.is_none(), "a shared IoBuf is read-only");
        // SAFETY: as in `deref`, and `&mut self` guarantees unique access to an allocation
        // this buffer owns (checked above).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .field("pooled", &self.pool.is_some())
            .field("shared", &self.owner.is_some())
            .field("in_arena", &self.in_arena)
            .finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.owner.is_some() {
            // Shared: the owner (dropped with the fields) frees the bytes.
            return;
        }
        if let Some(pool) = self.pool.take() {
            if pool.capacity == self.capacity {
                let mut free = pool.free.lock().unwrap_or_else(|e| e.into_inner());
                if free.len() < pool.cached_max {
                    free.push(RawBuf {
                        ptr: self.ptr,
                        in_arena: self.in_arena,
                    });
                    return;
                }
            }
        }
        // SAFETY: this buffer owns the allocation alone (not shared, the pool did not take it).
        unsafe { free_allocation(self.ptr, self.capacity, self.in_arena) };
    }
}

/// Frees an owned `IoBuf` allocation of `capacity` bytes: back to the arena, or to the heap.
///
/// # Safety
/// `ptr` is an allocation of `capacity` bytes made by `IoBuf::with_capacity` (`in_arena`
/// false) or carved from the arena by a registered pool (`in_arena` true), and nothing uses it
/// any more.
unsafe fn free_allocation(ptr: NonNull<u8>, capacity: usize, in_arena: bool) {
    if in_arena {
        // Internal invariant: arena buffers exist only once the arena does.
        let arena = arena::existing().expect("an arena buffer without the arena");
        // SAFETY: per this function's contract, the range came from the arena and is unused.
        unsafe { arena.release(ptr, capacity) };
    } else {
        // SAFETY: per this function's contract, `ptr` came from `alloc_zeroed` with exactly
        // this layout (`with_capacity`).
        unsafe { alloc::dealloc(ptr.as_ptr(), layout_for(capacity)) };
    }
}

/// A pooled allocation waiting for reuse.
struct RawBuf {
    ptr: NonNull<u8>,
    in_arena: bool,
}

// SAFETY: a `RawBuf` in the free list is owned by the pool alone.
unsafe impl Send for RawBuf {}

struct PoolShared {
    capacity: usize,
    cached_max: usize,
    /// New buffers come from the registered arena while it has room.
    registered: bool,
    free: Mutex<Vec<RawBuf>>,
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        let free = self.free.get_mut().unwrap_or_else(|e| e.into_inner());
        for raw in free.drain(..) {
            // SAFETY: every pooled pointer came from an `IoBuf` of `self.capacity` bytes that
            // gave it up, with where it was allocated.
            unsafe { free_allocation(raw.ptr, self.capacity, raw.in_arena) };
        }
    }
}

/// A pool of same-sized [`IoBuf`]s. Dropping a buffer from the pool returns it (up to
/// `cached_max` kept); the pool never blocks: when empty, `get` allocates.
#[derive(Clone)]
pub struct BufPool {
    shared: Arc<PoolShared>,
}

impl BufPool {
    /// A pool of heap buffers.
    pub fn new(buf_capacity: usize, cached_max: usize) -> BufPool {
        BufPool::with_arena(buf_capacity, cached_max, false)
    }

    /// A pool whose buffers come from the registered arena while it has room (then from the
    /// heap): for the hot O_DIRECT paths, whose I/O then skips per-request page pinning. The
    /// arena is mapped by the first registered pool that allocates.
    pub fn registered(buf_capacity: usize, cached_max: usize) -> BufPool {
        BufPool::with_arena(buf_capacity, cached_max, true)
    }

    fn with_arena(buf_capacity: usize, cached_max: usize, registered: bool) -> BufPool {
        BufPool {
            shared: Arc::new(PoolShared {
                capacity: round_capacity(buf_capacity),
                cached_max,
                registered,
                free: Mutex::new(Vec::with_capacity(cached_max)),
            }),
        }
    }

    /// Capacity of every buffer from this pool.
    pub fn buf_capacity(&self) -> usize {
        self.shared.capacity
    }

    /// An empty buffer (`len() == 0`) of `buf_capacity()` bytes.
    pub fn get(&self) -> IoBuf {
        let recycled = self
            .shared
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let capacity = self.shared.capacity;
        let carved = || {
            let arena = arena::get_or_map()?;
            let ptr = arena.alloc(capacity)?;
            Some(RawBuf {
                ptr,
                in_arena: true,
            })
        };
        let raw = recycled.or_else(|| self.shared.registered.then(carved).flatten());
        let mut buf = match raw {
            // A recycled or carved allocation is initialised: zeroes from the mapping or
            // whatever a previous buffer held.
            Some(raw) => IoBuf {
                ptr: raw.ptr,
                len: 0,
                capacity,
                pool: None,
                owner: None,
                in_arena: raw.in_arena,
            },
            None => IoBuf::with_capacity(capacity),
        };
        buf.pool = Some(self.shared.clone());
        buf
    }

    /// Buffers currently cached for reuse.
    pub fn cached(&self) -> usize {
        self.shared
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_capacity_and_contents() {
        let buf = IoBuf::from_slice(b"hello");
        assert_eq!(&buf[..], b"hello");
        assert_eq!(buf.capacity(), IO_ALIGN_BYTES);
        assert_eq!(buf.as_ptr() as usize % IO_ALIGN_BYTES, 0);
        let zero = IoBuf::zeroed(10_000);
        assert_eq!(zero.len(), 10_000);
        assert_eq!(zero.capacity(), 3 * IO_ALIGN_BYTES);
        assert!(zero.iter().all(|&b| b == 0));
        let mut grown = IoBuf::with_capacity(0);
        assert!(grown.is_empty());
        grown.set_len(IO_ALIGN_BYTES);
        assert!(grown.iter().all(|&b| b == 0));
    }

    #[test]
    fn pool_recycles_up_to_cached_max() {
        let pool = BufPool::new(8192, 2);
        let mut a = pool.get();
        a.extend_from_slice(&[7; 100]);
        let a_ptr = a.as_ptr();
        let b = pool.get();
        let c = pool.get();
        drop(a);
        drop(b);
        drop(c);
        assert_eq!(pool.cached(), 2);
        let d = pool.get();
        assert!(d.is_empty());
        assert_eq!(d.capacity(), 8192);
        assert_eq!(pool.cached(), 1);
        let e = pool.get();
        assert!(d.as_ptr() == a_ptr || e.as_ptr() == a_ptr);
    }

    #[test]
    fn registered_pools_carve_from_the_arena_and_give_back() {
        let pool = BufPool::registered(3 * IO_ALIGN_BYTES, 1);
        let mut first = pool.get();
        assert!(first.is_in_registered_arena());
        assert_eq!(first.as_ptr() as usize % IO_ALIGN_BYTES, 0);
        assert_eq!(first.capacity(), 3 * IO_ALIGN_BYTES);
        // Fresh arena memory reads as zeroes, like a fresh heap buffer.
        first.set_len(3 * IO_ALIGN_BYTES);
        assert!(first.iter().all(|&b| b == 0));
        first.fill(5);
        let second = pool.get();
        assert!(second.is_in_registered_arena());
        assert_ne!(first.as_ptr(), second.as_ptr());
        let first_ptr = first.as_ptr();
        // One is kept for reuse (its old contents with it), the other goes back to the arena
        // (`arena::tests` checks the bookkeeping).
        drop(first);
        drop(second);
        assert_eq!(pool.cached(), 1);
        let mut reused = pool.get();
        assert_eq!(reused.as_ptr(), first_ptr);
        reused.set_len(IO_ALIGN_BYTES);
        assert!(reused.iter().all(|&b| b == 5));
        // Heap pools and plain buffers stay outside it.
        assert!(!BufPool::new(IO_ALIGN_BYTES, 1)
            .get()
            .is_in_registered_arena());
        assert!(!IoBuf::zeroed(10).is_in_registered_arena());
    }

    #[test]
    fn shared_buffers_wrap_aligned_bytes_without_copying() {
        let pool = BufPool::new(4 * IO_ALIGN_BYTES, 1);
        let mut owned = pool.get();
        owned.set_len(3 * IO_ALIGN_BYTES);
        owned[IO_ALIGN_BYTES..].fill(9);
        let start = owned.as_ptr() as usize;
        let bytes = bytes::Bytes::from_owner(owned);
        let shared = IoBuf::from_shared(bytes.slice(IO_ALIGN_BYTES..)).expect("aligned");
        assert!(shared.is_shared());
        assert_eq!(shared.as_ptr() as usize, start + IO_ALIGN_BYTES);
        assert_eq!(shared.len(), 2 * IO_ALIGN_BYTES);
        assert!(shared.iter().all(|&b| b == 9));
        // Unaligned start, unaligned length, empty: refused, the bytes come back.
        let refused = IoBuf::from_shared(bytes.slice(1..IO_ALIGN_BYTES + 1)).unwrap_err();
        assert_eq!(refused.len(), IO_ALIGN_BYTES);
        assert!(IoBuf::from_shared(bytes.slice(..100)).is_err());
        assert!(IoBuf::from_shared(bytes::Bytes::new()).is_err());
        // The pooled allocation goes back only once every holder has dropped it.
        drop((bytes, refused));
        assert_eq!(pool.cached(), 0);
        drop(shared);
        assert_eq!(pool.cached(), 1);
    }

    #[test]
    #[should_panic(expected = "read-only")]
    fn shared_buffers_refuse_mutation() {
        let mut owned = IoBuf::with_capacity(IO_ALIGN_BYTES);
        owned.set_len(IO_ALIGN_BYTES);
        let mut shared = IoBuf::from_shared(bytes::Bytes::from_owner(owned)).expect("aligned");
        shared[0] = 1;
    }
}
