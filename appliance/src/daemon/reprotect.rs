//! `ferry reprotect` and `ferry failback` on the target appliance, and the planned failover's
//! hand-over with the source: the group-state transitions failed-over → reprotecting →
//! failing-back → protected, each refused with a clear error from any other state.
//!
//! The failover itself (exports, overlays, cleanup) belongs to the failover module; it is
//! reached through [`FailoverGroups`] so these transitions stay in one place.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use crate::apply::peer::{PeerControl, ReprotectDisks};
use crate::control::{GroupState, Response};

/// How long a source may take to answer that it started pulling.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long failback's last round and the source's hand-over may take.
const FINISH_TIMEOUT: Duration = Duration::from_secs(540);

/// What reprotect and failback need of the target's failover.
pub(crate) trait FailoverGroups: Send + Sync {
    /// The group's state as the failover knows it (protected, test-failover, failed-over).
    fn state(&self, group: &str) -> GroupState;
    /// The failed-over disks of the group's (non-test) failover, keyed by (source, machine, disk).
    fn disks(&self, group: &str) -> Result<ReprotectDisks, String>;
    /// Makes the group's failover exports read-only (failback) or writable again.
    fn set_read_only(&self, group: &str, read_only: bool) -> Result<(), String>;
    /// Tears the group's failover down (exports, overlays, pinned point).
    fn cleanup(&self, group: &str)
        -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

/// Reprotect and failback state of the target's groups (over the failover's own state).
#[derive(Default)]
pub(crate) struct Reprotects {
    states: Mutex<BTreeMap<String, GroupState>>,
}

impl Reprotects {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, GroupState>> {
        self.states
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The group's state: reprotecting / failing-back while one runs, else the failover's.
    pub fn state(&self, failover: &dyn FailoverGroups, group: &str) -> GroupState {
        self.lock()
            .get(group)
            .copied()
            .unwrap_or_else(|| failover.state(group))
    }

    /// Groups in reprotect or failback, with their state (for status).
    pub fn states(&self) -> Vec<(String, GroupState)> {
        self.lock()
            .iter()
            .map(|(group, state)| (group.clone(), *state))
            .collect()
    }

    fn set(&self, group: &str, state: Option<GroupState>) {
        let mut states = self.lock();
        match state {
            Some(state) => states.insert(group.to_string(), state),
            None => states.remove(group),
        };
    }

    /// `ferry reprotect --group G`: the group must be failed over (not a test failover).
    pub async fn reprotect(
        &self,
        failover: &dyn FailoverGroups,
        peers: &PeerControl,
        group: &str,
    ) -> Response {
        let state = self.state(failover, group);
        if state != GroupState::FailedOver {
            return error(match state {
                GroupState::Reprotecting => format!("group {group:?} is already reprotecting"),
                GroupState::FailingBack => format!("group {group:?} is failing back"),
                other => format!(
                    "group {group:?} is {}: reprotect needs a failed-over group (ferry failover --group {group} first)",
                    other.as_str()
                ),
            });
        }
        let disks = match failover.disks(group) {
            Ok(disks) => disks,
            Err(message) => return error(format!("reprotect of {group:?}: {message}")),
        };
        peers.serve_reprotect(group, disks);
        match peers.start_reprotect(group, START_TIMEOUT).await {
            Ok(disks) => {
                self.set(group, Some(GroupState::Reprotecting));
                tracing::info!(group = %group, disks = %disks.join(","), "reprotecting");
                Response::Ok {
                    message: format!(
                        "group {group} reprotecting: the source pulls {}",
                        disks.join(", ")
                    ),
                }
            }
            Err(start) => {
                peers.stop_reprotect(group);
                error(format!("reprotect of {group:?}: {start}"))
            }
        }
    }

    /// `ferry failback --group G`: the group must be reprotecting (or a failback was cut short).
    pub async fn failback(
        &self,
        failover: &dyn FailoverGroups,
        peers: &PeerControl,
        group: &str,
    ) -> Response {
        let state = self.state(failover, group);
        if !matches!(state, GroupState::Reprotecting | GroupState::FailingBack) {
            return error(match state {
                GroupState::FailedOver => format!(
                    "group {group:?} is failed-over: reprotect it first (ferry reprotect --group {group})"
                ),
                other => format!(
                    "group {group:?} is {}: failback needs a reprotecting group",
                    other.as_str()
                ),
            });
        }
        self.set(group, Some(GroupState::FailingBack));
        if let Err(message) = failover.set_read_only(group, true) {
            self.set(group, Some(state));
            return error(format!("failback of {group:?}: {message}"));
        }
        let totals = match peers.finish_reprotect(group, FINISH_TIMEOUT).await {
            Ok(totals) => totals,
            Err(finish) => {
                // Production stays at the target: its exports take writes again.
                let _ = failover.set_read_only(group, false);
                self.set(group, Some(GroupState::Reprotecting));
                return error(format!(
                    "failback of {group:?}: {finish}; the group stays failed over (reprotecting)"
                ));
            }
        };
        peers.stop_reprotect(group);
        peers.set_failed_over(group, false);
        let disks = match peers.unfence_sources(group, START_TIMEOUT).await {
            Ok(disks) => disks,
            Err(unfence) => {
                return error(format!(
                    "failback of {group:?}: the source holds the data but did not resume ({unfence}); run ferry failback --group {group} again"
                ))
            }
        };
        if let Err(message) = failover.cleanup(group).await {
            tracing::warn!(group = %group, "failback: failover cleanup failed: {message}");
        }
        self.set(group, None);
        tracing::info!(group = %group, ?totals, "failed back to the source");
        Response::Ok {
            message: format!(
                "group {group} failed back: {} bytes pulled ({} extents compared, {} rounds); the source runs {} again and resyncs its replica",
                totals.bytes_copied,
                totals.extents_compared,
                totals.rounds,
                disks.join(", ")
            ),
        }
    }
}

fn error(message: String) -> Response {
    Response::Error { message }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(GroupState);

    impl FailoverGroups for Fake {
        fn state(&self, _group: &str) -> GroupState {
            self.0
        }
        fn disks(&self, _group: &str) -> Result<ReprotectDisks, String> {
            Ok(ReprotectDisks::new())
        }
        fn set_read_only(&self, _group: &str, _read_only: bool) -> Result<(), String> {
            Ok(())
        }
        fn cleanup(
            &self,
            _group: &str,
        ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn message(response: Response) -> String {
        match response {
            Response::Error { message } => message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn impossible_transitions_are_refused_with_the_state() {
        let reprotects = Reprotects::default();
        let peers = PeerControl::new();
        let protected = Fake(GroupState::Protected);
        let refused = message(reprotects.reprotect(&protected, &peers, "shop").await);
        assert!(refused.contains("is protected"), "{refused}");
        let test = Fake(GroupState::TestFailover);
        let refused = message(reprotects.reprotect(&test, &peers, "shop").await);
        assert!(refused.contains("test-failover"), "{refused}");
        let failed_over = Fake(GroupState::FailedOver);
        let refused = message(reprotects.failback(&failed_over, &peers, "shop").await);
        assert!(refused.contains("reprotect it first"), "{refused}");
        // No source connected: reprotect says so and the state does not move.
        let refused = message(reprotects.reprotect(&failed_over, &peers, "shop").await);
        assert!(
            refused.contains("not connected") || refused.contains("no source"),
            "{refused}"
        );
        assert_eq!(
            reprotects.state(&failed_over, "shop"),
            GroupState::FailedOver
        );
    }
}
