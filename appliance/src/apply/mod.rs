//! Apply: the target appliance's side of replication. Accepts authenticated sources on the QUIC
//! endpoint (the target only listens), drives one `core::target::Target` per connection over
//! the replicas in target storage, and acknowledges only what is durable.
//!
//! Per connection there are three tasks: a reader that turns the source's `live` stream into
//! frames, the session loop that owns the `Target` state machine and sends its frames on the
//! `control` stream, and the executor (`executor.rs`) that runs the disk operations with many
//! writes in flight and group-commits flushes. Sessions of one source never overlap: a new
//! connection from a source closes the old one and waits until its executor has finished
//! (every queued write applied, the applied sequence persisted) before it starts.

pub mod catalog;
mod executor;
pub mod peer;
pub mod replica;
pub mod storage;
pub mod undo;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::config::{MachineSettings, MappingConfig, TargetConfig, TargetMachineConfig};
use crate::control::ReplicaStatus;
use crate::core::target::{Target, TargetEvent};
use crate::core::wire::{ReplicaState, WelcomeDisk};
use crate::io::transport::{ConnectionHandle, PeerConnection, TargetEndpoint};

pub use catalog::{DiskView, PruneReport, RecoveryError, RecoveryStore};
pub use executor::ExecutorOutput;
pub use peer::PeerControl;
pub use replica::{Replica, Storage, TargetStorage};
pub use storage::{ReplicaRecord, ReplicaStore, StorageError, StoredSettings};

/// How this target derives each machine's settings from its source's: `[target.mapping]` and
/// the `[[target.machine]]` overrides. The default keeps every source setting unchanged.
#[derive(Clone, Debug, Default)]
pub struct SettingsMapping {
    pub mapping: MappingConfig,
    pub overrides: Vec<TargetMachineConfig>,
}

impl SettingsMapping {
    pub fn from_config(target: &TargetConfig) -> Self {
        Self {
            mapping: target.mapping.clone(),
            overrides: target.machine.clone(),
        }
    }

    /// The source settings with the target settings derived from them, as stored.
    pub fn derive(&self, source: &MachineSettings) -> StoredSettings {
        StoredSettings {
            source: source.clone(),
            target: self.mapping.target_settings(&self.overrides, source),
        }
    }
}

/// Replica status shared with the daemon's status snapshot, keyed by (source, disk id).
#[derive(Clone, Debug, Default)]
pub struct ApplyStatus {
    replicas: Arc<Mutex<BTreeMap<(String, u32), ReplicaStatus>>>,
}

impl ApplyStatus {
    /// Every replica this target holds or has held since start, sorted by source and disk.
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u32), ReplicaStatus>> {
        self.replicas
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_applied(&self, source: &str, disk_ids: &[u32], seq: u64) {
        let mut replicas = self.lock();
        for disk_id in disk_ids {
            if let Some(replica) = replicas.get_mut(&(source.to_string(), *disk_id)) {
                replica.applied_sequence = seq;
            }
        }
    }

    /// Lists replicas found in target storage (at start, before their sources reconnect).
    pub fn load_from(&self, store: &ReplicaStore, storage: &Storage, sources: &[String]) {
        for source in sources {
            let applied = store
                .open_applied(source)
                .map(|file| file.seq())
                .unwrap_or(0);
            let Ok(disks) = store.load_disks(source) else {
                continue;
            };
            let mut replicas = self.lock();
            for disk in disks {
                replicas.insert(
                    (source.clone(), disk.disk_id),
                    replica_status(storage, source, &disk, applied),
                );
            }
        }
    }
}

fn replica_status(
    storage: &Storage,
    source: &str,
    disk: &ReplicaRecord,
    applied_sequence: u64,
) -> ReplicaStatus {
    ReplicaStatus {
        machine: disk.machine.clone(),
        name: disk.name.clone(),
        replica_path: storage.location(source, &disk.machine, &disk.name),
        applied_sequence,
        source_appliance: source.to_string(),
        size_bytes: disk.size_bytes,
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("replica {path}: {source}")]
    Disk {
        path: String,
        #[source]
        source: crate::io::disk::DiskError,
    },
    #[error("source {source_name}: {message}")]
    Session {
        source_name: String,
        message: String,
    },
}

/// Serves sources until `shutdown` turns true, keeping machine settings unmapped.
pub async fn serve(
    endpoint: TargetEndpoint,
    store: ReplicaStore,
    status: ApplyStatus,
    shutdown: watch::Receiver<bool>,
) {
    serve_mapped(
        endpoint,
        store,
        status,
        SettingsMapping::default(),
        PeerControl::new(),
        shutdown,
    )
    .await
}

/// Serves sources until `shutdown` turns true: one session task per connection. Each source's
/// machine settings are mapped with `mapping` and stored with the replicas; each connection's
/// control stream is attached to `peers` (the control plane back to the source). Recovery
/// points go to a store opened on the same storage directory (`serve_with_recovery` shares one).
pub async fn serve_mapped(
    endpoint: TargetEndpoint,
    store: ReplicaStore,
    status: ApplyStatus,
    mapping: SettingsMapping,
    peers: Arc<PeerControl>,
    shutdown: watch::Receiver<bool>,
) {
    let recovery = match RecoveryStore::open(store.clone(), None) {
        Ok(recovery) => recovery,
        Err(error) => {
            tracing::error!("cannot serve sources: {error}");
            return;
        }
    };
    serve_with_recovery(endpoint, store, status, mapping, peers, recovery, shutdown).await
}

/// `serve_mapped` with the target appliance's recovery-point store, which sessions record
/// markers in and whose undo logs they append before-images to.
pub async fn serve_with_recovery(
    mut endpoint: TargetEndpoint,
    store: ReplicaStore,
    status: ApplyStatus,
    mapping: SettingsMapping,
    peers: Arc<PeerControl>,
    recovery: Arc<RecoveryStore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mapping = Arc::new(mapping);
    let sessions: Arc<Mutex<BTreeMap<String, SessionSlot>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let connection = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            connection = endpoint.accept() => match connection {
                Some(connection) => connection,
                None => break,
            },
        };
        let source = connection.peer_name.clone();
        // Close the source's previous connection; its session hands over through the gate.
        let gate = {
            let mut sessions = sessions.lock().unwrap_or_else(|p| p.into_inner());
            let slot = sessions.entry(source.clone()).or_default();
            if let Some(previous) = slot.handle.replace(connection.handle.clone()) {
                previous.close("replaced by a new connection from the same source");
            }
            slot.gate.clone()
        };
        let store = store.clone();
        let status = status.clone();
        let mapping = mapping.clone();
        let peers = peers.clone();
        let recovery = recovery.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _turn = gate.lock().await;
            let peer_address = connection.handle.peer_address();
            match run_session(
                connection, &store, &status, &mapping, &peers, &recovery, shutdown,
            )
            .await
            {
                Ok(()) => tracing::info!(source = %source, %peer_address, "source session ended"),
                Err(error) => {
                    tracing::warn!(source = %source, %peer_address, "source session ended: {error}")
                }
            }
        });
        // Reap finished sessions so the set stays bounded by the live connections.
        while tasks.try_join_next().is_some() {}
    }
    endpoint.close().await;
    while tasks.join_next().await.is_some() {}
}

#[derive(Default)]
struct SessionSlot {
    handle: Option<ConnectionHandle>,
    gate: Arc<tokio::sync::Mutex<()>>,
}

/// Capacity of the queue of disk operations between the session and its executor; when it is
/// full the session stops reading frames, and QUIC flow control slows the source.
const DISK_OP_QUEUE_LENGTH: usize = 1024;

/// Aligned 1 MiB receive buffers a session keeps for reuse: the frames of a full sync window
/// (`limits::SYNC_BACKLOG_BYTES_MAX`) plus a few being received.
const RECEIVE_POOL_BUFFERS: usize = (crate::limits::SYNC_BACKLOG_BYTES_MAX >> 20) + 8;

async fn run_session(
    connection: PeerConnection,
    store: &ReplicaStore,
    status: &ApplyStatus,
    mapping: &SettingsMapping,
    peers: &Arc<PeerControl>,
    recovery: &Arc<RecoveryStore>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ApplyError> {
    let source = connection.peer_name.clone();
    let PeerConnection {
        control,
        live,
        handle,
        ..
    } = connection;
    let mut sender = control.sender;
    let mut peer = peers.attach(&source, control.receiver);
    let mut live_receiver = live.receiver;
    // A frame of one large record (every sync extent) arrives with its payload aligned for the
    // executor's O_DIRECT write, which then needs no copy of its own (`executor::write_buf`).
    live_receiver.align_frames(
        crate::core::wire::RECORDS_FIRST_PAYLOAD_OFFSET,
        crate::core::wire::RECORDS_FIRST_PAYLOAD_OFFSET
            + crate::limits::RECORD_PAYLOAD_BYTES_MAX
            + 64,
        RECEIVE_POOL_BUFFERS,
    );
    let (frame_tx, mut frames) = mpsc::channel::<Bytes>(64);
    let reader_source = source.clone();
    let reader = tokio::spawn(async move {
        loop {
            match live_receiver.recv().await {
                Ok(Some(frame)) => {
                    if frame_tx.send(frame).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::info!(source = %reader_source, "replication stream ended: {error}");
                    return;
                }
            }
        }
    });

    let mut applied = store.open_applied(&source)?;
    let mut target = Target::new(applied.seq());
    target.handle_connected();
    let mut executor: Option<executor::Executor> = None;
    let mut disk_ids: Vec<u32> = Vec::new();
    let mut result = Ok(());

    'session: loop {
        tokio::select! {
            biased;
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break 'session,
            output = recv_output(&mut executor) => match output {
                Some(ExecutorOutput::Durable(seq)) => {
                    status.set_applied(&source, &disk_ids, seq);
                    target.handle_durable(seq);
                }
                Some(ExecutorOutput::Read { token, data }) => target.handle_read(token, &data),
                Some(ExecutorOutput::Failed(message)) | Some(ExecutorOutput::Stopped(message)) => {
                    result = Err(ApplyError::Session { source_name: source.clone(), message });
                    break 'session;
                }
                None => {
                    result = Err(ApplyError::Session {
                        source_name: source.clone(),
                        message: "disk executor stopped".into(),
                    });
                    break 'session;
                }
            },
            frame = frames.recv() => match frame {
                Some(frame) => {
                    if let Err(error) = target.handle_frame_shared(&frame) {
                        tracing::warn!(source = %source, "refusing the source's stream: {error}");
                        result = Err(ApplyError::Session {
                            source_name: source.clone(),
                            message: error.to_string(),
                        });
                    }
                }
                None => break 'session,
            },
            frame = peer.next_frame() => {
                if let Err(error) = sender.send(Bytes::from(frame.into_bytes())).await {
                    tracing::info!(source = %source, "cannot send a control message: {error}");
                    break 'session;
                }
            }
        }
        // Drain every output of the state machine.
        while let Some(event) = target.poll_event() {
            match event {
                TargetEvent::Hello {
                    source_name,
                    disks,
                    machines,
                    ..
                } => {
                    tracing::info!(source = %source, announced_name = %source_name, disks = disks.len(), "source hello");
                    let records: Vec<ReplicaRecord> =
                        disks.iter().map(ReplicaRecord::from).collect();
                    let (replicas, welcome) =
                        open_replicas(recovery.storage(), &source, &records).await?;
                    store.save_disks(&source, &records)?;
                    for machine in &machines {
                        let settings = mapping.derive(machine);
                        tracing::debug!(source = %source, machine = %machine.name, target_settings = ?settings.target, "machine settings mapped");
                        store.save_settings(&source, &settings)?;
                    }
                    {
                        let mut map = status.lock();
                        for disk in &records {
                            map.insert(
                                (source.clone(), disk.disk_id),
                                replica_status(recovery.storage(), &source, disk, applied.seq()),
                            );
                        }
                    }
                    disk_ids = records.iter().map(|disk| disk.disk_id).collect();
                    peer.note_groups(records.iter().map(|disk| disk.group.as_str()));
                    if let Some(previous) = executor.take() {
                        applied = previous.finish().await;
                    }
                    executor = Some(executor::Executor::spawn(
                        source.clone(),
                        executor::ExecutorDisks {
                            replicas,
                            records: records
                                .iter()
                                .map(|record| (record.disk_id, record.clone()))
                                .collect(),
                            recovery: recovery.clone(),
                        },
                        store.open_applied(&source)?,
                    ));
                    target.welcome(welcome);
                }
            }
        }
        while let Some(op) = target.poll_disk_op() {
            let Some(running) = executor.as_mut() else {
                result = Err(ApplyError::Session {
                    source_name: source.clone(),
                    message: "disk operation before the session was welcomed".into(),
                });
                break 'session;
            };
            if !running.submit(op).await {
                result = Err(ApplyError::Session {
                    source_name: source.clone(),
                    message: "disk executor stopped".into(),
                });
                break 'session;
            }
        }
        // The executor records markers in the catalog at the commit that makes them durable.
        while let Some(marker) = target.poll_marker() {
            tracing::debug!(source = %source, seq = marker.seq, "recovery-point marker received");
        }
        while let Some(frame) = target.poll_transmit() {
            if let Err(error) = sender.send(Bytes::from(frame.into_bytes())).await {
                tracing::info!(source = %source, "cannot answer the source: {error}");
                break 'session;
            }
        }
        if result.is_err() {
            break 'session;
        }
    }
    target.handle_disconnected();
    handle.close("session ended");
    reader.abort();
    if let Some(running) = executor.take() {
        let applied = running.finish().await;
        status.set_applied(&source, &disk_ids, applied.seq());
    }
    result
}

async fn recv_output(executor: &mut Option<executor::Executor>) -> Option<ExecutorOutput> {
    match executor {
        Some(running) => running.recv().await,
        None => std::future::pending().await,
    }
}

/// Opens or creates each announced replica in target storage and says what the target holds
/// for it. Runs off the runtime: opening an RBD image is a blocking librbd call.
async fn open_replicas(
    storage: &Storage,
    source: &str,
    disks: &[ReplicaRecord],
) -> Result<(BTreeMap<u32, Replica>, Vec<WelcomeDisk>), ApplyError> {
    let storage = storage.clone();
    let source = source.to_owned();
    let disks = disks.to_vec();
    let opened = tokio::task::spawn_blocking(move || {
        let mut replicas = BTreeMap::new();
        let mut welcome = Vec::new();
        for disk in &disks {
            let (opened, existed) = storage
                .open_replica(&source, &disk.machine, &disk.name, disk.size_bytes)
                .map_err(|error| ApplyError::Disk {
                    path: storage.location(&source, &disk.machine, &disk.name),
                    source: error,
                })?;
            welcome.push(WelcomeDisk {
                disk_id: disk.disk_id,
                replica: if existed {
                    ReplicaState::Present
                } else {
                    ReplicaState::Absent
                },
                size_bytes: opened.size(),
            });
            replicas.insert(disk.disk_id, opened);
        }
        Ok((replicas, welcome))
    })
    .await;
    opened.unwrap_or_else(|error| {
        Err(ApplyError::Session {
            source_name: String::new(),
            message: format!("opening replicas: task failed: {error}"),
        })
    })
}

#[cfg(test)]
mod tests;
