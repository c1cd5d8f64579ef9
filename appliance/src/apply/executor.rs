//! The disk-operation executor of one apply session: runs the target state machine's disk ops
//! in order with many writes in flight, and group-commits flushes.
//!
//! Ordering: writes are submitted concurrently unless one overlaps a write still in flight,
//! in which case everything in flight completes first (so overlapping writes reach the replica
//! in sequence order). A read waits for every earlier write. A `Flush { seq }` is not run at
//! once: while more ops are already queued (the source is streaming) they are applied first,
//! up to `GROUP_COMMIT_BYTES_MAX` or `GROUP_COMMIT_DELAY`, and then one flush of every touched
//! replica plus one write of the applied sequence covers them all. The source's window is far
//! larger than the group, so acknowledgements keep flowing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::storage::AppliedSeqFile;
use crate::core::record::Seq;
use crate::core::target::DiskOp;
use crate::io::disk::{Disk, DiskError, IoBuf};

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
/// Bytes applied between two flushes while the source keeps streaming.
const GROUP_COMMIT_BYTES_MAX: u64 = 32 << 20;
/// Longest a requested flush waits for more ops.
const GROUP_COMMIT_DELAY: Duration = Duration::from_millis(20);

pub(super) struct Executor {
    ops: mpsc::Sender<DiskOp>,
    outputs: mpsc::UnboundedReceiver<ExecutorOutput>,
    task: tokio::task::JoinHandle<AppliedSeqFile>,
}

impl Executor {
    pub(super) fn spawn(
        source: String,
        replicas: BTreeMap<u32, Disk>,
        applied: AppliedSeqFile,
    ) -> Executor {
        let (ops, op_receiver) = mpsc::channel(super::DISK_OP_QUEUE_LENGTH);
        let (output_sender, outputs) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(source, replicas, applied, op_receiver, output_sender));
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

struct InFlight {
    writes: JoinSet<Result<(), DiskError>>,
    /// (disk, start, end) of every write in flight.
    ranges: Vec<(u32, u64, u64)>,
}

impl InFlight {
    fn overlaps(&self, disk_id: u32, start: u64, end: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(disk, s, e)| disk == disk_id && start < e && s < end)
    }

    async fn drain(&mut self) -> Result<(), String> {
        let mut first_error = None;
        while let Some(joined) = self.writes.join_next().await {
            let outcome = joined
                .map_err(|error| error.to_string())
                .and_then(|result| result.map_err(|error| error.to_string()));
            if let Err(error) = outcome {
                first_error.get_or_insert(error);
            }
        }
        self.ranges.clear();
        first_error.map_or(Ok(()), Err)
    }
}

async fn run(
    source: String,
    replicas: BTreeMap<u32, Disk>,
    mut applied: AppliedSeqFile,
    mut ops: mpsc::Receiver<DiskOp>,
    outputs: mpsc::UnboundedSender<ExecutorOutput>,
) -> AppliedSeqFile {
    let mut in_flight = InFlight {
        writes: JoinSet::new(),
        ranges: Vec::new(),
    };
    let mut touched: BTreeSet<u32> = BTreeSet::new();
    let mut pending_flush: Option<Seq> = None;
    let mut bytes_since_flush: u64 = 0;
    let mut flush_requested_at = Instant::now();
    let mut failed = false;

    loop {
        let flush_due = pending_flush.is_some()
            && (bytes_since_flush >= GROUP_COMMIT_BYTES_MAX
                || flush_requested_at.elapsed() >= GROUP_COMMIT_DELAY);
        let next = if pending_flush.is_some() && !flush_due {
            match ops.try_recv() {
                Ok(op) => Some(op),
                Err(_) => None,
            }
        } else if flush_due {
            None
        } else {
            ops.recv().await
        };
        let Some(op) = next else {
            if let Some(seq) = pending_flush.take() {
                if !failed {
                    match commit(&mut in_flight, &replicas, &touched, &mut applied, seq).await {
                        Ok(()) => {
                            let _ = outputs.send(ExecutorOutput::Durable(seq));
                        }
                        Err(message) => {
                            tracing::error!(source = %source, "apply failed: {message}");
                            failed = true;
                            let _ = outputs.send(ExecutorOutput::Failed(message));
                        }
                    }
                }
                touched.clear();
                bytes_since_flush = 0;
                continue;
            }
            // The queue is closed and nothing is pending.
            let _ = in_flight.drain().await;
            let _ = outputs.send(ExecutorOutput::Stopped("session ended".into()));
            return applied;
        };
        if failed {
            // After a failure nothing more is applied or acknowledged; the source resends from
            // the last durable sequence on its next connection.
            continue;
        }
        let outcome = match op {
            DiskOp::Write {
                disk_id,
                offset,
                data,
                ..
            } => {
                let length = data.len() as u64;
                bytes_since_flush += length;
                touched.insert(disk_id);
                submit(
                    &mut in_flight,
                    &replicas,
                    disk_id,
                    offset,
                    length,
                    move |disk| {
                        Box::pin(
                            async move { disk.write_at(offset, IoBuf::from_slice(&data)).await.0 },
                        )
                    },
                )
                .await
            }
            DiskOp::Zero {
                disk_id,
                offset,
                length,
                ..
            } => {
                touched.insert(disk_id);
                submit(
                    &mut in_flight,
                    &replicas,
                    disk_id,
                    offset,
                    length,
                    move |disk| Box::pin(async move { disk.write_zeroes(offset, length).await }),
                )
                .await
            }
            // Before-image intervals are not kept yet (undo log: apply/undo.rs); the marker
            // still reaches the catalog through the session's `poll_marker`.
            DiskOp::Marker { .. } => Ok(()),
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
            } => read(&mut in_flight, &replicas, disk_id, offset, length)
                .await
                .map(|data| {
                    let _ = outputs.send(ExecutorOutput::Read { token, data });
                }),
        };
        if let Err(message) = outcome {
            tracing::error!(source = %source, "apply failed: {message}");
            failed = true;
            pending_flush = None;
            let _ = outputs.send(ExecutorOutput::Failed(message));
        }
    }
}

type WriteFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DiskError>> + Send>>;

async fn submit(
    in_flight: &mut InFlight,
    replicas: &BTreeMap<u32, Disk>,
    disk_id: u32,
    offset: u64,
    length: u64,
    operation: impl FnOnce(Disk) -> WriteFuture,
) -> Result<(), String> {
    let disk = replicas
        .get(&disk_id)
        .ok_or_else(|| format!("no replica for disk {disk_id}"))?
        .clone();
    let end = offset.saturating_add(length);
    if in_flight.overlaps(disk_id, offset, end) || in_flight.writes.len() >= WRITES_IN_FLIGHT_MAX {
        in_flight.drain().await?;
    }
    in_flight.ranges.push((disk_id, offset, end));
    in_flight.writes.spawn(operation(disk));
    Ok(())
}

async fn read(
    in_flight: &mut InFlight,
    replicas: &BTreeMap<u32, Disk>,
    disk_id: u32,
    offset: u64,
    length: u64,
) -> Result<Vec<u8>, String> {
    in_flight.drain().await?;
    let disk = replicas
        .get(&disk_id)
        .ok_or_else(|| format!("no replica for disk {disk_id}"))?;
    let length = usize::try_from(length).map_err(|_| format!("read of {length} bytes"))?;
    let (result, buf) = disk.read_at(offset, IoBuf::zeroed(length)).await;
    result.map_err(|error| error.to_string())?;
    Ok(buf.to_vec())
}

async fn commit(
    in_flight: &mut InFlight,
    replicas: &BTreeMap<u32, Disk>,
    touched: &BTreeSet<u32>,
    applied: &mut AppliedSeqFile,
    seq: Seq,
) -> Result<(), String> {
    in_flight.drain().await?;
    let mut flushes = JoinSet::new();
    for disk_id in touched {
        if let Some(disk) = replicas.get(disk_id) {
            let disk = disk.clone();
            flushes.spawn(async move { disk.flush().await });
        }
    }
    while let Some(joined) = flushes.join_next().await {
        joined
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())?;
    }
    // One small write + fdatasync; brief enough to run on the executor task itself.
    applied.store(seq).map_err(|error| error.to_string())
}
