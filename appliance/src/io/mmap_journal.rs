//! The cache journal's segments as preallocated, memory-mapped files (memmap2): the daemon's
//! `SegmentStore`. Being written by the journal owner.
