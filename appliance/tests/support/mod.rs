//! Parts the in-process ship-and-apply tests share: a source disk with data, qemu-io through
//! its export, a capture of web-1/os, and a target endpoint with the dialer that reaches it.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_appliance::capture::journal_handle::SharedJournal;
use ferry_appliance::capture::{
    Capture, CaptureConfig, CaptureDisk, DiskSpec, Endpoint, ListenerSpec,
};
use ferry_appliance::control::DiskState;
use ferry_appliance::core::journal_mem::MemSegments;
use ferry_appliance::io::disk::DiskOptions;
use ferry_appliance::io::transport::{Identity, Peer, SourceDialer, TargetEndpoint, Tuning};
use tokio::sync::watch;

pub const DISK_BYTES: u64 = 16 << 20;

/// A 16 MiB disk image: 8 MiB of pseudo-random bytes, then zeros.
pub fn make_disk(path: &Path) {
    let mut bytes = vec![0u8; DISK_BYTES as usize];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in bytes[..(8 << 20)].chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Runs qemu-io commands against web-1/os; every one must succeed.
pub fn qemu_io(socket: &Path, commands: &[&str]) {
    let output = qemu_io_output(socket, commands);
    assert!(
        output.status.success() && !String::from_utf8_lossy(&output.stdout).contains("failed"),
        "qemu-io: {} {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn qemu_io_output(socket: &Path, commands: &[&str]) -> std::process::Output {
    qemu_io_with(socket, &[], commands)
}

pub fn qemu_io_with(socket: &Path, options: &[&str], commands: &[&str]) -> std::process::Output {
    let mut command = Command::new("qemu-io");
    command.args(options);
    command.args([
        "-f",
        "raw",
        &format!("nbd+unix:///web-1/os?socket={}", socket.display()),
    ]);
    for line in commands {
        command.args(["-c", line]);
    }
    command.output().expect("qemu-io")
}

/// Polls `check` every 20 ms for at most 60 s.
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A source appliance's parts under `root`, before its shipper.
pub struct Parts {
    pub disk_path: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub journal: SharedJournal,
    pub shutdown_tx: watch::Sender<bool>,
    pub shutdown: watch::Receiver<bool>,
    pub capture: Capture,
    /// The capture's disks with their group (`app`), as the shipper takes them.
    pub disks: Vec<(CaptureDisk, String)>,
}

/// Makes web-1/os (`make_disk`) and captures it into an in-memory journal; binds a target
/// endpoint and makes the dialer that reaches it.
pub async fn start_parts(root: &Path) -> (Parts, TargetEndpoint, SourceDialer) {
    let disk_path = root.join("web-1-os.raw");
    make_disk(&disk_path);
    let socket = root.join("web-1-os.sock");
    let state = root.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let (journal, _) = SharedJournal::open(MemSegments::new(8, 4 << 20)).unwrap();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let capture = start_capture(
        &state,
        &disk_path,
        &socket,
        journal.clone(),
        shutdown.clone(),
    )
    .await;
    let disks = capture
        .disks()
        .iter()
        .map(|disk| (disk.clone(), "app".to_string()))
        .collect();
    let (endpoint, dialer) = target_and_dialer(root);
    let parts = Parts {
        disk_path,
        socket,
        state,
        journal,
        shutdown_tx,
        shutdown,
        capture,
        disks,
    };
    (parts, endpoint, dialer)
}

/// Captures web-1/os (disk id 1, protected) on `socket`, journaling into `journal`.
async fn start_capture(
    state: &Path,
    disk_path: &Path,
    socket: &Path,
    journal: SharedJournal,
    shutdown: watch::Receiver<bool>,
) -> Capture {
    Capture::start(
        CaptureConfig::new(
            state.to_path_buf(),
            vec![DiskSpec {
                machine: "web-1".into(),
                name: "os".into(),
                disk_id: 1,
                path: disk_path.to_path_buf(),
                disk_options: DiskOptions::default(),
                initial_state: DiskState::Protected,
            }],
            vec![ListenerSpec {
                endpoint: Endpoint::Unix(socket.to_path_buf()),
                exports: vec!["web-1/os".into()],
            }],
        ),
        journal,
        shutdown,
    )
    .await
    .unwrap()
}

/// A target endpoint on loopback that admits source `site-a`, and that source's dialer of it
/// (keys under `root`).
fn target_and_dialer(root: &Path) -> (TargetEndpoint, SourceDialer) {
    let source_identity = Identity::load_or_create(&root.join("source-keys")).unwrap();
    let target_identity = Identity::load_or_create(&root.join("target-keys")).unwrap();
    let tuning = Tuning::default();
    let endpoint = TargetEndpoint::bind(
        "127.0.0.1:0".parse().unwrap(),
        &target_identity,
        vec![Peer {
            name: "site-a".into(),
            fingerprint: source_identity.fingerprint,
        }],
        &tuning,
    )
    .unwrap();
    let dialer = SourceDialer::new(
        endpoint.local_address(),
        &source_identity,
        target_identity.fingerprint,
        &tuning,
        None,
    )
    .unwrap();
    (endpoint, dialer)
}
