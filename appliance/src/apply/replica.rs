//! The target-storage boundary: where replica disks live and the five operations the apply
//! path needs from one. Two backends sit behind it — local raw files (the disk engine,
//! io_uring or pread/pwrite) and Ceph RBD images (librbd aio) — and one conformance suite
//! (`replica_tests.rs`) runs the same cases on both; only the constructor differs.
//!
//! Semantics every backend keeps (the conformance suite checks them):
//! - `open_replica` creates a missing replica of the announced size reading as zeroes, grows a
//!   smaller one, refuses a larger one (a replica never shrinks silently), and says whether the
//!   replica existed before.
//! - reads and writes at any byte offset and length inside `[0, size)`; outside fails.
//! - `write_zeroes` makes exactly its range read as zeroes, also a few bytes inside one
//!   4 MiB RBD object (RBD's discard would not), and leaves neighbouring bytes alone.
//! - `flush` completes when every write completed before it is durable.
//! - concurrent operations on disjoint ranges are allowed; overlapping ones are the caller's
//!   to order (as with the disk engine and NBD).

use std::io;
use std::path::PathBuf;

use crate::io::disk::{Disk, DiskError, DiskOp, DiskOptions, IoBuf};
use crate::io::rbd::{self, ClusterOptions, RbdError, REPLICA_FEATURES};

use super::storage::sanitize;

/// One replica disk, whichever backend holds it. Cheap to clone (both variants share their
/// handle). Dispatch is a `match` per call, with no boxing: the local-file path costs what a
/// bare [`Disk`] costs.
#[derive(Clone)]
pub enum Replica {
    File(Disk),
    Rbd(rbd::Image),
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.location())
    }
}

impl Replica {
    pub fn size(&self) -> u64 {
        match self {
            Replica::File(disk) => disk.size(),
            Replica::Rbd(image) => image.size(),
        }
    }

    /// Where it lives, for messages (`/path/disk.raw`, `rbd:pool/image`).
    pub fn location(&self) -> String {
        match self {
            Replica::File(disk) => disk.path().display().to_string(),
            Replica::Rbd(image) => format!("rbd:{}", image.name()),
        }
    }

    pub async fn read_at(&self, offset: u64, buf: IoBuf) -> (Result<(), DiskError>, IoBuf) {
        match self {
            Replica::File(disk) => disk.read_at(offset, buf).await,
            Replica::Rbd(image) => image.read_at(offset, buf).await,
        }
    }

    pub async fn write_at(&self, offset: u64, buf: IoBuf) -> (Result<(), DiskError>, IoBuf) {
        match self {
            Replica::File(disk) => disk.write_at(offset, buf).await,
            Replica::Rbd(image) => image.write_at(offset, buf).await,
        }
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        match self {
            Replica::File(disk) => disk.write_zeroes(offset, len).await,
            Replica::Rbd(image) => image.write_zeroes(offset, len).await,
        }
    }

    pub async fn flush(&self) -> Result<(), DiskError> {
        match self {
            Replica::File(disk) => disk.flush().await,
            Replica::Rbd(image) => image.flush().await,
        }
    }
}

/// Where one source's replicas live.
pub trait TargetStorage: Send + Sync {
    /// Opens the replica of `disk` on `machine` of `source`, creating it (zeroed) of
    /// `size_bytes` if missing; `true` when it existed before with data.
    fn open_replica(
        &self,
        source: &str,
        machine: &str,
        disk: &str,
        size_bytes: u64,
    ) -> Result<(Replica, bool), DiskError>;

    /// Where that replica lives (as [`Replica::location`] says), without opening it.
    fn location(&self, source: &str, machine: &str, disk: &str) -> String;
}

/// The target appliance's storage, as `[target] storage` chose it.
#[derive(Clone, Debug)]
pub enum Storage {
    Files(FileStorage),
    Rbd(RbdStorage),
}

impl Storage {
    /// Local files under the replica store's directory.
    pub fn files(store: &super::storage::ReplicaStore) -> Storage {
        Storage::Files(FileStorage::new(store.clone()))
    }

    /// The configured backend: connects to the cluster (blocking) for `storage = "rbd"`.
    pub fn from_config(
        target: &crate::config::TargetConfig,
        store: &super::storage::ReplicaStore,
    ) -> Result<Storage, String> {
        match (target.storage, &target.rbd) {
            (crate::config::StorageKind::Rbd, Some(config)) => {
                let options = ClusterOptions {
                    conf: config.conf.clone(),
                    keyring: config.keyring.clone(),
                    client: config.client.clone(),
                };
                RbdStorage::connect(&options, &config.pool, &config.image_prefix)
                    .map(|storage| {
                        Storage::Rbd(
                            storage.with_libvirt_secret_usage(config.libvirt_secret_usage.clone()),
                        )
                    })
                    .map_err(|error| {
                        format!(
                            "target.rbd: cannot reach pool {:?} as client.{} (conf {}): {error}",
                            config.pool,
                            config.client,
                            config.conf.display()
                        )
                    })
            }
            _ => Ok(Storage::files(store)),
        }
    }

    pub fn as_rbd(&self) -> Option<&RbdStorage> {
        match self {
            Storage::Rbd(rbd) => Some(rbd),
            Storage::Files(_) => None,
        }
    }
}

impl TargetStorage for Storage {
    fn open_replica(
        &self,
        source: &str,
        machine: &str,
        disk: &str,
        size_bytes: u64,
    ) -> Result<(Replica, bool), DiskError> {
        match self {
            Storage::Files(files) => files.open_replica(source, machine, disk, size_bytes),
            Storage::Rbd(rbd) => rbd.open_replica(source, machine, disk, size_bytes),
        }
    }

    fn location(&self, source: &str, machine: &str, disk: &str) -> String {
        match self {
            Storage::Files(files) => files.location(source, machine, disk),
            Storage::Rbd(rbd) => rbd.location(source, machine, disk),
        }
    }
}

/// Replicas as raw files `<dir>/<source>/<machine>/<disk>.raw` (see `storage.rs`).
#[derive(Clone, Debug)]
pub struct FileStorage {
    store: super::storage::ReplicaStore,
    options: DiskOptions,
}

impl FileStorage {
    pub fn new(store: super::storage::ReplicaStore) -> FileStorage {
        FileStorage {
            store,
            options: DiskOptions::default(),
        }
    }
}

impl TargetStorage for FileStorage {
    fn open_replica(
        &self,
        source: &str,
        machine: &str,
        disk: &str,
        size_bytes: u64,
    ) -> Result<(Replica, bool), DiskError> {
        let path = self.store.replica_path(source, machine, disk);
        let open_error = |source: io::Error| DiskError {
            op: DiskOp::Open,
            path: path.clone(),
            offset: 0,
            len: size_bytes,
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(open_error)?;
        }
        let existed = std::fs::metadata(&path)
            .map(|meta| meta.len() > 0)
            .unwrap_or(false);
        let options = DiskOptions {
            create_size: Some(size_bytes),
            ..self.options
        };
        let opened = Disk::open(&path, options)?;
        Ok((Replica::File(opened), existed))
    }

    fn location(&self, source: &str, machine: &str, disk: &str) -> String {
        self.store
            .replica_path(source, machine, disk)
            .display()
            .to_string()
    }
}

/// Replicas as RBD images `<prefix><source>+<machine>+<disk>` in one pool, created with
/// layering, exclusive-lock, object-map and fast-diff and 4 MiB objects. The names are
/// sanitised like file names (`[A-Za-z0-9._-]`), so `+` separates them unambiguously.
#[derive(Clone, Debug)]
pub struct RbdStorage {
    pool: rbd::Pool,
    prefix: String,
    /// The cephx client name without `client.` (failover definitions' `<auth username>`).
    client: String,
    /// The libvirt secret holding the client's key (failover definitions' `<secret usage>`).
    libvirt_secret_usage: Option<String>,
}

impl RbdStorage {
    /// Connects (blocking) and opens `pool`.
    pub fn connect(
        options: &ClusterOptions,
        pool: &str,
        prefix: &str,
    ) -> Result<RbdStorage, RbdError> {
        let cluster = rbd::Cluster::connect(options)?;
        Ok(RbdStorage {
            pool: cluster.pool(pool)?,
            prefix: prefix.to_string(),
            client: options
                .client
                .strip_prefix("client.")
                .unwrap_or(&options.client)
                .to_string(),
            libvirt_secret_usage: None,
        })
    }

    /// Names the libvirt secret (its usage name) that failover definitions reference.
    pub fn with_libvirt_secret_usage(mut self, usage: Option<String>) -> RbdStorage {
        self.libvirt_secret_usage = usage;
        self
    }

    pub fn pool(&self) -> &rbd::Pool {
        &self.pool
    }

    /// The cephx client name without `client.`.
    pub fn client(&self) -> &str {
        &self.client
    }

    /// The usage name of the libvirt secret holding the client's key: as configured, else
    /// `client.<client> secret` (the name libvirt's Ceph examples use).
    pub fn libvirt_secret_usage(&self) -> String {
        self.libvirt_secret_usage
            .clone()
            .unwrap_or_else(|| format!("client.{} secret", self.client))
    }

    /// The image name of one replica.
    pub fn image_name(&self, source: &str, machine: &str, disk: &str) -> String {
        format!(
            "{}{}+{}+{}",
            self.prefix,
            sanitize(source),
            sanitize(machine),
            sanitize(disk)
        )
    }
}

fn rbd_open_error(error: RbdError, size_bytes: u64) -> DiskError {
    DiskError {
        op: DiskOp::Open,
        path: PathBuf::from(format!("rbd:{}", error.target)),
        offset: 0,
        len: size_bytes,
        source: io::Error::new(
            error.source.kind(),
            format!("{}: {}", error.operation, error.source),
        ),
    }
}

impl TargetStorage for RbdStorage {
    fn open_replica(
        &self,
        source: &str,
        machine: &str,
        disk: &str,
        size_bytes: u64,
    ) -> Result<(Replica, bool), DiskError> {
        let name = self.image_name(source, machine, disk);
        let mut existed = true;
        let mut image = match self.pool.open_image(&name) {
            Ok(image) => image,
            Err(error) if error.errno() == Some(libc::ENOENT) => {
                existed = false;
                match self.pool.create_image(&name, size_bytes, REPLICA_FEATURES) {
                    // Another session created it meanwhile: open that one.
                    Ok(()) => {}
                    Err(error) if error.errno() == Some(libc::EEXIST) => existed = true,
                    Err(error) => return Err(rbd_open_error(error, size_bytes)),
                }
                self.pool
                    .open_image(&name)
                    .map_err(|error| rbd_open_error(error, size_bytes))?
            }
            Err(error) => return Err(rbd_open_error(error, size_bytes)),
        };
        if image.size() > size_bytes {
            return Err(DiskError {
                op: DiskOp::Open,
                path: PathBuf::from(format!("rbd:{}", image.name())),
                offset: 0,
                len: size_bytes,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "image is {} bytes, larger than the disk's {size_bytes}",
                        image.size()
                    ),
                ),
            });
        }
        if image.size() < size_bytes {
            image
                .resize(size_bytes)
                .map_err(|error| rbd_open_error(error, size_bytes))?;
        }
        // The target owns its images: a lock still held by another client is a previous target
        // process that died (kill -9, host crash), whose lock would stall every write here
        // until the OSDs time its watch out (~30 s). Break it (and blocklist that client) now.
        // Not fatal: without the blocklist capability writes still resume after that timeout.
        match image.break_other_clients_lock() {
            Ok(broken) => {
                for owner in broken {
                    tracing::warn!(
                        image = %image.name(),
                        owner = %owner,
                        "broke the exclusive lock of another client (a target process that died?) and blocklisted it"
                    );
                }
            }
            Err(error) => tracing::warn!(
                image = %image.name(),
                "could not break a stale exclusive lock (writes wait until the cluster times it out): {error}"
            ),
        }
        Ok((Replica::Rbd(image), existed))
    }

    fn location(&self, source: &str, machine: &str, disk: &str) -> String {
        format!(
            "rbd:{}/{}",
            self.pool.name(),
            self.image_name(source, machine, disk)
        )
    }
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
