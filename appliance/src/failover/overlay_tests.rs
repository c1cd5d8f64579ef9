//! Tests of the failover overlay against a byte-array model, with a memory point view.

use super::*;
use rand::{Rng, SeedableRng};

struct MemoryView(Vec<u8>);

impl PointDisk for MemoryView {
    fn size_bytes(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = offset as usize;
        buf.copy_from_slice(&self.0[start..start + buf.len()]);
        Ok(())
    }
}

fn view(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..size).map(|_| rng.gen()).collect()
}

/// Random writes, zeroes and trims of any alignment (including a disk size that is not a
/// multiple of 4 KiB) read back like the model, and the view itself is never changed.
#[tokio::test]
async fn overlay_matches_a_model_under_random_changes() {
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let size = 64 * 1024 + 1536;
    let base = view(size, seed);
    let dir = tempfile::tempdir().unwrap();
    let disk = FailoverDisk::open(
        dir.path(),
        "web-1",
        "os",
        Arc::new(MemoryView(base.clone())),
        true,
    )
    .unwrap();
    let mut model = base.clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 1);
    for _ in 0..300 {
        let offset = rng.gen_range(0..size as u64);
        let length = rng.gen_range(1..=(size as u64 - offset).min(12_000));
        let (start, end) = (offset as usize, (offset + length) as usize);
        match rng.gen_range(0..4) {
            0 | 1 => {
                let data: Vec<u8> = (0..length).map(|_| rng.gen()).collect();
                disk.write_at(offset, &data).await.unwrap();
                model[start..end].copy_from_slice(&data);
            }
            2 => {
                let (result, _) = disk.change(offset, length, Change::Zeroes).await;
                result.unwrap();
                model[start..end].fill(0);
            }
            _ => {
                let (result, _) = disk.change(offset, length, Change::Trim).await;
                result.unwrap();
                model[start..end].fill(0);
            }
        }
        let probe = rng.gen_range(0..size as u64);
        let probe_length = rng.gen_range(1..=(size as u64 - probe).min(20_000)) as usize;
        let read = disk.read_at(probe, probe_length).await.unwrap();
        assert_eq!(
            read,
            model[probe as usize..probe as usize + probe_length],
            "seed {seed}: read {probe}+{probe_length}"
        );
    }
    assert_eq!(disk.read_at(0, size).await.unwrap(), model, "seed {seed}");
}

/// Flushed writes survive a reopen (the bitmap is persisted); a fresh open discards them.
#[tokio::test]
async fn flushed_overlay_survives_reopen_and_fresh_discards_it() {
    let base = view(32 * 1024, 7);
    let dir = tempfile::tempdir().unwrap();
    let open = |fresh| {
        FailoverDisk::open(
            dir.path(),
            "m",
            "d",
            Arc::new(MemoryView(base.clone())),
            fresh,
        )
        .unwrap()
    };
    let disk = open(true);
    disk.write_at(5000, &[0xAB; 100]).await.unwrap();
    disk.flush().await.unwrap();
    drop(disk);
    let disk = open(false);
    let read = disk.read_at(4096, 4096).await.unwrap();
    assert_eq!(&read[904..1004], &[0xAB; 100][..]);
    assert_eq!(&read[..904], &base[4096..5000]);
    drop(disk);
    let disk = open(true);
    assert_eq!(disk.read_at(0, base.len()).await.unwrap(), base);
}

/// `take_dirty` returns 4 KiB runs written since the last call; read-only refuses writes.
#[tokio::test]
async fn dirty_runs_and_read_only_switch() {
    let base = view(64 * 1024, 3);
    let dir = tempfile::tempdir().unwrap();
    let disk = FailoverDisk::open(
        dir.path(),
        "m",
        "d",
        Arc::new(MemoryView(base.clone())),
        true,
    )
    .unwrap();
    disk.write_at(100, &[1; 10]).await.unwrap();
    disk.write_at(8192, &[2; 8192]).await.unwrap();
    disk.write_at(16384, &[3; 1]).await.unwrap();
    assert_eq!(disk.take_dirty(), vec![(0, 4096), (8192, 12288)]);
    assert_eq!(disk.take_dirty(), vec![]);
    disk.set_read_only(true);
    let refused = disk.write_at(0, &[9; 512]).await.unwrap_err();
    assert!(
        matches!(refused, OverlayError::ReadOnly { .. }),
        "{refused}"
    );
    assert_eq!(FailoverDisk::error_code(&refused), ErrorCode::Perm);
    assert_eq!(disk.read_at(0, 100).await.unwrap(), base[..100]);
    disk.set_read_only(false);
    disk.write_at(0, &[9; 512]).await.unwrap();
    assert_eq!(disk.take_dirty(), vec![(0, 4096)]);
}

#[test]
fn edge_blocks_cover_partial_blocks_once() {
    assert_eq!(
        edge_blocks(100, 200, 0, 4096),
        (vec![(0, 4096)], (4096, 4096))
    );
    assert_eq!(
        edge_blocks(100, 9000, 0, 12288),
        (vec![(0, 4096), (8192, 12288)], (4096, 8192))
    );
    assert_eq!(edge_blocks(4096, 8192, 4096, 8192), (vec![], (4096, 8192)));
    // A disk whose last block is short: its end is aligned.
    assert_eq!(edge_blocks(4096, 5000, 4096, 5000), (vec![], (4096, 5000)));
}
