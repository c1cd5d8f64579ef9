//! Disk engines: io_uring and a pwrite fallback behind one async interface, used by the capture
//! path (source disk reads and writes behind an NBD export) and the apply path (replica writes).
//!
//! # Interface
//! [`Disk::open`] opens a raw image file or a block device and returns a [`Disk`]: cheap to
//! clone, `Send + Sync`, usable from any tokio task. An in-flight read or write owns its
//! [`IoBuf`] and hands it back with the result, `(Result<(), DiskError>, IoBuf)`, so the kernel
//! never writes memory a caller can see, and a caller that drops its future merely lets the
//! engine free the buffer after the kernel is done with it. Requests outside `[0, size)` fail;
//! a disk never grows.
//!
//! # Engines
//! - [`EngineKind::Uring`]: one io_uring per disk on a dedicated thread, up to 64 requests in
//!   flight, completions delivered through tokio oneshot channels (see `uring.rs`).
//! - [`EngineKind::Sync`]: blocking pread/pwrite on four dedicated threads, for hosts where
//!   io_uring is disabled (`kernel.io_uring_disabled`, seccomp) or when asked for.
//!
//! [`EngineChoice::Auto`] tries io_uring and falls back with one log line.
//!
//! # Registered buffers
//! Buffers from a registered pool ([`BufPool::registered`]: the source's sync reads, the
//! target's receive and write pools) are carved from one arena per process that every ring
//! registers once (`arena.rs`); io_uring issues their reads and writes as fixed-buffer requests,
//! so O_DIRECT does not pin their pages per request. Any other buffer works as before, and the
//! thread-pool engine treats arena memory as ordinary memory.
//!
//! # O_DIRECT and unaligned requests
//! With direct I/O on, a disk holds two descriptors of the same inode: one opened with
//! O_DIRECT and one without. A request whose offset and length are multiples of the direct
//! alignment (the logical block size of a block device, 4096 for files; `IoBuf` memory is
//! always 4096-aligned) goes to the O_DIRECT descriptor; any other goes through the page cache
//! on the buffered descriptor. We chose this over read-modify-write with a bounce buffer because
//! RMW of a shared block races with a concurrent write to the *other* part of that block (which
//! callers are allowed to have in flight, since only overlapping byte ranges are serialized by
//! callers), while the page cache merges sub-block writes under its page lock.
//!
//! Coherency: Linux writes back and invalidates the page-cache range of a direct write before
//! issuing it and invalidates it again afterwards, and a direct read writes back dirty cached
//! pages of its range first, so a direct request always sees earlier buffered writes and a later
//! buffered read sees earlier direct writes. `flush` (fdatasync) acts on the inode, so it covers
//! data written through either descriptor. What the engine does not do is order requests that
//! are in flight at the same time: callers must not overlap concurrent writes (or a read with a
//! concurrent write) to the same bytes, exactly as with NBD clients.
//!
//! If opening with O_DIRECT fails with EINVAL (tmpfs and some other filesystems), or a first
//! direct read probe does, [`DirectMode::Auto`] continues buffered; [`DirectMode::On`] fails.
//!
//! # Zeroes and trim
//! Both leave the range reading as zeroes; they differ only in what they ask of storage.
//! `write_zeroes` uses `FALLOC_FL_ZERO_RANGE` (space stays allocated), `trim` uses
//! `FALLOC_FL_PUNCH_HOLE` (space is released). Each falls back to the other mode and then to
//! writing zero buffers when a filesystem or device does not support it. Ferry replicates an NBD
//! TRIM as zeroes, so the source and the replica must read the same after a trim — hence a trim
//! that only "may discard" would be wrong here.

mod arena;
mod buf;
mod pool_engine;
mod sys;
mod uring;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::oneshot;

pub use buf::{BufPool, IoBuf, IO_ALIGN_BYTES};
pub use uring::QUEUE_DEPTH;

use sys::Fds;

/// Which engine to run a disk on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, else the thread-pool engine (logged once).
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// The blocking thread-pool engine.
    Sync,
}

/// Whether to use O_DIRECT for aligned requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirectMode {
    /// O_DIRECT where the filesystem accepts it, buffered elsewhere.
    #[default]
    Auto,
    /// O_DIRECT or fail to open.
    On,
    /// Page cache only.
    Off,
}

/// The engine a disk actually runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Sync,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct DiskOptions {
    pub engine: EngineChoice,
    pub direct: DirectMode,
    pub read_only: bool,
    /// Create a missing image file of this size, or extend a shorter one to it (sparse). An
    /// existing image or device larger than this is an error (a replica never shrinks silently).
    pub create_size: Option<u64>,
}

/// The disk operation that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskOp {
    Open,
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
}

impl fmt::Display for DiskOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskOp::Open => "open",
            DiskOp::Read => "read",
            DiskOp::Write => "write",
            DiskOp::WriteZeroes => "write_zeroes",
            DiskOp::Trim => "trim",
            DiskOp::Flush => "flush",
        })
    }
}

/// A failed disk operation: what, on which disk, where, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("disk {op} of {path} at offset {offset} length {len}: {source}")]
pub struct DiskError {
    pub op: DiskOp,
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    #[source]
    pub source: io::Error,
}

impl DiskError {
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }

    /// The errno, when the kernel reported one (for protocol error replies).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

/// One operation as an engine sees it. Reads and writes own their buffer while in flight.
pub(crate) enum Op {
    Read { offset: u64, buf: IoBuf },
    Write { offset: u64, buf: IoBuf },
    Fallocate { mode: i32, offset: u64, len: u64 },
    Sync,
}

impl Op {
    fn into_buf(self) -> Option<IoBuf> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
            Op::Fallocate { .. } | Op::Sync => None,
        }
    }
}

pub(crate) struct Completion {
    result: io::Result<()>,
    buf: Option<IoBuf>,
}

pub(crate) struct Request {
    op: Op,
    reply: oneshot::Sender<Completion>,
}

/// What every engine provides: take a request, eventually answer on its reply channel.
pub(crate) trait Engine: Send + Sync {
    fn kind(&self) -> EngineKind;
    /// Queues a request; hands it back if the engine has stopped.
    fn submit(&self, request: Request) -> Result<(), Request>;
    /// Whether requests from the registered arena skip page pinning (only io_uring can).
    fn fixed_buffers(&self) -> FixedBuffers {
        FixedBuffers::default()
    }
}

/// A disk's use of the registered buffer arena (`arena.rs`), for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FixedBuffers {
    /// The disk's ring registered the arena: reads and writes from arena memory go as
    /// fixed-buffer requests. Always false on the thread-pool engine.
    pub registered: bool,
    /// Reads and writes (each resubmitted part of a short one too) issued as fixed-buffer
    /// requests so far.
    pub requests: u64,
}

const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// Largest zero buffer the write-zeroes fallback writes at once.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Ways to make a range read as zero, in the order `write_zeroes` / `trim` try them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroMethod {
    ZeroRange,
    PunchHole,
    WriteBuffers,
}

const WRITE_ZEROES_METHODS: [ZeroMethod; 3] = [
    ZeroMethod::ZeroRange,
    ZeroMethod::PunchHole,
    ZeroMethod::WriteBuffers,
];
const TRIM_METHODS: [ZeroMethod; 3] = [
    ZeroMethod::PunchHole,
    ZeroMethod::ZeroRange,
    ZeroMethod::WriteBuffers,
];

struct Inner {
    // Declared first so it drops first: engines finish all in-flight requests before the
    // descriptors below are closed.
    engine: Box<dyn Engine>,
    path: PathBuf,
    size: u64,
    read_only: bool,
    block_device: bool,
    fds: Fds,
    /// Index into WRITE_ZEROES_METHODS / TRIM_METHODS of the first method that worked, so
    /// unsupported modes are tried once per disk, not once per request.
    write_zeroes_method: AtomicU8,
    trim_method: AtomicU8,
    _direct_file: Option<File>,
    _buffered_file: File,
}

/// An open disk (raw image file or block device). Clones share the same engine and descriptors.
#[derive(Clone)]
pub struct Disk {
    inner: Arc<Inner>,
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.inner.path)
            .field("size", &self.inner.size)
            .field("engine", &self.inner.engine.kind())
            .field("direct", &self.inner.fds.direct.is_some())
            .field("read_only", &self.inner.read_only)
            .finish()
    }
}

static URING_FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

impl Disk {
    /// Opens a raw image file or a block device. Blocking (a few syscalls and a thread spawn);
    /// call it at start-up or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>, options: DiskOptions) -> Result<Disk, DiskError> {
        Disk::open_with_ring_entries(path.as_ref(), options, uring::RING_ENTRIES)
    }

    /// `open` with a chosen ring size; tests pass 0 to make ring set-up fail like it does on a
    /// host with io_uring disabled.
    fn open_with_ring_entries(
        path: &Path,
        options: DiskOptions,
        ring_entries: u32,
    ) -> Result<Disk, DiskError> {
        let open_error = |source: io::Error| DiskError {
            op: DiskOp::Open,
            path: path.to_path_buf(),
            offset: 0,
            len: 0,
            source,
        };
        if options.read_only && options.create_size.is_some() {
            return Err(open_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                "create_size cannot be combined with read_only",
            )));
        }
        let open = |direct: bool| {
            let mut open_options = OpenOptions::new();
            open_options
                .read(true)
                .write(!options.read_only)
                .create(options.create_size.is_some() && !direct);
            if direct {
                open_options.custom_flags(libc::O_DIRECT);
            }
            open_options.open(path)
        };
        let mut buffered_file = open(false).map_err(open_error)?;
        let metadata = buffered_file.metadata().map_err(open_error)?;
        let block_device = metadata.file_type().is_block_device();
        if !block_device && !metadata.is_file() {
            return Err(open_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            )));
        }
        let mut size = if block_device {
            // lseek(SEEK_END) reports a block device's size, like BLKGETSIZE64, without an ioctl.
            buffered_file.seek(SeekFrom::End(0)).map_err(open_error)?
        } else {
            metadata.len()
        };
        if let Some(wanted) = options.create_size {
            if size > wanted {
                return Err(open_error(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("existing size {size} is larger than the requested {wanted}"),
                )));
            }
            if size < wanted {
                if block_device {
                    return Err(open_error(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("block device size {size} is smaller than the requested {wanted}"),
                    )));
                }
                buffered_file.set_len(wanted).map_err(open_error)?;
                size = wanted;
            }
        }
        let direct_align = if block_device {
            sys::block_device_logical_block_size(buffered_file.as_raw_fd())
                .map_err(open_error)?
                .max(512)
        } else {
            IO_ALIGN_BYTES as u64
        };
        // IoBuf memory is IO_ALIGN_BYTES-aligned; a device asking for more cannot go direct.
        let direct_possible = direct_align <= IO_ALIGN_BYTES as u64;
        let direct_file = match options.direct {
            DirectMode::Off => None,
            DirectMode::On if !direct_possible => {
                return Err(open_error(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("logical block size {direct_align} exceeds buffer alignment"),
                )))
            }
            DirectMode::Auto if !direct_possible => None,
            DirectMode::On => Some(open(true).map_err(open_error)?),
            DirectMode::Auto => match open(true) {
                Ok(file) if direct_read_works(&file, size, direct_align) => Some(file),
                Ok(_) => {
                    tracing::info!(path = %path.display(), "O_DIRECT reads fail here; using the page cache");
                    None
                }
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %path.display(), "O_DIRECT not supported here; using the page cache");
                    None
                }
                Err(error) => return Err(open_error(error)),
            },
        };
        let fds = Fds {
            direct: direct_file.as_ref().map(|f| f.as_raw_fd()),
            buffered: buffered_file.as_raw_fd(),
            direct_align,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pool = || {
            pool_engine::PoolEngine::new(fds, pool_engine::POOL_THREADS, &name)
                .map(|e| Box::new(e) as Box<dyn Engine>)
        };
        let engine: Box<dyn Engine> = match options.engine {
            EngineChoice::Sync => pool().map_err(open_error)?,
            EngineChoice::Uring => {
                Box::new(uring::UringEngine::new(fds, ring_entries, &name).map_err(open_error)?)
            }
            EngineChoice::Auto => match uring::UringEngine::new(fds, ring_entries, &name) {
                Ok(engine) => Box::new(engine),
                Err(error) => {
                    if !URING_FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(%error, "io_uring unavailable; disks use the thread-pool engine");
                    }
                    pool().map_err(open_error)?
                }
            },
        };
        Ok(Disk {
            inner: Arc::new(Inner {
                engine,
                path: path.to_path_buf(),
                size,
                read_only: options.read_only,
                block_device,
                fds,
                write_zeroes_method: AtomicU8::new(0),
                trim_method: AtomicU8::new(0),
                _direct_file: direct_file,
                _buffered_file: buffered_file,
            }),
        })
    }

    /// Size in bytes, fixed at open.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn engine(&self) -> EngineKind {
        self.inner.engine.kind()
    }

    /// Whether this disk's I/O from registered pools skips per-request page pinning.
    pub fn fixed_buffers(&self) -> FixedBuffers {
        self.inner.engine.fixed_buffers()
    }

    /// Whether aligned requests bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.inner.fds.direct.is_some()
    }

    /// Offset/length alignment that lets a request use O_DIRECT.
    pub fn direct_align(&self) -> u64 {
        self.inner.fds.direct_align
    }

    pub fn is_read_only(&self) -> bool {
        self.inner.read_only
    }

    pub fn is_block_device(&self) -> bool {
        self.inner.block_device
    }

    /// Whether `offset..offset + len` lies in a hole of a sparse file (reads as zeros without
    /// being read): `lseek(SEEK_DATA)` finds no data before its end. `false` whenever the file
    /// system cannot tell (no SEEK_DATA support, a block device, an error). The caller must
    /// keep writes to the range out while it asks (capture's in-flight registration).
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        if self.inner.block_device || len == 0 {
            return false;
        }
        match sys::seek_data(self.inner.fds.buffered, offset) {
            Ok(None) => true,
            Ok(Some(data)) => data >= offset.saturating_add(len),
            Err(_) => false,
        }
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`. The whole range must lie inside the disk.
    pub async fn read_at(&self, offset: u64, buf: IoBuf) -> (Result<(), DiskError>, IoBuf) {
        let len = buf.len() as u64;
        if let Err(error) = self.check(DiskOp::Read, offset, len) {
            return (Err(error), buf);
        }
        if len == 0 {
            return (Ok(()), buf);
        }
        self.run_buf(DiskOp::Read, offset, Op::Read { offset, buf })
            .await
    }

    /// Writes all of `buf` at `offset`. The whole range must lie inside the disk. Durable only
    /// after a later `flush` completes.
    pub async fn write_at(&self, offset: u64, buf: IoBuf) -> (Result<(), DiskError>, IoBuf) {
        let len = buf.len() as u64;
        if let Err(error) = self.check(DiskOp::Write, offset, len) {
            return (Err(error), buf);
        }
        if len == 0 {
            return (Ok(()), buf);
        }
        self.run_buf(DiskOp::Write, offset, Op::Write { offset, buf })
            .await
    }

    /// Makes `[offset, offset + len)` read as zeroes, keeping space allocated where the storage
    /// allows (`FALLOC_FL_ZERO_RANGE`).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero(
            DiskOp::WriteZeroes,
            offset,
            len,
            &WRITE_ZEROES_METHODS,
            &self.inner.write_zeroes_method,
        )
        .await
    }

    /// Discards `[offset, offset + len)`; afterwards the range reads as zeroes (a hole is
    /// punched where the storage allows, `FALLOC_FL_PUNCH_HOLE`). Never a "maybe discard": Ferry
    /// replicates a trim as zeroes.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero(
            DiskOp::Trim,
            offset,
            len,
            &TRIM_METHODS,
            &self.inner.trim_method,
        )
        .await
    }

    /// Makes every completed write, zero and trim durable (fdatasync of the inode).
    pub async fn flush(&self) -> Result<(), DiskError> {
        self.run(Op::Sync)
            .await
            .result
            .map_err(|e| self.error(DiskOp::Flush, 0, 0, e))
    }

    fn error(&self, op: DiskOp, offset: u64, len: u64, source: io::Error) -> DiskError {
        DiskError {
            op,
            path: self.inner.path.clone(),
            offset,
            len,
            source,
        }
    }

    fn check(&self, op: DiskOp, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.inner.read_only && op != DiskOp::Read && op != DiskOp::Flush {
            return Err(self.error(op, offset, len, io::Error::from_raw_os_error(libc::EROFS)));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(self.error(
                op,
                offset,
                len,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range ends past the disk size {}", self.inner.size),
                ),
            )),
        }
    }

    async fn run(&self, op: Op) -> Completion {
        let (reply, receiver) = oneshot::channel();
        match self.inner.engine.submit(Request { op, reply }) {
            Ok(()) => receiver.await.unwrap_or_else(|_| Completion {
                result: Err(io::Error::other("disk engine stopped")),
                buf: None,
            }),
            Err(request) => Completion {
                result: Err(io::Error::other("disk engine stopped")),
                buf: request.op.into_buf(),
            },
        }
    }

    async fn run_buf(
        &self,
        disk_op: DiskOp,
        offset: u64,
        op: Op,
    ) -> (Result<(), DiskError>, IoBuf) {
        let len = match &op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => buf.len(),
            Op::Fallocate { .. } | Op::Sync => 0,
        };
        let completion = self.run(op).await;
        // A buffer only goes missing if an engine thread died mid-request; hand back an
        // equally long one so callers' invariants hold.
        let buf = completion.buf.unwrap_or_else(|| IoBuf::zeroed(len));
        let result = completion
            .result
            .map_err(|e| self.error(disk_op, offset, len as u64, e));
        (result, buf)
    }

    async fn zero(
        &self,
        op: DiskOp,
        offset: u64,
        len: u64,
        methods: &[ZeroMethod; 3],
        chosen: &AtomicU8,
    ) -> Result<(), DiskError> {
        self.check(op, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Block devices only accept fallocate on logical-block-aligned ranges: zero the
        // unaligned head and tail by writing, and fallocate the aligned middle.
        let (middle_start, middle_end) = if self.inner.block_device {
            let align = self.inner.fds.direct_align;
            let start = offset.div_ceil(align) * align;
            let end = (offset + len) / align * align;
            if start >= end {
                return self.write_zero_buffers(op, offset, len).await;
            }
            (start, end)
        } else {
            (offset, offset + len)
        };
        if middle_start > offset {
            self.write_zero_buffers(op, offset, middle_start - offset)
                .await?;
        }
        if offset + len > middle_end {
            self.write_zero_buffers(op, middle_end, offset + len - middle_end)
                .await?;
        }
        let middle_len = middle_end - middle_start;
        let mut index = chosen.load(Ordering::Relaxed) as usize;
        while index < methods.len() {
            let mode = match methods[index] {
                ZeroMethod::ZeroRange => ZERO_RANGE,
                ZeroMethod::PunchHole => PUNCH_HOLE,
                ZeroMethod::WriteBuffers => {
                    return self.write_zero_buffers(op, middle_start, middle_len).await
                }
            };
            let result = self
                .run(Op::Fallocate {
                    mode,
                    offset: middle_start,
                    len: middle_len,
                })
                .await
                .result;
            match result {
                Ok(()) => return Ok(()),
                Err(error) if sys::is_unsupported(&error) => {
                    index += 1;
                    chosen.fetch_max(index as u8, Ordering::Relaxed);
                }
                Err(error) => return Err(self.error(op, middle_start, middle_len, error)),
            }
        }
        // Unreachable in practice: the last method never reports "unsupported".
        Err(self.error(
            op,
            offset,
            len,
            io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        ))
    }

    async fn write_zero_buffers(&self, op: DiskOp, offset: u64, len: u64) -> Result<(), DiskError> {
        let mut zeroes = IoBuf::zeroed(ZERO_CHUNK_BYTES.min(len as usize));
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let chunk = (end - at).min(ZERO_CHUNK_BYTES as u64) as usize;
            zeroes.set_len(chunk);
            let (result, returned) = self
                .run_buf(
                    op,
                    at,
                    Op::Write {
                        offset: at,
                        buf: zeroes,
                    },
                )
                .await;
            result?;
            zeroes = returned;
            at += chunk as u64;
        }
        Ok(())
    }
}

/// Some filesystems accept O_DIRECT at open and refuse it at I/O time; probe one block.
fn direct_read_works(file: &File, size: u64, align: u64) -> bool {
    if size < align {
        return true;
    }
    let mut probe = IoBuf::zeroed(align as usize);
    let fds = Fds {
        direct: Some(file.as_raw_fd()),
        buffered: file.as_raw_fd(),
        direct_align: align,
    };
    match sys::pread_exact(&fds, 0, &mut probe) {
        Ok(()) => true,
        Err(error) => error.raw_os_error() != Some(libc::EINVAL),
    }
}
