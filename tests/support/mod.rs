//! Shared harness of the end-to-end tests: a source and a target `ferry run` process on
//! loopback, each with its own config, state dir and control socket in a temporary directory,
//! plus bounded polling of `ferry status --json` and helpers for real NBD clients (qemu-io).
#![allow(dead_code)]

use std::io::Write;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// Bound on every wait (start-up, replication of the small test disks, shutdown).
pub const DEADLINE: Duration = Duration::from_secs(90);

pub fn ferry(args: &[&str]) -> Output {
    Command::new(FERRY)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferry")
}

/// A free UDP port on loopback (bound, read, released).
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The fingerprint of the identity in `state_dir` (created if missing).
pub fn identity(state_dir: &Path) -> String {
    let output = ferry(&["identity", "--state-dir", state_dir.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "ferry identity failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let fingerprint = text.trim().to_string();
    assert!(fingerprint.starts_with("sha256:"), "{fingerprint}");
    fingerprint
}

/// Polls `check` until it returns `Some`, at most until `DEADLINE`; panics with `what`.
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// A file of `size` bytes: the first `random_bytes` pseudo-random (seeded), the rest zero.
pub fn make_disk(path: &Path, size: u64, random_bytes: u64, seed: u64) {
    let mut file = std::fs::File::create(path).unwrap();
    let mut state = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0u64;
    while written < random_bytes {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let take = (random_bytes - written).min(block.len() as u64) as usize;
        file.write_all(&block[..take]).unwrap();
        written += take as u64;
    }
    file.set_len(size).unwrap();
}

/// One `ferry run` process with its directory, config and log.
pub struct Appliance {
    pub name: String,
    pub root: PathBuf,
    pub config: PathBuf,
    pub child: Option<Child>,
}

impl Appliance {
    pub fn new(root: &Path, name: &str) -> Self {
        let root = root.join(name);
        std::fs::create_dir_all(root.join("state")).unwrap();
        Self {
            name: name.to_string(),
            config: root.join("ferry.toml"),
            root,
            child: None,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("ferry.sock")
    }

    pub fn fingerprint(&self) -> String {
        identity(&self.state_dir())
    }

    /// `[appliance]` section for this appliance.
    pub fn appliance_section(&self) -> String {
        format!(
            "[appliance]\nname = \"{}\"\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n\n",
            self.name,
            self.state_dir().display(),
            self.socket().display()
        )
    }

    pub fn write_config(&self, body: &str) {
        std::fs::write(&self.config, format!("{}{body}", self.appliance_section())).unwrap();
    }

    /// Starts `ferry run` and waits until its control socket answers.
    pub fn start(&mut self) {
        self.start_under(&[]);
    }

    /// Starts `ferry run` as the last arguments of `wrapper` (a command that ends by exec-ing
    /// its arguments, e.g. `unshare` with a script), and waits until its control socket answers.
    pub fn start_under(&mut self, wrapper: &[&str]) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("ferry.log"))
            .unwrap();
        let run = [FERRY, "run", "--config", self.config.to_str().unwrap()];
        let mut command: Vec<&str> = wrapper.to_vec();
        command.extend(run);
        let child = Command::new(command[0])
            .args(&command[1..])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn ferry run");
        self.child = Some(child);
        let name = self.name.clone();
        wait_for(&format!("{name}'s control socket"), || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{name} exited at start ({status}): {}", self.log());
            }
            self.try_status().map(|_| ())
        });
    }

    /// The running process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            let start = Instant::now();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "{} exited with {status}: {}",
                        self.name,
                        self.log()
                    );
                    break;
                }
                assert!(start.elapsed() < DEADLINE, "{} did not stop", self.name);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("ferry.log")).unwrap_or_default()
    }

    pub fn try_status(&self) -> Option<serde_json::Value> {
        let output = ferry(&[
            "status",
            "--socket",
            self.socket().to_str().unwrap(),
            "--json",
        ]);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// Where the target keeps the replica of `machine`/`disk`, as its status reports it (a
    /// file path, or `rbd:<pool>/<image>`); waits until the target lists it.
    pub fn replica_location(&self, machine: &str, disk: &str) -> String {
        wait_for(
            &format!("{} to list the replica of {machine}/{disk}", self.name),
            || {
                let status = self.try_status()?;
                let replica = status["replicas"]
                    .as_array()?
                    .iter()
                    .find(|replica| replica["machine"] == machine && replica["name"] == disk)?
                    .clone();
                Some(replica["replica_path"].as_str()?.to_string())
            },
        )
    }

    pub fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|| panic!("{} does not answer status: {}", self.name, self.log()))
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs qemu-io commands against an NBD export on a unix socket.
pub fn qemu_io(socket: &Path, export: &str, commands: &[String]) {
    let mut args = vec![
        "-f".to_string(),
        "raw".to_string(),
        format!("nbd+unix:///{export}?socket={}", socket.display()),
    ];
    for command in commands {
        args.push("-c".into());
        args.push(command.clone());
    }
    let output = Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("qemu-io");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success()
            && !stdout.contains("failed")
            && !stdout.contains("Pattern verification"),
        "qemu-io {commands:?}: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Whether two files have the same bytes.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    let status = Command::new("cmp")
        .args(["-s", a.to_str().unwrap(), b.to_str().unwrap()])
        .status()
        .unwrap();
    status.success()
}

/// Where the target keeps replicas in a test: local files, or a real one-node Ceph cluster
/// started for the test (and stopped, by PID, when the backend is dropped — also when the test
/// panics). Under nextest every test runs in its own process, so a cluster cannot be shared
/// between tests; each RBD test pays one bring-up (~13 s).
pub enum Backend {
    Files,
    Rbd(ferry_appliance::io::rbd::test_cluster::TestCluster),
}

/// Runs each named test body (a `fn(Backend)`) twice, as `<name>::files` and `<name>::rbd`:
/// the same test on both target-storage backends, only the constructor differs.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn files() {
                    super::$name(super::Backend::files());
                }

                #[test]
                fn rbd() {
                    super::$name(super::Backend::rbd());
                }
            }
        )*
    };
}

impl Backend {
    pub fn files() -> Backend {
        Backend::Files
    }

    /// Starts a one-node Ceph cluster (~13 s) with pool `rbd`.
    pub fn rbd() -> Backend {
        Backend::Rbd(ferry_appliance::io::rbd::test_cluster::TestCluster::start())
    }

    /// "files" or "rbd", for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Files => "files",
            Backend::Rbd(_) => "rbd",
        }
    }

    pub fn cluster(&self) -> Option<&ferry_appliance::io::rbd::test_cluster::TestCluster> {
        match self {
            Backend::Files => None,
            Backend::Rbd(cluster) => Some(cluster),
        }
    }

    pub fn cluster_mut(
        &mut self,
    ) -> Option<&mut ferry_appliance::io::rbd::test_cluster::TestCluster> {
        match self {
            Backend::Files => None,
            Backend::Rbd(cluster) => Some(cluster),
        }
    }

    /// Lines to add to `[target]` (before any sub-table): nothing for files, the storage key
    /// and the `[target.rbd]` table for RBD. Put it last in the `[target]` table's text.
    pub fn target_keys(&self) -> String {
        match self {
            Backend::Files => String::new(),
            Backend::Rbd(cluster) => format!(
                "storage = \"rbd\"\n\n[target.rbd]\npool = \"rbd\"\nconf = \"{}\"\nkeyring = \"{}\"\nclient = \"admin\"\n",
                cluster.conf().display(),
                cluster.keyring().display()
            ),
        }
    }

    /// The replica's bytes as a file: the file itself, or an `rbd export` of the image into
    /// `scratch` (`location` is what the target's status reports: `rbd:<pool>/<image>`).
    pub fn replica_file(&self, location: &str, scratch: &Path) -> PathBuf {
        match self {
            Backend::Files => {
                assert!(
                    !location.starts_with("rbd:"),
                    "an RBD replica on the files backend: {location}"
                );
                PathBuf::from(location)
            }
            Backend::Rbd(cluster) => {
                let spec = location
                    .strip_prefix("rbd:")
                    .unwrap_or_else(|| panic!("not an RBD replica: {location}"));
                let _ = std::fs::remove_file(scratch);
                let output = cluster.rbd(&["export", spec, scratch.to_str().unwrap()]);
                assert!(
                    output.status.success(),
                    "rbd export {spec}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                scratch.to_path_buf()
            }
        }
    }
}

/// Two source appliances of one consistency group "app": site-a protects machine db-1 and
/// site-b machine app-1, one disk `data` each (`disk_bytes`, the first `random_bytes` seeded
/// random), with the recovery-point barrier between them. With a `target` backend both ship to
/// one target appliance site-dr storing replicas there; without, they point at a closed port
/// (nothing is shipped or released, so their journals keep every record). Nothing is started.
pub struct TwoSourceGroup {
    pub a: Appliance,
    pub b: Appliance,
    pub target: Option<Appliance>,
    /// (socket, export name) of db-1/data on site-a, then of app-1/data on site-b.
    pub exports: Vec<(PathBuf, String)>,
}

pub fn two_source_group(
    root: &Path,
    disk_bytes: u64,
    random_bytes: u64,
    recovery_point_interval: &str,
    target: Option<&Backend>,
) -> TwoSourceGroup {
    let a = Appliance::new(root, "site-a");
    let b = Appliance::new(root, "site-b");
    let (port_a, port_b) = (free_udp_port(), free_udp_port());
    let (fingerprint_a, fingerprint_b) = (a.fingerprint(), b.fingerprint());
    let (target, target_keys) = match target {
        Some(backend) => {
            let appliance = Appliance::new(root, "site-dr");
            let port = free_udp_port();
            appliance.write_config(&format!(
                "[target]\nlisten = \"127.0.0.1:{port}\"\nstorage_dir = \"{}\"\npeers = [{{ name = \"site-a\", fingerprint = \"{fingerprint_a}\" }}, {{ name = \"site-b\", fingerprint = \"{fingerprint_b}\" }}]\n{}",
                appliance.root.join("storage").display(),
                backend.target_keys(),
            ));
            let keys = format!(
                "target = \"127.0.0.1:{port}\"\ntarget_fingerprint = \"{}\"",
                appliance.fingerprint()
            );
            (Some(appliance), keys)
        }
        None => (None, "target = \"127.0.0.1:9\"".to_string()),
    };
    let mut exports = Vec::new();
    for (appliance, machine, own_port, other, other_port, other_fingerprint, seed) in [
        (&a, "db-1", port_a, "site-b", port_b, &fingerprint_b, 5),
        (&b, "app-1", port_b, "site-a", port_a, &fingerprint_a, 6),
    ] {
        let disk = appliance.root.join("data.raw");
        make_disk(&disk, disk_bytes, random_bytes, seed);
        let export = appliance.root.join("data.sock");
        appliance.write_config(&format!(
            r#"[source]
journal_size = "64MiB"
{target_keys}

[[source.group]]
name = "app"
recovery_point_interval = "{recovery_point_interval}"
barrier_listen = "127.0.0.1:{own_port}"
members = [{{ name = "{other}", address = "127.0.0.1:{other_port}", fingerprint = "{other_fingerprint}" }}]

[[source.machine]]
name = "{machine}"
group = "app"
disks = [{{ name = "data", path = "{disk}", export = "{export}" }}]
"#,
            disk = disk.display(),
            export = export.display(),
        ));
        exports.push((export, format!("{machine}/data")));
    }
    TwoSourceGroup {
        a,
        b,
        target,
        exports,
    }
}
