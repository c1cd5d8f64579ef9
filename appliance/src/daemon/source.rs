//! The source side of the daemon: opens the cache journal in `<state_dir>/journal`, starts one
//! capture export per configured disk (unix socket and/or TCP), feeds the status model from
//! capture's and the journal's own counters, and on shutdown lets capture finish its in-flight
//! requests and make the journal and every disk durable.
//!
//! When `source.target_fingerprint` pins a target, the shipper (`crate::ship`) dials it and
//! releases journal space behind its acknowledgements. A source whose target is unreachable
//! (or not yet pinned) keeps journaling until the journal is full, then capture drops each disk
//! to its dirty-extent bitmap (`resync-needed`). Production never blocks on the network.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::layout::StateLayout;
use super::points::{self, Cutter, GroupCutter};
use super::running::{PreviousRun, RunningMarker, SequenceFloor};
use super::status::{DiskSample, StatusModel};
use super::DaemonError;
use crate::capture::{
    Capture, CaptureConfig, CaptureDisk, DiskSpec, Endpoint, ListenerSpec, SharedJournal,
};
use crate::config::SourceConfig;
use crate::control::{DiskState, Request, Response};
use crate::core::record::RecordKind;
use crate::io::disk::DiskOptions;
use crate::io::transport::{Identity, RateLimiter, SourceDialer, Tuning};
use crate::ship::control::SourceControl;
use crate::ship::{ShipCommand, ShipStatus, Shipper, VerifyResult};

/// The running source side.
pub(crate) struct SourceSide {
    /// Removed by a clean stop; found at start, it says the last run did not stop cleanly.
    running: RunningMarker,
    journal: SharedJournal,
    capture: Capture,
    ship: Option<ShipSide>,
    /// Recovery-point cuts of this appliance's groups.
    cutter: Arc<Cutter>,
    /// The cut timers and the barrier's tasks; they end on the shutdown signal.
    point_tasks: Vec<JoinHandle<()>>,
}

/// The shipper task and its handles.
struct ShipSide {
    task: Mutex<Option<JoinHandle<()>>>,
    status: Arc<ShipStatus>,
    commands: mpsc::Sender<ShipCommand>,
    limiter: Arc<RateLimiter>,
    /// Fencing and the target's requests (planned failover, failback).
    control: Arc<SourceControl>,
}

impl SourceSide {
    pub async fn start(
        appliance_name: &str,
        source: &SourceConfig,
        layout: &StateLayout,
        status: &StatusModel,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, DaemonError> {
        let (running, previous_run) = RunningMarker::take(&layout.root)?;
        let journal = open_journal(layout, source.journal_size_bytes).await?;
        let sequence_floor = SequenceFloor::new(&layout.root);
        if previous_run == PreviousRun::HostDown {
            restart_journal_past_floor(&journal, &layout.journal, &sequence_floor)?;
        }
        restore_status(&journal, status);
        // Groups failed over to the target stay read-only from the first NBD connection on.
        let fenced = crate::ship::control::load_fenced_groups(&layout.root).map_err(|error| {
            DaemonError::Component {
                component: "fencing",
                message: error.to_string(),
            }
        })?;

        let mut disks = Vec::new();
        let mut listeners = Vec::new();
        for machine in &source.machine {
            for disk in &machine.disks {
                let spec = DiskSpec {
                    machine: machine.name.clone(),
                    name: disk.name.clone(),
                    disk_id: disk.id,
                    path: disk.path.clone(),
                    disk_options: DiskOptions::default(),
                    // Nothing has reached a target yet as far as this process knows; the
                    // shipper moves the disk on. A dirty bitmap makes capture say resync-needed.
                    initial_state: if fenced.contains(&machine.group) {
                        DiskState::FailedOver
                    } else {
                        DiskState::InitialSync
                    },
                };
                let export = spec.export_name();
                if let Some(path) = &disk.export {
                    listeners.push(ListenerSpec {
                        endpoint: Endpoint::Unix(path.clone()),
                        exports: vec![export.clone()],
                    });
                }
                if let Some(address) = disk.tcp {
                    listeners.push(ListenerSpec {
                        endpoint: Endpoint::Tcp(address),
                        exports: vec![export.clone()],
                    });
                }
                disks.push(spec);
            }
        }
        let mut capture_config = CaptureConfig::new(layout.root.clone(), disks, listeners);
        // Validated to at most 1 GiB.
        capture_config.write_behind_bytes =
            u32::try_from(source.write_behind_bytes).unwrap_or(u32::MAX);
        let capture = Capture::start(capture_config, journal.clone(), shutdown.clone())
            .await
            .map_err(DaemonError::CaptureStart)?;
        resync_after_unclean_stop(&previous_run, &journal, &capture)?;
        let ship = match source.target_fingerprint {
            Some(fingerprint) => Some(start_shipper(
                appliance_name,
                source,
                layout,
                status,
                &journal,
                &capture,
                fingerprint,
                shutdown.clone(),
            )?),
            None => None,
        };
        let (cutter, point_tasks) = start_cutter(
            appliance_name,
            source,
            layout,
            &journal,
            &capture,
            &ship,
            shutdown,
        )?;
        if let Some(ship) = &ship {
            // A planned failover's final point is a crash-consistent point cut like any other.
            let final_cutter = cutter.clone();
            ship.control.set_cutter(Arc::new(move |group: String| {
                let cutter = final_cutter.clone();
                Box::pin(async move {
                    cutter
                        .create(&group, false)
                        .await
                        .map(|point| (point.id, point.seq))
                        .map_err(|error| error.to_string())
                })
            }));
        }
        let side = Self {
            running,
            journal,
            capture,
            ship,
            cutter,
            point_tasks,
        };
        let now = Instant::now();
        side.sample(status, now);
        for capture_disk in side.capture.disks() {
            if let Some(stats) = status.disk_by_id(capture_disk.disk_id()) {
                stats.set_size_bytes(capture_disk.size_bytes());
            }
        }
        Ok(side)
    }

    /// Copies capture's per-disk counters and the journal's usage into the status model.
    /// `since` is the instant of the previous sample (see `DiskStats::observe`).
    pub fn sample(&self, status: &StatusModel, since: Instant) {
        for capture_disk in self.capture.disks() {
            let Some(stats) = status.disk_by_id(capture_disk.disk_id()) else {
                continue;
            };
            let capture_stats = capture_disk.stats();
            stats.observe(
                &DiskSample {
                    state: capture_stats.state,
                    bytes_written: capture_stats.bytes_written,
                    last_sequence: capture_stats.last_sequence,
                },
                since,
            );
        }
        let usage = self.journal.usage();
        status.set_journal_usage(usage.used_bytes, usage.capacity_bytes);
        for (group, points) in self.cutter.all_points() {
            status.set_recovery_points(&group, points);
        }
        if let Some(ship) = &self.ship {
            status.record_ack(ship.status.acked_seq());
            status.set_link(
                ship.status.connected(),
                ship.status.last_error(),
                ship.status.shipped_bytes(),
                ship.status.sequence_floor(),
            );
            for capture_disk in self.capture.disks() {
                if let Some(stats) = status.disk_by_id(capture_disk.disk_id()) {
                    stats.set_sync(ship.status.sync_progress(capture_disk.disk_id()));
                }
            }
            ship.limiter
                .set_rate(status.bandwidth_limit_bytes_per_s().unwrap_or(0));
        }
    }

    /// Drains, then compares the named disks (all when empty) with the target by hashes.
    pub fn verify(
        &self,
        disk_ids: Vec<u32>,
    ) -> Result<oneshot::Receiver<Result<Vec<VerifyResult>, String>>, String> {
        let Some(ship) = &self.ship else {
            return Err(
                "this source ships nowhere: source.target_fingerprint is not set".to_string(),
            );
        };
        let disk_ids = if disk_ids.is_empty() {
            self.capture
                .disks()
                .iter()
                .map(|disk| disk.disk_id())
                .collect()
        } else {
            disk_ids
        };
        let (reply, answer) = oneshot::channel();
        ship.commands
            .try_send(ShipCommand::Verify { disk_ids, reply })
            .map_err(|_| "the shipper is busy or stopped; try again".to_string())?;
        Ok(answer)
    }

    /// Whether `group` is a consistency group of this source (its recovery-point commands are
    /// answered here; other groups' by the target side, if any).
    pub fn has_group(&self, group: &str) -> bool {
        self.cutter.has_group(group)
    }

    /// `recovery-point create` / `list` of one of this source's groups; a cut runs beside the
    /// event loop (hooks and the barrier take a while) and answers when done.
    pub fn recovery_point_command(&self, request: Request, reply: oneshot::Sender<Response>) {
        match request {
            Request::CreateRecoveryPoint {
                group,
                app_consistent,
            } => {
                let cutter = self.cutter.clone();
                let ship_status = self.ship.as_ref().map(|ship| ship.status.clone());
                tokio::spawn(async move {
                    let response = match cutter.create(&group, app_consistent).await {
                        Ok(point) => {
                            let acked = ship_status.map_or(0, |status| status.acked_seq());
                            Response::PointCreated {
                                group,
                                point: points::point_status(&point, acked),
                            }
                        }
                        Err(error) => Response::Error {
                            message: error.to_string(),
                        },
                    };
                    let _ = reply.send(response);
                });
            }
            Request::ListRecoveryPoints { group } => {
                let response = match self.cutter.list(&group) {
                    Ok(points) => Response::RecoveryPoints { group, points },
                    Err(error) => Response::Error {
                        message: error.to_string(),
                    },
                };
                let _ = reply.send(response);
            }
            other => {
                let _ = reply.send(Response::Error {
                    message: format!("not a recovery-point command: {other:?}"),
                });
            }
        }
    }

    /// After the shutdown signal: capture stops accepting, finishes in-flight requests, and makes
    /// the journal and every disk durable.
    pub async fn stop(self) -> Result<(), DaemonError> {
        for task in self.point_tasks {
            let _ = task.await;
        }
        if let Some(ship) = &self.ship {
            let task = ship
                .task
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
        let journal = self.journal.clone();
        self.capture
            .wait()
            .await
            .map_err(DaemonError::CaptureFlush)?;
        tracing::info!(
            durable_sequence = journal.durable_seq(),
            "journal and disks flushed"
        );
        self.running.clear()
    }
}

/// Marks what may differ between each disk and its replica after the last run in the disk's
/// bitmap and makes the disk `resync-needed`, so the shipper hash-compares those extents with
/// the target and sends what differs: after any run, the extents of the sync records whose
/// payloads that run held in memory (`RecordKind::SyncRef`, `core::source` "Sync payloads");
/// after a run that did not stop cleanly (see [`super::running`]), more.
fn resync_after_unclean_stop(
    previous_run: &PreviousRun,
    journal: &SharedJournal,
    capture: &Capture,
) -> Result<(), DaemonError> {
    let by_id: HashMap<u32, &CaptureDisk> = capture
        .disks()
        .iter()
        .map(|disk| (disk.disk_id(), disk))
        .collect();
    // Held records whose kinds are in `kinds`: their extents are marked.
    let mark_held = |is_marked: &dyn Fn(RecordKind) -> bool| {
        let guard = journal.lock();
        let mut touched = std::collections::BTreeSet::new();
        for record in guard.iter_from(guard.first_seq()) {
            let Ok(record) = record else { break };
            if !is_marked(record.kind) {
                continue;
            }
            if let Some(disk) = by_id.get(&record.disk_id) {
                disk.bitmap().mark(record.offset, record.length);
                touched.insert(record.disk_id);
            }
        }
        touched
    };
    let marked_disks: Vec<&CaptureDisk> = match previous_run {
        PreviousRun::Clean => {
            let touched = mark_held(&|kind| kind == RecordKind::SyncRef);
            if !touched.is_empty() {
                tracing::info!(
                    disks = touched.len(),
                    "the journal holds sync extents the last run had not shipped durably: \
                     they are hash-compared with the replicas again"
                );
            }
            capture
                .disks()
                .iter()
                .filter(|disk| touched.contains(&disk.disk_id()))
                .collect()
        }
        PreviousRun::HostDown => {
            tracing::warn!(
                "the last run did not stop cleanly and the host went down under it: writes \
                 may have reached the disks without their journal records; every disk is \
                 hash-compared with its replica"
            );
            for disk in capture.disks() {
                disk.bitmap().mark_all();
            }
            capture.disks().iter().collect()
        }
        PreviousRun::ProcessDied { pid } => {
            // The records still held include every change whose disk write had not completed
            // (and the sync extents whose payloads died with the process).
            let touched = mark_held(&|kind| {
                matches!(
                    kind,
                    RecordKind::Write | RecordKind::Zero | RecordKind::Trim | RecordKind::SyncRef
                )
            });
            tracing::warn!(
                previous_pid = pid.map_or_else(String::new, |pid| pid.to_string()),
                disks = touched.len(),
                "the last run's process died: the extents of the changes its journal still \
                 holds are hash-compared with the replicas (a change journaled just before \
                 the crash, or answered before its disk write, may not have reached the disk)"
            );
            capture
                .disks()
                .iter()
                .filter(|disk| touched.contains(&disk.disk_id()))
                .collect()
        }
    };
    for disk in marked_disks {
        disk.bitmap()
            .persist()
            .map_err(|error| DaemonError::Component {
                component: "dirty-extent bitmap",
                message: format!("{}: {error}", disk.export_name()),
            })?;
        // A failed-over (fenced) disk stays read-only; unfencing resyncs it whole anyway.
        if disk.state() != DiskState::FailedOver {
            disk.set_state(DiskState::ResyncNeeded);
        }
    }
    Ok(())
}

/// Starts the shipper: this appliance's identity, a dialer pinned to the target's fingerprint,
/// and the bandwidth limiter the control socket adjusts.
#[allow(clippy::too_many_arguments)]
fn start_shipper(
    appliance_name: &str,
    source: &SourceConfig,
    layout: &StateLayout,
    status: &StatusModel,
    journal: &SharedJournal,
    capture: &Capture,
    fingerprint: crate::io::transport::Fingerprint,
    shutdown: watch::Receiver<bool>,
) -> Result<ShipSide, DaemonError> {
    let component = |error: String| DaemonError::Component {
        component: "shipper",
        message: error,
    };
    let identity = Identity::load_or_create(&layout.keys).map_err(|e| component(e.to_string()))?;
    let address = {
        use std::net::ToSocketAddrs;
        source
            .target
            .to_socket_addrs()
            .map_err(|error| component(format!("source.target {}: {error}", source.target)))?
            .next()
            .ok_or_else(|| component(format!("source.target {}: no address", source.target)))?
    };
    let limiter = Arc::new(RateLimiter::new(
        status.bandwidth_limit_bytes_per_s().unwrap_or(0),
    ));
    let dialer = SourceDialer::new(
        address,
        &identity,
        fingerprint,
        &Tuning::default(),
        Some(limiter.clone()),
    )
    .map_err(|e| component(e.to_string()))?;
    let groups: HashMap<u32, String> = source
        .machine
        .iter()
        .flat_map(|machine| {
            machine
                .disks
                .iter()
                .map(move |disk| (disk.id, machine.group.clone()))
        })
        .collect();
    let machines: Vec<_> = source
        .machine
        .iter()
        .map(|machine| machine.settings())
        .collect();
    crate::core::wire::encode_machine_settings(&machines)
        .map_err(|error| component(format!("source.machine settings: {error}")))?;
    let ship_status = Arc::new(ShipStatus::default());
    let (commands, command_receiver) = mpsc::channel(8);
    let disks: Vec<_> = capture
        .disks()
        .iter()
        .map(|disk| {
            let group = groups.get(&disk.disk_id()).cloned().unwrap_or_default();
            (disk.clone(), group)
        })
        .collect();
    let control =
        SourceControl::open(&layout.root, disks.clone()).map_err(|e| component(e.to_string()))?;
    let shipper = Shipper {
        sequence_floor: Some(SequenceFloor::new(&layout.root)),
        source_name: appliance_name.to_string(),
        disks,
        machines,
        journal: journal.clone(),
        dialer,
        sync_dir: layout.root.join("sync"),
        status: ship_status.clone(),
        commands: command_receiver,
        control: control.clone(),
    };
    let task = tokio::spawn(shipper.run(shutdown));
    Ok(ShipSide {
        task: Mutex::new(Some(task)),
        status: ship_status,
        commands,
        limiter,
        control,
    })
}

/// Builds the recovery-point cutter (each group's disks behind one write gate) and starts the
/// cut timers of the groups this appliance coordinates.
fn start_cutter(
    appliance_name: &str,
    source: &SourceConfig,
    layout: &StateLayout,
    journal: &SharedJournal,
    capture: &Capture,
    ship: &Option<ShipSide>,
    shutdown: watch::Receiver<bool>,
) -> Result<(Arc<Cutter>, Vec<JoinHandle<()>>), DaemonError> {
    let groups = source
        .group
        .iter()
        .map(|group| {
            let disks = source
                .machine
                .iter()
                .filter(|machine| machine.group == group.name)
                .flat_map(|machine| {
                    machine
                        .disks
                        .iter()
                        .filter_map(|disk| capture.disk(&machine.name, &disk.name).cloned())
                })
                .collect();
            GroupCutter::new(group.clone(), disks, appliance_name)
        })
        .collect();
    let acked: Box<dyn Fn() -> crate::core::record::Seq + Send + Sync> = match ship {
        Some(ship) => {
            let status = ship.status.clone();
            Box::new(move || status.acked_seq())
        }
        None => Box::new(|| 0),
    };
    let cutter = Arc::new(Cutter::new(
        appliance_name,
        journal.clone(),
        groups,
        layout.catalog.join("points-cut.json"),
        acked,
    ));
    let mut tasks = Vec::new();
    if source.group.iter().any(|group| !group.members.is_empty()) {
        let component = |message: String| DaemonError::Component {
            component: "recovery-point barrier",
            message,
        };
        let identity =
            Identity::load_or_create(&layout.keys).map_err(|e| component(e.to_string()))?;
        tasks.extend(
            super::barrier::start(&cutter, source, &identity, shutdown.clone())
                .map_err(|e| component(e.to_string()))?,
        );
    }
    tasks.extend(points::spawn_timers(cutter.clone(), shutdown));
    Ok((cutter, tasks))
}

/// After the host went down: records up to the persisted sequence floor may have reached the
/// target without reaching this journal's device (`core::source`, "Sequence floor"). When the
/// recovered journal ends below the floor, the log restarts past it before anything is
/// appended, so no number the target may hold is used again. Every disk is resynced after a
/// host went down anyway (`resync_after_unclean_stop`), which covers the records dropped here.
fn restart_journal_past_floor(
    journal: &SharedJournal,
    journal_dir: &std::path::Path,
    sequence_floor: &SequenceFloor,
) -> Result<(), DaemonError> {
    let floor = sequence_floor.load()?;
    let mut guard = journal.lock();
    let last = guard.last_seq();
    if floor <= last {
        return Ok(());
    }
    let held = guard.held_records();
    let skip = guard.restart_at(floor + 1).map_err(|source| {
        DaemonError::Journal(crate::io::mmap_journal::MmapJournalError::Journal {
            dir: journal_dir.to_path_buf(),
            source,
        })
    })?;
    tracing::warn!(
        recovered_last_sequence = last,
        sequence_floor = floor,
        records_dropped = held,
        restarted_at = skip,
        "the host went down: the journal restarts past the sequence floor (the target may \
         hold records this journal lost); every disk is resynced"
    );
    Ok(())
}

/// Opens (creating and preallocating on first start) the memory-mapped cache journal. Off the
/// async threads: preallocating a large journal takes seconds.
async fn open_journal(
    layout: &StateLayout,
    capacity_bytes: u64,
) -> Result<SharedJournal, DaemonError> {
    let dir = layout.journal.clone();
    let task_dir = dir.clone();
    let opened =
        tokio::task::spawn_blocking(move || SharedJournal::open_mmap(&task_dir, capacity_bytes))
            .await;
    let (journal, report) = match opened {
        Ok(result) => result.map_err(DaemonError::Journal)?,
        Err(error) => {
            return Err(DaemonError::EventLoop(format!(
                "journal open task at {}: {error}",
                dir.display()
            )))
        }
    };
    if report.bytes_dropped > 0 {
        tracing::warn!(
            records_kept = report.records_kept,
            bytes_dropped = report.bytes_dropped,
            reason = report.drop_reason.as_deref().unwrap_or(""),
            "journal recovered: dropped a torn or corrupt tail (never a flushed record)"
        );
    } else {
        tracing::info!(
            records_kept = report.records_kept,
            first_sequence = report.first_seq,
            last_sequence = report.last_seq,
            "journal opened"
        );
    }
    Ok(journal)
}

/// After a restart, the journal still holds every unacknowledged record: restore each disk's
/// last sequence, and time its pending writes from the oldest record's timestamp so RPO lag
/// includes the time before the restart.
fn restore_status(journal: &SharedJournal, status: &StatusModel) {
    let guard = journal.lock();
    let first = guard.first_seq();
    if first == 0 {
        return;
    }
    // disk id → (oldest held record's timestamp, last sequence)
    let mut per_disk: HashMap<u32, (u64, u64)> = HashMap::new();
    for record in guard.iter_from(first) {
        match record {
            Ok(record) => {
                let entry = per_disk
                    .entry(record.disk_id)
                    .or_insert((record.timestamp_ns, 0));
                entry.1 = entry.1.max(record.seq);
            }
            Err(error) => {
                tracing::warn!(%error, "journal scan for status stopped early");
                break;
            }
        }
    }
    drop(guard);
    let now = Instant::now();
    let wall_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for (disk_id, (oldest_ns, last_sequence)) in per_disk {
        let Some(stats) = status.disk_by_id(disk_id) else {
            tracing::warn!(
                disk_id,
                "journal holds records of a disk that is no longer configured"
            );
            continue;
        };
        let age = Duration::from_nanos(wall_ns.saturating_sub(oldest_ns));
        stats.restore_pending(last_sequence, now.checked_sub(age).unwrap_or(now));
    }
}
