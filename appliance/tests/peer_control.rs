//! The control plane between a target and its source over the connection the source dialed:
//! the target's failed-over groups fence the source's disks (NBD writes refused, READ_ONLY for
//! new connections, state `failed-over`, persisted), a planned failover request fences, cuts and
//! drains, a reprotect pulls the failed-over disk back into the source's disk (hash compare,
//! then dirty rounds), and a failback request lifts the fence and resyncs the disk to the
//! target.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_appliance::apply::peer::{
    DirtyFuture, PlannedPoint, ReadFuture, ReprotectDisk, ReprotectDisks,
};
use ferry_appliance::apply::{self, ApplyStatus, PeerControl, ReplicaStore, SettingsMapping};
use ferry_appliance::capture::journal_handle::SharedJournal;
use ferry_appliance::capture::{Capture, CaptureConfig, DiskSpec, Endpoint, ListenerSpec};
use ferry_appliance::control::DiskState;
use ferry_appliance::core::journal_mem::MemSegments;
use ferry_appliance::daemon::running::SequenceFloor;
use ferry_appliance::io::disk::DiskOptions;
use ferry_appliance::io::transport::{Identity, Peer, SourceDialer, TargetEndpoint, Tuning};
use ferry_appliance::ship::control::{load_fenced_groups, SourceControl};
use ferry_appliance::ship::{ShipStatus, Shipper};
use tokio::sync::{mpsc, watch};

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
    let output = qemu_io_output(socket, commands);
    assert!(
        output.status.success() && !String::from_utf8_lossy(&output.stdout).contains("failed"),
        "qemu-io: {} {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn qemu_io_output(socket: &Path, commands: &[&str]) -> std::process::Output {
    qemu_io_with(socket, &[], commands)
}

fn qemu_io_with(socket: &Path, options: &[&str], commands: &[&str]) -> std::process::Output {
    let mut command = Command::new("qemu-io");
    command.args(options);
    command.args([
        "-f",
        "raw",
        &format!("nbd+unix:///web-1/os?socket={}", socket.display()),
    ]);
    for line in commands {
        command.args(["-c", line]);
    }
    command.output().expect("qemu-io")
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
    let disk_path = root.join("web-1-os.raw");
    make_disk(&disk_path);
    let socket = root.join("web-1-os.sock");
    let state = root.join("state");
    std::fs::create_dir_all(&state).unwrap();

    let (journal, _) = SharedJournal::open(MemSegments::new(8, 4 << 20)).unwrap();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let capture = Capture::start(
        CaptureConfig::new(
            state.clone(),
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
    let peers = PeerControl::new();
    let target_task = tokio::spawn(apply::serve_mapped(
        endpoint,
        store.clone(),
        ApplyStatus::default(),
        SettingsMapping::default(),
        peers.clone(),
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
    let (_commands_tx, commands) = mpsc::channel(4);
    let disks: Vec<_> = capture
        .disks()
        .iter()
        .map(|disk| (disk.clone(), "app".to_string()))
        .collect();
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
