//! Conformance suite: the same tests against every engine × direct mode, only the options
//! differ; plus tests of open-time behaviour (fallbacks, create_size, errors).

use super::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;

const DISK_BYTES: u64 = 4 << 20;

fn seed() -> u64 {
    let seed = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (rerun with FERRY_SEED={seed})");
    seed
}

fn pattern(len: usize, salt: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(31)
                .wrapping_add(salt.wrapping_mul(7919))
                % 251) as u8
        })
        .collect()
}

fn create(dir: &tempfile::TempDir, options: DiskOptions) -> (Disk, PathBuf) {
    let path = dir.path().join("disk.raw");
    let disk = Disk::open(
        &path,
        DiskOptions {
            create_size: Some(DISK_BYTES),
            ..options
        },
    )
    .expect("open test disk");
    assert_eq!(disk.size(), DISK_BYTES);
    (disk, path)
}

async fn write(disk: &Disk, offset: u64, bytes: &[u8]) {
    let (result, buf) = disk.write_at(offset, IoBuf::from_slice(bytes)).await;
    result.unwrap_or_else(|e| panic!("write {offset}+{}: {e}", bytes.len()));
    assert_eq!(&buf[..], bytes, "write must hand its buffer back unchanged");
}

async fn read(disk: &Disk, offset: u64, len: usize) -> Vec<u8> {
    let (result, buf) = disk.read_at(offset, IoBuf::zeroed(len)).await;
    result.unwrap_or_else(|e| panic!("read {offset}+{len}: {e}"));
    assert_eq!(buf.len(), len);
    buf.to_vec()
}

/// Whether this process may pin the registered arena: it has CAP_IPC_LOCK, or RLIMIT_MEMLOCK
/// leaves room for it.
fn arena_pinning_allowed() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let capable = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0);
    capable
        || uring::memlock_limit()
            .is_none_or(|limit| limit >= crate::limits::REGISTERED_ARENA_BYTES as u64)
}

async fn assert_matches_model(disk: &Disk, model: &[u8]) {
    let whole = read(disk, 0, model.len()).await;
    if let Some(first) = whole.iter().zip(model).position(|(a, b)| a != b) {
        panic!(
            "disk differs from model at byte {first}: {} != {}",
            whole[first], model[first]
        );
    }
}

/// The suite, one async fn per property, each taking only the engine/direct options.
mod suite {
    use super::*;

    pub async fn aligned_round_trip(options: DiskOptions) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = create(&dir, options);
        if options.direct == DirectMode::On {
            assert!(disk.is_direct());
        }
        let data = pattern(8192, 1);
        write(&disk, 4096, &data).await;
        assert_eq!(read(&disk, 4096, 8192).await, data);
        assert_eq!(read(&disk, 0, 4096).await, vec![0; 4096]);
        assert_eq!(read(&disk, 12288, 4096).await, vec![0; 4096]);
        // A large request (2 MiB) in one go.
        let big = pattern(2 << 20, 2);
        write(&disk, 1 << 20, &big).await;
        assert_eq!(read(&disk, 1 << 20, 2 << 20).await, big);
    }

    /// Buffers from a registered pool (the arena), a read-only shared buffer over arena memory
    /// (the target's write straight from a received frame) and heap buffers all round-trip,
    /// aligned or not. io_uring issues exactly the arena ones as fixed-buffer requests once its
    /// ring registered the arena (it must, where pinning the arena is allowed); the thread-pool
    /// engine treats them as ordinary memory.
    pub async fn registered_buffers_round_trip(options: DiskOptions) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = create(&dir, options);
        let pool = BufPool::registered(256 << 10, 4);
        // Aligned: O_DIRECT when direct is on.
        let data = pattern(256 << 10, 3);
        let mut out = pool.get();
        out.extend_from_slice(&data);
        assert!(out.is_in_registered_arena());
        let (result, out) = disk.write_at(1 << 20, out).await;
        result.expect("aligned write from the arena");
        assert_eq!(&out[..], &data[..]);
        let mut back = pool.get();
        back.fill_zero(data.len());
        let (result, back) = disk.read_at(1 << 20, back).await;
        result.expect("aligned read into the arena");
        assert_eq!(&back[..], &data[..]);
        assert_eq!(read(&disk, 1 << 20, data.len()).await, data);
        // Unaligned: through the buffered descriptor, still from the arena.
        let odd = pattern(5000, 4);
        let mut out = pool.get();
        out.extend_from_slice(&odd);
        let (result, _) = disk.write_at(100, out).await;
        result.expect("unaligned write from the arena");
        let mut back = pool.get();
        back.fill_zero(odd.len());
        let (result, back) = disk.read_at(100, back).await;
        result.expect("unaligned read into the arena");
        assert_eq!(&back[..], &odd[..]);
        // A shared buffer whose bytes are an arena buffer's second block.
        let block = pattern(4096, 5);
        let mut frame = pool.get();
        frame.set_len(2 * 4096);
        frame[4096..].copy_from_slice(&block);
        let shared = IoBuf::from_shared(bytes::Bytes::from_owner(frame).slice(4096..))
            .expect("an aligned block");
        assert!(shared.is_in_registered_arena());
        let (result, _) = disk.write_at(3 << 20, shared).await;
        result.expect("write from a shared arena buffer");
        assert_eq!(read(&disk, 3 << 20, 4096).await, block);
        // Heap buffers beside them (`write` and `read` use heap buffers).
        let heap = pattern(12288, 6);
        write(&disk, 2 << 20, &heap).await;
        assert_eq!(read(&disk, 2 << 20, heap.len()).await, heap);
        let fixed = disk.fixed_buffers();
        match disk.engine() {
            EngineKind::Uring if fixed.registered => {
                // Two aligned, two unaligned, one shared; none of the heap ones.
                assert_eq!(fixed.requests, 5, "{fixed:?}");
            }
            EngineKind::Uring => {
                assert!(
                    !arena_pinning_allowed(),
                    "the ring did not register the arena though pinning it is allowed"
                );
                assert_eq!(fixed.requests, 0, "{fixed:?}");
            }
            EngineKind::Sync => assert_eq!(fixed, FixedBuffers::default()),
        }
    }

    pub async fn unaligned_round_trip(options: DiskOptions) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = create(&dir, options);
        let mut model = vec![0u8; DISK_BYTES as usize];
        let writes: [(u64, usize); 6] = [
            (1000, 5000),
            (4095, 3),
            (8192, 4096 + 17), // aligned start, unaligned length
            (20_000, 1),
            (DISK_BYTES - 7, 7), // last bytes of the disk
            ((1 << 20) + 512, (1 << 20) + 100),
        ];
        for (index, (offset, len)) in writes.into_iter().enumerate() {
            let data = pattern(len, index as u64 + 10);
            write(&disk, offset, &data).await;
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
        }
        // Unaligned reads, and aligned reads spanning unaligned writes.
        for (offset, len) in [(999u64, 5002usize), (4094, 6), (0, 16384), (20_000, 1)] {
            let got = read(&disk, offset, len).await;
            assert_eq!(got, model[offset as usize..offset as usize + len].to_vec());
        }
        assert_eq!(
            read(&disk, DISK_BYTES - 4096, 4096).await,
            model[(DISK_BYTES - 4096) as usize..].to_vec()
        );
        assert_matches_model(&disk, &model).await;
    }

    pub async fn zeroes_and_trim_read_back_zero(options: DiskOptions) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = create(&dir, options);
        let mut model = pattern(DISK_BYTES as usize, 3);
        write(&disk, 0, &model).await;
        let ranges: [(bool, u64, u64); 6] = [
            (false, 4096, 8192),         // write_zeroes aligned
            (false, 70_001, 9_999),      // write_zeroes unaligned
            (true, 1 << 20, 1 << 20),    // trim aligned
            (true, (3 << 20) + 5, 4093), // trim unaligned
            (true, 100, 10),             // trim inside one block
            (false, DISK_BYTES - 3, 3),  // zeroes at the very end
        ];
        for (is_trim, offset, len) in ranges {
            let result = if is_trim {
                disk.trim(offset, len).await
            } else {
                disk.write_zeroes(offset, len).await
            };
            result.unwrap_or_else(|e| panic!("zero {offset}+{len}: {e}"));
            model[offset as usize..(offset + len) as usize].fill(0);
        }
        assert_matches_model(&disk, &model).await;
        // Zero-length requests are no-ops.
        disk.trim(5, 0).await.unwrap();
        disk.write_zeroes(DISK_BYTES, 0).await.unwrap();
        // Writes after a trim land normally.
        let data = pattern(4096, 4);
        write(&disk, 1 << 20, &data).await;
        assert_eq!(read(&disk, 1 << 20, 4096).await, data);
    }

    pub async fn flush_makes_writes_visible_after_close(options: DiskOptions) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, path) = create(&dir, options);
        let data = pattern(12_288, 5);
        write(&disk, 4096, &data).await;
        write(&disk, 100, b"abc").await;
        disk.write_zeroes(8192, 4096).await.unwrap();
        disk.flush().await.unwrap();
        drop(disk);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, DISK_BYTES);
        assert_eq!(&bytes[100..103], b"abc");
        assert_eq!(&bytes[4096..8192], &data[..4096]);
        assert_eq!(&bytes[8192..12288], &[0u8; 4096][..]);
        assert_eq!(&bytes[12288..16384], &data[8192..]);
    }

    pub async fn many_in_flight(options: DiskOptions) {
        let seed = seed();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = create(&dir, options);
        let block_count = (DISK_BYTES / 4096) as usize;
        let mut blocks: Vec<usize> = (0..block_count).collect();
        blocks.shuffle(&mut rng);
        blocks.truncate(256);
        let mut model = vec![0u8; DISK_BYTES as usize];
        let mut tasks = JoinSet::new();
        for (index, &block) in blocks.iter().enumerate() {
            // Mostly whole blocks; every 8th write covers only part of its block.
            let (start, len) = if index % 8 == 7 {
                let start = rng.gen_range(0..4000);
                (start, rng.gen_range(1..=4096 - start))
            } else {
                (0, 4096)
            };
            let offset = (block * 4096 + start) as u64;
            let data = pattern(len, rng.gen());
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            let disk = disk.clone();
            tasks.spawn(async move {
                let (result, _) = disk.write_at(offset, IoBuf::from_slice(&data)).await;
                result
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("write task").expect("concurrent write");
        }
        let mut reads = JoinSet::new();
        for &block in &blocks {
            let disk = disk.clone();
            reads.spawn(async move {
                let offset = (block * 4096) as u64;
                let (result, buf) = disk.read_at(offset, IoBuf::zeroed(4096)).await;
                result.map(|()| (block, buf))
            });
        }
        while let Some(joined) = reads.join_next().await {
            let (block, buf) = joined.expect("read task").expect("concurrent read");
            assert_eq!(
                &buf[..],
                &model[block * 4096..(block + 1) * 4096],
                "block {block} (seed {seed})"
            );
        }
        assert_matches_model(&disk, &model).await;
    }

    /// Keeps 32 writes in flight, submitting the next as each completes: every request after
    /// the first few arrives while the engine is busy (the io_uring engine then queues it
    /// without waking its thread, and must still pick it up at the next completion). A lost
    /// request hangs, so the run has a deadline.
    pub async fn refills_while_busy(options: DiskOptions) {
        const WRITES: usize = 1024;
        const DEPTH: usize = 32;
        let seed = seed();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = create(&dir, options);
        // Every write has a block of its own, so completion order cannot matter.
        let mut blocks: Vec<usize> = (0..(DISK_BYTES / 4096) as usize).collect();
        blocks.shuffle(&mut rng);
        assert!(blocks.len() >= WRITES);
        let mut model = vec![0u8; DISK_BYTES as usize];
        let run = async {
            let mut tasks: JoinSet<Result<(), DiskError>> = JoinSet::new();
            for &block in blocks.iter().take(WRITES) {
                if tasks.len() == DEPTH {
                    let joined = tasks.join_next().await.expect("a write in flight");
                    joined.expect("write task").expect("write");
                }
                let offset = (block * 4096) as u64;
                let data = pattern(4096, rng.gen());
                let disk = disk.clone();
                model[offset as usize..offset as usize + 4096].copy_from_slice(&data);
                tasks.spawn(async move { disk.write_at(offset, IoBuf::from_slice(&data)).await.0 });
            }
            while let Some(joined) = tasks.join_next().await {
                joined.expect("write task").expect("write");
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(120), run)
            .await
            .unwrap_or_else(|_| panic!("writes never completed (seed {seed})"));
        assert_matches_model(&disk, &model).await;
    }

    pub async fn out_of_range_is_an_error(options: DiskOptions) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, path) = create(&dir, options);
        let (result, buf) = disk.read_at(DISK_BYTES - 4095, IoBuf::zeroed(4096)).await;
        let error = result.expect_err("read past the end");
        assert_eq!(buf.len(), 4096, "buffer handed back on error");
        assert_eq!(error.op, DiskOp::Read);
        assert_eq!(error.offset, DISK_BYTES - 4095);
        assert_eq!(error.len, 4096);
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        let message = error.to_string();
        assert!(message.contains("read") && message.contains(&path.display().to_string()));
        assert!(
            message.contains(&(DISK_BYTES - 4095).to_string()),
            "{message}"
        );
        let (result, _) = disk.read_at(DISK_BYTES, IoBuf::zeroed(1)).await;
        assert!(result.is_err());
        let (result, _) = disk.read_at(u64::MAX, IoBuf::zeroed(2)).await;
        assert!(result.is_err(), "offset overflow");
        let (result, _) = disk.write_at(DISK_BYTES - 1, IoBuf::zeroed(2)).await;
        assert_eq!(result.expect_err("write past end").op, DiskOp::Write);
        let error = disk.write_zeroes(DISK_BYTES, 1).await.expect_err("zeroes");
        assert_eq!(error.op, DiskOp::WriteZeroes);
        let error = disk.trim(u64::MAX - 1, 4).await.expect_err("trim");
        assert_eq!(error.op, DiskOp::Trim);
        // The disk is unchanged in size and still works.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), DISK_BYTES);
        write(&disk, 0, b"ok").await;
    }

    pub async fn read_only_rejects_writes(options: DiskOptions) {
        let dir = tempfile::tempdir().unwrap();
        let (disk, path) = create(&dir, options);
        write(&disk, 0, &pattern(4096, 6)).await;
        disk.flush().await.unwrap();
        drop(disk);
        let disk = Disk::open(
            &path,
            DiskOptions {
                read_only: true,
                ..options
            },
        )
        .unwrap();
        assert!(disk.is_read_only());
        assert_eq!(read(&disk, 0, 4096).await, pattern(4096, 6));
        let (result, buf) = disk.write_at(0, IoBuf::zeroed(4096)).await;
        let error = result.expect_err("write to read-only disk");
        assert_eq!(error.raw_os_error(), Some(libc::EROFS));
        assert_eq!(buf.len(), 4096);
        assert!(disk.write_zeroes(0, 4096).await.is_err());
        assert!(disk.trim(0, 4096).await.is_err());
        disk.flush()
            .await
            .expect("flush of a read-only disk is allowed");
        assert_eq!(read(&disk, 0, 4096).await, pattern(4096, 6));
    }
}

macro_rules! conformance {
    ($name:ident, $engine:expr, $direct:expr) => {
        mod $name {
            use super::*;

            fn options() -> DiskOptions {
                DiskOptions {
                    engine: $engine,
                    direct: $direct,
                    read_only: false,
                    create_size: None,
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn aligned_round_trip() {
                suite::aligned_round_trip(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn registered_buffers_round_trip() {
                suite::registered_buffers_round_trip(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unaligned_round_trip() {
                suite::unaligned_round_trip(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn zeroes_and_trim_read_back_zero() {
                suite::zeroes_and_trim_read_back_zero(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn flush_makes_writes_visible_after_close() {
                suite::flush_makes_writes_visible_after_close(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn many_in_flight() {
                suite::many_in_flight(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn refills_while_busy() {
                suite::refills_while_busy(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn out_of_range_is_an_error() {
                suite::out_of_range_is_an_error(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn read_only_rejects_writes() {
                suite::read_only_rejects_writes(options()).await;
            }
        }
    };
}

conformance!(uring_direct, EngineChoice::Uring, DirectMode::On);
conformance!(uring_buffered, EngineChoice::Uring, DirectMode::Off);
conformance!(sync_direct, EngineChoice::Sync, DirectMode::On);
conformance!(sync_buffered, EngineChoice::Sync, DirectMode::Off);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_when_ring_setup_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let options = DiskOptions {
        create_size: Some(1 << 20),
        ..DiskOptions::default()
    };
    // A ring of 0 entries fails set-up with EINVAL, like a host with io_uring disabled (EPERM).
    let disk = Disk::open_with_ring_entries(&path, options, 0).expect("auto falls back");
    assert_eq!(disk.engine(), EngineKind::Sync);
    write(&disk, 4096, b"fallback").await;
    assert_eq!(read(&disk, 4096, 8).await, b"fallback");
    let forced = DiskOptions {
        engine: EngineChoice::Uring,
        ..options
    };
    let error = Disk::open_with_ring_entries(&path, forced, 0).expect_err("uring required");
    assert_eq!(error.op, DiskOp::Open);
    // With a working ring, Auto picks io_uring.
    assert_eq!(
        Disk::open(&path, options).unwrap().engine(),
        EngineKind::Uring
    );
}

#[test]
fn create_size_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.raw");
    let missing = Disk::open(&path, DiskOptions::default()).expect_err("missing, no create");
    assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    let create = |size| DiskOptions {
        create_size: Some(size),
        ..DiskOptions::default()
    };
    assert_eq!(Disk::open(&path, create(8192)).unwrap().size(), 8192);
    assert_eq!(Disk::open(&path, create(16384)).unwrap().size(), 16384);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 16384);
    let error = Disk::open(&path, create(4096)).expect_err("never shrinks");
    assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(
        Disk::open(&path, DiskOptions::default()).unwrap().size(),
        16384
    );
    let both = DiskOptions {
        read_only: true,
        ..create(16384)
    };
    assert!(Disk::open(&path, both).is_err());
    let error = Disk::open(dir.path(), DiskOptions::default()).expect_err("a directory");
    assert!(error.to_string().contains("open"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_auto_works_on_tmpfs() {
    // /dev/shm is tmpfs on Linux hosts; O_DIRECT there is either refused (older kernels,
    // buffered fallback) or accepted. Either way the disk must work.
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        return;
    };
    let path = dir.path().join("disk.raw");
    let disk = Disk::open(
        &path,
        DiskOptions {
            create_size: Some(1 << 20),
            ..DiskOptions::default()
        },
    )
    .unwrap();
    let data = pattern(4096 * 3, 9);
    write(&disk, 4096, &data).await;
    write(&disk, 3, b"xyz").await;
    disk.trim(8192, 4096).await.unwrap();
    disk.write_zeroes(12288, 100).await.unwrap();
    let mut model = vec![0u8; 1 << 20];
    model[4096..16384].copy_from_slice(&data);
    model[3..6].copy_from_slice(b"xyz");
    model[8192..12288].fill(0);
    model[12288..12388].fill(0);
    assert_matches_model(&disk, &model).await;
    disk.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_futures_do_not_break_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = create(
        &dir,
        DiskOptions {
            engine: EngineChoice::Uring,
            ..DiskOptions::default()
        },
    );
    // Start many writes and abandon them after their first poll; the engine must still own
    // and free each buffer, and later requests must work.
    for index in 0..64u64 {
        let future = disk.write_at(index * 4096, IoBuf::from_slice(&[1u8; 4096]));
        let abandoned = tokio::time::timeout(std::time::Duration::ZERO, future).await;
        drop(abandoned);
    }
    write(&disk, 0, b"after").await;
    assert_eq!(read(&disk, 0, 5).await, b"after");
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_buffer_fallback_reads_back_zero() {
    // Filesystems without either fallocate mode end on writing zero buffers; start there
    // directly (as if both modes had answered EOPNOTSUPP) and check the result, for both
    // engines, across more than one 1 MiB chunk and with unaligned ends.
    for engine in [EngineChoice::Uring, EngineChoice::Sync] {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _) = create(
            &dir,
            DiskOptions {
                engine,
                ..DiskOptions::default()
            },
        );
        let mut model = pattern(DISK_BYTES as usize, 11);
        write(&disk, 0, &model).await;
        disk.inner.write_zeroes_method.store(2, Ordering::Relaxed);
        disk.inner.trim_method.store(2, Ordering::Relaxed);
        let zeroes = (4096 + 3, (2 << 20) + 5000);
        let trim = ((3 << 20) + 1, 700);
        disk.write_zeroes(zeroes.0, zeroes.1).await.unwrap();
        disk.trim(trim.0, trim.1).await.unwrap();
        for (offset, len) in [zeroes, trim] {
            model[offset as usize..(offset + len) as usize].fill(0);
        }
        assert_matches_model(&disk, &model).await;
    }
}
