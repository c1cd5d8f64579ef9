//! `ferry demo`: a source and a target appliance in this one process on loopback, three sample
//! disks behind NBD exports, a write workload driven through those exports by `qemu-io`
//! processes (bursts, hot spots, flushes), and either the operator console attached to both
//! appliances (`ferry_tui::SitePair`) or — headless — a summary of what was written,
//! replicated, cut as recovery points and verified.
//!
//! Everything the demo creates lives in one directory (configs as TOML, state, disks, replicas,
//! the appliances' log), so a newcomer can look at it afterwards with `--dir`.

use std::io::Write;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_appliance::config::Config;
use ferry_appliance::control::{DiskSelector, DiskState, Request, Response, VerifyDisk};
use ferry_appliance::daemon::layout::StateLayout;
use ferry_appliance::daemon::status::StatusModel;
use ferry_appliance::daemon::{Client, Daemon};
use ferry_appliance::io::transport::Identity;

/// How often the RPO lag is sampled for the summary's percentiles.
const RPO_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// How long the final verify may take (it drains replication first, initial sync included).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the summary waits for the target to list a point the demo cut.
const POINTS_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound on qemu-io invocations per disk, whatever the duration (keeps every loop bounded).
const WORKLOAD_ROUNDS_MAX: u64 = 1_000_000;
const MIB: u64 = 1 << 20;

/// What `ferry demo` was asked to do.
pub struct DemoOptions {
    /// Where to put everything; `None`: a fresh `/tmp/ferry-demo-<pid>`, removed at the end.
    pub dir: Option<PathBuf>,
    /// No console: run the workload for `duration`, then print a summary.
    pub headless: bool,
    /// How long the workload runs; `None` with the console: until the console quits.
    pub duration: Option<Duration>,
    /// Size of the largest sample disks (web-1/os, db-1/data; db-1/os is half).
    pub disk_size_bytes: u64,
    /// The console's options (ignored when headless).
    pub console: Option<ferry_tui::RunOptions>,
}

/// One sample disk of the demo.
struct SampleDisk {
    machine: &'static str,
    name: &'static str,
    group: &'static str,
    /// Size as a fraction of `--disk-size`, in eighths.
    size_eighths: u64,
}

impl SampleDisk {
    fn size_bytes(&self, disk_size_bytes: u64) -> u64 {
        (disk_size_bytes / 8 * self.size_eighths).max(MIB)
    }
    /// The first bytes are pseudo-random (an "installed OS", ~10%); the rest is a hole.
    fn random_bytes(&self, disk_size_bytes: u64) -> u64 {
        self.size_bytes(disk_size_bytes) / 10
    }
}

const SAMPLE_DISKS: [SampleDisk; 3] = [
    SampleDisk {
        machine: "web-1",
        name: "os",
        group: "web",
        size_eighths: 8,
    },
    SampleDisk {
        machine: "db-1",
        name: "os",
        group: "db",
        size_eighths: 4,
    },
    SampleDisk {
        machine: "db-1",
        name: "data",
        group: "db",
        size_eighths: 8,
    },
];

/// The paths of one appliance inside the demo directory.
struct ApplianceDir {
    name: &'static str,
    root: PathBuf,
}

impl ApplianceDir {
    fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    fn socket(&self) -> PathBuf {
        self.root.join("ferry.sock")
    }
    fn config(&self) -> PathBuf {
        self.root.join("ferry.toml")
    }
    fn fingerprint(&self) -> anyhow::Result<String> {
        let keys = StateLayout::new(&self.state_dir()).keys;
        std::fs::create_dir_all(&keys)
            .with_context(|| format!("cannot create {}", keys.display()))?;
        let identity = Identity::load_or_create(&keys)?;
        Ok(identity.fingerprint.to_string())
    }
    fn appliance_section(&self) -> String {
        format!(
            "[appliance]\nname = \"{}\"\nstate_dir = {:?}\ncontrol_socket = {:?}\n\n",
            self.name,
            self.state_dir().display().to_string(),
            self.socket().display().to_string()
        )
    }
}

/// The export socket of a sample disk.
fn export_socket(source: &ApplianceDir, disk: &SampleDisk) -> PathBuf {
    source
        .root
        .join(format!("{}-{}.sock", disk.machine, disk.name))
}

fn disk_path(dir: &Path, disk: &SampleDisk) -> PathBuf {
    dir.join("disks")
        .join(format!("{}-{}.raw", disk.machine, disk.name))
}

/// Runs the demo. Returns an error (exit 1) when something fails or the verify found a
/// difference.
pub fn run(options: DemoOptions) -> anyhow::Result<()> {
    let (dir, remove_dir) = match &options.dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id())),
            true,
        ),
    };
    prepare_dir(&dir)?;
    let result = run_in(&dir, &options);
    if remove_dir {
        // The sample disks and replicas are hundreds of MiB of sparse files: do not leave them.
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "{} is not empty: the demo needs a fresh directory (or none: it makes one)",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir.join("disks"))
        .with_context(|| format!("cannot create {}", dir.display()))
}

fn run_in(dir: &Path, options: &DemoOptions) -> anyhow::Result<()> {
    init_logging(&dir.join("ferry.log"))?;
    let source = ApplianceDir {
        name: "site-a",
        root: dir.join("site-a"),
    };
    let target = ApplianceDir {
        name: "site-b",
        root: dir.join("site-b"),
    };
    let seed = seed();
    for (index, disk) in SAMPLE_DISKS.iter().enumerate() {
        make_disk(
            &disk_path(dir, disk),
            disk.size_bytes(options.disk_size_bytes),
            disk.random_bytes(options.disk_size_bytes),
            seed.wrapping_add(index as u64),
        )?;
    }
    write_configs(dir, &source, &target)?;
    let source_config = Config::load(&source.config())?;
    let target_config = Config::load(&target.config())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry-demo")
        .build()
        .context("cannot start the async runtime")?;
    let target_daemon = runtime
        .block_on(Daemon::start(target_config))
        .context("cannot start the target appliance")?;
    let source_daemon = match runtime.block_on(Daemon::start(source_config)) {
        Ok(daemon) => daemon,
        Err(error) => {
            let _ = runtime.block_on(target_daemon.shutdown());
            return Err(anyhow::Error::new(error).context("cannot start the source appliance"));
        }
    };
    if options.headless {
        println!(
            "ferry demo: source site-a and target site-b running in {} (seed {seed}); workload for {}",
            dir.display(),
            humanize_duration(options.duration)
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let workload = Workload::start(&source, options.disk_size_bytes, seed, stop.clone());
    let sampler = RpoSampler::start(source_daemon.status().clone(), stop.clone());
    let started = Instant::now();

    let outcome = if options.headless {
        let duration = options.duration.unwrap_or(Duration::from_secs(30));
        // Bounded wait: the deadline is the duration; the workload stopping on its own (an
        // error) ends it early.
        while started.elapsed() < duration && !workload.failed() {
            std::thread::sleep(Duration::from_millis(50).min(duration));
        }
        Ok(())
    } else {
        run_console(&source, &target, options, &stop, started)
    };
    stop.store(true, Ordering::Relaxed);
    let written = workload.join();
    let rpo_samples = sampler.join();

    let summary = if options.headless && outcome.is_ok() && written.error.is_none() {
        Some(summarize(
            &source,
            &target,
            &source_daemon,
            &target_daemon,
            &written,
            rpo_samples,
        ))
    } else {
        None
    };
    let source_stopped = runtime.block_on(source_daemon.shutdown());
    let target_stopped = runtime.block_on(target_daemon.shutdown());
    outcome?;
    if let Some(error) = written.error {
        bail!("the workload failed: {error}");
    }
    source_stopped.context("the source appliance did not stop cleanly")?;
    target_stopped.context("the target appliance did not stop cleanly")?;
    match summary {
        Some(summary) => {
            let summary = summary?;
            print!("{}", summary.text);
            if options.dir.is_none() {
                println!("(the demo directory {} was removed)", dir.display());
            }
            std::io::stdout().flush()?;
            if !summary.identical {
                bail!("verify found differences between source disks and replicas");
            }
        }
        None => println!(
            "ferry demo stopped after {:.0?}; wrote {} through the exports",
            started.elapsed(),
            human_bytes(written.bytes)
        ),
    }
    Ok(())
}

/// Appliance logs go to a file in the demo directory: stderr belongs to the console.
fn init_logging(path: &Path) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second demo in the same process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init();
    Ok(())
}

/// A seed for the sample data and the workload, printed so a run can be told apart.
fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()) << 32
}

/// xorshift64: good enough for sample data and workload offsets, and needs no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

/// A sparse raw file of `size` bytes whose first `random_bytes` are pseudo-random.
fn make_disk(path: &Path, size: u64, random_bytes: u64, seed: u64) -> anyhow::Result<()> {
    let context = || format!("cannot write the sample disk {}", path.display());
    let mut file = std::fs::File::create(path).with_context(context)?;
    let mut rng = Rng::new(seed);
    let mut block = vec![0u8; MIB as usize];
    let mut written = 0u64;
    while written < random_bytes {
        for chunk in block.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
        }
        let take = (random_bytes - written).min(block.len() as u64) as usize;
        file.write_all(&block[..take]).with_context(context)?;
        written += take as u64;
    }
    file.set_len(size).with_context(context)?;
    file.sync_all().with_context(context)
}

/// A free UDP port on loopback (bound, read, released) for the target's listener.
fn free_udp_port() -> anyhow::Result<u16> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("cannot bind a loopback UDP port")?;
    Ok(socket.local_addr()?.port())
}

fn write_configs(dir: &Path, source: &ApplianceDir, target: &ApplianceDir) -> anyhow::Result<()> {
    let port = free_udp_port()?;
    let source_fingerprint = source.fingerprint()?;
    let target_fingerprint = target.fingerprint()?;
    let target_text = format!(
        "{}[target]\nlisten = \"127.0.0.1:{port}\"\nstorage_dir = {:?}\npeers = [{{ name = \"{}\", fingerprint = \"{source_fingerprint}\" }}]\n",
        target.appliance_section(),
        target.root.join("storage").display().to_string(),
        source.name,
    );
    let mut source_text = format!(
        "{}[source]\njournal_size = \"64MiB\"\ntarget = \"127.0.0.1:{port}\"\ntarget_fingerprint = \"{target_fingerprint}\"\n\n",
        source.appliance_section(),
    );
    for group in ["web", "db"] {
        source_text.push_str(&format!(
            "[[source.group]]\nname = \"{group}\"\nrpo_threshold = \"5s\"\nrecovery_point_interval = \"10s\"\n\n"
        ));
    }
    for machine in ["web-1", "db-1"] {
        let disks: Vec<&SampleDisk> = SAMPLE_DISKS
            .iter()
            .filter(|disk| disk.machine == machine)
            .collect();
        let entries: Vec<String> = disks
            .iter()
            .map(|disk| {
                format!(
                    "{{ name = \"{}\", path = {:?}, export = {:?} }}",
                    disk.name,
                    disk_path(dir, disk).display().to_string(),
                    export_socket(source, disk).display().to_string()
                )
            })
            .collect();
        source_text.push_str(&format!(
            "[[source.machine]]\nname = \"{machine}\"\ngroup = \"{}\"\ndisks = [{}]\n\n",
            disks[0].group,
            entries.join(", ")
        ));
    }
    for (appliance, text) in [(source, source_text), (target, target_text)] {
        std::fs::create_dir_all(appliance.state_dir())
            .with_context(|| format!("cannot create {}", appliance.root.display()))?;
        std::fs::write(appliance.config(), text)
            .with_context(|| format!("cannot write {}", appliance.config().display()))?;
    }
    Ok(())
}

/// What the workload threads did.
#[derive(Default)]
struct Written {
    bytes: u64,
    invocations: u64,
    error: Option<String>,
}

/// One thread per sample disk, each running qemu-io against the disk's export in a loop.
struct Workload {
    threads: Vec<std::thread::JoinHandle<Result<(), String>>>,
    bytes: Arc<AtomicU64>,
    invocations: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
}

impl Workload {
    fn start(
        source: &ApplianceDir,
        disk_size_bytes: u64,
        seed: u64,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let bytes = Arc::new(AtomicU64::new(0));
        let invocations = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let threads = SAMPLE_DISKS
            .iter()
            .enumerate()
            .map(|(index, disk)| {
                let export = export_socket(source, disk);
                let name = format!("{}/{}", disk.machine, disk.name);
                let size_bytes = disk.size_bytes(disk_size_bytes);
                let stop = stop.clone();
                let bytes = bytes.clone();
                let invocations = invocations.clone();
                let failed = failed.clone();
                let mut rng = Rng::new(seed.rotate_left(17).wrapping_add(index as u64 * 7919));
                std::thread::spawn(move || {
                    let result = (|| {
                        for _ in 0..WORKLOAD_ROUNDS_MAX {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let (commands, round_bytes) = workload_round(&mut rng, size_bytes);
                            qemu_io(&export, &name, &commands)?;
                            bytes.fetch_add(round_bytes, Ordering::Relaxed);
                            invocations.fetch_add(1, Ordering::Relaxed);
                            // Idle gaps between bursts, as a real machine has.
                            let pause = Duration::from_millis(20 + rng.below(200));
                            let until = Instant::now() + pause;
                            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                        }
                        Ok(())
                    })();
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        Self {
            threads,
            bytes,
            invocations,
            failed,
        }
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn join(self) -> Written {
        let mut written = Written::default();
        for thread in self.threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => written.error = Some(error),
                Err(_) => written.error = Some("a workload thread panicked".to_string()),
            }
        }
        written.bytes = self.bytes.load(Ordering::Relaxed);
        written.invocations = self.invocations.load(Ordering::Relaxed);
        written
    }
}

/// One qemu-io invocation's commands: a sequential burst, hot-spot rewrites or scattered small
/// writes, always ending with a flush. Returns the commands and the bytes they write.
fn workload_round(rng: &mut Rng, size_bytes: u64) -> (Vec<String>, u64) {
    let mut commands = Vec::new();
    let mut bytes = 0;
    let pattern = 1 + rng.below(250);
    match rng.below(3) {
        // A burst: 1-4 MiB written sequentially in 64 KiB requests (a log, a file copy).
        0 => {
            let count = 16 + rng.below(48);
            let start = rng.below((size_bytes - count * 64 * 1024) / MIB) * MIB;
            for index in 0..count {
                commands.push(format!(
                    "write -P {pattern} {} 64k",
                    start + index * 64 * 1024
                ));
            }
            bytes += count * 64 * 1024;
        }
        // A hot spot: the first MiB of the disk (superblock, database header) rewritten in 4 KiB.
        1 => {
            for _ in 0..(8 + rng.below(24)) {
                commands.push(format!("write -P {pattern} {} 4k", rng.below(256) * 4096));
                bytes += 4096;
            }
        }
        // Scattered small writes across the disk.
        _ => {
            for _ in 0..(4 + rng.below(12)) {
                let offset = rng.below(size_bytes / 4096) * 4096;
                let length = 4096 * (1 + rng.below(4));
                let length = length.min(size_bytes - offset);
                commands.push(format!("write -P {pattern} {offset} {length}"));
                bytes += length;
            }
        }
    }
    commands.push("flush".to_string());
    (commands, bytes)
}

fn qemu_io(export: &Path, name: &str, commands: &[String]) -> Result<(), String> {
    let mut command = Command::new("qemu-io");
    command.args([
        "-f",
        "raw",
        &format!("nbd+unix:///{name}?socket={}", export.display()),
    ]);
    for text in commands {
        command.args(["-c", text]);
    }
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run qemu-io (is it installed?): {error}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || stdout.contains("failed") {
        return Err(format!(
            "qemu-io on {name} failed ({}): {} {}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Samples the source's worst RPO lag across its disks every 100 ms until told to stop.
struct RpoSampler {
    thread: std::thread::JoinHandle<Vec<f64>>,
}

impl RpoSampler {
    fn start(status: Arc<StatusModel>, stop: Arc<AtomicBool>) -> Self {
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            // Bounded: one sample per interval, and at most a day's worth.
            for _ in 0..(24 * 3600 * 10) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let snapshot = status.snapshot_now();
                let worst = snapshot
                    .disks
                    .iter()
                    .map(|disk| disk.rpo_lag_seconds)
                    .fold(0.0, f64::max);
                samples.push(worst);
                std::thread::sleep(RPO_SAMPLE_INTERVAL);
            }
            samples
        });
        Self { thread }
    }

    fn join(self) -> Vec<f64> {
        self.thread.join().unwrap_or_default()
    }
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn run_console(
    source: &ApplianceDir,
    target: &ApplianceDir,
    options: &DemoOptions,
    stop: &Arc<AtomicBool>,
    started: Instant,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let Some(mut console) = options.console.clone() else {
        bail!("the console needs its options");
    };
    if !std::io::stdout().is_terminal() {
        bail!("the console needs a terminal: run `ferry demo --headless` without one");
    }
    // The workload stops at the duration, if there is one; the console stays until `q`.
    if let Some(duration) = options.duration {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
    console.endpoint = format!(
        "{} and {}",
        source.socket().display(),
        target.socket().display()
    );
    // One console over both appliances: the source's disks and the target's replicas and
    // recovery-point catalog; cutting a point goes to the source, failover to the target.
    let appliance = ferry_tui::SitePair {
        source: ferry_tui::SocketAppliance::new(source.socket(), Duration::from_secs(5)),
        target: ferry_tui::SocketAppliance::new(target.socket(), Duration::from_secs(5)),
    };
    match ferry_tui::run(appliance, console)? {
        ferry_tui::Exit::InputClosed(reason) => eprintln!("ferry demo: {reason}"),
        ferry_tui::Exit::Quit | ferry_tui::Exit::Signal(_) => {}
    }
    Ok(())
}

struct Summary {
    text: String,
    identical: bool,
}

fn summarize(
    source: &ApplianceDir,
    target: &ApplianceDir,
    source_daemon: &Daemon,
    target_daemon: &Daemon,
    written: &Written,
    mut rpo_samples: Vec<f64>,
) -> anyhow::Result<Summary> {
    // Verify drains replication, but a command may take at most 30 s on the control socket:
    // first wait (bounded) for the initial sync to finish and the target to catch up.
    let catch_up_started = Instant::now();
    loop {
        let snapshot = source_daemon.status().snapshot_now();
        let caught_up = snapshot.disks.iter().all(|disk| {
            disk.state == DiskState::Protected && disk.acked_sequence >= disk.last_sequence
        });
        if caught_up {
            break;
        }
        if catch_up_started.elapsed() > VERIFY_TIMEOUT {
            bail!(
                "replication did not catch up within {VERIFY_TIMEOUT:?}: {}",
                ferry_appliance::daemon::table::format_status(&snapshot)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let catch_up_elapsed = catch_up_started.elapsed();
    let points = recovery_points(source, target)?;
    // The client is blocking; the daemons run on the runtime's worker threads meanwhile.
    let verify_started = Instant::now();
    let mut client = Client::connect_with_timeout(&source.socket(), VERIFY_TIMEOUT)?;
    let disks: Vec<VerifyDisk> = match client.request(&Request::Verify {
        selector: DiskSelector::default(),
    })? {
        Response::Verify { disks } => disks,
        Response::Error { message } => bail!("verify refused: {message}"),
        other => bail!("unexpected answer to verify: {other:?}"),
    };
    let verify_elapsed = verify_started.elapsed();
    let source_snapshot = source_daemon.status().snapshot_now();
    let target_snapshot = target_daemon.status().snapshot_now();

    let mut text = String::from("\nferry demo summary\n");
    text.push_str(&format!(
        "  workload:         {} written by {} qemu-io runs (bursts, hot spots, scattered writes, each ending with a flush)\n",
        human_bytes(written.bytes),
        written.invocations
    ));
    text.push_str("  disks (source site-a -> target site-b):\n");
    for disk in &source_snapshot.disks {
        let applied = target_snapshot
            .replicas
            .iter()
            .find(|replica| replica.machine == disk.machine && replica.name == disk.name)
            .map_or("no replica".to_string(), |replica| {
                format!("applied sequence {}", replica.applied_sequence)
            });
        text.push_str(&format!(
            "    {}/{}: {}, {} written, acked {} of {} journaled ({}), {}\n",
            disk.machine,
            disk.name,
            disk.state.as_str(),
            human_bytes(disk.bytes_written),
            disk.acked_sequence,
            disk.last_sequence,
            if disk.acked_sequence >= disk.last_sequence {
                "all replicated"
            } else {
                "behind"
            },
            applied
        ));
    }
    text.push_str(&format!(
        "  caught up:        {:.1} s after the workload stopped (initial sync included)\n",
        catch_up_elapsed.as_secs_f64()
    ));
    rpo_samples.sort_by(f64::total_cmp);
    text.push_str(&format!(
        "  RPO lag:          p50 {:.3} s, p99 {:.3} s, max {:.3} s ({} samples every {} ms, worst disk at each)\n",
        percentile(&rpo_samples, 0.5),
        percentile(&rpo_samples, 0.99),
        rpo_samples.last().copied().unwrap_or(0.0),
        rpo_samples.len(),
        RPO_SAMPLE_INTERVAL.as_millis()
    ));
    text.push_str(&format!("  recovery points:  {points}\n"));
    let identical = !disks.is_empty() && disks.iter().all(|disk| disk.identical);
    text.push_str(&format!(
        "  verify:           {} ({} disks, {} compared in {:.1} s)\n",
        if identical { "identical" } else { "DIFFERS" },
        disks.len(),
        human_bytes(disks.iter().map(|disk| disk.bytes_compared).sum()),
        verify_elapsed.as_secs_f64()
    ));
    for disk in disks.iter().filter(|disk| !disk.identical) {
        text.push_str(&format!(
            "    {}/{}: {} of {} extents differed (sent again)\n",
            disk.machine, disk.name, disk.extents_differing, disk.extents_compared
        ));
    }
    Ok(Summary { text, identical })
}

/// The recovery points in the target's catalog, as `ferry recovery-point list` on the target
/// answers. The timer cuts one every 10 s; so that a short run still shows one, the demo first
/// cuts a point of every group on the source (a real `create-recovery-point`) and waits, bounded,
/// until the target lists it as usable.
fn recovery_points(source: &ApplianceDir, target: &ApplianceDir) -> anyhow::Result<String> {
    let mut source_client = Client::connect_with_timeout(&source.socket(), POINTS_TIMEOUT)?;
    let mut target_client = Client::connect_with_timeout(&target.socket(), POINTS_TIMEOUT)?;
    let mut parts = Vec::new();
    for group in ["web", "db"] {
        let cut = match source_client.request(&Request::CreateRecoveryPoint {
            group: group.to_string(),
            app_consistent: false,
        })? {
            Response::PointCreated { point, .. } => point.id,
            Response::Error { message } => bail!("cutting a recovery point of {group}: {message}"),
            other => bail!("unexpected answer to create-recovery-point: {other:?}"),
        };
        let started = Instant::now();
        let points = loop {
            // Until the first marker of a group arrives, the target refuses to list it.
            let points = match target_client.request(&Request::ListRecoveryPoints {
                group: group.to_string(),
            })? {
                Response::RecoveryPoints { points, .. } => points,
                Response::Error { message } if started.elapsed() > POINTS_TIMEOUT => {
                    bail!("listing the recovery points of {group} on the target: {message}")
                }
                Response::Error { .. } => Vec::new(),
                other => bail!("unexpected answer to list-recovery-points: {other:?}"),
            };
            if points.iter().any(|point| point.id == cut && point.usable)
                || started.elapsed() > POINTS_TIMEOUT
            {
                break points;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        parts.push(format!(
            "{group} {} ({} usable)",
            points.len(),
            points.iter().filter(|point| point.usable).count()
        ));
    }
    Ok(format!("{} in the target's catalog", parts.join(", ")))
}

fn human_bytes(bytes: u64) -> String {
    if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn humanize_duration(duration: Option<Duration>) -> String {
    match duration {
        Some(duration) => format!("{:.0?}", duration),
        None => "30s".to_string(),
    }
}
