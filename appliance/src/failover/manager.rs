//! The failovers of one target appliance: `ferry failover` (test, planned, unplanned),
//! `ferry failover cleanup`, and what reprotect and failback need of a running failover.
//!
//! A failover of a group pins its recovery point in the catalog (pruning keeps it and every
//! before-image it needs), opens each disk's view of the point under a fresh overlay, and serves
//! each disk on its own unix socket (the `<machine>/<disk>` export and the default export), at
//! once: no copy is made before the export is readable. `--materialize` then writes each disk's
//! image at the point to `DIR/<machine>/<disk>.raw`; every machine gets a definition (JSON and
//! libvirt XML). A failover that is not a test fences the group's source disks (they turn
//! read-only when the source connects, at once if it is connected).
//!
//! On RBD target storage each disk is an RBD clone of its replica at the point
//! (`rbd_clone.rs`), made before the exports start: the export serves the clone (writes land
//! in it), the machine definitions name it, and cleanup (or failback) removes it with its
//! snapshot.
//!
//! Each running failover is recorded in `<state_dir>/failover/<group>/failover.json`: after a
//! restart of the target appliance the failover comes back with its overlays or clones (the
//! writes of the failed-over machines), its pin and its fencing; the record names the clones
//! and snapshots so they are removed after a restart too.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::definition::{
    DiskDefinition, MachineDefinition, PointReference, RbdDiskDefinition, RbdMonitor,
};
use super::overlay::{FailoverDisk, PointDisk};
use super::rbd_clone::{self, FailoverClone};
use crate::apply::catalog::{point_status, DiskView};
use crate::apply::peer::{DirtyFuture, PeerControl, ReadFuture, ReprotectDisk, ReprotectDisks};
use crate::apply::storage::{sanitize, write_bytes_atomic};
use crate::apply::RecoveryStore;
use crate::capture::server::{self, Endpoint, ExportSet};
use crate::control::{FailoverExport, GroupState, RecoveryPointStatus, Response};
use crate::core::nbd::{ExportInfo, ServerConfig};
use crate::core::recovery::{PointInfo, PointSelector};

/// The record of a running failover, persisted so a restart brings it back.
const RECORD_FILE: &str = "failover.json";
/// How long a planned failover waits for the source's final point.
const PLANNED_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the final point of a planned failover may take to reach the catalog after the
/// source said it is durable here.
const PLANNED_POINT_WAIT: Duration = Duration::from_secs(30);
/// Materialisation reads and writes this much at a time (zero chunks are left sparse).
const MATERIALIZE_CHUNK_BYTES: usize = 4 << 20;
/// `sun_path` holds 108 bytes including the terminating NUL.
const UNIX_SOCKET_PATH_MAX: usize = 107;

/// What a failover request asks for (from `control::Request::Failover`).
#[derive(Clone, Debug, Default)]
pub struct FailoverRequest {
    pub group: String,
    pub point: Option<u64>,
    pub at_unix_ms: Option<u64>,
    pub test: bool,
    pub planned: bool,
    pub materialize_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct FailoverRecord {
    group: String,
    point_id: u64,
    test: bool,
    planned: bool,
    started_unix_ms: u64,
    #[serde(default)]
    materialize_dir: Option<String>,
    #[serde(default)]
    definitions: Vec<String>,
    /// On RBD target storage: each disk's clone and the replica snapshot it was made from.
    #[serde(default)]
    rbd_clones: Vec<FailoverClone>,
}

/// One running failover.
struct Running {
    record: FailoverRecord,
    point: RecoveryPointStatus,
    /// (source appliance, disk).
    disks: Vec<(String, FailoverDisk)>,
    exports: Vec<FailoverExport>,
    stop: watch::Sender<bool>,
    listeners: Mutex<Vec<JoinHandle<()>>>,
}

/// The failovers of a target appliance.
pub struct FailoverManager {
    recovery: Arc<RecoveryStore>,
    peers: Arc<PeerControl>,
    /// `<state_dir>/failover`.
    dir: PathBuf,
    running: Mutex<BTreeMap<String, Arc<Running>>>,
    /// Groups with a failover starting or being removed: a second command waits its turn by
    /// being refused (a failover is not something two operators should race on).
    busy: Mutex<BTreeSet<String>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// A recovery-point view as the overlay reads it.
struct ViewDisk(Arc<DiskView>);

impl PointDisk for ViewDisk {
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_into(offset, buf).map_err(io::Error::other)
    }
}

impl ReprotectDisk for FailoverDisk {
    fn size_bytes(&self) -> u64 {
        FailoverDisk::size_bytes(self)
    }

    fn read_at(&self, offset: u64, length: u64) -> ReadFuture<'_> {
        Box::pin(async move {
            let length = usize::try_from(length).map_err(io::Error::other)?;
            FailoverDisk::read_at(self, offset, length)
                .await
                .map_err(io::Error::other)
        })
    }

    fn take_dirty(&self) -> DirtyFuture<'_> {
        Box::pin(async move {
            FailoverDisk::take_changed(self)
                .await
                .map_err(io::Error::other)
        })
    }
}

/// Removes the group from `busy` when the command ends, however it ends.
struct BusyGuard<'a> {
    busy: &'a Mutex<BTreeSet<String>>,
    group: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        lock(self.busy).remove(&self.group);
    }
}

fn error(message: impl Into<String>) -> Response {
    Response::Error {
        message: message.into(),
    }
}

impl FailoverManager {
    /// The manager of a target appliance; `state_dir/failover` holds overlays, sockets and
    /// records. Call [`FailoverManager::restore`] once at start.
    pub fn new(recovery: Arc<RecoveryStore>, peers: Arc<PeerControl>, state_dir: &Path) -> Self {
        Self {
            recovery,
            peers,
            dir: state_dir.join("failover"),
            running: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeSet::new()),
        }
    }

    fn group_dir(&self, group: &str) -> PathBuf {
        self.dir.join(sanitize(group))
    }

    fn claim(&self, group: &str) -> Option<BusyGuard<'_>> {
        lock(&self.busy)
            .insert(group.to_string())
            .then(|| BusyGuard {
                busy: &self.busy,
                group: group.to_string(),
            })
    }

    /// The group's failover state (protected when none runs).
    pub fn state(&self, group: &str) -> GroupState {
        match lock(&self.running).get(group) {
            Some(running) if running.record.test => GroupState::TestFailover,
            Some(_) => GroupState::FailedOver,
            None => GroupState::Protected,
        }
    }

    /// Every running failover: group, state, exports (for status).
    pub fn snapshot(&self) -> Vec<(String, GroupState, Vec<FailoverExport>)> {
        lock(&self.running)
            .iter()
            .map(|(group, running)| {
                let state = if running.record.test {
                    GroupState::TestFailover
                } else {
                    GroupState::FailedOver
                };
                (group.clone(), state, running.exports.clone())
            })
            .collect()
    }

    /// Brings back the failovers recorded before a restart (called once at start, before the
    /// first prune, so their points are pinned again in time). A failover that cannot come back
    /// is logged and left on disk for the operator.
    pub fn restore(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path().join(RECORD_FILE);
            let record: FailoverRecord = match std::fs::read(&path) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(record) => record,
                    Err(parse) => {
                        tracing::error!(path = %path.display(), "failover record unparsable, failover not restored: {parse}");
                        continue;
                    }
                },
                Err(_) => continue,
            };
            let group = record.group.clone();
            match self.start_exports(&record, false) {
                Ok(running) => {
                    if !record.test {
                        self.peers.set_failed_over(&group, true);
                    }
                    tracing::info!(group = %group, point = record.point_id, test = record.test, "failover restored after restart");
                    lock(&self.running).insert(group, Arc::new(running));
                }
                Err(message) => {
                    tracing::error!(group = %group, "failover not restored after restart: {message}");
                }
            }
        }
    }

    /// `ferry failover`: brings the group up at the requested point.
    pub async fn failover(&self, request: FailoverRequest) -> Response {
        let group = request.group.clone();
        if request.test && request.planned {
            return error("a test failover leaves the source running: --planned and --test exclude each other");
        }
        if request.point.is_some() && request.at_unix_ms.is_some() {
            return error("give a point id or a time, not both");
        }
        let state = self.state(&group);
        if state != GroupState::Protected {
            return error(match state {
                GroupState::TestFailover => format!(
                    "group {group:?} has a test failover running: remove it first (ferry failover cleanup --group {group})"
                ),
                _ => format!(
                    "group {group:?} is already failed over: reprotect and fail back before failing over again"
                ),
            });
        }
        let Some(_busy) = self.claim(&group) else {
            return error(format!(
                "group {group:?}: another failover command is running for it"
            ));
        };
        let started = Instant::now();
        let selector = if request.planned {
            match self.planned_point(&group).await {
                Ok(id) => PointSelector::Id(id),
                Err(message) => return error(message),
            }
        } else {
            match (request.point, request.at_unix_ms) {
                (Some(id), _) => PointSelector::Id(id),
                (None, Some(time_unix_ms)) => PointSelector::AtOrBefore { time_unix_ms },
                (None, None) => PointSelector::Latest,
            }
        };
        let point = match self.recovery.catalog().resolve(&group, selector) {
            Ok(point) => point,
            Err(resolve) => return error(resolve.to_string()),
        };
        let mut record = FailoverRecord {
            group: group.clone(),
            point_id: point.id,
            test: request.test,
            planned: request.planned,
            started_unix_ms: now_unix_ms(),
            materialize_dir: request
                .materialize_dir
                .as_ref()
                .map(|dir| dir.display().to_string()),
            definitions: Vec::new(),
            rbd_clones: Vec::new(),
        };
        // On RBD: the clones first (the point stays pinned while they are made and until the
        // exports pin it themselves).
        let clone_pin = match self.make_clones(&mut record).await {
            Ok(pinned) => pinned,
            Err(message) => return error(message),
        };
        let started_exports = self.start_exports(&record, true);
        if clone_pin {
            self.recovery.unpin(&group, record.point_id);
        }
        let running = match started_exports {
            Ok(running) => running,
            Err(message) => {
                self.remove_clones(&record).await;
                return error(message);
            }
        };
        let exports_ready = started.elapsed();
        // Materialised images and definitions; a failure takes the failover down again.
        let finished = self.finish(&running, &mut record).await;
        let (materialized, definitions) = match finished {
            Ok(done) => done,
            Err(message) => {
                self.stop_running(&running).await;
                drop(running);
                self.remove_clones(&record).await;
                self.remove_files(&group);
                return error(message);
            }
        };
        let running = Running {
            record,
            exports: running
                .exports
                .iter()
                .map(|export| FailoverExport {
                    materialized_path: materialized
                        .get(&export.export_name)
                        .map(|path| path.display().to_string()),
                    ..export.clone()
                })
                .collect(),
            ..running
        };
        if let Err(message) = self.persist(&running.record) {
            self.stop_running(&running).await;
            let record = running.record.clone();
            drop(running);
            self.remove_clones(&record).await;
            self.remove_files(&group);
            return error(message);
        }
        if !running.record.test {
            self.peers.set_failed_over(&group, true);
        }
        tracing::info!(
            group = %group,
            point = running.point.id,
            test = running.record.test,
            planned = running.record.planned,
            disks = running.exports.len(),
            rbd_clones = running.record.rbd_clones.len(),
            exports_ready_ms = exports_ready.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "failover up"
        );
        let response = Response::Failover {
            group: group.clone(),
            point: running.point.clone(),
            test: running.record.test,
            exports: running.exports.clone(),
            definitions,
        };
        lock(&self.running).insert(group, Arc::new(running));
        response
    }

    /// A planned failover's point: the source fences the group, drains and cuts a final point;
    /// once the source says it is durable here, its marker is in the catalog within moments.
    async fn planned_point(&self, group: &str) -> Result<u64, String> {
        let planned = self
            .peers
            .prepare_planned_failover(group, PLANNED_TIMEOUT)
            .await
            .map_err(|prepare| format!("planned failover of {group:?}: {prepare}"))?;
        let deadline = Instant::now() + PLANNED_POINT_WAIT;
        loop {
            match self
                .recovery
                .catalog()
                .resolve(group, PointSelector::Id(planned.point_id))
            {
                Ok(_) => return Ok(planned.point_id),
                Err(resolve) if Instant::now() >= deadline => {
                    return Err(format!(
                        "planned failover of {group:?}: the final point {} from {} is not usable here after {PLANNED_POINT_WAIT:?}: {resolve}",
                        planned.point_id, planned.source
                    ))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// On RBD target storage, makes every disk's clone at the record's point and names them
    /// in the record; returns whether the point was pinned for it (the caller unpins once the
    /// exports hold their own pin). On files: nothing, `false`. On error nothing is left.
    async fn make_clones(&self, record: &mut FailoverRecord) -> Result<bool, String> {
        let Some(storage) = self.recovery.storage().as_rbd() else {
            return Ok(false);
        };
        let group = record.group.clone();
        self.recovery
            .pin(&group, record.point_id)
            .map_err(|pin| pin.to_string())?;
        let started = Instant::now();
        // Opening the views opens the replica images: blocking.
        let views = {
            let (recovery, view_group, id) =
                (self.recovery.clone(), group.clone(), record.point_id);
            tokio::task::spawn_blocking(move || {
                recovery
                    .view(&view_group, PointSelector::Id(id))
                    .map_err(|view| view.to_string())
            })
            .await
            .unwrap_or_else(|join| Err(format!("opening the point's views: task failed: {join}")))
        };
        let views = match views {
            Ok(views) => views,
            Err(message) => {
                self.recovery.unpin(&group, record.point_id);
                return Err(message);
            }
        };
        let mut written = 0u64;
        for view in views {
            let clone = FailoverClone::new(
                storage,
                &group,
                record.point_id,
                &view.source,
                &view.machine,
                &view.name,
            );
            record.rbd_clones.push(clone.clone());
            match rbd_clone::make(storage.pool(), &clone, &group, Arc::new(view)).await {
                Ok(bytes) => written += bytes,
                Err(message) => {
                    self.remove_clones(record).await;
                    record.rbd_clones.clear();
                    self.recovery.unpin(&group, record.point_id);
                    return Err(message);
                }
            }
        }
        tracing::info!(
            group = %group,
            point = record.point_id,
            clones = %record.rbd_clones.iter().map(FailoverClone::spec).collect::<Vec<_>>().join(","),
            point_bytes_written = written,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "failover RBD clones made"
        );
        Ok(true)
    }

    /// Removes the record's clones and their snapshots (logged, not fatal: the next failover
    /// of the group removes what is left). Returns the messages of what failed.
    async fn remove_clones(&self, record: &FailoverRecord) -> Vec<String> {
        if record.rbd_clones.is_empty() {
            return Vec::new();
        }
        let Some(storage) = self.recovery.storage().as_rbd() else {
            let message = format!(
                "failover of {:?} made RBD clones, but the target storage is not RBD now: remove {} by hand",
                record.group,
                record
                    .rbd_clones
                    .iter()
                    .map(FailoverClone::spec)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            tracing::warn!("{message}");
            return vec![message];
        };
        let pool = storage.pool().clone();
        let (clones, group) = (record.rbd_clones.clone(), record.group.clone());
        let failed = tokio::task::spawn_blocking(move || {
            clones
                .iter()
                .filter_map(|clone| rbd_clone::remove(&pool, clone, &group).err())
                .collect::<Vec<String>>()
        })
        .await
        .unwrap_or_else(|join| vec![format!("removing the RBD clones: task failed: {join}")]);
        for message in &failed {
            tracing::warn!(group = %record.group, "failover RBD clone not removed: {message}");
        }
        failed
    }

    /// Pins the record's point, opens every disk's view under its overlay (`fresh`: a new one)
    /// or on its RBD clone, and serves each on its socket.
    fn start_exports(&self, record: &FailoverRecord, fresh: bool) -> Result<Running, String> {
        let group = &record.group;
        let point = self
            .recovery
            .pin(group, record.point_id)
            .map_err(|pin| pin.to_string())?;
        let unpin = |message: String| {
            self.recovery.unpin(group, record.point_id);
            message
        };
        let views = self
            .recovery
            .view(group, PointSelector::Id(point.id))
            .map_err(|view| unpin(view.to_string()))?;
        if views.is_empty() {
            return Err(unpin(format!(
                "group {group:?} has no disk at point {} on this target",
                point.id
            )));
        }
        let group_dir = self.group_dir(group);
        let mut disks = Vec::new();
        for view in views {
            let source = view.source.clone();
            let (machine, name) = (view.machine.clone(), view.name.clone());
            let clone = record.rbd_clones.iter().find(|clone| {
                clone.source == source && clone.machine == machine && clone.disk == name
            });
            let view = Arc::new(ViewDisk(Arc::new(view)));
            let disk = match clone {
                Some(clone) => {
                    let image = self
                        .recovery
                        .storage()
                        .as_rbd()
                        .ok_or_else(|| {
                            format!(
                                "the failover's disk {machine}/{name} is RBD image {}, but the target storage is not RBD",
                                clone.spec()
                            )
                        })
                        .and_then(|storage| {
                            storage
                                .pool()
                                .open_image(&clone.clone)
                                .map_err(|open| open.to_string())
                        })
                        .map_err(&unpin)?;
                    FailoverDisk::on_image(&machine, &name, view, image)
                }
                None => FailoverDisk::open(&group_dir, &machine, &name, view, fresh)
                    .map_err(|open| unpin(open.to_string()))?,
            };
            disks.push((source, disk));
        }
        let (stop, stop_receiver) = watch::channel(false);
        let buffers = Arc::new(server::Buffers::new());
        let mut exports = Vec::new();
        let mut listeners = Vec::new();
        for (_, disk) in &disks {
            let socket = group_dir.join(format!(
                "{}-{}.sock",
                sanitize(disk.machine()),
                sanitize(disk.name())
            ));
            let bound = bind_socket(&socket);
            let listener = match bound {
                Ok(listener) => listener,
                Err(message) => {
                    let _ = stop.send(true);
                    return Err(unpin(message));
                }
            };
            let mut config = ServerConfig::new(vec![ExportInfo {
                name: disk.export_name().to_string(),
                size_bytes: disk.size_bytes(),
                description: format!(
                    "Ferry failover of {} at recovery point {}{}",
                    disk.export_name(),
                    point.id,
                    if record.test { " (test)" } else { "" }
                ),
            }]);
            config.default_export = Some(0);
            let export_set = Arc::new(ExportSet {
                config,
                disks: vec![disk.clone()],
                buffers: buffers.clone(),
                endpoint: Endpoint::Unix(socket.clone()),
            });
            listeners.push(tokio::spawn(server::run_listener(
                listener,
                export_set,
                stop_receiver.clone(),
            )));
            let socket_text = socket.display().to_string();
            exports.push(FailoverExport {
                machine: disk.machine().to_string(),
                disk: disk.name().to_string(),
                export_name: disk.export_name().to_string(),
                uri: format!("nbd+unix:///{}?socket={socket_text}", disk.export_name()),
                socket: socket_text,
                point_id: point.id,
                test: record.test,
                materialized_path: None,
                rbd_image: record
                    .rbd_clones
                    .iter()
                    .find(|clone| clone.machine == disk.machine() && clone.disk == disk.name())
                    .map(FailoverClone::spec),
            });
        }
        Ok(Running {
            record: record.clone(),
            point: point_status(&point),
            disks,
            exports,
            stop,
            listeners: Mutex::new(listeners),
        })
    }

    /// Writes the materialised images (when asked) and the machine definitions. Returns the
    /// images by export name and the definition files.
    async fn finish(
        &self,
        running: &Running,
        record: &mut FailoverRecord,
    ) -> Result<(BTreeMap<String, PathBuf>, Vec<String>), String> {
        let mut materialized = BTreeMap::new();
        if let Some(out) = &record.materialize_dir {
            let out = PathBuf::from(out);
            for (_, disk) in &running.disks {
                let path = out
                    .join(sanitize(disk.machine()))
                    .join(format!("{}.raw", sanitize(disk.name())));
                let view_disk = disk.clone();
                let image = path.clone();
                tokio::task::spawn_blocking(move || materialize(&view_disk, &image))
                    .await
                    .map_err(|join| format!("materialise task failed: {join}"))??;
                materialized.insert(disk.export_name().to_string(), path);
            }
        }
        let point = self
            .recovery
            .catalog()
            .resolve(&record.group, PointSelector::Id(record.point_id))
            .map_err(|resolve| resolve.to_string())?;
        let definitions = self
            .write_definitions(running, record, &point, &materialized)
            .await?;
        record.definitions = definitions.clone();
        Ok((materialized, definitions))
    }

    /// One definition per machine: `<out>/<machine>/<machine>.{json,xml}` when materialising,
    /// else `<state_dir>/failover/<group>/machines/<machine>.{json,xml}`.
    async fn write_definitions(
        &self,
        running: &Running,
        record: &FailoverRecord,
        point: &PointInfo,
        materialized: &BTreeMap<String, PathBuf>,
    ) -> Result<Vec<String>, String> {
        let mut machines: BTreeMap<(String, String), Vec<DiskDefinition>> = BTreeMap::new();
        let rbd_access = match self.recovery.storage().as_rbd() {
            Some(storage) if !record.rbd_clones.is_empty() => {
                let pool = storage.pool().clone();
                let mon_host = tokio::task::spawn_blocking(move || pool.mon_host())
                    .await
                    .map_err(|join| format!("reading mon_host: task failed: {join}"))?
                    .map_err(|get| format!("the monitors for the definitions: {get}"))?;
                let monitors = rbd_clone::monitors(&mon_host)
                    .into_iter()
                    .map(|(host, port)| RbdMonitor { host, port })
                    .collect::<Vec<_>>();
                Some((
                    monitors,
                    storage.client().to_string(),
                    storage.libvirt_secret_usage(),
                ))
            }
            _ => None,
        };
        for ((source, disk), export) in running.disks.iter().zip(&running.exports) {
            machines
                .entry((source.clone(), disk.machine().to_string()))
                .or_default()
                .push(DiskDefinition {
                    name: disk.name().to_string(),
                    size_bytes: disk.size_bytes(),
                    export_name: export.export_name.clone(),
                    socket: export.socket.clone(),
                    uri: export.uri.clone(),
                    image: materialized
                        .get(&export.export_name)
                        .map(|path| path.display().to_string()),
                    rbd: record
                        .rbd_clones
                        .iter()
                        .find(|clone| {
                            clone.source == *source
                                && clone.machine == disk.machine()
                                && clone.disk == disk.name()
                        })
                        .zip(rbd_access.as_ref())
                        .map(
                            |(clone, (monitors, user, secret_usage))| RbdDiskDefinition {
                                pool: clone.pool.clone(),
                                image: clone.clone.clone(),
                                monitors: monitors.clone(),
                                user: user.clone(),
                                secret_usage: secret_usage.clone(),
                            },
                        ),
                });
        }
        let mut written = Vec::new();
        for ((source, machine), disks) in machines {
            let settings = self
                .recovery
                .replicas()
                .load_settings(&source, &machine)
                .map_err(|load| format!("settings of machine {machine}: {load}"))?
                .map(|stored| stored.target)
                .unwrap_or_else(|| crate::config::MachineSettings {
                    name: machine.clone(),
                    resource_group: None,
                    availability_set: None,
                    nics: Vec::new(),
                    test_network: None,
                });
            let definition = MachineDefinition::new(
                &record.group,
                &source,
                &settings,
                record.test,
                PointReference {
                    id: point.id,
                    time_unix_ms: point.time_unix_ms,
                },
                disks,
            );
            let dir = match &record.materialize_dir {
                Some(out) => PathBuf::from(out).join(sanitize(&machine)),
                None => self.group_dir(&record.group).join("machines"),
            };
            std::fs::create_dir_all(&dir)
                .map_err(|create| format!("definitions directory {}: {create}", dir.display()))?;
            let stem = sanitize(&machine);
            let json = serde_json::to_vec_pretty(&definition)
                .map_err(|encode| format!("definition of {machine}: {encode}"))?;
            for (name, bytes) in [
                (format!("{stem}.json"), json),
                (format!("{stem}.xml"), definition.libvirt_xml().into_bytes()),
            ] {
                write_bytes_atomic(&dir, &name, &bytes).map_err(|write| write.to_string())?;
                written.push(dir.join(name).display().to_string());
            }
        }
        Ok(written)
    }

    fn persist(&self, record: &FailoverRecord) -> Result<(), String> {
        let dir = self.group_dir(&record.group);
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|encode| format!("failover record: {encode}"))?;
        write_bytes_atomic(&dir, RECORD_FILE, &bytes).map_err(|write| write.to_string())
    }

    /// Stops the listeners (connections finish their in-flight requests), flushes the overlays
    /// and unpins the point.
    async fn stop_running(&self, running: &Running) {
        let _ = running.stop.send(true);
        let listeners = std::mem::take(&mut *lock(&running.listeners));
        for listener in listeners {
            let _ = listener.await;
        }
        for (_, disk) in &running.disks {
            if let Err(flush) = disk.flush().await {
                tracing::warn!(
                    export = disk.export_name(),
                    "failover overlay flush failed: {flush}"
                );
            }
        }
        self.recovery
            .unpin(&running.record.group, running.record.point_id);
    }

    /// Removes a group's overlays, sockets, record and definitions under the state dir
    /// (materialised images under `--out` are the operator's and stay).
    fn remove_files(&self, group: &str) {
        let dir = self.group_dir(group);
        if let Err(remove) = std::fs::remove_dir_all(&dir) {
            if remove.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), "failover files not removed: {remove}");
            }
        }
    }

    /// `ferry failover cleanup`: removes a test failover. A real failover ends with failback.
    pub async fn cleanup_test(&self, group: &str) -> Response {
        match self.state(group) {
            GroupState::TestFailover => {}
            GroupState::Protected => {
                return error(format!("group {group:?} has no test failover to clean up"))
            }
            other => {
                return error(format!(
                    "group {group:?} is {}: cleanup removes test failovers; a failed-over group returns with reprotect and failback",
                    other.as_str()
                ))
            }
        }
        match self.cleanup(group).await {
            Ok(removed) => Response::Ok {
                message: format!(
                    "test failover of group {group} removed ({removed} exports stopped, overlays deleted); replication continues"
                ),
            },
            Err(message) => error(message),
        }
    }

    /// Tears a failover down: exports, overlays, record, pin. Returns the exports stopped.
    pub async fn cleanup(&self, group: &str) -> Result<usize, String> {
        let Some(_busy) = self.claim(group) else {
            return Err(format!(
                "group {group:?}: another failover command is running for it"
            ));
        };
        let Some(running) = lock(&self.running).remove(group) else {
            return Err(format!("group {group:?} has no failover on this appliance"));
        };
        self.stop_running(&running).await;
        let (record, exports) = (running.record.clone(), running.exports.len());
        // The export's handles on the clones close with the last reference.
        drop(running);
        let failed = self.remove_clones(&record).await;
        self.remove_files(group);
        tracing::info!(group = %group, test = record.test, "failover removed");
        if !failed.is_empty() {
            return Err(format!(
                "failover of {group:?} removed, but not all of its RBD images: {} (the next failover of the group removes them, or remove them with rbd)",
                failed.join("; ")
            ));
        }
        Ok(exports)
    }

    /// At appliance shutdown: stops every export and flushes the overlays; records stay, so
    /// the failovers come back at the next start.
    pub async fn stop(&self) {
        let running: Vec<Arc<Running>> = lock(&self.running).values().cloned().collect();
        for running in running {
            self.stop_running(&running).await;
        }
    }

    /// The failed-over disks of a (non-test) failover, as reprotect pulls them.
    pub fn reprotect_disks(&self, group: &str) -> Result<ReprotectDisks, String> {
        let running = self.running(group)?;
        if running.record.test {
            return Err(format!(
                "group {group:?} runs a test failover: a test copy is never replicated back"
            ));
        }
        Ok(running
            .disks
            .iter()
            .map(|(source, disk)| {
                (
                    (
                        source.clone(),
                        disk.machine().to_string(),
                        disk.name().to_string(),
                    ),
                    Arc::new(disk.clone()) as Arc<dyn ReprotectDisk>,
                )
            })
            .collect())
    }

    /// Makes the group's exports refuse writes (failback's last round) or take them again.
    pub fn set_read_only(&self, group: &str, read_only: bool) -> Result<(), String> {
        let running = self.running(group)?;
        for (_, disk) in &running.disks {
            disk.set_read_only(read_only);
        }
        Ok(())
    }

    fn running(&self, group: &str) -> Result<Arc<Running>, String> {
        lock(&self.running)
            .get(group)
            .cloned()
            .ok_or_else(|| format!("group {group:?} has no failover on this appliance"))
    }
}

/// Binds a failover export's unix socket (replacing a socket a previous run left behind).
fn bind_socket(path: &Path) -> Result<server::Listener, String> {
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str().len() > UNIX_SOCKET_PATH_MAX {
        return Err(format!(
            "failover socket path {} is longer than a unix socket allows ({UNIX_SOCKET_PATH_MAX} bytes): use a shorter appliance.state_dir",
            path.display()
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            std::fs::remove_file(path)
                .map_err(|remove| format!("stale socket {}: {remove}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ))
        }
        Err(_) => {}
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|create| format!("directory {}: {create}", parent.display()))?;
    }
    tokio::net::UnixListener::bind(path)
        .map(server::Listener::Unix)
        .map_err(|bind| format!("listening on {}: {bind}", path.display()))
}

/// Writes a disk's image at the point to `path` (a new file; sparse where the point is zero),
/// reading the point's view, never the overlay (a machine already booted from the export may
/// have written to it).
fn materialize(disk: &FailoverDisk, path: &Path) -> Result<(), String> {
    let context = |what: &str, error: &dyn std::fmt::Display| {
        format!(
            "materialising {} to {}: {what}: {error}",
            disk.export_name(),
            path.display()
        )
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| context("create directory", &e))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                context(
                    "the file exists (remove it or choose another --out)",
                    &"refusing to overwrite",
                )
            } else {
                context("create", &e)
            }
        })?;
    let size = disk.size_bytes();
    file.set_len(size).map_err(|e| context("set length", &e))?;
    let mut buf = vec![0u8; MATERIALIZE_CHUNK_BYTES];
    let mut offset = 0u64;
    while offset < size {
        let length = (size - offset).min(MATERIALIZE_CHUNK_BYTES as u64) as usize;
        let chunk = &mut buf[..length];
        disk.read_point(offset, chunk)
            .map_err(|e| context(&format!("read at offset {offset}"), &e))?;
        if chunk.iter().any(|&byte| byte != 0) {
            file.write_all_at(chunk, offset)
                .map_err(|e| context(&format!("write at offset {offset}"), &e))?;
        }
        offset += length as u64;
    }
    file.flush().map_err(|e| context("flush", &e))?;
    file.sync_all().map_err(|e| context("fsync", &e))?;
    Ok(())
}
