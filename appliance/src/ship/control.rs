//! The source's end of the control plane (`core::peer`): fencing and the target's requests.
//!
//! Fencing makes a group's disks read-only here because the group's copy at the target is
//! production now (after a planned or unplanned failover): NBD writes to them are refused with
//! EPERM, new NBD connections see the export READ_ONLY, and their state is `failed-over`. The
//! fenced groups are persisted in `<state_dir>/fenced-groups.json` (atomically) before any disk
//! is fenced, so a restart keeps them fenced. Only failback (`PeerRequest::Unfence`) lifts a
//! fence; un-fencing marks every extent of the group's disks dirty so the shipper resyncs them
//! to the target by hash compare (the replica is stale by the failover's writes).
//!
//! Requests run in their own tasks; answers go back on the control stream of the connection
//! that carried the request. A reprotect (`reprotect.rs`) runs per group until the target asks
//! for its last round; a reprotect cut short by a lost connection is started again by the
//! target's next request (the last round compares every extent again when none is running).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::reprotect::{self, TargetLink, Totals};
use super::ShipStatus;
use crate::capture::CaptureDisk;
use crate::control::DiskState;
use crate::core::peer::{PeerMessage, PeerOutcome, PeerRequest};
use crate::core::wire::{self, Frame, FrameKind, Message};
use crate::io::transport::FrameSender;

/// Cuts the final recovery point of a group for a planned failover: `(point_id, marker_seq)`.
/// Wired by the daemon to the recovery-point cutter; fencing happens before it is called.
pub type FinalPointCutter = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<(u64, u64), String>> + Send>>
        + Send
        + Sync,
>;

/// How long a planned failover waits for the target to hold the final point durably.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the drain checks the acknowledged sequence.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Why the fence state cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("fence state {}: {operation} failed: {source}", path.display())]
    Io {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("fence state {}: not valid: {source}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("bitmap of {disk}: {message}")]
    Bitmap { disk: String, message: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct FenceFile {
    version: u32,
    groups: BTreeSet<String>,
}

const FENCE_FILE_VERSION: u32 = 1;

/// The fence file of a state dir.
pub fn fence_path(state_dir: &Path) -> PathBuf {
    state_dir.join("fenced-groups.json")
}

/// The groups fenced in `state_dir` (none when the file does not exist).
pub fn load_fenced_groups(state_dir: &Path) -> Result<BTreeSet<String>, FenceError> {
    let path = fence_path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => {
            return Err(FenceError::Io {
                path,
                operation: "read",
                source,
            })
        }
    };
    let file: FenceFile = serde_json::from_slice(&bytes).map_err(|source| FenceError::Invalid {
        path: path.clone(),
        source,
    })?;
    Ok(file.groups)
}

/// Writes the fence file atomically: temp file, fsync, rename, directory fsync.
fn store_fenced_groups(state_dir: &Path, groups: &BTreeSet<String>) -> Result<(), FenceError> {
    let path = fence_path(state_dir);
    let temp = state_dir.join("fenced-groups.json.tmp");
    let io = |operation: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| FenceError::Io {
            path,
            operation,
            source,
        }
    };
    let json = serde_json::to_vec_pretty(&FenceFile {
        version: FENCE_FILE_VERSION,
        groups: groups.clone(),
    })
    .map_err(|source| FenceError::Invalid {
        path: path.clone(),
        source,
    })?;
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&temp).map_err(io("create", &temp))?;
        file.write_all(&json).map_err(io("write", &temp))?;
        file.sync_all().map_err(io("fsync", &temp))?;
    }
    std::fs::rename(&temp, &path).map_err(io("rename", &path))?;
    std::fs::File::open(state_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io("fsync directory", state_dir))?;
    Ok(())
}

/// The source's control plane, shared across connections.
pub struct SourceControl {
    state_dir: PathBuf,
    /// Every captured disk with its group.
    disks: Vec<(CaptureDisk, String)>,
    fenced: Mutex<BTreeSet<String>>,
    cutter: Mutex<Option<FinalPointCutter>>,
}

impl SourceControl {
    /// Loads the fenced groups of `state_dir` and fences their disks.
    pub fn open(
        state_dir: &Path,
        disks: Vec<(CaptureDisk, String)>,
    ) -> Result<Arc<Self>, FenceError> {
        let fenced = load_fenced_groups(state_dir)?;
        let control = Arc::new(Self {
            state_dir: state_dir.to_path_buf(),
            disks,
            fenced: Mutex::new(fenced.clone()),
            cutter: Mutex::new(None),
        });
        for group in &fenced {
            let disks = control.fence_disks(group);
            if !disks.is_empty() {
                tracing::warn!(group = %group, disks = %disks.join(","), "group is failed over to the target: its disks stay read-only here");
            }
        }
        Ok(control)
    }

    /// Sets how planned failovers cut their final point.
    pub fn set_cutter(&self, cutter: FinalPointCutter) {
        *lock(&self.cutter) = Some(cutter);
    }

    /// Groups fenced here, sorted.
    pub fn fenced_groups(&self) -> Vec<String> {
        lock(&self.fenced).iter().cloned().collect()
    }

    /// Whether `disk` belongs to a fenced group.
    pub fn is_fenced(&self, disk: &CaptureDisk) -> bool {
        let fenced = lock(&self.fenced);
        self.disks.iter().any(|(candidate, group)| {
            candidate.disk_id() == disk.disk_id() && fenced.contains(group)
        })
    }

    fn group_disks(&self, group: &str) -> Vec<&CaptureDisk> {
        self.disks
            .iter()
            .filter(|(_, candidate)| candidate == group)
            .map(|(disk, _)| disk)
            .collect()
    }

    fn fence_disks(&self, group: &str) -> Vec<String> {
        let mut names = Vec::new();
        for disk in self.group_disks(group) {
            disk.set_state(DiskState::FailedOver);
            names.push(disk.export_name().to_string());
        }
        names
    }

    /// Fences `group` (persisted first). Returns the fenced disks (`machine/disk`); none when
    /// the group has no disk here (nothing is recorded then).
    pub fn fence(&self, group: &str) -> Result<Vec<String>, FenceError> {
        if self.group_disks(group).is_empty() {
            return Ok(Vec::new());
        }
        {
            let mut fenced = lock(&self.fenced);
            if !fenced.contains(group) {
                let mut next = fenced.clone();
                next.insert(group.to_string());
                store_fenced_groups(&self.state_dir, &next)?;
                *fenced = next;
                tracing::warn!(group = %group, "group failed over to the target: fencing its disks (read-only)");
            }
        }
        Ok(self.fence_disks(group))
    }

    /// Lifts the fence of `group`: every extent of its disks is marked dirty (persisted) and the
    /// disks go `resync-needed`, so the shipper hash-compares them with the target and sends
    /// what differs; then the fence file forgets the group.
    pub fn unfence(&self, group: &str) -> Result<Vec<String>, FenceError> {
        let disks = self.group_disks(group);
        let mut names = Vec::new();
        for disk in &disks {
            disk.bitmap().mark_all();
            disk.bitmap()
                .persist()
                .map_err(|error| FenceError::Bitmap {
                    disk: disk.export_name().to_string(),
                    message: error.to_string(),
                })?;
            names.push(disk.export_name().to_string());
        }
        {
            let mut fenced = lock(&self.fenced);
            if fenced.contains(group) {
                let mut next = fenced.clone();
                next.remove(group);
                store_fenced_groups(&self.state_dir, &next)?;
                *fenced = next;
            }
        }
        for disk in &disks {
            disk.set_state(DiskState::ResyncNeeded);
        }
        tracing::warn!(group = %group, disks = %names.join(","), "fence lifted (failback): the disks are writable and resync to the target");
        Ok(names)
    }

    /// Starts the control plane of one connection: answers go out on `sender` (the control
    /// stream the source opened).
    pub fn session(
        self: &Arc<Self>,
        sender: FrameSender,
        status: Arc<ShipStatus>,
    ) -> ControlSession {
        let (outgoing, mut frames) = mpsc::unbounded_channel::<Frame>();
        let writer = tokio::spawn(async move {
            let mut sender = sender;
            while let Some(frame) = frames.recv().await {
                if let Err(error) = sender.send(Bytes::from(frame.into_bytes())).await {
                    tracing::info!("cannot answer the target on the control stream: {error}");
                    return;
                }
            }
        });
        ControlSession {
            control: self.clone(),
            status,
            link: TargetLink::new(outgoing.clone()),
            outgoing,
            writer,
            requests: JoinSet::new(),
            reprotects: BTreeMap::new(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The control plane of one connection (see [`SourceControl::session`]). Dropping it stops
/// its requests; their fences (persisted) stay.
pub struct ControlSession {
    control: Arc<SourceControl>,
    status: Arc<ShipStatus>,
    outgoing: mpsc::UnboundedSender<Frame>,
    writer: tokio::task::JoinHandle<()>,
    requests: JoinSet<()>,
    /// This source's own requests to the target (reprotect pulls).
    link: TargetLink,
    /// Running reprotects by group.
    reprotects: BTreeMap<String, Reprotecting>,
}

struct Reprotecting {
    finish: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<Totals, String>>,
}

impl ControlSession {
    /// Takes `frame` if it is a Control frame (true), else leaves it to the replication core.
    pub fn route(&mut self, frame: &[u8]) -> bool {
        let is_control =
            wire::decode_header(frame).is_ok_and(|header| header.kind == FrameKind::Control as u8);
        if !is_control {
            return false;
        }
        match wire::decode_frame(frame) {
            Ok(Message::Control {
                version,
                json,
                data,
            }) => self.handle(version, json, data),
            Ok(_) => {}
            Err(error) => tracing::warn!("bad control frame from the target: {error}"),
        }
        true
    }

    /// Handles a Control frame's document (and data) from the target.
    pub fn handle(&mut self, version: u16, json: &[u8], data: &[u8]) {
        while self.requests.try_join_next().is_some() {}
        let message = match PeerMessage::from_document(version, json) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!("control message from the target refused: {error}");
                return;
            }
        };
        match message {
            PeerMessage::FailedOverGroups { groups } => {
                for group in groups {
                    match self.control.fence(&group) {
                        Ok(disks) if !disks.is_empty() => {
                            tracing::info!(group = %group, disks = %disks.join(","), "the target has the group failed over: fenced")
                        }
                        Ok(_) => {}
                        Err(error) => tracing::error!(group = %group, "fencing failed: {error}"),
                    }
                }
            }
            PeerMessage::Request {
                id,
                request: PeerRequest::Reprotect { group },
            } => {
                let outcome = self.start_reprotect(&group);
                self.reply(id, outcome);
            }
            PeerMessage::Request {
                id,
                request: PeerRequest::FinishReprotect { group },
            } => {
                let running = match self.reprotects.remove(&group) {
                    Some(running) => Ok(running),
                    // None running here (a reconnect cut it short): a whole pull, compare
                    // included, as the last round.
                    None => self.spawn_reprotect(&group, true),
                };
                let outgoing = self.outgoing.clone();
                self.requests.spawn(async move {
                    let outcome = match running {
                        Err(message) => PeerOutcome::Error { message },
                        Ok(running) => {
                            let _ = running.finish.send(true);
                            match running.task.await {
                                Ok(Ok(totals)) => {
                                    tracing::info!(group = %group, ?totals, "reprotect finished: the disks hold the failed-over data");
                                    PeerOutcome::Reprotected {
                                        group,
                                        extents_compared: totals.extents_compared,
                                        bytes_copied: totals.bytes_copied,
                                        rounds: totals.rounds,
                                    }
                                }
                                Ok(Err(message)) => PeerOutcome::Error {
                                    message: format!("reprotect of {group}: {message}"),
                                },
                                Err(_) => PeerOutcome::Error {
                                    message: format!("reprotect of {group} stopped"),
                                },
                            }
                        }
                    };
                    send_reply(&outgoing, id, outcome);
                });
            }
            PeerMessage::Request { id, request } => {
                let control = self.control.clone();
                let status = self.status.clone();
                let outgoing = self.outgoing.clone();
                self.requests.spawn(async move {
                    let outcome = run_request(&control, &status, request).await;
                    send_reply(&outgoing, id, outcome);
                });
            }
            PeerMessage::Reply { id, outcome } => self.link.deliver(id, outcome, data),
        }
    }
}

impl ControlSession {
    fn reply(&self, id: u64, outcome: PeerOutcome) {
        send_reply(&self.outgoing, id, outcome);
    }

    fn start_reprotect(&mut self, group: &str) -> PeerOutcome {
        let disks: Vec<String> = self
            .control
            .group_disks(group)
            .iter()
            .map(|disk| disk.export_name().to_string())
            .collect();
        let running = self
            .reprotects
            .get(group)
            .is_some_and(|running| !running.task.is_finished());
        if !running {
            match self.spawn_reprotect(group, false) {
                Ok(started) => {
                    self.reprotects.insert(group.to_string(), started);
                }
                Err(message) => return PeerOutcome::Error { message },
            }
        }
        tracing::info!(group = %group, disks = %disks.join(","), "reprotect: pulling the failed-over disks from the target");
        PeerOutcome::ReprotectStarted {
            group: group.to_string(),
            disks,
        }
    }

    /// Starts pulling `group`; `last` runs a single (last) round after the compare.
    fn spawn_reprotect(&self, group: &str, last: bool) -> Result<Reprotecting, String> {
        let disks: Vec<CaptureDisk> = self
            .control
            .group_disks(group)
            .into_iter()
            .cloned()
            .collect();
        if disks.is_empty() {
            return Err(format!("group {group} has no disks on this source"));
        }
        if let Some(disk) = disks
            .iter()
            .find(|disk| disk.state() != DiskState::FailedOver)
        {
            return Err(format!(
                "reprotect of {group}: {} is {}, not failed-over (fenced): only a failed-over group can be reprotected",
                disk.export_name(),
                disk.state().as_str()
            ));
        }
        let (finish, finishing) = watch::channel(last);
        let task = tokio::spawn(reprotect::run(
            group.to_string(),
            disks,
            self.link.clone(),
            finishing,
        ));
        Ok(Reprotecting { finish, task })
    }
}

fn send_reply(outgoing: &mpsc::UnboundedSender<Frame>, id: u64, outcome: PeerOutcome) {
    match (PeerMessage::Reply { id, outcome }).to_frame() {
        Ok(frame) => {
            let _ = outgoing.send(frame);
        }
        Err(error) => tracing::error!(id, "cannot encode an answer: {error}"),
    }
}

impl Drop for ControlSession {
    fn drop(&mut self) {
        self.writer.abort();
        self.requests.abort_all();
        for running in self.reprotects.values() {
            running.task.abort();
        }
    }
}

async fn run_request(
    control: &SourceControl,
    status: &ShipStatus,
    request: PeerRequest,
) -> PeerOutcome {
    let error = |message: String| PeerOutcome::Error { message };
    match request {
        PeerRequest::PlannedFailover { group } => {
            let cutter = lock(&control.cutter).clone();
            let Some(cutter) = cutter else {
                return error(format!(
                    "planned failover of {group}: this source cannot cut recovery points"
                ));
            };
            let unprotected: Vec<String> = control
                .group_disks(&group)
                .iter()
                .filter(|disk| {
                    !matches!(disk.state(), DiskState::Protected | DiskState::FailedOver)
                })
                .map(|disk| format!("{} is {}", disk.export_name(), disk.state().as_str()))
                .collect();
            if !unprotected.is_empty() {
                return error(format!(
                    "planned failover of {group}: not every disk is protected ({}); wait for the sync or use an unplanned failover",
                    unprotected.join(", ")
                ));
            }
            let disks = match control.fence(&group) {
                Ok(disks) if disks.is_empty() => {
                    return error(format!("group {group} has no disks on this source"))
                }
                Ok(disks) => disks,
                Err(fence) => return error(format!("planned failover of {group}: {fence}")),
            };
            tracing::info!(group = %group, disks = %disks.join(","), "planned failover: fenced, cutting the final point");
            let (point_id, marker_seq) = match cutter(group.clone()).await {
                Ok(cut) => cut,
                Err(message) => {
                    // The disks stay fenced: the operator asked to stop production here, and
                    // a retry or an unplanned failover continues from that state.
                    return error(format!(
                        "planned failover of {group}: the final point could not be cut ({message}); the group stays fenced"
                    ));
                }
            };
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            while status.acked_seq() < marker_seq {
                if Instant::now() >= deadline {
                    return error(format!(
                        "planned failover of {group}: the target did not acknowledge the final point (sequence {marker_seq}) within {DRAIN_TIMEOUT:?}; the group stays fenced"
                    ));
                }
                tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
            }
            tracing::info!(group = %group, point_id, marker_seq, "planned failover: final point durable at the target");
            PeerOutcome::FinalPoint {
                group,
                point_id,
                marker_seq,
            }
        }
        PeerRequest::Reprotect { .. }
        | PeerRequest::FinishReprotect { .. }
        | PeerRequest::HashExtents { .. }
        | PeerRequest::ReadExtent { .. }
        | PeerRequest::TakeDirty { .. } => {
            error("a target sent a request this source does not serve here".to_string())
        }
        PeerRequest::Unfence { group } => match control.unfence(&group) {
            Ok(disks) if disks.is_empty() => {
                error(format!("group {group} has no disks on this source"))
            }
            Ok(disks) => PeerOutcome::Unfenced { group, disks },
            Err(unfence) => error(format!("failback of {group}: {unfence}")),
        },
    }
}
