//! Ship and apply in one process over real parts: a capture export on a unix socket written by
//! qemu-io, the cache journal, the shipper dialing a target endpoint over QUIC with pinned
//! mutual TLS on loopback, and the apply side writing a replica file. The replica must end
//! byte-identical to the source disk, and verify must say so.

use std::sync::Arc;
use std::time::Duration;

use ferry_appliance::apply::{self, ApplyStatus, ReplicaStore};
use ferry_appliance::control::DiskState;
use ferry_appliance::daemon::running::SequenceFloor;
use ferry_appliance::ship::{ShipCommand, ShipStatus, Shipper};
use tokio::sync::{mpsc, oneshot};

mod support;

use support::{qemu_io, start_parts, wait_until, Parts, DISK_BYTES};

/// A source appliance (capture export, journal, shipper) and a target (apply) in this process.
struct Pair {
    dir: tempfile::TempDir,
    parts: Parts,
    ship_status: Arc<ShipStatus>,
    commands_tx: mpsc::Sender<ShipCommand>,
    store: ReplicaStore,
    apply_status: ApplyStatus,
    ship_task: tokio::task::JoinHandle<()>,
    target_task: tokio::task::JoinHandle<()>,
}

impl Pair {
    /// `floor_step`: how far ahead the sequence floor is kept (the daemon's step by default).
    async fn start(floor_step: Option<u64>) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (parts, endpoint, dialer) = start_parts(root).await;
        let store = ReplicaStore::new(root.join("storage"));
        let apply_status = ApplyStatus::default();
        let target_task = tokio::spawn(apply::serve(
            endpoint,
            store.clone(),
            apply_status.clone(),
            parts.shutdown.clone(),
        ));

        let ship_status = Arc::new(ShipStatus::default());
        let (commands_tx, commands) = mpsc::channel(4);
        let sequence_floor = match floor_step {
            Some(step) => SequenceFloor::with_step(&parts.state, step),
            None => SequenceFloor::new(&parts.state),
        };
        let shipper = Shipper {
            machines: Vec::new(),
            source_name: "site-a".into(),
            control: ferry_appliance::ship::control::SourceControl::open(
                &parts.state,
                parts.disks.clone(),
            )
            .unwrap(),
            disks: parts.disks.clone(),
            journal: parts.journal.clone(),
            dialer,
            sync_dir: parts.state.join("sync"),
            status: ship_status.clone(),
            commands,
            sequence_floor: Some(sequence_floor),
        };
        let ship_task = tokio::spawn(shipper.run(parts.shutdown.clone()));
        Pair {
            dir,
            parts,
            ship_status,
            commands_tx,
            store,
            apply_status,
            ship_task,
            target_task,
        }
    }

    async fn write(&self, commands: &[&str]) {
        let socket = self.parts.socket.clone();
        let commands: Vec<String> = commands.iter().map(|line| line.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let lines: Vec<&str> = commands.iter().map(String::as_str).collect();
            qemu_io(&socket, &lines)
        })
        .await
        .unwrap();
    }

    /// Waits until the disk is protected and the target acknowledged everything journaled.
    async fn wait_caught_up(&self, what: &str) {
        let disk = self.parts.capture.disks()[0].clone();
        wait_until(what, || {
            disk.state() == DiskState::Protected
                && self.ship_status.acked_seq() >= self.parts.journal.last_seq()
                && self.parts.journal.last_seq() > 0
        })
        .await;
    }

    fn assert_identical(&self) {
        let replica = self.store.replica_path("site-a", "web-1", "os");
        let source_bytes = std::fs::read(&self.parts.disk_path).unwrap();
        let replica_bytes = std::fs::read(&replica).unwrap();
        assert_eq!(source_bytes.len(), replica_bytes.len());
        assert!(
            source_bytes == replica_bytes,
            "replica differs from the source"
        );
    }

    async fn stop(self) {
        self.parts.shutdown_tx.send(true).unwrap();
        self.ship_task.await.unwrap();
        self.target_task.await.unwrap();
        self.parts.capture.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_export_reach_an_identical_replica() {
    let pair = Pair::start(None).await;
    // Writes while the initial replication runs, and after.
    pair.write(&[
        "write -P 0x11 0 64k",
        "write -P 0x22 4m 1m",
        "write -z 6m 512k",
        "discard 10m 1m",
        "write -P 0x33 15m 64k",
    ])
    .await;
    pair.wait_caught_up("initial replication and the writes to be acknowledged")
        .await;

    let (reply, answer) = oneshot::channel();
    pair.commands_tx
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

    pair.assert_identical();
    let replicas = pair.apply_status.replicas();
    assert_eq!(replicas.len(), 1);
    assert!(replicas[0].applied_sequence >= pair.ship_status.acked_seq());
    pair.stop().await;
}

/// A sequence floor that cannot be written holds shipping at the floor already written: the
/// records past it are neither durable nor covered by a floor, so a host going down could
/// lose them after the target took them. The link stays up and says why it waits, and once
/// the floor can be written again shipping goes on and the replica catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_floor_that_cannot_be_written_holds_shipping_and_keeps_the_link() {
    let pair = Pair::start(Some(8)).await;
    pair.write(&["write -P 0x11 0 64k"]).await;
    pair.wait_caught_up("initial replication").await;
    let state = pair.dir.path().join("state");
    let floor_file = SequenceFloor::new(&state);
    // The floor is written aside first: a directory there makes every write fail.
    let blocker = state.join("sequence-floor.new");
    std::fs::create_dir(&blocker).unwrap();
    let writes: Vec<String> = (0..16)
        .map(|index| format!("write -P {} {}k 4k", index + 1, 1024 + index * 64))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    pair.write(&writes).await;
    // (A raise already under way when the directory appeared may still have moved it once.)
    wait_until("shipping to wait at the floor, saying why", || {
        let floor = floor_file.load().unwrap();
        pair.parts.journal.last_seq() > floor
            && pair.ship_status.acked_seq() == floor
            && pair
                .ship_status
                .last_error()
                .is_some_and(|error| error.contains("shipping waits at sequence"))
    })
    .await;
    let floor = floor_file.load().unwrap();
    let error = pair.ship_status.last_error().unwrap();
    assert!(error.contains("sequence-floor"), "{error}");
    assert!(pair.ship_status.connected(), "the link stays up");
    assert_eq!(
        pair.ship_status.acked_seq(),
        floor,
        "nothing shipped past the floor"
    );
    assert_eq!(pair.ship_status.sequence_floor(), Some(floor));

    std::fs::remove_dir(&blocker).unwrap();
    pair.wait_caught_up("shipping to go on once the floor is written")
        .await;
    let raised = floor_file.load().unwrap();
    assert!(raised > pair.parts.journal.last_seq());
    assert_eq!(pair.ship_status.sequence_floor(), Some(raised));
    wait_until("the error to clear", || {
        pair.ship_status.last_error().is_none()
    })
    .await;
    pair.assert_identical();
    pair.stop().await;
}
