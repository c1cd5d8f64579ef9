//! A failover disk: a recovery-point view (read-only, from the target's replica and undo log)
//! under a writable overlay. Writes, write-zeroes and trims land in a sparse overlay file of the
//! disk's size and set bits in a 4 KiB bitmap; reads take overlay blocks where written, else the
//! view. The replica and the undo log are never written.
//!
//! On RBD the failover's disk is instead an RBD clone that already holds the point
//! ([`FailoverDisk::on_image`], made by `rbd_clone.rs`): every read and write goes to the clone,
//! which a hypervisor can also open directly; the view is kept for materialisation only.
//!
//! Writes not aligned to 4 KiB read-modify-write their edge blocks (under a striped lock, so two
//! sub-block writes into one block both survive). The bitmap is persisted on flush, after the
//! overlay's fdatasync: a bit on disk always names data that is durable in the overlay, so a
//! restart keeps every flushed write and a torn bitmap write loses nothing flushed before it.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::apply::replica::Replica;
use crate::apply::storage::sanitize;
use crate::capture::disk::{Change, EarlyAnswer};
use crate::capture::server::ExportBackend;
use crate::core::nbd::ErrorCode;
use crate::io::disk::{DirectMode, Disk, DiskOptions, IoBuf};
use crate::io::rbd;

/// Overlay granularity: a written block is served from the overlay as a whole.
pub const OVERLAY_BLOCK_BYTES: u64 = 4096;

/// Edge-block locks per disk (striped by block number).
const EDGE_LOCK_STRIPES: usize = 64;

/// Bitmap file header: magic, version, disk size, block size (then the bit words, little endian).
const BITMAP_MAGIC: u64 = u64::from_le_bytes(*b"FRYOVLAY");
const BITMAP_HEADER_BYTES: usize = 32;

/// The read side of a recovery-point view of one disk, as the target's recovery store serves it.
/// Reads are blocking (replica and undo log files); callers run them off the async threads.
pub trait PointDisk: Send + Sync {
    fn size_bytes(&self) -> u64;
    /// Fills `buf` with the disk's bytes at `offset` as they were at the point.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Errors of a failover disk, naming the export and the operation.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("failover disk {export}: read-only, writes are refused")]
    ReadOnly { export: String },
    #[error("failover disk {export}: {operation} of {length} bytes at offset {offset}: {source}")]
    Io {
        export: String,
        operation: &'static str,
        offset: u64,
        length: u64,
        #[source]
        source: io::Error,
    },
    #[error("failover disk {export}: overlay {}: {operation}: {source}", path.display())]
    File {
        export: String,
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A set of 4 KiB blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct BlockSet {
    words: Vec<u64>,
}

impl BlockSet {
    fn new(blocks: u64) -> Self {
        Self {
            words: vec![0; blocks.div_ceil(64) as usize],
        }
    }

    fn contains(&self, block: u64) -> bool {
        self.words
            .get((block / 64) as usize)
            .is_some_and(|word| word & (1 << (block % 64)) != 0)
    }

    fn insert_range(&mut self, first: u64, end: u64) {
        for block in first..end {
            if let Some(word) = self.words.get_mut((block / 64) as usize) {
                *word |= 1 << (block % 64);
            }
        }
    }

    /// Runs of consecutive blocks in the set, as (first block, block count).
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (index, &word) in self.words.iter().enumerate() {
            if word == 0 {
                continue;
            }
            for bit in 0..64 {
                if word & (1 << bit) == 0 {
                    continue;
                }
                let block = index as u64 * 64 + bit;
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == block => *count += 1,
                    _ => runs.push((block, 1)),
                }
            }
        }
        runs
    }
}

struct Inner {
    machine: String,
    name: String,
    export_name: String,
    size_bytes: u64,
    view: Arc<dyn PointDisk>,
    /// The overlay file, or the RBD clone that holds the whole disk (`image_backed`).
    overlay: Replica,
    /// Every block is served from `overlay` (an RBD clone made at the point): no bitmap.
    image_backed: bool,
    overlay_path: PathBuf,
    bitmap_path: PathBuf,
    /// Blocks the overlay holds (persisted on flush).
    written: Mutex<BlockSet>,
    /// Blocks written since the last `take_dirty` (for reprotect).
    dirty: Mutex<BlockSet>,
    bitmap_stale: AtomicBool,
    /// Serialises bitmap writes so an older copy never lands after a newer one.
    bitmap_write: tokio::sync::Mutex<()>,
    read_only: AtomicBool,
    edge_locks: Vec<tokio::sync::Mutex<()>>,
    /// Image-backed: the clone's snapshot of the previous `take_changed` round.
    round_snapshot: Mutex<Option<String>>,
}

/// One disk of a failover: a point view under a writable overlay. Cheap to clone.
#[derive(Clone)]
pub struct FailoverDisk {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FailoverDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverDisk")
            .field("export", &self.inner.export_name)
            .field("overlay", &self.inner.overlay_path)
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FailoverDisk {
    /// Opens the overlay `<dir>/<machine>-<disk>.overlay` (+ `.bitmap`) over `view`. With `fresh`
    /// any previous overlay is discarded; without, a previous overlay of the same size is kept
    /// (a restart of a failed-over group keeps its writes).
    pub fn open(
        dir: &Path,
        machine: &str,
        name: &str,
        view: Arc<dyn PointDisk>,
        fresh: bool,
    ) -> Result<Self, OverlayError> {
        let export_name = format!("{machine}/{name}");
        let size_bytes = view.size_bytes();
        let stem = format!("{}-{}", sanitize(machine), sanitize(name));
        let overlay_path = dir.join(format!("{stem}.overlay"));
        let bitmap_path = dir.join(format!("{stem}.bitmap"));
        let file_error = |path: &Path, operation: &'static str| {
            let (export, path) = (export_name.clone(), path.to_path_buf());
            move |source| OverlayError::File {
                export,
                path,
                operation,
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(file_error(dir, "create directory"))?;
        let blocks = size_bytes.div_ceil(OVERLAY_BLOCK_BYTES);
        let mut written = BlockSet::new(blocks);
        if fresh {
            for path in [&overlay_path, &bitmap_path] {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(file_error(path, "remove")(error)),
                }
            }
        } else {
            match std::fs::read(&bitmap_path) {
                Ok(bytes) => {
                    written = decode_bitmap(&bytes, size_bytes, blocks).map_err(|reason| {
                        file_error(&bitmap_path, "load bitmap")(io::Error::new(
                            io::ErrorKind::InvalidData,
                            reason,
                        ))
                    })?;
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(file_error(&bitmap_path, "read")(error)),
            }
        }
        let overlay = Disk::open(
            &overlay_path,
            DiskOptions {
                direct: DirectMode::Off,
                create_size: Some(size_bytes),
                ..DiskOptions::default()
            },
        )
        .map_err(|error| file_error(&overlay_path, "open")(io::Error::other(error)))?;
        Ok(Self::new(Inner {
            machine: machine.to_owned(),
            name: name.to_owned(),
            export_name,
            size_bytes,
            view,
            overlay: Replica::File(overlay),
            image_backed: false,
            overlay_path,
            bitmap_path,
            written: Mutex::new(written),
            dirty: Mutex::new(BlockSet::new(blocks)),
            bitmap_stale: AtomicBool::new(false),
            bitmap_write: tokio::sync::Mutex::new(()),
            read_only: AtomicBool::new(false),
            edge_locks: Vec::new(),
            round_snapshot: Mutex::new(None),
        }))
    }

    /// A failover disk whose every block lives in `image`, an RBD clone that holds the point's
    /// state (and the failed-over machine's writes since): reads and writes go to the clone;
    /// `read_point` (materialisation) still reads `view`.
    pub fn on_image(
        machine: &str,
        name: &str,
        view: Arc<dyn PointDisk>,
        image: rbd::Image,
    ) -> Self {
        let blocks = image.size().div_ceil(OVERLAY_BLOCK_BYTES);
        let location = PathBuf::from(format!("rbd:{}", image.name()));
        Self::new(Inner {
            machine: machine.to_owned(),
            name: name.to_owned(),
            export_name: format!("{machine}/{name}"),
            size_bytes: image.size(),
            view,
            overlay: Replica::Rbd(image),
            image_backed: true,
            overlay_path: location.clone(),
            bitmap_path: location,
            written: Mutex::new(BlockSet::default()),
            dirty: Mutex::new(BlockSet::new(blocks)),
            bitmap_stale: AtomicBool::new(false),
            bitmap_write: tokio::sync::Mutex::new(()),
            read_only: AtomicBool::new(false),
            edge_locks: Vec::new(),
            round_snapshot: Mutex::new(None),
        })
    }

    fn new(inner: Inner) -> Self {
        Self {
            inner: Arc::new(Inner {
                edge_locks: (0..EDGE_LOCK_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                ..inner
            }),
        }
    }

    /// Whether the disk lives in an RBD clone rather than a local overlay.
    pub fn is_image_backed(&self) -> bool {
        self.inner.image_backed
    }

    pub fn machine(&self) -> &str {
        &self.inner.machine
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `<machine>/<disk>`.
    pub fn export_name(&self) -> &str {
        &self.inner.export_name
    }

    pub fn size_bytes(&self) -> u64 {
        self.inner.size_bytes
    }

    pub fn overlay_path(&self) -> &Path {
        &self.inner.overlay_path
    }

    pub fn bitmap_path(&self) -> &Path {
        &self.inner.bitmap_path
    }

    /// Refuses (true) or accepts (false) writes from now on; requests already running finish.
    pub fn set_read_only(&self, read_only: bool) {
        self.inner.read_only.store(read_only, Ordering::SeqCst);
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.read_only.load(Ordering::SeqCst)
    }

    /// The 4 KiB-aligned runs `(offset, length)` written since the previous call (the first
    /// call: since the failover started or the appliance restarted), clamped to the disk size.
    pub fn take_dirty(&self) -> Vec<(u64, u64)> {
        let blocks = self.inner.size_bytes.div_ceil(OVERLAY_BLOCK_BYTES);
        let taken = std::mem::replace(&mut *lock(&self.inner.dirty), BlockSet::new(blocks));
        taken
            .runs()
            .into_iter()
            .map(|(first, count)| {
                let offset = first * OVERLAY_BLOCK_BYTES;
                let end = ((first + count) * OVERLAY_BLOCK_BYTES).min(self.inner.size_bytes);
                (offset, end - offset)
            })
            .collect()
    }

    /// What changed since the previous call, for reprotect's rounds: [`Self::take_dirty`]; on
    /// an RBD clone also every extent the clone changed since the previous round's snapshot of
    /// it (the first round: every extent the clone holds itself), so writes of a machine booted
    /// from the clone directly, not through the export, are found too. Each round snapshots
    /// the clone (`ferry-reprotect+<n>`) and removes the round's predecessors.
    pub async fn take_changed(&self) -> Result<Vec<(u64, u64)>, OverlayError> {
        let mut ranges = self.take_dirty();
        let Replica::Rbd(image) = &self.inner.overlay else {
            return Ok(ranges);
        };
        let previous = lock(&self.inner.round_snapshot).clone();
        let image = image.clone();
        let (snapshot, changed) =
            tokio::task::spawn_blocking(move || changed_since_round(&image, previous.as_deref()))
                .await
                .map_err(|join| io::Error::other(join.to_string()))
                .and_then(|result| result.map_err(io::Error::other))
                .map_err(|source| {
                    self.io_error(
                        "snapshot and diff the clone",
                        0,
                        self.inner.size_bytes,
                        source,
                    )
                })?;
        *lock(&self.inner.round_snapshot) = Some(snapshot);
        ranges.extend(changed);
        ranges.sort_unstable();
        // Sorted and non-overlapping, as reprotect's callers expect.
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (offset, length) in ranges {
            match merged.last_mut() {
                Some((start, run)) if *start + *run >= offset => {
                    *run = (*run).max(offset + length - *start);
                }
                _ => merged.push((offset, length)),
            }
        }
        Ok(merged)
    }

    /// The point's bytes at `offset`, without the overlay (blocking: run it off the async
    /// threads). Materialisation reads this: the image is the point, whatever was written since.
    pub fn read_point(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.view.read_at(offset, buf)
    }

    /// The disk's current bytes at `offset` (overlay where written, else the point).
    pub async fn read_at(&self, offset: u64, length: usize) -> Result<Vec<u8>, OverlayError> {
        let mut buf = IoBuf::with_capacity(length.max(1));
        buf.set_len(length);
        let (result, buf) = self.read_into(offset, buf).await;
        result.map(|()| buf.to_vec())
    }

    /// Writes `data` at `offset` into the overlay (not durable until `flush`).
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), OverlayError> {
        self.change(
            offset,
            data.len() as u64,
            Change::Data(IoBuf::from_slice(data)),
        )
        .await
        .0
    }

    /// Makes every completed write durable: overlay fdatasync, then the bitmap.
    pub async fn flush(&self) -> Result<(), OverlayError> {
        let inner = &self.inner;
        inner
            .overlay
            .flush()
            .await
            .map_err(|error| self.io_error("fdatasync overlay", 0, 0, io::Error::other(error)))?;
        let _serial = inner.bitmap_write.lock().await;
        if !inner.bitmap_stale.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let bytes = encode_bitmap(&lock(&inner.written), inner.size_bytes);
        let path = inner.bitmap_path.clone();
        let result = tokio::task::spawn_blocking(move || write_bitmap(&path, &bytes))
            .await
            .unwrap_or_else(|error| Err(io::Error::other(error.to_string())));
        if let Err(source) = result {
            inner.bitmap_stale.store(true, Ordering::SeqCst);
            return Err(OverlayError::File {
                export: inner.export_name.clone(),
                path: inner.bitmap_path.clone(),
                operation: "write bitmap",
                source,
            });
        }
        Ok(())
    }

    fn io_error(
        &self,
        operation: &'static str,
        offset: u64,
        length: u64,
        source: io::Error,
    ) -> OverlayError {
        OverlayError::Io {
            export: self.inner.export_name.clone(),
            operation,
            offset,
            length,
            source,
        }
    }

    /// Fills `buf` (its `len()`) from `offset`: segments of overlay blocks from the overlay,
    /// the rest from the view.
    async fn read_into(&self, offset: u64, mut buf: IoBuf) -> (Result<(), OverlayError>, IoBuf) {
        let length = buf.len() as u64;
        if length == 0 {
            return (Ok(()), buf);
        }
        let end = offset + length;
        if end > self.inner.size_bytes {
            let error = self.io_error(
                "read",
                offset,
                length,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "range past the end of the disk",
                ),
            );
            return (Err(error), buf);
        }
        // (start, end, from overlay) segments, computed under the lock, read outside it.
        let segments = {
            let written = lock(&self.inner.written);
            let mut segments: Vec<(u64, u64, bool)> = Vec::new();
            let mut block = offset / OVERLAY_BLOCK_BYTES;
            while block * OVERLAY_BLOCK_BYTES < end {
                let start = (block * OVERLAY_BLOCK_BYTES).max(offset);
                let stop = ((block + 1) * OVERLAY_BLOCK_BYTES).min(end);
                let in_overlay = self.inner.image_backed || written.contains(block);
                match segments.last_mut() {
                    Some(last) if last.2 == in_overlay && last.1 == start => last.1 = stop,
                    _ => segments.push((start, stop, in_overlay)),
                }
                block += 1;
            }
            segments
        };
        if segments.len() == 1 && !segments[0].2 {
            let view = self.inner.view.clone();
            let result = tokio::task::spawn_blocking(move || {
                let result = view.read_at(offset, &mut buf[..]);
                (result, buf)
            })
            .await;
            return match result {
                Ok((Ok(()), buf)) => (Ok(()), buf),
                Ok((Err(source), buf)) => (
                    Err(self.io_error("read point view", offset, length, source)),
                    buf,
                ),
                Err(join) => {
                    let source = io::Error::other(join.to_string());
                    let mut buf = IoBuf::with_capacity(length as usize);
                    buf.set_len(length as usize);
                    (
                        Err(self.io_error("read point view", offset, length, source)),
                        buf,
                    )
                }
            };
        }
        for (start, stop, in_overlay) in segments {
            let part_length = (stop - start) as usize;
            let at = (start - offset) as usize;
            if in_overlay {
                let mut part = IoBuf::with_capacity(part_length);
                part.set_len(part_length);
                let (result, part) = self.inner.overlay.read_at(start, part).await;
                if let Err(error) = result {
                    let source = io::Error::other(error);
                    return (
                        Err(self.io_error("read overlay", start, part_length as u64, source)),
                        buf,
                    );
                }
                buf[at..at + part_length].copy_from_slice(&part);
            } else {
                let view = self.inner.view.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let mut part = vec![0u8; part_length];
                    view.read_at(start, &mut part).map(|()| part)
                })
                .await
                .unwrap_or_else(|join| Err(io::Error::other(join.to_string())));
                match result {
                    Ok(part) => buf[at..at + part_length].copy_from_slice(&part),
                    Err(source) => {
                        return (
                            Err(self.io_error(
                                "read point view",
                                start,
                                part_length as u64,
                                source,
                            )),
                            buf,
                        )
                    }
                }
            }
        }
        (Ok(()), buf)
    }

    /// A write, write-zeroes or trim into the overlay.
    async fn change(
        &self,
        offset: u64,
        length: u64,
        change: Change,
    ) -> (Result<(), OverlayError>, Option<IoBuf>) {
        let data = match change {
            Change::Data(buf) => Some(buf),
            Change::Zeroes | Change::Trim => None,
        };
        if self.is_read_only() {
            return (
                Err(OverlayError::ReadOnly {
                    export: self.inner.export_name.clone(),
                }),
                data,
            );
        }
        if length == 0 {
            return (Ok(()), data);
        }
        let end = offset + length;
        if end > self.inner.size_bytes {
            let source = io::Error::new(io::ErrorKind::InvalidInput, "range past the end");
            return (Err(self.io_error("write", offset, length, source)), data);
        }
        let size = self.inner.size_bytes;
        let first_block = offset / OVERLAY_BLOCK_BYTES;
        let end_block = end.div_ceil(OVERLAY_BLOCK_BYTES);
        let aligned_start = first_block * OVERLAY_BLOCK_BYTES;
        let aligned_end = (end_block * OVERLAY_BLOCK_BYTES).min(size);
        let head_partial = offset != aligned_start;
        let tail_partial = end != aligned_end;
        // Edge blocks that are read-modify-written hold their stripe lock until the bits are
        // set, so two sub-block writes into one block never lose each other.
        let mut stripes: Vec<usize> = Vec::new();
        if head_partial {
            stripes.push((first_block % EDGE_LOCK_STRIPES as u64) as usize);
        }
        if tail_partial {
            stripes.push(((end_block - 1) % EDGE_LOCK_STRIPES as u64) as usize);
        }
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            guards.push(self.inner.edge_locks[stripe].lock().await);
        }

        let result = match &data {
            Some(bytes) if !head_partial && !tail_partial => {
                // Aligned: the caller's buffer goes to the overlay as it is.
                let bytes = IoBuf::from_slice(&bytes[..length as usize]);
                let (result, _) = self.inner.overlay.write_at(offset, bytes).await;
                result.map_err(|error| {
                    self.io_error("write overlay", offset, length, io::Error::other(error))
                })
            }
            _ => {
                self.write_expanded(offset, length, data.as_deref(), aligned_start, aligned_end)
                    .await
            }
        };
        if result.is_ok() {
            if !self.inner.image_backed {
                lock(&self.inner.written).insert_range(first_block, end_block);
                self.inner.bitmap_stale.store(true, Ordering::SeqCst);
            }
            lock(&self.inner.dirty).insert_range(first_block, end_block);
        }
        drop(guards);
        (result, data)
    }

    /// Unaligned writes and all zeroes/trims: edge blocks are read (overlay or view), patched
    /// and written whole; a zeroed aligned middle is zeroed in the overlay without a buffer.
    async fn write_expanded(
        &self,
        offset: u64,
        length: u64,
        data: Option<&[u8]>,
        aligned_start: u64,
        aligned_end: u64,
    ) -> Result<(), OverlayError> {
        let end = offset + length;
        match data {
            Some(bytes) => {
                let total = (aligned_end - aligned_start) as usize;
                let mut block = IoBuf::with_capacity(total);
                block.set_len(total);
                self.fill_edges(&mut block, aligned_start, aligned_end, offset, end)
                    .await?;
                let at = (offset - aligned_start) as usize;
                block[at..at + length as usize].copy_from_slice(&bytes[..length as usize]);
                let (result, _) = self.inner.overlay.write_at(aligned_start, block).await;
                result.map_err(|error| {
                    self.io_error(
                        "write overlay",
                        aligned_start,
                        total as u64,
                        io::Error::other(error),
                    )
                })
            }
            None => {
                // Partial edge blocks: read-modify-write with zeroes; the aligned middle: a
                // zero range in the overlay, no buffer.
                let (edges, (middle_start, middle_end)) =
                    edge_blocks(offset, end, aligned_start, aligned_end);
                for (block_start, block_end) in edges {
                    let total = (block_end - block_start) as usize;
                    let mut block = IoBuf::with_capacity(total);
                    block.set_len(total);
                    let (result, read) = self.read_into(block_start, block).await;
                    result?;
                    let mut block = read;
                    let zero_from = offset.max(block_start);
                    let zero_to = end.min(block_end);
                    block[(zero_from - block_start) as usize..(zero_to - block_start) as usize]
                        .fill(0);
                    let (result, _) = self.inner.overlay.write_at(block_start, block).await;
                    result.map_err(|error| {
                        self.io_error(
                            "write overlay",
                            block_start,
                            total as u64,
                            io::Error::other(error),
                        )
                    })?;
                }
                if middle_end > middle_start {
                    self.inner
                        .overlay
                        .write_zeroes(middle_start, middle_end - middle_start)
                        .await
                        .map_err(|error| {
                            self.io_error(
                                "zero overlay",
                                middle_start,
                                middle_end - middle_start,
                                io::Error::other(error),
                            )
                        })?;
                }
                Ok(())
            }
        }
    }

    /// Reads the partial head and tail blocks of `[aligned_start, aligned_end)` into `block`.
    async fn fill_edges(
        &self,
        block: &mut IoBuf,
        aligned_start: u64,
        aligned_end: u64,
        offset: u64,
        end: u64,
    ) -> Result<(), OverlayError> {
        let (edges, _) = edge_blocks(offset, end, aligned_start, aligned_end);
        for (start, stop) in edges {
            let length = (stop - start) as usize;
            let mut part = IoBuf::with_capacity(length);
            part.set_len(length);
            let (result, part) = self.read_into(start, part).await;
            result?;
            let at = (start - aligned_start) as usize;
            block[at..at + length].copy_from_slice(&part);
        }
        Ok(())
    }
}

impl ExportBackend for FailoverDisk {
    type Error = OverlayError;

    fn export_name(&self) -> &str {
        &self.inner.export_name
    }

    fn read(
        &self,
        offset: u64,
        mut buf: IoBuf,
        length: usize,
    ) -> impl Future<Output = (Result<(), Self::Error>, IoBuf)> + Send {
        buf.set_len(length);
        self.read_into(offset, buf)
    }

    async fn apply(
        &self,
        offset: u64,
        length: u64,
        change: Change,
        fua: bool,
        _answer: EarlyAnswer,
    ) -> (Result<(), Self::Error>, Option<IoBuf>) {
        // Answered when done: reads of the overlay do not wait for changes in flight.
        let (result, buf) = self.change(offset, length, change).await;
        if result.is_ok() && fua {
            return (self.flush().await, buf);
        }
        (result, buf)
    }

    fn flush(&self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        FailoverDisk::flush(self)
    }

    fn is_read_only(&self) -> bool {
        FailoverDisk::is_read_only(self)
    }

    fn error_code(error: &Self::Error) -> ErrorCode {
        match error {
            OverlayError::ReadOnly { .. } => ErrorCode::Perm,
            _ => ErrorCode::Io,
        }
    }
}

/// The prefix of the snapshots reprotect's rounds take of a failover clone.
pub const ROUND_SNAPSHOT_PREFIX: &str = "ferry-reprotect+";

/// Snapshots `image` as the next round and returns that snapshot with the extents changed since
/// `previous` (or, without one or when it is gone, every extent the image holds itself);
/// removes every older round snapshot. Blocking.
fn changed_since_round(
    image: &rbd::Image,
    previous: Option<&str>,
) -> Result<(String, Vec<(u64, u64)>), rbd::RbdError> {
    let existing = image.snapshots()?;
    let rounds: Vec<&str> = existing
        .iter()
        .map(|snapshot| snapshot.name.as_str())
        .filter(|name| name.starts_with(ROUND_SNAPSHOT_PREFIX))
        .collect();
    let next = rounds
        .iter()
        .filter_map(|name| name[ROUND_SNAPSHOT_PREFIX.len()..].parse::<u64>().ok())
        .max()
        .map_or(0, |last| last + 1);
    let name = format!("{ROUND_SNAPSHOT_PREFIX}{next}");
    image.create_snapshot(&name)?;
    let from = previous.filter(|previous| rounds.contains(previous));
    // Head against the previous round: a superset of this round's snapshot against it.
    let changed = image
        .diff(from, 0, image.size(), false)?
        .into_iter()
        .map(|extent| (extent.offset, extent.len))
        .collect();
    for old in rounds {
        image.remove_snapshot(old)?;
    }
    Ok((name, changed))
}

/// The partial edge blocks of `[offset, end)` inside its 4 KiB-aligned hull
/// `[aligned_start, aligned_end)` (one block when both edges fall into the same block), and the
/// whole blocks between them.
fn edge_blocks(
    offset: u64,
    end: u64,
    aligned_start: u64,
    aligned_end: u64,
) -> (Vec<(u64, u64)>, (u64, u64)) {
    let head = (
        aligned_start,
        (aligned_start + OVERLAY_BLOCK_BYTES).min(aligned_end),
    );
    let tail_start = ((end - 1) / OVERLAY_BLOCK_BYTES) * OVERLAY_BLOCK_BYTES;
    let tail = (tail_start, aligned_end);
    let mut edges = Vec::new();
    let mut middle = (aligned_start, aligned_end);
    if offset != aligned_start {
        edges.push(head);
        middle.0 = head.1;
    }
    if end != aligned_end {
        if edges.last() != Some(&tail) {
            edges.push(tail);
        }
        middle.1 = tail.0;
    }
    if middle.1 < middle.0 {
        middle.1 = middle.0;
    }
    (edges, middle)
}

fn encode_bitmap(set: &BlockSet, size_bytes: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(BITMAP_HEADER_BYTES + set.words.len() * 8);
    bytes.extend_from_slice(&BITMAP_MAGIC.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&size_bytes.to_le_bytes());
    bytes.extend_from_slice(&OVERLAY_BLOCK_BYTES.to_le_bytes());
    for word in &set.words {
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes
}

fn decode_bitmap(bytes: &[u8], size_bytes: u64, blocks: u64) -> Result<BlockSet, String> {
    let field = |index: usize| -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
        u64::from_le_bytes(word)
    };
    let words = blocks.div_ceil(64) as usize;
    if bytes.len() != BITMAP_HEADER_BYTES + words * 8 {
        return Err(format!(
            "{} bytes, expected {} for a {size_bytes}-byte disk",
            bytes.len(),
            BITMAP_HEADER_BYTES + words * 8
        ));
    }
    if field(0) != BITMAP_MAGIC || field(1) != 1 {
        return Err("not a Ferry overlay bitmap (magic or version)".into());
    }
    if field(2) != size_bytes || field(3) != OVERLAY_BLOCK_BYTES {
        return Err(format!(
            "made for a {}-byte disk with {}-byte blocks, this disk has {size_bytes} bytes",
            field(2),
            field(3)
        ));
    }
    Ok(BlockSet {
        words: (0..words).map(|index| field(4 + index)).collect(),
    })
}

/// In place + fdatasync: bits are only ever added, so a torn write leaves a set between the old
/// and the new one, each bit of which names flushed overlay data.
fn write_bitmap(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    file.write_all_at(bytes, 0)?;
    file.sync_data()
}

#[cfg(test)]
#[path = "overlay_tests.rs"]
mod tests;
