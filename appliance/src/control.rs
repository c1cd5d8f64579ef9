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
    /// Seconds since the latest usable recovery point (one a failover can use now), if any.
    #[serde(default)]
    pub latest_point_age_seconds: Option<f64>,
    /// The retained recovery points of this group, oldest first (filled where the catalog
    /// lives: the target appliance, or a source that hears it back from its target).
    #[serde(default)]
    pub recovery_points: Vec<RecoveryPointStatus>,
    /// Where the group stands in the failover life cycle.
    #[serde(default)]
    pub state: GroupState,
    /// The NBD exports of a running failover or test failover of this group.
    #[serde(default)]
    pub exports: Vec<FailoverExport>,
}

/// A consistency group's place in the failover life cycle. Commands that make no sense in a
/// state (failback of a protected group, a second failover) are refused with an error naming it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupState {
    /// Replicating from its source site; no failover running.
    #[default]
    Protected,
    /// A test failover runs beside replication (exports in the test network).
    TestFailover,
    /// Failed over: the exports at the target are production now.
    FailedOver,
    /// Failed over, and the failed-over disks replicate back to the original site.
    Reprotecting,
    /// Returning to the original site (planned failover back in progress).
    FailingBack,
}

impl GroupState {
    /// The word shown to operators (also the JSON value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Protected => "protected",
            Self::TestFailover => "test-failover",
            Self::FailedOver => "failed-over",
            Self::Reprotecting => "reprotecting",
            Self::FailingBack => "failing-back",
        }
    }
}

/// One disk of a failover, served as an NBD export at the target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverExport {
    pub machine: String,
    pub disk: String,
    /// The export name (`<machine>/<disk>`).
    pub export_name: String,
    /// The unix socket serving the export.
    pub socket: String,
    /// The NBD URI a client opens, e.g. `nbd+unix:///web-1/os?socket=/…/web-1-os.sock`.
    pub uri: String,
    /// The recovery point the export shows.
    pub point_id: u64,
    pub test: bool,
    /// The materialised image, when `--materialize` was given.
    #[serde(default)]
    pub materialized_path: Option<String>,
    /// On RBD target storage: the clone holding the disk at the point (`pool/image`), which
    /// the export serves and a hypervisor can boot from.
    #[serde(default)]
    pub rbd_image: Option<String>,
}

/// How consistent a recovery point is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointConsistency {
    /// Every member disk at one common write-order point (the default kind).
    Crash,
    /// Taken after the machines' freeze hook quiesced their applications.
    App,
    /// Taken during a resync: the replica may mix old and new blocks.
    None,
}

impl PointConsistency {
    /// The word shown to operators (also the JSON value).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::App => "app",
            Self::None => "none",
        }
    }
}

/// One retained recovery point of a consistency group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecoveryPointStatus {
    /// The catalog's id of the point; failover names a point by it.
    pub id: u64,
    /// Milliseconds since the Unix epoch when the point was cut on the source.
    pub time_unix_ms: u64,
    pub consistency: PointConsistency,
    /// Whether failover may use this point: every member's marker arrived and no member disk
    /// was resyncing when it was cut.
    #[serde(default = "usable_default")]
    pub usable: bool,
    /// Why the point is not usable (e.g. "cut during a resync", "waiting for site-b's marker").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unusable_reason: Option<String>,
}

fn usable_default() -> bool {
    true
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
    /// Bytes of replication frames (records, hash requests, Hello) the source handed to the
    /// link since it started; QUIC and UDP/IP headers are not counted.
    #[serde(default)]
    pub sent_bytes: u64,
    /// Source: the persisted sequence floor (`<state_dir>/sequence-floor`), up to which records
    /// ship before they are durable in the journal; none while the source ships only durable
    /// records. Shipping waits at it when it cannot be written (`last_error` says so).
    #[serde(default)]
    pub sequence_floor: Option<u64>,
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

/// Which disks a command applies to. With neither field set: every disk of the appliance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSelector {
    /// One disk, as `machine/disk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Every disk of one consistency group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// A command sent to the appliance, one JSON object per line: `{"cmd":"status"}`.
/// An appliance that does not implement a command yet answers `Response::Error`; consoles show
/// that answer as it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    /// Stop shipping the selected disks; their writes keep being journaled.
    Pause {
        #[serde(flatten)]
        selector: DiskSelector,
    },
    /// Resume shipping the selected disks.
    Resume {
        #[serde(flatten)]
        selector: DiskSelector,
    },
    /// Change the link bandwidth limit at run time (`None`: no limit).
    SetBandwidth {
        bytes_per_s: Option<u64>,
    },
    /// Cut a recovery point of a group now; `app_consistent` runs the freeze hook first.
    CreateRecoveryPoint {
        group: String,
        app_consistent: bool,
    },
    /// List a group's retained recovery points.
    ListRecoveryPoints {
        group: String,
    },
    /// Fail a group over to a recovery point: `point` by id, else the newest usable point at or
    /// before `at_unix_ms`, else the latest. A test failover brings up copies beside the replicas
    /// and leaves replication running. `planned` first makes the source read-only, drains it and
    /// cuts a final point (no data loss). `materialize_dir` also writes each disk's image to
    /// `<dir>/<machine>/<disk>.raw`.
    Failover {
        group: String,
        point: Option<u64>,
        test: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at_unix_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        planned: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        materialize_dir: Option<String>,
    },
    /// Tear down a test failover's copies.
    FailoverCleanup {
        group: String,
    },
    /// After a failover, replicate the failed-over copies back towards the original site.
    Reprotect {
        group: String,
    },
    /// Return a reprotected group to its original site.
    Failback {
        group: String,
    },
    /// Drain, then compare the selected disks with their replicas extent by extent (hashes);
    /// differing extents are reported and sent again.
    Verify {
        #[serde(default)]
        selector: DiskSelector,
    },
}

/// The outcome of verifying one disk against its replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyDisk {
    pub machine: String,
    pub name: String,
    pub identical: bool,
    pub extents_compared: u64,
    /// Extents whose hash differed from the replica's (they were sent again).
    pub extents_differing: u64,
    pub bytes_compared: u64,
}

/// The appliance's answer, one JSON object per line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    Status(StatusSnapshot),
    Verify {
        disks: Vec<VerifyDisk>,
    },
    /// A group's retained recovery points, oldest first.
    RecoveryPoints {
        group: String,
        points: Vec<RecoveryPointStatus>,
    },
    /// The point `create-recovery-point` cut.
    PointCreated {
        group: String,
        point: RecoveryPointStatus,
    },
    /// A failover (or test failover) is up: one export per disk.
    Failover {
        group: String,
        point: RecoveryPointStatus,
        test: bool,
        exports: Vec<FailoverExport>,
        /// Machine definitions written (JSON and libvirt XML), one pair per machine.
        #[serde(default)]
        definitions: Vec<String>,
    },
    Ok {
        message: String,
    },
    Error {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire shape of the console's commands is a contract with other tools (scripts, a
    /// future web console): pin it.
    #[test]
    fn requests_have_a_stable_json_shape() {
        let cases = [
            (Request::Status, r#"{"cmd":"status"}"#),
            (
                Request::Pause {
                    selector: DiskSelector {
                        disk: Some("db1/vda".into()),
                        group: None,
                    },
                },
                r#"{"cmd":"pause","disk":"db1/vda"}"#,
            ),
            (
                Request::Resume {
                    selector: DiskSelector {
                        disk: None,
                        group: Some("db".into()),
                    },
                },
                r#"{"cmd":"resume","group":"db"}"#,
            ),
            (
                Request::SetBandwidth {
                    bytes_per_s: Some(50_000_000),
                },
                r#"{"cmd":"set-bandwidth","bytes_per_s":50000000}"#,
            ),
            (
                Request::CreateRecoveryPoint {
                    group: "db".into(),
                    app_consistent: true,
                },
                r#"{"cmd":"create-recovery-point","group":"db","app_consistent":true}"#,
            ),
            (
                Request::Failover {
                    group: "db".into(),
                    point: Some(7),
                    test: true,
                    at_unix_ms: None,
                    planned: false,
                    materialize_dir: None,
                },
                r#"{"cmd":"failover","group":"db","point":7,"test":true}"#,
            ),
            (
                Request::FailoverCleanup { group: "db".into() },
                r#"{"cmd":"failover-cleanup","group":"db"}"#,
            ),
            (
                Request::Reprotect { group: "db".into() },
                r#"{"cmd":"reprotect","group":"db"}"#,
            ),
            (
                Request::Failback { group: "db".into() },
                r#"{"cmd":"failback","group":"db"}"#,
            ),
        ];
        for (request, json) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), json);
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), request);
        }
    }

    /// Snapshots from an appliance that predates recovery points still parse.
    #[test]
    fn group_without_recovery_points_parses() {
        let json =
            r#"{"name":"db","rpo_threshold_seconds":30,"recovery_point_interval_seconds":300}"#;
        let group: GroupStatus = serde_json::from_str(json).unwrap();
        assert!(group.recovery_points.is_empty());
        assert_eq!(group.latest_point_age_seconds, None);
    }
}
