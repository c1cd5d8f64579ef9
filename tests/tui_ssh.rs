//! End to end: the operator console as an operator meets it. A real `ferry run` appliance, a
//! real sshd on a loopback port (throwaway host key and authorized key), `ferry tui` inside
//! `ssh -t` inside tmux; the test navigates with `tmux send-keys`, cuts a recovery point, reads
//! the screen with `tmux capture-pane`, resizes the window, quits, and drops an ssh session to
//! check the console exits instead of spinning (crossterm issue 793). A second test runs
//! `ferry demo` (source and target appliances, the console attached to both) in tmux and runs a
//! test failover and its cleanup from the console, the way a newcomer would.
//!
//! Needs root (sshd switches to the logged-in user), openssh-server, tmux and qemu-io (tests/ci.sh
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
        self.wait_for_within(DEADLINE, session, what, check)
    }

    fn wait_for_within(
        &self,
        deadline: Duration,
        session: &str,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let screen = self.screen(session);
            if check(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < deadline,
                "waited {deadline:?} for {what}; screen:\n{screen}"
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

/// The overview row of group `group` (its name, the disk count in brackets), if on screen.
fn group_row<'a>(screen: &'a str, group: &str) -> Option<&'a str> {
    let heading = format!("{group} (");
    screen
        .lines()
        .find(|line| line.trim_start_matches(['>', ' ']).starts_with(&heading))
}

/// A newcomer's test failover: `ferry demo` with the console attached to both appliances, the
/// group replicated and a usable recovery point listed, `t` opens the picker and preview, the
/// appliance's answer (export URIs) lands in the action ledger, the group shows test-failover
/// and its exports, and `c` cleans up back to protected.
#[test]
fn test_failover_and_cleanup_from_the_console_in_ferry_demo() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let tmux = Tmux {
        socket: dir.path().join("tmux.sock"),
    };
    let command = format!(
        "env LANG=C.UTF-8 {FERRY} demo --disk-size 16MiB --dir {demo}; echo demo-exited-$?; \
         exec cat",
        demo = demo_dir.display(),
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "demo",
        "-x",
        "100",
        "-y",
        "30",
        &command,
    ]);
    let log = || std::fs::read_to_string(demo_dir.join("ferry.log")).unwrap_or_default();

    // Initial sync, then a recovery point of group db on the target: the overview's POINT
    // column shows its age (the demo cuts one every 10 s).
    let overview = tmux.wait_for_within(
        Duration::from_secs(90),
        "demo",
        "group db protected with a recovery point",
        |s| {
            s.contains("demo-exited-")
                || group_row(s, "db")
                    .is_some_and(|row| row.contains("protected") && !row.trim_end().ends_with(" -"))
        },
    );
    assert!(
        !overview.contains("demo-exited-")
            && overview.contains("site-a + site-b")
            && overview.contains("replica"),
        "{overview}\nlog:\n{}",
        log()
    );

    // Select group db, then t: the picker offers usable points and previews the chosen one.
    tmux.keys("demo", &["/", "db-1", "Enter", "g", "t"]);
    let dialog = tmux.wait_for("demo", "the test failover dialog", |s| {
        s.contains("Test failover · group db")
    });
    for expected in [
        "usable recovery point",
        "● #",
        "data-loss window",
        "consistency crash-consistent",
        "machines db-1 (2 disks)",
        "> Cancel <",
    ] {
        assert!(dialog.contains(expected), "no {expected:?} in:\n{dialog}");
    }
    tmux.keys("demo", &["Tab", "Enter"]);
    let answered = tmux.wait_for("demo", "the test failover's answer", |s| {
        s.contains("done: test failover of group db") || s.contains("failed: test failover")
    });
    assert!(
        answered.contains("done: test failover of group db to point #"),
        "{answered}\nlog:\n{}",
        log()
    );
    tmux.wait_for("demo", "group db in test-failover", |s| {
        group_row(s, "db").is_some_and(|row| row.contains("test-failover"))
    });

    // The action ledger keeps the answer with one export URI per disk.
    tmux.keys("demo", &["L"]);
    let ledger = tmux.wait_for("demo", "the export URIs in the action ledger", |s| {
        s.contains("actions sent from this console") && s.contains("2 exports")
    });
    for disk in ["db-1/os", "db-1/data"] {
        assert!(
            ledger.contains(&format!("nbd+unix:///{disk}?socket=")),
            "no export of {disk} in:\n{ledger}"
        );
    }
    eprintln!("the action ledger after a test failover:\n{ledger}");
    tmux.keys("demo", &["Escape"]);
    tmux.wait_for("demo", "the overview again", |s| s.contains("JOURNAL"));

    // The group's detail lists the running test failover's exports.
    tmux.keys("demo", &["g", "Enter"]);
    let detail = tmux.wait_for("demo", "the exports in group db's detail", |s| {
        s.contains("test failover exports at point #")
    });
    assert!(detail.contains("◇ test-failover"), "{detail}");
    assert!(detail.contains("nbd+unix:///db-1/data?socket="), "{detail}");

    // c cleans up: the copies go, the group is protected again.
    tmux.keys("demo", &["c"]);
    let cleanup = tmux.wait_for("demo", "the cleanup dialog", |s| {
        s.contains("Clean up test failover · group db")
    });
    assert!(cleanup.contains("> Cancel <"), "{cleanup}");
    tmux.keys("demo", &["Tab", "Enter"]);
    let cleaned = tmux.wait_for("demo", "the cleanup's answer", |s| {
        s.contains("done: clean up the test failover of group db")
            || s.contains("failed: clean up the test failover")
    });
    assert!(
        cleaned.contains("done: clean up the test failover of group db"),
        "{cleaned}\nlog:\n{}",
        log()
    );
    let detail = tmux.wait_for("demo", "group db protected again", |s| {
        !s.contains("test failover exports") && !s.contains("◇ test-failover")
    });
    assert!(detail.contains("✔ protected"), "{detail}");
    tmux.keys("demo", &["Escape"]);
    tmux.wait_for("demo", "group db protected in the overview", |s| {
        group_row(s, "db").is_some_and(|row| row.contains("protected"))
    });

    // q quits the console and the demo stops both appliances.
    tmux.keys("demo", &["q"]);
    let after = tmux.wait_for_within(Duration::from_secs(60), "demo", "the demo to exit", |s| {
        s.contains("demo-exited-")
    });
    assert!(after.contains("demo-exited-0"), "{after}\nlog:\n{}", log());
}
