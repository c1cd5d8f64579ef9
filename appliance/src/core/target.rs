//! Target side of the replication protocol as a sans-IO state machine: accepts journal records
//! in sequence order, hands their effect to its driver as disk operations, acknowledges only
//! what the driver reports durable, answers extent-hash requests through driver reads, and
//! passes recovery-point markers on.
//!
//! Rules:
//! - Records are accepted strictly in order: `seq == received_seq + 1`. A record at or below
//!   `received_seq` is a duplicate (a resend after a reconnect or a timeout) and is only
//!   re-acknowledged. A record beyond `received_seq + 1` is a gap: it is dropped and the target
//!   acknowledges with the gap flag, asking the source to resend from `received_seq + 1` (once per
//!   gap; the source's resend timer covers a lost request).
//! - Every accepted batch ends with a `DiskOp::Flush { seq }`. The driver executes disk ops in the
//!   order polled (a `Read` must observe every `Write`/`Zero` polled before it), and after a
//!   flush has made every earlier op durable it persists `seq` (the replica's applied sequence)
//!   and calls `handle_durable(seq)`. Only then does the target acknowledge `seq`. Replaying
//!   records over a replica that already holds some of them is harmless (writes are absolute and
//!   replayed in order), so persisting `seq` after the data flush is enough.
//! - On restart the target is built with the persisted durable sequence: everything after it is
//!   resent by the source.
//!
//! Driver recipe (daemon applier or simulator):
//! 1. `Target::new(persisted_durable_seq)`; on each connection `handle_connected()`.
//! 2. For each complete frame from the source: `handle_frame(&bytes)`. On `Err`, send what
//!    `poll_transmit` still yields (an Error frame) and close the connection.
//! 3. After each input, drain: `poll_event()` (on `TargetEvent::Hello` prepare the replicas and
//!    call `welcome(disks)`), `poll_disk_op()` (execute in order; `Read` → `handle_read`,
//!    `Flush` → persist then `handle_durable`, `Marker` → new before-image interval),
//!    `poll_marker()` (to the recovery-point catalog once durable),
//!    `poll_transmit()` (send to the source).
//! 4. On connection loss `handle_disconnected()`; queued disk ops stay valid and must still run.

use std::collections::{BTreeMap, VecDeque};

use crate::config::MachineSettings;
use crate::core::record::{RecordKind, Seq};
use crate::core::wire::{
    self, DiskAnnouncement, ErrorCode, Frame, HashRequest, HashResponse, Message, WelcomeDisk,
    WireError,
};
use crate::limits::SYNC_HASH_REQUESTS_IN_FLIGHT_MAX;

/// Work for the target's driver, to be executed in the order polled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskOp {
    /// Write `data` at `offset` of the replica of `disk_id` (from record `seq`).
    Write {
        seq: Seq,
        disk_id: u32,
        offset: u64,
        /// A slice of the received frame when it came in a shared buffer (not copied).
        data: bytes::Bytes,
    },
    /// Make `length` bytes at `offset` read as zeroes (zero and trim records).
    Zero {
        seq: Seq,
        disk_id: u32,
        offset: u64,
        length: u64,
    },
    /// Make every earlier op durable, persist `seq` as the applied sequence, then call
    /// `handle_durable(seq)`. Consecutive flushes may be merged into the last one.
    Flush { seq: Seq },
    /// A recovery-point marker (`core::recovery::PointMarker` JSON in `payload`), in stream
    /// order: writes polled before it belong to the point, writes after it do not. The executor
    /// starts a new before-image interval here (`SavedBlocks::reset`) for each disk in the
    /// marker's `disk_ids` and from then on saves before-images for them; it writes nothing.
    /// The same marker also comes out of `poll_marker` for the catalog, to be recorded once
    /// `durable_seq() >= seq`.
    Marker { seq: Seq, payload: Vec<u8> },
    /// Read `length` bytes at `offset` (after every earlier write) and call
    /// `handle_read(token, data)`.
    Read {
        token: u64,
        disk_id: u32,
        offset: u64,
        length: u64,
    },
}

/// A recovery-point marker that arrived in the stream. It is durable at the target once
/// `durable_seq() >= seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkerArrival {
    pub seq: Seq,
    pub disk_id: u32,
    pub timestamp_ns: u64,
    pub payload: Vec<u8>,
}

/// Things the driver must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetEvent {
    /// A source introduced itself. Create or open a replica per disk, then call `welcome`.
    Hello {
        source_name: String,
        journal_first_seq: Seq,
        journal_last_seq: Seq,
        disks: Vec<DiskAnnouncement>,
        /// The source machines' settings (resource group, availability set, NICs), from which
        /// the driver derives and stores the target settings; empty if the source sent none.
        machines: Vec<MachineSettings>,
    },
}

/// Why the target ended a connection.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("undecodable frame from the source: {0}")]
    Wire(#[from] WireError),
    #[error("protocol violation by the source: {0}")]
    Protocol(String),
    #[error(
        "record {seq} touches disk {disk_id} at {offset}+{length}, outside any announced disk"
    )]
    OutOfRange {
        seq: Seq,
        disk_id: u32,
        offset: u64,
        length: u64,
    },
    #[error("the target holds sequence {durable_seq} but the source's journal ends at {source_last_seq}")]
    TargetAhead {
        durable_seq: Seq,
        source_last_seq: Seq,
    },
    #[error("the source reported an error ({code:?}): {message}")]
    Peer { code: ErrorCode, message: String },
}

impl TargetError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Wire(WireError::Version { .. }) => ErrorCode::Version,
            Self::Wire(_) => ErrorCode::Malformed,
            Self::Protocol(_) => ErrorCode::Protocol,
            Self::OutOfRange { .. } => ErrorCode::UnknownDisk,
            Self::TargetAhead { .. } => ErrorCode::TargetAhead,
            Self::Peer { code, .. } => *code,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No connection.
    Idle,
    /// Connected, waiting for the source's Hello.
    AwaitingHello,
    /// Hello handed to the driver, waiting for `welcome`.
    AwaitingWelcome,
    /// Streaming records.
    Open,
    /// A fatal error ended the connection.
    Closed,
}

struct HashJob {
    request: HashRequest,
    /// Records applied before the job's reads (reads run after every earlier op).
    applied_seq: Seq,
    /// Block hashes of each wanted extent, once read.
    hashes: Vec<Option<Vec<u64>>>,
}

/// The target's replication state machine for one source.
pub struct Target {
    phase: Phase,
    /// Disks announced in the current session's Hello, with their sizes.
    disks: BTreeMap<u32, u64>,
    welcome_disks: Vec<WelcomeDisk>,
    received_seq: Seq,
    durable_seq: Seq,
    flush_requested_seq: Seq,
    ack_pending: bool,
    gap_pending: bool,
    gap_reported_at: Option<Seq>,
    transmit: VecDeque<Frame>,
    disk_ops: VecDeque<DiskOp>,
    markers: VecDeque<MarkerArrival>,
    events: VecDeque<TargetEvent>,
    /// Hash requests being answered: read token → (job id, extent index).
    reads: BTreeMap<u64, (u64, usize)>,
    jobs: BTreeMap<u64, HashJob>,
    next_token: u64,
    next_job: u64,
}

impl Target {
    /// A target whose replica is durable up to `durable_seq` (persisted by the driver).
    pub fn new(durable_seq: Seq) -> Self {
        Self {
            phase: Phase::Idle,
            disks: BTreeMap::new(),
            welcome_disks: Vec::new(),
            received_seq: durable_seq,
            durable_seq,
            flush_requested_seq: durable_seq,
            ack_pending: false,
            gap_pending: false,
            gap_reported_at: None,
            transmit: VecDeque::new(),
            disk_ops: VecDeque::new(),
            markers: VecDeque::new(),
            events: VecDeque::new(),
            reads: BTreeMap::new(),
            jobs: BTreeMap::new(),
            next_token: 1,
            next_job: 1,
        }
    }

    /// Highest sequence accepted and handed to the driver as disk ops (the replica's state once
    /// those ops complete).
    pub fn received_seq(&self) -> Seq {
        self.received_seq
    }

    /// Highest sequence the driver reported durable (what the source has been told).
    pub fn durable_seq(&self) -> Seq {
        self.durable_seq
    }

    /// Whether a session is open (Hello answered).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    pub fn handle_connected(&mut self) {
        self.phase = Phase::AwaitingHello;
        self.transmit.clear();
        self.ack_pending = false;
        self.gap_pending = false;
        self.gap_reported_at = None;
    }

    pub fn handle_disconnected(&mut self) {
        self.phase = Phase::Idle;
        self.transmit.clear();
        self.ack_pending = false;
        self.gap_pending = false;
        // Reads already handed out still complete; their answers are no longer wanted.
        self.jobs.clear();
        self.reads.clear();
    }

    /// Answers the pending Hello: the driver says what it holds per disk.
    pub fn welcome(&mut self, disks: Vec<WelcomeDisk>) {
        if self.phase != Phase::AwaitingWelcome {
            return;
        }
        self.phase = Phase::Open;
        self.transmit
            .push_back(Frame::welcome(self.received_seq, self.durable_seq, &disks));
        self.welcome_disks = disks;
    }

    /// One complete frame from the source.
    pub fn handle_frame(&mut self, bytes: &[u8]) -> Result<(), TargetError> {
        self.handle_frame_in(bytes, None)
    }

    /// Like [`Target::handle_frame`], with the frame in a shared buffer: the payloads of the
    /// `DiskOp::Write`s it yields are slices of it, not copies.
    pub fn handle_frame_shared(&mut self, frame: &bytes::Bytes) -> Result<(), TargetError> {
        self.handle_frame_in(frame, Some(frame))
    }

    fn handle_frame_in(
        &mut self,
        bytes: &[u8],
        shared: Option<&bytes::Bytes>,
    ) -> Result<(), TargetError> {
        if matches!(self.phase, Phase::Idle | Phase::Closed) {
            return Ok(());
        }
        let result = wire::decode_frame(bytes)
            .map_err(TargetError::from)
            .and_then(|message| self.handle_message(message, shared));
        if let Err(error) = &result {
            self.phase = Phase::Closed;
            self.transmit.clear();
            if !matches!(error, TargetError::Peer { .. }) {
                self.transmit
                    .push_back(Frame::error(error.code(), &error.to_string()));
            }
        }
        result
    }

    /// `shared`: the buffer `message` was decoded from, when it is one.
    fn handle_message(
        &mut self,
        message: Message<'_>,
        shared: Option<&bytes::Bytes>,
    ) -> Result<(), TargetError> {
        match message {
            Message::Hello {
                source_name,
                journal_first_seq,
                journal_last_seq,
                disks,
                machines,
            } => {
                if self.phase != Phase::AwaitingHello {
                    // A resent or duplicated Hello: the Welcome may have been lost, so send it
                    // again (a source that already streams ignores it).
                    if self.phase == Phase::Open {
                        let welcome = Frame::welcome(
                            self.received_seq,
                            self.durable_seq,
                            &self.welcome_disks,
                        );
                        self.transmit.push_back(welcome);
                    }
                    return Ok(());
                }
                if self.durable_seq > journal_last_seq {
                    return Err(TargetError::TargetAhead {
                        durable_seq: self.durable_seq,
                        source_last_seq: journal_last_seq,
                    });
                }
                self.disks = disks
                    .iter()
                    .map(|disk| (disk.disk_id, disk.size_bytes))
                    .collect();
                self.phase = Phase::AwaitingWelcome;
                self.events.push_back(TargetEvent::Hello {
                    source_name,
                    journal_first_seq,
                    journal_last_seq,
                    disks,
                    machines,
                });
                Ok(())
            }
            Message::Records(records) => {
                if self.phase != Phase::Open {
                    // Records that overtook the Hello; the source resends them.
                    return Ok(());
                }
                let mut accepted = false;
                for record in records {
                    if record.seq <= self.received_seq {
                        self.ack_pending = true;
                        continue;
                    }
                    // A Skip stands for every number before it this target does not hold: the
                    // source gave them up (its journal restarted past them after its host went
                    // down, and it resyncs every disk), so the target continues from it.
                    let skips_here = record.kind == RecordKind::Skip;
                    if record.seq != self.received_seq + 1 && !skips_here {
                        if self.gap_reported_at != Some(self.received_seq) {
                            self.gap_reported_at = Some(self.received_seq);
                            self.gap_pending = true;
                        }
                        break;
                    }
                    let applies_to_disk =
                        !matches!(record.kind, RecordKind::Marker | RecordKind::Skip);
                    if applies_to_disk {
                        let size = self.disks.get(&record.disk_id).copied();
                        let end = record.offset.checked_add(record.length);
                        if !matches!((size, end), (Some(size), Some(end)) if end <= size) {
                            return Err(TargetError::OutOfRange {
                                seq: record.seq,
                                disk_id: record.disk_id,
                                offset: record.offset,
                                length: record.length,
                            });
                        }
                    }
                    match record.kind {
                        RecordKind::Write | RecordKind::ResyncExtent => {
                            self.disk_ops.push_back(DiskOp::Write {
                                seq: record.seq,
                                disk_id: record.disk_id,
                                offset: record.offset,
                                data: match shared {
                                    Some(frame) => frame.slice_ref(record.payload),
                                    None => bytes::Bytes::copy_from_slice(record.payload),
                                },
                            })
                        }
                        RecordKind::Zero | RecordKind::Trim => {
                            if record.length > 0 {
                                self.disk_ops.push_back(DiskOp::Zero {
                                    seq: record.seq,
                                    disk_id: record.disk_id,
                                    offset: record.offset,
                                    length: record.length,
                                })
                            }
                        }
                        // A sync extent whose payload the source lost in a restart: the
                        // source resyncs that extent; nothing to apply.
                        RecordKind::SyncRef | RecordKind::Skip => {}
                        RecordKind::Marker => {
                            self.disk_ops.push_back(DiskOp::Marker {
                                seq: record.seq,
                                payload: record.payload.to_vec(),
                            });
                            self.markers.push_back(MarkerArrival {
                                seq: record.seq,
                                disk_id: record.disk_id,
                                timestamp_ns: record.timestamp_ns,
                                payload: record.payload.to_vec(),
                            })
                        }
                    }
                    self.received_seq = record.seq;
                    self.gap_reported_at = None;
                    accepted = true;
                }
                if accepted && self.received_seq > self.flush_requested_seq {
                    self.flush_requested_seq = self.received_seq;
                    self.disk_ops.push_back(DiskOp::Flush {
                        seq: self.received_seq,
                    });
                }
                Ok(())
            }
            Message::HashRequest(request) => {
                if self.phase != Phase::Open {
                    return Ok(());
                }
                if self.jobs.len() >= 4 * SYNC_HASH_REQUESTS_IN_FLIGHT_MAX {
                    return Err(TargetError::Protocol(format!(
                        "more than {} hash requests outstanding",
                        4 * SYNC_HASH_REQUESTS_IN_FLIGHT_MAX
                    )));
                }
                let size = self.disks.get(&request.disk_id).copied().unwrap_or(0);
                if let Some(beyond) = request.wanted_offsets().find(|offset| *offset >= size) {
                    return Err(TargetError::OutOfRange {
                        seq: 0,
                        disk_id: request.disk_id,
                        offset: beyond,
                        length: u64::from(request.extent_bytes),
                    });
                }
                let job_id = self.next_job;
                self.next_job += 1;
                for (index, offset) in request.wanted_offsets().enumerate() {
                    let length = u64::from(request.extent_bytes).min(size - offset);
                    let token = self.next_token;
                    self.next_token += 1;
                    self.reads.insert(token, (job_id, index));
                    self.disk_ops.push_back(DiskOp::Read {
                        token,
                        disk_id: request.disk_id,
                        offset,
                        length,
                    });
                }
                let count = request.wanted.len();
                self.jobs.insert(
                    job_id,
                    HashJob {
                        request,
                        applied_seq: self.received_seq,
                        hashes: vec![None; count],
                    },
                );
                Ok(())
            }
            Message::Error { code, message } => Err(TargetError::Peer { code, message }),
            // Control-plane frames are routed by the session shells (`core::peer`), never here.
            Message::Control { .. } => Ok(()),
            Message::Welcome { .. } | Message::Ack { .. } | Message::HashResponse(_) => Err(
                TargetError::Protocol("the source sent a frame only a target sends".into()),
            ),
        }
    }

    /// The driver made every op up to `Flush { seq }` durable and persisted `seq`.
    pub fn handle_durable(&mut self, seq: Seq) {
        assert!(
            seq <= self.received_seq,
            "durable {seq} beyond received {}",
            self.received_seq
        );
        if seq > self.durable_seq {
            self.durable_seq = seq;
            self.ack_pending = true;
        }
    }

    /// The data of a `DiskOp::Read`.
    pub fn handle_read(&mut self, token: u64, data: &[u8]) {
        let Some((job_id, index)) = self.reads.remove(&token) else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let per_extent = wire::blocks_per_extent(job.request.extent_bytes, job.request.block_bytes);
        let mut hashes = Vec::with_capacity(per_extent);
        wire::block_hashes(data, job.request.block_bytes as usize, &mut hashes);
        // Blocks past the end of the disk (a short last extent) hash as 0.
        hashes.resize(per_extent, 0);
        job.hashes[index] = Some(hashes);
        if job.hashes.iter().all(Option::is_some) {
            let job = self.jobs.remove(&job_id).expect("job present");
            let hashes = job.hashes.into_iter().flatten().flatten().collect();
            if self.phase == Phase::Open {
                let request = job.request;
                self.transmit.push_back(Frame::hash_response(&HashResponse {
                    request_id: request.request_id,
                    disk_id: request.disk_id,
                    offset: request.offset,
                    applied_seq: job.applied_seq,
                    extent_bytes: request.extent_bytes,
                    extent_count: request.extent_count,
                    block_bytes: request.block_bytes,
                    wanted: request.wanted,
                    hashes,
                }));
            }
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        if let Some(frame) = self.transmit.pop_front() {
            return Some(frame);
        }
        if self.phase != Phase::Open || !(self.ack_pending || self.gap_pending) {
            return None;
        }
        let gap = self.gap_pending;
        self.ack_pending = false;
        self.gap_pending = false;
        Some(Frame::ack(self.durable_seq, self.received_seq, gap))
    }

    pub fn poll_disk_op(&mut self) -> Option<DiskOp> {
        self.disk_ops.pop_front()
    }

    pub fn poll_marker(&mut self) -> Option<MarkerArrival> {
        self.markers.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<TargetEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::Record;
    use crate::core::wire::ReplicaState;

    fn record(seq: Seq, kind: RecordKind, offset: u64, payload: &[u8]) -> Vec<u8> {
        Record {
            kind,
            disk_id: 1,
            seq,
            offset,
            length: if kind == RecordKind::Zero {
                512
            } else {
                payload.len() as u64
            },
            timestamp_ns: seq,
            payload,
        }
        .to_vec()
        .unwrap()
    }

    fn open_target(durable: Seq) -> Target {
        let mut target = Target::new(durable);
        target.handle_connected();
        let disks = [DiskAnnouncement {
            disk_id: 1,
            size_bytes: 8192,
            machine: "m".into(),
            name: "d".into(),
            group: "g".into(),
        }];
        target
            .handle_frame(Frame::hello("s", 1, 100, &disks, &[]).as_bytes())
            .unwrap();
        assert!(matches!(
            target.poll_event(),
            Some(TargetEvent::Hello { .. })
        ));
        target.welcome(vec![WelcomeDisk {
            disk_id: 1,
            replica: ReplicaState::Present,
            size_bytes: 8192,
        }]);
        match target.poll_transmit().unwrap().decode().unwrap() {
            Message::Welcome {
                resume_seq,
                durable_seq,
                ..
            } => {
                assert_eq!((resume_seq, durable_seq), (durable, durable))
            }
            other => panic!("{other:?}"),
        }
        target
    }

    fn drain_ops(target: &mut Target) -> Vec<DiskOp> {
        std::iter::from_fn(|| target.poll_disk_op()).collect()
    }

    fn ack_of(frame: Frame) -> (Seq, Seq, bool) {
        match frame.decode().unwrap() {
            Message::Ack {
                durable_seq,
                received_seq,
                gap,
            } => (durable_seq, received_seq, gap),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn accepts_in_order_and_acks_only_durable() {
        let mut target = open_target(0);
        let r1 = record(1, RecordKind::Write, 0, &[1; 16]);
        let r2 = record(2, RecordKind::Zero, 512, &[]);
        target
            .handle_frame(Frame::records([r1.as_slice(), r2.as_slice()]).as_bytes())
            .unwrap();
        let ops = drain_ops(&mut target);
        assert_eq!(ops.len(), 3);
        assert!(matches!(
            ops[0],
            DiskOp::Write {
                seq: 1,
                offset: 0,
                ..
            }
        ));
        assert!(matches!(
            ops[1],
            DiskOp::Zero {
                seq: 2,
                offset: 512,
                length: 512,
                ..
            }
        ));
        assert_eq!(ops[2], DiskOp::Flush { seq: 2 });
        assert!(
            target.poll_transmit().is_none(),
            "nothing durable yet, nothing acked"
        );
        target.handle_durable(2);
        assert_eq!(ack_of(target.poll_transmit().unwrap()), (2, 2, false));
    }

    #[test]
    fn duplicates_are_reacked_and_gaps_refused_once() {
        let mut target = open_target(3);
        let dup = record(2, RecordKind::Write, 0, &[1; 8]);
        target
            .handle_frame(Frame::records([dup.as_slice()]).as_bytes())
            .unwrap();
        assert!(drain_ops(&mut target).is_empty());
        assert_eq!(ack_of(target.poll_transmit().unwrap()), (3, 3, false));
        let ahead = record(6, RecordKind::Write, 0, &[1; 8]);
        target
            .handle_frame(Frame::records([ahead.as_slice()]).as_bytes())
            .unwrap();
        assert!(drain_ops(&mut target).is_empty());
        assert_eq!(ack_of(target.poll_transmit().unwrap()), (3, 3, true));
        target
            .handle_frame(Frame::records([ahead.as_slice()]).as_bytes())
            .unwrap();
        assert!(target.poll_transmit().is_none(), "one gap report per gap");
        let next = record(4, RecordKind::Write, 0, &[1; 8]);
        target
            .handle_frame(Frame::records([next.as_slice()]).as_bytes())
            .unwrap();
        assert_eq!(target.received_seq(), 4);
    }

    #[test]
    fn markers_pass_through_and_out_of_range_records_are_refused() {
        let mut target = open_target(0);
        let marker = Record {
            kind: RecordKind::Marker,
            disk_id: 0,
            seq: 1,
            offset: 0,
            length: 0,
            timestamp_ns: 77,
            payload: b"point-1",
        }
        .to_vec()
        .unwrap();
        target
            .handle_frame(Frame::records([marker.as_slice()]).as_bytes())
            .unwrap();
        let arrival = target.poll_marker().unwrap();
        assert_eq!((arrival.seq, arrival.timestamp_ns), (1, 77));
        assert_eq!(arrival.payload, b"point-1");
        assert_eq!(
            drain_ops(&mut target),
            vec![
                DiskOp::Marker {
                    seq: 1,
                    payload: b"point-1".to_vec()
                },
                DiskOp::Flush { seq: 1 }
            ],
            "the marker is an ordered op, flushed like any record"
        );
        let beyond = record(2, RecordKind::Write, 8190, &[1; 8]);
        let error = target.handle_frame(Frame::records([beyond.as_slice()]).as_bytes());
        assert!(matches!(error, Err(TargetError::OutOfRange { seq: 2, .. })));
        match target.poll_transmit().unwrap().decode().unwrap() {
            Message::Error { code, .. } => assert_eq!(code, ErrorCode::UnknownDisk),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hash_requests_are_answered_through_reads() {
        let mut target = open_target(0);
        let request = HashRequest {
            request_id: 9,
            disk_id: 1,
            offset: 1096,
            extent_bytes: 3000,
            extent_count: 3,
            block_bytes: 2048,
            wanted: vec![0, 2],
        };
        target
            .handle_frame(Frame::hash_request(&request).as_bytes())
            .unwrap();
        let ops = drain_ops(&mut target);
        // 8192-byte disk: wanted extents at 1096 (3000 bytes) and 7096 (1096 bytes, cut short).
        assert_eq!(ops.len(), 2);
        let mut lengths = Vec::new();
        for op in &ops {
            let DiskOp::Read {
                token,
                offset,
                length,
                ..
            } = op
            else {
                panic!("{op:?}")
            };
            lengths.push((*offset, *length));
            target.handle_read(*token, &vec![*offset as u8; *length as usize]);
        }
        assert_eq!(lengths, vec![(1096, 3000), (7096, 1096)]);
        match target.poll_transmit().unwrap().decode().unwrap() {
            Message::HashResponse(response) => {
                assert_eq!(response.request_id, 9);
                assert_eq!(response.wanted, vec![0, 2]);
                let first = [1096u64 as u8; 3000];
                let last = [7096u64 as u8; 1096];
                assert_eq!(
                    response.hashes,
                    vec![
                        wire::block_hash(&first[..2048]),
                        wire::block_hash(&first[2048..]),
                        wire::block_hash(&last),
                        0
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        // A wanted extent past the end of the disk is refused.
        let beyond = HashRequest {
            request_id: 10,
            wanted: vec![0, 3],
            extent_count: 4,
            ..request
        };
        assert!(matches!(
            target.handle_frame(Frame::hash_request(&beyond).as_bytes()),
            Err(TargetError::OutOfRange { offset: 10096, .. })
        ));
    }

    #[test]
    fn hello_hands_the_source_machines_settings_to_the_driver() {
        let mut target = Target::new(0);
        target.handle_connected();
        let machines = vec![MachineSettings {
            name: "m".into(),
            resource_group: Some("rg".into()),
            availability_set: None,
            nics: Vec::new(),
            test_network: None,
        }];
        target
            .handle_frame(Frame::hello("s", 1, 1, &[], &machines).as_bytes())
            .unwrap();
        match target.poll_event() {
            Some(TargetEvent::Hello { machines: got, .. }) => assert_eq!(got, machines),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_target_ahead_of_the_source_journal_is_an_error() {
        let mut target = Target::new(50);
        target.handle_connected();
        let error = target
            .handle_frame(Frame::hello("s", 1, 10, &[], &[]).as_bytes())
            .unwrap_err();
        assert!(matches!(
            error,
            TargetError::TargetAhead {
                durable_seq: 50,
                source_last_seq: 10
            }
        ));
    }

    #[test]
    fn another_protocol_version_is_answered_with_an_error() {
        let mut target = Target::new(0);
        target.handle_connected();
        let mut bytes = Frame::hello("s", 0, 0, &[], &[]).into_bytes();
        // A version 1 source (whole-extent hashes) is refused by name.
        bytes[4..6].copy_from_slice(&1u16.to_le_bytes());
        let error = target.handle_frame(&bytes).unwrap_err();
        assert!(error.to_string().contains("version 1"), "{error}");
        match target.poll_transmit().unwrap().decode().unwrap() {
            Message::Error { code, .. } => assert_eq!(code, ErrorCode::Version),
            other => panic!("{other:?}"),
        }
    }
}
