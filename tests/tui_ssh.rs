//! End to end: the operator console as an operator meets it. A real `ferry run` appliance, a
//! real sshd on a loopback port (throwaway host key and authorized key), `ferry tui` inside
//! `ssh -t` inside tmux; the test navigates with `tmux send-keys`, cuts a recovery point, reads
//! the screen with `tmux capture-pane`, resizes the window, quits, and drops an ssh session to
//! check the console exits instead of spinning (crossterm issue 793).
//!
//! Needs root (sshd switches to the logged-in user), openssh-server and tmux (tests/ci.sh
//! installs them).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tui::Appliance as _;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
/// Bound on every wait: start-up of sshd and the appliance, a screen change, an exit.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// A child process killed (by its own pid) and reaped when the test ends, pass or fail.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A tmux server on a private socket, killed when the test ends.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command.arg("-S").arg(&self.socket);
        command
    }

    fn run(&self, args: &[&str]) -> String {
        let output = self.command().args(args).output().expect("run tmux");
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn keys(&self, session: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", session];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    fn screen(&self, session: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", session])
    }

    /// Polls the screen until `check` holds; panics with the last screen after the deadline.
    fn wait_for(&self, session: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen(session);
            if check(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "waited {DEADLINE:?} for {what}; screen:\n{screen}"
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .command()
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("run ssh-keygen");
    assert!(status.success(), "ssh-keygen {}", path.display());
}

/// Starts sshd on a loopback port that lets the current user in with a throwaway key.
fn start_sshd(dir: &Path, user: &str) -> (Reaped, u16, PathBuf) {
    std::fs::create_dir_all("/run/sshd").expect("privilege separation dir /run/sshd");
    let host_key = dir.join("host_key");
    let client_key = dir.join("client_key");
    keygen(&host_key);
    keygen(&client_key);
    std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
    let port = free_port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress 127.0.0.1\nHostKey {host}\nPidFile {dir}/sshd.pid\n\
             AuthorizedKeysFile {dir}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nAllowUsers {user}\nPrintMotd no\nPrintLastLog no\n",
            host = host_key.display(),
            dir = dir.display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .args(["-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start sshd");
    let mut sshd = Reaped(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = sshd.0.try_wait().unwrap() {
            panic!(
                "sshd exited with {status}: {}",
                std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
        }
        assert!(start.elapsed() < DEADLINE, "sshd did not listen on {port}");
        std::thread::sleep(POLL);
    }
    (sshd, port, client_key)
}

/// Writes an appliance config (two groups, three small raw disks) and starts `ferry run`.
fn start_appliance(dir: &Path) -> (Reaped, PathBuf) {
    for name in ["web-1-os", "web-1-data", "db-1-os"] {
        std::fs::File::create(dir.join(format!("{name}.raw")))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let root = dir.display();
    let config = dir.join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[appliance]
name = "site-a"
state_dir = "{root}/state"
control_socket = "{root}/run/ferry.sock"

[source]
journal_size = "8MiB"
target = "127.0.0.1:9"
target_fingerprint = "sha256:..."

[[source.group]]
name = "app"
recovery_point_interval = "5m"
retention = "24h"

[[source.group]]
name = "db"
recovery_point_interval = "1m"
retention = "1h"

[[source.machine]]
name = "web-1"
group = "app"
disks = [
  {{ name = "os", path = "{root}/web-1-os.raw", export = "{root}/run/web-1-os.sock" }},
  {{ name = "data", path = "{root}/web-1-data.raw", export = "{root}/run/web-1-data.sock" }},
]

[[source.machine]]
name = "db-1"
group = "db"
disks = [{{ name = "os", path = "{root}/db-1-os.raw", export = "{root}/run/db-1-os.sock" }}]
"#,
        ),
    )
    .unwrap();
    let socket = dir.join("run/ferry.sock");
    (spawn_appliance(dir, &config, &socket), socket)
}

/// Starts `ferry run` on a written config and waits until its control socket answers.
fn spawn_appliance(dir: &Path, config: &Path, socket: &Path) -> Reaped {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ferry.log"))
        .unwrap();
    let child = Command::new(FERRY)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ferry run");
    let mut appliance = Reaped(child);
    let mut client = ferry_tui::SocketAppliance::new(socket, Duration::from_secs(5));
    let start = Instant::now();
    while client.fetch_status().is_err() {
        if let Some(status) = appliance.0.try_wait().unwrap() {
            panic!(
                "ferry run exited with {status}: {}",
                std::fs::read_to_string(dir.join("ferry.log")).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the appliance did not answer on {}",
            socket.display()
        );
        std::thread::sleep(POLL);
    }
    appliance
}

fn current_user() -> String {
    let output = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Pids of `ferry tui` processes talking to this test's socket (read from /proc).
fn console_pids(socket: &Path) -> Vec<u32> {
    let needle = socket.to_str().unwrap();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_console = args.first().is_some_and(|a| a.ends_with("/ferry"))
            && args.iter().any(|a| a == "tui")
            && args.iter().any(|a| a == needle);
        if is_console {
            pids.push(pid);
        }
    }
    pids
}

/// Total CPU time (user + system, clock ticks) of a process, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

#[test]
fn console_over_ssh_in_tmux() {
    let dir = tempfile::tempdir().unwrap();
    let user = current_user();
    let (appliance, socket) = start_appliance(dir.path());
    let (_sshd, port, key) = start_sshd(dir.path(), &user);
    let tmux = Tmux {
        socket: dir.path().join("tmux.sock"),
    };

    // The shell around ssh reports how ssh ended and keeps the pane open to be read.
    let ssh = |session: &str, extra: &str| {
        let command = format!(
            "ssh -t -p {port} -i {key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o BatchMode=yes -o LogLevel=ERROR {user}@127.0.0.1 \
             env LANG=C.UTF-8 {FERRY} tui --socket {socket} {extra}; \
             echo ssh-exited-$?; exec cat",
            key = key.display(),
            socket = socket.display(),
        );
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "100",
            "-y",
            "30",
            &command,
        ]);
    };

    ssh("ops", "");
    let screen = tmux.wait_for("ops", "the overview", |s| {
        s.contains("site-a") && s.contains("web-1/os") && s.contains("db-1/os")
    });
    assert!(
        screen.contains("NAME") && screen.contains("JOURNAL"),
        "{screen}"
    );

    // Filter to the db group and open its detail screen.
    tmux.keys("ops", &["/", "db-1", "Enter", "g", "Enter"]);
    tmux.wait_for("ops", "the db group's detail", |s| {
        s.contains("recovery points of group db")
    });

    // Help and back.
    tmux.keys("ops", &["?"]);
    tmux.wait_for("ops", "help", |s| s.contains("FAILOVER (pick a point"));
    tmux.keys("ops", &["Escape"]);
    tmux.wait_for("ops", "the overview again", |s| s.contains("db-1/os"));

    // Cut a recovery point: the dialog states the consequence, focus starts on Cancel.
    tmux.keys("ops", &["g", "r"]);
    let dialog = tmux.wait_for("ops", "the recovery point dialog", |s| {
        s.contains("Recovery point now")
    });
    assert!(
        dialog.contains("Cuts a crash-consistent recovery point of group db"),
        "{dialog}"
    );
    assert!(dialog.contains("> Cancel <"), "{dialog}");
    tmux.keys("ops", &["Tab", "Enter"]);
    // The appliance cut the point and the console names it.
    let answered = tmux.wait_for("ops", "the appliance's answer", |s| {
        s.contains("done: crash-consistent recovery point of group db")
            || s.contains("failed: crash-consistent recovery point of group db")
    });
    assert!(
        answered.contains("done: crash-consistent recovery point of group db: cut point #"),
        "{answered}"
    );
    // The new point appears in the group's list (the source lists what it cut; with no target
    // reachable it is not yet replicated, so not usable, and the console says why).
    tmux.keys("ops", &["g", "Enter"]);
    let detail = tmux.wait_for("ops", "the new point in the db group's list", |s| {
        s.contains("recovery points of group db (1,") && s.contains("unusable")
    });
    eprintln!("the db group after cutting a recovery point:\n{detail}");
    tmux.keys("ops", &["Escape"]);
    // The action ledger keeps the exchange with the appliance's full answer.
    tmux.keys("ops", &["L"]);
    tmux.wait_for("ops", "the action ledger", |s| {
        s.contains("actions sent from this console")
            && s.contains("crash-consistent recovery point of group db: ")
            && s.contains("cut point #")
    });
    tmux.keys("ops", &["Escape"]);

    // Resize below 80x20 and back: the console redraws for each size.
    tmux.run(&["resize-window", "-t", "ops", "-x", "70", "-y", "18"]);
    tmux.wait_for("ops", "the too-small screen", |s| {
        s.contains("terminal too small")
    });
    tmux.run(&["resize-window", "-t", "ops", "-x", "100", "-y", "30"]);
    tmux.wait_for("ops", "the overview after resize", |s| {
        s.contains("db-1/os")
    });

    // The appliance goes away: the console says so, stays responsive, and reconnects when a
    // new appliance answers on the same socket.
    drop(appliance);
    tmux.wait_for("ops", "the disconnected banner", |s| {
        s.contains("DISCONNECTED")
    });
    tmux.keys("ops", &["?"]);
    tmux.wait_for("ops", "help while disconnected", |s| {
        s.contains("FAILOVER (pick a point")
    });
    tmux.keys("ops", &["Escape"]);
    let _appliance = spawn_appliance(dir.path(), &dir.path().join("ferry.toml"), &socket);
    tmux.wait_for("ops", "the reconnection", |s| {
        !s.contains("DISCONNECTED") && s.contains("db-1/os")
    });

    // q quits, ssh ends cleanly, and the alternate screen is gone.
    tmux.keys("ops", &["q"]);
    let after = tmux.wait_for("ops", "ssh to exit", |s| s.contains("ssh-exited-"));
    assert!(after.contains("ssh-exited-0"), "{after}");
    assert!(
        !after.contains("JOURNAL"),
        "the console's screen was left behind:\n{after}"
    );

    // A dropped session: kill the tmux session (SIGHUP to ssh), and the console on the far
    // side of sshd must exit, not spin.
    ssh("dropped", "--readonly");
    tmux.wait_for("dropped", "the read-only overview", |s| {
        s.contains("READ-ONLY") && s.contains("db-1/os")
    });
    let pids = console_pids(&socket);
    assert_eq!(pids.len(), 1, "one console running: {pids:?}");
    let pid = pids[0];
    tmux.run(&["kill-session", "-t", "dropped"]);
    let start = Instant::now();
    let mut report = String::new();
    while let Some(ticks) = cpu_ticks(pid) {
        let _ = writeln!(report, "{:?}: {ticks} ticks", start.elapsed());
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ferry tui (pid {pid}) still running 10 s after its ssh session dropped:\n{report}"
        );
        std::thread::sleep(POLL);
        // A zombie waiting for sshd to reap it has exited; stat shows state Z.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        {
            break;
        }
    }
}
