//! Recovery points, sans-IO: the marker a source cuts into its journal, the target's catalog of
//! points per consistency group, and the in-memory index of the target's undo log
//! (before-images) from which the state of a replica disk at any retained point is read.
//!
//! Model (ARCHITECTURE.md, "recovery points"): the replica always holds the latest state. Before
//! a write overwrites replica bytes, the executor saves those bytes (4 KiB-aligned blocks, once
//! per block per interval between two markers) as an undo entry tagged with the write's
//! sequence. The state at a point whose marker has sequence `P` is the replica overlaid, byte by
//! byte, with the earliest-appended undo entry whose sequence is greater than `P`: that entry
//! holds the bytes as they were before the first write after the point touched them.
//!
//! Nothing here performs I/O: undo entries carry an opaque `location` that the I/O layer
//! resolves, and a `PointMap` says, per byte range, whether to read the replica or an undo
//! location.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::core::record::Seq;
use crate::limits::NAME_BYTES_MAX;

/// Largest encoded `PointMarker`: a marker travels as one small journal record.
pub const MARKER_PAYLOAD_BYTES_MAX: usize = 4096;

/// Granularity of before-images: a write saves whole 4 KiB blocks (clamped to the disk end).
pub const UNDO_BLOCK_BYTES: u64 = 4096;

/// Why a point is crash- or application-consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    /// Cut by the timer or on demand: the state a crash at that instant would leave.
    Crash,
    /// Cut between a freeze hook and a thaw hook: the application flushed its state first.
    App,
}

/// The payload of a `RecordKind::Marker` record, as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMarker {
    pub group: String,
    /// Chosen by the group's coordinator: `max(previous_id + 1, now_unix_ms)`.
    pub point_id: u64,
    pub time_unix_ms: u64,
    pub kind: PointKind,
    /// False when a disk of the group on this source was not protected at the cut (initial
    /// sync, resync needed, resyncing): the point is listed but never usable.
    pub consistent: bool,
    /// Source appliance names expected to cut this same point.
    pub members: Vec<String>,
    /// This source's disks in the group.
    pub disk_ids: Vec<u32>,
    /// The group's retention on the source, for targets without their own setting (0: unset).
    #[serde(default)]
    pub retention_ms: u64,
}

impl PointMarker {
    /// The record payload. Callers keep the member list small enough for
    /// `MARKER_PAYLOAD_BYTES_MAX` (decode refuses more).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a PointMarker always serializes to JSON")
    }

    /// Parses a marker payload from the stream.
    pub fn decode(bytes: &[u8]) -> Result<Self, PointError> {
        if bytes.len() > MARKER_PAYLOAD_BYTES_MAX {
            return Err(PointError::MarkerTooLarge {
                bytes: bytes.len(),
                max: MARKER_PAYLOAD_BYTES_MAX,
            });
        }
        let marker: PointMarker = serde_json::from_slice(bytes)
            .map_err(|source| PointError::MarkerUndecodable { source })?;
        if marker.group.is_empty() || marker.group.len() > NAME_BYTES_MAX {
            return Err(PointError::MarkerInvalid {
                group: marker.group,
                point_id: marker.point_id,
                reason: format!("group name must be 1 to {NAME_BYTES_MAX} bytes"),
            });
        }
        if let Some(member) = marker
            .members
            .iter()
            .find(|member| member.is_empty() || member.len() > NAME_BYTES_MAX)
        {
            return Err(PointError::MarkerInvalid {
                group: marker.group.clone(),
                point_id: marker.point_id,
                reason: format!("member name {member:?} must be 1 to {NAME_BYTES_MAX} bytes"),
            });
        }
        Ok(marker)
    }
}

/// Errors of recovery-point lookups and marker decoding.
#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error("no consistency group {group:?} in the recovery-point catalog")]
    UnknownGroup { group: String },
    #[error("group {group:?} has no recovery point {wanted}")]
    NoSuchPoint { group: String, wanted: String },
    #[error("recovery point {id} of group {group:?} is not usable: {reason}")]
    NotUsable {
        group: String,
        id: u64,
        reason: String,
    },
    #[error("recovery-point marker of {bytes} bytes exceeds the {max}-byte limit")]
    MarkerTooLarge { bytes: usize, max: usize },
    #[error("undecodable recovery-point marker payload")]
    MarkerUndecodable {
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid recovery-point marker {point_id} of group {group:?}: {reason}")]
    MarkerInvalid {
        group: String,
        point_id: u64,
        reason: String,
    },
}

/// One point of a group as the catalog knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    pub group: String,
    pub id: u64,
    pub time_unix_ms: u64,
    pub kind: PointKind,
    /// Every member's marker said its disks were protected at the cut.
    pub consistent: bool,
    /// Every member's marker is durable here.
    pub complete: bool,
    /// Marker sequence per member source whose marker arrived.
    pub positions: BTreeMap<String, Seq>,
}

impl PointInfo {
    /// Whether a failover may use the point.
    pub fn usable(&self) -> bool {
        self.complete && self.consistent
    }
}

/// Which point of a group a failover wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointSelector {
    Id(u64),
    /// The newest usable point.
    Latest,
    /// The newest usable point cut at or before this time.
    AtOrBefore {
        time_unix_ms: u64,
    },
}

impl std::fmt::Display for PointSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::Latest => write!(f, "usable at all"),
            Self::AtOrBefore { time_unix_ms } => {
                write!(f, "usable at or before {time_unix_ms} ms (unix time)")
            }
        }
    }
}

/// A point as stored: the union of what every member's marker said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PointEntry {
    time_unix_ms: u64,
    kind: PointKind,
    consistent: bool,
    members: BTreeSet<String>,
    positions: BTreeMap<String, Seq>,
}

impl PointEntry {
    fn complete(&self) -> bool {
        if self.members.is_empty() {
            return !self.positions.is_empty();
        }
        self.members
            .iter()
            .all(|member| self.positions.contains_key(member))
    }

    fn usable(&self) -> bool {
        self.consistent && self.complete()
    }

    fn info(&self, group: &str, id: u64) -> PointInfo {
        PointInfo {
            group: group.to_owned(),
            id,
            time_unix_ms: self.time_unix_ms,
            kind: self.kind,
            consistent: self.consistent,
            complete: self.complete(),
            positions: self.positions.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct GroupEntry {
    /// (source, disk_id) of every disk any marker listed.
    disks: BTreeSet<(String, u32)>,
    points: BTreeMap<u64, PointEntry>,
    /// Highest pruned point id: a late marker of a pruned point must not bring it back, since
    /// the before-images it would need may already be gone.
    pruned_through_id: Option<u64>,
    /// The retention the newest marker carried (0: none carried).
    #[serde(default)]
    retention_ms: u64,
}

/// The target's recovery points per consistency group (persisted as JSON by the target).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    groups: BTreeMap<String, GroupEntry>,
}

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `source`'s marker for a point is durable at `seq`. Idempotent: a marker
    /// applied again after a target restart changes nothing. Markers of a point that was already
    /// pruned are ignored.
    pub fn record_marker(&mut self, source: &str, marker: &PointMarker, seq: Seq) {
        let group = self.groups.entry(marker.group.clone()).or_default();
        for &disk_id in &marker.disk_ids {
            group.disks.insert((source.to_owned(), disk_id));
        }
        if marker.retention_ms > 0 {
            group.retention_ms = marker.retention_ms;
        }
        if group
            .pruned_through_id
            .is_some_and(|pruned| marker.point_id <= pruned)
        {
            return;
        }
        let point = group
            .points
            .entry(marker.point_id)
            .or_insert_with(|| PointEntry {
                time_unix_ms: marker.time_unix_ms,
                kind: marker.kind,
                consistent: true,
                members: BTreeSet::new(),
                positions: BTreeMap::new(),
            });
        point.consistent &= marker.consistent;
        point.members.extend(marker.members.iter().cloned());
        point.positions.entry(source.to_owned()).or_insert(seq);
    }

    /// Every group with a marker recorded, sorted.
    pub fn groups(&self) -> Vec<String> {
        self.groups.keys().cloned().collect()
    }

    /// Every (source, disk_id) of the group that markers listed, sorted.
    pub fn group_disks(&self, group: &str) -> Vec<(String, u32)> {
        self.groups
            .get(group)
            .map(|entry| entry.disks.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The retention the group's source sent in its newest marker (`PointMarker::retention_ms`),
    /// for a target without its own setting; `None` when no marker carried one.
    pub fn group_retention_ms(&self, group: &str) -> Option<u64> {
        self.groups
            .get(group)
            .map(|entry| entry.retention_ms)
            .filter(|&retention_ms| retention_ms > 0)
    }

    /// The group's retained points, oldest first (empty for an unknown group).
    pub fn points(&self, group: &str) -> Vec<PointInfo> {
        self.groups
            .get(group)
            .map(|entry| {
                entry
                    .points
                    .iter()
                    .map(|(&id, point)| point.info(group, id))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The usable point the selector names.
    pub fn resolve(&self, group: &str, selector: PointSelector) -> Result<PointInfo, PointError> {
        let entry = self
            .groups
            .get(group)
            .ok_or_else(|| PointError::UnknownGroup {
                group: group.to_owned(),
            })?;
        let no_such = || PointError::NoSuchPoint {
            group: group.to_owned(),
            wanted: selector.to_string(),
        };
        let (id, point) = match selector {
            PointSelector::Id(id) => {
                let point = entry.points.get(&id).ok_or_else(no_such)?;
                if !point.complete() {
                    let missing: Vec<&str> = point
                        .members
                        .iter()
                        .filter(|member| !point.positions.contains_key(*member))
                        .map(String::as_str)
                        .collect();
                    return Err(PointError::NotUsable {
                        group: group.to_owned(),
                        id,
                        reason: format!(
                            "incomplete: no durable marker yet from {}",
                            missing.join(", ")
                        ),
                    });
                }
                if !point.consistent {
                    return Err(PointError::NotUsable {
                        group: group.to_owned(),
                        id,
                        reason: "inconsistent: cut while a disk of the group was not protected \
                                 (initial sync or resync)"
                            .into(),
                    });
                }
                (id, point)
            }
            PointSelector::Latest => entry
                .points
                .iter()
                .rev()
                .find(|(_, point)| point.usable())
                .map(|(&id, point)| (id, point))
                .ok_or_else(no_such)?,
            PointSelector::AtOrBefore { time_unix_ms } => entry
                .points
                .iter()
                .rev()
                .find(|(_, point)| point.usable() && point.time_unix_ms <= time_unix_ms)
                .map(|(&id, point)| (id, point))
                .ok_or_else(no_such)?,
        };
        Ok(point.info(group, id))
    }

    /// Removes the group's points cut before `now_unix_ms - retention_ms`, except pinned ones
    /// and the newest usable point (a group always keeps something to fail over to). Returns the
    /// removed points, oldest first.
    pub fn prune(
        &mut self,
        group: &str,
        now_unix_ms: u64,
        retention_ms: u64,
        pinned: &BTreeSet<u64>,
    ) -> Vec<PointInfo> {
        let Some(entry) = self.groups.get_mut(group) else {
            return Vec::new();
        };
        let cutoff_unix_ms = now_unix_ms.saturating_sub(retention_ms);
        let newest_usable = entry
            .points
            .iter()
            .rev()
            .find(|(_, point)| point.usable())
            .map(|(&id, _)| id);
        let doomed: Vec<u64> = entry
            .points
            .iter()
            .filter(|(&id, point)| {
                point.time_unix_ms < cutoff_unix_ms
                    && !pinned.contains(&id)
                    && Some(id) != newest_usable
            })
            .map(|(&id, _)| id)
            .collect();
        let mut removed = Vec::with_capacity(doomed.len());
        for id in doomed {
            let point = entry.points.remove(&id).expect("doomed point present");
            entry.pruned_through_id =
                Some(entry.pruned_through_id.map_or(id, |pruned| pruned.max(id)));
            removed.push(point.info(group, id));
        }
        removed
    }

    /// The lowest marker sequence of `source` over every retained point of every group: undo
    /// entries of that source with a sequence at or below it are needed by no retained point.
    /// `None`: no retained point involves the source. Its undo entries up to the sequence through
    /// which the catalog has recorded its markers are then unneeded — not beyond: a marker applied
    /// but not yet recorded needs the entries after it.
    pub fn floor_seq(&self, source: &str) -> Option<Seq> {
        self.groups
            .values()
            .flat_map(|entry| entry.points.values())
            .filter_map(|point| point.positions.get(source).copied())
            .min()
    }
}

/// One before-image in a replica disk's undo log: the `length` bytes at `offset` as they were
/// before record `seq` overwrote them. `location` is the I/O layer's address of the first byte;
/// byte `offset + k` is at `location + k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoEntry {
    pub seq: Seq,
    pub offset: u64,
    pub length: u64,
    pub location: u64,
}

/// Every undo entry of one replica disk, in append order. Each entry gets a position from a
/// counter that only grows, so `PointMap`s remember how far they have looked even across
/// `drop_through`.
#[derive(Clone, Debug, Default)]
pub struct UndoIndex {
    entries: BTreeMap<u64, UndoEntry>,
    next_position: u64,
}

impl UndoIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an entry (after it is durable in the undo log, or while rebuilding from it).
    pub fn push(&mut self, entry: UndoEntry) {
        self.entries.insert(self.next_position, entry);
        self.next_position += 1;
    }

    /// Entries held: pushed minus dropped.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Held entries in append order.
    pub fn iter(&self) -> impl Iterator<Item = &UndoEntry> + '_ {
        self.entries.values()
    }

    /// The map of the state at the point whose marker (of this disk's source) has sequence
    /// `point_seq`: per byte, the earliest-appended entry with a greater sequence.
    pub fn view(&self, point_seq: Seq) -> PointMap {
        let mut map = PointMap {
            point_seq,
            next_position: 0,
            ranges: BTreeMap::new(),
        };
        self.extend_view(&mut map);
        map
    }

    /// Adds to `map` the entries appended since it was built or last extended. Later entries
    /// never displace earlier ones, so a live view stays exact as the apply goes on. A map
    /// belongs to the index it was built from: after rebuilding an index (a scan on open),
    /// rebuild its views with `view`.
    pub fn extend_view(&self, map: &mut PointMap) {
        for (_, entry) in self.entries.range(map.next_position..) {
            if entry.seq > map.point_seq && entry.length > 0 {
                map.fill(entry);
            }
        }
        map.next_position = map.next_position.max(self.next_position);
    }

    /// Removes the entries with a sequence at or below `seq` (needed by no retained point, see
    /// `Catalog::floor_seq`) and returns them in append order, for the I/O layer to reclaim.
    pub fn drop_through(&mut self, seq: Seq) -> Vec<UndoEntry> {
        let doomed: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, entry)| entry.seq <= seq)
            .map(|(&position, _)| position)
            .collect();
        doomed
            .into_iter()
            .map(|position| self.entries.remove(&position).expect("entry present"))
            .collect()
    }
}

/// Where to read each byte of a replica disk at one point: non-overlapping ranges mapped to
/// undo locations; every byte outside them reads from the replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointMap {
    point_seq: Seq,
    /// Position of the next `UndoIndex` entry to consider.
    next_position: u64,
    /// Range start → (range end, undo location of the start byte).
    ranges: BTreeMap<u64, (u64, u64)>,
}

/// A piece of a read at a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Read `length` bytes of the replica at `offset`.
    Replica { offset: u64, length: u64 },
    /// Read `length` bytes of the undo log at `location`.
    Undo { location: u64, length: u64 },
}

impl PointMap {
    /// The marker sequence this map shows the state at.
    pub fn point_seq(&self) -> Seq {
        self.point_seq
    }

    /// Number of undo ranges (a measure of the map's size).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    /// Covers the parts of `entry`'s range that no earlier entry covers.
    fn fill(&mut self, entry: &UndoEntry) {
        let start = entry.offset;
        let end = entry.offset.saturating_add(entry.length);
        let mut gaps = Vec::new();
        let mut cursor = start;
        // A range starting before `start` may reach into it.
        if let Some((_, &(prev_end, _))) = self.ranges.range(..start).next_back() {
            cursor = cursor.max(prev_end);
        }
        for (&range_start, &(range_end, _)) in self.ranges.range(start..end) {
            if range_start > cursor {
                gaps.push((cursor, range_start));
            }
            cursor = cursor.max(range_end);
        }
        if cursor < end {
            gaps.push((cursor, end));
        }
        for (gap_start, gap_end) in gaps {
            self.ranges
                .insert(gap_start, (gap_end, entry.location + (gap_start - start)));
        }
    }

    /// How to read `length` bytes at `offset` at this point, in order, covering the range
    /// exactly. An `Undo` piece always lies within one undo entry; adjacent `Replica` pieces are
    /// merged.
    pub fn pieces(&self, offset: u64, length: u64) -> Vec<Piece> {
        let end = offset.saturating_add(length);
        let mut pieces = Vec::new();
        let mut push = |piece: Piece| {
            match (pieces.last_mut(), piece) {
                (
                    Some(Piece::Replica {
                        offset: last_offset,
                        length: last_length,
                    }),
                    Piece::Replica { offset, length },
                ) if *last_offset + *last_length == offset => {
                    *last_length += length;
                    return;
                }
                _ => {}
            }
            pieces.push(piece);
        };
        let mut cursor = offset;
        let first_start = self
            .ranges
            .range(..=offset)
            .next_back()
            .map_or(offset, |(&start, _)| start);
        for (&range_start, &(range_end, location)) in self.ranges.range(first_start..end) {
            if range_end <= cursor {
                continue;
            }
            if range_start > cursor {
                push(Piece::Replica {
                    offset: cursor,
                    length: range_start - cursor,
                });
                cursor = range_start;
            }
            let piece_end = range_end.min(end);
            push(Piece::Undo {
                location: location + (cursor - range_start),
                length: piece_end - cursor,
            });
            cursor = piece_end;
        }
        if cursor < end {
            push(Piece::Replica {
                offset: cursor,
                length: end - cursor,
            });
        }
        pieces
    }
}

/// Blocks of one replica disk already saved in the current interval (since the last marker of
/// its source), at `UNDO_BLOCK_BYTES` granularity.
#[derive(Clone, Debug)]
pub struct SavedBlocks {
    disk_bytes: u64,
    words: Vec<u64>,
    /// Indexes of words set since the last reset, so a reset costs what the interval wrote
    /// rather than the disk size (cleared wholesale once it grows past a fraction of `words`).
    touched_words: Vec<usize>,
    touched_all: bool,
}

impl SavedBlocks {
    pub fn new(disk_size: u64) -> Self {
        let blocks = disk_size.div_ceil(UNDO_BLOCK_BYTES);
        let words = usize::try_from(blocks.div_ceil(64)).expect("bitset fits in memory");
        Self {
            disk_bytes: disk_size,
            words: vec![0; words],
            touched_words: Vec::new(),
            touched_all: false,
        }
    }

    /// The 4 KiB-aligned runs (offset, length) covering `offset..offset + length` that were not
    /// saved yet in this interval, clamped to the disk size; marks them saved.
    pub fn take_unsaved(&mut self, offset: u64, length: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(length).min(self.disk_bytes);
        if length == 0 || offset >= end {
            return Vec::new();
        }
        let first_block = offset / UNDO_BLOCK_BYTES;
        let end_block = end.div_ceil(UNDO_BLOCK_BYTES);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for block in first_block..end_block {
            let word = (block / 64) as usize;
            let bit = 1u64 << (block % 64);
            if self.words[word] & bit != 0 {
                continue;
            }
            if self.words[word] == 0 && !self.touched_all {
                self.touched_words.push(word);
                if self.touched_words.len() > self.words.len() / 8 {
                    self.touched_all = true;
                    self.touched_words.clear();
                }
            }
            self.words[word] |= bit;
            let block_start = block * UNDO_BLOCK_BYTES;
            let block_end = (block_start + UNDO_BLOCK_BYTES).min(self.disk_bytes);
            match runs.last_mut() {
                Some((run_offset, run_length)) if *run_offset + *run_length == block_start => {
                    *run_length = block_end - *run_offset;
                }
                _ => runs.push((block_start, block_end - block_start)),
            }
        }
        runs
    }

    /// Starts a new interval (at a marker): every block may be saved again.
    pub fn reset(&mut self) {
        if self.touched_all {
            self.words.fill(0);
            self.touched_all = false;
        } else {
            for word in self.touched_words.drain(..) {
                self.words[word] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn marker(group: &str, id: u64, members: &[&str], consistent: bool) -> PointMarker {
        PointMarker {
            group: group.into(),
            point_id: id,
            time_unix_ms: id,
            kind: PointKind::Crash,
            consistent,
            members: members.iter().map(|member| member.to_string()).collect(),
            disk_ids: vec![1],
            retention_ms: 0,
        }
    }

    #[test]
    fn markers_round_trip_as_json_and_bad_payloads_are_refused() {
        let mut point = marker("db", 1_700_000_000_000, &["s1", "s2"], true);
        point.kind = PointKind::App;
        point.retention_ms = 86_400_000;
        let bytes = point.encode();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains(r#""kind":"app""#), "{text}");
        assert_eq!(PointMarker::decode(&bytes).unwrap(), point);
        // retention_ms is optional on the wire.
        let without = br#"{"group":"g","point_id":5,"time_unix_ms":5,"kind":"crash","consistent":false,"members":["s"],"disk_ids":[2]}"#;
        let decoded = PointMarker::decode(without).unwrap();
        assert_eq!((decoded.retention_ms, decoded.consistent), (0, false));

        let error = PointMarker::decode(b"point").unwrap_err();
        assert!(
            matches!(error, PointError::MarkerUndecodable { .. }),
            "{error}"
        );
        let error = PointMarker::decode(&vec![b' '; MARKER_PAYLOAD_BYTES_MAX + 1]).unwrap_err();
        assert!(error.to_string().contains("4097 bytes"), "{error}");
        let error = PointMarker::decode(&marker("", 3, &["s"], true).encode()).unwrap_err();
        assert!(error.to_string().contains("marker 3"), "{error}");
        let error = PointMarker::decode(&marker("g", 4, &[""], true).encode()).unwrap_err();
        assert!(error.to_string().contains("member name"), "{error}");
    }

    #[test]
    fn a_point_is_usable_once_every_member_recorded_a_consistent_marker() {
        let mut catalog = Catalog::new();
        catalog.record_marker("s1", &marker("g", 10, &["s1", "s2"], true), 100);
        let error = catalog.resolve("g", PointSelector::Id(10)).unwrap_err();
        assert!(
            error.to_string().contains("point 10 of group \"g\"")
                && error.to_string().contains("incomplete")
                && error.to_string().contains("s2"),
            "{error}"
        );
        assert!(catalog.resolve("g", PointSelector::Latest).is_err());
        catalog.record_marker("s2", &marker("g", 10, &["s1", "s2"], true), 7);
        // Recording again (a re-apply after a restart) changes nothing.
        catalog.record_marker("s2", &marker("g", 10, &["s1", "s2"], true), 7);
        let point = catalog.resolve("g", PointSelector::Latest).unwrap();
        assert!(point.usable());
        assert_eq!(
            point.positions,
            BTreeMap::from([("s1".into(), 100), ("s2".into(), 7)])
        );

        // One inconsistent member makes the point inconsistent.
        catalog.record_marker("s1", &marker("g", 20, &["s1", "s2"], true), 200);
        catalog.record_marker("s2", &marker("g", 20, &["s1", "s2"], false), 17);
        let error = catalog.resolve("g", PointSelector::Id(20)).unwrap_err();
        assert!(error.to_string().contains("inconsistent"), "{error}");
        assert_eq!(catalog.resolve("g", PointSelector::Latest).unwrap().id, 10);
        let points = catalog.points("g");
        assert_eq!(
            points.iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![10, 20]
        );
        assert!(points[1].complete && !points[1].consistent && !points[1].usable());
        assert_eq!(
            catalog.group_disks("g"),
            vec![("s1".to_string(), 1), ("s2".to_string(), 1)]
        );
        assert_eq!(catalog.groups(), vec!["g".to_string()]);
        assert_eq!(catalog.group_retention_ms("g"), None);
        let mut with_retention = marker("g", 30, &["s1"], true);
        with_retention.retention_ms = 60_000;
        catalog.record_marker("s1", &with_retention, 300);
        assert_eq!(catalog.group_retention_ms("g"), Some(60_000));
        assert_eq!(catalog.group_retention_ms("nope"), None);
    }

    #[test]
    fn resolve_names_the_group_and_the_point_it_misses() {
        let mut catalog = Catalog::new();
        let error = catalog.resolve("web", PointSelector::Latest).unwrap_err();
        assert!(matches!(error, PointError::UnknownGroup { .. }));
        assert!(error.to_string().contains("\"web\""), "{error}");
        for (id, seq) in [(100, 5), (200, 9), (300, 14)] {
            catalog.record_marker("s", &marker("web", id, &["s"], true), seq);
        }
        let error = catalog.resolve("web", PointSelector::Id(150)).unwrap_err();
        assert!(
            error.to_string().contains("no recovery point 150"),
            "{error}"
        );
        let at = |time_unix_ms| {
            catalog
                .resolve("web", PointSelector::AtOrBefore { time_unix_ms })
                .map(|point| point.id)
        };
        assert_eq!(at(250).unwrap(), 200);
        assert_eq!(at(300).unwrap(), 300);
        assert_eq!(at(u64::MAX).unwrap(), 300);
        let error = at(99).unwrap_err();
        assert!(error.to_string().contains("at or before 99"), "{error}");
    }

    #[test]
    fn prune_keeps_pinned_points_and_the_newest_usable_one() {
        let mut catalog = Catalog::new();
        for (id, seq) in [(100, 5), (200, 9), (300, 14)] {
            catalog.record_marker("s", &marker("g", id, &["s"], true), seq);
        }
        // Newer but inconsistent: not a failover target, so 300 stays the newest usable.
        catalog.record_marker("s", &marker("g", 400, &["s"], false), 20);
        catalog.record_marker("other", &marker("h", 50, &["other"], true), 3);
        assert_eq!(catalog.floor_seq("s"), Some(5));
        let removed = catalog.prune("g", 10_000, 1000, &BTreeSet::from([200]));
        assert_eq!(
            removed.iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![100, 400]
        );
        assert_eq!(
            catalog.points("g").iter().map(|p| p.id).collect::<Vec<_>>(),
            vec![200, 300]
        );
        assert_eq!(catalog.floor_seq("s"), Some(9));
        assert_eq!(catalog.floor_seq("other"), Some(3));
        assert_eq!(catalog.floor_seq("nobody"), None);
        let error = catalog.resolve("g", PointSelector::Id(100)).unwrap_err();
        assert!(matches!(error, PointError::NoSuchPoint { .. }), "{error}");
        // A late marker of a pruned point does not bring it back.
        catalog.record_marker("s", &marker("g", 100, &["s"], true), 5);
        assert!(catalog.resolve("g", PointSelector::Id(100)).is_err());
        // Within retention nothing goes.
        assert!(catalog.prune("g", 300, 1000, &BTreeSet::new()).is_empty());
        let removed = catalog.prune("g", 10_000, 1000, &BTreeSet::new());
        assert_eq!(removed.iter().map(|p| p.id).collect::<Vec<_>>(), vec![200]);
        assert_eq!(catalog.resolve("g", PointSelector::Latest).unwrap().id, 300);
    }

    #[test]
    fn the_catalog_survives_a_json_round_trip() {
        let mut catalog = Catalog::new();
        catalog.record_marker("s1", &marker("g", 10, &["s1", "s2"], true), 100);
        catalog.record_marker("s1", &marker("g", 20, &["s1"], true), 120);
        catalog.prune("g", 1000, 500, &BTreeSet::new());
        let json = serde_json::to_string(&catalog).unwrap();
        let back: Catalog = serde_json::from_str(&json).unwrap();
        assert_eq!(back, catalog);
        let info = back.resolve("g", PointSelector::Latest).unwrap();
        let info_json = serde_json::to_string(&info).unwrap();
        assert!(info_json.contains(r#""kind":"crash""#), "{info_json}");
    }

    fn entry(seq: Seq, offset: u64, length: u64, location: u64) -> UndoEntry {
        UndoEntry {
            seq,
            offset,
            length,
            location,
        }
    }

    #[test]
    fn the_earliest_entry_after_the_point_wins_per_byte() {
        let mut index = UndoIndex::new();
        index.push(entry(5, 0, 100, 1000)); // before point 5: never used for it
        index.push(entry(6, 50, 100, 2000));
        index.push(entry(8, 0, 200, 3000));
        let map = index.view(5);
        assert_eq!(
            map.pieces(0, 300),
            vec![
                Piece::Undo {
                    location: 3000,
                    length: 50
                },
                Piece::Undo {
                    location: 2000,
                    length: 100
                },
                Piece::Undo {
                    location: 3150,
                    length: 50
                },
                Piece::Replica {
                    offset: 200,
                    length: 100
                },
            ]
        );
        assert_eq!(
            map.pieces(60, 10),
            vec![Piece::Undo {
                location: 2010,
                length: 10
            }]
        );
        assert_eq!(
            index.view(4).pieces(0, 200),
            vec![
                Piece::Undo {
                    location: 1000,
                    length: 100
                },
                Piece::Undo {
                    location: 2050,
                    length: 50
                },
                Piece::Undo {
                    location: 3150,
                    length: 50
                },
            ]
        );
        assert_eq!(
            index.view(8).pieces(10, 20),
            vec![Piece::Replica {
                offset: 10,
                length: 20
            }]
        );
    }

    #[test]
    fn live_views_extend_incrementally_across_drops() {
        let mut index = UndoIndex::new();
        index.push(entry(3, 0, 4096, 0));
        index.push(entry(12, 0, 4096, 4096));
        let mut live = index.view(10);
        assert_eq!(live.range_count(), 1);
        assert_eq!(index.drop_through(10), vec![entry(3, 0, 4096, 0)]);
        assert_eq!(index.len(), 1);
        index.push(entry(14, 0, 8192, 8192));
        index.extend_view(&mut live);
        assert_eq!(live, index.view(10));
        assert_eq!(
            live.pieces(0, 8192),
            vec![
                Piece::Undo {
                    location: 4096,
                    length: 4096
                },
                Piece::Undo {
                    location: 12288,
                    length: 4096
                },
            ]
        );
        // Extending twice adds nothing.
        let before = live.clone();
        index.extend_view(&mut live);
        assert_eq!(live, before);
    }

    #[test]
    fn saved_blocks_hand_out_aligned_runs_once_per_interval() {
        let mut saved = SavedBlocks::new(3 * 4096 + 100);
        assert_eq!(saved.take_unsaved(10, 20), vec![(0, 4096)]);
        assert_eq!(saved.take_unsaved(0, 4096), vec![]);
        assert_eq!(saved.take_unsaved(4000, 9000), vec![(4096, 2 * 4096 + 100)]);
        assert_eq!(saved.take_unsaved(0, 20_000), vec![]);
        assert_eq!(saved.take_unsaved(50_000, 10), vec![]);
        assert_eq!(saved.take_unsaved(5, 0), vec![]);
        saved.reset();
        assert_eq!(saved.take_unsaved(8192, 1), vec![(8192, 4096)]);
        assert_eq!(
            saved.take_unsaved(0, 20_000),
            vec![(0, 8192), (12_288, 100)]
        );
        // A large bitset resets through its touched words and wholesale alike.
        let mut large = SavedBlocks::new(1 << 30);
        assert_eq!(large.take_unsaved(1 << 29, 1), vec![(1 << 29, 4096)]);
        large.reset();
        assert_eq!(large.take_unsaved(1 << 29, 1), vec![(1 << 29, 4096)]);
        let everything = large.take_unsaved(0, 1 << 30);
        assert_eq!(
            everything,
            vec![(0, 1 << 29), ((1 << 29) + 4096, (1 << 29) - 4096)]
        );
        large.reset();
        assert_eq!(large.take_unsaved(0, 1 << 30), vec![(0, 1 << 30)]);
    }

    /// One replica disk and its undo log, driven the way the executor drives them.
    struct ModelDisk {
        replica: Vec<u8>,
        index: UndoIndex,
        /// location → before-image bytes.
        undo: BTreeMap<u64, Vec<u8>>,
        next_location: u64,
        saved: SavedBlocks,
        saving: bool,
    }

    impl ModelDisk {
        fn new(size: usize) -> Self {
            Self {
                replica: vec![0; size],
                index: UndoIndex::new(),
                undo: BTreeMap::new(),
                next_location: 0,
                saved: SavedBlocks::new(size as u64),
                saving: false,
            }
        }

        fn write(&mut self, seq: Seq, offset: usize, data: &[u8]) {
            if self.saving {
                for (run_offset, run_length) in
                    self.saved.take_unsaved(offset as u64, data.len() as u64)
                {
                    let range = run_offset as usize..(run_offset + run_length) as usize;
                    self.undo
                        .insert(self.next_location, self.replica[range].to_vec());
                    self.index.push(UndoEntry {
                        seq,
                        offset: run_offset,
                        length: run_length,
                        location: self.next_location,
                    });
                    // Leave a hole between entries so that contiguous merging is not assumed.
                    self.next_location += run_length + 7;
                }
            }
            self.replica[offset..offset + data.len()].copy_from_slice(data);
        }

        fn marker(&mut self) {
            self.saved.reset();
            self.saving = true;
        }

        fn read(&self, map: &PointMap) -> Vec<u8> {
            let mut out = Vec::with_capacity(self.replica.len());
            for piece in map.pieces(0, self.replica.len() as u64) {
                match piece {
                    Piece::Replica { offset, length } => out.extend_from_slice(
                        &self.replica[offset as usize..(offset + length) as usize],
                    ),
                    Piece::Undo { location, length } => {
                        let (&start, bytes) = self
                            .undo
                            .range(..=location)
                            .next_back()
                            .expect("undo location held");
                        let at = (location - start) as usize;
                        out.extend_from_slice(&bytes[at..at + length as usize]);
                    }
                }
            }
            out
        }

        fn drop_through(&mut self, seq: Seq) {
            for dropped in self.index.drop_through(seq) {
                self.undo.remove(&dropped.location).expect("dropped once");
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write {
            offset: usize,
            length: usize,
            fill: u8,
        },
        Marker,
        Prune {
            retention: u64,
            pin_oldest: bool,
        },
    }

    fn op_strategy(size: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..size, 1..9000usize, any::<u8>()).prop_map(move |(offset, length, fill)| Op::Write {
                offset,
                length: length.min(size - offset),
                fill,
            }),
            2 => Just(Op::Marker),
            1 => (0..20u64, any::<bool>()).prop_map(|(retention, pin_oldest)| Op::Prune { retention, pin_oldest }),
        ]
    }

    fn scenario() -> impl Strategy<Value = (usize, Vec<Op>)> {
        (1usize..6, 0usize..4096)
            .prop_map(|(blocks, short)| (blocks * 4096 - short).max(1))
            .prop_flat_map(|size| {
                (
                    Just(size),
                    proptest::collection::vec(op_strategy(size), 1..120),
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Every retained point read through view + undo equals the model's snapshot at that
        /// point, before and after pruning, through fresh and live (extended) maps alike.
        #[test]
        fn views_reproduce_every_retained_point((size, ops) in scenario()) {
            let mut disk = ModelDisk::new(size);
            let mut catalog = Catalog::new();
            let mut snapshots: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut live: BTreeMap<u64, PointMap> = BTreeMap::new();
            let mut seq: Seq = 0;
            let mut pinned = BTreeSet::new();
            for (step, op) in ops.iter().enumerate() {
                seq += 1;
                match *op {
                    Op::Write { offset, length, fill } => {
                        let data: Vec<u8> = (0..length).map(|i| fill.wrapping_add(i as u8)).collect();
                        disk.write(seq, offset, &data);
                    }
                    Op::Marker => {
                        disk.marker();
                        let id = step as u64;
                        catalog.record_marker("s", &marker("g", id, &["s"], true), seq);
                        snapshots.insert(id, disk.replica.clone());
                        live.insert(id, disk.index.view(seq));
                    }
                    Op::Prune { retention, pin_oldest } => {
                        if pin_oldest {
                            if let Some(point) = catalog.points("g").first() {
                                pinned.insert(point.id);
                            }
                        }
                        let removed = catalog.prune("g", step as u64, retention, &pinned);
                        for point in &removed {
                            snapshots.remove(&point.id);
                            live.remove(&point.id);
                            prop_assert!(catalog.resolve("g", PointSelector::Id(point.id)).is_err());
                        }
                        // Every marker is recorded at once here, so `seq` bounds what the catalog knows.
                        disk.drop_through(catalog.floor_seq("s").unwrap_or(seq));
                    }
                }
            }
            let points = catalog.points("g");
            prop_assert_eq!(points.len(), snapshots.len());
            for point in points {
                let point_seq = point.positions["s"];
                let fresh = disk.index.view(point_seq);
                let expected = &snapshots[&point.id];
                prop_assert!(disk.read(&fresh) == *expected, "point {} differs", point.id);
                let map = live.get_mut(&point.id).unwrap();
                disk.index.extend_view(map);
                prop_assert!(disk.read(map) == *expected, "live view of {} differs", point.id);
                prop_assert_eq!(&*map, &fresh);
            }
        }
    }
}
