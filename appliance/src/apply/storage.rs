//! Target storage on local files: where each source's replicas live and how the target
//! remembers, crash-safely, how far it applied each source's stream.
//!
//! Layout under `storage_dir`:
//! ```text
//! <source>/disks.json             the disks the source announced (id, machine, name, size, group)
//! <source>/applied.seq            the applied (durable) sequence, two checksummed 4 KiB slots
//! <source>/<machine>/<disk>.raw   the replica, a raw image of the source disk's size
//! <source>/<machine>/settings.json the machine's source settings and the target settings
//!                                  derived through `[target.mapping]` (failover uses them)
//! ```
//! `applied.seq` is written in place, alternating slots, each slot in its own 4 KiB block with
//! a checksum, then fdatasync'd: a torn write damages at most the slot being written, and the
//! other slot still holds the previous sequence. This costs one small write + fdatasync per
//! group commit instead of a temp file, rename and directory fsync.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::config::MachineSettings;
use crate::core::record::Seq;
use crate::core::wire::DiskAnnouncement;

/// A storage operation that failed, with the path it was about.
#[derive(Debug, thiserror::Error)]
#[error("target storage: {operation} {path}: {source}")]
pub struct StorageError {
    pub operation: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn storage_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError {
        operation,
        path,
        source,
    }
}

/// One replica as recorded in `disks.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub disk_id: u32,
    pub machine: String,
    pub name: String,
    pub group: String,
    pub size_bytes: u64,
}

impl From<&DiskAnnouncement> for ReplicaRecord {
    fn from(disk: &DiskAnnouncement) -> Self {
        Self {
            disk_id: disk.disk_id,
            machine: disk.machine.clone(),
            name: disk.name.clone(),
            group: disk.group.clone(),
            size_bytes: disk.size_bytes,
        }
    }
}

/// One machine's `settings.json`: what the source declared and what the target derived from
/// it through its mapping rules (resource group, availability set, NICs, test network).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSettings {
    pub source: MachineSettings,
    pub target: MachineSettings,
}

/// The replicas of every source under one storage directory.
#[derive(Clone, Debug)]
pub struct ReplicaStore {
    storage_dir: PathBuf,
}

const SLOT_BYTES: u64 = 4096;
const SLOT_MAGIC: u64 = u64::from_le_bytes(*b"FRYAPPLY");

impl ReplicaStore {
    pub fn new(storage_dir: impl Into<PathBuf>) -> Self {
        Self {
            storage_dir: storage_dir.into(),
        }
    }

    pub fn storage_dir(&self) -> &Path {
        &self.storage_dir
    }

    /// Directory of one source's replicas. Source names come from the target's own config
    /// (`[[target.peers]]`), never from the wire.
    pub fn source_dir(&self, source: &str) -> PathBuf {
        self.storage_dir.join(sanitize(source))
    }

    /// Path of one replica. Machine and disk names come from the source's Hello, so they are
    /// sanitised: a hostile name cannot leave the source's directory.
    pub fn replica_path(&self, source: &str, machine: &str, disk: &str) -> PathBuf {
        self.source_dir(source)
            .join(sanitize(machine))
            .join(format!("{}.raw", sanitize(disk)))
    }

    /// The disks a source announced last time, if any.
    pub fn load_disks(&self, source: &str) -> Result<Vec<ReplicaRecord>, StorageError> {
        let path = self.source_dir(source).join("disks.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|error| StorageError {
                operation: "parse",
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, error),
            }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(storage_error("read", &path)(error)),
        }
    }

    /// Records the announced disks (temp file, fsync, rename, directory fsync).
    pub fn save_disks(&self, source: &str, disks: &[ReplicaRecord]) -> Result<(), StorageError> {
        write_json_atomic(&self.source_dir(source), "disks.json", disks)
    }

    /// Path of one machine's `settings.json` (the machine name is sanitised like a replica's).
    pub fn settings_path(&self, source: &str, machine: &str) -> PathBuf {
        self.source_dir(source)
            .join(sanitize(machine))
            .join("settings.json")
    }

    /// Records one machine's settings beside its replicas (temp file, fsync, rename, directory
    /// fsync), so a failover reads either the previous or the new settings, never a torn file.
    pub fn save_settings(
        &self,
        source: &str,
        settings: &StoredSettings,
    ) -> Result<(), StorageError> {
        let dir = self
            .source_dir(source)
            .join(sanitize(&settings.source.name));
        write_json_atomic(&dir, "settings.json", settings)
    }

    /// One machine's stored settings, if its source ever sent them.
    pub fn load_settings(
        &self,
        source: &str,
        machine: &str,
    ) -> Result<Option<StoredSettings>, StorageError> {
        let path = self.settings_path(source, machine);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| StorageError {
                    operation: "parse",
                    path,
                    source: io::Error::new(io::ErrorKind::InvalidData, error),
                }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(storage_error("read", &path)(error)),
        }
    }

    /// Opens (creating if needed) the applied-sequence file of a source.
    pub fn open_applied(&self, source: &str) -> Result<AppliedSeqFile, StorageError> {
        let dir = self.source_dir(source);
        fs::create_dir_all(&dir).map_err(storage_error("create directory", &dir))?;
        AppliedSeqFile::open(&dir.join("applied.seq"))
    }
}

/// Keeps names to one harmless path component.
pub(crate) fn sanitize(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match cleaned.as_str() {
        "" | "." | ".." => format!("_{cleaned}"),
        _ => cleaned,
    }
}

/// Writes `value` as `dir/name` crash-safely: temp file, fsync, rename, directory fsync.
pub(crate) fn write_json_atomic<T: Serialize + ?Sized>(
    dir: &Path,
    name: &str,
    value: &T,
) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|error| StorageError {
        operation: "encode",
        path: dir.join(name),
        source: io::Error::other(error),
    })?;
    write_bytes_atomic(dir, name, &bytes)
}

/// Writes `bytes` as `dir/name` crash-safely: temp file, fsync, rename, directory fsync.
pub(crate) fn write_bytes_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    fs::create_dir_all(dir).map_err(storage_error("create directory", dir))?;
    let path = dir.join(name);
    let temp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&temp).map_err(storage_error("create", &temp))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(storage_error("write", &temp))?;
    fs::rename(&temp, &path).map_err(storage_error("rename", &path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(storage_error("fsync directory", dir))
}

/// The applied sequence of one source, in two alternating checksummed slots.
#[derive(Debug)]
pub struct AppliedSeqFile {
    file: File,
    path: PathBuf,
    seq: Seq,
    /// Generation of the newest valid slot; the next write goes to the other slot.
    generation: u64,
}

/// One slot of `applied.seq`: a zerocopy header, little-endian and unaligned.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AppliedSlot {
    magic: U64,
    generation: U64,
    seq: U64,
    /// xxh3-64 over the three fields above.
    checksum: U64,
}

const SLOT_ENCODED_BYTES: usize = std::mem::size_of::<AppliedSlot>();

fn slot_checksum(slot: &AppliedSlot) -> u64 {
    twox_hash::XxHash3_64::oneshot(&slot.as_bytes()[..SLOT_ENCODED_BYTES - 8])
}

fn encode_slot(generation: u64, seq: Seq) -> AppliedSlot {
    let mut slot = AppliedSlot {
        magic: SLOT_MAGIC.into(),
        generation: generation.into(),
        seq: seq.into(),
        checksum: 0.into(),
    };
    slot.checksum = slot_checksum(&slot).into();
    slot
}

fn decode_slot(bytes: &[u8]) -> Option<(u64, Seq)> {
    let (slot, _) = AppliedSlot::read_from_prefix(bytes).ok()?;
    if slot.magic.get() != SLOT_MAGIC || slot.checksum.get() != slot_checksum(&slot) {
        return None;
    }
    Some((slot.generation.get(), slot.seq.get()))
}

impl AppliedSeqFile {
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(storage_error("open", path))?;
        let mut best: Option<(u64, Seq)> = None;
        for slot_index in 0..2u64 {
            let mut slot = [0u8; SLOT_ENCODED_BYTES];
            match file.read_exact_at(&mut slot, slot_index * SLOT_BYTES) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => continue,
                Err(error) => return Err(storage_error("read", path)(error)),
            }
            if let Some(found) = decode_slot(&slot) {
                if best.is_none_or(|(generation, _)| found.0 > generation) {
                    best = Some(found);
                }
            }
        }
        let (generation, seq) = best.unwrap_or((0, 0));
        Ok(Self {
            file,
            path: path.to_path_buf(),
            seq,
            generation,
        })
    }

    /// The last sequence stored durably.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// Stores `seq` durably (write the older slot, fdatasync).
    pub fn store(&mut self, seq: Seq) -> Result<(), StorageError> {
        if seq == self.seq && self.generation > 0 {
            return Ok(());
        }
        let generation = self.generation + 1;
        let slot_offset = (generation % 2) * SLOT_BYTES;
        self.file
            .write_all_at(encode_slot(generation, seq).as_bytes(), slot_offset)
            .and_then(|()| self.file.sync_data())
            .map_err(storage_error("write", &self.path))?;
        self.generation = generation;
        self.seq = seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_seq_survives_reopen_and_a_torn_newer_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("applied.seq");
        let mut file = AppliedSeqFile::open(&path).unwrap();
        assert_eq!(file.seq(), 0);
        file.store(5).unwrap();
        file.store(9).unwrap();
        drop(file);
        assert_eq!(AppliedSeqFile::open(&path).unwrap().seq(), 9);
        // Tear the newest slot (generation 2 lives in slot 0): the older one (5) remains.
        let raw = OpenOptions::new().write(true).open(&path).unwrap();
        raw.write_all_at(&[0xAB; 7], 20).unwrap();
        assert_eq!(AppliedSeqFile::open(&path).unwrap().seq(), 5);
        let mut file = AppliedSeqFile::open(&path).unwrap();
        file.store(11).unwrap();
        assert_eq!(AppliedSeqFile::open(&path).unwrap().seq(), 11);
    }

    #[test]
    fn settings_round_trip_beside_the_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::new(dir.path());
        assert_eq!(store.load_settings("site-a", "web-1").unwrap(), None);
        let source = MachineSettings {
            name: "web-1".into(),
            resource_group: Some("rg".into()),
            availability_set: None,
            nics: Vec::new(),
            test_network: None,
        };
        let mut settings = StoredSettings {
            target: MachineSettings {
                test_network: Some("dr-test".into()),
                ..source.clone()
            },
            source,
        };
        store.save_settings("site-a", &settings).unwrap();
        settings.target.resource_group = Some("rg-dr".into());
        store.save_settings("site-a", &settings).unwrap();
        assert_eq!(
            store.load_settings("site-a", "web-1").unwrap(),
            Some(settings)
        );
        assert_eq!(
            store.settings_path("site-a", "web-1"),
            dir.path().join("site-a/web-1/settings.json")
        );
        assert!(!dir.path().join("site-a/web-1/settings.json.tmp").exists());
        assert!(store
            .settings_path("site-a", "../x")
            .starts_with(dir.path().join("site-a")));
    }

    #[test]
    fn names_from_the_wire_stay_inside_the_source_directory() {
        let store = ReplicaStore::new("/srv/ferry");
        let path = store.replica_path("site-a", "../../etc", "passwd/..");
        assert!(path.starts_with("/srv/ferry/site-a"), "{path:?}");
        assert!(
            !path.components().any(|c| c.as_os_str() == ".."),
            "{path:?}"
        );
    }

    #[test]
    fn disks_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::new(dir.path());
        assert!(store.load_disks("a").unwrap().is_empty());
        let disks = vec![ReplicaRecord {
            disk_id: 3,
            machine: "web-1".into(),
            name: "os".into(),
            group: "app".into(),
            size_bytes: 1 << 20,
        }];
        store.save_disks("a", &disks).unwrap();
        assert_eq!(store.load_disks("a").unwrap(), disks);
    }
}
