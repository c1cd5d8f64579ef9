//! Scenario 4: delta resync after 1% of the 4 KiB blocks of a disk changed, in the two ways Ferry
//! resyncs, beside `rsync --inplace --no-whole-file -B 4096` of the same images:
//! - bitmap mode: the target is down, the changes go through the source's NBD export and overflow
//!   its small journal into the dirty-extent bitmap; the target comes back and the source ships
//!   what its journal holds and resyncs the dirty extents (timed from the link's reconnection:
//!   the target's first answer through the relay, so the source's redial backoff, which grew
//!   while the target was down, is not counted as resync time; the note gives it). The journal
//!   is smaller than the change set (except at the smoke-test size), so one pass of writes
//!   overflows it and every changed block is written once: each travels once, as a journaled
//!   write or as a resync block;
//! - full hash scan: the source is down, the changes are written straight into its disk file (no
//!   bitmap knows them), and the source starts without its "initial replication finished" marker,
//!   so it compares every extent with the target by hash (timed from the source's start).
//!
//! The source dials the target through a counting UDP relay (`relay.rs`): "bytes sent" are the
//! QUIC bytes from source to target while the resync ran, retransmissions and headers included.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_appliance::control::DiskState;

use super::figure::{Better, Figure};
use super::initial::{replication_deadline, verified_note, verify_timeout};
use super::pair::{DiskSpec, Pair, PairOptions, MACHINE};
use super::tools::{self, Tool};
use super::{Env, Scenario};

pub const STEPS: u64 = 5;

const BLOCK_BYTES: u64 = 4096;
/// Passes over the change set (same blocks, new data) at most while filling the journal.
const OVERFLOW_PASSES_MAX: u32 = 200;

/// `count` distinct blocks out of `blocks`, seeded (Floyd's sampling over xorshift64*).
fn changed_blocks(blocks: u64, count: u64, seed: u64) -> Vec<u64> {
    // splitmix64 of the seed: every seed gives a distinct, non-zero xorshift state.
    let mut state = super::tools::splitmix64(seed) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut chosen = BTreeSet::new();
    for j in (blocks - count)..blocks {
        let pick = next() % (j + 1);
        if !chosen.insert(pick) {
            chosen.insert(j);
        }
    }
    chosen.into_iter().collect()
}

/// Writes `pattern` over each block through an NBD URI with one qemu-io invocation.
fn write_through_export(uri: &str, blocks: &[u64], pattern: u8) -> anyhow::Result<()> {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw", uri]);
    for block in blocks {
        command
            .arg("-c")
            .arg(format!("write -P {pattern} {} 4k", block * BLOCK_BYTES));
    }
    let output = tools::output(&mut command)?;
    if output.contains("failed") {
        bail!(
            "qemu-io: a write failed: {}",
            output.lines().find(|l| l.contains("failed")).unwrap_or("")
        );
    }
    Ok(())
}

/// Writes `pattern` over each block straight into the file.
fn write_into_file(path: &Path, blocks: &[u64], pattern: u8) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let data = vec![pattern; BLOCK_BYTES as usize];
    for block in blocks {
        file.write_all_at(&data, block * BLOCK_BYTES)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))
}

struct Rsync {
    seconds: f64,
    bytes_sent: f64,
}

/// `rsync --inplace --no-whole-file -B 4096 --stats` from `from` onto `onto`, page cache dropped.
fn rsync(from: &Path, onto: &Path) -> anyhow::Result<Rsync> {
    tools::drop_caches();
    let start = Instant::now();
    let output = tools::output(
        Command::new("rsync")
            // --ignore-times: compare contents even where size and mtime would say "same".
            .args([
                "--inplace",
                "--no-whole-file",
                "--ignore-times",
                "-B",
                "4096",
                "--stats",
            ])
            .arg(from)
            .arg(onto),
    )?;
    tools::sync_file(onto)?;
    let seconds = start.elapsed().as_secs_f64();
    let bytes_sent = output
        .lines()
        .find_map(|line| line.strip_prefix("Total bytes sent:"))
        .map(|text| text.trim().replace([',', '.'], ""))
        .and_then(|text| text.parse::<f64>().ok())
        .context("rsync --stats printed no \"Total bytes sent\"")?;
    Ok(Rsync {
        seconds,
        bytes_sent,
    })
}

pub fn run(env: &Env) -> anyhow::Result<Vec<Figure>> {
    if let Some(why) = env.tools.missing_reason(Tool::QemuIo) {
        bail!("writing through the export needs qemu-io: {why}");
    }
    // 1% of the blocks must exceed the journal (4 MiB at least) for one pass to overflow it.
    let size_bytes: u64 = env.size.pick(8 << 20, 512 << 20, 4 << 30);
    let dir = env.scenario_dir(Scenario::Resync)?;
    tools::need_free(&dir, size_bytes * 3 + (1 << 30))?;
    let blocks = size_bytes / BLOCK_BYTES;
    let count = blocks / 100;
    let changed_bytes = (count * BLOCK_BYTES) as f64;
    let size_label = if size_bytes >= 1 << 30 {
        format!("{} GiB", size_bytes >> 30)
    } else {
        format!("{} MiB", size_bytes >> 20)
    };

    env.progress.step(&format!(
        "writing a {size_label} random disk, initial replication"
    ));
    let disk = dir.join("disk.raw");
    tools::random_image(&disk, size_bytes, 0x5eed_0004)?;
    let old = dir.join("rsync-old.raw");
    let mut pair = Pair::prepare(
        &env.exe,
        &dir.join("pair"),
        &PairOptions {
            disks: vec![DiskSpec {
                name: "os".into(),
                path: disk.clone(),
            }],
            // Smaller than 1% of the disk (but at the smoke-test size), so that one pass of the
            // change set overflows it.
            journal_size: env.size.pick("4MiB", "4MiB", "16MiB").into(),
            relay: true,
            rbd: None,
        },
    )?;
    pair.start_target()?;
    pair.start_source()?;
    pair.wait_replicated(replication_deadline(env.size), &|what| {
        env.progress.detail(&format!("initial replication: {what}"))
    })?;
    std::fs::copy(&disk, &old).context("cannot copy the disk for rsync")?;

    // ---- Bitmap mode.
    env.progress
        .step("bitmap mode: target down, 1% of blocks written through the export");
    pair.stop_target()?;
    let bitmap_blocks = changed_blocks(blocks, count, 0x0b17_3a9e);
    let uri = pair.export_uri("os");
    let mut passes = 0;
    // Same blocks, new data each pass, until the journal overflows (one pass at full size).
    loop {
        passes += 1;
        write_through_export(&uri, &bitmap_blocks, (passes % 250 + 1) as u8)?;
        let snapshot = pair.status("source")?;
        if snapshot
            .disks
            .iter()
            .all(|disk| disk.state == DiskState::ResyncNeeded)
        {
            break;
        }
        if passes >= OVERFLOW_PASSES_MAX {
            bail!(
                "the source's journal did not overflow after {passes} passes over the change set"
            );
        }
    }
    env.progress.step("bitmap mode: target back, resync");
    let sent_before = pair
        .relay()
        .map_or(0, |relay| relay.source_to_target_bytes());
    let back_before = pair
        .relay()
        .map_or(0, |relay| relay.target_to_source_bytes());
    if let Some(relay) = pair.relay() {
        relay.mark_answers();
    }
    let down = Instant::now();
    pair.start_target()?;
    // The source redials with backoff; when it is connected again is noted.
    let reconnect_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connected = pair
            .status("source")
            .ok()
            .and_then(|snapshot| snapshot.link.map(|link| link.connected))
            .unwrap_or(false);
        if connected {
            break;
        }
        if Instant::now() > reconnect_deadline {
            bail!("the source did not reconnect within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pair.wait_replicated(replication_deadline(env.size), &|what| {
        env.progress.detail(&format!("bitmap resync: {what}"))
    })?;
    let done = Instant::now();
    // Timed from the link's reconnection (the target's first answer after its start): the
    // source's redial backoff grew while the target was down and is not resync work; the note
    // says how long the reconnection took after the target's start.
    let reconnected = pair
        .relay()
        .and_then(|relay| relay.first_answer())
        .unwrap_or(down);
    let reconnect_s = reconnected.saturating_duration_since(down).as_secs_f64();
    let bitmap_s = done.saturating_duration_since(reconnected).as_secs_f64();
    let from_start_s = done.saturating_duration_since(down).as_secs_f64();
    let bitmap_sent = pair
        .relay()
        .map_or(0, |relay| relay.source_to_target_bytes())
        - sent_before;
    let bitmap_back = pair
        .relay()
        .map_or(0, |relay| relay.target_to_source_bytes())
        - back_before;
    let rsync_bitmap = if let Some(why) = env.tools.missing_reason(Tool::Rsync) {
        Err(why)
    } else {
        env.progress.detail("rsync of the same change");
        rsync(&disk, &old).map_err(|error| format!("rsync failed: {error:#}"))
    };
    env.log(&format!(
        "  bitmap resync: {bitmap_s:.2} s from the reconnection, {:.1} MB sent for {:.1} MB changed ({passes} pass(es) to overflow; reconnected {reconnect_s:.1} s after the target's start); rsync {}",
        bitmap_sent as f64 / 1e6,
        changed_bytes / 1e6,
        match &rsync_bitmap {
            Ok(r) => format!("{:.2} s, {:.1} MB sent", r.seconds, r.bytes_sent / 1e6),
            Err(why) => format!("skipped ({why})"),
        }
    ));

    // ---- Full hash scan, no bitmap.
    env.progress
        .step("hash scan: source down, 1% of blocks written into its disk file");
    pair.stop_source()?;
    let scan_blocks = changed_blocks(blocks, count, 0x5ca7_7e55);
    write_into_file(&disk, &scan_blocks, 0xa5)?;
    let marker = pair
        .state_dir("source")
        .join("sync")
        .join(format!("{MACHINE}__os.synced"));
    std::fs::remove_file(&marker).with_context(|| format!("cannot remove {}", marker.display()))?;
    env.progress
        .step("hash scan: source back, compare every extent");
    let sent_before = pair
        .relay()
        .map_or(0, |relay| relay.source_to_target_bytes());
    let back_before = pair
        .relay()
        .map_or(0, |relay| relay.target_to_source_bytes());
    let start = Instant::now();
    pair.start_source()?;
    pair.wait_replicated(replication_deadline(env.size), &|what| {
        env.progress.detail(&format!("hash scan: {what}"))
    })?;
    let scan_s = start.elapsed().as_secs_f64();
    let scan_sent = pair
        .relay()
        .map_or(0, |relay| relay.source_to_target_bytes())
        - sent_before;
    let scan_back = pair
        .relay()
        .map_or(0, |relay| relay.target_to_source_bytes())
        - back_before;
    let rsync_scan = if let Some(why) = env.tools.missing_reason(Tool::Rsync) {
        Err(why)
    } else {
        env.progress.detail("rsync of the same change");
        rsync(&disk, &old).map_err(|error| format!("rsync failed: {error:#}"))
    };
    env.log(&format!(
        "  hash-scan resync: {scan_s:.2} s, {:.1} MB sent for {:.1} MB changed; rsync {}",
        scan_sent as f64 / 1e6,
        changed_bytes / 1e6,
        match &rsync_scan {
            Ok(r) => format!("{:.2} s, {:.1} MB sent", r.seconds, r.bytes_sent / 1e6),
            Err(why) => format!("skipped ({why})"),
        }
    ));
    let identical = pair.verify(verify_timeout(env.size));
    pair.stop_source()?;
    pair.stop_target()?;

    let mut figures = Vec::new();
    for (mode, seconds, sent, back, baseline, extra) in [
        (
            "bitmap mode",
            bitmap_s,
            bitmap_sent as f64,
            bitmap_back as f64,
            &rsync_bitmap,
            format!("timed from the link's reconnection, {reconnect_s:.1} s after the target's start ({from_start_s:.2} s from the start); {passes} pass(es) over the change set to overflow the journal; end seen through `ferry status` (sampled every 0.25 s)"),
        ),
        (
            "full hash scan, no bitmap",
            scan_s,
            scan_sent as f64,
            scan_back as f64,
            &rsync_scan,
            "timed from the source's start".to_owned(),
        ),
    ] {
        let name = format!("delta resync ({mode}), 1% of 4 KiB blocks of {size_label}");
        let rsync_label = "rsync --inplace --no-whole-file -B 4096 of the same images";
        let time = Figure::new(format!("{name}, time"), seconds, "s", Better::Lower)
            .aim("10x faster than rsync", 10.0)
            .note(extra);
        let rsync_sent = Figure::new(
            format!("{name}, bytes sent"),
            sent / 1e6,
            "MB",
            Better::Lower,
        );
        let (time, rsync_sent) = match baseline {
            Ok(r) => (
                time.against(rsync_label, Some(r.seconds)),
                rsync_sent.against(format!("{rsync_label} (bytes sent)"), Some(r.bytes_sent / 1e6)),
            ),
            Err(why) => (
                time.against(rsync_label, None).note(format!("baseline skipped: {why}")),
                rsync_sent
                    .against(format!("{rsync_label} (bytes sent)"), None)
                    .note(format!("baseline skipped: {why}")),
            ),
        };
        figures.push(time);
        figures.push(
            Figure::new(format!("{name}, bytes sent"), sent / 1e6, "MB", Better::Lower)
                .against("the changed bytes", Some(changed_bytes / 1e6))
                .aim("at most 1.2x the changed bytes", 1.0 / 1.2)
                .note(format!(
                    "QUIC bytes source → target, headers and retransmissions included; target → source {:.1} MB",
                    back / 1e6
                )),
        );
        figures.push(rsync_sent);
    }
    if let Some(first) = figures.first_mut() {
        *first = first.clone().note(verified_note(identical));
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    #[test]
    fn changed_blocks_are_distinct_sorted_and_in_range() {
        let blocks = super::changed_blocks(10_000, 100, 42);
        assert_eq!(blocks.len(), 100);
        assert!(blocks.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(blocks.iter().all(|block| *block < 10_000));
        assert_ne!(blocks, super::changed_blocks(10_000, 100, 43));
    }
}
