//! The cache journal as the daemon shares it: many capture connections append, the shipper
//! reads and releases, and flushes are group-committed so that one store flush makes every
//! record appended so far durable for all the FLUSH/FUA requests waiting on it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::core::journal::{
    Journal, JournalError, JournalUsage, RecordSpec, RecoveryReport, SegmentStore, StoreError,
};
use crate::core::record::Seq;
use crate::io::mmap_journal::{CreateOptions, JournalGeometry, MmapJournalError, MmapSegments};

/// Flushes byte ranges of the store's segments without the journal (and so without its lock):
/// `(segment, offset, len)`. With one, appends go on while a flush runs.
pub type RangeFlusher = Arc<dyn Fn(usize, usize, usize) -> Result<(), StoreError> + Send + Sync>;

/// The store behind the shared journal. Boxed so that neither the capture path nor the shipper
/// is generic over it: the daemon passes `io::mmap_journal::MmapSegments`, tests may pass the
/// in-memory store.
pub type JournalStore = Box<dyn SegmentStore + Send>;

impl SegmentStore for Box<dyn SegmentStore + Send> {
    fn segment_count(&self) -> usize {
        (**self).segment_count()
    }
    fn segment_bytes(&self) -> usize {
        (**self).segment_bytes()
    }
    fn segment(&self, index: usize) -> &[u8] {
        (**self).segment(index)
    }
    fn segment_mut(&mut self, index: usize) -> &mut [u8] {
        (**self).segment_mut(index)
    }
    fn write_parts(
        &mut self,
        index: usize,
        offset: usize,
        parts: &[&[u8]],
    ) -> Result<(), StoreError> {
        (**self).write_parts(index, offset, parts)
    }
    fn flush_range(&self, index: usize, offset: usize, len: usize) -> Result<(), StoreError> {
        (**self).flush_range(index, offset, len)
    }
}

struct Inner {
    journal: Mutex<Journal<JournalStore>>,
    /// Set for stores that can flush outside the lock (mapped files); `None`: flush under it.
    flusher: Option<RangeFlusher>,
    /// One flush at a time; waiters that find their sequence durable once they get in return
    /// at once (that is the group commit).
    flush_gate: tokio::sync::Mutex<()>,
    /// Mirrors of the journal's counters, readable without the lock (status, fast paths).
    durable_seq: AtomicU64,
    last_seq: AtomicU64,
    /// Woken whenever records are appended (the shipper waits on it).
    appended: Notify,
    /// First sequence of every journaled change whose disk write has not completed. Their
    /// records are never released (see [`SharedJournal::releasable`]), so after a crash of the
    /// process the journal still names every extent whose disk write may be missing.
    disk_pending: Mutex<BTreeSet<Seq>>,
}

/// A cheaply clonable handle on the one cache journal of an appliance.
#[derive(Clone)]
pub struct SharedJournal {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SharedJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedJournal")
            .field("last_seq", &self.last_seq())
            .field("durable_seq", &self.durable_seq())
            .finish()
    }
}

/// A journaled change whose disk write has not completed yet (see
/// [`SharedJournal::disk_write_pending`]).
#[derive(Debug)]
pub struct PendingDiskWrite<'a> {
    journal: &'a SharedJournal,
    first_seq: Seq,
}

impl Drop for PendingDiskWrite<'_> {
    fn drop(&mut self) {
        lock(&self.journal.inner.disk_pending).remove(&self.first_seq);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single set operation: a panic cannot leave them torn.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl SharedJournal {
    /// Opens (recovers) the journal in `store` and shares it.
    pub fn open(
        store: impl SegmentStore + Send + 'static,
    ) -> Result<(Self, RecoveryReport), JournalError> {
        let (journal, report) = Journal::open(Box::new(store) as JournalStore)?;
        Ok((Self::from_journal(journal), report))
    }

    /// Opens (creating if needed) the memory-mapped journal of `capacity_bytes` in `dir`: the
    /// daemon's journal. Its flushes run outside the lock (msync does not touch the bytes).
    pub fn open_mmap(
        dir: &std::path::Path,
        capacity_bytes: u64,
    ) -> Result<(Self, RecoveryReport), MmapJournalError> {
        let geometry = JournalGeometry::for_capacity(capacity_bytes).map_err(|message| {
            MmapJournalError::Geometry {
                dir: dir.to_owned(),
                message,
            }
        })?;
        let store = MmapSegments::open(dir, geometry, CreateOptions::default())?;
        let flusher = store.flusher();
        let (journal, report) =
            Journal::open(Box::new(store) as JournalStore).map_err(|source| {
                MmapJournalError::Journal {
                    dir: dir.to_owned(),
                    source,
                }
            })?;
        let flusher: RangeFlusher =
            Arc::new(move |segment, offset, len| flusher.flush_range(segment, offset, len));
        Ok((Self::build(journal, Some(flusher)), report))
    }

    /// Shares an already opened journal (flushes run under the lock).
    pub fn from_journal(journal: Journal<JournalStore>) -> Self {
        Self::build(journal, None)
    }

    /// Shares an already opened journal whose store `flusher` can flush without the lock.
    pub fn from_journal_with_flusher(
        journal: Journal<JournalStore>,
        flusher: RangeFlusher,
    ) -> Self {
        Self::build(journal, Some(flusher))
    }

    fn build(journal: Journal<JournalStore>, flusher: Option<RangeFlusher>) -> Self {
        let durable_seq = AtomicU64::new(journal.durable_seq());
        let last_seq = AtomicU64::new(journal.last_seq());
        Self {
            inner: Arc::new(Inner {
                journal: Mutex::new(journal),
                flusher,
                flush_gate: tokio::sync::Mutex::new(()),
                durable_seq,
                last_seq,
                appended: Notify::new(),
                disk_pending: Mutex::new(BTreeSet::new()),
            }),
        }
    }

    /// Locks the journal for reading records, releasing, or appending several records in a
    /// row. Hold it briefly (no `.await` while held); call [`note_appended`](Self::note_appended)
    /// after appending through the guard.
    pub fn lock(&self) -> MutexGuard<'_, Journal<JournalStore>> {
        // A panic under the lock is an internal bug; the journal itself poisons on store
        // failures, so the data behind a poisoned mutex is still consistent.
        self.inner
            .journal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends one record and wakes readers. Never blocks on I/O (`Full` instead).
    pub fn append(&self, spec: &RecordSpec<'_>) -> Result<Seq, JournalError> {
        let seq = self.lock().append(spec)?;
        self.note_appended(seq);
        Ok(seq)
    }

    /// Publishes records appended through [`lock`](Self::lock) up to `last_seq`.
    pub fn note_appended(&self, last_seq: Seq) {
        self.inner.last_seq.fetch_max(last_seq, Ordering::Release);
        self.inner.appended.notify_waiters();
    }

    /// Highest sequence appended.
    pub fn last_seq(&self) -> Seq {
        self.inner.last_seq.load(Ordering::Acquire)
    }

    /// Highest sequence known durable.
    pub fn durable_seq(&self) -> Seq {
        self.inner.durable_seq.load(Ordering::Acquire)
    }

    pub fn usage(&self) -> JournalUsage {
        self.lock().usage()
    }

    /// Releases every record `<= upto` (the target acknowledged them) that
    /// [`releasable`](Self::releasable) lets go.
    pub fn release(&self, upto: Seq) {
        let upto = self.releasable(upto);
        self.lock().release(upto);
    }

    /// Releases every record `<= upto` that the target acknowledged durable and that
    /// [`releasable`](Self::releasable) lets go, without flushing them here
    /// (`Journal::release_acknowledged`: for a source with a sequence floor).
    pub fn release_acknowledged(&self, upto: Seq) {
        let upto = self.releasable(upto);
        self.lock().release_acknowledged(upto);
    }

    /// How far a release of `upto` may go: never past a record whose disk write is still in
    /// flight. A write is journaled before it reaches the disk; if the process dies between the
    /// two, the target may already hold a change the source disk never got, and only a record
    /// still in the journal tells the restart which extent to resync.
    pub fn releasable(&self, upto: Seq) -> Seq {
        match lock(&self.inner.disk_pending).first() {
            Some(&first_pending) => upto.min(first_pending.saturating_sub(1)),
            None => upto,
        }
    }

    /// Notes that the change whose first record is `first_seq` is journaled and its disk write
    /// is about to be issued; the returned guard, dropped once the disk write has completed
    /// (or failed), lets its records be released again.
    pub fn disk_write_pending(&self, first_seq: Seq) -> PendingDiskWrite<'_> {
        lock(&self.inner.disk_pending).insert(first_seq);
        PendingDiskWrite {
            journal: self,
            first_seq,
        }
    }

    /// Waits until a record after `seq` has been appended (returns at once if one has).
    pub async fn wait_for_records_after(&self, seq: Seq) {
        loop {
            let notified = self.inner.appended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.last_seq() > seq {
                return;
            }
            notified.await;
        }
    }

    /// Makes every record `<= seq` durable, sharing the store flush with every concurrent
    /// caller: a flush covers everything appended when it starts. Returns the durable sequence.
    pub async fn flush_through(&self, seq: Seq) -> Result<Seq, JournalError> {
        if self.durable_seq() >= seq {
            return Ok(self.durable_seq());
        }
        let _gate = self.inner.flush_gate.lock().await;
        if self.durable_seq() >= seq {
            return Ok(self.durable_seq());
        }
        let inner = self.inner.clone();
        let result = tokio::task::spawn_blocking(move || {
            let lock = || {
                inner
                    .journal
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
            };
            match &inner.flusher {
                None => {
                    let mut journal = lock();
                    let target = journal.last_seq();
                    journal.flush(target)
                }
                Some(flusher) => {
                    // Two-phase: plan under the lock, msync without it, record under it. A
                    // round stops before a provisional segment and finishing it makes that
                    // header final; the next round goes on from there (as `Journal::flush`).
                    let target = lock().last_seq();
                    loop {
                        let plan = lock().begin_flush(target)?;
                        let outcome =
                            plan.execute_with(|segment, offset, len| flusher(segment, offset, len));
                        let durable = lock().finish_flush(plan, outcome)?;
                        if durable >= target {
                            break Ok(durable);
                        }
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|join_error| {
            Err(JournalError::Store(StoreError {
                operation: "flush task",
                segment: 0,
                message: join_error.to_string(),
            }))
        })?;
        self.inner.durable_seq.fetch_max(result, Ordering::AcqRel);
        Ok(result)
    }

    /// Makes everything appended so far durable (FLUSH, shutdown).
    pub async fn flush_all(&self) -> Result<Seq, JournalError> {
        self.flush_through(self.last_seq()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::journal_mem::MemSegments;
    use crate::core::record::RecordKind;

    fn append(journal: &SharedJournal) -> Seq {
        journal
            .append(&RecordSpec {
                kind: RecordKind::Write,
                disk_id: 1,
                offset: 0,
                length: 4096,
                timestamp_ns: 0,
                payload: &[7; 4096],
            })
            .unwrap()
    }

    #[tokio::test]
    async fn a_release_never_passes_a_change_still_on_its_way_to_the_disk() {
        let (journal, _) = SharedJournal::open(MemSegments::new(4, 1 << 20)).unwrap();
        let first = append(&journal);
        let second = append(&journal);
        let third = append(&journal);
        journal.flush_all().await.unwrap();
        let pending_second = journal.disk_write_pending(second);
        let pending_third = journal.disk_write_pending(third);
        assert_eq!(journal.releasable(third), first);
        journal.release(third);
        assert_eq!(
            journal.lock().first_seq(),
            second,
            "held from the pending change on"
        );
        drop(pending_second);
        assert_eq!(journal.releasable(third), second);
        drop(pending_third);
        assert_eq!(journal.releasable(third), third);
        journal.release(third);
        assert_eq!(journal.lock().first_seq(), 0, "nothing held any more");
    }
}
