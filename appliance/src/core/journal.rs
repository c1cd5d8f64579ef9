//! The cache journal's ring logic: records appended in sequence order into a ring of fixed-size
//! segments, flushed (made durable) up to a sequence, released when the target acknowledged
//! them, and recovered after a crash by scanning and verifying every segment.
//!
//! The bytes live in a [`SegmentStore`]: memory-mapped, preallocated files in the daemon
//! (`io::mmap_journal`), plain memory with crash and tear injection in the simulator
//! (`core::journal_mem`). This module only sees byte slices, so it is sans-IO and deterministic.
//!
//! # Layout
//!
//! Every segment starts with a [`SegmentHeader`] (magic, version, ring geometry, the sequence
//! number of its first record, the release floor when it was started, the checksum of the record
//! before it, and its own checksum), followed by records packed back to back (64-byte header,
//! payload, zero padding to 8 bytes). A record never spans segments. Segments are used in ring
//! order `0, 1, …, n-1, 0, …`; a segment is rewritten (new header, new records) only when every
//! record in it has been released.
//!
//! Each record carries the checksum of the record before it (`RecordHeader::prev_checksum`), and
//! a segment header carries the checksum of the last record before the segment. The log is
//! therefore a hash chain: a record left behind by an earlier lap of a reused segment, or written
//! before a crash and dropped when the journal reopened, cannot be taken for the continuation of
//! the log even when its sequence number and its position happen to fit — which they do, for a
//! workload of equal-sized writes, after every crash.
//!
//! # Durability rules (what recovery relies on)
//!
//! 1. `flush(upto)` makes every byte of every held record `<= upto` durable, headers of their
//!    segments included, before `durable_seq` moves.
//! 2. A new segment's header is final only once every record before its first sequence is
//!    durable: at once when they are; otherwise it is written marked provisional, and the flush
//!    that makes them durable rewrites it final and then goes on into the new segment in a
//!    second round. Appends never flush the log (at most one page, see
//!    `secure_newest_header`). So a valid final segment header with first sequence `F`
//!    proves that all records `< F` are durable: a gap before a final header can only come from
//!    a stale segment, never from lost flushed data, and a provisional segment after a gap never
//!    held a durable record.
//! 3. `release` is clamped to `durable_seq`: a record is never given up (its segment never
//!    reused) before it is durable, even if the target acknowledged it first. A source that
//!    ships under a sequence floor (`core::source`) uses `release_acknowledged` instead: a
//!    record the target holds durably counts as durable here and is never flushed. The rules
//!    above then hold for a process that dies (the page cache has every byte) but not for a
//!    machine that goes down: recovery may find the log's chain broken where acknowledged
//!    records never reached the device, and the daemon gives the recovered journal up
//!    (`restart_at`) instead of trusting it.
//! 4. After a failed flush the journal is poisoned: every later `append` and `flush` fails until
//!    the journal is reopened (the kernel may already have dropped the dirty pages and may not
//!    report the error twice — "fsyncgate"; see kernel-notes/mmap-msync.md).
//!
//! # Recovery
//!
//! `open` reads every segment header, scans each validly headed segment from its first sequence
//! along the hash chain, orders segments by first sequence and joins neighbours whose sequence
//! numbers, chain links and ring positions continue. A segment under a provisional header (rule
//! 2) is kept only where it continues its neighbour, and dropped (zeroed) otherwise; a kept one
//! has its header rewritten final as the log is made durable. The log is the last (newest) such run: with
//! rule 2, an earlier run can only be a segment whose reuse was interrupted (its records were all
//! released). In the newest segment, whatever follows the last valid record is the torn tail: it
//! is measured, reported in [`RecoveryReport`], and zeroed so that a later reopen does not report
//! it again. Everything recovered is then flushed, so after `open` `durable_seq == last_seq`.
//!
//! Sequence numbers start at 1 and only go up: the next sequence is the one after the last
//! record found, or the first sequence of the newest segment header when that segment holds no
//! record yet, so a journal whose records were all released reopens at the right sequence.
//! Releases are persisted only coarsely (the release floor in each new segment header): after a
//! reopen, records released since the newest segment was started are held again. The target
//! treats them as duplicates; the source releases them again on its first acknowledgement.
//!
//! # Concurrency (what the daemon should do)
//!
//! `Journal` is a plain single-owner structure; the daemon keeps it behind one mutex. Appends are
//! a memcpy plus two xxh3 passes, short enough to hold the lock. The msync (~0.6 ms) should not
//! hold it, so flushing is split in two phases:
//!
//! ```text
//! let plan = journal.lock().begin_flush(upto)?;          // cheap: computes dirty ranges
//! let result = plan.execute_with(|s, off, len| flusher.flush_range(s, off, len)); // no lock
//! let durable = journal.lock().finish_flush(plan, result)?; // advances durable_seq
//! ```
//!
//! `flusher` is a handle onto the same mappings that is usable without the journal
//! (`io::mmap_journal::MmapFlusher`). Group commit falls out of it: one flusher task takes
//! `begin_flush(last_seq())` for every FLUSH/FUA request that arrived while the previous msync
//! ran, and wakes every waiter whose sequence is `<= durable_seq()` afterwards. Concurrent plans
//! are allowed (they may overlap); `durable_seq` only moves forward. `flush(upto)` runs all three
//! steps under `&mut self` for callers that do not care (tests, the simulator).
//!
//! Records beyond `durable_seq` may vanish in a crash. The shipper should send only records
//! `<= durable_seq()`, or the target could hold a record that the source later reuses the
//! sequence number of.

use std::collections::VecDeque;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::core::record::{
    decode, decode_linked, encoded_len_for_payload, Record, RecordError, RecordHeader, RecordKind,
    Seq, RECORD_MAGIC,
};
use crate::limits::{
    RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES, RECORD_PAYLOAD_BYTES_MAX, SEGMENT_COUNT_MIN,
    SEGMENT_HEADER_BYTES,
};

/// "FJS1" little-endian: the first bytes of every journal segment.
pub const SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"FJS1");
/// Format version of the segment header and of the segment layout behind it.
pub const SEGMENT_VERSION: u16 = 1;
/// `SegmentHeader::flags`: written while records before `first_seq` were not all durable
/// (rule 2). Recovery keeps such a segment only where it continues the log; the header is
/// rewritten without the flag once they are.
pub const SEGMENT_FLAG_PROVISIONAL: u16 = 1;
const SEGMENT_FLAGS_KNOWN: u16 = SEGMENT_FLAG_PROVISIONAL;

/// Where a journal's bytes live. Implementations: `io::mmap_journal::MmapSegments` (files) and
/// `core::journal_mem::MemSegments` (memory, with crash injection).
pub trait SegmentStore {
    /// Number of segments in the ring (fixed for the life of the journal).
    fn segment_count(&self) -> usize;
    /// Size in bytes of every segment (fixed).
    fn segment_bytes(&self) -> usize;
    /// The bytes of segment `index`.
    fn segment(&self, index: usize) -> &[u8];
    /// The bytes of segment `index`, for writing.
    fn segment_mut(&mut self, index: usize) -> &mut [u8];
    /// Writes `parts` back to back into segment `index` from `offset` (the journal appends
    /// records this way). The default copies into `segment_mut`; a file store may write with
    /// `pwritev` instead, which avoids a write fault per page of a mapping whose pages a flush
    /// cleaned. Afterwards `segment(index)` must show the bytes. The bytes after the parts are
    /// free space (the journal only appends), so a store may also zero them up to a page
    /// boundary.
    fn write_parts(
        &mut self,
        index: usize,
        offset: usize,
        parts: &[&[u8]],
    ) -> Result<(), StoreError> {
        let mut at = offset;
        let segment = self.segment_mut(index);
        for part in parts {
            segment[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        Ok(())
    }
    /// Makes bytes `[offset, offset + len)` of segment `index` durable. Takes `&self` so that a
    /// store can let it run while appends continue elsewhere (msync does not touch the bytes).
    fn flush_range(&self, index: usize, offset: usize, len: usize) -> Result<(), StoreError>;
}

/// A failure of the store underneath the journal.
#[derive(Clone, Debug, thiserror::Error)]
#[error("journal store: {operation} of segment {segment} failed: {message}")]
pub struct StoreError {
    pub operation: &'static str,
    pub segment: usize,
    pub message: String,
}

/// What to append: a record without its sequence number (the journal assigns it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordSpec<'a> {
    pub kind: RecordKind,
    pub disk_id: u32,
    pub offset: u64,
    pub length: u64,
    pub timestamp_ns: u64,
    pub payload: &'a [u8],
}

impl RecordSpec<'static> {
    /// The [`RecordKind::Skip`] that starts a restarted log (`Journal::restart_at`).
    pub const SKIP: RecordSpec<'static> = RecordSpec {
        kind: RecordKind::Skip,
        disk_id: 0,
        offset: 0,
        length: 0,
        timestamp_ns: 0,
        payload: &[],
    };
}

/// Errors the journal returns.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Not enough free space for this record until older records are released. Callers fall
    /// back to the dirty-extent bitmap; nothing unacknowledged is ever overwritten.
    #[error("journal full: record needs {needed_bytes} bytes, {free_bytes} free")]
    Full {
        needed_bytes: usize,
        free_bytes: usize,
    },
    /// The record can never fit: it is larger than an empty segment.
    #[error("record of {needed_bytes} bytes does not fit a journal segment ({segment_room_bytes} bytes of room)")]
    RecordTooLarge {
        needed_bytes: usize,
        segment_room_bytes: usize,
    },
    #[error("invalid record: {0}")]
    Record(#[from] RecordError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("journal layout invalid: {0}")]
    Layout(String),
    /// A record failed verification: on read (never handed out), or right after it was written
    /// (not appended).
    #[error("journal record seq {seq} at segment {segment} offset {offset} is corrupt: {reason}")]
    Corrupt {
        seq: Seq,
        segment: usize,
        offset: usize,
        reason: String,
    },
    /// An earlier flush failed; nothing can be trusted to become durable until a reopen.
    #[error("journal unusable after a failed flush ({reason}); reopen it")]
    Poisoned { reason: String },
}

/// What `open` found and what it dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Records kept, and the sequence range they cover (`first_seq..=last_seq`, empty when 0).
    pub records_kept: u64,
    pub first_seq: Seq,
    pub last_seq: Seq,
    /// The sequence number the next append gets.
    pub next_seq: Seq,
    /// Bytes after the last valid record that were discarded (torn tail, garbage).
    pub bytes_dropped: u64,
    /// Human-readable reason for the first dropped byte, if any ("checksum mismatch at …").
    pub drop_reason: Option<String>,
}

/// Space accounting reported in status. `capacity_bytes` is what records can occupy (segment
/// headers excluded); `free_bytes` is the room left in the current segment plus every reusable
/// segment; `used_bytes` is the rest (held records, and released records sharing a segment with
/// held ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalUsage {
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub capacity_bytes: u64,
}

/// The 64-byte header at the start of every segment. Unaligned little-endian fields so that it
/// can be read from any buffer.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SegmentHeader {
    pub magic: U32,
    pub version: U16,
    pub flags: U16,
    /// Position of this segment in the ring; a renamed or swapped file is refused.
    pub segment_index: U32,
    pub segment_count: U32,
    pub segment_bytes: U64,
    /// Sequence number of the first record written into this segment (the journal's next
    /// sequence when the segment was started, so it survives even if no record does).
    pub first_seq: U64,
    /// Every record `<= released_seq` had been released when this segment was started.
    pub released_seq: U64,
    /// Checksum of record `first_seq - 1` (0 for the very first segment).
    pub prev_checksum: U64,
    /// xxh3-64 of the header with this field zero.
    pub checksum: U64,
    pub reserved: U64,
}

const _: () = assert!(core::mem::size_of::<SegmentHeader>() == SEGMENT_HEADER_BYTES);

impl SegmentHeader {
    fn new(
        segment_index: usize,
        segment_count: usize,
        segment_bytes: usize,
        first_seq: Seq,
        released_seq: Seq,
        prev_checksum: u64,
    ) -> Self {
        let mut header = SegmentHeader {
            magic: SEGMENT_MAGIC.into(),
            version: SEGMENT_VERSION.into(),
            flags: 0.into(),
            segment_index: (segment_index as u32).into(),
            segment_count: (segment_count as u32).into(),
            segment_bytes: (segment_bytes as u64).into(),
            first_seq: first_seq.into(),
            released_seq: released_seq.into(),
            prev_checksum: prev_checksum.into(),
            checksum: 0.into(),
            reserved: 0.into(),
        };
        header.checksum = header.compute_checksum().into();
        header
    }

    /// The same header marked provisional (rule 2) or final, checksummed again.
    fn with_provisional(mut self, provisional: bool) -> Self {
        let flags = self.flags.get() & !SEGMENT_FLAG_PROVISIONAL;
        self.flags = (flags
            | if provisional {
                SEGMENT_FLAG_PROVISIONAL
            } else {
                0
            })
        .into();
        self.checksum = self.compute_checksum().into();
        self
    }

    fn is_provisional(&self) -> bool {
        self.flags.get() & SEGMENT_FLAG_PROVISIONAL != 0
    }

    fn compute_checksum(&self) -> u64 {
        let mut zeroed = *self;
        zeroed.checksum = 0.into();
        twox_hash::XxHash3_64::oneshot(zeroed.as_bytes())
    }
}

/// What the first bytes of a segment say.
enum HeaderState {
    /// All zero: never used.
    Blank,
    /// Not a valid header (torn); the reason.
    Invalid(String),
    /// A valid header of a format this build does not speak: refuse rather than overwrite.
    Unsupported(String),
    Valid(SegmentHeader),
}

fn parse_header(bytes: &[u8]) -> HeaderState {
    let Some(prefix) = bytes.get(..SEGMENT_HEADER_BYTES) else {
        return HeaderState::Invalid(format!(
            "segment shorter than its header ({} bytes)",
            bytes.len()
        ));
    };
    if prefix.iter().all(|byte| *byte == 0) {
        return HeaderState::Blank;
    }
    let Ok((header, _)) = SegmentHeader::read_from_prefix(prefix) else {
        return HeaderState::Invalid("unreadable header".to_owned());
    };
    if header.magic.get() != SEGMENT_MAGIC {
        return HeaderState::Invalid(format!("bad segment magic {:#010x}", header.magic.get()));
    }
    if header.checksum.get() != header.compute_checksum() {
        return HeaderState::Invalid("segment header checksum mismatch".to_owned());
    }
    if header.version.get() != SEGMENT_VERSION {
        return HeaderState::Unsupported(format!(
            "segment format version {} is not supported (this build speaks {SEGMENT_VERSION})",
            header.version.get()
        ));
    }
    if header.flags.get() & !SEGMENT_FLAGS_KNOWN != 0 {
        return HeaderState::Unsupported(format!(
            "segment flags {:#06x} are not supported (this build knows {SEGMENT_FLAGS_KNOWN:#06x})",
            header.flags.get()
        ));
    }
    if header.first_seq.get() == 0 {
        return HeaderState::Invalid("segment header with first seq 0".to_owned());
    }
    HeaderState::Valid(header)
}

/// A segment that holds records (or is the one being written), in ring order.
#[derive(Debug)]
struct LiveSegment {
    index: usize,
    /// Sequence number of `offsets[0]` (the header's first seq).
    first_seq: Seq,
    /// Byte offset of every record in this segment, in sequence order: the O(1) index.
    offsets: Vec<u32>,
    /// Where the next record goes.
    end: usize,
    /// Bytes `[0, flushed_end)` are durable.
    flushed_end: usize,
    /// This segment's final header, while the store holds it marked provisional because
    /// records before `first_seq` were not all durable when the segment was started (rule 2).
    /// Written by the flush that makes them durable; until then no record of this segment is
    /// durable.
    pending_header: Option<SegmentHeader>,
}

impl LiveSegment {
    /// One past the last sequence in this segment.
    fn seq_end(&self) -> Seq {
        self.first_seq + self.offsets.len() as Seq
    }
}

/// One range to make durable; part of a [`FlushPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushRange {
    pub segment: usize,
    pub offset: usize,
    pub len: usize,
    /// Identifies which use of the segment the range belongs to (it may be reused meanwhile).
    segment_first_seq: Seq,
}

/// The first phase of a flush: the byte ranges that must become durable so that every record
/// `<= upto()` is. Execute it (without holding the journal) and hand it back to
/// [`Journal::finish_flush`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushPlan {
    upto: Seq,
    ranges: Vec<FlushRange>,
}

impl FlushPlan {
    /// Every record up to this sequence is durable once the plan has run.
    pub fn upto(&self) -> Seq {
        self.upto
    }
    pub fn ranges(&self) -> &[FlushRange] {
        &self.ranges
    }
    /// True when nothing needs to be written (everything up to `upto` is already durable).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
    /// Runs the plan through a flush function `(segment, offset, len)`, stopping at the first
    /// failure.
    pub fn execute_with(
        &self,
        mut flush_range: impl FnMut(usize, usize, usize) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for range in &self.ranges {
            flush_range(range.segment, range.offset, range.len)?;
        }
        Ok(())
    }
    /// Runs the plan against a store.
    pub fn execute<S: SegmentStore + ?Sized>(&self, store: &S) -> Result<(), StoreError> {
        self.execute_with(|segment, offset, len| store.flush_range(segment, offset, len))
    }
}

/// The journal ring over a store.
pub struct Journal<S: SegmentStore> {
    store: S,
    segment_count: usize,
    segment_bytes: usize,
    /// Segments holding records, oldest first, in ring order; the back one is the head (where
    /// appends go). Never longer than `segment_count`.
    segments: VecDeque<LiveSegment>,
    /// Offset vectors of freed segments, kept so that the index allocates only while it grows.
    spare_offsets: Vec<Vec<u32>>,
    /// Sequence number of the next append.
    next_seq: Seq,
    /// Every record `<= released_seq` is released; held records are `released_seq + 1 ..
    /// next_seq`.
    released_seq: Seq,
    /// The highest release asked for; applied up to `durable_seq` (rule 3).
    release_requested: Seq,
    durable_seq: Seq,
    /// Checksum of record `next_seq - 1`, the link of the next record.
    last_checksum: u64,
    poisoned: Option<String>,
}

impl<S: SegmentStore> std::fmt::Debug for Journal<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("segment_count", &self.segment_count)
            .field("segment_bytes", &self.segment_bytes)
            .field("first_seq", &self.first_seq())
            .field("last_seq", &self.last_seq())
            .field("durable_seq", &self.durable_seq)
            .field("usage", &self.usage())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl<S: SegmentStore> Journal<S> {
    /// Opens the journal in `store`: recovers the log after a crash (see the module docs),
    /// reports what it kept and dropped, and makes everything kept durable. A blank store opens
    /// as an empty journal starting at sequence 1.
    pub fn open(mut store: S) -> Result<(Self, RecoveryReport), JournalError> {
        let segment_count = store.segment_count();
        let segment_bytes = store.segment_bytes();
        check_geometry(&store)?;

        let mut candidates = Vec::new();
        let mut invalid_headers = Vec::new();
        for index in 0..segment_count {
            let bytes = store.segment(index);
            match parse_header(bytes) {
                HeaderState::Blank => {}
                HeaderState::Invalid(reason) => invalid_headers.push((index, reason)),
                HeaderState::Unsupported(reason) => {
                    return Err(JournalError::Layout(format!("segment {index}: {reason}")))
                }
                HeaderState::Valid(header) => {
                    check_header_geometry(&header, index, segment_count, segment_bytes)?;
                    candidates.push(scan_segment(index, bytes, &header));
                }
            }
        }
        candidates.sort_by_key(|candidate| (candidate.first_seq, candidate.index));
        // A provisional header was written before the records ahead of it were durable (rule
        // 2): its segment counts only where it continues the segment before it. Otherwise those
        // records were lost, so none of its own was ever durable (a flush makes the header final
        // before it claims any of them): it is dropped, header and records.
        let mut dropped_provisional = Vec::new();
        let mut kept: Vec<ScannedSegment> = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            let continued = kept
                .last()
                .is_some_and(|before| continues(before, &candidate, segment_count));
            if candidate.provisional_header.is_some() && !continued {
                dropped_provisional.push((candidate.index, candidate.end));
            } else {
                kept.push(candidate);
            }
        }
        let mut candidates = kept;
        let mut run_start = 0;
        for k in 1..candidates.len() {
            if !continues(&candidates[k - 1], &candidates[k], segment_count) {
                run_start = k;
            }
        }
        let chain: Vec<ScannedSegment> = candidates.drain(run_start..).collect();

        let mut report = RecoveryReport::default();
        let next_seq = chain.last().map_or(1, ScannedSegment::seq_end);
        let mut zero_ranges = Vec::new();
        if let Some(head) = chain.last() {
            let tail = torn_tail(store.segment(head.index), head.end, next_seq);
            if tail.bytes > 0 {
                report.bytes_dropped += tail.bytes as u64;
                report.drop_reason = tail
                    .reason
                    .map(|reason| format!("segment {}: {reason}", head.index));
                zero_ranges.push((head.index, head.end, tail.bytes));
            }
        }
        // Outside the log, the only place a record written before the crash can hide is the
        // first slot of the segment the writer was starting (rule 2), under a header that was
        // lost, torn or still says an older lap. Such a record may link to the last kept record,
        // so if a later run appended there and lost its own record in a second crash, the old
        // one would read as the continuation. Erase whatever there claims a sequence from
        // `next_seq` on (records of older laps stop the measurement).
        let mut in_chain = vec![false; segment_count];
        for segment in &chain {
            in_chain[segment.index] = true;
        }
        for &(index, end) in &dropped_provisional {
            report.bytes_dropped += end as u64;
            if report.drop_reason.is_none() {
                report.drop_reason = Some(format!(
                    "segment {index}: its provisional header does not continue the log (the \
                     records before it were lost), so none of its records was durable"
                ));
            }
            zero_ranges.push((index, 0, end));
            in_chain[index] = true; // handled: not measured again below
        }
        for index in (0..segment_count).filter(|index| !in_chain[*index]) {
            let torn_header = invalid_headers
                .iter()
                .find(|(invalid, _)| *invalid == index)
                .map(|(_, reason)| reason.clone());
            let tail = torn_tail(store.segment(index), SEGMENT_HEADER_BYTES, next_seq);
            let (start, reason) = match torn_header {
                Some(reason) => (0, Some(reason)),
                None if tail.bytes > 0 => (SEGMENT_HEADER_BYTES, tail.reason),
                None => continue,
            };
            let len = SEGMENT_HEADER_BYTES + tail.bytes - start;
            report.bytes_dropped += len as u64;
            if report.drop_reason.is_none() {
                report.drop_reason = reason.map(|reason| format!("segment {index}: {reason}"));
            }
            zero_ranges.push((index, start, len));
        }
        for &(index, offset, len) in &zero_ranges {
            store.segment_mut(index)[offset..offset + len].fill(0);
        }

        let chain_first_seq = chain.first().map_or(1, |segment| segment.first_seq);
        let release_floor = chain
            .iter()
            .map(|segment| segment.released_seq)
            .max()
            .unwrap_or(0);
        let released_seq = release_floor.max(chain_first_seq - 1).min(next_seq - 1);
        let last_checksum = chain.last().map_or(0, |segment| segment.last_checksum);
        let segments: VecDeque<LiveSegment> = chain
            .into_iter()
            .map(|scanned| LiveSegment {
                index: scanned.index,
                first_seq: scanned.first_seq,
                offsets: scanned.offsets,
                end: scanned.end,
                flushed_end: 0,
                pending_header: scanned
                    .provisional_header
                    .map(|header| header.with_provisional(false)),
            })
            .collect();

        let mut journal = Journal {
            store,
            segment_count,
            segment_bytes,
            segments,
            spare_offsets: Vec::new(),
            next_seq,
            released_seq,
            release_requested: released_seq,
            durable_seq: 0,
            last_checksum,
            poisoned: None,
        };
        // What was read may still sit only in the page cache (the process died, the machine did
        // not): make it durable before claiming it is, and make the zeroed tail durable so that
        // it is not reported again.
        // In log order, so that no final header is durable before the records ahead of it. A
        // provisional header in the log continues it: it becomes final as everything is made
        // durable.
        for segment in journal.segments.iter_mut() {
            if let Some(header) = segment.pending_header.take() {
                journal.store.segment_mut(segment.index)[..SEGMENT_HEADER_BYTES]
                    .copy_from_slice(header.as_bytes());
            }
            journal.store.flush_range(segment.index, 0, segment.end)?;
            segment.flushed_end = segment.end;
        }
        for &(index, offset, len) in &zero_ranges {
            journal.store.flush_range(index, offset, len)?;
        }
        journal.durable_seq = next_seq - 1;
        journal.reclaim();

        report.next_seq = next_seq;
        report.records_kept = journal.held_records();
        if report.records_kept > 0 {
            report.first_seq = journal.released_seq + 1;
            report.last_seq = next_seq - 1;
        }
        Ok((journal, report))
    }

    /// Appends a record, assigning the next sequence number; never blocks and never overwrites
    /// a held record: `Full` when there is no room until older records are released. The
    /// record's header and padding are checked right after it is written (its payload by its
    /// checksum, on every read). Once per segment it first makes everything before
    /// it durable (see the module docs), which costs one flush.
    pub fn append(&mut self, spec: &RecordSpec<'_>) -> Result<Seq, JournalError> {
        self.check_healthy()?;
        let record = Record {
            kind: spec.kind,
            disk_id: spec.disk_id,
            seq: self.next_seq,
            offset: spec.offset,
            length: spec.length,
            timestamp_ns: spec.timestamp_ns,
            payload: spec.payload,
        };
        record.validate()?;
        let needed_bytes = record.encoded_len();
        let segment_room_bytes = self.segment_bytes - SEGMENT_HEADER_BYTES;
        if needed_bytes > segment_room_bytes {
            return Err(JournalError::RecordTooLarge {
                needed_bytes,
                segment_room_bytes,
            });
        }
        let fits = self
            .segments
            .back()
            .is_some_and(|head| head.end + needed_bytes <= self.segment_bytes);
        if !fits {
            self.start_segment(needed_bytes)?;
        }
        let Journal {
            store, segments, ..
        } = self;
        let head = segments
            .back_mut()
            .expect("a head segment exists after start_segment");
        let offset = head.end;
        let (header, record_checksum) = record.linked_header(self.last_checksum)?;
        let padding = [0u8; RECORD_ALIGN_BYTES];
        let padding = &padding[..needed_bytes - RECORD_HEADER_BYTES - record.payload.len()];
        // A failed write leaves the bytes after the last record undefined, as a torn tail is;
        // nothing was appended and the next append writes over them.
        store.write_parts(head.index, offset, &[&header, record.payload, padding])?;
        // The record's framing is checked right after the write, from what the store now
        // holds: its header and its padding must be exactly the bytes written, which catches
        // a store that wrote elsewhere, short or not at all. The payload is not compared: the
        // copy the store just made from the same bytes could only differ through a fault that
        // could as well strike a moment later, and what guards against those is the checksum,
        // verified on every read (a record that fails it is never handed out). Comparing the
        // payload too cost a second pass over both copies, ~12% of the capture path's CPU for
        // 1 MiB writes (benches/RESULTS.md, 2026-11-29); a second xxh3 pass cost ~15%.
        let stored = &store.segment(head.index)[offset..offset + needed_bytes];
        let (stored_header, rest) = stored.split_at(RECORD_HEADER_BYTES);
        let stored_padding = &rest[record.payload.len()..];
        if stored_header != header.as_slice() || stored_padding != padding {
            return Err(JournalError::Corrupt {
                seq: record.seq,
                segment: head.index,
                offset,
                reason:
                    "right after the write, the store does not hold the record's header and padding"
                        .into(),
            });
        }
        debug_assert!(decode_linked(stored).is_ok_and(|(decoded, links, used)| {
            used == needed_bytes && decoded.seq == record.seq && links.checksum == record_checksum
        }));
        head.offsets
            .push(u32::try_from(offset).expect("segment size checked at open"));
        head.end += needed_bytes;
        self.last_checksum = record_checksum;
        self.next_seq += 1;
        Ok(record.seq)
    }

    /// Makes every record `<= upto` durable (clamped to `last_seq`) and returns the new
    /// `durable_seq`. Holds `&mut self` across the store flush; the daemon uses
    /// `begin_flush`/`finish_flush` to flush without holding its lock.
    pub fn flush(&mut self, upto: Seq) -> Result<Seq, JournalError> {
        let upto = upto.min(self.last_seq());
        // Terminates: a round that stops short of `upto` stopped before the first provisional
        // segment at or below it, and finishing that round makes its header final (rule 2), so
        // each round leaves one such segment fewer.
        loop {
            let plan = self.begin_flush(upto)?;
            let result = plan.execute(&self.store);
            let durable = self.finish_flush(plan, result)?;
            if durable >= upto {
                return Ok(durable);
            }
        }
    }

    /// True when a segment holding records `<= upto` still waits for its final header.
    #[cfg(test)]
    fn header_pending_upto(&self, upto: Seq) -> bool {
        self.segments
            .iter()
            .any(|segment| segment.pending_header.is_some() && segment.first_seq <= upto)
    }

    /// First phase of a flush: the ranges to make durable so that every record `<= upto`
    /// (clamped to `last_seq`) is. Does not change the journal. A plan stops before the first
    /// segment whose header is still pending (rule 2): its `upto` is then lower, the header is
    /// written by `finish_flush`, and the next plan goes on from there (`flush` loops; so does
    /// the daemon's group commit).
    pub fn begin_flush(&self, upto: Seq) -> Result<FlushPlan, JournalError> {
        self.check_healthy()?;
        let mut upto = upto.min(self.last_seq());
        if let Some(pending) = self
            .segments
            .iter()
            .find(|segment| segment.pending_header.is_some())
        {
            upto = upto.min(pending.first_seq - 1);
        }
        let mut ranges = Vec::new();
        if upto > self.durable_seq {
            for segment in &self.segments {
                if segment.first_seq > upto {
                    break;
                }
                let target_end = if segment.seq_end() <= upto + 1 {
                    segment.end
                } else {
                    segment.offsets[(upto + 1 - segment.first_seq) as usize] as usize
                };
                if segment.flushed_end < target_end {
                    ranges.push(FlushRange {
                        segment: segment.index,
                        offset: segment.flushed_end,
                        len: target_end - segment.flushed_end,
                        segment_first_seq: segment.first_seq,
                    });
                }
            }
        }
        Ok(FlushPlan {
            upto: upto.max(self.durable_seq),
            ranges,
        })
    }

    /// Second phase of a flush: given the plan and the result of executing it, advances
    /// `durable_seq` (and applies releases waiting for it) or poisons the journal on failure.
    /// Returns the new `durable_seq`.
    pub fn finish_flush(
        &mut self,
        plan: FlushPlan,
        result: Result<(), StoreError>,
    ) -> Result<Seq, JournalError> {
        if let Err(error) = result {
            self.poisoned.get_or_insert_with(|| error.to_string());
            return Err(JournalError::Store(error));
        }
        // Another flush may have failed while this one ran; its failure may have cleaned pages
        // this one counted on.
        self.check_healthy()?;
        for range in &plan.ranges {
            let reached = range.offset + range.len;
            if let Some(segment) = self.segments.iter_mut().find(|segment| {
                segment.index == range.segment && segment.first_seq == range.segment_first_seq
            }) {
                segment.flushed_end = segment.flushed_end.max(reached);
            }
        }
        self.durable_seq = self.durable_seq.max(plan.upto);
        self.write_due_headers();
        self.apply_release();
        Ok(self.durable_seq)
    }

    /// Releases every record `<= upto` (acknowledged by the target). Space is given back only
    /// for records that are durable here, and in whole segments; `upto` beyond `durable_seq` is
    /// remembered and applied by the flush that reaches it.
    pub fn release(&mut self, upto: Seq) {
        self.release_requested = self.release_requested.max(upto.min(self.last_seq()));
        self.apply_release();
    }

    /// Releases every record `<= upto` that the target acknowledged *durable*, counting them
    /// as durable here too: their space is given back at once, and no later flush writes their
    /// bytes. For a source that ships records before they are durable (`core::source`,
    /// "Sequence floor"): such a record may never reach this store's device, and must not
    /// have to — a record the target holds durably is safe, and a machine that goes down
    /// restarts the journal past every sequence it could have shipped (`restart_at`) and
    /// resyncs its disks. (`release` keeps rule 3 for a source that ships only durable
    /// records.)
    pub fn release_acknowledged(&mut self, upto: Seq) {
        let upto = upto.min(self.last_seq());
        if upto > self.durable_seq {
            self.durable_seq = upto;
            // Their bytes need no flush: the next flush starts after them. A segment whose
            // header is still unwritten keeps `flushed_end` at 0, so its header is flushed
            // with the records after them.
            for segment in self.segments.iter_mut() {
                if segment.first_seq > upto {
                    break;
                }
                if segment.flushed_end >= SEGMENT_HEADER_BYTES {
                    let end = if segment.seq_end() <= upto + 1 {
                        segment.end
                    } else {
                        segment.offsets[(upto + 1 - segment.first_seq) as usize] as usize
                    };
                    segment.flushed_end = segment.flushed_end.max(end);
                }
            }
            self.write_due_headers();
        }
        self.release(upto);
    }

    /// Gives up every held record and every sequence number below `next`, and starts the log
    /// again at `next` with a [`RecordKind::Skip`] record (made durable before this returns)
    /// that stands for them. After the machine went down under a source
    /// that ships records before they are durable: the target may hold records under
    /// sequence numbers this journal lost, so no number up to the persisted sequence floor
    /// may be used again; the source resyncs every disk, which covers the records dropped
    /// here. A reopen finds the log from `next` on (the older segments are an earlier run).
    pub fn restart_at(&mut self, next: Seq) -> Result<Seq, JournalError> {
        self.check_healthy()?;
        if next <= self.last_seq() {
            return Err(JournalError::Layout(format!(
                "cannot restart the log at sequence {next}: it already reached {}",
                self.last_seq()
            )));
        }
        while let Some(freed) = self.segments.pop_front() {
            self.spare_offsets.push(freed.offsets);
        }
        self.next_seq = next;
        self.released_seq = next - 1;
        self.release_requested = next - 1;
        // Nothing before `next` is held, so nothing before it waits to become durable: the
        // new segment's header is final at once (rule 2).
        self.durable_seq = next - 1;
        let seq = self.append(&RecordSpec::SKIP)?;
        self.flush(seq)?;
        Ok(seq)
    }

    /// The held record `seq`, verified; `None` when it is not held (released or not appended)
    /// or fails verification (see [`Journal::read`] to tell them apart).
    pub fn record(&self, seq: Seq) -> Option<Record<'_>> {
        self.read(seq).ok().flatten()
    }

    /// The held record `seq`, verified: `Ok(None)` when not held, `Err(Corrupt)` when its bytes
    /// no longer verify (never handed out).
    pub fn read(&self, seq: Seq) -> Result<Option<Record<'_>>, JournalError> {
        Ok(self.read_bytes(seq)?.map(|(record, _bytes)| record))
    }

    /// The held record `seq` verified, together with its encoded bytes (header, payload,
    /// padding) exactly as stored — the same bytes a shipper can send on the wire.
    pub fn read_bytes(&self, seq: Seq) -> Result<Option<(Record<'_>, &[u8])>, JournalError> {
        let Some((index, offset)) = self.locate(seq) else {
            return Ok(None);
        };
        let bytes = &self.store.segment(index)[offset..];
        let corrupt = |reason: String| JournalError::Corrupt {
            seq,
            segment: index,
            offset,
            reason,
        };
        match decode(bytes) {
            Ok((record, used)) if record.seq == seq => Ok(Some((record, &bytes[..used]))),
            Ok((record, _)) => Err(corrupt(format!("found seq {} in its place", record.seq))),
            Err(error) => Err(corrupt(error.to_string())),
        }
    }

    /// Held records from `seq` (or the first held one, if later) to `last_seq`, each verified.
    pub fn iter_from(
        &self,
        seq: Seq,
    ) -> impl Iterator<Item = Result<Record<'_>, JournalError>> + '_ {
        let start = seq.max(self.released_seq + 1);
        (start..self.next_seq).map(move |seq| {
            self.read(seq)?
                .ok_or_else(|| JournalError::Layout(format!("held record {seq} not indexed")))
        })
    }

    /// Lowest sequence still held (0 when empty).
    pub fn first_seq(&self) -> Seq {
        if self.held_records() == 0 {
            0
        } else {
            self.released_seq + 1
        }
    }
    /// Highest sequence ever appended (0 before the first append), held or not.
    pub fn last_seq(&self) -> Seq {
        self.next_seq - 1
    }
    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }
    /// Highest sequence such that it and every record before it are durable.
    pub fn durable_seq(&self) -> Seq {
        self.durable_seq
    }
    /// Every record `<= released_seq()` is released (held records follow it).
    pub fn released_seq(&self) -> Seq {
        self.released_seq
    }
    /// Number of records held (appended and not released).
    pub fn held_records(&self) -> u64 {
        self.next_seq - 1 - self.released_seq
    }
    pub fn is_empty(&self) -> bool {
        self.held_records() == 0
    }
    /// Why the journal refuses appends and flushes, if it does.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }
    /// Largest payload one record may carry in this journal's geometry.
    pub fn payload_bytes_max(&self) -> usize {
        let room = self.segment_bytes - SEGMENT_HEADER_BYTES - RECORD_HEADER_BYTES;
        (room / RECORD_ALIGN_BYTES * RECORD_ALIGN_BYTES).min(RECORD_PAYLOAD_BYTES_MAX)
    }

    pub fn usage(&self) -> JournalUsage {
        let room_bytes = (self.segment_bytes - SEGMENT_HEADER_BYTES) as u64;
        let capacity_bytes = room_bytes * self.segment_count as u64;
        let free_segments = (self.segment_count - self.segments.len()) as u64;
        let head_free_bytes = self
            .segments
            .back()
            .map_or(0, |head| (self.segment_bytes - head.end) as u64);
        let free_bytes = free_segments * room_bytes + head_free_bytes;
        JournalUsage {
            used_bytes: capacity_bytes - free_bytes,
            free_bytes,
            capacity_bytes,
        }
    }
    pub fn store(&self) -> &S {
        &self.store
    }
    pub fn into_store(self) -> S {
        self.store
    }
    /// Direct access to the store, for fault injection in tests and the simulator. Writing
    /// through it bypasses every check of the journal.
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    fn check_healthy(&self) -> Result<(), JournalError> {
        match &self.poisoned {
            Some(reason) => Err(JournalError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Where record `seq` starts, if it is held.
    fn locate(&self, seq: Seq) -> Option<(usize, usize)> {
        if seq <= self.released_seq || seq >= self.next_seq {
            return None;
        }
        let after = self
            .segments
            .partition_point(|segment| segment.first_seq <= seq);
        let segment = self.segments.get(after.checked_sub(1)?)?;
        let offset = *segment.offsets.get((seq - segment.first_seq) as usize)?;
        Some((segment.index, offset as usize))
    }

    /// Starts the next segment of the ring as the head, or answers `Full`.
    fn start_segment(&mut self, needed_bytes: usize) -> Result<(), JournalError> {
        self.reclaim();
        if self.segments.len() == self.segment_count {
            return Err(JournalError::Full {
                needed_bytes,
                free_bytes: self.usage().free_bytes as usize,
            });
        }
        let index = self
            .segments
            .back()
            .map_or(0, |head| (head.index + 1) % self.segment_count);
        let header = SegmentHeader::new(
            index,
            self.segment_count,
            self.segment_bytes,
            self.next_seq,
            self.released_seq,
            self.last_checksum,
        );
        // Rule 2: a header is final only once every record before it is durable.
        let pending_header = if self.durable_seq < self.last_seq() {
            self.secure_newest_header()?;
            Some(header)
        } else {
            None
        };
        let written = header.with_provisional(pending_header.is_some());
        let bytes = self.store.segment_mut(index);
        bytes[..SEGMENT_HEADER_BYTES].copy_from_slice(written.as_bytes());
        // Checked right after writing, like records.
        assert!(matches!(parse_header(bytes), HeaderState::Valid(_)));
        let mut offsets = self.spare_offsets.pop().unwrap_or_default();
        offsets.clear();
        self.segments.push_back(LiveSegment {
            index,
            first_seq: self.next_seq,
            offsets,
            end: SEGMENT_HEADER_BYTES,
            flushed_end: 0,
            pending_header,
        });
        // When records before it are not durable yet, the final header waits for the flush
        // that makes them so, instead of this append flushing under the caller's lock (a
        // 64 MiB segment's msync stalled every write for ~14 ms; benches/RESULTS.md). Until
        // then the store holds it marked provisional: a process that dies keeps the segment
        // (the page cache has everything before it, so it continues the log), and after a
        // crash of the machine recovery drops it unless the records before it made it too.
        Ok(())
    }

    /// Before a segment is started whose header must wait: the newest final header in the
    /// store must be durable. The new segment's records overwrite its previous lap (released
    /// records, but perhaps the only durable proof of how far the sequence got, for instance
    /// when the segment after it was started but its header not yet flushed), and until the
    /// new header is final and durable recovery learns the next sequence from the newest
    /// durable final header. When that
    /// header was written but never flushed this flushes one page under the lock; with a group
    /// commit running every few milliseconds it rarely has to.
    fn secure_newest_header(&mut self) -> Result<(), JournalError> {
        // Pending headers wait for the records before them, which keep their segment live: the
        // oldest live segment always has its header written.
        let Some(newest) = self
            .segments
            .iter_mut()
            .rev()
            .find(|segment| segment.pending_header.is_none())
        else {
            return Ok(());
        };
        if newest.flushed_end >= SEGMENT_HEADER_BYTES {
            return Ok(());
        }
        if let Err(error) = self
            .store
            .flush_range(newest.index, 0, SEGMENT_HEADER_BYTES)
        {
            self.poisoned.get_or_insert_with(|| error.to_string());
            return Err(JournalError::Store(error));
        }
        newest.flushed_end = SEGMENT_HEADER_BYTES;
        Ok(())
    }

    /// Writes the final header of every segment whose earlier records are all durable.
    fn write_due_headers(&mut self) {
        let durable_seq = self.durable_seq;
        let Journal {
            store, segments, ..
        } = self;
        for segment in segments.iter_mut() {
            if segment.first_seq - 1 > durable_seq {
                break;
            }
            if let Some(header) = segment.pending_header.take() {
                let bytes = store.segment_mut(segment.index);
                bytes[..SEGMENT_HEADER_BYTES].copy_from_slice(header.as_bytes());
                // Checked right after writing, like records.
                assert!(matches!(parse_header(bytes), HeaderState::Valid(_)));
            }
        }
    }

    fn apply_release(&mut self) {
        let effective = self.release_requested.min(self.durable_seq);
        if effective > self.released_seq {
            self.released_seq = effective;
            self.reclaim();
        }
    }

    /// Frees the oldest segments whose records are all released (never the head).
    fn reclaim(&mut self) {
        while self.segments.len() > 1 && self.segments[0].seq_end() <= self.released_seq + 1 {
            if let Some(freed) = self.segments.pop_front() {
                self.spare_offsets.push(freed.offsets);
            }
        }
    }
}

fn check_geometry<S: SegmentStore>(store: &S) -> Result<(), JournalError> {
    let segment_count = store.segment_count();
    let segment_bytes = store.segment_bytes();
    if segment_count < SEGMENT_COUNT_MIN || segment_count > u32::MAX as usize {
        return Err(JournalError::Layout(format!(
            "{segment_count} segments; a journal needs at least {SEGMENT_COUNT_MIN}"
        )));
    }
    if segment_bytes < SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES
        || segment_bytes % RECORD_ALIGN_BYTES != 0
        || segment_bytes > u32::MAX as usize
    {
        return Err(JournalError::Layout(format!(
            "segment size {segment_bytes} bytes must be a multiple of {RECORD_ALIGN_BYTES}, at \
             least {} and below 4 GiB",
            SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES
        )));
    }
    for index in 0..segment_count {
        let len = store.segment(index).len();
        if len != segment_bytes {
            return Err(JournalError::Layout(format!(
                "segment {index} is {len} bytes, expected {segment_bytes}"
            )));
        }
    }
    Ok(())
}

fn check_header_geometry(
    header: &SegmentHeader,
    index: usize,
    segment_count: usize,
    segment_bytes: usize,
) -> Result<(), JournalError> {
    let found = (
        header.segment_index.get() as usize,
        header.segment_count.get() as usize,
        header.segment_bytes.get(),
    );
    if found != (index, segment_count, segment_bytes as u64) {
        return Err(JournalError::Layout(format!(
            "segment {index} says it is segment {} of {} with {} bytes each; this journal has \
             {segment_count} segments of {segment_bytes} bytes",
            found.0, found.1, found.2
        )));
    }
    Ok(())
}

/// A validly headed segment after scanning its records along the chain.
struct ScannedSegment {
    index: usize,
    /// The header, when it was written provisional (rule 2).
    provisional_header: Option<SegmentHeader>,
    first_seq: Seq,
    released_seq: Seq,
    prev_checksum: u64,
    offsets: Vec<u32>,
    /// One past the last valid record.
    end: usize,
    /// Checksum of the last valid record (the header's `prev_checksum` when there is none).
    last_checksum: u64,
}

impl ScannedSegment {
    fn seq_end(&self) -> Seq {
        self.first_seq + self.offsets.len() as Seq
    }
}

fn scan_segment(index: usize, bytes: &[u8], header: &SegmentHeader) -> ScannedSegment {
    let mut scanned = ScannedSegment {
        index,
        provisional_header: header.is_provisional().then_some(*header),
        first_seq: header.first_seq.get(),
        released_seq: header.released_seq.get(),
        prev_checksum: header.prev_checksum.get(),
        offsets: Vec::new(),
        end: SEGMENT_HEADER_BYTES,
        last_checksum: header.prev_checksum.get(),
    };
    // Bounded: every accepted record advances `end` by at least a record header.
    while let Ok((record, links, used)) = decode_linked(&bytes[scanned.end..]) {
        if record.seq != scanned.seq_end() || links.prev_checksum != scanned.last_checksum {
            break;
        }
        // The checksum does not cover the alignment padding: a tear there (an unflushed
        // record's last bytes) would reach the wire, where non-zero padding is refused.
        if !padding_is_zero(&bytes[scanned.end..scanned.end + used], &record) {
            break;
        }
        scanned.offsets.push(scanned.end as u32);
        scanned.end += used;
        scanned.last_checksum = links.checksum;
    }
    scanned
}

/// Whether the alignment padding after `record`'s payload in its encoded `bytes` is zero.
fn padding_is_zero(bytes: &[u8], record: &Record<'_>) -> bool {
    bytes
        .get(RECORD_HEADER_BYTES + record.payload.len()..)
        .is_some_and(|padding| padding.iter().all(|&byte| byte == 0))
}

/// Whether `next` continues the log right after `prev`.
fn continues(prev: &ScannedSegment, next: &ScannedSegment, segment_count: usize) -> bool {
    !prev.offsets.is_empty()
        && (prev.index + 1) % segment_count == next.index
        && next.first_seq == prev.seq_end()
        && next.prev_checksum == prev.last_checksum
}

struct TornTail {
    bytes: usize,
    reason: Option<String>,
}

/// Measures what follows the last valid record at `start`: nothing (zeros, or a record of an
/// older lap), or a torn tail — a partial or corrupt record, or records that do not continue
/// the chain — which runs until zeros, an older-lap record, or the end of the segment.
fn torn_tail(bytes: &[u8], start: usize, next_seq: Seq) -> TornTail {
    let mut pos = start;
    let mut reason = None;
    // Bounded: every step advances `pos` by at least RECORD_ALIGN_BYTES.
    while pos < bytes.len() {
        let window = &bytes[pos..(pos + RECORD_HEADER_BYTES).min(bytes.len())];
        if window.iter().all(|byte| *byte == 0) {
            break;
        }
        match decode_linked(&bytes[pos..]) {
            Ok((record, _links, used)) => {
                if record.seq < next_seq {
                    break;
                }
                reason.get_or_insert_with(|| {
                    if record.seq == next_seq && !padding_is_zero(&bytes[pos..pos + used], &record)
                    {
                        format!("record seq {} at offset {pos} has non-zero padding", record.seq)
                    } else {
                        format!(
                            "record seq {} at offset {pos} does not continue the log (next seq {next_seq})",
                            record.seq
                        )
                    }
                });
                pos += used;
            }
            Err(error) => {
                reason.get_or_insert_with(|| format!("{error} at offset {pos}"));
                pos += match RecordHeader::read_from_prefix(&bytes[pos..]) {
                    Ok((header, _))
                        if header.magic.get() == RECORD_MAGIC
                            && (header.payload_len.get() as usize) <= RECORD_PAYLOAD_BYTES_MAX =>
                    {
                        encoded_len_for_payload(header.payload_len.get() as usize)
                    }
                    _ => RECORD_ALIGN_BYTES,
                };
            }
        }
    }
    TornTail {
        bytes: pos.min(bytes.len()) - start,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::journal_mem::{CrashMode, MemSegments};

    const SEGMENT_BYTES: usize = 4096;

    fn write_spec(payload: &[u8]) -> RecordSpec<'_> {
        RecordSpec {
            kind: RecordKind::Write,
            disk_id: 1,
            offset: 4096,
            length: payload.len() as u64,
            timestamp_ns: 7,
            payload,
        }
    }

    fn fresh(segment_count: usize) -> Journal<MemSegments> {
        let (journal, report) =
            Journal::open(MemSegments::new(segment_count, SEGMENT_BYTES)).unwrap();
        assert_eq!(
            report,
            RecoveryReport {
                next_seq: 1,
                ..RecoveryReport::default()
            }
        );
        journal
    }

    fn payload_for(seq: Seq, len: usize) -> Vec<u8> {
        (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
    }

    /// A store that flips one byte of the `nth` write it is given (0: the first).
    struct FlippingStore {
        inner: MemSegments,
        writes: usize,
        flip_write: usize,
        flip_at: usize,
    }

    impl SegmentStore for FlippingStore {
        fn segment_count(&self) -> usize {
            self.inner.segment_count()
        }
        fn segment_bytes(&self) -> usize {
            self.inner.segment_bytes()
        }
        fn segment(&self, index: usize) -> &[u8] {
            self.inner.segment(index)
        }
        fn segment_mut(&mut self, index: usize) -> &mut [u8] {
            self.inner.segment_mut(index)
        }
        fn write_parts(
            &mut self,
            index: usize,
            offset: usize,
            parts: &[&[u8]],
        ) -> Result<(), StoreError> {
            self.inner.write_parts(index, offset, parts)?;
            if self.writes == self.flip_write {
                self.inner.segment_mut(index)[offset + self.flip_at] ^= 0x40;
            }
            self.writes += 1;
            Ok(())
        }
        fn flush_range(&self, index: usize, offset: usize, len: usize) -> Result<(), StoreError> {
            self.inner.flush_range(index, offset, len)
        }
    }

    #[test]
    fn append_refuses_a_record_the_store_did_not_hold() {
        // A byte of the header, and of the padding, of the second record.
        for flip_at in [8, RECORD_HEADER_BYTES + 100 + 2] {
            let store = FlippingStore {
                inner: MemSegments::new(4, SEGMENT_BYTES),
                writes: 0,
                flip_write: 1,
                flip_at,
            };
            let (mut journal, _) = Journal::open(store).unwrap();
            assert_eq!(
                journal.append(&write_spec(&payload_for(1, 100))).unwrap(),
                1
            );
            let refused = journal.append(&write_spec(&payload_for(2, 100)));
            assert!(
                matches!(refused, Err(JournalError::Corrupt { seq: 2, .. })),
                "flip at {flip_at}: {refused:?}"
            );
            // Nothing was appended: the next record takes sequence 2 over the bad bytes, and
            // both records read back.
            assert_eq!(journal.last_seq(), 1);
            assert_eq!(
                journal.append(&write_spec(&payload_for(2, 100))).unwrap(),
                2
            );
            assert_eq!(journal.record(2).unwrap().payload, &payload_for(2, 100)[..]);
            assert_eq!(journal.record(1).unwrap().payload, &payload_for(1, 100)[..]);
        }
    }

    #[test]
    fn a_payload_the_store_did_not_hold_is_never_read_back() {
        // A byte of the second record's payload goes wrong in the store: the append is not
        // refused (only the framing is compared), but no read hands the record out.
        let store = FlippingStore {
            inner: MemSegments::new(4, SEGMENT_BYTES),
            writes: 0,
            flip_write: 1,
            flip_at: RECORD_HEADER_BYTES + 50,
        };
        let (mut journal, _) = Journal::open(store).unwrap();
        for seq in [1, 2, 3] {
            assert_eq!(
                journal.append(&write_spec(&payload_for(seq, 100))).unwrap(),
                seq
            );
        }
        assert!(matches!(
            journal.read(2),
            Err(JournalError::Corrupt { seq: 2, .. })
        ));
        assert!(journal.record(2).is_none());
        assert_eq!(journal.record(1).unwrap().payload, &payload_for(1, 100)[..]);
        assert_eq!(journal.record(3).unwrap().payload, &payload_for(3, 100)[..]);
    }

    #[test]
    fn append_read_flush_reopen() {
        let mut journal = fresh(4);
        for seq in 1..=10 {
            let payload = payload_for(seq, 100);
            assert_eq!(journal.append(&write_spec(&payload)).unwrap(), seq);
        }
        assert_eq!(
            (
                journal.first_seq(),
                journal.last_seq(),
                journal.durable_seq()
            ),
            (1, 10, 0)
        );
        let record = journal.record(5).unwrap();
        assert_eq!(record.payload, &payload_for(5, 100)[..]);
        assert_eq!(journal.record(0), None);
        assert_eq!(journal.record(11), None);
        assert_eq!(journal.flush(7).unwrap(), 7);
        let store = journal.into_store().crash_with(CrashMode::LoseUnflushed);
        let (journal, report) = Journal::open(store).unwrap();
        assert_eq!(report.records_kept, 7);
        assert_eq!(
            (report.first_seq, report.last_seq, report.next_seq),
            (1, 7, 8)
        );
        assert_eq!(journal.durable_seq(), 7);
        for seq in 1..=7 {
            assert_eq!(
                journal.record(seq).unwrap().payload,
                &payload_for(seq, 100)[..]
            );
        }
    }

    #[test]
    fn wraps_around_and_refuses_when_full() {
        let mut journal = fresh(3);
        let payload = vec![0xab; 1000];
        // Each segment holds 3 records of 1064 bytes after its header.
        let mut last = 0;
        loop {
            match journal.append(&write_spec(&payload)) {
                Ok(seq) => last = seq,
                Err(JournalError::Full { needed_bytes, .. }) => {
                    assert_eq!(needed_bytes, 1064);
                    break;
                }
                Err(other) => panic!("unexpected {other}"),
            }
            assert!(last < 100, "journal never filled");
        }
        assert_eq!(last, 9);
        // Nothing released yet: everything is still readable.
        assert!((1..=9).all(|seq| journal.record(seq).is_some()));
        // Appends never flush (the later segments' headers wait for the records before them);
        // one flush writes them and makes everything durable, round by round.
        assert_eq!(journal.durable_seq(), 0);
        assert_eq!(journal.flush(9).unwrap(), 9);
        // Releasing part of the oldest segment frees nothing.
        journal.release(2);
        assert!(matches!(
            journal.append(&write_spec(&payload)),
            Err(JournalError::Full { .. })
        ));
        // Releasing all of it frees one segment.
        journal.release(3);
        for _ in 0..3 {
            last = journal.append(&write_spec(&payload)).unwrap();
        }
        assert_eq!(last, 12);
        assert!(matches!(
            journal.append(&write_spec(&payload)),
            Err(JournalError::Full { .. })
        ));
        assert_eq!(journal.first_seq(), 4);
        assert_eq!(journal.record(3), None);
        assert_eq!(journal.record(12).unwrap().payload, &payload[..]);
    }

    /// Rule 2 without a flush in `append`: a rollover while records are not durable leaves the
    /// new segment's header pending; the next flush writes it and goes on into the segment in a
    /// second round, and a crash before then keeps every durable record and loses only records
    /// that were never durable.
    #[test]
    fn a_rollover_defers_its_header_to_the_next_flush() {
        let payload = [9u8; 1000];
        let mut journal = fresh(3);
        // Four 1064-byte records fill the first 4096-byte segment; the fifth rolls over.
        for _ in 0..4 {
            journal.append(&write_spec(&payload)).unwrap();
        }
        assert_eq!(journal.flush(2).unwrap(), 2);
        let flushes = journal.store().flush_calls();
        assert_eq!(journal.append(&write_spec(&payload)).unwrap(), 5);
        assert_eq!(
            journal.store().flush_calls(),
            flushes,
            "an append with records not yet durable must not flush"
        );
        assert!(journal.header_pending_upto(5));
        // The process dies (the page cache keeps every write): the provisional segment
        // continues the log, so nothing appended is lost, and it reopens final.
        let crashed = journal.store().crash_with(CrashMode::KeepUnflushed);
        let (reopened, _) = Journal::open(crashed).unwrap();
        assert_eq!(reopened.last_seq(), 5);
        assert_eq!(reopened.record(5).unwrap().payload, &payload[..]);
        let (reopened, _) =
            Journal::open(reopened.into_store().crash_with(CrashMode::LoseUnflushed)).unwrap();
        assert_eq!(
            reopened.last_seq(),
            5,
            "made durable, header final, at the reopen"
        );
        // The machine goes down instead: records 1..=2 were durable, 3..=4 and the provisional
        // header were not. A provisional header that reached the disk without the records
        // before it is dropped with its records; the next sequence never goes below a durable
        // one.
        let mut crashed = journal.store().crash_with(CrashMode::LoseUnflushed);
        let (reopened, report) = Journal::open(crashed.clone()).unwrap();
        assert_eq!(reopened.last_seq(), 2);
        assert_eq!(report.next_seq, 3);
        let provisional = journal.store().segment(1)[..SEGMENT_HEADER_BYTES].to_vec();
        assert!(
            matches!(parse_header(&provisional), HeaderState::Valid(header) if header.is_provisional())
        );
        crashed.segment_mut(1)[..SEGMENT_HEADER_BYTES].copy_from_slice(&provisional);
        let (reopened, report) = Journal::open(crashed).unwrap();
        assert_eq!(reopened.last_seq(), 2);
        assert!(report
            .drop_reason
            .is_some_and(|reason| reason.contains("provisional header does not continue")));
        // One flush call covers both rounds: records 3..=4, then the header and record 5.
        assert_eq!(journal.flush(5).unwrap(), 5);
        assert!(!journal.header_pending_upto(5));
        let crashed = journal.store().crash_with(CrashMode::LoseUnflushed);
        let (reopened, _) = Journal::open(crashed).unwrap();
        assert_eq!(reopened.last_seq(), 5);
        assert_eq!(reopened.record(5).unwrap().payload, &payload[..]);
    }

    #[test]
    fn release_waits_for_durability() {
        let mut journal = fresh(2);
        let payload = vec![1u8; 1000];
        for _ in 0..3 {
            journal.append(&write_spec(&payload)).unwrap();
        }
        journal.release(3);
        assert_eq!(
            journal.first_seq(),
            1,
            "nothing is durable yet, nothing may be released"
        );
        journal.flush(2).unwrap();
        assert_eq!(journal.first_seq(), 3);
        journal.flush(3).unwrap();
        assert!(journal.is_empty());
        assert_eq!(journal.first_seq(), 0);
        assert_eq!(journal.last_seq(), 3);
    }

    #[test]
    fn acknowledged_records_are_released_without_ever_being_written() {
        let mut journal = fresh(3);
        let payload = vec![1u8; 1000];
        // Three 1064-byte records per 4 KiB segment: 1-3 in segment 0, 4-6 in segment 1.
        for _ in 0..6 {
            journal.append(&write_spec(&payload)).unwrap();
        }
        journal.release_acknowledged(4);
        assert_eq!(journal.first_seq(), 5, "released at once, nothing flushed");
        assert_eq!(journal.durable_seq(), 4);
        let plan = journal.begin_flush(6).unwrap();
        assert!(
            plan.ranges().iter().all(|range| range.segment == 1),
            "the acknowledged segment is never written: {plan:?}"
        );
        journal.flush(6).unwrap();
        // Nothing of segment 0 reached the device; what was flushed after it survives.
        let (reopened, report) =
            Journal::open(journal.store().crash_with(CrashMode::LoseUnflushed)).unwrap();
        assert_eq!(reopened.last_seq(), 6, "{report:?}");
        assert!(reopened.record(1).is_none() && reopened.record(3).is_none());
        assert_eq!(reopened.record(6).unwrap().payload, &payload[..]);
        // A process that dies loses nothing appended, acknowledged or not.
        let (reopened, _) =
            Journal::open(journal.store().crash_with(CrashMode::KeepUnflushed)).unwrap();
        assert_eq!(reopened.last_seq(), 6);
    }

    #[test]
    fn restart_at_gives_up_every_number_below_it_for_good() {
        let mut journal = fresh(3);
        for _ in 0..4 {
            journal.append(&write_spec(&[2u8; 1000])).unwrap();
        }
        journal.flush(2).unwrap();
        assert!(
            matches!(journal.restart_at(4), Err(JournalError::Layout(_))),
            "4 was used already"
        );
        assert_eq!(journal.restart_at(100).unwrap(), 100);
        assert_eq!(
            (
                journal.first_seq(),
                journal.last_seq(),
                journal.durable_seq()
            ),
            (100, 100, 100)
        );
        assert_eq!(journal.record(100).unwrap().kind, RecordKind::Skip);
        assert!(journal.record(3).is_none(), "held records are dropped");
        assert_eq!(journal.append(&write_spec(&[3u8; 10])).unwrap(), 101);
        journal.flush(101).unwrap();
        for mode in [CrashMode::KeepUnflushed, CrashMode::LoseUnflushed] {
            let (reopened, report) = Journal::open(journal.store().crash_with(mode)).unwrap();
            assert_eq!(
                (reopened.first_seq(), reopened.last_seq()),
                (100, 101),
                "{mode:?}: {report:?}"
            );
            assert_eq!(reopened.record(101).unwrap().payload, &[3u8; 10]);
        }
    }

    #[test]
    fn usage_accounts_for_segments() {
        let mut journal = fresh(2);
        let room = (SEGMENT_BYTES - SEGMENT_HEADER_BYTES) as u64;
        assert_eq!(
            journal.usage(),
            JournalUsage {
                used_bytes: 0,
                free_bytes: 2 * room,
                capacity_bytes: 2 * room
            }
        );
        journal.append(&write_spec(&[5u8; 100])).unwrap();
        let usage = journal.usage();
        assert_eq!(usage.used_bytes, 168);
        assert_eq!(usage.used_bytes + usage.free_bytes, usage.capacity_bytes);
    }

    #[test]
    fn sequence_continues_after_everything_is_released_and_reopened() {
        let mut journal = fresh(2);
        let payload = vec![9u8; 1500];
        // Two records of 1568 bytes per segment: 1, 2 in segment 0; 3, 4 in segment 1.
        for _ in 0..4 {
            journal.append(&write_spec(&payload)).unwrap();
        }
        journal.flush(4).unwrap();
        journal.release(4);
        assert!(journal.is_empty());
        // Record 5 reuses segment 0, whose new header records the release floor (4).
        assert_eq!(journal.append(&write_spec(&payload)).unwrap(), 5);
        // The process dies with record 5 torn but its segment header written.
        let mut store = journal.into_store().crash_with(CrashMode::KeepUnflushed);
        store.segment_mut(0)[SEGMENT_HEADER_BYTES + 200] ^= 0xff;
        let (mut journal, report) = Journal::open(store).unwrap();
        assert_eq!(report.records_kept, 0);
        assert_eq!(
            (report.first_seq, report.last_seq, report.next_seq),
            (0, 0, 5)
        );
        assert_eq!(report.bytes_dropped, 1568);
        assert!(journal.is_empty());
        assert_eq!(journal.last_seq(), 4);
        assert_eq!(journal.append(&write_spec(&payload)).unwrap(), 5);
        journal.flush(5).unwrap();
        let (journal, report) = Journal::open(journal.into_store().crash(3)).unwrap();
        assert_eq!(
            (report.records_kept, report.first_seq, report.next_seq),
            (1, 5, 6)
        );
        assert_eq!(journal.record(5).unwrap().payload, &payload[..]);
    }

    #[test]
    fn torn_last_record_is_dropped_and_reported() {
        let mut journal = fresh(4);
        for seq in 1..=5 {
            journal.append(&write_spec(&payload_for(seq, 200))).unwrap();
        }
        journal.flush(4).unwrap();
        let mut store = journal.into_store();
        // Record 5 starts at 64 + 4 * 264; break a payload byte.
        store.segment_mut(0)[64 + 4 * 264 + 100] ^= 0x40;
        let (journal, report) = Journal::open(store).unwrap();
        assert_eq!(report.records_kept, 4);
        assert_eq!(report.bytes_dropped, 264);
        let reason = report.drop_reason.unwrap();
        assert!(reason.contains("checksum mismatch"), "{reason}");
        assert_eq!(journal.record(5), None);
        // The torn tail was zeroed: a second reopen reports nothing.
        let (_journal, again) = Journal::open(journal.into_store()).unwrap();
        assert_eq!((again.records_kept, again.bytes_dropped), (4, 0));
    }

    #[test]
    fn stale_record_with_matching_seq_is_not_resurrected() {
        // Equal-sized records after a crash land exactly where the dropped ones were; the chain
        // link keeps an old record from being read as the continuation.
        let mut journal = fresh(4);
        for seq in 1..=3 {
            journal.append(&write_spec(&payload_for(seq, 200))).unwrap();
        }
        journal.flush(1).unwrap();
        let mut store = journal.into_store();
        // Tear record 2 only; record 3 stays intact on "disk".
        store.segment_mut(0)[64 + 264 + 70] ^= 1;
        let (mut journal, report) = Journal::open(store).unwrap();
        assert_eq!(report.records_kept, 1);
        assert_eq!(report.bytes_dropped, 2 * 264);
        // Put the old record 3 back, as a store that lost the zeroing would have it.
        let old_three = {
            let mut other = fresh(4);
            for seq in 1..=3 {
                other.append(&write_spec(&payload_for(seq, 200))).unwrap();
            }
            other.store().segment(0)[64 + 2 * 264..64 + 3 * 264].to_vec()
        };
        journal.append(&write_spec(&payload_for(20, 200))).unwrap();
        journal.flush(2).unwrap();
        let mut store = journal.into_store();
        store.segment_mut(0)[64 + 2 * 264..64 + 3 * 264].copy_from_slice(&old_three);
        let (journal, report) = Journal::open(store).unwrap();
        assert_eq!(report.records_kept, 2);
        assert_eq!(
            journal.record(2).unwrap().payload,
            &payload_for(20, 200)[..]
        );
        assert_eq!(journal.record(3), None);
        assert!(report.bytes_dropped > 0);
    }

    #[test]
    fn failed_flush_poisons() {
        let mut journal = fresh(2);
        journal.append(&write_spec(&[1u8; 10])).unwrap();
        journal.store().fail_next_flushes(1);
        assert!(matches!(journal.flush(1), Err(JournalError::Store(_))));
        assert_eq!(journal.durable_seq(), 0);
        assert!(matches!(
            journal.flush(1),
            Err(JournalError::Poisoned { .. })
        ));
        assert!(matches!(
            journal.append(&write_spec(&[1u8; 10])),
            Err(JournalError::Poisoned { .. })
        ));
        // Reopening recovers.
        let (journal, report) = Journal::open(journal.into_store()).unwrap();
        assert_eq!(report.records_kept, 1);
        assert_eq!(journal.durable_seq(), 1);
    }

    #[test]
    fn two_phase_flush_allows_appends_in_between() {
        let mut journal = fresh(4);
        journal.append(&write_spec(&[1u8; 10])).unwrap();
        journal.append(&write_spec(&[2u8; 10])).unwrap();
        let plan = journal.begin_flush(2).unwrap();
        assert_eq!(plan.upto(), 2);
        assert_eq!(plan.ranges().len(), 1);
        assert_eq!(
            plan.ranges()[0].offset,
            0,
            "a new segment's header is flushed with it"
        );
        journal.append(&write_spec(&[3u8; 10])).unwrap();
        let result = plan.execute(journal.store());
        assert_eq!(journal.finish_flush(plan, result).unwrap(), 2);
        let again = journal.begin_flush(3).unwrap();
        assert_eq!(again.ranges()[0].offset, 64 + 2 * 80);
        let store = journal.into_store().crash_with(CrashMode::LoseUnflushed);
        let (_journal, report) = Journal::open(store).unwrap();
        assert_eq!(report.records_kept, 2);
    }

    #[test]
    fn geometry_mismatch_is_refused() {
        let mut journal = fresh(2);
        journal.append(&write_spec(&[1u8; 10])).unwrap();
        journal.flush(1).unwrap();
        let mut store = journal.into_store();
        // Swap the two segments: each header names its ring position.
        let first = store.segment(0).to_vec();
        let second = store.segment(1).to_vec();
        store.segment_mut(0).copy_from_slice(&second);
        store.segment_mut(1).copy_from_slice(&first);
        assert!(matches!(Journal::open(store), Err(JournalError::Layout(_))));
        assert!(matches!(
            Journal::open(MemSegments::new(1, 4096)),
            Err(JournalError::Layout(_))
        ));
    }

    #[test]
    fn too_large_and_invalid_records_are_refused() {
        let mut journal = fresh(2);
        let big = vec![0u8; SEGMENT_BYTES];
        assert!(matches!(
            journal.append(&write_spec(&big)),
            Err(JournalError::RecordTooLarge { .. })
        ));
        let mut spec = write_spec(&[1, 2, 3]);
        spec.length = 4;
        assert!(matches!(
            journal.append(&spec),
            Err(JournalError::Record(_))
        ));
        assert_eq!(journal.next_seq(), 1);
        let max = vec![0u8; journal.payload_bytes_max()];
        assert_eq!(journal.append(&write_spec(&max)).unwrap(), 1);
    }

    #[test]
    fn iter_from_yields_held_records() {
        let mut journal = fresh(4);
        for seq in 1..=6 {
            journal.append(&write_spec(&payload_for(seq, 50))).unwrap();
        }
        journal.flush(6).unwrap();
        journal.release(2);
        let seqs: Vec<Seq> = journal
            .iter_from(1)
            .map(|record| record.unwrap().seq)
            .collect();
        assert_eq!(seqs, vec![3, 4, 5, 6]);
        let (record, bytes) = journal.read_bytes(4).unwrap().unwrap();
        assert_eq!(bytes.len(), record.encoded_len());
        assert_eq!(decode(bytes).unwrap().0, record);
    }

    #[test]
    fn corrupt_held_record_is_never_handed_out() {
        let mut journal = fresh(2);
        journal.append(&write_spec(&[7u8; 64])).unwrap();
        journal.flush(1).unwrap();
        let mut store = journal.into_store();
        let (mut journal, _) = Journal::open(store.clone()).unwrap();
        journal.store_mut().segment_mut(0)[64 + 70] ^= 1;
        assert_eq!(journal.record(1), None);
        assert!(matches!(
            journal.read(1),
            Err(JournalError::Corrupt { seq: 1, .. })
        ));
        store.segment_mut(0)[0] ^= 1;
        // A torn header of the only segment: the journal opens empty, reported.
        let (_journal, report) = Journal::open(store).unwrap();
        assert_eq!(report.records_kept, 0);
        assert!(report.drop_reason.unwrap().contains("segment 0"));
    }

    /// Random appends, flushes, releases and torn crashes against a model: a crash keeps every
    /// flushed record, hands out nothing that was not appended, and keeps sequences contiguous.
    #[test]
    fn random_operations_against_a_model() {
        // FERRY_JOURNAL_SEEDS=<count> soaks; a failure names its seed.
        let seeds = std::env::var("FERRY_JOURNAL_SEEDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100u64);
        let only: Option<u64> = std::env::var("FERRY_JOURNAL_SEED")
            .ok()
            .and_then(|v| v.parse().ok());
        for seed in only.map_or(0..seeds, |seed| seed..seed + 1) {
            let mut rng = crate::core::journal_mem::SplitMix64::new(seed);
            let segment_count = 2 + rng.below(4) as usize;
            let mut journal = fresh(segment_count);
            let mut model: Vec<Vec<u8>> = Vec::new();
            for step in 0..200 {
                let context = format!("seed {seed} step {step}");
                match rng.below(10) {
                    0..=5 => {
                        let len = rng.below(1200) as usize;
                        let payload: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                        match journal.append(&write_spec(&payload)) {
                            Ok(seq) => {
                                assert_eq!(seq, model.len() as Seq + 1, "{context}");
                                model.push(payload);
                            }
                            Err(JournalError::Full { .. }) => {}
                            Err(other) => panic!("{context}: {other}"),
                        }
                    }
                    6 | 7 => {
                        let upto = rng.below(journal.last_seq() + 1);
                        journal.flush(upto).unwrap();
                        assert!(journal.durable_seq() >= upto, "{context}");
                    }
                    8 => {
                        let upto = rng.below(journal.last_seq() + 1);
                        journal.release(upto)
                    }
                    _ => {
                        let durable = journal.durable_seq();
                        let released = journal.released_seq();
                        let store = journal.into_store().crash(rng.next_u64());
                        let (reopened, report) = Journal::open(store).unwrap();
                        journal = reopened;
                        let last = journal.last_seq();
                        assert!(last >= durable, "{context}: lost flushed records");
                        assert!(last <= model.len() as Seq, "{context}: invented records");
                        assert_eq!(report.next_seq, last + 1, "{context}");
                        assert!(
                            journal.is_empty() || journal.first_seq() <= released + 1,
                            "{context}: lost unreleased records"
                        );
                        for seq in (journal.released_seq() + 1)..=last {
                            let record = journal
                                .record(seq)
                                .unwrap_or_else(|| panic!("{context}: {seq}"));
                            assert_eq!(record.payload, &model[seq as usize - 1][..], "{context}");
                        }
                        model.truncate(last as usize);
                    }
                }
                let usage = journal.usage();
                assert_eq!(
                    usage.used_bytes + usage.free_bytes,
                    usage.capacity_bytes,
                    "{context}"
                );
            }
        }
    }
}
