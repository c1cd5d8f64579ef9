//! The target side of the daemon: listens for sources on the QUIC endpoint (the target never
//! dials), applies their streams to replicas under `storage_dir`, and reports each replica's
//! applied sequence to the status model.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::layout::StateLayout;
use super::status::StatusModel;
use super::DaemonError;
use crate::apply::{self, ApplyStatus, PeerControl, ReplicaStore};
use crate::config::TargetConfig;
use crate::io::transport::{Identity, Peer, TargetEndpoint, Tuning};

/// The running target side.
pub(crate) struct TargetSide {
    task: Mutex<Option<JoinHandle<()>>>,
    status: ApplyStatus,
    /// The control plane back to the connected sources (planned failover, fencing).
    // Read by the failover commands, which land next.
    #[allow(dead_code)]
    pub peers: Arc<PeerControl>,
}

impl TargetSide {
    pub fn start(
        target: &TargetConfig,
        layout: &StateLayout,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, DaemonError> {
        let component = |message: String| DaemonError::Component {
            component: "target",
            message,
        };
        let identity =
            Identity::load_or_create(&layout.keys).map_err(|e| component(e.to_string()))?;
        let peers = target
            .peers
            .iter()
            .map(|peer| Peer {
                name: peer.name.clone(),
                fingerprint: peer.fingerprint,
            })
            .collect();
        let endpoint = TargetEndpoint::bind(target.listen, &identity, peers, &Tuning::default())
            .map_err(|e| component(format!("target.listen {}: {e}", target.listen)))?;
        let store = ReplicaStore::new(&target.storage_dir);
        let status = ApplyStatus::default();
        let sources: Vec<String> = target.peers.iter().map(|peer| peer.name.clone()).collect();
        status.load_from(&store, &sources);
        let peers = PeerControl::new();
        let task = tokio::spawn(apply::serve_mapped(
            endpoint,
            store,
            status.clone(),
            apply::SettingsMapping::from_config(target),
            peers.clone(),
            shutdown,
        ));
        Ok(Self {
            task: Mutex::new(Some(task)),
            status,
            peers,
        })
    }

    /// Copies every replica's figures into the status model.
    pub fn sample(&self, status: &StatusModel) {
        for replica in self.status.replicas() {
            status.upsert_replica(replica);
        }
    }

    /// After the shutdown signal: waits for the sessions to finish (their queued writes
    /// applied and the applied sequence persisted).
    pub async fn stop(self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}
