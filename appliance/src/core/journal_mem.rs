//! In-memory `SegmentStore` with crash and tear injection, for the simulator and property tests.
//!
//! [`MemSegments`] keeps two images of every segment: the bytes as the journal sees them (the
//! page cache, in the real store) and the bytes that are durable (the disk). `flush_range`
//! copies a range from the first to the second. A crash turns the store into what a machine
//! would find after power loss: durable bytes are kept; every byte written since it was last
//! flushed is, chunk by chunk, kept, lost (the durable bytes come back), replaced with garbage,
//! or torn (a prefix of the chunk kept, the rest lost). The choice is a pure function of a seed,
//! so any crash replays exactly.
//!
//! The model assumes that writing back a range never damages bytes that were already durable
//! (no torn sectors under durable data); kernel-notes/mmap-msync.md says why that holds for the
//! real store.

use std::sync::Mutex;

use crate::core::journal::{SegmentStore, StoreError};

/// What happens to bytes written since their last flush when the store crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// The process died, the machine did not: the page cache survives, everything is kept.
    KeepUnflushed,
    /// Nothing unflushed reached the disk.
    LoseUnflushed,
    /// Power loss during writeback: each chunk of unflushed bytes is kept, lost, garbage or
    /// torn, chosen from the seed.
    Tear { seed: u64 },
}

/// Deterministic 64-bit generator (SplitMix64): the core may not use a random-number crate.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value in `0..bound` (`bound > 0`); the modulo bias is irrelevant for fault choices.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0);
        self.next_u64() % bound
    }
}

/// Longest run of unflushed bytes that shares one crash outcome (a few sectors).
const CRASH_CHUNK_BYTES_MAX: u64 = 2048;

#[derive(Clone, Debug)]
struct DurableState {
    images: Vec<Vec<u8>>,
    flush_calls: u64,
    failures_pending: u32,
}

/// An in-memory journal store; see the module docs.
#[derive(Debug)]
pub struct MemSegments {
    segment_bytes: usize,
    current: Vec<Vec<u8>>,
    durable: Mutex<DurableState>,
}

impl Clone for MemSegments {
    fn clone(&self) -> Self {
        MemSegments {
            segment_bytes: self.segment_bytes,
            current: self.current.clone(),
            durable: Mutex::new(self.lock().clone()),
        }
    }
}

impl MemSegments {
    /// A blank (all zero, all durable) store.
    pub fn new(segment_count: usize, segment_bytes: usize) -> Self {
        let images = vec![vec![0u8; segment_bytes]; segment_count];
        MemSegments {
            segment_bytes,
            current: images.clone(),
            durable: Mutex::new(DurableState {
                images,
                flush_calls: 0,
                failures_pending: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DurableState> {
        // A panic while holding this lock can only come from a bug in this file; the state it
        // guards is plain bytes, still consistent enough to keep testing with.
        self.durable
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The store as it would be after power loss with torn writes chosen by `seed`.
    pub fn crash(&self, seed: u64) -> MemSegments {
        self.crash_with(CrashMode::Tear { seed })
    }

    /// The store as it would be after a crash of the given kind. The result has no unflushed
    /// bytes: what it holds is what is on the disk.
    pub fn crash_with(&self, mode: CrashMode) -> MemSegments {
        let durable = self.lock();
        let mut rng = SplitMix64::new(match mode {
            CrashMode::Tear { seed } => seed,
            _ => 0,
        });
        let images: Vec<Vec<u8>> = self
            .current
            .iter()
            .zip(&durable.images)
            .map(|(current, on_disk)| match mode {
                CrashMode::KeepUnflushed => current.clone(),
                CrashMode::LoseUnflushed => on_disk.clone(),
                CrashMode::Tear { .. } => tear(current, on_disk, &mut rng),
            })
            .collect();
        MemSegments {
            segment_bytes: self.segment_bytes,
            current: images.clone(),
            durable: Mutex::new(DurableState {
                images,
                flush_calls: 0,
                failures_pending: 0,
            }),
        }
    }

    /// Bytes written since they were last flushed.
    pub fn unflushed_bytes(&self) -> usize {
        let durable = self.lock();
        self.current
            .iter()
            .zip(&durable.images)
            .map(|(current, on_disk)| current.iter().zip(on_disk).filter(|(a, b)| a != b).count())
            .sum()
    }

    /// The next `count` calls of `flush_range` fail (and make nothing durable).
    pub fn fail_next_flushes(&self, count: u32) {
        self.lock().failures_pending = count;
    }

    /// How many times `flush_range` was called (a stand-in for msync calls in tests).
    pub fn flush_calls(&self) -> u64 {
        self.lock().flush_calls
    }

    /// Changes a byte both in memory and on "disk": corruption that no flush caused (bit rot, a
    /// test scribbling on a file).
    pub fn corrupt_durable(&mut self, index: usize, offset: usize, xor: u8) {
        self.current[index][offset] ^= xor;
        let mut durable = self.lock();
        durable.images[index][offset] ^= xor;
    }
}

/// What power loss leaves of `current` over `on_disk`.
fn tear(current: &[u8], on_disk: &[u8], rng: &mut SplitMix64) -> Vec<u8> {
    let mut result = on_disk.to_vec();
    let mut pos = 0;
    // Bounded: every iteration advances `pos` by at least one byte.
    while pos < current.len() {
        let Some(dirty) = current[pos..]
            .iter()
            .zip(&on_disk[pos..])
            .position(|(a, b)| a != b)
        else {
            break;
        };
        let start = pos + dirty;
        let end = (start + 1 + rng.below(CRASH_CHUNK_BYTES_MAX) as usize).min(current.len());
        match rng.below(10) {
            // Kept.
            0..=3 => result[start..end].copy_from_slice(&current[start..end]),
            // Lost: the durable bytes stay.
            4..=7 => {}
            // Garbage in place of the unflushed bytes.
            8 => {
                for i in start..end {
                    if current[i] != on_disk[i] {
                        result[i] = rng.next_u64() as u8;
                    }
                }
            }
            // Torn: a prefix reached the disk.
            _ => {
                let cut = start + rng.below((end - start) as u64 + 1) as usize;
                result[start..cut].copy_from_slice(&current[start..cut]);
            }
        }
        pos = end;
    }
    result
}

impl SegmentStore for MemSegments {
    fn segment_count(&self) -> usize {
        self.current.len()
    }
    fn segment_bytes(&self) -> usize {
        self.segment_bytes
    }
    fn segment(&self, index: usize) -> &[u8] {
        &self.current[index]
    }
    fn segment_mut(&mut self, index: usize) -> &mut [u8] {
        &mut self.current[index]
    }
    fn flush_range(&self, index: usize, offset: usize, len: usize) -> Result<(), StoreError> {
        let mut durable = self.lock();
        durable.flush_calls += 1;
        if durable.failures_pending > 0 {
            durable.failures_pending -= 1;
            return Err(StoreError {
                operation: "flush (injected failure)",
                segment: index,
                message: format!("bytes {offset}..{} not made durable", offset + len),
            });
        }
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= self.segment_bytes)
            .ok_or_else(|| StoreError {
                operation: "flush",
                segment: index,
                message: format!(
                    "range {offset}+{len} outside a {}-byte segment",
                    self.segment_bytes
                ),
            })?;
        durable.images[index][offset..end].copy_from_slice(&self.current[index][offset..end]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_bytes_survive_every_crash_and_tears_are_deterministic() {
        let mut store = MemSegments::new(2, 8192);
        store.segment_mut(0)[..4096].fill(0xaa);
        store.flush_range(0, 0, 1024).unwrap();
        assert_eq!(store.unflushed_bytes(), 3072);
        let mut saw_kept = false;
        let mut saw_lost = false;
        for seed in 0..64 {
            let crashed = store.crash(seed);
            assert!(
                crashed.segment(0)[..1024].iter().all(|b| *b == 0xaa),
                "seed {seed}"
            );
            assert!(
                crashed.segment(0)[4096..].iter().all(|b| *b == 0),
                "seed {seed}"
            );
            assert_eq!(
                crashed.segment(0),
                store.crash(seed).segment(0),
                "seed {seed}"
            );
            assert_eq!(crashed.unflushed_bytes(), 0);
            saw_kept |= crashed.segment(0)[1024..4096].contains(&0xaa);
            saw_lost |= crashed.segment(0)[1024..4096].contains(&0);
        }
        assert!(saw_kept && saw_lost);
        let lost = store.crash_with(CrashMode::LoseUnflushed);
        assert!(lost.segment(0)[1024..].iter().all(|b| *b == 0));
        let kept = store.crash_with(CrashMode::KeepUnflushed);
        assert_eq!(kept.segment(0), store.segment(0));
    }

    #[test]
    fn injected_flush_failures_make_nothing_durable() {
        let mut store = MemSegments::new(2, 4096);
        store.segment_mut(1)[10] = 1;
        store.fail_next_flushes(1);
        assert!(store.flush_range(1, 0, 4096).is_err());
        assert_eq!(store.crash_with(CrashMode::LoseUnflushed).segment(1)[10], 0);
        store.flush_range(1, 0, 4096).unwrap();
        assert_eq!(store.crash_with(CrashMode::LoseUnflushed).segment(1)[10], 1);
        assert!(store.flush_range(1, 4000, 200).is_err());
        assert_eq!(store.flush_calls(), 3);
    }
}
