//! Deterministic simulator: drives the real source and target state machines, the real cache
//! journal over `MemSegments`, a simulated link, simulated disks and a simulated clock, all from
//! one seed, with faults — frame drop, duplication, reordering and delay, partitions and heals,
//! source crash with the journal torn at a random byte, target crash losing unflushed writes,
//! journal full (dirty-extent bitmap, then resync) — and an initial replication of a pre-filled
//! source disk against a target seeded with an older copy. The source cuts recovery points at
//! random moments; the target keeps an undo log (before-images) per replica disk exactly as the
//! apply executor does, a catalog of points, pins some points as a failover would and prunes with
//! a short retention.
//!
//! Invariants checked in every run:
//! - at sampled durable acknowledgements, the target replica equals the reference model: the
//!   target's initial content with every record of the stream up to that sequence applied;
//! - after a source crash the reopened journal holds every record that was flushed, each with
//!   exactly the bytes appended;
//! - after the link heals and the journal drains, every replica is byte-identical to its source
//!   disk, durably (what survives a target crash);
//! - at sampled moments and at the end, every retained point read through `UndoIndex::view` and
//!   the undo log equals the reference model at its marker, and — when the point is consistent —
//!   the source disks at the instant of the cut; live (pinned) views extended with `extend_view`
//!   equal fresh ones; only usable points resolve; pruned points never resolve again;
//! - after the drain a final point is consistent, usable, newest, and equals the source disks.
//!
//! `FERRY_SIM_SEED=<n>` replays one seed; `FERRY_SIM_SEEDS=<count>` runs that many (default
//! 1,000 with `--release`). A failing run prints its seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use ferry_appliance::core::journal::{Journal, JournalError, RecordSpec};
use ferry_appliance::core::journal_mem::{CrashMode, MemSegments};
use ferry_appliance::core::record::{self, RecordKind, Seq};
use ferry_appliance::core::recovery::{
    Catalog, Piece, PointError, PointKind, PointMap, PointMarker, PointSelector, SavedBlocks,
    UndoEntry, UndoIndex,
};
use ferry_appliance::core::source::{Source, SourceConfig, SourceEvent, SyncMode};
use ferry_appliance::core::target::{DiskOp, Target, TargetEvent};
use ferry_appliance::core::wire::{DiskAnnouncement, ReplicaState, WelcomeDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MS: u64 = 1_000_000;

const SOURCE_NAME: &str = "sim-source";
const GROUP: &str = "sim";

/// Seeds run by default: 1,000 in release builds (~10-15 s on this machine), fewer in
/// unoptimised builds, where one seed costs about ten times as much.
const SEEDS_DEFAULT: u64 = if cfg!(debug_assertions) { 200 } else { 1000 };

/// Knobs drawn from the seed, so that different seeds explore different regimes.
#[derive(Clone, Debug)]
struct Params {
    disk_count: usize,
    disk_bytes: usize,
    extent_bytes: usize,
    segment_count: usize,
    segment_bytes: usize,
    write_bytes_max: usize,
    steps: usize,
    drop_p: f64,
    dup_p: f64,
    reorder: bool,
    delay_ns_max: u64,
    partition_p: f64,
    source_crash_p: f64,
    target_crash_p: f64,
    flush_p: f64,
    target_present: bool,
    /// Per step: cut a recovery point, prune, pin or unpin a point, check every point.
    cut_p: f64,
    prune_p: f64,
    pin_p: f64,
    point_check_p: f64,
    retention_ms: u64,
    /// Chance that a write's before-images are appended but not yet synced when the step ends
    /// (a target crash then loses them, and the write).
    stage_p: f64,
    /// The source ships records before they are durable, under a persisted sequence floor
    /// raised `floor_step` records ahead (the daemon's mode); otherwise only durable ones.
    /// Drawn from a generator of its own, so the other draws of a seed stay as they were.
    ship_ahead: bool,
    floor_step: u64,
}

impl Params {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        let extent_bytes = [2048usize, 4096, 8192][rng.gen_range(0..3)];
        let faulty = rng.gen_bool(0.85);
        let fault =
            |rng: &mut ChaCha8Rng, p: f64| if faulty && rng.gen_bool(0.7) { p } else { 0.0 };
        Params {
            disk_count: rng.gen_range(1..=2),
            disk_bytes: extent_bytes * rng.gen_range(8..=32),
            extent_bytes,
            segment_count: rng.gen_range(2..=6),
            segment_bytes: [16usize << 10, 32 << 10, 64 << 10][rng.gen_range(0..3)],
            write_bytes_max: [512usize, 4096, 12_000][rng.gen_range(0..3)],
            steps: rng.gen_range(300..1500),
            drop_p: fault(rng, 0.03),
            dup_p: fault(rng, 0.03),
            reorder: faulty && rng.gen_bool(0.5),
            delay_ns_max: rng.gen_range(1..20) * MS,
            partition_p: fault(rng, 0.004),
            source_crash_p: fault(rng, 0.002),
            target_crash_p: fault(rng, 0.002),
            flush_p: rng.gen_range(0.05..0.5),
            target_present: rng.gen_bool(0.7),
            cut_p: rng.gen_range(0.003..0.03),
            prune_p: rng.gen_range(0.002..0.02),
            pin_p: 0.004,
            point_check_p: 0.01,
            retention_ms: rng.gen_range(20..400),
            stage_p: rng.gen_range(0.0..0.5),
            ship_ahead: false,
            floor_step: 0,
        }
    }
}

/// A frame in flight on the simulated link.
struct InFlight {
    deliver_ns: u64,
    order: u64,
    epoch: u64,
    to_target: bool,
    bytes: Vec<u8>,
}

/// A record as appended, kept to build the reference model and to check recovery.
#[derive(Clone, Debug)]
struct ShadowRecord {
    kind: RecordKind,
    disk_id: u32,
    offset: u64,
    length: u64,
    payload: Vec<u8>,
}

/// A pre-image of a journaled write that is not yet durable, to model the source disk losing it.
struct Undo {
    seq: Seq,
    disk: usize,
    offset: usize,
    before: Vec<u8>,
}

struct PendingRead {
    token: u64,
    disk: usize,
    offset: usize,
    length: usize,
    seq_floor: Seq,
    complete_ns: u64,
    /// The extent's bytes when the read started; the read returns a sector-wise mix of these
    /// and the bytes at completion, as a real read racing with writes may.
    at_start: Vec<u8>,
}

/// The source appliance: disks, journal, capture with bitmap fallback, shipper state machine.
struct SourceSide {
    disks: Vec<Vec<u8>>,
    journal: Journal<MemSegments>,
    core: Source,
    /// Persistent dirty-extent bitmap: extent index → generation of its last dirtying.
    dirty: Vec<BTreeMap<usize, u64>>,
    /// Extents handed to the running sync with their generation at that time.
    syncing: Vec<BTreeMap<usize, u64>>,
    bitmap_mode: Vec<bool>,
    initial_pending: Vec<bool>,
    initial_started: Vec<bool>,
    generation: u64,
    undo: VecDeque<Undo>,
    reads: Vec<PendingRead>,
    /// The coordinator's last point id (ids are `max(previous + 1, now_ms)`).
    last_point_id: u64,
    /// The source disks at the instant of each consistent cut, by point id.
    cuts: BTreeMap<u64, Vec<Vec<u8>>>,
    /// The persisted sequence floor (ship-ahead mode); survives a crash.
    floor: Seq,
}

/// One replica disk's undo log as the apply executor keeps it.
struct UndoDisk {
    index: UndoIndex,
    saved: SavedBlocks,
    /// A marker of this disk was applied: writes save before-images from now on. Kept across
    /// target crashes (saving more than needed is harmless: the earliest entry wins).
    saving: bool,
    /// Durable entries by location (append order).
    store: BTreeMap<u64, (UndoEntry, Vec<u8>)>,
    /// Appended, not yet synced: lost in a target crash.
    unsynced: Vec<(UndoEntry, Vec<u8>)>,
    next_location: u64,
}

impl UndoDisk {
    fn new(disk_bytes: usize) -> Self {
        Self {
            index: UndoIndex::new(),
            saved: SavedBlocks::new(disk_bytes as u64),
            saving: false,
            store: BTreeMap::new(),
            unsynced: Vec::new(),
            next_location: 0,
        }
    }

    /// Makes appended entries durable and visible to views (before the replica write).
    fn sync(&mut self) {
        for (entry, data) in self.unsynced.drain(..) {
            self.index.push(entry);
            self.store.insert(entry.location, (entry, data));
        }
    }
}

struct TargetSide {
    core: Target,
    volatile: Vec<Vec<u8>>,
    durable: Vec<Vec<u8>>,
    /// Ranges written since the last flush: (disk, offset, length).
    unflushed: Vec<(usize, usize, usize)>,
    persisted_seq: Seq,
    ops: VecDeque<DiskOp>,
    undo: Vec<UndoDisk>,
    /// A write whose before-images are appended but not synced, so not yet issued.
    staged: Option<DiskOp>,
    /// Persisted; survives a target crash.
    catalog: Catalog,
    /// Markers received, recorded in the catalog once durable.
    pending_markers: VecDeque<(Seq, Vec<u8>)>,
    /// Every marker up to this sequence is recorded in the catalog.
    recorded_through: Seq,
    /// Points in use by a (simulated) failover, with a live view per disk.
    pinned: BTreeMap<u64, Vec<PointMap>>,
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    params: Params,
    config: SourceConfig,
    now: u64,
    source: SourceSide,
    target: TargetSide,
    link: Vec<InFlight>,
    link_order: u64,
    epoch: u64,
    connected: bool,
    partitioned_until: u64,
    reconnect_at: u64,
    /// Every record of the stream by sequence (from the journal, resync records included).
    shadow: BTreeMap<Seq, ShadowRecord>,
    /// The reference model: the target's initial content with records `<= reference_seq` applied.
    reference: Vec<Vec<u8>>,
    reference_seq: Seq,
    last_marker_seq: Seq,
    target_tainted_until: Seq,
    /// Bytes of the reference model that are not known: the range of a sync record whose
    /// payload a source crash lost (the target applies nothing there, over bytes a target crash
    /// may have left half-written by an earlier copy of it), until a later record covers them.
    reference_unknown: Vec<Vec<bool>>,
    /// The reference model at each point's marker: (marker seq, disks).
    point_references: BTreeMap<u64, (Seq, Vec<Vec<u8>>)>,
    /// `reference_unknown` at each point's marker, for the points that had any.
    point_unknown: BTreeMap<u64, Vec<Vec<bool>>>,
    pruned: BTreeSet<u64>,
    /// Sequence ranges `[from, to)` a restarted source journal gave up that the target never
    /// received: absent from the stream the target applies.
    skipped: Vec<(Seq, Seq)>,
    stats: Stats,
}

#[derive(Default, Debug)]
struct Stats {
    source_crashes: u64,
    target_crashes: u64,
    partitions: u64,
    journal_full: u64,
    checks: u64,
    syncs_done: u64,
    points_cut: u64,
    points_inconsistent: u64,
    points_pruned: u64,
    point_checks: u64,
    points_read: u64,
    undo_entries: u64,
    undo_entries_lost: u64,
    /// Sync records whose in-memory payloads a source crash lost (`RecordKind::SyncRef`).
    sync_payloads_lost: u64,
    /// Seeds in ship-ahead mode, and journal restarts past the floor after a crash.
    ship_ahead_runs: u64,
    journal_restarts: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.source_crashes += other.source_crashes;
        self.target_crashes += other.target_crashes;
        self.partitions += other.partitions;
        self.journal_full += other.journal_full;
        self.checks += other.checks;
        self.syncs_done += other.syncs_done;
        self.points_cut += other.points_cut;
        self.points_inconsistent += other.points_inconsistent;
        self.points_pruned += other.points_pruned;
        self.point_checks += other.point_checks;
        self.points_read += other.points_read;
        self.undo_entries += other.undo_entries;
        self.undo_entries_lost += other.undo_entries_lost;
        self.sync_payloads_lost += other.sync_payloads_lost;
        self.ship_ahead_runs += other.ship_ahead_runs;
        self.journal_restarts += other.journal_restarts;
    }
}

fn extent_of(offset: usize, extent_bytes: usize) -> usize {
    offset / extent_bytes
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut params = Params::draw(&mut rng);
        let mut mode_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_f100_0000_0001);
        params.ship_ahead = mode_rng.gen_bool(0.5);
        params.floor_step = mode_rng.gen_range(4..400);
        let disks_announced: Vec<DiskAnnouncement> = (0..params.disk_count)
            .map(|index| DiskAnnouncement {
                disk_id: index as u32 + 1,
                size_bytes: params.disk_bytes as u64,
                machine: format!("vm-{index}"),
                name: "root".into(),
                group: "sim".into(),
            })
            .collect();
        let mut config = SourceConfig::new("sim-source", disks_announced);
        config.window_bytes_max = params.segment_bytes;
        config.window_records_max = rng.gen_range(2..64);
        config.frame_bytes_target = rng.gen_range(1024..16_384);
        config.resend_timeout_ns = 100 * MS;
        config.handshake_timeout_ns = 100 * MS;
        config.sync_extent_bytes = params.extent_bytes as u32;
        // Hash-compare blocks from 512 bytes up to the whole extent.
        config.sync_block_bytes = 512 << rng.gen_range(0..=params.extent_bytes.ilog2() - 9);
        config.sync_hashed_extents_queued_max = rng.gen_range(1..16);
        config.sync_reads_in_flight_max = rng.gen_range(1..4);
        config.sync_hash_requests_in_flight_max = rng.gen_range(1..3);
        config.sync_hash_extents_per_request = rng.gen_range(1..8);
        config.sync_backlog_bytes_max = (params.segment_count * params.segment_bytes / 2) as u64;

        // Initial content: the source disk is pre-filled (some extents zero); the target holds an
        // older copy with differences, or nothing (zero-filled).
        let mut disks = Vec::new();
        let mut replicas = Vec::new();
        for _ in 0..params.disk_count {
            let mut disk = vec![0u8; params.disk_bytes];
            for extent in disk.chunks_mut(params.extent_bytes) {
                match rng.gen_range(0..4) {
                    0 => {}
                    1 => extent.fill(rng.gen()),
                    _ => rng.fill(extent),
                }
            }
            let replica = if params.target_present {
                let mut copy = disk.clone();
                for _ in 0..rng.gen_range(0..6) {
                    let at = rng.gen_range(0..copy.len());
                    let len = rng.gen_range(1..=params.extent_bytes).min(copy.len() - at);
                    rng.fill(&mut copy[at..at + len]);
                }
                copy
            } else {
                vec![0u8; params.disk_bytes]
            };
            disks.push(disk);
            replicas.push(replica);
        }
        let store = MemSegments::new(params.segment_count, params.segment_bytes);
        let (journal, _) = Journal::open(store).expect("a blank journal opens");
        let mut core = Source::new(config.clone(), &journal);
        let floor = if params.ship_ahead {
            core.set_sequence_floor(params.floor_step);
            params.floor_step
        } else {
            0
        };
        let disk_count = params.disk_count;
        let params_ship_ahead = params.ship_ahead;
        Sim {
            seed,
            rng,
            config,
            now: 0,
            source: SourceSide {
                disks,
                journal,
                core,
                dirty: vec![BTreeMap::new(); disk_count],
                syncing: vec![BTreeMap::new(); disk_count],
                bitmap_mode: vec![false; disk_count],
                initial_pending: vec![true; disk_count],
                initial_started: vec![false; disk_count],
                generation: 0,
                undo: VecDeque::new(),
                reads: Vec::new(),
                last_point_id: 0,
                cuts: BTreeMap::new(),
                floor,
            },
            target: TargetSide {
                core: Target::new(0),
                volatile: replicas.clone(),
                durable: replicas.clone(),
                unflushed: Vec::new(),
                persisted_seq: 0,
                ops: VecDeque::new(),
                undo: (0..disk_count)
                    .map(|_| UndoDisk::new(params.disk_bytes))
                    .collect(),
                staged: None,
                catalog: Catalog::new(),
                pending_markers: VecDeque::new(),
                recorded_through: 0,
                pinned: BTreeMap::new(),
            },
            reference_unknown: replicas
                .iter()
                .map(|disk| vec![false; disk.len()])
                .collect(),
            reference: replicas,
            reference_seq: 0,
            params,
            link: Vec::new(),
            link_order: 0,
            epoch: 0,
            connected: false,
            partitioned_until: 0,
            reconnect_at: 0,
            shadow: BTreeMap::new(),
            last_marker_seq: 0,
            target_tainted_until: 0,
            point_references: BTreeMap::new(),
            point_unknown: BTreeMap::new(),
            pruned: BTreeSet::new(),
            skipped: Vec::new(),
            stats: Stats {
                ship_ahead_runs: u64::from(params_ship_ahead),
                ..Stats::default()
            },
        }
    }

    fn run(&mut self) {
        for _ in 0..self.params.steps {
            self.step(true);
        }
        self.drain();
        self.check_points();
        // Everything is replicated and quiet: a point cut now is consistent, becomes the newest
        // usable point once applied, and holds exactly the source disks (a planned failover).
        let id = self.cut_point().expect("a drained journal takes a marker");
        assert!(
            self.source.cuts.contains_key(&id),
            "a point cut after the drain is inconsistent"
        );
        self.drain();
        self.check_points();
        let latest = self
            .target
            .catalog
            .resolve(GROUP, PointSelector::Latest)
            .unwrap_or_else(|error| panic!("no latest point after the drain: {error}"));
        assert_eq!(latest.id, id, "the final point is not the latest");
        for disk in 0..self.params.disk_count {
            let map = self.target.undo[disk]
                .index
                .view(latest.positions[SOURCE_NAME]);
            let data = self.read_at_point(disk, &map);
            if let Some(at) = first_difference(&data, &self.source.disks[disk]) {
                panic!("the final point differs from source disk {disk} at byte {at}");
            }
        }
    }

    /// One step of simulated time: workload, faults, link, disks, timers.
    fn step(&mut self, faults: bool) {
        self.now += self.rng.gen_range(0..2 * MS);
        if faults {
            self.workload();
            self.faults();
            self.point_activity();
        }
        self.raise_floor_if_due();
        self.connect_if_due();
        self.deliver();
        self.run_target_disk();
        self.complete_reads();
        if let Some(at) = self.source.core.poll_timeout() {
            if self.now >= at {
                self.source.core.handle_timeout(self.now);
            }
        }
        self.leave_bitmap_mode_if_room();
        self.pump();
    }

    fn workload(&mut self) {
        let roll: f64 = self.rng.gen();
        if roll < 0.45 {
            let disk = self.rng.gen_range(0..self.params.disk_count);
            let offset = self.rng.gen_range(0..self.params.disk_bytes);
            let length = self
                .rng
                .gen_range(1..=self.params.write_bytes_max)
                .min(self.params.disk_bytes - offset);
            let kind = match self.rng.gen_range(0..10) {
                0 => RecordKind::Zero,
                1 => RecordKind::Trim,
                _ => RecordKind::Write,
            };
            let data: Vec<u8> = if kind == RecordKind::Write {
                let mut data = vec![0u8; length];
                self.rng.fill(&mut data[..]);
                data
            } else {
                vec![0u8; length]
            };
            self.capture_write(disk, offset, kind, &data);
        } else if roll < 0.45 + self.params.flush_p * 0.3 {
            self.source_flush();
        } else if roll < 0.45 + self.params.flush_p * 0.3 + self.params.cut_p {
            self.cut_point();
        }
    }

    /// Whether a disk's replica follows the journal alone: initial sync done, no dirty extents,
    /// no resync running, not in bitmap mode.
    fn disk_protected(&self, disk: usize) -> bool {
        !self.source.initial_pending[disk]
            && !self.source.bitmap_mode[disk]
            && self.source.dirty[disk].is_empty()
            && self.source.syncing[disk].is_empty()
            && !self
                .source
                .core
                .syncing_disks()
                .any(|disk_id| disk_id == disk as u32 + 1)
    }

    /// The group's coordinator cuts a point: a marker record in the journal, consistent only
    /// when every disk is protected. Returns the point id if the journal took the marker.
    fn cut_point(&mut self) -> Option<u64> {
        let now_ms = self.now / MS;
        let point_id = (self.source.last_point_id + 1).max(now_ms);
        let consistent = (0..self.params.disk_count).all(|disk| self.disk_protected(disk));
        let marker = PointMarker {
            group: GROUP.into(),
            point_id,
            time_unix_ms: now_ms,
            kind: if self.rng.gen_bool(0.2) {
                PointKind::App
            } else {
                PointKind::Crash
            },
            consistent,
            members: vec![SOURCE_NAME.into()],
            disk_ids: (1..=self.params.disk_count as u32).collect(),
            retention_ms: self.params.retention_ms,
        };
        let payload = marker.encode();
        // A recovery-point marker travels in the stream like any record.
        let spec = RecordSpec {
            kind: RecordKind::Marker,
            disk_id: 0,
            offset: 0,
            length: 0,
            timestamp_ns: self.now,
            payload: &payload,
        };
        self.source.journal.append(&spec).ok()?;
        self.source.last_point_id = point_id;
        self.stats.points_cut += 1;
        if consistent {
            self.source.cuts.insert(point_id, self.source.disks.clone());
        } else {
            self.stats.points_inconsistent += 1;
        }
        self.mirror_journal();
        Some(point_id)
    }

    /// Target-side recovery-point work at random moments: prune with the short retention,
    /// pin or unpin a point as a failover would, check every point.
    fn point_activity(&mut self) {
        if self.rng.gen_bool(self.params.prune_p) {
            self.prune_points();
        }
        if self.rng.gen_bool(self.params.pin_p) {
            let usable: Vec<_> = self
                .target
                .catalog
                .points(GROUP)
                .into_iter()
                .filter(|point| point.usable())
                .collect();
            if !usable.is_empty() {
                let point = &usable[self.rng.gen_range(0..usable.len())];
                let seq = point.positions[SOURCE_NAME];
                let maps = self
                    .target
                    .undo
                    .iter()
                    .map(|undo| undo.index.view(seq))
                    .collect();
                self.target.pinned.insert(point.id, maps);
            }
        }
        if self.rng.gen_bool(self.params.pin_p) {
            if let Some(&id) = self.target.pinned.keys().next() {
                self.target.pinned.remove(&id);
            }
        }
        if self.rng.gen_bool(self.params.point_check_p) {
            self.check_points();
        }
    }

    /// Prunes the catalog, then drops the before-images no retained point needs.
    fn prune_points(&mut self) {
        let pinned: BTreeSet<u64> = self.target.pinned.keys().copied().collect();
        let removed =
            self.target
                .catalog
                .prune(GROUP, self.now / MS, self.params.retention_ms, &pinned);
        for point in removed {
            assert!(!pinned.contains(&point.id), "a pinned point was pruned");
            self.stats.points_pruned += 1;
            self.point_references.remove(&point.id);
            self.point_unknown.remove(&point.id);
            self.source.cuts.remove(&point.id);
            self.pruned.insert(point.id);
        }
        // Without a retained point, entries are unneeded only up to what the catalog has
        // recorded: a marker applied but not yet durable needs the entries after it.
        let floor = self
            .target
            .catalog
            .floor_seq(SOURCE_NAME)
            .unwrap_or(self.target.recorded_through);
        for undo in &mut self.target.undo {
            for entry in undo.index.drop_through(floor) {
                undo.store
                    .remove(&entry.location)
                    .expect("a dropped entry was stored");
            }
        }
    }

    /// Reads a whole replica disk at a point: replica bytes overlaid with before-images.
    fn read_at_point(&self, disk: usize, map: &PointMap) -> Vec<u8> {
        let undo = &self.target.undo[disk];
        let replica = &self.target.volatile[disk];
        let mut data = Vec::with_capacity(replica.len());
        for piece in map.pieces(0, replica.len() as u64) {
            match piece {
                Piece::Replica { offset, length } => {
                    data.extend_from_slice(&replica[offset as usize..(offset + length) as usize])
                }
                Piece::Undo { location, length } => {
                    let (&start, (_, bytes)) = undo
                        .store
                        .range(..=location)
                        .next_back()
                        .unwrap_or_else(|| panic!("undo location {location} not stored"));
                    let at = (location - start) as usize;
                    assert!(
                        at + length as usize <= bytes.len(),
                        "piece at undo location {location} runs past its entry"
                    );
                    data.extend_from_slice(&bytes[at..at + length as usize]);
                }
            }
        }
        assert_eq!(data.len(), replica.len(), "pieces do not cover the disk");
        data
    }

    /// Every retained point reads as the model at its marker (and as the source disks at the
    /// cut when consistent); only usable points resolve; pruned ones never do.
    fn check_points(&mut self) {
        self.stats.point_checks += 1;
        for point in self.target.catalog.points(GROUP) {
            let seq = point.positions[SOURCE_NAME];
            let (reference_seq, reference) = self
                .point_references
                .get(&point.id)
                .unwrap_or_else(|| panic!("point {} recorded without passing the model", point.id));
            assert_eq!(*reference_seq, seq, "point {} marker sequence", point.id);
            let cut = self.source.cuts.get(&point.id);
            assert_eq!(
                cut.is_some(),
                point.consistent,
                "point {} consistency differs from the cut",
                point.id
            );
            for disk in 0..self.params.disk_count {
                let map = self.target.undo[disk].index.view(seq);
                let data = self.read_at_point(disk, &map);
                self.stats.points_read += 1;
                let unknown = self
                    .point_unknown
                    .get(&point.id)
                    .map(|masks| &masks[disk][..]);
                if let Some(at) = first_known_difference(&data, &reference[disk], unknown) {
                    panic!(
                        "point {} (marker seq {seq}) disk {disk} differs from the model at byte {at}",
                        point.id
                    );
                }
                if let Some(cut) = cut {
                    if let Some(at) = first_difference(&data, &cut[disk]) {
                        panic!(
                            "consistent point {} disk {disk} differs from the source at the cut, byte {at}",
                            point.id
                        );
                    }
                }
            }
            match self
                .target
                .catalog
                .resolve(GROUP, PointSelector::Id(point.id))
            {
                Ok(resolved) => {
                    assert!(point.usable(), "unusable point {} resolved", point.id);
                    assert_eq!(resolved, point);
                }
                Err(PointError::NotUsable { .. }) => {
                    assert!(!point.usable(), "usable point {} did not resolve", point.id)
                }
                Err(error) => panic!("point {} listed but not found: {error}", point.id),
            }
        }
        let points = self.target.catalog.points(GROUP);
        let latest = points.iter().rev().find(|point| point.usable());
        match self.target.catalog.resolve(GROUP, PointSelector::Latest) {
            Ok(point) => assert_eq!(Some(&point), latest),
            Err(_) => assert!(latest.is_none(), "a usable point exists but Latest fails"),
        }
        if let Some(first) = points.first() {
            let time_unix_ms =
                first.time_unix_ms + self.rng.gen_range(0..=self.params.retention_ms * 2);
            let expected = points
                .iter()
                .rev()
                .find(|point| point.usable() && point.time_unix_ms <= time_unix_ms);
            let resolved = self
                .target
                .catalog
                .resolve(GROUP, PointSelector::AtOrBefore { time_unix_ms })
                .ok();
            assert_eq!(resolved.as_ref(), expected, "AtOrBefore {time_unix_ms}");
        }
        for &id in &self.pruned {
            match self.target.catalog.resolve(GROUP, PointSelector::Id(id)) {
                Err(PointError::NoSuchPoint { .. }) => {}
                other => panic!("pruned point {id} resolves: {other:?}"),
            }
        }
        // Live views of pinned points, extended as the apply went on, equal fresh ones.
        let pinned: Vec<u64> = self.target.pinned.keys().copied().collect();
        for id in pinned {
            let (seq, reference) = self.point_references[&id].clone();
            for (disk, reference) in reference.iter().enumerate() {
                let mut map = self.target.pinned[&id][disk].clone();
                self.target.undo[disk].index.extend_view(&mut map);
                assert_eq!(
                    map,
                    self.target.undo[disk].index.view(seq),
                    "live view of point {id} disk {disk} differs from a fresh one"
                );
                let data = self.read_at_point(disk, &map);
                let unknown = self.point_unknown.get(&id).map(|masks| &masks[disk][..]);
                assert!(
                    first_known_difference(&data, reference, unknown).is_none(),
                    "pinned point {id} disk {disk} changed"
                );
                self.target.pinned.get_mut(&id).expect("pinned")[disk] = map;
            }
        }
    }

    /// The capture path: journal the write (split to the record limit), apply it to the source
    /// disk; on `Full`, drop the disk to bitmap mode.
    fn capture_write(&mut self, disk: usize, offset: usize, kind: RecordKind, data: &[u8]) {
        let piece_max = self.source.journal.payload_bytes_max().min(8192);
        let mut done = 0;
        while done < data.len() {
            let length = (data.len() - done).min(piece_max);
            let at = offset + done;
            let piece = &data[done..done + length];
            done += length;
            if !self.source.bitmap_mode[disk] {
                let spec = RecordSpec {
                    kind,
                    disk_id: disk as u32 + 1,
                    offset: at as u64,
                    length: length as u64,
                    timestamp_ns: self.now,
                    payload: if kind == RecordKind::Write {
                        piece
                    } else {
                        &[]
                    },
                };
                match self.source.journal.append(&spec) {
                    Ok(seq) => {
                        let before = self.source.disks[disk][at..at + length].to_vec();
                        self.source.undo.push_back(Undo {
                            seq,
                            disk,
                            offset: at,
                            before,
                        });
                        self.source.disks[disk][at..at + length].copy_from_slice(piece);
                        self.mirror_journal();
                        continue;
                    }
                    Err(JournalError::Full { .. }) => {
                        self.stats.journal_full += 1;
                        self.source.bitmap_mode[disk] = true;
                    }
                    Err(error) => panic!("journal append failed: {error}"),
                }
            }
            self.source.disks[disk][at..at + length].copy_from_slice(piece);
            self.mark_dirty(disk, at, length);
        }
    }

    fn mark_dirty(&mut self, disk: usize, offset: usize, length: usize) {
        let extent = self.params.extent_bytes;
        for index in extent_of(offset, extent)..=extent_of(offset + length - 1, extent) {
            self.source.generation += 1;
            self.source.dirty[disk].insert(index, self.source.generation);
        }
    }

    /// Ship-ahead mode: the driver raises the persisted floor ahead of the appends (at random
    /// moments, so shipping sometimes waits at the floor).
    fn raise_floor_if_due(&mut self) {
        if !self.params.ship_ahead {
            return;
        }
        let last = self.source.journal.last_seq();
        if last + self.params.floor_step / 2 > self.source.floor && self.rng.gen_bool(0.5) {
            self.source.floor = last + self.params.floor_step;
            self.source.core.set_sequence_floor(self.source.floor);
        }
    }

    fn source_flush(&mut self) {
        let last = self.source.journal.last_seq();
        self.source
            .journal
            .flush(last)
            .expect("flush of the in-memory journal");
        // Everything up to `last` reached the store. (`durable_seq` may be higher: in
        // ship-ahead mode it also counts records the target acknowledged, never flushed here.)
        while self
            .source
            .undo
            .front()
            .is_some_and(|undo| undo.seq <= last)
        {
            self.source.undo.pop_front();
        }
    }

    /// Copies records the journal gained (live and resync) into the shadow stream.
    fn mirror_journal(&mut self) {
        let last = self.source.journal.last_seq();
        let from = self
            .shadow
            .keys()
            .next_back()
            .map_or(1, |seq| seq + 1)
            .max(self.reference_seq + 1);
        for seq in from..=last {
            if self.shadow.contains_key(&seq) {
                continue;
            }
            let record = self
                .source
                .journal
                .record(seq)
                .unwrap_or_else(|| panic!("journal lost record {seq} it just appended"));
            // A sync record's payload is held by the source state machine, shipped in its place.
            let held = (record.kind == RecordKind::SyncRef)
                .then(|| self.source.core.held_sync_record(seq))
                .flatten()
                .map(|held| {
                    let bytes = held.to_vec();
                    let (held, _) = record::decode(&bytes).expect("a held sync record decodes");
                    assert_eq!(
                        (held.kind, held.seq, held.disk_id, held.offset, held.length),
                        (
                            RecordKind::ResyncExtent,
                            seq,
                            record.disk_id,
                            record.offset,
                            record.length
                        ),
                        "the held record differs from its SyncRef"
                    );
                    held.payload.to_vec()
                });
            self.shadow.insert(
                seq,
                ShadowRecord {
                    kind: if held.is_some() {
                        RecordKind::ResyncExtent
                    } else {
                        record.kind
                    },
                    disk_id: record.disk_id,
                    offset: record.offset,
                    length: record.length,
                    payload: held.unwrap_or_else(|| record.payload.to_vec()),
                },
            );
        }
    }

    /// Leaves bitmap mode once the journal has room again, and resyncs what was dirtied.
    fn leave_bitmap_mode_if_room(&mut self) {
        let usage = self.source.journal.usage();
        if usage.free_bytes * 2 < usage.capacity_bytes {
            return;
        }
        for disk in 0..self.params.disk_count {
            if self.source.bitmap_mode[disk] {
                self.source.bitmap_mode[disk] = false;
                self.start_resync(disk);
            }
        }
    }

    fn start_resync(&mut self, disk: usize) {
        let extent = self.params.extent_bytes;
        let ranges: Vec<(u64, u64)> = self.source.dirty[disk]
            .keys()
            .map(|&index| ((index * extent) as u64, extent as u64))
            .collect();
        if ranges.is_empty() {
            return;
        }
        let snapshot = self.source.dirty[disk].clone();
        self.source.syncing[disk].extend(snapshot);
        // The daemon resyncs in the bitmap's extents, which may be finer than the sync extent.
        let extent_bytes = if self.rng.gen_bool(0.5) {
            extent
        } else {
            extent / 2
        };
        self.source
            .core
            .start_sync_in_extents(
                disk as u32 + 1,
                &ranges,
                SyncMode::CompareHashes,
                extent_bytes as u32,
            )
            .expect("known disk");
    }

    fn faults(&mut self) {
        if self.connected && self.rng.gen_bool(self.params.partition_p) {
            self.stats.partitions += 1;
            self.disconnect();
            self.partitioned_until = self.now + self.rng.gen_range(10..500) * MS;
        }
        if self.rng.gen_bool(self.params.source_crash_p) {
            self.crash_source();
        }
        if self.rng.gen_bool(self.params.target_crash_p) {
            self.crash_target();
        }
    }

    fn disconnect(&mut self) {
        if self.connected {
            self.connected = false;
            self.source.core.handle_disconnected(self.now);
            self.target.core.handle_disconnected();
        }
        self.link.clear();
        self.reconnect_at = self.now + self.rng.gen_range(1..50) * MS;
    }

    fn connect_if_due(&mut self) {
        if self.connected || self.now < self.partitioned_until || self.now < self.reconnect_at {
            return;
        }
        self.connected = true;
        self.epoch += 1;
        self.source.core.handle_connected(self.now);
        self.target.core.handle_connected();
    }

    /// Power loss at the source: the journal keeps what was flushed and tears the rest; the
    /// disk loses some of the writes whose records were lost; those ranges are resynced.
    fn crash_source(&mut self) {
        self.stats.source_crashes += 1;
        self.disconnect();
        let durable_before = self.source.journal.durable_seq();
        let last_before = self.source.journal.last_seq();
        let mode = match self.rng.gen_range(0..4) {
            0 => CrashMode::KeepUnflushed,
            1 => CrashMode::LoseUnflushed,
            _ => CrashMode::Tear {
                seed: self.rng.gen(),
            },
        };
        let placeholder = Journal::open(MemSegments::new(2, self.params.segment_bytes))
            .expect("blank")
            .0;
        let journal = std::mem::replace(&mut self.source.journal, placeholder);
        let store = journal.into_store().crash_with(mode);
        let (journal, report) = Journal::open(store).expect("the journal reopens after a crash");
        self.source.journal = journal;
        let last = self.source.journal.last_seq();
        // Ship-ahead mode: records the target acknowledged count as durable without a flush,
        // and a flushed record behind one of them may be lost with it (its chain link is);
        // the journal then restarts past the floor below and every range it dropped is resynced.
        assert!(
            self.params.ship_ahead || last >= durable_before,
            "flushed records lost: durable {durable_before} before the crash, {last} after ({report:?})"
        );
        assert!(last <= last_before, "the journal grew in a crash");
        let received = self.target.core.received_seq();
        assert!(
            self.params.ship_ahead || received <= last,
            "the target holds {received} beyond the source's recovered journal {last}"
        );
        assert!(
            !self.params.ship_ahead || received <= self.source.floor.max(last),
            "the target holds {received} beyond the sequence floor {}",
            self.source.floor
        );
        // Everything kept is exactly what was appended.
        for seq in self.source.journal.first_seq().max(1)..=last {
            let Some(record) = self.source.journal.record(seq) else {
                assert!(
                    self.source.journal.first_seq() == 0,
                    "held record {seq} unreadable"
                );
                continue;
            };
            if let Some(shadow) = self.shadow.get_mut(&seq) {
                if record.kind == RecordKind::SyncRef {
                    // Its payload lived in the state machine, lost now: the target will apply
                    // nothing for it, and its extent is resynced.
                    assert!(matches!(
                        shadow.kind,
                        RecordKind::ResyncExtent | RecordKind::SyncRef
                    ));
                    if shadow.kind == RecordKind::ResyncExtent {
                        self.stats.sync_payloads_lost += 1;
                    }
                    shadow.kind = RecordKind::SyncRef;
                    shadow.payload.clear();
                }
                assert_eq!(
                    record.payload,
                    &shadow.payload[..],
                    "record {seq} changed in a crash"
                );
                assert_eq!(
                    (record.offset, record.disk_id),
                    (shadow.offset, shadow.disk_id)
                );
            }
        }
        // Writes whose records were lost: the disk may or may not hold them; resync their ranges
        // (the capture's activity log marks ranges dirty before writing them).
        while let Some(undo) = self.source.undo.pop_back() {
            if undo.seq <= last {
                self.source.undo.push_back(undo);
                break;
            }
            if self.rng.gen_bool(0.5) {
                self.source.disks[undo.disk][undo.offset..undo.offset + undo.before.len()]
                    .copy_from_slice(&undo.before);
            }
            self.mark_dirty(undo.disk, undo.offset, undo.before.len());
        }
        let restart = self.params.ship_ahead && self.source.floor > last;
        if restart {
            // Records the target will never apply now (the journal restarts below); it may
            // hold some of them half-applied (written, then lost in a target crash before they
            // were resent): the reference does not know those bytes until a later record (the
            // resync's included) covers them.
            for record in self.shadow.range(received + 1..).map(|(_, record)| record) {
                if record.disk_id > 0 && record.length > 0 {
                    let range = record.offset as usize..(record.offset + record.length) as usize;
                    self.reference_unknown[record.disk_id as usize - 1][range].fill(true);
                }
            }
        }
        // What the target received stays in the stream it applies, lost here or not.
        self.shadow.retain(|&seq, _| seq <= last.max(received));
        // Sync records whose payloads died with the state machine: their extents are resynced
        // (as the daemon marks them in the bitmap at start).
        let lost: Vec<(usize, usize, usize)> = (self.source.journal.first_seq().max(1)..=last)
            .filter_map(|seq| self.source.journal.record(seq))
            .filter(|record| record.kind == RecordKind::SyncRef)
            .map(|record| {
                (
                    record.disk_id as usize - 1,
                    record.offset as usize,
                    record.length as usize,
                )
            })
            .collect();
        for (disk, offset, length) in lost {
            self.mark_dirty(disk, offset, length);
        }
        if restart {
            self.restart_journal(received);
        }
        self.source.reads.clear();
        self.source.syncing.iter_mut().for_each(BTreeMap::clear);
        self.source
            .initial_started
            .iter_mut()
            .for_each(|started| *started = false);
        self.source.core = Source::new(self.config.clone(), &self.source.journal);
        for disk in 0..self.params.disk_count {
            if !self.source.bitmap_mode[disk] {
                self.start_resync(disk);
            }
        }
    }

    /// After a power loss in ship-ahead mode, as the daemon does when the host went down: the
    /// journal gives up every record it holds and every number up to the floor (the target may
    /// hold records under numbers it lost), and every disk is resynced.
    fn restart_journal(&mut self, received: Seq) {
        // As the daemon after the host went down: every extent is hash-compared. (Marking only
        // the records dropped here would miss a flushed record lost with the unflushed,
        // acknowledged records its chain link runs through: its write is on the disk, and the
        // target never gets it.)
        for disk in 0..self.params.disk_count {
            self.mark_dirty(disk, 0, self.params.disk_bytes);
        }
        let skip = self
            .source
            .journal
            .restart_at(self.source.floor + 1)
            .expect("the journal restarts past the floor");
        let record = self.source.journal.record(skip).expect("the skip record");
        assert_eq!(record.kind, RecordKind::Skip);
        self.source.undo.clear();
        self.shadow.retain(|&seq, _| seq <= received);
        self.shadow.insert(
            skip,
            ShadowRecord {
                kind: RecordKind::Skip,
                disk_id: 0,
                offset: 0,
                length: 0,
                payload: Vec::new(),
            },
        );
        self.skipped.push((received + 1, skip));
        self.stats.journal_restarts += 1;
        // The replica now holds changes no source record accounts for (the target applied
        // records this journal lost; the records it dropped never arrive): a sync that trusts
        // an absent replica to read as zeros would skip them. The daemon's target answers from
        // its replica file, which exists after the first connection: `Present`, hashes.
        self.params.target_present = true;
    }

    /// A target crash loses what it had not made durable, and the source resends it — unless
    /// the source's journal restarted past those numbers (ship-ahead mode): then the records
    /// after the target's persisted sequence up to the Skip never come again, and the bytes the
    /// crash may have left of them (`unflushed`) are unknown to the reference until a later
    /// record (the resync's included) covers them.
    fn forget_what_no_one_resends(&mut self, unflushed: &[(usize, usize, usize)]) {
        let persisted = self.target.persisted_seq;
        let Some(&(_, skip)) = self.skipped.last() else {
            return;
        };
        if skip <= persisted + 1 || self.source.journal.record(persisted + 1).is_some() {
            return;
        }
        for &(disk, offset, length) in unflushed {
            self.reference_unknown[disk][offset..offset + length].fill(true);
        }
        for record in self
            .shadow
            .range(persisted + 1..skip)
            .map(|(_, record)| record)
        {
            if record.disk_id > 0 && record.length > 0 {
                let range = record.offset as usize..(record.offset + record.length) as usize;
                self.reference_unknown[record.disk_id as usize - 1][range].fill(true);
            }
        }
        self.shadow
            .retain(|&seq, _| seq <= persisted || seq >= skip);
        self.skipped.push((persisted + 1, skip));
    }

    /// Power loss at the target: unflushed writes are each kept or lost; the applier restarts
    /// from the persisted sequence.
    fn crash_target(&mut self) {
        self.stats.target_crashes += 1;
        self.disconnect();
        let unflushed = std::mem::take(&mut self.target.unflushed);
        self.forget_what_no_one_resends(&unflushed);
        for (disk, offset, length) in unflushed {
            if self.rng.gen_bool(0.5) {
                let kept = self.target.volatile[disk][offset..offset + length].to_vec();
                self.target.durable[disk][offset..offset + length].copy_from_slice(&kept);
            }
        }
        self.target.volatile = self.target.durable.clone();
        self.target.ops.clear();
        // The undo log loses what was not synced (never what a replica write relied on, as
        // writes wait for the sync); the index is rebuilt by scanning it, the interval's saved
        // blocks are forgotten (saving them again is harmless: the earliest entry wins).
        self.target.staged = None;
        self.target.pending_markers.clear();
        for undo in &mut self.target.undo {
            self.stats.undo_entries_lost += undo.unsynced.len() as u64;
            undo.unsynced.clear();
            undo.saved = SavedBlocks::new(self.params.disk_bytes as u64);
            undo.index = UndoIndex::new();
            for (entry, _) in undo.store.values() {
                undo.index.push(*entry);
            }
        }
        let pinned: Vec<u64> = self.target.pinned.keys().copied().collect();
        for id in pinned {
            let seq = self.point_references[&id].0;
            let maps = self
                .target
                .undo
                .iter()
                .map(|undo| undo.index.view(seq))
                .collect();
            self.target.pinned.insert(id, maps);
        }
        self.last_marker_seq = self.target.persisted_seq;
        // Writes kept from beyond the persisted sequence make the replica hold "future" bytes
        // until the replay passes them; the reference comparison waits until then.
        self.target_tainted_until = self
            .target_tainted_until
            .max(self.target.core.received_seq());
        self.target.core = Target::new(self.target.persisted_seq);
    }

    fn send(&mut self, to_target: bool, bytes: Vec<u8>) {
        if self.rng.gen_bool(self.params.drop_p) {
            return;
        }
        let copies = if self.rng.gen_bool(self.params.dup_p) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.gen_range(0..self.params.delay_ns_max);
            // Without reordering a direction delivers in send order (delays only stretch it).
            let floor = if self.params.reorder {
                0
            } else {
                self.link
                    .iter()
                    .filter(|frame| frame.to_target == to_target)
                    .map(|frame| frame.deliver_ns)
                    .max()
                    .unwrap_or(0)
            };
            self.link_order += 1;
            self.link.push(InFlight {
                deliver_ns: (self.now + delay).max(floor),
                order: self.link_order,
                epoch: self.epoch,
                to_target,
                bytes: bytes.clone(),
            });
        }
    }

    fn deliver(&mut self) {
        // Bounded: each iteration removes one frame; frames sent meanwhile wait a step.
        let due_count = self
            .link
            .iter()
            .filter(|frame| frame.deliver_ns <= self.now)
            .count();
        for _ in 0..due_count {
            let Some(index) = self
                .link
                .iter()
                .enumerate()
                .filter(|(_, frame)| frame.deliver_ns <= self.now)
                .min_by_key(|(_, frame)| (frame.deliver_ns, frame.order))
                .map(|(index, _)| index)
            else {
                break;
            };
            let frame = self.link.swap_remove(index);
            if frame.epoch != self.epoch || !self.connected {
                continue;
            }
            if frame.to_target {
                if let Err(error) = self.target.core.handle_frame(&frame.bytes) {
                    panic!("target refused a frame: {error}");
                }
            } else if let Err(error) =
                self.source
                    .core
                    .handle_frame(&frame.bytes, &mut self.source.journal, self.now)
            {
                panic!("source refused a frame: {error}");
            }
            self.pump();
        }
    }

    /// Drains every state machine output: frames onto the link, releases, events, disk ops.
    fn pump(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            while let Some(event) = self.target.core.poll_event() {
                let TargetEvent::Hello { disks, .. } = event;
                let welcome = disks
                    .iter()
                    .map(|disk| WelcomeDisk {
                        disk_id: disk.disk_id,
                        replica: if self.params.target_present {
                            ReplicaState::Present
                        } else {
                            ReplicaState::Absent
                        },
                        size_bytes: disk.size_bytes,
                    })
                    .collect();
                self.target.core.welcome(welcome);
                moved = true;
            }
            while let Some(op) = self.target.core.poll_disk_op() {
                self.target.ops.push_back(op);
            }
            while let Some(marker) = self.target.core.poll_marker() {
                assert!(marker.seq > self.last_marker_seq, "markers out of order");
                if let Some(shadow) = self.shadow.get(&marker.seq) {
                    assert_eq!(shadow.kind, RecordKind::Marker);
                    assert_eq!(marker.payload, shadow.payload);
                }
                self.last_marker_seq = marker.seq;
                self.target
                    .pending_markers
                    .push_back((marker.seq, marker.payload));
            }
            while let Some(frame) = self.target.core.poll_transmit() {
                if self.connected {
                    self.send(false, frame.into_bytes());
                }
                moved = true;
            }
            loop {
                let frame = self
                    .source
                    .core
                    .poll_transmit(&self.source.journal, self.now)
                    .unwrap_or_else(|error| panic!("source transmit failed: {error}"));
                let Some(frame) = frame else { break };
                if self.connected {
                    self.send(true, frame.into_bytes());
                }
                moved = true;
            }
            while let Some(seq) = self.source.core.poll_release() {
                if self.params.ship_ahead {
                    self.source.journal.release_acknowledged(seq);
                } else {
                    self.source.journal.release(seq);
                }
                moved = true;
            }
            while let Some(event) = self.source.core.poll_event() {
                self.source_event(event);
                moved = true;
            }
            while let Some(read) = self.source.core.poll_sync_read(&self.source.journal) {
                // In this capture model a write is journaled and applied at once, so the disk
                // holds every journaled write at the moment the read starts.
                let complete_ns = self.now + self.rng.gen_range(0..5) * MS;
                let disk = read.disk_id as usize - 1;
                let range = read.offset as usize..(read.offset + read.length) as usize;
                let at_start = self.source.disks[disk][range].to_vec();
                self.source.reads.push(PendingRead {
                    at_start,
                    token: read.token,
                    disk: read.disk_id as usize - 1,
                    offset: read.offset as usize,
                    length: read.length as usize,
                    seq_floor: self.source.journal.last_seq(),
                    complete_ns,
                });
                moved = true;
            }
            if !moved {
                return;
            }
        }
        panic!("pump did not settle");
    }

    fn source_event(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Welcomed { .. } => {
                for disk in 0..self.params.disk_count {
                    if self.source.initial_pending[disk] && !self.source.initial_started[disk] {
                        self.source.initial_started[disk] = true;
                        let mode = if self.params.target_present {
                            SyncMode::CompareHashes
                        } else {
                            SyncMode::CopyNonZero
                        };
                        self.source
                            .core
                            .start_sync(
                                disk as u32 + 1,
                                &[(0, self.params.disk_bytes as u64)],
                                mode,
                            )
                            .expect("known disk");
                    }
                }
            }
            SourceEvent::SyncDone { disk_id, .. } => {
                self.stats.syncs_done += 1;
                let disk = disk_id as usize - 1;
                if self.source.initial_started[disk] {
                    self.source.initial_pending[disk] = false;
                }
                let synced = std::mem::take(&mut self.source.syncing[disk]);
                for (index, generation) in synced {
                    if self.source.dirty[disk].get(&index) == Some(&generation) {
                        self.source.dirty[disk].remove(&index);
                    }
                }
            }
        }
    }

    /// Completes extent reads that are due: writes that happened while the read was in flight
    /// may or may not be in the bytes, sector by sector (the race under test).
    fn complete_reads(&mut self) {
        let now = self.now;
        let due: Vec<PendingRead> = {
            let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.source.reads)
                .into_iter()
                .partition(|read| read.complete_ns <= now);
            self.source.reads = waiting;
            due
        };
        for read in due {
            let mut data =
                self.source.disks[read.disk][read.offset..read.offset + read.length].to_vec();
            for (sector, old) in data.chunks_mut(512).zip(read.at_start.chunks(512)) {
                if self.rng.gen_bool(0.5) {
                    sector.copy_from_slice(old);
                }
            }
            // An all-zero extent may come as a hole of a sparse file (not read).
            let handled = if data.iter().all(|&byte| byte == 0) && self.rng.gen_bool(0.5) {
                self.source.core.handle_extent_zero(
                    read.token,
                    read.seq_floor,
                    &mut self.source.journal,
                    now,
                )
            } else if self.rng.gen_bool(0.5) {
                // As the daemon hands them: a shared buffer the held records keep slices of.
                self.source.core.handle_extent_read_shared(
                    read.token,
                    read.seq_floor,
                    &bytes::Bytes::from(data),
                    &mut self.source.journal,
                    now,
                )
            } else {
                self.source.core.handle_extent_read(
                    read.token,
                    read.seq_floor,
                    &data,
                    &mut self.source.journal,
                    now,
                )
            };
            handled.unwrap_or_else(|error| panic!("extent read failed: {error}"));
            self.mirror_journal();
        }
    }

    /// Saves the before-images a write at `offset..offset + length` of `disk_id` needs (4 KiB
    /// blocks not yet saved since the last marker); they are appended, not yet synced. Returns
    /// whether anything was appended.
    fn save_before_images(&mut self, seq: Seq, disk_id: u32, offset: u64, length: u64) -> bool {
        let disk = disk_id as usize - 1;
        let undo = &mut self.target.undo[disk];
        if !undo.saving {
            return false;
        }
        let runs = undo.saved.take_unsaved(offset, length);
        for &(run_offset, run_length) in &runs {
            let range = run_offset as usize..(run_offset + run_length) as usize;
            let before = self.target.volatile[disk][range].to_vec();
            let entry = UndoEntry {
                seq,
                offset: run_offset,
                length: run_length,
                location: undo.next_location,
            };
            undo.next_location += run_length;
            undo.unsynced.push((entry, before));
            self.stats.undo_entries += 1;
        }
        !runs.is_empty()
    }

    /// Issues a write to the replica once the before-images protecting it are durable.
    fn write_replica(&mut self, op: DiskOp) {
        match op {
            DiskOp::Write {
                disk_id,
                offset,
                data,
                ..
            } => {
                let disk = disk_id as usize - 1;
                self.target.undo[disk].sync();
                let offset = offset as usize;
                self.target.volatile[disk][offset..offset + data.len()].copy_from_slice(&data);
                self.target.unflushed.push((disk, offset, data.len()));
            }
            DiskOp::Zero {
                disk_id,
                offset,
                length,
                ..
            } => {
                let disk = disk_id as usize - 1;
                self.target.undo[disk].sync();
                let (offset, length) = (offset as usize, length as usize);
                self.target.volatile[disk][offset..offset + length].fill(0);
                self.target.unflushed.push((disk, offset, length));
            }
            other => unreachable!("not a replica write: {other:?}"),
        }
    }

    /// The target's disk: executes a few ops per step, in order.
    fn run_target_disk(&mut self) {
        if let Some(op) = self.target.staged.take() {
            self.write_replica(op);
        }
        let budget = self.rng.gen_range(0..16);
        for _ in 0..budget {
            let Some(op) = self.target.ops.pop_front() else {
                break;
            };
            match op {
                DiskOp::Write {
                    seq,
                    disk_id,
                    offset,
                    ref data,
                } => {
                    let saved = self.save_before_images(seq, disk_id, offset, data.len() as u64);
                    if saved && self.rng.gen_bool(self.params.stage_p) {
                        self.target.staged = Some(op);
                        break;
                    }
                    self.write_replica(op);
                }
                DiskOp::Zero {
                    seq,
                    disk_id,
                    offset,
                    length,
                } => {
                    let saved = self.save_before_images(seq, disk_id, offset, length);
                    if saved && self.rng.gen_bool(self.params.stage_p) {
                        self.target.staged = Some(op);
                        break;
                    }
                    self.write_replica(op);
                }
                DiskOp::Marker { payload, .. } => {
                    let marker = PointMarker::decode(&payload)
                        .unwrap_or_else(|error| panic!("marker payload: {error}"));
                    for disk_id in marker.disk_ids {
                        let undo = &mut self.target.undo[disk_id as usize - 1];
                        undo.saved.reset();
                        undo.saving = true;
                    }
                }
                DiskOp::Flush { seq } => {
                    for (disk, offset, length) in std::mem::take(&mut self.target.unflushed) {
                        let bytes = self.target.volatile[disk][offset..offset + length].to_vec();
                        self.target.durable[disk][offset..offset + length].copy_from_slice(&bytes);
                    }
                    self.target.persisted_seq = seq;
                    self.check_reference(seq);
                    self.target.core.handle_durable(seq);
                    self.record_durable_markers(seq);
                }
                DiskOp::Read {
                    token,
                    disk_id,
                    offset,
                    length,
                } => {
                    let disk = disk_id as usize - 1;
                    let data =
                        self.target.volatile[disk][offset as usize..][..length as usize].to_vec();
                    self.target.core.handle_read(token, &data);
                }
            }
        }
        self.pump();
    }

    /// Records in the catalog the markers made durable by the flush of `seq`.
    fn record_durable_markers(&mut self, seq: Seq) {
        while let Some(&(marker_seq, _)) = self.target.pending_markers.front() {
            if marker_seq > seq {
                break;
            }
            let (_, payload) = self.target.pending_markers.pop_front().expect("front");
            let marker = PointMarker::decode(&payload)
                .unwrap_or_else(|error| panic!("marker payload: {error}"));
            self.target
                .catalog
                .record_marker(SOURCE_NAME, &marker, marker_seq);
        }
        self.target.recorded_through = self.target.recorded_through.max(seq);
    }

    /// At a flush every op up to `seq` has run and none after: the replica must equal the
    /// reference model at `seq`. Checked at a sample of flushes to stay fast.
    fn check_reference(&mut self, seq: Seq) {
        if seq < self.reference_seq {
            return;
        }
        let sampled = self.rng.gen_bool(0.2);
        for next in self.reference_seq + 1..=seq {
            let Some(record) = self.shadow.remove(&next) else {
                if self
                    .skipped
                    .iter()
                    .any(|&(from, to)| (from..to).contains(&next))
                {
                    continue;
                }
                panic!("the target applied {next}, which the source never appended")
            };
            if record.kind == RecordKind::Skip {
                continue;
            }
            if record.kind == RecordKind::Marker {
                let marker = PointMarker::decode(&record.payload)
                    .unwrap_or_else(|error| panic!("marker payload: {error}"));
                self.point_references
                    .insert(marker.point_id, (next, self.reference.clone()));
                if self
                    .reference_unknown
                    .iter()
                    .flatten()
                    .any(|&unknown| unknown)
                {
                    self.point_unknown
                        .insert(marker.point_id, self.reference_unknown.clone());
                }
                continue;
            }
            let disk = record.disk_id as usize - 1;
            let range = record.offset as usize..(record.offset + record.length) as usize;
            if record.kind == RecordKind::SyncRef {
                self.reference_unknown[disk][range].fill(true);
                continue;
            }
            self.reference_unknown[disk][range.clone()].fill(false);
            if record.kind.carries_data() {
                self.reference[disk][range].copy_from_slice(&record.payload);
            } else {
                self.reference[disk][range].fill(0);
            }
        }
        self.reference_seq = seq;
        if sampled && seq >= self.target_tainted_until {
            self.stats.checks += 1;
            for disk in 0..self.params.disk_count {
                if let Some(at) = first_known_difference(
                    &self.target.volatile[disk],
                    &self.reference[disk],
                    Some(&self.reference_unknown[disk]),
                ) {
                    panic!("at seq {seq} replica {disk} differs from the reference at byte {at}");
                }
            }
        }
    }

    /// Heals everything and runs until the journal drained and every sync finished.
    fn drain(&mut self) {
        self.partitioned_until = 0;
        self.params.drop_p = 0.0;
        self.params.dup_p = 0.0;
        let deadline = self.now + 600_000 * MS;
        for step in 0.. {
            self.source_flush();
            self.step(false);
            let quiet = self.connected
                && self.source.core.is_streaming()
                && !self.source.bitmap_mode.iter().any(|&on| on)
                && self.source.dirty.iter().all(BTreeMap::is_empty)
                && !self.source.initial_pending.iter().any(|&pending| pending)
                && self.source.core.syncing_disks().next().is_none()
                && self.source.core.acked_seq() == self.source.journal.last_seq()
                && self.target.ops.is_empty()
                && self.target.staged.is_none();
            if quiet {
                break;
            }
            assert!(
                self.now < deadline && step < 2_000_000,
                "did not drain: acked {} of {}, syncing {:?}, dirty {:?}, bitmap {:?}, streaming {}",
                self.source.core.acked_seq(),
                self.source.journal.last_seq(),
                self.source.core.syncing_disks().collect::<Vec<_>>(),
                self.source.dirty.iter().map(BTreeMap::len).collect::<Vec<_>>(),
                self.source.bitmap_mode,
                self.source.core.is_streaming(),
            );
        }
        for disk in 0..self.params.disk_count {
            if let Some(at) = first_difference(&self.target.durable[disk], &self.source.disks[disk])
            {
                panic!(
                    "after the drain replica {disk} differs from its source disk at byte {at} \
                     (extent {}); {:?}; {:?}",
                    at / self.params.extent_bytes,
                    self.params,
                    self.stats
                );
            }
        }
        assert_eq!(
            self.target.core.durable_seq(),
            self.source.journal.last_seq()
        );
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(
        a.iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len())),
    )
}

/// Like `first_difference`, skipping the bytes `unknown` marks.
fn first_known_difference(a: &[u8], b: &[u8], unknown: Option<&[bool]>) -> Option<usize> {
    let at = first_difference(a, b)?;
    let Some(unknown) = unknown else {
        return Some(at);
    };
    (at..a.len().min(b.len()))
        .find(|&index| a[index] != b[index] && !unknown[index])
        .or((a.len() != b.len()).then_some(a.len().min(b.len())))
}

fn run_seed(seed: u64) -> Stats {
    let mut sim = Sim::new(seed);
    sim.run();
    let _ = sim.seed;
    sim.stats
}

#[test]
fn simulate_seeds() {
    let seeds: Vec<u64> = match std::env::var("FERRY_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("FERRY_SIM_SEED is a number")],
        Err(_) => {
            let count: u64 = std::env::var("FERRY_SIM_SEEDS")
                .map(|count| count.parse().expect("FERRY_SIM_SEEDS is a number"))
                .unwrap_or(SEEDS_DEFAULT);
            (0..count).collect()
        }
    };
    let started = std::time::Instant::now();
    let mut totals = Stats::default();
    for &seed in &seeds {
        match catch_unwind(AssertUnwindSafe(|| run_seed(seed))) {
            Ok(stats) => totals.add(&stats),
            Err(panic) => {
                eprintln!("simulation failed at seed {seed}: replay with FERRY_SIM_SEED={seed} cargo test --release --test sim");
                resume_unwind(panic);
            }
        }
    }
    eprintln!(
        "{} seeds in {:.1} s: {totals:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}
