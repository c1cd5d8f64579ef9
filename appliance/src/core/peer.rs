//! Control-plane messages between a target and the sources that dial it: the target's requests
//! (planned failover) and state (which groups are failed over, so their sources fence) travel
//! back over the connection the source opened, because the target never dials. Each message is
//! a JSON document in a `wire::FrameKind::Control` frame, versioned by
//! [`PEER_CONTROL_VERSION`] and bounded by `wire::CONTROL_JSON_BYTES_MAX`.
//!
//! Compatibility rule: a receiver refuses a document of another version with a clear error
//! (logged, the connection stays up): control messages are operator actions, and doing half of
//! one that is not understood is worse than refusing it.

use serde::{Deserialize, Serialize};

use crate::core::wire::{Frame, CONTROL_JSON_BYTES_MAX};

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
    /// Target → source: an operation, answered by a `Reply` with the same id.
    Request { id: u64, request: PeerRequest },
    /// Source → target: the outcome of the request `id`.
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
}

impl PeerMessage {
    /// The Control frame carrying this message.
    pub fn to_frame(&self) -> Result<Frame, PeerError> {
        let json = serde_json::to_vec(self)?;
        if json.len() > CONTROL_JSON_BYTES_MAX {
            return Err(PeerError::TooLarge { bytes: json.len() });
        }
        Ok(Frame::control(PEER_CONTROL_VERSION, &json))
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
            Message::Control { version, json } => {
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
