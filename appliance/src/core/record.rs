//! The journal record: a 64-byte zerocopy header followed by its payload. The same bytes are
//! stored in the source's cache journal and sent over the wire, so a record is checksummed once
//! when it is made and verified wherever it is read.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::limits::{RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES, RECORD_PAYLOAD_BYTES_MAX};

/// "FRY1" little-endian: the first bytes of every record.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"FRY1");
/// Format version of the record header; bumped on any incompatible change.
pub const RECORD_VERSION: u16 = 1;

/// A journal sequence number. Sequence 0 means "nothing"; the first record is 1.
pub type Seq = u64;

/// What a record says happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// `length` bytes of payload written at `offset`.
    Write = 1,
    /// `length` bytes at `offset` now read as zeroes (NBD WRITE_ZEROES); no payload.
    Zero = 2,
    /// `length` bytes at `offset` discarded (NBD TRIM); the target zeroes them, no payload.
    Trim = 3,
    /// A recovery-point marker; the payload describes the point, `offset`/`length` are unused.
    Marker = 4,
    /// An extent copied from the source disk by initial replication or resync; payload as Write.
    ResyncExtent = 5,
    /// The journal's stand-in for a `ResyncExtent` whose payload the source holds in memory
    /// until the target acknowledges it (`core::source`, "Sync payloads"): header only, with
    /// the extent's `offset` and `length`. Shipped as the full `ResyncExtent` while the payload
    /// is held; one left in the journal after a restart lost its payload, and is shipped as is:
    /// the target does nothing with it, and the source resyncs its extent.
    SyncRef = 6,
    /// Every sequence number below this record's that the target does not hold was given up:
    /// the source's journal restarted past them after its host went down
    /// (`Journal::restart_at`), and the target may hold records under some of them that the
    /// source lost, or lack records the source dropped. Header only (`disk_id`, `offset`,
    /// `length` 0); the target applies nothing and continues from this sequence, and the
    /// source resyncs every disk, which covers whatever those records changed.
    Skip = 7,
}

impl RecordKind {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Write,
            2 => Self::Zero,
            3 => Self::Trim,
            4 => Self::Marker,
            5 => Self::ResyncExtent,
            6 => Self::SyncRef,
            7 => Self::Skip,
            _ => return None,
        })
    }

    /// Whether the payload carries the data of the byte range (so `payload.len() == length`).
    pub fn carries_data(self) -> bool {
        matches!(self, Self::Write | Self::ResyncExtent)
    }
}

/// On-disk and on-wire header. Every field is little-endian and unaligned so a header can be
/// read from any byte position of a mapping or a network buffer.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordHeader {
    pub magic: U32,
    pub version: U16,
    pub kind: u8,
    pub flags: u8,
    pub disk_id: U32,
    pub payload_len: U32,
    pub seq: U64,
    pub offset: U64,
    pub length: U64,
    pub timestamp_ns: U64,
    /// xxh3-64 over the header (with this field zero) and the payload.
    pub checksum: U64,
    /// Checksum of the record before this one in the cache journal (0 when unknown). The journal
    /// chains its records this way so that a record left over from before a crash, or from an
    /// older lap of a reused segment, can never be mistaken for the continuation of the log even
    /// when its sequence number happens to fit. Covered by `checksum`; decoders elsewhere may
    /// ignore it.
    pub prev_checksum: U64,
}

const _: () = assert!(core::mem::size_of::<RecordHeader>() == RECORD_HEADER_BYTES);

/// A decoded record borrowing its payload from the buffer it was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: RecordKind,
    pub disk_id: u32,
    pub seq: Seq,
    pub offset: u64,
    pub length: u64,
    pub timestamp_ns: u64,
    pub payload: &'a [u8],
}

/// Why bytes are not a valid record. Returned, never panicked on: these bytes come from disk
/// or from the network.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("bad record magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("record format version {found} is not supported (this build speaks {RECORD_VERSION})")]
    BadVersion { found: u16 },
    #[error("unknown record kind {found}")]
    BadKind { found: u8 },
    #[error("record payload of {found} bytes exceeds the limit of {RECORD_PAYLOAD_BYTES_MAX}")]
    PayloadTooLarge { found: usize },
    #[error(
        "record length {length} does not match payload of {payload_len} bytes for a data record"
    )]
    LengthMismatch { length: u64, payload_len: usize },
    #[error(
        "record checksum mismatch at seq {seq}: stored {stored:#018x}, computed {computed:#018x}"
    )]
    Checksum {
        seq: Seq,
        stored: u64,
        computed: u64,
    },
}

impl<'a> Record<'a> {
    /// Bytes this record occupies when encoded, including alignment padding.
    pub fn encoded_len(&self) -> usize {
        encoded_len_for_payload(self.payload.len())
    }

    /// Checks the record's internal consistency before it is written anywhere.
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.payload.len() > RECORD_PAYLOAD_BYTES_MAX {
            return Err(RecordError::PayloadTooLarge {
                found: self.payload.len(),
            });
        }
        if self.kind.carries_data() && self.length != self.payload.len() as u64 {
            return Err(RecordError::LengthMismatch {
                length: self.length,
                payload_len: self.payload.len(),
            });
        }
        Ok(())
    }

    fn header(&self) -> RecordHeader {
        RecordHeader {
            magic: RECORD_MAGIC.into(),
            version: RECORD_VERSION.into(),
            kind: self.kind as u8,
            flags: 0,
            disk_id: self.disk_id.into(),
            payload_len: (self.payload.len() as u32).into(),
            seq: self.seq.into(),
            offset: self.offset.into(),
            length: self.length.into(),
            timestamp_ns: self.timestamp_ns.into(),
            checksum: 0.into(),
            prev_checksum: 0.into(),
        }
    }

    /// The encoded header of this record linked to `prev_checksum`, and this record's checksum:
    /// the pieces a store writes with the payload and `encoded_len() - 64 - payload.len()` zero
    /// bytes of padding after it (see `SegmentStore::write_parts`).
    pub fn linked_header(
        &self,
        prev_checksum: u64,
    ) -> Result<([u8; RECORD_HEADER_BYTES], u64), RecordError> {
        self.validate()?;
        let mut header = self.header();
        header.prev_checksum = prev_checksum.into();
        let record_checksum = checksum(&header, self.payload);
        header.checksum = record_checksum.into();
        let mut bytes = [0u8; RECORD_HEADER_BYTES];
        bytes.copy_from_slice(header.as_bytes());
        Ok((bytes, record_checksum))
    }

    /// Encodes header, payload and zero padding into the front of `out` and returns the number
    /// of bytes written (`encoded_len()`). The encoded bytes are decoded again before returning
    /// so that a record is verified right after it is written.
    pub fn encode_into(&self, out: &mut [u8]) -> Result<usize, RecordError> {
        self.encode_linked_into(0, out).map(|(used, _links)| used)
    }

    /// Like [`Record::encode_into`], but records `prev_checksum` (the checksum of the record
    /// before this one) in the header, and also returns this record's own checksum so that the
    /// caller can link the next record to it.
    pub fn encode_linked_into(
        &self,
        prev_checksum: u64,
        out: &mut [u8],
    ) -> Result<(usize, RecordLinks), RecordError> {
        self.validate()?;
        let total = self.encoded_len();
        if out.len() < total {
            return Err(RecordError::Truncated {
                needed: total,
                available: out.len(),
            });
        }
        let mut header = self.header();
        header.prev_checksum = prev_checksum.into();
        let record_checksum = checksum(&header, self.payload);
        header.checksum = record_checksum.into();
        out[..RECORD_HEADER_BYTES].copy_from_slice(header.as_bytes());
        let payload_end = RECORD_HEADER_BYTES + self.payload.len();
        out[RECORD_HEADER_BYTES..payload_end].copy_from_slice(self.payload);
        out[payload_end..total].fill(0);
        let (decoded, links, used) = decode_linked(&out[..total])?;
        assert_eq!(used, total);
        assert_eq!(decoded.seq, self.seq);
        assert_eq!(links.checksum, record_checksum);
        Ok((total, links))
    }

    /// Encodes into a new vector (wire and tests; the journal encodes in place).
    pub fn to_vec(&self) -> Result<Vec<u8>, RecordError> {
        let mut out = vec![0u8; self.encoded_len()];
        self.encode_into(&mut out)?;
        Ok(out)
    }
}

/// An encoded record kept in memory as its header and a shared payload, so that a payload read
/// into a buffer is neither copied into the record nor into the frame that carries it: its
/// encoding is `header`, then `payload`, then `padding` zero bytes.
#[derive(Clone, Debug)]
pub struct HeldRecord {
    pub header: [u8; RECORD_HEADER_BYTES],
    pub payload: bytes::Bytes,
    pub padding: usize,
}

impl HeldRecord {
    /// Bytes of its encoding, padding included.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.payload.len() + self.padding
    }

    /// Its encoding in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&self.payload);
        out.resize(self.encoded_len(), 0);
        out
    }
}

impl Record<'_> {
    /// Encodes for a record kept in memory until it is sent (a sync payload), with one hash
    /// pass and without decoding it again — no store could have changed it; the receiver
    /// verifies it — keeping `shared` (the same bytes as `self.payload`) as the payload
    /// instead of copying it.
    pub fn to_held(&self, shared: bytes::Bytes) -> Result<HeldRecord, RecordError> {
        debug_assert_eq!(
            &shared[..],
            self.payload,
            "the shared payload is the record's"
        );
        let (header, _checksum) = self.linked_header(0)?;
        let padding = self.encoded_len() - RECORD_HEADER_BYTES - self.payload.len();
        Ok(HeldRecord {
            header,
            payload: shared,
            padding,
        })
    }
}

/// Bytes a record with `payload_len` bytes of payload occupies, padding included.
pub const fn encoded_len_for_payload(payload_len: usize) -> usize {
    let raw = RECORD_HEADER_BYTES + payload_len;
    raw.div_ceil(RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES
}

fn checksum(header: &RecordHeader, payload: &[u8]) -> u64 {
    let mut zeroed = *header;
    zeroed.checksum = 0.into();
    use std::hash::Hasher as _;
    let mut hasher = twox_hash::XxHash3_64::new();
    hasher.write(zeroed.as_bytes());
    hasher.write(payload);
    hasher.finish()
}

/// A record's own checksum and the checksum of the record it follows (its link in the journal's
/// chain of records).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLinks {
    pub checksum: u64,
    pub prev_checksum: u64,
}

/// Decodes one record from the front of `buf`, verifying magic, version, kind, sizes and
/// checksum. Returns the record and the number of bytes it occupies (padding included).
pub fn decode(buf: &[u8]) -> Result<(Record<'_>, usize), RecordError> {
    decode_linked(buf).map(|(record, _links, used)| (record, used))
}

/// Like [`decode`], and also returns the record's checksum and the checksum it links back to.
pub fn decode_linked(buf: &[u8]) -> Result<(Record<'_>, RecordLinks, usize), RecordError> {
    let (header, _) = RecordHeader::read_from_prefix(buf).map_err(|_| RecordError::Truncated {
        needed: RECORD_HEADER_BYTES,
        available: buf.len(),
    })?;
    if header.magic.get() != RECORD_MAGIC {
        return Err(RecordError::BadMagic {
            found: header.magic.get(),
        });
    }
    if header.version.get() != RECORD_VERSION {
        return Err(RecordError::BadVersion {
            found: header.version.get(),
        });
    }
    let kind =
        RecordKind::from_u8(header.kind).ok_or(RecordError::BadKind { found: header.kind })?;
    let payload_len = header.payload_len.get() as usize;
    if payload_len > RECORD_PAYLOAD_BYTES_MAX {
        return Err(RecordError::PayloadTooLarge { found: payload_len });
    }
    let total = encoded_len_for_payload(payload_len);
    let payload_end = RECORD_HEADER_BYTES + payload_len;
    if buf.len() < payload_end {
        return Err(RecordError::Truncated {
            needed: payload_end,
            available: buf.len(),
        });
    }
    let payload = &buf[RECORD_HEADER_BYTES..payload_end];
    let computed = checksum(&header, payload);
    if computed != header.checksum.get() {
        return Err(RecordError::Checksum {
            seq: header.seq.get(),
            stored: header.checksum.get(),
            computed,
        });
    }
    let record = Record {
        kind,
        disk_id: header.disk_id.get(),
        seq: header.seq.get(),
        offset: header.offset.get(),
        length: header.length.get(),
        timestamp_ns: header.timestamp_ns.get(),
        payload,
    };
    if kind.carries_data() && record.length != payload_len as u64 {
        return Err(RecordError::LengthMismatch {
            length: record.length,
            payload_len,
        });
    }
    let links = RecordLinks {
        checksum: computed,
        prev_checksum: header.prev_checksum.get(),
    };
    // Padding may be cut off at the very end of a buffer; the record itself is complete.
    Ok((record, links, total.min(buf.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_single_bit_flips_are_caught() {
        let payload: Vec<u8> = (0..100u8).collect();
        let record = Record {
            kind: RecordKind::Write,
            disk_id: 7,
            seq: 42,
            offset: 4096,
            length: 100,
            timestamp_ns: 123,
            payload: &payload,
        };
        let bytes = record.to_vec().unwrap();
        assert_eq!(bytes.len(), encoded_len_for_payload(100));
        let (decoded, used) = decode(&bytes).unwrap();
        assert_eq!(decoded, record);
        assert_eq!(used, bytes.len());
        for bit in 0..(RECORD_HEADER_BYTES + 100) * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&flipped).is_err(), "bit {bit} flip went unnoticed");
        }
    }

    #[test]
    fn the_in_memory_encoding_is_the_verified_one() {
        for len in [0usize, 1, 7, 8, 4096, 4099] {
            let payload: Vec<u8> = (0..len).map(|index| (index * 31) as u8).collect();
            let record = Record {
                kind: RecordKind::ResyncExtent,
                disk_id: 3,
                seq: 9,
                offset: 8192,
                length: len as u64,
                timestamp_ns: 5,
                payload: &payload,
            };
            let shared = bytes::Bytes::from(payload.clone());
            assert_eq!(
                record.to_held(shared).unwrap().to_vec(),
                record.to_vec().unwrap()
            );
        }
    }
}
