//! The source side of the daemon: opens the cache journal in `<state_dir>/journal`, starts one
//! capture export per configured disk (unix socket and/or TCP), feeds the status model from
//! capture's and the journal's own counters, and on shutdown lets capture finish its in-flight
//! requests and make the journal and every disk durable.
//!
//! Before the shipper exists, nothing releases journal space: a source whose target is
//! unreachable keeps journaling until the journal is full, then capture drops each disk to its
//! dirty-extent bitmap (`resync-needed`). Production never blocks on the network.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::layout::StateLayout;
use super::status::{DiskSample, StatusModel};
use super::DaemonError;
use crate::capture::{Capture, CaptureConfig, DiskSpec, Endpoint, ListenerSpec, SharedJournal};
use crate::config::SourceConfig;
use crate::control::DiskState;
use crate::io::disk::DiskOptions;

/// The running source side.
pub(crate) struct SourceSide {
    journal: SharedJournal,
    capture: Capture,
}

impl SourceSide {
    pub async fn start(
        source: &SourceConfig,
        layout: &StateLayout,
        status: &StatusModel,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, DaemonError> {
        let journal = open_journal(layout, source.journal_size_bytes).await?;
        restore_status(&journal, status);

        let mut disks = Vec::new();
        let mut listeners = Vec::new();
        for machine in &source.machine {
            for disk in &machine.disks {
                let spec = DiskSpec {
                    machine: machine.name.clone(),
                    name: disk.name.clone(),
                    disk_id: disk.id,
                    path: disk.path.clone(),
                    disk_options: DiskOptions::default(),
                    // Nothing has reached a target yet as far as this process knows; the
                    // shipper moves the disk on. A dirty bitmap makes capture say resync-needed.
                    initial_state: DiskState::InitialSync,
                };
                let export = spec.export_name();
                if let Some(path) = &disk.export {
                    listeners.push(ListenerSpec {
                        endpoint: Endpoint::Unix(path.clone()),
                        exports: vec![export.clone()],
                    });
                }
                if let Some(address) = disk.tcp {
                    listeners.push(ListenerSpec {
                        endpoint: Endpoint::Tcp(address),
                        exports: vec![export.clone()],
                    });
                }
                disks.push(spec);
            }
        }
        let capture_config = CaptureConfig::new(layout.root.clone(), disks, listeners);
        let capture = Capture::start(capture_config, journal.clone(), shutdown)
            .await
            .map_err(DaemonError::CaptureStart)?;
        let side = Self { journal, capture };
        let now = Instant::now();
        side.sample(status, now);
        for capture_disk in side.capture.disks() {
            if let Some(stats) = status.disk_by_id(capture_disk.disk_id()) {
                stats.set_size_bytes(capture_disk.size_bytes());
            }
        }
        Ok(side)
    }

    /// Copies capture's per-disk counters and the journal's usage into the status model.
    /// `since` is the instant of the previous sample (see `DiskStats::observe`).
    pub fn sample(&self, status: &StatusModel, since: Instant) {
        for capture_disk in self.capture.disks() {
            let Some(stats) = status.disk_by_id(capture_disk.disk_id()) else {
                continue;
            };
            let capture_stats = capture_disk.stats();
            stats.observe(
                &DiskSample {
                    state: capture_stats.state,
                    bytes_written: capture_stats.bytes_written,
                    last_sequence: capture_stats.last_sequence,
                },
                since,
            );
        }
        let usage = self.journal.usage();
        status.set_journal_usage(usage.used_bytes, usage.capacity_bytes);
    }

    /// After the shutdown signal: capture stops accepting, finishes in-flight requests, and makes
    /// the journal and every disk durable.
    pub async fn stop(self) -> Result<(), DaemonError> {
        let journal = self.journal.clone();
        self.capture
            .wait()
            .await
            .map_err(DaemonError::CaptureFlush)?;
        tracing::info!(
            durable_sequence = journal.durable_seq(),
            "journal and disks flushed"
        );
        Ok(())
    }
}

/// Opens (creating and preallocating on first start) the memory-mapped cache journal. Off the
/// async threads: preallocating a large journal takes seconds.
async fn open_journal(
    layout: &StateLayout,
    capacity_bytes: u64,
) -> Result<SharedJournal, DaemonError> {
    let dir = layout.journal.clone();
    let task_dir = dir.clone();
    let opened =
        tokio::task::spawn_blocking(move || SharedJournal::open_mmap(&task_dir, capacity_bytes))
            .await;
    let (journal, report) = match opened {
        Ok(result) => result.map_err(DaemonError::Journal)?,
        Err(error) => {
            return Err(DaemonError::EventLoop(format!(
                "journal open task at {}: {error}",
                dir.display()
            )))
        }
    };
    if report.bytes_dropped > 0 {
        tracing::warn!(
            records_kept = report.records_kept,
            bytes_dropped = report.bytes_dropped,
            reason = report.drop_reason.as_deref().unwrap_or(""),
            "journal recovered: dropped a torn or corrupt tail (never a flushed record)"
        );
    } else {
        tracing::info!(
            records_kept = report.records_kept,
            first_sequence = report.first_seq,
            last_sequence = report.last_seq,
            "journal opened"
        );
    }
    Ok(journal)
}

/// After a restart, the journal still holds every unacknowledged record: restore each disk's
/// last sequence, and time its pending writes from the oldest record's timestamp so RPO lag
/// includes the time before the restart.
fn restore_status(journal: &SharedJournal, status: &StatusModel) {
    let guard = journal.lock();
    let first = guard.first_seq();
    if first == 0 {
        return;
    }
    // disk id → (oldest held record's timestamp, last sequence)
    let mut per_disk: HashMap<u32, (u64, u64)> = HashMap::new();
    for record in guard.iter_from(first) {
        match record {
            Ok(record) => {
                let entry = per_disk
                    .entry(record.disk_id)
                    .or_insert((record.timestamp_ns, 0));
                entry.1 = entry.1.max(record.seq);
            }
            Err(error) => {
                tracing::warn!(%error, "journal scan for status stopped early");
                break;
            }
        }
    }
    drop(guard);
    let now = Instant::now();
    let wall_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    for (disk_id, (oldest_ns, last_sequence)) in per_disk {
        let Some(stats) = status.disk_by_id(disk_id) else {
            tracing::warn!(
                disk_id,
                "journal holds records of a disk that is no longer configured"
            );
            continue;
        };
        let age = Duration::from_nanos(wall_ns.saturating_sub(oldest_ns));
        stats.restore_pending(last_sequence, now.checked_sub(age).unwrap_or(now));
    }
}
