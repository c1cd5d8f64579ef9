//! In-memory `SegmentStore` with crash and tear injection, for the simulator and property tests.
