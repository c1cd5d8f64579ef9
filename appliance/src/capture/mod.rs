//! Capture: NBD exports of protected disks; every write journaled in order before it reaches the
//! disk, durable with its journal record on FLUSH/FUA, tracked in a dirty-extent bitmap when
//! the journal is full.
//!
//! The hypervisor (QEMU, or any NBD client) attaches each protected disk through its export
//! `<machine>/<disk>` on a unix socket or TCP port, so Ferry sees every write in order without a
//! kernel module or an agent in the guest. The pieces, in data-flow order:
//! - `server`: listeners and connections, driving the sans-IO codec `core::nbd`;
//! - `disk`: one protected disk's write path (journal, ordering, bitmap fallback, flushes);
//! - `journal_handle`: the cache journal shared by every disk and, later, the shipper;
//! - `bitmap`: the persistent dirty-extent bitmap;
//! - `gate`: the per-group write gate that recovery-point cuts close around their marker.
//!
//! The daemon builds a [`CaptureConfig`] from its config file and calls [`Capture::start`].

pub mod bitmap;
pub mod disk;
pub mod gate;
pub mod journal_handle;
pub mod server;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

pub use bitmap::{BitmapError, DirtyBitmap, EXTENT_BYTES_DEFAULT};
pub use disk::{CaptureDisk, CaptureIoError, CaptureStats};
pub use gate::{GateClosed, GatePass, WriteGate};
pub use journal_handle::{JournalStore, SharedJournal};
pub use server::Endpoint;

use crate::control::DiskState;
use crate::core::nbd::{BlockSizes, ExportInfo, ServerConfig};
use crate::io::disk::{Disk, DiskError, DiskOptions};

/// One disk to capture.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub machine: String,
    pub name: String,
    /// Stored in every journal record of this disk; unique within the appliance and stable
    /// across restarts (the target maps it back to the disk).
    pub disk_id: u32,
    /// Raw image file or block device.
    pub path: PathBuf,
    pub disk_options: DiskOptions,
    /// State at start when the bitmap is clean (a dirty bitmap means `resync-needed`).
    pub initial_state: DiskState,
}

impl DiskSpec {
    /// `<machine>/<disk>`.
    pub fn export_name(&self) -> String {
        format!("{}/{}", self.machine, self.name)
    }
}

/// One listening socket and the exports it serves (by export name, `<machine>/<disk>`).
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub endpoint: Endpoint,
    pub exports: Vec<String>,
}

/// Everything capture needs, spelled out (the daemon derives it from its config).
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    /// Bitmaps live in `<state_dir>/bitmaps/`.
    pub state_dir: PathBuf,
    pub disks: Vec<DiskSpec>,
    pub listeners: Vec<ListenerSpec>,
    pub block_sizes: BlockSizes,
    pub bitmap_extent_bytes: u64,
    /// Bytes per disk of writes answered before they reach the disk (0: none; see
    /// [`disk::WRITE_BEHIND_BYTES_MAX`]).
    pub write_behind_bytes: u32,
}

impl CaptureConfig {
    /// Defaults for block sizes and bitmap extents.
    pub fn new(state_dir: PathBuf, disks: Vec<DiskSpec>, listeners: Vec<ListenerSpec>) -> Self {
        Self {
            state_dir,
            disks,
            listeners,
            block_sizes: BlockSizes::DEFAULT,
            bitmap_extent_bytes: EXTENT_BYTES_DEFAULT,
            write_behind_bytes: disk::WRITE_BEHIND_BYTES_MAX,
        }
    }
}

/// Why capture could not start.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("opening disk {export}: {source}")]
    OpenDisk {
        export: String,
        #[source]
        source: DiskError,
    },
    #[error("opening the dirty-extent bitmap of disk {export}: {source}")]
    Bitmap {
        export: String,
        #[source]
        source: BitmapError,
    },
    #[error("listening on {endpoint}: {source}")]
    Bind {
        endpoint: Endpoint,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {endpoint} serves export {export:?}, which is not a configured disk")]
    UnknownExport { endpoint: Endpoint, export: String },
    #[error("disk {export} is configured twice (or its disk id {disk_id} is reused)")]
    DuplicateDisk { export: String, disk_id: u32 },
    #[error("{path} exists and is not a socket; refusing to replace it with a listener")]
    NotASocket { path: PathBuf },
    #[error("start-up task failed: {0}")]
    Task(String),
}

/// The running capture front-end: its disks and its listener tasks.
pub struct Capture {
    disks: Vec<CaptureDisk>,
    endpoints: Vec<Endpoint>,
    listeners: JoinSet<()>,
    journal: SharedJournal,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("disks", &self.disks)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Capture {
    /// Opens every disk and bitmap, binds every listener, and starts serving. Listeners stop
    /// accepting when `shutdown` turns true; [`Capture::wait`] then waits for them.
    pub async fn start(
        config: CaptureConfig,
        journal: SharedJournal,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Capture, CaptureError> {
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        for spec in &config.disks {
            if !names.insert(spec.export_name()) || !ids.insert(spec.disk_id) {
                return Err(CaptureError::DuplicateDisk {
                    export: spec.export_name(),
                    disk_id: spec.disk_id,
                });
            }
        }

        let mut disks = Vec::with_capacity(config.disks.len());
        for spec in &config.disks {
            let (spec, state_dir, extent_bytes) = (
                spec.clone(),
                config.state_dir.clone(),
                config.bitmap_extent_bytes,
            );
            let opened = tokio::task::spawn_blocking(move || {
                let export = spec.export_name();
                let disk = Disk::open(&spec.path, spec.disk_options).map_err(|source| {
                    CaptureError::OpenDisk {
                        export: export.clone(),
                        source,
                    }
                })?;
                let path = DirtyBitmap::path_for(&state_dir, &spec.machine, &spec.name);
                let bitmap = DirtyBitmap::open(&path, disk.size(), extent_bytes)
                    .map_err(|source| CaptureError::Bitmap { export, source })?;
                Ok::<_, CaptureError>((spec, disk, bitmap))
            })
            .await
            .map_err(|error| CaptureError::Task(error.to_string()))??;
            let (spec, disk, bitmap) = opened;
            let capture_disk = CaptureDisk::new(
                &spec.machine,
                &spec.name,
                spec.disk_id,
                disk,
                bitmap,
                journal.clone(),
                spec.initial_state,
            )
            .with_write_behind(config.write_behind_bytes);
            if capture_disk.state() == DiskState::ResyncNeeded
                && spec.initial_state != DiskState::ResyncNeeded
            {
                tracing::warn!(
                    export = capture_disk.export_name(),
                    dirty_extents = capture_disk.bitmap().dirty_extent_count(),
                    "dirty-extent bitmap has extents from before the restart; disk is resync-needed"
                );
            }
            disks.push(capture_disk);
        }

        let buffers = Arc::new(server::Buffers::new());
        let mut bound = Vec::new();
        for listener_spec in &config.listeners {
            let mut served = Vec::new();
            for export in &listener_spec.exports {
                let Some(disk) = disks.iter().find(|disk| disk.export_name() == export) else {
                    return Err(CaptureError::UnknownExport {
                        endpoint: listener_spec.endpoint.clone(),
                        export: export.clone(),
                    });
                };
                served.push(disk.clone());
            }
            let (listener, endpoint) = bind(&listener_spec.endpoint).await?;
            let exports = served
                .iter()
                .map(|disk| ExportInfo {
                    name: disk.export_name().to_owned(),
                    size_bytes: disk.size_bytes(),
                    description: format!(
                        "Ferry capture of {} (disk id {})",
                        disk.export_name(),
                        disk.disk_id()
                    ),
                })
                .collect();
            let mut server_config = ServerConfig::new(exports);
            server_config.block_sizes = config.block_sizes;
            let export_set = Arc::new(server::ExportSet {
                config: server_config,
                disks: served,
                buffers: buffers.clone(),
                endpoint: endpoint.clone(),
            });
            bound.push((listener, export_set));
        }

        let mut listeners = JoinSet::new();
        let mut endpoints = Vec::new();
        for (listener, export_set) in bound {
            endpoints.push(export_set.endpoint.clone());
            tracing::info!(
                endpoint = %export_set.endpoint,
                exports = ?export_set.disks.iter().map(|disk| disk.export_name()).collect::<Vec<_>>(),
                "capture listening"
            );
            listeners.spawn(server::run_listener(listener, export_set, shutdown.clone()));
        }
        Ok(Capture {
            disks,
            endpoints,
            listeners,
            journal,
        })
    }

    pub fn disks(&self) -> &[CaptureDisk] {
        &self.disks
    }

    /// The disk exported as `<machine>/<name>`.
    pub fn disk(&self, machine: &str, name: &str) -> Option<&CaptureDisk> {
        self.disks
            .iter()
            .find(|disk| disk.machine() == machine && disk.name() == name)
    }

    /// Where the listeners actually listen (a TCP port 0 in the config is resolved here).
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// After `shutdown` turned true: waits for listeners and connections to finish their
    /// in-flight requests, then makes the journal and every disk durable.
    pub async fn wait(mut self) -> Result<(), CaptureIoError> {
        while self.listeners.join_next().await.is_some() {}
        self.journal.flush_all().await?;
        for disk in &self.disks {
            disk.flush().await?;
        }
        Ok(())
    }
}

async fn bind(endpoint: &Endpoint) -> Result<(server::Listener, Endpoint), CaptureError> {
    let bind_error = |source| CaptureError::Bind {
        endpoint: endpoint.clone(),
        source,
    };
    match endpoint {
        Endpoint::Unix(path) => {
            use std::os::unix::fs::FileTypeExt;
            match std::fs::symlink_metadata(path) {
                // A socket left by a previous run that did not exit cleanly.
                Ok(metadata) if metadata.file_type().is_socket() => {
                    std::fs::remove_file(path).map_err(bind_error)?;
                }
                Ok(_) => return Err(CaptureError::NotASocket { path: path.clone() }),
                Err(_) => {}
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(bind_error)?;
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
            Ok((server::Listener::Unix(listener), endpoint.clone()))
        }
        Endpoint::Tcp(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(bind_error)?;
            let local = listener.local_addr().map_err(bind_error)?;
            Ok((server::Listener::Tcp(listener), Endpoint::Tcp(local)))
        }
    }
}
