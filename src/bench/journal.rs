//! Scenario 6: cache journal append throughput for 4 KiB and 64 KiB records, without a flush and
//! with a durable flush per record, beside a memcpy of the same bytes into a buffer as large as
//! the journal (and, for the durable variant, `pwrite` + `fdatasync` of the same bytes). The
//! journal is the daemon's: `open_journal_with` (memory-mapped segment files, zero-written at
//! creation) in the work directory, warmed by one lap, with a shipper-like 32 MiB of records held
//! unreleased behind the head — the loop of `benches/journal.rs`, timed by wall clock here.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_appliance::core::journal::{Journal, JournalError, RecordSpec};
use ferry_appliance::core::record::RecordKind;
use ferry_appliance::io::mmap_journal::{open_journal_with, CreateOptions, MmapSegments};

use super::figure::{Better, Figure};
use super::{Env, Scenario};

pub const STEPS: u64 = 4;

/// Records kept unreleased behind the head, like a shipper that is a little behind.
const HELD_BYTES: u64 = 32 << 20;
/// The baseline file of `pwrite` + `fdatasync` (rolling offsets inside it).
const BASELINE_FILE_BYTES: u64 = 64 << 20;

fn spec(payload: &[u8], index: u64) -> RecordSpec<'_> {
    RecordSpec {
        kind: RecordKind::Write,
        disk_id: 1,
        offset: index * payload.len() as u64,
        length: payload.len() as u64,
        timestamp_ns: index,
        payload,
    }
}

/// Appends records for about `duration` (at least `min_records`), flushing each when
/// `flush_each`; returns bytes per second of payload.
fn append_rate(
    journal: &mut Journal<MmapSegments>,
    payload: &[u8],
    flush_each: bool,
    duration: Duration,
    min_records: u64,
) -> anyhow::Result<f64> {
    let held = HELD_BYTES / payload.len() as u64;
    let start = Instant::now();
    let mut records = 0u64;
    // Bounded by time (and by a record cap far above what the time allows).
    while (start.elapsed() < duration || records < min_records) && records < 50_000_000 {
        let seq = match journal.append(&spec(payload, records)) {
            Ok(seq) => seq,
            Err(JournalError::Full { .. }) => {
                // The held window exceeds what is durable: make room, as the shipper would.
                journal.flush(journal.last_seq()).context("journal flush")?;
                journal.release(journal.last_seq());
                journal
                    .append(&spec(payload, records))
                    .context("journal append after release")?
            }
            Err(other) => return Err(other).context("journal append"),
        };
        if flush_each {
            journal.flush(seq).context("journal flush")?;
        }
        if seq > held {
            journal.release(seq - held);
        }
        records += 1;
    }
    Ok(records as f64 * payload.len() as f64 / start.elapsed().as_secs_f64())
}

/// memcpy of `payload` into a buffer as large as the journal, at rolling offsets.
fn memcpy_rate(target: &mut [u8], payload: &[u8], duration: Duration) -> f64 {
    let slots = target.len() / payload.len();
    let start = Instant::now();
    let mut copies = 0usize;
    while start.elapsed() < duration || copies < 16 {
        // 64 copies between clock reads: the clock must not dominate a 4 KiB copy.
        for _ in 0..64 {
            let offset = (copies % slots) * payload.len();
            target[offset..offset + payload.len()].copy_from_slice(payload);
            std::hint::black_box(&target[offset]);
            copies += 1;
        }
    }
    copies as f64 * payload.len() as f64 / start.elapsed().as_secs_f64()
}

fn pwrite_fdatasync_rate(
    path: &Path,
    payload: &[u8],
    duration: Duration,
    min_records: u64,
) -> anyhow::Result<f64> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let slots = BASELINE_FILE_BYTES / payload.len() as u64;
    let start = Instant::now();
    let mut records = 0u64;
    while (start.elapsed() < duration || records < min_records) && records < 50_000_000 {
        file.write_all_at(payload, (records % slots) * payload.len() as u64)
            .context("pwrite")?;
        file.sync_data().context("fdatasync")?;
        records += 1;
    }
    Ok(records as f64 * payload.len() as f64 / start.elapsed().as_secs_f64())
}

pub fn run(env: &Env) -> anyhow::Result<Vec<Figure>> {
    let journal_bytes: u64 = env.size.pick(16 << 20, 256 << 20, 256 << 20);
    let duration = env.size.pick(
        Duration::from_millis(200),
        Duration::from_millis(500),
        Duration::from_secs(3),
    );
    let dir = env.scenario_dir(Scenario::Journal)?;
    env.progress.step("creating and warming the journal");
    let (mut journal, _) = open_journal_with(
        &dir.join("journal"),
        journal_bytes,
        CreateOptions::default(),
    )
    .context("cannot open the bench journal")?;
    let warm = vec![0u8; 64 << 10];
    append_rate(
        &mut journal,
        &warm,
        false,
        Duration::ZERO,
        journal_bytes / warm.len() as u64 + 16,
    )?;
    let baseline_path = dir.join("baseline");
    super::tools::zero_image(&baseline_path, BASELINE_FILE_BYTES)?;

    let mut figures = Vec::new();
    let mut memcpy_target = vec![0u8; journal_bytes as usize];
    for payload_bytes in [4usize << 10, 64 << 10] {
        let label = format!("{} KiB", payload_bytes >> 10);
        env.progress
            .step(&format!("{label} records: memcpy, append, append + flush"));
        let payload: Vec<u8> = (0..payload_bytes).map(|i| (i * 7 + 3) as u8).collect();
        let memcpy = memcpy_rate(&mut memcpy_target, &payload, duration);
        let no_flush = append_rate(&mut journal, &payload, false, duration, 16)?;
        let flush = append_rate(&mut journal, &payload, true, duration, 8)?;
        let fdatasync = pwrite_fdatasync_rate(&baseline_path, &payload, duration, 8)?;
        env.log(&format!(
            "  journal {label}: memcpy {:.0} MB/s, append {:.0} MB/s, append+flush {:.1} MB/s, pwrite+fdatasync {:.1} MB/s",
            memcpy / 1e6,
            no_flush / 1e6,
            flush / 1e6,
            fdatasync / 1e6
        ));
        figures.push(
            Figure::new(
                format!("journal append, {label} records, no flush"),
                no_flush / 1e6,
                "MB/s",
                Better::Higher,
            )
            .against("memcpy of the same bytes", Some(memcpy / 1e6)),
        );
        figures.push(
            Figure::new(
                format!("journal append, {label} records, durable flush each"),
                flush / 1e6,
                "MB/s",
                Better::Higher,
            )
            .against("memcpy of the same bytes", Some(memcpy / 1e6)),
        );
        figures.push(
            Figure::new(
                format!("journal append, {label} records, durable flush each"),
                flush / 1e6,
                "MB/s",
                Better::Higher,
            )
            .against(
                "pwrite + fdatasync of the same bytes",
                Some(fdatasync / 1e6),
            ),
        );
    }
    Ok(figures)
}
