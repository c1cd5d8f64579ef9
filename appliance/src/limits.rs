//! Every bound Ferry works within, in one place, with compile-time checks of how they relate.
//! Units go last in names (`journal_bytes_min`).

/// Alignment of every journal record and of O_DIRECT buffers.
pub const RECORD_ALIGN_BYTES: usize = 8;

/// Size of a journal record header on disk and on the wire.
pub const RECORD_HEADER_BYTES: usize = 64;

/// Largest payload one journal record carries. Larger NBD writes are split into several records
/// (still in order, still covered by the same flush).
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 1 << 20;

/// Size of one journal segment file header.
pub const SEGMENT_HEADER_BYTES: usize = 64;

/// Smallest journal segment: must hold the largest record plus the segment header.
pub const SEGMENT_BYTES_MIN: usize = 2 << 20;

/// Default journal segment size; a journal is a ring of such segments.
pub const SEGMENT_BYTES_DEFAULT: usize = 64 << 20;

/// A journal must have at least this many segments so that one can be reused while others hold
/// unacknowledged records.
pub const SEGMENT_COUNT_MIN: usize = 2;

const _: () = assert!(RECORD_HEADER_BYTES % RECORD_ALIGN_BYTES == 0);
const _: () = assert!(SEGMENT_HEADER_BYTES % RECORD_ALIGN_BYTES == 0);
const _: () = assert!(
    SEGMENT_BYTES_MIN >= SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + RECORD_PAYLOAD_BYTES_MAX
);
const _: () = assert!(SEGMENT_BYTES_DEFAULT >= SEGMENT_BYTES_MIN);
