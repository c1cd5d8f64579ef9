//! Ship and apply in one process over real parts: a capture export on a unix socket written by
//! qemu-io, the cache journal, the shipper dialing a target endpoint over QUIC with pinned
//! mutual TLS on loopback, and the apply side writing a replica file. The replica must end
//! byte-identical to the source disk, and verify must say so.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_appliance::apply::{self, ApplyStatus, ReplicaStore};
use ferry_appliance::capture::journal_handle::SharedJournal;
use ferry_appliance::capture::{Capture, CaptureConfig, DiskSpec, Endpoint, ListenerSpec};
use ferry_appliance::control::DiskState;
use ferry_appliance::core::journal_mem::MemSegments;
use ferry_appliance::daemon::running::SequenceFloor;
use ferry_appliance::io::disk::DiskOptions;
use ferry_appliance::io::transport::{Identity, Peer, SourceDialer, TargetEndpoint, Tuning};
use ferry_appliance::ship::{ShipCommand, ShipStatus, Shipper};
use tokio::sync::{mpsc, oneshot, watch};

const DISK_BYTES: u64 = 16 << 20;

fn make_disk(path: &Path) {
    let mut bytes = vec![0u8; DISK_BYTES as usize];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in bytes[..(8 << 20)].chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

fn qemu_io(socket: &Path, commands: &[&str]) {
    let mut command = Command::new("qemu-io");
    command.args([
        "-f",
        "raw",
        &format!("nbd+unix:///web-1/os?socket={}", socket.display()),
    ]);
    for line in commands {
        command.args(["-c", line]);
    }
    let output = command.output().expect("qemu-io");
    assert!(
        output.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_export_reach_an_identical_replica() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let disk_path = root.join("web-1-os.raw");
    make_disk(&disk_path);
    let socket = root.join("web-1-os.sock");

    let (journal, _) = SharedJournal::open(MemSegments::new(8, 4 << 20)).unwrap();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let capture = Capture::start(
        CaptureConfig::new(
            root.join("state"),
            vec![DiskSpec {
                machine: "web-1".into(),
                name: "os".into(),
                disk_id: 1,
                path: disk_path.clone(),
                disk_options: DiskOptions::default(),
                initial_state: DiskState::Protected,
            }],
            vec![ListenerSpec {
                endpoint: Endpoint::Unix(socket.clone()),
                exports: vec!["web-1/os".into()],
            }],
        ),
        journal.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();

    let source_identity = Identity::load_or_create(&root.join("source-keys")).unwrap();
    let target_identity = Identity::load_or_create(&root.join("target-keys")).unwrap();
    let tuning = Tuning::default();
    let endpoint = TargetEndpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &target_identity,
        vec![Peer {
            name: "site-a".into(),
            fingerprint: source_identity.fingerprint,
        }],
        &tuning,
    )
    .unwrap();
    let target_address = endpoint.local_address();
    let store = ReplicaStore::new(root.join("storage"));
    let apply_status = ApplyStatus::default();
    let target_task = tokio::spawn(apply::serve(
        endpoint,
        store.clone(),
        apply_status.clone(),
        shutdown.clone(),
    ));

    let dialer = SourceDialer::new(
        target_address,
        &source_identity,
        target_identity.fingerprint,
        &tuning,
        None,
    )
    .unwrap();
    let ship_status = Arc::new(ShipStatus::default());
    let (commands_tx, commands) = mpsc::channel(4);
    let disks: Vec<_> = capture
        .disks()
        .iter()
        .map(|disk| (disk.clone(), "app".to_string()))
        .collect();
    let shipper = Shipper {
        machines: Vec::new(),
        source_name: "site-a".into(),
        control: ferry_appliance::ship::control::SourceControl::open(
            &root.join("state"),
            disks.clone(),
        )
        .unwrap(),
        disks,
        journal: journal.clone(),
        dialer,
        sync_dir: root.join("state/sync"),
        status: ship_status.clone(),
        commands,
        sequence_floor: Some(SequenceFloor::new(&root.join("state"))),
    };
    let ship_task = tokio::spawn(shipper.run(shutdown.clone()));

    // Writes while the initial replication runs, and after.
    let socket_for_writes = socket.clone();
    tokio::task::spawn_blocking(move || {
        qemu_io(
            &socket_for_writes,
            &[
                "write -P 0x11 0 64k",
                "write -P 0x22 4m 1m",
                "write -z 6m 512k",
                "discard 10m 1m",
                "write -P 0x33 15m 64k",
            ],
        )
    })
    .await
    .unwrap();
    let disk = capture.disks()[0].clone();
    wait_until(
        "initial replication and the writes to be acknowledged",
        || {
            disk.state() == DiskState::Protected
                && ship_status.acked_seq() >= journal.last_seq()
                && journal.last_seq() > 0
        },
    )
    .await;

    let (reply, answer) = oneshot::channel();
    commands_tx
        .send(ShipCommand::Verify {
            disk_ids: vec![1],
            reply,
        })
        .await
        .unwrap();
    let results = tokio::time::timeout(Duration::from_secs(60), answer)
        .await
        .expect("verify answers")
        .unwrap()
        .expect("verify runs");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].extents_differing, 0, "{results:?}");
    assert!(results[0].bytes_compared >= DISK_BYTES, "{results:?}");

    let replica = store.replica_path("site-a", "web-1", "os");
    let source_bytes = std::fs::read(&disk_path).unwrap();
    let replica_bytes = std::fs::read(&replica).unwrap();
    assert_eq!(source_bytes.len(), replica_bytes.len());
    assert!(
        source_bytes == replica_bytes,
        "replica differs from the source"
    );
    let replicas = apply_status.replicas();
    assert_eq!(replicas.len(), 1);
    assert!(replicas[0].applied_sequence >= ship_status.acked_seq());

    shutdown_tx.send(true).unwrap();
    ship_task.await.unwrap();
    target_task.await.unwrap();
    capture.wait().await.unwrap();
}
