//! The cache journal's ring logic: records appended in sequence order into a ring of fixed-size
//! segments, flushed (made durable) up to a sequence, released when the target acknowledged
//! them, and recovered after a crash by scanning and verifying every segment.
//!
//! The bytes live in a [`SegmentStore`]: memory-mapped, preallocated files in the daemon
//! (`io::mmap_journal`), plain memory with crash and tear injection in the simulator. This
//! module only sees byte slices, so it is sans-IO and deterministic.
//!
//! API CONTRACT (fixed; bodies are being written by the journal owner):
//! - `Journal::open(store, now_ns)` scans, verifies and recovers; returns a `RecoveryReport`.
//! - `append(&RecordSpec)` -> `Ok(seq)` or `Err(JournalError::Full { .. })`, never blocks.
//! - `flush(seq)` makes every record `<= seq` durable through `SegmentStore::flush_range`.
//! - `release(seq)` frees every record `<= seq` (acknowledged by the target).
//! - `record(seq)` / `iter_from(seq)` hand out verified records that are still held.

use crate::core::record::{Record, RecordError, RecordKind, Seq};

/// Where a journal's bytes live. Implementations: `io::mmap_journal::MmapSegments` (files) and
/// the simulator's in-memory store.
pub trait SegmentStore {
    /// Number of segments in the ring (fixed for the life of the journal).
    fn segment_count(&self) -> usize;
    /// Size in bytes of every segment (fixed).
    fn segment_bytes(&self) -> usize;
    /// The bytes of segment `index`.
    fn segment(&self, index: usize) -> &[u8];
    /// The bytes of segment `index`, for writing.
    fn segment_mut(&mut self, index: usize) -> &mut [u8];
    /// Makes bytes `[offset, offset + len)` of segment `index` durable.
    fn flush_range(&mut self, index: usize, offset: usize, len: usize) -> Result<(), StoreError>;
}

/// A failure of the store underneath the journal.
#[derive(Debug, thiserror::Error)]
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
    #[error("invalid record: {0}")]
    Record(#[from] RecordError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("journal layout invalid: {0}")]
    Layout(String),
}

/// What `open` found and what it dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Records kept, and the sequence range they cover (`first_seq..=last_seq`, empty when 0).
    pub records_kept: u64,
    pub first_seq: Seq,
    pub last_seq: Seq,
    /// Bytes after the last valid record that were discarded (torn tail, garbage).
    pub bytes_dropped: u64,
    /// Human-readable reason for the first dropped byte, if any ("checksum mismatch at …").
    pub drop_reason: Option<String>,
}

/// Space accounting reported in status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalUsage {
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub capacity_bytes: u64,
}

/// The journal ring over a store.
pub struct Journal<S: SegmentStore> {
    store: S,
}

impl<S: SegmentStore> Journal<S> {
    pub fn open(store: S) -> Result<(Self, RecoveryReport), JournalError> {
        let _ = store;
        todo!("journal owner")
    }
    pub fn append(&mut self, spec: &RecordSpec<'_>) -> Result<Seq, JournalError> {
        let _ = spec;
        todo!("journal owner")
    }
    pub fn flush(&mut self, upto: Seq) -> Result<(), JournalError> {
        let _ = upto;
        todo!("journal owner")
    }
    pub fn release(&mut self, upto: Seq) {
        let _ = upto;
        todo!("journal owner")
    }
    pub fn record(&self, seq: Seq) -> Option<Record<'_>> {
        let _ = seq;
        todo!("journal owner")
    }
    /// Lowest sequence still held (0 when empty), highest appended, highest durable.
    pub fn first_seq(&self) -> Seq {
        todo!("journal owner")
    }
    pub fn last_seq(&self) -> Seq {
        todo!("journal owner")
    }
    pub fn durable_seq(&self) -> Seq {
        todo!("journal owner")
    }
    pub fn usage(&self) -> JournalUsage {
        todo!("journal owner")
    }
    pub fn store(&self) -> &S {
        &self.store
    }
    pub fn into_store(self) -> S {
        self.store
    }
}
