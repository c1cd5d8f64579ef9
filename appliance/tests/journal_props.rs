//! Property tests of the cache journal: record encode/decode round trips, reopening after the
//! last record is truncated or corrupted at every byte, random append/flush/release/crash runs
//! against a model, and the same promises on the real memory-mapped files.

use std::os::unix::fs::FileExt;

use ferry_appliance::core::journal::{Journal, JournalError, RecordSpec, SegmentStore};
use ferry_appliance::core::journal_mem::{CrashMode, MemSegments};
use ferry_appliance::core::record::{decode, decode_linked, Record, RecordKind, Seq};
use ferry_appliance::io::mmap_journal::{open_journal, segment_path, MmapJournalError};
use ferry_appliance::limits::{RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use proptest::prelude::*;

const KINDS: [RecordKind; 5] = [
    RecordKind::Write,
    RecordKind::Zero,
    RecordKind::Trim,
    RecordKind::Marker,
    RecordKind::ResyncExtent,
];

fn spec(payload: &[u8], timestamp_ns: u64) -> RecordSpec<'_> {
    RecordSpec {
        kind: RecordKind::Write,
        disk_id: 2,
        offset: 1 << 20,
        length: payload.len() as u64,
        timestamp_ns,
        payload,
    }
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = ferry_appliance::core::journal_mem::SplitMix64::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

/// A journal holding `sizes.len()` flushed records except the last, which is appended but not
/// flushed. Returns the store and where the last record starts.
fn journal_with_unflushed_last(sizes: &[usize]) -> (MemSegments, usize, usize) {
    let (mut journal, _) = Journal::open(MemSegments::new(4, 16384)).unwrap();
    for (i, len) in sizes.iter().enumerate() {
        journal
            .append(&spec(&payload(i as u64, *len), i as u64))
            .unwrap();
        if i + 2 == sizes.len() {
            journal.flush(journal.last_seq()).unwrap();
        }
    }
    let last = journal.last_seq();
    let (segment, offset) = locate(journal.store(), last);
    (journal.into_store(), segment, offset)
}

/// Finds where record `seq` sits by scanning segment bytes (independent of the journal index).
fn locate(store: &MemSegments, seq: Seq) -> (usize, usize) {
    for segment in 0..store.segment_count() {
        let bytes = store.segment(segment);
        let mut offset = SEGMENT_HEADER_BYTES;
        while let Ok((record, used)) = decode(&bytes[offset..]) {
            if record.seq == seq {
                return (segment, offset);
            }
            offset += used;
        }
    }
    panic!("record {seq} not found");
}

fn check_kept(journal: &Journal<MemSegments>, sizes: &[usize], kept: usize) {
    assert_eq!(journal.last_seq(), kept as Seq);
    for seq in 1..=kept as Seq {
        let record = journal.record(seq).unwrap();
        assert_eq!(
            record.payload,
            &payload(seq - 1, sizes[seq as usize - 1])[..]
        );
        assert_eq!(record.timestamp_ns, seq - 1);
    }
    assert_eq!(journal.record(kept as Seq + 1), None);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn record_encode_decode_round_trips(
        kind_index in 0usize..5,
        disk_id: u32,
        seq: u64,
        offset: u64,
        length: u64,
        timestamp_ns: u64,
        prev_checksum: u64,
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
    ) {
        let kind = KINDS[kind_index];
        let length = if kind.carries_data() { payload.len() as u64 } else { length };
        let record = Record { kind, disk_id, seq, offset, length, timestamp_ns, payload: &payload };
        let mut out = vec![0xeeu8; record.encoded_len() + 16];
        let (used, links) = record.encode_linked_into(prev_checksum, &mut out).unwrap();
        prop_assert_eq!(used, record.encoded_len());
        prop_assert_eq!(used % 8, 0);
        let (decoded, decoded_links, decoded_used) = decode_linked(&out[..used]).unwrap();
        prop_assert_eq!(decoded, record);
        prop_assert_eq!(decoded_links, links);
        prop_assert_eq!(links.prev_checksum, prev_checksum);
        prop_assert_eq!(decoded_used, used);
        prop_assert_eq!(record.to_vec().unwrap().len(), used);
        // Cut short anywhere inside header or payload: an error, never a record.
        let cut = (seq as usize) % (RECORD_HEADER_BYTES + payload.len());
        prop_assert!(decode(&out[..cut]).is_err());
    }

    #[test]
    fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_linked(&bytes);
    }

    /// The last record cut off at every byte (zeros after the cut, as in a fresh segment):
    /// every flushed record is kept, the partial one is never handed out, and anything left of
    /// it is reported.
    #[test]
    fn reopen_after_truncation_at_every_byte_of_the_last_record(
        sizes in proptest::collection::vec(0usize..300, 2..12),
    ) {
        let (store, segment, start) = journal_with_unflushed_last(&sizes);
        let last_len = RECORD_HEADER_BYTES + sizes[sizes.len() - 1];
        for cut in 0..=last_len {
            let mut torn = store.crash_with(CrashMode::KeepUnflushed);
            let tail = &mut torn.segment_mut(segment)[start + cut..start + last_len];
            // Zeroing bytes that already were zero (a payload or checksum byte that happens to
            // be 0) tears nothing: the record is intact and must be kept.
            let intact = tail.iter().all(|&byte| byte == 0);
            tail.fill(0);
            let (journal, report) = Journal::open(torn).unwrap();
            let kept = if intact { sizes.len() } else { sizes.len() - 1 };
            prop_assert_eq!(report.records_kept, kept as u64, "cut {}", cut);
            check_kept(&journal, &sizes, kept);
            if cut == 0 || intact {
                prop_assert_eq!(report.bytes_dropped, 0, "cut {}", cut);
            } else {
                prop_assert!(report.bytes_dropped >= cut as u64, "cut {}: {:?}", cut, report);
                prop_assert!(report.drop_reason.is_some(), "cut {}", cut);
            }
        }
    }

    /// The last record with one byte changed at every position of its header and payload.
    #[test]
    fn reopen_after_corruption_at_every_byte_of_the_last_record(
        sizes in proptest::collection::vec(0usize..200, 2..8),
        xor in 1u8..=255,
    ) {
        let (store, segment, start) = journal_with_unflushed_last(&sizes);
        let last_len = RECORD_HEADER_BYTES + sizes[sizes.len() - 1];
        for position in 0..last_len {
            let mut corrupt = store.crash_with(CrashMode::KeepUnflushed);
            corrupt.segment_mut(segment)[start + position] ^= xor;
            let (journal, report) = Journal::open(corrupt).unwrap();
            prop_assert_eq!(report.records_kept, sizes.len() as u64 - 1, "byte {}", position);
            check_kept(&journal, &sizes, sizes.len() - 1);
            prop_assert!(report.bytes_dropped > 0, "byte {}", position);
            prop_assert!(report.drop_reason.is_some(), "byte {}", position);
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Append { len: usize },
    Flush { fraction: u8 },
    Release { fraction: u8 },
    Crash { mode: u8, seed: u64 },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..1500).prop_map(|len| Op::Append { len }),
        2 => any::<u8>().prop_map(|fraction| Op::Flush { fraction }),
        1 => any::<u8>().prop_map(|fraction| Op::Release { fraction }),
        1 => (any::<u8>(), any::<u64>()).prop_map(|(mode, seed)| Op::Crash { mode, seed }),
    ]
}

fn scaled(last: Seq, fraction: u8) -> Seq {
    last * fraction as u64 / 255
}

/// The Append and Flush steps both journal models share: appends `len` fresh bytes (the model
/// gains them when the journal took them) or flushes a fraction of the log.
fn append_or_flush(
    journal: &mut Journal<MemSegments>,
    model: &mut Vec<Vec<u8>>,
    next_payload_seed: &mut u64,
    op: &Op,
    step: usize,
) -> Result<bool, TestCaseError> {
    match *op {
        Op::Append { len } => {
            *next_payload_seed += 1;
            let bytes = payload(*next_payload_seed, len);
            match journal.append(&spec(&bytes, *next_payload_seed)) {
                Ok(seq) => {
                    prop_assert_eq!(seq, model.len() as Seq + 1, "step {}", step);
                    model.push(bytes);
                    Ok(true)
                }
                Err(JournalError::Full { .. }) => {
                    prop_assert!(
                        journal.held_records() > 0,
                        "step {}: full while empty",
                        step
                    );
                    Ok(false)
                }
                Err(other) => Err(TestCaseError::fail(format!("step {step}: {other}"))),
            }
        }
        Op::Flush { fraction } => {
            let upto = scaled(journal.last_seq(), fraction);
            journal.flush(upto).unwrap();
            prop_assert!(journal.durable_seq() >= upto);
            Ok(false)
        }
        _ => Ok(false),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random appends, flushes, releases and crashes (torn, lost or kept writes) against a model
    /// of what was appended: after every reopen each flushed record is present and intact,
    /// nothing that was not appended is handed out, held sequences are contiguous and
    /// sequences keep counting up.
    #[test]
    fn random_operations_against_a_model(
        segment_count in 2usize..6,
        segment_kib in 3usize..9,
        ops in proptest::collection::vec(op_strategy(), 1..150),
    ) {
        let (mut journal, _) = Journal::open(MemSegments::new(segment_count, segment_kib * 1024)).unwrap();
        // model[i] is the payload of sequence i + 1.
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut next_payload_seed = 0u64;
        for (step, op) in ops.iter().enumerate() {
            match *op {
                Op::Append { .. } | Op::Flush { .. } => {
                    append_or_flush(&mut journal, &mut model, &mut next_payload_seed, op, step)?;
                }
                Op::Release { fraction } => journal.release(scaled(journal.last_seq(), fraction)),
                Op::Crash { mode, seed } => {
                    let mode = match mode % 4 {
                        0 => CrashMode::KeepUnflushed,
                        1 => CrashMode::LoseUnflushed,
                        _ => CrashMode::Tear { seed },
                    };
                    let durable = journal.durable_seq();
                    let released = journal.released_seq();
                    let store = journal.into_store().crash_with(mode);
                    let (reopened, report) = Journal::open(store).unwrap();
                    journal = reopened;
                    let last = journal.last_seq();
                    prop_assert!(last >= durable, "step {}: lost flushed records ({:?})", step, report);
                    prop_assert!(last <= model.len() as Seq, "step {}: invented records", step);
                    if mode == CrashMode::KeepUnflushed {
                        prop_assert_eq!(last, model.len() as Seq, "step {}", step);
                    }
                    prop_assert_eq!(report.next_seq, last + 1);
                    prop_assert_eq!(journal.durable_seq(), last);
                    prop_assert!(
                        journal.released_seq() <= released,
                        "step {}: unreleased records were dropped", step
                    );
                    let held: Vec<Seq> = journal
                        .iter_from(0)
                        .map(|record| {
                            let record = record.unwrap();
                            assert_eq!(record.payload, &model[record.seq as usize - 1][..], "step {step}");
                            record.seq
                        })
                        .collect();
                    let expected: Vec<Seq> = (journal.released_seq() + 1..=last).collect();
                    prop_assert_eq!(held, expected, "step {}", step);
                    model.truncate(last as usize);
                }
            }
            let usage = journal.usage();
            prop_assert_eq!(usage.used_bytes + usage.free_bytes, usage.capacity_bytes);
        }
    }

    /// The release of a source that ships under a sequence floor: what the target acknowledged
    /// counts as durable and is never flushed. A process that dies still loses nothing; after
    /// a machine went down the journal reopens (never an error), hands out only records that
    /// were appended, each intact, contiguously, and `restart_at` past every number used
    /// carries on from there — as the daemon does then.
    #[test]
    fn acknowledged_releases_against_a_model(
        segment_count in 2usize..6,
        segment_kib in 3usize..9,
        ops in proptest::collection::vec(op_strategy(), 1..150),
    ) {
        let (mut journal, _) = Journal::open(MemSegments::new(segment_count, segment_kib * 1024)).unwrap();
        let mut model: Vec<Vec<u8>> = Vec::new();
        // given_up[i]: sequence i + 1 was given up by a restart (it holds a Skip, or nothing).
        let mut given_up: Vec<bool> = Vec::new();
        let mut next_payload_seed = 0u64;
        for (step, op) in ops.iter().enumerate() {
            match *op {
                Op::Append { .. } | Op::Flush { .. } => {
                    if append_or_flush(&mut journal, &mut model, &mut next_payload_seed, op, step)? {
                        given_up.push(false);
                    }
                }
                Op::Release { fraction } => {
                    journal.release_acknowledged(scaled(journal.last_seq(), fraction));
                }
                Op::Crash { mode, seed } => {
                    let mode = match mode % 4 {
                        0 => CrashMode::KeepUnflushed,
                        1 => CrashMode::LoseUnflushed,
                        _ => CrashMode::Tear { seed },
                    };
                    let last_before = journal.last_seq();
                    let store = journal.into_store().crash_with(mode);
                    let (reopened, report) = Journal::open(store).unwrap();
                    journal = reopened;
                    let last = journal.last_seq();
                    prop_assert!(last <= last_before, "step {}: invented records ({:?})", step, report);
                    if mode == CrashMode::KeepUnflushed {
                        prop_assert_eq!(last, last_before, "step {}: a dead process lost records", step);
                    }
                    let held: Vec<Seq> = journal
                        .iter_from(0)
                        .map(|record| {
                            let record = record.unwrap();
                            let index = record.seq as usize - 1;
                            if given_up[index] {
                                assert_eq!(record.kind, RecordKind::Skip, "step {step}");
                            } else {
                                assert_eq!(record.payload, &model[index][..], "step {step}");
                            }
                            record.seq
                        })
                        .collect();
                    let expected: Vec<Seq> = (journal.released_seq() + 1..=last).collect();
                    prop_assert_eq!(held, expected, "step {}", step);
                    if mode != CrashMode::KeepUnflushed {
                        // The machine went down: give up everything up to a floor past every
                        // number used, as the daemon does.
                        let next = last_before + 1 + seed % 64;
                        prop_assert_eq!(journal.restart_at(next).unwrap(), next);
                        while (model.len() as Seq) < next {
                            model.push(Vec::new());
                            given_up.push(true);
                        }
                    } else {
                        model.truncate(last as usize);
                        given_up.truncate(last as usize);
                    }
                }
            }
            let usage = journal.usage();
            prop_assert_eq!(usage.used_bytes + usage.free_bytes, usage.capacity_bytes);
        }
    }
}

#[test]
fn mmap_journal_survives_reopen_and_reports_damage_on_disk() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    let sizes: Vec<usize> = (0..300).map(|i| 1000 + i * 37).collect();
    let (mut journal, report) = open_journal(&path, 8 * MIB).unwrap();
    assert_eq!(report.records_kept, 0);
    for (i, len) in sizes.iter().enumerate() {
        journal
            .append(&spec(&payload(i as u64, *len), i as u64))
            .unwrap();
    }
    journal.flush(300).unwrap();
    journal.release(10);
    let usage = journal.usage();
    assert!(usage.used_bytes > 0 && usage.free_bytes > 0);
    // Where record 300 is, for the corruption below.
    let (_, last_bytes) = journal.read_bytes(300).unwrap().unwrap();
    let last_len = last_bytes.len();
    drop(journal);

    let (journal, report) = open_journal(&path, 8 * MIB).unwrap();
    assert_eq!((report.last_seq, report.bytes_dropped), (300, 0));
    for seq in [1, 150, 300] {
        let record = journal.record(seq).unwrap();
        assert_eq!(
            record.payload,
            &payload(seq - 1, sizes[seq as usize - 1])[..]
        );
    }
    // Find record 300 in the files and flip a payload byte on disk.
    let (segment, offset) = (0..4)
        .find_map(|segment| {
            let bytes = journal.store().segment(segment);
            let mut offset = SEGMENT_HEADER_BYTES;
            while let Ok((record, used)) = decode(&bytes[offset..]) {
                if record.seq == 300 {
                    return Some((segment, offset));
                }
                offset += used;
            }
            None
        })
        .unwrap();
    drop(journal);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(segment_path(&path, segment))
        .unwrap();
    let mut byte = [0u8; 1];
    let target = (offset + RECORD_HEADER_BYTES + 5) as u64;
    file.read_exact_at(&mut byte, target).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], target).unwrap();
    drop(file);

    let (mut journal, report) = open_journal(&path, 8 * MIB).unwrap();
    assert_eq!(report.last_seq, 299);
    assert_eq!(report.bytes_dropped, last_len as u64);
    assert!(report.drop_reason.unwrap().contains("checksum"));
    assert_eq!(journal.record(300), None);
    assert_eq!(journal.append(&spec(b"after", 0)).unwrap(), 300);
    journal.flush(300).unwrap();
    drop(journal);

    // A segment file cut short is refused, not mapped (a mapping past the end would SIGBUS).
    std::fs::OpenOptions::new()
        .write(true)
        .open(segment_path(&path, 1))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let error = open_journal(&path, 8 * MIB).unwrap_err();
    assert!(
        matches!(error, MmapJournalError::Geometry { .. }),
        "{error}"
    );
}
