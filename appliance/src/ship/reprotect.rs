//! Reprotect on the source: after a failover, pull the failed-over disks of a group back from
//! the target into this site's (fenced) disks, over the connection this source dialed.
//!
//! First every extent is compared by hash (xxh3-128, the hash of initial replication and
//! verify) and only differing extents are fetched; then, every second, the blocks the
//! failed-over machine wrote since the previous round (`TakeDirty`) are fetched, until the
//! target asks for the last round (failback, its exports read-only by then). The dirty
//! tracking is reset before the compare, so a write during the compare is caught by a round.
//!
//! The pulled bytes are written to the disks directly, not through capture: they are not
//! journaled (the target's replica is resynced by hash compare at failback instead).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::capture::CaptureDisk;
use crate::core::peer::{PeerMessage, PeerOutcome, PeerRequest, HASH_EXTENTS_MAX};
use crate::core::wire::{self, Frame};
use crate::io::disk::IoBuf;
use crate::limits::SYNC_EXTENT_BYTES_DEFAULT;

/// How long one pull request to the target may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two dirty-block rounds.
const ROUND_INTERVAL: Duration = Duration::from_secs(1);
/// Extents hashed per request: 64 MiB of disk per round trip.
const EXTENTS_PER_REQUEST: u32 = 64;
const _: () = assert!(EXTENTS_PER_REQUEST <= HASH_EXTENTS_MAX);

/// A reprotect's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub extents_compared: u64,
    pub bytes_copied: u64,
    pub rounds: u64,
}

type Answer = (PeerOutcome, Vec<u8>);

/// Requests from this source to the target on one connection, and their answers.
#[derive(Clone)]
pub(super) struct TargetLink {
    outgoing: mpsc::UnboundedSender<Frame>,
    pending: Arc<Mutex<BTreeMap<u64, oneshot::Sender<Answer>>>>,
    next_id: Arc<AtomicU64>,
}

impl TargetLink {
    pub(super) fn new(outgoing: mpsc::UnboundedSender<Frame>) -> Self {
        Self {
            outgoing,
            pending: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, oneshot::Sender<Answer>>> {
        self.pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands the target's answer to its waiter.
    pub(super) fn deliver(&self, id: u64, outcome: PeerOutcome, data: &[u8]) {
        match self.pending().remove(&id) {
            Some(waiter) => {
                let _ = waiter.send((outcome, data.to_vec()));
            }
            None => tracing::warn!(id, "the target answered no pending request"),
        }
    }

    async fn request(&self, request: PeerRequest) -> Result<Answer, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = PeerMessage::Request { id, request }
            .to_frame()
            .map_err(|error| format!("encoding a request: {error}"))?;
        let (answer, answered) = oneshot::channel();
        self.pending().insert(id, answer);
        if self.outgoing.send(frame).is_err() {
            self.pending().remove(&id);
            return Err("the connection to the target ended".to_string());
        }
        let result = tokio::time::timeout(REQUEST_TIMEOUT, answered).await;
        self.pending().remove(&id);
        match result {
            Ok(Ok((PeerOutcome::Error { message }, _))) => Err(format!("the target: {message}")),
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err("the connection to the target ended".to_string()),
            Err(_) => Err(format!(
                "the target did not answer within {REQUEST_TIMEOUT:?}"
            )),
        }
    }
}

/// Pulls the failed-over disks of `group` into `disks` until `finish` turns true, then runs a
/// last round and flushes the disks.
pub(super) async fn run(
    group: String,
    disks: Vec<CaptureDisk>,
    link: TargetLink,
    mut finish: watch::Receiver<bool>,
) -> Result<Totals, String> {
    let mut totals = Totals::default();
    // Reset the dirty tracking: the compare below covers everything written so far.
    for disk in &disks {
        take_dirty(&link, &group, disk).await?;
    }
    for disk in &disks {
        compare_disk(&link, &group, disk, &mut totals).await?;
        tracing::info!(group = %group, disk = %disk.export_name(), compared = totals.extents_compared, copied_bytes = totals.bytes_copied, "reprotect: hash compare done");
    }
    loop {
        let last = *finish.borrow_and_update();
        for disk in &disks {
            for (offset, length) in take_dirty(&link, &group, disk).await? {
                copy_range(&link, &group, disk, offset, length, &mut totals).await?;
            }
        }
        totals.rounds += 1;
        if last {
            break;
        }
        tokio::select! {
            changed = finish.changed() => {
                if changed.is_err() {
                    return Err("the reprotect was abandoned".to_string());
                }
            }
            _ = tokio::time::sleep(ROUND_INTERVAL) => {}
        }
    }
    for disk in &disks {
        disk.disk()
            .flush()
            .await
            .map_err(|error| format!("flushing {}: {error}", disk.export_name()))?;
    }
    Ok(totals)
}

async fn take_dirty(
    link: &TargetLink,
    group: &str,
    disk: &CaptureDisk,
) -> Result<Vec<(u64, u64)>, String> {
    let request = PeerRequest::TakeDirty {
        group: group.to_string(),
        machine: disk.machine().to_string(),
        disk: disk.name().to_string(),
    };
    match link.request(request).await? {
        (PeerOutcome::Dirty { ranges }, _) => Ok(ranges),
        (other, _) => Err(format!("unexpected answer to TakeDirty: {other:?}")),
    }
}

async fn compare_disk(
    link: &TargetLink,
    group: &str,
    disk: &CaptureDisk,
    totals: &mut Totals,
) -> Result<(), String> {
    let size = disk.size_bytes();
    let extent = SYNC_EXTENT_BYTES_DEFAULT as u64;
    let mut offset = 0u64;
    while offset < size {
        let request = PeerRequest::HashExtents {
            group: group.to_string(),
            machine: disk.machine().to_string(),
            disk: disk.name().to_string(),
            offset,
            extent_bytes: extent as u32,
            count: EXTENTS_PER_REQUEST,
        };
        let (outcome, hashes) = link.request(request).await?;
        match outcome {
            PeerOutcome::Hashes { size_bytes } if size_bytes == size => {}
            PeerOutcome::Hashes { size_bytes } => {
                return Err(format!(
                    "{}: the failed-over disk has {size_bytes} bytes, this one {size}",
                    disk.export_name()
                ))
            }
            other => return Err(format!("unexpected answer to HashExtents: {other:?}")),
        }
        if hashes.is_empty() || hashes.len() % 16 != 0 {
            return Err(format!("{} hash bytes from the target", hashes.len()));
        }
        for remote in hashes.chunks_exact(16) {
            if offset >= size {
                break;
            }
            let length = extent.min(size - offset);
            let local = read_local(disk, offset, length).await?;
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(remote);
            totals.extents_compared += 1;
            if wire::extent_hash(&local) != u128::from_le_bytes(bytes) {
                copy_range(link, group, disk, offset, length, totals).await?;
            }
            offset += length;
        }
    }
    Ok(())
}

async fn read_local(disk: &CaptureDisk, offset: u64, length: u64) -> Result<Vec<u8>, String> {
    let mut buf = IoBuf::with_capacity(length as usize);
    buf.set_len(length as usize);
    let (result, buf) = disk.disk().read_at(offset, buf).await;
    result.map_err(|error| {
        format!(
            "reading {length} bytes at {offset} of {}: {error}",
            disk.export_name()
        )
    })?;
    Ok(buf.to_vec())
}

/// Fetches `[offset, offset + length)` from the target in bounded pieces and writes it here.
async fn copy_range(
    link: &TargetLink,
    group: &str,
    disk: &CaptureDisk,
    offset: u64,
    length: u64,
    totals: &mut Totals,
) -> Result<(), String> {
    let end = offset.saturating_add(length).min(disk.size_bytes());
    let mut at = offset;
    while at < end {
        let piece = (end - at).min(SYNC_EXTENT_BYTES_DEFAULT as u64);
        let request = PeerRequest::ReadExtent {
            group: group.to_string(),
            machine: disk.machine().to_string(),
            disk: disk.name().to_string(),
            offset: at,
            length: piece as u32,
        };
        let bytes = match link.request(request).await? {
            (PeerOutcome::Extent, bytes) if bytes.len() as u64 == piece => bytes,
            (PeerOutcome::Extent, bytes) => {
                return Err(format!(
                    "the target sent {} bytes for {piece} at {at}",
                    bytes.len()
                ))
            }
            (other, _) => return Err(format!("unexpected answer to ReadExtent: {other:?}")),
        };
        let (result, _) = disk.disk().write_at(at, IoBuf::from_slice(&bytes)).await;
        result.map_err(|error| {
            format!(
                "writing {piece} bytes at {at} of {}: {error}",
                disk.export_name()
            )
        })?;
        totals.bytes_copied += piece;
        at += piece;
    }
    Ok(())
}
