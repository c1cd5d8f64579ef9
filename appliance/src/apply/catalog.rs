//! The target's recovery-point store: one per target appliance, shared (`Arc`) by every apply
//! session, the control handler and failover. It holds the `core::recovery::Catalog` (persisted
//! atomically at `<storage>/catalog.json`), the undo log of every replica disk that saves
//! before-images, pins of points in use, and answers reads of any disk at any retained point.
//!
//! Recording: the executor records a marker in the catalog after the replica flush that made
//! every write before it durable and before it persists the applied sequence, so a crash never
//! leaves a durable marker unrecorded (the source would not resend it) nor a recorded marker
//! whose writes are not durable. Pruning: `prune` (every few seconds) drops points older than
//! the group's retention (never a pinned one, never the newest usable one) and then the
//! before-images no retained point needs.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::replica::{Replica, Storage};
use super::storage::{write_bytes_atomic, ReplicaRecord, ReplicaStore, StorageError};
use super::undo::{UndoError, UndoLog};
use crate::control::{PointConsistency, RecoveryPointStatus};
use crate::core::record::Seq;
use crate::core::recovery::{
    Catalog, Piece, PointError, PointInfo, PointMap, PointMarker, PointSelector, SavedBlocks,
};
use crate::io::disk::{Disk, DiskError, DiskOptions, IoBuf};

/// File name of the catalog under the storage directory.
pub const CATALOG_FILE: &str = "catalog.json";

/// Errors of the recovery-point store.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Point(#[from] PointError),
    #[error(transparent)]
    Undo(#[from] UndoError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("replica {path}: {source}")]
    Replica {
        path: String,
        #[source]
        source: DiskError,
    },
    #[error("recovery-point catalog {path}: {message}")]
    Catalog { path: PathBuf, message: String },
    #[error("source {source_name} has no disk {disk_id} in target storage")]
    UnknownDisk { source_name: String, disk_id: u32 },
    #[error(
        "disk {machine}/{name} of source {source_name} has no undo log, though a recovery point \
         lists it"
    )]
    NoUndoLog {
        source_name: String,
        machine: String,
        name: String,
    },
    #[error(
        "read of {length} bytes at {offset} of {machine}/{name}: beyond its {size_bytes} bytes"
    )]
    OutOfRange {
        machine: String,
        name: String,
        offset: u64,
        length: u64,
        size_bytes: u64,
    },
    #[error("reading the state of {machine}/{name} at a recovery point: {message}")]
    Read {
        machine: String,
        name: String,
        message: String,
    },
}

/// The undo log of one replica disk with its saved-block bitset of the current interval.
pub struct DiskUndo {
    pub source: String,
    pub record: ReplicaRecord,
    log: Mutex<UndoLog>,
    saved: Mutex<SavedBlocks>,
}

impl DiskUndo {
    /// The log, locked (keep the lock short: readers and the executor share it).
    pub fn log(&self) -> MutexGuard<'_, UndoLog> {
        lock(&self.log)
    }

    /// The 4 KiB runs of `offset..offset + length` not saved yet in this interval; marks them.
    pub fn take_unsaved(&self, offset: u64, length: u64) -> Vec<(u64, u64)> {
        lock(&self.saved).take_unsaved(offset, length)
    }

    /// A marker of this disk's source started a new interval.
    pub fn reset_saved(&self) {
        lock(&self.saved).reset();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct StoreState {
    catalog: Catalog,
    /// (group, point id) → number of holders.
    pins: BTreeMap<(String, u64), usize>,
    /// Per source: every marker at or below this sequence is recorded (set after each commit).
    recorded_through: BTreeMap<String, Seq>,
}

/// The recovery-point store of one target appliance.
pub struct RecoveryStore {
    replicas: ReplicaStore,
    /// Where the replica disks live (views read the replica there, see `view`).
    storage: Storage,
    catalog_path: PathBuf,
    /// `[target]` retention for every group, overriding what the sources' markers carry.
    retention_default_ms: Option<u64>,
    state: Mutex<StoreState>,
    logs: Mutex<BTreeMap<(String, u32), Arc<DiskUndo>>>,
}

/// What one `prune` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub points_removed: Vec<PointInfo>,
    pub undo_bytes_freed: u64,
}

impl RecoveryStore {
    /// Opens the store of a storage directory with replicas in local files: reads
    /// `catalog.json` if present.
    pub fn open(
        replicas: ReplicaStore,
        retention_default_ms: Option<u64>,
    ) -> Result<Arc<RecoveryStore>, RecoveryError> {
        let storage = Storage::files(&replicas);
        Self::open_with_storage(replicas, storage, retention_default_ms)
    }

    /// Opens the store of a storage directory whose replica disks live in `storage`.
    pub fn open_with_storage(
        replicas: ReplicaStore,
        storage: Storage,
        retention_default_ms: Option<u64>,
    ) -> Result<Arc<RecoveryStore>, RecoveryError> {
        let catalog_path = replicas.storage_dir().join(CATALOG_FILE);
        let catalog = match std::fs::read(&catalog_path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|error| RecoveryError::Catalog {
                    path: catalog_path.clone(),
                    message: format!("unparsable: {error}"),
                })?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Catalog::new(),
            Err(error) => {
                return Err(RecoveryError::Catalog {
                    path: catalog_path,
                    message: format!("read failed: {error}"),
                })
            }
        };
        Ok(Arc::new(RecoveryStore {
            replicas,
            storage,
            catalog_path,
            retention_default_ms,
            state: Mutex::new(StoreState {
                catalog,
                ..StoreState::default()
            }),
            logs: Mutex::new(BTreeMap::new()),
        }))
    }

    pub fn replicas(&self) -> &ReplicaStore {
        &self.replicas
    }

    /// Where the replica disks live.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// A copy of the catalog.
    pub fn catalog(&self) -> Catalog {
        lock(&self.state).catalog.clone()
    }

    /// Directory of a replica disk's undo log (beside the replica).
    pub fn undo_dir(&self, source: &str, record: &ReplicaRecord) -> PathBuf {
        self.replicas
            .replica_path(source, &record.machine, &record.name)
            .with_extension("undo")
    }

    /// The undo log of a disk whose saving is on (its directory exists), opened on first use.
    pub fn saving_log(
        &self,
        source: &str,
        record: &ReplicaRecord,
    ) -> Result<Option<Arc<DiskUndo>>, RecoveryError> {
        self.disk_undo(source, record, false)
    }

    /// Turns saving on for a disk (durably: its undo directory is created and fsync'd) and
    /// returns its log.
    pub fn start_saving(
        &self,
        source: &str,
        record: &ReplicaRecord,
    ) -> Result<Arc<DiskUndo>, RecoveryError> {
        Ok(self
            .disk_undo(source, record, true)?
            .expect("created on demand"))
    }

    fn disk_undo(
        &self,
        source: &str,
        record: &ReplicaRecord,
        create: bool,
    ) -> Result<Option<Arc<DiskUndo>>, RecoveryError> {
        let key = (source.to_owned(), record.disk_id);
        let mut logs = lock(&self.logs);
        // One log per disk for the process: two would append over each other.
        if let Some(open) = logs.get(&key) {
            return Ok(Some(open.clone()));
        }
        let dir = self.undo_dir(source, record);
        let (log, report) = if create {
            UndoLog::create(&dir)?
        } else if dir.is_dir() {
            UndoLog::open(&dir)?
        } else {
            return Ok(None);
        };
        tracing::debug!(
            source = %source,
            disk = %format!("{}/{}", record.machine, record.name),
            entries = report.entries,
            truncated_bytes = report.truncated_bytes,
            "undo log opened"
        );
        let undo = Arc::new(DiskUndo {
            source: source.to_owned(),
            record: record.clone(),
            log: Mutex::new(log),
            saved: Mutex::new(SavedBlocks::new(record.size_bytes)),
        });
        logs.insert(key, undo.clone());
        Ok(Some(undo))
    }

    fn record_of(&self, source: &str, disk_id: u32) -> Result<ReplicaRecord, RecoveryError> {
        self.replicas
            .load_disks(source)?
            .into_iter()
            .find(|record| record.disk_id == disk_id)
            .ok_or_else(|| RecoveryError::UnknownDisk {
                source_name: source.to_owned(),
                disk_id,
            })
    }

    /// Records durable markers of `source` (`(marker seq, marker)`) and persists the catalog.
    pub fn record_markers(
        &self,
        source: &str,
        markers: &[(Seq, PointMarker)],
    ) -> Result<(), RecoveryError> {
        if markers.is_empty() {
            return Ok(());
        }
        let mut state = lock(&self.state);
        for (seq, marker) in markers {
            state.catalog.record_marker(source, marker, *seq);
        }
        self.persist(&state.catalog)
    }

    /// Every marker of `source` at or below `seq` is recorded (the executor calls this after
    /// each commit): its undo entries up to `seq` that no retained point needs may go.
    pub fn set_recorded_through(&self, source: &str, seq: Seq) {
        let mut state = lock(&self.state);
        let entry = state.recorded_through.entry(source.to_owned()).or_default();
        *entry = (*entry).max(seq);
    }

    fn persist(&self, catalog: &Catalog) -> Result<(), RecoveryError> {
        let dir = self
            .catalog_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .to_path_buf();
        // Compact: with a 1 s interval and a day of retention the catalog holds ~86k points and
        // is rewritten at every marker.
        let bytes = serde_json::to_vec(catalog).map_err(|error| RecoveryError::Catalog {
            path: self.catalog_path.clone(),
            message: format!("encode failed: {error}"),
        })?;
        write_bytes_atomic(&dir, CATALOG_FILE, &bytes)?;
        Ok(())
    }

    /// Keeps a usable point from pruning while a failover uses it (counted: pin as often as
    /// unpin).
    pub fn pin(&self, group: &str, id: u64) -> Result<PointInfo, RecoveryError> {
        let mut state = lock(&self.state);
        let point = state.catalog.resolve(group, PointSelector::Id(id))?;
        *state.pins.entry((group.to_owned(), id)).or_default() += 1;
        Ok(point)
    }

    pub fn unpin(&self, group: &str, id: u64) {
        let mut state = lock(&self.state);
        let key = (group.to_owned(), id);
        if let Some(count) = state.pins.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                state.pins.remove(&key);
            }
        }
    }

    /// Drops points older than their group's retention (not pinned ones, not the newest usable
    /// one), persists the catalog, then drops the before-images no retained point needs.
    pub fn prune(&self, now_unix_ms: u64) -> Result<PruneReport, RecoveryError> {
        let mut report = PruneReport::default();
        let floors: BTreeMap<String, Seq> = {
            let mut state = lock(&self.state);
            let StoreState { catalog, pins, .. } = &mut *state;
            for group in catalog.groups() {
                let retention_ms = self
                    .retention_default_ms
                    .or_else(|| catalog.group_retention_ms(&group))
                    .unwrap_or(crate::config::RETENTION_DEFAULT.as_millis() as u64);
                let pinned = pins
                    .keys()
                    .filter(|(pinned_group, _)| *pinned_group == group)
                    .map(|&(_, id)| id)
                    .collect();
                report.points_removed.extend(catalog.prune(
                    &group,
                    now_unix_ms,
                    retention_ms,
                    &pinned,
                ));
            }
            if !report.points_removed.is_empty() {
                self.persist(&state.catalog)?;
            }
            let mut sources: Vec<String> = state
                .catalog
                .groups()
                .iter()
                .flat_map(|group| state.catalog.group_disks(group))
                .map(|(source, _)| source)
                .chain(state.recorded_through.keys().cloned())
                .collect();
            sources.sort();
            sources.dedup();
            // Without a retained point of the source, only entries up to the sequence through
            // which its markers are recorded may go: a marker applied but not yet recorded needs
            // the entries after it.
            sources
                .into_iter()
                .filter_map(|source| {
                    let floor = state
                        .catalog
                        .floor_seq(&source)
                        .or_else(|| state.recorded_through.get(&source).copied())?;
                    Some((source, floor))
                })
                .collect()
        };
        let disks: Vec<(String, u32)> = {
            let catalog = self.catalog();
            let mut disks: Vec<(String, u32)> = catalog
                .groups()
                .iter()
                .flat_map(|group| catalog.group_disks(group))
                .chain(lock(&self.logs).keys().cloned())
                .collect();
            disks.sort();
            disks.dedup();
            disks
        };
        for (source, disk_id) in disks {
            let Some(&floor) = floors.get(&source) else {
                continue;
            };
            let record = match self.record_of(&source, disk_id) {
                Ok(record) => record,
                Err(RecoveryError::UnknownDisk { .. }) => continue,
                Err(error) => return Err(error),
            };
            if let Some(undo) = self.saving_log(&source, &record)? {
                report.undo_bytes_freed += undo.log().prune_through(floor)?;
            }
        }
        Ok(report)
    }

    /// The group's retained points as control shows them, oldest first.
    pub fn list(&self, group: &str) -> Option<Vec<RecoveryPointStatus>> {
        let state = lock(&self.state);
        if !state.catalog.groups().iter().any(|known| known == group) {
            return None;
        }
        Some(
            state
                .catalog
                .points(group)
                .iter()
                .map(point_status)
                .collect(),
        )
    }

    /// Every group with a recorded point, sorted.
    pub fn groups(&self) -> Vec<String> {
        lock(&self.state).catalog.groups()
    }

    /// The replica of a view, read-only: the file (and a plain `File` for blocking reads), or
    /// the RBD image's head (read through librbd, blocking reads with `rbd_read`).
    fn open_view_replica(
        &self,
        source: &str,
        record: &ReplicaRecord,
    ) -> Result<(Replica, Option<File>, PathBuf), RecoveryError> {
        if let Some(rbd) = self.storage.as_rbd() {
            let name = rbd.image_name(source, &record.machine, &record.name);
            let image = rbd
                .pool()
                .open_image(&name)
                .map_err(|error| RecoveryError::Read {
                    machine: record.machine.clone(),
                    name: record.name.clone(),
                    message: format!("opening the replica: {error}"),
                })?;
            let path = PathBuf::from(format!("rbd:{}", image.name()));
            return Ok((Replica::Rbd(image), None, path));
        }
        let replica_path = self
            .replicas
            .replica_path(source, &record.machine, &record.name);
        let replica = Disk::open(
            &replica_path,
            DiskOptions {
                read_only: true,
                ..DiskOptions::default()
            },
        )
        .map_err(|source| RecoveryError::Replica {
            path: replica_path.display().to_string(),
            source,
        })?;
        let replica_file = File::open(&replica_path).map_err(|error| RecoveryError::Read {
            machine: record.machine.clone(),
            name: record.name.clone(),
            message: format!("open {}: {error}", replica_path.display()),
        })?;
        Ok((Replica::File(replica), Some(replica_file), replica_path))
    }

    /// The state of every disk of `group` at the selected (usable) point, readable range by
    /// range. Pin the point first (`pin`) if the views must outlive the retention window.
    pub fn view(
        &self,
        group: &str,
        selector: PointSelector,
    ) -> Result<Vec<DiskView>, RecoveryError> {
        let (point, disks) = {
            let state = lock(&self.state);
            let point = state.catalog.resolve(group, selector)?;
            (point, state.catalog.group_disks(group))
        };
        let mut views = Vec::new();
        for (source, disk_id) in disks {
            // A disk whose source has no marker in this point is not part of it.
            let Some(&point_seq) = point.positions.get(&source) else {
                continue;
            };
            let record = self.record_of(&source, disk_id)?;
            let undo =
                self.saving_log(&source, &record)?
                    .ok_or_else(|| RecoveryError::NoUndoLog {
                        source_name: source.clone(),
                        machine: record.machine.clone(),
                        name: record.name.clone(),
                    })?;
            let (replica, replica_file, replica_path) = self.open_view_replica(&source, &record)?;
            let map = undo.log().index().view(point_seq);
            views.push(DiskView {
                source: source.clone(),
                disk_id,
                machine: record.machine.clone(),
                name: record.name.clone(),
                size_bytes: record.size_bytes,
                replica_path,
                point: point.clone(),
                replica,
                replica_file,
                undo,
                map: Mutex::new(map),
            });
        }
        Ok(views)
    }
}

pub(crate) fn point_status(point: &PointInfo) -> RecoveryPointStatus {
    let unusable_reason = if !point.complete {
        Some("incomplete: waiting for the markers of every member".to_string())
    } else if !point.consistent {
        Some("inconsistent: cut while a disk of the group was not protected".to_string())
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
                crate::core::recovery::PointKind::Crash => PointConsistency::Crash,
                crate::core::recovery::PointKind::App => PointConsistency::App,
            }
        },
        usable: point.usable(),
        unusable_reason,
    }
}

/// One disk of a group at one recovery point: the replica (file or RBD image) overlaid with
/// the before-images of every write after the point. Reads stay exact while replication keeps
/// applying.
pub struct DiskView {
    pub source: String,
    pub disk_id: u32,
    pub machine: String,
    pub name: String,
    pub size_bytes: u64,
    /// The replica file, or `rbd:<pool>/<image>`.
    pub replica_path: PathBuf,
    pub point: PointInfo,
    replica: Replica,
    /// The same replica file for blocking reads (`read_into`); `None` on RBD.
    replica_file: Option<File>,
    undo: Arc<DiskUndo>,
    /// Extended before each read with the entries appended since.
    map: Mutex<PointMap>,
}

impl DiskView {
    /// The `length` bytes at `offset` as they were at the point.
    ///
    /// The replica is read first and the index consulted after: a write applied concurrently
    /// has its before-image in the index before it reaches the replica, so any newer replica
    /// bytes this read saw are overlaid.
    pub async fn read_at(&self, offset: u64, length: u64) -> Result<Vec<u8>, RecoveryError> {
        let out_of_range = || RecoveryError::OutOfRange {
            machine: self.machine.clone(),
            name: self.name.clone(),
            offset,
            length,
            size_bytes: self.size_bytes,
        };
        let end = offset.checked_add(length).ok_or_else(out_of_range)?;
        if end > self.size_bytes {
            return Err(out_of_range());
        }
        let length_usize = usize::try_from(length).map_err(|_| out_of_range())?;
        let (result, buf) = self
            .replica
            .read_at(offset, IoBuf::zeroed(length_usize))
            .await;
        result.map_err(|source| RecoveryError::Replica {
            path: self.replica_path.display().to_string(),
            source,
        })?;
        let mut data = buf.to_vec();
        let reads = self.undo_reads(offset, length)?;
        if reads.is_empty() {
            return Ok(data);
        }
        let machine = self.machine.clone();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || {
            read_undo_pieces(&machine, &name, reads, &mut data)?;
            Ok(data)
        })
        .await
        .map_err(|error| RecoveryError::Read {
            machine: self.machine.clone(),
            name: self.name.clone(),
            message: format!("reader task failed: {error}"),
        })?
    }

    /// `read_at` for blocking callers (run it off the async threads): fills `buf` with the
    /// bytes at `offset` as they were at the point, replica first, then the index.
    pub fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), RecoveryError> {
        let length = buf.len() as u64;
        let end = offset.checked_add(length);
        if end.is_none_or(|end| end > self.size_bytes) {
            return Err(RecoveryError::OutOfRange {
                machine: self.machine.clone(),
                name: self.name.clone(),
                offset,
                length,
                size_bytes: self.size_bytes,
            });
        }
        match (&self.replica_file, &self.replica) {
            (Some(file), _) => {
                file.read_exact_at(buf, offset)
                    .map_err(|error| RecoveryError::Read {
                        machine: self.machine.clone(),
                        name: self.name.clone(),
                        message: format!("replica {}: {error}", self.replica_path.display()),
                    })?
            }
            (None, Replica::Rbd(image)) => {
                image
                    .read_blocking(offset, buf)
                    .map_err(|source| RecoveryError::Replica {
                        path: self.replica_path.display().to_string(),
                        source,
                    })?
            }
            (None, Replica::File(_)) => {
                return Err(RecoveryError::Read {
                    machine: self.machine.clone(),
                    name: self.name.clone(),
                    message: "replica file not open for blocking reads".into(),
                })
            }
        }
        let reads = self.undo_reads(offset, length)?;
        read_undo_pieces(&self.machine, &self.name, reads, buf)
    }

    /// The ranges `(offset, length)` where the point differs from the replica as it is now:
    /// the undo pieces, in offset order, after extending the map with every entry published
    /// so far. Every write that can have reached the replica before this call had its
    /// before-image published first (invariant of the executor), so a snapshot of the replica
    /// taken before this call, overlaid with these ranges read through the view, is the point.
    pub fn undo_ranges(&self) -> Vec<(u64, u64)> {
        let log = self.undo.log();
        let mut map = lock(&self.map);
        log.index().extend_view(&mut map);
        let mut cursor = 0u64;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for piece in map.pieces(0, self.size_bytes) {
            match piece {
                Piece::Replica { length, .. } => cursor += length,
                Piece::Undo { length, .. } => {
                    match ranges.last_mut() {
                        Some((start, run)) if *start + *run == cursor => *run += length,
                        _ => ranges.push((cursor, length)),
                    }
                    cursor += length;
                }
            }
        }
        ranges
    }

    /// The undo pieces of a range at the point, after extending the map with the entries
    /// appended since the last read: (position in the range, length, file, path, file offset).
    fn undo_reads(&self, offset: u64, length: u64) -> Result<Vec<UndoRead>, RecoveryError> {
        let log = self.undo.log();
        let mut map = lock(&self.map);
        log.index().extend_view(&mut map);
        let mut cursor = 0usize;
        let mut reads = Vec::new();
        for piece in map.pieces(offset, length) {
            match piece {
                Piece::Replica { length, .. } => cursor += length as usize,
                Piece::Undo { location, length } => {
                    let (file, path, file_offset) =
                        log.resolve(location).ok_or_else(|| RecoveryError::Read {
                            machine: self.machine.clone(),
                            name: self.name.clone(),
                            message: format!("undo location {location:#x} is in no segment"),
                        })?;
                    reads.push((cursor, length as usize, file, path, file_offset));
                    cursor += length as usize;
                }
            }
        }
        Ok(reads)
    }
}

type UndoRead = (usize, usize, Arc<File>, PathBuf, u64);

fn read_undo_pieces(
    machine: &str,
    name: &str,
    reads: Vec<UndoRead>,
    data: &mut [u8],
) -> Result<(), RecoveryError> {
    for (at, length, file, path, file_offset) in reads {
        file.read_exact_at(&mut data[at..at + length], file_offset)
            .map_err(|error| RecoveryError::Read {
                machine: machine.to_owned(),
                name: name.to_owned(),
                message: format!("undo log {}: {error}", path.display()),
            })?;
    }
    Ok(())
}
