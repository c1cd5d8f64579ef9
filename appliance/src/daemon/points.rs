//! Recovery-point cuts on a source appliance: per consistency group a timer at
//! `recovery_point_interval` (and `app_consistent_interval`), `ferry recovery-point create`, the
//! freeze/thaw hooks of app-consistent points, the marker appended to the journal under the
//! group's write gate, and a small local log of the points cut (what `recovery-point list`
//! answers on a source; the target answers from its catalog).
//!
//! A cut of a group that lives on this appliance only: close the gate, append the marker
//! (`RecordKind::Marker`, disk id 0, `core::recovery::PointMarker` JSON), open the gate, make
//! the marker durable so the shipper sends it at once. A group with `members` on other source
//! appliances is cut through the barrier (`daemon::barrier`), which calls back into
//! [`Cutter::cut_closed`] and [`Cutter::finish`] here on every member.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::capture::{CaptureDisk, SharedJournal, WriteGate};
use crate::config::GroupConfig;
use crate::control::{DiskState, PointConsistency, RecoveryPointStatus};
use crate::core::journal::{JournalError, RecordSpec};
use crate::core::record::{RecordKind, Seq};
use crate::core::recovery::{PointKind, PointMarker};

/// Longest a freeze or thaw hook may run before it is killed and the cut refused.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Points kept per group in the local log (the target's catalog is the real record; this one
/// only answers `recovery-point list` on the source).
pub const LOG_POINTS_MAX: usize = 256;

/// Bytes of a hook's stderr quoted in an error.
const HOOK_STDERR_BYTES_MAX: usize = 2048;

/// Why a recovery point could not be cut or listed (the control socket shows the text).
#[derive(Debug, thiserror::Error)]
pub enum CutError {
    #[error("no consistency group {group:?} on this appliance (groups: {known})")]
    UnknownGroup { group: String, known: String },
    #[error(
        "group {group:?} is cut by its coordinator {coordinator:?}: create recovery points there"
    )]
    NotCoordinator { group: String, coordinator: String },
    #[error("group {group:?} has no freeze_hook: an app-consistent point needs one (source.group freeze_hook)")]
    NoFreezeHook { group: String },
    #[error(
        "{hook} of group {group:?} ({command:?}) failed: {status}{}",
        stderr_suffix(stderr)
    )]
    HookFailed {
        hook: &'static str,
        group: String,
        command: String,
        status: String,
        stderr: String,
    },
    #[error(
        "{hook} of group {group:?} ({command:?}) did not finish within {timeout:?}; it was killed"
    )]
    HookTimeout {
        hook: &'static str,
        group: String,
        command: String,
        timeout: Duration,
    },
    #[error("{hook} of group {group:?}: cannot run `sh -c {command:?}`: {source}")]
    HookSpawn {
        hook: &'static str,
        group: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "appending the recovery-point marker of group {group:?} to the cache journal: {source}"
    )]
    Append {
        group: String,
        #[source]
        source: JournalError,
    },
    #[error("flushing the recovery-point marker of group {group:?} (sequence {seq}): {source}")]
    Flush {
        group: String,
        seq: Seq,
        #[source]
        source: JournalError,
    },
    #[error("barrier of group {group:?}: {message}")]
    Barrier { group: String, message: String },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!("; stderr: {}", stderr.trim())
    }
}

/// One point this appliance cut, as the local log keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutPoint {
    pub id: u64,
    pub time_unix_ms: u64,
    pub kind: PointKind,
    /// Every disk of the group on this appliance was protected at the cut.
    pub consistent: bool,
    /// Journal sequence of the marker.
    pub seq: Seq,
    /// Source appliances that cut this point (empty: this one only).
    #[serde(default)]
    pub members: Vec<String>,
    /// Why a barrier point is known to be incomplete (a member released its gate before the
    /// cut, or never confirmed it): it stays unusable at the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete: Option<String>,
    /// How long this appliance's gate held new writes for the cut (logged, not kept).
    #[serde(skip)]
    pub gate_held_us: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CutLog {
    groups: BTreeMap<String, GroupLog>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct GroupLog {
    /// Highest point id used: ids only grow, across restarts too.
    last_id: u64,
    points: VecDeque<CutPoint>,
}

/// One consistency group as the cutter sees it.
pub(crate) struct GroupCutter {
    pub config: GroupConfig,
    pub gate: WriteGate,
    /// The group's disks on this appliance.
    pub disks: Vec<CaptureDisk>,
    /// Every appliance that cuts the group (sorted, this one included); empty when the group
    /// lives on this appliance only.
    pub members: Vec<String>,
    /// This appliance times and coordinates the group's cuts.
    pub coordinator: String,
    /// One cut of the group at a time.
    busy: tokio::sync::Mutex<()>,
}

impl GroupCutter {
    pub fn new(config: GroupConfig, disks: Vec<CaptureDisk>, own_name: &str) -> Self {
        let gate = WriteGate::new();
        for disk in &disks {
            disk.attach_gate(gate.clone());
        }
        let members = if config.members.is_empty() {
            Vec::new()
        } else {
            config.member_names(own_name)
        };
        let coordinator = config
            .coordinator
            .clone()
            .unwrap_or_else(|| own_name.to_string());
        Self {
            config,
            gate,
            disks,
            members,
            coordinator,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    fn disk_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.disks.iter().map(|disk| disk.disk_id()).collect();
        ids.sort_unstable();
        ids
    }
}

/// Cuts across several appliances: implemented by `daemon::barrier` on the coordinator.
pub(crate) trait Barrier: Send + Sync {
    /// Runs one barrier round for `point` of `group`: reaches every member first (outside the
    /// gate), then closes this appliance's gate and appends its marker once every member
    /// closed its own.
    fn cut<'a>(
        &'a self,
        cutter: &'a Cutter,
        group: &'a GroupCutter,
        point: PendingPoint,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<CutPoint, CutError>> + Send + 'a>>;
}

/// A point being cut: what every member's marker says besides its own disks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPoint {
    pub group: String,
    pub id: u64,
    pub time_unix_ms: u64,
    pub kind: PointKind,
    pub members: Vec<String>,
}

/// The recovery-point cutter of a source appliance (shared by the timers, the control commands
/// and the barrier).
pub(crate) struct Cutter {
    appliance: String,
    journal: SharedJournal,
    groups: BTreeMap<String, GroupCutter>,
    log: Mutex<CutLog>,
    log_path: PathBuf,
    /// Highest sequence the target acknowledged (0 while unknown).
    acked: Box<dyn Fn() -> Seq + Send + Sync>,
    barrier: Mutex<Option<Arc<dyn Barrier>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn unix_time_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

impl Cutter {
    /// A cutter for `groups`; the local log lives at `log_path` (read now if present: a log
    /// that cannot be read is set aside and started afresh, it only serves listings).
    pub fn new(
        appliance: &str,
        journal: SharedJournal,
        groups: Vec<GroupCutter>,
        log_path: PathBuf,
        acked: Box<dyn Fn() -> Seq + Send + Sync>,
    ) -> Self {
        let log = match std::fs::read(&log_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(path = %log_path.display(), %error, "recovery-point log unreadable; starting a new one");
                CutLog::default()
            }),
            Err(_) => CutLog::default(),
        };
        Self {
            appliance: appliance.to_string(),
            journal,
            groups: groups
                .into_iter()
                .map(|group| (group.config.name.clone(), group))
                .collect(),
            log: Mutex::new(log),
            log_path,
            acked,
            barrier: Mutex::new(None),
        }
    }

    /// Installs the barrier that cuts the groups this appliance coordinates with members.
    pub fn set_barrier(&self, barrier: Arc<dyn Barrier>) {
        *lock(&self.barrier) = Some(barrier);
    }

    pub fn appliance(&self) -> &str {
        &self.appliance
    }

    pub fn has_group(&self, group: &str) -> bool {
        self.groups.contains_key(group)
    }

    pub fn group(&self, group: &str) -> Result<&GroupCutter, CutError> {
        self.groups
            .get(group)
            .ok_or_else(|| CutError::UnknownGroup {
                group: group.to_string(),
                known: if self.groups.is_empty() {
                    "none".to_string()
                } else {
                    self.groups.keys().cloned().collect::<Vec<_>>().join(", ")
                },
            })
    }

    pub fn groups(&self) -> impl Iterator<Item = &GroupCutter> {
        self.groups.values()
    }

    /// The next point id of a group: `max(previous + 1, now)`, so ids are unique, increasing
    /// and readable as a time.
    fn next_id(&self, group: &str, now_unix_ms: u64) -> u64 {
        let mut log = lock(&self.log);
        let entry = log.groups.entry(group.to_string()).or_default();
        let id = (entry.last_id + 1).max(now_unix_ms);
        entry.last_id = id;
        id
    }

    /// `ferry recovery-point create` and the timers: cuts a point of `group` now. With
    /// `app_consistent`, the freeze hook runs first (its failure refuses the point) and the
    /// thaw hook always runs after.
    pub async fn create(&self, group: &str, app_consistent: bool) -> Result<CutPoint, CutError> {
        let cutter = self.group(group)?;
        if cutter.coordinator != self.appliance {
            return Err(CutError::NotCoordinator {
                group: group.to_string(),
                coordinator: cutter.coordinator.clone(),
            });
        }
        let _busy = cutter.busy.lock().await;
        let kind = if app_consistent {
            PointKind::App
        } else {
            PointKind::Crash
        };
        if app_consistent {
            let Some(freeze) = &cutter.config.freeze_hook else {
                return Err(CutError::NoFreezeHook {
                    group: group.to_string(),
                });
            };
            if let Err(error) = run_hook("freeze_hook", group, freeze).await {
                // The freeze may have half-happened: thaw whatever it froze.
                self.thaw(cutter).await;
                return Err(error);
            }
        }
        let result = self.cut_now(cutter, kind).await;
        if app_consistent {
            self.thaw(cutter).await;
        }
        result
    }

    async fn thaw(&self, cutter: &GroupCutter) {
        if let Some(thaw) = &cutter.config.thaw_hook {
            if let Err(error) = run_hook("thaw_hook", &cutter.config.name, thaw).await {
                tracing::error!(group = %cutter.config.name, "{error}");
            }
        }
    }

    async fn cut_now(&self, cutter: &GroupCutter, kind: PointKind) -> Result<CutPoint, CutError> {
        let time_unix_ms = unix_time_ms();
        let point = PendingPoint {
            group: cutter.config.name.clone(),
            id: self.next_id(&cutter.config.name, time_unix_ms),
            time_unix_ms,
            kind,
            members: cutter.members.clone(),
        };
        let cut = if cutter.members.is_empty() {
            let closed = cutter.gate.close().await;
            let cut = self.cut_closed(cutter, &point);
            let held = closed.open();
            let mut cut = cut?;
            cut.gate_held_us = held.as_micros() as u64;
            cut
        } else {
            let barrier = lock(&self.barrier).clone();
            let Some(barrier) = barrier else {
                return Err(CutError::Barrier {
                    group: point.group,
                    message: "the barrier to the group's members is not running".to_string(),
                });
            };
            barrier.cut(self, cutter, point).await?
        };
        self.finish(cutter, cut).await
    }

    /// Makes a cut point's marker durable (so the shipper sends it now) and logs it.
    pub async fn finish(&self, cutter: &GroupCutter, cut: CutPoint) -> Result<CutPoint, CutError> {
        self.journal
            .flush_through(cut.seq)
            .await
            .map_err(|source| CutError::Flush {
                group: cutter.config.name.clone(),
                seq: cut.seq,
                source,
            })?;
        self.record(&cutter.config.name, cut.clone()).await;
        tracing::info!(
            group = %cutter.config.name,
            point = cut.id,
            kind = ?cut.kind,
            consistent = cut.consistent,
            sequence = cut.seq,
            gate_held_us = cut.gate_held_us,
            "recovery point cut"
        );
        Ok(cut)
    }

    /// Appends the marker of `point` for this appliance's disks of the group. The caller holds
    /// the group's gate closed.
    pub fn cut_closed(
        &self,
        cutter: &GroupCutter,
        point: &PendingPoint,
    ) -> Result<CutPoint, CutError> {
        let consistent = cutter
            .disks
            .iter()
            // A fenced disk (failed over) takes no writes; a planned failover fences only fully
            // protected disks before it cuts its final point, which must be usable.
            .all(|disk| matches!(disk.state(), DiskState::Protected | DiskState::FailedOver));
        let marker = PointMarker {
            group: point.group.clone(),
            point_id: point.id,
            time_unix_ms: point.time_unix_ms,
            kind: point.kind,
            consistent,
            members: point.members.clone(),
            disk_ids: cutter.disk_ids(),
            retention_ms: cutter.config.retention.as_millis() as u64,
        };
        let payload = marker.encode();
        let seq = self
            .journal
            .append(&RecordSpec {
                kind: RecordKind::Marker,
                disk_id: 0,
                offset: 0,
                length: 0,
                timestamp_ns: point.time_unix_ms.saturating_mul(1_000_000),
                payload: &payload,
            })
            .map_err(|source| CutError::Append {
                group: point.group.clone(),
                source,
            })?;
        Ok(CutPoint {
            id: point.id,
            time_unix_ms: point.time_unix_ms,
            kind: point.kind,
            consistent,
            seq,
            members: point.members.clone(),
            incomplete: None,
            gate_held_us: 0,
        })
    }

    /// Adds a point to the local log (ids stay increasing for points another appliance chose)
    /// and persists the log.
    async fn record(&self, group: &str, point: CutPoint) {
        let bytes = {
            let mut log = lock(&self.log);
            let entry = log.groups.entry(group.to_string()).or_default();
            entry.last_id = entry.last_id.max(point.id);
            entry.points.push_back(point);
            while entry.points.len() > LOG_POINTS_MAX {
                entry.points.pop_front();
            }
            serde_json::to_vec_pretty(&*log)
        };
        let Ok(bytes) = bytes else { return };
        let path = self.log_path.clone();
        let written = tokio::task::spawn_blocking(move || write_atomically(&path, &bytes)).await;
        if let Ok(Err(error)) | Err(error) = written.map_err(std::io::Error::other) {
            tracing::warn!(path = %self.log_path.display(), %error, "cannot persist the recovery-point log");
        }
    }

    /// The points of a group this appliance cut, oldest first, with whether the target has
    /// acknowledged each marker.
    pub fn list(&self, group: &str) -> Result<Vec<RecoveryPointStatus>, CutError> {
        self.group(group)?;
        Ok(self.points(group))
    }

    fn points(&self, group: &str) -> Vec<RecoveryPointStatus> {
        let acked = (self.acked)().max(self.journal.lock().released_seq());
        let log = lock(&self.log);
        let Some(entry) = log.groups.get(group) else {
            return Vec::new();
        };
        entry
            .points
            .iter()
            .map(|point| point_status(point, acked))
            .collect()
    }

    /// Every group's points, for status.
    pub fn all_points(&self) -> Vec<(String, Vec<RecoveryPointStatus>)> {
        self.groups
            .keys()
            .map(|group| (group.clone(), self.points(group)))
            .collect()
    }
}

/// How a logged point looks in `recovery-point list` on the source.
pub(crate) fn point_status(point: &CutPoint, acked_seq: Seq) -> RecoveryPointStatus {
    let replicated = acked_seq >= point.seq;
    let unusable_reason = if let Some(reason) = &point.incomplete {
        Some(reason.clone())
    } else if !point.consistent {
        Some("cut while a disk was not protected (initial sync or resync)".to_string())
    } else if !replicated {
        Some("not yet replicated".to_string())
    } else {
        None
    };
    RecoveryPointStatus {
        id: point.id,
        time_unix_ms: point.time_unix_ms,
        consistency: if !point.consistent {
            PointConsistency::None
        } else {
            match point.kind {
                PointKind::Crash => PointConsistency::Crash,
                PointKind::App => PointConsistency::App,
            }
        },
        usable: unusable_reason.is_none(),
        unusable_reason,
    }
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    std::fs::rename(&temporary, path)
}

/// Runs a hook with `sh -c`, bounded by [`HOOK_TIMEOUT`]; a non-zero exit is an error carrying
/// the status and stderr.
pub(crate) async fn run_hook(
    hook: &'static str,
    group: &str,
    command: &str,
) -> Result<(), CutError> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("FERRY_GROUP", group)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| CutError::HookSpawn {
            hook,
            group: group.to_string(),
            command: command.to_string(),
            source,
        })?;
    let output = match tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(source)) => {
            return Err(CutError::HookSpawn {
                hook,
                group: group.to_string(),
                command: command.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(CutError::HookTimeout {
                hook,
                group: group.to_string(),
                command: command.to_string(),
                timeout: HOOK_TIMEOUT,
            })
        }
    };
    if output.status.success() {
        return Ok(());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if stderr.len() > HOOK_STDERR_BYTES_MAX {
        let mut end = HOOK_STDERR_BYTES_MAX;
        while !stderr.is_char_boundary(end) {
            end -= 1;
        }
        stderr.truncate(end);
    }
    Err(CutError::HookFailed {
        hook,
        group: group.to_string(),
        command: command.to_string(),
        status: output.status.to_string(),
        stderr,
    })
}

/// The timers of every group this appliance coordinates: a crash-consistent point every
/// `recovery_point_interval`, an app-consistent one every `app_consistent_interval` (if set).
/// Failures are logged; the next tick tries again.
pub(crate) fn spawn_timers(
    cutter: Arc<Cutter>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for group in cutter.groups() {
        if group.coordinator != cutter.appliance() {
            continue;
        }
        if group.disks.is_empty() && group.members.is_empty() {
            continue;
        }
        let mut timers = vec![(group.config.recovery_point_interval, false)];
        if let Some(interval) = group.config.app_consistent_interval {
            timers.push((interval, true));
        }
        for (interval, app_consistent) in timers {
            let cutter = cutter.clone();
            let name = group.config.name.clone();
            let mut shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let start = tokio::time::Instant::now() + interval;
                let mut ticks = tokio::time::interval_at(start, interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {}
                        _ = shutdown.changed() => return,
                    }
                    if *shutdown.borrow() {
                        return;
                    }
                    if let Err(error) = cutter.create(&name, app_consistent).await {
                        tracing::warn!(group = %name, app_consistent, "scheduled recovery point not cut: {error}");
                    }
                }
            }));
        }
    }
    tasks
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::capture::disk::Change;
    use crate::capture::DirtyBitmap;
    use crate::config::Config;
    use crate::core::journal_mem::MemSegments;
    use crate::io::disk::{Disk, DiskOptions, IoBuf};

    const DISK_BYTES: u64 = 1 << 20;

    pub(crate) struct Rig {
        _dir: tempfile::TempDir,
        pub journal: SharedJournal,
        pub disk: CaptureDisk,
        pub cutter: Arc<Cutter>,
    }

    /// One disk of group "g" on appliance "a", an in-memory journal, a cutter.
    fn rig(group_toml: &str, state: DiskState) -> Rig {
        rig_named("a", group_toml, state)
    }

    /// One disk of group "g" on appliance `name`, an in-memory journal, a cutter.
    pub(crate) fn rig_named(name: &str, group_toml: &str, state: DiskState) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        let config = Config::parse(&format!(
            r#"
[appliance]
name = "{name}"
state_dir = "/s"
[source]
journal_size = "64MiB"
target = "127.0.0.1:7400"
[[source.group]]
name = "g"
{group_toml}
[[source.machine]]
name = "m"
group = "g"
disks = [{{ name = "d", path = "/d", export = "/d.sock" }}]
"#
        ))
        .unwrap();
        let group = config.source.unwrap().group.remove(0);
        let (journal, _) = SharedJournal::open(MemSegments::new(4, 1 << 20)).unwrap();
        let disk = Disk::open(&path, DiskOptions::default()).unwrap();
        let bitmap = DirtyBitmap::open(&dir.path().join("d.bitmap"), DISK_BYTES, 64 << 10).unwrap();
        let disk = CaptureDisk::new("m", "d", 7, disk, bitmap, journal.clone(), state);
        let cutter = Arc::new(Cutter::new(
            name,
            journal.clone(),
            vec![GroupCutter::new(group, vec![disk.clone()], name)],
            dir.path().join("points-cut.json"),
            Box::new(|| 0),
        ));
        Rig {
            _dir: dir,
            journal,
            disk,
            cutter,
        }
    }

    pub(crate) async fn write(disk: &CaptureDisk, offset: u64, byte: u8) {
        let (result, _) = disk
            .apply(
                offset,
                4096,
                Change::Data(IoBuf::from_slice(&[byte; 4096])),
                false,
            )
            .await;
        result.unwrap();
    }

    fn marker_at(journal: &SharedJournal, seq: Seq) -> PointMarker {
        let guard = journal.lock();
        let record = guard.record(seq).unwrap();
        assert_eq!(record.kind, RecordKind::Marker);
        assert_eq!(record.disk_id, 0);
        PointMarker::decode(record.payload).unwrap()
    }

    #[tokio::test]
    async fn a_cut_lands_after_earlier_writes_and_is_durable() {
        let rig = rig("retention = \"2h\"", DiskState::Protected);
        write(&rig.disk, 0, 1).await;
        write(&rig.disk, 8192, 2).await;
        let written = rig.journal.last_seq();
        let before_ms = unix_time_ms();
        let point = rig.cutter.create("g", false).await.unwrap();
        assert!(
            point.seq > written,
            "marker {} after writes up to {written}",
            point.seq
        );
        assert!(
            rig.journal.durable_seq() >= point.seq,
            "the marker is flushed for shipping"
        );
        assert!(point.id >= before_ms);
        let marker = marker_at(&rig.journal, point.seq);
        assert_eq!(marker.group, "g");
        assert_eq!(marker.point_id, point.id);
        assert_eq!(marker.kind, PointKind::Crash);
        assert!(marker.consistent);
        assert!(marker.members.is_empty());
        assert_eq!(marker.disk_ids, vec![7]);
        assert_eq!(marker.retention_ms, 2 * 3600 * 1000);

        // Ids increase even when cut within the same millisecond.
        let second = rig.cutter.create("g", false).await.unwrap();
        assert!(second.id > point.id && second.seq > point.seq);
        let listed = rig.cutter.list("g").unwrap();
        assert_eq!(
            listed.iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![point.id, second.id]
        );
        assert!(listed
            .iter()
            .all(|p| !p.usable && p.unusable_reason.as_deref() == Some("not yet replicated")));
    }

    #[tokio::test]
    async fn a_point_cut_during_initial_sync_is_inconsistent() {
        let rig = rig("", DiskState::InitialSync);
        let point = rig.cutter.create("g", false).await.unwrap();
        assert!(!point.consistent);
        assert!(!marker_at(&rig.journal, point.seq).consistent);
        let listed = rig.cutter.list("g").unwrap();
        assert_eq!(listed[0].consistency, PointConsistency::None);
        assert!(!listed[0].usable);
    }

    #[tokio::test]
    async fn the_gate_holds_writes_during_a_cut() {
        let rig = rig("", DiskState::Protected);
        let group = rig.cutter.group("g").unwrap();
        let closed = group.gate.close().await;
        let before = rig.journal.last_seq();
        let disk = rig.disk.clone();
        let mut pending = tokio::spawn(async move { write(&disk, 0, 9).await });
        // The write cannot get a sequence while the gate is closed.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut pending)
                .await
                .is_err(),
            "the write finished through a closed gate"
        );
        assert_eq!(rig.journal.last_seq(), before);
        let point = PendingPoint {
            group: "g".into(),
            id: 5,
            time_unix_ms: 5,
            kind: PointKind::Crash,
            members: Vec::new(),
        };
        let cut = rig.cutter.cut_closed(group, &point).unwrap();
        drop(closed);
        tokio::time::timeout(Duration::from_secs(10), pending)
            .await
            .expect("the write goes on once the gate opens")
            .unwrap();
        assert_eq!(rig.disk.stats().last_sequence, cut.seq + 1);
    }

    #[tokio::test]
    async fn app_consistent_points_run_freeze_and_thaw() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hooks.log");
        let rig = rig(
            &format!(
                "freeze_hook = \"echo freeze $FERRY_GROUP >> {0}\"\nthaw_hook = \"echo thaw >> {0}\"",
                log.display()
            ),
            DiskState::Protected,
        );
        let point = rig.cutter.create("g", true).await.unwrap();
        assert_eq!(point.kind, PointKind::App);
        assert_eq!(marker_at(&rig.journal, point.seq).kind, PointKind::App);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze g\nthaw\n");
    }

    #[tokio::test]
    async fn a_failing_freeze_hook_gives_no_point_and_still_thaws() {
        let dir = tempfile::tempdir().unwrap();
        let thawed = dir.path().join("thawed");
        let rig = rig(
            &format!(
                "freeze_hook = \"echo cannot freeze >&2; exit 3\"\nthaw_hook = \"touch {}\"",
                thawed.display()
            ),
            DiskState::Protected,
        );
        let before = rig.journal.last_seq();
        let error = rig.cutter.create("g", true).await.unwrap_err().to_string();
        assert!(error.contains("freeze_hook"), "{error}");
        assert!(error.contains("exit status: 3"), "{error}");
        assert!(error.contains("cannot freeze"), "{error}");
        assert_eq!(rig.journal.last_seq(), before, "no marker");
        assert!(rig.cutter.list("g").unwrap().is_empty());
        assert!(thawed.exists(), "thaw_hook runs after a failed freeze");
    }

    #[tokio::test]
    async fn unknown_groups_and_missing_hooks_are_refused() {
        let rig = rig("", DiskState::Protected);
        let error = rig
            .cutter
            .create("nope", false)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"nope\"") && error.contains("groups: g"),
            "{error}"
        );
        let error = rig.cutter.create("g", true).await.unwrap_err().to_string();
        assert!(error.contains("freeze_hook"), "{error}");
        assert!(rig.cutter.list("nope").is_err());
    }

    #[test]
    fn listed_points_are_usable_once_acknowledged_and_consistent() {
        let point = CutPoint {
            id: 10,
            time_unix_ms: 10,
            kind: PointKind::App,
            consistent: true,
            seq: 40,
            members: Vec::new(),
            incomplete: None,
            gate_held_us: 0,
        };
        assert!(!point_status(&point, 39).usable);
        let status = point_status(&point, 40);
        assert!(status.usable && status.unusable_reason.is_none());
        assert_eq!(status.consistency, PointConsistency::App);
    }
}
