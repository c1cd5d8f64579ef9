//! Serves one image file through Ferry's capture front-end, with every write journaled into a
//! memory-mapped cache journal, until SIGINT/SIGTERM. Used by `benches/nbd_capture.sh` to put a
//! release build of the capture path next to `nbdkit file` under fio.
//!
//! A background task stands in for a target that acknowledges at once: every 20 ms it releases
//! everything appended as acknowledged durable, as the daemon's shipper does (it ships records
//! before they are durable, under a persisted sequence floor: `core::source`). So the run pays
//! for journaling every write (copy into the mapping, checksum, compare) but never fills the
//! journal, and the journal's device sees only what FLUSH/FUA requests make durable.
//! `release=flush` makes the journal durable before each release instead, as a source without
//! a sequence floor must (every journaled byte is written to the journal's device).
//! `write_behind=0` answers every write once it is on the disk (the default window is the
//! daemon's, `capture::disk::WRITE_BEHIND_BYTES_MAX`).
//!
//! Usage: capture_serve IMAGE SOCKET STATE_DIR [direct=auto|on|off] [journal_mib=N] [journal=mmap|mem] [release=ack|flush] [write_behind=BYTES]

use std::path::PathBuf;
use std::time::Duration;

use ferry_appliance::capture::{
    Capture, CaptureConfig, DiskSpec, Endpoint, ListenerSpec, SharedJournal,
};
use ferry_appliance::control::DiskState;
use ferry_appliance::core::journal_mem::MemSegments;
use ferry_appliance::io::disk::{DirectMode, DiskOptions};

fn usage() -> ! {
    eprintln!("usage: capture_serve IMAGE SOCKET STATE_DIR [direct=auto|on|off] [journal_mib=N] [journal=mmap|mem] [release=ack|flush] [write_behind=BYTES]");
    std::process::exit(2)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        usage();
    }
    let (image, socket, state_dir) = (
        PathBuf::from(&args[0]),
        PathBuf::from(&args[1]),
        PathBuf::from(&args[2]),
    );
    let mut direct = DirectMode::Auto;
    let mut journal_mib: usize = 1024;
    let mut journal_in_memory = false;
    let mut flush_before_release = false;
    let mut write_behind = None;
    for option in &args[3..] {
        match option.split_once('=') {
            Some(("direct", "auto")) => direct = DirectMode::Auto,
            Some(("direct", "on")) => direct = DirectMode::On,
            Some(("direct", "off")) => direct = DirectMode::Off,
            Some(("journal_mib", value)) => journal_mib = value.parse().unwrap_or_else(|_| usage()),
            Some(("journal", "mmap")) => journal_in_memory = false,
            Some(("journal", "mem")) => journal_in_memory = true,
            Some(("release", "ack")) => flush_before_release = false,
            Some(("release", "flush")) => flush_before_release = true,
            Some(("write_behind", value)) => {
                write_behind = Some(value.parse().unwrap_or_else(|_| usage()))
            }
            _ => usage(),
        }
    }

    std::fs::create_dir_all(&state_dir).expect("create state dir");
    let (journal, _) = if journal_in_memory {
        // The simulator's in-memory store: isolates the capture path from the journal's disk
        // traffic (a comparison figure only; nothing survives a crash).
        let segment_bytes = 64usize << 20;
        SharedJournal::open(MemSegments::new(
            (journal_mib << 20) / segment_bytes,
            segment_bytes,
        ))
        .expect("open journal")
    } else {
        SharedJournal::open_mmap(&state_dir.join("journal"), (journal_mib as u64) << 20)
            .expect("open journal")
    };

    let disk = DiskSpec {
        machine: "bench".into(),
        name: "disk".into(),
        disk_id: 1,
        path: image,
        disk_options: DiskOptions {
            direct,
            ..DiskOptions::default()
        },
        initial_state: DiskState::Protected,
    };
    let listener = ListenerSpec {
        endpoint: Endpoint::Unix(socket),
        exports: vec![disk.export_name()],
    };
    let (shutdown, shutdown_receiver) = tokio::sync::watch::channel(false);
    let mut config = CaptureConfig::new(state_dir, vec![disk], vec![listener]);
    if let Some(bytes) = write_behind {
        config.write_behind_bytes = bytes;
    }
    let capture = Capture::start(config, journal.clone(), shutdown_receiver)
        .await
        .expect("start capture");
    let capture_disk = capture.disks()[0].clone();

    let releaser_journal = journal.clone();
    let releaser = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !flush_before_release {
                releaser_journal.release_acknowledged(releaser_journal.last_seq());
                continue;
            }
            match releaser_journal.flush_all().await {
                Ok(durable) => releaser_journal.release(durable),
                Err(error) => {
                    eprintln!("journal flush failed: {error}");
                    return;
                }
            }
        }
    });

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    shutdown.send_replace(true);
    releaser.abort();
    capture.wait().await.expect("final flush");
    let stats = capture_disk.stats();
    eprintln!(
        "capture_serve: bytes_written={} writes_journaled={} writes_bitmap_only={} last_sequence={} state={}",
        stats.bytes_written,
        stats.writes_journaled,
        stats.writes_bitmap_only,
        stats.last_sequence,
        stats.state.as_str()
    );
}
