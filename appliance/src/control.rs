//! The control API: the status snapshot and the commands that the CLI and the operator console
//! exchange with a running appliance over its control socket (unix, owner-only, one JSON object
//! per line each way). These types are the contract between the appliance and its consoles;
//! the TUI renders nothing that does not come through here.

use serde::{Deserialize, Serialize};

/// Replication state of one protected disk, as an operator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// Initial replication in progress (see `DiskStatus::sync`).
    InitialSync,
    /// Streaming from the journal; the target is at most `rpo_lag_seconds` behind.
    Protected,
    /// The journal overflowed; writes are tracked in the dirty-extent bitmap until a resync.
    ResyncNeeded,
    /// Dirty extents are being resynced (see `DiskStatus::sync`).
    Resyncing,
    /// Replication paused by an operator; writes are still journaled.
    Paused,
    /// The disk's group was failed over; the target copy is the live one.
    FailedOver,
    /// Replicating back from the failed-over copy to the original site.
    Reprotecting,
}

impl DiskState {
    /// The word shown to operators (also the JSON value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InitialSync => "initial-sync",
            Self::Protected => "protected",
            Self::ResyncNeeded => "resync-needed",
            Self::Resyncing => "resyncing",
            Self::Paused => "paused",
            Self::FailedOver => "failed-over",
            Self::Reprotecting => "reprotecting",
        }
    }
}

/// Progress of an initial replication or a resync.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_per_s: f64,
    /// Estimated seconds to completion at the current rate; `None` while the rate is unknown.
    pub eta_seconds: Option<f64>,
}

/// One protected disk on a source appliance. The first ten fields are the documented
/// `ferry status --json` contract; the rest are additions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    pub machine: String,
    pub name: String,
    pub state: DiskState,
    pub bytes_written: u64,
    pub journal_used_bytes: u64,
    pub journal_capacity_bytes: u64,
    pub churn_bytes_per_s: f64,
    pub last_sequence: u64,
    pub acked_sequence: u64,
    pub rpo_lag_seconds: f64,
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub ship_bytes_per_s: f64,
    /// Where the NBD export listens (unix socket path or host:port).
    #[serde(default)]
    pub export: String,
    #[serde(default)]
    pub sync: Option<SyncProgress>,
}

/// One replica disk on a target appliance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub machine: String,
    pub name: String,
    pub replica_path: String,
    pub applied_sequence: u64,
    #[serde(default)]
    pub source_appliance: String,
    #[serde(default)]
    pub size_bytes: u64,
}

/// A consistency group as the console shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    /// RPO threshold in seconds; lag above it raises an alert.
    pub rpo_threshold_seconds: f64,
    pub recovery_point_interval_seconds: f64,
    /// Seconds since the latest recovery point, if any.
    #[serde(default)]
    pub latest_point_age_seconds: Option<f64>,
}

/// The state of this appliance's link to its peer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The peer's address (source: the target it dials; target: empty).
    pub peer: String,
    pub connected: bool,
    /// Why the last connection attempt failed, e.g. "peer refused: fingerprint mismatch".
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub bandwidth_limit_bytes_per_s: Option<u64>,
}

/// A full status snapshot of one appliance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    pub appliance: String,
    /// Milliseconds since the Unix epoch when the snapshot was taken.
    pub time_unix_ms: u64,
    #[serde(default)]
    pub disks: Vec<DiskStatus>,
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
    #[serde(default)]
    pub link: Option<LinkStatus>,
}

/// A command sent to the appliance, one JSON object per line: `{"cmd":"status"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
}

/// The appliance's answer, one JSON object per line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status(StatusSnapshot),
    Ok { message: String },
    Error { message: String },
}
