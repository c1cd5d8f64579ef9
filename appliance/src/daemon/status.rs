//! The live status model: per-disk counters that the capture, journal and ship components
//! update (atomics, no locks on the write path), and the snapshot function that turns them into
//! the `control::StatusSnapshot` served on the control socket and as Prometheus metrics.
//!
//! Sequence numbers are global to the appliance's cache journal (all disks share it), so a
//! disk's `acked_sequence` is `min(journal acknowledged sequence, disk's last sequence)`: every
//! record of this disk with a sequence at or below it is acknowledged by the target.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::Config;
use crate::control::{
    DiskState, DiskStatus, FailoverExport, GroupState, GroupStatus, LinkStatus,
    RecoveryPointStatus, ReplicaStatus, StatusSnapshot, SyncProgress,
};

/// How far back churn is averaged.
pub const CHURN_WINDOW: Duration = Duration::from_secs(10);
/// Churn samples kept per disk (one per tick; the window needs about `CHURN_WINDOW` of them).
const CHURN_SAMPLES_MAX: usize = 64;
/// Writes within this span share one RPO bucket; lag is overestimated by at most this much.
const RPO_BUCKET_SPAN: Duration = Duration::from_millis(100);
/// RPO buckets kept per disk; past this the newest bucket absorbs writes (lag stays an
/// overestimate, never an underestimate).
const RPO_BUCKETS_MAX: usize = 4096;

/// Adds a sample of a growing counter and returns its growth per second over `CHURN_WINDOW`.
fn windowed_rate(samples: &Mutex<VecDeque<(Instant, u64)>>, now: Instant, value: u64) -> f64 {
    let mut samples = lock(samples);
    samples.push_back((now, value));
    while samples.len() > CHURN_SAMPLES_MAX
        || samples
            .front()
            .is_some_and(|(time, _)| now.saturating_duration_since(*time) > CHURN_WINDOW)
    {
        samples.pop_front();
    }
    match (samples.front(), samples.back()) {
        (Some((first_time, first)), Some((last_time, last))) => {
            let seconds = last_time
                .saturating_duration_since(*first_time)
                .as_secs_f64();
            if seconds > 0.0 {
                last.saturating_sub(*first) as f64 / seconds
            } else {
                0.0
            }
        }
        _ => 0.0,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain counters behind; keep serving them.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn state_to_u8(state: DiskState) -> u8 {
    match state {
        DiskState::InitialSync => 0,
        DiskState::Protected => 1,
        DiskState::ResyncNeeded => 2,
        DiskState::Resyncing => 3,
        DiskState::Paused => 4,
        DiskState::FailedOver => 5,
        DiskState::Reprotecting => 6,
    }
}

fn state_from_u8(value: u8) -> DiskState {
    match value {
        1 => DiskState::Protected,
        2 => DiskState::ResyncNeeded,
        3 => DiskState::Resyncing,
        4 => DiskState::Paused,
        5 => DiskState::FailedOver,
        6 => DiskState::Reprotecting,
        _ => DiskState::InitialSync,
    }
}

/// A run of journaled writes of one disk not yet acknowledged: the first one's time, the
/// last one's sequence and the disk's bytes written up to it (what an acknowledgement of the
/// bucket adds to the bytes shipped).
#[derive(Clone, Copy, Debug)]
struct PendingBucket {
    first_time: Instant,
    last_sequence: u64,
    bytes_written: u64,
}

/// What a component that keeps its own per-disk counters (capture) reports to the sampler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiskSample {
    pub state: DiskState,
    pub bytes_written: u64,
    /// Highest journal sequence of this disk.
    pub last_sequence: u64,
}

/// Live figures of one protected disk. Cheap to update from any thread.
#[derive(Debug)]
pub struct DiskStats {
    pub machine: String,
    pub name: String,
    pub group: String,
    /// Journal disk id (`config::disk_id`).
    pub id: u32,
    /// Where the export listens, as shown to operators.
    pub export: String,
    size_bytes: AtomicU64,
    state: AtomicU8,
    paused: AtomicBool,
    bytes_written: AtomicU64,
    last_sequence: AtomicU64,
    acked_sequence: AtomicU64,
    /// Bytes of this disk's writes the target acknowledged (from the pending buckets).
    acked_bytes: AtomicU64,
    /// f64 bits, refreshed by `StatusModel::tick`.
    churn_bytes_per_s: AtomicU64,
    /// f64 bits: acknowledged write bytes per second over `CHURN_WINDOW`, refreshed by `tick`.
    ship_bytes_per_s: AtomicU64,
    churn_samples: Mutex<VecDeque<(Instant, u64)>>,
    ship_samples: Mutex<VecDeque<(Instant, u64)>>,
    pending: Mutex<VecDeque<PendingBucket>>,
    sync: Mutex<Option<SyncProgress>>,
}

impl DiskStats {
    pub fn new(machine: &str, name: &str, group: &str, id: u32, export: String) -> Self {
        Self {
            machine: machine.to_string(),
            name: name.to_string(),
            group: group.to_string(),
            id,
            export,
            size_bytes: AtomicU64::new(0),
            state: AtomicU8::new(state_to_u8(DiskState::InitialSync)),
            paused: AtomicBool::new(false),
            bytes_written: AtomicU64::new(0),
            last_sequence: AtomicU64::new(0),
            acked_sequence: AtomicU64::new(0),
            acked_bytes: AtomicU64::new(0),
            churn_bytes_per_s: AtomicU64::new(0f64.to_bits()),
            ship_bytes_per_s: AtomicU64::new(0f64.to_bits()),
            churn_samples: Mutex::new(VecDeque::new()),
            ship_samples: Mutex::new(VecDeque::new()),
            pending: Mutex::new(VecDeque::new()),
            sync: Mutex::new(None),
        }
    }

    /// `machine/disk`, the export name and the label used in logs.
    pub fn label(&self) -> String {
        format!("{}/{}", self.machine, self.name)
    }

    pub fn set_size_bytes(&self, size_bytes: u64) {
        self.size_bytes.store(size_bytes, Ordering::Relaxed);
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Relaxed)
    }

    pub fn set_state(&self, state: DiskState) {
        self.state.store(state_to_u8(state), Ordering::Relaxed);
    }

    /// The replication state, before the operator's pause is applied.
    pub fn state(&self) -> DiskState {
        state_from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Operator pause: the shipper sends nothing for a paused disk; capture keeps journaling.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// The state operators see: `paused` overrides the replication state unless the disk was
    /// failed over (then the pause no longer means anything).
    pub fn effective_state(&self) -> DiskState {
        let state = self.state();
        if self.is_paused() && state != DiskState::FailedOver {
            DiskState::Paused
        } else {
            state
        }
    }

    /// Capture calls this once a write (or trim/zero range) of `bytes` is in the journal as
    /// record `sequence`.
    pub fn record_write(&self, sequence: u64, bytes: u64, now: Instant) {
        let written = self.bytes_written.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.last_sequence.fetch_max(sequence, Ordering::Relaxed);
        self.note_pending(sequence, written, now);
    }

    /// Records that writes up to `sequence` (the disk's first `bytes_written` bytes), the
    /// first of them made at `first_time` or later, wait for the target's acknowledgement.
    fn note_pending(&self, sequence: u64, bytes_written: u64, first_time: Instant) {
        let mut pending = lock(&self.pending);
        let full = pending.len() >= RPO_BUCKETS_MAX;
        match pending.back_mut() {
            Some(bucket)
                if full
                    || first_time.saturating_duration_since(bucket.first_time)
                        < RPO_BUCKET_SPAN =>
            {
                bucket.last_sequence = bucket.last_sequence.max(sequence);
                bucket.bytes_written = bucket.bytes_written.max(bytes_written);
            }
            _ => pending.push_back(PendingBucket {
                first_time,
                last_sequence: sequence,
                bytes_written,
            }),
        }
    }

    /// Takes the figures of a component that keeps its own counters (capture): called by the
    /// daemon's sampler with the instant of its previous sample (`since`) and of this one.
    /// New sequences are timed from `since`, so RPO lag is overestimated by at most one sample
    /// interval, never underestimated.
    pub fn observe(&self, sample: &DiskSample, since: Instant) {
        self.set_state(sample.state);
        self.bytes_written
            .fetch_max(sample.bytes_written, Ordering::Relaxed);
        let previous = self
            .last_sequence
            .fetch_max(sample.last_sequence, Ordering::Relaxed);
        if sample.last_sequence > previous && sample.last_sequence > self.acked_sequence() {
            self.note_pending(sample.last_sequence, sample.bytes_written, since);
        }
    }

    /// A write that could not be journaled (journal full, bitmap mode) still counts as written.
    pub fn record_unjournaled_write(&self, bytes: u64) {
        self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The target acknowledged every journal record up to `sequence` (all disks).
    fn record_ack(&self, sequence: u64) {
        let mut pending = lock(&self.pending);
        while let Some(bucket) = pending
            .front()
            .filter(|bucket| bucket.last_sequence <= sequence)
        {
            self.acked_bytes
                .fetch_max(bucket.bytes_written, Ordering::Relaxed);
            pending.pop_front();
        }
        drop(pending);
        let last = self.last_sequence.load(Ordering::Relaxed);
        self.acked_sequence
            .fetch_max(sequence.min(last), Ordering::Relaxed);
    }

    /// After a restart: the journal still holds this disk's records up to `last_sequence`,
    /// the oldest of them written at `oldest_write`.
    pub fn restore_pending(&self, last_sequence: u64, oldest_write: Instant) {
        self.last_sequence
            .fetch_max(last_sequence, Ordering::Relaxed);
        self.note_pending(last_sequence, self.bytes_written(), oldest_write);
    }

    /// Restores the sequence figures after a restart (from the journal's recovery scan).
    pub fn restore_sequences(&self, last_sequence: u64, acked_sequence: u64) {
        self.last_sequence
            .fetch_max(last_sequence, Ordering::Relaxed);
        self.acked_sequence
            .fetch_max(acked_sequence.min(last_sequence), Ordering::Relaxed);
    }

    pub fn set_sync(&self, progress: Option<SyncProgress>) {
        *lock(&self.sync) = progress;
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    pub fn last_sequence(&self) -> u64 {
        self.last_sequence.load(Ordering::Relaxed)
    }

    pub fn acked_sequence(&self) -> u64 {
        self.acked_sequence.load(Ordering::Relaxed)
    }

    /// Seconds since the oldest write that the target has not acknowledged (0 when none).
    pub fn rpo_lag_seconds(&self, now: Instant) -> f64 {
        lock(&self.pending).front().map_or(0.0, |bucket| {
            now.saturating_duration_since(bucket.first_time)
                .as_secs_f64()
        })
    }

    /// Refreshes the windowed rates: churn (bytes written) and ship (bytes acknowledged).
    fn sample_rates(&self, now: Instant) {
        let churn = windowed_rate(&self.churn_samples, now, self.bytes_written());
        self.churn_bytes_per_s
            .store(churn.to_bits(), Ordering::Relaxed);
        let acked = self.acked_bytes.load(Ordering::Relaxed);
        let ship = windowed_rate(&self.ship_samples, now, acked);
        self.ship_bytes_per_s
            .store(ship.to_bits(), Ordering::Relaxed);
    }

    pub fn churn_bytes_per_s(&self) -> f64 {
        f64::from_bits(self.churn_bytes_per_s.load(Ordering::Relaxed))
    }

    /// Bytes of writes per second the target acknowledged, over `CHURN_WINDOW` (initial sync
    /// and resync traffic not included: their progress carries its own rate).
    pub fn ship_bytes_per_s(&self) -> f64 {
        f64::from_bits(self.ship_bytes_per_s.load(Ordering::Relaxed))
    }

    fn snapshot(&self, now: Instant, journal: (u64, u64)) -> DiskStatus {
        DiskStatus {
            machine: self.machine.clone(),
            name: self.name.clone(),
            state: self.effective_state(),
            bytes_written: self.bytes_written(),
            journal_used_bytes: journal.0,
            journal_capacity_bytes: journal.1,
            churn_bytes_per_s: self.churn_bytes_per_s(),
            last_sequence: self.last_sequence(),
            acked_sequence: self.acked_sequence(),
            rpo_lag_seconds: self.rpo_lag_seconds(now),
            group: self.group.clone(),
            size_bytes: self.size_bytes(),
            ship_bytes_per_s: self.ship_bytes_per_s(),
            export: self.export.clone(),
            sync: lock(&self.sync).clone(),
        }
    }
}

/// Everything `ferry status` shows, shared by the daemon's components.
#[derive(Debug)]
pub struct StatusModel {
    appliance: String,
    disks: Vec<Arc<DiskStats>>,
    groups: Vec<GroupStatus>,
    /// The cache journal is shared by all disks; these are its figures.
    journal_used_bytes: AtomicU64,
    journal_capacity_bytes: AtomicU64,
    /// 0 means no limit.
    bandwidth_limit_bytes_per_s: AtomicU64,
    link: Mutex<Option<LinkStatus>>,
    replicas: Mutex<Vec<ReplicaStatus>>,
    /// Recovery points per group, from whoever keeps them here (the source's cut log, the
    /// target's catalog), oldest first.
    recovery_points: Mutex<HashMap<String, Vec<RecoveryPointStatus>>>,
    /// Groups in reprotect or failback (override the failover's state of the group).
    reprotect_states: Mutex<HashMap<String, GroupState>>,
    /// Running failovers: state and exports per group.
    failovers: Mutex<HashMap<String, (GroupState, Vec<FailoverExport>)>>,
}

impl StatusModel {
    /// The model of a configured appliance: every configured disk and group, nothing measured
    /// yet. The journal capacity stays 0 until a journal is opened and reports it.
    pub fn from_config(config: &Config) -> Self {
        let mut disks = Vec::new();
        let mut groups = Vec::new();
        let mut link = None;
        let mut bandwidth = 0;
        if let Some(source) = &config.source {
            for group in &source.group {
                groups.push(GroupStatus {
                    name: group.name.clone(),
                    rpo_threshold_seconds: group.rpo_threshold.as_secs_f64(),
                    recovery_point_interval_seconds: group.recovery_point_interval.as_secs_f64(),
                    latest_point_age_seconds: None,
                    recovery_points: Vec::new(),
                    state: GroupState::Protected,
                    exports: Vec::new(),
                });
            }
            for machine in &source.machine {
                for disk in &machine.disks {
                    let export = match (&disk.export, disk.tcp) {
                        (Some(path), _) => path.display().to_string(),
                        (None, Some(address)) => address.to_string(),
                        (None, None) => String::new(),
                    };
                    disks.push(Arc::new(DiskStats::new(
                        &machine.name,
                        &disk.name,
                        &machine.group,
                        disk.id,
                        export,
                    )));
                }
            }
            bandwidth = source.bandwidth_limit_bytes_per_s.unwrap_or(0);
            link = Some(LinkStatus {
                peer: source.target.clone(),
                connected: false,
                last_error: source
                    .target_fingerprint
                    .is_none()
                    .then(|| "unpaired: source.target_fingerprint is not set".to_string()),
                bandwidth_limit_bytes_per_s: source.bandwidth_limit_bytes_per_s,
                sent_bytes: 0,
                sequence_floor: None,
            });
        }
        Self {
            appliance: config.appliance.name.clone(),
            disks,
            groups,
            journal_used_bytes: AtomicU64::new(0),
            journal_capacity_bytes: AtomicU64::new(0),
            bandwidth_limit_bytes_per_s: AtomicU64::new(bandwidth),
            link: Mutex::new(link),
            replicas: Mutex::new(Vec::new()),
            recovery_points: Mutex::new(HashMap::new()),
            reprotect_states: Mutex::new(HashMap::new()),
            failovers: Mutex::new(HashMap::new()),
        }
    }

    pub fn appliance(&self) -> &str {
        &self.appliance
    }

    pub fn disks(&self) -> &[Arc<DiskStats>] {
        &self.disks
    }

    /// The disk with journal id `id`.
    pub fn disk_by_id(&self, id: u32) -> Option<&Arc<DiskStats>> {
        self.disks.iter().find(|disk| disk.id == id)
    }

    /// The disk named `machine/disk`.
    pub fn disk_by_label(&self, label: &str) -> Option<&Arc<DiskStats>> {
        self.disks.iter().find(|disk| {
            label
                .split_once('/')
                .is_some_and(|(machine, name)| disk.machine == machine && disk.name == name)
        })
    }

    /// The journal owner reports its space after appends and releases.
    pub fn set_journal_usage(&self, used_bytes: u64, capacity_bytes: u64) {
        self.journal_used_bytes.store(used_bytes, Ordering::Relaxed);
        self.journal_capacity_bytes
            .store(capacity_bytes, Ordering::Relaxed);
    }

    pub fn journal_usage(&self) -> (u64, u64) {
        (
            self.journal_used_bytes.load(Ordering::Relaxed),
            self.journal_capacity_bytes.load(Ordering::Relaxed),
        )
    }

    /// The target acknowledged every journal record up to `sequence`.
    pub fn record_ack(&self, sequence: u64) {
        for disk in &self.disks {
            disk.record_ack(sequence);
        }
    }

    /// The current link bandwidth limit (the shipper reads this before each send window).
    pub fn bandwidth_limit_bytes_per_s(&self) -> Option<u64> {
        match self.bandwidth_limit_bytes_per_s.load(Ordering::Relaxed) {
            0 => None,
            limit => Some(limit),
        }
    }

    pub fn set_bandwidth_limit_bytes_per_s(&self, limit: Option<u64>) {
        self.bandwidth_limit_bytes_per_s
            .store(limit.unwrap_or(0), Ordering::Relaxed);
        if let Some(link) = lock(&self.link).as_mut() {
            link.bandwidth_limit_bytes_per_s = limit;
        }
    }

    /// The shipper reports connects, disconnects and refusals.
    pub fn set_link(
        &self,
        connected: bool,
        last_error: Option<String>,
        sent_bytes: u64,
        sequence_floor: Option<u64>,
    ) {
        if let Some(link) = lock(&self.link).as_mut() {
            link.connected = connected;
            link.last_error = last_error;
            link.sent_bytes = sent_bytes;
            link.sequence_floor = sequence_floor;
        }
    }

    /// The target's apply side adds or updates a replica (keyed by machine and disk name).
    pub fn upsert_replica(&self, replica: ReplicaStatus) {
        let mut replicas = lock(&self.replicas);
        match replicas
            .iter_mut()
            .find(|r| r.machine == replica.machine && r.name == replica.name)
        {
            Some(existing) => *existing = replica,
            None => replicas.push(replica),
        }
    }

    /// Replaces the recovery points shown for `group` (oldest first); a group that is not
    /// configured here (a target's) is listed from then on.
    pub fn set_recovery_points(&self, group: &str, points: Vec<RecoveryPointStatus>) {
        lock(&self.recovery_points).insert(group.to_string(), points);
    }

    /// Replaces the running failovers (group, state, exports).
    pub fn set_failovers(&self, failovers: Vec<(String, GroupState, Vec<FailoverExport>)>) {
        *lock(&self.failovers) = failovers
            .into_iter()
            .map(|(group, state, exports)| (group, (state, exports)))
            .collect();
    }

    /// Replaces the groups shown reprotecting or failing back.
    pub fn set_reprotect_states(&self, states: Vec<(String, GroupState)>) {
        *lock(&self.reprotect_states) = states.into_iter().collect();
    }

    /// Once a second: refresh rates that are averaged over a window.
    pub fn tick(&self, now: Instant) {
        for disk in &self.disks {
            disk.sample_rates(now);
        }
    }

    /// A consistent-enough snapshot: each figure is read once, without stopping writers.
    pub fn snapshot(&self, now: Instant, wall: SystemTime) -> StatusSnapshot {
        let journal = self.journal_usage();
        StatusSnapshot {
            appliance: self.appliance.clone(),
            time_unix_ms: wall
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            disks: self
                .disks
                .iter()
                .map(|disk| disk.snapshot(now, journal))
                .collect(),
            replicas: lock(&self.replicas).clone(),
            groups: self.groups_snapshot(wall),
            link: lock(&self.link).clone(),
        }
    }

    /// The configured groups, then any other group with recovery points, each with its points
    /// and the age of its latest one.
    fn groups_snapshot(&self, wall: SystemTime) -> Vec<GroupStatus> {
        let now_unix_ms = wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut groups = self.groups.clone();
        let recovery_points = lock(&self.recovery_points);
        for name in recovery_points.keys() {
            if !groups.iter().any(|group| &group.name == name) {
                groups.push(GroupStatus {
                    name: name.clone(),
                    rpo_threshold_seconds: 0.0,
                    recovery_point_interval_seconds: 0.0,
                    latest_point_age_seconds: None,
                    recovery_points: Vec::new(),
                    state: GroupState::Protected,
                    exports: Vec::new(),
                });
            }
        }
        for group in &mut groups {
            if let Some(points) = recovery_points.get(&group.name) {
                // The newest point a failover could use now (replicated, consistent, complete).
                group.latest_point_age_seconds = points
                    .iter()
                    .filter(|p| p.usable)
                    .map(|p| p.time_unix_ms)
                    .max()
                    .map(|latest_ms| now_unix_ms.saturating_sub(latest_ms) as f64 / 1000.0);
                group.recovery_points = points.clone();
            }
        }
        let failovers = lock(&self.failovers);
        let reprotect_states = lock(&self.reprotect_states);
        let mut overrides: Vec<(&String, GroupState, Vec<FailoverExport>)> = failovers
            .iter()
            .map(|(name, (state, exports))| (name, *state, exports.clone()))
            .collect();
        for (name, state) in reprotect_states.iter() {
            let exports = failovers
                .get(name)
                .map(|(_, exports)| exports.clone())
                .unwrap_or_default();
            overrides.retain(|(other, _, _)| *other != name);
            overrides.push((name, *state, exports));
        }
        overrides.sort_by(|a, b| a.0.cmp(b.0));
        for (name, state, exports) in overrides {
            match groups.iter_mut().find(|group| &group.name == name) {
                Some(group) => {
                    group.state = state;
                    group.exports = exports;
                }
                None => groups.push(GroupStatus {
                    name: name.clone(),
                    rpo_threshold_seconds: 0.0,
                    recovery_point_interval_seconds: 0.0,
                    latest_point_age_seconds: None,
                    recovery_points: Vec::new(),
                    state,
                    exports,
                }),
            }
        }
        groups
    }

    /// Snapshot at the present instant.
    pub fn snapshot_now(&self) -> StatusSnapshot {
        self.snapshot(Instant::now(), SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> DiskStats {
        DiskStats::new("m", "d", "g", 7, "/tmp/x.sock".into())
    }

    #[test]
    fn rpo_lag_is_age_of_oldest_unacknowledged_write() {
        let disk = disk();
        let start = Instant::now();
        assert_eq!(disk.rpo_lag_seconds(start), 0.0);
        disk.record_write(1, 4096, start);
        disk.record_write(2, 4096, start + Duration::from_millis(50));
        disk.record_write(5, 4096, start + Duration::from_secs(2));
        let now = start + Duration::from_secs(3);
        assert_eq!(disk.rpo_lag_seconds(now), 3.0);
        assert_eq!(disk.bytes_written(), 3 * 4096);
        assert_eq!(disk.last_sequence(), 5);
        // Acknowledging 2 (the whole first bucket) leaves the write at 2 s pending.
        disk.record_ack(2);
        assert_eq!(disk.acked_sequence(), 2);
        assert_eq!(disk.rpo_lag_seconds(now), 1.0);
        // A global ack beyond this disk's last record acknowledges exactly its last record.
        disk.record_ack(9);
        assert_eq!(disk.acked_sequence(), 5);
        assert_eq!(disk.rpo_lag_seconds(now), 0.0);
    }

    #[test]
    fn rpo_buckets_are_bounded_and_never_underestimate() {
        let disk = disk();
        let start = Instant::now();
        let writes = RPO_BUCKETS_MAX as u64 + 100;
        for index in 0..writes {
            disk.record_write(index + 1, 1, start + RPO_BUCKET_SPAN * (index as u32));
        }
        assert_eq!(lock(&disk.pending).len(), RPO_BUCKETS_MAX);
        // Acknowledge all but the last write: the overflow bucket still holds it, from its
        // (earlier) first time, so lag is at least the true lag.
        disk.record_ack(writes - 1);
        let now = start + RPO_BUCKET_SPAN * (writes as u32);
        let true_lag = RPO_BUCKET_SPAN.as_secs_f64();
        assert!(disk.rpo_lag_seconds(now) >= true_lag);
        disk.record_ack(writes);
        assert_eq!(disk.rpo_lag_seconds(now), 0.0);
    }

    #[test]
    fn observed_samples_time_new_writes_from_the_previous_sample() {
        let disk = disk();
        let start = Instant::now();
        let sample = |bytes_written, last_sequence| DiskSample {
            state: DiskState::Protected,
            bytes_written,
            last_sequence,
        };
        // Samples at start, start+1s, start+2s; each passes the previous sample's instant.
        disk.observe(&sample(0, 0), start);
        assert_eq!(disk.rpo_lag_seconds(start + Duration::from_secs(1)), 0.0);
        disk.observe(&sample(4096, 3), start);
        assert_eq!(disk.state(), DiskState::Protected);
        assert_eq!(disk.bytes_written(), 4096);
        assert_eq!(disk.last_sequence(), 3);
        assert_eq!(disk.rpo_lag_seconds(start + Duration::from_secs(3)), 3.0);
        // Nothing new: the pending writes keep their age.
        disk.observe(&sample(4096, 3), start + Duration::from_secs(1));
        assert_eq!(disk.rpo_lag_seconds(start + Duration::from_secs(3)), 3.0);
        disk.record_ack(3);
        assert_eq!(disk.acked_sequence(), 3);
        assert_eq!(disk.rpo_lag_seconds(start + Duration::from_secs(3)), 0.0);
    }

    #[test]
    fn churn_is_averaged_over_the_window() {
        let disk = disk();
        let start = Instant::now();
        disk.sample_rates(start);
        disk.record_write(1, 1_000_000, start);
        disk.sample_rates(start + Duration::from_secs(1));
        assert_eq!(disk.churn_bytes_per_s(), 1_000_000.0);
        disk.record_write(2, 1_000_000, start + Duration::from_secs(1));
        disk.sample_rates(start + Duration::from_secs(2));
        assert_eq!(disk.churn_bytes_per_s(), 1_000_000.0);
        // Quiet for longer than the window: churn falls to zero.
        for second in 3..(3 + CHURN_WINDOW.as_secs() + 2) {
            disk.sample_rates(start + Duration::from_secs(second));
        }
        assert_eq!(disk.churn_bytes_per_s(), 0.0);
    }

    #[test]
    fn ship_rate_counts_acknowledged_write_bytes() {
        let disk = disk();
        let start = Instant::now();
        disk.sample_rates(start);
        disk.record_write(1, 1_000_000, start);
        disk.record_write(2, 1_000_000, start + Duration::from_millis(500));
        disk.sample_rates(start + Duration::from_secs(1));
        // Written, not acknowledged: churn but no ship.
        assert_eq!(disk.churn_bytes_per_s(), 2_000_000.0);
        assert_eq!(disk.ship_bytes_per_s(), 0.0);
        // The first write acknowledged: its bytes count, the second's do not yet.
        disk.record_ack(1);
        disk.sample_rates(start + Duration::from_secs(2));
        assert_eq!(disk.ship_bytes_per_s(), 500_000.0);
        disk.record_ack(2);
        disk.sample_rates(start + Duration::from_secs(3));
        assert_eq!(disk.ship_bytes_per_s(), 2_000_000.0 / 3.0);
        // Quiet for longer than the window: the ship rate falls to zero.
        for second in 4..(4 + CHURN_WINDOW.as_secs() + 2) {
            disk.sample_rates(start + Duration::from_secs(second));
        }
        assert_eq!(disk.ship_bytes_per_s(), 0.0);
    }

    #[test]
    fn pause_overrides_state_except_failed_over() {
        let disk = disk();
        disk.set_state(DiskState::Protected);
        disk.set_paused(true);
        assert_eq!(disk.effective_state(), DiskState::Paused);
        disk.set_state(DiskState::FailedOver);
        assert_eq!(disk.effective_state(), DiskState::FailedOver);
        disk.set_paused(false);
        disk.set_state(DiskState::ResyncNeeded);
        assert_eq!(disk.effective_state(), DiskState::ResyncNeeded);
    }

    #[test]
    fn state_codes_round_trip() {
        for state in [
            DiskState::InitialSync,
            DiskState::Protected,
            DiskState::ResyncNeeded,
            DiskState::Resyncing,
            DiskState::Paused,
            DiskState::FailedOver,
            DiskState::Reprotecting,
        ] {
            assert_eq!(state_from_u8(state_to_u8(state)), state);
        }
    }
}
