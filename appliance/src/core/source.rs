//! Source side of the replication protocol as a sans-IO state machine: ships journal records
//! in sequence order within a bounded window, resumes after a reconnect from what the target
//! holds, releases journal space once the target acknowledged it durable, and drives initial
//! replication and resync (hash compare, extent reads, `ResyncExtent`/`Zero` records).
//!
//! # Rules
//!
//! **What ships.** Without a sequence floor only durable records ship (`seq <=
//! journal.durable_seq()`): a record the source could still lose in a crash never reaches the
//! target, so after any source crash the recovered journal holds everything the target has,
//! and a sequence number is never reused for different data; shipping then follows the
//! journal's flush cadence, and every journaled byte is written to the journal's device.
//!
//! **Sequence floor.** A driver that persists a floor `F` (`set_sequence_floor`) lets every
//! appended record up to `F` ship at once, durable or not. A process that dies loses no
//! appended record (the page cache keeps them), so only a machine that goes down can lose
//! records the target holds; the driver then restarts the journal at `F + 1`
//! (`Journal::restart_at`: a `Skip` record standing for the numbers given up) before anything
//! else is appended, and resyncs every disk. So no number the target may hold is used again,
//! and the target continues from the `Skip` (it stands for the numbers before it). With the
//! release of acknowledged records (`Journal::release_acknowledged`) a record the target has
//! made durable never needs to reach the source's journal device: the daemon's journal costs
//! no device bandwidth unless a client flushes (benches/RESULTS.md, "NBD capture"). The driver
//! raises `F` well before appends reach it, so shipping never waits for the floor's write.
//! A target that claims more than the source's journal holds (the journal was lost or belongs
//! to another appliance) is refused with `SourceError::TargetAhead`.
//!
//! **Resume.** On every connection the source sends Hello; the target's Welcome says it holds
//! everything up to `resume_seq` and is durable up to `durable_seq`. The source sends from
//! `resume_seq + 1` (nothing acknowledged is resent) and keeps every record after `durable_seq`
//! in the journal (nothing unacknowledged is lost). Frames lost within a connection are
//! recovered by the target's gap report and by the resend timer; duplicates are harmless.
//!
//! **Release** happens only up to the target's durable sequence (`poll_release`).
//!
//! **Resync ordering.** An extent copied by initial replication or resync is appended to the
//! journal as a `ResyncExtent` (its `SyncRef`, see "Sync payloads") or `Zero` record, so it is ordered with live writes in the one
//! stream and the target applies them in sequence order. The one race is a live write that
//! lands on the source disk while the extent is being read: the driver reports `seq_floor`, a
//! sequence such that every journaled write at or below it was already on the source disk when
//! the read started. After the extent's records are appended (the last at `seq`), any live record
//! of that disk in `(seq_floor, seq)` overlapping a block that was sent means those bytes may be
//! torn or stale: the extent is read again (the records already appended are superseded by the
//! later ones). Writes after `seq` are applied after the extent at the target.
//!
//! **Hash skip.** The target hashes an extent, block by block (`sync_block_bytes`, 4 KiB by
//! default, xxh3-64 each), with every record up to its `applied_seq` (A) applied, and will replay
//! every later record on top. The source reads the extent with every journaled write up to
//! `seq_floor` (F) on the disk. A block whose source bytes match its hash is not sent unless a
//! record of that disk in `(min(A, F), F]` overlaps that block: the target will replay such a
//! record after the match, and its bytes need not be the source's (an older resync record, or a
//! write overtaken by one the journal never saw — bitmap mode, writes while the appliance was
//! down, a lost journal tail). Records after F need no such care: a skipped block keeps the
//! target's bytes and the later record lands on both sides alike, and a racing record over a
//! block that *is* sent is the read race below. So only the blocks that differ or that such a
//! record touches travel, as runs of adjacent blocks, one record per run (`Zero` when the run is
//! all zero at the source): a 4 KiB change costs one 4 KiB record, not its extent.
//!
//! **Sync payloads.** A sync run that carries data is journaled as a header-only `SyncRef`
//! (its sequence number, disk and range: the stream's order) while the state machine keeps the
//! encoded `ResyncExtent` in memory and ships it in the `SyncRef`'s place, once the `SyncRef`
//! is durable like any record; it is dropped when the target acknowledges it. So sync data is
//! never written to the journal's disk, and the memory is bounded by the sync backlog (below).
//! A restart loses the held payloads: a `SyncRef` still in the journal is then shipped as is and
//! the target does nothing with it, and the driver marks its extent dirty (the daemon at every
//! start, the simulator after a crash) so that a resync hash-compares it — its sync was not
//! complete anyway (`SyncDone` waits for the acknowledgement of the last record), so the round
//! that appended it runs again too. A reconnect keeps the payloads: they are resent from memory.
//!
//! **Touch index.** The rules above need the extent of every record in those ranges, also of
//! records the target acknowledged (and the journal released) while the extent waited to be
//! read. While a sync runs the state machine keeps (sequence → disk, range, own) of every record
//! above the lowest sequence a held hash or a read in flight can still ask about; it learns them
//! from its own appends and by looking at each acknowledged record before it is released. A
//! record it could not look at counts as touching everything (the whole extent is sent or read
//! again), never as touching nothing.
//!
//! **Holes.** A driver that knows an extent reads as zeros without reading it (a hole of a
//! sparse file) calls `handle_extent_zero` instead of `handle_extent_read`. With no target
//! hashes (`CopyNonZero`, a new zero-filled replica) zero blocks are not sent at all.
//!
//! **Bounded share.** Extent reads are issued only while the sync records appended and not yet
//! acknowledged by the target stay under `sync_backlog_bytes_max` (counting the reads in flight),
//! so live records never queue behind more than that much resync data. The bound is on
//! unacknowledged bytes, not on the journal's used bytes: the journal gives space back only in
//! whole segments, so its used bytes need not drop after an acknowledgement (a segment larger
//! than the bound would stall the sync for good).
//!
//! **Durability of sync records** is the driver's, like every other record's: the core
//! appends extents and ships them once they may ship (above); it does not flush per extent
//! (that would serialise one store flush per extent under the journal lock).
//!
//! **Completion.** `SourceEvent::SyncDone { disk_id }` comes once every extent of the disk's
//! sync is skipped or appended and the target acknowledged the last appended record durable.
//! Sync state lives in memory: after a source restart the driver starts the sync again from its
//! persisted state (initial replication not finished, dirty-extent bitmap). A driver that tracks
//! dirty extents snapshots them when calling `start_sync` and clears only the extents not
//! dirtied again since, when `SyncDone` arrives.
//!
//! # Driver recipe (daemon shipper or simulator)
//! 1. `Source::new(config, &journal)`; on each connection `handle_connected(now)`.
//! 2. Each complete frame from the target: `handle_frame(&bytes, &mut journal, now)`; on `Err`
//!    send what `poll_transmit` still yields and close.
//! 3. Without a sequence floor, group-commit the journal whenever records wait to become
//!    durable (sync records too: the core appends them but does not flush). With one, raise
//!    it ahead of the appends, and release acknowledged records with
//!    `Journal::release_acknowledged`.
//! 4. After any input (frames, journal appends/flushes, timers, extent reads), drain
//!    `poll_transmit(&journal, now)` to the connection, `poll_release()` into
//!    `journal.release(seq)`, `poll_event()`, and `poll_sync_read(&journal)` (read the extent,
//!    then `handle_extent_read(token, seq_floor, &data, &mut journal, now)`).
//! 5. Arm a timer for `poll_timeout()`; when it passes call `handle_timeout(now)`.
//! 6. On connection loss `handle_disconnected(now)`, then reconnect with backoff.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::config::MachineSettings;
use crate::core::journal::{Journal, JournalError, RecordSpec, SegmentStore};
use crate::core::record::{encoded_len_for_payload, HeldRecord, Record, RecordKind, Seq};
use crate::core::wire::{
    self, DiskAnnouncement, ErrorCode, Frame, HashRequest, Message, RecordBytes, WelcomeDisk,
    WireError,
};
use crate::limits;

/// What the source state machine needs from the cache journal. `Journal` implements it; tests
/// use simpler stores.
pub trait ShipJournal {
    /// A held, verified record (`None` when released or never written).
    fn record(&self, seq: Seq) -> Option<Record<'_>>;
    /// A held record's encoded bytes exactly as stored (header, payload, padding), verified:
    /// `Ok(None)` when not held, `Err(Corrupt)` when held but its bytes no longer verify.
    fn record_bytes(&self, seq: Seq) -> Result<Option<&[u8]>, JournalError>;
    /// Lowest sequence still held, 0 when empty.
    fn first_seq(&self) -> Seq;
    /// Highest sequence appended.
    fn last_seq(&self) -> Seq;
    /// Highest sequence durable.
    fn durable_seq(&self) -> Seq;
    /// Bytes held by unreleased records.
    fn used_bytes(&self) -> u64;
    fn append(&mut self, spec: &RecordSpec<'_>) -> Result<Seq, JournalError>;
    fn flush(&mut self, upto: Seq) -> Result<(), JournalError>;
}

impl<S: SegmentStore> ShipJournal for Journal<S> {
    fn record(&self, seq: Seq) -> Option<Record<'_>> {
        Journal::record(self, seq)
    }
    fn record_bytes(&self, seq: Seq) -> Result<Option<&[u8]>, JournalError> {
        Journal::read_bytes(self, seq).map(|held| held.map(|(_, bytes)| bytes))
    }
    fn first_seq(&self) -> Seq {
        Journal::first_seq(self)
    }
    fn last_seq(&self) -> Seq {
        Journal::last_seq(self)
    }
    fn durable_seq(&self) -> Seq {
        Journal::durable_seq(self)
    }
    fn used_bytes(&self) -> u64 {
        Journal::usage(self).used_bytes
    }
    fn append(&mut self, spec: &RecordSpec<'_>) -> Result<Seq, JournalError> {
        Journal::append(self, spec)
    }
    fn flush(&mut self, upto: Seq) -> Result<(), JournalError> {
        Journal::flush(self, upto)?;
        Ok(())
    }
}

/// Tunables of one source (defaults from `limits`; the simulator shrinks them).
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub source_name: String,
    pub disks: Vec<DiskAnnouncement>,
    /// The protected machines' settings, sent in every Hello for the target to derive its own
    /// from; must pass `wire::encode_machine_settings` (empty: none sent).
    pub machines: Vec<MachineSettings>,
    pub window_bytes_max: usize,
    pub window_records_max: usize,
    pub frame_bytes_target: usize,
    pub resend_timeout_ns: u64,
    pub handshake_timeout_ns: u64,
    pub sync_extent_bytes: u32,
    /// Hash-compare block: of an extent whose hash differs, only the differing blocks travel.
    /// A power of two of at least `limits::HASH_BLOCK_BYTES_MIN`.
    pub sync_block_bytes: u32,
    /// Hash requests wait while a sync job holds this many hashed extents not yet read (bounds
    /// the block hashes held in memory).
    pub sync_hashed_extents_queued_max: usize,
    pub sync_reads_in_flight_max: usize,
    pub sync_hash_requests_in_flight_max: usize,
    pub sync_hash_extents_per_request: u32,
    pub sync_backlog_bytes_max: u64,
}

impl SourceConfig {
    pub fn new(source_name: impl Into<String>, disks: Vec<DiskAnnouncement>) -> Self {
        Self {
            source_name: source_name.into(),
            disks,
            machines: Vec::new(),
            window_bytes_max: limits::SHIP_WINDOW_BYTES_MAX,
            window_records_max: limits::SHIP_WINDOW_RECORDS_MAX,
            frame_bytes_target: limits::SHIP_FRAME_BYTES_TARGET,
            resend_timeout_ns: limits::SHIP_RESEND_TIMEOUT_NS,
            handshake_timeout_ns: limits::SHIP_HANDSHAKE_TIMEOUT_NS,
            sync_extent_bytes: limits::SYNC_EXTENT_BYTES_DEFAULT as u32,
            sync_block_bytes: limits::SYNC_BLOCK_BYTES_DEFAULT as u32,
            sync_hashed_extents_queued_max: 4 * limits::HASH_EXTENTS_PER_REQUEST_MAX,
            sync_reads_in_flight_max: limits::SYNC_READS_IN_FLIGHT_MAX,
            sync_hash_requests_in_flight_max: limits::SYNC_HASH_REQUESTS_IN_FLIGHT_MAX,
            sync_hash_extents_per_request: limits::HASH_EXTENTS_PER_REQUEST_MAX as u32,
            sync_backlog_bytes_max: limits::SYNC_BACKLOG_BYTES_MAX as u64,
        }
    }
}

/// How a sync decides what to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Ask the target for the block hashes of each extent and send only the blocks that differ
    /// (runs of zero blocks as zero records).
    CompareHashes,
    /// The target has no replica worth comparing (a new, zero-filled one): send every non-zero
    /// block without asking for hashes; zero blocks are not sent at all (the replica reads as
    /// zeros already) — except when an extent is read again after a race, which sends it whole.
    CopyNonZero,
}

/// A source extent the driver must read: call `handle_extent_read(token, …)` with its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentRead {
    pub token: u64,
    pub disk_id: u32,
    pub offset: u64,
    pub length: u64,
}

/// Progress of one disk's sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncProgress {
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Extents that matched the target's hashes and were not sent.
    pub extents_skipped: u64,
    /// Extents that differed only in blocks that are zero at the source (sent as zero records),
    /// or all-zero extents of a new replica (not sent).
    pub extents_zero: u64,
    /// Extents of which at least one block was sent with its data.
    pub extents_sent: u64,
    /// Bytes of blocks sent with their data (what travels, headers aside).
    pub bytes_sent: u64,
    /// Extents read again because a live write raced with the read.
    pub extents_reread: u64,
}

/// What the driver hears about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceEvent {
    /// A session is open; `disks` says what the target holds (decide on initial replication).
    Welcomed {
        resume_seq: Seq,
        durable_seq: Seq,
        disks: Vec<WelcomeDisk>,
    },
    /// Every extent of the disk's sync reached the target durably.
    SyncDone {
        disk_id: u32,
        progress: SyncProgress,
    },
}

/// Why the source ended a connection (or refused a call).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("undecodable frame from the target: {0}")]
    Wire(#[from] WireError),
    #[error("protocol violation by the target: {0}")]
    Protocol(String),
    #[error("the target holds sequence {target_seq} but this source's journal ends at {journal_last_seq}: the journal was lost or belongs to another appliance; a full resync is needed")]
    TargetAhead {
        target_seq: Seq,
        journal_last_seq: Seq,
    },
    #[error("the target is durable only up to {target_durable_seq} but acknowledged {acked_seq} before: the target lost acknowledged data; a full resync is needed")]
    TargetBehind {
        target_durable_seq: Seq,
        acked_seq: Seq,
    },
    #[error("record {seq} in the journal no longer verifies, so it is not shipped: {reason}")]
    CorruptRecord { seq: Seq, reason: String },
    #[error("record {seq} is missing from the journal (held {first_seq}..={last_seq})")]
    MissingRecord {
        seq: Seq,
        first_seq: Seq,
        last_seq: Seq,
    },
    #[error("journal {operation} for disk {disk_id} at offset {offset} failed: {source}")]
    Journal {
        operation: &'static str,
        disk_id: u32,
        offset: u64,
        #[source]
        source: JournalError,
    },
    #[error("disk {disk_id} is not one this source protects")]
    UnknownDisk { disk_id: u32 },
    #[error("extent read for disk {disk_id} at {offset}: expected {expected} bytes, got {got}")]
    ExtentLength {
        disk_id: u32,
        offset: u64,
        expected: u64,
        got: usize,
    },
    #[error("the target reported an error ({code:?}): {message}")]
    Peer { code: ErrorCode, message: String },
}

impl SourceError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Wire(WireError::Version { .. }) => ErrorCode::Version,
            Self::Wire(_) => ErrorCode::Malformed,
            Self::Protocol(_) => ErrorCode::Protocol,
            Self::TargetAhead { .. } => ErrorCode::TargetAhead,
            Self::Peer { code, .. } => *code,
            _ => ErrorCode::Internal,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Disconnected,
    Handshaking { hello_due: bool, hello_sent_ns: u64 },
    Streaming,
    Closed,
}

struct OutstandingHash {
    disk_id: u32,
    offsets: Vec<u64>,
    extent_bytes: u32,
    block_bytes: u32,
    sent_ns: u64,
    /// The acknowledged sequence when sent: the answer's `applied_seq` is at least this.
    acked_at_send: Seq,
}

struct SyncJob {
    size_bytes: u64,
    /// Extent size of this job (ranges are widened to whole extents of it).
    extent_bytes: u64,
    mode: SyncMode,
    need_hash: BTreeSet<u64>,
    /// Extent offset → what is known about it.
    need_read: BTreeMap<u64, ReadPlan>,
    reading: usize,
    last_appended_seq: Seq,
    progress: SyncProgress,
}

/// What the source knows of an extent it has to read.
#[derive(Clone, Debug, Default)]
struct ReadPlan {
    /// The target's block hashes, when known.
    target: Option<TargetHashes>,
    /// Read again after a race: every block travels.
    reread: bool,
}

struct PendingRead {
    disk_id: u32,
    offset: u64,
    length: u64,
    plan: ReadPlan,
    /// The acknowledged sequence when the read was handed out: its `seq_floor` is at least this.
    acked_at_issue: Seq,
}

/// An extent's block hashes at the target, with the target's applied sequence when taken.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TargetHashes {
    blocks: Vec<u64>,
    applied_seq: Seq,
}

/// What the hash-skip and race rules need of one journal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Touch {
    /// A record changing `offset..offset + length` of `disk_id`; `own`: a sync record this
    /// state machine appended (it changes the target, not the source disk).
    Range {
        disk_id: u32,
        offset: u64,
        length: u64,
        own: bool,
    },
    /// A record released before it was looked at: it may have touched anything.
    Unknown,
}

/// The records a running sync may still have to judge, kept past their release (see "Touch
/// index" in the module doc). Every sequence in `(floor, upto]` was looked at: the records
/// that change a disk are in `entries`, the others (markers) are not.
#[derive(Debug, Default)]
struct TouchIndex {
    entries: BTreeMap<Seq, Touch>,
    floor: Seq,
    upto: Seq,
}

impl TouchIndex {
    fn restart_at(&mut self, seq: Seq) {
        self.entries.clear();
        self.floor = seq;
        self.upto = seq;
    }

    fn insert(&mut self, seq: Seq, touch: Touch) {
        self.entries.insert(seq, touch);
        if seq == self.upto + 1 {
            self.upto = seq;
        }
    }

    /// Looks at every record after `upto` up to `last` (held ones from the journal; any the
    /// journal no longer holds count as `Unknown`).
    fn catch_up(&mut self, journal: &impl ShipJournal, last: Seq) {
        while self.upto < last {
            let seq = self.upto + 1;
            if let std::collections::btree_map::Entry::Vacant(entry) = self.entries.entry(seq) {
                match journal.record(seq) {
                    Some(record) if record.kind == RecordKind::Marker => {}
                    Some(record) => {
                        entry.insert(Touch::Range {
                            disk_id: record.disk_id,
                            offset: record.offset,
                            length: record.length,
                            own: false,
                        });
                    }
                    None => {
                        entry.insert(Touch::Unknown);
                    }
                }
            }
            self.upto = seq;
        }
    }

    /// Drops what no held hash or read can ask about any more (everything at or below `floor`).
    fn prune(&mut self, floor: Seq) {
        if floor > self.floor {
            self.entries = self.entries.split_off(&(floor + 1));
            self.floor = floor;
            self.upto = self.upto.max(floor);
        }
    }

    /// Calls `each(offset, length)` for every record of `disk_id` in `(after, below)` that
    /// overlaps `offset..offset + length` (own records only with `count_own`). `false` when a
    /// record there cannot be judged: the caller must assume it touched everything.
    fn overlapping(
        &self,
        disk_id: u32,
        (after, below): (Seq, Seq),
        (offset, length): (u64, u64),
        count_own: bool,
        mut each: impl FnMut(u64, u64),
    ) -> bool {
        if below <= after + 1 {
            return true;
        }
        if after < self.floor || below - 1 > self.upto {
            return false;
        }
        for touch in self
            .entries
            .range(after + 1..below)
            .map(|(_, touch)| *touch)
        {
            match touch {
                Touch::Unknown => return false,
                Touch::Range {
                    disk_id: touched_disk,
                    offset: touched_offset,
                    length: touched_length,
                    own,
                } => {
                    if touched_disk == disk_id
                        && (count_own || !own)
                        && overlaps(touched_offset, touched_length, offset, length)
                    {
                        each(touched_offset, touched_length);
                    }
                }
            }
        }
        true
    }
}

/// Whether every byte is zero (64-byte chunks the compiler vectorises, early exit between them).
fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(64);
    chunks
        .by_ref()
        .all(|chunk| chunk.iter().fold(0u8, |acc, &byte| acc | byte) == 0)
        && chunks.remainder().iter().all(|&byte| byte == 0)
}

/// Zeros to hash a zero block without allocating (blocks up to this size).
static ZEROS: [u8; 65536] = [0; 65536];

fn zero_block_hash(len: usize) -> u64 {
    match ZEROS.get(..len) {
        Some(zeros) => wire::block_hash(zeros),
        None => wire::block_hash(&vec![0; len]),
    }
}

/// The source's replication state machine (one per source appliance and target).
pub struct Source {
    config: SourceConfig,
    phase: Phase,
    /// Target durable up to here (released up to here).
    acked_seq: Seq,
    released_seq: Seq,
    /// Target holds everything up to here (maybe not durable yet).
    received_seq: Seq,
    next_send_seq: Seq,
    /// Sent and not yet acknowledged durable: (seq, bytes), for the window.
    in_flight: VecDeque<(Seq, usize)>,
    in_flight_bytes: usize,
    last_progress_ns: u64,
    gap_rewound_for: Option<Seq>,
    control: VecDeque<Frame>,
    events: VecDeque<SourceEvent>,
    jobs: BTreeMap<u32, SyncJob>,
    hash_requests: BTreeMap<u64, OutstandingHash>,
    reads: BTreeMap<u64, PendingRead>,
    /// The records a running sync may still judge (its own appends marked as such), kept past
    /// their release; empty while no sync runs.
    touches: TouchIndex,
    /// Sync records appended and not yet acknowledged durable, in sequence order, with the
    /// encoded `ResyncExtent` of each `SyncRef` (see "Sync payloads").
    sync_unacked: VecDeque<SyncUnacked>,
    sync_unacked_bytes: u64,
    /// Set when a sync append found the journal full: the acknowledged sequence at that time.
    /// Reads wait until an acknowledgement frees space (or nothing is left to acknowledge).
    sync_blocked_at_ack: Option<Seq>,
    next_request_id: u64,
    next_token: u64,
    /// Set by a driver that persisted a sequence floor: records up to it ship before they
    /// are durable (see "Sequence floor"); `None` ships only durable records.
    sequence_floor: Option<Seq>,
}

/// A sync record appended and not yet acknowledged durable.
struct SyncUnacked {
    seq: Seq,
    /// Bytes it occupies on the wire (the backlog's unit).
    bytes: u64,
    /// For a `SyncRef`: the encoded `ResyncExtent` shipped in its place.
    record: Option<HeldRecord>,
}

/// Whether the journal's first held record is the `Skip` of a restarted log
/// (`Journal::restart_at`).
fn starts_with_skip(journal: &impl ShipJournal) -> bool {
    journal
        .record(journal.first_seq())
        .is_some_and(|record| record.kind == RecordKind::Skip)
}

fn overlaps(a_offset: u64, a_length: u64, b_offset: u64, b_length: u64) -> bool {
    a_offset < b_offset.saturating_add(b_length) && b_offset < a_offset.saturating_add(a_length)
}

impl Source {
    /// A source over a journal that may already hold records (after a restart): everything
    /// below the journal's first held record was acknowledged before.
    pub fn new(config: SourceConfig, journal: &impl ShipJournal) -> Self {
        let released = match journal.first_seq() {
            0 => journal.last_seq(),
            // A restarted log knows nothing of what the target acknowledged before it.
            _ if starts_with_skip(journal) => 0,
            first => first - 1,
        };
        Self {
            config,
            phase: Phase::Disconnected,
            acked_seq: released,
            released_seq: released,
            received_seq: released,
            next_send_seq: released + 1,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            last_progress_ns: 0,
            gap_rewound_for: None,
            control: VecDeque::new(),
            events: VecDeque::new(),
            jobs: BTreeMap::new(),
            hash_requests: BTreeMap::new(),
            reads: BTreeMap::new(),
            touches: TouchIndex {
                floor: released,
                upto: released,
                ..TouchIndex::default()
            },
            sync_unacked: VecDeque::new(),
            sync_unacked_bytes: 0,
            sync_blocked_at_ack: None,
            next_request_id: 1,
            next_token: 1,
            sequence_floor: None,
        }
    }

    /// Lets records up to `floor` ship before they are durable: the driver has made `floor`
    /// durable where a restart after the machine went down finds it, and restarts the journal
    /// past it then (`Journal::restart_at`), so no sequence number the target may hold is
    /// used again ("Sequence floor"). Only ever raised.
    pub fn set_sequence_floor(&mut self, floor: Seq) {
        self.sequence_floor = Some(self.sequence_floor.map_or(floor, |old| old.max(floor)));
    }

    /// The persisted sequence floor, if the driver set one.
    pub fn sequence_floor(&self) -> Option<Seq> {
        self.sequence_floor
    }

    /// The highest sequence that may ship now.
    fn ship_limit(&self, journal: &impl ShipJournal) -> Seq {
        match self.sequence_floor {
            Some(floor) => journal.last_seq().min(floor),
            None => journal.durable_seq(),
        }
    }

    /// Highest sequence the target acknowledged durable.
    pub fn acked_seq(&self) -> Seq {
        self.acked_seq
    }

    /// Next sequence to send.
    pub fn next_send_seq(&self) -> Seq {
        self.next_send_seq
    }

    pub fn is_streaming(&self) -> bool {
        self.phase == Phase::Streaming
    }

    /// Progress of a disk's running sync.
    pub fn sync_progress(&self, disk_id: u32) -> Option<SyncProgress> {
        self.jobs.get(&disk_id).map(|job| job.progress)
    }

    /// Disks with a sync running.
    pub fn syncing_disks(&self) -> impl Iterator<Item = u32> + '_ {
        self.jobs.keys().copied()
    }

    pub fn handle_connected(&mut self, now: u64) {
        self.phase = Phase::Handshaking {
            hello_due: true,
            hello_sent_ns: now,
        };
        self.control.clear();
        self.gap_rewound_for = None;
    }

    pub fn handle_disconnected(&mut self, _now: u64) {
        self.phase = Phase::Disconnected;
        self.control.clear();
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.requeue_hash_requests(|_| true);
    }

    /// When each outstanding hash request is given up on and asked again: (request id,
    /// deadline). The target reads and hashes requests in order, so a request gets the
    /// handshake timeout plus the time to read its extents and those of every request before
    /// it at `limits::SYNC_HASH_READ_NS_PER_BYTE_MAX` — a fixed timeout gave up on (and asked
    /// the target to read again) requests of 256 MiB queued behind others on a slow disk.
    fn hash_deadlines(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut bytes_ahead = 0u64;
        self.hash_requests
            .iter()
            .map(move |(&request_id, request)| {
                bytes_ahead += request.offsets.len() as u64 * u64::from(request.extent_bytes);
                let read_ns = bytes_ahead.saturating_mul(limits::SYNC_HASH_READ_NS_PER_BYTE_MAX);
                let deadline = request
                    .sent_ns
                    .saturating_add(self.config.handshake_timeout_ns)
                    .saturating_add(read_ns);
                (request_id, deadline)
            })
    }

    fn requeue_hash_requests(&mut self, mut which: impl FnMut(u64) -> bool) {
        let ids: Vec<u64> = self
            .hash_requests
            .keys()
            .copied()
            .filter(|id| which(*id))
            .collect();
        for id in ids {
            let request = self.hash_requests.remove(&id).expect("listed");
            if let Some(job) = self.jobs.get_mut(&request.disk_id) {
                job.need_hash.extend(request.offsets);
            }
        }
    }

    /// Starts (or extends) a sync of `ranges` (offset, length) of a disk. Ranges are widened
    /// to whole extents (`config.sync_extent_bytes`) and clipped to the disk.
    pub fn start_sync(
        &mut self,
        disk_id: u32,
        ranges: &[(u64, u64)],
        mode: SyncMode,
    ) -> Result<(), SourceError> {
        self.start_sync_in_extents(disk_id, ranges, mode, self.config.sync_extent_bytes)
    }

    /// `start_sync` in extents of `extent_bytes` (at most `limits::SYNC_EXTENT_BYTES_MAX`): a
    /// resync of a dirty-extent bitmap passes the bitmap's extent size, so that only the dirty
    /// extents are read and hashed. A job already running keeps its extent size.
    pub fn start_sync_in_extents(
        &mut self,
        disk_id: u32,
        ranges: &[(u64, u64)],
        mode: SyncMode,
        extent_bytes: u32,
    ) -> Result<(), SourceError> {
        let size_bytes = self
            .config
            .disks
            .iter()
            .find(|disk| disk.disk_id == disk_id)
            .map(|disk| disk.size_bytes)
            .ok_or(SourceError::UnknownDisk { disk_id })?;
        let extent_bytes = u64::from(extent_bytes.clamp(1, limits::SYNC_EXTENT_BYTES_MAX as u32));
        if self.jobs.is_empty() {
            // Nothing at or below the released sequence can matter to a hash taken from now on
            // or to a read issued from now on; everything above is still in the journal.
            self.touches.restart_at(self.released_seq);
        }
        let job = self.jobs.entry(disk_id).or_insert_with(|| SyncJob {
            size_bytes,
            extent_bytes,
            mode,
            need_hash: BTreeSet::new(),
            need_read: BTreeMap::new(),
            reading: 0,
            last_appended_seq: 0,
            progress: SyncProgress::default(),
        });
        if mode == SyncMode::CompareHashes {
            job.mode = SyncMode::CompareHashes;
        }
        let extent = job.extent_bytes;
        for &(offset, length) in ranges {
            if length == 0 || offset >= size_bytes {
                continue;
            }
            let end = offset.saturating_add(length).min(size_bytes);
            let mut extent_offset = offset / extent * extent;
            while extent_offset < end {
                let extent_length = extent.min(size_bytes - extent_offset);
                let queued = job.need_hash.contains(&extent_offset)
                    || job.need_read.contains_key(&extent_offset);
                if !queued {
                    job.progress.bytes_total += extent_length;
                    match job.mode {
                        SyncMode::CompareHashes => {
                            job.need_hash.insert(extent_offset);
                        }
                        SyncMode::CopyNonZero => {
                            job.need_read.insert(extent_offset, ReadPlan::default());
                        }
                    }
                }
                extent_offset += extent;
            }
        }
        Ok(())
    }

    /// One complete frame from the target.
    pub fn handle_frame(
        &mut self,
        bytes: &[u8],
        journal: &mut impl ShipJournal,
        now: u64,
    ) -> Result<(), SourceError> {
        if matches!(self.phase, Phase::Disconnected | Phase::Closed) {
            return Ok(());
        }
        let result = wire::decode_frame(bytes)
            .map_err(SourceError::from)
            .and_then(|message| self.handle_message(message, journal, now));
        if let Err(error) = &result {
            self.fail(error);
        }
        result
    }

    fn fail(&mut self, error: &SourceError) {
        self.phase = Phase::Closed;
        self.control.clear();
        if !matches!(error, SourceError::Peer { .. }) {
            self.control
                .push_back(Frame::error(error.code(), &error.to_string()));
        }
    }

    fn handle_message(
        &mut self,
        message: Message<'_>,
        journal: &mut impl ShipJournal,
        now: u64,
    ) -> Result<(), SourceError> {
        match message {
            Message::Welcome {
                resume_seq,
                durable_seq,
                disks,
            } => {
                if !matches!(self.phase, Phase::Handshaking { .. }) {
                    return Ok(()); // a duplicate
                }
                if resume_seq > journal.last_seq() || durable_seq > resume_seq {
                    return Err(SourceError::TargetAhead {
                        target_seq: resume_seq.max(durable_seq),
                        journal_last_seq: journal.last_seq(),
                    });
                }
                if durable_seq < self.acked_seq {
                    return Err(SourceError::TargetBehind {
                        target_durable_seq: durable_seq,
                        acked_seq: self.acked_seq,
                    });
                }
                // Look at what may be released now before it is.
                self.keep_touches(journal, durable_seq);
                self.acked_seq = durable_seq;
                self.forget_acked_sync();
                self.received_seq = resume_seq;
                self.next_send_seq = resume_seq + 1;
                self.in_flight.clear();
                self.in_flight_bytes = 0;
                self.last_progress_ns = now;
                self.phase = Phase::Streaming;
                self.events.push_back(SourceEvent::Welcomed {
                    resume_seq,
                    durable_seq,
                    disks,
                });
                self.check_sync_done();
                Ok(())
            }
            Message::Ack {
                durable_seq,
                received_seq,
                gap,
            } => {
                if self.phase != Phase::Streaming {
                    return Ok(());
                }
                if received_seq > journal.last_seq() || durable_seq > received_seq {
                    return Err(SourceError::Protocol(format!(
                        "ack durable {durable_seq} received {received_seq} beyond journal end {}",
                        journal.last_seq()
                    )));
                }
                if durable_seq > self.acked_seq {
                    // Look at what may be released now before it is.
                    self.keep_touches(journal, durable_seq);
                    self.acked_seq = durable_seq;
                    self.last_progress_ns = now;
                    while let Some(&(seq, bytes)) = self.in_flight.front() {
                        if seq > durable_seq {
                            break;
                        }
                        self.in_flight.pop_front();
                        self.in_flight_bytes -= bytes;
                    }
                    self.forget_acked_sync();
                    self.check_sync_done();
                    let floor = self.touch_floor();
                    self.touches.prune(floor);
                }
                if received_seq > self.received_seq {
                    self.received_seq = received_seq;
                    self.last_progress_ns = now;
                }
                if self.next_send_seq <= self.received_seq {
                    self.forget_in_flight_from(self.received_seq + 1);
                    self.next_send_seq = self.received_seq + 1;
                }
                if gap
                    && received_seq + 1 < self.next_send_seq
                    && self.gap_rewound_for != Some(received_seq)
                {
                    self.gap_rewound_for = Some(received_seq);
                    self.rewind_to(received_seq.max(self.acked_seq) + 1);
                    self.last_progress_ns = now;
                }
                Ok(())
            }
            Message::HashResponse(response) => {
                let Some(request) = self.hash_requests.remove(&response.request_id) else {
                    return Ok(()); // a duplicate or an answer to a request given up on
                };
                let per_extent = wire::blocks_per_extent(request.extent_bytes, request.block_bytes);
                let answered: Vec<u64> = response.wanted_offsets().collect();
                if response.disk_id != request.disk_id
                    || response.extent_bytes != request.extent_bytes
                    || response.block_bytes != request.block_bytes
                    || answered != request.offsets
                    || response.hashes.len() != request.offsets.len() * per_extent
                {
                    return Err(SourceError::Protocol(format!(
                        "hash response {} does not answer its request ({} hashes for {} extents of {} blocks)",
                        response.request_id,
                        response.hashes.len(),
                        request.offsets.len(),
                        per_extent
                    )));
                }
                if let Some(job) = self.jobs.get_mut(&request.disk_id) {
                    for (offset, blocks) in request
                        .offsets
                        .into_iter()
                        .zip(response.hashes.chunks_exact(per_extent.max(1)))
                    {
                        let target = TargetHashes {
                            blocks: blocks.to_vec(),
                            applied_seq: response.applied_seq,
                        };
                        let plan = job.need_read.entry(offset).or_default();
                        plan.target = Some(target);
                    }
                }
                Ok(())
            }
            Message::Error { code, message } => Err(SourceError::Peer { code, message }),
            // Control-plane frames are routed by the session shells (`core::peer`), never here.
            Message::Control { .. } => Ok(()),
            Message::Hello { .. } | Message::Records(_) | Message::HashRequest(_) => Err(
                SourceError::Protocol("the target sent a frame only a source sends".into()),
            ),
        }
    }

    /// While a sync runs, records up to `upto` (about to be acknowledged, then released) join
    /// the touch index; with no sync it stays empty.
    fn keep_touches(&mut self, journal: &impl ShipJournal, upto: Seq) {
        if self.jobs.is_empty() {
            self.touches.entries.clear();
        } else {
            self.touches.catch_up(journal, upto.min(journal.last_seq()));
        }
    }

    /// The lowest sequence a held hash, a hash request in flight or a read in flight can still
    /// ask about (hashes are taken at or after the acknowledged sequence of their request, reads
    /// start at or after the acknowledged sequence when issued).
    fn touch_floor(&self) -> Seq {
        let hashes_held = self
            .jobs
            .values()
            .flat_map(|job| job.need_read.values())
            .filter_map(|plan| plan.target.as_ref())
            .map(|target| target.applied_seq);
        let reads = self.reads.values().flat_map(|read| {
            std::iter::once(read.acked_at_issue)
                .chain(read.plan.target.as_ref().map(|target| target.applied_seq))
        });
        let requests = self
            .hash_requests
            .values()
            .map(|request| request.acked_at_send);
        hashes_held
            .chain(reads)
            .chain(requests)
            .fold(self.acked_seq, Seq::min)
    }

    /// Drops acknowledged sync records from the backlog count.
    fn forget_acked_sync(&mut self) {
        while let Some(front) = self.sync_unacked.front() {
            if front.seq > self.acked_seq {
                break;
            }
            self.sync_unacked_bytes -= front.bytes;
            self.sync_unacked.pop_front();
        }
    }

    /// Forgets window entries at or after `seq` (they will be sent again).
    fn forget_in_flight_from(&mut self, seq: Seq) {
        while let Some(&(last, bytes)) = self.in_flight.back() {
            if last < seq {
                break;
            }
            self.in_flight.pop_back();
            self.in_flight_bytes -= bytes;
        }
    }

    fn rewind_to(&mut self, seq: Seq) {
        if seq < self.next_send_seq {
            self.forget_in_flight_from(seq);
            self.next_send_seq = seq;
        }
    }

    fn check_sync_done(&mut self) {
        let acked = self.acked_seq;
        let done: Vec<u32> = self
            .jobs
            .iter()
            .filter(|(disk_id, job)| {
                job.need_hash.is_empty()
                    && job.need_read.is_empty()
                    && job.reading == 0
                    && job.last_appended_seq <= acked
                    && !self
                        .hash_requests
                        .values()
                        .any(|request| request.disk_id == **disk_id)
            })
            .map(|(disk_id, _)| *disk_id)
            .collect();
        for disk_id in done {
            let job = self.jobs.remove(&disk_id).expect("listed");
            self.events.push_back(SourceEvent::SyncDone {
                disk_id,
                progress: job.progress,
            });
        }
        if self.jobs.is_empty() {
            self.touches.entries.clear();
        }
    }

    /// When `handle_timeout` wants to be called next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut deadline: Option<u64> = None;
        let mut consider = |at: u64| deadline = Some(deadline.map_or(at, |d| d.min(at)));
        match self.phase {
            Phase::Handshaking {
                hello_due: false,
                hello_sent_ns,
            } => consider(hello_sent_ns + self.config.handshake_timeout_ns),
            Phase::Streaming => {
                if self.next_send_seq > self.acked_seq + 1 {
                    consider(self.last_progress_ns + self.config.resend_timeout_ns);
                }
                for (_, deadline) in self.hash_deadlines() {
                    consider(deadline);
                }
            }
            _ => {}
        }
        deadline
    }

    pub fn handle_timeout(&mut self, now: u64) {
        match self.phase {
            Phase::Handshaking {
                hello_due: false,
                hello_sent_ns,
            } if now >= hello_sent_ns + self.config.handshake_timeout_ns => {
                self.phase = Phase::Handshaking {
                    hello_due: true,
                    hello_sent_ns: now,
                };
            }
            Phase::Streaming => {
                if self.next_send_seq > self.acked_seq + 1
                    && now >= self.last_progress_ns + self.config.resend_timeout_ns
                {
                    // Resend from what the target holds, and at least the last record sent, so
                    // that a lost acknowledgement is provoked again by a duplicate.
                    let from = (self.received_seq + 1).min(self.next_send_seq - 1);
                    self.rewind_to(from.max(self.acked_seq + 1));
                    self.gap_rewound_for = None;
                    self.last_progress_ns = now;
                }
                let expired: BTreeSet<u64> = self
                    .hash_deadlines()
                    .filter(|&(_, deadline)| now >= deadline)
                    .map(|(request_id, _)| request_id)
                    .collect();
                self.requeue_hash_requests(|request_id| expired.contains(&request_id));
            }
            _ => {}
        }
    }

    /// The next frame to send: control first, then hash requests, then records.
    pub fn poll_transmit(
        &mut self,
        journal: &impl ShipJournal,
        now: u64,
    ) -> Result<Option<Frame>, SourceError> {
        if let Some(frame) = self.control.pop_front() {
            return Ok(Some(frame));
        }
        match self.phase {
            Phase::Handshaking {
                hello_due: true, ..
            } => {
                self.phase = Phase::Handshaking {
                    hello_due: false,
                    hello_sent_ns: now,
                };
                return Ok(Some(Frame::hello(
                    &self.config.source_name,
                    journal.first_seq(),
                    journal.last_seq(),
                    &self.config.disks,
                    &self.config.machines,
                )));
            }
            Phase::Streaming => {}
            _ => return Ok(None),
        }
        if let Some(frame) = self.next_hash_request(now) {
            return Ok(Some(frame));
        }
        let result = self.next_records_frame(journal, now);
        if let Err(error) = &result {
            self.fail(error);
        }
        result
    }

    fn next_hash_request(&mut self, now: u64) -> Option<Frame> {
        if self.hash_requests.len() >= self.config.sync_hash_requests_in_flight_max {
            return None;
        }
        let block_bytes = self.config.sync_block_bytes;
        let queued_max = self.config.sync_hashed_extents_queued_max.max(1);
        let (disk_id, job) = self
            .jobs
            .iter_mut()
            .find(|(_, job)| !job.need_hash.is_empty() && job.need_read.len() < queued_max)?;
        let extent = job.extent_bytes;
        let extent_bytes = extent as u32;
        // One span of at most `per_request` extents from the first one wanted; only the wanted
        // ones in it are read and hashed by the target (a mask), so scattered dirty extents
        // share requests.
        let per_extent = wire::blocks_per_extent(extent_bytes, block_bytes);
        let per_request = (self.config.sync_hash_extents_per_request.max(1) as usize)
            .min(limits::HASH_EXTENTS_PER_REQUEST_MAX)
            .min(limits::HASH_BLOCKS_PER_RESPONSE_MAX / per_extent.max(1))
            .max(1);
        let first = *job.need_hash.first().expect("not empty");
        let span_end = first.saturating_add(extent * per_request as u64);
        let offsets: Vec<u64> = job.need_hash.range(first..span_end).copied().collect();
        for offset in &offsets {
            job.need_hash.remove(offset);
        }
        let wanted: Vec<u32> = offsets
            .iter()
            .map(|offset| ((offset - first) / extent) as u32)
            .collect();
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let request = HashRequest {
            request_id,
            disk_id: *disk_id,
            offset: first,
            extent_bytes,
            extent_count: wanted.last().expect("the first offset") + 1,
            block_bytes,
            wanted,
        };
        self.hash_requests.insert(
            request_id,
            OutstandingHash {
                disk_id: *disk_id,
                offsets,
                extent_bytes,
                block_bytes,
                sent_ns: now,
                acked_at_send: self.acked_seq,
            },
        );
        Some(Frame::hash_request(&request))
    }

    fn next_records_frame(
        &mut self,
        journal: &impl ShipJournal,
        now: u64,
    ) -> Result<Option<Frame>, SourceError> {
        let durable = self.ship_limit(journal);
        // The target resumes from below a restarted log's Skip: the Skip stands for the
        // numbers in between.
        let first = journal.first_seq();
        if self.next_send_seq < first && starts_with_skip(journal) {
            self.next_send_seq = first;
        }
        // Each record is read (and verified) once: its bytes go into the frame as they are.
        let mut records: Vec<RecordBytes<'_>> = Vec::new();
        let mut seqs = Vec::new();
        let mut frame_bytes = 0usize;
        let mut seq = self.next_send_seq;
        while seq <= durable
            && self.in_flight.len() + seqs.len() < self.config.window_records_max
            && frame_bytes < self.config.frame_bytes_target
        {
            let record = match self.held_sync_record(seq) {
                Some(held) => RecordBytes::Held(held),
                None => match journal.record_bytes(seq) {
                    Ok(Some(bytes)) => RecordBytes::Encoded(bytes),
                    Ok(None) => {
                        return Err(SourceError::MissingRecord {
                            seq,
                            first_seq: journal.first_seq(),
                            last_seq: journal.last_seq(),
                        })
                    }
                    Err(error) => {
                        return Err(SourceError::CorruptRecord {
                            seq,
                            reason: error.to_string(),
                        })
                    }
                },
            };
            let bytes = match record {
                RecordBytes::Held(held) => held.encoded_len(),
                RecordBytes::Encoded(encoded) => encoded.len(),
            };
            let window_full =
                self.in_flight_bytes + frame_bytes + bytes > self.config.window_bytes_max;
            let frame_full = frame_bytes + bytes > limits::FRAME_BODY_BYTES_MAX - 8;
            if !seqs.is_empty() && (window_full || frame_full) {
                break;
            }
            if seqs.is_empty() && window_full && !self.in_flight.is_empty() {
                break;
            }
            frame_bytes += bytes;
            seqs.push((seq, bytes));
            records.push(record);
            seq += 1;
        }
        if seqs.is_empty() {
            return Ok(None);
        }
        // The exact journal bytes go on the wire (held payloads as they are, not copied); the
        // target verifies each record again.
        let frame = Frame::records_held(records, frame_bytes);
        if self.in_flight.is_empty() {
            self.last_progress_ns = now;
        }
        for &(seq, bytes) in &seqs {
            self.in_flight.push_back((seq, bytes));
            self.in_flight_bytes += bytes;
        }
        self.next_send_seq = seq;
        Ok(Some(frame))
    }

    /// The encoded `ResyncExtent` held for the journal's `SyncRef` at `seq` (not yet
    /// acknowledged by the target), if this state machine appended it.
    pub fn held_sync_record(&self, seq: Seq) -> Option<&HeldRecord> {
        let index = self
            .sync_unacked
            .binary_search_by_key(&seq, |held| held.seq)
            .ok()?;
        self.sync_unacked[index].record.as_ref()
    }

    /// Journal space the target acknowledged durable: pass to `journal.release`.
    pub fn poll_release(&mut self) -> Option<Seq> {
        if self.acked_seq > self.released_seq {
            self.released_seq = self.acked_seq;
            Some(self.released_seq)
        } else {
            None
        }
    }

    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }

    /// Resync bytes that live records may queue behind: appended and unacknowledged sync
    /// records plus the extents being read.
    fn sync_backlog_bytes(&self) -> u64 {
        self.sync_unacked_bytes + self.reads.values().map(|read| read.length).sum::<u64>()
    }

    /// The next source extent to read for a sync, within the read and backlog bounds.
    pub fn poll_sync_read(&mut self, journal: &impl ShipJournal) -> Option<ExtentRead> {
        if let Some(acked_then) = self.sync_blocked_at_ack {
            if self.acked_seq > acked_then || journal.last_seq() <= self.acked_seq {
                self.sync_blocked_at_ack = None;
            }
        }
        if self.phase == Phase::Closed
            || self.sync_blocked_at_ack.is_some()
            || self.reads.len() >= self.config.sync_reads_in_flight_max
            || self.sync_backlog_bytes() >= self.config.sync_backlog_bytes_max
        {
            return None;
        }
        let (disk_id, job) = self
            .jobs
            .iter_mut()
            .find(|(_, job)| !job.need_read.is_empty())?;
        let (offset, plan) = job.need_read.pop_first().expect("not empty");
        job.reading += 1;
        let length = job.extent_bytes.min(job.size_bytes - offset);
        let token = self.next_token;
        self.next_token += 1;
        self.reads.insert(
            token,
            PendingRead {
                disk_id: *disk_id,
                offset,
                length,
                plan,
                acked_at_issue: self.acked_seq,
            },
        );
        Some(ExtentRead {
            token,
            disk_id: *disk_id,
            offset,
            length,
        })
    }

    /// The bytes of an `ExtentRead`. `seq_floor`: every journaled write at or below it was on
    /// the source disk when the read started (see the module doc).
    pub fn handle_extent_read(
        &mut self,
        token: u64,
        seq_floor: Seq,
        data: &[u8],
        journal: &mut impl ShipJournal,
        now: u64,
    ) -> Result<(), SourceError> {
        self.extent_arrived(token, seq_floor, Some(data), None, journal, now)
    }

    /// Like [`Source::handle_extent_read`], with the bytes in a shared buffer: the runs to send
    /// keep slices of it until acknowledged instead of copies, when they are most of it (a few
    /// small runs are copied, so that they do not hold a whole extent's buffer).
    pub fn handle_extent_read_shared(
        &mut self,
        token: u64,
        seq_floor: Seq,
        data: &bytes::Bytes,
        journal: &mut impl ShipJournal,
        now: u64,
    ) -> Result<(), SourceError> {
        self.extent_arrived(token, seq_floor, Some(data), Some(data), journal, now)
    }

    /// An `ExtentRead` the driver knows reads as zeros without reading it (a hole of a sparse
    /// source file, found with `SEEK_DATA`), with the same `seq_floor` rule as a read.
    pub fn handle_extent_zero(
        &mut self,
        token: u64,
        seq_floor: Seq,
        journal: &mut impl ShipJournal,
        now: u64,
    ) -> Result<(), SourceError> {
        self.extent_arrived(token, seq_floor, None, None, journal, now)
    }

    /// Which blocks of an extent must travel (`None` data: all zero).
    fn blocks_to_send(
        &self,
        read: &PendingRead,
        seq_floor: Seq,
        data: Option<&[u8]>,
        mode: SyncMode,
    ) -> Vec<bool> {
        let block = self.config.sync_block_bytes.max(1) as usize;
        let length = read.length as usize;
        let blocks = length.div_ceil(block);
        if read.plan.reread {
            return vec![true; blocks];
        }
        let Some(target) = &read.plan.target else {
            // No hashes: a new, zero-filled replica (`CopyNonZero`) needs the non-zero blocks
            // only; otherwise everything travels.
            return match (mode, data) {
                (SyncMode::CopyNonZero, None) => vec![false; blocks],
                (SyncMode::CopyNonZero, Some(data)) => {
                    data.chunks(block).map(|chunk| !is_zero(chunk)).collect()
                }
                (SyncMode::CompareHashes, _) => vec![true; blocks],
            };
        };
        // The target will replay every record after `target.applied_seq` over the hashed
        // bytes: a block matching its hash may stay only if no record up to the read's floor
        // touches it (a resync record with older bytes, or a write overtaken by one the journal
        // never saw — bitmap mode, a lost journal tail). Records after the floor are the read
        // race, checked once the runs to send are known.
        if target.blocks.len() < blocks {
            return vec![true; blocks];
        }
        let mut send = vec![false; blocks];
        let since = target.applied_seq.min(seq_floor);
        let judged = self.touches.overlapping(
            read.disk_id,
            (since, seq_floor + 1),
            (read.offset, read.length),
            true,
            |offset, length| {
                let start = offset.saturating_sub(read.offset) as usize / block;
                let end = (offset.saturating_add(length) - read.offset).min(read.length) as usize;
                for forced in &mut send[start..end.div_ceil(block)] {
                    *forced = true;
                }
            },
        );
        if !judged {
            return vec![true; blocks];
        }
        match data {
            Some(data) => data
                .chunks(block)
                .zip(&target.blocks)
                .zip(send)
                .map(|((chunk, hash), forced)| forced || wire::block_hash(chunk) != *hash)
                .collect(),
            None => {
                let full = zero_block_hash(block);
                (0..blocks)
                    .map(|index| {
                        let len = block.min(length - index * block);
                        let zero = if len == block {
                            full
                        } else {
                            zero_block_hash(len)
                        };
                        send[index] || zero != target.blocks[index]
                    })
                    .collect()
            }
        }
    }

    fn extent_arrived(
        &mut self,
        token: u64,
        seq_floor: Seq,
        data: Option<&[u8]>,
        shared: Option<&bytes::Bytes>,
        journal: &mut impl ShipJournal,
        now: u64,
    ) -> Result<(), SourceError> {
        let Some(read) = self.reads.remove(&token) else {
            return Ok(());
        };
        let Some(job) = self.jobs.get_mut(&read.disk_id) else {
            return Ok(());
        };
        job.reading -= 1;
        let mode = job.mode;
        self.touches.catch_up(journal, journal.last_seq());
        if let Some(data) = data.filter(|data| data.len() as u64 != read.length) {
            job.need_read.insert(read.offset, read.plan);
            return Err(SourceError::ExtentLength {
                disk_id: read.disk_id,
                offset: read.offset,
                expected: read.length,
                got: data.len(),
            });
        }
        let send = self.blocks_to_send(&read, seq_floor, data, mode);
        let block = self.config.sync_block_bytes.max(1) as u64;
        // Runs of blocks to send, as byte ranges within the extent.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (index, _) in send.iter().enumerate().filter(|(_, send)| **send) {
            let start = index as u64 * block;
            let end = (start + block).min(read.length);
            match runs.last_mut() {
                Some((_, run_end)) if *run_end == start => *run_end = end,
                _ => runs.push((start, end)),
            }
        }
        if runs.is_empty() {
            let job = self.jobs.get_mut(&read.disk_id).expect("looked up above");
            job.progress.bytes_done += read.length;
            if read.plan.target.is_some() {
                job.progress.extents_skipped += 1;
            } else {
                job.progress.extents_zero += 1;
            }
            self.check_sync_done();
            return Ok(());
        }
        let mut last_seq = 0;
        let mut bytes_sent = 0;
        // Slices of the read's buffer only when the runs are most of it.
        let run_bytes: u64 = runs.iter().map(|(start, end)| end - start).sum();
        let shared = shared.filter(|_| run_bytes.saturating_mul(2) >= read.length);
        for &(start, end) in &runs {
            let payload = data.map_or(&[][..], |data| &data[start as usize..end as usize]);
            let zero = is_zero(payload);
            // The journal gets the header only; the payload stays here until acknowledged.
            let spec = RecordSpec {
                kind: if zero {
                    RecordKind::Zero
                } else {
                    RecordKind::SyncRef
                },
                disk_id: read.disk_id,
                offset: read.offset + start,
                length: end - start,
                timestamp_ns: now,
                payload: &[],
            };
            let seq = match journal.append(&spec) {
                Ok(seq) => seq,
                Err(error) => {
                    // Records of this extent already appended are superseded when it is read
                    // again (a reread sends every block).
                    let plan = ReadPlan {
                        reread: read.plan.reread || last_seq > 0,
                        ..read.plan
                    };
                    let job = self.jobs.get_mut(&read.disk_id).expect("looked up above");
                    job.last_appended_seq = job.last_appended_seq.max(last_seq);
                    job.need_read.insert(read.offset, plan);
                    if let JournalError::Full { .. } = error {
                        // Try again once the target acknowledged (and the journal released)
                        // something.
                        self.sync_blocked_at_ack = Some(self.acked_seq);
                        return Ok(());
                    }
                    return Err(SourceError::Journal {
                        operation: "append",
                        disk_id: read.disk_id,
                        offset: read.offset,
                        source: error,
                    });
                }
            };
            self.touches.insert(
                seq,
                Touch::Range {
                    disk_id: spec.disk_id,
                    offset: spec.offset,
                    length: spec.length,
                    own: true,
                },
            );
            let payload = if zero { &[][..] } else { payload };
            let record = (!zero).then(|| {
                let kept = match shared {
                    Some(shared) => shared.slice(start as usize..end as usize),
                    None => bytes::Bytes::copy_from_slice(payload),
                };
                Record {
                    kind: RecordKind::ResyncExtent,
                    disk_id: spec.disk_id,
                    seq,
                    offset: spec.offset,
                    length: spec.length,
                    timestamp_ns: now,
                    payload: &kept,
                }
                .to_held(kept.clone())
                .expect("a run of one extent fits a record (SYNC_EXTENT_BYTES_MAX)")
            });
            let record_bytes = encoded_len_for_payload(payload.len()) as u64;
            self.sync_unacked.push_back(SyncUnacked {
                seq,
                bytes: record_bytes,
                record,
            });
            self.sync_unacked_bytes += record_bytes;
            bytes_sent += payload.len() as u64;
            last_seq = seq;
        }
        // A live record after the floor over a block just sent: those bytes may be torn or
        // older than the record, which the target applies first. Over a skipped block it is
        // harmless (both sides get it after the bytes compared equal).
        let mut raced = false;
        let judged = self.touches.overlapping(
            read.disk_id,
            (seq_floor, last_seq),
            (read.offset, read.length),
            false,
            |offset, length| {
                raced |= runs.iter().any(|&(start, end)| {
                    overlaps(offset, length, read.offset + start, end - start)
                });
            },
        );
        let clean = judged && !raced;
        let job = self.jobs.get_mut(&read.disk_id).expect("looked up above");
        job.last_appended_seq = job.last_appended_seq.max(last_seq);
        job.progress.bytes_sent += bytes_sent;
        if clean {
            job.progress.bytes_done += read.length;
            if bytes_sent == 0 {
                job.progress.extents_zero += 1;
            } else {
                job.progress.extents_sent += 1;
            }
        } else {
            job.progress.extents_reread += 1;
            job.need_read.insert(
                read.offset,
                ReadPlan {
                    reread: true,
                    ..read.plan
                },
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::target::{DiskOp, Target, TargetEvent};
    use crate::core::wire::ReplicaState;

    /// A journal in a Vec: enough to test the state machine without the ring.
    #[derive(Default)]
    struct VecJournal {
        records: Vec<(Seq, Vec<u8>)>,
        released: Seq,
        durable: Seq,
        capacity_bytes: u64,
        /// Space a release does not give back (a ring releases whole segments only).
        unreleased_bytes: u64,
    }

    impl VecJournal {
        fn write(&mut self, offset: u64, data: &[u8]) -> Seq {
            self.append(&RecordSpec {
                kind: RecordKind::Write,
                disk_id: 1,
                offset,
                length: data.len() as u64,
                timestamp_ns: 0,
                payload: data,
            })
            .unwrap()
        }
        fn release(&mut self, upto: Seq) {
            self.records.retain(|(seq, _)| *seq > upto);
            self.released = upto;
        }
    }

    impl ShipJournal for VecJournal {
        fn record(&self, seq: Seq) -> Option<Record<'_>> {
            let (_, bytes) = self.records.iter().find(|(s, _)| *s == seq)?;
            Some(crate::core::record::decode(bytes).unwrap().0)
        }
        fn record_bytes(&self, seq: Seq) -> Result<Option<&[u8]>, JournalError> {
            let Some((_, bytes)) = self.records.iter().find(|(s, _)| *s == seq) else {
                return Ok(None);
            };
            // Verified, as the real journal's reads are.
            crate::core::record::decode(bytes).map_err(|error| JournalError::Corrupt {
                seq,
                segment: 0,
                offset: 0,
                reason: error.to_string(),
            })?;
            Ok(Some(bytes))
        }
        fn first_seq(&self) -> Seq {
            self.records.first().map_or(0, |(seq, _)| *seq)
        }
        fn last_seq(&self) -> Seq {
            self.records.last().map_or(self.released, |(seq, _)| *seq)
        }
        fn durable_seq(&self) -> Seq {
            self.durable
        }
        fn used_bytes(&self) -> u64 {
            self.records
                .iter()
                .map(|(_, bytes)| bytes.len() as u64)
                .sum::<u64>()
                + self.unreleased_bytes
        }
        fn append(&mut self, spec: &RecordSpec<'_>) -> Result<Seq, JournalError> {
            let seq = self.last_seq() + 1;
            let record = Record {
                kind: spec.kind,
                disk_id: spec.disk_id,
                seq,
                offset: spec.offset,
                length: spec.length,
                timestamp_ns: spec.timestamp_ns,
                payload: spec.payload,
            };
            let needed = record.encoded_len();
            if self.capacity_bytes > 0 && self.used_bytes() + needed as u64 > self.capacity_bytes {
                return Err(JournalError::Full {
                    needed_bytes: needed,
                    free_bytes: 0,
                });
            }
            self.records.push((seq, record.to_vec()?));
            Ok(seq)
        }
        fn flush(&mut self, upto: Seq) -> Result<(), JournalError> {
            self.durable = self.durable.max(upto.min(self.last_seq()));
            Ok(())
        }
    }

    fn disks() -> Vec<DiskAnnouncement> {
        vec![DiskAnnouncement {
            disk_id: 1,
            size_bytes: 64 << 10,
            machine: "m".into(),
            name: "d".into(),
            group: "g".into(),
        }]
    }

    /// Source and target wired back to back, with a replica in memory.
    struct Pair {
        source: Source,
        target: Target,
        journal: VecJournal,
        replica: Vec<u8>,
        source_disk: Vec<u8>,
        now: u64,
        /// All-zero extents come back as holes (`handle_extent_zero`), as from a sparse file.
        holes: bool,
    }

    impl Pair {
        fn new() -> Self {
            let journal = VecJournal::default();
            let mut config = SourceConfig::new("site-a", disks());
            config.sync_extent_bytes = 4096;
            config.window_records_max = 4;
            Self {
                source: Source::new(config, &journal),
                target: Target::new(0),
                journal,
                replica: vec![0; 64 << 10],
                source_disk: vec![0; 64 << 10],
                now: 0,
                holes: false,
            }
        }

        fn connect(&mut self) {
            self.source.handle_connected(self.now);
            self.target.handle_connected();
        }

        /// Runs until quiet, optionally dropping source→target frames matching `drop`.
        fn run(&mut self, mut drop: impl FnMut(&Frame) -> bool) {
            for _ in 0..10_000 {
                let mut moved = false;
                while let Some(frame) = self.source.poll_transmit(&self.journal, self.now).unwrap()
                {
                    moved = true;
                    if !drop(&frame) {
                        self.target.handle_frame(frame.as_bytes()).unwrap();
                    }
                }
                while let Some(event) = self.target.poll_event() {
                    let TargetEvent::Hello { .. } = event;
                    self.target.welcome(vec![WelcomeDisk {
                        disk_id: 1,
                        replica: ReplicaState::Present,
                        size_bytes: 64 << 10,
                    }]);
                }
                while let Some(op) = self.target.poll_disk_op() {
                    moved = true;
                    match op {
                        DiskOp::Write { offset, data, .. } => {
                            self.replica[offset as usize..][..data.len()].copy_from_slice(&data)
                        }
                        DiskOp::Zero { offset, length, .. } => {
                            self.replica[offset as usize..][..length as usize].fill(0)
                        }
                        DiskOp::Flush { seq } => self.target.handle_durable(seq),
                        DiskOp::Marker { .. } => {}
                        DiskOp::Read {
                            token,
                            offset,
                            length,
                            ..
                        } => {
                            let data = self.replica[offset as usize..][..length as usize].to_vec();
                            self.target.handle_read(token, &data);
                        }
                    }
                }
                while let Some(frame) = self.target.poll_transmit() {
                    moved = true;
                    self.source
                        .handle_frame(frame.as_bytes(), &mut self.journal, self.now)
                        .unwrap();
                }
                while let Some(seq) = self.source.poll_release() {
                    self.journal.release(seq);
                }
                while let Some(read) = self.source.poll_sync_read(&self.journal) {
                    moved = true;
                    let data =
                        self.source_disk[read.offset as usize..][..read.length as usize].to_vec();
                    let floor = self.journal.last_seq();
                    if self.holes && data.iter().all(|&byte| byte == 0) {
                        self.source
                            .handle_extent_zero(read.token, floor, &mut self.journal, self.now)
                            .unwrap();
                    } else {
                        self.source
                            .handle_extent_read(
                                read.token,
                                floor,
                                &data,
                                &mut self.journal,
                                self.now,
                            )
                            .unwrap();
                    }
                }
                // The driver's group commit while a sync runs: its records become durable (and
                // shippable) here. Tests of live records flush by hand.
                let last = self.journal.last_seq();
                if self.source.syncing_disks().next().is_some() && self.journal.durable_seq() < last
                {
                    moved = true;
                    self.journal.flush(last).unwrap();
                }
                if !moved {
                    match self.source.poll_timeout() {
                        Some(at) => {
                            self.now = self.now.max(at);
                            self.source.handle_timeout(self.now);
                        }
                        None => return,
                    }
                }
            }
            panic!("pair did not settle");
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.journal.write(offset, data);
            self.source_disk[offset as usize..][..data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn ships_only_durable_records_and_releases_on_ack() {
        let mut pair = Pair::new();
        pair.connect();
        pair.write(0, &[1; 100]);
        pair.write(200, &[2; 100]);
        pair.run(|_| false);
        assert_eq!(
            pair.target.received_seq(),
            0,
            "nothing durable at the source, nothing shipped"
        );
        pair.journal.flush(2).unwrap();
        pair.run(|_| false);
        assert_eq!(pair.source.acked_seq(), 2);
        assert_eq!(pair.journal.first_seq(), 0, "released");
        assert_eq!(pair.replica, pair.source_disk);
    }

    #[test]
    fn a_record_that_no_longer_verifies_is_not_shipped_and_named() {
        let mut pair = Pair::new();
        pair.connect();
        pair.run(|_| false);
        pair.write(0, &[1; 100]);
        pair.write(200, &[2; 100]);
        pair.journal.flush(2).unwrap();
        // A payload byte of record 2 goes bad in the journal.
        let (_, bytes) = pair
            .journal
            .records
            .iter_mut()
            .find(|(seq, _)| *seq == 2)
            .unwrap();
        bytes[crate::limits::RECORD_HEADER_BYTES + 10] ^= 0x40;
        let mut outcome = Ok(None);
        for _ in 0..16 {
            outcome = pair.source.poll_transmit(&pair.journal, pair.now);
            match &outcome {
                Ok(Some(frame)) => pair.target.handle_frame(frame.as_bytes()).unwrap(),
                _ => break,
            }
        }
        match outcome {
            Err(SourceError::CorruptRecord { seq: 2, reason }) => {
                assert!(reason.contains("checksum"), "{reason}")
            }
            other => panic!("expected record 2 refused as corrupt, got {other:?}"),
        }
        assert!(
            pair.target.received_seq() < 2,
            "record 2 reached the target"
        );
    }

    #[test]
    fn under_a_sequence_floor_records_ship_before_they_are_durable() {
        let mut pair = Pair::new();
        pair.source.set_sequence_floor(1);
        pair.connect();
        pair.write(0, &[1; 100]);
        pair.write(200, &[2; 100]);
        pair.run(|_| false);
        assert_eq!(
            pair.target.received_seq(),
            1,
            "shipped before it is durable, but not past the floor"
        );
        pair.source.set_sequence_floor(0);
        assert_eq!(
            pair.source.sequence_floor(),
            Some(1),
            "a floor only goes up"
        );
        pair.source.set_sequence_floor(10);
        pair.run(|_| false);
        assert_eq!(pair.source.acked_seq(), 2);
        assert_eq!(pair.journal.durable_seq(), 0, "nothing was flushed");
        assert_eq!(pair.replica, pair.source_disk);
    }

    #[test]
    fn a_restarted_journal_resumes_the_target_past_its_skip() {
        let mut pair = Pair::new();
        // The target holds 1..=5 of the run before the host went down; the source's journal
        // restarted at 20 (numbers 6..=19 given up) and took a write after it.
        pair.target = Target::new(5);
        pair.journal.released = 19;
        pair.journal.append(&RecordSpec::SKIP).unwrap();
        pair.write(300, &[7; 50]);
        pair.journal.flush(21).unwrap();
        pair.source = Source::new(SourceConfig::new("site-a", disks()), &pair.journal);
        pair.connect();
        pair.run(|_| false);
        assert_eq!(pair.target.received_seq(), 21);
        assert_eq!(pair.target.durable_seq(), 21);
        assert_eq!(pair.source.acked_seq(), 21);
        assert_eq!(pair.replica, pair.source_disk);
    }

    #[test]
    fn window_bounds_records_in_flight() {
        let mut pair = Pair::new();
        pair.connect();
        pair.run(|_| false);
        for index in 0..10u64 {
            pair.write(index * 10, &[index as u8 + 1; 10]);
        }
        pair.journal.flush(10).unwrap();
        let frame = pair
            .source
            .poll_transmit(&pair.journal, 0)
            .unwrap()
            .unwrap();
        match frame.decode().unwrap() {
            Message::Records(records) => assert_eq!(records.len(), 4),
            other => panic!("{other:?}"),
        }
        assert!(
            pair.source
                .poll_transmit(&pair.journal, 0)
                .unwrap()
                .is_none(),
            "window full"
        );
    }

    #[test]
    fn lost_frames_are_resent_after_gap_or_timeout() {
        let mut pair = Pair::new();
        pair.connect();
        pair.run(|_| false);
        for index in 0..12u64 {
            pair.write(index * 100, &[index as u8 + 1; 100]);
            pair.journal.flush(index + 1).unwrap();
        }
        let mut dropped = 0;
        pair.run(|frame| {
            let drop = frame.kind() == wire::FrameKind::Records && dropped < 3;
            dropped += drop as usize;
            drop
        });
        assert_eq!(pair.source.acked_seq(), 12);
        assert_eq!(pair.replica, pair.source_disk);
        assert!(pair.now > 0, "the resend timer had to fire");
    }

    #[test]
    fn reconnect_resumes_without_resending_acknowledged_records() {
        let mut pair = Pair::new();
        pair.connect();
        pair.write(0, &[1; 100]);
        pair.journal.flush(1).unwrap();
        pair.run(|_| false);
        pair.source.handle_disconnected(pair.now);
        pair.target.handle_disconnected();
        pair.write(100, &[2; 100]);
        pair.journal.flush(2).unwrap();
        pair.connect();
        let mut sent = Vec::new();
        pair.run(|frame| {
            if let Ok(Message::Records(records)) = frame.decode() {
                sent.extend(records.iter().map(|record| record.seq));
            }
            false
        });
        assert_eq!(sent, vec![2]);
        assert_eq!(pair.replica, pair.source_disk);
    }

    #[test]
    fn sync_skips_matching_extents_and_sends_differences() {
        let mut pair = Pair::new();
        // Source: pattern in extents 0..8, zero after. Target: an old copy differing in extent 3
        // and holding garbage in extent 12 (zero at the source).
        for (index, byte) in pair.source_disk[..8 * 4096].iter_mut().enumerate() {
            *byte = (index % 251) as u8;
        }
        pair.replica.copy_from_slice(&pair.source_disk);
        pair.replica[3 * 4096 + 7] ^= 0xff;
        pair.replica[12 * 4096] = 9;
        pair.connect();
        pair.source
            .start_sync(1, &[(0, 64 << 10)], SyncMode::CompareHashes)
            .unwrap();
        pair.run(|_| false);
        assert_eq!(pair.replica, pair.source_disk);
        let event = std::iter::from_fn(|| pair.source.poll_event())
            .find(|event| matches!(event, SourceEvent::SyncDone { .. }))
            .expect("sync done");
        let SourceEvent::SyncDone { progress, .. } = event else {
            unreachable!()
        };
        assert_eq!(progress.extents_sent, 1);
        assert_eq!(progress.extents_zero, 1);
        assert_eq!(progress.extents_skipped, 14);
        assert_eq!(progress.bytes_done, 64 << 10);
    }

    fn sync_done(pair: &mut Pair) -> SyncProgress {
        let event = std::iter::from_fn(|| pair.source.poll_event())
            .find(|event| matches!(event, SourceEvent::SyncDone { .. }))
            .expect("sync done");
        let SourceEvent::SyncDone { progress, .. } = event else {
            unreachable!()
        };
        progress
    }

    /// Records (kind, offset, length) the source sends during `run`.
    fn sent_records(pair: &mut Pair) -> Vec<(RecordKind, u64, u64)> {
        let mut sent = Vec::new();
        pair.run(|frame| {
            if let Ok(Message::Records(records)) = frame.decode() {
                sent.extend(records.iter().map(|r| (r.kind, r.offset, r.length)));
            }
            false
        });
        sent
    }

    /// Syncs `0..length` by hash compare until quiet; the replica must then equal the source.
    /// Returns the records sent.
    fn compare_sync(pair: &mut Pair, length: u64) -> Vec<(RecordKind, u64, u64)> {
        pair.source
            .start_sync(1, &[(0, length)], SyncMode::CompareHashes)
            .unwrap();
        let sent = sent_records(pair);
        assert_eq!(pair.replica, pair.source_disk);
        sent
    }

    #[test]
    fn sync_sends_only_the_differing_blocks_of_an_extent() {
        for holes in [false, true] {
            let mut pair = Pair::new();
            pair.holes = holes;
            pair.source.config.sync_extent_bytes = 16 << 10;
            pair.source.config.sync_block_bytes = 1024;
            for (index, byte) in pair.source_disk.iter_mut().enumerate() {
                *byte = (index % 251) as u8 + 1;
            }
            // The target: an old copy differing in blocks 5 and 6 (one run) and 13; the source
            // zeroed blocks 40..42 and the whole last extent, where the copy has data.
            pair.replica.copy_from_slice(&pair.source_disk);
            pair.replica[5 * 1024 + 3] ^= 0xff;
            pair.replica[6 * 1024] ^= 0xff;
            pair.replica[13 * 1024 + 1023] ^= 0xff;
            pair.source_disk[40 * 1024..42 * 1024].fill(0);
            pair.source_disk[48 * 1024..].fill(0);
            pair.connect();
            let sent = compare_sync(&mut pair, 64 << 10);
            assert_eq!(
                sent,
                vec![
                    (RecordKind::ResyncExtent, 5 * 1024, 2048),
                    (RecordKind::ResyncExtent, 13 * 1024, 1024),
                    (RecordKind::Zero, 40 * 1024, 2048),
                    (RecordKind::Zero, 48 * 1024, 16 << 10),
                ],
                "holes {holes}"
            );
            let progress = sync_done(&mut pair);
            assert_eq!(progress.bytes_sent, 3 * 1024);
            assert_eq!(
                (
                    progress.extents_sent,
                    progress.extents_zero,
                    progress.extents_skipped
                ),
                (1, 2, 1)
            );
            assert_eq!(progress.bytes_done, 64 << 10);
        }
    }

    #[test]
    fn a_new_replica_gets_only_the_non_zero_blocks() {
        let mut pair = Pair::new();
        pair.holes = true;
        pair.source.config.sync_extent_bytes = 16 << 10;
        pair.source.config.sync_block_bytes = 4096;
        pair.source_disk[4096..4196].fill(7);
        pair.source_disk[12288..16384].fill(9);
        pair.source_disk[20000] = 1;
        pair.connect();
        pair.run(|_| false);
        pair.source
            .start_sync(1, &[(0, 64 << 10)], SyncMode::CopyNonZero)
            .unwrap();
        let sent = sent_records(&mut pair);
        assert_eq!(pair.replica, pair.source_disk);
        assert_eq!(
            sent,
            vec![
                (RecordKind::ResyncExtent, 4096, 4096),
                (RecordKind::ResyncExtent, 12288, 4096),
                (RecordKind::ResyncExtent, 16384, 4096),
            ]
        );
        let progress = sync_done(&mut pair);
        assert_eq!((progress.extents_sent, progress.extents_zero), (2, 2));
    }

    #[test]
    fn hash_requests_share_a_span_and_skip_extents_not_wanted() {
        let mut pair = Pair::new();
        pair.source.config.sync_extent_bytes = 4096;
        pair.connect();
        pair.run(|_| false);
        // Scattered dirty extents 1, 3 and 9: one request, a mask of three.
        pair.source
            .start_sync(
                1,
                &[(4096, 4096), (3 * 4096, 100), (9 * 4096, 4096)],
                SyncMode::CompareHashes,
            )
            .unwrap();
        let frame = pair
            .source
            .poll_transmit(&pair.journal, 0)
            .unwrap()
            .unwrap();
        match frame.decode().unwrap() {
            Message::HashRequest(request) => {
                assert_eq!(request.offset, 4096);
                assert_eq!(request.extent_count, 9);
                assert_eq!(request.wanted, vec![0, 2, 8]);
                assert_eq!(request.block_bytes, 4096);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sync_backlog_counts_unacknowledged_bytes_not_journal_usage() {
        let mut pair = Pair::new();
        pair.source.config.sync_backlog_bytes_max = 2 * 4096;
        for (index, byte) in pair.source_disk.iter_mut().enumerate() {
            *byte = (index % 241) as u8 + 1;
        }
        pair.connect();
        pair.run(|_| false);
        pair.source
            .start_sync(1, &[(0, 64 << 10)], SyncMode::CopyNonZero)
            .unwrap();
        let first = pair.source.poll_sync_read(&pair.journal).unwrap();
        let second = pair.source.poll_sync_read(&pair.journal).unwrap();
        assert!(
            pair.source.poll_sync_read(&pair.journal).is_none(),
            "two extents in flight fill the backlog"
        );
        let data = pair.source_disk[..4096].to_vec();
        let floor = pair.journal.last_seq();
        pair.source
            .handle_extent_read(first.token, floor, &data, &mut pair.journal, 0)
            .unwrap();
        assert!(
            pair.source.poll_sync_read(&pair.journal).is_none(),
            "an appended, unacknowledged extent still counts"
        );
        let data = pair.source_disk[4096..8192].to_vec();
        pair.source
            .handle_extent_read(second.token, floor, &data, &mut pair.journal, 0)
            .unwrap();
        // A journal whose used bytes stay high after releases (one large segment) must not
        // stall the sync: acknowledgements alone make room.
        pair.journal.unreleased_bytes = 1 << 30;
        pair.run(|_| false);
        assert_eq!(pair.replica, pair.source_disk);
        assert_eq!(pair.source.syncing_disks().count(), 0);
    }

    #[test]
    fn a_write_racing_with_an_extent_read_forces_a_reread() {
        let mut journal = VecJournal::default();
        let mut config = SourceConfig::new("s", disks());
        config.sync_extent_bytes = 4096;
        let mut source = Source::new(config, &journal);
        source
            .start_sync(1, &[(0, 4096)], SyncMode::CopyNonZero)
            .unwrap();
        let read = source.poll_sync_read(&journal).unwrap();
        let floor = journal.last_seq();
        // A live write is journaled while the read is in flight; the read saw the old bytes.
        journal.write(100, &[5; 10]);
        source
            .handle_extent_read(read.token, floor, &[1; 4096], &mut journal, 0)
            .unwrap();
        assert_eq!(source.sync_progress(1).unwrap().extents_reread, 1);
        let again = source
            .poll_sync_read(&journal)
            .expect("extent queued again");
        let floor = journal.last_seq();
        source
            .handle_extent_read(again.token, floor, &[1; 4096], &mut journal, 0)
            .unwrap();
        assert_eq!(source.sync_progress(1).unwrap().extents_sent, 1);
    }

    /// A full hash scan whose later extents are read after the records of the earlier ones
    /// were acknowledged and released (the hashes were taken before): only the changed blocks
    /// travel. The released records are its own and touch other extents, so they cannot make a
    /// matching block unsafe to skip.
    /// A connected pair syncing in 16 KiB extents of 4 KiB blocks, whose replica equals the
    /// source disk (a pattern of period `period`).
    fn pair_in_step(period: usize) -> Pair {
        let mut pair = Pair::new();
        pair.source.config.sync_extent_bytes = 16 << 10;
        pair.source.config.sync_block_bytes = 4096;
        for (index, byte) in pair.source_disk.iter_mut().enumerate() {
            *byte = (index % period) as u8 + 1;
        }
        pair.replica.copy_from_slice(&pair.source_disk);
        pair.connect();
        pair.run(|_| false);
        pair
    }

    #[test]
    fn released_records_of_other_extents_do_not_force_whole_extents() {
        let mut pair = pair_in_step(239);
        // One extent's record at a time in the backlog: every later extent waits for an
        // acknowledgement (and a release) after the one hash response for all four.
        pair.source.config.sync_backlog_bytes_max = 4096;
        // One changed 4 KiB block in each 16 KiB extent.
        for extent in 0..4usize {
            pair.source_disk[extent * (16 << 10) + extent * 4096 + 5] ^= 0x5a;
        }
        let sent = compare_sync(&mut pair, 64 << 10);
        assert_eq!(
            sent,
            (0..4u64)
                .map(|extent| (
                    RecordKind::ResyncExtent,
                    extent * (16 << 10) + extent * 4096,
                    4096
                ))
                .collect::<Vec<_>>()
        );
        let progress = sync_done(&mut pair);
        assert_eq!(progress.bytes_sent, 4 * 4096);
        assert_eq!(progress.extents_reread, 0);
    }

    /// A journaled write the target has not applied when it hashed, over a block whose bytes
    /// at the source came back to the target's (a later write the journal never saw, as in
    /// bitmap mode): the target will replay that write after the match, so that block is sent
    /// although its hash matches — and only that block of its extent.
    #[test]
    fn a_block_a_later_record_touches_is_sent_although_its_hash_matches() {
        let mut pair = pair_in_step(233);
        // Journaled (not yet durable, so not at the target when it hashes), then overwritten on
        // the source disk with the old bytes behind the journal's back.
        pair.journal.write(4096 + 100, &[0xee; 200]);
        let sent = compare_sync(&mut pair, 16 << 10);
        assert_eq!(
            sent,
            vec![
                (RecordKind::Write, 4096 + 100, 200),
                (RecordKind::ResyncExtent, 4096, 4096),
            ]
        );
    }

    /// A live write racing with the read forces a reread only when it overlaps a block that was
    /// sent; over a block whose hash matched, both sides get the write after the match.
    #[test]
    fn a_racing_write_over_a_skipped_block_needs_no_reread() {
        let mut pair = pair_in_step(229);
        pair.source_disk[2 * 4096] ^= 1;
        pair.source
            .start_sync(1, &[(0, 16 << 10)], SyncMode::CompareHashes)
            .unwrap();
        // Hash round trip by hand, then the read races with writes to blocks 0 and 2.
        let request = pair
            .source
            .poll_transmit(&pair.journal, 0)
            .unwrap()
            .unwrap();
        pair.target.handle_frame(request.as_bytes()).unwrap();
        while let Some(op) = pair.target.poll_disk_op() {
            if let DiskOp::Read {
                token,
                offset,
                length,
                ..
            } = op
            {
                let data = pair.replica[offset as usize..][..length as usize].to_vec();
                pair.target.handle_read(token, &data);
            }
        }
        let response = pair.target.poll_transmit().unwrap();
        pair.source
            .handle_frame(response.as_bytes(), &mut pair.journal, 0)
            .unwrap();
        let read = pair.source.poll_sync_read(&pair.journal).unwrap();
        let floor = pair.journal.last_seq();
        let data = pair.source_disk[..16 << 10].to_vec();
        pair.write(10, &[3; 10]);
        pair.source
            .handle_extent_read(read.token, floor, &data, &mut pair.journal, 0)
            .unwrap();
        assert_eq!(pair.source.sync_progress(1).unwrap().extents_reread, 0);
        let sent = sent_records(&mut pair);
        assert_eq!(
            sent,
            vec![
                (RecordKind::Write, 10, 10),
                (RecordKind::ResyncExtent, 2 * 4096, 4096),
            ]
        );
        assert_eq!(pair.replica, pair.source_disk);
        assert_eq!(sync_done(&mut pair).extents_reread, 0);
    }

    #[test]
    fn a_target_ahead_of_the_journal_is_refused() {
        let mut journal = VecJournal::default();
        let mut source = Source::new(SourceConfig::new("s", disks()), &journal);
        source.handle_connected(0);
        assert!(source.poll_transmit(&journal, 0).unwrap().is_some());
        let welcome = Frame::welcome(5, 5, &[]);
        let error = source
            .handle_frame(welcome.as_bytes(), &mut journal, 0)
            .unwrap_err();
        assert!(matches!(
            error,
            SourceError::TargetAhead {
                target_seq: 5,
                journal_last_seq: 0
            }
        ));
        match source
            .poll_transmit(&journal, 0)
            .unwrap()
            .unwrap()
            .decode()
            .unwrap()
        {
            Message::Error { code, .. } => assert_eq!(code, ErrorCode::TargetAhead),
            other => panic!("{other:?}"),
        }
    }
}
