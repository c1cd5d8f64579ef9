//! The target side of the daemon: listens for sources on the QUIC endpoint (the target never
//! dials), applies their streams to replicas under `storage_dir`, and reports each replica's
//! applied sequence to the status model. It owns the appliance's recovery-point store: prunes it
//! every few seconds, answers `recovery-point list` from its catalog and fills the groups of
//! status.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::layout::StateLayout;
use super::reprotect::{FailoverGroups, Reprotects};
use super::status::StatusModel;
use super::DaemonError;
use crate::apply::{self, ApplyStatus, PeerControl, RecoveryStore, ReplicaStore};
use crate::config::TargetConfig;
use crate::control::{GroupState, Request, Response};
use crate::failover::{FailoverManager, FailoverRequest};
use crate::io::transport::{Identity, Peer, TargetEndpoint, Tuning};

/// The running target side.
pub(crate) struct TargetSide {
    task: Mutex<Option<JoinHandle<()>>>,
    prune_task: Mutex<Option<JoinHandle<()>>>,
    status: ApplyStatus,
    /// The control plane back to the connected sources (planned failover, fencing).
    pub peers: Arc<PeerControl>,
    recovery: Arc<RecoveryStore>,
    /// Reprotect and failback of failed-over groups.
    pub reprotects: Arc<Reprotects>,
    /// The failovers of this target (exports, overlays, definitions).
    failovers: Arc<FailoverManager>,
}

/// How often points past their retention and unneeded before-images are dropped.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
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
        let storage = apply::Storage::from_config(target, &store).map_err(component)?;
        status.load_from(&store, &storage, &sources);
        let peers = PeerControl::new();
        let recovery = RecoveryStore::open_with_storage(store.clone(), storage, None)
            .map_err(|e| component(e.to_string()))?;
        // Failovers recorded before a restart pin their points again before the first prune.
        let failovers = Arc::new(FailoverManager::new(
            recovery.clone(),
            peers.clone(),
            &layout.root,
        ));
        failovers.restore();
        let prune_task = tokio::spawn(prune_loop(recovery.clone(), shutdown.clone()));
        let task = tokio::spawn(apply::serve_with_recovery(
            endpoint,
            store,
            status.clone(),
            apply::SettingsMapping::from_config(target),
            peers.clone(),
            recovery.clone(),
            shutdown,
        ));
        Ok(Self {
            task: Mutex::new(Some(task)),
            prune_task: Mutex::new(Some(prune_task)),
            status,
            peers,
            recovery,
            reprotects: Arc::default(),
            failovers,
        })
    }

    /// `ferry failover` and `ferry failover cleanup`: run beside the event loop (a planned
    /// failover waits for the source's final point, materialising reads whole disks) and
    /// answer when done. Refused while the group reprotects or fails back.
    pub fn failover_command(
        &self,
        request: Request,
        reply: tokio::sync::oneshot::Sender<Response>,
    ) {
        let failovers = self.failovers.clone();
        let reprotects = self.reprotects.clone();
        tokio::spawn(async move {
            let response = match request {
                Request::Failover {
                    group,
                    point,
                    test,
                    at_unix_ms,
                    planned,
                    materialize_dir,
                } => match reprotects.state(failovers.as_ref(), &group) {
                    state @ (GroupState::Reprotecting | GroupState::FailingBack) => {
                        Response::Error {
                            message: format!(
                                "group {group:?} is {}: it is failed over already",
                                state.as_str()
                            ),
                        }
                    }
                    _ => {
                        failovers
                            .failover(FailoverRequest {
                                group,
                                point,
                                at_unix_ms,
                                test,
                                planned,
                                materialize_dir: materialize_dir.map(Into::into),
                            })
                            .await
                    }
                },
                Request::FailoverCleanup { group } => failovers.cleanup_test(&group).await,
                other => Response::Error {
                    message: format!("not a failover command: {other:?}"),
                },
            };
            let _ = reply.send(response);
        });
    }

    /// `ferry reprotect` / `ferry failback`: runs beside the event loop (a failback waits for
    /// the source's last round) and answers when done.
    pub fn reprotect_command(
        &self,
        group: String,
        failback: bool,
        reply: tokio::sync::oneshot::Sender<Response>,
    ) {
        let reprotects = self.reprotects.clone();
        let peers = self.peers.clone();
        let failovers = self.failovers.clone();
        tokio::spawn(async move {
            let response = if failback {
                reprotects
                    .failback(failovers.as_ref(), &peers, &group)
                    .await
            } else {
                reprotects
                    .reprotect(failovers.as_ref(), &peers, &group)
                    .await
            };
            let _ = reply.send(response);
        });
    }

    /// `recovery-point list` from the catalog.
    pub fn list_recovery_points(&self, group: &str) -> Response {
        match self.recovery.list(group) {
            Some(points) => Response::RecoveryPoints {
                group: group.to_string(),
                points,
            },
            None => Response::Error {
                message: format!(
                    "no recovery point of group {group:?} has reached this target (groups: {})",
                    self.recovery.groups().join(", ")
                ),
            },
        }
    }

    /// Copies every replica's figures into the status model.
    pub fn sample(&self, status: &StatusModel) {
        status.set_failovers(self.failovers.snapshot());
        status.set_reprotect_states(self.reprotects.states());
        for replica in self.status.replicas() {
            status.upsert_replica(replica);
        }
        for group in self.recovery.groups() {
            if let Some(points) = self.recovery.list(&group) {
                status.set_recovery_points(&group, points);
            }
        }
    }

    /// After the shutdown signal: waits for the sessions to finish (their queued writes
    /// applied and the applied sequence persisted).
    pub async fn stop(self) {
        // Failover exports stop and their overlays are flushed; their records stay, so the
        // failovers come back at the next start.
        self.failovers.stop().await;
        let task = self
            .task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let prune_task = self
            .prune_task
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(task) = prune_task {
            let _ = task.await;
        }
    }
}

impl FailoverGroups for FailoverManager {
    fn state(&self, group: &str) -> GroupState {
        FailoverManager::state(self, group)
    }

    fn disks(&self, group: &str) -> Result<crate::apply::peer::ReprotectDisks, String> {
        self.reprotect_disks(group)
    }

    fn set_read_only(&self, group: &str, read_only: bool) -> Result<(), String> {
        FailoverManager::set_read_only(self, group, read_only)
    }

    fn cleanup(
        &self,
        group: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        let group = group.to_string();
        Box::pin(async move { FailoverManager::cleanup(self, &group).await.map(|_| ()) })
    }
}

/// Prunes the store every `PRUNE_INTERVAL` until shutdown (file deletes run off the runtime).
async fn prune_loop(recovery: Arc<RecoveryStore>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(PRUNE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
            _ = interval.tick() => {}
        }
        let store = recovery.clone();
        match tokio::task::spawn_blocking(move || store.prune(now_unix_ms())).await {
            Ok(Ok(report)) => {
                if !report.points_removed.is_empty() || report.undo_bytes_freed > 0 {
                    tracing::info!(
                        points_removed = report.points_removed.len(),
                        undo_bytes_freed = report.undo_bytes_freed,
                        "recovery points pruned"
                    );
                }
            }
            Ok(Err(error)) => tracing::warn!("recovery-point pruning failed: {error}"),
            Err(error) => tracing::warn!("recovery-point pruning task failed: {error}"),
        }
    }
}
