//! End to end through `ferry run`: a source appliance with two machines and three disks, driven
//! by real NBD clients (qemu-io, nbdcopy, nbdinfo) and by a raw socket sending bad NBD. Checks
//! the data read back through the exports and from the backing files, `ferry status --json`,
//! the bad-input log lines, the journal overflowing into a persistent dirty-extent bitmap, and
//! that the bitmap (and so `resync-needed`) survives a restart; and that replies sent by
//! handlers and by the reply thread never interleave under a pipelining client.
//!
//! `tests/cli_run.rs` covers the journal records after a clean stop and the TCP export; this
//! file covers what a hypervisor and a hostile client do to a running appliance.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_appliance::capture::DirtyBitmap;
use ferry_appliance::core::nbd::client::{
    decode_option_reply, decode_simple_reply, encode_go_data, encode_option, encode_request,
};
use ferry_appliance::core::nbd::{
    ErrorCode, Request, CMD_READ, CMD_WRITE, INFO_BLOCK_SIZE, OPTION_REPLY_HEADER_BYTES, OPT_GO,
    REP_ACK, REP_ERR_UNSUP, REP_INFO, SIMPLE_REPLY_BYTES,
};
use rand::{RngCore, SeedableRng};

const DEADLINE: Duration = Duration::from_secs(30);
const DISK_BYTES: u64 = 8 << 20;

struct Appliance {
    dir: tempfile::TempDir,
    config: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Appliance {
    /// Two machines, three 8 MiB disks, a 4 MiB journal, a target that is not there.
    fn new() -> Appliance {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in ["web-1-os", "web-1-data", "db-1-os"] {
            std::fs::File::create(root.join(format!("{name}.raw")))
                .unwrap()
                .set_len(DISK_BYTES)
                .unwrap();
        }
        let text = format!(
            r#"[appliance]
name = "site-a"
state_dir = "{root}/state"
control_socket = "{root}/run/ferry.sock"

[source]
journal_size = "4MiB"
target = "127.0.0.1:9"

[[source.group]]
name = "app"
recovery_point_interval = "5m"
retention = "24h"

[[source.machine]]
name = "web-1"
group = "app"
disks = [
  {{ name = "os", path = "{root}/web-1-os.raw", export = "{root}/run/web-1-os.sock" }},
  {{ name = "data", path = "{root}/web-1-data.raw", export = "{root}/run/web-1-data.sock" }},
]

[[source.machine]]
name = "db-1"
group = "app"
disks = [{{ name = "os", path = "{root}/db-1-os.raw", export = "{root}/run/db-1-os.sock" }}]
"#,
            root = root.display()
        );
        let config = root.join("ferry.toml");
        std::fs::write(&config, text).unwrap();
        let log = root.join("ferry.log");
        Appliance {
            dir,
            config,
            child: None,
            log,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["run", "--config", self.config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Ready when status answers and every export socket exists.
        let start = Instant::now();
        loop {
            let sockets_up = ["web-1-os", "web-1-data", "db-1-os"]
                .iter()
                .all(|name| self.socket(name).exists());
            if sockets_up && self.try_status().is_some() {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "ferry run did not come up:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.root().join(format!("run/{name}.sock"))
    }

    fn uri(&self, machine: &str, disk: &str) -> String {
        format!(
            "nbd+unix:///{machine}/{disk}?socket={}",
            self.socket(&format!("{machine}-{disk}")).display()
        )
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_status(&self) -> Option<serde_json::Value> {
        let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "status",
                "--config",
                self.config.to_str().unwrap(),
                "--json",
            ])
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// The status of disk `machine/name`, once `done` holds for it (bounded poll).
    fn wait_disk(
        &self,
        machine: &str,
        name: &str,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                let disk = status["disks"]
                    .as_array()
                    .and_then(|disks| {
                        disks
                            .iter()
                            .find(|disk| disk["machine"] == machine && disk["name"] == name)
                    })
                    .cloned();
                if let Some(disk) = disk {
                    if done(&disk) {
                        return disk;
                    }
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{what}: not within {DEADLINE:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        let child = self.child.as_mut().unwrap();
        assert!(Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert_eq!(
                    status.code(),
                    Some(0),
                    "ferry run exit:\n{}",
                    self.log_text()
                );
                self.child = None;
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "ferry run did not stop on SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        !stdout.contains("failed") && !stderr.contains("failed"),
        "{program} {args:?}:\n{stdout}\n{stderr}"
    );
    stdout
}

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(uri);
    run("qemu-io", &args)
}

/// A deliberately rude NBD client.
struct RawClient {
    stream: UnixStream,
}

impl RawClient {
    fn connect(socket: &Path) -> RawClient {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        RawClient { stream }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn option_reply_type(&mut self) -> u32 {
        let mut header = [0u8; OPTION_REPLY_HEADER_BYTES];
        self.stream.read_exact(&mut header).unwrap();
        let length = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
        let mut all = header.to_vec();
        all.resize(OPTION_REPLY_HEADER_BYTES + length, 0);
        self.stream
            .read_exact(&mut all[OPTION_REPLY_HEADER_BYTES..])
            .unwrap();
        decode_option_reply(&all).unwrap().1
    }

    fn go(&mut self, export: &str) {
        self.send(&encode_option(
            OPT_GO,
            &encode_go_data(export, &[INFO_BLOCK_SIZE]),
        ));
        for _ in 0..8 {
            match self.option_reply_type() {
                REP_ACK => return,
                REP_INFO => {}
                other => panic!("GO answered {other:#x}"),
            }
        }
        panic!("no ACK to GO");
    }

    fn request(&mut self, command: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
        self.send(&encode_request(&Request {
            cookie,
            command,
            flags: 0,
            offset,
            length,
        }));
        self.send(payload);
    }

    fn reply(&mut self) -> (u32, u64) {
        let mut header = [0u8; SIMPLE_REPLY_BYTES];
        self.stream.read_exact(&mut header).unwrap();
        decode_simple_reply(&header).unwrap()
    }

    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}

#[test]
fn source_appliance_captures_two_machines_three_disks() {
    let mut appliance = Appliance::new();
    appliance.start();
    let root = appliance.root().to_path_buf();

    // 1. qemu-io writes through web-1/os and reads back through the export.
    qemu_io(
        &appliance.uri("web-1", "os"),
        &[
            "write -P 0xa1 0 256k",
            "write -f -P 0xa2 1M 64k",
            "write -z 64k 64k",
            "flush",
            "read -P 0xa1 0 64k",
            "read -P 0 64k 64k",
            "read -P 0xa2 1M 64k",
        ],
    );
    let os_image = std::fs::read(root.join("web-1-os.raw")).unwrap();
    assert!(os_image[..64 << 10].iter().all(|&byte| byte == 0xa1));
    assert!(os_image[64 << 10..128 << 10].iter().all(|&byte| byte == 0));
    assert!(os_image[1 << 20..(1 << 20) + (64 << 10)]
        .iter()
        .all(|&byte| byte == 0xa2));
    let os = appliance.wait_disk("web-1", "os", "web-1/os counted", |disk| {
        disk["bytes_written"] == (256 + 64) << 10
    });
    assert!(os["last_sequence"].as_u64().unwrap() >= 3, "{os}");
    assert!(
        os["journal_used_bytes"].as_u64().unwrap() >= (256 + 64) << 10,
        "{os}"
    );
    for key in [
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
    ] {
        assert!(os.get(key).is_some(), "status lacks {key}: {os}");
    }

    // 2. nbdcopy a file into web-1/data and back out through the export.
    let seed = 0xe2e_5eedu64;
    println!("seed {seed:#x}");
    let mut pattern = vec![0u8; 2 << 20];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut pattern);
    let pattern_path = root.join("pattern.raw");
    std::fs::write(&pattern_path, &pattern).unwrap();
    let data_uri = appliance.uri("web-1", "data");
    // nbdcopy copies the whole source; the 8 MiB export keeps zeroes past the 2 MiB file.
    run("nbdcopy", &[pattern_path.to_str().unwrap(), &data_uri]);
    let copied_back = root.join("copied-back.raw");
    run("nbdcopy", &[&data_uri, copied_back.to_str().unwrap()]);
    let back = std::fs::read(&copied_back).unwrap();
    assert!(
        back[..2 << 20] == pattern[..],
        "read back through the export differs"
    );
    assert!(std::fs::read(root.join("web-1-data.raw")).unwrap()[..2 << 20] == pattern[..]);
    let listing = run(
        "nbdinfo",
        &[
            "--list",
            &format!(
                "nbd+unix://?socket={}",
                appliance.socket("web-1-data").display()
            ),
        ],
    );
    assert!(listing.contains("web-1/data"), "{listing}");

    // 3. Bad NBD input on web-1/data: error replies or closed connections, one log line each.
    let data_socket = appliance.socket("web-1-data");
    let mut garbage = RawClient::connect(&data_socket);
    garbage.send(b"\xff\xff\xff\xffnot nbd at all");
    assert!(garbage.closed());
    let mut client = RawClient::connect(&data_socket);
    client.send(&3u32.to_be_bytes());
    client.send(&encode_option(0x4242, b""));
    assert_eq!(client.option_reply_type(), REP_ERR_UNSUP);
    client.go("web-1/data");
    client.request(CMD_READ, 1, DISK_BYTES, 4096, &[]);
    assert_eq!(
        client.reply(),
        (ErrorCode::Inval.as_u32(), 1),
        "read past the end"
    );
    client.request(CMD_WRITE, 2, 0, 1 << 30, &[]);
    assert_eq!(
        client.reply(),
        (ErrorCode::Overflow.as_u32(), 2),
        "oversized write"
    );
    assert!(client.closed());
    let mut vanishing = RawClient::connect(&data_socket);
    vanishing.send(&3u32.to_be_bytes());
    vanishing.go("");
    vanishing.request(CMD_WRITE, 3, 0, 1 << 20, &[0xee; 4096]);
    drop(vanishing);
    // Everything keeps serving, and the vanished write left nothing behind.
    qemu_io(
        &data_uri,
        &[
            "read -P 0 2M 64k",
            "write -P 0xd1 4M 4k",
            "read -P 0xd1 4M 4k",
        ],
    );
    assert!(std::fs::read(root.join("web-1-data.raw")).unwrap()[..2 << 20] == pattern[..]);
    qemu_io(&appliance.uri("web-1", "os"), &["read -P 0xa1 128k 128k"]);
    let start = Instant::now();
    let wanted = [
        "client flags",
        "ends past the export",
        "EOVERFLOW",
        "client vanished mid-write",
    ];
    while !wanted
        .iter()
        .all(|line| appliance.log_text().contains(line))
    {
        assert!(
            start.elapsed() < DEADLINE,
            "bad input not logged:\n{}",
            appliance.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // 4. Fill the 4 MiB journal through db-1/os: writes keep succeeding, the disk goes
    //    resync-needed, its bitmap records the extents, every write is on the disk.
    let mut db = vec![0u8; DISK_BYTES as usize];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed + 1).fill_bytes(&mut db);
    let db_path = root.join("db.raw");
    std::fs::write(&db_path, &db).unwrap();
    run(
        "nbdcopy",
        &[db_path.to_str().unwrap(), &appliance.uri("db-1", "os")],
    );
    qemu_io(
        &appliance.uri("db-1", "os"),
        &["write -P 0xdb 7M 64k", "flush", "read -P 0xdb 7M 64k"],
    );
    db[7 << 20..(7 << 20) + (64 << 10)].fill(0xdb);
    assert!(
        std::fs::read(root.join("db-1-os.raw")).unwrap() == db,
        "a write was lost"
    );
    appliance.wait_disk("db-1", "os", "db-1/os resync-needed", |disk| {
        disk["state"] == "resync-needed"
    });
    assert!(
        appliance.log_text().contains("cache journal full"),
        "{}",
        appliance.log_text()
    );
    let bitmap_path = DirtyBitmap::path_for(&root.join("state"), "db-1", "os");
    let dirty = DirtyBitmap::open(
        &bitmap_path,
        DISK_BYTES,
        ferry_appliance::capture::EXTENT_BYTES_DEFAULT,
    )
    .unwrap();
    assert!(dirty.is_dirty(7 << 20) && dirty.dirty_extent_count() > 0);
    drop(dirty);

    // 5. Clean stop, restart: the data is still served, and the overflowed disk is still
    //    resync-needed because its bitmap was persisted.
    appliance.stop();
    appliance.start();
    appliance.wait_disk("db-1", "os", "db-1/os still resync-needed", |disk| {
        disk["state"] == "resync-needed"
    });
    assert!(appliance
        .log_text()
        .contains("dirty-extent bitmap has extents from before the restart"));
    qemu_io(
        &appliance.uri("web-1", "os"),
        &["read -P 0xa1 0 64k", "read -P 0xa2 1M 64k"],
    );
    qemu_io(&appliance.uri("db-1", "os"), &["read -P 0xdb 7M 64k"]);
    appliance.stop();
}

/// Replies to one connection come from two writers: a large write's handler sends its 16-byte
/// reply itself, read data goes out through the reply thread in several blocking writes. A client
/// that pipelines large reads with small writes (and reads its replies from another thread, so
/// both sides' buffers fill and the reply thread's writes are partial) must still get every
/// reply whole: a handler's reply landing inside read data would show as a bad magic, an
/// unknown cookie or wrong data.
#[test]
fn replies_from_handlers_and_the_reply_thread_never_interleave() {
    const READ_BYTES: usize = 256 << 10;
    // Large enough to be answered by its handler; 32 of them and the pattern fit the journal.
    const WRITE_BYTES: usize = 64 << 10;
    const PAIRS: u64 = 32;
    let seed: u64 = rand::random();
    println!("seed {seed}");
    let mut appliance = Appliance::new();
    appliance.start();
    let mut pattern = vec![0u8; 1 << 20];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut pattern);
    let mut client = RawClient::connect(&appliance.socket("web-1-data"));
    // Client flags: fixed newstyle, no zeroes.
    client.send(&3u32.to_be_bytes());
    client.go("web-1/data");
    // The first MiB holds the pattern the reads check.
    client.request(CMD_WRITE, 1, 0, 1 << 20, &pattern);
    assert_eq!(client.reply(), (0, 1));
    // Then, without waiting: a 256 KiB read of the pattern and a 4 KiB write past it, in turn.
    let block = |i: u64| -> Vec<u8> {
        (0..WRITE_BYTES)
            .map(|b| (i as usize * 7 + b) as u8)
            .collect()
    };
    let read_offset = |i: u64| (i % 4) * READ_BYTES as u64;
    let mut writer = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..PAIRS {
            let read = encode_request(&Request {
                cookie: 1000 + 2 * i,
                command: CMD_READ,
                flags: 0,
                offset: read_offset(i),
                length: READ_BYTES as u32,
            });
            writer.write_all(&read).unwrap();
            let write = encode_request(&Request {
                cookie: 1000 + 2 * i + 1,
                command: CMD_WRITE,
                flags: 0,
                offset: (1 << 20) + i * WRITE_BYTES as u64,
                length: WRITE_BYTES as u32,
            });
            writer.write_all(&write).unwrap();
            writer.write_all(&block(i)).unwrap();
        }
    });
    let mut seen = std::collections::BTreeSet::new();
    let mut data = vec![0u8; READ_BYTES];
    for _ in 0..2 * PAIRS {
        let (error, cookie) = client.reply();
        assert_eq!(error, 0, "reply to cookie {cookie}");
        assert!(
            (1000..1000 + 2 * PAIRS).contains(&cookie) && seen.insert(cookie),
            "unexpected or repeated cookie {cookie} (seen {})",
            seen.len()
        );
        if (cookie - 1000) % 2 == 0 {
            client.stream.read_exact(&mut data).unwrap();
            let at = read_offset((cookie - 1000) / 2) as usize;
            assert!(
                data == pattern[at..at + READ_BYTES],
                "read {cookie} at {at}: data differs"
            );
        }
    }
    sender.join().unwrap();
    // Every write reached the disk.
    for i in 0..PAIRS {
        client.request(
            CMD_READ,
            5000 + i,
            (1 << 20) + i * WRITE_BYTES as u64,
            WRITE_BYTES as u32,
            &[],
        );
        assert_eq!(client.reply(), (0, 5000 + i));
        let mut back = vec![0u8; WRITE_BYTES];
        client.stream.read_exact(&mut back).unwrap();
        assert_eq!(back, block(i), "write {i}");
    }
    appliance.stop();
}
