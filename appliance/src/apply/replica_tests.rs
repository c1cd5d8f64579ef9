//! The target-storage conformance suite: the same cases against every backend, only the
//! constructor differs (local files in a temp dir; RBD images in a real one-node cluster).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::apply::storage::ReplicaStore;
use crate::io::rbd::test_cluster::TestCluster;

const MIB: u64 = 1 << 20;
/// Spans several 4 MiB RBD objects.
const SIZE: u64 = 16 * MIB;

async fn read(replica: &Replica, offset: u64, len: usize) -> Vec<u8> {
    let (result, buf) = replica.read_at(offset, IoBuf::zeroed(len)).await;
    result.unwrap_or_else(|error| panic!("read {offset}+{len}: {error}"));
    buf.to_vec()
}

async fn write(replica: &Replica, offset: u64, bytes: &[u8]) {
    let (result, _) = replica.write_at(offset, IoBuf::from_slice(bytes)).await;
    result.unwrap_or_else(|error| panic!("write {offset}+{}: {error}", bytes.len()));
}

/// Every case, in order, against one storage. `backend` names it in failure messages.
async fn conformance(storage: &dyn TargetStorage, backend: &str) {
    // A new replica exists, has the announced size and reads as zeroes.
    let (replica, existed) = storage.open_replica("src", "vm1", "root", SIZE).unwrap();
    assert!(!existed, "{backend}: a new replica reported as existing");
    assert_eq!(replica.size(), SIZE);
    assert!(read(&replica, SIZE - MIB, MIB as usize)
        .await
        .iter()
        .all(|&b| b == 0));

    // Seeded random writes and zero ranges (sector-aligned and not, inside one object and
    // across object boundaries) against an in-memory model; then everything must match.
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for step in 0..120u32 {
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..600u64),
            1 => 4096,
            2 => rng.gen_range(1..64) * 4096,
            _ => rng.gen_range(1..(2 * MIB)),
        };
        let near_boundary = rng.gen_bool(0.3);
        let offset = if near_boundary {
            let object = rng.gen_range(1..SIZE / (4 * MIB)) * 4 * MIB;
            object.saturating_sub(rng.gen_range(0..len.max(2)))
        } else {
            rng.gen_range(0..SIZE)
        }
        .min(SIZE - len);
        let range = offset as usize..(offset + len) as usize;
        if rng.gen_bool(0.3) {
            replica
                .write_zeroes(offset, len)
                .await
                .unwrap_or_else(|e| panic!("{backend} step {step}: {e}"));
            model[range].fill(0);
        } else {
            let fill = (step % 250) as u8 + 1;
            write(&replica, offset, &vec![fill; len as usize]).await;
            model[range].fill(fill);
        }
    }
    replica.flush().await.unwrap();
    let contents = read(&replica, 0, SIZE as usize).await;
    let first_difference = contents.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(
        first_difference, None,
        "{backend}: replica differs from the model"
    );

    // A small zero range inside data zeroes exactly that range.
    write(&replica, 5 * MIB, &[0xab; 65536]).await;
    replica.write_zeroes(5 * MIB + 100, 300).await.unwrap();
    let around = read(&replica, 5 * MIB, 1024).await;
    assert!(around[..100].iter().all(|&b| b == 0xab), "{backend}");
    assert!(around[100..400].iter().all(|&b| b == 0), "{backend}");
    assert!(around[400..].iter().all(|&b| b == 0xab), "{backend}");
    model[5 * MIB as usize..5 * MIB as usize + 65536].fill(0xab);
    model[5 * MIB as usize + 100..5 * MIB as usize + 400].fill(0);

    // Concurrent writes to disjoint ranges all land.
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..32u64 {
        let replica = replica.clone();
        writes.spawn(async move {
            let offset = 8 * MIB + i * 20_000;
            let (result, _) = replica
                .write_at(offset, IoBuf::from_slice(&[i as u8 + 7; 16_384]))
                .await;
            result.map(|()| offset)
        });
    }
    while let Some(done) = writes.join_next().await {
        let offset = done.unwrap().unwrap() as usize;
        let i = (offset - 8 * MIB as usize) / 20_000;
        model[offset..offset + 16_384].fill(i as u8 + 7);
    }
    replica.flush().await.unwrap();

    // Outside [0, size) fails and names the replica.
    let (result, _) = replica.write_at(SIZE - 10, IoBuf::zeroed(20)).await;
    let error = result.expect_err("write past the end");
    assert!(
        error.to_string().contains(&replica.location()),
        "{backend}: {error}"
    );
    let (result, _) = replica.read_at(SIZE, IoBuf::zeroed(1)).await;
    assert!(result.is_err(), "{backend}: read past the end");
    assert!(
        replica.write_zeroes(SIZE - 1, 2).await.is_err(),
        "{backend}"
    );

    // Another disk of the same machine is a different replica; a hostile name stays a name.
    let (other, existed) = storage
        .open_replica("src", "vm1", "../../data", MIB)
        .unwrap();
    assert!(!existed);
    assert_ne!(other.location(), replica.location());
    assert!(read(&other, 0, MIB as usize).await.iter().all(|&b| b == 0));
    write(&other, 0, &[1; 4096]).await;
    other.flush().await.unwrap();
    drop(other);

    // Reopened: it existed, and holds what was written.
    drop(replica);
    let (replica, existed) = storage.open_replica("src", "vm1", "root", SIZE).unwrap();
    assert!(existed, "{backend}: a reopened replica reported as new");
    assert!(
        read(&replica, 0, SIZE as usize).await == model,
        "{backend}: contents lost across reopen"
    );
    drop(replica);

    // A larger announced size grows it (old data kept, tail zero); a smaller one is refused.
    let (replica, _) = storage
        .open_replica("src", "vm1", "root", SIZE + 4 * MIB)
        .unwrap();
    assert_eq!(replica.size(), SIZE + 4 * MIB);
    assert!(read(&replica, 5 * MIB, 100)
        .await
        .iter()
        .all(|&b| b == 0xab));
    assert!(read(&replica, SIZE, 4 * MIB as usize)
        .await
        .iter()
        .all(|&b| b == 0));
    drop(replica);
    let error = storage
        .open_replica("src", "vm1", "root", SIZE)
        .expect_err("shrinking a replica must fail");
    assert!(
        error.to_string().contains("root"),
        "{backend}: error does not name the replica: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_local_files() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::new(ReplicaStore::new(dir.path()));
    conformance(&storage, "files").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_rbd() {
    let cluster = TestCluster::start();
    let options = cluster.options();
    let storage =
        tokio::task::spawn_blocking(move || RbdStorage::connect(&options, "rbd", "ferry-"))
            .await
            .unwrap()
            .expect("connect to the test cluster");
    conformance(&storage, "rbd").await;
    // The images carry the replica features, named by source, machine and disk.
    let info = cluster.rbd(&["info", "rbd/ferry-src+vm1+root"]);
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("layering, exclusive-lock, object-map, fast-diff"),
        "{info}"
    );
    let listed = cluster.rbd(&["ls", "rbd"]);
    let mut names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    assert_eq!(names, ["ferry-src+vm1+.._.._data", "ferry-src+vm1+root"]);
}
