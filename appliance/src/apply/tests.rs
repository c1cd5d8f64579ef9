//! Recovery points through the real apply path: the target state machine fed with encoded
//! frames, the executor writing replica files and undo logs, the recovery store recording
//! markers; then reads at each point through `DiskView`, live and after a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::catalog::RecoveryStore;
use super::executor::{Executor, ExecutorDisks};
use super::replica::{RbdStorage, Storage, TargetStorage};
use super::storage::{ReplicaRecord, ReplicaStore};
use super::{open_replicas, ExecutorOutput};
use crate::core::record::{Record, RecordKind, Seq};
use crate::core::recovery::{PointKind, PointMarker, PointSelector};
use crate::core::target::{Target, TargetEvent};
use crate::core::wire::{DiskAnnouncement, Frame};
use crate::io::rbd::test_cluster::TestCluster;

const SOURCE: &str = "site-a";
const DISK_BYTES: u64 = 1 << 20;

/// One apply session over a storage directory, driven the way `run_session` drives it.
struct Session {
    target: Target,
    executor: Executor,
    store: ReplicaStore,
}

impl Session {
    async fn open(store: &ReplicaStore, recovery: &Arc<RecoveryStore>) -> Session {
        Session::open_sized(store, recovery, DISK_BYTES).await
    }

    async fn open_sized(
        store: &ReplicaStore,
        recovery: &Arc<RecoveryStore>,
        disk_bytes: u64,
    ) -> Session {
        let applied = store.open_applied(SOURCE).unwrap();
        let mut target = Target::new(applied.seq());
        target.handle_connected();
        let disks = [DiskAnnouncement {
            disk_id: 1,
            size_bytes: disk_bytes,
            machine: "web-1".into(),
            name: "os".into(),
            group: "app".into(),
        }];
        target
            .handle_frame(Frame::hello(SOURCE, 1, 1000, &disks, &[]).as_bytes())
            .unwrap();
        let Some(TargetEvent::Hello { disks, .. }) = target.poll_event() else {
            panic!("no hello event");
        };
        let records: Vec<ReplicaRecord> = disks.iter().map(ReplicaRecord::from).collect();
        let (replicas, welcome) = open_replicas(recovery.storage(), SOURCE, &records)
            .await
            .unwrap();
        store.save_disks(SOURCE, &records).unwrap();
        let executor = Executor::spawn(
            SOURCE.into(),
            ExecutorDisks {
                replicas,
                records: records.iter().map(|r| (r.disk_id, r.clone())).collect(),
                recovery: recovery.clone(),
            },
            applied,
        );
        target.welcome(welcome);
        while target.poll_transmit().is_some() {}
        Session {
            target,
            executor,
            store: store.clone(),
        }
    }

    /// Feeds records and waits until the executor reports them durable.
    async fn apply(&mut self, records: &[Vec<u8>]) {
        self.feed(records).await;
        self.wait_durable().await;
    }

    /// Feeds records without waiting (the executor pipelines them).
    async fn feed(&mut self, records: &[Vec<u8>]) {
        self.target
            .handle_frame(Frame::records(records.iter().map(Vec::as_slice)).as_bytes())
            .unwrap();
        while let Some(op) = self.target.poll_disk_op() {
            assert!(self.executor.submit(op).await, "executor stopped");
        }
        while self.target.poll_marker().is_some() {}
        while self.target.poll_transmit().is_some() {}
    }

    async fn wait_durable(&mut self) {
        let wanted = self.target.received_seq();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.target.durable_seq() < wanted {
            let output = tokio::time::timeout_at(deadline.into(), self.executor.recv())
                .await
                .expect("durable in time")
                .expect("executor output");
            match output {
                ExecutorOutput::Durable(seq) => self.target.handle_durable(seq),
                other => panic!("unexpected executor output {other:?}"),
            }
        }
        while self.target.poll_transmit().is_some() {}
    }

    async fn close(self) {
        let applied = self.executor.finish().await;
        assert_eq!(
            applied.seq(),
            self.store.open_applied(SOURCE).unwrap().seq()
        );
    }
}

fn write(seq: Seq, offset: u64, data: &[u8]) -> Vec<u8> {
    Record {
        kind: RecordKind::Write,
        disk_id: 1,
        seq,
        offset,
        length: data.len() as u64,
        timestamp_ns: seq,
        payload: data,
    }
    .to_vec()
    .unwrap()
}

fn zero(seq: Seq, offset: u64, length: u64) -> Vec<u8> {
    Record {
        kind: RecordKind::Zero,
        disk_id: 1,
        seq,
        offset,
        length,
        timestamp_ns: seq,
        payload: &[],
    }
    .to_vec()
    .unwrap()
}

fn marker(seq: Seq, point_id: u64) -> Vec<u8> {
    let payload = PointMarker {
        group: "app".into(),
        point_id,
        time_unix_ms: point_id,
        kind: PointKind::Crash,
        consistent: true,
        members: vec![SOURCE.into()],
        disk_ids: vec![1],
        retention_ms: 0,
    }
    .encode();
    Record {
        kind: RecordKind::Marker,
        disk_id: 0,
        seq,
        offset: 0,
        length: payload.len() as u64,
        timestamp_ns: seq,
        payload: &payload,
    }
    .to_vec()
    .unwrap()
}

fn pattern(fill: u8, length: usize) -> Vec<u8> {
    (0..length)
        .map(|i| fill.wrapping_add((i / 512) as u8))
        .collect()
}

/// The model of the replica: the bytes every write leaves.
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
}

async fn read_point(recovery: &RecoveryStore, id: u64) -> Vec<u8> {
    let views = recovery.view("app", PointSelector::Id(id)).unwrap();
    assert_eq!(views.len(), 1);
    let view = &views[0];
    assert_eq!(
        (view.machine.as_str(), view.name.as_str(), view.size_bytes),
        ("web-1", "os", DISK_BYTES)
    );
    // Odd-sized reads across piece boundaries, stitched together.
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < DISK_BYTES {
        let length = (DISK_BYTES - offset).min(100_000);
        out.extend(view.read_at(offset, length).await.unwrap());
        offset += length;
    }
    // The blocking read path gives the same bytes.
    let mut blocking = vec![0u8; DISK_BYTES as usize];
    for (index, chunk) in blocking.chunks_mut(70_000).enumerate() {
        view.read_into(index as u64 * 70_000, chunk).unwrap();
    }
    assert!(blocking == out, "read_into and read_at differ");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_read_back_live_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::new(dir.path());
    let recovery = RecoveryStore::open(store.clone(), None).unwrap();
    let mut model = Model(vec![0; DISK_BYTES as usize]);
    let mut session = Session::open(&store, &recovery).await;

    // Before the first point nothing is saved: initial replication pays nothing.
    let a = pattern(0xA0, DISK_BYTES as usize);
    session.apply(&[write(1, 0, &a)]).await;
    model.write(0, &a);
    assert!(!store
        .replica_path(SOURCE, "web-1", "os")
        .with_extension("undo")
        .exists());
    session.apply(&[marker(2, 1000)]).await;
    let at_p1 = model.0.clone();

    // Writes after P1: unaligned, overlapping, a zero range, the same block twice.
    let b1 = pattern(0xB0, 10_000);
    let b2 = pattern(0xB8, 70_000);
    session
        .apply(&[
            write(3, 1000, &b1),
            write(4, 5000, &b2),
            zero(5, 300_000, 50_000),
        ])
        .await;
    model.write(1000, &b1);
    model.write(5000, &b2);
    model.write(300_000, &vec![0; 50_000]);
    let b3 = pattern(0xBF, 4096);
    session.apply(&[write(6, 8192, &b3)]).await;
    model.write(8192, &b3);
    session.apply(&[marker(7, 2000)]).await;
    let at_p2 = model.0.clone();

    let points = recovery.list("app").unwrap();
    assert_eq!(
        points.iter().map(|p| p.id).collect::<Vec<_>>(),
        [1000, 2000]
    );
    assert!(points.iter().all(|p| p.usable), "{points:?}");
    assert_eq!(read_point(&recovery, 1000).await, at_p1);
    assert_eq!(read_point(&recovery, 2000).await, at_p2);

    // A view stays at its point while replication goes on.
    let live = recovery.view("app", PointSelector::Id(1000)).unwrap();
    let c = pattern(0xC0, DISK_BYTES as usize / 2);
    session
        .apply(&[write(8, DISK_BYTES / 4, &c), write(9, 0, &b1)])
        .await;
    model.write(DISK_BYTES / 4, &c);
    model.write(0, &b1);
    assert_eq!(
        live[0].read_at(0, DISK_BYTES).await.unwrap(),
        at_p1,
        "live view leaked newer data"
    );
    assert_eq!(read_point(&recovery, 2000).await, at_p2);
    // The replica itself is the latest state.
    session.close().await;
    drop(live);
    assert_eq!(
        std::fs::read(store.replica_path(SOURCE, "web-1", "os")).unwrap(),
        model.0
    );
    drop(recovery);

    // Restart: the catalog and the undo logs are read back from storage.
    let recovery = RecoveryStore::open(store.clone(), Some(1)).unwrap();
    assert_eq!(read_point(&recovery, 1000).await, at_p1);
    assert_eq!(read_point(&recovery, 2000).await, at_p2);
    assert_eq!(
        recovery.view("app", PointSelector::Latest).unwrap()[0]
            .point
            .id,
        2000
    );

    // A resumed session keeps saving (saving is on for the disk since P1).
    let mut session = Session::open(&store, &recovery).await;
    let d = pattern(0xD0, 8192);
    session.apply(&[write(10, 4096, &d)]).await;
    model.write(4096, &d);
    assert_eq!(read_point(&recovery, 2000).await, at_p2);

    // Pruning: a pinned point stays, the newest usable point stays.
    recovery.pin("app", 1000).unwrap();
    let report = recovery.prune(u64::MAX / 2).unwrap();
    assert!(report.points_removed.is_empty(), "{report:?}");
    recovery.unpin("app", 1000);
    let report = recovery.prune(u64::MAX / 2).unwrap();
    assert_eq!(
        report
            .points_removed
            .iter()
            .map(|p| p.id)
            .collect::<Vec<_>>(),
        [1000]
    );
    assert!(recovery.view("app", PointSelector::Id(1000)).is_err());
    assert_eq!(read_point(&recovery, 2000).await, at_p2);
    session.close().await;
    let recovery = RecoveryStore::open(store.clone(), None).unwrap();
    assert_eq!(
        recovery
            .list("app")
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect::<Vec<_>>(),
        [2000]
    );
    assert_eq!(read_point(&recovery, 2000).await, at_p2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reapply_after_a_crash_keeps_the_first_before_images() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::new(dir.path());
    let recovery = RecoveryStore::open(store.clone(), None).unwrap();
    let a = pattern(0xA0, 64 << 10);
    let b = pattern(0xB0, 64 << 10);
    let c = pattern(0xC0, 64 << 10);
    let records = [
        write(1, 0, &a),
        marker(2, 1000),
        write(3, 4096, &b),
        marker(4, 2000),
        write(5, 2048, &c),
    ];
    let mut session = Session::open(&store, &recovery).await;
    session.apply(&records).await;
    session.close().await;
    let mut model = Model(vec![0; DISK_BYTES as usize]);
    model.write(0, &a);
    let at_p1 = model.0.clone();
    model.write(4096, &b);
    let at_p2 = model.0.clone();
    drop(recovery);

    // As if the applied sequence had last been persisted at the first marker: the source
    // resends 3..5 over a replica that already holds them, and the new before-images (read from
    // the newer replica) come after the first ones in the log.
    store.open_applied(SOURCE).unwrap().store(2).unwrap();
    let recovery = RecoveryStore::open(store.clone(), None).unwrap();
    let mut session = Session::open(&store, &recovery).await;
    session.apply(&records[2..]).await;
    session.close().await;
    assert_eq!(read_point(&recovery, 1000).await, at_p1);
    assert_eq!(read_point(&recovery, 2000).await, at_p2);
}

/// Apply throughput of 64 KiB random writes without recovery points and with a point cut
/// before them (every first write to a block then saves a before-image). The size comes from
/// `FERRY_APPLY_BENCH_MIB` (default 8: a quick check in debug builds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_throughput_with_and_without_points() {
    let total_mib: u64 = std::env::var("FERRY_APPLY_BENCH_MIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(8);
    let disk_bytes: u64 = (total_mib.max(8) << 20) * 2;
    let write_bytes = 64usize << 10;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("apply_throughput seed {seed}");
    let mut figures = Vec::new();
    for with_points in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::new(dir.path());
        let recovery = RecoveryStore::open(store.clone(), None).unwrap();
        let mut session = Session::open_sized(&store, &recovery, disk_bytes).await;
        // Warm the replica file (thin-provisioned storage is slower on a first pass).
        let fill = pattern(0x11, 1 << 20);
        let mut seq = 0;
        for chunk in 0..disk_bytes >> 20 {
            seq += 1;
            session.feed(&[write(seq, chunk << 20, &fill)]).await;
        }
        if with_points {
            seq += 1;
            session.feed(&[marker(seq, 1000)]).await;
        }
        session.wait_durable().await;
        let mut state = seed;
        let data = pattern(0x77, write_bytes);
        let count = (total_mib << 20) / write_bytes as u64;
        let started = Instant::now();
        let mut batch = Vec::new();
        for _ in 0..count {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let slot = state % (disk_bytes / write_bytes as u64);
            seq += 1;
            batch.push(write(seq, slot * write_bytes as u64, &data));
            if batch.len() == 16 {
                session.feed(&batch).await;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            session.feed(&batch).await;
        }
        session.wait_durable().await;
        let elapsed = started.elapsed();
        let mb_per_s = (count * write_bytes as u64) as f64 / elapsed.as_secs_f64() / 1e6;
        figures.push(mb_per_s);
        eprintln!(
            "apply of {total_mib} MiB in 64 KiB random writes, points {}: {:.0} MB/s ({:.2} s)",
            if with_points { "on" } else { "off" },
            mb_per_s,
            elapsed.as_secs_f64()
        );
        if with_points {
            // Everything written after the point reads back as the warm-up fill.
            let views = recovery.view("app", PointSelector::Id(1000)).unwrap();
            let head = views[0].read_at(0, 1 << 20).await.unwrap();
            assert_eq!(head, fill);
        }
        session.close().await;
    }
    eprintln!(
        "apply throughput with points / without: {:.2}",
        figures[1] / figures[0]
    );
}

/// Random overlapping writes, zeroes and markers streamed without waiting (the executor holds,
/// saves and issues them concurrently): every point reads back as the model at its marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_streams_read_back_at_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::new(dir.path());
    let recovery = RecoveryStore::open(store.clone(), None).unwrap();
    random_streams(&store, &recovery).await;
}

/// The same stream into an RBD image (a real one-node cluster): before-images are read from
/// the image; then retention keeps the pinned and the newest point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_streams_read_back_at_every_point_on_rbd() {
    let cluster = TestCluster::start();
    let options = cluster.options();
    let rbd = tokio::task::spawn_blocking(move || RbdStorage::connect(&options, "rbd", "t."))
        .await
        .unwrap()
        .expect("connect to the test cluster");
    let dir = tempfile::tempdir().unwrap();
    let store = ReplicaStore::new(dir.path());
    let recovery =
        RecoveryStore::open_with_storage(store.clone(), Storage::Rbd(rbd.clone()), None).unwrap();
    let ids = random_streams(&store, &recovery).await;
    assert!(ids.len() >= 3, "too few points to prune: {ids:?}");

    // Retention: every point is past it; the pinned one and the newest stay and still read
    // back, their before-images read from the local undo log over the image.
    let pinned = ids[1];
    recovery.pin("app", pinned).unwrap();
    let report = tokio::task::spawn_blocking({
        let recovery = recovery.clone();
        move || recovery.prune(u64::MAX / 2)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(report.points_removed.len(), ids.len() - 2, "{report:?}");
    let kept: Vec<u64> = recovery.list("app").unwrap().iter().map(|p| p.id).collect();
    assert_eq!(kept, [pinned, *ids.last().unwrap()]);
    for id in kept {
        read_point(&recovery, id).await;
    }
}

/// Streams random overlapping writes, zeroes and markers; checks every point and the replica
/// against the model; returns the point ids, oldest first.
async fn random_streams(store: &ReplicaStore, recovery: &Arc<RecoveryStore>) -> Vec<u64> {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("random_streams seed {seed} (FERRY_SEED reruns it)");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let store = store.clone();
    let recovery = recovery.clone();
    let mut session = Session::open(&store, &recovery).await;
    let mut model = Model(vec![0; DISK_BYTES as usize]);
    let mut snapshots = Vec::new();
    let mut seq = 0;
    let mut batch = Vec::new();
    let mut previous_end: Option<u64> = None;
    for _ in 0..400 {
        seq += 1;
        let roll = rng.gen_range(0..100);
        if roll < 8 {
            let id = 1000 + seq;
            batch.push(marker(seq, id));
            snapshots.push((id, model.0.clone()));
        } else {
            // Writes cluster in the first 128 KiB so that they overlap often.
            let span = if rng.gen_bool(0.7) {
                128 << 10
            } else {
                DISK_BYTES
            };
            // Some writes continue the previous one (the executor merges contiguous writes
            // queued together on RBD).
            let (offset, limit) = match previous_end {
                Some(end) if end < DISK_BYTES - 1 && rng.gen_bool(0.3) => (end, DISK_BYTES),
                _ => {
                    let offset = rng.gen_range(0..span - 1);
                    (offset, span)
                }
            };
            let length = rng.gen_range(1..=(limit - offset).min(20_000));
            previous_end = Some(offset + length);
            if roll < 18 {
                batch.push(zero(seq, offset, length));
                model.write(offset, &vec![0; length as usize]);
            } else {
                let data = pattern(rng.gen(), length as usize);
                batch.push(write(seq, offset, &data));
                model.write(offset, &data);
            }
        }
        if batch.len() >= rng.gen_range(1..12) {
            session.feed(&batch).await;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        session.feed(&batch).await;
    }
    session.wait_durable().await;
    for (id, expected) in &snapshots {
        assert!(
            read_point(&recovery, *id).await == *expected,
            "point {id} differs (seed {seed})"
        );
    }
    session.close().await;
    let (replica, existed) = recovery
        .storage()
        .open_replica(SOURCE, "web-1", "os", DISK_BYTES)
        .unwrap();
    assert!(existed);
    let (result, bytes) = replica
        .read_at(0, crate::io::disk::IoBuf::zeroed(DISK_BYTES as usize))
        .await;
    result.unwrap();
    assert!(bytes.to_vec() == model.0, "replica differs (seed {seed})");
    snapshots.iter().map(|(id, _)| *id).collect()
}
