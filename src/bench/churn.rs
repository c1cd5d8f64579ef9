//! Scenario 3: steady churn through the source's NBD export with replication running — fio's nbd
//! engine, 4 KiB random writes at QD32 and 64 KiB sequential writes at QD8 — beside the same jobs
//! against two `nbdkit file` servers, each on its own equal image: accepted MB/s and write
//! latency p50/p99. Then the RPO lag (the source's `rpo_lag_seconds`, sampled through `ferry
//! status --json`) at 50, 100 and 250 MB/s of offered churn.
//!
//! The two baselines promise different things before a FLUSH (fio sends none here), and both
//! are reported: plain `nbdkit file` answers a write once it is in the page cache;
//! `nbdkit file cache=none` starts the write's writeback (sync_file_range) before it answers,
//! waits for older writes and drops their pages. Every image starts with no cached pages: a page left by the zeroing
//! would push O_DIRECT writes to io_uring's workers (kernel-notes/io_uring.md).

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

/// One `nbdkit file` baseline: its label in the table, its extra plugin argument, and what it
/// promises before a FLUSH (the row note).
struct Baseline {
    label: &'static str,
    image: &'static str,
    cache_arg: Option<&'static str>,
    promise: &'static str,
}

const BASELINES: [Baseline; 2] = [
    Baseline {
        label: "the same fio job against nbdkit file",
        image: "nbdkit.raw",
        cache_arg: None,
        promise: "nbdkit file answers a write once it is in the page cache (not yet sent to the device); Ferry answers once the write is journaled and on the device (O_DIRECT) or, where O_DIRECT is unavailable, in the page cache — FLUSH/FUA make both durable",
    },
    Baseline {
        label: "the same fio job against nbdkit file cache=none",
        image: "nbdkit-cache-none.raw",
        cache_arg: Some("cache=none"),
        promise: "like for like: nbdkit file cache=none starts each write's writeback to the device (sync_file_range) before it answers, waits for older ones and drops their pages, as Ferry's O_DIRECT write reaches the device before the answer (neither flushes the device cache: FLUSH/FUA do); Ferry also journals every write and replicates it on the same 2 cores, nbdkit does neither",
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
    // Nine runs of this (two jobs on three servers, three offered rates): `--quick`'s share of
    // its two minutes.
    let runtime = env.size.pick(
        Duration::from_secs(2),
        Duration::from_secs(2),
        Duration::from_secs(15),
    );
    let dir = env.scenario_dir(Scenario::Churn)?;
    tools::need_free(&dir, size_bytes * 4 + (2 << 30))?;
    env.progress.step("preparing the disk and its replica");
    let disk = dir.join("disk.raw");
    tools::zero_image(&disk, size_bytes)?;
    for baseline in &BASELINES {
        tools::zero_image(&dir.join(baseline.image), size_bytes)?;
    }
    // No image starts with pages in the page cache (the zeroing left them there).
    tools::drop_caches();

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
    let uri = pair.export_uri("os");

    let servers: Vec<Result<Nbdkit, String>> = BASELINES
        .iter()
        .map(|baseline| {
            if let Some(why) = env.tools.missing_reason(Tool::Nbdkit) {
                return Err(why);
            }
            let socket = dir.join(baseline.image).with_extension("sock");
            Nbdkit::start(&socket, &dir.join(baseline.image), baseline.cache_arg)
                .map_err(|error| format!("{error:#}"))
        })
        .collect();

    let mut figures = Vec::new();
    for job in &JOBS {
        env.progress.step(&format!(
            "{}: Ferry export, then nbdkit file, then nbdkit file cache=none",
            job.label
        ));
        let ferry = tools::fio(&fio_args(&uri, size_bytes, runtime, job.args), "write")?;
        let baselines: Vec<Result<FioResult, String>> = servers
            .iter()
            .map(|server| match server {
                Ok(server) => tools::fio(
                    &fio_args(&server.uri(), size_bytes, runtime, job.args),
                    "write",
                )
                .map_err(|error| format!("fio against nbdkit failed: {error:#}")),
                Err(why) => Err(why.clone()),
            })
            .collect();
        let shown: Vec<String> = BASELINES
            .iter()
            .zip(&baselines)
            .map(|(baseline, result)| match result {
                Ok(b) => format!(
                    "nbdkit{} {:.0} MB/s p50 {:.3} ms p99 {:.3} ms",
                    baseline
                        .cache_arg
                        .map(|arg| format!(" {arg}"))
                        .unwrap_or_default(),
                    b.bytes_per_s / 1e6,
                    b.latency_p50_ms,
                    b.latency_p99_ms
                ),
                Err(why) => format!("nbdkit skipped ({why})"),
            })
            .collect();
        env.log(&format!(
            "  churn {}: Ferry {:.0} MB/s p50 {:.3} ms p99 {:.3} ms; {}",
            job.label,
            ferry.bytes_per_s / 1e6,
            ferry.latency_p50_ms,
            ferry.latency_p99_ms,
            shown.join("; ")
        ));
        let against = |figure: &Figure, value: fn(&FioResult) -> f64| -> Vec<Figure> {
            BASELINES
                .iter()
                .zip(&baselines)
                .map(|(baseline, result)| match result {
                    Ok(b) => figure.clone().against(baseline.label, Some(value(b))),
                    Err(why) => figure
                        .clone()
                        .against(baseline.label, None)
                        .note(format!("baseline skipped: {why}")),
                })
                .collect()
        };
        let accepted = Figure::new(
            format!("churn {}, accepted (fio nbd engine)", job.label),
            ferry.bytes_per_s / 1e6,
            "MB/s",
            Better::Higher,
        );
        figures.extend(
            against(&accepted, |b| b.bytes_per_s / 1e6)
                .into_iter()
                .zip(&BASELINES)
                .map(|(figure, baseline)| figure.aim("≥ 0.9x nbdkit", 0.9).note(baseline.promise)),
        );
        figures.extend(against(
            &Figure::new(
                format!("churn {}, write latency p50", job.label),
                ferry.latency_p50_ms,
                "ms",
                Better::Lower,
            ),
            |b| b.latency_p50_ms,
        ));
        figures.extend(against(
            &Figure::new(
                format!("churn {}, write latency p99", job.label),
                ferry.latency_p99_ms,
                "ms",
                Better::Lower,
            ),
            |b| b.latency_p99_ms,
        ));
    }
    drop(servers);

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
    /// `cache_arg`: an extra plugin argument (`cache=none`).
    fn start(socket: &Path, image: &Path, cache_arg: Option<&str>) -> anyhow::Result<Nbdkit> {
        let mut child = Command::new("nbdkit")
            .arg("--foreground")
            .arg("--exit-with-parent")
            .arg("-U")
            .arg(socket)
            .arg("file")
            .arg(format!("file={}", image.display()))
            .args(cache_arg)
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
