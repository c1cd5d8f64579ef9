//! I/O edges: everything that touches the kernel (files, mappings, sockets, io_uring).
//! `unsafe` lives only here, each block with a `// SAFETY:` comment.

pub mod mmap_journal;

pub mod disk;

pub mod transport;

pub mod rbd;
