//! Scenarios 1 and 2: initial replication of a random-data disk (beside `qemu-img convert -n`
//! to a local file and fio's sequential read of the source, the physical limit) and of an
//! all-zero sparse disk (beside `qemu-img convert -n` of the same sparse file and the aim of 5 s).
//! Both are timed from the source appliance's start until every disk is `protected` and the
//! target acknowledged everything (it acknowledges only durable data); `ferry verify` then checks
//! the replica.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::figure::{Better, Figure};
use super::pair::{DiskSpec, Pair, PairOptions, RbdTarget};
use super::tools::{self, Tool};
use super::{Env, Scenario, Size};

pub const RANDOM_STEPS: u64 = 4;
pub const SPARSE_STEPS: u64 = 2;

/// The source's journal in scenario 1: 256 MiB (64 MiB segments). Before de892ef a sync stalled
/// at ~23 MiB with segments larger than its 16 MiB backlog (benches/RESULTS.md); this size keeps
/// that case covered.
pub const RANDOM_JOURNAL: &str = "256MiB";

pub fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

/// Scenario 1. `FERRY_BENCH_INITIAL_MIB` sets another disk size (issue 4 measures 2 GiB:
/// `FERRY_BENCH_INITIAL_MIB=2048 ferry bench 1`).
pub fn random(env: &Env) -> anyhow::Result<Vec<Figure>> {
    let bytes: u64 = match std::env::var("FERRY_BENCH_INITIAL_MIB") {
        Ok(text) => {
            let mib: u64 = text.trim().parse().map_err(|_| {
                anyhow::anyhow!("FERRY_BENCH_INITIAL_MIB={text:?} is not a number of MiB")
            })?;
            anyhow::ensure!(mib > 0, "FERRY_BENCH_INITIAL_MIB must be above 0");
            mib << 20
        }
        Err(_) => env.size.pick(8 << 20, 512 << 20, 4 << 30),
    };
    let dir = env.scenario_dir(Scenario::Initial)?;
    // The disk, the baseline's copy and the replica.
    tools::need_free(&dir, bytes * 3 + (1 << 30))?;
    let disk = dir.join("disk.raw");
    env.progress
        .step(&format!("writing a {} random disk", gib(bytes)));
    tools::random_image(&disk, bytes, 0x5eed_0001)?;

    // Physical limit: fio reads the source sequentially, O_DIRECT.
    env.progress.step("fio sequential read of the source");
    let fio = if let Some(why) = env.tools.missing_reason(Tool::Fio) {
        Err(why)
    } else {
        tools::fio(
            &[
                "--name=seqread".into(),
                format!("--filename={}", disk.display()),
                "--readonly".into(),
                "--rw=read".into(),
                "--bs=1M".into(),
                "--iodepth=32".into(),
                "--ioengine=io_uring".into(),
                "--direct=1".into(),
                format!("--size={bytes}"),
            ],
            "read",
        )
        .map(|result| result.bytes_per_s / 1e9)
        .map_err(|error| format!("fio failed: {error:#}"))
    };

    // qemu-img convert -n onto a new local file, + fsync, page cache dropped first.
    env.progress.step("qemu-img convert -n to a local file");
    let qemu = if let Some(why) = env.tools.missing_reason(Tool::QemuImg) {
        Err(why)
    } else {
        qemu_convert(&disk, &dir.join("copy.raw"), bytes)
            .map(|took| bytes as f64 / took.as_secs_f64() / 1e9)
            .map_err(|error| format!("qemu-img failed: {error:#}"))
    };
    let _ = std::fs::remove_file(dir.join("copy.raw"));

    env.progress.step("Ferry initial replication");
    let (took, identical) = replicate(env, &dir, &disk, RANDOM_JOURNAL)?;
    let ferry = bytes as f64 / took.as_secs_f64() / 1e9;
    env.log(&format!(
        "  initial replication of {}: {:.1} s, {ferry:.3} GB/s; qemu-img {}; fio read {}",
        gib(bytes),
        took.as_secs_f64(),
        shown(&qemu, "GB/s"),
        shown(&fio, "GB/s")
    ));
    let name = format!("initial replication, {} random data", gib(bytes));
    let verified = verified_note(identical);
    Ok(vec![
        with_baseline(
            Figure::new(&name, ferry, "GB/s", Better::Higher),
            "qemu-img convert -n to a local file (+ fsync)",
            &qemu,
        )
        .aim("≥ 1.0x qemu-img", 1.0)
        .note(verified)
        .note(format!("source journal {RANDOM_JOURNAL}")),
        with_baseline(
            Figure::new(&name, ferry, "GB/s", Better::Higher),
            "fio sequential read of the source, 1 MiB QD32 O_DIRECT (physical limit)",
            &fio,
        ),
    ])
}

/// Scenario 2.
pub fn sparse(env: &Env) -> anyhow::Result<Vec<Figure>> {
    let wanted: u64 = env.size.pick(256 << 20, 2 << 30, 64 << 30);
    let dir = env.scenario_dir(Scenario::Sparse)?;
    // The replica is new, so its zero blocks are never sent and it stays sparse; the source is
    // a sparse file too. Still never let the bench fill a shared disk: with less than the margin
    // free beyond 8 GiB, measure 8 GiB and say so.
    let margin = 8u64 << 30;
    let free = tools::free_bytes(&dir).unwrap_or(u64::MAX);
    let bytes = if free >= margin + (8 << 30) {
        wanted
    } else {
        wanted.min(8 << 30)
    };
    tools::need_free(&dir, margin)?;
    let reduced = (bytes < wanted).then(|| {
        format!(
            "ran at {} instead of {} ({:.0} GiB free)",
            gib(bytes),
            gib(wanted),
            free as f64 / (1u64 << 30) as f64
        )
    });
    let disk = dir.join("disk.raw");
    tools::sparse_image(&disk, bytes)?;

    env.progress.step("qemu-img convert -n of the sparse disk");
    let qemu = if let Some(why) = env.tools.missing_reason(Tool::QemuImg) {
        Err(why)
    } else {
        qemu_convert(&disk, &dir.join("copy.raw"), bytes)
            .map(|took| took.as_secs_f64())
            .map_err(|error| format!("qemu-img failed: {error:#}"))
    };
    let _ = std::fs::remove_file(dir.join("copy.raw"));

    env.progress
        .step("Ferry initial replication of the sparse disk");
    let (took, identical) = replicate(env, &dir, &disk, "256MiB")?;
    let seconds = took.as_secs_f64();
    env.log(&format!(
        "  initial replication of a {} sparse disk: {seconds:.2} s; qemu-img {}",
        gib(bytes),
        shown(&qemu, "s")
    ));
    let name = format!("initial replication, {} all-zero sparse disk", gib(bytes));
    let verified = verified_note(identical);
    // The aim is 5 s for 64 GiB; smaller runs scale it.
    let aim_s = 5.0 * bytes as f64 / (64u64 << 30) as f64;
    let mut first = Figure::new(&name, seconds, "s", Better::Lower)
        .against(format!("aim: {aim_s:.2} s"), Some(aim_s))
        .aim(&format!("under {aim_s:.2} s"), 1.0)
        .note(verified);
    if let Some(reduced) = reduced {
        first = first.note(reduced);
    }
    Ok(vec![
        first,
        with_baseline(
            Figure::new(&name, seconds, "s", Better::Lower),
            "qemu-img convert -n of the same sparse file (+ fsync)",
            &qemu,
        ),
    ])
}

/// Starts a pair protecting `disk` (replica in local files, or in `rbd`), times the initial
/// replication, verifies, stops the pair.
fn replicate(
    env: &Env,
    dir: &Path,
    disk: &Path,
    journal_size: &str,
) -> anyhow::Result<(Duration, anyhow::Result<bool>)> {
    let (mut pair, took) = start_replicating(env, dir, disk, journal_size, None)?;
    let identical = pair.verify(verify_timeout(env.size));
    pair.stop_source()?;
    pair.stop_target()?;
    Ok((took, identical))
}

/// Starts a pair protecting `disk` under `dir/pair` (replica in local files, or in `rbd`) and
/// times the initial replication: from the source's start (page cache dropped) until the disk
/// is protected and the target acknowledged everything. The pair keeps running.
pub fn start_replicating(
    env: &Env,
    dir: &Path,
    disk: &Path,
    journal_size: &str,
    rbd: Option<RbdTarget>,
) -> anyhow::Result<(Pair, Duration)> {
    let mut pair = Pair::prepare(
        &env.exe,
        &dir.join("pair"),
        &PairOptions {
            disks: vec![DiskSpec {
                name: "os".into(),
                path: disk.to_path_buf(),
            }],
            journal_size: journal_size.into(),
            relay: false,
            rbd,
        },
    )?;
    pair.start_target()?;
    tools::drop_caches();
    let start = Instant::now();
    pair.start_source()?;
    pair.wait_replicated(replication_deadline(env.size), &|what| {
        env.progress
            .detail(&format!("Ferry initial replication: {what}"))
    })?;
    Ok((pair, start.elapsed()))
}

/// `qemu-img convert -n -f raw -O raw` onto a new file of the same size, then fsync; the page
/// cache is dropped first.
fn qemu_convert(from: &Path, to: &Path, bytes: u64) -> anyhow::Result<Duration> {
    tools::sparse_image(to, bytes)?;
    tools::drop_caches();
    let start = Instant::now();
    tools::output(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(from)
            .arg(to),
    )?;
    tools::sync_file(to)?;
    Ok(start.elapsed())
}

/// The longest a replication may take before a scenario gives up.
pub fn replication_deadline(size: Size) -> Duration {
    Duration::from_secs(size.pick(120, 300, 900))
}

/// How long `ferry verify` may take at the end of a scenario.
pub fn verify_timeout(size: Size) -> Duration {
    Duration::from_secs(size.pick(10, 10, 300))
}

/// What `ferry verify` said, for a figure's note (an error is reported, not fatal: the figures
/// were measured before it).
pub fn verified_note(identical: anyhow::Result<bool>) -> String {
    match identical {
        Ok(true) => "ferry verify: replica identical".to_owned(),
        Ok(false) => "ferry verify: REPLICA DIFFERS".to_owned(),
        Err(error) => format!("ferry verify failed: {error:#}"),
    }
}

/// Attaches a baseline that may have been skipped (`Err(why)`).
pub fn with_baseline(figure: Figure, baseline: &str, value: &Result<f64, String>) -> Figure {
    match value {
        Ok(value) => figure.against(baseline, Some(*value)),
        Err(why) => figure
            .against(baseline, None)
            .note(format!("baseline skipped: {why}")),
    }
}

pub fn shown(value: &Result<f64, String>, unit: &str) -> String {
    match value {
        Ok(value) => format!("{value:.3} {unit}"),
        Err(why) => format!("skipped ({why})"),
    }
}
