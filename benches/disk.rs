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

/// Runs `workload` on `disk` with `queue_depth` closed-loop tasks; returns bytes per second.
async fn run_engine(disk: &Disk, workload: Workload, plan: &Plan, seed: u64) -> f64 {
    let block_count = plan.file_bytes / workload.block_bytes as u64;
    let ops_total = if workload.random {
        plan.random_ops
    } else {
        block_count
    };
    let started = Instant::now();
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
    disk.flush().await.expect("bench flush");
    (ops_total * workload.block_bytes as u64) as f64 / elapsed
}

fn run_fio(path: &Path, workload: Workload, plan: &Plan) -> Option<f64> {
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
    let job = &report["jobs"][0]["write"];
    // bw_bytes: bytes/s over the job's I/O run time.
    job["bw_bytes"].as_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
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
    println!("warm-up pass: {:.2} GB/s", warm / 1e9);

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
                if let Some(bytes_per_s) = run_fio(&path, workload, &plan) {
                    fio_runs.push(bytes_per_s);
                }
            }
        }
        let uring_median = median(&mut uring_runs);
        let sync_median = median(&mut sync_runs);
        let show = |name: &str, bytes_per_s: f64| {
            println!(
                "{:<24} {:<22} {:>7.3} GB/s {:>9.0} IOPS",
                workload.name,
                name,
                bytes_per_s / 1e9,
                bytes_per_s / workload.block_bytes as f64
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
                uring_median / fio_median,
                sync_median / fio_median,
                uring_median / sync_median
            );
        } else {
            println!(
                "{:<24} ratio io_uring/thread-pool {:.2}",
                workload.name,
                uring_median / sync_median
            );
        }
    }
}
