//! Scenario 8: target storage on Ceph RBD (issue 8), on a one-node cluster started for the run
//! under the work directory (`tests/ceph/one-node.sh`: one mon, one mgr, one bluestore OSD on a
//! sparse file, 127.0.0.1; every daemon stopped by PID at the end). Every figure beside its
//! baseline in the same run:
//! - initial replication of a random-data disk (2 GiB; `--quick` 256 MiB) from a source
//!   appliance to a target with `storage = "rbd"`, timed from the source's start until the disk
//!   is protected and the target acknowledged everything, beside `rbd import` of the same file
//!   with the same image features, once before and once after Ferry's run (the faster of the two
//!   is the baseline);
//! - 4 KiB random writes through the source's export (fio nbd engine, QD16), timed from fio's
//!   start until the target acknowledged every one (the replicated write rate into RBD), beside
//!   `rbd bench --io-type write --io-pattern rand --io-size 4K --io-threads 16` of the same bytes;
//! - the same writes while a recovery point is cut every 0.5 s (each then costs before-image
//!   reads from the image), beside the same writes without;
//! - the alternative design of points, RBD snapshots: `rbd bench` as above while an
//!   `rbd snap create` runs every 0.5 s, beside `rbd bench` alone; then `rbd diff --from-snap`
//!   (changed blocks since the first snapshot) and `rbd snap rm` of each (retention), timed.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_appliance::io::rbd::test_cluster::{ClusterSpec, TestCluster};

use super::figure::{Better, Figure};
use super::initial::{gib, start_replicating, verified_note, verify_timeout, RANDOM_JOURNAL};
use super::machine::load;
use super::pair::{Pair, RbdTarget};
use super::tools::{self, Tool};
use super::{Env, Scenario};

pub const STEPS: u64 = 8;

/// Image features of the `rbd import` and `rbd bench` baselines: those of Ferry's replicas.
const FEATURES: [&str; 4] = ["layering", "exclusive-lock", "object-map", "fast-diff"];
/// Writes in flight for fio and `rbd bench` alike.
const QUEUE_DEPTH: u32 = 16;
/// How often points are cut in the third part.
const CUT_PERIOD: Duration = Duration::from_millis(500);

pub fn run(env: &Env) -> anyhow::Result<Vec<Figure>> {
    for program in ["rbd", "ceph-mon", "ceph-osd", "ceph-mgr"] {
        if tools::which(program).is_none() {
            bail!("{program} is not installed (Debian packages ceph-mon ceph-osd ceph-mgr ceph-common)");
        }
    }
    if let Some(why) = env.tools.missing_reason(Tool::Fio) {
        bail!("the RBD scenario needs fio: {why}");
    }
    let disk_bytes: u64 = env.size.pick(16 << 20, 256 << 20, 2 << 30);
    let random_bytes: u64 = env.size.pick(4 << 20, 8 << 20, 64 << 20);
    let dir = env.scenario_dir(Scenario::Rbd)?;
    // The disk, and in the OSD's file: two imports and the replica (the first import is removed
    // before Ferry runs), with room for the OSD's own metadata.
    let osd_bytes = disk_bytes * 3 + (3 << 30);
    tools::need_free(&dir, disk_bytes + osd_bytes + (1 << 30))?;

    env.progress.step("starting a one-node Ceph cluster");
    let cluster = TestCluster::try_start(&ClusterSpec {
        parent: Some(dir.clone()),
        osd_bytes: Some(osd_bytes),
    })
    .map_err(|why| anyhow::anyhow!(why))?;
    env.log(&format!(
        "  one-node Ceph cluster up in {:.1} s",
        cluster.bring_up.as_secs_f64()
    ));
    let rbd = Rbd { cluster: &cluster };

    env.progress
        .step(&format!("writing a {} random disk", gib(disk_bytes)));
    let disk = dir.join("disk.raw");
    tools::random_image(&disk, disk_bytes, 0x5eed_0008)?;

    let load_before = load();
    env.progress.step("rbd import (before Ferry)");
    let import_before = rbd.import(&disk, "import-1")?;
    rbd.remove("import-1")?;

    env.progress.step("Ferry initial replication into RBD");
    let target = RbdTarget {
        conf: cluster.conf(),
        keyring: cluster.keyring(),
    };
    let (mut pair, took) = start_replicating(env, &dir, &disk, RANDOM_JOURNAL, Some(target))?;

    env.progress.step("rbd import (after Ferry)");
    let import_after = rbd.import(&disk, "import-2")?;
    rbd.remove("import-2")?;
    let load_after = load();
    let identical = pair.verify(verify_timeout(env.size));
    let import_best = import_before.min(import_after);
    let ferry_gb_s = disk_bytes as f64 / took.as_secs_f64() / 1e9;
    let import_gb_s = disk_bytes as f64 / import_best.as_secs_f64() / 1e9;
    env.log(&format!(
        "  initial replication of {} into RBD: {:.1} s ({ferry_gb_s:.3} GB/s); rbd import {:.1} s before, {:.1} s after",
        gib(disk_bytes),
        took.as_secs_f64(),
        import_before.as_secs_f64(),
        import_after.as_secs_f64()
    ));
    let mut figures = vec![Figure::new(
        format!(
            "initial replication into RBD, {} random data",
            gib(disk_bytes)
        ),
        ferry_gb_s,
        "GB/s",
        Better::Higher,
    )
    .against(
        "rbd import of the same file, same image features (faster of one run before and one after Ferry's)",
        Some(import_gb_s),
    )
    .aim("≥ 1.0x rbd import", 1.0)
    .note(verified_note(identical))
    .note(format!(
        "rbd import {:.1} s before, {:.1} s after; one-node cluster, OSD on a sparse file on the same disk; load {load_before} → {load_after}",
        import_before.as_secs_f64(),
        import_after.as_secs_f64()
    ))];

    // 4 KiB random writes replicated into the image, then rbd bench on an image of its own.
    env.progress
        .step("4 KiB random writes, replicated into RBD");
    let load_before = load();
    let plain = replicated_writes(env, &mut pair, disk_bytes, random_bytes, 1)?;
    env.progress.step("rbd bench 4 KiB random writes");
    let bench_iops = rbd.bench_write(disk_bytes, random_bytes, None)?.ops_per_s;
    let load_after = load();
    let ops = random_bytes / 4096;
    let ferry_iops = ops as f64 / plain.as_secs_f64();
    env.log(&format!(
        "  4 KiB random writes: Ferry {ferry_iops:.0} IOPS replicated, rbd bench {bench_iops:.0} IOPS"
    ));
    figures.push(
        Figure::new(
            format!(
                "4 KiB random writes replicated into RBD, QD{QUEUE_DEPTH}, {} MiB",
                random_bytes >> 20
            ),
            ferry_iops,
            "IOPS",
            Better::Higher,
        )
        .against(
            format!("rbd bench --io-type write --io-pattern rand --io-size 4K --io-threads {QUEUE_DEPTH}, same bytes"),
            Some(bench_iops),
        )
        .note(format!(
            "Ferry: fio nbd randwrite through the source export, timed until the target acknowledged every write (journaled, shipped, applied, flushed); load {load_before} → {load_after}"
        )),
    );

    env.progress
        .step("4 KiB random writes while cutting points every 0.5 s");
    let cutter = pair.start_cutting(CUT_PERIOD, 10_000);
    let with_points = replicated_writes(env, &mut pair, disk_bytes, random_bytes, 2);
    let (cut, failed) = cutter.stop()?;
    let with_points = with_points?;
    let without = replicated_writes(env, &mut pair, disk_bytes, random_bytes, 3)?;
    let identical = pair.verify(verify_timeout(env.size));
    let points_iops = ops as f64 / with_points.as_secs_f64();
    let without_iops = ops as f64 / without.as_secs_f64();
    env.log(&format!(
        "  with {cut} points cut: {points_iops:.0} IOPS; without: {without_iops:.0} IOPS"
    ));
    figures.push(
        Figure::new(
            format!(
                "4 KiB random writes replicated into RBD while cutting a point every {:.1} s",
                CUT_PERIOD.as_secs_f64()
            ),
            points_iops,
            "IOPS",
            Better::Higher,
        )
        .against("the same writes with no cut running", Some(without_iops))
        .note(format!(
            "{cut} points cut ({failed} cuts failed); each point's first write of a 4 KiB block reads its before-image from the image into the target's local undo log"
        ))
        .note(verified_note(identical)),
    );
    pair.stop_source()?;
    pair.stop_target()?;

    // The snapshot design's cost on the same cluster: rbd bench with an RBD snapshot every
    // 0.5 s against rbd bench alone, then the diff and the removal of those snapshots.
    env.progress
        .step("rbd bench with an RBD snapshot every 0.5 s, and without");
    let snapshots = rbd.bench_write(disk_bytes, random_bytes, Some(CUT_PERIOD))?;
    let alone = rbd.bench_write(disk_bytes, random_bytes, None)?;
    let shown = |value: Option<f64>| value.map_or("-".to_owned(), |ms| format!("{ms:.0} ms"));
    env.log(&format!(
        "  rbd bench with {} snapshots: {:.0} IOPS; without: {:.0} IOPS; snap create {}, diff {}, snap rm {}",
        snapshots.snapshots,
        snapshots.ops_per_s,
        alone.ops_per_s,
        shown(snapshots.snapshot_create_ms_mean),
        shown(snapshots.diff_ms),
        shown(snapshots.remove_ms_mean)
    ));
    figures.push(
        Figure::new(
            format!(
                "rbd bench 4 KiB random writes while taking an RBD snapshot every {:.1} s (the snapshot design of points)",
                CUT_PERIOD.as_secs_f64()
            ),
            snapshots.ops_per_s,
            "IOPS",
            Better::Higher,
        )
        .against("the same rbd bench with no snapshot", Some(alone.ops_per_s))
        .note(format!(
            "{} snapshots; mean `rbd snap create` {} and `rbd snap rm` {} (CLI start and connect included); `rbd diff --from-snap` first..head {}",
            snapshots.snapshots,
            shown(snapshots.snapshot_create_ms_mean),
            shown(snapshots.remove_ms_mean),
            shown(snapshots.diff_ms)
        )),
    );
    drop(cluster);
    Ok(figures)
}

/// `random_bytes` of 4 KiB random writes (seeded) through the source's export, timed from
/// fio's start until the target acknowledged all of them.
fn replicated_writes(
    env: &Env,
    pair: &mut Pair,
    disk_bytes: u64,
    random_bytes: u64,
    seed: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    tools::fio(
        &[
            "--name=random".into(),
            "--ioengine=nbd".into(),
            format!("--uri={}", pair.export_uri("os")),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            format!("--iodepth={QUEUE_DEPTH}"),
            format!("--size={disk_bytes}"),
            format!("--io_size={random_bytes}"),
            format!("--randseed={seed}"),
            "--norandommap".into(),
        ],
        "write",
    )?;
    pair.wait_replicated(Duration::from_secs(600), &|what| {
        env.progress.detail(&format!("replicating: {what}"))
    })?;
    Ok(start.elapsed())
}

/// The `rbd` CLI against the bench's cluster.
struct Rbd<'a> {
    cluster: &'a TestCluster,
}

impl Rbd<'_> {
    fn command(&self) -> Command {
        let mut command = Command::new("rbd");
        command
            .arg("-c")
            .arg(self.cluster.conf())
            .arg("--keyring")
            .arg(self.cluster.keyring());
        command
    }

    fn feature_args(command: &mut Command) {
        for feature in FEATURES {
            command.args(["--image-feature", feature]);
        }
    }

    /// `rbd import` of `file` into a new image, page cache dropped first; how long it took.
    fn import(&self, file: &Path, image: &str) -> anyhow::Result<Duration> {
        tools::drop_caches();
        let mut command = self.command();
        command.args(["import", "--no-progress"]);
        Self::feature_args(&mut command);
        command.arg(file).arg(format!("rbd/{image}"));
        let start = Instant::now();
        tools::output(&mut command)?;
        Ok(start.elapsed())
    }

    fn remove(&self, image: &str) -> anyhow::Result<()> {
        tools::output(
            self.command()
                .args(["rm", "--no-progress"])
                .arg(format!("rbd/{image}")),
        )?;
        Ok(())
    }

    /// `rbd bench` 4 KiB random writes of `total` bytes into a new image; ops per second. With
    /// `snapshot_period`, an `rbd snap create` runs every period meanwhile (the snapshot design
    /// of recovery points), and the snapshots' diff and removal are timed afterwards.
    fn bench_write(
        &self,
        size: u64,
        total: u64,
        snapshot_period: Option<Duration>,
    ) -> anyhow::Result<BenchRun> {
        let mut create = self.command();
        create.args(["create", "--size", &format!("{}M", size >> 20)]);
        Self::feature_args(&mut create);
        tools::output(create.arg("rbd/bench"))?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let snapshotter = snapshot_period.map(|period| {
            let stop = stop.clone();
            let conf = self.cluster.conf();
            let keyring = self.cluster.keyring();
            std::thread::spawn(move || {
                let mut taken = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && taken.len() < 10_000 {
                    let started = Instant::now();
                    let name = format!("p{}", taken.len());
                    let created = Command::new("rbd")
                        .arg("-c")
                        .arg(&conf)
                        .arg("--keyring")
                        .arg(&keyring)
                        .args(["snap", "create", "--no-progress"])
                        .arg(format!("rbd/bench@{name}"))
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status();
                    if created.is_ok_and(|status| status.success()) {
                        taken.push((name, started.elapsed()));
                    }
                    // Pacing, not synchronisation: one snapshot per period.
                    std::thread::sleep(period.saturating_sub(started.elapsed()));
                }
                taken
            })
        });
        let text = tools::output(self.command().args([
            "bench",
            "--io-type",
            "write",
            "--io-pattern",
            "rand",
            "--io-size",
            "4K",
            "--io-threads",
            &QUEUE_DEPTH.to_string(),
            "--io-total",
            &total.to_string(),
            "rbd/bench",
        ]));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let taken = match snapshotter {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("the snapshot thread panicked"))?,
            None => Vec::new(),
        };
        let text = text?;
        let ops_per_s = bench_ops_per_s(&text)
            .with_context(|| format!("no `ops/sec:` in rbd bench's summary: {text:?}"))?;
        let mut run = BenchRun {
            ops_per_s,
            snapshots: taken.len(),
            snapshot_create_ms_mean: mean_ms(taken.iter().map(|(_, took)| *took)),
            diff_ms: None,
            remove_ms_mean: None,
        };
        if let Some((first, _)) = taken.first() {
            // Changed blocks between the first point and the head: the diff iterator.
            let started = Instant::now();
            tools::output(
                self.command()
                    .args(["diff", "--from-snap", first])
                    .arg("rbd/bench"),
            )?;
            run.diff_ms = Some(started.elapsed().as_secs_f64() * 1e3);
            // Retention: remove every snapshot, one by one.
            let mut removals = Vec::new();
            for (name, _) in &taken {
                let started = Instant::now();
                tools::output(
                    self.command()
                        .args(["snap", "rm", "--no-progress"])
                        .arg(format!("rbd/bench@{name}")),
                )?;
                removals.push(started.elapsed());
            }
            run.remove_ms_mean = mean_ms(removals.into_iter());
        }
        self.remove("bench")?;
        Ok(run)
    }
}

/// One `rbd bench` run.
struct BenchRun {
    ops_per_s: f64,
    snapshots: usize,
    /// Mean wall time of one `rbd snap create` (CLI start and cluster connect included).
    snapshot_create_ms_mean: Option<f64>,
    /// `rbd diff --from-snap <first>` of the image afterwards.
    diff_ms: Option<f64>,
    /// Mean wall time of one `rbd snap rm` (CLI start and cluster connect included).
    remove_ms_mean: Option<f64>,
}

fn mean_ms(durations: impl Iterator<Item = Duration>) -> Option<f64> {
    let all: Vec<f64> = durations.map(|took| took.as_secs_f64() * 1e3).collect();
    (!all.is_empty()).then(|| all.iter().sum::<f64>() / all.len() as f64)
}

/// The ops/s of `rbd bench`'s summary line (`elapsed: 4  ops: 16384  ops/sec: 3801.2  bytes/sec: …`).
fn bench_ops_per_s(text: &str) -> Option<f64> {
    let line = text.lines().rev().find(|line| line.contains("elapsed:"))?;
    let mut words = line.split_whitespace();
    words.find(|word| *word == "ops/sec:")?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ops_per_second_of_rbd_bench() {
        let text = "bench  type write io_size 4096 io_threads 16 bytes 16777216 pattern random\n  SEC       OPS   OPS/SEC   BYTES/SEC\n    1      3952   3968.05    16 MiB/s\nelapsed: 1   ops: 4096   ops/sec: 3807.41   bytes/sec: 15 MiB/s\n";
        assert_eq!(bench_ops_per_s(text), Some(3807.41));
        assert_eq!(bench_ops_per_s("no summary"), None);
    }
}
