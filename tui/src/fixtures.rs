//! Canned status snapshots for the screen tests, the frame-cost bench and screenshots in the
//! docs. They are deterministic (fixed clock, no randomness) so rendered screens are stable.

use ferry_appliance::control::{
    DiskState, DiskStatus, FailoverExport, GroupState, GroupStatus, LinkStatus, PointConsistency,
    RecoveryPointStatus, ReplicaStatus, StatusSnapshot, SyncProgress,
};

/// 2026-11-26 14:05:03 UTC, the fixtures' "now".
pub const TIME_UNIX_MS: u64 = 1_764_165_903_000;

const GB: u64 = 1_000_000_000;
const MB: f64 = 1e6;

fn disk(machine: &str, name: &str, group: &str, state: DiskState) -> DiskStatus {
    DiskStatus {
        machine: machine.to_string(),
        name: name.to_string(),
        state,
        bytes_written: 40 * GB,
        journal_used_bytes: GB / 10,
        journal_capacity_bytes: 2 * GB,
        churn_bytes_per_s: 8.0 * MB,
        last_sequence: 1_204_551,
        acked_sequence: 1_204_530,
        rpo_lag_seconds: 0.6,
        group: group.to_string(),
        size_bytes: 100 * GB,
        ship_bytes_per_s: 8.1 * MB,
        export: format!("/run/ferry/{machine}-{name}.sock"),
        sync: None,
    }
}

fn points(count: u64, interval_s: u64, newest_age_s: u64) -> Vec<RecoveryPointStatus> {
    (0..count)
        .map(|index| {
            let age_s = newest_age_s + (count - 1 - index) * interval_s;
            // Point ids are the cut's time in ms (or one more than the previous id).
            RecoveryPointStatus {
                id: TIME_UNIX_MS - age_s * 1000,
                time_unix_ms: TIME_UNIX_MS - age_s * 1000,
                consistency: if index % 4 == 1 {
                    PointConsistency::App
                } else {
                    PointConsistency::Crash
                },
                usable: true,
                unusable_reason: None,
            }
        })
        .collect()
}

/// A source appliance where everything is fine: two groups, one disk still in initial sync.
pub fn healthy() -> StatusSnapshot {
    let mut web2 = disk("web2", "vda", "web", DiskState::InitialSync);
    web2.sync = Some(SyncProgress {
        bytes_done: 63 * GB,
        bytes_total: 100 * GB,
        bytes_per_s: 118.0 * MB,
        eta_seconds: Some(313.0),
    });
    web2.churn_bytes_per_s = 2.0 * MB;
    web2.ship_bytes_per_s = 118.0 * MB;
    web2.rpo_lag_seconds = 0.0;
    let mut db1b = disk("db1", "vdb", "db", DiskState::Protected);
    db1b.churn_bytes_per_s = 21.5 * MB;
    db1b.ship_bytes_per_s = 21.4 * MB;
    db1b.rpo_lag_seconds = 0.9;
    StatusSnapshot {
        appliance: "source-a".to_string(),
        time_unix_ms: TIME_UNIX_MS,
        disks: vec![
            disk("db1", "vda", "db", DiskState::Protected),
            db1b,
            disk("db2", "vda", "db", DiskState::Protected),
            disk("web1", "vda", "web", DiskState::Protected),
            web2,
        ],
        replicas: Vec::new(),
        groups: vec![
            GroupStatus {
                name: "db".to_string(),
                rpo_threshold_seconds: 30.0,
                recovery_point_interval_seconds: 300.0,
                latest_point_age_seconds: Some(42.0),
                recovery_points: points(5, 300, 42),
                state: GroupState::Protected,
                exports: Vec::new(),
            },
            GroupStatus {
                name: "web".to_string(),
                rpo_threshold_seconds: 60.0,
                recovery_point_interval_seconds: 300.0,
                latest_point_age_seconds: Some(131.0),
                recovery_points: points(2, 300, 131),
                state: GroupState::Protected,
                exports: Vec::new(),
            },
        ],
        link: Some(LinkStatus {
            peer: "127.0.0.1:4433".to_string(),
            connected: true,
            last_error: None,
            bandwidth_limit_bytes_per_s: None,
            sent_bytes: 0,
            sequence_floor: None,
        }),
    }
}

/// The same appliance in trouble: an RPO breach, a filling journal, a paused disk, a disk that
/// overflowed to the bitmap, and the target refusing the connection.
pub fn with_alerts() -> StatusSnapshot {
    let mut snapshot = healthy();
    for disk in &mut snapshot.disks {
        match (disk.machine.as_str(), disk.name.as_str()) {
            ("db1", "vda") => {
                disk.rpo_lag_seconds = 45.2;
                disk.acked_sequence -= 20_000;
            }
            ("db1", "vdb") => {
                disk.journal_used_bytes = 1_720_000_000;
                disk.churn_bytes_per_s = 48.0 * MB;
                disk.ship_bytes_per_s = 12.0 * MB;
                disk.rpo_lag_seconds = 12.0;
            }
            ("db2", "vda") => {
                disk.state = DiskState::Paused;
                disk.ship_bytes_per_s = 0.0;
                disk.rpo_lag_seconds = 8.0;
            }
            ("web1", "vda") => {
                disk.state = DiskState::ResyncNeeded;
                disk.journal_used_bytes = disk.journal_capacity_bytes;
                disk.ship_bytes_per_s = 0.0;
                disk.rpo_lag_seconds = 20.0;
            }
            _ => {}
        }
    }
    snapshot.link = Some(LinkStatus {
        peer: "127.0.0.1:4433".to_string(),
        connected: false,
        last_error: Some("peer refused: certificate fingerprint mismatch".to_string()),
        bandwidth_limit_bytes_per_s: Some(50_000_000),
        sent_bytes: 0,
        sequence_floor: None,
    });
    snapshot
}

/// `disk_count` disks over groups of eight, a few in trouble, for the frame-cost bench.
/// `step` varies the rates so successive snapshots differ like live ones do.
pub fn large(disk_count: usize, step: u64) -> StatusSnapshot {
    let group_count = disk_count.div_ceil(8).max(1);
    let groups = (0..group_count)
        .map(|index| GroupStatus {
            name: format!("group{index:03}"),
            rpo_threshold_seconds: 30.0,
            recovery_point_interval_seconds: 300.0,
            latest_point_age_seconds: Some(((index as u64 * 37 + step) % 300) as f64),
            recovery_points: points(12, 300, (index as u64 * 37 + step) % 300),
            state: GroupState::Protected,
            exports: Vec::new(),
        })
        .collect();
    let disks = (0..disk_count)
        .map(|index| {
            let state = match index % 50 {
                7 => DiskState::Paused,
                19 => DiskState::Resyncing,
                _ => DiskState::Protected,
            };
            let mut disk = disk(
                &format!("vm{:03}", index / 2),
                if index % 2 == 0 { "vda" } else { "vdb" },
                &format!("group{:03}", index / 8),
                state,
            );
            let wobble = ((index as u64 * 7919 + step * 104_729) % 1000) as f64 / 1000.0;
            disk.churn_bytes_per_s = (2.0 + 30.0 * wobble) * MB;
            disk.ship_bytes_per_s = (2.0 + 29.0 * wobble) * MB;
            disk.rpo_lag_seconds = if index % 61 == 3 {
                40.0 + wobble
            } else {
                wobble * 3.0
            };
            disk.journal_used_bytes = (wobble * 0.9 * disk.journal_capacity_bytes as f64) as u64;
            disk.last_sequence += step * 1000;
            disk.acked_sequence += step * 1000;
            disk
        })
        .collect();
    StatusSnapshot {
        appliance: "source-bench".to_string(),
        time_unix_ms: TIME_UNIX_MS + step * 1000,
        disks,
        replicas: Vec::new(),
        groups,
        link: Some(LinkStatus {
            peer: "127.0.0.1:4433".to_string(),
            connected: true,
            last_error: None,
            bandwidth_limit_bytes_per_s: None,
            sent_bytes: 0,
            sequence_floor: None,
        }),
    }
}

/// `count` snapshots of the healthy appliance, one second apart and ending at `healthy()`'s
/// time, with churn rising and RPO wobbling, so the charts have a shape.
pub fn healthy_history(count: u64) -> Vec<StatusSnapshot> {
    (0..count)
        .map(|second| {
            let mut snapshot = healthy();
            snapshot.time_unix_ms = TIME_UNIX_MS - (count - 1 - second) * 1000;
            let phase = second as f64 / count.max(1) as f64;
            for (index, disk) in snapshot.disks.iter_mut().enumerate() {
                let wave = ((second + index as u64 * 3) % 10) as f64 / 10.0;
                disk.churn_bytes_per_s *= 0.5 + phase + 0.3 * wave;
                disk.ship_bytes_per_s *= 0.5 + phase + 0.25 * wave;
                disk.rpo_lag_seconds *= 0.5 + 2.0 * wave;
            }
            snapshot
        })
        .collect()
}

/// The id of the `index`-th newest point of group db in `healthy()` (0: the newest).
pub fn db_point_id(index: u64) -> u64 {
    TIME_UNIX_MS - (42 + index * 300) * 1000
}

/// The source of `healthy()` and its target seen as one console (`appliance::merge`): the
/// target's replicas, and group db's newest point still waiting for a member's marker.
pub fn site_pair() -> StatusSnapshot {
    let source = healthy();
    let mut target = StatusSnapshot {
        appliance: "target-b".to_string(),
        time_unix_ms: TIME_UNIX_MS,
        disks: Vec::new(),
        replicas: source
            .disks
            .iter()
            .map(|disk| ReplicaStatus {
                machine: disk.machine.clone(),
                name: disk.name.clone(),
                replica_path: format!(
                    "/var/lib/ferry/replicas/source-a/{}/{}.raw",
                    disk.machine, disk.name
                ),
                applied_sequence: disk.acked_sequence,
                source_appliance: source.appliance.clone(),
                size_bytes: disk.size_bytes,
            })
            .collect(),
        groups: source.groups.clone(),
        link: None,
    };
    for group in &mut target.groups {
        if group.name == "db" {
            let mut newest = points(1, 300, 4)[0].clone();
            newest.usable = false;
            newest.unusable_reason = Some("waiting for source-c's marker".to_string());
            group.recovery_points.push(newest);
            group.latest_point_age_seconds = Some(4.0);
        }
    }
    crate::appliance::merge(source, target)
}

/// `site_pair()` with a test failover of group db running at its newest usable point.
pub fn test_failover() -> StatusSnapshot {
    let mut snapshot = site_pair();
    let point_id = db_point_id(0);
    for group in &mut snapshot.groups {
        if group.name == "db" {
            group.state = GroupState::TestFailover;
            group.exports = [("db1", "vda"), ("db1", "vdb"), ("db2", "vda")]
                .into_iter()
                .map(|(machine, disk)| {
                    let socket = format!("/var/lib/ferry/failover/db/{machine}-{disk}.sock");
                    FailoverExport {
                        machine: machine.to_string(),
                        disk: disk.to_string(),
                        export_name: format!("{machine}/{disk}"),
                        uri: format!("nbd+unix:///{machine}/{disk}?socket={socket}"),
                        socket,
                        point_id,
                        test: true,
                        materialized_path: None,
                        rbd_image: None,
                    }
                })
                .collect();
        }
    }
    snapshot
}

/// `site_pair()` after a failover of group web and while group db replicates back.
pub fn failed_over() -> StatusSnapshot {
    let mut snapshot = site_pair();
    for group in &mut snapshot.groups {
        group.state = match group.name.as_str() {
            "web" => GroupState::FailedOver,
            _ => GroupState::Reprotecting,
        };
    }
    for disk in &mut snapshot.disks {
        disk.state = if disk.group == "web" {
            DiskState::FailedOver
        } else {
            DiskState::Reprotecting
        };
        disk.sync = None;
    }
    snapshot
}
