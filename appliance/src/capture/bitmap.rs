//! The persistent dirty-extent bitmap a disk falls back to when the cache journal is full: one
//! bit per fixed-size extent of the disk, in a file under the state dir, so that a later resync
//! copies exactly the extents written while the journal could not hold them.
//!
//! # Crash safety (write-ahead bitmap)
//! A bit is made durable *before* the disk write that needs it is issued, not merely before the
//! write is acknowledged: the kernel may write a page-cache page back to the disk at any moment,
//! so a write that reached the disk but whose bit was lost in a crash would never be resynced
//! and the target would silently differ. Setting an already-set bit costs nothing, so the
//! fdatasync is paid only on the first write to each extent after the overflow (the same idea
//! as md's write-intent bitmap). Concurrent writers share one fdatasync: whoever takes the file
//! lock writes every word changed so far.
//!
//! The file is never rewritten as a whole and carries no checksum on purpose: every state that
//! a torn write can leave behind is safe. A torn *set* means the disk write it guarded was
//! never issued; a torn *clear* leaves bits set, which only costs an extra extent copy.
//!
//! # Clearing during a resync (contract for the resync owner)
//! Writers set the bit before they write the disk. So a resync must, per extent: `clear` the
//! bit (persisted), *then* read the extent from the disk and ship it. A write racing with the
//! copy either landed before the read (the copy carries it) or sets the bit again (the next
//! pass copies it). Reading first and clearing after would lose such a write.
//!
//! File layout: a 64-byte little-endian header (magic, version, extent size, disk size, extent
//! count), then one little-endian u64 per 64 extents, bit `i % 64` of word `i / 64` standing
//! for bytes `[i * extent, (i + 1) * extent)` of the disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First bytes of every bitmap file.
pub const BITMAP_MAGIC: [u8; 8] = *b"FRYBMAP1";
/// Format version; bumped on any incompatible change.
pub const BITMAP_VERSION: u32 = 1;
/// Size of the file header.
pub const BITMAP_HEADER_BYTES: usize = 64;
/// Default extent: 64 KiB, so a 1 TiB disk needs a 2 MiB bitmap and a 4 KiB random write
/// costs at most a 64 KiB resync copy.
pub const EXTENT_BYTES_DEFAULT: u64 = 64 * 1024;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct BitmapHeader {
    magic: [u8; 8],
    version: U32,
    reserved_flags: U32,
    extent_bytes: U64,
    disk_size_bytes: U64,
    extent_count: U64,
    reserved: [u8; 24],
}

const _: () = assert!(core::mem::size_of::<BitmapHeader>() == BITMAP_HEADER_BYTES);

/// A failed bitmap operation: which, on which file, and why.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error("dirty bitmap {operation} of {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("dirty bitmap {path} is not usable: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

struct BitmapState {
    words: Vec<u64>,
    /// Words changed in memory and not yet written to the file: `[lo, hi)`, empty when lo >= hi.
    unpersisted_lo: usize,
    unpersisted_hi: usize,
    dirty_extents: u64,
}

impl BitmapState {
    fn note_changed(&mut self, word: usize) {
        self.unpersisted_lo = self.unpersisted_lo.min(word);
        self.unpersisted_hi = self.unpersisted_hi.max(word + 1);
    }
}

/// One disk's dirty-extent bitmap. `Send + Sync`; methods that touch the file block (call them
/// from `spawn_blocking` in async code).
pub struct DirtyBitmap {
    path: PathBuf,
    extent_bytes: u64,
    disk_size_bytes: u64,
    extent_count: u64,
    state: Mutex<BitmapState>,
    /// Held while writing to the file, so one writer's fdatasync covers the others' bits.
    file: Mutex<File>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("path", &self.path)
            .field("extent_bytes", &self.extent_bytes)
            .field("dirty_extents", &self.dirty_extent_count())
            .finish()
    }
}

impl DirtyBitmap {
    /// `<state_dir>/bitmaps/<machine>__<disk>.bitmap`.
    pub fn path_for(state_dir: &Path, machine: &str, disk: &str) -> PathBuf {
        state_dir
            .join("bitmaps")
            .join(format!("{machine}__{disk}.bitmap"))
    }

    /// Opens the bitmap at `path`, creating it (all clean, durably, parent directory included)
    /// when missing. An existing file must describe the same disk size and extent size.
    pub fn open(path: &Path, disk_size_bytes: u64, extent_bytes: u64) -> Result<Self, BitmapError> {
        let invalid = |reason: String| BitmapError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let io_error = |operation: &'static str| {
            move |source: io::Error| BitmapError::Io {
                operation,
                path: path.to_path_buf(),
                source,
            }
        };
        if extent_bytes == 0 || !extent_bytes.is_power_of_two() {
            return Err(invalid(format!(
                "extent size {extent_bytes} is not a power of two"
            )));
        }
        let extent_count = disk_size_bytes.div_ceil(extent_bytes);
        let word_count = usize::try_from(extent_count.div_ceil(64))
            .map_err(|_| invalid(format!("{extent_count} extents do not fit in memory")))?;
        let file_bytes = BITMAP_HEADER_BYTES as u64 + 8 * word_count as u64;
        let expected = BitmapHeader {
            magic: BITMAP_MAGIC,
            version: BITMAP_VERSION.into(),
            reserved_flags: 0.into(),
            extent_bytes: extent_bytes.into(),
            disk_size_bytes: disk_size_bytes.into(),
            extent_count: extent_count.into(),
            reserved: [0; 24],
        };

        let mut words = vec![0u64; word_count];
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => {
                let mut header_bytes = [0u8; BITMAP_HEADER_BYTES];
                file.read_exact_at(&mut header_bytes, 0)
                    .map_err(io_error("read header"))?;
                let Ok(header) = BitmapHeader::read_from_bytes(&header_bytes) else {
                    return Err(invalid("header unreadable".into()));
                };
                if header.magic != BITMAP_MAGIC || header.version.get() != BITMAP_VERSION {
                    return Err(invalid("bad magic or version".into()));
                }
                if header.extent_bytes.get() != extent_bytes
                    || header.disk_size_bytes.get() != disk_size_bytes
                {
                    return Err(invalid(format!(
                        "made for a {} byte disk with {} byte extents, not {disk_size_bytes} / {extent_bytes}",
                        header.disk_size_bytes.get(),
                        header.extent_bytes.get()
                    )));
                }
                let length = file.metadata().map_err(io_error("stat"))?.len();
                if length < file_bytes {
                    return Err(invalid(format!(
                        "{length} bytes long, expected {file_bytes}"
                    )));
                }
                let mut raw = vec![0u8; 8 * word_count];
                file.read_exact_at(&mut raw, BITMAP_HEADER_BYTES as u64)
                    .map_err(io_error("read bits"))?;
                for (word, bytes) in words.iter_mut().zip(raw.chunks_exact(8)) {
                    *word = u64::from_le_bytes(bytes.try_into().expect("chunks of 8"));
                }
                file
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let parent = path.parent().unwrap_or(Path::new("."));
                std::fs::create_dir_all(parent).map_err(io_error("create directory"))?;
                // Written under a temporary name and renamed, so a crash never leaves a file
                // with a half-written header behind.
                let temporary = path.with_extension("bitmap.new");
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&temporary)
                    .map_err(io_error("create"))?;
                file.set_len(file_bytes).map_err(io_error("size"))?;
                file.write_all_at(expected.as_bytes(), 0)
                    .map_err(io_error("write header"))?;
                file.sync_all().map_err(io_error("fsync"))?;
                std::fs::rename(&temporary, path).map_err(io_error("rename"))?;
                File::open(parent)
                    .and_then(|directory| directory.sync_all())
                    .map_err(io_error("fsync directory"))?;
                file
            }
            Err(error) => return Err(io_error("open")(error)),
        };
        // Bits past the last extent are never set; clear any a damaged file carries.
        if let Some(last) = words.last_mut() {
            let used = extent_count % 64;
            if used != 0 {
                *last &= (1u64 << used) - 1;
            }
        }
        let dirty_extents = words.iter().map(|word| u64::from(word.count_ones())).sum();
        Ok(Self {
            path: path.to_path_buf(),
            extent_bytes,
            disk_size_bytes,
            extent_count,
            state: Mutex::new(BitmapState {
                words,
                unpersisted_lo: usize::MAX,
                unpersisted_hi: 0,
                dirty_extents,
            }),
            file: Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    pub fn extent_count(&self) -> u64 {
        self.extent_count
    }

    /// Extents `[first, last]` touched by `[offset, offset + length)`, clipped to the disk.
    fn extents(&self, offset: u64, length: u64) -> Option<(u64, u64)> {
        if length == 0 || offset >= self.disk_size_bytes {
            return None;
        }
        let end = offset.saturating_add(length).min(self.disk_size_bytes);
        Some((offset / self.extent_bytes, (end - 1) / self.extent_bytes))
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, BitmapState> {
        // A panic while holding the lock leaves the bits valid (each update is one word).
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets the bits of every extent touched by `[offset, offset + length)` in memory. Returns
    /// whether any bit was newly set, i.e. whether [`persist`](Self::persist) must run before
    /// the disk write this mark guards.
    pub fn mark(&self, offset: u64, length: u64) -> bool {
        let Some((first, last)) = self.extents(offset, length) else {
            return false;
        };
        let mut state = self.lock_state();
        let mut newly_set = 0u64;
        for extent in first..=last {
            let (word, bit) = ((extent / 64) as usize, extent % 64);
            if state.words[word] & (1 << bit) == 0 {
                state.words[word] |= 1 << bit;
                state.note_changed(word);
                newly_set += 1;
            }
        }
        state.dirty_extents += newly_set;
        newly_set > 0
    }

    /// Marks every extent (e.g. after an unclean stop, when any recent write may be missing
    /// from the journal). Call `persist` afterwards.
    pub fn mark_all(&self) {
        self.mark(0, self.disk_size_bytes);
    }

    /// Clears the bits of every extent touched by `[offset, offset + length)` in memory; call
    /// `persist` afterwards. See the module docs for when a resync may clear.
    pub fn clear(&self, offset: u64, length: u64) {
        let Some((first, last)) = self.extents(offset, length) else {
            return;
        };
        let mut state = self.lock_state();
        let mut cleared = 0u64;
        for extent in first..=last {
            let (word, bit) = ((extent / 64) as usize, extent % 64);
            if state.words[word] & (1 << bit) != 0 {
                state.words[word] &= !(1 << bit);
                state.note_changed(word);
                cleared += 1;
            }
        }
        state.dirty_extents -= cleared;
    }

    /// Writes every word changed since the last persist and fdatasyncs the file. Blocking.
    /// When it returns Ok, every `mark` that returned before this call began is durable.
    pub fn persist(&self) -> Result<(), BitmapError> {
        let file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (first_word, bytes) = {
            let mut state = self.lock_state();
            if state.unpersisted_lo >= state.unpersisted_hi {
                // Nothing new: a writer holding the file lock before us already wrote our bits
                // (we could only take the lock after its fdatasync finished).
                return Ok(());
            }
            let range = state.unpersisted_lo..state.unpersisted_hi;
            state.unpersisted_lo = usize::MAX;
            state.unpersisted_hi = 0;
            let bytes: Vec<u8> = state.words[range.clone()]
                .iter()
                .flat_map(|word| word.to_le_bytes())
                .collect();
            (range.start, bytes)
        };
        let result = file
            .write_all_at(&bytes, BITMAP_HEADER_BYTES as u64 + 8 * first_word as u64)
            .map_err(|source| BitmapError::Io {
                operation: "write",
                path: self.path.clone(),
                source,
            })
            .and_then(|()| {
                file.sync_data().map_err(|source| BitmapError::Io {
                    operation: "fdatasync",
                    path: self.path.clone(),
                    source,
                })
            });
        if result.is_err() {
            // Not known to be on disk: keep the words pending so the next persist retries.
            let mut state = self.lock_state();
            state.note_changed(first_word);
            let last_word = first_word + bytes.len() / 8 - 1;
            state.note_changed(last_word);
        }
        result
    }

    /// `mark` then, if a bit was newly set, `persist`. Blocking.
    pub fn mark_durable(&self, offset: u64, length: u64) -> Result<(), BitmapError> {
        if self.mark(offset, length) {
            self.persist()?;
        }
        Ok(())
    }

    /// Number of dirty extents.
    pub fn dirty_extent_count(&self) -> u64 {
        self.lock_state().dirty_extents
    }

    /// Bytes of the disk covered by dirty extents (what a resync has to copy at most).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_extents()
            .iter()
            .map(|range| range.end - range.start)
            .sum()
    }

    pub fn is_clean(&self) -> bool {
        self.dirty_extent_count() == 0
    }

    /// Whether the extent holding byte `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let Some((extent, _)) = self.extents(offset, 1) else {
            return false;
        };
        self.lock_state().words[(extent / 64) as usize] & (1 << (extent % 64)) != 0
    }

    /// The dirty byte ranges of the disk, adjacent extents merged, in order, clipped to the
    /// disk size (a snapshot; writes may mark more meanwhile).
    pub fn dirty_extents(&self) -> Vec<Range<u64>> {
        let state = self.lock_state();
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for (word_index, &word) in state.words.iter().enumerate() {
            let mut remaining = word;
            while remaining != 0 {
                let bit = u64::from(remaining.trailing_zeros());
                remaining &= remaining - 1;
                let extent = word_index as u64 * 64 + bit;
                let start = extent * self.extent_bytes;
                let end = (start + self.extent_bytes).min(self.disk_size_bytes);
                match ranges.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => ranges.push(start..end),
                }
            }
        }
        ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTENT: u64 = 64 * 1024;

    #[test]
    fn marks_persist_across_reopen_and_merge_into_ranges() {
        let directory = tempfile::tempdir().unwrap();
        let path = DirtyBitmap::path_for(directory.path(), "web-1", "os");
        let disk_size = 100 * EXTENT + 4096; // a partial last extent
        let bitmap = DirtyBitmap::open(&path, disk_size, EXTENT).unwrap();
        assert!(bitmap.is_clean());
        assert!(bitmap.mark(4096, 512));
        assert!(!bitmap.mark(0, 1), "same extent again is not new");
        assert!(bitmap.mark(EXTENT - 1, 2), "straddles extents 0 and 1");
        assert!(bitmap.mark(10 * EXTENT, 3 * EXTENT));
        assert!(bitmap.mark(100 * EXTENT + 10, 10));
        bitmap.persist().unwrap();
        let expected = vec![
            0..2 * EXTENT,
            10 * EXTENT..13 * EXTENT,
            100 * EXTENT..disk_size,
        ];
        assert_eq!(bitmap.dirty_extents(), expected);
        assert_eq!(bitmap.dirty_extent_count(), 6);
        assert!(bitmap.is_dirty(11 * EXTENT + 7));
        assert!(!bitmap.is_dirty(13 * EXTENT));
        drop(bitmap);

        let reopened = DirtyBitmap::open(&path, disk_size, EXTENT).unwrap();
        assert_eq!(reopened.dirty_extents(), expected);
        reopened.clear(10 * EXTENT, EXTENT);
        reopened.persist().unwrap();
        drop(reopened);
        let again = DirtyBitmap::open(&path, disk_size, EXTENT).unwrap();
        assert_eq!(
            again.dirty_extents(),
            vec![
                0..2 * EXTENT,
                11 * EXTENT..13 * EXTENT,
                100 * EXTENT..disk_size
            ]
        );
        again.mark_all();
        again.persist().unwrap();
        assert_eq!(again.dirty_extents(), vec![0..disk_size]);
        assert_eq!(again.dirty_bytes(), disk_size);
    }

    #[test]
    fn unpersisted_marks_are_not_on_disk_and_mismatches_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("b.bitmap");
        let bitmap = DirtyBitmap::open(&path, 1 << 20, EXTENT).unwrap();
        bitmap.mark_durable(0, 1).unwrap();
        bitmap.mark(5 * EXTENT, 1); // not persisted
        drop(bitmap);
        let reopened = DirtyBitmap::open(&path, 1 << 20, EXTENT).unwrap();
        assert_eq!(reopened.dirty_extents(), vec![0..EXTENT]);
        assert!(matches!(
            DirtyBitmap::open(&path, 2 << 20, EXTENT),
            Err(BitmapError::Invalid { .. })
        ));
        assert!(matches!(
            DirtyBitmap::open(&path, 1 << 20, 4096),
            Err(BitmapError::Invalid { .. })
        ));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(DirtyBitmap::open(&path, 1 << 20, EXTENT).is_err());
        // Out-of-range marks are ignored rather than panicking.
        let other = DirtyBitmap::open(&directory.path().join("c.bitmap"), 1 << 20, EXTENT).unwrap();
        assert!(!other.mark(u64::MAX - 1, 100));
        assert!(!other.mark(0, 0));
        assert!(other.mark(EXTENT, u64::MAX));
        assert_eq!(other.dirty_extents(), vec![EXTENT..1 << 20]);
    }
}
