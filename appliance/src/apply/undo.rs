//! The undo log of one replica disk: before-images the executor saves before a write after a
//! recovery point overwrites replica bytes, so that the state at any retained point can be read
//! back (`core::recovery` explains the model).
//!
//! Layout: a directory beside the replica, `<disk>.undo/`, holding segment files
//! `NNNNNNNNNNNNNNNNNNNN.seg` numbered in creation order (the number, not a sequence: after a
//! crash the source resends records, so sequences in append order can go backwards, and append
//! order is what resolves ties). Each segment is a run of entries: a 64-byte header (magic,
//! version, seq, offset, length, xxh3 over the header and the data) followed by the data. A
//! segment stops growing past `SEGMENT_BYTES_MAX`.
//!
//! Durability: `append` writes through to the page cache; `prepare_sync` + `SyncBatch::run` +
//! `publish` make every appended entry durable (one fdatasync per touched segment, plus the
//! directory when a segment was created) and only then show it in the index. The executor issues
//! the replica write an entry protects only after that, so a torn tail found on open (checksum or
//! length wrong) never protected anything and is cut off.
//!
//! An entry's `location` is `segment number << 40 | byte offset of its data in the segment`, so
//! byte `offset + k` of the entry is at `location + k`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::core::record::Seq;
use crate::core::recovery::{UndoEntry, UndoIndex};
use crate::io::pwritev_all;

/// A segment stops taking entries once it holds this many bytes.
pub const SEGMENT_BYTES_MAX: u64 = 64 << 20;
/// Largest data of one entry; the executor splits longer before-images.
pub const ENTRY_BYTES_MAX: u64 = 1 << 20;
/// Bytes of an entry header.
pub const HEADER_BYTES: u64 = 64;

const MAGIC: u64 = u64::from_le_bytes(*b"FRYUNDO1");
const VERSION: u32 = 1;
/// Bits of a location that hold the byte offset inside a segment.
const LOCATION_OFFSET_BITS: u32 = 40;

/// An undo-log operation that failed, with the file it was about.
#[derive(Debug, thiserror::Error)]
#[error("undo log: {operation} {path}: {source}")]
pub struct UndoError {
    pub operation: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn undo_error(operation: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UndoError {
    let path = path.to_path_buf();
    move |source| UndoError {
        operation,
        path,
        source,
    }
}

/// One entry header, little-endian and unaligned.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct EntryHeader {
    magic: U64,
    version: U32,
    reserved: U32,
    seq: U64,
    offset: U64,
    length: U64,
    reserved_tail: [u8; 16],
    /// xxh3-64 of the data, seeded with the xxh3-64 of the header bytes before this field.
    checksum: U64,
}

const _: () = assert!(std::mem::size_of::<EntryHeader>() == HEADER_BYTES as usize);

fn entry_checksum(header: &EntryHeader, data: &[u8]) -> u64 {
    let header_bytes = &header.as_bytes()[..HEADER_BYTES as usize - 8];
    twox_hash::XxHash3_64::oneshot_with_seed(twox_hash::XxHash3_64::oneshot(header_bytes), data)
}

fn encode_header(seq: Seq, offset: u64, data: &[u8]) -> EntryHeader {
    let mut header = EntryHeader {
        magic: MAGIC.into(),
        version: VERSION.into(),
        reserved: 0.into(),
        seq: seq.into(),
        offset: offset.into(),
        length: (data.len() as u64).into(),
        reserved_tail: [0; 16],
        checksum: 0.into(),
    };
    header.checksum = entry_checksum(&header, data).into();
    header
}

fn location(segment: u64, byte_offset: u64) -> u64 {
    (segment << LOCATION_OFFSET_BITS) | byte_offset
}

fn split_location(location: u64) -> (u64, u64) {
    (
        location >> LOCATION_OFFSET_BITS,
        location & ((1 << LOCATION_OFFSET_BITS) - 1),
    )
}

struct Segment {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    /// Highest entry sequence in the segment (0 when empty).
    seq_max: Seq,
}

/// The undo log of one replica disk.
pub struct UndoLog {
    dir: PathBuf,
    segments: BTreeMap<u64, Segment>,
    index: UndoIndex,
    /// Appended, not yet durable, not yet in the index.
    unpublished: Vec<UndoEntry>,
    /// Segments with appends since their last fdatasync.
    dirty: BTreeSet<u64>,
    /// A segment was created since the directory's last fsync.
    dir_dirty: bool,
}

/// What a scan on open found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub entries: u64,
    /// Bytes of torn or corrupt tails cut off.
    pub truncated_bytes: u64,
}

/// Durability work taken from an `UndoLog` so that the fdatasync runs without holding the
/// log's lock (readers keep reading); hand it back to `UndoLog::publish` when `run` succeeded.
pub struct SyncBatch {
    files: Vec<(PathBuf, Arc<File>)>,
    dir: Option<PathBuf>,
    entries: Vec<UndoEntry>,
}

impl SyncBatch {
    /// Whether there is nothing to make durable.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dir.is_none() && self.entries.is_empty()
    }

    /// fdatasync of every touched segment (and fsync of the directory after a new segment).
    pub fn run(&self) -> Result<(), UndoError> {
        for (path, file) in &self.files {
            file.sync_data().map_err(undo_error("fdatasync", path))?;
        }
        if let Some(dir) = &self.dir {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), UndoError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(undo_error("fsync directory", dir))
}

fn segment_name(number: u64) -> String {
    format!("{number:020}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl UndoLog {
    /// Creates the log's directory if needed (durably: the parent directory is fsync'd, since
    /// the directory's existence is what says "saving is on" for the disk) and opens it.
    pub fn create(dir: &Path) -> Result<(UndoLog, ScanReport), UndoError> {
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(undo_error("create directory", dir))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        UndoLog::open(dir)
    }

    /// Opens an existing log: scans every segment in order, checks every entry, cuts off a torn
    /// tail, and rebuilds the index.
    pub fn open(dir: &Path) -> Result<(UndoLog, ScanReport), UndoError> {
        let mut numbers = Vec::new();
        for item in fs::read_dir(dir).map_err(undo_error("list", dir))? {
            let item = item.map_err(undo_error("list", dir))?;
            if let Some(number) = item.file_name().to_str().and_then(parse_segment_name) {
                numbers.push(number);
            }
        }
        numbers.sort_unstable();
        let mut log = UndoLog {
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            index: UndoIndex::new(),
            unpublished: Vec::new(),
            dirty: BTreeSet::new(),
            dir_dirty: false,
        };
        let mut report = ScanReport::default();
        for number in numbers {
            let path = dir.join(segment_name(number));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(undo_error("open", &path))?;
            let file_len = file.metadata().map_err(undo_error("stat", &path))?.len();
            let (valid_len, seq_max) =
                scan_segment(&file, &path, number, file_len, &mut log.index, &mut report)?;
            if valid_len < file_len {
                tracing::warn!(
                    segment = %path.display(),
                    valid_bytes = valid_len,
                    file_bytes = file_len,
                    "undo log: cutting off a torn or corrupt tail"
                );
                file.set_len(valid_len)
                    .and_then(|()| file.sync_all())
                    .map_err(undo_error("truncate", &path))?;
                report.truncated_bytes += file_len - valid_len;
            }
            log.segments.insert(
                number,
                Segment {
                    path,
                    file: Arc::new(file),
                    len: valid_len,
                    seq_max,
                },
            );
        }
        Ok((log, report))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The durable entries, in append order.
    pub fn index(&self) -> &UndoIndex {
        &self.index
    }

    /// Bytes held in segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|segment| segment.len).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Appends a before-image: `data` was at `offset` of the replica before record `seq`. Not
    /// durable and not in the index until a sync batch of it is run and published.
    pub fn append(&mut self, seq: Seq, offset: u64, data: &[u8]) -> Result<UndoEntry, UndoError> {
        assert!(
            data.len() as u64 <= ENTRY_BYTES_MAX,
            "undo entry of {} bytes",
            data.len()
        );
        let entry_bytes = HEADER_BYTES + data.len() as u64;
        let number = match self.segments.iter().next_back() {
            Some((&number, segment))
                if segment.len == 0 || segment.len + entry_bytes <= SEGMENT_BYTES_MAX =>
            {
                number
            }
            last => {
                let number = last.map_or(1, |(&number, _)| number + 1);
                let path = self.dir.join(segment_name(number));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(undo_error("create", &path))?;
                self.segments.insert(
                    number,
                    Segment {
                        path,
                        file: Arc::new(file),
                        len: 0,
                        seq_max: 0,
                    },
                );
                self.dir_dirty = true;
                number
            }
        };
        let segment = self
            .segments
            .get_mut(&number)
            .expect("segment chosen above");
        let header = encode_header(seq, offset, data);
        // Header and before-image in one `pwritev`, not copied into one buffer first.
        pwritev_all(&segment.file, [header.as_bytes(), data], segment.len)
            .map_err(undo_error("write", &segment.path))?;
        let entry = UndoEntry {
            seq,
            offset,
            length: data.len() as u64,
            location: location(number, segment.len + HEADER_BYTES),
        };
        segment.len += entry_bytes;
        segment.seq_max = segment.seq_max.max(seq);
        self.dirty.insert(number);
        self.unpublished.push(entry);
        Ok(entry)
    }

    /// Whether entries wait for a sync.
    pub fn has_unsynced(&self) -> bool {
        !self.unpublished.is_empty() || !self.dirty.is_empty() || self.dir_dirty
    }

    /// Takes the durability work for every entry appended so far.
    pub fn prepare_sync(&mut self) -> SyncBatch {
        let files = std::mem::take(&mut self.dirty)
            .into_iter()
            .filter_map(|number| self.segments.get(&number))
            .map(|segment| (segment.path.clone(), segment.file.clone()))
            .collect();
        let dir = std::mem::take(&mut self.dir_dirty).then(|| self.dir.clone());
        SyncBatch {
            files,
            dir,
            entries: std::mem::take(&mut self.unpublished),
        }
    }

    /// Shows the entries of a batch that ran in the index (they are durable now).
    pub fn publish(&mut self, batch: SyncBatch) {
        for entry in batch.entries {
            self.index.push(entry);
        }
    }

    /// Appends, syncs and publishes in one call (tests and single-threaded callers).
    pub fn sync(&mut self) -> Result<(), UndoError> {
        let batch = self.prepare_sync();
        if let Err(error) = batch.run() {
            // Put the work back so a later sync retries it.
            self.unpublished.splice(0..0, batch.entries);
            let numbers: Vec<u64> = batch
                .files
                .iter()
                .filter_map(|(path, _)| self.number_of(path))
                .collect();
            self.dirty.extend(numbers);
            self.dir_dirty |= batch.dir.is_some();
            return Err(error);
        }
        self.publish(batch);
        Ok(())
    }

    fn number_of(&self, path: &Path) -> Option<u64> {
        path.file_name()
            .and_then(|name| name.to_str())
            .and_then(parse_segment_name)
    }

    /// The file and file offset holding the byte at `location`, for reading outside the lock.
    pub fn resolve(&self, location: u64) -> Option<(Arc<File>, PathBuf, u64)> {
        let (number, byte_offset) = split_location(location);
        let segment = self.segments.get(&number)?;
        Some((segment.file.clone(), segment.path.clone(), byte_offset))
    }

    /// Reads `buf.len()` bytes at `location` (within one entry).
    pub fn read_at(&self, location: u64, buf: &mut [u8]) -> Result<(), UndoError> {
        let (file, path, byte_offset) = self.resolve(location).ok_or_else(|| UndoError {
            operation: "read",
            path: self.dir.clone(),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                format!("no segment holds location {location:#x}"),
            ),
        })?;
        file.read_exact_at(buf, byte_offset)
            .map_err(undo_error("read", &path))
    }

    /// Drops every entry with a sequence at or below `seq` from the index and deletes every
    /// segment (but the last, which takes appends) whose entries all are at or below it.
    /// Returns the bytes freed.
    pub fn prune_through(&mut self, seq: Seq) -> Result<u64, UndoError> {
        self.index.drop_through(seq);
        let last = self.segments.keys().next_back().copied();
        let doomed: Vec<u64> = self
            .segments
            .iter()
            .filter(|(&number, segment)| Some(number) != last && segment.seq_max <= seq)
            .map(|(&number, _)| number)
            .collect();
        let mut freed = 0;
        for number in doomed {
            let segment = self.segments.remove(&number).expect("doomed segment held");
            self.dirty.remove(&number);
            fs::remove_file(&segment.path).map_err(undo_error("delete", &segment.path))?;
            freed += segment.len;
        }
        if freed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(freed)
    }
}

/// Checks the entries of one segment, pushing the good ones into `index`. Returns the length of
/// the valid prefix and the highest sequence in it.
fn scan_segment(
    file: &File,
    path: &Path,
    number: u64,
    file_len: u64,
    index: &mut UndoIndex,
    report: &mut ScanReport,
) -> Result<(u64, Seq), UndoError> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut position = 0u64;
    let mut seq_max = 0;
    let mut data = Vec::new();
    loop {
        if position + HEADER_BYTES > file_len {
            return Ok((position, seq_max));
        }
        let mut header_bytes = [0u8; HEADER_BYTES as usize];
        reader
            .read_exact(&mut header_bytes)
            .map_err(undo_error("read", path))?;
        let Ok((header, _)) = EntryHeader::read_from_prefix(&header_bytes) else {
            return Ok((position, seq_max));
        };
        let length = header.length.get();
        if header.magic.get() != MAGIC
            || header.version.get() != VERSION
            || length > ENTRY_BYTES_MAX
            || position + HEADER_BYTES + length > file_len
        {
            return Ok((position, seq_max));
        }
        data.resize(length as usize, 0);
        reader
            .read_exact(&mut data)
            .map_err(undo_error("read", path))?;
        if entry_checksum(&header, &data) != header.checksum.get() {
            return Ok((position, seq_max));
        }
        let seq = header.seq.get();
        index.push(UndoEntry {
            seq,
            offset: header.offset.get(),
            length,
            location: location(number, position + HEADER_BYTES),
        });
        report.entries += 1;
        seq_max = seq_max.max(seq);
        position += HEADER_BYTES + length;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(log: &UndoLog) -> Vec<(Seq, u64, u64)> {
        log.index()
            .iter()
            .map(|entry| (entry.seq, entry.offset, entry.length))
            .collect()
    }

    fn read(log: &UndoLog, entry: &UndoEntry) -> Vec<u8> {
        let mut buf = vec![0; entry.length as usize];
        log.read_at(entry.location, &mut buf).unwrap();
        buf
    }

    #[test]
    fn entries_survive_reopen_and_read_back_by_location() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("os.undo");
        let (mut log, report) = UndoLog::create(&path).unwrap();
        assert_eq!(report, ScanReport::default());
        let first = log.append(5, 4096, &[1; 4096]).unwrap();
        let second = log.append(7, 0, &[2; 8192]).unwrap();
        assert!(log.index().is_empty(), "nothing shows before the sync");
        log.sync().unwrap();
        assert_eq!(entries(&log), vec![(5, 4096, 4096), (7, 0, 8192)]);
        // Byte offset+k of an entry is at location+k.
        let mut middle = [0u8; 10];
        log.read_at(second.location + 100, &mut middle).unwrap();
        assert_eq!(middle, [2; 10]);
        drop(log);

        let (log, report) = UndoLog::open(&path).unwrap();
        assert_eq!(
            report,
            ScanReport {
                entries: 2,
                truncated_bytes: 0
            }
        );
        assert_eq!(entries(&log), vec![(5, 4096, 4096), (7, 0, 8192)]);
        let reopened: Vec<UndoEntry> = log.index().iter().copied().collect();
        assert_eq!(reopened, vec![first, second]);
        assert_eq!(read(&log, &reopened[0]), vec![1; 4096]);
        assert_eq!(read(&log, &reopened[1]), vec![2; 8192]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_appends_continue_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("os.undo");
        let (mut log, _) = UndoLog::create(&path).unwrap();
        log.append(1, 0, &[3; 4096]).unwrap();
        let torn = log.append(2, 4096, &[4; 4096]).unwrap();
        log.sync().unwrap();
        drop(log);
        // Flip a data byte of the second entry: its checksum no longer matches.
        let segment = path.join(segment_name(1));
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        file.write_all_at(&[9], split_location(torn.location).1 + 17)
            .unwrap();
        drop(file);
        let (mut log, report) = UndoLog::open(&path).unwrap();
        assert_eq!(report.entries, 1);
        assert_eq!(report.truncated_bytes, HEADER_BYTES + 4096);
        assert_eq!(entries(&log), vec![(1, 0, 4096)]);
        assert_eq!(fs::metadata(&segment).unwrap().len(), HEADER_BYTES + 4096);

        // A header cut short by a crash is a torn tail too.
        let extra = log.append(3, 0, &[5; 4096]).unwrap();
        log.sync().unwrap();
        assert_eq!(split_location(extra.location).1, 2 * HEADER_BYTES + 4096);
        drop(log);
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        let len = file.metadata().unwrap().len();
        file.write_all_at(&[0xAA; 30], len).unwrap();
        drop(file);
        let (log, report) = UndoLog::open(&path).unwrap();
        assert_eq!(report.truncated_bytes, 30);
        assert_eq!(entries(&log), vec![(1, 0, 4096), (3, 0, 4096)]);
        let held: Vec<UndoEntry> = log.index().iter().copied().collect();
        assert_eq!(read(&log, &held[1]), vec![5; 4096]);
    }

    #[test]
    fn segments_roll_and_prune_deletes_whole_segments_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("os.undo");
        let (mut log, _) = UndoLog::create(&path).unwrap();
        let data = vec![6u8; ENTRY_BYTES_MAX as usize];
        // 64 entries of 1 MiB + header do not fit one 64 MiB segment: two segments.
        let per_segment = SEGMENT_BYTES_MAX / (HEADER_BYTES + ENTRY_BYTES_MAX);
        for seq in 1..=per_segment + 2 {
            log.append(seq, 0, &data).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.segment_count(), 2);
        assert!(path.join(segment_name(2)).exists());
        // Nothing at or below 1 spans a whole segment: only the index shrinks.
        assert_eq!(log.prune_through(1).unwrap(), 0);
        assert_eq!(log.index().len() as u64, per_segment + 1);
        assert_eq!(log.segment_count(), 2);
        // Every entry of segment 1 is at or below `per_segment`.
        let freed = log.prune_through(per_segment).unwrap();
        assert_eq!(freed, per_segment * (HEADER_BYTES + ENTRY_BYTES_MAX));
        assert!(!path.join(segment_name(1)).exists());
        assert_eq!(log.segment_count(), 1);
        // The last segment stays even when everything in it is pruned (it takes appends).
        log.prune_through(u64::MAX).unwrap();
        assert!(log.index().is_empty());
        assert_eq!(log.segment_count(), 1);
        let next = log.append(100, 8192, &[7; 4096]).unwrap();
        log.sync().unwrap();
        drop(log);
        let (log, _) = UndoLog::open(&path).unwrap();
        // Pruned-but-kept entries of the last segment come back on reopen; they are below every
        // retained point, so views never use them. The new entry reads back.
        let last = log.index().iter().last().copied().unwrap();
        assert_eq!(last, next);
        assert_eq!(read(&log, &last), vec![7; 4096]);
    }

    #[test]
    fn foreign_files_are_ignored_and_an_empty_directory_opens_empty() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        fs::write(dir.path().join("1.seg"), b"x").unwrap();
        let (log, report) = UndoLog::open(dir.path()).unwrap();
        assert_eq!(report.entries, 0);
        assert_eq!(log.segment_count(), 0);
        assert!(UndoLog::open(&dir.path().join("missing")).is_err());
    }
}
