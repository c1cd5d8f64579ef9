//! The cache journal's segments as preallocated, memory-mapped files (memmap2): the daemon's
//! `SegmentStore`.
//!
//! A journal directory holds `segment-0000.fjs … segment-NNNN.fjs`, all the same size, and a
//! `lock` file. Files are created with `fallocate` (so that a full filesystem is an error at
//! creation, never a SIGBUS when a dirty page of the mapping is written back), then written with
//! zeros once and fsynced, so that no extent is left "unwritten" for the first lap of appends to
//! convert (ext4/xfs would otherwise add a metadata journal commit to every msync of the first
//! lap), and the directory is fsynced so the names survive a crash. Each file is mapped shared
//! and read-write, advised `MADV_RANDOM`, with its page cache re-read as base pages at open
//! (`cache_as_small_pages`: appends into large folios cost ~12% of capture's CPU);
//! `flush_range` is `msync(MS_SYNC)` of the page-aligned range, which on Linux writes the
//! pages back and syncs the file's data (`vfs_fsync_range`). An exclusive `flock` on
//! the lock file keeps a second process from mapping the same files. See
//! kernel-notes/mmap-msync.md for what this does and does not guarantee.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};
use smallvec::SmallVec;

use crate::core::journal::{Journal, JournalError, RecoveryReport, SegmentStore, StoreError};
use crate::limits::{
    SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MIN, SEGMENT_COUNT_MIN, SEGMENT_HEADER_BYTES,
};

/// Failures of opening or creating a journal directory.
#[derive(Debug, thiserror::Error)]
pub enum MmapJournalError {
    #[error("journal: {operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal at {dir}: {message}")]
    Geometry { dir: PathBuf, message: String },
    #[error("journal at {dir} is in use by another process (lock {lock})")]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("journal at {dir}: {source}")]
    Journal {
        dir: PathBuf,
        #[source]
        source: JournalError,
    },
}

fn io_error<'a>(
    operation: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> MmapJournalError + 'a {
    move |source| MmapJournalError::Io {
        operation,
        path: path.to_owned(),
        source,
    }
}

/// Segment count and size of a journal of (about) `capacity_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalGeometry {
    pub segment_count: usize,
    pub segment_bytes: usize,
}

impl JournalGeometry {
    /// Picks the geometry for a capacity: segments of `SEGMENT_BYTES_DEFAULT` when there is room
    /// for at least four of them, otherwise a quarter of the capacity rounded down to a MiB (but
    /// at least `SEGMENT_BYTES_MIN`), so that releasing one segment gives back a fair share.
    /// The capacity is rounded down to whole segments.
    pub fn for_capacity(capacity_bytes: u64) -> Result<Self, String> {
        const MIB: u64 = 1 << 20;
        let minimum = (SEGMENT_COUNT_MIN * SEGMENT_BYTES_MIN) as u64;
        if capacity_bytes < minimum {
            return Err(format!(
                "journal capacity {capacity_bytes} bytes is below the minimum of {minimum} \
                 ({SEGMENT_COUNT_MIN} segments of {SEGMENT_BYTES_MIN} bytes)"
            ));
        }
        let segment_bytes = if capacity_bytes >= 4 * SEGMENT_BYTES_DEFAULT as u64 {
            SEGMENT_BYTES_DEFAULT as u64
        } else {
            (capacity_bytes / 4 / MIB * MIB).max(SEGMENT_BYTES_MIN as u64)
        };
        let segment_count = capacity_bytes / segment_bytes;
        if segment_count > u32::MAX as u64 {
            return Err(format!(
                "journal capacity {capacity_bytes} bytes needs too many segments"
            ));
        }
        Ok(JournalGeometry {
            segment_count: segment_count as usize,
            segment_bytes: segment_bytes as usize,
        })
    }
}

/// How journal files are created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Write zeros over each new file once (after fallocate) so that the first lap of appends
    /// does not pay for converting unwritten extents. Costs one sequential write of the capacity
    /// at creation.
    pub prezero: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions { prezero: true }
    }
}

/// Opens (creating if needed) the journal in `dir` with the geometry for `capacity_bytes`, and
/// recovers it. Refuses existing files of another geometry unless none of them was ever used.
pub fn open_journal(
    dir: &Path,
    capacity_bytes: u64,
) -> Result<(Journal<MmapSegments>, RecoveryReport), MmapJournalError> {
    open_journal_with(dir, capacity_bytes, CreateOptions::default())
}

/// [`open_journal`] with explicit creation options.
pub fn open_journal_with(
    dir: &Path,
    capacity_bytes: u64,
    options: CreateOptions,
) -> Result<(Journal<MmapSegments>, RecoveryReport), MmapJournalError> {
    let geometry = JournalGeometry::for_capacity(capacity_bytes).map_err(|message| {
        MmapJournalError::Geometry {
            dir: dir.to_owned(),
            message,
        }
    })?;
    let store = MmapSegments::open(dir, geometry, options)?;
    Journal::open(store).map_err(|source| MmapJournalError::Journal {
        dir: dir.to_owned(),
        source,
    })
}

/// Memory-mapped segment files; see the module docs.
pub struct MmapSegments {
    dir: PathBuf,
    segment_bytes: usize,
    maps: Arc<Vec<MmapRaw>>,
    /// The segment files, for `pwritev` appends (`write_parts`).
    files: Vec<File>,
    /// Holds the exclusive flock for as long as the mappings live.
    _lock: File,
}

impl std::fmt::Debug for MmapSegments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmapSegments")
            .field("dir", &self.dir)
            .field("segment_count", &self.maps.len())
            .field("segment_bytes", &self.segment_bytes)
            .finish()
    }
}

/// Path of segment `index` in `dir`.
pub fn segment_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("segment-{index:04}.fjs"))
}

fn parse_segment_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("segment-")?.strip_suffix(".fjs")?;
    if digits.len() < 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl MmapSegments {
    /// Opens or creates the segment files of `geometry` in `dir` and maps them.
    pub fn open(
        dir: &Path,
        geometry: JournalGeometry,
        options: CreateOptions,
    ) -> Result<Self, MmapJournalError> {
        let JournalGeometry {
            segment_count,
            segment_bytes,
        } = geometry;
        fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        let lock = lock_dir(dir)?;

        let mut existing = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
            let entry = entry.map_err(io_error("list", dir))?;
            if let Some(index) = entry.file_name().to_str().and_then(parse_segment_name) {
                let len = entry
                    .metadata()
                    .map_err(io_error("stat", &entry.path()))?
                    .len();
                existing.push((index, len));
            }
        }
        existing.sort_unstable();
        let matches = existing.len() == segment_count
            && existing
                .iter()
                .enumerate()
                .all(|(position, (index, len))| *index == position && *len == segment_bytes as u64);
        if !existing.is_empty() && !matches {
            // Files from an interrupted creation or a journal of another size. If none of them
            // was ever written (blank headers), nothing can be lost by starting over.
            let mut used = Vec::new();
            for (index, _) in &existing {
                if !header_is_blank(&segment_path(dir, *index))? {
                    used.push(*index);
                }
            }
            if !used.is_empty() {
                let found_bytes: u64 = existing.iter().map(|(_, len)| len).sum();
                return Err(MmapJournalError::Geometry {
                    dir: dir.to_owned(),
                    message: format!(
                        "holds {} segment files ({found_bytes} bytes, sizes {:?}) with records, \
                         but the configured capacity needs {segment_count} segments of \
                         {segment_bytes} bytes; configure the capacity it was created with, or \
                         move the directory away once the target has every record",
                        existing.len(),
                        existing
                            .iter()
                            .map(|(_, len)| *len)
                            .collect::<std::collections::BTreeSet<_>>(),
                    ),
                });
            }
            for (index, len) in &existing {
                if *index >= segment_count || *len != segment_bytes as u64 {
                    let path = segment_path(dir, *index);
                    fs::remove_file(&path).map_err(io_error("remove unused", &path))?;
                }
            }
        }

        let mut created = false;
        for index in 0..segment_count {
            let path = segment_path(dir, index);
            if !path.exists() {
                create_segment_file(&path, segment_bytes, options)?;
                created = true;
            }
        }
        if created {
            File::open(dir)
                .and_then(|handle| handle.sync_all())
                .map_err(io_error("fsync directory", dir))?;
        }

        let mut maps = Vec::with_capacity(segment_count);
        let mut files = Vec::with_capacity(segment_count);
        for index in 0..segment_count {
            let path = segment_path(dir, index);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_error("open", &path))?;
            let len = file.metadata().map_err(io_error("stat", &path))?.len();
            if len != segment_bytes as u64 {
                return Err(MmapJournalError::Geometry {
                    dir: dir.to_owned(),
                    message: format!(
                        "{} is {len} bytes, expected {segment_bytes}",
                        path.display()
                    ),
                });
            }
            cache_as_small_pages(&file, segment_bytes);
            let map = MmapOptions::new()
                .len(segment_bytes)
                .map_raw(&file)
                .map_err(io_error("mmap", &path))?;
            // No read-around or readahead on faults: see `cache_as_small_pages`.
            if let Err(error) = map.advise(memmap2::Advice::Random) {
                tracing::debug!(path = %path.display(), %error, "madvise(MADV_RANDOM) refused");
            }
            maps.push(map);
            files.push(file);
        }
        Ok(MmapSegments {
            dir: dir.to_owned(),
            segment_bytes,
            maps: Arc::new(maps),
            files,
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A handle that flushes ranges of these mappings without access to the store (and so
    /// without the journal's lock): see `core::journal`'s docs on two-phase flushing.
    pub fn flusher(&self) -> MmapFlusher {
        MmapFlusher {
            maps: Arc::clone(&self.maps),
        }
    }
}

/// Flushes ranges of a journal's mappings; cheap to clone, usable from any thread. Keeps the
/// mappings alive.
#[derive(Clone)]
pub struct MmapFlusher {
    maps: Arc<Vec<MmapRaw>>,
}

impl MmapFlusher {
    /// `msync(MS_SYNC)` of bytes `[offset, offset + len)` of segment `index`, page-aligned.
    pub fn flush_range(&self, index: usize, offset: usize, len: usize) -> Result<(), StoreError> {
        flush_map(&self.maps, index, offset, len)
    }
}

fn flush_map(maps: &[MmapRaw], index: usize, offset: usize, len: usize) -> Result<(), StoreError> {
    let map = maps.get(index).ok_or_else(|| StoreError {
        operation: "msync",
        segment: index,
        message: format!("no segment {index} (journal has {})", maps.len()),
    })?;
    if len == 0 {
        return Ok(());
    }
    map.flush_range(offset, len).map_err(|error| StoreError {
        operation: "msync",
        segment: index,
        message: format!("bytes {offset}..{}: {error}", offset + len),
    })
}

impl SegmentStore for MmapSegments {
    fn segment_count(&self) -> usize {
        self.maps.len()
    }
    fn segment_bytes(&self) -> usize {
        self.segment_bytes
    }
    fn segment(&self, index: usize) -> &[u8] {
        let map = &self.maps[index];
        // SAFETY: the mapping is `map.len()` bytes long, readable and stays mapped while `self`
        // (which holds an `Arc` of it) lives, which outlives the returned borrow. Within this
        // process the bytes are only written through `segment_mut`, which needs `&mut self`, so
        // no `&mut` to them exists while this `&` does (msync reads them in the kernel, outside
        // Rust's aliasing rules). Other processes are kept out by the exclusive flock; the file
        // is preallocated and never truncated while mapped, so accesses cannot fault (SIGBUS).
        unsafe { std::slice::from_raw_parts(map.as_ptr(), map.len()) }
    }
    fn segment_mut(&mut self, index: usize) -> &mut [u8] {
        let map = &self.maps[index];
        // SAFETY: as in `segment`; additionally `&mut self` guarantees this is the only Rust
        // reference to these bytes for the borrow's lifetime, and the mapping is shared and
        // read-write (`map_raw` of a file opened read-write).
        unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr(), map.len()) }
    }
    /// Appends go through `pwritev` rather than stores into the mapping: after a flush the
    /// kernel write-protects the pages it cleaned, and the next store into each 4 KiB page takes
    /// a fault through `ext4_page_mkwrite` (a jbd2 handle per page), which dominated the append
    /// cost (benches/RESULTS.md). A write to the file lands in the same page cache the mapping
    /// shows, and `msync` of the range (`vfs_fsync_range`) makes it durable like a store would.
    fn write_parts(
        &mut self,
        index: usize,
        offset: usize,
        parts: &[&[u8]],
    ) -> Result<(), StoreError> {
        let file = self.files.get(index).ok_or_else(|| StoreError {
            operation: "pwritev",
            segment: index,
            message: format!("no segment {index} (journal has {})", self.files.len()),
        })?;
        let total: usize = parts.iter().map(|part| part.len()).sum();
        if offset
            .checked_add(total)
            .is_none_or(|end| end > self.segment_bytes)
        {
            return Err(StoreError {
                operation: "pwritev",
                segment: index,
                message: format!(
                    "bytes {offset}..+{total} beyond the segment's {} bytes",
                    self.segment_bytes
                ),
            });
        }
        // Zeros from the record's end to the end of its last page: a buffered write that covers
        // only part of a page that is not in the page cache makes the kernel read that block
        // from the device first (`ext4_block_write_begin`), synchronously and under the
        // journal's lock — on every append once the ring's earlier laps have left the cache.
        // Covering the page whole skips that read. The bytes past a record are free (an older,
        // released lap, or zeros), and the next append overwrites them; recovery reads zeros
        // after the last record as the journal's clean end.
        let end = offset + total;
        let tail_pad = (end.next_multiple_of(TAIL_PAD_BYTES).min(self.segment_bytes) - end)
            .min(ZERO_PAGE.len());
        let padded = parts
            .iter()
            .copied()
            .chain(std::iter::once(&ZERO_PAGE[..tail_pad]));
        pwritev_all(file, padded, offset as u64).map_err(|error| StoreError {
            operation: "pwritev",
            segment: index,
            message: format!("bytes {offset}..{}: {error}", end + tail_pad),
        })
    }
    fn flush_range(&self, index: usize, offset: usize, len: usize) -> Result<(), StoreError> {
        flush_map(&self.maps, index, offset, len)
    }
}

/// The granularity appends are padded to with zeros (the page and block size of x86-64 Linux
/// with ext4 or xfs): see `write_parts`.
const TAIL_PAD_BYTES: usize = 4096;
static ZERO_PAGE: [u8; TAIL_PAD_BYTES] = [0; TAIL_PAD_BYTES];

/// Writes `parts` back to back at `offset` of `file` with `pwritev(2)`, as many calls as a
/// short write needs (no copy into one buffer first, and no heap allocation for the usual
/// handful of parts: this is on the journal's append path, under its lock).
pub(crate) fn pwritev_all<'a>(
    file: &File,
    parts: impl IntoIterator<Item = &'a [u8]>,
    offset: u64,
) -> io::Result<()> {
    let mut slices: SmallVec<[io::IoSlice<'a>; 8]> = parts
        .into_iter()
        .filter(|part| !part.is_empty())
        .map(io::IoSlice::new)
        .collect();
    let total: usize = slices.iter().map(|slice| slice.len()).sum();
    let mut remaining: &mut [io::IoSlice<'_>] = &mut slices;
    let mut at = usize::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond usize"))?;
    let end = at + total;
    // Bounded: every turn writes at least one byte of `total`, or returns.
    while !remaining.is_empty() {
        let written = pwritev(file, remaining, at)?;
        if written == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("wrote nothing at {at} of bytes ..{end}"),
            ));
        }
        at += written;
        io::IoSlice::advance_slices(&mut remaining, written);
    }
    Ok(())
}

/// One `pwritev(2)` of `slices` at `offset`; retried on EINTR.
fn pwritev(file: &File, slices: &[io::IoSlice<'_>], offset: usize) -> io::Result<usize> {
    let count = slices.len().min(1024) as libc::c_int;
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    loop {
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` (std guarantees it on Unix);
        // the pointer and count describe `slices`, which outlives the call; the file descriptor
        // is owned by `file` and open. The kernel only reads the buffers.
        let result = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                slices.as_ptr().cast::<libc::iovec>(),
                count,
                offset,
            )
        };
        if result >= 0 {
            return Ok(result as usize);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

fn lock_dir(dir: &Path) -> Result<File, MmapJournalError> {
    let path = dir.join("lock");
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error("open lock file", &path))?;
    // SAFETY: flock takes a file descriptor that `lock` owns and keeps open; no memory is
    // passed.
    let result = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(MmapJournalError::Locked {
                dir: dir.to_owned(),
                lock: path,
            });
        }
        return Err(MmapJournalError::Io {
            operation: "flock",
            path,
            source: error,
        });
    }
    Ok(lock)
}

fn header_is_blank(path: &Path) -> Result<bool, MmapJournalError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    let len = file.metadata().map_err(io_error("stat", path))?.len();
    if len < SEGMENT_HEADER_BYTES as u64 {
        return Ok(true);
    }
    file.read_exact_at(&mut header, 0)
        .map_err(io_error("read header", path))?;
    Ok(header.iter().all(|byte| *byte == 0))
}

/// Creates one segment file: allocated, optionally zero-written, durable. Built under a
/// temporary name and renamed, so a crash never leaves a short file under the real name.
fn create_segment_file(
    path: &Path,
    segment_bytes: usize,
    options: CreateOptions,
) -> Result<(), MmapJournalError> {
    let temporary = path.with_extension("fjs.new");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temporary)
        .map_err(io_error("create", &temporary))?;
    allocate(&file, segment_bytes as u64).map_err(io_error("fallocate", &temporary))?;
    if options.prezero {
        let zeros = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < segment_bytes {
            let len = zeros.len().min(segment_bytes - offset);
            file.write_all_at(&zeros[..len], offset as u64)
                .map_err(io_error("write zeros to", &temporary))?;
            offset += len;
        }
    }
    file.sync_all().map_err(io_error("fsync", &temporary))?;
    fs::rename(&temporary, path).map_err(io_error("rename into place", path))?;
    Ok(())
}

/// Re-reads `len` bytes of `file` into the page cache as small folios, before the file is
/// mapped: drops its clean pages (`POSIX_FADV_DONTNEED`; dirty ones stay, nothing is lost),
/// then asks for them again (`POSIX_FADV_WILLNEED`, which reads base pages and leaves no
/// readahead marks). ext4 caches a file in large folios (up to 2 MiB) where it was written or
/// read in large pieces — the zeros written at creation, readahead — and a buffered write walks
/// every block of each folio it touches (`ext4_block_write_begin`, `block_commit_write`): 4 KiB
/// records appended into them spent ~12% of the capture path's CPU there (benches/RESULTS.md,
/// 2026-11-29). In small folios, appends overwrite cached pages, and recovery and the first
/// reads of held records find them cached. The mappings are also advised `MADV_RANDOM` (see
/// `MmapSegments::open`), so no fault reads large folios back in. Not repeated per lap: on a
/// live journal `DONTNEED` first starts writeback of every dirty page, records the kernel
/// otherwise never writes (released unflushed, then overwritten), which halved 1 MiB capture
/// (at open that happens at most once, for pages a previous process left dirty). The reads
/// cost ~1.3 s per GiB at open here. Advice only: a failure changes nothing but the speed.
fn cache_as_small_pages(file: &File, len: usize) {
    // `WILLNEED` reads at most the device's readahead window per call; this is the smallest
    // common default (`read_ahead_kb`), so every step is read whole.
    const STEP_BYTES: usize = 128 * 1024;
    let fd = file.as_raw_fd();
    // SAFETY: posix_fadvise takes a descriptor that `file` owns and keeps open, and integers;
    // it touches no memory of this process.
    let _ = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    for offset in (0..len).step_by(STEP_BYTES) {
        let step = STEP_BYTES.min(len - offset);
        // SAFETY: as above.
        let _ = unsafe {
            libc::posix_fadvise(
                fd,
                offset as libc::off_t,
                step as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }
}

/// Reserves `len` bytes of disk for `file`: `fallocate`, or `posix_fallocate` where the
/// filesystem does not support it (glibc then writes the blocks itself).
fn allocate(file: &File, len: u64) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: fallocate takes a descriptor that `file` owns and keeps open, and integers.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(error);
    }
    // SAFETY: as above; posix_fallocate returns the error number instead of setting errno.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::journal::RecordSpec;
    use crate::core::record::RecordKind;

    const MIB: u64 = 1 << 20;

    fn spec(payload: &[u8]) -> RecordSpec<'_> {
        RecordSpec {
            kind: RecordKind::Write,
            disk_id: 3,
            offset: 0,
            length: payload.len() as u64,
            timestamp_ns: 1,
            payload,
        }
    }

    #[test]
    fn geometry_for_capacity() {
        let geometry = |capacity| JournalGeometry::for_capacity(capacity).unwrap();
        assert_eq!(
            geometry(8 * MIB),
            JournalGeometry {
                segment_count: 4,
                segment_bytes: 2 << 20
            }
        );
        assert_eq!(
            geometry(5 * MIB),
            JournalGeometry {
                segment_count: 2,
                segment_bytes: 2 << 20
            }
        );
        assert_eq!(
            geometry(100 * MIB),
            JournalGeometry {
                segment_count: 4,
                segment_bytes: 25 << 20
            }
        );
        assert_eq!(
            geometry(1 << 30),
            JournalGeometry {
                segment_count: 16,
                segment_bytes: 64 << 20
            }
        );
        assert!(JournalGeometry::for_capacity(3 * MIB).is_err());
    }

    #[test]
    fn an_append_zeroes_the_rest_of_its_last_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let payload = vec![0x5a; 100];
        let stale = SEGMENT_HEADER_BYTES + 1024..2 * TAIL_PAD_BYTES;
        {
            let (mut journal, _) = open_journal(&path, 8 * MIB).unwrap();
            assert_eq!(journal.append(&spec(&payload)).unwrap(), 1);
            // Bytes of an older lap after the append point, in the record's page and the next.
            let segment = File::options()
                .write(true)
                .open(segment_path(&path, 0))
                .unwrap();
            segment
                .write_all_at(&vec![0xee; stale.len()], stale.start as u64)
                .unwrap();
            assert_eq!(journal.append(&spec(&payload)).unwrap(), 2);
            let bytes = journal.store().segment(0);
            assert!(
                bytes[stale.start..TAIL_PAD_BYTES].iter().all(|b| *b == 0),
                "the rest of the appended record's page is zeroed"
            );
            assert!(
                bytes[TAIL_PAD_BYTES..stale.end].iter().all(|b| *b == 0xee),
                "the page after it is not written"
            );
            journal.flush(2).unwrap();
        }
        let (journal, report) = open_journal(&path, 8 * MIB).unwrap();
        assert_eq!((report.records_kept, report.bytes_dropped), (2, 0));
        assert_eq!(report.drop_reason, None);
        assert_eq!(journal.record(2).unwrap().payload, &payload[..]);
    }

    #[test]
    fn append_flush_reopen_and_refuse_other_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let payload = vec![0x5a; 4096];
        {
            let (mut journal, report) = open_journal(&path, 8 * MIB).unwrap();
            assert_eq!(report.next_seq, 1);
            for seq in 1..=600 {
                assert_eq!(journal.append(&spec(&payload)).unwrap(), seq);
            }
            journal.flush(600).unwrap();
            // A second opener is refused while this one lives.
            assert!(matches!(
                open_journal(&path, 8 * MIB),
                Err(MmapJournalError::Locked { .. })
            ));
        }
        let (journal, report) = open_journal(&path, 8 * MIB).unwrap();
        assert_eq!(
            (report.records_kept, report.first_seq, report.last_seq),
            (600, 1, 600)
        );
        assert_eq!(journal.record(600).unwrap().payload, &payload[..]);
        drop(journal);
        let error = open_journal(&path, 16 * MIB).unwrap_err();
        assert!(
            matches!(error, MmapJournalError::Geometry { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("configure the capacity"),
            "{error}"
        );
    }

    #[test]
    fn unused_journal_may_change_size() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_journal(dir.path(), 8 * MIB).unwrap());
        let (journal, _) = open_journal(dir.path(), 16 * MIB).unwrap();
        assert_eq!(journal.usage().capacity_bytes, 4 * ((4 << 20) - 64));
        assert!(!segment_path(dir.path(), 7).exists());
    }

    #[test]
    fn flusher_flushes_outside_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = open_journal(dir.path(), 8 * MIB).unwrap();
        let flusher = journal.store().flusher();
        journal.append(&spec(b"abc")).unwrap();
        let plan = journal.begin_flush(1).unwrap();
        let worker = std::thread::spawn(move || {
            let result =
                plan.execute_with(|segment, offset, len| flusher.flush_range(segment, offset, len));
            (plan, result)
        });
        journal.append(&spec(b"def")).unwrap();
        let (plan, result) = worker.join().unwrap();
        assert_eq!(journal.finish_flush(plan, result).unwrap(), 1);
    }
}
