//! Disk engine throughput: 1 MiB sequential O_DIRECT writes at QD32 and 4 KiB random O_DIRECT
//! writes at QD64, through Ferry's io_uring engine, its thread-pool fallback, and `fio` (io_uring
//! engine) on the same file in the same run, so the ratio is meaningful on a noisy machine.
//!
//! `cargo bench --bench disk` runs the full measurement (1 GiB file, median of 3 runs each);
//! under `cargo test` (no `--bench` argument) it runs a seconds-long smoke version.
//! Set FERRY_BENCH_DIR to put the file on another filesystem (default: cargo's target tmp dir).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use ferry_appliance::io::disk::{DirectMode, Disk, DiskOptions, EngineChoice, EngineKind, IoBuf};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Plan {
    file_bytes: u64,
    random_ops: u64,
    runs: usize,
    with_fio: bool,
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    block_bytes: usize,
    queue_depth: usize,
    random: bool,
}

const SEQUENTIAL: Workload = Workload {
    name: "seq write 1 MiB QD32",
    block_bytes: 1 << 20,
    queue_depth: 32,
    random: false,
};
const RANDOM: Workload = Workload {
    name: "rand write 4 KiB QD64",
    block_bytes: 4096,
    queue_depth: 64,
    random: true,
};

/// One contender's result: throughput and CPU time (user + system, all threads) per request.
#[derive(Clone, Copy)]
struct Sample {
    bytes_per_s: f64,
    cpu_us_per_op: f64,
}

/// CPU time of this process so far (user + system, all threads, incl. io_uring workers), from
/// /proc/self/stat in clock ticks (100 Hz).
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" that ends the command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs `workload` on `disk` with `queue_depth` closed-loop tasks.
async fn run_engine(disk: &Disk, workload: Workload, plan: &Plan, seed: u64) -> Sample {
    let block_count = plan.file_bytes / workload.block_bytes as u64;
    let ops_total = if workload.random {
        plan.random_ops
    } else {
        block_count
    };
    let started = Instant::now();
    let cpu_started_s = process_cpu_s();
    let mut tasks = tokio::task::JoinSet::new();
    for task_index in 0..workload.queue_depth as u64 {
        let disk = disk.clone();
        tasks.spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ task_index);
            let mut buf = IoBuf::zeroed(workload.block_bytes);
            buf.fill((task_index as u8) | 1);
            let mut op = task_index;
            while op < ops_total {
                let block = if workload.random {
                    rng.gen_range(0..block_count)
                } else {
                    op
                };
                let (result, returned) = disk
                    .write_at(block * workload.block_bytes as u64, buf)
                    .await;
                result.expect("bench write");
                buf = returned;
                op += workload.queue_depth as u64;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("bench task");
    }
    // Timed up to the last completion, like fio's bandwidth figure; the flush is not timed
    // (O_DIRECT completions are already in the device).
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_s = process_cpu_s() - cpu_started_s;
    disk.flush().await.expect("bench flush");
    Sample {
        bytes_per_s: (ops_total * workload.block_bytes as u64) as f64 / elapsed,
        cpu_us_per_op: cpu_s * 1e6 / ops_total as f64,
    }
}

fn run_fio(path: &Path, workload: Workload, plan: &Plan) -> Option<Sample> {
    let mut command = Command::new("fio");
    command.args([
        "--name=ferry-disk-bench",
        "--ioengine=io_uring",
        "--direct=1",
        "--output-format=json",
        &format!("--filename={}", path.display()),
        &format!("--bs={}", workload.block_bytes),
        &format!("--iodepth={}", workload.queue_depth),
        &format!("--size={}", plan.file_bytes),
    ]);
    if workload.random {
        command.args([
            "--rw=randwrite",
            "--randrepeat=0",
            &format!("--number_ios={}", plan.random_ops),
        ]);
    } else {
        command.arg("--rw=write");
    }
    let output = command.output().ok()?;
    if !output.status.success() {
        eprintln!("fio failed: {}", String::from_utf8_lossy(&output.stderr));
        return None;
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let job = &report["jobs"][0];
    // bw_bytes: bytes/s over the job's I/O run time; usr/sys_cpu: percent of the job's run time.
    let bytes_per_s = job["write"]["bw_bytes"].as_f64()?;
    let ops = job["write"]["total_ios"].as_f64()?;
    let runtime_s = job["job_runtime"].as_f64()? / 1000.0;
    let cpu_percent = job["usr_cpu"].as_f64()? + job["sys_cpu"].as_f64()?;
    Some(Sample {
        bytes_per_s,
        cpu_us_per_op: cpu_percent / 100.0 * runtime_s * 1e6 / ops.max(1.0),
    })
}

/// Median by throughput (the CPU figure travels with its run).
fn median(samples: &mut [Sample]) -> Sample {
    samples.sort_by(|a, b| a.bytes_per_s.total_cmp(&b.bytes_per_s));
    samples[samples.len() / 2]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let plan = if full {
        Plan {
            file_bytes: 1 << 30,
            random_ops: 200_000,
            runs: 3,
            with_fio: Command::new("fio").arg("--version").output().is_ok(),
        }
    } else {
        Plan {
            file_bytes: 32 << 20,
            random_ops: 2_000,
            runs: 1,
            with_fio: false,
        }
    };
    let base = std::env::var_os("FERRY_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).expect("bench dir");
    let dir = tempfile::tempdir_in(&base).expect("bench temp dir");
    let path = dir.path().join("bench.raw");
    let seed: u64 = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!(
        "disk bench: file {} MiB in {}, seed {seed}",
        plan.file_bytes >> 20,
        base.display()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let open = |engine| {
        Disk::open(
            &path,
            DiskOptions {
                engine,
                direct: DirectMode::On,
                read_only: false,
                create_size: Some(plan.file_bytes),
            },
        )
        .expect("open bench disk")
    };
    let uring = open(EngineChoice::Uring);
    let sync = open(EngineChoice::Sync);
    assert_eq!(uring.engine(), EngineKind::Uring);
    assert_eq!(sync.engine(), EngineKind::Sync);

    // The host disk is thin-provisioned: the first pass over new blocks is 2-3x slower.
    let warm = runtime.block_on(run_engine(&uring, SEQUENTIAL, &plan, seed));
    println!("warm-up pass: {:.2} GB/s", warm.bytes_per_s / 1e9);

    for workload in [SEQUENTIAL, RANDOM] {
        let mut uring_runs = Vec::new();
        let mut sync_runs = Vec::new();
        let mut fio_runs = Vec::new();
        // Interleave the contenders so drift on the shared machine hits all of them alike.
        for run in 0..plan.runs {
            let run_seed = seed.wrapping_add(run as u64);
            uring_runs.push(runtime.block_on(run_engine(&uring, workload, &plan, run_seed)));
            sync_runs.push(runtime.block_on(run_engine(&sync, workload, &plan, run_seed)));
            if plan.with_fio {
                if let Some(sample) = run_fio(&path, workload, &plan) {
                    fio_runs.push(sample);
                }
            }
        }
        let uring_median = median(&mut uring_runs);
        let sync_median = median(&mut sync_runs);
        let show = |name: &str, sample: Sample| {
            println!(
                "{:<24} {:<22} {:>7.3} GB/s {:>9.0} IOPS {:>7.1} us CPU/op",
                workload.name,
                name,
                sample.bytes_per_s / 1e9,
                sample.bytes_per_s / workload.block_bytes as f64,
                sample.cpu_us_per_op
            );
        };
        show("ferry io_uring", uring_median);
        show("ferry thread pool (4)", sync_median);
        if !fio_runs.is_empty() {
            let fio_median = median(&mut fio_runs);
            show("fio io_uring", fio_median);
            println!(
                "{:<24} ratios: io_uring/fio {:.2}, thread-pool/fio {:.2}, io_uring/thread-pool {:.2}",
                workload.name,
                uring_median.bytes_per_s / fio_median.bytes_per_s,
                sync_median.bytes_per_s / fio_median.bytes_per_s,
                uring_median.bytes_per_s / sync_median.bytes_per_s
            );
        } else {
            println!(
                "{:<24} ratio io_uring/thread-pool {:.2}",
                workload.name,
                uring_median.bytes_per_s / sync_median.bytes_per_s
            );
        }
    }
}
