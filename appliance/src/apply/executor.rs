//! The disk-operation executor of one apply session: runs the target state machine's disk ops
//! in order with many writes in flight, saves before-images for recovery points, and
//! group-commits flushes.
//!
//! Ordering: writes are submitted concurrently unless one overlaps a write still in flight,
//! in which case it waits for those writes first (so overlapping writes reach the replica in
//! sequence order). A read waits for every earlier write. A `Flush { seq }` is not run at
//! once: while more ops are already queued (the source is streaming) they are applied first,
//! up to `GROUP_COMMIT_BYTES_MAX` or `GROUP_COMMIT_DELAY`, and then one commit covers them all:
//! the batch's writes complete, every touched replica is flushed, the applied sequence is
//! persisted. Commits are pipelined: a commit runs as a task of its own while the next batch's
//! writes are issued (one commit at a time, so acknowledgements stay in order), so the replica
//! keeps writing during a flush's device round trip. An op that must see the committing batch's
//! writes (an overlapping write, a read, a before-image save, a marker) waits for that commit.
//!
//! Recovery points: once a marker listed a disk, every write to it first saves the 4 KiB blocks
//! it overwrites that were not saved yet since the disk's last marker (`SavedBlocks`): they are
//! read from the replica after every earlier overlapping write completed, appended to the disk's
//! undo log, and the write is held. Held writes are issued only after one fdatasync of the undo
//! logs made their before-images durable (group commit: when the op queue runs dry, before a
//! flush, a read or a marker, or past `HELD_BYTES_MAX`). A later write overlapping a held write's
//! blocks is held behind it. Markers are recorded in the catalog at the commit that makes them
//! durable, after the replica flush and before the applied sequence is persisted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::catalog::{DiskUndo, RecoveryStore};
use super::replica::Replica;
use super::storage::{AppliedSeqFile, ReplicaRecord};
use super::undo::ENTRY_BYTES_MAX;
use crate::core::record::Seq;
use crate::core::recovery::{PointMarker, UNDO_BLOCK_BYTES};
use crate::core::target::DiskOp;
use crate::io::disk::{BufPool, DiskError, IoBuf};
use crate::limits;

/// What the executor reports to its session.
#[derive(Debug)]
pub enum ExecutorOutput {
    /// Every op up to this flush is durable and the applied sequence persisted.
    Durable(Seq),
    /// The bytes of a `DiskOp::Read`.
    Read { token: u64, data: Vec<u8> },
    /// A disk or storage failure: nothing after the last `Durable` is acknowledged.
    Failed(String),
    /// The executor ended.
    Stopped(String),
}

/// Writes in flight at once per session.
const WRITES_IN_FLIGHT_MAX: usize = 64;

/// Payloads at least this large are copied into a pooled aligned buffer for their write
/// (smaller ones into a fresh one): a fresh 1 MiB buffer was zero-filled and faulted in for
/// every sync extent (benches/RESULTS.md, initial replication).
const POOLED_WRITE_BYTES_MIN: usize = 64 << 10;

/// The aligned buffer a file replica's write of `parts` (one after another) is issued from
/// (O_DIRECT needs the alignment): the one part itself when the session received it aligned (a
/// large record's payload, `FrameReceiver::align_frames`), else a copy of the data.
fn write_buf(mut parts: Vec<Bytes>) -> IoBuf {
    static POOL: std::sync::OnceLock<BufPool> = std::sync::OnceLock::new();
    if parts.len() == 1 {
        match IoBuf::from_shared(parts.remove(0)) {
            Ok(shared) => return shared,
            Err(part) => parts.push(part),
        }
    }
    let len: usize = parts.iter().map(Bytes::len).sum();
    let mut buf = if (POOLED_WRITE_BYTES_MIN..=limits::RECORD_PAYLOAD_BYTES_MAX).contains(&len) {
        POOL.get_or_init(|| {
            BufPool::registered(limits::RECORD_PAYLOAD_BYTES_MAX, WRITES_IN_FLIGHT_MAX + 4)
        })
        .get()
    } else {
        IoBuf::with_capacity(len)
    };
    for part in &parts {
        buf.extend_from_slice(part);
    }
    buf
}

/// Longest write the executor makes of contiguous replica writes queued one behind another,
/// and the alignment it stays within: one RBD object (4 MiB). `rbd import` writes whole
/// objects; 1 MiB sync extents cost the OSD four operations per object.
const MERGED_WRITE_BYTES: u64 = 1 << crate::io::rbd::OBJECT_ORDER;
/// Replica reads (hash requests' extents) the executor runs at once: a full hash scan reads
/// the whole replica, and one 1 MiB read at a time leaves the device mostly idle.
const READS_IN_FLIGHT_MAX: usize = 8;
/// Bytes applied between two flushes while the source keeps streaming.
const GROUP_COMMIT_BYTES_MAX: u64 = 32 << 20;
/// Longest a requested flush waits for more ops.
const GROUP_COMMIT_DELAY: Duration = Duration::from_millis(20);
/// Bytes of held writes (waiting for their before-images to be durable) that trigger an undo
/// sync even while more ops are queued.
const HELD_BYTES_MAX: u64 = 16 << 20;
/// Held writes that trigger an undo sync.
const HELD_WRITES_MAX: usize = 256;
/// Before-image chunks (up to `ENTRY_BYTES_MAX` each) read at once.
const SAVES_IN_FLIGHT_MAX: usize = 32;

pub(super) struct Executor {
    ops: mpsc::Sender<DiskOp>,
    outputs: mpsc::UnboundedReceiver<ExecutorOutput>,
    task: tokio::task::JoinHandle<AppliedSeqFile>,
}

/// What the executor works on: the source's replicas and the shared recovery-point store.
pub(super) struct ExecutorDisks {
    pub replicas: BTreeMap<u32, Replica>,
    pub records: BTreeMap<u32, ReplicaRecord>,
    pub recovery: Arc<RecoveryStore>,
}

impl Executor {
    pub(super) fn spawn(source: String, disks: ExecutorDisks, applied: AppliedSeqFile) -> Executor {
        let (ops, op_receiver) = mpsc::channel(super::DISK_OP_QUEUE_LENGTH);
        let (output_sender, outputs) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(source, disks, applied, op_receiver, output_sender));
        Executor { ops, outputs, task }
    }

    /// Queues an op; false if the executor has stopped.
    pub(super) async fn submit(&mut self, op: DiskOp) -> bool {
        self.ops.send(op).await.is_ok()
    }

    pub(super) async fn recv(&mut self) -> Option<ExecutorOutput> {
        self.outputs.recv().await
    }

    /// Lets queued ops finish (a pending flush included) and returns the applied-sequence file.
    pub(super) async fn finish(self) -> AppliedSeqFile {
        drop(self.ops);
        match self.task.await {
            Ok(applied) => applied,
            Err(join_error) => panic!("apply executor task failed: {join_error}"),
        }
    }
}

/// Replica writes in flight: each task's range, so that an overlapping write waits for it.
struct InFlight {
    writes: JoinSet<Result<(), DiskError>>,
    /// (disk, start, end) of every write in flight, by task.
    ranges: HashMap<tokio::task::Id, (u32, u64, u64)>,
}

impl InFlight {
    fn new() -> Self {
        InFlight {
            writes: JoinSet::new(),
            ranges: HashMap::new(),
        }
    }

    fn overlaps(&self, disk_id: u32, start: u64, end: u64) -> bool {
        ranges_overlap(self.ranges.values(), disk_id, start, end)
    }

    fn spawn(&mut self, disk_id: u32, start: u64, end: u64, write: WriteFuture) {
        let id = self.writes.spawn(write).id();
        self.ranges.insert(id, (disk_id, start, end));
    }

    /// Waits for one write (any); `Ok(false)` when none is in flight.
    async fn join_one(&mut self) -> Result<bool, String> {
        let Some(joined) = self.writes.join_next_with_id().await else {
            return Ok(false);
        };
        match joined {
            Ok((id, result)) => {
                self.ranges.remove(&id);
                result.map_err(|error| error.to_string())?;
            }
            Err(error) => {
                self.ranges.remove(&error.id());
                return Err(error.to_string());
            }
        }
        Ok(true)
    }

    /// Waits until no write in flight overlaps the range.
    async fn wait_clear(&mut self, disk_id: u32, start: u64, end: u64) -> Result<(), String> {
        while self.overlaps(disk_id, start, end) {
            self.join_one().await?;
        }
        Ok(())
    }

    /// Waits for every write in flight; the first error, if any, once all ended.
    async fn drain(&mut self) -> Result<(), String> {
        let mut first_error = None;
        loop {
            match self.join_one().await {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

fn ranges_overlap<'a>(
    ranges: impl IntoIterator<Item = &'a (u32, u64, u64)>,
    disk_id: u32,
    start: u64,
    end: u64,
) -> bool {
    ranges
        .into_iter()
        .any(|&(disk, s, e)| disk == disk_id && start < e && s < end)
}

/// A commit running as its own task: the batch's writes complete, the touched replicas flush,
/// markers are recorded and the applied sequence persisted. It holds the applied-sequence file
/// until it ends.
struct Committing {
    seq: Seq,
    /// Ranges of the batch's writes (possibly still in flight).
    ranges: Vec<(u32, u64, u64)>,
    task: tokio::task::JoinHandle<(AppliedSeqFile, Result<(), String>)>,
}

/// What a write op puts on the replica.
enum Payload {
    /// Slices of received frames (see `Target::handle_frame_shared`), written one after another:
    /// one write op's data, or several contiguous ones merged (`take_contiguous`).
    Data(Vec<Bytes>),
    Zeroes(u64),
}

impl Payload {
    fn len(&self) -> u64 {
        match self {
            Payload::Data(parts) => parts.iter().map(|part| part.len() as u64).sum(),
            Payload::Zeroes(length) => *length,
        }
    }
}

/// Appends to `parts` (a write at `offset` on `disk_id`) the data of the writes queued right
/// behind it that continue it, as long as the whole stays inside one `MERGED_WRITE_BYTES`
/// block; `Flush` ops among them go to `flush` (a flush covers the ops before it, and the
/// merged write is before every later op). Takes only what is queued already, never waits.
/// Returns the first op that does not continue the write, to be run next.
fn take_contiguous(
    ops: &mut mpsc::Receiver<DiskOp>,
    disk_id: u32,
    offset: u64,
    parts: &mut Vec<Bytes>,
    mut flush: impl FnMut(Seq),
) -> Option<DiskOp> {
    let block_end = (offset / MERGED_WRITE_BYTES + 1) * MERGED_WRITE_BYTES;
    let mut end = offset + parts.iter().map(|part| part.len() as u64).sum::<u64>();
    while end < block_end {
        match ops.try_recv().ok()? {
            DiskOp::Flush { seq } => flush(seq),
            DiskOp::Write {
                disk_id: next_disk,
                offset: next_offset,
                data,
                ..
            } if next_disk == disk_id
                && next_offset == end
                && end + data.len() as u64 <= block_end =>
            {
                end += data.len() as u64;
                parts.push(data);
            }
            other => return Some(other),
        }
    }
    None
}

/// Moves the reads queued right behind a read into `reads`, up to [`READS_IN_FLIGHT_MAX`] in
/// all, so they run at once (a hash request asks for up to hundreds of extents); returns the
/// first other op it took, if any. Reads are not reordered with any other op.
fn take_reads(
    ops: &mut mpsc::Receiver<DiskOp>,
    reads: &mut Vec<(u64, u32, u64, u64)>,
) -> Option<DiskOp> {
    while reads.len() < READS_IN_FLIGHT_MAX {
        match ops.try_recv().ok()? {
            DiskOp::Read {
                token,
                disk_id,
                offset,
                length,
            } => reads.push((token, disk_id, offset, length)),
            other => return Some(other),
        }
    }
    None
}

/// A write whose before-images are appended but not durable yet.
struct Held {
    disk_id: u32,
    offset: u64,
    payload: Payload,
    /// The write's range widened to whole undo blocks: a later write into these blocks may rely
    /// on this write's before-images, so it waits behind it.
    block_start: u64,
    block_end: u64,
}

fn block_span(offset: u64, end: u64) -> (u64, u64) {
    (
        offset / UNDO_BLOCK_BYTES * UNDO_BLOCK_BYTES,
        end.div_ceil(UNDO_BLOCK_BYTES) * UNDO_BLOCK_BYTES,
    )
}

struct State {
    source: String,
    replicas: BTreeMap<u32, Replica>,
    records: BTreeMap<u32, ReplicaRecord>,
    recovery: Arc<RecoveryStore>,
    in_flight: InFlight,
    /// Disks whose saving is on, with their undo logs.
    undo: BTreeMap<u32, Arc<DiskUndo>>,
    held: Vec<Held>,
    held_bytes: u64,
    /// Before-image reads and appends of the held writes, running.
    saving: JoinSet<Result<(), String>>,
    /// Disks with undo entries appended since the last undo sync.
    unsynced: BTreeSet<u32>,
    /// Markers applied but not yet recorded in the catalog.
    markers: Vec<(Seq, PointMarker)>,
    touched: BTreeSet<u32>,
    /// The applied-sequence file; `None` while a commit task holds it.
    applied: Option<AppliedSeqFile>,
    committing: Option<Committing>,
    outputs: mpsc::UnboundedSender<ExecutorOutput>,
}

enum Next {
    Op(DiskOp),
    /// Nothing queued right now (or the queue closed while work is pending).
    Idle,
    /// The queue is closed and nothing is pending.
    Closed,
}

async fn run(
    source: String,
    disks: ExecutorDisks,
    applied: AppliedSeqFile,
    mut ops: mpsc::Receiver<DiskOp>,
    outputs: mpsc::UnboundedSender<ExecutorOutput>,
) -> AppliedSeqFile {
    let mut state = State {
        source: source.clone(),
        replicas: disks.replicas,
        records: disks.records,
        recovery: disks.recovery,
        in_flight: InFlight::new(),
        undo: BTreeMap::new(),
        held: Vec::new(),
        held_bytes: 0,
        saving: JoinSet::new(),
        unsynced: BTreeSet::new(),
        markers: Vec::new(),
        touched: BTreeSet::new(),
        applied: Some(applied),
        committing: None,
        outputs: outputs.clone(),
    };
    let mut pending_flush: Option<Seq> = None;
    // An op taken from the queue while merging writes (`take_contiguous`): the next to run.
    let mut peeked: Option<DiskOp> = None;
    let mut bytes_since_flush: u64 = 0;
    let mut flush_requested_at = Instant::now();
    let mut failed = false;

    // Disks whose saving a marker turned on before (their undo directory exists).
    for record in state.records.values() {
        match state.recovery.saving_log(&source, record) {
            Ok(Some(undo)) => {
                state.undo.insert(record.disk_id, undo);
            }
            Ok(None) => {}
            Err(error) => {
                let message = error.to_string();
                tracing::error!(source = %source, "apply failed: {message}");
                failed = true;
                let _ = outputs.send(ExecutorOutput::Failed(message));
                break;
            }
        }
    }

    loop {
        // One commit at a time: a flush requested while one runs waits for it, and the ops
        // behind it keep being applied meanwhile.
        let can_commit = pending_flush.is_some() && state.committing.is_none();
        let flush_due = can_commit
            && (bytes_since_flush >= GROUP_COMMIT_BYTES_MAX
                || flush_requested_at.elapsed() >= GROUP_COMMIT_DELAY);
        let next = if flush_due {
            Next::Idle
        } else if let Some(op) = peeked.take() {
            Next::Op(op)
        } else if can_commit || !state.held.is_empty() {
            match ops.try_recv() {
                Ok(op) => Next::Op(op),
                Err(_) => Next::Idle,
            }
        } else if let Some(committing) = state.committing.as_mut() {
            tokio::select! {
                op = ops.recv() => match op {
                    Some(op) => Next::Op(op),
                    // Closed: the commit is awaited below before the executor ends.
                    None => Next::Closed,
                },
                joined = &mut committing.task => {
                    if let Err(message) = state.complete_commit(joined) {
                        failed = true;
                        pending_flush = None;
                        state.fail(message);
                    }
                    continue;
                }
            }
        } else {
            match ops.recv().await {
                Some(op) => Next::Op(op),
                None => Next::Closed,
            }
        };
        let op = match next {
            Next::Op(op) => op,
            Next::Idle => {
                let outcome = if failed {
                    Ok(())
                } else if let (Some(seq), true) = (pending_flush, state.committing.is_none()) {
                    pending_flush = None;
                    bytes_since_flush = 0;
                    state.start_commit(seq).await
                } else {
                    state.release_held().await
                };
                if let Err(message) = outcome {
                    failed = true;
                    pending_flush = None;
                    state.fail(message);
                }
                continue;
            }
            Next::Closed => {
                let _ = state.wait_commit().await;
                let _ = state.in_flight.drain().await;
                let _ = outputs.send(ExecutorOutput::Stopped("session ended".into()));
                return state
                    .applied
                    .take()
                    .expect("the applied-sequence file is back once no commit runs");
            }
        };
        if failed {
            // After a failure nothing more is applied or acknowledged; the source resends from
            // the last durable sequence on its next connection.
            continue;
        }
        let outcome = match op {
            DiskOp::Write {
                seq,
                disk_id,
                offset,
                data,
            } => {
                let mut parts = vec![data];
                if state.merges_writes(disk_id) {
                    peeked = take_contiguous(&mut ops, disk_id, offset, &mut parts, |seq| {
                        if pending_flush.is_none() {
                            flush_requested_at = Instant::now();
                        }
                        pending_flush = Some(seq);
                    });
                }
                let payload = Payload::Data(parts);
                bytes_since_flush += payload.len();
                state.write(seq, disk_id, offset, payload).await
            }
            DiskOp::Zero {
                seq,
                disk_id,
                offset,
                length,
            } => {
                state
                    .write(seq, disk_id, offset, Payload::Zeroes(length))
                    .await
            }
            DiskOp::Marker { seq, payload } => state.marker(seq, &payload).await,
            DiskOp::Flush { seq } => {
                if pending_flush.is_none() {
                    flush_requested_at = Instant::now();
                }
                pending_flush = Some(seq);
                Ok(())
            }
            DiskOp::Read {
                token,
                disk_id,
                offset,
                length,
            } => {
                let mut reads = vec![(token, disk_id, offset, length)];
                peeked = take_reads(&mut ops, &mut reads);
                state.read(&reads).await.map(|datas| {
                    for ((token, ..), data) in reads.iter().zip(datas) {
                        let _ = outputs.send(ExecutorOutput::Read {
                            token: *token,
                            data,
                        });
                    }
                })
            }
        };
        if let Err(message) = outcome {
            failed = true;
            pending_flush = None;
            state.fail(message);
        }
    }
}

impl State {
    /// The executor stops applying: logs why, drops what was held for a later commit and
    /// reports the failure (the session ends; nothing after it is acknowledged).
    fn fail(&mut self, message: String) {
        tracing::error!(source = %self.source, "apply failed: {message}");
        self.saving.abort_all();
        self.held.clear();
        self.held_bytes = 0;
        self.markers.clear();
        let _ = self.outputs.send(ExecutorOutput::Failed(message));
    }

    /// Whether contiguous writes to this disk are merged (`take_contiguous`): on RBD, where a
    /// larger write is fewer OSD operations; a file replica gains nothing from it.
    fn merges_writes(&self, disk_id: u32) -> bool {
        matches!(self.replicas.get(&disk_id), Some(Replica::Rbd(_)))
    }

    fn held_overlaps(&self, disk_id: u32, start: u64, end: u64) -> bool {
        self.held
            .iter()
            .any(|held| held.disk_id == disk_id && start < held.block_end && held.block_start < end)
    }

    /// A `Write` or `Zero` op: saves the before-images it needs first, if its disk saves them.
    async fn write(
        &mut self,
        seq: Seq,
        disk_id: u32,
        offset: u64,
        payload: Payload,
    ) -> Result<(), String> {
        let end = offset.saturating_add(payload.len());
        if let Some(undo) = self.undo.get(&disk_id).cloned() {
            let runs = undo.take_unsaved(offset, payload.len());
            if let (Some(&(run_start, _)), Some(&(last_start, last_length))) =
                (runs.first(), runs.last())
            {
                let run_end = last_start + last_length;
                // The before-image must show every earlier write to those blocks.
                if self.held_overlaps(disk_id, run_start, run_end) {
                    self.release_held().await?;
                }
                self.wait_commit_over(disk_id, run_start, run_end).await?;
                self.in_flight
                    .wait_clear(disk_id, run_start, run_end)
                    .await?;
                self.save(&undo, disk_id, seq, &runs).await?;
                self.hold(disk_id, offset, end, payload);
                if self.held_bytes >= HELD_BYTES_MAX || self.held.len() >= HELD_WRITES_MAX {
                    self.release_held().await?;
                }
                return Ok(());
            }
            let (block_start, block_end) = block_span(offset, end);
            if self.held_overlaps(disk_id, block_start, block_end) {
                // Its blocks' before-images belong to a held write: not durable yet.
                self.hold(disk_id, offset, end, payload);
                return Ok(());
            }
        }
        self.issue(disk_id, offset, payload).await
    }

    fn hold(&mut self, disk_id: u32, offset: u64, end: u64, payload: Payload) {
        let (block_start, block_end) = block_span(offset, end);
        self.held_bytes += payload.len();
        self.held.push(Held {
            disk_id,
            offset,
            payload,
            block_start,
            block_end,
        });
    }

    /// Reads the runs from the replica and appends them to the disk's undo log (not durable
    /// yet). The reads run concurrently (up to `SAVES_IN_FLIGHT_MAX` chunks); `release_held`
    /// waits for them. Their order in the log does not matter: within one interval a block is
    /// saved once, and a marker waits for every save before it starts the next interval.
    async fn save(
        &mut self,
        undo: &Arc<DiskUndo>,
        disk_id: u32,
        seq: Seq,
        runs: &[(u64, u64)],
    ) -> Result<(), String> {
        let disk = self
            .replicas
            .get(&disk_id)
            .ok_or_else(|| format!("no replica for disk {disk_id}"))?
            .clone();
        self.unsynced.insert(disk_id);
        for &(run_offset, run_length) in runs {
            let mut cursor = run_offset;
            let run_end = run_offset + run_length;
            while cursor < run_end {
                let chunk = (run_end - cursor).min(ENTRY_BYTES_MAX);
                while self.saving.len() >= SAVES_IN_FLIGHT_MAX {
                    join_one(&mut self.saving).await?;
                }
                let disk = disk.clone();
                let undo = undo.clone();
                let chunk_offset = cursor;
                self.saving.spawn(async move {
                    let (result, buf) = disk
                        .read_at(chunk_offset, IoBuf::zeroed(chunk as usize))
                        .await;
                    result.map_err(|error| format!("saving a before-image: {error}"))?;
                    // A write to the page cache: short enough for a runtime thread.
                    undo.log()
                        .append(seq, chunk_offset, &buf)
                        .map(|_| ())
                        .map_err(|error| error.to_string())
                });
                cursor += chunk;
            }
        }
        Ok(())
    }

    /// Makes every appended before-image durable, then issues the writes held behind them.
    async fn release_held(&mut self) -> Result<(), String> {
        while !self.saving.is_empty() {
            join_one(&mut self.saving).await?;
        }
        for disk_id in std::mem::take(&mut self.unsynced) {
            let Some(undo) = self.undo.get(&disk_id) else {
                continue;
            };
            let batch = undo.log().prepare_sync();
            if batch.is_empty() {
                continue;
            }
            let batch = tokio::task::spawn_blocking(move || batch.run().map(|()| batch))
                .await
                .map_err(|error| format!("undo sync task failed: {error}"))?
                .map_err(|error| error.to_string())?;
            undo.log().publish(batch);
        }
        self.held_bytes = 0;
        for held in std::mem::take(&mut self.held) {
            self.issue(held.disk_id, held.offset, held.payload).await?;
        }
        Ok(())
    }

    async fn issue(&mut self, disk_id: u32, offset: u64, payload: Payload) -> Result<(), String> {
        self.touched.insert(disk_id);
        let length = payload.len();
        self.wait_commit_over(disk_id, offset, offset.saturating_add(length))
            .await?;
        submit(
            &mut self.in_flight,
            &self.replicas,
            disk_id,
            offset,
            length,
            move |disk| match payload {
                Payload::Data(parts) => Box::pin(async move {
                    match &disk {
                        // librbd takes any buffer: no copy into an aligned one.
                        Replica::Rbd(image) => image.write_parts_at(offset, parts).await,
                        Replica::File(_) => disk.write_at(offset, write_buf(parts)).await.0,
                    }
                }),
                Payload::Zeroes(length) => {
                    Box::pin(async move { disk.write_zeroes(offset, length).await })
                }
            },
        )
        .await
    }

    /// A recovery-point marker: a new before-image interval for each of its disks, saving on
    /// (on either backend: before-images are read from the replica, RBD image or file).
    async fn marker(&mut self, seq: Seq, payload: &[u8]) -> Result<(), String> {
        self.wait_commit().await?;
        self.release_held().await?;
        let marker = match PointMarker::decode(payload) {
            Ok(marker) => marker,
            Err(error) => {
                // A bad payload from the source is its bug; the stream itself stays valid.
                tracing::warn!(source = %self.source, seq, "ignoring a recovery-point marker: {error}");
                return Ok(());
            }
        };
        for disk_id in &marker.disk_ids {
            let Some(record) = self.records.get(disk_id) else {
                tracing::warn!(source = %self.source, seq, disk_id, group = %marker.group, "recovery-point marker lists a disk the source did not announce");
                continue;
            };
            let undo = self
                .recovery
                .start_saving(&self.source, record)
                .map_err(|error| error.to_string())?;
            undo.reset_saved();
            self.undo.insert(*disk_id, undo);
        }
        self.markers.push((seq, marker));
        Ok(())
    }

    /// Reads `(token, disk, offset, length)` ranges once every earlier op has reached the
    /// replicas, all at once; the bytes in the order asked.
    async fn read(&mut self, reads: &[(u64, u32, u64, u64)]) -> Result<Vec<Vec<u8>>, String> {
        self.wait_commit().await?;
        self.release_held().await?;
        self.in_flight.drain().await?;
        let mut pending = JoinSet::new();
        for (index, &(_, disk_id, offset, length)) in reads.iter().enumerate() {
            let disk = self
                .replicas
                .get(&disk_id)
                .cloned()
                .ok_or_else(|| format!("no replica for disk {disk_id}"))?;
            let length = usize::try_from(length).map_err(|_| format!("read of {length} bytes"))?;
            pending.spawn(async move {
                let (result, buf) = disk.read_at(offset, IoBuf::zeroed(length)).await;
                (
                    index,
                    result
                        .map(|()| buf.to_vec())
                        .map_err(|error| error.to_string()),
                )
            });
        }
        let mut datas = vec![Vec::new(); reads.len()];
        while let Some(joined) = pending.join_next().await {
            let (index, data) = joined.map_err(|error| format!("replica read task: {error}"))?;
            datas[index] = data?;
        }
        Ok(datas)
    }

    /// Starts the commit of every op up to `seq` as a task of its own (see the module doc).
    /// No other commit may be running.
    async fn start_commit(&mut self, seq: Seq) -> Result<(), String> {
        assert!(self.committing.is_none(), "one commit at a time");
        // Before-images durable and the held writes issued: they belong to this batch.
        self.release_held().await?;
        let mut batch = std::mem::replace(&mut self.in_flight, InFlight::new());
        let ranges: Vec<(u32, u64, u64)> = batch.ranges.values().copied().collect();
        let replicas: Vec<Replica> = std::mem::take(&mut self.touched)
            .iter()
            .filter_map(|disk_id| self.replicas.get(disk_id).cloned())
            .collect();
        // Markers become durable with this flush: recorded before the applied sequence, so
        // that no crash leaves a durable marker the source will not resend unrecorded.
        let later = self.markers.split_off(
            self.markers
                .iter()
                .position(|(marker_seq, _)| *marker_seq > seq)
                .unwrap_or(self.markers.len()),
        );
        let due = std::mem::replace(&mut self.markers, later);
        let mut applied = self
            .applied
            .take()
            .expect("the applied-sequence file is here while no commit runs");
        let recovery = self.recovery.clone();
        let source = self.source.clone();
        let task = tokio::spawn(async move {
            let flushed = async {
                batch.drain().await?;
                let mut flushes = JoinSet::new();
                for disk in replicas {
                    flushes.spawn(async move { disk.flush().await });
                }
                while let Some(joined) = flushes.join_next().await {
                    joined
                        .map_err(|error| error.to_string())?
                        .map_err(|error| error.to_string())?;
                }
                Ok::<(), String>(())
            }
            .await;
            if let Err(message) = flushed {
                return (applied, Err(message));
            }
            // The catalog write and the applied sequence's write + fdatasync block: off the
            // runtime's worker threads.
            match tokio::task::spawn_blocking(move || {
                let stored = recovery
                    .record_markers(&source, &due)
                    .map_err(|error| error.to_string())
                    .and_then(|()| applied.store(seq).map_err(|error| error.to_string()));
                if stored.is_ok() {
                    recovery.set_recorded_through(&source, seq);
                }
                (applied, stored)
            })
            .await
            {
                Ok(done) => done,
                Err(join_error) => panic!("applied-sequence task failed: {join_error}"),
            }
        });
        self.committing = Some(Committing { seq, ranges, task });
        Ok(())
    }

    /// Takes back what a finished commit task returned and reports its sequence durable.
    fn complete_commit(
        &mut self,
        joined: Result<(AppliedSeqFile, Result<(), String>), tokio::task::JoinError>,
    ) -> Result<(), String> {
        let committing = self.committing.take().expect("a commit was running");
        let (applied, result) = match joined {
            Ok(done) => done,
            Err(join_error) => panic!("apply commit task failed: {join_error}"),
        };
        self.applied = Some(applied);
        result?;
        let _ = self.outputs.send(ExecutorOutput::Durable(committing.seq));
        Ok(())
    }

    /// Waits for the running commit, if any.
    async fn wait_commit(&mut self) -> Result<(), String> {
        let Some(committing) = self.committing.as_mut() else {
            return Ok(());
        };
        let joined = (&mut committing.task).await;
        self.complete_commit(joined)
    }

    /// Waits for the running commit if one of its batch's writes overlaps the range.
    async fn wait_commit_over(&mut self, disk_id: u32, start: u64, end: u64) -> Result<(), String> {
        let overlaps = self
            .committing
            .as_ref()
            .is_some_and(|committing| ranges_overlap(&committing.ranges, disk_id, start, end));
        if overlaps {
            self.wait_commit().await?;
        }
        Ok(())
    }
}

/// Waits for one running before-image save.
async fn join_one(saving: &mut JoinSet<Result<(), String>>) -> Result<(), String> {
    match saving.join_next().await {
        Some(joined) => joined.map_err(|error| format!("before-image task failed: {error}"))?,
        None => Ok(()),
    }
}

type WriteFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DiskError>> + Send>>;

async fn submit(
    in_flight: &mut InFlight,
    replicas: &BTreeMap<u32, Replica>,
    disk_id: u32,
    offset: u64,
    length: u64,
    operation: impl FnOnce(Replica) -> WriteFuture,
) -> Result<(), String> {
    let disk = replicas
        .get(&disk_id)
        .ok_or_else(|| format!("no replica for disk {disk_id}"))?
        .clone();
    let end = offset.saturating_add(length);
    in_flight.wait_clear(disk_id, offset, end).await?;
    while in_flight.writes.len() >= WRITES_IN_FLIGHT_MAX {
        in_flight.join_one().await?;
    }
    in_flight.spawn(disk_id, offset, end, operation(disk));
    Ok(())
}
