//! How the source appliance's previous run ended, from a marker file in the state dir.
//!
//! `<state_dir>/running` is written when a source appliance starts (with the kernel's boot id)
//! and removed after a clean stop has made the journal and every disk durable. Found at start,
//! it means the last run did not stop cleanly, and the boot id tells which way:
//! - **the process died, the host did not** (same boot id): the page cache kept every journal
//!   record appended, but a change journaled just before the crash may never have reached the
//!   source disk, while the target gets it from the journal. The journal keeps every record
//!   whose disk write had not completed (`SharedJournal::releasable`), so resyncing the extents
//!   of the records it still holds brings source and replica back together (DRBD resyncs its
//!   activity log after a primary crash for the same reason).
//! - **the host went down** (boot id changed or unknown): writes that completed on the disk may
//!   have lost their journal records with the page cache, and nothing records which: every
//!   extent of every disk is hash-compared with the target, and only what differs is sent.

use std::path::{Path, PathBuf};

use super::DaemonError;

/// What the marker says about the previous run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreviousRun {
    /// No marker: a first start, or the last run stopped cleanly.
    Clean,
    /// The last run's process died on this same boot.
    ProcessDied { pid: Option<u32> },
    /// The host went down under the last run (or its boot id cannot be compared).
    HostDown,
}

/// The marker of a running source appliance.
#[derive(Debug)]
pub struct RunningMarker {
    path: PathBuf,
}

const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

fn boot_id() -> Option<String> {
    std::fs::read_to_string(BOOT_ID_PATH)
        .ok()
        .map(|text| text.trim().to_string())
        .filter(|id| !id.is_empty())
}

impl RunningMarker {
    /// Reads the previous run's marker in `state_dir` (if any) and writes this run's, durably.
    pub fn take(state_dir: &Path) -> Result<(Self, PreviousRun), DaemonError> {
        let path = state_dir.join("running");
        let previous = match std::fs::read_to_string(&path) {
            Ok(text) => classify(&text, boot_id().as_deref()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => PreviousRun::Clean,
            Err(source) => {
                return Err(DaemonError::StateDir {
                    path,
                    operation: "read the running marker",
                    source,
                })
            }
        };
        let text = format!(
            "boot_id={}\npid={}\n",
            boot_id().unwrap_or_default(),
            std::process::id()
        );
        write_durably(&path, text.as_bytes()).map_err(|source| DaemonError::StateDir {
            path: path.clone(),
            operation: "write the running marker",
            source,
        })?;
        Ok((Self { path }, previous))
    }

    /// Removes the marker: call only once the journal and every disk are durable.
    pub fn clear(self) -> Result<(), DaemonError> {
        std::fs::remove_file(&self.path)
            .and_then(|()| sync_parent(&self.path))
            .map_err(|source| DaemonError::StateDir {
                path: self.path.clone(),
                operation: "remove the running marker",
                source,
            })
    }
}

/// Reads a marker's text against this boot's id.
fn classify(text: &str, current_boot_id: Option<&str>) -> PreviousRun {
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
            .map(str::trim)
    };
    match (field("boot_id"), current_boot_id) {
        (Some(marked), Some(current)) if !marked.is_empty() && marked == current => {
            PreviousRun::ProcessDied {
                pid: field("pid").and_then(|pid| pid.parse().ok()),
            }
        }
        _ => PreviousRun::HostDown,
    }
}

/// How far ahead of the journal's last sequence the shipper keeps the persisted sequence
/// floor: records ship up to the floor without waiting for the journal's device, and the floor
/// is written again (one small durable file write) every `STEP / 2` records or so.
pub const SEQUENCE_FLOOR_STEP: u64 = 1 << 20;

/// `<state_dir>/sequence-floor`: no sequence number up to it may be used for a new record after
/// the host went down (`core::source`, "Sequence floor"). The shipper raises it ahead of the
/// journal before it ships records that are not durable yet; a start after a host went down
/// restarts the journal past it when the recovered journal ends below it.
#[derive(Clone, Debug)]
pub struct SequenceFloor {
    path: PathBuf,
    step: u64,
}

impl SequenceFloor {
    pub fn new(state_dir: &Path) -> Self {
        Self::with_step(state_dir, SEQUENCE_FLOOR_STEP)
    }

    /// A floor kept `step` records ahead instead of `SEQUENCE_FLOOR_STEP` (tests that need it
    /// raised after a few records).
    pub fn with_step(state_dir: &Path, step: u64) -> Self {
        Self {
            path: state_dir.join("sequence-floor"),
            step: step.max(2),
        }
    }

    /// How far ahead of the journal's last sequence the floor is kept.
    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted floor; 0 when none was ever written.
    pub fn load(&self) -> Result<u64, DaemonError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(DaemonError::StateDir {
                    path: self.path.clone(),
                    operation: "read the sequence floor",
                    source,
                })
            }
        };
        text.trim()
            .strip_prefix("floor=")
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| DaemonError::StateDir {
                path: self.path.clone(),
                operation: "read the sequence floor",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("expected `floor=<sequence>`, found {:?}", text.trim()),
                ),
            })
    }

    /// Makes `floor` durable (written aside, synced, renamed over the old one).
    pub fn store(&self, floor: u64) -> std::io::Result<()> {
        write_durably(&self.path, format!("floor={floor}\n").as_bytes())
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("new");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    sync_parent(path)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_floor_round_trips_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let floor = SequenceFloor::new(dir.path());
        assert_eq!(floor.load().unwrap(), 0, "no file: no floor");
        floor.store(1 << 40).unwrap();
        assert_eq!(floor.load().unwrap(), 1 << 40);
        floor.store(7).unwrap();
        assert_eq!(floor.load().unwrap(), 7);
        std::fs::write(floor.path(), "floor=lots\n").unwrap();
        let error = floor.load().unwrap_err().to_string();
        assert!(
            error.contains("sequence-floor") && error.contains("floor=lots"),
            "{error}"
        );
    }

    #[test]
    fn the_boot_id_tells_a_dead_process_from_a_host_that_went_down() {
        let text = "boot_id=abc\npid=42\n";
        assert_eq!(
            classify(text, Some("abc")),
            PreviousRun::ProcessDied { pid: Some(42) }
        );
        assert_eq!(classify(text, Some("def")), PreviousRun::HostDown);
        assert_eq!(classify(text, None), PreviousRun::HostDown);
        assert_eq!(
            classify("boot_id=\npid=1\n", Some("")),
            PreviousRun::HostDown
        );
        assert_eq!(classify("garbage", Some("abc")), PreviousRun::HostDown);
    }

    #[test]
    fn a_clean_stop_leaves_no_marker_and_a_crash_leaves_one() {
        let dir = tempfile::tempdir().unwrap();
        let (marker, previous) = RunningMarker::take(dir.path()).unwrap();
        assert_eq!(previous, PreviousRun::Clean);
        assert!(dir.path().join("running").exists());
        // A run that never clears its marker (a crash on this boot).
        drop(marker);
        let (marker, previous) = RunningMarker::take(dir.path()).unwrap();
        assert!(
            matches!(previous, PreviousRun::ProcessDied { pid: Some(pid) } if pid == std::process::id()),
            "{previous:?}"
        );
        marker.clear().unwrap();
        assert!(!dir.path().join("running").exists());
        let (_marker, previous) = RunningMarker::take(dir.path()).unwrap();
        assert_eq!(previous, PreviousRun::Clean);
    }
}
