//! The control plane between a target and its source over the connection the source dialed:
//! the target's failed-over groups fence the source's disks (NBD writes refused, READ_ONLY for
//! new connections, state `failed-over`, persisted), a planned failover request fences, cuts and
//! drains, a reprotect pulls the failed-over disk back into the source's disk (hash compare,
//! then dirty rounds), and a failback request lifts the fence and resyncs the disk to the
//! target.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_appliance::apply::peer::{
    DirtyFuture, PlannedPoint, ReadFuture, ReprotectDisk, ReprotectDisks,
};
use ferry_appliance::apply::{self, ApplyStatus, PeerControl, ReplicaStore, SettingsMapping};
use ferry_appliance::control::DiskState;
use ferry_appliance::daemon::running::SequenceFloor;
use ferry_appliance::ship::control::{load_fenced_groups, SourceControl};
use ferry_appliance::ship::{ShipStatus, Shipper};
use tokio::sync::mpsc;

mod support;

use support::{qemu_io, qemu_io_output, qemu_io_with, start_parts, wait_until, Parts, DISK_BYTES};

/// Test double of a failed-over disk (the failover's overlay disk in production): bytes in
/// memory and the ranges written since the last `take_dirty`.
struct MemDisk {
    bytes: Mutex<Vec<u8>>,
    dirty: Mutex<Vec<(u64, u64)>>,
}

impl MemDisk {
    fn write(&self, offset: u64, data: &[u8]) {
        self.bytes.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(data);
        self.dirty.lock().unwrap().push((offset, data.len() as u64));
    }
}

impl ReprotectDisk for MemDisk {
    fn size_bytes(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_at(&self, offset: u64, length: u64) -> ReadFuture<'_> {
        let bytes =
            self.bytes.lock().unwrap()[offset as usize..(offset + length) as usize].to_vec();
        Box::pin(async move { Ok(bytes) })
    }
    fn take_dirty(&self) -> DirtyFuture<'_> {
        let mut ranges = std::mem::take(&mut *self.dirty.lock().unwrap());
        ranges.sort_unstable();
        Box::pin(async move { Ok(ranges) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_fences_plans_and_unfences_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (parts, endpoint, dialer) = start_parts(root).await;
    let Parts {
        disk_path,
        socket,
        state,
        journal,
        shutdown_tx,
        shutdown,
        capture,
        disks,
    } = parts;
    let store = ReplicaStore::new(root.join("storage"));
    let peers = PeerControl::new();
    let target_task = tokio::spawn(apply::serve_mapped(
        endpoint,
        store.clone(),
        ApplyStatus::default(),
        SettingsMapping::default(),
        peers.clone(),
        shutdown.clone(),
    ));

    let ship_status = Arc::new(ShipStatus::default());
    let (_commands_tx, commands) = mpsc::channel(4);
    let control = SourceControl::open(&state, disks.clone()).unwrap();
    // Test double of the recovery-point cutter: the "final point" is everything journaled so
    // far, which is what the drain must then see acknowledged.
    let cut_journal = journal.clone();
    control.set_cutter(Arc::new(move |_group| {
        let seq = cut_journal.last_seq();
        Box::pin(async move { Ok((7, seq)) })
    }));
    let shipper = Shipper {
        machines: Vec::new(),
        source_name: "site-a".into(),
        disks,
        journal: journal.clone(),
        dialer,
        sync_dir: state.join("sync"),
        status: ship_status.clone(),
        commands,
        control: control.clone(),
        sequence_floor: Some(SequenceFloor::new(&state)),
    };
    let ship_task = tokio::spawn(shipper.run(shutdown.clone()));

    let disk = capture.disks()[0].clone();
    qemu_io(&socket, &["write -P 0x11 0 64k"]);
    wait_until("the initial replication and the first write", || {
        disk.state() == DiskState::Protected
            && ship_status.acked_seq() >= journal.last_seq()
            && peers.sources_of_group("app") == ["site-a"]
    })
    .await;

    // An unplanned failover at the target: the connected source is told and fences.
    peers.set_failed_over("app", true);
    wait_until("the source to fence the group", || {
        disk.state() == DiskState::FailedOver
    })
    .await;
    assert_eq!(
        load_fenced_groups(&state)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        ["app"]
    );
    let refused = qemu_io_output(&socket, &["write -P 0x99 0 4k"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        !refused.status.success() || said.contains("failed") || said.contains("read-only"),
        "a write to a fenced export went through: {said}"
    );
    assert_eq!(std::fs::read(&disk_path).unwrap()[..4096], [0x11; 4096]);
    let read = qemu_io_with(&socket, &["-r"], &["read -P 0x11 0 64k"]);
    assert!(
        read.status.success() && !String::from_utf8_lossy(&read.stdout).contains("fail"),
        "a fenced export still reads: {read:?}"
    );

    // Reprotect: the failed-over machine wrote at the target; the source pulls it back.
    let replica_path = store.replica_path("site-a", "web-1", "os");
    let failed_over = Arc::new(MemDisk {
        bytes: Mutex::new(std::fs::read(&replica_path).unwrap()),
        dirty: Mutex::new(Vec::new()),
    });
    failed_over.write(2 << 20, &[0xab; 8192]);
    let mut served = ReprotectDisks::new();
    served.insert(
        ("site-a".into(), "web-1".into(), "os".into()),
        failed_over.clone() as Arc<dyn ReprotectDisk>,
    );
    peers.serve_reprotect("app", served);
    let pulled = peers
        .start_reprotect("app", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(pulled, ["web-1/os"]);
    failed_over.write(5 << 20, &[0xcd; 4096]);
    let totals = peers
        .finish_reprotect("app", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(totals.extents_compared, DISK_BYTES >> 20, "{totals:?}");
    assert!(
        totals.bytes_copied >= 8192 + 4096 && totals.bytes_copied <= 3 << 20,
        "only differing extents travel: {totals:?}"
    );
    let source_bytes = std::fs::read(&disk_path).unwrap();
    assert!(
        source_bytes == *failed_over.bytes.lock().unwrap(),
        "the source disk does not hold the failed-over data"
    );
    peers.stop_reprotect("app");

    // Failback: the target gives production back; the source resyncs and is writable again.
    peers.set_failed_over("app", false);
    let unfenced = peers
        .unfence_sources("app", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(unfenced, ["web-1/os"]);
    assert!(load_fenced_groups(&state).unwrap().is_empty());
    wait_until("the resync after failback", || {
        disk.state() == DiskState::Protected
    })
    .await;
    assert!(
        std::fs::read(&replica_path).unwrap() == std::fs::read(&disk_path).unwrap(),
        "the replica was not resynced to the reprotected source disk"
    );
    qemu_io(&socket, &["write -P 0x22 1m 64k"]);

    // Planned failover: fenced, "cut", drained, answered with the final point.
    let planned = peers
        .prepare_planned_failover("app", Duration::from_secs(60))
        .await
        .unwrap();
    let PlannedPoint {
        source,
        point_id,
        marker_seq,
    } = planned;
    assert_eq!((source.as_str(), point_id), ("site-a", 7));
    assert!(marker_seq >= 2, "the second write precedes the final point");
    assert!(ship_status.acked_seq() >= marker_seq);
    assert_eq!(disk.state(), DiskState::FailedOver);
    let replica = std::fs::read(store.replica_path("site-a", "web-1", "os")).unwrap();
    assert_eq!(replica[1 << 20..(1 << 20) + 65536], [0x22; 65536]);

    shutdown_tx.send(true).unwrap();
    ship_task.await.unwrap();
    target_task.await.unwrap();
    capture.wait().await.unwrap();

    // A restart keeps the fence: the fenced groups are on disk.
    let reopened = SourceControl::open(&state, Vec::new()).unwrap();
    assert_eq!(reopened.fenced_groups(), ["app"]);
}
