//! End-to-end tests of `ferry run` and `ferry status` as an operator uses them: the real binary,
//! a config in a temporary directory (state dir, control socket, small raw disks), the control
//! socket's permissions, the JSON status contract, commands, metrics, signals and exit codes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// Bound on every wait in these tests (start-up, shutdown).
const DEADLINE: Duration = Duration::from_secs(30);
/// The ten keys every disk object carries in `ferry status --json` (issue 3's contract).
const DISK_KEYS: [&str; 10] = [
    "machine",
    "name",
    "state",
    "bytes_written",
    "journal_used_bytes",
    "journal_capacity_bytes",
    "churn_bytes_per_s",
    "last_sequence",
    "acked_sequence",
    "rpo_lag_seconds",
];

struct Appliance {
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    child: Child,
}

impl Appliance {
    /// Writes a config with two machines and three 1 MiB disks, then starts `ferry run`.
    fn start(metrics_port: Option<u16>) -> Self {
        Self::start_with_journal(metrics_port, "8MiB")
    }

    fn start_with_journal(metrics_port: Option<u16>, journal_size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in ["web-1-os", "web-1-data", "db-1-os"] {
            std::fs::File::create(root.join(format!("{name}.raw")))
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        }
        let metrics = metrics_port.map_or(String::new(), |port| {
            format!("metrics_listen = \"127.0.0.1:{port}\"\n")
        });
        let text = format!(
            r#"
[appliance]
name = "site-a"
state_dir = "{root}/state"
control_socket = "{root}/run/ferry.sock"
{metrics}
[source]
journal_size = "{journal_size}"
target = "127.0.0.1:9"
target_fingerprint = "sha256:..."

[[source.group]]
name = "app"
recovery_point_interval = "5m"
retention = "24h"

[[source.group]]
name = "db"
recovery_point_interval = "1s"
retention = "1h"

[[source.machine]]
name = "web-1"
group = "app"
availability_set = "web"
nics = [{{ network = "prod", subnet = "front", ip = "10.0.0.4" }}]
disks = [
  {{ name = "os", path = "{root}/web-1-os.raw", export = "{root}/run/web-1-os.sock" }},
  {{ name = "data", path = "{root}/web-1-data.raw", export = "{root}/run/web-1-data.sock", tcp = "127.0.0.1:{data_port}" }},
]

[[source.machine]]
name = "db-1"
group = "db"
disks = [{{ name = "os", path = "{root}/db-1-os.raw", export = "{root}/run/db-1-os.sock" }}]
"#,
            root = root.display(),
            data_port = free_port(),
        );
        let config = root.join("ferry.toml");
        std::fs::write(&config, text).unwrap();
        let socket = root.join("run/ferry.sock");
        let child = spawn_run(&config, &root.join("ferry.log"));
        Self {
            dir,
            config,
            socket,
            child,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ferry.log")).unwrap_or_default()
    }

    /// Polls `ferry status --json` until the appliance answers (bounded).
    fn wait_ready(&mut self) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ferry run exited early with {status}:\n{}", self.log());
            }
            let output = ferry(&[
                "status",
                "--json",
                "--socket",
                self.socket.to_str().unwrap(),
            ]);
            if output.status.success() {
                return serde_json::from_slice(&output.stdout).unwrap();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no status within {DEADLINE:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls status until `done` holds for the disk `index` (bounded).
    fn wait_disk(
        &mut self,
        index: usize,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let status = self.wait_ready();
            if done(&status["disks"][index]) {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{what}: not within {DEADLINE:?}: {status}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "ferry run did not exit within {DEADLINE:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        // A failed assertion must not leave a daemon behind.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_run(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(FERRY)
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap()
}

fn ferry(args: &[&str]) -> Output {
    Command::new(FERRY)
        .args(args)
        .env_remove("FERRY_SOCKET")
        .env_remove("FERRY_CONFIG")
        .output()
        .unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn run_serves_status_commands_and_metrics_then_exits_cleanly_on_sigterm() {
    let metrics_port = free_port();
    let mut appliance = Appliance::start(Some(metrics_port));
    let status = appliance.wait_ready();

    // The control socket is owner-only.
    let metadata = std::fs::metadata(&appliance.socket).unwrap();
    assert!(metadata.file_type().is_socket());
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    // The state dir layout exists.
    for sub in ["journal", "keys", "bitmaps", "catalog"] {
        assert!(
            appliance.dir.path().join("state").join(sub).is_dir(),
            "{sub}"
        );
    }

    // The JSON contract: a `disks` array, each disk with the ten keys.
    assert_eq!(status["appliance"], "site-a");
    let disks = status["disks"].as_array().unwrap();
    let names: Vec<String> = disks
        .iter()
        .map(|disk| {
            format!(
                "{}/{}",
                disk["machine"].as_str().unwrap(),
                disk["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["web-1/os", "web-1/data", "db-1/os"]);
    for disk in disks {
        for key in DISK_KEYS {
            assert!(disk.get(key).is_some(), "disk lacks {key}: {disk}");
        }
        assert_eq!(disk["state"], "initial-sync");
        assert_eq!(disk["bytes_written"], 0);
        assert_eq!(disk["size_bytes"], 1 << 20);
        assert!(disk["rpo_lag_seconds"].is_number());
    }
    assert_eq!(disks[2]["group"], "db");

    // The human table names every disk; --config finds the socket too.
    let table = ferry(&["status", "--config", appliance.config.to_str().unwrap()]);
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("MACHINE") && table.contains("db-1") && table.contains("initial-sync"),
        "{table}"
    );

    // Commands change what status reports.
    let socket = appliance.socket.to_str().unwrap().to_string();
    let pause = ferry(&["pause", "--socket", &socket, "--disk", "web-1/data"]);
    assert!(
        pause.status.success(),
        "{}",
        String::from_utf8_lossy(&pause.stderr)
    );
    let refused = ferry(&["pause", "--socket", &socket, "--disk", "web-9/os"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no disk"),
        "{refused:?}"
    );
    let limit = ferry(&["bandwidth", "--socket", &socket, "10MiB/s"]);
    assert!(
        limit.status.success(),
        "{}",
        String::from_utf8_lossy(&limit.stderr)
    );
    let status = appliance.wait_ready();
    assert_eq!(status["disks"][1]["state"], "paused");
    assert_eq!(status["disks"][0]["state"], "initial-sync");
    assert_eq!(status["link"]["bandwidth_limit_bytes_per_s"], 10 << 20);

    // Metrics expose the same figures.
    let metrics = http_get(metrics_port, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(
        metrics.contains(r#"ferry_disk_size_bytes{machine="db-1",disk="os",group="db"} 1048576"#),
        "{metrics}"
    );
    assert!(metrics
        .contains(r#"ferry_disk_state{machine="web-1",disk="data",group="app",state="paused"} 1"#));
    assert!(http_get(metrics_port, "/").starts_with("HTTP/1.1 404"));

    // A second appliance on the same socket refuses to start and leaves the first one alone.
    let second = Command::new(FERRY)
        .args(["run", "--config", appliance.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains("another appliance is running"));
    appliance.wait_ready();

    appliance.signal("TERM");
    let exit = appliance.wait_exit();
    assert_eq!(exit.code(), Some(0), "{}", appliance.log());
    assert!(!appliance.socket.exists(), "control socket left behind");
    let log = appliance.log();
    assert!(
        log.contains("appliance started") && log.contains("SIGTERM"),
        "{log}"
    );
    let gone = ferry(&["status", "--socket", &socket]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("no appliance is running"),
        "{gone:?}"
    );
}

#[test]
fn run_replaces_a_stale_socket_and_stops_on_sigint() {
    let mut appliance = Appliance::start(None);
    appliance.wait_ready();
    // Kill it hard: the socket file stays behind, stale.
    appliance.child.kill().unwrap();
    appliance.child.wait().unwrap();
    assert!(appliance.socket.exists());

    appliance.child = spawn_run(&appliance.config, &appliance.dir.path().join("ferry.log"));
    appliance.wait_ready();
    assert!(
        appliance.log().contains("replacing stale control socket"),
        "{}",
        appliance.log()
    );
    appliance.signal("INT");
    assert_eq!(appliance.wait_exit().code(), Some(0), "{}", appliance.log());
}

#[test]
fn bad_config_exits_non_zero_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "journal_size = \"12QB\"",
            "source.journal_size",
            "is not a size",
        ),
        (
            "journal_size = \"8MiB\"\ncolour = \"blue\"",
            "source.colour",
            "unknown key",
        ),
        (
            "journal_size = \"8MiB\"\ncompression = \"gzip\"",
            "source.compression",
            "unknown variant",
        ),
    ];
    for (line, key, reason) in cases {
        let config = dir.path().join("bad.toml");
        let text = format!(
            "[appliance]\nname = \"a\"\nstate_dir = \"{}\"\n[source]\n{line}\ntarget = \"127.0.0.1:9\"\n",
            dir.path().join("state").display()
        );
        std::fs::write(&config, text).unwrap();
        let output = ferry(&["run", "--config", config.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("{key}: ")) && stderr.contains(reason),
            "{key}: {stderr}"
        );
        assert!(
            !dir.path().join("state").exists(),
            "a bad config must not create the state dir"
        );
    }
    // A disk that does not exist is named by its key path as well.
    let config = dir.path().join("missing-disk.toml");
    std::fs::write(
        &config,
        format!(
            "[appliance]\nname = \"a\"\nstate_dir = \"state\"\ncontrol_socket = \"c.sock\"\n[source]\njournal_size = \"8MiB\"\ntarget = \"127.0.0.1:9\"\n[[source.group]]\nname = \"g\"\n[[source.machine]]\nname = \"m\"\ngroup = \"g\"\ndisks = [{{ name = \"d\", path = \"{}\", export = \"d.sock\" }}]\n",
            dir.path().join("absent.raw").display()
        ),
    )
    .unwrap();
    let output = ferry(&["run", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("source.machine[0].disks[0].path") && stderr.contains("m/d"),
        "{stderr}"
    );
}

#[test]
fn usage_help_and_version() {
    let help = ferry(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("run") && help.contains("status"), "{help}");
    let version = ferry(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert!(String::from_utf8(version.stdout)
        .unwrap()
        .starts_with("ferry "));
    assert_eq!(ferry(&["status", "--no-such-flag"]).status.code(), Some(2));
    assert_eq!(
        ferry(&["run"]).status.code(),
        Some(2),
        "run without --config is a usage error"
    );
    assert_eq!(
        ferry(&["status", "--config", "a", "--socket", "b"])
            .status
            .code(),
        Some(2)
    );
}

fn run_tool(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes through the exports with real NBD clients (qemu-io on a unix socket, nbdcopy over
/// TCP), then checks the backing files, the status figures, the journal's records after a clean
/// stop, and that overflowing the journal turns a disk `resync-needed` with every write on disk.
#[test]
fn writes_through_exports_show_in_status_and_journal() {
    let mut appliance = Appliance::start_with_journal(None, "4MiB");
    let status = appliance.wait_ready();
    let root = appliance.dir.path().to_path_buf();
    let capacity = status["disks"][0]["journal_capacity_bytes"]
        .as_u64()
        .unwrap();
    assert!(capacity > 0 && capacity <= 4 << 20, "{status}");

    // 64 KiB of 0xab at offset 128 KiB through the unix socket export of web-1/os.
    let os_socket = root.join("run/web-1-os.sock");
    let os_url = format!("nbd+unix:///web-1/os?socket={}", os_socket.display());
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xab 128k 64k", &os_url],
    );
    // A whole 1 MiB image through the TCP export of web-1/data.
    let pattern: Vec<u8> = (0..1u32 << 20).map(|index| (index % 251) as u8).collect();
    let source_image = root.join("pattern.raw");
    std::fs::write(&source_image, &pattern).unwrap();
    let config_text = std::fs::read_to_string(&appliance.config).unwrap();
    let data_port = config_text
        .split("tcp = \"127.0.0.1:")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    run_tool(
        "nbdcopy",
        &[
            source_image.to_str().unwrap(),
            &format!("nbd://127.0.0.1:{data_port}/web-1/data"),
        ],
    );

    let status = appliance.wait_disk(0, "web-1/os bytes", |disk| {
        disk["bytes_written"] == 64 << 10
    });
    let os = &status["disks"][0];
    assert!(os["last_sequence"].as_u64().unwrap() >= 1, "{os}");
    assert_eq!(os["acked_sequence"], 0, "no target: nothing acknowledged");
    assert!(
        os["journal_used_bytes"].as_u64().unwrap() >= 64 << 10,
        "{os}"
    );
    let status = appliance.wait_disk(1, "web-1/data bytes", |disk| {
        disk["bytes_written"] == 1 << 20
    });
    assert!(
        status["disks"][1]["rpo_lag_seconds"].as_f64().unwrap() > 0.0,
        "{status}"
    );
    assert_eq!(status["disks"][2]["bytes_written"], 0, "db-1/os untouched");

    // The data is on the backing files.
    let os_bytes = std::fs::read(root.join("web-1-os.raw")).unwrap();
    assert!(os_bytes[128 << 10..192 << 10]
        .iter()
        .all(|&byte| byte == 0xab));
    assert!(os_bytes[..128 << 10].iter().all(|&byte| byte == 0));
    assert_eq!(std::fs::read(root.join("web-1-data.raw")).unwrap(), pattern);

    // Overflow the 4 MiB journal with 3 MiB more on db-1/os: the disk drops to its bitmap,
    // and every write still reaches the disk.
    let db_url = format!(
        "nbd+unix:///db-1/os?socket={}",
        root.join("run/db-1-os.sock").display()
    );
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5c 0 1M", &db_url],
    );
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5d 0 1M", &db_url],
    );
    run_tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5e 0 1M", &db_url],
    );
    appliance.wait_disk(2, "db-1/os resync-needed", |disk| {
        disk["state"] == "resync-needed"
    });
    assert!(std::fs::read(root.join("db-1-os.raw"))
        .unwrap()
        .iter()
        .all(|&byte| byte == 0x5e));

    appliance.signal("TERM");
    assert_eq!(appliance.wait_exit().code(), Some(0), "{}", appliance.log());

    // After a clean stop the journal holds the records of both writes, in order, verified.
    let (journal, report) =
        ferry_appliance::io::mmap_journal::open_journal(&root.join("state/journal"), 4 << 20)
            .unwrap();
    assert_eq!(report.bytes_dropped, 0, "{report:?}");
    let web_os = ferry_appliance::config::disk_id("web-1", "os");
    let web_data = ferry_appliance::config::disk_id("web-1", "data");
    let mut os_written = 0;
    let mut data_written = 0;
    let mut previous = 0;
    for record in journal.iter_from(journal.first_seq()) {
        let record = record.unwrap();
        assert!(record.seq > previous, "records in sequence order");
        previous = record.seq;
        if record.disk_id == web_os {
            assert!(record.payload.iter().all(|&byte| byte == 0xab));
            assert_eq!(record.offset, 128 << 10);
            os_written += record.length;
        } else if record.disk_id == web_data {
            let start = record.offset as usize;
            assert_eq!(
                record.payload,
                &pattern[start..start + record.length as usize]
            );
            data_written += record.length;
        }
    }
    assert_eq!(os_written, 64 << 10);
    assert_eq!(data_written, 1 << 20);
}
