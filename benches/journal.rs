//! Cache journal append throughput (memory-mapped segment files in a temporary directory on the
//! local filesystem) for 4 KiB and 64 KiB records: without flushing (appends never flush; a
//! new segment's header waits for the next flush), with a durable flush per record, and with a flush every 16 records
//! (group commit), beside a plain memcpy of the same bytes into a buffer as large as the
//! journal and, for the durable variants, `pwrite` + `fdatasync` of the same bytes into a plain
//! file. `append_between_rollovers` times only appends that did not move `durable_seq` and leaves out
//! the flush that makes room when the ring is full: the CPU cost of an append. A second group measures the first lap over freshly created files, with and without
//! writing zeros over them at creation. Results: benches/RESULTS.md.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_appliance::core::journal::{Journal, JournalError, RecordSpec};
use ferry_appliance::core::record::RecordKind;
use ferry_appliance::io::mmap_journal::{open_journal_with, CreateOptions, MmapSegments};

/// 4 segments of 64 MiB: the daemon's default segment size.
const JOURNAL_BYTES: u64 = 256 << 20;
/// Records kept unreleased behind the head, like a shipper that is a little behind.
const HELD_RECORDS_BYTES: usize = 32 << 20;

fn spec(payload: &[u8], timestamp_ns: u64) -> RecordSpec<'_> {
    RecordSpec {
        kind: RecordKind::Write,
        disk_id: 1,
        offset: timestamp_ns * payload.len() as u64,
        length: payload.len() as u64,
        timestamp_ns,
        payload,
    }
}

/// Appends `iters` records, flushing after every `flush_every` records (0: never), releasing
/// what is more than `HELD_RECORDS_BYTES` behind the head, and returns the time taken.
fn run(
    journal: &mut Journal<MmapSegments>,
    payload: &[u8],
    iters: u64,
    flush_every: u64,
) -> Duration {
    let held_records = (HELD_RECORDS_BYTES / payload.len()) as u64;
    let start = Instant::now();
    for i in 0..iters {
        let seq = match journal.append(&spec(payload, i)) {
            Ok(seq) => seq,
            Err(JournalError::Full { .. }) => {
                // Only when the shipper-lag window exceeds what is durable: make room.
                journal.flush(journal.last_seq()).expect("flush");
                journal.release(journal.last_seq());
                journal
                    .append(&spec(payload, i))
                    .expect("append after release")
            }
            Err(other) => panic!("append: {other}"),
        };
        if flush_every > 0 && (i + 1) % flush_every == 0 {
            journal.flush(seq).expect("flush");
        }
        if seq > held_records {
            journal.release(seq - held_records);
        }
    }
    if flush_every > 0 {
        journal.flush(journal.last_seq()).expect("flush");
    }
    start.elapsed()
}

/// Like `run` without flushes, but times only appends that did not move `durable_seq`, and not
/// the flush that makes room when the ring is full (nothing is released before it is durable):
/// the CPU cost of an append into the mapping.
fn run_between_rollovers(
    journal: &mut Journal<MmapSegments>,
    payload: &[u8],
    iters: u64,
) -> Duration {
    let held_records = (HELD_RECORDS_BYTES / payload.len()) as u64;
    let mut timed = Duration::ZERO;
    let mut counted = 0;
    // Bounded: at most one rollover per few hundred appends.
    while counted < iters {
        let durable_before = journal.durable_seq();
        let start = Instant::now();
        let appended = journal.append(&spec(payload, counted));
        let took = start.elapsed();
        let seq = match appended {
            Ok(seq) => seq,
            Err(JournalError::Full { .. }) => {
                journal.flush(journal.last_seq()).expect("flush");
                journal.release(journal.last_seq());
                continue;
            }
            Err(other) => panic!("append: {other}"),
        };
        if journal.durable_seq() == durable_before {
            timed += took;
            counted += 1;
        }
        if seq > held_records {
            journal.release(seq - held_records);
        }
    }
    timed
}

/// The baseline for a durable flush: `pwrite` of the same bytes into a preallocated, zeroed file
/// followed by `fdatasync`, at rolling offsets.
fn pwrite_fdatasync(file: &std::fs::File, payload: &[u8], iters: u64, slot: &mut u64) -> Duration {
    use std::os::unix::fs::FileExt;
    let slots = (64u64 << 20) / payload.len() as u64;
    let start = Instant::now();
    for _ in 0..iters {
        file.write_all_at(payload, *slot * payload.len() as u64)
            .expect("pwrite");
        file.sync_data().expect("fdatasync");
        *slot = (*slot + 1) % slots;
    }
    start.elapsed()
}

fn append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut journal, _) = open_journal_with(dir.path(), JOURNAL_BYTES, CreateOptions::default())
        .expect("open journal");
    // Warm the files: one lap over the whole ring.
    let warm = vec![0u8; 64 << 10];
    run(&mut journal, &warm, (JOURNAL_BYTES / (64 << 10)) + 16, 0);

    let baseline_path = dir.path().join("baseline");
    let baseline = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&baseline_path)
        .expect("create baseline file");
    {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; 1 << 20];
        for mib in 0..64u64 {
            baseline
                .write_all_at(&zeros, mib << 20)
                .expect("zero baseline file");
        }
        baseline.sync_all().expect("fsync baseline file");
    }

    let mut group = c.benchmark_group("journal_append");
    for payload_bytes in [4usize << 10, 64 << 10] {
        let payload: Vec<u8> = (0..payload_bytes).map(|i| (i * 7 + 3) as u8).collect();
        group.throughput(Throughput::Bytes(payload_bytes as u64));
        let label = format!("{}KiB", payload_bytes >> 10);

        let mut target = vec![0u8; JOURNAL_BYTES as usize];
        let slots = target.len() / payload_bytes;
        let mut slot = 0;
        group.bench_function(BenchmarkId::new("memcpy", &label), |b| {
            b.iter(|| {
                let offset = slot * payload_bytes;
                target[offset..offset + payload_bytes].copy_from_slice(&payload);
                slot = (slot + 1) % slots;
                std::hint::black_box(&target[offset]);
            })
        });
        group.bench_function(BenchmarkId::new("append_between_rollovers", &label), |b| {
            b.iter_custom(|iters| run_between_rollovers(&mut journal, &payload, iters))
        });
        group.bench_function(BenchmarkId::new("append_no_flush", &label), |b| {
            b.iter_custom(|iters| run(&mut journal, &payload, iters, 0))
        });
        group.bench_function(BenchmarkId::new("append_flush_every_16", &label), |b| {
            b.iter_custom(|iters| run(&mut journal, &payload, iters, 16))
        });
        group.bench_function(BenchmarkId::new("append_flush_each", &label), |b| {
            b.iter_custom(|iters| run(&mut journal, &payload, iters, 1))
        });
        let mut slot = 0;
        group.bench_function(BenchmarkId::new("pwrite_fdatasync", &label), |b| {
            b.iter_custom(|iters| pwrite_fdatasync(&baseline, &payload, iters, &mut slot))
        });
    }
    group.finish();
}

/// The first lap over new files: appends with a flush every record, on files that were only
/// fallocated (unwritten extents) versus files that were also written with zeros.
fn first_lap(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal_first_lap_flush_each");
    group.sample_size(10);
    let payload = vec![0x3cu8; 4 << 10];
    group.throughput(Throughput::Bytes(payload.len() as u64));
    for (name, prezero) in [("prezeroed", true), ("fallocate_only", false)] {
        group.bench_function(BenchmarkId::new(name, "4KiB"), |b| {
            b.iter_custom(|iters| {
                // A fresh 8 MiB journal per batch (created outside the timing); batches never
                // leave its first lap.
                let mut total = Duration::ZERO;
                let mut remaining = iters;
                while remaining > 0 {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let (mut journal, _) =
                        open_journal_with(dir.path(), 8 << 20, CreateOptions { prezero })
                            .expect("open journal");
                    let batch = remaining.min(1500);
                    total += run(&mut journal, &payload, batch, 1);
                    remaining -= batch;
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, append, first_lap);
criterion_main!(benches);
