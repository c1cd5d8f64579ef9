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

// ---- Replication protocol (core::wire, core::source, core::target) ----

/// Size of a replication protocol frame header.
pub const FRAME_HEADER_BYTES: usize = 16;

/// Largest frame body a peer may send: one largest record with room to spare. Bounds the memory
/// a receiver commits to before the checksum is verified.
pub const FRAME_BODY_BYTES_MAX: usize = 4 << 20;

/// A records frame stops growing once its body passes this size (it always holds one record).
pub const SHIP_FRAME_BYTES_TARGET: usize = 1 << 20;

/// Longest name (appliance, machine, disk, group) or error message carried on the wire.
pub const NAME_BYTES_MAX: usize = 255;

/// Most disks one source appliance announces in a Hello.
pub const HELLO_DISKS_MAX: usize = 1024;

/// Most extents hashed by one hash request.
pub const HASH_EXTENTS_PER_REQUEST_MAX: usize = 256;

/// Smallest block a hash request may ask each extent to be hashed in.
pub const HASH_BLOCK_BYTES_MIN: usize = 512;

/// Most block hashes one hash response carries (8 bytes each).
pub const HASH_BLOCKS_PER_RESPONSE_MAX: usize = 65_536;

/// Block size of the hash compare of initial replication, resync and verify: only blocks whose
/// hash differs from the target's travel.
pub const SYNC_BLOCK_BYTES_DEFAULT: usize = 4096;

/// Largest extent of initial replication and resync: one extent travels as one record.
pub const SYNC_EXTENT_BYTES_MAX: usize = RECORD_PAYLOAD_BYTES_MAX;

/// Default extent of initial replication and resync.
pub const SYNC_EXTENT_BYTES_DEFAULT: usize = 1 << 20;

/// Ship window: bytes and records sent but not yet acknowledged durable by the target.
pub const SHIP_WINDOW_BYTES_MAX: usize = 128 << 20;
pub const SHIP_WINDOW_RECORDS_MAX: usize = 16_384;

/// The source resends from the target's last received sequence when no acknowledgement made
/// progress for this long (lost frames on an unreliable link, a lost final ack).
pub const SHIP_RESEND_TIMEOUT_NS: u64 = 2_000_000_000;

/// The source resends Hello (and outstanding hash requests) when unanswered for this long.
pub const SHIP_HANDSHAKE_TIMEOUT_NS: u64 = 2_000_000_000;

/// Resync keeps at most this many extent reads and hash requests outstanding.
pub const SYNC_READS_IN_FLIGHT_MAX: usize = 16;
pub const SYNC_HASH_REQUESTS_IN_FLIGHT_MAX: usize = 4;
/// The slowest read-and-hash rate at the target a hash request is allowed before the source
/// asks again (64 ns per byte: ~16 MB/s), on top of the handshake timeout.
pub const SYNC_HASH_READ_NS_PER_BYTE_MAX: u64 = 64;

/// Resync issues no new extent read while the unacknowledged journal backlog exceeds this: live
/// writes never queue behind more than this much resync data (the "bounded share"). Sync data
/// is held in memory, not in the journal (`SyncRef`), so the journal's size does not bound it;
/// this does (the target's receive pool is sized by it too). It is the sync's in-flight window too:
/// every byte waits for the source's group commit and the target's durable commit before it
/// frees room, so it must cover that round trip at the disk's speed (up to ~0.1 s on a loaded
/// machine into files; 16 MiB paced the sync at ~16 extents per 100 ms). Into Ceph RBD the round
/// trip is longer (a write to a new object waits for its object-map update, ~70 ms per write
/// in librbd on the one-node cluster): 128 MiB instead of 64 took a 2 GiB initial replication
/// from 8.0 to 7.4 s there (means of 13 and 12 runs) (benches/RESULTS.md, Ceph RBD). Live writes queue behind at most
/// this much sync data: ~0.3–0.4 s at those rates.
pub const SYNC_BACKLOG_BYTES_MAX: usize = 128 << 20;

/// The registered I/O buffer arena (`io::disk` arena.rs): memory every io_uring ring registers
/// once, from which the hot buffer pools carve their buffers, so O_DIRECT requests skip pinning
/// pages per request. It holds the source's sync reads in flight plus its backlog
/// (`SYNC_READS_IN_FLIGHT_MAX + SYNC_BACKLOG_BYTES_MAX` of 1 MiB extents: 144 MiB) or the
/// target's receive pool (136 frames of 1 MiB + 8 KiB), plus the capture's cached request
/// buffers (256 of 64 KiB and 64 of 1 MiB: 80 MiB, `capture::server::Buffers`); beyond it
/// buffers come from the heap. All of it is pinned once registered.
pub const REGISTERED_ARENA_BYTES: usize = 240 << 20;

/// Target: outstanding disk operations it hands to its driver before it stops taking records.
pub const APPLY_OPS_QUEUED_MAX: usize = 4096;

const _: () = assert!(FRAME_BODY_BYTES_MAX >= 8 + RECORD_HEADER_BYTES + RECORD_PAYLOAD_BYTES_MAX);
const _: () = assert!(SHIP_FRAME_BYTES_TARGET <= FRAME_BODY_BYTES_MAX);
const _: () = assert!(SYNC_EXTENT_BYTES_DEFAULT <= SYNC_EXTENT_BYTES_MAX);
// The sync window fits in the ship window, so sync records never wait for window room alone.
const _: () = assert!(SYNC_BACKLOG_BYTES_MAX <= SHIP_WINDOW_BYTES_MAX);
const _: () =
    assert!(SHIP_WINDOW_BYTES_MAX >= 2 * (RECORD_HEADER_BYTES + RECORD_PAYLOAD_BYTES_MAX));
const _: () = assert!(
    40 + HASH_EXTENTS_PER_REQUEST_MAX / 8 + HASH_BLOCKS_PER_RESPONSE_MAX * 8
        <= FRAME_BODY_BYTES_MAX
);
const _: () =
    assert!(SYNC_EXTENT_BYTES_DEFAULT / SYNC_BLOCK_BYTES_DEFAULT <= HASH_BLOCKS_PER_RESPONSE_MAX);
const _: () = assert!(SYNC_BLOCK_BYTES_DEFAULT >= HASH_BLOCK_BYTES_MIN);
