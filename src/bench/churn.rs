//! Scenario 3: steady churn through the source's NBD export with replication running — fio's nbd
//! engine, 4 KiB random writes at QD32 and 64 KiB sequential writes at QD8 — beside the same jobs
//! against `nbdkit file` on an equal image: accepted MB/s and write latency p50/p99. Then the
//! RPO lag (the source's `rpo_lag_seconds`, sampled through `ferry status --json`) at 50, 100 and
//! 250 MB/s of offered churn.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::figure::{quantile, Better, Figure};
use super::initial::{replication_deadline, verified_note, verify_timeout};
use super::pair::{DiskSpec, Pair, PairOptions};
use super::tools::{self, FioResult, Tool};
use super::{Env, Scenario};

pub const STEPS: u64 = 4;

/// Offered churn rates of the RPO measurement, MB/s (10^6 B/s).
const RPO_RATES_MB: [u64; 3] = [50, 100, 250];
/// Status sampling period while measuring RPO lag.
const RPO_SAMPLE: Duration = Duration::from_millis(200);

struct Job {
    label: &'static str,
    args: &'static [&'static str],
}

const JOBS: [Job; 2] = [
    Job {
        label: "4 KiB random write QD32",
        args: &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    },
    Job {
        label: "64 KiB sequential write QD8",
        args: &["--rw=write", "--bs=64k", "--iodepth=8"],
    },
];

fn fio_args(uri: &str, size_bytes: u64, runtime: Duration, job: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--name=churn".to_owned(),
        "--ioengine=nbd".to_owned(),
        format!("--uri={uri}"),
        format!("--size={size_bytes}"),
        "--time_based".to_owned(),
        format!("--runtime={}ms", runtime.as_millis()),
        "--randrepeat=0".to_owned(),
    ];
    args.extend(job.iter().map(|arg| (*arg).to_owned()));
    args
}

pub fn run(env: &Env) -> anyhow::Result<Vec<Figure>> {
    if let Some(why) = env.tools.missing_reason(Tool::Fio) {
        bail!("the churn workload needs fio: {why}");
    }
    let size_bytes: u64 = env.size.pick(64 << 20, 256 << 20, 1 << 30);
    let runtime = env.size.pick(
        Duration::from_secs(2),
        Duration::from_secs(3),
        Duration::from_secs(15),
    );
    let dir = env.scenario_dir(Scenario::Churn)?;
    tools::need_free(&dir, size_bytes * 3 + (2 << 30))?;
    env.progress.step("preparing the disk and its replica");
    let disk = dir.join("disk.raw");
    let peer_image = dir.join("nbdkit.raw");
    tools::zero_image(&disk, size_bytes)?;
    tools::zero_image(&peer_image, size_bytes)?;

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
        },
    )?;
    pair.start_target()?;
    pair.start_source()?;
    pair.wait_replicated(replication_deadline(env.size), &|what| {
        env.progress.detail(&format!("initial replication: {what}"))
    })?;
    let uri = pair.export_uri("os");

    let nbdkit = if let Some(why) = env.tools.missing_reason(Tool::Nbdkit) {
        Err(why)
    } else {
        Nbdkit::start(&dir.join("nbdkit.sock"), &peer_image).map_err(|error| format!("{error:#}"))
    };

    let mut figures = Vec::new();
    for job in &JOBS {
        env.progress
            .step(&format!("{}: Ferry export, then nbdkit file", job.label));
        let ferry = tools::fio(&fio_args(&uri, size_bytes, runtime, job.args), "write")?;
        let baseline: Result<FioResult, String> = match &nbdkit {
            Ok(server) => tools::fio(
                &fio_args(&server.uri(), size_bytes, runtime, job.args),
                "write",
            )
            .map_err(|error| format!("fio against nbdkit failed: {error:#}")),
            Err(why) => Err(why.clone()),
        };
        env.log(&format!(
            "  churn {}: Ferry {:.0} MB/s p50 {:.3} ms p99 {:.3} ms; nbdkit {}",
            job.label,
            ferry.bytes_per_s / 1e6,
            ferry.latency_p50_ms,
            ferry.latency_p99_ms,
            match &baseline {
                Ok(b) => format!(
                    "{:.0} MB/s p50 {:.3} ms p99 {:.3} ms",
                    b.bytes_per_s / 1e6,
                    b.latency_p50_ms,
                    b.latency_p99_ms
                ),
                Err(why) => format!("skipped ({why})"),
            }
        ));
        let against = |figure: Figure, value: fn(&FioResult) -> f64| -> Figure {
            match &baseline {
                Ok(b) => figure.against("the same fio job against nbdkit file", Some(value(b))),
                Err(why) => figure
                    .against("the same fio job against nbdkit file", None)
                    .note(format!("baseline skipped: {why}")),
            }
        };
        figures.push(
            against(
                Figure::new(
                    format!("churn {}, accepted (fio nbd engine)", job.label),
                    ferry.bytes_per_s / 1e6,
                    "MB/s",
                    Better::Higher,
                ),
                |b| b.bytes_per_s / 1e6,
            )
            .aim("≥ 0.9x nbdkit", 0.9),
        );
        figures.push(against(
            Figure::new(
                format!("churn {}, write latency p50", job.label),
                ferry.latency_p50_ms,
                "ms",
                Better::Lower,
            ),
            |b| b.latency_p50_ms,
        ));
        figures.push(against(
            Figure::new(
                format!("churn {}, write latency p99", job.label),
                ferry.latency_p99_ms,
                "ms",
                Better::Lower,
            ),
            |b| b.latency_p99_ms,
        ));
    }
    drop(nbdkit);

    env.progress.step("RPO lag at 50, 100 and 250 MB/s offered");
    // Start from an empty backlog.
    pair.wait_replicated(replication_deadline(env.size), &|what| {
        env.progress.detail(&format!("draining: {what}"))
    })?;
    for rate_mb in RPO_RATES_MB {
        env.progress.detail(&format!(
            "RPO lag at {rate_mb} MB/s offered (64 KiB writes)"
        ));
        let mut args = fio_args(
            &uri,
            size_bytes,
            runtime,
            &["--rw=write", "--bs=64k", "--iodepth=4"],
        );
        args.push(format!("--rate={}", rate_mb * 1_000_000));
        args.push("--output-format=json".to_owned());
        let mut fio = Command::new("fio")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start fio")?;
        let mut lags = Vec::new();
        let deadline = Instant::now() + runtime + Duration::from_secs(60);
        // Bounded: fio's runtime plus a minute.
        while fio.try_wait().context("waitpid fio")?.is_none() {
            if Instant::now() > deadline {
                let _ = fio.kill();
                let _ = fio.wait();
                bail!("fio at {rate_mb} MB/s did not end in time");
            }
            if let Ok(snapshot) = pair.status("source") {
                lags.extend(snapshot.disks.iter().map(|disk| disk.rpo_lag_seconds));
            }
            std::thread::sleep(RPO_SAMPLE);
        }
        let output = fio.wait_with_output().context("fio output")?;
        let accepted_mb = accepted_mb(&output.stdout);
        // The backlog left when the writes stop counts too: sample until it drains.
        let drained = Instant::now();
        pair.wait_replicated(replication_deadline(env.size), &|what| {
            env.progress.detail(&format!("draining: {what}"))
        })?;
        let drain_s = drained.elapsed().as_secs_f64();
        let p50 = quantile(&lags, 0.5).unwrap_or(0.0);
        let p99 = quantile(&lags, 0.99).unwrap_or(0.0);
        env.log(&format!(
            "  RPO lag at {rate_mb} MB/s offered ({accepted_mb:.0} MB/s accepted): p50 {p50:.3} s, p99 {p99:.3} s over {} samples; drained {drain_s:.1} s after the writes stopped",
            lags.len()
        ));
        let note = format!(
            "{accepted_mb:.0} MB/s accepted of {rate_mb} offered; {} samples; backlog drained {drain_s:.1} s after the writes stopped",
            lags.len()
        );
        figures.push(
            Figure::new(
                format!("RPO lag p50 at {rate_mb} MB/s offered churn"),
                p50,
                "s",
                Better::Lower,
            )
            .note(note.clone()),
        );
        let p99_figure = Figure::new(
            format!("RPO lag p99 at {rate_mb} MB/s offered churn"),
            p99,
            "s",
            Better::Lower,
        )
        .against("1 s (the aim at 250 MB/s)", Some(1.0))
        .note(note);
        figures.push(if rate_mb == 250 {
            p99_figure.aim("p99 under 1 s", 1.0)
        } else {
            p99_figure
        });
    }
    let identical = pair.verify(verify_timeout(env.size));
    pair.stop_source()?;
    pair.stop_target()?;
    if let Some(first) = figures.first_mut() {
        *first = first.clone().note(verified_note(identical));
    }
    Ok(figures)
}

/// Accepted write rate from fio's JSON output, MB/s (0 when unreadable).
fn accepted_mb(stdout: &[u8]) -> f64 {
    let text = String::from_utf8_lossy(stdout);
    let Some(start) = text.find('{') else {
        return 0.0;
    };
    serde_json::from_str::<serde_json::Value>(&text[start..])
        .ok()
        .and_then(|json| json["jobs"][0]["write"]["bw_bytes"].as_f64())
        .map_or(0.0, |bytes| bytes / 1e6)
}

/// `nbdkit file` serving an image on a unix socket, stopped when dropped.
struct Nbdkit {
    child: Child,
    socket: PathBuf,
}

impl Nbdkit {
    fn start(socket: &Path, image: &Path) -> anyhow::Result<Nbdkit> {
        let mut child = Command::new("nbdkit")
            .arg("--foreground")
            .arg("--exit-with-parent")
            .arg("-U")
            .arg(socket)
            .arg("file")
            .arg(format!("file={}", image.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nbdkit")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = child.try_wait().context("waitpid nbdkit")? {
                bail!("nbdkit exited at start ({status})");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("nbdkit did not create {} within 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Nbdkit {
            child,
            socket: socket.to_path_buf(),
        })
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
