//! Replication protocol frames: a 16-byte zerocopy header carrying magic, protocol version,
//! kind, flags, body length and a checksum, followed by a body. The same frames carry live
//! journal records, initial replication and resync (extent hashes, then `ResyncExtent`/`Zero`
//! records in the same ordered stream), and control (hello, welcome, acknowledgements, errors).
//!
//! Compatibility rule: the magic and the version field stay at bytes 0..6 in every protocol
//! version, so a peer of another version is told `WireError::Version { ours, theirs }` before
//! anything else of its frame is interpreted. Every length read from a peer is bounded
//! (`limits::FRAME_BODY_BYTES_MAX`, `limits::NAME_BYTES_MAX`, …) and checked before use: a bad
//! frame is an error, never a panic.
//!
//! Building frames: the `Frame::*` constructors encode straight into one buffer. Reading frames:
//! read `FRAME_HEADER_BYTES`, call [`decode_header`] (which bounds the body length), read the body,
//! then [`decode_frame`] over header and body (or [`split_frame`] over a byte stream).
//!
//! Control frames (`FrameKind::Control`) carry a versioned, bounded JSON document between the
//! appliances' control planes (planned failover, fencing, reprotect: `core::peer`), on the
//! control stream both ways, optionally followed by binary data (extent bytes, hashes) that
//! fills the rest of the body. The core state machines never see them: the ship and apply
//! sessions route them to their peer-control modules.
//!
//! Hello extension: after its disk list a Hello may carry the protected machines' settings
//! (`MachineSettings`: resource group, availability set, NICs) as a tagged, versioned JSON blob
//! of at most [`HELLO_SETTINGS_BYTES_MAX`] bytes, from which the target derives its settings. A
//! Hello without machines carries no extension and is byte-identical to one from before it, so
//! a source that omits it still works with a target that knows it.

use bytes::Bytes;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::config::MachineSettings;
use crate::core::record::{self, HeldRecord, Record, RecordError, Seq};
use crate::limits::{
    FRAME_BODY_BYTES_MAX, FRAME_HEADER_BYTES, HASH_BLOCKS_PER_RESPONSE_MAX, HASH_BLOCK_BYTES_MIN,
    HASH_EXTENTS_PER_REQUEST_MAX, HELLO_DISKS_MAX, NAME_BYTES_MAX, RECORD_HEADER_BYTES,
    SYNC_EXTENT_BYTES_MAX,
};

/// "FRYW" little-endian: the first bytes of every frame.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"FRYW");
/// The replication protocol version this build speaks. Peers must match exactly.
///
/// Version 2: hash requests name a span of extents with a mask of the wanted ones and a block
/// size, and responses carry one xxh3-64 per block of each wanted extent (version 1 had one
/// xxh3-128 per extent of a contiguous run), so a resync sends only the blocks that differ.
///
/// Version 3: a records frame's checksum covers the record headers, not the payloads (each
/// record's own checksum covers its payload), so every shipped byte is hashed once less at
/// both ends.
///
/// Version 4: records of kind `SyncRef` travel (a sync extent journaled as a header only, whose
/// payload a restart of the source lost; the target applies nothing for it), so a version 3
/// target, which would stop at the unknown kind mid-stream, is refused at the handshake.
pub const PROTOCOL_VERSION: u16 = 4;

/// Tag of the Hello's machine-settings extension ("MSET" little-endian).
const SETTINGS_TAG: u32 = u32::from_le_bytes(*b"MSET");
/// Version of the machine-settings extension this build writes and reads.
pub const SETTINGS_VERSION: u16 = 1;
/// Bound of the machine-settings JSON in a Hello (the disk list takes at most ~800 KiB of the
/// frame body, so both fit under `FRAME_BODY_BYTES_MAX`).
pub const HELLO_SETTINGS_BYTES_MAX: usize = 1 << 20;

/// Bound of the JSON document of a Control frame.
pub const CONTROL_JSON_BYTES_MAX: usize = 64 << 10;

/// Ack flag: the target saw a record beyond the next one it expects (a gap) and asks the source
/// to resend from `received_seq + 1`.
pub const ACK_FLAG_GAP: u8 = 1;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Source → target, first frame of a connection: who I am, what I protect.
    Hello = 1,
    /// Target → source: where to resume, and what the target holds per disk.
    Welcome = 2,
    /// Source → target: one or more journal records, in sequence order.
    Records = 3,
    /// Target → source: durable (and received) up to a sequence.
    Ack = 4,
    /// Source → target: hash these extents of a replica.
    HashRequest = 5,
    /// Target → source: the hashes asked for.
    HashResponse = 6,
    /// Either way: a fatal protocol error; the sender closes the connection after it.
    Error = 7,
    /// Either way, on the control stream: a control-plane message (versioned JSON).
    Control = 8,
}

impl FrameKind {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Records,
            4 => Self::Ack,
            5 => Self::HashRequest,
            6 => Self::HashResponse,
            7 => Self::Error,
            8 => Self::Control,
            _ => return None,
        })
    }
}

/// One record of a records frame being built (`Frame::records_held`).
#[derive(Clone, Copy, Debug)]
pub enum RecordBytes<'r> {
    /// An encoded record (as stored in the journal), copied into the frame.
    Encoded(&'r [u8]),
    /// A record held in memory: its payload is shared into the frame, not copied.
    Held(&'r HeldRecord),
}

/// The frame header. Little-endian and unaligned so it can be read from any buffer position.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct FrameHeader {
    pub magic: U32,
    pub version: U16,
    pub kind: u8,
    pub flags: u8,
    pub body_len: U32,
    /// Low 32 bits of xxh3-64 over the header (this field zero) and the body.
    pub checksum: U32,
}

const _: () = assert!(core::mem::size_of::<FrameHeader>() == FRAME_HEADER_BYTES);

/// Why bytes from a peer are not a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("bad frame magic {found:#010x}: the peer does not speak the Ferry protocol")]
    BadMagic { found: u32 },
    #[error("peer speaks replication protocol version {theirs}, this build speaks {ours}")]
    Version { ours: u16, theirs: u16 },
    #[error("unknown frame kind {found}")]
    UnknownKind { found: u8 },
    #[error("frame body of {found} bytes exceeds the limit of {FRAME_BODY_BYTES_MAX}")]
    Oversized { found: usize },
    #[error("frame checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("malformed {kind:?} frame: {reason}")]
    Malformed { kind: FrameKind, reason: String },
    #[error("record {index} of a records frame is invalid: {source}")]
    Record {
        index: usize,
        #[source]
        source: RecordError,
    },
}

fn malformed(kind: FrameKind, reason: impl Into<String>) -> WireError {
    WireError::Malformed {
        kind,
        reason: reason.into(),
    }
}

/// An encoded frame (header and body), ready to be written to a stream.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    /// The frame's bytes, or its first part when `pieces` is not empty.
    bytes: Vec<u8>,
    /// The rest of the frame, in order, as shared buffers (held sync payloads): sent as they
    /// are, without being copied into one buffer (`into_pieces`).
    pieces: Vec<Bytes>,
    /// `bytes` and `pieces` joined, made only when a contiguous view is asked for (tests, the
    /// simulator).
    joined: std::sync::OnceLock<Vec<u8>>,
}

impl core::fmt::Debug for Frame {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Frame")
            .field("kind", &FrameKind::from_u8(self.bytes[6]))
            .field("len", &self.len())
            .finish()
    }
}

/// A disk as announced in Hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskAnnouncement {
    pub disk_id: u32,
    pub size_bytes: u64,
    pub machine: String,
    pub name: String,
    pub group: String,
}

/// What the target holds for one disk, as told in Welcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WelcomeDisk {
    pub disk_id: u32,
    pub replica: ReplicaState,
    /// Size of the replica the target holds (0 when there is none).
    pub size_bytes: u64,
}

/// Whether the target has a replica of a disk, which decides how initial replication runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReplicaState {
    /// No replica yet (created zero-filled): copy every non-zero extent, no hash compare.
    Absent = 0,
    /// A replica exists (perhaps seeded from an old copy): hash-compare before sending.
    Present = 1,
}

/// Error codes carried by Error frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// A frame could not be decoded (see the message).
    Malformed = 1,
    /// The peer speaks another protocol version.
    Version = 2,
    /// A frame arrived that makes no sense in the current state.
    Protocol = 3,
    /// A record or request names a disk the peer does not know, or a range beyond its end.
    UnknownDisk = 4,
    /// The target holds more of the stream than the source's journal: the source lost its
    /// journal (or is a different appliance); an operator must resync.
    TargetAhead = 5,
    /// Anything else (the message says what).
    Internal = 6,
}

impl ErrorCode {
    pub fn from_u16(value: u16) -> Self {
        match value {
            1 => Self::Malformed,
            2 => Self::Version,
            3 => Self::Protocol,
            4 => Self::UnknownDisk,
            5 => Self::TargetAhead,
            _ => Self::Internal,
        }
    }
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloFixed {
    journal_first_seq: U64,
    journal_last_seq: U64,
    disk_count: U32,
    name_len: U16,
    reserved: U16,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct DiskFixed {
    disk_id: U32,
    reserved: U32,
    size_bytes: U64,
    machine_len: U16,
    name_len: U16,
    group_len: U16,
    reserved2: U16,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct SettingsFixed {
    tag: U32,
    version: U16,
    reserved: U16,
    json_len: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WelcomeFixed {
    resume_seq: U64,
    durable_seq: U64,
    disk_count: U32,
    reserved: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WelcomeDiskWire {
    disk_id: U32,
    replica: u8,
    reserved: [u8; 3],
    size_bytes: U64,
}

/// Where the first record's payload starts in a records frame (frame header, records header,
/// record header). The target receives frames so that this byte lands on an aligned address
/// (`FrameReceiver::align_frames`): a frame of one large record — every sync extent's — is
/// then written to the replica with O_DIRECT straight from the received bytes.
pub const RECORDS_FIRST_PAYLOAD_OFFSET: usize =
    FRAME_HEADER_BYTES + std::mem::size_of::<RecordsFixed>() + RECORD_HEADER_BYTES;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RecordsFixed {
    count: U32,
    reserved: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AckWire {
    durable_seq: U64,
    received_seq: U64,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HashFixed {
    request_id: U64,
    offset: U64,
    /// Response: the target's applied sequence when it read the extents (0 in requests).
    applied_seq: U64,
    disk_id: U32,
    /// Extents in the span from `offset`; a mask of `extent_count.div_ceil(8)` bytes follows
    /// (bit `i` of byte `i / 8`: extent `i` wanted).
    extent_count: U32,
    extent_bytes: U32,
    /// Each wanted extent is hashed in blocks of this size (a power of two, at least
    /// `HASH_BLOCK_BYTES_MIN`); a response carries one xxh3-64 per block after the mask.
    block_bytes: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ControlFixed {
    version: U16,
    reserved: U16,
    json_len: U32,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ErrorFixed {
    code: U16,
    message_len: U16,
    reserved: U32,
}

/// Which extents of a replica to hash: of the span of `extent_count` extents of `extent_bytes`
/// starting at `offset`, those whose index is in `wanted` (ascending, at least one; an extent
/// is cut short at the end of the disk), each in blocks of `block_bytes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashRequest {
    pub request_id: u64,
    pub disk_id: u32,
    pub offset: u64,
    pub extent_bytes: u32,
    pub extent_count: u32,
    pub block_bytes: u32,
    pub wanted: Vec<u32>,
}

impl HashRequest {
    /// Offset of each wanted extent, in order.
    pub fn wanted_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.wanted
            .iter()
            .map(|&index| self.offset + u64::from(index) * u64::from(self.extent_bytes))
    }
}

/// The block hashes of a `HashRequest`'s wanted extents, taken with every record up to
/// `applied_seq` applied (and none after): for each wanted extent in order,
/// `blocks_per_extent(extent_bytes, block_bytes)` xxh3-64 hashes ([`block_hash`]), the blocks
/// past the end of the disk as 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashResponse {
    pub request_id: u64,
    pub disk_id: u32,
    pub offset: u64,
    pub applied_seq: u64,
    pub extent_bytes: u32,
    pub extent_count: u32,
    pub block_bytes: u32,
    pub wanted: Vec<u32>,
    pub hashes: Vec<u64>,
}

impl HashResponse {
    /// Offset of each wanted extent, in order.
    pub fn wanted_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.wanted
            .iter()
            .map(|&index| self.offset + u64::from(index) * u64::from(self.extent_bytes))
    }
}

/// Blocks of `block_bytes` one extent of `extent_bytes` is hashed in.
pub fn blocks_per_extent(extent_bytes: u32, block_bytes: u32) -> usize {
    extent_bytes.div_ceil(block_bytes.max(1)) as usize
}

/// The hash of one block of an extent as compared by initial replication, resync and verify.
pub fn block_hash(block: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(block)
}

/// Appends the block hashes of `data` (blocks of `block_bytes`, the last one maybe short).
pub fn block_hashes(data: &[u8], block_bytes: usize, out: &mut Vec<u64>) {
    out.extend(data.chunks(block_bytes.max(1)).map(block_hash));
}

fn encode_mask(count: u32, wanted: &[u32]) -> Vec<u8> {
    let mut mask = vec![0u8; count.div_ceil(8) as usize];
    for &index in wanted {
        if let Some(byte) = mask.get_mut(index as usize / 8) {
            *byte |= 1 << (index % 8);
        }
    }
    mask
}

/// A decoded frame. Records borrow from the frame's bytes and have been verified (checksums).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Hello {
        source_name: String,
        journal_first_seq: Seq,
        journal_last_seq: Seq,
        disks: Vec<DiskAnnouncement>,
        /// The protected machines' source settings (empty from a source that sends none).
        machines: Vec<MachineSettings>,
    },
    /// `resume_seq`: the target holds every record up to here (send `resume_seq + 1` next);
    /// `durable_seq`: of those, durable up to here (the source may release up to it).
    Welcome {
        resume_seq: Seq,
        durable_seq: Seq,
        disks: Vec<WelcomeDisk>,
    },
    Records(Vec<Record<'a>>),
    Ack {
        durable_seq: Seq,
        received_seq: Seq,
        gap: bool,
    },
    HashRequest(HashRequest),
    HashResponse(HashResponse),
    Error {
        code: ErrorCode,
        message: String,
    },
    /// A control-plane document: `version` of its schema (the receiver judges it), the JSON (at
    /// most [`CONTROL_JSON_BYTES_MAX`] bytes) and the binary data after it (may be empty).
    Control {
        version: u16,
        json: &'a [u8],
        data: &'a [u8],
    },
}

fn frame_checksum(header: &FrameHeader, body: &[u8]) -> u32 {
    let mut zeroed = *header;
    zeroed.checksum = 0.into();
    use std::hash::Hasher as _;
    let mut hasher = twox_hash::XxHash3_64::new();
    hasher.write(zeroed.as_bytes());
    hasher.write(body);
    hasher.finish() as u32
}

/// Checksum of a records frame: the frame header, the records header and every record's header
/// (`record_headers`), not the payloads. Each record header carries an xxh3-64 over the record's
/// payload, which the receiver verifies record by record (and the padding after a payload must
/// be zero), so hashing the payloads into the frame checksum too would only cost a second pass
/// over every shipped byte at both ends.
fn records_frame_checksum<'a>(
    header: &FrameHeader,
    fixed: &[u8],
    record_headers: impl IntoIterator<Item = &'a [u8]>,
) -> u32 {
    let mut zeroed = *header;
    zeroed.checksum = 0.into();
    use std::hash::Hasher as _;
    let mut hasher = twox_hash::XxHash3_64::new();
    hasher.write(zeroed.as_bytes());
    hasher.write(fixed);
    for record_header in record_headers {
        hasher.write(record_header);
    }
    hasher.finish() as u32
}

/// The header bytes of each record in a records frame body built by this process (after the
/// records header). Stops at the first bytes that are not a whole record: a crafted body (tests)
/// is refused by the decoder before its checksum matters.
fn built_record_headers(records: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = records;
    std::iter::from_fn(move || {
        let (header, _) = record::RecordHeader::read_from_prefix(rest).ok()?;
        let used = record::encoded_len_for_payload(header.payload_len.get() as usize);
        if used > rest.len() {
            return None;
        }
        let (record_header, _) = rest.split_at(RECORD_HEADER_BYTES);
        rest = &rest[used..];
        Some(record_header)
    })
}

/// Incremental frame builder: header placeholder, body appended, header finished last.
struct Builder {
    kind: FrameKind,
    flags: u8,
    bytes: Vec<u8>,
}

impl Builder {
    fn new(kind: FrameKind, body_capacity: usize) -> Self {
        let mut bytes = Vec::with_capacity(FRAME_HEADER_BYTES + body_capacity);
        bytes.resize(FRAME_HEADER_BYTES, 0);
        Self {
            kind,
            flags: 0,
            bytes,
        }
    }

    fn put(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
    }

    fn finish(self) -> Frame {
        let body_len = self.bytes.len() - FRAME_HEADER_BYTES;
        // Frames are built by this process from bounded inputs; exceeding the bound is a bug.
        assert!(
            body_len <= FRAME_BODY_BYTES_MAX,
            "frame body {body_len} over the limit"
        );
        let mut header = FrameHeader {
            magic: FRAME_MAGIC.into(),
            version: PROTOCOL_VERSION.into(),
            kind: self.kind as u8,
            flags: self.flags,
            body_len: (body_len as u32).into(),
            checksum: 0.into(),
        };
        let body = &self.bytes[FRAME_HEADER_BYTES..];
        let checksum = if self.kind == FrameKind::Records {
            let fixed = body.len().min(std::mem::size_of::<RecordsFixed>());
            let (fixed, records) = body.split_at(fixed);
            records_frame_checksum(&header, fixed, built_record_headers(records))
        } else {
            frame_checksum(&header, body)
        };
        header.checksum = checksum.into();
        let mut bytes = self.bytes;
        bytes[..FRAME_HEADER_BYTES].copy_from_slice(header.as_bytes());
        Frame::contiguous(bytes)
    }
}

/// Truncates a string to at most `NAME_BYTES_MAX` bytes on a character boundary.
fn bounded_str(value: &str) -> &str {
    if value.len() <= NAME_BYTES_MAX {
        return value;
    }
    let mut end = NAME_BYTES_MAX;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// Why machine settings cannot travel in a Hello.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{count} machines' settings for one Hello (limit {HELLO_DISKS_MAX})")]
    TooMany { count: usize },
    #[error("machine settings encode to {bytes} bytes (limit {HELLO_SETTINGS_BYTES_MAX})")]
    TooLarge { bytes: usize },
    #[error("machine settings cannot be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Encodes the machines' settings as the Hello extension carries them, checking the bounds.
/// Run it on the configured machines before starting a source: [`Frame::hello`] asserts them.
pub fn encode_machine_settings(machines: &[MachineSettings]) -> Result<Vec<u8>, SettingsError> {
    if machines.len() > HELLO_DISKS_MAX {
        return Err(SettingsError::TooMany {
            count: machines.len(),
        });
    }
    let json = serde_json::to_vec(machines)?;
    if json.len() > HELLO_SETTINGS_BYTES_MAX {
        return Err(SettingsError::TooLarge { bytes: json.len() });
    }
    Ok(json)
}

impl Frame {
    /// Hello. Names longer than `NAME_BYTES_MAX` are cut (config validation should refuse them
    /// earlier); at most `HELLO_DISKS_MAX` disks are allowed; `machines` must pass
    /// [`encode_machine_settings`] (none: no extension).
    pub fn hello(
        source_name: &str,
        journal_first_seq: Seq,
        journal_last_seq: Seq,
        disks: &[DiskAnnouncement],
        machines: &[MachineSettings],
    ) -> Frame {
        assert!(
            disks.len() <= HELLO_DISKS_MAX,
            "too many disks for one Hello"
        );
        let settings = if machines.is_empty() {
            None
        } else {
            match encode_machine_settings(machines) {
                Ok(json) => Some(json),
                Err(error) => panic!("machine settings not checked before Hello: {error}"),
            }
        };
        let name = bounded_str(source_name);
        let mut builder = Builder::new(FrameKind::Hello, 64 + disks.len() * 64);
        builder.put(
            HelloFixed {
                journal_first_seq: journal_first_seq.into(),
                journal_last_seq: journal_last_seq.into(),
                disk_count: (disks.len() as u32).into(),
                name_len: (name.len() as u16).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
        builder.put(name.as_bytes());
        for disk in disks {
            let machine = bounded_str(&disk.machine);
            let disk_name = bounded_str(&disk.name);
            let group = bounded_str(&disk.group);
            builder.put(
                DiskFixed {
                    disk_id: disk.disk_id.into(),
                    reserved: 0.into(),
                    size_bytes: disk.size_bytes.into(),
                    machine_len: (machine.len() as u16).into(),
                    name_len: (disk_name.len() as u16).into(),
                    group_len: (group.len() as u16).into(),
                    reserved2: 0.into(),
                }
                .as_bytes(),
            );
            builder.put(machine.as_bytes());
            builder.put(disk_name.as_bytes());
            builder.put(group.as_bytes());
        }
        if let Some(json) = settings {
            builder.put(
                SettingsFixed {
                    tag: SETTINGS_TAG.into(),
                    version: SETTINGS_VERSION.into(),
                    reserved: 0.into(),
                    json_len: (json.len() as u32).into(),
                }
                .as_bytes(),
            );
            builder.put(&json);
        }
        builder.finish()
    }

    pub fn welcome(resume_seq: Seq, durable_seq: Seq, disks: &[WelcomeDisk]) -> Frame {
        assert!(
            disks.len() <= HELLO_DISKS_MAX,
            "too many disks for one Welcome"
        );
        let mut builder = Builder::new(FrameKind::Welcome, 16 + disks.len() * 16);
        builder.put(
            WelcomeFixed {
                resume_seq: resume_seq.into(),
                durable_seq: durable_seq.into(),
                disk_count: (disks.len() as u32).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
        for disk in disks {
            builder.put(
                WelcomeDiskWire {
                    disk_id: disk.disk_id.into(),
                    replica: disk.replica as u8,
                    reserved: [0; 3],
                    size_bytes: disk.size_bytes.into(),
                }
                .as_bytes(),
            );
        }
        builder.finish()
    }

    /// A records frame from already-encoded records (exact journal bytes, padding included).
    /// Each slice must hold exactly one encoded record; the receiver verifies each.
    pub fn records<'r>(encoded: impl IntoIterator<Item = &'r [u8]>) -> Frame {
        let records: Vec<RecordBytes<'r>> = encoded.into_iter().map(RecordBytes::Encoded).collect();
        let encoded_bytes = records
            .iter()
            .map(|record| match record {
                RecordBytes::Encoded(bytes) => bytes.len(),
                RecordBytes::Held(held) => held.encoded_len(),
            })
            .sum();
        Self::records_held(records, encoded_bytes)
    }

    /// A records frame of encoded records (`RecordBytes::Encoded`, copied into the frame) and
    /// held records (`RecordBytes::Held`, whose shared payloads become pieces of the frame,
    /// not copied); `encoded_bytes` is their total encoded length.
    pub fn records_held<'r>(
        records: impl IntoIterator<Item = RecordBytes<'r>>,
        encoded_bytes: usize,
    ) -> Frame {
        let fixed = RecordsFixed {
            count: 0.into(),
            reserved: 0.into(),
        };
        let fixed_bytes = std::mem::size_of::<RecordsFixed>();
        let body_len = fixed_bytes + encoded_bytes;
        // Frames are built by this process from bounded inputs; exceeding the bound is a bug.
        assert!(
            body_len <= FRAME_BODY_BYTES_MAX,
            "frame body {body_len} over the limit"
        );
        let records: Vec<RecordBytes<'r>> = records.into_iter().collect();
        // Room for what is copied: encoded records, and the headers and padding of held ones.
        let copied_bytes: usize = records
            .iter()
            .map(|record| match record {
                RecordBytes::Encoded(bytes) => bytes.len(),
                RecordBytes::Held(held) => RECORD_HEADER_BYTES + held.padding,
            })
            .sum();
        let mut head = Vec::with_capacity(FRAME_HEADER_BYTES + fixed_bytes + copied_bytes);
        head.resize(FRAME_HEADER_BYTES, 0);
        head.extend_from_slice(fixed.as_bytes());
        let mut pieces: Vec<Bytes> = Vec::new();
        // Bytes copied after the last piece (they become a piece before the next one).
        let mut run: Vec<u8> = Vec::new();
        let mut headers: Vec<[u8; RECORD_HEADER_BYTES]> = Vec::new();
        let mut count = 0u32;
        let mut written = 0usize;
        for record in records {
            let header = match record {
                RecordBytes::Encoded(bytes) => bytes,
                RecordBytes::Held(held) => &held.header[..],
            };
            let mut copied = [0u8; RECORD_HEADER_BYTES];
            let at = header.len().min(RECORD_HEADER_BYTES);
            copied[..at].copy_from_slice(&header[..at]);
            headers.push(copied);
            if pieces.is_empty() {
                head.extend_from_slice(header);
            } else {
                run.extend_from_slice(header);
            }
            match record {
                RecordBytes::Encoded(bytes) => written += bytes.len(),
                RecordBytes::Held(held) => {
                    if !run.is_empty() {
                        pieces.push(Bytes::from(std::mem::take(&mut run)));
                    }
                    pieces.push(held.payload.clone());
                    run.resize(held.padding, 0);
                    written += held.encoded_len();
                }
            }
            count += 1;
        }
        if !run.is_empty() {
            pieces.push(Bytes::from(run));
        }
        assert_eq!(written, encoded_bytes, "records frame size given wrongly");
        head[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + 4].copy_from_slice(&count.to_le_bytes());
        let mut header = FrameHeader {
            magic: FRAME_MAGIC.into(),
            version: PROTOCOL_VERSION.into(),
            kind: FrameKind::Records as u8,
            flags: 0,
            body_len: (body_len as u32).into(),
            checksum: 0.into(),
        };
        let checksum = records_frame_checksum(
            &header,
            &head[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + fixed_bytes],
            headers.iter().map(|header| &header[..]),
        );
        header.checksum = checksum.into();
        head[..FRAME_HEADER_BYTES].copy_from_slice(header.as_bytes());
        Frame {
            bytes: head,
            pieces,
            joined: std::sync::OnceLock::new(),
        }
    }

    /// A records frame encoding `records` (as read from the journal) straight into the frame:
    /// the bytes are exactly the journal encoding, re-verified as they are written.
    pub fn records_from<'r>(
        records: impl IntoIterator<Item = Record<'r>>,
    ) -> Result<Frame, RecordError> {
        let mut builder = Builder::new(FrameKind::Records, 64 << 10);
        builder.put(
            RecordsFixed {
                count: 0.into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
        let mut count = 0u32;
        for record in records {
            let start = builder.bytes.len();
            builder.bytes.resize(start + record.encoded_len(), 0);
            record.encode_into(&mut builder.bytes[start..])?;
            count += 1;
        }
        let count_at = FRAME_HEADER_BYTES;
        builder.bytes[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
        Ok(builder.finish())
    }

    pub fn ack(durable_seq: Seq, received_seq: Seq, gap: bool) -> Frame {
        let mut builder = Builder::new(FrameKind::Ack, 16);
        builder.flags = if gap { ACK_FLAG_GAP } else { 0 };
        builder.put(
            AckWire {
                durable_seq: durable_seq.into(),
                received_seq: received_seq.into(),
            }
            .as_bytes(),
        );
        builder.finish()
    }

    pub fn hash_request(request: &HashRequest) -> Frame {
        let mask = encode_mask(request.extent_count, &request.wanted);
        let mut builder = Builder::new(FrameKind::HashRequest, 40 + mask.len());
        builder.put(
            HashFixed {
                request_id: request.request_id.into(),
                offset: request.offset.into(),
                applied_seq: 0.into(),
                disk_id: request.disk_id.into(),
                extent_count: request.extent_count.into(),
                extent_bytes: request.extent_bytes.into(),
                block_bytes: request.block_bytes.into(),
            }
            .as_bytes(),
        );
        builder.put(&mask);
        builder.finish()
    }

    pub fn hash_response(response: &HashResponse) -> Frame {
        let mask = encode_mask(response.extent_count, &response.wanted);
        let mut builder = Builder::new(
            FrameKind::HashResponse,
            40 + mask.len() + response.hashes.len() * 8,
        );
        builder.put(
            HashFixed {
                request_id: response.request_id.into(),
                offset: response.offset.into(),
                applied_seq: response.applied_seq.into(),
                disk_id: response.disk_id.into(),
                extent_count: response.extent_count.into(),
                extent_bytes: response.extent_bytes.into(),
                block_bytes: response.block_bytes.into(),
            }
            .as_bytes(),
        );
        builder.put(&mask);
        for hash in &response.hashes {
            builder.put(&hash.to_le_bytes());
        }
        builder.finish()
    }

    pub fn error(code: ErrorCode, message: &str) -> Frame {
        let message = bounded_str(message);
        let mut builder = Builder::new(FrameKind::Error, 8 + message.len());
        builder.put(
            ErrorFixed {
                code: (code as u16).into(),
                message_len: (message.len() as u16).into(),
                reserved: 0.into(),
            }
            .as_bytes(),
        );
        builder.put(message.as_bytes());
        builder.finish()
    }

    /// A control frame. `json` must be at most [`CONTROL_JSON_BYTES_MAX`] bytes and the body at
    /// most `FRAME_BODY_BYTES_MAX` (the peer-control encoder checks both; exceeding them here is
    /// a bug).
    pub fn control(version: u16, json: &[u8], data: &[u8]) -> Frame {
        assert!(
            json.len() <= CONTROL_JSON_BYTES_MAX,
            "control document of {} bytes over the limit",
            json.len()
        );
        let mut builder = Builder::new(FrameKind::Control, 8 + json.len() + data.len());
        builder.put(
            ControlFixed {
                version: version.into(),
                reserved: 0.into(),
                json_len: (json.len() as u32).into(),
            }
            .as_bytes(),
        );
        builder.put(json);
        builder.put(data);
        builder.finish()
    }

    /// Rebuilds a frame from bytes received from a peer, verifying it completely.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Frame, WireError> {
        decode_frame(&bytes)?;
        Ok(Frame::contiguous(bytes))
    }

    pub fn kind(&self) -> FrameKind {
        // Every Frame is built by a constructor above or verified by `from_bytes`.
        FrameKind::from_u8(self.bytes[6]).expect("frame kind set by a constructor")
    }

    fn contiguous(bytes: Vec<u8>) -> Frame {
        Frame {
            bytes,
            pieces: Vec::new(),
            joined: std::sync::OnceLock::new(),
        }
    }

    /// The frame in one buffer (joined once if it was built in pieces).
    pub fn as_bytes(&self) -> &[u8] {
        if self.pieces.is_empty() {
            return &self.bytes;
        }
        self.joined.get_or_init(|| {
            let mut joined = Vec::with_capacity(self.len());
            joined.extend_from_slice(&self.bytes);
            for piece in &self.pieces {
                joined.extend_from_slice(piece);
            }
            joined
        })
    }

    /// The frame in one buffer (joined if it was built in pieces: prefer `into_pieces` to send).
    pub fn into_bytes(self) -> Vec<u8> {
        if self.pieces.is_empty() {
            return self.bytes;
        }
        self.as_bytes().to_vec()
    }

    /// The frame's bytes as the buffers it was built from, in order: the shared payloads of
    /// held records are not copied.
    pub fn into_pieces(self) -> Vec<Bytes> {
        let mut pieces = Vec::with_capacity(1 + self.pieces.len());
        pieces.push(Bytes::from(self.bytes));
        pieces.extend(self.pieces);
        pieces
    }

    pub fn len(&self) -> usize {
        self.bytes.len() + self.pieces.iter().map(Bytes::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes this frame (cannot fail for frames built here, but a peer's bytes are checked).
    pub fn decode(&self) -> Result<Message<'_>, WireError> {
        decode_frame(self.as_bytes())
    }
}

/// Checks a frame header read from a peer: magic, then version, then kind and body bound. The
/// checksum needs the body and is checked by [`decode_frame`].
pub fn decode_header(bytes: &[u8]) -> Result<FrameHeader, WireError> {
    let (header, _) = FrameHeader::read_from_prefix(bytes).map_err(|_| WireError::Truncated {
        needed: FRAME_HEADER_BYTES,
        available: bytes.len(),
    })?;
    if header.magic.get() != FRAME_MAGIC {
        return Err(WireError::BadMagic {
            found: header.magic.get(),
        });
    }
    if header.version.get() != PROTOCOL_VERSION {
        return Err(WireError::Version {
            ours: PROTOCOL_VERSION,
            theirs: header.version.get(),
        });
    }
    if FrameKind::from_u8(header.kind).is_none() {
        return Err(WireError::UnknownKind { found: header.kind });
    }
    let body_len = header.body_len.get() as usize;
    if body_len > FRAME_BODY_BYTES_MAX {
        return Err(WireError::Oversized { found: body_len });
    }
    Ok(header)
}

/// Splits the first complete frame off a byte stream: `Ok(None)` when more bytes are needed,
/// `Ok(Some(len))` when the first `len` bytes are one frame (to decode with [`decode_frame`]).
pub fn split_frame(stream: &[u8]) -> Result<Option<usize>, WireError> {
    if stream.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let header = decode_header(stream)?;
    let total = FRAME_HEADER_BYTES + header.body_len.get() as usize;
    Ok((stream.len() >= total).then_some(total))
}

/// A little cursor over a body that turns every short read into a `Malformed` error.
struct Reader<'a> {
    kind: FrameKind,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn fixed<T: FromBytes + KnownLayout + Immutable>(
        &mut self,
        what: &str,
    ) -> Result<T, WireError> {
        let (value, rest) = T::read_from_prefix(self.bytes)
            .map_err(|_| malformed(self.kind, format!("{what} truncated")))?;
        self.bytes = rest;
        Ok(value)
    }

    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < len {
            return Err(malformed(
                self.kind,
                format!("{what}: need {len} bytes, {} left", self.bytes.len()),
            ));
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn string(&mut self, len: usize, what: &str) -> Result<String, WireError> {
        if len > NAME_BYTES_MAX {
            return Err(malformed(
                self.kind,
                format!("{what} of {len} bytes is too long"),
            ));
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| malformed(self.kind, format!("{what} is not UTF-8")))
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(malformed(
                self.kind,
                format!("{} trailing bytes", self.bytes.len()),
            ))
        }
    }
}

/// Decodes one complete frame (exactly header + body) received from a peer.
pub fn decode_frame(bytes: &[u8]) -> Result<Message<'_>, WireError> {
    let header = decode_header(bytes)?;
    let body_len = header.body_len.get() as usize;
    let total = FRAME_HEADER_BYTES + body_len;
    if bytes.len() < total {
        return Err(WireError::Truncated {
            needed: total,
            available: bytes.len(),
        });
    }
    let kind =
        FrameKind::from_u8(header.kind).ok_or(WireError::UnknownKind { found: header.kind })?;
    if bytes.len() > total {
        return Err(malformed(
            kind,
            format!("{} bytes after the frame body", bytes.len() - total),
        ));
    }
    let body = &bytes[FRAME_HEADER_BYTES..total];
    let verify = |computed: u32| {
        if computed == header.checksum.get() {
            Ok(())
        } else {
            Err(WireError::Checksum {
                stored: header.checksum.get(),
                computed,
            })
        }
    };
    // A records frame's checksum covers the record headers only; it is checked once they are
    // parsed, each record's own checksum having covered its payload.
    if kind != FrameKind::Records {
        verify(frame_checksum(&header, body))?;
    }
    let mut reader = Reader { kind, bytes: body };
    let message = match kind {
        FrameKind::Hello => {
            let fixed: HelloFixed = reader.fixed("hello header")?;
            let disk_count = fixed.disk_count.get() as usize;
            if disk_count > HELLO_DISKS_MAX {
                return Err(malformed(
                    kind,
                    format!("{disk_count} disks (limit {HELLO_DISKS_MAX})"),
                ));
            }
            let source_name = reader.string(fixed.name_len.get() as usize, "source name")?;
            let mut disks = Vec::with_capacity(disk_count);
            for _ in 0..disk_count {
                let disk: DiskFixed = reader.fixed("disk entry")?;
                let machine = reader.string(disk.machine_len.get() as usize, "machine name")?;
                let name = reader.string(disk.name_len.get() as usize, "disk name")?;
                let group = reader.string(disk.group_len.get() as usize, "group name")?;
                disks.push(DiskAnnouncement {
                    disk_id: disk.disk_id.get(),
                    size_bytes: disk.size_bytes.get(),
                    machine,
                    name,
                    group,
                });
            }
            let machines = if reader.bytes.is_empty() {
                Vec::new()
            } else {
                decode_machine_settings(&mut reader)?
            };
            reader.finish()?;
            Message::Hello {
                source_name,
                journal_first_seq: fixed.journal_first_seq.get(),
                journal_last_seq: fixed.journal_last_seq.get(),
                disks,
                machines,
            }
        }
        FrameKind::Welcome => {
            let fixed: WelcomeFixed = reader.fixed("welcome header")?;
            let disk_count = fixed.disk_count.get() as usize;
            if disk_count > HELLO_DISKS_MAX {
                return Err(malformed(
                    kind,
                    format!("{disk_count} disks (limit {HELLO_DISKS_MAX})"),
                ));
            }
            let mut disks = Vec::with_capacity(disk_count);
            for _ in 0..disk_count {
                let disk: WelcomeDiskWire = reader.fixed("welcome disk")?;
                let replica = match disk.replica {
                    0 => ReplicaState::Absent,
                    1 => ReplicaState::Present,
                    other => return Err(malformed(kind, format!("replica state {other}"))),
                };
                disks.push(WelcomeDisk {
                    disk_id: disk.disk_id.get(),
                    replica,
                    size_bytes: disk.size_bytes.get(),
                });
            }
            reader.finish()?;
            Message::Welcome {
                resume_seq: fixed.resume_seq.get(),
                durable_seq: fixed.durable_seq.get(),
                disks,
            }
        }
        FrameKind::Records => {
            let fixed: RecordsFixed = reader.fixed("records header")?;
            let count = fixed.count.get() as usize;
            if count == 0 {
                return Err(malformed(kind, "no records"));
            }
            // Each record takes at least a header, which bounds `count` by the body size.
            let records_max = reader.bytes.len() / record::encoded_len_for_payload(0);
            if count > records_max {
                return Err(malformed(
                    kind,
                    format!("{count} records cannot fit in the body"),
                ));
            }
            let fixed_bytes = &body[..std::mem::size_of::<RecordsFixed>()];
            let mut records = Vec::with_capacity(count);
            let mut record_headers = Vec::with_capacity(count);
            for index in 0..count {
                let (record, used) = record::decode(reader.bytes)
                    .map_err(|source| WireError::Record { index, source })?;
                if used != record.encoded_len() {
                    return Err(malformed(kind, format!("record {index} is cut short")));
                }
                // Neither checksum covers the alignment padding: it must be zero.
                let payload_end = RECORD_HEADER_BYTES + record.payload.len();
                if reader.bytes[payload_end..used]
                    .iter()
                    .any(|&byte| byte != 0)
                {
                    return Err(malformed(
                        kind,
                        format!("record {index} has non-zero padding"),
                    ));
                }
                record_headers.push(&reader.bytes[..RECORD_HEADER_BYTES]);
                reader.bytes = &reader.bytes[used..];
                records.push(record);
            }
            reader.finish()?;
            verify(records_frame_checksum(&header, fixed_bytes, record_headers))?;
            Message::Records(records)
        }
        FrameKind::Ack => {
            let ack: AckWire = reader.fixed("ack")?;
            reader.finish()?;
            Message::Ack {
                durable_seq: ack.durable_seq.get(),
                received_seq: ack.received_seq.get(),
                gap: header.flags & ACK_FLAG_GAP != 0,
            }
        }
        FrameKind::HashRequest | FrameKind::HashResponse => {
            let fixed: HashFixed = reader.fixed("hash header")?;
            let extent_count = fixed.extent_count.get();
            let extent_bytes = fixed.extent_bytes.get();
            let block_bytes = fixed.block_bytes.get();
            if extent_count == 0 || extent_count as usize > HASH_EXTENTS_PER_REQUEST_MAX {
                return Err(malformed(kind, format!("{extent_count} extents")));
            }
            if extent_bytes == 0 || extent_bytes as usize > SYNC_EXTENT_BYTES_MAX {
                return Err(malformed(kind, format!("extent of {extent_bytes} bytes")));
            }
            if !block_bytes.is_power_of_two() || (block_bytes as usize) < HASH_BLOCK_BYTES_MIN {
                return Err(malformed(
                    kind,
                    format!(
                        "block of {block_bytes} bytes (a power of two of at least {HASH_BLOCK_BYTES_MIN})"
                    ),
                ));
            }
            let offset = fixed.offset.get();
            if offset
                .checked_add(u64::from(extent_count) * u64::from(extent_bytes))
                .is_none()
            {
                return Err(malformed(kind, "extent range overflows"));
            }
            let mask = reader.take(extent_count.div_ceil(8) as usize, "extent mask")?;
            let wanted: Vec<u32> = (0..extent_count)
                .filter(|index| mask[*index as usize / 8] & (1 << (index % 8)) != 0)
                .collect();
            let spare_bits = mask.len() as u32 * 8 - extent_count;
            if spare_bits > 0 && mask[mask.len() - 1] >> (8 - spare_bits) != 0 {
                return Err(malformed(
                    kind,
                    "extent mask has bits past the extent count",
                ));
            }
            if wanted.is_empty() {
                return Err(malformed(kind, "no extent wanted"));
            }
            let blocks = wanted.len() * blocks_per_extent(extent_bytes, block_bytes);
            if blocks > HASH_BLOCKS_PER_RESPONSE_MAX {
                return Err(malformed(
                    kind,
                    format!("{blocks} block hashes (limit {HASH_BLOCKS_PER_RESPONSE_MAX})"),
                ));
            }
            if kind == FrameKind::HashRequest {
                reader.finish()?;
                Message::HashRequest(HashRequest {
                    request_id: fixed.request_id.get(),
                    disk_id: fixed.disk_id.get(),
                    offset,
                    extent_bytes,
                    extent_count,
                    block_bytes,
                    wanted,
                })
            } else {
                let bytes = reader.take(blocks * 8, "block hashes")?;
                let hashes = bytes
                    .chunks_exact(8)
                    .map(|chunk| {
                        let mut array = [0u8; 8];
                        array.copy_from_slice(chunk);
                        u64::from_le_bytes(array)
                    })
                    .collect();
                reader.finish()?;
                Message::HashResponse(HashResponse {
                    request_id: fixed.request_id.get(),
                    disk_id: fixed.disk_id.get(),
                    offset,
                    applied_seq: fixed.applied_seq.get(),
                    extent_bytes,
                    extent_count,
                    block_bytes,
                    wanted,
                    hashes,
                })
            }
        }
        FrameKind::Error => {
            let fixed: ErrorFixed = reader.fixed("error header")?;
            let len = fixed.message_len.get() as usize;
            let bytes = reader.take(len.min(NAME_BYTES_MAX), "error message")?;
            let message = String::from_utf8_lossy(bytes).into_owned();
            reader.finish()?;
            Message::Error {
                code: ErrorCode::from_u16(fixed.code.get()),
                message,
            }
        }
        FrameKind::Control => {
            let fixed: ControlFixed = reader.fixed("control header")?;
            let len = fixed.json_len.get() as usize;
            if len > CONTROL_JSON_BYTES_MAX {
                return Err(malformed(
                    kind,
                    format!("control document of {len} bytes (limit {CONTROL_JSON_BYTES_MAX})"),
                ));
            }
            let json = reader.take(len, "control document")?;
            let data = reader.take(reader.bytes.len(), "control data")?;
            Message::Control {
                version: fixed.version.get(),
                json,
                data,
            }
        }
    };
    Ok(message)
}

/// Decodes the Hello's machine-settings extension (tag, version, bounded JSON).
fn decode_machine_settings(reader: &mut Reader<'_>) -> Result<Vec<MachineSettings>, WireError> {
    let kind = reader.kind;
    let fixed: SettingsFixed = reader.fixed("machine settings header")?;
    if fixed.tag.get() != SETTINGS_TAG {
        return Err(malformed(
            kind,
            format!("unknown extension tag {:#010x}", fixed.tag.get()),
        ));
    }
    if fixed.version.get() != SETTINGS_VERSION {
        return Err(malformed(
            kind,
            format!(
                "machine settings version {}, this build reads {SETTINGS_VERSION}",
                fixed.version.get()
            ),
        ));
    }
    let len = fixed.json_len.get() as usize;
    if len > HELLO_SETTINGS_BYTES_MAX {
        return Err(malformed(
            kind,
            format!("machine settings of {len} bytes (limit {HELLO_SETTINGS_BYTES_MAX})"),
        ));
    }
    let json = reader.take(len, "machine settings")?;
    let machines: Vec<MachineSettings> = serde_json::from_slice(json)
        .map_err(|error| malformed(kind, format!("machine settings: {error}")))?;
    if machines.len() > HELLO_DISKS_MAX {
        return Err(malformed(
            kind,
            format!("{} machines (limit {HELLO_DISKS_MAX})", machines.len()),
        ));
    }
    Ok(machines)
}

/// The hash of an extent's bytes as used by initial replication, resync and verify.
pub fn extent_hash(data: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::RecordKind;

    #[test]
    fn a_records_frame_built_in_pieces_is_the_contiguous_one() {
        let payloads: Vec<Vec<u8>> = [4096usize, 5, 0, 1 << 20]
            .iter()
            .map(|&len| (0..len).map(|index| (index * 7 + len) as u8).collect())
            .collect();
        let records: Vec<Record<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(index, payload)| Record {
                kind: RecordKind::ResyncExtent,
                disk_id: 1,
                seq: 10 + index as u64,
                offset: 4096 * index as u64,
                length: payload.len() as u64,
                timestamp_ns: 3,
                payload,
            })
            .collect();
        let encoded: Vec<Vec<u8>> = records.iter().map(|r| r.to_vec().unwrap()).collect();
        let held: Vec<HeldRecord> = records
            .iter()
            .map(|record| {
                record
                    .to_held(Bytes::copy_from_slice(record.payload))
                    .unwrap()
            })
            .collect();
        // Held and encoded records mixed, in both orders.
        let mixed: Vec<RecordBytes<'_>> = (0..records.len())
            .map(|index| match index % 2 {
                0 => RecordBytes::Held(&held[index]),
                _ => RecordBytes::Encoded(&encoded[index]),
            })
            .collect();
        let total: usize = encoded.iter().map(Vec::len).sum();
        let contiguous = Frame::records(encoded.iter().map(Vec::as_slice));
        let pieces = Frame::records_held(mixed, total);
        assert_eq!(pieces.len(), contiguous.len());
        assert_eq!(pieces.as_bytes(), contiguous.as_bytes());
        let sent: Vec<u8> = pieces.into_pieces().concat();
        assert_eq!(sent, contiguous.as_bytes());
        // The first payload starts where the target aligns received frames.
        let first = &payloads[0];
        assert_eq!(
            &sent[RECORDS_FIRST_PAYLOAD_OFFSET..RECORDS_FIRST_PAYLOAD_OFFSET + first.len()],
            &first[..]
        );
        match decode_frame(&sent).unwrap() {
            Message::Records(decoded) => {
                assert_eq!(decoded.len(), records.len());
                for (decoded, record) in decoded.iter().zip(&records) {
                    assert_eq!((decoded.seq, decoded.payload), (record.seq, record.payload));
                }
            }
            other => panic!("not records: {other:?}"),
        }
    }

    fn sample_disks() -> Vec<DiskAnnouncement> {
        vec![
            DiskAnnouncement {
                disk_id: 1,
                size_bytes: 1 << 30,
                machine: "web-1".into(),
                name: "root".into(),
                group: "shop".into(),
            },
            DiskAnnouncement {
                disk_id: 2,
                size_bytes: 4096,
                machine: "db-1".into(),
                name: "data".into(),
                group: "".into(),
            },
        ]
    }

    fn sample_machines() -> Vec<MachineSettings> {
        vec![MachineSettings {
            name: "web-1".into(),
            resource_group: Some("rg-prod".into()),
            availability_set: Some("web".into()),
            nics: vec![crate::config::NicConfig {
                network: "prod".into(),
                subnet: "front".into(),
                ip: Some("10.0.0.5".parse().unwrap()),
            }],
            test_network: None,
        }]
    }

    fn all_frames() -> Vec<Frame> {
        let payload = vec![7u8; 100];
        let write = Record {
            kind: RecordKind::Write,
            disk_id: 1,
            seq: 5,
            offset: 4096,
            length: 100,
            timestamp_ns: 9,
            payload: &payload,
        }
        .to_vec()
        .unwrap();
        let zero = Record {
            kind: RecordKind::Zero,
            disk_id: 2,
            seq: 6,
            offset: 0,
            length: 4096,
            timestamp_ns: 10,
            payload: &[],
        }
        .to_vec()
        .unwrap();
        vec![
            Frame::hello("site-a", 3, 9, &sample_disks(), &sample_machines()),
            Frame::hello("site-a", 3, 9, &sample_disks(), &[]),
            Frame::welcome(
                4,
                2,
                &[WelcomeDisk {
                    disk_id: 1,
                    replica: ReplicaState::Present,
                    size_bytes: 1 << 30,
                }],
            ),
            Frame::records([write.as_slice(), zero.as_slice()]),
            Frame::ack(10, 12, true),
            Frame::hash_request(&HashRequest {
                request_id: 3,
                disk_id: 1,
                offset: 1 << 20,
                extent_bytes: 65536,
                extent_count: 12,
                block_bytes: 16384,
                wanted: vec![0, 2, 11],
            }),
            Frame::hash_response(&HashResponse {
                request_id: 3,
                disk_id: 1,
                offset: 1 << 20,
                applied_seq: 17,
                extent_bytes: 65536,
                extent_count: 12,
                block_bytes: 16384,
                wanted: vec![0, 2, 11],
                hashes: (1..=12).chain([u64::MAX]).skip(1).collect(),
            }),
            Frame::error(
                ErrorCode::TargetAhead,
                "target holds seq 10, source journal ends at 4",
            ),
            Frame::control(
                1,
                br#"{"type":"failed-over-groups","groups":["shop"]}"#,
                b"xyz",
            ),
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        let frames = all_frames();
        match frames[0].decode().unwrap() {
            Message::Hello {
                source_name,
                journal_first_seq,
                journal_last_seq,
                disks,
                machines,
            } => {
                assert_eq!(source_name, "site-a");
                assert_eq!((journal_first_seq, journal_last_seq), (3, 9));
                assert_eq!(disks, sample_disks());
                assert_eq!(machines, sample_machines());
            }
            other => panic!("decoded {other:?}"),
        }
        let frames = &frames[1..];
        match frames[0].decode().unwrap() {
            Message::Hello {
                disks, machines, ..
            } => {
                assert_eq!(disks, sample_disks());
                assert!(machines.is_empty());
            }
            other => panic!("decoded {other:?}"),
        }
        match frames[1].decode().unwrap() {
            Message::Welcome {
                resume_seq,
                durable_seq,
                disks,
            } => {
                assert_eq!((resume_seq, durable_seq), (4, 2));
                assert_eq!(disks.len(), 1);
                assert_eq!(disks[0].replica, ReplicaState::Present);
            }
            other => panic!("decoded {other:?}"),
        }
        match frames[2].decode().unwrap() {
            Message::Records(records) => {
                assert_eq!(records.len(), 2);
                assert_eq!(records[0].seq, 5);
                assert_eq!(records[0].payload, &[7u8; 100][..]);
                assert_eq!(records[1].kind, RecordKind::Zero);
            }
            other => panic!("decoded {other:?}"),
        }
        assert_eq!(
            frames[3].decode().unwrap(),
            Message::Ack {
                durable_seq: 10,
                received_seq: 12,
                gap: true
            }
        );
        match frames[4].decode().unwrap() {
            Message::HashRequest(request) => {
                assert_eq!((request.extent_count, request.block_bytes), (12, 16384));
                assert_eq!(request.wanted, vec![0, 2, 11]);
                assert_eq!(
                    request.wanted_offsets().collect::<Vec<_>>(),
                    vec![1 << 20, (1 << 20) + 2 * 65536, (1 << 20) + 11 * 65536]
                );
            }
            other => panic!("decoded {other:?}"),
        }
        match frames[5].decode().unwrap() {
            Message::HashResponse(response) => {
                assert_eq!(response.wanted, vec![0, 2, 11]);
                assert_eq!(response.hashes.len(), 3 * 4);
                assert_eq!(response.hashes[0], 2);
                assert_eq!(response.hashes[11], u64::MAX);
            }
            other => panic!("decoded {other:?}"),
        }
        match frames[6].decode().unwrap() {
            Message::Error { code, message } => {
                assert_eq!(code, ErrorCode::TargetAhead);
                assert!(message.contains("seq 10"));
            }
            other => panic!("decoded {other:?}"),
        }
        match frames[7].decode().unwrap() {
            Message::Control {
                version,
                json,
                data,
            } => {
                assert_eq!(version, 1);
                assert!(json.starts_with(br#"{"type""#));
                assert_eq!(data, b"xyz");
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn oversized_control_documents_are_refused() {
        let mut builder = Builder::new(FrameKind::Control, 16);
        builder.put(
            ControlFixed {
                version: 1.into(),
                reserved: 0.into(),
                json_len: ((CONTROL_JSON_BYTES_MAX + 1) as u32).into(),
            }
            .as_bytes(),
        );
        let error = builder.finish().decode().unwrap_err();
        assert!(error.to_string().contains("limit"), "{error}");
        let largest = vec![b' '; CONTROL_JSON_BYTES_MAX];
        assert!(matches!(
            Frame::control(1, &largest, &[]).decode().unwrap(),
            Message::Control { json, .. } if json.len() == CONTROL_JSON_BYTES_MAX
        ));
    }

    #[test]
    fn bad_machine_settings_extensions_are_refused() {
        // A Hello with no disks, then an extension as a peer might craft it.
        let hello_with = |extension: &[u8]| {
            let mut builder = Builder::new(FrameKind::Hello, 64);
            builder.put(
                HelloFixed {
                    journal_first_seq: 0.into(),
                    journal_last_seq: 0.into(),
                    disk_count: 0.into(),
                    name_len: 0.into(),
                    reserved: 0.into(),
                }
                .as_bytes(),
            );
            builder.put(extension);
            builder.finish()
        };
        let extension = |tag: u32, version: u16, json_len: u32, json: &[u8]| {
            let mut bytes = SettingsFixed {
                tag: tag.into(),
                version: version.into(),
                reserved: 0.into(),
                json_len: json_len.into(),
            }
            .as_bytes()
            .to_vec();
            bytes.extend_from_slice(json);
            bytes
        };
        let good = serde_json::to_vec(&sample_machines()).unwrap();
        let len = good.len() as u32;
        match hello_with(&extension(SETTINGS_TAG, SETTINGS_VERSION, len, &good))
            .decode()
            .unwrap()
        {
            Message::Hello { machines, .. } => assert_eq!(machines, sample_machines()),
            other => panic!("decoded {other:?}"),
        }
        let reason = |result: Result<Message<'_>, WireError>| match result {
            Err(WireError::Malformed { kind, reason }) => {
                assert_eq!(kind, FrameKind::Hello);
                reason
            }
            other => panic!("expected a malformed Hello, got {other:?}"),
        };
        assert!(
            reason(hello_with(&extension(0, SETTINGS_VERSION, len, &good)).decode())
                .contains("tag")
        );
        assert!(
            reason(hello_with(&extension(SETTINGS_TAG, 9, len, &good)).decode())
                .contains("version 9")
        );
        let huge = (HELLO_SETTINGS_BYTES_MAX + 1) as u32;
        assert!(
            reason(hello_with(&extension(SETTINGS_TAG, 1, huge, &good)).decode()).contains("limit")
        );
        assert!(
            reason(hello_with(&extension(SETTINGS_TAG, 1, len + 1, &good)).decode())
                .contains("need")
        );
        assert!(
            reason(hello_with(&extension(SETTINGS_TAG, 1, 5, b"[{]}x")).decode())
                .contains("settings")
        );
        let mut trailing = extension(SETTINGS_TAG, 1, len, &good);
        trailing.push(0);
        assert!(reason(hello_with(&trailing).decode()).contains("trailing"));
        assert!(reason(hello_with(&[1, 2, 3]).decode()).contains("truncated"));
        // Too much to send is refused before a Hello is built.
        let mut many = sample_machines();
        many[0].name = "x".repeat(HELLO_SETTINGS_BYTES_MAX);
        assert!(matches!(
            encode_machine_settings(&many),
            Err(SettingsError::TooLarge { .. })
        ));
    }

    #[test]
    fn other_protocol_version_gets_a_clear_error() {
        let mut bytes = Frame::ack(1, 1, false).into_bytes();
        bytes[4..6].copy_from_slice(&7u16.to_le_bytes());
        let error = decode_frame(&bytes).unwrap_err();
        assert_eq!(
            error,
            WireError::Version {
                ours: PROTOCOL_VERSION,
                theirs: 7
            }
        );
        assert!(error.to_string().contains("version 7"));
        // The version is judged before the kind or the body, whatever a future version puts there.
        bytes[6] = 200;
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_header(&bytes).unwrap_err(),
            WireError::Version {
                ours: PROTOCOL_VERSION,
                theirs: 7
            }
        );
    }

    #[test]
    fn older_peers_are_refused_by_name() {
        // Version 1 hashed whole extents (xxh3-128 each); version 3 does not know `SyncRef`
        // records: their frames must never be read as ours.
        for old in [1u16, 3] {
            let mut bytes = Frame::hello("old-site", 0, 0, &[], &[]).into_bytes();
            bytes[4..6].copy_from_slice(&old.to_le_bytes());
            let error = decode_frame(&bytes).unwrap_err();
            assert_eq!(
                error,
                WireError::Version {
                    ours: 4,
                    theirs: old
                }
            );
            assert_eq!(
                error.to_string(),
                format!("peer speaks replication protocol version {old}, this build speaks 4")
            );
        }
    }

    #[test]
    fn block_hashes_cover_every_block_and_the_short_tail() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut hashes = Vec::new();
        block_hashes(&data, 4096, &mut hashes);
        assert_eq!(hashes.len(), 3);
        assert_eq!(hashes[2], block_hash(&data[8192..]));
        assert_eq!(blocks_per_extent(10_000, 4096), 3);
        assert_eq!(blocks_per_extent(1 << 20, 4096), 256);
    }

    #[test]
    fn bad_frames_give_errors() {
        let good = Frame::ack(1, 1, false).into_bytes();
        let mut unknown = good.clone();
        unknown[6] = 99;
        assert_eq!(
            decode_frame(&unknown).unwrap_err(),
            WireError::UnknownKind { found: 99 }
        );
        let mut oversized = good.clone();
        oversized[8..12].copy_from_slice(&((FRAME_BODY_BYTES_MAX + 1) as u32).to_le_bytes());
        assert!(matches!(
            decode_frame(&oversized).unwrap_err(),
            WireError::Oversized { .. }
        ));
        assert!(matches!(
            decode_frame(&good[..20]).unwrap_err(),
            WireError::Truncated { .. }
        ));
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert!(matches!(
            decode_frame(&magic).unwrap_err(),
            WireError::BadMagic { .. }
        ));
        assert_eq!(split_frame(&good[..10]).unwrap(), None);
        assert_eq!(split_frame(&good[..20]).unwrap(), None);
        assert_eq!(split_frame(&good).unwrap(), Some(good.len()));
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error_not_a_panic() {
        for frame in all_frames() {
            let bytes = frame.as_bytes();
            for len in 0..bytes.len() {
                assert!(
                    decode_frame(&bytes[..len]).is_err(),
                    "{frame:?} cut at {len} decoded"
                );
            }
            for bit in 0..bytes.len() * 8 {
                let mut flipped = bytes.to_vec();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    decode_frame(&flipped).is_err(),
                    "{frame:?} bit {bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn crafted_bodies_with_valid_checksums_are_refused() {
        // A peer that computes checksums correctly but lies about counts and lengths.
        let craft = |kind: FrameKind, body: &[u8]| {
            let mut builder = Builder::new(kind, body.len());
            builder.put(body);
            builder.finish()
        };
        let mut hello = HelloFixed {
            journal_first_seq: 0.into(),
            journal_last_seq: 0.into(),
            disk_count: 1_000_000.into(),
            name_len: 0.into(),
            reserved: 0.into(),
        };
        assert!(craft(FrameKind::Hello, hello.as_bytes()).decode().is_err());
        hello.disk_count = 1.into();
        assert!(craft(FrameKind::Hello, hello.as_bytes()).decode().is_err());
        let records = RecordsFixed {
            count: u32::MAX.into(),
            reserved: 0.into(),
        };
        assert!(craft(FrameKind::Records, records.as_bytes())
            .decode()
            .is_err());
        let hash = HashFixed {
            request_id: 0.into(),
            offset: u64::MAX.into(),
            applied_seq: 0.into(),
            disk_id: 1.into(),
            extent_count: 2.into(),
            extent_bytes: 4096.into(),
            block_bytes: 4096.into(),
        };
        let with_mask = |fixed: HashFixed, mask: &[u8]| {
            let mut body = fixed.as_bytes().to_vec();
            body.extend_from_slice(mask);
            body
        };
        // Offset overflow, no mask, no extent wanted, bits past the count.
        assert!(craft(FrameKind::HashRequest, &with_mask(hash, &[1]))
            .decode()
            .is_err());
        let mut hash = hash;
        hash.offset = 0.into();
        assert!(craft(FrameKind::HashRequest, &with_mask(hash, &[1]))
            .decode()
            .is_ok());
        assert!(craft(FrameKind::HashRequest, hash.as_bytes())
            .decode()
            .is_err());
        assert!(craft(FrameKind::HashRequest, &with_mask(hash, &[0]))
            .decode()
            .is_err());
        assert!(craft(FrameKind::HashRequest, &with_mask(hash, &[4]))
            .decode()
            .is_err());
        // Blocks that are too small or not a power of two, too many block hashes.
        for block_bytes in [0u32, 256, 3000] {
            let mut bad = hash;
            bad.block_bytes = block_bytes.into();
            assert!(craft(FrameKind::HashRequest, &with_mask(bad, &[1]))
                .decode()
                .is_err());
        }
        let mut many = hash;
        many.extent_count = 256.into();
        many.extent_bytes = (1 << 20).into();
        many.block_bytes = 512.into();
        assert!(craft(FrameKind::HashRequest, &with_mask(many, &[0xff; 32]))
            .decode()
            .is_err());
        // A response whose hashes are cut short.
        let mut response = with_mask(hash, &[3]);
        response.extend_from_slice(&[0u8; 8]);
        assert!(craft(FrameKind::HashResponse, &response).decode().is_err());
        response.extend_from_slice(&[0u8; 8]);
        assert!(craft(FrameKind::HashResponse, &response).decode().is_ok());
        assert!(craft(FrameKind::Ack, &[0u8; 15]).decode().is_err());
        assert!(craft(FrameKind::Ack, &[0u8; 17]).decode().is_err());
        let mut bad_name = hello;
        bad_name.disk_count = 0.into();
        bad_name.name_len = 2.into();
        let mut body = bad_name.as_bytes().to_vec();
        body.extend_from_slice(&[0xff, 0xfe]);
        assert!(craft(FrameKind::Hello, &body).decode().is_err());
    }
}
