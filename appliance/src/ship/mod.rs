//! Ship: the source appliance's side of replication. Dials the target (the source only dials;
//! it never listens), drives the `core::source::Source` state machine over the cache journal,
//! and runs initial replication and resync of the captured disks.
//!
//! One task owns the state machine. It sends every source → target frame on the `live`
//! stream (one ordered stream: Hello, records, hash requests) and reads the target's answers
//! from the `control` stream through a reader task. Resync extents are journal records, so the
//! transport's priorities matter less than the core's bounded sync backlog, which keeps live
//! writes from queueing behind resync data.
//!
//! Durability: with a sequence floor (the daemon's case, `<state_dir>/sequence-floor`) records
//! ship as soon as they are appended, and a record the target acknowledged durable is released
//! without ever being flushed here (`core::source`, "Sequence floor"): the journal's device
//! sees only what production FLUSH/FUA requests make durable. The shipper keeps the floor
//! a step (`SEQUENCE_FLOOR_STEP` in the daemon) ahead of the journal, rewriting it off the
//! event loop when appends get within half a step. A floor that cannot be written later holds
//! shipping at the floor already written (records past it are neither durable nor covered):
//! the link stays up, the error shows in the status, and the write is tried again every
//! `FLOOR_RETRY_INTERVAL`. Without a floor (or when it cannot be read or written at start) the
//! core ships only durable records, and the shipper group-commits the journal (one msync
//! covering everything appended) whenever records wait to be shipped.
//!
//! Per-disk sync rounds (initial replication, resync after a journal overflow) follow the
//! capture state: a disk found `resync-needed` is moved to `resyncing` (its writes are
//! journaled again from that instant), its dirty extents are snapshot and synced by hash
//! compare; when the round is done and the disk did not overflow again meanwhile, those
//! extents are cleared from the bitmap and the disk is `protected`. A disk that overflowed
//! during the round keeps its bits and gets another round.

pub mod control;
mod reprotect;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::capture::disk::SyncData;
use crate::capture::journal_handle::SharedJournal;
use crate::capture::CaptureDisk;
use crate::config::MachineSettings;
use crate::control::{DiskState, SyncProgress as SyncProgressStatus};
use crate::core::record::Seq;
use crate::core::source::{ExtentRead, Source, SourceConfig, SourceEvent, SyncMode, SyncProgress};
use crate::core::wire::{DiskAnnouncement, ReplicaState};
use crate::daemon::running::SequenceFloor;
use crate::io::transport::{PeerConnection, SourceDialer};

/// What the shipper tells the status snapshot.
#[derive(Debug, Default)]
pub struct ShipStatus {
    connected: AtomicBool,
    acked_seq: AtomicU64,
    shipped_bytes: AtomicU64,
    /// The sequence floor in force, 0 when there is none.
    sequence_floor: AtomicU64,
    /// Unix time (ns) of the oldest record not yet acknowledged by the target, 0 if none.
    oldest_unacked_ns: AtomicU64,
    last_error: Mutex<Option<String>>,
    sync: Mutex<BTreeMap<u32, SyncStatus>>,
}

#[derive(Clone, Debug)]
struct SyncStatus {
    progress: SyncProgress,
    started: Instant,
}

impl ShipStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    pub fn acked_seq(&self) -> Seq {
        self.acked_seq.load(Ordering::Relaxed)
    }
    /// The persisted sequence floor records ship up to before they are durable, if any.
    pub fn sequence_floor(&self) -> Option<Seq> {
        match self.sequence_floor.load(Ordering::Relaxed) {
            0 => None,
            floor => Some(floor),
        }
    }
    /// Bytes of frames handed to the transport so far.
    pub fn shipped_bytes(&self) -> u64 {
        self.shipped_bytes.load(Ordering::Relaxed)
    }
    /// Seconds the target is behind: age of the oldest unacknowledged record (0 when caught up).
    pub fn rpo_lag_seconds(&self, now_unix_ns: u64) -> f64 {
        match self.oldest_unacked_ns.load(Ordering::Relaxed) {
            0 => 0.0,
            oldest => now_unix_ns.saturating_sub(oldest) as f64 / 1e9,
        }
    }
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }
    /// Progress of a running initial replication or resync of a disk.
    pub fn sync_progress(&self, disk_id: u32) -> Option<SyncProgressStatus> {
        let sync = lock(&self.sync);
        let status = sync.get(&disk_id)?;
        let elapsed_s = status.started.elapsed().as_secs_f64();
        let rate = if elapsed_s > 0.0 {
            status.progress.bytes_done as f64 / elapsed_s
        } else {
            0.0
        };
        let remaining = status
            .progress
            .bytes_total
            .saturating_sub(status.progress.bytes_done);
        Some(SyncProgressStatus {
            bytes_done: status.progress.bytes_done,
            bytes_total: status.progress.bytes_total,
            bytes_per_s: rate,
            eta_seconds: (rate > 0.0).then(|| remaining as f64 / rate),
        })
    }
    fn set_error(&self, error: Option<String>) {
        *lock(&self.last_error) = error;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Commands from the daemon to the shipper.
#[derive(Debug)]
pub enum ShipCommand {
    /// Drain, then compare every extent of `disk_ids` with the target by hash; extents that
    /// differ are reported and repaired (sent again).
    Verify {
        disk_ids: Vec<u32>,
        reply: tokio::sync::oneshot::Sender<Result<Vec<VerifyResult>, String>>,
    },
}

/// The outcome of verifying one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyResult {
    pub disk_id: u32,
    pub extents_compared: u64,
    /// Extents whose hash differed from the target's (sent again, so now repaired).
    pub extents_differing: u64,
    pub bytes_compared: u64,
}

/// Takes a `ferry verify` in: it waits for the journal to drain, and starts over after a loss
/// of the link (on the next connection). One runs at a time.
fn queue_verify(verify: &mut Option<PendingVerify>, command: ShipCommand) {
    let ShipCommand::Verify { disk_ids, reply } = command;
    if verify
        .as_ref()
        .is_some_and(|pending| !pending.reply.is_closed())
    {
        let _ = reply.send(Err("a verify is already running".into()));
        return;
    }
    *verify = Some(PendingVerify {
        disk_ids,
        started: false,
        results: Vec::new(),
        reply,
    });
}

struct PendingVerify {
    disk_ids: Vec<u32>,
    started: bool,
    results: Vec<VerifyResult>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<VerifyResult>, String>>,
}

/// Everything the shipper drives.
pub struct Shipper {
    pub source_name: String,
    pub disks: Vec<(CaptureDisk, String)>,
    /// The protected machines' settings, sent in every Hello (checked with
    /// `wire::encode_machine_settings` before the shipper starts).
    pub machines: Vec<MachineSettings>,
    pub journal: SharedJournal,
    pub dialer: SourceDialer,
    /// `<state_dir>/sync`: a `<machine>__<disk>.synced` file marks a finished initial replication.
    pub sync_dir: PathBuf,
    pub status: Arc<ShipStatus>,
    pub commands: mpsc::Receiver<ShipCommand>,
    /// Fencing and the target's requests (`control.rs`), shared with the daemon.
    pub control: Arc<control::SourceControl>,
    /// Where the sequence floor persists; `None` ships only durable records.
    pub sequence_floor: Option<SequenceFloor>,
}

/// Extent reads in flight for the core's sync: (token, sequence floor, bytes).
type SyncReads = JoinSet<(u64, Seq, Result<SyncData, String>)>;

/// A sync round of one disk.
struct Round {
    initial: bool,
    /// Started by `ferry verify`: report, do not touch the bitmap or the state.
    verify: bool,
    /// Bitmap extents snapshot at the start (cleared when the round completes cleanly).
    extents: Vec<std::ops::Range<u64>>,
}

/// Fastest cadence of journal group commits driven by the shipper.
const FLUSH_INTERVAL_MIN: Duration = Duration::from_millis(2);
/// How often a sequence floor that could not be written is tried again.
const FLOOR_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often disks are checked for `resync-needed`.
const RESYNC_CHECK_INTERVAL: Duration = Duration::from_millis(200);

impl Shipper {
    fn announcements(&self) -> Vec<DiskAnnouncement> {
        self.disks
            .iter()
            .map(|(disk, group)| DiskAnnouncement {
                disk_id: disk.disk_id(),
                size_bytes: disk.size_bytes(),
                machine: disk.machine().to_string(),
                name: disk.name().to_string(),
                group: group.clone(),
            })
            .collect()
    }

    fn disk(&self, disk_id: u32) -> Option<&CaptureDisk> {
        self.disks
            .iter()
            .map(|(disk, _)| disk)
            .find(|disk| disk.disk_id() == disk_id)
    }

    fn synced_marker(&self, disk: &CaptureDisk) -> PathBuf {
        self.sync_dir
            .join(format!("{}__{}.synced", disk.machine(), disk.name()))
    }

    /// Runs until `shutdown` turns true, reconnecting after every loss of the link.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let epoch = Instant::now();
        let now = move || epoch.elapsed().as_nanos() as u64;
        let _ = std::fs::create_dir_all(&self.sync_dir);
        let mut config = SourceConfig::new(self.source_name.clone(), self.announcements());
        config.machines = self.machines.clone();
        // The sync window is not cut down to the journal's size: sync data is held in memory
        // (`SyncRef` records put only a header in the journal), so a small journal neither
        // fills with it nor needs a small window (a 4 MiB journal used to pace the sync at
        // 1 MiB in flight, one extent per durable round trip).
        let mut core = Source::new(config, &*self.journal.lock());
        if let Some(file) = &self.sequence_floor {
            let raised = match file.load() {
                Ok(persisted) => {
                    raise_floor(file.clone(), persisted, self.journal.last_seq()).await
                }
                Err(error) => Err(error.to_string()),
            };
            match raised {
                Ok(floor) => {
                    core.set_sequence_floor(floor);
                    self.status.sequence_floor.store(floor, Ordering::Relaxed);
                }
                Err(error) => tracing::error!(
                    "{error}: records ship only once durable in the journal, as before a floor"
                ),
            }
        }
        let mut rounds: BTreeMap<u32, Round> = BTreeMap::new();
        let (_, placeholder) = mpsc::channel(1);
        let mut commands = std::mem::replace(&mut self.commands, placeholder);
        let mut verify: Option<PendingVerify> = None;
        // Sync reads outlive a connection: the core counts them until their bytes come back,
        // so a read started before a disconnect is still handed to it after the reconnect.
        let mut reads: SyncReads = JoinSet::new();
        loop {
            let connection = tokio::select! {
                _ = wait_shutdown(&mut shutdown) => break,
                connection = self.dialer.connect_with_backoff(u32::MAX) => connection,
                Some(command) = commands.recv() => {
                    match command {
                        // One already running waits for the link; a new one is refused at once,
                        // naming why, rather than left waiting for a target that may be gone.
                        ShipCommand::Verify { reply, .. } => {
                            let _ = reply.send(Err(format!(
                                "not connected to the target: {}",
                                self.status.last_error().unwrap_or_else(|| "connecting".into())
                            )));
                        }
                    }
                    continue;
                }
            };
            let connection = match connection {
                Ok(connection) => connection,
                Err(error) => {
                    self.status.set_error(Some(error.to_string()));
                    continue;
                }
            };
            tracing::info!(target_address = %connection.handle.peer_address(), "connected to the target");
            self.status.connected.store(true, Ordering::Relaxed);
            self.status.set_error(None);
            core.handle_connected(now());
            let outcome = self
                .session(
                    &mut core,
                    &mut rounds,
                    &mut commands,
                    &mut verify,
                    &mut reads,
                    connection,
                    &now,
                    &mut shutdown,
                )
                .await;
            // A verify cut short by the link's loss starts over on the next connection: its
            // rounds end with the link, and what it compared so far may have changed since.
            if let Some(pending) = verify.as_mut() {
                if pending.started {
                    tracing::info!(
                        "the link was lost during verify: it starts again once the link is back"
                    );
                }
                pending.started = false;
                pending.results.clear();
            }
            core.handle_disconnected(now());
            self.status.connected.store(false, Ordering::Relaxed);
            // Sync rounds restart from the target's hashes on the next connection: an initial
            // replication through the Welcome, a resync through the bitmap, whose bits are
            // still set (only a finished round clears them).
            for (disk_id, round) in std::mem::take(&mut rounds) {
                if let Some(disk) = self.disk(disk_id) {
                    if !round.initial && disk.state() == DiskState::Resyncing {
                        disk.set_state(DiskState::ResyncNeeded);
                    }
                }
            }
            lock(&self.status.sync).clear();
            match outcome {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!("replication link lost: {error}");
                    self.status.set_error(Some(error));
                }
            }
        }
        if let Err(error) = self.journal.flush_all().await {
            tracing::error!("flushing the cache journal at shutdown failed: {error}");
        }
        self.dialer.close().await;
    }

    /// One connection. `Ok` only on shutdown; `Err` says why the link ended.
    #[allow(clippy::too_many_arguments)]
    async fn session(
        &self,
        core: &mut Source,
        rounds: &mut BTreeMap<u32, Round>,
        commands: &mut mpsc::Receiver<ShipCommand>,
        verify: &mut Option<PendingVerify>,
        reads: &mut SyncReads,
        connection: PeerConnection,
        now: &impl Fn() -> u64,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let PeerConnection {
            control,
            live,
            handle,
            ..
        } = connection;
        let mut sender = live.sender;
        let mut receiver = control.receiver;
        let mut peer = self.control.session(control.sender, self.status.clone());
        let (frame_tx, mut frames) = mpsc::channel::<Bytes>(64);
        let reader = tokio::spawn(async move {
            loop {
                match receiver.recv().await {
                    Ok(Some(frame)) => {
                        if frame_tx.send(frame).await.is_err() {
                            return None;
                        }
                    }
                    Ok(None) => return Some("the target closed the stream".to_string()),
                    Err(error) => return Some(error.to_string()),
                }
            }
        });
        let mut last_flush = Instant::now() - FLUSH_INTERVAL_MIN;
        // Rewriting the sequence floor ahead of the appends, off the event loop; after a failed
        // write, when to try again.
        let mut raising: Option<tokio::task::JoinHandle<Result<Seq, String>>> = None;
        let mut floor_retry: Option<Instant> = None;
        // The group commit runs as a task of its own, so that frames, acknowledgements and
        // extent reads keep flowing while the store flushes.
        let mut flushing: Option<tokio::task::JoinHandle<Result<Seq, String>>> = None;
        // Timestamp of the oldest unacknowledged record, by sequence: reading a record verifies
        // its checksum over the whole payload, so it is read again only when the sequence moves.
        let mut oldest_unacked: (Seq, u64) = (0, 0);
        let mut resync_check = tokio::time::interval(RESYNC_CHECK_INTERVAL);
        resync_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            // Outputs of the state machine.
            let mut out = Vec::new();
            let mut transmit_error = None;
            {
                let mut journal = self.journal.lock();
                loop {
                    match core.poll_transmit(&*journal, now()) {
                        Ok(Some(frame)) => out.push(frame),
                        Ok(None) => break,
                        Err(error) => {
                            transmit_error = Some(error.to_string());
                            break;
                        }
                    }
                }
                if let Some(seq) = core.poll_release() {
                    // Records of changes still on their way to the source disk stay.
                    let upto = self.journal.releasable(seq);
                    if core.sequence_floor().is_some() {
                        journal.release_acknowledged(upto);
                    } else {
                        journal.release(upto);
                    }
                }
                // Each read is spawned as it is taken: the core counts it until its bytes come
                // back, so one taken and then dropped (the session ending on a failed send
                // before it was spawned) kept its sync from ever finishing.
                while let Some(read) = core.poll_sync_read(&*journal) {
                    self.spawn_sync_read(reads, read);
                }
                let oldest_seq = core.acked_seq() + 1;
                if oldest_unacked.0 != oldest_seq || oldest_unacked.1 == 0 {
                    let timestamp_ns = journal
                        .record(oldest_seq)
                        .map_or(0, |record| record.timestamp_ns);
                    oldest_unacked = (oldest_seq, timestamp_ns);
                }
                self.status
                    .oldest_unacked_ns
                    .store(oldest_unacked.1, Ordering::Relaxed);
            }
            self.status
                .acked_seq
                .store(core.acked_seq(), Ordering::Relaxed);
            if let Some(error) = transmit_error {
                tracing::error!("the journal cannot be shipped: {error}");
                break Err(error);
            }
            let mut send_error = None;
            for frame in out {
                let bytes = frame.len() as u64;
                if let Err(error) = sender.send_pieces(frame.into_pieces()).await {
                    send_error = Some(error.to_string());
                    break;
                }
                self.status
                    .shipped_bytes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
            if let Some(error) = send_error {
                break Err(error);
            }
            let mut events = Vec::new();
            while let Some(event) = core.poll_event() {
                events.push(event);
            }
            for event in events {
                self.handle_event(core, rounds, verify, event)?;
            }
            self.start_verify(core, rounds, verify)?;
            if let Some(error) = handle.close_reason() {
                break Err(error.to_string());
            }

            let last_seq = self.journal.last_seq();
            // With a floor nothing waits for the journal's flush to ship (client FLUSH/FUA
            // requests flush through capture).
            let journal_pending =
                core.sequence_floor().is_none() && last_seq > self.journal.durable_seq();
            if let (Some(file), Some(floor)) = (&self.sequence_floor, core.sequence_floor()) {
                let due = raising.is_none()
                    && floor_retry.is_none_or(|at| Instant::now() >= at)
                    && last_seq + file.step() / 2 > floor;
                if due {
                    raising = Some(tokio::spawn(raise_floor(file.clone(), floor, last_seq)));
                }
            }
            let timeout = core.poll_timeout();
            tokio::select! {
                biased;
                _ = wait_shutdown(shutdown) => break Ok(()),
                frame = frames.recv() => match frame {
                    Some(frame) if peer.route(&frame) => {}
                    Some(frame) => {
                        let handled = {
                            let mut journal = self.journal.lock();
                            let before = journal.last_seq();
                            let handled = core.handle_frame(&frame, &mut *journal, now());
                            (handled, before, journal.last_seq())
                        };
                        let (handled, before, after) = handled;
                        if after > before {
                            self.journal.note_appended(after);
                        }
                        if let Err(error) = handled {
                            // Send the Error frame the core queued, then end the session.
                            let mut out = Vec::new();
                            {
                                let journal = self.journal.lock();
                                while let Ok(Some(frame)) = core.poll_transmit(&*journal, now()) {
                                    out.push(frame);
                                }
                            }
                            for frame in out {
                                let _ = sender.send(Bytes::from(frame.into_bytes())).await;
                            }
                            tracing::error!("the target's stream was refused: {error}");
                            break Err(error.to_string());
                        }
                    }
                    None => {
                        let reason = match reader.await {
                            Ok(Some(reason)) => reason,
                            _ => "the target's stream ended".to_string(),
                        };
                        return finish(handle, Err(reason));
                    }
                },
                Some(joined) = reads.join_next(), if !reads.is_empty() => {
                    let Ok((token, seq_floor, data)) = joined else {
                        break Err("a sync read task failed".to_string());
                    };
                    let data = match data {
                        Ok(data) => data,
                        Err(error) => break Err(format!("sync read failed: {error}")),
                    };
                    let (handled, before, after) = {
                        let mut journal = self.journal.lock();
                        let before = journal.last_seq();
                        let handled = match data {
                            // Held records keep slices of the read's buffer: not copied again
                            // before the transport.
                            SyncData::Bytes(buf) => core.handle_extent_read_shared(token, seq_floor, &Bytes::from_owner(buf), &mut *journal, now()),
                            SyncData::Zero => core.handle_extent_zero(token, seq_floor, &mut *journal, now()),
                        };
                        (handled, before, journal.last_seq())
                    };
                    if after > before {
                        self.journal.note_appended(after);
                    }
                    if let Err(error) = handled {
                        break Err(error.to_string());
                    }
                }
                _ = async {
                    let wait = FLUSH_INTERVAL_MIN.saturating_sub(last_flush.elapsed());
                    tokio::time::sleep(wait).await;
                }, if journal_pending && flushing.is_none() => {
                    let journal = self.journal.clone();
                    flushing = Some(tokio::spawn(async move {
                        journal.flush_all().await.map_err(|error| error.to_string())
                    }));
                }
                flushed = join_pending(&mut flushing), if flushing.is_some() => {
                    flushing = None;
                    last_flush = Instant::now();
                    match flushed {
                        Ok(Ok(_)) => {}
                        Ok(Err(error)) => break Err(format!("journal flush failed: {error}")),
                        Err(error) => break Err(format!("journal flush task failed: {error}")),
                    }
                }
                raised = join_pending(&mut raising), if raising.is_some() => {
                    raising = None;
                    let raised = raised
                        .unwrap_or_else(|error| Err(format!("sequence floor task failed: {error}")));
                    match raised {
                        Ok(floor) => {
                            if floor_retry.take().is_some() {
                                tracing::info!(floor, "the sequence floor is written again: shipping goes on");
                                self.status.set_error(None);
                            }
                            core.set_sequence_floor(floor);
                            self.status.sequence_floor.store(floor, Ordering::Relaxed);
                        }
                        // Shipping stops at the old floor until it can be written (records past
                        // it are neither durable nor covered); the journal keeps everything,
                        // and the link stays up for what the target still has to acknowledge.
                        Err(error) => {
                            let floor = core.sequence_floor().unwrap_or(0);
                            if floor_retry.is_none() {
                                tracing::error!(
                                    floor,
                                    "{error}: records past the floor wait in the journal until it can be written (tried again every {FLOOR_RETRY_INTERVAL:?})"
                                );
                            }
                            self.status.set_error(Some(format!(
                                "{error}: shipping waits at sequence {floor}"
                            )));
                            floor_retry = Some(Instant::now() + FLOOR_RETRY_INTERVAL);
                        }
                    }
                }
                _ = async {
                    if let Some(at) = floor_retry {
                        tokio::time::sleep_until(at.into()).await;
                    }
                }, if floor_retry.is_some_and(|at| at > Instant::now()) && raising.is_none() => {}
                _ = self.journal.wait_for_records_after(last_seq), if !journal_pending => {}
                _ = async {
                    match timeout {
                        Some(deadline) => tokio::time::sleep(Duration::from_nanos(deadline.saturating_sub(now()))).await,
                        None => std::future::pending().await,
                    }
                } => core.handle_timeout(now()),
                _ = resync_check.tick() => self.start_resyncs(core, rounds)?,
                Some(command) = commands.recv() => queue_verify(verify, command),
            }
        };
        reader.abort();
        finish(handle, result)
    }

    /// Reads an extent for the core's sync in a task of its own.
    fn spawn_sync_read(&self, reads: &mut SyncReads, read: ExtentRead) {
        let disk = self.disk(read.disk_id).cloned();
        reads.spawn(async move {
            let Some(disk) = disk else {
                let error = format!("disk {} is not one of this appliance's", read.disk_id);
                return (read.token, 0, Err(error));
            };
            let (seq_floor, data) = disk.read_for_sync(read.offset, read.length).await;
            (
                read.token,
                seq_floor,
                data.map_err(|error| error.to_string()),
            )
        });
    }

    fn handle_event(
        &self,
        core: &mut Source,
        rounds: &mut BTreeMap<u32, Round>,
        verify: &mut Option<PendingVerify>,
        event: SourceEvent,
    ) -> Result<(), String> {
        match event {
            SourceEvent::Welcomed { disks, .. } => {
                for welcome in disks {
                    let Some(disk) = self.disk(welcome.disk_id) else {
                        continue;
                    };
                    if disk.state() == DiskState::FailedOver {
                        // Fenced: the target's copy is production; nothing flows from here.
                        continue;
                    }
                    let marker = self.synced_marker(disk);
                    let synced = marker.exists();
                    let mode = match welcome.replica {
                        ReplicaState::Absent => {
                            let _ = std::fs::remove_file(&marker);
                            Some(SyncMode::CopyNonZero)
                        }
                        ReplicaState::Present if !synced => Some(SyncMode::CompareHashes),
                        ReplicaState::Present => None,
                    };
                    if mode.is_none() && disk.state() == DiskState::InitialSync {
                        // Replicated before this process started: nothing to copy again.
                        disk.set_state(DiskState::Protected);
                    }
                    if let Some(mode) = mode {
                        tracing::info!(disk = %disk.export_name(), ?mode, "initial replication starts");
                        disk.set_state(DiskState::InitialSync);
                        core.start_sync(disk.disk_id(), &[(0, disk.size_bytes())], mode)
                            .map_err(|error| error.to_string())?;
                        rounds.insert(
                            disk.disk_id(),
                            Round {
                                initial: true,
                                verify: false,
                                #[allow(clippy::single_range_in_vec_init)]
                                extents: vec![0..disk.size_bytes()],
                            },
                        );
                        self.note_sync_started(core, disk.disk_id());
                    }
                }
                self.start_resyncs(core, rounds)
            }
            SourceEvent::SyncDone { disk_id, progress } => {
                let Some(disk) = self.disk(disk_id) else {
                    return Ok(());
                };
                lock(&self.status.sync).remove(&disk_id);
                let Some(round) = rounds.remove(&disk_id) else {
                    return Ok(());
                };
                if round.verify {
                    if let Some(pending) = verify.as_mut() {
                        pending.results.push(VerifyResult {
                            disk_id,
                            extents_compared: progress.extents_skipped
                                + progress.extents_zero
                                + progress.extents_sent,
                            extents_differing: progress.extents_zero + progress.extents_sent,
                            bytes_compared: progress.bytes_done,
                        });
                        if pending.results.len() == pending.disk_ids.len() {
                            let done = verify.take().expect("checked above");
                            let _ = done.reply.send(Ok(done.results));
                        }
                    }
                    return Ok(());
                }
                tracing::info!(
                    disk = %disk.export_name(),
                    bytes = progress.bytes_total,
                    skipped = progress.extents_skipped,
                    zero = progress.extents_zero,
                    sent = progress.extents_sent,
                    reread = progress.extents_reread,
                    bytes_sent = progress.bytes_sent,
                    "{} done",
                    if round.initial { "initial replication" } else { "resync" }
                );
                if round.initial {
                    std::fs::write(self.synced_marker(disk), b"")
                        .map_err(|error| format!("recording the initial replication: {error}"))?;
                }
                if matches!(
                    disk.state(),
                    DiskState::ResyncNeeded | DiskState::FailedOver
                ) {
                    // Overflowed again during the round: keep every bit for the next round.
                    // Fenced meanwhile: it stays fenced (the bits resync at failback).
                    return Ok(());
                }
                for extent in &round.extents {
                    disk.bitmap().clear(extent.start, extent.end - extent.start);
                }
                disk.bitmap()
                    .persist()
                    .map_err(|error| format!("persisting the dirty-extent bitmap: {error}"))?;
                disk.set_state(DiskState::Protected);
                Ok(())
            }
        }
    }

    fn note_sync_started(&self, core: &Source, disk_id: u32) {
        if let Some(progress) = core.sync_progress(disk_id) {
            lock(&self.status.sync).insert(
                disk_id,
                SyncStatus {
                    progress,
                    started: Instant::now(),
                },
            );
        }
    }

    /// Starts the pending verify once the target has acknowledged everything journaled and no
    /// other round runs on its disks.
    fn start_verify(
        &self,
        core: &mut Source,
        rounds: &mut BTreeMap<u32, Round>,
        verify: &mut Option<PendingVerify>,
    ) -> Result<(), String> {
        let Some(pending) = verify.as_mut() else {
            return Ok(());
        };
        if pending.started || !core.is_streaming() {
            return Ok(());
        }
        let drained = core.acked_seq() >= self.journal.last_seq();
        // A disk with a round running, or a resync pending (its next round starts at the next
        // check), is compared once that round is done: verify reports what replication left.
        let busy = pending.disk_ids.iter().any(|id| {
            rounds.contains_key(id)
                || self
                    .disk(*id)
                    .is_some_and(|disk| disk.state() == DiskState::ResyncNeeded)
        });
        if !drained || busy {
            return Ok(());
        }
        pending.started = true;
        if pending.disk_ids.is_empty() {
            let done = verify.take().expect("checked above");
            let _ = done.reply.send(Ok(Vec::new()));
            return Ok(());
        }
        for &disk_id in &pending.disk_ids {
            let Some(disk) = self.disk(disk_id) else {
                let done = verify.take().expect("checked above");
                let _ = done
                    .reply
                    .send(Err(format!("disk {disk_id} is not protected here")));
                return Ok(());
            };
            core.start_sync(disk_id, &[(0, disk.size_bytes())], SyncMode::CompareHashes)
                .map_err(|error| error.to_string())?;
            rounds.insert(
                disk_id,
                Round {
                    initial: false,
                    verify: true,
                    extents: Vec::new(),
                },
            );
        }
        Ok(())
    }

    /// Starts a resync round for every `resync-needed` disk without one.
    fn start_resyncs(
        &self,
        core: &mut Source,
        rounds: &mut BTreeMap<u32, Round>,
    ) -> Result<(), String> {
        if !core.is_streaming() {
            return Ok(());
        }
        // Refresh progress figures of running rounds.
        {
            let mut sync = lock(&self.status.sync);
            for (disk_id, status) in sync.iter_mut() {
                if let Some(progress) = core.sync_progress(*disk_id) {
                    status.progress = progress;
                }
            }
        }
        for (disk, _) in &self.disks {
            if disk.state() != DiskState::ResyncNeeded || rounds.contains_key(&disk.disk_id()) {
                continue;
            }
            // From here on the disk's writes are journaled again; the bitmap as it is now is
            // what the journal missed.
            disk.set_state(DiskState::Resyncing);
            let extents = disk.bitmap().dirty_extents();
            let ranges: Vec<(u64, u64)> = extents
                .iter()
                .map(|extent| (extent.start, extent.end - extent.start))
                .collect();
            tracing::info!(disk = %disk.export_name(), extents = ranges.len(), "resync starts");
            // In the bitmap's extents: only dirty extents are read and hashed at both ends.
            let extent_bytes = u32::try_from(disk.bitmap().extent_bytes()).unwrap_or(u32::MAX);
            core.start_sync_in_extents(
                disk.disk_id(),
                &ranges,
                SyncMode::CompareHashes,
                extent_bytes,
            )
            .map_err(|error| error.to_string())?;
            rounds.insert(
                disk.disk_id(),
                Round {
                    initial: false,
                    verify: false,
                    extents,
                },
            );
            self.note_sync_started(core, disk.disk_id());
        }
        Ok(())
    }
}

/// The task a `select!` branch waits on while it runs (the branch is disabled without one).
async fn join_pending<T>(
    task: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match task.as_mut() {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// Makes the sequence floor a step (`SequenceFloor::step`) ahead of `last_seq` durable, unless
/// the persisted `floor` is still more than half a step ahead; returns the floor in force.
async fn raise_floor(file: SequenceFloor, floor: Seq, last_seq: Seq) -> Result<Seq, String> {
    if last_seq + file.step() / 2 <= floor {
        return Ok(floor);
    }
    let raised = last_seq + file.step();
    let path = file.path().display().to_string();
    tokio::task::spawn_blocking(move || file.store(raised))
        .await
        .map_err(|error| format!("sequence floor {path}: write task failed: {error}"))?
        .map_err(|error| format!("sequence floor {path}: write failed: {error}"))?;
    Ok(raised)
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn finish(
    handle: crate::io::transport::ConnectionHandle,
    result: Result<(), String>,
) -> Result<(), String> {
    handle.close(if result.is_ok() {
        "source shutting down"
    } else {
        "source session ended"
    });
    result
}
