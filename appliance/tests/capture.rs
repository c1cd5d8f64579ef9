//! The capture front-end driven by real NBD clients (qemu-io, nbdcopy, nbdinfo) and by a raw
//! socket speaking deliberately bad NBD: a real server on unix sockets in a temp dir over real
//! image files, checked against the journal it fills (replaying the journal must reproduce the
//! disk) and against the files themselves.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_appliance::capture::{
    Capture, CaptureConfig, CaptureDisk, DiskSpec, Endpoint, ListenerSpec, SharedJournal,
};
use ferry_appliance::control::DiskState;
use ferry_appliance::core::nbd::client::{
    decode_option_reply, decode_simple_reply, encode_go_data, encode_option, encode_request,
};
use ferry_appliance::core::nbd::*;
use ferry_appliance::core::record::RecordKind;
use ferry_appliance::io::disk::{DirectMode, DiskOptions};
use rand::{RngCore, SeedableRng};
use tokio::sync::watch;

// ---------------------------------------------------------------------------------------------
// Log capture: the bad-input test checks that each bad input produced its one log line.

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        std::io::stderr().write_all(bytes)?;
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static LogBuffer {
    static LOGS: OnceLock<LogBuffer> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_env_filter("ferry_appliance=debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buffer
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

/// Polls `condition` every 10 ms until it holds or `deadline` passes.
fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Fixture: disks, journal, capture with one socket per disk plus one socket serving all.

struct TestDisk {
    machine: String,
    name: String,
    disk_id: u32,
    image: PathBuf,
    socket: PathBuf,
    size: u64,
}

impl TestDisk {
    fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}/{}?socket={}",
            self.machine,
            self.name,
            self.socket.display()
        )
    }
}

struct Fixture {
    directory: tempfile::TempDir,
    disks: Vec<TestDisk>,
    all_socket: PathBuf,
    journal: SharedJournal,
    capture: Option<Capture>,
    shutdown: watch::Sender<bool>,
}

impl Fixture {
    async fn start(
        disks: &[(&str, &str, u64)],
        segment_count: usize,
        segment_bytes: usize,
    ) -> Fixture {
        Self::start_with(disks, segment_count, segment_bytes, DiskOptions::default()).await
    }

    async fn start_with(
        disks: &[(&str, &str, u64)],
        segment_count: usize,
        segment_bytes: usize,
        disk_options: DiskOptions,
    ) -> Fixture {
        logs();
        let directory = tempfile::tempdir().unwrap();
        let mut test_disks = Vec::new();
        for (index, (machine, name, size)) in disks.iter().enumerate() {
            let image = directory.path().join(format!("{machine}-{name}.raw"));
            std::fs::File::create(&image)
                .unwrap()
                .set_len(*size)
                .unwrap();
            test_disks.push(TestDisk {
                machine: machine.to_string(),
                name: name.to_string(),
                disk_id: index as u32 + 1,
                image,
                socket: directory.path().join(format!("{machine}-{name}.sock")),
                size: *size,
            });
        }
        let all_socket = directory.path().join("all.sock");
        let journal_bytes = (segment_count * segment_bytes) as u64;
        let (journal, _) =
            SharedJournal::open_mmap(&directory.path().join("journal"), journal_bytes).unwrap();
        let specs = test_disks
            .iter()
            .map(|disk| DiskSpec {
                machine: disk.machine.clone(),
                name: disk.name.clone(),
                disk_id: disk.disk_id,
                path: disk.image.clone(),
                disk_options,
                initial_state: DiskState::Protected,
            })
            .collect::<Vec<_>>();
        let mut listeners: Vec<ListenerSpec> = specs
            .iter()
            .zip(&test_disks)
            .map(|(spec, disk)| ListenerSpec {
                endpoint: Endpoint::Unix(disk.socket.clone()),
                exports: vec![spec.export_name()],
            })
            .collect();
        listeners.push(ListenerSpec {
            endpoint: Endpoint::Unix(all_socket.clone()),
            exports: specs.iter().map(|spec| spec.export_name()).collect(),
        });
        let config = CaptureConfig::new(directory.path().join("state"), specs, listeners);
        let (shutdown, shutdown_receiver) = watch::channel(false);
        let capture = Capture::start(config, journal.clone(), shutdown_receiver)
            .await
            .unwrap();
        Fixture {
            directory,
            disks: test_disks,
            all_socket,
            journal,
            capture: Some(capture),
            shutdown,
        }
    }

    fn capture_disk(&self, index: usize) -> CaptureDisk {
        let disk = &self.disks[index];
        self.capture
            .as_ref()
            .unwrap()
            .disk(&disk.machine, &disk.name)
            .unwrap()
            .clone()
    }

    /// Rebuilds a disk's content from zeroes by replaying its journal records in order.
    fn replay(&self, index: usize) -> Vec<u8> {
        let disk = &self.disks[index];
        let mut image = vec![0u8; disk.size as usize];
        let journal = self.journal.lock();
        let mut last_seq = 0;
        for record in journal.iter_from(0) {
            let record = record.unwrap();
            assert!(record.seq > last_seq, "journal out of order");
            last_seq = record.seq;
            if record.disk_id != disk.disk_id {
                continue;
            }
            let range = record.offset as usize..(record.offset + record.length) as usize;
            match record.kind {
                RecordKind::Write => image[range].copy_from_slice(record.payload),
                RecordKind::Zero | RecordKind::Trim => image[range].fill(0),
                other => panic!("unexpected record kind {other:?}"),
            }
        }
        image
    }

    async fn stop(mut self) {
        self.shutdown.send(true).unwrap();
        let capture = self.capture.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), capture.wait())
            .await
            .unwrap()
            .unwrap();
        // Listener sockets are removed on a clean stop.
        for disk in &self.disks {
            assert!(!disk.socket.exists());
        }
        drop(self.directory);
    }
}

async fn run(program: &str, args: &[&str]) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
    .unwrap_or_else(|error| panic!("running {program}: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        !stdout.contains("failed") && !stderr.contains("failed"),
        "{program} {args:?}:\n{stdout}\n{stderr}"
    );
    stdout
}

async fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(uri);
    run("qemu-io", &args).await
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_are_journaled_in_order_and_read_back() {
    let fixture = Fixture::start(
        &[("web-1", "os", 8 << 20), ("web-1", "data", 4 << 20)],
        8,
        2 << 20,
    )
    .await;
    let os = &fixture.disks[0];
    qemu_io(
        &os.uri(),
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 4096 4096",
            "write -P 0x11 1M 3M", // larger than one record: split into 1 MiB records
            "write -P 0x22 100 200", // unaligned: qemu read-modify-writes 512-byte blocks
            "write -z 2M 64k",
            "discard 3M 128k",
            "write -f -P 0x33 7M 4k", // FUA
            "flush",
            "read -P 0xab 0 100",
            "read -P 0x22 100 200",
            "read -P 0xcd 4096 4096",
            "read -P 0x11 1M 1M",
            "read -P 0 2M 64k",
            "read -P 0 3M 128k",
            "read -P 0x33 7M 4k",
        ],
    )
    .await;
    // The other disk through the socket that serves both exports.
    let data = &fixture.disks[1];
    let all = format!(
        "nbd+unix:///{}/{}?socket={}",
        data.machine,
        data.name,
        fixture.all_socket.display()
    );
    qemu_io(&all, &["write -P 0x44 0 1M", "read -P 0x44 0 1M"]).await;

    let on_disk = std::fs::read(&os.image).unwrap();
    assert!(on_disk[..100].iter().all(|byte| *byte == 0xab));
    assert!(on_disk[100..300].iter().all(|byte| *byte == 0x22));
    assert_eq!(
        fixture.replay(0),
        on_disk,
        "replaying the journal must reproduce the disk"
    );
    assert_eq!(fixture.replay(1), std::fs::read(&data.image).unwrap());

    let last_seq = {
        let journal = fixture.journal.lock();
        let records: Vec<_> = journal.iter_from(0).map(|record| record.unwrap()).collect();
        let kinds: Vec<_> = records
            .iter()
            .filter(|r| r.disk_id == 1)
            .map(|r| r.kind)
            .collect();
        assert!(
            kinds.contains(&RecordKind::Zero) || kinds.contains(&RecordKind::Trim),
            "{kinds:?}"
        );
        assert!(records.iter().all(|record| record.payload.len() <= 1 << 20));
        let split: Vec<_> = records
            .iter()
            .filter(|r| {
                r.disk_id == 1
                    && r.offset >= 1 << 20
                    && r.offset < 4 << 20
                    && r.kind == RecordKind::Write
            })
            .map(|r| (r.offset, r.length))
            .collect();
        assert_eq!(
            split,
            vec![(1 << 20, 1 << 20), (2 << 20, 1 << 20), (3 << 20, 1 << 20)]
        );
        records
            .iter()
            .filter(|r| r.disk_id == 1)
            .map(|r| r.seq)
            .max()
            .unwrap()
    };
    // FLUSH made every record before it durable.
    assert!(
        fixture.journal.durable_seq() >= last_seq,
        "durable {} last {last_seq}",
        fixture.journal.durable_seq()
    );

    let stats = fixture.capture_disk(0).stats();
    assert_eq!(stats.state, DiskState::Protected);
    assert!(stats.bytes_written >= (64 << 10) + (3 << 20));
    assert!(stats.last_sequence > 0 && stats.writes_bitmap_only == 0);
    fixture.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_in_and_out_and_nbdinfo_list() {
    let fixture = Fixture::start(
        &[("db-1", "data", 16 << 20), ("db-1", "logs", 1 << 20)],
        16,
        4 << 20,
    )
    .await;
    let seed = 0x5eed_0001u64;
    println!("seed {seed:#x}");
    let mut source = vec![0u8; 16 << 20];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut source);
    source[4 << 20..5 << 20].fill(0); // a zero run nbdcopy may send as WRITE_ZEROES
    let source_path = fixture.directory.path().join("source.raw");
    std::fs::write(&source_path, &source).unwrap();

    let disk = &fixture.disks[0];
    run("nbdcopy", &[source_path.to_str().unwrap(), &disk.uri()]).await;
    assert!(
        std::fs::read(&disk.image).unwrap() == source,
        "backing file differs from the copied file"
    );
    let copy_path = fixture.directory.path().join("copy.raw");
    run("nbdcopy", &[&disk.uri(), copy_path.to_str().unwrap()]).await;
    assert!(
        std::fs::read(&copy_path).unwrap() == source,
        "file read back through the export differs"
    );
    assert!(
        fixture.replay(0) == source,
        "journal replay differs from the source"
    );

    // LIST on the socket serving both; the single-disk socket serves its disk as the default
    // export too.
    let listing = run(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", fixture.all_socket.display()),
        ],
    )
    .await;
    assert!(
        listing.contains("db-1/data") && listing.contains("db-1/logs"),
        "{listing}"
    );
    let default = run(
        "nbdinfo",
        &[
            "--size",
            &format!("nbd+unix://?socket={}", disk.socket.display()),
        ],
    )
    .await;
    assert_eq!(default.trim(), (16u64 << 20).to_string());
    fixture.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Raw-socket client for bad input.

struct RawClient {
    stream: UnixStream,
}

impl RawClient {
    fn connect(socket: &Path) -> RawClient {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut client = RawClient { stream };
        let mut greeting = [0u8; 18];
        client.stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        client
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut header = [0u8; OPTION_REPLY_HEADER_BYTES];
        self.stream.read_exact(&mut header).unwrap();
        let length = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
        let mut all = header.to_vec();
        all.resize(OPTION_REPLY_HEADER_BYTES + length, 0);
        self.stream
            .read_exact(&mut all[OPTION_REPLY_HEADER_BYTES..])
            .unwrap();
        let (option, reply_type, data, _) = decode_option_reply(&all).unwrap();
        (option, reply_type, data.to_vec())
    }

    /// Flags, then GO for `export` asking for block sizes; reads replies up to the ACK.
    fn go(&mut self, export: &str) {
        self.send(&3u32.to_be_bytes());
        self.send(&encode_option(
            OPT_GO,
            &encode_go_data(export, &[INFO_BLOCK_SIZE]),
        ));
        for _ in 0..8 {
            let (_, reply_type, _) = self.option_reply();
            if reply_type == REP_ACK {
                return;
            }
            assert_eq!(reply_type, REP_INFO);
        }
        panic!("no ACK to GO");
    }

    fn request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        self.send(&encode_request(&Request {
            cookie,
            command,
            flags,
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

    /// Sends a FLUSH and waits for its answer: every write answered before it is then on the
    /// disk (writes may be answered before they are, see `CaptureDisk::apply_answering_early`).
    fn flush(&mut self, cookie: u64) {
        self.request(CMD_FLUSH, 0, cookie, 0, 0, &[]);
        assert_eq!(self.reply(), (0, cookie), "FLUSH failed");
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0))
            || matches!(self.stream.read(&mut byte), Err(ref e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_error_replies_and_others_keep_serving() {
    let fixture = Fixture::start(&[("bad-1", "os", 4 << 20)], 8, 2 << 20).await;
    let socket = fixture.disks[0].socket.clone();
    let disk = fixture.capture_disk(0);

    let scenario = tokio::task::spawn_blocking(move || {
        // Garbage instead of client flags: closed.
        let mut client = RawClient::connect(&socket);
        client.send(b"GET / HTTP/1.1\r\n\r\n");
        assert!(client.closed());

        // Garbage instead of an option header: closed.
        let mut client = RawClient::connect(&socket);
        client.send(&1u32.to_be_bytes());
        client.send(&[0x42; 16]);
        assert!(client.closed());

        // Unknown options and STARTTLS: ERR_UNSUP, and the handshake goes on.
        let mut client = RawClient::connect(&socket);
        client.send(&3u32.to_be_bytes());
        client.send(&encode_option(0xdead, b"??"));
        assert_eq!(client.option_reply().1, REP_ERR_UNSUP);
        client.send(&encode_option(OPT_STARTTLS, b""));
        assert_eq!(client.option_reply().1, REP_ERR_UNSUP);
        client.send(&encode_option(OPT_GO, &encode_go_data("no/such", &[])));
        assert_eq!(client.option_reply().1, REP_ERR_UNKNOWN);
        client.send(&encode_option(OPT_ABORT, b""));
        assert_eq!(client.option_reply().1, REP_ACK);
        assert!(client.closed());

        // Transmission errors: each gets its error reply, the connection stays usable.
        let mut client = RawClient::connect(&socket);
        client.go("bad-1/os");
        let size = 4u64 << 20;
        client.request(CMD_READ, 0, 1, size - 512, 1024, &[]);
        assert_eq!(
            client.reply(),
            (ErrorCode::Inval.as_u32(), 1),
            "read past the end"
        );
        client.request(CMD_WRITE, 0, 2, size, 512, &[7; 512]);
        assert_eq!(
            client.reply(),
            (ErrorCode::NoSpc.as_u32(), 2),
            "write past the end"
        );
        client.request(CMD_WRITE, 0, 3, 100, 512, &[7; 512]);
        assert_eq!(
            client.reply(),
            (ErrorCode::Inval.as_u32(), 3),
            "misaligned write"
        );
        client.request(CMD_READ, 0, 4, 0, 64 << 20, &[]);
        assert_eq!(
            client.reply(),
            (ErrorCode::Overflow.as_u32(), 4),
            "oversized read"
        );
        client.request(77, 0, 5, 0, 512, &[]);
        assert_eq!(
            client.reply(),
            (ErrorCode::Inval.as_u32(), 5),
            "unknown command"
        );
        client.request(CMD_WRITE, 0, 6, 0, 512, &[9; 512]);
        assert_eq!(client.reply(), (0, 6), "a good write after the bad ones");
        // Oversized write: EOVERFLOW, then the server closes (it will not read 1 GiB).
        client.request(CMD_WRITE, 0, 7, 0, 1 << 30, &[]);
        assert_eq!(client.reply(), (ErrorCode::Overflow.as_u32(), 7));
        assert!(client.closed());

        // A client that vanishes halfway through a write's payload.
        let mut client = RawClient::connect(&socket);
        client.go("");
        client.request(CMD_WRITE, 0, 8, 1 << 20, 64 << 10, &[0xee; 1000]);
        drop(client);

        // A bad request magic: closed.
        let mut client = RawClient::connect(&socket);
        client.go("bad-1/os");
        client.send(&[0x55; REQUEST_HEADER_BYTES]);
        assert!(client.closed());
    });
    tokio::time::timeout(Duration::from_secs(60), scenario)
        .await
        .unwrap()
        .unwrap();

    // Another client still gets served, and the vanished write left no trace.
    let uri = fixture.disks[0].uri();
    qemu_io(
        &uri,
        &[
            "read -P 9 0 512",
            "read -P 0 1M 64k",
            "write -P 5 1M 4k",
            "read -P 5 1M 4k",
        ],
    )
    .await;
    let image = std::fs::read(&fixture.disks[0].image).unwrap();
    assert_eq!(fixture.replay(0), image);
    assert!(!fixture.replay(0).contains(&0xee));
    assert_eq!(disk.state(), DiskState::Protected);

    let expected_lines = [
        "client flags",
        "magic 0x4242424242424242",
        "refused with EINVAL: range 4193792+1024 ends past the export's 4194304 bytes",
        "refused with ENOSPC: range 4194304+512 ends past",
        "refused with EINVAL: range 100+512 is not aligned to 512 bytes",
        "refused with EOVERFLOW: length 67108864",
        "command 77 is not supported",
        "connection closed: request refused with EOVERFLOW: length 1073741824",
        "client vanished mid-write",
        "magic 0x55555555",
    ];
    wait_until("every bad input logged", Duration::from_secs(10), || {
        let text = log_text();
        expected_lines.iter().all(|line| text.contains(line))
    });
    let text = log_text();
    for line in expected_lines {
        let count = text
            .lines()
            .filter(|log_line| log_line.contains(line))
            .count();
        assert_eq!(count, 1, "{line:?} logged {count} times:\n{text}");
    }
    fixture.stop().await;
}

/// Many overlapping writes in flight at once reach the disk in journal order: the disk ends up
/// holding the payload of the highest-sequence record for each byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_reach_the_disk_in_journal_order() {
    let fixture = Fixture::start(&[("order-1", "os", 1 << 20)], 8, 2 << 20).await;
    let socket = fixture.disks[0].socket.clone();
    let writes = tokio::task::spawn_blocking(move || {
        let mut client = RawClient::connect(&socket);
        client.go("order-1/os");
        // 100 writes, all overlapping [64 KiB, 128 KiB), with shifting starts and lengths.
        for index in 0..100u64 {
            let offset = 32768 + (index % 8) * 4096;
            let length = 65536 + (index % 5) as u32 * 4096;
            client.request(
                CMD_WRITE,
                0,
                index,
                offset,
                length,
                &vec![index as u8 + 1; length as usize],
            );
        }
        let mut cookies: Vec<u64> = (0..100)
            .map(|_| {
                let (error, cookie) = client.reply();
                assert_eq!(error, 0);
                cookie
            })
            .collect();
        cookies.sort_unstable();
        assert_eq!(cookies, (0..100).collect::<Vec<_>>());
        client.flush(100);
    });
    tokio::time::timeout(Duration::from_secs(60), writes)
        .await
        .unwrap()
        .unwrap();
    assert!(std::fs::read(&fixture.disks[0].image).unwrap() == fixture.replay(0));
    fixture.stop().await;
}

/// Two clients at once send a seeded mix of writes (4 KiB-aligned and not, 512 bytes to
/// 64 KiB, some with FUA), zeroings, trims and flushes over one small region, so that requests
/// overlap constantly and wait for their predecessors, while aligned ones go O_DIRECT (where the
/// filesystem allows) and the rest through the page cache. Every request succeeds, and the disk
/// equals the journal replayed in sequence order — with O_DIRECT on and off.
async fn mixed_concurrent_requests_match_the_journal(direct: DirectMode, seed: u64) {
    println!("seed {seed} direct {direct:?} (rerun with FERRY_SEED={seed})");
    let export = format!("mixed-{direct:?}").to_lowercase();
    let fixture = Fixture::start_with(
        &[(&export, "os", 1 << 20)],
        8,
        4 << 20,
        DiskOptions {
            direct,
            ..DiskOptions::default()
        },
    )
    .await;
    let region: u64 = 256 << 10;
    let clients: Vec<_> = [fixture.disks[0].socket.clone(), fixture.all_socket.clone()]
        .into_iter()
        .enumerate()
        .map(|(index, socket)| {
            let export = format!("{export}/os");
            tokio::task::spawn_blocking(move || {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + index as u64);
                let mut client = RawClient::connect(&socket);
                client.go(&export);
                for batch in 0..4u64 {
                    let count = 100u64;
                    for request in 0..count {
                        let cookie = batch * count + request;
                        let aligned = rng.next_u32() % 2 == 0;
                        let (offset, length) = if aligned {
                            let blocks = 1 + u64::from(rng.next_u32()) % 16;
                            let start = u64::from(rng.next_u32()) % (region / 4096 - blocks);
                            (start * 4096, blocks * 4096)
                        } else {
                            // The export's minimum block is 512 bytes: sectors, mostly not
                            // 4 KiB-aligned, which the disk writes through the page cache.
                            let sectors = 1 + u64::from(rng.next_u32()) % 128;
                            let start = u64::from(rng.next_u32()) % (region / 512 - sectors);
                            (start * 512, sectors * 512)
                        };
                        let fua = if rng.next_u32() % 8 == 0 {
                            CMD_FLAG_FUA
                        } else {
                            0
                        };
                        match rng.next_u32() % 20 {
                            0 => client.request(CMD_TRIM, fua, cookie, offset, length as u32, &[]),
                            1 => client.request(
                                CMD_WRITE_ZEROES,
                                fua,
                                cookie,
                                offset,
                                length as u32,
                                &[],
                            ),
                            2 => client.request(CMD_FLUSH, 0, cookie, 0, 0, &[]),
                            _ => {
                                let mut payload = vec![0u8; length as usize];
                                rng.fill_bytes(&mut payload);
                                client.request(
                                    CMD_WRITE,
                                    fua,
                                    cookie,
                                    offset,
                                    length as u32,
                                    &payload,
                                );
                            }
                        }
                    }
                    let mut cookies: Vec<u64> = (0..count)
                        .map(|_| {
                            let (error, cookie) = client.reply();
                            assert_eq!(error, 0, "request {cookie} failed");
                            cookie
                        })
                        .collect();
                    cookies.sort_unstable();
                    assert_eq!(
                        cookies,
                        (batch * count..(batch + 1) * count).collect::<Vec<_>>()
                    );
                }
                client.flush(u64::MAX);
            })
        })
        .collect();
    for client in clients {
        tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .unwrap()
            .unwrap();
    }
    let disk = fixture.capture_disk(0);
    assert_eq!(disk.stats().writes_bitmap_only, 0);
    assert!(disk.stats().writes_journaled > 0);
    let image = std::fs::read(&fixture.disks[0].image).unwrap();
    let replayed = fixture.replay(0);
    if let Some(first) = image.iter().zip(&replayed).position(|(a, b)| a != b) {
        panic!("seed {seed:#x}: disk differs from the replayed journal at byte {first}");
    }
    fixture.stop().await;
}

fn seed() -> u64 {
    std::env::var("FERRY_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(rand::random)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_concurrent_requests_match_the_journal_page_cache() {
    mixed_concurrent_requests_match_the_journal(DirectMode::Off, seed()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_concurrent_requests_match_the_journal_direct() {
    mixed_concurrent_requests_match_the_journal(DirectMode::Auto, seed()).await;
}

/// A small journal fills: writes keep succeeding, the disk becomes resync-needed, the bitmap
/// holds every extent written after the overflow, and every byte is on the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_journal_falls_back_to_the_bitmap() {
    // 4 segments of 2 MiB: an 8 MiB journal.
    let fixture = Fixture::start(
        &[("full-1", "os", 32 << 20), ("full-1", "data", 1 << 20)],
        4,
        2 << 20,
    )
    .await;
    let seed = 0x5eed_0002u64;
    println!("seed {seed:#x}");
    let mut source = vec![0u8; 32 << 20];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut source);
    let source_path = fixture.directory.path().join("source.raw");
    std::fs::write(&source_path, &source).unwrap();
    let disk = &fixture.disks[0];
    run("nbdcopy", &[source_path.to_str().unwrap(), &disk.uri()]).await;
    // More writes after the overflow, with FUA and a flush.
    qemu_io(
        &disk.uri(),
        &[
            "write -f -P 0x77 30M 64k",
            "write -z 31M 64k",
            "flush",
            "read -P 0x77 30M 64k",
        ],
    )
    .await;
    source[30 << 20..(30 << 20) + 65536].fill(0x77);
    source[31 << 20..(31 << 20) + 65536].fill(0);
    assert!(
        std::fs::read(&disk.image).unwrap() == source,
        "a write was lost on the disk"
    );

    let capture_disk = fixture.capture_disk(0);
    assert_eq!(capture_disk.state(), DiskState::ResyncNeeded);
    let stats = capture_disk.stats();
    assert!(
        stats.writes_bitmap_only > 0 && stats.dirty_extents > 0,
        "{stats:?}"
    );
    assert!(capture_disk.bitmap().is_dirty(30 << 20) && capture_disk.bitmap().is_dirty(31 << 20));
    // Journal + bitmap together cover everything: every byte that replay gets wrong is in a
    // dirty extent.
    let replayed = fixture.replay(0);
    let extent = capture_disk.bitmap().extent_bytes() as usize;
    for (index, (a, b)) in replayed
        .chunks(extent)
        .zip(source.chunks(extent))
        .enumerate()
    {
        if a != b {
            assert!(
                capture_disk.bitmap().is_dirty((index * extent) as u64),
                "extent {index} lost"
            );
        }
    }
    // The bitmap file holds the same extents (it was persisted before the writes).
    let reopened = ferry_appliance::capture::DirtyBitmap::open(
        capture_disk.bitmap().path(),
        32 << 20,
        extent as u64,
    )
    .unwrap();
    assert_eq!(
        reopened.dirty_extents(),
        capture_disk.bitmap().dirty_extents()
    );
    // The other disk is unaffected until it writes.
    assert_eq!(fixture.capture_disk(1).state(), DiskState::Protected);
    fixture.stop().await;
}

/// Each connection is read by a thread blocked in `read` (capture/server.rs). A stop must wake
/// it: one client attached and idle, another stalled halfway through a write's payload, and the
/// stop still completes (within `Fixture::stop`'s 30 s bound); both clients then see their
/// connection closed (EOF, or a reset for the one whose unread bytes were dropped), and nothing of the unfinished write was journaled or written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_wakes_idle_and_stalled_connections() {
    let fixture = Fixture::start(&[("stop-1", "os", 1 << 20)], 8, 2 << 20).await;
    let socket = fixture.disks[0].socket.clone();
    let image_before = std::fs::read(&fixture.disks[0].image).unwrap();
    let (idle, stalled) = tokio::task::spawn_blocking(move || {
        let mut idle = RawClient::connect(&socket);
        idle.go("stop-1/os");
        // A completed write first, so the connection is known to be in transmission.
        idle.request(CMD_WRITE, 0, 1, 0, 4096, &[7u8; 4096]);
        assert_eq!(idle.reply(), (0, 1));
        let mut stalled = RawClient::connect(&socket);
        stalled.go("stop-1/os");
        stalled.send(&encode_request(&Request {
            cookie: 2,
            command: CMD_WRITE,
            flags: 0,
            offset: 65536,
            length: 65536,
        }));
        stalled.send(&[9u8; 30000]);
        (idle, stalled)
    })
    .await
    .unwrap();
    let disk = fixture.capture_disk(0);
    assert_eq!(disk.stats().writes_journaled, 1, "only the completed write");
    fixture.stop().await;
    for (name, mut client) in [("idle", idle), ("stalled", stalled)] {
        let mut rest = Vec::new();
        let read = tokio::task::spawn_blocking(move || client.stream.read_to_end(&mut rest))
            .await
            .unwrap();
        // Closed: EOF, or a reset where the server dropped payload bytes it had not read.
        let closed = match &read {
            Ok(0) => true,
            Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        };
        assert!(
            closed,
            "{name} client: the server should have closed the connection, got {read:?}"
        );
    }
    assert_eq!(disk.stats().writes_journaled, 1);
    assert_eq!(disk.stats().bytes_written, 4096);
    // The fixture's directory is gone; the disk handle still has the image open.
    let image_after = {
        let mut buf = ferry_appliance::io::disk::IoBuf::with_capacity(1 << 20);
        buf.set_len(1 << 20);
        let (result, buf) = disk.disk().read_at(0, buf).await;
        result.unwrap();
        buf.to_vec()
    };
    assert_eq!(&image_after[..4096], &[7u8; 4096][..]);
    assert_eq!(
        &image_after[4096..],
        &image_before[4096..],
        "the stalled write reached the disk"
    );
    // The stop, not the client, cut that write short: it is not logged as a vanished client.
    let text = log_text();
    assert!(
        !text
            .lines()
            .any(|line| line.contains("stop-1/os") && line.contains("vanished")),
        "{text}"
    );
}
