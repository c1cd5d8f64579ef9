//! The state dir layout (`journal/`, `keys/`, `bitmaps/`, `catalog/`) and the start-up checks of
//! protected disks. Directories Ferry creates are owner-only: the journal holds guest data and
//! `keys/` the appliance's private key.

use std::fs::DirBuilder;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::DaemonError;
use crate::config::DiskConfig;

/// Paths inside an appliance's state dir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateLayout {
    pub root: PathBuf,
    /// The cache journal's segment files.
    pub journal: PathBuf,
    /// The appliance's TLS key pair.
    pub keys: PathBuf,
    /// Dirty-extent bitmaps of disks whose journal overflowed.
    pub bitmaps: PathBuf,
    /// The recovery-point catalog.
    pub catalog: PathBuf,
}

impl StateLayout {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            root: state_dir.to_path_buf(),
            journal: state_dir.join("journal"),
            keys: state_dir.join("keys"),
            bitmaps: state_dir.join("bitmaps"),
            catalog: state_dir.join("catalog"),
        }
    }

    /// Creates every directory that is missing (mode 0700); existing ones are left as they are.
    pub fn create(&self) -> Result<(), DaemonError> {
        for directory in [
            &self.root,
            &self.journal,
            &self.keys,
            &self.bitmaps,
            &self.catalog,
        ] {
            create_private_dir(directory)?;
        }
        Ok(())
    }
}

/// `mkdir -p` with mode 0700 for the directories it creates.
pub fn create_private_dir(path: &Path) -> Result<(), DaemonError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| DaemonError::StateDir {
            path: path.to_path_buf(),
            operation: "create directory",
            source,
        })
}

/// Opens a protected disk read-only to check it is there and learn its size (works for raw
/// files and block devices alike: seeking to the end reports a device's size too).
pub(crate) fn probe_disk(
    machine: &str,
    disk: &DiskConfig,
    key: String,
) -> Result<u64, DaemonError> {
    let error = |operation: &'static str| {
        let key = key.clone();
        move |source| DaemonError::Disk {
            disk: format!("{machine}/{}", disk.name),
            key,
            path: disk.path.clone(),
            operation,
            source,
        }
    };
    let mut file = std::fs::File::open(&disk.path).map_err(error("open"))?;
    file.seek(SeekFrom::End(0)).map_err(error("measure size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn layout_is_created_owner_only_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StateLayout::new(&dir.path().join("state"));
        layout.create().unwrap();
        layout.create().unwrap();
        for directory in [
            &layout.root,
            &layout.journal,
            &layout.keys,
            &layout.bitmaps,
            &layout.catalog,
        ] {
            let mode = std::fs::metadata(directory).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", directory.display());
        }
    }

    #[test]
    fn probing_reports_size_or_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(3 << 20)
            .unwrap();
        let disk = DiskConfig {
            name: "d".into(),
            path,
            export: None,
            tcp: None,
            id: 1,
        };
        assert_eq!(probe_disk("m", &disk, "k".into()).unwrap(), 3 << 20);
        let missing = DiskConfig {
            path: dir.path().join("absent.raw"),
            ..disk
        };
        let message = probe_disk("m", &missing, "source.machine[0].disks[0].path".into())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("source.machine[0].disks[0].path"),
            "{message}"
        );
        assert!(message.contains("m/d"), "{message}");
    }
}
