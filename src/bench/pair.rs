//! A source and a target appliance on loopback, each this same binary started as `ferry run
//! --config` with a generated config and its own key pair (`ferry identity`), each pinning the
//! other. The bench watches them only from outside, as an operator would: `ferry status --json`
//! and `ferry verify` over their control sockets.

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_appliance::control::{DiskState, StatusSnapshot};

use super::relay::Relay;
use super::tools;

/// The machine and group every bench disk belongs to.
pub const MACHINE: &str = "web-1";
pub const GROUP: &str = "app";
/// Status polling period while waiting for replication.
const POLL: Duration = Duration::from_millis(100);
/// How long an appliance may take to answer its first status request.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// Replication that shows no progress (sync bytes, acknowledged or last sequence, state) for
/// this long is reported as stalled instead of waited for until the deadline.
const STALL: Duration = Duration::from_secs(60);
/// How long a stopping appliance gets after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(60);

/// Appliances running now (pids), so that an interrupted bench stops them too.
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Stops every appliance the bench started and has not stopped yet (SIGTERM, bounded wait).
/// Called when the bench itself is interrupted.
pub fn stop_all_running() {
    let pids: Vec<u32> = std::mem::take(&mut *RUNNING.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in &pids {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    // Bounded: at most 10 s for all of them to go.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A protected disk of the bench's source appliance.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PairOptions {
    pub disks: Vec<DiskSpec>,
    /// `journal_size` of the source, e.g. "1GiB".
    pub journal_size: String,
    /// Put a counting UDP relay between source and target (scenario 4 counts link bytes).
    pub relay: bool,
    /// Keep the target's replicas in this Ceph cluster's pool `rbd` (`storage = "rbd"`)
    /// instead of local files.
    pub rbd: Option<RbdTarget>,
}

/// A Ceph cluster the target keeps its replicas in: images `ferry.<source>+<machine>+<disk>`
/// in pool `rbd`, as `client.admin`.
#[derive(Debug, Clone)]
pub struct RbdTarget {
    pub conf: PathBuf,
    pub keyring: PathBuf,
}

pub struct Pair {
    exe: PathBuf,
    dir: PathBuf,
    disks: Vec<DiskSpec>,
    source: Option<Child>,
    target: Option<Child>,
    relay: Option<Relay>,
}

impl Pair {
    /// Writes both configs and creates both key pairs under `dir`; starts nothing.
    pub fn prepare(exe: &Path, dir: &Path, options: &PairOptions) -> anyhow::Result<Pair> {
        for sub in ["source/state", "target/state", "target/storage"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let identity = |side: &str| -> anyhow::Result<String> {
            let state = dir.join(side).join("state");
            let text = tools::output(
                Command::new(exe)
                    .arg("identity")
                    .arg("--state-dir")
                    .arg(&state),
            )?;
            Ok(text.trim().to_owned())
        };
        let source_fingerprint = identity("source")?;
        let target_fingerprint = identity("target")?;
        let target_address = free_udp_address()?;
        let relay = if options.relay {
            Some(Relay::start(target_address)?)
        } else {
            None
        };
        let dial = relay
            .as_ref()
            .map_or(target_address, |relay| relay.address());

        let rbd = options.rbd.as_ref().map_or(String::new(), |rbd| {
            format!(
                "storage = \"rbd\"\n\n[target.rbd]\npool = \"rbd\"\nconf = {}\nkeyring = {}\nclient = \"admin\"\nimage_prefix = \"ferry.\"\n",
                toml_path(&rbd.conf),
                toml_path(&rbd.keyring)
            )
        });
        let target_config = format!(
            r#"[appliance]
name = "site-b"
state_dir = {state}
control_socket = {socket}

[target]
listen = "{target_address}"
storage_dir = {storage}
peers = [{{ name = "site-a", fingerprint = "{source_fingerprint}" }}]
{rbd}"#,
            state = toml_path(&dir.join("target/state")),
            socket = toml_path(&dir.join("target/ferry.sock")),
            storage = toml_path(&dir.join("target/storage")),
        );
        let mut disks = String::new();
        for disk in &options.disks {
            disks.push_str(&format!(
                "  {{ name = \"{}\", path = {}, export = {} }},\n",
                disk.name,
                toml_path(&disk.path),
                toml_path(&export_socket(dir, &disk.name))
            ));
        }
        let source_config = format!(
            r#"[appliance]
name = "site-a"
state_dir = {state}
control_socket = {socket}

[source]
journal_size = "{journal}"
target = "{dial}"
target_fingerprint = "{target_fingerprint}"

[[source.group]]
name = "{GROUP}"

[[source.machine]]
name = "{MACHINE}"
group = "{GROUP}"
disks = [
{disks}]
"#,
            state = toml_path(&dir.join("source/state")),
            socket = toml_path(&dir.join("source/ferry.sock")),
            journal = options.journal_size,
        );
        std::fs::write(dir.join("target/ferry.toml"), target_config)
            .context("cannot write the target's config")?;
        std::fs::write(dir.join("source/ferry.toml"), source_config)
            .context("cannot write the source's config")?;
        Ok(Pair {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            disks: options.disks.clone(),
            source: None,
            target: None,
            relay,
        })
    }

    /// The NBD URI of a disk's capture export.
    pub fn export_uri(&self, disk: &str) -> String {
        format!(
            "nbd+unix:///{MACHINE}/{disk}?socket={}",
            export_socket(&self.dir, disk).display()
        )
    }

    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }

    /// The control socket of a side ("source" or "target").
    pub fn socket_path(&self, side: &str) -> PathBuf {
        self.dir.join(side).join("ferry.sock")
    }

    /// Where a side keeps its state (`keys/`, `journal/`, `sync/` …).
    pub fn state_dir(&self, side: &str) -> PathBuf {
        self.dir.join(side).join("state")
    }

    /// Starts the target and waits until it answers on its control socket.
    pub fn start_target(&mut self) -> anyhow::Result<()> {
        if self.target.is_some() {
            bail!("the target is already running");
        }
        self.target = Some(self.spawn("target")?);
        self.wait_answering("target")
    }

    /// Starts the source (it starts replicating at once) and waits until it answers.
    pub fn start_source(&mut self) -> anyhow::Result<()> {
        if self.source.is_some() {
            bail!("the source is already running");
        }
        self.source = Some(self.spawn("source")?);
        self.wait_answering("source")
    }

    pub fn stop_target(&mut self) -> anyhow::Result<()> {
        stop(self.target.take(), "target")
    }

    pub fn stop_source(&mut self) -> anyhow::Result<()> {
        stop(self.source.take(), "source")
    }

    fn spawn(&self, side: &str) -> anyhow::Result<Child> {
        let log_path = self.dir.join(side).join("ferry.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let child = Command::new(&self.exe)
            .arg("run")
            .arg("--config")
            .arg(self.dir.join(side).join("ferry.toml"))
            .env(
                "RUST_LOG",
                std::env::var("FERRY_BENCH_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start the {side} appliance"))?;
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(child)
    }

    fn child(&mut self, side: &str) -> Option<&mut Child> {
        match side {
            "source" => self.source.as_mut(),
            _ => self.target.as_mut(),
        }
    }

    fn wait_answering(&mut self, side: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(child) = self.child(side) {
                if let Some(status) = child.try_wait().context("waitpid")? {
                    bail!(
                        "the {side} appliance exited at start ({status}): {}",
                        self.log_tail(side)
                    );
                }
            }
            if self.status(side).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the {side} appliance did not answer on its control socket within {:?}: {}",
                    START_DEADLINE,
                    self.log_tail(side)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `ferry status --json` of one side ("source" or "target").
    pub fn status(&self, side: &str) -> anyhow::Result<StatusSnapshot> {
        let text = tools::output(
            Command::new(&self.exe)
                .arg("status")
                .arg("--socket")
                .arg(self.socket_path(side))
                .arg("--json"),
        )?;
        serde_json::from_str(&text).with_context(|| format!("malformed status of the {side}"))
    }

    /// Waits until every disk of the source is `protected` and the target acknowledged every
    /// journaled record (the target acknowledges only durable data). `detail` hears progress.
    pub fn wait_replicated(
        &mut self,
        deadline: Duration,
        detail: &dyn Fn(&str),
    ) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        let mut last = String::new();
        let mut progress_key = Vec::new();
        let mut progress_at = Instant::now();
        loop {
            for side in ["source", "target"] {
                if let Some(child) = self.child(side) {
                    if let Some(status) = child.try_wait().context("waitpid")? {
                        bail!(
                            "the {side} appliance exited ({status}): {}",
                            self.log_tail(side)
                        );
                    }
                }
            }
            if let Ok(snapshot) = self.status("source") {
                let done = !snapshot.disks.is_empty()
                    && snapshot.disks.iter().all(|disk| {
                        disk.state == DiskState::Protected
                            && disk.acked_sequence >= disk.last_sequence
                    });
                if done {
                    return Ok(());
                }
                last = describe(&snapshot);
                detail(&last);
                let key: Vec<(u64, u64, u64, DiskState)> = snapshot
                    .disks
                    .iter()
                    .map(|disk| {
                        (
                            disk.sync.as_ref().map_or(0, |sync| sync.bytes_done),
                            disk.acked_sequence,
                            disk.last_sequence,
                            disk.state,
                        )
                    })
                    .collect();
                if key != progress_key {
                    progress_key = key;
                    progress_at = Instant::now();
                } else if progress_at.elapsed() > STALL {
                    bail!(
                        "replication stalled: no progress for {STALL:?} (source: {last}); source log: {}; target log: {}",
                        self.log_tail("source"),
                        self.log_tail("target")
                    );
                }
            }
            if Instant::now() > until {
                bail!(
                    "replication did not finish within {deadline:?} (source: {last}); source log: {}; target log: {}",
                    self.log_tail("source"),
                    self.log_tail("target")
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `ferry verify --all` on the source: Ok(true) when every replica is identical. Gives up
    /// after `timeout` (an error).
    pub fn verify(&self, timeout: Duration) -> anyhow::Result<bool> {
        let output = Command::new(&self.exe)
            .arg("verify")
            .arg("--all")
            .arg("--json")
            .arg("--timeout")
            .arg(format!("{}s", timeout.as_secs().max(1)))
            .arg("--socket")
            .arg(self.socket_path("source"))
            .stdin(Stdio::null())
            .output()
            .context("cannot run ferry verify")?;
        let json: serde_json::Value =
            serde_json::from_slice(&output.stdout).with_context(|| {
                format!(
                    "ferry verify printed no JSON: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )
            })?;
        let disks = json["disks"].as_array().context("verify: no disks")?;
        Ok(output.status.success()
            && disks.len() == self.disks.len()
            && disks.iter().all(|disk| disk["identical"] == true))
    }

    /// Starts cutting group points on the source (`ferry recovery-point create`) every `period`
    /// until the returned cutter is stopped, at most `cuts_max` attempts.
    pub fn start_cutting(&self, period: Duration, cuts_max: u64) -> Cutter {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let exe = self.exe.clone();
            let socket = self.socket_path("source");
            std::thread::spawn(move || {
                let mut cut = 0u64;
                let mut failed = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && cut + failed < cuts_max {
                    let started = Instant::now();
                    let created = Command::new(&exe)
                        .args(["recovery-point", "create", "--group", GROUP, "--socket"])
                        .arg(&socket)
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                    match created {
                        Ok(status) if status.success() => cut += 1,
                        _ => failed += 1,
                    }
                    // Pacing, not synchronisation: one cut per period.
                    std::thread::sleep(period.saturating_sub(started.elapsed()));
                }
                (cut, failed)
            })
        };
        Cutter { stop, thread }
    }

    /// The last lines of a side's log, for error messages.
    pub fn log_tail(&self, side: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(side).join("ferry.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(6).collect();
        let lines: Vec<&str> = lines.into_iter().rev().collect();
        if lines.is_empty() {
            "(empty)".to_owned()
        } else {
            lines.join(" | ")
        }
    }
}

/// A thread cutting recovery points (see [`Pair::start_cutting`]).
pub struct Cutter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl Cutter {
    /// Stops cutting; returns (points cut, cuts that failed).
    pub fn stop(self) -> anyhow::Result<(u64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the cutting thread panicked"))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = stop(self.source.take(), "source");
        let _ = stop(self.target.take(), "target");
    }
}

/// SIGTERM (a clean stop: the appliance makes its journal and disks durable), a bounded wait,
/// then SIGKILL.
fn stop(child: Option<Child>, side: &str) -> anyhow::Result<()> {
    let Some(mut child) = child else {
        return Ok(());
    };
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|pid| *pid != child.id());
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + STOP_DEADLINE;
    loop {
        if child.try_wait().context("waitpid")?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the {side} appliance did not stop within {STOP_DEADLINE:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn describe(snapshot: &StatusSnapshot) -> String {
    snapshot
        .disks
        .iter()
        .map(|disk| {
            let sync = disk.sync.as_ref().map_or(String::new(), |sync| {
                format!(
                    " {:.0}/{:.0} MiB at {:.0} MB/s",
                    sync.bytes_done as f64 / (1u64 << 20) as f64,
                    sync.bytes_total as f64 / (1u64 << 20) as f64,
                    sync.bytes_per_s / 1e6
                )
            });
            format!(
                "{} {}{} acked {}/{}",
                disk.name,
                disk.state.as_str(),
                sync,
                disk.acked_sequence,
                disk.last_sequence
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn export_socket(dir: &Path, disk: &str) -> PathBuf {
    dir.join("source").join(format!("{disk}.sock"))
}

/// A loopback UDP address nobody listens on right now.
pub fn free_udp_address() -> anyhow::Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("cannot bind a loopback UDP socket")?;
    socket.local_addr().context("local_addr")
}

/// A path as a TOML basic string.
fn toml_path(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}
