//! The sans-IO core: journal format and ring, replication protocol state machines, NBD protocol
//! codec. Nothing in here performs I/O or reads a clock: inputs arrive through `handle_*` calls
//! with an explicit `now`, outputs leave through `poll_*` calls. The daemon drives it over real
//! sockets and disks; the simulator (tests/sim.rs) drives it over simulated ones.
//!
//! Architecture invariant: no module under `core/` imports tokio, quinn, io-uring, memmap2,
//! libc, `std::fs`, `std::net` or `std::time::SystemTime`/`Instant` — `tests/tidy.rs` checks.
#![forbid(unsafe_code)]

pub mod record;

pub mod journal;

pub mod journal_mem;

pub mod wire;

pub mod source;

pub mod target;

pub mod recovery;

pub mod peer;

pub mod nbd;
