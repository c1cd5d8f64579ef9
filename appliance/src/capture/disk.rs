//! One protected disk behind its NBD export: the write path that journals every write, trim and
//! zeroing in the order it reaches the disk, the fallback to the dirty-extent bitmap when the
//! journal is full, flushes, and the counters shown in status.
//!
//! Ordering rule: a write's journal sequence is assigned first, then the disk is written.
//! Writes whose byte ranges overlap reach the disk in journal order: each in-flight write is
//! registered, under the same lock that assigns its sequence, with the writes it overlaps, and
//! waits for them before its own disk I/O. Writes that do not overlap run concurrently, as many
//! as the clients keep in flight. Once journaled, a write is carried out even if its client
//! disconnects (the handler is a task of its own), so the journal never holds a write the disk
//! did not receive because a socket closed.
//!
//! Write-behind: a change without FUA of at least [`WRITE_BEHIND_MIN_BYTES`] is answered as
//! soon as it is journaled and registered, while the disk's window ([`WRITE_BEHIND_BYTES_MAX`]
//! by default) has room; its disk write goes on. Reads wait for the overlapping writes in
//! flight and FLUSH for all of them, so a client never sees an answered write missing; a FLUSH
//! after such a write failed at the disk fails. If the process dies first, the disk may lack
//! the write (never flushed, which NBD allows); its record is still held, so the next start
//! resyncs its extent (`daemon::source`).
//! Answering at completion kept only ~3 of fio's 8 1 MiB writes at the device, which this disk
//! runs far slower than 6–7 (benches/RESULTS.md, 2026-11-29).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::capture::bitmap::{BitmapError, DirtyBitmap};
use crate::capture::gate::WriteGate;
use crate::capture::journal_handle::{PendingDiskWrite, SharedJournal};
use crate::control::DiskState;
use crate::core::journal::{JournalError, RecordSpec};
use crate::core::record::{RecordKind, Seq};
use crate::io::disk::{BufPool, Disk, DiskError, IoBuf};
use crate::limits::{self, RECORD_PAYLOAD_BYTES_MAX};

/// What a write-path request changes.
#[derive(Debug)]
pub(crate) enum Change {
    Data(IoBuf),
    Zeroes,
    Trim,
}

impl Change {
    fn record_kind(&self) -> RecordKind {
        match self {
            Change::Data(_) => RecordKind::Write,
            Change::Zeroes => RecordKind::Zero,
            Change::Trim => RecordKind::Trim,
        }
    }
}

/// Told by [`CaptureDisk::apply_answering_early`] when its change may be answered before the
/// disk write completes.
pub(crate) type EarlyAnswer = tokio::sync::oneshot::Sender<()>;

/// Why a capture I/O failed (the client gets EIO; the log gets this).
#[derive(Debug, thiserror::Error)]
pub enum CaptureIoError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    #[error(
        "{failed} write(s) to {export} answered before reaching the disk failed there since \
         the last flush"
    )]
    WriteBehind { export: String, failed: u64 },
    #[error("{operation} task of disk {export} failed: {message}")]
    Task {
        operation: &'static str,
        export: String,
        message: String,
    },
}

/// Writes in flight on one disk, in journal order.
#[derive(Default)]
struct InFlightWrites {
    next_ticket: u64,
    /// (ticket, start, end, completion): the sender is dropped when the write has reached the
    /// disk, which wakes every later overlapping write subscribed to it.
    entries: Vec<(u64, u64, u64, watch::Sender<()>)>,
}

impl InFlightWrites {
    /// Completions of the registered entries that overlap `[start, end)` (all with `None`).
    fn overlapping(&self, range: Option<(u64, u64)>) -> Vec<watch::Receiver<()>> {
        self.entries
            .iter()
            .filter(|(_, other_start, other_end, _)| {
                range.is_none_or(|(start, end)| *other_start < end && start < *other_end)
            })
            .map(|(_, _, _, sender)| sender.subscribe())
            .collect()
    }

    /// Registers `[start, end)` after the entries it overlaps; returns its ticket and their
    /// completions.
    fn register(&mut self, start: u64, end: u64) -> (u64, Vec<watch::Receiver<()>>) {
        let predecessors = self.overlapping(Some((start, end)));
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.entries
            .push((ticket, start, end, watch::channel(()).0));
        (ticket, predecessors)
    }
}

/// Waits until every entry behind `completions` has reached the disk (or failed).
async fn wait_for(completions: Vec<watch::Receiver<()>>) {
    for mut completion in completions {
        // Err means the entry's sender is gone: its write has ended.
        while completion.changed().await.is_ok() {}
    }
}

/// Bytes of journaled writes per disk that may be answered before their disk write completes
/// (see `CaptureDisk::apply_answering_early`). At 1 MiB sequential writes QD8 through fio's
/// nbd engine, answering at completion left ~3 requests at the device and Ferry at 1.9–2.25
/// GB/s; fio alone runs this virtio disk at 2.25–2.30 GB/s with 3.3 requests in flight and
/// 2.43–2.62 with 6.8 (benches/RESULTS.md, 2026-11-29).
pub const WRITE_BEHIND_BYTES_MAX: u32 = 32 << 20;

/// Changes smaller than this are answered when they end: small random writes did not gain from
/// answering early (4 KiB random QD32: 37–48K IOPS against 44–52K answered at the end, and more
/// CPU per write; benches/RESULTS.md, 2026-11-29).
pub const WRITE_BEHIND_MIN_BYTES: u64 = 64 * 1024;

/// Per-second buckets of written bytes over the last few seconds (status: churn rate).
struct ChurnMeter {
    origin: Instant,
    seconds: [u64; CHURN_WINDOW_SECONDS + 1],
    bytes: [u64; CHURN_WINDOW_SECONDS + 1],
}

const CHURN_WINDOW_SECONDS: usize = 5;

impl ChurnMeter {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            seconds: [u64::MAX; CHURN_WINDOW_SECONDS + 1],
            bytes: [0; CHURN_WINDOW_SECONDS + 1],
        }
    }

    fn record(&mut self, bytes: u64) {
        let second = self.origin.elapsed().as_secs();
        let slot = (second % self.seconds.len() as u64) as usize;
        if self.seconds[slot] != second {
            self.seconds[slot] = second;
            self.bytes[slot] = 0;
        }
        self.bytes[slot] += bytes;
    }

    /// Bytes per second over the last complete seconds of the window.
    fn rate(&self) -> f64 {
        let now = self.origin.elapsed().as_secs();
        let window = (CHURN_WINDOW_SECONDS as u64).min(now.max(1));
        let total: u64 = self
            .seconds
            .iter()
            .zip(&self.bytes)
            .filter(|(second, _)| {
                **second != u64::MAX && **second < now && now - **second <= window
            })
            .map(|(_, bytes)| *bytes)
            .sum();
        if now == 0 {
            // Less than a second of history: extrapolate the partial second.
            let elapsed = self.origin.elapsed().as_secs_f64().max(1e-3);
            let partial: u64 = self
                .seconds
                .iter()
                .zip(&self.bytes)
                .filter(|(s, _)| **s == 0)
                .map(|(_, b)| *b)
                .sum();
            return partial as f64 / elapsed;
        }
        total as f64 / window as f64
    }
}

/// Serializes flushes of one disk so that concurrent FLUSH/FUA requests share one fdatasync.
#[derive(Default)]
struct GroupFlush {
    /// Flushes started so far; a flush numbered above the value seen on arrival covers us.
    started: AtomicU64,
    /// Number of the last flush that completed, under the gate.
    completed: tokio::sync::Mutex<u64>,
}

/// Counters and state of one disk, for status.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureStats {
    pub state: DiskState,
    /// Bytes of WRITE payload applied (zeroing and trims are not counted: they carry no data).
    pub bytes_written: u64,
    pub churn_bytes_per_s: f64,
    /// Highest journal sequence this disk appended (0: none yet).
    pub last_sequence: Seq,
    /// Write-path requests (WRITE, TRIM, WRITE_ZEROES) journaled / tracked in the bitmap only.
    pub writes_journaled: u64,
    pub writes_bitmap_only: u64,
    pub dirty_extents: u64,
    pub dirty_bytes: u64,
}

/// What a sync read found.
#[derive(Debug)]
pub enum SyncData {
    /// The extent's bytes, in a buffer of the disk's sync pool (returned to it on drop).
    Bytes(IoBuf),
    /// A hole of a sparse source file: reads as zeros (not read).
    Zero,
}

struct Inner {
    machine: String,
    name: String,
    export_name: String,
    disk_id: u32,
    disk: Disk,
    bitmap: DirtyBitmap,
    journal: SharedJournal,
    in_flight: Mutex<InFlightWrites>,
    state: Mutex<DiskState>,
    bytes_written: AtomicU64,
    last_seq: AtomicU64,
    writes_journaled: AtomicU64,
    writes_bitmap_only: AtomicU64,
    churn: Mutex<ChurnMeter>,
    disk_flush: GroupFlush,
    /// The write gate of the disk's consistency group, once the daemon attached one.
    gate: OnceLock<WriteGate>,
    /// Room for writes answered before they reach the disk, in bytes.
    write_behind: Arc<tokio::sync::Semaphore>,
    /// Writes answered early whose disk write then failed, and how many of them a FLUSH has
    /// reported so far.
    write_behind_failed: AtomicU64,
    write_behind_reported: AtomicU64,
}

/// Buffers of sync reads, reused across the process's disks (the core bounds the reads in
/// flight for all disks together): a fresh 1 MiB allocation per extent cost page faults and
/// zeroing on every read (benches/RESULTS.md, initial replication). The shipper keeps a read's
/// buffer until the target acknowledges the records that hold slices of it, so the pool keeps
/// enough for the reads in flight and the sync backlog of default-sized extents. Registered: the
/// reads are O_DIRECT, and pinning their pages per read cost ~4% of the pair's CPU.
fn sync_bufs() -> &'static BufPool {
    static POOL: OnceLock<BufPool> = OnceLock::new();
    POOL.get_or_init(|| {
        BufPool::registered(
            limits::SYNC_EXTENT_BYTES_MAX,
            limits::SYNC_READS_IN_FLIGHT_MAX
                + limits::SYNC_BACKLOG_BYTES_MAX / limits::SYNC_EXTENT_BYTES_DEFAULT
                + 4,
        )
    })
}

/// Handle on one captured disk; cheap to clone. The daemon reads its stats, the resync reads
/// its disk and bitmap and moves its state.
#[derive(Clone)]
pub struct CaptureDisk {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CaptureDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureDisk")
            .field("export", &self.inner.export_name)
            .field("disk_id", &self.inner.disk_id)
            .field("state", &self.state())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent at each step.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_time_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_nanos() as u64)
        .unwrap_or(0)
}

impl CaptureDisk {
    /// Wraps an open disk. A bitmap that already has dirty extents (an overflow before a
    /// restart) puts the disk in `resync-needed` whatever `initial_state` says.
    pub fn new(
        machine: &str,
        name: &str,
        disk_id: u32,
        disk: Disk,
        bitmap: DirtyBitmap,
        journal: SharedJournal,
        initial_state: DiskState,
    ) -> Self {
        let state = if bitmap.is_clean() {
            initial_state
        } else {
            DiskState::ResyncNeeded
        };
        Self {
            inner: Arc::new(Inner {
                machine: machine.to_owned(),
                name: name.to_owned(),
                export_name: format!("{machine}/{name}"),
                disk_id,
                disk,
                bitmap,
                journal,
                in_flight: Mutex::new(InFlightWrites::default()),
                state: Mutex::new(state),
                bytes_written: AtomicU64::new(0),
                last_seq: AtomicU64::new(0),
                writes_journaled: AtomicU64::new(0),
                writes_bitmap_only: AtomicU64::new(0),
                churn: Mutex::new(ChurnMeter::new()),
                disk_flush: GroupFlush::default(),
                gate: OnceLock::new(),
                write_behind: Arc::new(tokio::sync::Semaphore::new(
                    WRITE_BEHIND_BYTES_MAX as usize,
                )),
                write_behind_failed: AtomicU64::new(0),
                write_behind_reported: AtomicU64::new(0),
            }),
        }
    }

    /// Sets the write-behind window (bytes; 0: every change is answered when it ends). Meant
    /// right after [`CaptureDisk::new`], before the handle is cloned; on a shared handle it
    /// changes nothing.
    pub fn with_write_behind(mut self, bytes: u32) -> Self {
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => {
                inner.write_behind = Arc::new(tokio::sync::Semaphore::new(bytes as usize));
            }
            None => tracing::warn!(
                export = %self.inner.export_name,
                "the write-behind window of a shared disk handle was not changed"
            ),
        }
        self
    }

    pub fn machine(&self) -> &str {
        &self.inner.machine
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `<machine>/<disk>`, the NBD export name.
    pub fn export_name(&self) -> &str {
        &self.inner.export_name
    }

    /// The id stored in this disk's journal records.
    pub fn disk_id(&self) -> u32 {
        self.inner.disk_id
    }

    pub fn size_bytes(&self) -> u64 {
        self.inner.disk.size()
    }

    /// The backing disk (the resync reads dirty extents from it).
    pub fn disk(&self) -> &Disk {
        &self.inner.disk
    }

    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.inner.bitmap
    }

    pub fn journal(&self) -> &SharedJournal {
        &self.inner.journal
    }

    pub fn state(&self) -> DiskState {
        *lock(&self.inner.state)
    }

    /// Moves the disk to `state` (the resync and operator commands do this). Writes are
    /// journaled in every state except `resync-needed`, where they only mark the bitmap.
    pub fn set_state(&self, state: DiskState) {
        *lock(&self.inner.state) = state;
    }

    /// Puts the disk behind its consistency group's write gate (once; later calls are ignored
    /// and return false). Recovery-point cuts close the gate around their marker.
    pub fn attach_gate(&self, gate: WriteGate) -> bool {
        self.inner.gate.set(gate).is_ok()
    }

    pub fn stats(&self) -> CaptureStats {
        let inner = &self.inner;
        CaptureStats {
            state: self.state(),
            bytes_written: inner.bytes_written.load(Ordering::Relaxed),
            churn_bytes_per_s: lock(&inner.churn).rate(),
            last_sequence: inner.last_seq.load(Ordering::Relaxed),
            writes_journaled: inner.writes_journaled.load(Ordering::Relaxed),
            writes_bitmap_only: inner.writes_bitmap_only.load(Ordering::Relaxed),
            dirty_extents: inner.bitmap.dirty_extent_count(),
            dirty_bytes: inner.bitmap.dirty_bytes(),
        }
    }

    /// Reads `length` bytes at `offset` into a buffer of at least that capacity, after every
    /// overlapping write in flight (one answered early must read back).
    pub(crate) async fn read(
        &self,
        offset: u64,
        mut buf: IoBuf,
        length: usize,
    ) -> (Result<(), CaptureIoError>, IoBuf) {
        let end = offset.saturating_add(length as u64);
        let predecessors = lock(&self.inner.in_flight).overlapping(Some((offset, end)));
        wait_for(predecessors).await;
        buf.set_len(length);
        let (result, buf) = self.inner.disk.read_at(offset, buf).await;
        (result.map_err(CaptureIoError::from), buf)
    }

    /// Reads an extent for initial replication, resync or verify, and returns it with its
    /// `seq_floor`: every journaled write at or below that sequence was on the disk when the
    /// read ran. The read registers as in flight like a write: it waits for every overlapping
    /// write registered before it, and overlapping writes registered after it wait for the read,
    /// so the bytes are never torn, and the floor is the journal's last sequence at registration.
    /// An extent in a hole of a sparse source file is not read: `SyncData::Zero`.
    pub async fn read_for_sync(
        &self,
        offset: u64,
        length: u64,
    ) -> (Seq, Result<SyncData, CaptureIoError>) {
        let inner = &self.inner;
        let (ticket, predecessors, seq_floor) = {
            let mut in_flight = lock(&inner.in_flight);
            let (ticket, predecessors) = in_flight.register(offset, offset.saturating_add(length));
            (ticket, predecessors, inner.journal.last_seq())
        };
        let _registration = Registration { inner, ticket };
        wait_for(predecessors).await;
        // Every overlapping write registered before is on the disk, and later ones wait: the
        // hole test sees the same bytes a read would.
        if inner.disk.is_hole(offset, length) {
            return (seq_floor, Ok(SyncData::Zero));
        }
        let Ok(length) = usize::try_from(length) else {
            return (
                seq_floor,
                Err(CaptureIoError::from(DiskError {
                    op: crate::io::disk::DiskOp::Read,
                    path: inner.disk.path().to_path_buf(),
                    offset,
                    len: length,
                    source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                })),
            );
        };
        let buf = if length <= sync_bufs().buf_capacity() {
            let mut buf = sync_bufs().get();
            buf.set_len(length);
            buf
        } else {
            IoBuf::zeroed(length)
        };
        let (result, buf) = inner.disk.read_at(offset, buf).await;
        (
            seq_floor,
            result
                .map(|()| SyncData::Bytes(buf))
                .map_err(CaptureIoError::from),
        )
    }

    /// Applies one write-path request: journal (or bitmap), then disk, in the order described
    /// in the module docs; with `fua`, both are durable when it returns. Returns the buffer of
    /// a data write for reuse.
    #[cfg(test)]
    pub(crate) async fn apply(
        &self,
        offset: u64,
        length: u64,
        change: Change,
        fua: bool,
    ) -> (Result<(), CaptureIoError>, Option<IoBuf>) {
        self.apply_answering_early(offset, length, change, fua, None)
            .await
    }

    /// Applies one write-path request as `apply` does, and may also say through `answer` that
    /// the change can be answered before its disk write completes (write-behind): a change
    /// without FUA of at least [`WRITE_BEHIND_MIN_BYTES`] whose records are in the journal,
    /// while the disk has room in its write-behind window ([`WRITE_BEHIND_BYTES_MAX`]). Until
    /// its disk write ends it stays registered in flight, so reads and later overlapping writes
    /// wait for it, and a FLUSH waits for it and reports its failure; its records stay in the
    /// journal until then too (see `SharedJournal`'s pending disk writes). The future still
    /// runs to the end of the disk write and returns its result.
    pub(crate) async fn apply_answering_early(
        &self,
        offset: u64,
        length: u64,
        change: Change,
        fua: bool,
        answer: Option<EarlyAnswer>,
    ) -> (Result<(), CaptureIoError>, Option<IoBuf>) {
        let inner = &self.inner;
        // A cut holding the group's gate makes the write wait here, before it has a sequence.
        let gate_pass = match inner.gate.get() {
            Some(gate) => Some(gate.pass().await),
            None => None,
        };
        let timestamp_ns = unix_time_ns();
        let (ticket, predecessors, journaled, pending_disk_write) = {
            let mut in_flight = lock(&inner.in_flight);
            let (ticket, predecessors) = in_flight.register(offset, offset + length);
            // The sequence is assigned while the write is registered, so journal order and
            // the order overlapping writes reach the disk are the same.
            let (journaled, pending_disk_write) =
                self.journal_append(&change, offset, length, timestamp_ns);
            (ticket, predecessors, journaled, pending_disk_write)
        };
        drop(gate_pass);
        // Removes the registration however this function ends, waking overlapping successors.
        let _registration = Registration { inner, ticket };

        if journaled.is_none() {
            let bitmap_inner = self.inner.clone();
            let marked = tokio::task::spawn_blocking(move || {
                bitmap_inner.bitmap.mark_durable(offset, length)
            })
            .await
            .unwrap_or_else(|join_error| {
                Err(BitmapError::Invalid {
                    path: self.inner.bitmap.path().to_path_buf(),
                    reason: join_error.to_string(),
                })
            });
            if let Err(error) = marked {
                // The write cannot be tracked, so it must not happen: the client gets EIO.
                let buf = match change {
                    Change::Data(buf) => Some(buf),
                    _ => None,
                };
                return (Err(error.into()), buf);
            }
        }
        // Journaled and registered: answered now if the window has room.
        // Not answered early: `answer` drops here, so the caller stops waiting for it.
        let behind = answer.and_then(|answer| {
            if journaled.is_none() || fua || length < WRITE_BEHIND_MIN_BYTES {
                return None;
            }
            let bytes = u32::try_from(length).unwrap_or(u32::MAX);
            let room = inner
                .write_behind
                .clone()
                .try_acquire_many_owned(bytes)
                .ok()?;
            answer.send(()).is_ok().then_some(room)
        });
        wait_for(predecessors).await;

        let (result, buf) = match change {
            Change::Data(buf) => {
                let (result, buf) = inner.disk.write_at(offset, buf).await;
                (result, Some(buf))
            }
            Change::Zeroes => (inner.disk.write_zeroes(offset, length).await, None),
            Change::Trim => (inner.disk.trim(offset, length).await, None),
        };
        if let Err(error) = &result {
            if journaled.is_some() {
                self.refused_after_journaling(offset, length, error).await;
            }
            if behind.is_some() {
                // Counted before the registration goes, so a FLUSH that waited for this write
                // sees it.
                inner.write_behind_failed.fetch_add(1, Ordering::AcqRel);
                tracing::error!(
                    export = %inner.export_name,
                    %error,
                    "a write answered before it reached the disk failed there ({offset}+{length}); \
                     the next FLUSH answers EIO"
                );
            }
        }
        drop(_registration);
        // Completed or failed: either way nothing of this change is still on its way.
        drop(pending_disk_write);
        drop(behind);
        if let Err(error) = result {
            return (Err(error.into()), buf);
        }
        if buf.is_some() {
            inner.bytes_written.fetch_add(length, Ordering::Relaxed);
            lock(&inner.churn).record(length);
        }
        if fua {
            if let Err(error) = self.make_durable(journaled).await {
                return (Err(error), buf);
            }
        }
        (Ok(()), buf)
    }

    /// The disk refused a change whose records are already in the journal (EIO, ENOSPC on a
    /// thin image): they still ship, so the replica would hold bytes the source disk does not.
    /// The extent goes into the bitmap and the disk to `resync-needed`, and the resync that
    /// follows (after those records, in stream order) sends the disk's actual bytes.
    async fn refused_after_journaling(&self, offset: u64, length: u64, error: &DiskError) {
        let inner = self.inner.clone();
        let marked =
            tokio::task::spawn_blocking(move || inner.bitmap.mark_durable(offset, length)).await;
        let path = self.inner.bitmap.path().display();
        match marked {
            Ok(Ok(())) => {
                let mut state = lock(&self.inner.state);
                // Fenced: the bits resync at failback.
                if *state != DiskState::FailedOver {
                    *state = DiskState::ResyncNeeded;
                }
                tracing::warn!(
                    export = %self.inner.export_name,
                    %error,
                    "the disk refused a journaled change; its extent {offset}+{length} is in \
                     the dirty-extent bitmap {path} and the disk is resync-needed, so the \
                     replica gets the disk's bytes, not the refused ones"
                );
            }
            Ok(Err(bitmap_error)) => tracing::error!(
                export = %self.inner.export_name,
                %error,
                %bitmap_error,
                "the disk refused a journaled change and its extent {offset}+{length} could not \
                 be marked in {path}: the replica may hold the refused bytes until `ferry verify`"
            ),
            Err(join_error) => tracing::error!(
                export = %self.inner.export_name,
                %error,
                %join_error,
                "the disk refused a journaled change and marking its extent {offset}+{length} \
                 in {path} failed: the replica may hold the refused bytes until `ferry verify`"
            ),
        }
    }

    /// Appends the records for one change; `None` when the disk is (or just went) on the
    /// bitmap. With any record appended, also the guard that keeps those records in the
    /// journal until the disk write completes. Called with the in-flight lock held.
    fn journal_append(
        &self,
        change: &Change,
        offset: u64,
        length: u64,
        timestamp_ns: u64,
    ) -> (Option<Seq>, Option<PendingDiskWrite<'_>>) {
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        if *state == DiskState::ResyncNeeded {
            inner.writes_bitmap_only.fetch_add(1, Ordering::Relaxed);
            return (None, None);
        }
        let mut journal = inner.journal.lock();
        let first_seq = journal.last_seq() + 1;
        let kind = change.record_kind();
        let mut last = None;
        let result: Result<(), JournalError> = match change {
            Change::Data(buf) => {
                let chunk_bytes = RECORD_PAYLOAD_BYTES_MAX
                    .min(journal.payload_bytes_max())
                    .max(1);
                let mut chunk_offset = offset;
                buf.chunks(chunk_bytes).try_for_each(|chunk| {
                    let spec = RecordSpec {
                        kind,
                        disk_id: inner.disk_id,
                        offset: chunk_offset,
                        length: chunk.len() as u64,
                        timestamp_ns,
                        payload: chunk,
                    };
                    last = Some(journal.append(&spec)?);
                    chunk_offset += chunk.len() as u64;
                    Ok(())
                })
            }
            Change::Zeroes | Change::Trim => {
                let spec = RecordSpec {
                    kind,
                    disk_id: inner.disk_id,
                    offset,
                    length,
                    timestamp_ns,
                    payload: &[],
                };
                journal.append(&spec).map(|seq| last = Some(seq))
            }
        };
        // Registered before the lock goes, so no release can pass these records first.
        let pending = last.map(|_| inner.journal.disk_write_pending(first_seq));
        drop(journal);
        if let Some(seq) = last {
            inner.journal.note_appended(seq);
            inner.last_seq.fetch_max(seq, Ordering::Relaxed);
        }
        match result {
            Ok(()) => {
                inner.writes_journaled.fetch_add(1, Ordering::Relaxed);
                (last, pending)
            }
            Err(error) => {
                // Records of this change already appended stay (they are true); the bitmap
                // covers the whole change, and every later write, until a resync.
                *state = DiskState::ResyncNeeded;
                inner.writes_bitmap_only.fetch_add(1, Ordering::Relaxed);
                let full = matches!(error, JournalError::Full { .. });
                tracing::warn!(
                    export = %inner.export_name,
                    %error,
                    "{}; disk is now resync-needed and tracks writes in its dirty-extent bitmap {}",
                    if full { "cache journal full" } else { "cache journal append failed" },
                    inner.bitmap.path().display()
                );
                (None, pending)
            }
        }
    }

    /// Makes the journal records up to `journaled` (or all, for FLUSH) and every completed disk
    /// write durable, both flushes running at once.
    async fn make_durable(&self, journaled: Option<Seq>) -> Result<(), CaptureIoError> {
        let journal = async {
            match journaled {
                Some(seq) => self.inner.journal.flush_through(seq).await.map(|_| ()),
                None => Ok(()),
            }
        };
        let (journal_result, disk_result) = tokio::join!(journal, self.flush_disk());
        journal_result?;
        disk_result
    }

    /// NBD FLUSH: every write answered before it (on any connection) is durable when it
    /// returns, in the journal and on the disk: it first waits for the writes in flight, those
    /// answered early among them. Bitmap bits are durable before their writes. A write answered
    /// early whose disk write failed since the last FLUSH makes this one fail.
    pub async fn flush(&self) -> Result<(), CaptureIoError> {
        let inner = &self.inner;
        let in_flight = lock(&inner.in_flight).overlapping(None);
        wait_for(in_flight).await;
        let journal = inner.journal.clone();
        let journal_flush = async move { journal.flush_all().await.map(|_| ()) };
        let (journal_result, disk_result) = tokio::join!(journal_flush, self.flush_disk());
        journal_result?;
        disk_result?;
        let failed = inner.write_behind_failed.load(Ordering::Acquire);
        // Never lowered, so concurrent flushes report each failure once.
        let reported = inner
            .write_behind_reported
            .fetch_max(failed, Ordering::AcqRel);
        if failed > reported {
            return Err(CaptureIoError::WriteBehind {
                export: inner.export_name.clone(),
                failed: failed - reported,
            });
        }
        Ok(())
    }

    async fn flush_disk(&self) -> Result<(), CaptureIoError> {
        let group = &self.inner.disk_flush;
        let wanted = group.started.load(Ordering::Acquire) + 1;
        let mut completed = group.completed.lock().await;
        if *completed >= wanted {
            return Ok(());
        }
        let number = group.started.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner.disk.flush().await?;
        *completed = number;
        Ok(())
    }
}

/// An in-flight write's registration; dropping it marks the write as on the disk.
struct Registration<'a> {
    inner: &'a Inner,
    ticket: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.inner.in_flight);
        if let Some(index) = in_flight
            .entries
            .iter()
            .position(|entry| entry.0 == self.ticket)
        {
            // Order within the vector does not matter: overlap is decided at registration.
            in_flight.entries.swap_remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use tokio::sync::oneshot;

    use super::*;
    use crate::core::journal_mem::MemSegments;
    use crate::io::disk::DiskOptions;

    const DISK_BYTES: u64 = 64 << 20;

    /// A protected disk on a sparse image file in `dir`, with an in-memory journal.
    fn capture_disk(dir: &std::path::Path, read_only: bool) -> CaptureDisk {
        let path = dir.join("d.raw");
        if !path.exists() {
            std::fs::File::create(&path)
                .unwrap()
                .set_len(DISK_BYTES)
                .unwrap();
        }
        let (journal, _) = SharedJournal::open(MemSegments::new(8, 1 << 20)).unwrap();
        let options = DiskOptions {
            read_only,
            ..DiskOptions::default()
        };
        let disk = Disk::open(&path, options).unwrap();
        let bitmap = DirtyBitmap::open(&dir.join("d.bitmap"), DISK_BYTES, 64 << 10).unwrap();
        CaptureDisk::new("m", "d", 7, disk, bitmap, journal, DiskState::Protected)
    }

    /// Registers `[start, end)` as in flight, as a sync read does: overlapping writes wait
    /// for it before their disk I/O until [`release`].
    fn hold(disk: &CaptureDisk, start: u64, end: u64) -> u64 {
        lock(&disk.inner.in_flight).register(start, end).0
    }

    fn release(disk: &CaptureDisk, ticket: u64) {
        drop(Registration {
            inner: &disk.inner,
            ticket,
        });
    }

    fn file_bytes(dir: &std::path::Path, offset: u64, length: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0u8; length];
        let file = std::fs::File::open(dir.join("d.raw")).unwrap();
        file.read_exact_at(&mut bytes, offset).unwrap();
        bytes
    }

    /// Polls `future` once; true while it waits.
    fn pending<F: Future>(future: std::pin::Pin<&mut F>) -> bool {
        let mut context = Context::from_waker(Waker::noop());
        matches!(future.poll(&mut context), Poll::Pending)
    }

    use std::future::Future;

    /// A write whose disk I/O cannot start yet (an overlapping registration holds it) is
    /// answered once journaled; a read and a FLUSH that come after the answer wait for the
    /// disk write, and then see it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journaled_write_is_answered_before_its_disk_write_and_waited_for_after() {
        let dir = tempfile::tempdir().unwrap();
        let disk = capture_disk(dir.path(), false);
        const LENGTH: usize = WRITE_BEHIND_MIN_BYTES as usize;
        let held = hold(&disk, 0, 4096 + LENGTH as u64);
        let (answer, answered) = oneshot::channel();
        let write = tokio::spawn({
            let disk = disk.clone();
            async move {
                let data = Change::Data(IoBuf::from_slice(&[0xab; LENGTH]));
                disk.apply_answering_early(4096, LENGTH as u64, data, false, Some(answer))
                    .await
                    .0
            }
        });
        answered
            .await
            .expect("the write was not answered before its disk write");
        assert_eq!(
            disk.journal().last_seq(),
            1,
            "answered before it was journaled"
        );
        assert_eq!(file_bytes(dir.path(), 4096, LENGTH), vec![0; LENGTH]);

        let mut read = pin!(disk.read(0, IoBuf::with_capacity(8192), 8192));
        let mut flush = pin!(disk.flush());
        assert!(
            pending(read.as_mut()),
            "the read did not wait for the write"
        );
        assert!(
            pending(flush.as_mut()),
            "the FLUSH did not wait for the write"
        );
        // A read elsewhere goes through meanwhile.
        let (elsewhere, _) = disk.read(1 << 20, IoBuf::with_capacity(4096), 4096).await;
        elsewhere.unwrap();
        assert!(pending(read.as_mut()) && pending(flush.as_mut()));
        assert!(!write.is_finished());

        release(&disk, held);
        write.await.unwrap().unwrap();
        flush.await.unwrap();
        let (result, bytes) = read.await;
        result.unwrap();
        assert_eq!(&bytes[..4096], &[0u8; 4096][..]);
        assert_eq!(&bytes[4096..], &[0xab; 4096][..]);
        assert_eq!(file_bytes(dir.path(), 4096, LENGTH), vec![0xab; LENGTH]);
    }

    /// Nothing is answered early with FUA, below the write-behind minimum, nor past the
    /// window: those changes are answered when they end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fua_and_writes_past_the_window_are_answered_when_done() {
        let dir = tempfile::tempdir().unwrap();
        let disk = capture_disk(dir.path(), false);
        let window = u64::from(WRITE_BEHIND_BYTES_MAX);
        assert!(window > 0 && window * 2 <= DISK_BYTES);
        let held = hold(&disk, 0, DISK_BYTES);
        let start = |offset: u64, length: u64, fua: bool| {
            let (answer, answered) = oneshot::channel();
            let disk = disk.clone();
            let task = tokio::spawn(async move {
                disk.apply_answering_early(offset, length, Change::Zeroes, fua, Some(answer))
                    .await
                    .0
            });
            (answered, task)
        };
        // The window, whole, in one zeroing: answered early.
        let (answered, first) = start(0, window, false);
        answered
            .await
            .expect("a change filling the window was not answered early");
        let min = WRITE_BEHIND_MIN_BYTES;
        // With FUA: never early.
        let (answered, fua) = start(window, min, true);
        assert!(answered.await.is_err(), "a FUA change was answered early");
        // The window is full: not early either.
        let (answered, past) = start(window + min, min, false);
        assert!(
            answered.await.is_err(),
            "a change past the window was answered early"
        );
        assert!(!first.is_finished() && !fua.is_finished() && !past.is_finished());
        release(&disk, held);
        for task in [first, fua, past] {
            task.await.unwrap().unwrap();
        }
        // Below the minimum: not early, window or not.
        let (answered, small) = start(0, min - 4096, false);
        assert!(answered.await.is_err(), "a small change was answered early");
        small.await.unwrap().unwrap();
        // The window is free again.
        let (answered, again) = start(0, min, false);
        answered.await.expect("the window did not free up");
        again.await.unwrap().unwrap();
    }

    /// A write answered early whose disk write then fails: the next FLUSH fails and says so,
    /// once; the extent goes to the bitmap (the replica gets the disk's bytes).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_behind_fails_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        capture_disk(dir.path(), false);
        let disk = capture_disk(dir.path(), true);
        let (answer, answered) = oneshot::channel();
        let length = WRITE_BEHIND_MIN_BYTES;
        let data = Change::Data(IoBuf::from_slice(&vec![0xcd; length as usize]));
        let (result, _) = disk
            .apply_answering_early(8192, length, data, false, Some(answer))
            .await;
        answered.await.expect("the write was not answered early");
        assert!(result.is_err(), "a read-only image took a write");
        let error = disk
            .flush()
            .await
            .expect_err("the FLUSH hid the failed write");
        assert!(
            matches!(error, CaptureIoError::WriteBehind { failed: 1, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("m/d"), "{error}");
        disk.flush().await.unwrap();
        assert_eq!(disk.state(), DiskState::ResyncNeeded);
        assert!(disk.bitmap().dirty_extent_count() > 0);
    }
}
