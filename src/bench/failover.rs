//! Scenario 7: failover time to a readable export of a 4 GiB disk at a recovery point 1 GiB of
//! writes back. The source cuts a point (`ferry recovery-point create`), 1 GiB is written through
//! its export and replicated, then `ferry failover --test` on the target is timed until the
//! group's export (from the target's `ferry status --json`) answers a read that shows the
//! point's data. Baseline: `qemu-img convert -n` of the replica to a new file, the time a full
//! point-in-time copy takes. A binary without these commands (issue 5) reports so.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::figure::{Better, Figure};
use super::initial::{replication_deadline, shown, verified_note, verify_timeout, with_baseline};
use super::pair::{DiskSpec, Pair, PairOptions, GROUP, MACHINE};
use super::tools::{self, Tool};
use super::{Env, Scenario};

pub const STEPS: u64 = 4;

const NAME: &str = "failover to a readable export";

/// Whether this binary has `subcommand` (clap exits 0 on `SUBCOMMAND --help`).
fn has_subcommand(exe: &Path, subcommand: &str) -> bool {
    Command::new(exe)
        .args([subcommand, "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

pub fn run(env: &Env) -> anyhow::Result<Vec<Figure>> {
    let (disk_bytes, written_bytes): (u64, u64) = env.size.pick(
        (64 << 20, 16 << 20),
        (512 << 20, 128 << 20),
        (4 << 30, 1 << 30),
    );
    let title = format!(
        "{NAME}, {} MiB disk, point {} MiB of writes back",
        disk_bytes >> 20,
        written_bytes >> 20
    );
    env.progress.step("checking for `ferry failover`");
    if !has_subcommand(&env.exe, "failover") || !has_subcommand(&env.exe, "recovery-point") {
        return Ok(vec![Figure::failed(
            &title,
            "not available in this build: `ferry recovery-point` / `ferry failover` (issue 5) are not in this binary",
        )]);
    }
    for tool in [Tool::Fio, Tool::QemuIo] {
        if let Some(why) = env.tools.missing_reason(tool) {
            bail!("the failover scenario needs {}: {why}", tool.program());
        }
    }
    let dir = env.scenario_dir(Scenario::Failover)?;
    tools::need_free(&dir, disk_bytes * 3 + (2 << 30))?;
    let disk = dir.join("disk.raw");
    tools::zero_image(&disk, disk_bytes)?;
    let mut pair = Pair::prepare(
        &env.exe,
        &dir.join("pair"),
        &PairOptions {
            disks: vec![DiskSpec {
                name: "os".into(),
                path: disk.clone(),
            }],
            journal_size: env.size.pick("64MiB", "256MiB", "1GiB").into(),
            relay: false,
            rbd: None,
        },
    )?;
    pair.start_target()?;
    pair.start_source()?;
    pair.wait_replicated(replication_deadline(env.size), &|what| {
        env.progress.detail(&format!("initial replication: {what}"))
    })?;

    env.progress.step(&format!(
        "recovery point, then {} MiB written through the export",
        written_bytes >> 20
    ));
    let created = tools::output(
        Command::new(&env.exe)
            .args(["recovery-point", "create", "--group", GROUP, "--socket"])
            .arg(pair.socket_path("source")),
    )?;
    let point = first_number(&created)
        .with_context(|| format!("no point id in `ferry recovery-point create`: {created:?}"))?;
    tools::fio(
        &[
            "--name=after-point".into(),
            "--ioengine=nbd".into(),
            format!("--uri={}", pair.export_uri("os")),
            format!("--size={written_bytes}"),
            "--rw=write".into(),
            "--bs=1M".into(),
            "--iodepth=8".into(),
        ],
        "write",
    )?;
    pair.wait_replicated(replication_deadline(env.size), &|what| {
        env.progress
            .detail(&format!("replicating the writes: {what}"))
    })?;
    // Wait until the target lists the point (its marker is durable there).
    let listed_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let snapshot = pair.status("target")?;
        let listed = snapshot.groups.iter().any(|group| {
            group.name == GROUP && group.recovery_points.iter().any(|p| p.id == point)
        });
        if listed {
            break;
        }
        if Instant::now() > listed_deadline {
            bail!("the target did not list recovery point {point} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    env.progress
        .step("test failover to the point, until its export reads");
    let start = Instant::now();
    let answer = tools::output(
        Command::new(&env.exe)
            .args(["failover", "--group", GROUP, "--json", "--point"])
            .arg(point.to_string())
            .arg("--test")
            .arg("--socket")
            .arg(pair.socket_path("target")),
    )?;
    let uri = export_uri(&answer)?;
    // The point predates the writes: its first MiB reads as the zeros the disk held then.
    let read_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read = tools::output(Command::new("qemu-io").args([
            "-r",
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0 0 1M",
        ]));
        match read {
            Ok(text) if !text.contains("fail") && !text.contains("Pattern verification") => break,
            Ok(text) => bail!("the failover export does not show the point's data: {text}"),
            Err(error) if Instant::now() > read_deadline => {
                return Err(error).context("the failover export never answered a read")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let seconds = start.elapsed().as_secs_f64();

    // Correctness beyond the first MiB: the whole written range at the point.
    let whole = tools::output(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &uri,
        "-c",
        &format!("read -P 0 0 {written_bytes}"),
    ]));
    let checked = match whole {
        Ok(text) if !text.contains("fail") && !text.contains("Pattern verification") => {
            format!(
                "the export reads the point's zeros over all {} MiB written after it",
                written_bytes >> 20
            )
        }
        Ok(text) => format!("EXPORT DIFFERS FROM THE POINT: {}", text.trim()),
        Err(error) => format!("reading the export failed: {error:#}"),
    };
    let _ = tools::output(
        Command::new(&env.exe)
            .args(["failover", "cleanup", "--group", GROUP, "--socket"])
            .arg(pair.socket_path("target")),
    );

    // Baseline: a full copy of the replica, the naive way to a point-in-time disk.
    let copy = if let Some(why) = env.tools.missing_reason(Tool::QemuImg) {
        Err(why)
    } else {
        let replica = replica_path(&pair)?;
        let to = dir.join("copy.raw");
        let result = tools::sparse_image(&to, disk_bytes).and_then(|()| {
            tools::drop_caches();
            let start = Instant::now();
            tools::output(
                Command::new("qemu-img")
                    .args(["convert", "-n", "-f", "raw", "-O", "raw"])
                    .arg(&replica)
                    .arg(&to),
            )?;
            tools::sync_file(&to)?;
            Ok(start.elapsed().as_secs_f64())
        });
        let _ = std::fs::remove_file(&to);
        result.map_err(|error| format!("qemu-img failed: {error:#}"))
    };
    let cut_cost = cut_cost(env, &pair)?;
    let identical = pair.verify(verify_timeout(env.size));
    pair.stop_source()?;
    pair.stop_target()?;
    env.log(&format!(
        "  test failover to point {point}: export readable after {seconds:.2} s; full copy of the replica {}",
        shown(&copy, "s")
    ));
    let mut figures = vec![with_baseline(
        Figure::new(title, seconds, "s", Better::Lower),
        "qemu-img convert -n of the replica to a new file (a full point-in-time copy)",
        &copy,
    )
    .note(checked)
    .note(verified_note(identical))];
    figures.extend(cut_cost);
    Ok(figures)
}

/// Points cut per second while the cut-cost job runs (one `ferry recovery-point create` every
/// `1 / CUTS_PER_S` s: far more often than any interval an operator sets, to make the cost show).
const CUTS_PER_S: u64 = 10;

/// The write-latency cost of cutting group points: the same 4 KiB random-write job at QD1
/// through the source export, alone and then while points are cut `CUTS_PER_S` times a second.
fn cut_cost(env: &Env, pair: &Pair) -> anyhow::Result<Vec<Figure>> {
    let seconds: u64 = env.size.pick(2, 3, 10);
    env.progress.step(&format!(
        "write latency alone, then with {CUTS_PER_S} cuts/s ({seconds} s each)"
    ));
    let job: Vec<String> = vec![
        "--name=cut-cost".into(),
        "--ioengine=nbd".into(),
        format!("--uri={}", pair.export_uri("os")),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        "--iodepth=1".into(),
        "--size=256M".into(),
        "--time_based".into(),
        format!("--runtime={seconds}"),
    ];
    let alone = tools::fio(&job, "write")?;
    // Bounded by count as well as by the job's end.
    let cutter = pair.start_cutting(
        Duration::from_millis(1000 / CUTS_PER_S),
        (seconds + 30) * CUTS_PER_S,
    );
    let with_cuts = tools::fio(&job, "write");
    let (cut, failed) = cutter.stop()?;
    let with_cuts = with_cuts?;
    env.log(&format!(
        "  4 KiB QD1 write latency p50/p99: alone {:.3}/{:.3} ms, with {cut} cuts {:.3}/{:.3} ms",
        alone.latency_p50_ms,
        alone.latency_p99_ms,
        with_cuts.latency_p50_ms,
        with_cuts.latency_p99_ms
    ));
    let note = format!(
        "{cut} points cut during the {seconds} s job ({failed} cuts failed); fio nbd 4 KiB random writes QD1"
    );
    let baseline = "the same job with no cut running";
    Ok(vec![
        Figure::new(
            format!("write latency p50 while cutting {CUTS_PER_S} points/s"),
            with_cuts.latency_p50_ms,
            "ms",
            Better::Lower,
        )
        .against(baseline, Some(alone.latency_p50_ms))
        .note(note.clone()),
        Figure::new(
            format!("write latency p99 while cutting {CUTS_PER_S} points/s"),
            with_cuts.latency_p99_ms,
            "ms",
            Better::Lower,
        )
        .against(baseline, Some(alone.latency_p99_ms))
        .note(note),
    ])
}

/// The export of the bench's machine in `ferry failover --json`'s answer.
fn export_uri(answer: &str) -> anyhow::Result<String> {
    let response: ferry_appliance::control::Response = serde_json::from_str(answer)
        .with_context(|| format!("ferry failover --json printed {answer:?}"))?;
    match response {
        ferry_appliance::control::Response::Failover { exports, .. } => exports
            .into_iter()
            .find(|export| export.machine == MACHINE)
            .map(|export| export.uri)
            .context("the failover answer lists no export of the bench's machine"),
        other => anyhow::bail!("ferry failover answered {other:?}"),
    }
}

fn replica_path(pair: &Pair) -> anyhow::Result<std::path::PathBuf> {
    let snapshot = pair.status("target")?;
    snapshot
        .replicas
        .iter()
        .find(|replica| replica.name == "os")
        .map(|replica| std::path::PathBuf::from(&replica.replica_path))
        .context("the target lists no replica")
}

/// The first unsigned integer in `text` (a point id is a millisecond timestamp or larger).
fn first_number(text: &str) -> Option<u64> {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|word| !word.is_empty())
        .and_then(|word| word.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_number_finds_the_point_id() {
        assert_eq!(
            super::first_number("point 1795712973347 created"),
            Some(1795712973347)
        );
        assert_eq!(super::first_number("1795712973347\n"), Some(1795712973347));
        assert_eq!(super::first_number("no id"), None);
    }
}
