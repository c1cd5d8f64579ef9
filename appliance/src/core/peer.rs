//! Control-plane messages between a target and the sources that dial it: the target's requests
//! (planned failover) and state (which groups are failed over, so their sources fence) travel
//! back over the connection the source opened, because the target never dials. Each message is
//! a JSON document in a `wire::FrameKind::Control` frame, versioned by
//! [`PEER_CONTROL_VERSION`] and bounded by `wire::CONTROL_JSON_BYTES_MAX`.
//!
//! Requests go both ways: the target asks the source (planned failover, reprotect, failback),
//! and during a reprotect the source pulls from the target (extent hashes, extent bytes, the
//! blocks the failed-over machine wrote since the last round). Bulk bytes travel as the frame's
//! binary data after the JSON (`wire::Message::Control::data`), never inside the JSON.
//!
//! Compatibility rule: a receiver refuses a document of another version with a clear error
//! (logged, the connection stays up): control messages are operator actions, and doing half of
//! one that is not understood is worse than refusing it.

use serde::{Deserialize, Serialize};

use crate::core::wire::{Frame, CONTROL_JSON_BYTES_MAX};
use crate::limits::{FRAME_BODY_BYTES_MAX, HASH_EXTENTS_PER_REQUEST_MAX, SYNC_EXTENT_BYTES_MAX};

/// Most extents one `HashExtents` request covers.
pub const HASH_EXTENTS_MAX: u32 = HASH_EXTENTS_PER_REQUEST_MAX as u32;
/// Largest extent one `HashExtents` or `ReadExtent` request names.
pub const EXTENT_BYTES_MAX: u32 = SYNC_EXTENT_BYTES_MAX as u32;
/// Most ranges one `Dirty` answer lists (coarser ranges are sent when more are dirty).
pub const DIRTY_RANGES_MAX: usize = 2048;

/// The schema version of the control documents this build writes and reads.
pub const PEER_CONTROL_VERSION: u16 = 1;

/// One control-plane message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum PeerMessage {
    /// Target → source, on every connection and whenever the set changes: the groups whose
    /// failed-over copy is live at the target. The source fences (makes read-only) each of its
    /// disks in them. A group missing from the list is NOT un-fenced: only an explicit
    /// `Request::Unfence` (failback) gives production back to the source.
    FailedOverGroups { groups: Vec<String> },
    /// Either way: an operation, answered by a `Reply` with the same id.
    Request { id: u64, request: PeerRequest },
    /// Either way: the outcome of the request `id` (bulk bytes in the frame's data).
    Reply { id: u64, outcome: PeerOutcome },
}

/// What a target asks of a source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum PeerRequest {
    /// Planned failover: fence the group's disks (writes refused from here on), cut a final
    /// recovery point, and answer once the target acknowledged every record up to it durable.
    PlannedFailover { group: String },
    /// Failback: give production back to the source. The source un-fences the group's disks and
    /// resyncs them to the target by hash compare (the replica is stale by the failover's writes).
    Unfence { group: String },
    /// Target → source: start pulling the failed-over disks of `group` (fenced here): a hash
    /// compare of every extent, then a round of the blocks written since the last one every
    /// second, until `FinishReprotect`. Answered at once with `ReprotectStarted`.
    Reprotect { group: String },
    /// Target → source (failback): the failover exports are read-only now; run a last round,
    /// stop, and answer `Reprotected` once the source's disks hold the failed-over data durably.
    FinishReprotect { group: String },
    /// Source → target: the xxh3-128 hashes of `count` extents of `extent_bytes` from `offset`
    /// of a failed-over disk (the last one cut short at its end). Answer: `Hashes`, data = 16
    /// bytes little-endian per extent.
    HashExtents {
        group: String,
        machine: String,
        disk: String,
        offset: u64,
        extent_bytes: u32,
        count: u32,
    },
    /// Source → target: `length` bytes at `offset` of a failed-over disk. Answer: `Extent`,
    /// data = the bytes.
    ReadExtent {
        group: String,
        machine: String,
        disk: String,
        offset: u64,
        length: u32,
    },
    /// Source → target: the ranges written on a failed-over disk since the last `TakeDirty`.
    TakeDirty {
        group: String,
        machine: String,
        disk: String,
    },
}

/// A source's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum PeerOutcome {
    /// The group is fenced and its final point `point_id` (marker at `marker_seq`) is durable at
    /// the target.
    FinalPoint {
        group: String,
        point_id: u64,
        marker_seq: u64,
    },
    /// The group's disks are writable again (`disks`: `machine/disk` of each).
    Unfenced { group: String, disks: Vec<String> },
    /// The source pulls the group's failed-over disks (`disks`: `machine/disk`).
    ReprotectStarted { group: String, disks: Vec<String> },
    /// The reprotect of `group` is complete: the source's disks hold the failed-over data.
    Reprotected {
        group: String,
        extents_compared: u64,
        bytes_copied: u64,
        rounds: u64,
    },
    /// Hashes in the data; `size_bytes` of the failed-over disk.
    Hashes { size_bytes: u64 },
    /// The extent's bytes in the data.
    Extent,
    /// Written ranges `(offset, length)`, sorted, non-overlapping.
    Dirty { ranges: Vec<(u64, u64)> },
    /// The request failed; nothing of it is half done unless `message` says so.
    Error { message: String },
}

/// Why a control document cannot be sent or was not understood.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("control document version {theirs}, this build reads {PEER_CONTROL_VERSION}")]
    Version { theirs: u16 },
    #[error("control document of {bytes} bytes exceeds the limit of {CONTROL_JSON_BYTES_MAX}")]
    TooLarge { bytes: usize },
    #[error("control document is not valid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("control frame of {bytes} bytes exceeds the frame limit of {FRAME_BODY_BYTES_MAX}")]
    FrameTooLarge { bytes: usize },
}

impl PeerMessage {
    /// The Control frame carrying this message.
    pub fn to_frame(&self) -> Result<Frame, PeerError> {
        self.to_frame_with(&[])
    }

    /// The Control frame carrying this message and `data` after it.
    pub fn to_frame_with(&self, data: &[u8]) -> Result<Frame, PeerError> {
        let json = serde_json::to_vec(self)?;
        if json.len() > CONTROL_JSON_BYTES_MAX {
            return Err(PeerError::TooLarge { bytes: json.len() });
        }
        let body = 8 + json.len() + data.len();
        if body > FRAME_BODY_BYTES_MAX {
            return Err(PeerError::FrameTooLarge { bytes: body });
        }
        Ok(Frame::control(PEER_CONTROL_VERSION, &json, data))
    }

    /// Reads the document of a received Control frame.
    pub fn from_document(version: u16, json: &[u8]) -> Result<Self, PeerError> {
        if version != PEER_CONTROL_VERSION {
            return Err(PeerError::Version { theirs: version });
        }
        Ok(serde_json::from_slice(json)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::wire::Message;

    fn round_trip(message: &PeerMessage) -> PeerMessage {
        let frame = message.to_frame().unwrap();
        match frame.decode().unwrap() {
            Message::Control { version, json, .. } => {
                PeerMessage::from_document(version, json).unwrap()
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn messages_round_trip_with_a_stable_shape() {
        let messages = [
            PeerMessage::FailedOverGroups {
                groups: vec!["shop".into()],
            },
            PeerMessage::Request {
                id: 3,
                request: PeerRequest::PlannedFailover {
                    group: "shop".into(),
                },
            },
            PeerMessage::Reply {
                id: 3,
                outcome: PeerOutcome::FinalPoint {
                    group: "shop".into(),
                    point_id: 1_700_000_000_000,
                    marker_seq: 42,
                },
            },
            PeerMessage::Reply {
                id: 4,
                outcome: PeerOutcome::Error {
                    message: "no".into(),
                },
            },
        ];
        for message in &messages {
            assert_eq!(&round_trip(message), message);
        }
        assert_eq!(
            serde_json::to_string(&messages[1]).unwrap(),
            r#"{"type":"request","id":3,"request":{"op":"planned-failover","group":"shop"}}"#
        );
    }

    #[test]
    fn other_versions_and_bad_documents_are_refused() {
        let error = PeerMessage::from_document(2, b"{}").unwrap_err();
        assert!(error.to_string().contains("version 2"), "{error}");
        assert!(matches!(
            PeerMessage::from_document(PEER_CONTROL_VERSION, br#"{"type":"nope"}"#),
            Err(PeerError::Json(_))
        ));
        let huge = PeerMessage::FailedOverGroups {
            groups: vec!["g".repeat(CONTROL_JSON_BYTES_MAX)],
        };
        assert!(matches!(huge.to_frame(), Err(PeerError::TooLarge { .. })));
    }
}

/// Coarsens sorted, non-overlapping `ranges` until at most [`DIRTY_RANGES_MAX`] remain: each
/// pass widens ranges to twice the previous alignment and merges what then touches. The result
/// covers every input byte (more may be copied, never less), clamped to `size_bytes`.
pub fn coarsen_ranges(mut ranges: Vec<(u64, u64)>, size_bytes: u64) -> Vec<(u64, u64)> {
    let mut align: u64 = 1 << 20;
    // Bounded: once the alignment passes the ranges' spacing each pass merges them; 64 passes
    // exceed any u64 alignment.
    for _ in 0..64 {
        if ranges.len() <= DIRTY_RANGES_MAX {
            break;
        }
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len() / 2 + 1);
        for (offset, length) in ranges {
            let start = offset - offset % align;
            let end = offset
                .saturating_add(length)
                .div_ceil(align)
                .saturating_mul(align)
                .min(size_bytes)
                .max(start);
            match merged.last_mut() {
                Some((last_start, last_length)) if *last_start + *last_length >= start => {
                    *last_length = (*last_length).max(end - *last_start);
                }
                _ => merged.push((start, end - start)),
            }
        }
        ranges = merged;
        align = align.saturating_mul(2);
    }
    ranges
}

#[cfg(test)]
mod coarsen_tests {
    use super::*;

    #[test]
    fn many_ranges_are_coarsened_to_a_covering_set() {
        let size = 1u64 << 40;
        let ranges: Vec<(u64, u64)> = (0..10_000u64).map(|i| (i * (3 << 20), 4096)).collect();
        let coarse = coarsen_ranges(ranges.clone(), size);
        assert!(coarse.len() <= DIRTY_RANGES_MAX);
        for (offset, length) in ranges {
            assert!(
                coarse
                    .iter()
                    .any(|(start, len)| *start <= offset && offset + length <= start + len),
                "{offset} not covered"
            );
        }
        let few = vec![(0, 4096), (8192, 4096)];
        assert_eq!(coarsen_ranges(few.clone(), size), few);
    }
}
