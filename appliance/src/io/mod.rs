//! I/O edges: everything that touches the kernel (files, mappings, sockets, io_uring).
//! `unsafe` lives only here, each block with a `// SAFETY:` comment.

pub mod mmap_journal;
/// `pwritev` of several buffers at an offset, short writes retried (journal and undo appends).
pub(crate) use mmap_journal::pwritev_all;

pub mod disk;

pub mod sched;

pub mod sock;

pub mod transport;

pub mod rbd;
