//! A real one-node Ceph cluster for tests: one mon, one mgr and one bluestore OSD on a sparse
//! file, bound to 127.0.0.1, started by `tests/ceph/one-node.sh` under a temporary directory
//! (no systemd, no cephadm, no loop device). [`TestCluster`] stops every daemon by its PID when
//! dropped, also when the test panics.
//!
//! Bring-up takes about 13 s on the 2-core CI machine (mon election, OSD mkfs and boot, and
//! the first pool's PGs peering), so a test starts one cluster and runs all its cases on it.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Cluster, ClusterOptions, Pool, RbdError};

/// The bring-up script, from the workspace root.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/ceph/one-node.sh");

/// Where a cluster goes and how large its OSD's sparse file is.
#[derive(Clone, Debug, Default)]
pub struct ClusterSpec {
    /// Directory to create the cluster's directory in (default: the system's temp dir).
    pub parent: Option<PathBuf>,
    /// Size of the OSD's sparse block file (default: the script's 4 GiB).
    pub osd_bytes: Option<u64>,
}

/// A running one-node cluster with pool `rbd` initialised.
pub struct TestCluster {
    dir: tempfile::TempDir,
    /// mon, mgr, OSD (the script's order, [`Daemon`] indexes it); a restarted daemon's entry
    /// is replaced.
    pids: Vec<i32>,
    /// A daemon restarted here is this process's child, reaped when it stops.
    children: [Option<Child>; 3],
    /// How long bring-up took.
    pub bring_up: Duration,
}

impl TestCluster {
    /// Starts a cluster under a temporary directory with a 4 GiB OSD; panics (after stopping
    /// whatever started) with the script's output and the daemons' log tails if bring-up fails.
    pub fn start() -> TestCluster {
        TestCluster::try_start(&ClusterSpec::default()).unwrap_or_else(|why| panic!("{why}"))
    }

    /// Starts a cluster as `spec` says; on failure, stops whatever started and returns the
    /// script's output and the daemons' log tails.
    pub fn try_start(spec: &ClusterSpec) -> Result<TestCluster, String> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("ferry-ceph-");
        let dir = match &spec.parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .map_err(|error| format!("temporary directory for the Ceph test cluster: {error}"))?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|error| format!("free port for the monitor: {error}"))?
            .port();
        let started = Instant::now();
        let mut command = Command::new("bash");
        command.arg(SCRIPT).arg(dir.path()).arg(port.to_string());
        if let Some(bytes) = spec.osd_bytes {
            command.env("FERRY_CEPH_OSD_BYTES", bytes.to_string());
        }
        let output = command
            .output()
            .map_err(|error| format!("run tests/ceph/one-node.sh (bash): {error}"))?;
        let mut cluster = TestCluster {
            pids: read_pids(dir.path()),
            children: [None, None, None],
            dir,
            bring_up: started.elapsed(),
        };
        if !output.status.success() {
            let logs = cluster.log_tails();
            cluster.stop();
            return Err(format!(
                "one-node Ceph cluster did not start ({}):\n{}{}\n{logs}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            ));
        }
        Ok(cluster)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("ceph.conf")
    }

    pub fn keyring(&self) -> PathBuf {
        self.dir.path().join("ceph.client.admin.keyring")
    }

    /// How to connect as `client.admin`.
    pub fn options(&self) -> ClusterOptions {
        ClusterOptions {
            conf: self.conf(),
            keyring: Some(self.keyring()),
            client: "admin".to_string(),
        }
    }

    /// Connects and opens pool `rbd`.
    pub fn pool(&self) -> Result<Pool, RbdError> {
        Cluster::connect(&self.options())?.pool("rbd")
    }

    /// Runs the `rbd` CLI against this cluster (e.g. to check what Ferry wrote).
    pub fn rbd(&self, args: &[&str]) -> std::process::Output {
        Command::new("rbd")
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .expect("run rbd")
    }

    /// PIDs of the mon, mgr and OSD.
    pub fn pids(&self) -> &[i32] {
        &self.pids
    }

    /// Stops the OSD (SIGTERM: it tells the monitor it goes down, then exits; SIGKILL after
    /// 30 s). With one OSD every placement group is then down: client I/O waits.
    pub fn stop_osd(&mut self) {
        self.stop_daemon(Daemon::Osd);
    }

    /// Starts the OSD again (same id, data and conf) and waits, bounded, until the monitor sees
    /// it up. Its placement groups then peer, and client I/O waiting for them resumes.
    pub fn start_osd(&mut self) {
        self.start_daemon(Daemon::Osd);
    }

    /// Stops the monitor (the only one: no quorum, no map updates, no new sessions; I/O on
    /// established OSD sessions goes on).
    pub fn stop_mon(&mut self) {
        self.stop_daemon(Daemon::Mon);
    }

    /// Starts the monitor again from its store and waits, bounded, until it answers.
    pub fn start_mon(&mut self) {
        self.start_daemon(Daemon::Mon);
    }

    fn stop_daemon(&mut self, daemon: Daemon) {
        let index = daemon as usize;
        let pid = *self.pids.get(index).expect("the daemon's PID");
        terminate(&[pid], Duration::from_secs(30));
        if let Some(mut child) = self.children[index].take() {
            let _ = child.wait();
        }
    }

    fn start_daemon(&mut self, daemon: Daemon) {
        let index = daemon as usize;
        let (program, id, log) = match daemon {
            Daemon::Mon => ("ceph-mon", "a".to_string(), "mon.out"),
            Daemon::Osd => {
                let id = fs::read_dir(self.dir.path().join("osd"))
                    .ok()
                    .and_then(|entries| {
                        entries.flatten().find_map(|entry| {
                            let name = entry.file_name().to_string_lossy().into_owned();
                            name.strip_prefix("osd.").map(str::to_string)
                        })
                    })
                    .expect("the OSD's data directory osd/osd.<id>");
                ("ceph-osd", id, "osd.out")
            }
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log").join(log))
            .expect("open the daemon's log");
        let child = Command::new(program)
            .arg("-c")
            .arg(self.conf())
            .args(["-f", "-i", &id])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the daemon's log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("start {program}: {error}"));
        self.pids[index] = i32::try_from(child.id()).expect("PID fits in i32");
        self.children[index] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut delay = Duration::from_millis(100);
        loop {
            let output = Command::new("timeout")
                .arg("10")
                .arg("ceph")
                .arg("-c")
                .arg(self.conf())
                .args(["osd", "stat", "--format", "json"])
                .output()
                .expect("run ceph osd stat");
            let text = String::from_utf8_lossy(&output.stdout);
            let up = match daemon {
                Daemon::Mon => output.status.success(),
                Daemon::Osd => output.status.success() && text.contains("\"num_up_osds\":1"),
            };
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the restarted {program} did not come up: {text}\n{}",
                self.log_tails()
            );
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    fn log_tails(&self) -> String {
        let mut text = String::new();
        let logs = self.dir.path().join("log");
        if let Ok(entries) = fs::read_dir(&logs) {
            for entry in entries.flatten() {
                let content = fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = content.lines().rev().take(15).collect();
                text.push_str(&format!("--- {}\n", entry.path().display()));
                for line in tail.iter().rev() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }

    /// Sends SIGTERM to every daemon, waits (bounded) for them to go, then SIGKILLs the rest.
    fn stop(&mut self) {
        terminate(&self.pids, Duration::from_secs(10));
        for mut child in self.children.iter_mut().filter_map(Option::take) {
            let _ = child.wait();
        }
        self.pids.clear();
    }
}

/// SIGTERM to each of `pids`, a bounded wait for them to go, then SIGKILL to the rest.
fn terminate(pids: &[i32], grace: Duration) {
    for &pid in pids {
        // SAFETY: kill(2) with a PID this cluster started; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    let mut delay = Duration::from_millis(10);
    while pids.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    for &pid in pids {
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The daemons a test stops and restarts, by their index in the PID list.
#[derive(Clone, Copy)]
enum Daemon {
    Mon = 0,
    Osd = 2,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// Whether `pid` still runs (a zombie waiting for its reaper counts as gone).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}
