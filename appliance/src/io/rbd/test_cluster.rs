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
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Cluster, ClusterOptions, Pool, RbdError};

/// The bring-up script, from the workspace root.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/ceph/one-node.sh");

/// A running one-node cluster with pool `rbd` initialised.
pub struct TestCluster {
    dir: tempfile::TempDir,
    pids: Vec<i32>,
    /// How long bring-up took.
    pub bring_up: Duration,
}

impl TestCluster {
    /// Starts a cluster; panics (after stopping whatever started) with the script's output and
    /// the daemons' log tails if bring-up fails.
    pub fn start() -> TestCluster {
        let dir = tempfile::Builder::new()
            .prefix("ferry-ceph-")
            .tempdir()
            .expect("temporary directory for the Ceph test cluster");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port for the monitor")
            .port();
        let started = Instant::now();
        let output = Command::new("bash")
            .arg(SCRIPT)
            .arg(dir.path())
            .arg(port.to_string())
            .output()
            .expect("run tests/ceph/one-node.sh (bash)");
        let mut cluster = TestCluster {
            pids: read_pids(dir.path()),
            dir,
            bring_up: started.elapsed(),
        };
        if !output.status.success() {
            let logs = cluster.log_tails();
            cluster.stop();
            panic!(
                "one-node Ceph cluster did not start ({}):\n{}{}\n{logs}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
            );
        }
        cluster
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
        for &pid in &self.pids {
            // SAFETY: kill(2) with a PID this cluster started; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut delay = Duration::from_millis(10);
        while self.pids.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(200));
        }
        for &pid in &self.pids {
            if alive(pid) {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        self.pids.clear();
    }
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
